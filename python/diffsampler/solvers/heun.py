"""Euler and Heun (2nd order) on an EDM / VE schedule, Karras et al. (2022) Algorithm 1.

x lives in the VE scale (x = x0 + sigma eps, x_T = sigma_max N(0, I)); the step formulas are solvers.ve's.
Heun is two model calls per interval, each one fused update (a Plan stage), and a plain Euler step into
sigma' = 0.
"""

from __future__ import annotations

from ..schedules import EDM
from .plan import Plan, Step
from .ve import euler_coeffs, heun_coeffs, ve_data_coeffs


def edm_euler_plan(schedule: EDM, steps: int, prediction: str) -> Plan:
    sigmas = schedule.sigmas(steps)
    plan = [Step(t=sigma, coeffs=euler_coeffs(*ve_data_coeffs(prediction, sigma), sigma, nxt))
            for sigma, nxt in zip(sigmas[:-1], sigmas[1:])]
    return Plan(steps=tuple(plan), history_slots=0, discrete_time=False, init_scale=sigmas[0])


def heun_plan(schedule: EDM, steps: int, prediction: str) -> Plan:
    """`steps` intervals, 2 * steps - 1 model calls (the last interval, into sigma = 0, is an Euler step)."""
    sigmas = schedule.sigmas(steps)
    plan = []
    for sigma, nxt in zip(sigmas[:-1], sigmas[1:]):
        p, q = ve_data_coeffs(prediction, sigma)
        if nxt == 0:
            plan.append(Step(t=sigma, coeffs=euler_coeffs(p, q, sigma, nxt)))
            continue
        first, second = heun_coeffs(p, q, *ve_data_coeffs(prediction, nxt), sigma, nxt)
        plan.append(Step(t=sigma, coeffs=first, write_slot=0))
        plan.append(Step(t=nxt, coeffs=second, write_slot=1, read_slots=(0,)))
    return Plan(steps=tuple(plan), history_slots=2, discrete_time=False, init_scale=sigmas[0], uses_state=True)
