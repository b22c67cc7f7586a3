"""DEIS multistep (Zhang & Chen 2023), log-rho variant, as diffusers' DEISMultistepScheduler.

The history holds noise predictions; with rho = sigma_t / alpha_t the exponential integrator is

    x_t = alpha_t (x_s / alpha_s + sum_k c_k m_k),   c_k = int_{rho_s}^{rho_t} l_k(log rho) d rho

where l_k is the Lagrange basis polynomial in log rho through the history points (closed form below).
"""

from __future__ import annotations

import math

from ..models import noise_coeffs
from ..ops import UpdateCoeffs
from ..schedules import VP
from .grid import Grid, multistep_grid
from .plan import Plan, Step, ring_slots


def _lagrange_integral(t: float, nodes: list[float]) -> float:
    """Antiderivative at t of l_0(log rho) = prod_{j>0} (log rho - log n_j) / (log n_0 - log n_j), for 2 or 3 nodes
    (the closed forms of the DEIS paper / diffusers)."""
    lt = math.log(t)
    lb = [math.log(v) for v in nodes]
    if len(nodes) == 2:
        return t * (-lb[1] + lt - 1) / (lb[0] - lb[1])
    c, d = lb[1], lb[2]
    numerator = t * (c * (d - lt + 1) - d * lt + d + lt**2 - 2 * lt + 2)
    return numerator / ((lb[0] - c) * (lb[0] - d))


def _deis_weights(order: int, rho_t: float, rhos: list[float]) -> list[float]:
    """c_k of the update from rhos[0] (the current point) to rho_t with history rhos[1:order]."""
    if order == 1:
        return [rho_t - rhos[0]]  # x_t = alpha_t (x_s / alpha_s + (rho_t - rho_s) eps)
    nodes = rhos[:order]
    weights = []
    for k in range(order):
        others = nodes[k:k + 1] + nodes[:k] + nodes[k + 1:]
        weights.append(_lagrange_integral(rho_t, others) - _lagrange_integral(nodes[0], others))
    return weights


def deis_plan(schedule: VP, steps: int, prediction: str, *, order: int = 2, lower_order_final: bool = True,
              timestep_spacing: str = "linspace", steps_offset: int = 0, sigmas: str = "default") -> Plan:
    """DEIS Plan on a VP schedule. Like diffusers, the last step lands on the smallest training sigma (default
    sigmas) or stays at the grid's last sigma (the other spacings): there is no final denoising to sigma = 0."""
    grid = multistep_grid(schedule, steps, timestep_spacing=timestep_spacing, steps_offset=steps_offset,
                          sigmas=sigmas, final_sigmas_type="sigma_min" if sigmas == "default" else "last")
    return deis_steps(grid, prediction, order=order, lower_order_final=lower_order_final)


def deis_steps(grid: Grid, prediction: str, *, order: int = 2, lower_order_final: bool = True,
               start: int = 0) -> Plan:
    """The DEIS Plan over any Grid; the loop starts at step `start` (img2img), where the history is empty."""
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3 for deis, got {order}")
    if grid.sigmas[-1] == 0:
        raise ValueError("deis integrates in log rho and cannot land on sigma = 0: give the grid a final sigma > 0")
    n = len(grid)
    plan = []
    for i, t in enumerate(grid.timesteps):
        this_order = min(order, i - start + 1) if i >= start else 1
        if lower_order_final and n < 15 and i >= n - 2:
            this_order = min(this_order, n - i)
        (alpha_s, sigma_s), (alpha_t, sigma_t) = grid.alpha_sigma(i), grid.alpha_sigma(i + 1)
        rho_t = sigma_t / alpha_t
        rhos = [grid.alpha_sigma(i - k)[1] / grid.alpha_sigma(i - k)[0] for k in range(this_order)]
        write, reads = ring_slots(i, this_order, order)
        undefined = grid.repeated(range(i - this_order + 1, i + 1))  # the Lagrange nodes (rho_t = rho_s is fine)
        if undefined:
            plan.append(Step(t=t, coeffs=None, write_slot=write, read_slots=reads, undefined=undefined))
            continue
        if this_order == 1:  # diffusers' first-order form: x_t = (alpha_t / alpha_s) x - sigma_t (e^h - 1) eps
            h = grid.lam(i + 1) - grid.lam(i)
            b = (-sigma_t * math.expm1(h),)
        else:
            b = tuple(alpha_t * c for c in _deis_weights(this_order, rho_t, rhos))
        p, q = noise_coeffs(prediction, alpha_s, sigma_s)
        coeffs = UpdateCoeffs(p=p, q=q, a=alpha_t / alpha_s, b=b, eps_of=(alpha_s, sigma_s))
        plan.append(Step(t=t, coeffs=coeffs, write_slot=write, read_slots=reads))
    return Plan(steps=tuple(plan), history_slots=order if order > 1 else 0, discrete_time=grid.discrete,
                data_prediction=False)
