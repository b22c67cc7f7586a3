"""DPM-Solver++ multistep (Lu et al. 2022), data prediction, as diffusers' DPMSolverMultistepScheduler.

With sigma the ratio sigma_t / alpha_t, lambda = -log(sigma), h = lambda_t - lambda_s, A = alpha_t (e^{-h} - 1):
    1st order: x_t = (sigma_t / sigma_s) x_s - A m_0
    2M (midpoint): r = h_prev / h, x_t = (sigma_t / sigma_s) x_s - A (1 + 1/(2r)) m_0 + A/(2r) m_1
"""

from __future__ import annotations

import math

import numpy as np

from ..models import data_coeffs
from ..ops import UpdateCoeffs
from ..schedules import VP, discrete_timesteps, sigma_to_alpha_sigma
from .plan import Plan, Step, ring_slots

FINAL_SIGMAS = ("zero", "sigma_min")


def _lambda(alpha: float, sigma: float) -> float:
    return math.inf if sigma == 0 else math.log(alpha) - math.log(sigma)


def dpmpp_timesteps(schedule: VP, steps: int, spacing: str, steps_offset: int = 0) -> np.ndarray:
    """DPMSolverMultistepScheduler's grid: the DDIM grid of steps + 1 points without its last (t = 0) point,
    except "trailing", which is the DDIM trailing grid."""
    n = schedule.num_train_timesteps
    if spacing == "trailing":
        t = discrete_timesteps(n, steps, spacing)
    elif spacing == "linspace":
        discrete_timesteps(n, steps, spacing)  # checks steps and spacing
        t = np.linspace(0, n - 1, steps + 1).round()[::-1][:-1].copy().astype(np.int64)
    else:
        t = discrete_timesteps(n, steps + 1, spacing, steps_offset)[:-1].copy()
    if len(np.unique(t)) != len(t):
        raise ValueError(f"steps={steps} repeats timesteps on the {spacing!r} grid of {n}; use fewer steps")
    return t


def dpmpp_plan(schedule: VP, steps: int, prediction: str, *, order: int = 2, timestep_spacing: str = "linspace",
               steps_offset: int = 0, final_sigmas_type: str = "zero", lower_order_final: bool = True,
               euler_at_final: bool = False) -> Plan:
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2 for dpmpp, got {order}")
    if final_sigmas_type not in FINAL_SIGMAS:
        raise ValueError(f"final_sigmas_type must be one of {FINAL_SIGMAS}, got {final_sigmas_type!r}")
    timesteps = dpmpp_timesteps(schedule, steps, timestep_spacing, steps_offset)
    ratios = [schedule.sigma_ratio(t) for t in timesteps]
    ratios.append(0.0 if final_sigmas_type == "zero" else schedule.sigma_ratio(0))
    ratios = [float(np.float32(r)) for r in ratios]  # diffusers keeps its sigmas in float32
    alphas_sigmas = [sigma_to_alpha_sigma(r) for r in ratios]
    lambdas = [_lambda(a, s) for a, s in alphas_sigmas]
    n = len(timesteps)
    plan = []
    for i, t in enumerate(timesteps):
        last = i == n - 1
        this_order = min(order, i + 1)
        if last and (euler_at_final or (lower_order_final and n < 15) or final_sigmas_type == "zero"):
            this_order = 1
        elif i == n - 2 and lower_order_final and n < 15:
            this_order = min(this_order, 2)
        alpha_s, sigma_s = alphas_sigmas[i]
        alpha_t, sigma_t = alphas_sigmas[i + 1]
        h = lambdas[i + 1] - lambdas[i]
        big_a = alpha_t * (math.exp(-h) - 1.0)
        p, q = data_coeffs(prediction, alpha_s, sigma_s)
        if this_order == 1:
            b = (-big_a,)
        else:
            r0 = (lambdas[i] - lambdas[i - 1]) / h
            b = (-big_a * (1 + 0.5 / r0), big_a * 0.5 / r0)
        write, reads = ring_slots(i, this_order, order)
        coeffs = UpdateCoeffs(p=p, q=q, a=sigma_t / sigma_s, b=b)
        plan.append(Step(t=int(t), coeffs=coeffs, write_slot=write, read_slots=reads))
    return Plan(steps=tuple(plan), history_slots=order if order > 1 else 0, discrete_time=True)
