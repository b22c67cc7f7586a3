"""The noise-level grid of the VE-scale samplers in ds.sample (x = x0 + sigma eps, sigma = sigma_t / alpha_t):
on a VP schedule EulerDiscreteScheduler's grid (model times, sigmas, the model input scaled by
1 / sqrt(sigma^2 + 1), x_T by init_noise_sigma), on an EDM schedule Karras' sigmas (the model gets sigma), on
any VP Grid its points (x_T and the model input in the VP scale: x_VE = x / alpha, and back at the end when the
grid stops at a sigma > 0, folded into the last step's coefficients by solvers.ve.scaled_result)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from ..ops import UpdateCoeffs
from ..schedules import EDM, VP, Flow, discrete_timesteps, sigma_grid, sigma_to_t
from .explicit import ExplicitVP, vp_grid
from .grid import Grid
from .plan import Plan, Step
from .ve import scaled_result, ve_data_coeffs


@dataclass(frozen=True)
class VEGrid:
    times: tuple[float, ...]  # the model's time at each step
    sigmas: tuple[float, ...]  # steps + 1 noise levels, the last 0 (or sigma_min)
    input_scales: tuple[float, ...]  # the model is called on input_scale * x
    init_scale: float  # x_T = init_scale * N(0, I)
    final_alpha: float = 1.0  # the result is final_alpha x at the last sigma (1: the VE scale)


def check_prediction(schedule, prediction: str) -> None:
    """The model outputs the VE-scale solvers convert (ve_data_coeffs): 'flow' on a Flow schedule and only there."""
    if isinstance(schedule, Flow) != (prediction == "flow"):
        raise ValueError(f"the VE-scale solvers take prediction 'flow' (the velocity eps - x0) on a Flow schedule "
                         f"and 'eps', 'x0' or 'v' on the others; got {prediction!r} on {schedule!r}")
    ve_data_coeffs(prediction, 1.0)


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


def flow_ve_grid(schedule: Flow, steps: int) -> VEGrid:
    """A Flow schedule's sigmas t (x itself: no input or final scale), the model called at t times its
    num_train_timesteps (float32, as FlowMatchEulerDiscreteScheduler's timesteps)."""
    sigmas = [float(s) for s in schedule.sigmas(steps)]
    return VEGrid(times=tuple(schedule.model_time(s) for s in sigmas[:-1]), sigmas=tuple(sigmas),
                  input_scales=(1.0,) * steps, init_scale=1.0)


def grid_ve_grid(grid: Grid) -> VEGrid:
    """A VP Grid's points: x_T = N(0, I) / alpha_0 (a VP-scale start), the model called on alpha x."""
    if grid.flow:
        raise ValueError("the VE-scale solvers take a VP grid (flow=False)")
    alphas = [grid.alpha_sigma(i)[0] for i in range(len(grid.sigmas))]
    return VEGrid(times=tuple(grid.timesteps), sigmas=tuple(grid.sigmas), input_scales=tuple(alphas[:-1]),
                  init_scale=1.0 / alphas[0], final_alpha=alphas[-1])


def ve_grid(schedule, steps: int, prediction: str, **options) -> VEGrid:
    """The grid on a VP schedule (options: timestep_spacing, steps_offset, sigmas, final_sigmas_type), an EDM
    or Flow one or a VP Grid of `steps` steps (no options), for a model predicting `prediction`."""
    check_prediction(schedule, prediction)
    if isinstance(schedule, Grid):
        if options or len(schedule.timesteps) != steps:
            raise ValueError(f"a Grid of {len(schedule.timesteps)} steps takes no options, got steps={steps}, "
                             f"{sorted(options)}")
        return grid_ve_grid(schedule)
    if isinstance(schedule, (EDM, Flow)):
        if options:
            raise TypeError(f"got unexpected keyword argument(s) {sorted(options)} on an "
                            f"{type(schedule).__name__} schedule")
        return edm_ve_grid(schedule, steps) if isinstance(schedule, EDM) else flow_ve_grid(schedule, steps)
    return vp_ve_grid(schedule, steps, **options)


class VEPoints:
    """The plan points of the VE-scale solvers that call the model between grid points (two-call, restart): the
    sigmas (then 0) of a VP (diffusers' Euler grid, or a sigmas= list), EDM or Flow schedule, the model time and
    input scale at any sigma, x_T's scale and the conversion (p, q) of the model output to D."""

    def __init__(self, schedule, steps: int, prediction: str, timestep_spacing: str = "linspace",
                 steps_offset: int = 0):
        check_prediction(schedule, prediction)
        self.schedule, self.prediction = schedule, prediction
        if isinstance(schedule, Flow):
            self.sigmas, self.init_scale, self.final_alpha = [float(s) for s in schedule.sigmas(steps)], 1.0, 1.0
        elif isinstance(schedule, EDM):
            self.sigmas = schedule.sigmas(steps)
            self.init_scale, self.final_alpha = self.sigmas[0], 1.0
        else:  # a sigmas= list: its Grid's points (x_T and the result in the VP scale), else diffusers' Euler grid
            grid = (grid_ve_grid(vp_grid(schedule, schedule.explicit)) if isinstance(schedule, ExplicitVP)
                    else vp_ve_grid(schedule, steps, timestep_spacing, steps_offset))
            self.log_train = np.log(schedule.train_sigmas().numpy())
            self.timesteps, self.sigmas, self.init_scale = list(grid.times), list(grid.sigmas), grid.init_scale
            self.final_alpha = grid.final_alpha

    def coeffs(self, sigma: float) -> tuple[float, float]:
        return ve_data_coeffs(self.prediction, sigma)

    def step(self, sigma: float, coeffs: UpdateCoeffs, i: int | None = None, **kw) -> Step:
        """The step calling the model at sigma (at grid point i: its own timestep)."""
        if isinstance(self.schedule, Flow):
            return Step(t=self.schedule.model_time(sigma), coeffs=coeffs, **kw)
        if isinstance(self.schedule, EDM):
            return Step(t=sigma, coeffs=coeffs, **kw)
        t = self.timesteps[i] if i is not None else float(sigma_to_t(np.array(sigma), self.log_train))
        return Step(t=t, coeffs=coeffs, input_scale=1.0 / math.sqrt(sigma * sigma + 1), **kw)

    def plan(self, steps: list[Step], two_calls: bool) -> Plan:
        """The Plan; a sigmas= list ending above 0 returns its result in the VP scale (scaled_result)."""
        if self.final_alpha != 1.0:
            steps[-1] = dataclasses.replace(steps[-1], coeffs=scaled_result(steps[-1].coeffs, self.final_alpha))
        return Plan(steps=tuple(steps), history_slots=1 if two_calls else 0, discrete_time=False,
                    init_scale=self.init_scale, uses_state=two_calls)
