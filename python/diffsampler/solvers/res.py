"""Exponential multistep samplers on the VE-scale grid (x = x0 + sigma eps, D = p x + q out), as ComfyUI
defines them; h = log(sigma / sigma_down), t = -log sigma.

    RES multistep (Zhang et al. 2023, second order; ComfyUI's res_multistep): an ancestral split of each step
        (sigma_down, sigma_up; eta = 0: none); the first step and a step to sigma_down = 0 are Euler steps, else
        x' = e^{-h} x + h (b1 D + b2 D_prev),  b1 = phi1 - phi2 / c2,  b2 = phi2 / c2,
        phi1 = phi_1(-h), phi2 = phi_2(-h), c2 = (t_prev - t_prev_down) / h;  then + s_noise sigma_up z.
    ER-SDE (Cui et al. 2023; ComfyUI's er_sde, max_stage 3): with lambda = sigma_t / alpha_t, the noise scaler
        N(l) = l (e^{l^0.3} + 10) and r = N(lambda') / N(lambda):
        x' = (alpha'/alpha) r x + alpha' (1 - r) D + alpha' (dl + S1 N(lambda')) D1 + alpha' (dl^2/2 + S2 N(lambda')) D2
             + alpha' s_noise sqrt(lambda'^2 - lambda^2 r^2) z,
        D1, D2 the first and second divided differences of D over lambda (stages 2, 3: from the second and third
        step on), S1 = int 1/N, S2 = int (l - lambda)/N over [lambda, lambda'] by ComfyUI's 200-point rule;
        the step to sigma' = 0 is x' = D.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from ..ops import UpdateCoeffs
from ..schedules import Flow
from .plan import Plan, Step
from .ve import ancestral_split, euler_coeffs, scaled_result, ve_data_coeffs
from .ve_grid import ve_grid


def phi_1(h: float) -> float:
    return math.expm1(h) / h


def phi_2(h: float) -> float:
    return (phi_1(h) - 1.0) / h


def res_multistep_coeffs(data: tuple[float, float], sigma: float, sigma_next: float, eta: float, s_noise: float,
                         prev: tuple[float, float] | None, cfg_pp: bool = False) -> tuple[UpdateCoeffs, float]:
    """(the step, its sigma_down); prev: (sigma, sigma_down) of the step before (None at the first), the
    step reads that step's D from history when it is second order (len(b) == 2). cfg_pp: ComfyUI's CFG++ form
    in solvers.cfg_pp's convention (D the model's unconditional prediction U, the state s the guided one):
    the Euler step x' = s + (sigma_down / sigma) (x - U), the second-order one from x + s - U."""
    down, up = ancestral_split(sigma, sigma_next, eta)
    c = s_noise * up if sigma_next > 0 else 0.0
    if down == 0 or prev is None:
        step = euler_coeffs(*data, sigma, down, c=c)
        return (replace(step, b=(-step.a,), g=1.0) if cfg_pp else step), down
    t, t_next = -math.log(sigma), -math.log(down)
    t_prev, t_old = -math.log(prev[0]), -math.log(prev[1])
    h = t_next - t
    c2 = (t_prev - t_old) / h
    p1, p2 = phi_1(-h), phi_2(-h)
    b1, b2 = (p1 - p2 / c2, p2 / c2) if c2 != 0 else (0.0, 0.0)  # ComfyUI's nan_to_num
    a = math.exp(-h)
    if cfg_pp:
        return UpdateCoeffs(p=data[0], q=data[1], a=a, b=(h * b1 - a, h * b2), g=a, c=c), down
    return UpdateCoeffs(p=data[0], q=data[1], a=a, b=(h * b1, h * b2), c=c), down


def er_noise_scaler(lam: torch.Tensor) -> torch.Tensor:
    """ER-SDE's default noise scaler N(l) = l (e^{l^0.3} + 10)."""
    return lam * ((lam**0.3).exp() + 10.0)


def er_sde_coeffs(data: tuple[float, float], lams: list[float], lam_next: float, alpha: float, alpha_next: float,
                  stage: int, s_noise: float, scaler=er_noise_scaler, points: int = 200) -> UpdateCoeffs:
    """One ER-SDE step from lams[0] = lambda to lam_next; lams[1], lams[2]: the lambdas of the steps before (the
    history reads, most recent first); stage 1-3."""
    lam = lams[0]
    n = lambda v: scaler(torch.as_tensor(v, dtype=torch.float64))  # noqa: E731 (ComfyUI's scalers take tensors)
    n_next = float(n(lam_next))
    r = n_next / float(n(lam))
    w = [alpha_next * (1 - r), 0.0, 0.0]  # the weights of D, D_prev, D_prev2
    if stage >= 2:
        dl = lam_next - lam
        step = -dl / points
        pos = lam_next + torch.arange(points, dtype=torch.float64) * step
        scaled = n(pos)
        k1 = alpha_next * (dl + float((1 / scaled).sum()) * step * n_next) / (lam - lams[1])
        w[0] += k1
        w[1] -= k1
        if stage >= 3:
            k2 = alpha_next * (dl * dl / 2 + float(((pos - lam) / scaled).sum()) * step * n_next) / ((lam - lams[2]) / 2)
            d0, d1 = 1 / (lam - lams[1]), 1 / (lams[1] - lams[2])  # D_u = (D_d - D_d_prev) * 2 / (lam - lam2)
            w[0] += k2 * d0
            w[1] -= k2 * (d0 + d1)
            w[2] += k2 * d1
    noise = max(lam_next**2 - lam**2 * r * r, 0.0) ** 0.5
    return UpdateCoeffs(p=data[0], q=data[1], a=alpha_next / alpha * r, b=tuple(w[:stage]),
                        c=alpha_next * s_noise * noise)


def _grid_options(timestep_spacing, steps_offset, sigmas, final_sigmas_type) -> dict:
    """The VP grid options that were given (EDM and Grid schedules take none)."""
    given = dict(timestep_spacing=timestep_spacing, steps_offset=steps_offset, sigmas=sigmas,
                 final_sigmas_type=final_sigmas_type)
    return {k: v for k, v in given.items() if v is not None}


def res_multistep_plan(schedule, steps: int, prediction: str, *, eta: float = 0.0, s_noise: float = 1.0,
                       timestep_spacing: str | None = None, steps_offset: int | None = None, sigmas: str | None = None,
                       final_sigmas_type: str | None = None) -> Plan:
    """On a VP schedule (EulerDiscreteScheduler's grid and its options), an EDM one, a VP Grid, or a Flow one (the
    CONST form: the same steps on the flow sigmas, D = x - sigma v; ODE only)."""
    if isinstance(schedule, Flow) and eta != 0:
        raise ValueError(f"res_multistep's ancestral variant (eta={eta}) re-noises in the VE scale and has no flow "
                         "(CONST) form; use eta=0 on Flow, or euler_ancestral / dpmpp_2s_ancestral (their RF forms)")
    g = ve_grid(schedule, steps, prediction,
                **_grid_options(timestep_spacing, steps_offset, sigmas, final_sigmas_type))
    plan, prev = [], None
    for i, sigma in enumerate(g.sigmas[:-1]):
        coeffs, down = res_multistep_coeffs(ve_data_coeffs(prediction, sigma), sigma, g.sigmas[i + 1], eta,
                                            s_noise, prev)
        reads = ((i - 1) % 2,) if len(coeffs.b) == 2 else ()
        if i == steps - 1:
            coeffs = scaled_result(coeffs, g.final_alpha)
        plan.append(Step(t=g.times[i], coeffs=coeffs, write_slot=i % 2, read_slots=reads,
                         input_scale=g.input_scales[i]))
        prev = (sigma, down)
    return Plan(steps=tuple(plan), history_slots=2, discrete_time=False, init_scale=g.init_scale)


def er_sde_plan(schedule, steps: int, prediction: str, *, s_noise: float = 1.0, max_stage: int = 3,
                timestep_spacing: str | None = None, steps_offset: int | None = None, sigmas: str | None = None,
                final_sigmas_type: str | None = None) -> Plan:
    """On VP (EulerDiscreteScheduler's grid and its options), EDM or a VP Grid in the VE scale (alpha = 1,
    lambda = sigma); on Flow in ComfyUI's CONST form (alpha = 1 - s, lambda = s / (1 - s), the first sigma
    nudged below 1 when it is 1)."""
    grid = _grid_options(timestep_spacing, steps_offset, sigmas, final_sigmas_type)
    if not 1 <= max_stage <= 3:
        raise ValueError(f"max_stage must be 1, 2 or 3, got {max_stage}")
    if isinstance(schedule, Flow):
        if grid:
            raise TypeError(f"got unexpected keyword argument(s) {sorted(grid)} on a Flow schedule")
        if prediction != "flow":
            raise ValueError(f"solver 'er_sde' on a Flow schedule takes prediction 'flow', got {prediction!r}")
        sigmas = [float(s) for s in schedule.sigmas(steps)]
        if sigmas[0] >= 1:  # a finite lambda: ComfyUI's first sigma at 1e-4 of the way (model time included)
            sigmas[0] = float(schedule.shifted(1 - 1e-4))
        times = [schedule.model_time(s) for s in sigmas[:-1]]
        alphas, lams = [1 - s for s in sigmas], [s / (1 - s) for s in sigmas]
        data = [(1.0, -s) for s in sigmas[:-1]]
        scales, init, final_alpha = (1.0,) * steps, 1.0, 1.0
    else:
        g = ve_grid(schedule, steps, prediction, **grid)
        sigmas, times, scales, init = list(g.sigmas), g.times, g.input_scales, g.init_scale
        alphas, lams = [1.0] * len(sigmas), sigmas
        final_alpha = g.final_alpha
        data = [ve_data_coeffs(prediction, s) for s in sigmas[:-1]]
    plan = []
    for i in range(steps):
        if sigmas[i + 1] == 0:
            coeffs, reads = UpdateCoeffs(p=data[i][0], q=data[i][1], a=0.0, b=(1.0,)), ()
        else:
            stage = min(max_stage, i + 1)
            coeffs = er_sde_coeffs(data[i], [lams[i - k] for k in range(stage)], lams[i + 1], alphas[i],
                                   alphas[i + 1], stage, s_noise)
            reads = tuple((i - k) % 3 for k in range(1, stage))
        if i == steps - 1:
            coeffs = scaled_result(coeffs, final_alpha)
        plan.append(Step(t=times[i], coeffs=coeffs, write_slot=i % 3, read_slots=reads, input_scale=scales[i]))
    return Plan(steps=tuple(plan), history_slots=3, discrete_time=False, init_scale=init)


