"""Linear multistep (LMS) in the VE scale x = x0 + sigma eps: k-diffusion's sample_lms, diffusers'
LMSDiscreteScheduler.

    d_i = (x_i - D_i) / sigma_i          (the derivative dx / dsigma; in the VE scale the noise prediction)
    x'  = x + sum_{j < k} c_j d_{i-j},   c_j = int_{sigma_i}^{sigma_{i+1}} prod_{l != j, l < k}
                                               (tau - sigma_{i-l}) / (sigma_{i-j} - sigma_{i-l}) dtau

with k = min(i + 1, order): c_j integrates the Lagrange basis polynomial through the last k sigmas, exactly
(k-diffusion and diffusers integrate it with scipy's quad, which is exact for a polynomial to its rounding).
The fused step stores d in the history ring (m_0 = ((1 - p) x - q out) / sigma for D = p x + q out) and
takes x' = x + sum_j c_j m_j.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from numpy.polynomial import polynomial as P

from ..ops import UpdateCoeffs
from .plan import Plan, Step, ring_slots
from .ve import scaled_result, ve_data_coeffs
from .ve_grid import ve_grid

MAX_ORDER = 4  # the current derivative and 3 history reads (ops.MAX_HISTORY_READS)


def lms_weights(sigmas: Sequence[float], i: int, order: int) -> tuple[float, ...]:
    """(c_0, ..., c_{order-1}) of the step from sigmas[i] to sigmas[i + 1] over the nodes sigmas[i - j]."""
    if not 1 <= order <= i + 1:
        raise ValueError(f"order must be in [1, i + 1] = [1, {i + 1}] at step {i}, got {order}")
    nodes = [float(sigmas[i - j]) for j in range(order)]
    lo, hi = float(sigmas[i]), float(sigmas[i + 1])
    weights = []
    for j in range(order):
        basis = np.array([1.0])
        for l in range(order):
            if l != j:
                basis = P.polymul(basis, np.array([-nodes[l], 1.0]) / (nodes[j] - nodes[l]))
        integral = P.polyint(basis)
        weights.append(float(P.polyval(hi, integral) - P.polyval(lo, integral)))
    return tuple(weights)


def derivative_coeffs(p: float, q: float, sigma: float) -> tuple[float, float]:
    """(p, q) of d = (x - D) / sigma for D = p x + q out."""
    return (1.0 - p) / sigma, -q / sigma


def lms_coeffs(p: float, q: float, sigma: float, weights: Sequence[float]) -> UpdateCoeffs:
    """x' = x + sum_j c_j d_j with m_0 = d_0 (a noise prediction: eps_of = (1, sigma)) and weights c_j."""
    dp, dq = derivative_coeffs(p, q, sigma)
    return UpdateCoeffs(p=dp, q=dq, a=1.0, b=tuple(float(w) for w in weights), eps_of=(1.0, sigma))


def lms_step(sigmas: Sequence[float], i: int, prediction: str, order: int, taken: int
             ) -> tuple[UpdateCoeffs, int, tuple[int, ...]]:
    """(coeffs, write_slot, read_slots) of step i over the VE sigmas with `taken` derivatives already in the
    ring of MAX_ORDER slots: the order min(i + 1, order) of diffusers / k-diffusion, of which the first
    min(order, taken + 1) terms are used (a late start has fewer derivatives, as diffusers' zip over its list)."""
    if isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= MAX_ORDER:
        raise ValueError(f"order must be an integer in [1, {MAX_ORDER}], got {order!r}")
    k = min(i + 1, order)
    used = min(k, taken + 1)
    write, reads = ring_slots(taken, used, MAX_ORDER)
    weights = lms_weights(sigmas, i, k)[:used]
    return lms_coeffs(*ve_data_coeffs(prediction, sigmas[i]), sigmas[i], weights), write, reads


def lms_plan(schedule, steps: int, prediction: str, *, order: int = 4, **grid) -> Plan:
    """The LMS loop on the VE-scale grid (solvers.ve_grid): on VP LMSDiscreteScheduler's (its sigma spacings,
    the model input x / sqrt(sigma^2 + 1), x_T scaled by init_noise_sigma), on EDM k-diffusion's Karras sigmas
    (sample_lms), on a VP Grid its points."""
    g = ve_grid(schedule, steps, prediction, **grid)
    plan = []
    for i in range(steps):
        coeffs, write, reads = lms_step(g.sigmas, i, prediction, order, i)
        if i == steps - 1:
            coeffs = scaled_result(coeffs, g.final_alpha)
        plan.append(Step(t=g.times[i], coeffs=coeffs, write_slot=write, read_slots=reads,
                         input_scale=g.input_scales[i]))
    return Plan(steps=tuple(plan), history_slots=MAX_ORDER, discrete_time=False, data_prediction=False,
                init_scale=g.init_scale)
