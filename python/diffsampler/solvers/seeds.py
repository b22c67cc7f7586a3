"""SEEDS (Gonzalez et al. 2023, "Stochastic Explicit Exponential Derivative-free Solvers"), data prediction, in
the VE scale x = x0 + sigma eps as ComfyUI's sample_seeds_2 / sample_seeds_3 define them: lambda = -log sigma,
h = log(sigma / sigma'), h_eta = (1 + eta) h, stage sigmas sigma_k = sigma e^{-r_k h}, E(u) = -expm1(-u),
P(u) = (expm1(-u) + u) / u
(E(u) = u phi_1(-u), P(u) = u phi_2(-u)).

    stage k at sigma_k:  x_k = e^{-r_k h_eta} x + sum_j w_kj D_j + sigma_k s_noise W_k
    SEEDS-2 (r):         x_1 = e^{-r h_eta} x + E(r h_eta) D
                         phi_1: x' = e^{-h_eta} x + E(h_eta) ((1 - 1/(2r)) D + 1/(2r) D_1)
                         phi_2: x' = e^{-h_eta} x + (E(h_eta) - P(h_eta)/r) D + P(h_eta)/r D_1
    SEEDS-3 (r_1, r_2):  x_1 as SEEDS-2's with r_1;  x_2 = e^{-r_2 h_eta} x + (E_2 - a) D + a D_1,
                         a = (r_2 / r_1) P(r_2 h_eta), E_2 = E(r_2 h_eta);
                         x' = e^{-h_eta} x + (E(h_eta) - P(h_eta)/r_2) D + P(h_eta)/r_2 D_2
    noise                W_k = e^{-(r_k - r_{k-1}) h eta} W_{k-1} + sqrt(E(2 (r_k - r_{k-1}) h eta)) z_k, W_0 = 0
                         (r_last = 1): one Brownian path over the stages, z_k drawn over (sigma_{k-1}, sigma_k).

Each stage is one fused call. Stage 1 writes D into history slot 0 and sets the state to the part of the next
stage that the step start, D and the noise so far make; a stage reading slot 0 (SEEDS-3's second) also
rewrites the state to the part of x' they make (the start and the noise enter x_2 and x' in the same ratio).
"""

from __future__ import annotations

import math

from ..ops import StateRow, UpdateCoeffs


def _e(u: float) -> float:
    return -math.expm1(-u)


def _p(u: float) -> float:
    return (math.expm1(-u) + u) / u


def _chain(sigma: float, h: float, rs: list[float]) -> list[float]:
    """The sigmas sigma e^{-r h} of the stages (r = 0: the start, r = 1: sigma')."""
    return [sigma * math.exp(-r * h) for r in rs]


def _noise_weights(h: float, eta: float, rs: list[float]) -> list[float]:
    """sqrt(E(2 (r_k - r_{k-1}) h eta)) of the draws of the stages."""
    return [math.sqrt(_e(2 * (b - a) * h * eta)) for a, b in zip(rs[:-1], rs[1:])]


def seeds_2_step(convert, sigma: float, sigma_next: float, eta: float, s_noise: float, r: float,
                 solver_type: str) -> tuple[list[float], list[UpdateCoeffs]]:
    """(the sigmas [sigma, sigma_1, sigma'], the two fused calls) of a SEEDS-2 step, sigma' > 0; convert(sigma)
    -> (p, q) of D; call k adds the draw over (sigmas[k], sigmas[k + 1]) where its c != 0."""
    h = math.log(sigma / sigma_next)
    he, rs = (1 + eta) * h, [0.0, r, 1.0]
    chain, (k1, k2) = _chain(sigma, h, rs), _noise_weights(h, eta, rs)
    if solver_type == "phi_1":
        fac = 1 / (2 * r)
        w0, w1 = _e(he) * (1 - fac), _e(he) * fac
    else:
        w1 = _p(he) / r
        w0 = _e(he) - w1
    decay = math.exp(-(1 - r) * h * eta)
    to_end = StateRow(a=math.exp(-he), b=(w0,), c=s_noise * sigma_next * k1 * decay)
    first = UpdateCoeffs(*convert(sigma), a=math.exp(-r * he), b=(_e(r * he),), c=s_noise * chain[1] * k1,
                         state=to_end)
    second = UpdateCoeffs(*convert(chain[1]), a=0.0, b=(w1,), g=1.0, c=s_noise * sigma_next * k2)
    return chain, [first, second]


def seeds_3_step(convert, sigma: float, sigma_next: float, eta: float, s_noise: float, r_1: float, r_2: float
                 ) -> tuple[list[float], list[UpdateCoeffs]]:
    """(the sigmas [sigma, sigma_1, sigma_2, sigma'], the three fused calls) of a SEEDS-3 step, sigma' > 0; the
    second call reads D from history slot 0."""
    h = math.log(sigma / sigma_next)
    he, rs = (1 + eta) * h, [0.0, r_1, r_2, 1.0]
    chain, (k1, k2, k3) = _chain(sigma, h, rs), _noise_weights(h, eta, rs)
    a = r_2 / r_1 * _p(r_2 * he)
    u0, u1 = _e(r_2 * he) - a, a  # x_2's weights of D, D_1
    v2 = _p(he) / r_2
    v0 = _e(he) - v2  # x''s weights of D, D_2
    to_2 = StateRow(a=math.exp(-r_2 * he), b=(u0,), c=s_noise * chain[2] * k1 * math.exp(-(r_2 - r_1) * h * eta))
    first = UpdateCoeffs(*convert(sigma), a=math.exp(-r_1 * he), b=(_e(r_1 * he),), c=s_noise * chain[1] * k1,
                         state=to_2)
    ratio = math.exp(-(1 - r_2) * he)  # x''s part of the start (and noise) over x_2's
    to_end = StateRow(a=0.0, b=(0.0, v0 - ratio * u0), g=ratio,
                      c=s_noise * sigma_next * k2 * math.exp(-(1 - r_2) * h * eta))
    second = UpdateCoeffs(*convert(chain[1]), a=0.0, b=(u1, 0.0), g=1.0, c=s_noise * chain[2] * k2, state=to_end)
    third = UpdateCoeffs(*convert(chain[2]), a=0.0, b=(v2,), g=1.0, c=s_noise * sigma_next * k3)
    return chain, [first, second, third]
