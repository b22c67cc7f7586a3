"""DDIM (Song et al. 2021), as diffusers' DDIMScheduler computes it.

    x' = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - std^2) eps + std z,
    std = eta sqrt((1 - abar_prev) / (1 - abar_t) (1 - abar_t / abar_prev)),
with x0 = p x + q out (clipped / thresholded) and eps = ep x + eq out from the raw output.
"""

from __future__ import annotations

import math

from ..models import data_coeffs, noise_coeffs
from ..ops import UpdateCoeffs
from ..schedules import VP, discrete_timesteps
from .plan import Direction, Plan, Step


def ddim_plan(schedule: VP, steps: int, prediction: str, *, eta: float = 0.0, timestep_spacing: str = "leading",
              steps_offset: int = 0, set_alpha_to_one: bool = True) -> Plan:
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    n = schedule.num_train_timesteps
    timesteps = discrete_timesteps(n, steps, timestep_spacing, steps_offset)
    final_abar = 1.0 if set_alpha_to_one else schedule.alpha_bar(0)
    plan = []
    for t in timesteps:
        prev = t - n // steps
        ab_t = schedule.alpha_bar(t)
        ab_prev = schedule.alpha_bar(prev) if prev >= 0 else final_abar
        variance = (1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)
        coeffs, direction = ddim_coeffs(prediction, ab_t, ab_prev, eta * math.sqrt(variance))
        plan.append(Step(t=int(t), coeffs=coeffs, direction=direction))
    return Plan(steps=tuple(plan), history_slots=0, discrete_time=True)


def ddim_coeffs(prediction: str, ab_t: float, ab_prev: float, std: float,
                clipped_eps: bool = False) -> tuple[UpdateCoeffs, Direction]:
    """One DDIM step from abar_t to abar_prev with noise std: the update, and its direction term (the weight
    sqrt(1 - abar_prev - std^2) of eps, eps as a row over x, out and m0: LML's direction). clipped_eps: eps
    from the (clipped) data prediction, eps = (x - alpha m0) / sigma (diffusers' use_clipped_model_output)."""
    alpha, sigma = math.sqrt(ab_t), math.sqrt(1 - ab_t)
    p, q = data_coeffs(prediction, alpha, sigma)
    weight = math.sqrt(max(1 - ab_prev - std * std, 0.0))
    if clipped_eps:
        coeffs = UpdateCoeffs(p=p, q=q, a=weight / sigma, b=(math.sqrt(ab_prev) - weight * alpha / sigma,), c=std)
        return coeffs, Direction(weight, 1.0 / sigma, 0.0, (-alpha / sigma,))
    ep, eq = noise_coeffs(prediction, alpha, sigma)
    coeffs = UpdateCoeffs(p=p, q=q, a=weight * ep, e=weight * eq, b=(math.sqrt(ab_prev),), c=std)
    return coeffs, Direction(weight, ep, eq, (0.0,))
