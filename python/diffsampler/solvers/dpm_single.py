"""Singlestep DPM-Solver (Lu et al. 2022) with the noise prediction eps = (x - D) / sigma in the VE scale, as
k-diffusion's DPMSolver steps it (sample_dpm_fast, sample_dpm_adaptive): t = -log sigma, h = t' - t, E = expm1(h),
stage sigmas sigma_k = sigma e^{-r_k h}.

    order 1   x' = x - sigma' E eps
    order 2   u_1 = x - sigma_1 expm1(r_1 h) eps;  x' = x - sigma' E eps - sigma' E / (2 r_1) (eps_1 - eps)
              (r_1 = 1/2)
    order 3   u_1 as order 2's (r_1 = 1/3);  u_2 = x - sigma_2 expm1(r_2 h) eps - sigma_2 (r_2 / r_1)
              (expm1(r_2 h) / (r_2 h) - 1) (eps_1 - eps);
              x' = x - sigma' E eps - sigma' / r_2 (E / h - 1) (eps_2 - eps)   (r_2 = 2/3)
    adaptive  the embedded lower-order result x_low (order 1 in order 2's step, order 2 with r_1 = 1/3 in order
              3's) is made in the fused state beside x' = x_high.

Every stage is one fused call with m_0 = eps (in history slot k for stage k); a call with n + 1 b entries reads
slots 0 .. n - 1; the first call keeps the start in the state.
"""

from __future__ import annotations

import math

from ..ops import StateRow, UpdateCoeffs
from .ve import KEEP_START


def _eps(convert, sigma: float) -> tuple[float, float]:
    """(p, q) of eps = (x - D) / sigma, convert(sigma) -> (p, q) of D."""
    p, q = convert(sigma)
    return (1.0 - p) / sigma, -q / sigma


def dpm_solver_step(convert, sigma: float, sigma_next: float, order: int, noise: float = 0.0,
                    embedded: bool = False) -> tuple[list[float], list[UpdateCoeffs]]:
    """(the model sigmas, the fused calls) of a DPM-Solver step of order 1-3 (+ noise z on the last call);
    embedded (orders 2, 3): the state ends as x_low, no noise."""
    h = math.log(sigma / sigma_next)
    big = sigma_next * math.expm1(h)  # sigma' E
    if order == 1:
        return [sigma], [UpdateCoeffs(*_eps(convert, sigma), a=1.0, b=(-big,), c=noise)]
    r1 = 1 / 2 if order == 2 else 1 / 3
    s1 = sigma * math.exp(-r1 * h)
    first = UpdateCoeffs(*_eps(convert, sigma), a=1.0, b=(-s1 * math.expm1(r1 * h),),
                         state=StateRow(a=1.0, b=(-big,)) if embedded and order == 2 else KEEP_START)
    w1 = big / (2 * r1)  # order 2's weight of eps_1 - eps
    if order == 2:
        last = UpdateCoeffs(*_eps(convert, s1), a=0.0, b=(-w1, w1 if embedded else w1 - big), g=1.0, c=noise)
        return [sigma, s1], [first, last]
    r2 = 2 / 3
    s2 = sigma * math.exp(-r2 * h)
    c1 = -s2 * (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1)
    low = StateRow(a=0.0, b=(-w1, w1 - big), g=1.0) if embedded else None
    second = UpdateCoeffs(*_eps(convert, s1), a=0.0, b=(c1, -s2 * math.expm1(r2 * h) - c1), g=1.0, state=low)
    d2 = -sigma_next / r2 * (math.expm1(h) / h - 1)
    if embedded:  # from x_low: x_high - x_low = d2 eps_2 + (d0 - l0) eps - l1 eps_1
        last = UpdateCoeffs(*_eps(convert, s2), a=0.0, b=(d2, -big - d2 - (w1 - big), w1), g=1.0)
    else:
        last = UpdateCoeffs(*_eps(convert, s2), a=0.0, b=(d2, -big - d2), g=1.0, c=noise)
    return [sigma, s1, s2], [first, second, last]


def fast_orders(nfe: int) -> list[int]:
    """DPM-Solver-fast's orders of its floor(nfe / 3) + 1 steps (uniform in t), nfe model calls in all."""
    m = nfe // 3 + 1
    return [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]


class PIDStepSize:
    """The step-size controller of k-diffusion's adaptive DPM-Solver (host floats): with the inverse errors
    e_k = 1 / (error_k + eps) of this and the last two accepted steps, the factor
    f = 1 + atan(e_0^{b_1} e_1^{b_2} e_2^{b_3} - 1), b_1 = (P + I + D) / order, b_2 = -(P + 2 D) / order,
    b_3 = D / order; h *= f, and the step is accepted where f >= accept_safety."""

    def __init__(self, h: float, pcoeff: float, icoeff: float, dcoeff: float, order: float, accept_safety: float,
                 eps: float = 1e-8):
        self.h, self.accept_safety, self.eps = h, accept_safety, eps
        self.b = ((pcoeff + icoeff + dcoeff) / order, -(pcoeff + 2 * dcoeff) / order, dcoeff / order)
        self.errs: list[float] = []

    def propose_step(self, error: float) -> bool:
        inv = 1 / (error + self.eps)
        self.errs = [inv, *(self.errs[1:] or [inv, inv])]
        factor = 1 + math.atan(math.prod(e**b for e, b in zip(self.errs, self.b)) - 1)
        accept = factor >= self.accept_safety
        if accept:
            self.errs = [inv, self.errs[0], self.errs[1]]
        self.h *= factor
        return accept
