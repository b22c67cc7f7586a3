"""The noise-level grid of the VE-scale samplers in ds.sample (x = x0 + sigma eps, sigma = sigma_t / alpha_t):
on a VP schedule EulerDiscreteScheduler's grid (model times, sigmas, the model input scaled by
1 / sqrt(sigma^2 + 1), x_T by init_noise_sigma), on an EDM schedule Karras' sigmas (the model gets sigma), on
any VP Grid its points (x_T and the model input in the VP scale: x_VE = x / alpha, and back at the end when the
grid stops at a sigma > 0, folded into the last step's coefficients by solvers.ve.scaled_result)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..schedules import EDM, VP, discrete_timesteps, sigma_grid
from .grid import Grid


@dataclass(frozen=True)
class VEGrid:
    times: tuple[float, ...]  # the model's time at each step
    sigmas: tuple[float, ...]  # steps + 1 noise levels, the last 0 (or sigma_min)
    input_scales: tuple[float, ...]  # the model is called on input_scale * x
    init_scale: float  # x_T = init_scale * N(0, I)
    final_alpha: float = 1.0  # the result is final_alpha x at the last sigma (1: the VE scale)


def _euler_timesteps(schedule: VP, steps: int, spacing: str, steps_offset: int) -> np.ndarray:
    """EulerDiscreteScheduler's float timesteps: linspace is not rounded, the others are the DDIM grids."""
    n = schedule.num_train_timesteps
    if spacing == "linspace":
        discrete_timesteps(n, steps, spacing)  # checks steps
        return np.linspace(0, n - 1, steps, dtype=np.float32)[::-1].copy()
    return discrete_timesteps(n, steps, spacing, steps_offset).astype(np.float32)


def vp_ve_grid(schedule: VP, steps: int, timestep_spacing: str = "linspace", steps_offset: int = 0,
               sigmas: str = "default", final_sigmas_type: str = "zero") -> VEGrid:
    """EulerDiscreteScheduler's grid (float32 sigmas, as diffusers holds them)."""
    if final_sigmas_type not in ("zero", "sigma_min"):
        raise ValueError(f"final_sigmas_type must be one of ('zero', 'sigma_min'), got {final_sigmas_type!r}")
    timesteps, ratios = sigma_grid(schedule, _euler_timesteps(schedule, steps, timestep_spacing, steps_offset),
                                   sigmas, endpoints="grid")
    last = 0.0 if final_sigmas_type == "zero" else schedule.sigma_ratio(0)
    ratios = [float(np.float32(r)) for r in list(ratios) + [last]]
    init = max(ratios) if timestep_spacing in ("linspace", "trailing") else math.sqrt(max(ratios) ** 2 + 1)
    return VEGrid(times=tuple(float(t) for t in timesteps.astype(np.float32)), sigmas=tuple(ratios),
                  input_scales=tuple(1.0 / math.sqrt(s * s + 1) for s in ratios[:-1]), init_scale=init)


def edm_ve_grid(schedule: EDM, steps: int) -> VEGrid:
    sigmas = schedule.sigmas(steps)
    return VEGrid(times=tuple(sigmas[:-1]), sigmas=tuple(sigmas), input_scales=(1.0,) * steps,
                  init_scale=sigmas[0])


def grid_ve_grid(grid: Grid) -> VEGrid:
    """A VP Grid's points: x_T = N(0, I) / alpha_0 (a VP-scale start), the model called on alpha x."""
    if grid.flow:
        raise ValueError("the VE-scale solvers take a VP grid (flow=False)")
    alphas = [grid.alpha_sigma(i)[0] for i in range(len(grid.sigmas))]
    return VEGrid(times=tuple(grid.timesteps), sigmas=tuple(grid.sigmas), input_scales=tuple(alphas[:-1]),
                  init_scale=1.0 / alphas[0], final_alpha=alphas[-1])


def ve_grid(schedule, steps: int, **options) -> VEGrid:
    """The grid on a VP schedule (options: timestep_spacing, steps_offset, sigmas, final_sigmas_type), an EDM
    one or a VP Grid of `steps` steps (no options)."""
    if isinstance(schedule, Grid):
        if options or len(schedule.timesteps) != steps:
            raise ValueError(f"a Grid of {len(schedule.timesteps)} steps takes no options, got steps={steps}, "
                             f"{sorted(options)}")
        return grid_ve_grid(schedule)
    if isinstance(schedule, EDM):
        if options:
            raise TypeError(f"got unexpected keyword argument(s) {sorted(options)} on an EDM schedule")
        return edm_ve_grid(schedule, steps)
    return vp_ve_grid(schedule, steps, **options)
