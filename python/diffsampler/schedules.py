"""Noise schedules: x_t = alpha_t x0 + sigma_t eps, and the timestep grids a sampler visits.

VP schedules follow diffusers exactly (betas and their cumulative product in float32), so that sampling with
the same steps gives the same numbers as diffusers' schedulers.
"""

from __future__ import annotations

import math

import numpy as np
import torch

SPACINGS = ("linspace", "leading", "trailing")


def discrete_timesteps(num_train_timesteps: int, steps: int, spacing: str, steps_offset: int = 0) -> np.ndarray:
    """`steps` descending integer training timesteps, as diffusers' DDIMScheduler.set_timesteps spaces them.

        linspace: round(linspace(0, N - 1, steps)),  leading: arange(steps) * (N // steps) + offset,
        trailing: round(arange(N, 0, -N / steps)) - 1
    """
    n = num_train_timesteps
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if steps > n:
        raise ValueError(f"steps must be <= num_train_timesteps = {n}, got {steps}")
    if spacing == "linspace":
        t = np.linspace(0, n - 1, steps).round()[::-1]
    elif spacing == "leading":
        t = (np.arange(0, steps) * (n // steps)).round()[::-1] + steps_offset
    elif spacing == "trailing":
        t = np.round(np.arange(n, 0, -n / steps)) - 1
    else:
        raise ValueError(f"timestep_spacing must be one of {SPACINGS}, got {spacing!r}")
    return t.copy().astype(np.int64)


class VP:
    """Discrete variance-preserving schedule: alpha_t^2 = prod_{s<=t} (1 - beta_s), sigma_t^2 = 1 - alpha_t^2."""

    def __init__(self, betas: torch.Tensor):
        betas = torch.as_tensor(betas, dtype=torch.float32)
        if betas.dim() != 1 or len(betas) < 2 or not ((betas > 0) & (betas < 1)).all():
            raise ValueError("betas must be a 1-D tensor of at least 2 values in (0, 1)")
        self.betas = betas
        # float32 cumprod, as diffusers computes it: the same alphas to the last bit
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.num_train_timesteps = len(betas)

    @classmethod
    def linear(cls, beta_start: float = 0.0001, beta_end: float = 0.02, num_train_timesteps: int = 1000) -> "VP":
        """beta_t linear in t (DDPM)."""
        return cls(torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32))

    @classmethod
    def scaled_linear(cls, beta_start: float = 0.00085, beta_end: float = 0.012,
                      num_train_timesteps: int = 1000) -> "VP":
        """sqrt(beta_t) linear in t (Stable Diffusion)."""
        return cls(torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2)

    def alpha_bar(self, t: int) -> float:
        """alpha_t^2 at an integer training timestep (float32 value, as diffusers holds it)."""
        return float(self.alphas_cumprod[int(t)])

    def alpha_sigma(self, t: int) -> tuple[float, float]:
        ab = self.alpha_bar(t)
        return math.sqrt(ab), math.sqrt(1.0 - ab)

    def sigma_ratio(self, t: int) -> float:
        """sigma_t / alpha_t (the "sigma" of DPM-Solver and k-diffusion), rounded to float32 as diffusers does."""
        ab = self.alphas_cumprod[int(t)]
        return float(((1 - ab) / ab) ** 0.5)

    def alpha_sigma_at(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha_t, sigma_t for a tensor of integer timesteps (on t's device, float64)."""
        ab = self.alphas_cumprod.to(device=t.device, dtype=torch.float64)[t.long()]
        return ab.sqrt(), (1 - ab).sqrt()

    def __repr__(self) -> str:
        return f"VP(num_train_timesteps={self.num_train_timesteps}, beta=[{self.betas[0]:.5g}, {self.betas[-1]:.5g}])"


def sigma_to_alpha_sigma(ratio: float) -> tuple[float, float]:
    """VP (alpha, sigma) from the ratio sigma/alpha: alpha = 1 / sqrt(1 + ratio^2), sigma = ratio alpha."""
    alpha = 1.0 / math.sqrt(ratio * ratio + 1.0)
    return alpha, ratio * alpha
