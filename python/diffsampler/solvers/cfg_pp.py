"""CFG++ (Chung et al. 2024) steps in the VE scale, as ComfyUI's samplers take them: the guided data prediction
D (classifier-free guidance's) and the unconditional one U; the step renoises along U's direction.

    Euler CFG++              x' = D + sigma_down (x - U) / sigma + s_noise sigma_up z   (x' = D into sigma' = 0;
                             solvers.ve.ancestral_split, eta = 0: sigma_down = sigma', no noise)
    DPM-Solver++(2M) CFG++   x' = e^{-h} x + D - e^{-h} U - expm1(-h) / (2 r) (D - U_prev),  h = log(sigma / sigma'),
                             r = h_prev / h;  the first step and the step into sigma' = 0 without the last term
    DPM-Solver++(2S) ancestral CFG++ (ComfyUI's), h = log(sigma / sigma_down), sigma_mid = sqrt(sigma sigma_down):
                             x_2 = (sigma_mid / sigma) (x + D - U) - expm1(-h / 2) D,  D_2 = D(x_2, sigma_mid),
                             x' = (sigma_down / sigma) (x + D - U) - expm1(-h) D_2 + s_noise sigma_up z
                             (x' = D + s_noise sigma_up z where sigma_down = 0)

The fused call takes out = U (m_0 = U, written to history) and the guided D as its read-only state s (g = its
weight), so neither prediction is copied; the 2S step's two calls take out = D (written to history) with U as
the state, then out = D_2 reading D back.
"""

from __future__ import annotations

import math

from ..ops import UpdateCoeffs
from .ve import ancestral_split

UNCOND = (0.0, 1.0)  # (p, q): m_0 = U, the model's unconditional data prediction


def euler_cfg_pp_coeffs(sigma: float, sigma_next: float, eta: float = 0.0, s_noise: float = 1.0) -> UpdateCoeffs:
    if sigma_next == 0:
        return UpdateCoeffs(*UNCOND, a=0.0, b=(0.0,), g=1.0)
    down, up = ancestral_split(sigma, sigma_next, eta)
    r = down / sigma
    return UpdateCoeffs(*UNCOND, a=r, b=(-r,), g=1.0, c=s_noise * up)


def dpmpp_2m_cfg_pp_coeffs(sigma: float, sigma_next: float, h_prev: float | None) -> UpdateCoeffs:
    """h_prev: the previous step's h (None at the first step); a second-order step reads U_prev from history."""
    if sigma_next == 0:
        return UpdateCoeffs(*UNCOND, a=0.0, b=(0.0,), g=1.0)
    h = math.log(sigma / sigma_next)
    decay = math.exp(-h)
    if h_prev is None:
        return UpdateCoeffs(*UNCOND, a=decay, b=(-decay,), g=1.0)
    w = math.expm1(-h) / (2 * h_prev / h)
    return UpdateCoeffs(*UNCOND, a=decay, b=(-decay, w), g=1.0 - w)


def dpmpp_2s_ancestral_cfg_pp_coeffs(sigma: float, sigma_next: float, eta: float = 1.0, s_noise: float = 1.0):
    """(first, second, sigma_mid): the first call's UpdateCoeffs (out = D, state = U; x_2) and the second's (out =
    D_2, reading D from the history), or (the one call x' = D + noise, None, None) where sigma_down = 0.
    With a = sigma_mid / sigma, d = sigma_down / sigma: x_2 = a x + D - a U and, as x + D - U = (x_2 - (1 - a) D)
    / a, x' = (d / a) x_2 - (d / a) (1 - a) D + (1 - d) D_2 + s_noise sigma_up z."""
    down, up = ancestral_split(sigma, sigma_next, eta)
    c = s_noise * up if sigma_next > 0 else 0.0
    if down == 0:
        return UpdateCoeffs(p=0.0, q=1.0, a=0.0, b=(1.0,), c=c), None, None
    mid = math.sqrt(sigma * down)
    a, d = mid / sigma, down / sigma
    first = UpdateCoeffs(p=0.0, q=1.0, a=a, b=(1.0,), g=-a)
    second = UpdateCoeffs(p=0.0, q=1.0, a=d / a, b=(1.0 - d, -(d / a) * (1.0 - a)), c=c)
    return first, second, mid
