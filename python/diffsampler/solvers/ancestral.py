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

import math

from ..ops import UpdateCoeffs
from .ve import KEEP_START, euler_coeffs


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
