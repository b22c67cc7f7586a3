"""Euler and Heun (2nd order) on an EDM / VE schedule, Karras et al. (2022) Algorithm 1.

x lives in the VE scale (x = x0 + sigma eps, x_T = sigma_max N(0, I)); d = (x - D) / sigma with D the data
prediction. Heun is two model calls per interval, each one fused update (a Plan stage):
    stage 1: x2 = x + (sigma' - sigma) d,  keep x in the state and D in the history
    stage 2: x' = s + (sigma' - sigma) (d + d2) / 2 = (1 + r/2) s - r/2 D + r2/2 x2 - r2/2 D2,
             r = (sigma' - sigma) / sigma, r2 = (sigma' - sigma) / sigma'
and a plain Euler step into sigma' = 0.
"""

from __future__ import annotations

from ..ops import StateRow, UpdateCoeffs
from ..schedules import EDM
from .plan import Plan, Step


def _ve_data_coeffs(prediction: str, sigma: float) -> tuple[float, float]:
    """(p, q) of D = p x + q out in the VE scale."""
    if prediction == "x0":
        return 0.0, 1.0
    if prediction == "eps":
        return 1.0, -sigma
    raise ValueError(f"the EDM solvers take prediction 'x0' (a denoiser) or 'eps', got {prediction!r}")


def _euler(prediction: str, sigma: float, nxt: float, **extra) -> UpdateCoeffs:
    """x' = x + (sigma' - sigma) (x - D) / sigma."""
    p, q = _ve_data_coeffs(prediction, sigma)
    r = (nxt - sigma) / sigma
    return UpdateCoeffs(p=p, q=q, a=1.0 + r, b=(-r,), **extra)


def edm_euler_plan(schedule: EDM, steps: int, prediction: str) -> Plan:
    sigmas = schedule.sigmas(steps)
    plan = [Step(t=sigma, coeffs=_euler(prediction, sigma, nxt)) for sigma, nxt in zip(sigmas[:-1], sigmas[1:])]
    return Plan(steps=tuple(plan), history_slots=0, discrete_time=False, init_scale=sigmas[0])


def heun_plan(schedule: EDM, steps: int, prediction: str) -> Plan:
    """`steps` intervals, 2 * steps - 1 model calls (the last interval, into sigma = 0, is an Euler step)."""
    sigmas = schedule.sigmas(steps)
    plan = []
    for sigma, nxt in zip(sigmas[:-1], sigmas[1:]):
        if nxt == 0:
            plan.append(Step(t=sigma, coeffs=_euler(prediction, sigma, nxt)))
            continue
        keep_start = StateRow(a=1.0, b=(0.0,))
        plan.append(Step(t=sigma, coeffs=_euler(prediction, sigma, nxt, state=keep_start), write_slot=0))
        r = (nxt - sigma) / sigma
        p2, q2 = _ve_data_coeffs(prediction, nxt)
        r2 = (nxt - sigma) / nxt
        plan.append(Step(t=nxt, coeffs=UpdateCoeffs(p=p2, q=q2, a=r2 / 2, b=(-r2 / 2, -r / 2), g=1.0 + r / 2),
                         write_slot=1, read_slots=(0,)))
    return Plan(steps=tuple(plan), history_slots=2, discrete_time=False, init_scale=sigmas[0], uses_state=True)
