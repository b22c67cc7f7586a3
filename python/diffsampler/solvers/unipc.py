"""UniPC (Zhao et al. 2023): the UniP-p predictor and UniC-p corrector, as diffusers' UniPCMultistepScheduler.

With sigma the ratio sigma_t / alpha_t, lambda = log(alpha / sigma), h = lambda_t - lambda_s, hh = -h (data
prediction) or h (noise prediction), B(h) = hh (bh1) or e^hh - 1 (bh2), and r_k the lambda offsets of the
history divided by h:

    predictor  x_t = (sigma_t/sigma_s) x_s - alpha_t (e^hh - 1) m0 - alpha_t B(h) sum_k rho_p[k] (m_k - m0) / r_k
    corrector  x_c = (sigma_t/sigma_s) x_last - alpha_t (e^hh - 1) m_prev
                     - alpha_t B(h) (sum_k rho_c[k] (m_k - m_prev) / r_k + rho_c[-1] (m_new - m_prev))

(sigma and alpha swap roles for noise prediction), rho from R rho = b with R_ik = r_k^(i-1),
b_i = i! phi_{i+1}(hh) / B(h). One fused call per step does both: the state is the last corrected sample,
x' = predictor(corrector(state)), and the state is rewritten with the corrected sample.
"""

from __future__ import annotations

import math

import numpy as np

from ..models import data_coeffs, noise_coeffs
from ..ops import StateRow, UpdateCoeffs
from ..schedules import VP
from .grid import Grid, multistep_grid
from .plan import Plan, Step

SOLVER_TYPES = ("bh1", "bh2")


def _rhos(order: int, rks: list[float], hh: float, solver_type: str, corrector: bool) -> np.ndarray:
    """rho_p (predictor, order - 1 entries) or rho_c (corrector, order entries) in float64."""
    b_h = hh if solver_type == "bh1" else math.expm1(hh)
    h_phi_k = math.expm1(hh) / hh - 1
    factorial, b = 1, []
    for i in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    r = np.stack([np.power(np.array(rks + [1.0]), i - 1) for i in range(1, order + 1)])
    if corrector:
        return np.array([0.5]) if order == 1 else np.linalg.solve(r, np.array(b))
    if order == 1:
        return np.zeros(0)
    return np.array([0.5]) if order == 2 else np.linalg.solve(r[:-1, :-1], np.array(b[:-1]))


class _Updates:
    """The weights of one UniPC update from grid point s to t."""

    def __init__(self, grid: Grid, predict_x0: bool, solver_type: str):
        self.grid, self.predict_x0, self.solver_type = grid, predict_x0, solver_type

    def update(self, s: int, t: int, order: int, corrector: bool) -> tuple[float, dict[int, float]]:
        """(weight of the start sample, {grid index of a prediction (t for the new one): weight})."""
        lam = self.grid.lam
        (alpha_s, sigma_s), (alpha_t, sigma_t) = self.grid.alpha_sigma(s), self.grid.alpha_sigma(t)
        h = lam(t) - lam(s)
        hh = -h if self.predict_x0 else h
        scale = alpha_t if self.predict_x0 else sigma_t
        a = sigma_t / sigma_s if self.predict_x0 else alpha_t / alpha_s
        w = {s: -scale * math.expm1(hh)}
        if order == 1 and not corrector:
            return a, w
        b_h = hh if self.solver_type == "bh1" else math.expm1(hh)
        rks = [(lam(s - k) - lam(s)) / h for k in range(1, order)]
        rho = _rhos(order, rks, hh, self.solver_type, corrector)
        for k, (rk, rho_k) in enumerate(zip(rks, rho), start=1):  # rho_k (m_{s-k} - m_s) / r_k
            w[s - k] = w.get(s - k, 0.0) - scale * b_h * rho_k / rk
            w[s] -= -scale * b_h * rho_k / rk
        if corrector:  # rho_c[-1] (m_t - m_s)
            w[t] = -scale * b_h * rho[-1]
            w[s] += scale * b_h * rho[-1]
        return a, w


def unipc_plan(schedule: VP, steps: int, prediction: str, *, order: int = 2, solver_type: str = "bh2",
               predict_x0: bool = True, corrector: bool = True, disable_corrector: tuple[int, ...] = (),
               lower_order_final: bool = True, timestep_spacing: str = "linspace", steps_offset: int = 0,
               sigmas: str = "default", final_sigmas_type: str = "zero") -> Plan:
    """UniPC Plan on a VP schedule; `order` <= 3 (the history reads of the fused update), the corrector on
    every step but those after the indices in `disable_corrector` (diffusers' meaning), or none."""
    if final_sigmas_type == "last":
        raise ValueError("final_sigmas_type must be one of ('zero', 'sigma_min'), got 'last'")
    grid = multistep_grid(schedule, steps, timestep_spacing=timestep_spacing, steps_offset=steps_offset,
                          sigmas=sigmas, final_sigmas_type=final_sigmas_type)
    return unipc_steps(grid, prediction, order=order, solver_type=solver_type, predict_x0=predict_x0,
                       corrector=corrector, disable_corrector=disable_corrector, lower_order_final=lower_order_final)


def unipc_steps(grid: Grid, prediction: str, *, order: int = 2, solver_type: str = "bh2", predict_x0: bool = True,
                corrector: bool = True, disable_corrector: tuple[int, ...] = (),
                lower_order_final: bool = True, start: int = 0) -> Plan:
    """The UniPC Plan over any Grid (the drop-in scheduler passes diffusers' own grid); the loop starts at
    step `start` (img2img), where the history is empty."""
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3 for unipc, got {order}")
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"solver_type must be one of {SOLVER_TYPES}, got {solver_type!r}")
    updates = _Updates(grid, predict_x0, solver_type)
    convert = data_coeffs if predict_x0 else noise_coeffs
    n, slots = len(grid), order + 1
    orders, plan = [], []
    for i, t in enumerate(grid.timesteps):
        p_order = min(order, n - i) if lower_order_final else order
        p_order = min(p_order, i - start + 1) if i >= start else 1
        use_corrector = corrector and i > start and (i - 1) not in disable_corrector
        # corrector x_c = c_a state + sum_j c_w[j] m_j (grid point i - 1 -> i, the previous step's order)
        if use_corrector:
            c_a, c_w = updates.update(i - 1, i, orders[-1], corrector=True)
        else:
            c_a, c_w = 0.0, {}
        # predictor x' = p_a x_c + sum_j p_w[j] m_j, x_c = the corrected sample (or x without corrector)
        p_a, p_w = updates.update(i, i + 1, p_order, corrector=False)
        orders.append(p_order)
        weights = {j: p_a * c_w.get(j, 0.0) + p_w.get(j, 0.0) for j in set(c_w) | set(p_w)}
        reads = sorted((j for j in weights if j != i), reverse=True)  # m_{i-1}, m_{i-2}, ...
        b = (weights.get(i, 0.0),) + tuple(weights[j] for j in reads)
        p, q = convert(prediction, *grid.alpha_sigma(i))
        if use_corrector:  # x' from the state: g = p_a c_a; the state becomes x_c
            state = StateRow(a=0.0, b=(c_w.get(i, 0.0),) + tuple(c_w.get(j, 0.0) for j in reads), g=c_a)
            coeffs = UpdateCoeffs(p=p, q=q, a=0.0, b=b, g=p_a * c_a, state=state)
        else:  # x' from x; the state becomes x
            state = StateRow(a=1.0, b=(0.0,) * len(b))
            coeffs = UpdateCoeffs(p=p, q=q, a=p_a, b=b, state=state)
        plan.append(Step(t=t, coeffs=coeffs, write_slot=i % slots, read_slots=tuple(j % slots for j in reads)))
    return Plan(steps=tuple(plan), history_slots=slots, discrete_time=grid.discrete, data_prediction=predict_x0,
                uses_state=True)
