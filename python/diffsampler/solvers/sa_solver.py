"""SA-Solver (Xue et al. 2023): the stochastic Adams predictor and corrector, as diffusers' SASolverScheduler.

With lambda = log(alpha / sigma), h = lambda_t - lambda_s, tau the stochasticity (0: the ODE), c = 1 + tau^2 and
l_j the Lagrange basis over the lambdas of the step's predictions m_j (data predictions x0, or noise
predictions eps):

    data:   x_t = e^{-tau^2 h} (sigma_t / sigma_s) x_s + c alpha_t sum_j m_j int_0^h e^{-c u} l_j(lambda_t - u) du
                  + sigma_t sqrt(1 - e^{-2 tau^2 h}) z
    noise:  x_t = (alpha_t / alpha_s) x_s - c sigma_t sum_j m_j int_0^h e^{u} l_j(lambda_t - u) du
                  + tau sigma_t sqrt(e^{2h} - 1) z

The predictor (s -> t = s + 1) interpolates m_s, m_{s-1}, ...; the corrector (s - 1 -> s, the noise z and tau
of the predictor it corrects) also the new m_s. Second-order data steps add diffusers' (and the authors')
modification c alpha_t (h^2/2 - (c h + e^{-c h} - 1) / c^2) / (lambda_0 - lambda_1) to the first node's weight
and take it from the second's. One fused call per step does both: the state is x_s's predictor step without
its predictions, e^{-tau^2 h} (sigma_t / sigma_s) x_s + noise, so the corrected sample is state + its
prediction terms.
"""

from __future__ import annotations

import math

import numpy as np

from ..models import data_coeffs, noise_coeffs
from ..ops import StateRow, UpdateCoeffs
from ..schedules import VP
from .grid import Grid, multistep_grid
from .plan import Plan, Step

MAX_ORDER = 4
_GAUSS = np.polynomial.legendre.leggauss(32)  # entire integrands: to 1e-14 while (1 + tau^2) h <= 40


def _lagrange_integrals(lams: list[float], lam_t: float, h: float, rate: float) -> list[float]:
    """int_0^h e^{-rate u} l_j(lambda_t - u) du for each node lambda_j (Gauss-Legendre quadrature)."""
    if h == 0:
        return [0.0] * len(lams)
    x, w = _GAUSS
    u = 0.5 * h * (x + 1.0)
    lam = lam_t - u
    out = []
    for j, lj in enumerate(lams):
        basis = np.ones_like(u)
        for k, lk in enumerate(lams):
            if k != j:
                basis *= (lam - lk) / (lj - lk)
        out.append(float(0.5 * h * np.sum(w * np.exp(-rate * u) * basis)))
    return out


def sa_update(grid: Grid, s: int, t: int, nodes: list[int], tau: float, predict_x0: bool):
    """(a, {grid index: weight}, noise weight) of x_t = a x_s + sum_j w_j m_j + noise z (the module's equations)."""
    (alpha_s, sigma_s), (alpha_t, sigma_t) = grid.alpha_sigma(s), grid.alpha_sigma(t)
    lam_t, h = grid.lam(t), grid.lam(t) - grid.lam(s)
    c = 1.0 + tau * tau
    lams = [grid.lam(j) for j in nodes]
    if predict_x0:
        a = math.exp(-tau * tau * h) * sigma_t / sigma_s
        weights = [c * alpha_t * v for v in _lagrange_integrals(lams, lam_t, h, c)]
        noise = sigma_t * math.sqrt(-math.expm1(-2.0 * tau * tau * h))
        if len(nodes) == 2 and h != 0:
            extra = c * alpha_t * (h * h / 2 - (c * h + math.expm1(-c * h)) / (c * c)) / (lams[0] - lams[1])
            weights[0] += extra
            weights[1] -= extra
    else:
        a = alpha_t / alpha_s
        weights = [-c * sigma_t * v for v in _lagrange_integrals(lams, lam_t, h, -1.0)]
        noise = tau * sigma_t * math.sqrt(math.expm1(2.0 * h))
    return a, dict(zip(nodes, weights)), noise


def sa_plan(schedule: VP, steps: int, prediction: str, *, tau: float = 1.0, predictor_order: int = 2,
            corrector_order: int = 2, predict_x0: bool = True, lower_order_final: bool = True,
            timestep_spacing: str = "linspace", steps_offset: int = 0, sigmas: str = "default") -> Plan:
    """The SA-Solver Plan on a VP schedule, diffusers' SASolverScheduler grid: the last step lands on the smallest
    training sigma (default sigmas) or stays at the grid's last sigma (the other spacings)."""
    grid = multistep_grid(schedule, steps, timestep_spacing=timestep_spacing, steps_offset=steps_offset,
                          sigmas=sigmas, final_sigmas_type="sigma_min" if sigmas == "default" else "last")
    return sa_steps(grid, prediction, tau=tau, predictor_order=predictor_order, corrector_order=corrector_order,
                    predict_x0=predict_x0, lower_order_final=lower_order_final)


def sa_steps(grid: Grid, prediction: str, *, tau=1.0, predictor_order: int = 2, corrector_order: int = 2,
             predict_x0: bool = True, lower_order_final: bool = True, start: int = 0) -> Plan:
    """The SA-Solver Plan over any Grid (the drop-in passes diffusers' own); tau: a constant >= 0 or one per step
    (diffusers' tau_func at each timestep); the loop starts at step `start` (img2img). Orders warm up as
    diffusers': with w = min(i - start, max(predictor_order, corrector_order - 1)), the predictor of step i
    interpolates min(predictor_order, w + 1) predictions and the corrector of step i + 1 min(corrector_order,
    w + 2); lower_order_final lowers them to the steps left."""
    for name, order in (("predictor_order", predictor_order), ("corrector_order", corrector_order)):
        if order not in range(1, MAX_ORDER + 1):
            raise ValueError(f"{name} must be 1, 2, 3 or 4, got {order}")
    n = len(grid)
    taus = [float(tau)] * n if isinstance(tau, (int, float)) else [float(v) for v in tau]
    if len(taus) != n or min(taus) < 0:
        raise ValueError(f"tau must be a number >= 0 or one per step ({n}), got {tau!r}")
    if grid.sigmas[-1] == 0:
        raise ValueError("sa_solver's exponential integrals need a final sigma > 0: give the grid a final sigma > 0 "
                         "(on VPContinuous final='eps')")
    convert = data_coeffs if predict_x0 else noise_coeffs
    slots, cap = max(predictor_order, corrector_order), max(predictor_order, corrector_order - 1)
    plan, corrector = [], None  # corrector: (order, tau) of the next step's corrector
    for i, t in enumerate(grid.timesteps):
        warm = min(max(i - start, 0), cap)
        p_order = min(min(predictor_order, n - i) if lower_order_final else predictor_order, warm + 1)
        p_nodes = list(range(i, i - p_order, -1))
        c_nodes = list(range(i, i - corrector[0], -1)) if corrector and i > start else []
        undefined = grid.repeated(p_nodes) or (c_nodes and grid.repeated(c_nodes))
        tau_i = taus[i]
        if undefined:
            plan.append(Step(t=t, coeffs=None, write_slot=i % slots, undefined=undefined))
            corrector = None
            continue
        a, p_w, noise = sa_update(grid, i, i + 1, p_nodes, tau_i, predict_x0)
        c_w = sa_update(grid, i - 1, i, c_nodes, corrector[1], predict_x0)[1] if c_nodes else {}
        weights = {j: a * c_w.get(j, 0.0) + p_w.get(j, 0.0) for j in set(c_w) | set(p_w)}
        reads = sorted((j for j in weights if j != i), reverse=True)
        b = (weights[i],) + tuple(weights[j] for j in reads)
        p, q = convert(prediction, *grid.alpha_sigma(i))
        eps_of = None if predict_x0 else grid.alpha_sigma(i)
        # x_c = state + sum_j c_w[j] m_j (x without a corrector), x' = a x_c + sum_j p_w[j] m_j + noise z,
        # state' = a x_c + noise z
        if c_nodes:
            state = StateRow(a=0.0, b=tuple(a * c_w.get(j, 0.0) for j in [i, *reads]), c=noise, g=a)
            coeffs = UpdateCoeffs(p=p, q=q, a=0.0, b=b, c=noise, g=a, state=state, eps_of=eps_of)
        else:
            state = StateRow(a=a, b=(0.0,) * len(b), c=noise)
            coeffs = UpdateCoeffs(p=p, q=q, a=a, b=b, c=noise, state=state, eps_of=eps_of)
        plan.append(Step(t=t, coeffs=coeffs, write_slot=i % slots, read_slots=tuple(j % slots for j in reads)))
        c_order = min(corrector_order, n - i + 1) if lower_order_final else corrector_order
        corrector = (min(c_order, warm + 2), tau_i)
    return Plan(steps=tuple(plan), history_slots=slots, discrete_time=grid.discrete, data_prediction=predict_x0,
                uses_state=True)
