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
        if (order == 1 and not corrector) or h == 0:  # h = 0: a zero-length step, the identity
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

    def undefined(self, s: int, t: int, order: int) -> str | None:
        """Why update(s, t, order) is undefined (Grid.repeated over its history points), or None."""
        return None if self.grid.lam(t) == self.grid.lam(s) else self.grid.repeated(range(s - order + 1, s + 1))


def unipc_plan(schedule: VP, steps: int, prediction: str, *, order: int = 2, variant: str = "bh2",
               predict_x0: bool = True, corrector: bool = True, disable_corrector: tuple[int, ...] = (),
               lower_order_final: bool = True, timestep_spacing: str = "linspace", steps_offset: int = 0,
               sigmas: str = "default", final_sigmas_type: str = "zero", dc_ratios=None, dc_order: int = 2) -> Plan:
    """UniPC Plan on a VP schedule; `variant` "bh1" | "bh2" (B(h)), `order` <= 3 (the history reads of the fused
    update), the corrector on
    every step but those after the indices in `disable_corrector` (diffusers' meaning), or none.
    `dc_ratios` (one per step, 1 = none): DC-Solver's dynamic compensation (see unipc_steps)."""
    if final_sigmas_type == "last":
        raise ValueError("final_sigmas_type must be one of ('zero', 'sigma_min'), got 'last'")
    grid = multistep_grid(schedule, steps, timestep_spacing=timestep_spacing, steps_offset=steps_offset,
                          sigmas=sigmas, final_sigmas_type=final_sigmas_type)
    return unipc_steps(grid, prediction, order=order, solver_type=variant, predict_x0=predict_x0,
                       corrector=corrector, disable_corrector=disable_corrector, lower_order_final=lower_order_final,
                       dc_ratios=dc_ratios, dc_order=dc_order)


def dc_weights(grid: Grid, i: int, ratio: float, dc_order: int) -> dict[int, float]:
    """DC-Solver's compensation (Zhao et al. 2024): the data prediction of step i is replaced by the Lagrange
    interpolation of the last dc_order + 1 predictions (over their timesteps) at
    t* = t_{i-1} + ratio (t_i - t_{i-1}); {grid index: weight}. ratio = 1 gives {i: 1}."""
    ts = [float(grid.timesteps[i - j]) for j in range(dc_order + 1)]
    t_star = ts[1] + ratio * (ts[0] - ts[1])
    weights = {}
    for j, tj in enumerate(ts):
        w = 1.0
        for m, tm in enumerate(ts):
            if m != j:
                w *= (t_star - tm) / (tj - tm)
        weights[i - j] = w
    return weights


def unipc_steps(grid: Grid, prediction: str, *, order: int = 2, solver_type: str = "bh2", predict_x0: bool = True,
                corrector: bool = True, disable_corrector: tuple[int, ...] = (),
                lower_order_final: bool = True, start: int = 0, dc_ratios=None, dc_order: int = 2) -> Plan:
    """The UniPC Plan over any Grid (the drop-in scheduler passes diffusers' own grid); the loop starts at
    step `start` (img2img), where the history is empty.

    DC-Solver: with `dc_ratios`, after the corrector (which uses the raw prediction M of the step) the stored
    and predicted-from prediction is M' = L_0 M + sum_j L_j m_j (dc_weights): in the fused op, the conversion
    gets L_0 (p, q) and the r weights L_j, and the corrector's weight on M is re-expressed through M'.
    """
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3 for unipc, got {order}")
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"variant (solver_type) must be one of {SOLVER_TYPES}, got {solver_type!r}")
    n = len(grid)
    if dc_ratios is not None:
        if len(dc_ratios) != n:
            raise ValueError(f"dc_ratios must have one ratio per step ({n}), got {len(dc_ratios)}")
        if not 1 <= dc_order <= 3:
            raise ValueError(f"dc_order must be 1, 2 or 3, got {dc_order}")
    updates = _Updates(grid, predict_x0, solver_type)
    convert = data_coeffs if predict_x0 else noise_coeffs
    slots = max(order, dc_order if dc_ratios is not None else 0) + 1
    orders, plan = [], []
    for i, t in enumerate(grid.timesteps):
        p_order = min(order, n - i) if lower_order_final else order
        p_order = min(p_order, i - start + 1) if i >= start else 1
        use_corrector = corrector and i > start and (i - 1) not in disable_corrector
        undefined = updates.undefined(i, i + 1, p_order) or (use_corrector and updates.undefined(i - 1, i, orders[-1]))
        if undefined:
            orders.append(p_order)
            plan.append(Step(t=t, coeffs=None, write_slot=i % slots, undefined=undefined))
            continue
        # corrector x_c = c_a state + sum_j c_w[j] m_j (grid point i - 1 -> i, the previous step's order)
        if use_corrector:
            c_a, c_w = updates.update(i - 1, i, orders[-1], corrector=True)
        else:
            c_a, c_w = 0.0, {}
        # DC-Solver: M' = sum_j dc[j] m_j replaces M; the corrector's M = (M' - sum_{j<i} dc[j] m_j) / dc[i]
        ratio = 1.0 if dc_ratios is None else float(dc_ratios[i])
        dc = {i: 1.0} if ratio == 1.0 or i - start < dc_order else dc_weights(grid, i, ratio, dc_order)
        if dc[i] == 0:
            raise ValueError(f"dc_ratios[{i}] = {ratio} gives the new prediction no weight; choose another ratio")
        if i in c_w:
            w_new = c_w[i]
            c_w = {j: c_w.get(j, 0.0) - w_new * dc.get(j, 0.0) / dc[i] for j in set(c_w) | set(dc)}
            c_w[i] = w_new / dc[i]
        # predictor x' = p_a x_c + sum_j p_w[j] m_j, x_c = the corrected sample (or x without corrector)
        p_a, p_w = updates.update(i, i + 1, p_order, corrector=False)
        orders.append(p_order)
        weights = {j: p_a * c_w.get(j, 0.0) + p_w.get(j, 0.0) for j in set(c_w) | set(p_w) | set(dc)}
        reads = sorted((j for j in weights if j != i), reverse=True)  # m_{i-1}, m_{i-2}, ...
        b = (weights.get(i, 0.0),) + tuple(weights[j] for j in reads)
        p, q = convert(prediction, *grid.alpha_sigma(i))
        p, q = p * dc[i], q * dc[i]
        eps_of = None if predict_x0 else grid.alpha_sigma(i)
        r = tuple(dc.get(j, 0.0) for j in reads)
        if use_corrector:  # x' from the state: g = p_a c_a; the state becomes x_c
            state = StateRow(a=0.0, b=(c_w.get(i, 0.0),) + tuple(c_w.get(j, 0.0) for j in reads), g=c_a)
            coeffs = UpdateCoeffs(p=p, q=q, a=0.0, b=b, g=p_a * c_a, state=state, r=r, eps_of=eps_of)
        else:  # x' from x; the state becomes x
            state = StateRow(a=1.0, b=(0.0,) * len(b))
            coeffs = UpdateCoeffs(p=p, q=q, a=p_a, b=b, state=state, r=r, eps_of=eps_of)
        plan.append(Step(t=t, coeffs=coeffs, write_slot=i % slots, read_slots=tuple(j % slots for j in reads)))
    return Plan(steps=tuple(plan), history_slots=slots, discrete_time=grid.discrete, data_prediction=predict_x0,
                uses_state=True)
