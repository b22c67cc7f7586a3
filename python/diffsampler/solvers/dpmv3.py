"""DPM-Solver-v3 (Zheng, Lu, Chen, Zhu, NeurIPS 2023): the multistep predictor-corrector on empirical model
statistics (EMS), as the paper and its code (thu-ml/DPM-Solver-v3) define it.

With lambda = log(alpha / sigma) and the noise prediction eps of the model, the diffusion ODE is
d(x / alpha) / dlambda = -sigma eps / alpha. The EMS are three functions of lambda per dimension (element of a
sample): l, s, b. With N = sigma eps - l x and f = N / alpha, the ODE is d(x/alpha)/dlambda = -l x/alpha - f, so

    x_t = (alpha_t / alpha_s) e^{-(L_t - L_s)} x_s - alpha_t int_s^t e^{L_u - L_t} f_u du,     L = int l dlambda.

s and b model the change of f along the trajectory, f' ~ s f + b: with S = int s dlambda and
y_u = e^{-(S_u - S_s)} f_u - int_s^u e^{-(S_r - S_s)} b_r dr (the paper's g; constant when f' = s f + b exactly),

    x_t = a x_s - alpha_t K_I y_s - alpha_t K_C - alpha_t e^{-(L_t - L_s)} sum_{n>=1} E_n y^(n)_s
    a   = (alpha_t / alpha_s) e^{-(L_t - L_s)},   K_I = int_s^t e^{(L_u - L_t) + (S_u - S_s)} du,
    K_C = int_s^t e^{(L_u - L_t) + (S_u - S_s)} int_s^u e^{-(S_r - S_s)} b_r dr du,
    E_n = int_s^t e^{(L_u - L_s) + (S_u - S_s)} (u - lambda_s)^n / n! du.

The derivatives y^(n)_s come from the y of the previous points (multistep): the full polynomial fit through
them (R c = y_k - y_0, R_kn = (lambda_k - lambda_0)^n, y^(n) = n! c_n), or, "pseudo-order", the divided
differences y^(n) = n! y[lambda_0, ..., lambda_n]. The corrector redoes the last step with the new point's y
(order + 1 with pseudo-order, as the paper's code) and keeps f of the new point (N is not re-evaluated). The
integrals are trapezoid sums over the EMS lambda grid (the paper's code), here on the union of that grid and the
sampling points (l, s, b interpolated linearly in lambda between EMS points; the paper snaps the sampling points
to the grid instead).

Reductions: l = 1, s = b = 0 is DPM-Solver++ (f = -x0; order 2: the multistep with the exact phi_2 weight,
solver_type="heun"; order 3: phi3="taylor"), to the trapezoid error of the grid; l = 0, s = -1, b = 0 is
DPM-Solver (noise prediction). l = s = b = 0 is a plain polynomial (Adams-type) integrator of
d(x/alpha)/dlambda in lambda, no named solver.

Per step this is one fused elementwise map with per-dimension coefficients (ops.ems_update):
f_i = P x_i + Q out_i with P = (1 - l_i) / alpha_i - p_i, Q = -q_i (x0 = p x + q out), and x' and the state
(the last corrected sample) are weighted sums of x, the state and the history of f with coefficient tensors that
the plan computes once in float64.

The EMS are the minimizers the paper defines, over the model's marginals p_lambda:
    l = argmin E||d N / dx||_F^2 = E[diag(sigma d eps / dx)],   (s, b) = argmin E||f' - s f - b||^2,
f' the derivative of f along the ODE. The public code ships precomputed EMS only (its README: "EMS computing
by yourself: TODO"); fit_ems estimates them on trajectories of the model's ODE from samples x_T
(DPM-Solver++(3M) through a fine uniform-logSNR grid), at each grid point: l by Hutchinson's estimator
E_v[v * (J v)] with Rademacher v and J v by central differences (no autograd through the model), f' by 3-point
differences in lambda along the trajectories, s = Cov(f', f) / Var(f) and b = E[f'] - s E[f] per dimension.
Where f does not vary over the samples (Var(f) <= 1e-10 E[(x / alpha)^2]: rounding noise; e.g. a Gaussian
target) s = 0 and b = E[f'].
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from .. import ops
from ..models import data_coeffs
from ..schedules import VP, VPContinuous
from .dpm import dpm_steps
from .grid import Grid, multistep_grid
from .plan import Plan, Step

LAMBDA_TOL = 1e-6  # sampling lambdas this close outside the EMS grid count as covered (float32 sigmas)
RIDGE = 1e-10  # Var(f) below RIDGE * E[(x / alpha)^2], the size of f's terms: f does not vary, s = 0


@dataclass(frozen=True)
class EMS:
    """Empirical model statistics on a lambda grid: lambdas (K+1,) strictly increasing (noise to data), and
    l, s, b of shape (K+1, *dims), dims broadcasting to a sample's shape x.shape[1:] (() for scalars, (C, 1, 1)
    per channel, (C, H, W) per dimension as in the paper). Stored in float64 on the CPU."""

    lambdas: torch.Tensor
    l: torch.Tensor
    s: torch.Tensor
    b: torch.Tensor

    def __post_init__(self):
        lam = torch.as_tensor(self.lambdas, dtype=torch.float64).cpu()
        if lam.dim() != 1 or lam.numel() < 2:
            raise ValueError(f"lambdas must be a 1-D grid of at least 2 points, got shape {tuple(lam.shape)}")
        if not torch.isfinite(lam).all() or not (lam[1:] > lam[:-1]).all():
            raise ValueError("lambdas must be finite and strictly increasing (from noise to data)")
        object.__setattr__(self, "lambdas", lam)
        for name in ("l", "s", "b"):
            v = torch.as_tensor(getattr(self, name), dtype=torch.float64).cpu()
            if v.dim() < 1 or v.shape[0] != lam.numel():
                raise ValueError(f"{name} must have shape (len(lambdas) = {lam.numel()}, *dims), got {tuple(v.shape)}")
            if not torch.isfinite(v).all():
                raise ValueError(f"{name} must be finite")
            object.__setattr__(self, name, v)
        try:
            torch.broadcast_shapes(self.l.shape, self.s.shape, self.b.shape)
        except RuntimeError:
            raise ValueError(f"l, s, b must broadcast together, got {tuple(self.l.shape)}, {tuple(self.s.shape)}, "
                             f"{tuple(self.b.shape)}") from None

    @classmethod
    def constant(cls, lambdas, l: float = 1.0, s: float = 0.0, b: float = 0.0) -> "EMS":
        """Scalar statistics, the same at every lambda; the default (l = 1, s = b = 0) is DPM-Solver++
        (the paper's `degenerated=True`)."""
        lam = torch.as_tensor(lambdas, dtype=torch.float64)
        return cls(lam, torch.full_like(lam, l), torch.full_like(lam, s), torch.full_like(lam, b))

    @property
    def dims(self) -> tuple[int, ...]:
        return tuple(torch.broadcast_shapes(self.l.shape, self.s.shape, self.b.shape)[1:])

    def save(self, path) -> None:
        """torch.save of the four tensors (EMS.load reads them back, also with weights_only=True)."""
        torch.save({"lambdas": self.lambdas, "l": self.l, "s": self.s, "b": self.b}, path)

    @classmethod
    def load(cls, path) -> "EMS":
        return cls(**torch.load(path, weights_only=True))


def _trapz(values: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """int values dlambda over the whole of lam by the trapezoid rule; values (m, *dims)."""
    d = (lam[1:] - lam[:-1]).reshape(-1, *([1] * (values.dim() - 1)))
    return (0.5 * d * (values[1:] + values[:-1])).sum(0)


def _cumtrapz(values: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Cumulative trapezoid integral from lam[0], same shape as values (0 at lam[0])."""
    d = (lam[1:] - lam[:-1]).reshape(-1, *([1] * (values.dim() - 1)))
    return torch.cat([torch.zeros_like(values[:1]), torch.cumsum(0.5 * d * (values[1:] + values[:-1]), 0)])


class _Integrals:
    """The EMS on the union of their grid and the sampling lambdas, and the step integrals over it."""

    def __init__(self, ems: EMS, lams: Sequence[float]):
        grid = ems.lambdas
        lo, hi = float(grid[0]), float(grid[-1])
        first, last = min(lams), max(lams)
        if not (first >= lo - LAMBDA_TOL and last <= hi + LAMBDA_TOL):
            raise ValueError(f"ems: the EMS lambda grid [{lo:.6g}, {hi:.6g}] must cover the sampling range "
                             f"[{first:.6g}, {last:.6g}] (a final sigma of 0 is lambda = inf: end at sigma_min)")
        pts = []
        for v in lams:  # a sampling point within LAMBDA_TOL of an EMS point is that point
            j = int(torch.argmin((grid - v).abs()))
            pts.append(float(grid[j]) if abs(float(grid[j]) - v) <= LAMBDA_TOL else min(max(v, lo), hi))
        merged = torch.tensor(sorted(set(grid.tolist()) | set(pts)), dtype=torch.float64)
        self.where = {v: int(torch.searchsorted(merged, torch.tensor(v, dtype=torch.float64))) for v in pts}
        self.points = pts
        j = (torch.searchsorted(grid, merged, right=True) - 1).clamp(0, len(grid) - 2)
        w = ((merged - grid[j]) / (grid[j + 1] - grid[j])).reshape(-1, *([1] * len(ems.dims)))
        dims = (len(merged), *ems.dims)

        def interp(v):
            v = v.expand(len(grid), *ems.dims)
            return ((1 - w) * v[j] + w * v[j + 1]).expand(dims)

        self.lam = merged
        self.l, self.s, self.b = interp(ems.l), interp(ems.s), interp(ems.b)
        self.L, self.S = _cumtrapz(self.l, merged), _cumtrapz(self.s, merged)

    def index(self, i: int) -> int:
        """Merged-grid index of sampling point i."""
        return self.where[self.points[i]]

    def step(self, a: int, c: int, others: Sequence[int], orders: int):
        """The integrals of a step a -> c (merged indices, a < c) whose y come from the points a, *others:
        (e^{-(L_c - L_a)}, K_I, K_C, [E_1..E_{orders-1}], {j: e^{-(S_j - S_a)}}, {j: beta_j}), with
        beta_j = int_{lambda_a}^{lambda_j} e^{-(S_r - S_a)} b_r dr (signed; 0 at a)."""
        lo = min(a, *others)
        lam, L, S = self.lam[lo:c + 1], self.L[lo:c + 1], self.S[lo:c + 1]
        ra, rc = a - lo, c - lo
        beta = _cumtrapz(torch.exp(-(S - S[ra])) * self.b[lo:c + 1], lam)
        beta = beta - beta[ra]
        seg = slice(ra, rc + 1)
        kernel = torch.exp(L[seg] - L[rc] + S[seg] - S[ra])  # e^{(L_u - L_t) + (S_u - S_s)}
        decay = torch.exp(L[ra] - L[rc])
        u = (lam[seg] - lam[ra]).reshape(-1, *([1] * (kernel.dim() - 1)))
        e = [_trapz(kernel / decay * u**n / math.factorial(n), lam[seg]) for n in range(1, orders)]
        gains = {j: torch.exp(-(S[j - lo] - S[ra])) for j in others}
        return decay, _trapz(kernel, lam[seg]), _trapz(kernel * beta[seg], lam[seg]), e, gains, \
            {j: beta[j - lo] for j in others}


def derivative_weights(lams: Sequence[float], pseudo: bool) -> list[list[float]]:
    """w[n-1][j]: y^(n)(lams[0]) ~ sum_j w[n-1][j] y(lams[j]), n = 1 .. len(lams) - 1.

    Full order: the n-th derivative at lams[0] of the polynomial through all points. Pseudo-order:
    n! y[lams[0], ..., lams[n]] (Newton's divided difference over the first n + 1 points)."""
    m = len(lams) - 1
    x = np.asarray(lams, dtype=np.float64)
    if m == 0:
        return []
    if pseudo:
        rows = []
        for n in range(1, m + 1):
            row = [0.0] * (m + 1)
            for j in range(n + 1):
                row[j] = math.factorial(n) / np.prod([x[j] - x[q] for q in range(n + 1) if q != j])
            rows.append(row)
        return rows
    r = np.stack([(x[1:] - x[0]) ** n for n in range(1, m + 1)], axis=1)  # R[k, n] = (x_k - x_0)^n
    inv = np.linalg.inv(r)  # c = R^{-1} (y_k - y_0)
    rows = []
    for n in range(1, m + 1):
        w = [math.factorial(n) * inv[n - 1, k] for k in range(m)]
        rows.append([-sum(w)] + w)
    return rows


def _update(q: _Integrals, grid: Grid, s: int, t: int, points: list[int], pseudo: bool):
    """One step from sampling point s to t with the f of `points` (points[0] = s):
    x_t = a x_s + sum_j W[j] f_j + const; (a, {point: W}, const) as float64 tensors of the EMS dims."""
    (alpha_s, _), (alpha_t, _) = grid.alpha_sigma(s), grid.alpha_sigma(t)
    idx = {j: q.index(j) for j in points}
    decay, k_i, k_c, e, gains, betas = q.step(idx[s], q.index(t), list(idx.values()), len(points))
    weights = {s: -alpha_t * k_i}
    const = -alpha_t * k_c
    rows = derivative_weights([float(q.lam[idx[j]]) for j in points], pseudo)
    for k, j in enumerate(points if rows else []):  # - alpha_t e^{-(L_t-L_s)} sum_n E_n sum_j w_nj y_j
        on_y = sum(-alpha_t * decay * e[n] * row[k] for n, row in enumerate(rows))  # the weight of y_j
        weights[j] = weights.get(j, 0.0) + on_y * gains[idx[j]]  # y_j = e^{-(S_j - S_s)} f_j - beta_j
        const = const - on_y * betas[idx[j]]
    return alpha_t / alpha_s * decay, weights, const


def dpmv3_steps(grid: Grid, prediction: str, *, ems: EMS | None = None, order: int = 2,
                predictor_pseudo: bool = False, corrector: bool = True, corrector_pseudo: bool = True,
                lower_order_final: bool = True) -> Plan:
    """The DPM-Solver-v3 Plan over a Grid (model calls at its timesteps, the last step landing on its final
    sigma, which must be > 0 and inside the EMS grid). Per step i (the paper's sample loop):
      corrector (i >= 1, `corrector`): order p_{i-1} + 1 with `corrector_pseudo` (divided differences), else
        p_{i-1}; applied when > 1; redoes the step i-1 -> i from the last corrected sample with f_i;
      predictor: order p_i = min(order, i + 1) (and <= steps - i with lower_order_final), full polynomial
        fit, or divided differences with `predictor_pseudo`.
    """
    if ems is None:
        raise ValueError("ems: DPM-Solver-v3 needs its empirical model statistics: ems=diffsampler.solvers.dpmv3."
                         "fit_ems(model, x_T, schedule) or EMS.constant(lambdas) (DPM-Solver++)")
    if not isinstance(ems, EMS):
        raise ValueError(f"ems must be a diffsampler.solvers.dpmv3.EMS, got {type(ems).__name__}")
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3 for dpmv3, got {order}")
    n = len(grid)
    lams = [grid.lam(i) for i in range(n + 1)]
    if not all(math.isfinite(v) for v in lams):
        raise ValueError("ems: the grid ends at sigma = 0 (lambda = inf), which no EMS grid covers; end at "
                         "sigma_min (final_sigmas_type='sigma_min', or final='eps' on VPContinuous)")
    if not all(b > a for a, b in zip(lams, lams[1:])):
        raise ValueError("the sampling grid's sigmas must decrease strictly (a repeated sigma is a step of length 0)")
    q = _Integrals(ems, lams)
    p_orders = []
    for i in range(n):
        p = min(order, i + 1)
        p_orders.append(min(p, n - i) if lower_order_final else p)
    c_orders = [0] + [p_orders[i - 1] + (1 if corrector_pseudo else 0) if corrector else 0 for i in range(1, n)]
    lookback = max([p - 1 for p in p_orders] + [c - 1 for c in c_orders if c > 1])
    slots = lookback + 1  # >= 1: ems_update always writes f (inductor lowers no mutating op without a mutation)
    uses_state = any(c > 1 for c in c_orders)
    steps = []
    for i, t in enumerate(grid.timesteps):
        alpha, sigma = grid.alpha_sigma(i)
        p_x, q_out = data_coeffs(prediction, alpha, sigma)
        l_i = q.l[q.index(i)]
        conv = [(1 - l_i) / alpha - p_x, torch.full_like(l_i, -q_out)]  # f = P x + Q out
        a_p, w_p, c_p = _update(q, grid, i, i + 1, [i - j for j in range(p_orders[i])], predictor_pseudo)
        if c_orders[i] > 1:  # x_c = a_c state + sum W_c f + c_c, x' = a_p x_c + ...
            pts = [i - 1, i] + [i - j for j in range(2, c_orders[i])]
            a_c, w_c, c_c = _update(q, grid, i - 1, i, pts, corrector_pseudo)
            w = {j: a_p * w_c.get(j, 0.0) + w_p.get(j, 0.0) for j in set(w_c) | set(w_p)}
            x_row = [torch.zeros_like(a_p), a_p * a_c, w, a_p * c_c + c_p]
            s_row = [torch.zeros_like(a_p), a_c, w_c, c_c]
        else:
            x_row = [a_p, torch.zeros_like(a_p), w_p, c_p]
            s_row = [torch.ones_like(a_p), torch.zeros_like(a_p), {}, torch.zeros_like(a_p)]
        depth = max(i - j for j in set(x_row[2]) | set(s_row[2]) | {i})
        reads = list(range(i - 1, i - 1 - depth, -1))  # f_{i-1}, f_{i-2}, ...
        rows = conv + _row(x_row, i, reads) + (_row(s_row, i, reads) if uses_state else [])
        coeffs = torch.stack(torch.broadcast_tensors(*rows))  # ems_rows(len(reads), uses_state) rows
        steps.append(Step(t=t, coeffs=None, write_slot=i % slots,
                          read_slots=tuple(j % slots for j in reads), tensor_coeffs=coeffs))
    return Plan(steps=tuple(steps), history_slots=slots, discrete_time=grid.discrete, data_prediction=False,
                uses_state=uses_state)


def _row(row, i: int, reads: list[int]) -> list[torch.Tensor]:
    """[A, H, B_0 (new f_i), B_1.. (reads), C] of one row [A, H, {point: W}, C]."""
    a, h, w, c = row
    zero = torch.zeros_like(a)
    return [a, h, w.get(i, zero)] + [w.get(j, zero) for j in reads] + [c]


def dpmv3_plan(schedule: VP, steps: int, prediction: str, *, ems: EMS | None = None, order: int = 2,
               predictor_pseudo: bool = False, corrector: bool = True, corrector_pseudo: bool = True,
               lower_order_final: bool = True, timestep_spacing: str = "linspace", steps_offset: int = 0,
               sigmas: str = "default", final_sigmas_type: str = "sigma_min") -> Plan:
    """DPM-Solver-v3 on a discrete VP schedule over diffusers' multistep grid, ending at the smallest training
    sigma (final_sigmas_type="sigma_min": the EMS cannot reach sigma = 0)."""
    grid = multistep_grid(schedule, steps, timestep_spacing=timestep_spacing, steps_offset=steps_offset,
                          sigmas=sigmas, final_sigmas_type=final_sigmas_type)
    return dpmv3_steps(grid, prediction, ems=ems, order=order, predictor_pseudo=predictor_pseudo,
                       corrector=corrector, corrector_pseudo=corrector_pseudo, lower_order_final=lower_order_final)


def ems_points(schedule, points: int) -> tuple[list, list[float], bool]:
    """(model times, sigma ratios, discrete) of `points` EMS points uniform in lambda from the start of the
    sampling range to its end: all of a VP schedule (training timesteps 0..N-1, the nearest integer timesteps,
    without repeats), a VPContinuous one (t = 1 to eps), or a decreasing sequence of sigma ratios (continuous
    time: the model gets the sigma ratio, as Grid.from_sigmas)."""
    if not isinstance(points, int) or points < 3:
        raise ValueError(f"points must be an integer >= 3, got {points!r}")
    if isinstance(schedule, VP):
        all_t = np.arange(schedule.num_train_timesteps - 1, -1, -1)
        lam = np.array([-math.log(schedule.sigma_ratio(int(t))) for t in all_t])
        pos = np.unique(np.round(np.interp(np.linspace(lam[0], lam[-1], points), lam, np.arange(len(lam)))))
        times = [int(all_t[int(i)]) for i in pos]
        return times, [schedule.sigma_ratio(t) for t in times], True
    if isinstance(schedule, VPContinuous):
        times = schedule.times(points - 1, "logsnr")
        return times, [schedule.sigma_ratio(t) for t in times], False
    sigmas = [float(v) for v in schedule]
    if len(sigmas) < 3 or not all(a > b > 0 for a, b in zip(sigmas, sigmas[1:])):
        raise ValueError("schedule must be a VP or VPContinuous schedule, or >= 3 decreasing positive sigmas")
    return sigmas, sigmas, False


def _slope(lams: Sequence[float], ys: Sequence[torch.Tensor], at: int) -> torch.Tensor:
    """d/dlambda at lams[at] of the parabola through three points (lams[j], ys[j])."""
    x = lams[at]
    out = 0.0
    for j in range(3):
        a, b = [lams[m] for m in range(3) if m != j]
        out = out + ys[j] * (((x - a) + (x - b)) / ((lams[j] - a) * (lams[j] - b)))
    return out


def _regress(f: torch.Tensor, df: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per dimension over the samples (dim 0): argmin_{s, b} E||df - s f - b||^2; s = 0 where Var(f) is
    rounding noise (<= RIDGE * scale, scale = E[(x / alpha)^2] of the point)."""
    fc, dc = f - f.mean(0), df - df.mean(0)
    var, cov = (fc * fc).mean(0), (fc * dc).mean(0)
    s = torch.where(var > RIDGE * scale, cov / var.clamp_min(1e-300), torch.zeros_like(var))
    return s, df.mean(0) - s * f.mean(0)


def fit_ems(model: Callable[..., torch.Tensor], x_T: torch.Tensor, schedule, prediction: str = "eps", *,
            points: int = 200, probes: int = 1, fd_step: float = 1e-3, generator: torch.Generator | None = None,
            backend: str = "auto") -> EMS:
    """The EMS of `model` (called as in sample: model(x, t)) from the noise samples x_T (N, *shape), at
    `points` lambdas uniform in logSNR over `schedule`'s range (ems_points), per dimension of a sample.

    The samples follow the model's ODE through the points (DPM-Solver++(3M), phi3="taylor"); at each point
    l = E[v * (sigma d eps/dx) v] over the samples and `probes` Rademacher vectors v (the Jacobian-vector
    product by central differences of step `fd_step`), f = ((1 - l) / alpha - p) x - q out (x0 = p x + q out),
    f' = df/dlambda along the trajectories (3-point differences over the points), and s, b by least squares of
    f' on f. Model calls per point: 1 + 2 probes. Run it in float64 where the model allows (differences).
    """
    times, sigmas, discrete = ems_points(schedule, points)
    if not isinstance(probes, int) or probes < 1:
        raise ValueError(f"probes must be an integer >= 1, got {probes!r}")
    if not fd_step > 0:
        raise ValueError(f"fd_step must be > 0, got {fd_step}")
    grid = Grid(timesteps=tuple(times[:-1]), sigmas=tuple(sigmas), discrete=discrete)
    plan = dpm_steps(grid, prediction, order=3, phi3="taylor", lower_order_final=False, final_sigma_zero=False)
    x = x_T.clone()
    history = x.new_empty((plan.history_slots, *x.shape))
    t_dtype = torch.int64 if discrete else x.dtype
    lams = [grid.lam(k) for k in range(len(times))]
    ls, ss, bs, fs, scales = [], [None] * len(times), [None] * len(times), [], []
    for k, t in enumerate(times):
        tk = torch.tensor(t, dtype=t_dtype, device=x.device)
        out = model(x, tk)
        alpha, sigma = grid.alpha_sigma(k)
        p, q = data_coeffs(prediction, alpha, sigma)
        diag = torch.zeros(x.shape[1:], dtype=torch.float64, device=x.device)
        for _ in range(probes):  # sigma d eps/dx v = (1 - alpha p) v - alpha q d out/dx v
            v = (torch.randint(0, 2, x.shape, generator=generator) * 2 - 1).to(x)
            jv = (model(x + fd_step * v, tk).double() - model(x - fd_step * v, tk).double()) / (2 * fd_step)
            diag += (v.double() * ((1 - alpha * p) * v.double() - alpha * q * jv)).mean(0)
        ls.append(diag / probes)
        fs.append(((1 - ls[-1]) / alpha - p) * x.double() - q * out.double())
        scales.append((x.double() / alpha).square().mean(0))
        if k >= 2:  # f' at k - 1 (central) and, once, at 0 (one-sided); at the last point below
            window = (lams[k - 2:k + 1], fs[-3:])
            if k == 2:
                ss[0], bs[0] = _regress(fs[-3], _slope(*window, 0), scales[0])
            ss[k - 1], bs[k - 1] = _regress(fs[-2], _slope(*window, 1), scales[k - 1])
            fs = fs[-3:]
        if k < len(plan.steps):
            step = plan.steps[k]
            x = ops.multistep_update(x, out, step.coeffs, history=history, write_slot=step.write_slot,
                                     read_slots=step.read_slots, check_nan=False, backend=backend)
    ss[-1], bs[-1] = _regress(fs[-1], _slope(lams[-3:], fs[-3:], 2), scales[-1])
    return EMS(torch.tensor(lams, dtype=torch.float64), torch.stack(ls).cpu(), torch.stack(ss).cpu(),
               torch.stack(bs).cpu())
