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
        alpha, sigma = math.sqrt(ab_t), math.sqrt(1 - ab_t)
        variance = (1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)
        std = eta * math.sqrt(variance)
        p, q = data_coeffs(prediction, alpha, sigma)
        ep, eq = noise_coeffs(prediction, alpha, sigma)
        direction = math.sqrt(max(1 - ab_prev - std * std, 0.0))
        coeffs = UpdateCoeffs(p=p, q=q, a=direction * ep, e=direction * eq, b=(math.sqrt(ab_prev),), c=std)
        plan.append(Step(t=int(t), coeffs=coeffs, direction=Direction(direction, ep, eq, (0.0,))))
    return Plan(steps=tuple(plan), history_slots=0, discrete_time=True)
