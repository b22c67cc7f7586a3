"""Ancestral and two-call second-order steps in the VE scale x = x0 + sigma eps (solvers.ve's conventions:
D = p x + q out, d = (x - D) / sigma), and in the flow ("CONST") scale x = (1 - sigma) x0 + sigma eps, where the
Euler step in sigma has the same form (d = (x - D) / sigma is the velocity eps - x0).

    ancestral Euler   x' = x + (sigma_down - sigma) d + s_noise sigma_up z   (solvers.ve.ancestral_split)
    DPM-2             stage 1 the Euler step to sigma_mid = sqrt(sigma sigma_to), keeping its start s; stage 2
                      x' = s + (sigma_to - sigma) d2, d2 = (x2 - D2) / sigma_mid   (+ s_noise sigma_up z)
    DPM-Solver++(2S)  stage 1 the Euler step to sigma_mid (the midpoint in log-SNR lambda); stage 2
                      x' = k ((sigma_down / sigma) s + (1 - sigma_down / sigma) D2) + w z
                      (VE: lambda = -log sigma, sigma_mid = sqrt(sigma sigma_down), k = 1, w = s_noise sigma_up)
    flow (RF) split   ComfyUI's: sigma_down = sigma' (1 + (sigma' / sigma - 1) eta), k = (1 - sigma') /
                      (1 - sigma_down), renoise w = sqrt(sigma'^2 - sigma_down^2 k^2); the step to sigma_down is
                      scaled by k and renoised: x' = k (Euler step to sigma_down) + s_noise w z;
                      lambda = log((1 - sigma) / sigma)
"""

from __future__ import annotations

import dataclasses
import math

from ..ops import UpdateCoeffs
from ..schedules import Flow
from .plan import Plan
from .ve import KEEP_START, ancestral_split, euler_coeffs, scaled_result
from .ve_grid import VEPoints


def log_midpoint(sigma: float, sigma_to: float) -> float:
    """The midpoint in log sigma: sqrt(sigma sigma_to) (0 when sigma_to is 0)."""
    return math.sqrt(sigma * sigma_to)


def rf_midpoint(sigma: float, sigma_down: float) -> float:
    """The midpoint in lambda = log((1 - sigma) / sigma) of a flow step (0.9999 from sigma = 1, as ComfyUI)."""
    if sigma == 1.0:
        return 0.9999
    lam = lambda s: math.log((1 - s) / s)
    return 1 / (math.exp((lam(sigma) + lam(sigma_down)) / 2) + 1)


def rf_ancestral_split(sigma: float, sigma_next: float, eta: float) -> tuple[float, float, float]:
    """(sigma_down, k, renoise) of ComfyUI's flow ancestral step from sigma to sigma_next > 0."""
    down = sigma_next * (1 + (sigma_next / sigma - 1) * eta)
    k = (1 - sigma_next) / (1 - down)
    return down, k, math.sqrt(max(sigma_next**2 - down**2 * k**2, 0.0))


def rf_euler_ancestral_coeffs(p: float, q: float, sigma: float, sigma_next: float, eta: float, s_noise: float
                              ) -> UpdateCoeffs:
    """x' = k (x + (sigma_down - sigma) d) + s_noise w z (the Euler step into sigma_next = 0: x' = D)."""
    if sigma_next == 0:
        return euler_coeffs(p, q, sigma, 0.0)
    down, k, w = rf_ancestral_split(sigma, sigma_next, eta)
    r = (down - sigma) / sigma
    return UpdateCoeffs(p=p, q=q, a=k * (1 + r), b=(-k * r,), c=s_noise * w if eta else 0.0)


def dpm2_coeffs(p: float, q: float, p2: float, q2: float, sigma: float, sigma_mid: float, sigma_to: float,
                noise: float = 0.0) -> tuple[UpdateCoeffs, UpdateCoeffs]:
    """The two fused calls of a DPM-2 step: stage 1 the Euler step to sigma_mid, writing D into history slot 0 and
    keeping its start in the state; stage 2 (conversion p2, q2 at sigma_mid) x' = s + (sigma_to - sigma) d2 +
    noise z, no history read."""
    w = (sigma_to - sigma) / sigma_mid
    second = UpdateCoeffs(p=p2, q=q2, a=w, b=(-w,), g=1.0, c=noise)
    return euler_coeffs(p, q, sigma, sigma_mid, state=KEEP_START), second


def dpmpp_2s_coeffs(p: float, q: float, p2: float, q2: float, sigma: float, sigma_mid: float, sigma_down: float,
                    k: float = 1.0, noise: float = 0.0) -> tuple[UpdateCoeffs, UpdateCoeffs]:
    """The two fused calls of a DPM-Solver++(2S) step: stage 1 as dpm2_coeffs'; stage 2 (conversion p2, q2 at
    sigma_mid) x' = k ((sigma_down / sigma) s + (1 - sigma_down / sigma) D2) + noise z."""
    ratio = sigma_down / sigma
    second = UpdateCoeffs(p=p2, q=q2, a=0.0, b=(k * (1 - ratio),), g=k * ratio, c=noise)
    return euler_coeffs(p, q, sigma, sigma_mid, state=KEEP_START), second


TwoCalls = tuple  # (sigma_mid, stage 1, stage 2): the model is called again at sigma_mid between the stages


def euler_ancestral_step(convert, sigma: float, sigma_next: float, eta: float, s_noise: float,
                         flow: bool = False) -> UpdateCoeffs:
    """An ancestral Euler step, k-diffusion's (VE scale) or ComfyUI's RF one (flow); convert(sigma) -> (p, q)."""
    p, q = convert(sigma)
    if flow:
        return rf_euler_ancestral_coeffs(p, q, sigma, sigma_next, eta, s_noise)
    down, up = ancestral_split(sigma, sigma_next, eta)
    return euler_coeffs(p, q, sigma, down, c=s_noise * up)


def dpm2_step(convert, sigma: float, sigma_to: float, noise: float = 0.0) -> UpdateCoeffs | TwoCalls:
    """A DPM-2 step to sigma_to (+ noise z) with the midpoint in log sigma; the Euler step where sigma_to = 0
    (without noise, as k-diffusion's sample_dpm_2_ancestral)."""
    p, q = convert(sigma)
    if sigma_to == 0:
        return euler_coeffs(p, q, sigma, 0.0)
    mid = log_midpoint(sigma, sigma_to)
    return (mid, *dpm2_coeffs(p, q, *convert(mid), sigma, mid, sigma_to, noise=noise))


def dpm2_ancestral_step(convert, sigma: float, sigma_next: float, eta: float, s_noise: float,
                        flow: bool = False) -> UpdateCoeffs | TwoCalls:
    """An ancestral DPM-2 step: k-diffusion's (the DPM-2 step to sigma_down, + s_noise sigma_up z) or ComfyUI's RF
    one (the DPM-2 step to sigma_down, then x' = k x + s_noise w z, rf_ancestral_split); the Euler step where
    sigma_down = 0, without noise."""
    if not flow:
        down, up = ancestral_split(sigma, sigma_next, eta)
        return dpm2_step(convert, sigma, down, noise=s_noise * up)
    down, k, w = rf_ancestral_split(sigma, sigma_next, eta) if sigma_next > 0 else (0.0, 1.0, 0.0)
    step = dpm2_step(convert, sigma, down)
    if down == 0:
        return step
    mid, first, second = step
    return mid, first, dataclasses.replace(scaled_result(second, k), c=s_noise * w)


def dpmpp_2s_ancestral_step(convert, sigma: float, sigma_next: float, eta: float, s_noise: float,
                            flow: bool = False) -> UpdateCoeffs | TwoCalls:
    """An ancestral DPM-Solver++(2S) step, k-diffusion's (VE scale) or ComfyUI's RF one (flow); the Euler step
    into sigma_next = 0 (and, VE, where sigma_down = 0: eta > 1, renoised)."""
    p, q = convert(sigma)
    if sigma_next == 0:
        return euler_coeffs(p, q, sigma, 0.0)
    if flow:
        down, k, w = rf_ancestral_split(sigma, sigma_next, eta)
        mid, noise = rf_midpoint(sigma, down), (s_noise * w if eta else 0.0)
    else:
        (down, up), k = ancestral_split(sigma, sigma_next, eta), 1.0
        if down == 0:
            return euler_coeffs(p, q, sigma, 0.0, c=s_noise * up)
        mid, noise = log_midpoint(sigma, down), s_noise * up
    return (mid, *dpmpp_2s_coeffs(p, q, *convert(mid), sigma, mid, down, k=k, noise=noise))


# Plans of diffsampler.sample: `steps` intervals on a VP (diffusers' Euler grid, the VE scale x / alpha), EDM or
# Flow schedule; the two-call methods take two model calls per interval but an Euler step into sigma = 0.


def euler_ancestral_plan(schedule, steps: int, prediction: str, *, eta: float = 1.0, s_noise: float = 1.0,
                         timestep_spacing: str = "linspace", steps_offset: int = 0) -> Plan:
    """Ancestral Euler: EulerAncestralDiscreteScheduler's on VP (eta = 1), k-diffusion's on EDM, ComfyUI's
    sample_euler_ancestral_RF on Flow."""
    grid = VEPoints(schedule, steps, prediction, timestep_spacing, steps_offset)
    s, flow = grid.sigmas, isinstance(schedule, Flow)
    plan = [grid.step(s[i], euler_ancestral_step(grid.coeffs, s[i], s[i + 1], eta, s_noise, flow), i)
            for i in range(steps)]
    return grid.plan(plan, two_calls=False)


def _two_call_plan(grid: VEPoints, step_of) -> Plan:
    """step_of(i) -> the UpdateCoeffs of a one-call step or the TwoCalls of interval i."""
    plan = []
    for i, sigma in enumerate(grid.sigmas[:-1]):
        step = step_of(i)
        if isinstance(step, UpdateCoeffs):
            plan.append(grid.step(sigma, step, i))
            continue
        mid, first, second = step
        plan += [grid.step(sigma, first, i), grid.step(mid, second)]
    return grid.plan(plan, two_calls=True)


def dpm2_plan(schedule, steps: int, prediction: str, *, timestep_spacing: str = "linspace",
              steps_offset: int = 0) -> Plan:
    """DPM-2: KDPM2DiscreteScheduler's on VP, k-diffusion's sample_dpm_2 on EDM (2 model calls per step but
    the last)."""
    grid = VEPoints(schedule, steps, prediction, timestep_spacing, steps_offset)
    s = grid.sigmas
    return _two_call_plan(grid, lambda i: dpm2_step(grid.coeffs, s[i], s[i + 1]))


def dpmpp_2s_ancestral_plan(schedule, steps: int, prediction: str, *, eta: float = 1.0, s_noise: float = 1.0,
                            timestep_spacing: str = "linspace", steps_offset: int = 0) -> Plan:
    """Ancestral DPM-Solver++(2S): k-diffusion's sample_dpmpp_2s_ancestral on VP (the Euler grid) and EDM,
    ComfyUI's sample_dpmpp_2s_ancestral_RF on Flow."""
    grid = VEPoints(schedule, steps, prediction, timestep_spacing, steps_offset)
    s, flow = grid.sigmas, isinstance(schedule, Flow)
    return _two_call_plan(grid, lambda i: dpmpp_2s_ancestral_step(grid.coeffs, s[i], s[i + 1], eta, s_noise, flow))
