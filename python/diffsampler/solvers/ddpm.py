"""The DDPM ancestral step (Ho et al. 2020), as diffusers' DDPMScheduler computes it: the mean of the
posterior q(x_prev | x_t, x0) plus its noise.

    x' = sqrt(abar_prev) beta_t / (1 - abar_t) x0 + sqrt(alpha_t) (1 - abar_prev) / (1 - abar_t) x + std z,
    alpha_t = abar_t / abar_prev, beta_t = 1 - alpha_t (x0 clipped / thresholded first);
    std^2 = max(beta_tilde, 1e-20) (fixed_small, fixed_small_log), beta_t (fixed_large);
    learned: std = sqrt(v), learned_range: std = exp((f log beta_t + (1 - f) log beta_tilde) / 2), f = (v + 1) / 2,
    with v the model's variance channels (a tensor: the noise std z is formed before the fused call);
    beta_tilde = (1 - abar_prev) / (1 - abar_t) beta_t; no noise at t = 0. beta_t = 1 - abar_t / abar_prev is
    rounded to float32 as diffusers computes it (it cancels: ~1e-4 relative at the smallest t).
"""

from __future__ import annotations

import math

import numpy as np

from ..models import data_coeffs
from ..ops import UpdateCoeffs

VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")


def step_beta(ab_t: float, ab_prev: float) -> float:
    """beta_t = 1 - abar_t / abar_prev in float32 arithmetic, as diffusers' DDPMScheduler forms it."""
    return float(np.float32(1.0) - np.float32(ab_t) / np.float32(ab_prev))


def posterior_variance(ab_t: float, ab_prev: float) -> tuple[float, float]:
    """(beta_tilde clamped at 1e-20, beta_t)."""
    beta = step_beta(ab_t, ab_prev)
    return max((1 - ab_prev) / (1 - ab_t) * beta, 1e-20), beta


def ddpm_coeffs(prediction: str, ab_t: float, ab_prev: float, std: float) -> UpdateCoeffs:
    """One DDPM step from abar_t to abar_prev with noise weight std (1.0 when the noise is pre-scaled)."""
    p, q = data_coeffs(prediction, math.sqrt(ab_t), math.sqrt(1 - ab_t))
    beta = step_beta(ab_t, ab_prev)
    return UpdateCoeffs(p=p, q=q, a=math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab_t),
                        b=(math.sqrt(ab_prev) * beta / (1 - ab_t),), c=std)


def fixed_std(variance_type: str, ab_t: float, ab_prev: float) -> float:
    """The noise std of the fixed variance types."""
    tilde, beta = posterior_variance(ab_t, ab_prev)
    if variance_type in ("fixed_small", "fixed_small_log"):
        return math.sqrt(tilde)
    if variance_type == "fixed_large":
        return math.sqrt(beta)
    raise ValueError(f"variance_type {variance_type!r} has no fixed std")
