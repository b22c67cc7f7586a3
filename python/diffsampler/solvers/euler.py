"""Euler steps: diffusers' EulerDiscreteScheduler (VP model, sampled in the VE scale x / alpha) and
FlowMatchEulerDiscreteScheduler (flow matching).

    VP Euler:   the VE-scale Euler step (solvers.ve), model input x / sqrt(sigma^2 + 1), x_T scaled by
                init_noise_sigma
    flow Euler: x' = x + (sigma' - sigma) v;  stochastic: x' = (1 - sigma') (x - sigma v) + sigma' z
"""

from __future__ import annotations


from ..ops import UpdateCoeffs
from ..schedules import VP, Flow
from .plan import Direction, Plan, Step
from .ve import euler_coeffs, scaled_result, ve_data_coeffs
from .grid import Grid
from .ve_grid import grid_ve_grid, vp_ve_grid


def euler_plan(schedule: VP, steps: int, prediction: str, *, timestep_spacing: str = "linspace",
               steps_offset: int = 0, sigmas: str = "default", final_sigmas_type: str = "zero") -> Plan:
    grid = vp_ve_grid(schedule, steps, timestep_spacing, steps_offset, sigmas, final_sigmas_type)
    plan = [Step(t=grid.times[i], coeffs=euler_coeffs(*ve_data_coeffs(prediction, sigma), sigma, grid.sigmas[i + 1]),
                 input_scale=grid.input_scales[i]) for i, sigma in enumerate(grid.sigmas[:-1])]
    return Plan(steps=tuple(plan), history_slots=0, discrete_time=False, init_scale=grid.init_scale)


def euler_grid_plan(grid: Grid, steps: int, prediction: str) -> Plan:
    """The VE-scale Euler step over any VP Grid (x_T and the result in the VP scale, solvers.ve_grid)."""
    g = grid_ve_grid(grid)
    plan = []
    for i, sigma in enumerate(g.sigmas[:-1]):
        coeffs = euler_coeffs(*ve_data_coeffs(prediction, sigma), sigma, g.sigmas[i + 1])
        plan.append(Step(t=g.times[i], coeffs=scaled_result(coeffs, g.final_alpha) if i == steps - 1 else coeffs,
                         input_scale=g.input_scales[i]))
    return Plan(steps=tuple(plan), history_slots=0, discrete_time=False, init_scale=g.init_scale)


def flow_euler_plan(schedule: Flow, steps: int, prediction: str) -> Plan:
    if prediction != "flow":
        raise ValueError(f"solver 'flow_euler' takes prediction 'flow' (the velocity eps - x0), got {prediction!r}")
    sigmas = [float(s) for s in schedule.sigmas(steps)]
    plan = []
    for i in range(steps):
        sigma, dt = sigmas[i], sigmas[i + 1] - sigmas[i]
        plan.append(Step(t=schedule.model_time(sigma), coeffs=flow_euler_coeffs(sigma, sigmas[i + 1]),
                         direction=Direction(dt, 0.0, 1.0, (0.0,))))
    return Plan(steps=tuple(plan), history_slots=0, discrete_time=False)


def flow_euler_coeffs(sigma: float, sigma_next: float, stochastic: bool = False) -> UpdateCoeffs:
    """x' = x + (sigma' - sigma) v (the velocity added as diffusers adds it), or with `stochastic` the data
    prediction x - sigma v renoised to sigma': x' = (1 - sigma') (x - sigma v) + sigma' z."""
    if stochastic:
        return UpdateCoeffs(p=1.0, q=-sigma, a=0.0, b=(1.0 - sigma_next,), c=sigma_next)
    return UpdateCoeffs(p=1.0, q=-sigma, a=1.0, e=sigma_next - sigma, b=(0.0,))
