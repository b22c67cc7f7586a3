"""Few-step samplers of distilled models: LCM (Luo et al. 2023) and TCD (Zheng et al. 2024), as diffusers'
LCMScheduler and TCDScheduler compute them; each step is one fused call that also writes the step's
prediction (LCM's `denoised`, TCD's `pred_noised_sample`) into the fused state.

    LCM   D = c_skip(t) x + c_out(t) x0,  c_skip = sd^2 / (T^2 + sd^2),  c_out = T / sqrt(T^2 + sd^2),
          T = timestep_scaling t, sd = 1/2 (x0 clipped / thresholded first);
          x' = sqrt(abar_prev) D + sqrt(1 - abar_prev) z   (the last step: x' = D)
    TCD   s = floor((1 - gamma) t_prev),  N = sqrt(abar_s) x0 + sqrt(1 - abar_s) eps;
          x' = sqrt(abar_prev / abar_s) N + sqrt(1 - abar_prev / abar_s) z   (gamma = 0 or the last step: x' = N)

The grid (both): the `original_steps` training timesteps k i - 1 (k = N // original_steps, i = 1..), steps of
them taken at indices floor(j len / steps) from the top.
"""

from __future__ import annotations

import math

import numpy as np

from .. import checks
from ..models import data_coeffs, noise_coeffs
from ..ops import StateRow, UpdateCoeffs
from ..schedules import VP
from .explicit import vp_grid
from .plan import Plan, Step

SIGMA_DATA = 0.5


def lcm_timesteps(num_train_timesteps: int, steps: int, original_steps: int = 50) -> np.ndarray:
    """The LCM / TCD grid of `steps` training timesteps (descending)."""
    steps = checks.integer("steps", steps, 1)
    original_steps = checks.integer("original_steps", original_steps, 1)
    if original_steps > num_train_timesteps:
        raise ValueError(f"original_steps must be <= num_train_timesteps = {num_train_timesteps}, got {original_steps}")
    if steps > original_steps:
        raise ValueError(f"steps must be <= original_steps = {original_steps} (the grid is a subset of it), got {steps}")
    k = num_train_timesteps // original_steps
    origin = (np.arange(1, original_steps + 1) * k - 1)[::-1]
    return origin[np.floor(np.linspace(0, len(origin), num=steps, endpoint=False)).astype(np.int64)]


def lcm_coeffs(prediction: str, ab_t: float, ab_prev: float, t: float, timestep_scaling: float = 10.0,
               last: bool = False) -> UpdateCoeffs:
    """One LCM step from abar_t to abar_prev; the state becomes D (denoised)."""
    p, q = data_coeffs(prediction, math.sqrt(ab_t), math.sqrt(1 - ab_t))
    scaled = t * timestep_scaling
    c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
    c_out = scaled / math.sqrt(scaled**2 + SIGMA_DATA**2)
    w = 1.0 if last else math.sqrt(ab_prev)
    return UpdateCoeffs(p=p, q=q, a=w * c_skip, b=(w * c_out,), c=0.0 if last else math.sqrt(1 - ab_prev),
                        state=StateRow(a=c_skip, b=(c_out,)))


def tcd_coeffs(prediction: str, ab_t: float, ab_prev: float, ab_s: float, gamma: float, last: bool) -> UpdateCoeffs:
    """One TCD step: x0 and eps from the raw output at abar_t, renoised to abar_s, then to abar_prev; the state
    becomes N (pred_noised_sample)."""
    alpha, sigma = math.sqrt(ab_t), math.sqrt(1 - ab_t)
    p, q = data_coeffs(prediction, alpha, sigma)
    ep, eq = noise_coeffs(prediction, alpha, sigma)
    row = dict(a=math.sqrt(1 - ab_s) * ep, e=math.sqrt(1 - ab_s) * eq, b=(math.sqrt(ab_s),))
    stochastic = gamma > 0 and not last
    w = math.sqrt(ab_prev / ab_s) if stochastic else 1.0
    return UpdateCoeffs(p=p, q=q, a=w * row["a"], e=w * row["e"], b=(w * row["b"][0],),
                        c=math.sqrt(max(1 - ab_prev / ab_s, 0.0)) if stochastic else 0.0, state=StateRow(**row))


def tcd_inner_timestep(prev_t: int, gamma: float) -> int:
    """s = floor((1 - gamma) t_prev), in float32 as diffusers computes it."""
    return int(np.floor(np.float32(1 - gamma) * np.float32(prev_t)))


def plan_timesteps(schedule: VP, steps: int, original_steps: int) -> np.ndarray:
    """The LCM / TCD grid, or a sigmas= list's training timesteps (ExplicitVP: each sigma ratio's timestep,
    rounded; the list ends at 0, where the last step returns the denoised sample)."""
    explicit = getattr(schedule, "explicit", None)
    if explicit is None:
        return lcm_timesteps(schedule.num_train_timesteps, steps, original_steps)
    if explicit[-1] != 0:
        raise ValueError(f"lcm / tcd: a sigmas= list ends at 0 (the last step returns the denoised sample), got "
                         f"sigmas[-1] = {explicit[-1]}")
    t = np.round(vp_grid(schedule, explicit).timesteps).astype(np.int64)
    if len(np.unique(t)) != len(t):
        raise ValueError(f"lcm / tcd: the sigmas= list gives repeated training timesteps {t.tolist()} (each sigma's "
                         "timestep, rounded); space the sigmas further apart")
    return t


def lcm_plan(schedule: VP, steps: int, prediction: str, *, original_steps: int = 50,
             timestep_scaling: float = 10.0) -> Plan:
    timesteps = plan_timesteps(schedule, steps, original_steps)
    plan = []
    for i, t in enumerate(timesteps):
        last = i == len(timesteps) - 1
        ab_prev = schedule.alpha_bar(timesteps[i + 1]) if not last else schedule.alpha_bar(t)
        plan.append(Step(t=int(t), coeffs=lcm_coeffs(prediction, schedule.alpha_bar(t), ab_prev, float(t),
                                                     timestep_scaling, last)))
    return Plan(steps=tuple(plan), history_slots=0, discrete_time=True, uses_state=True)


def tcd_plan(schedule: VP, steps: int, prediction: str, *, gamma: float = 0.3, original_steps: int = 50) -> Plan:
    checks.real("gamma", gamma, "[0, 1]")
    timesteps = plan_timesteps(schedule, steps, original_steps)
    plan = []
    for i, t in enumerate(timesteps):
        last = i == len(timesteps) - 1
        prev = 0 if last else int(timesteps[i + 1])
        s = tcd_inner_timestep(prev, gamma)
        coeffs = tcd_coeffs(prediction, schedule.alpha_bar(t), schedule.alpha_bar(prev), schedule.alpha_bar(s),
                            gamma, last)
        plan.append(Step(t=int(t), coeffs=coeffs))
    return Plan(steps=tuple(plan), history_slots=0, discrete_time=True, uses_state=True)
