"""MR Sampler (Li et al. 2025, "MRS: a fast sampler for mean reverting diffusion"): DPM-Solver(++) ODE and SDE
steps of orders 1-3 for mean-reverting (IR-SDE) models, `schedules.MeanReverting`.

With y = (x - mu) / sigma_inf the process is VP (alpha_t, sqrt(1 - alpha_t^2)), so every MRS step is a DPM-Solver
step on y, as the authors' sampler computes it: "data" parameterization = DPM-Solver++ (ODE: orders 1-3, SDE:
orders 1-2), "noise" = DPM-Solver (ODE 1-3, SDE 1-2), the second- and third-order steps in their "heun" form.
The model sees x itself; its output maps to the VP output on y as

    eps: eps;  x0: (x0 - mu) / sigma_inf;  v (x0 = alpha x - (sigma_t / sigma_inf) v + (1 - alpha) mu): v / sigma_inf;
    score (of x): sigma_inf score.

Written back in x, a y-step y' = a y + e o + sum_i b_i m_i + c z becomes the fused update with mu as its read-only
state s: the history keeps m~ = sigma_inf m + k mu (k = p + sigma_inf q delta / kappa, the mu the conversion would
add; m~ = x0 exactly for x0 models), and

    x' = a x + (sigma_inf e / kappa) out + sum_i b_i m~_i + sigma_inf c z + (1 - a - sigma_inf e delta / kappa
         - sum_i b_i k_i) mu,

o = (out - delta mu) / kappa (kappa, delta: 1, 0 for eps; sigma_inf, 1 for x0; sigma_inf, 0 for v; 1 / sigma_inf,
0 for score). x_T = mu + sigma_T z.
"""

from __future__ import annotations

import math

import numpy as np

from ..models import data_coeffs
from ..ops import UpdateCoeffs
from ..schedules import MeanReverting
from .dpm import dpm_steps
from .grid import Grid
from .plan import Plan, Step

PARAMETERIZATIONS = ("data", "noise")
SPACINGS = ("linspace", "linear-lambda")
PREDICTIONS = ("eps", "x0", "v", "score")


def mrs_grid(schedule: MeanReverting, steps: int, spacing: str = "linspace",
             lambda_min: float = -math.inf) -> Grid:
    """steps + 1 times from the largest t with log(alpha_t / sigma_t) >= lambda_min down to t = 0, uniform in t
    ("linspace") or in lambda ("linear-lambda"), as the authors' time schedules; the Grid's sigmas are the VP
    ratios of y (schedule.sigma_ratio), its times float."""
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    n = schedule.num_train_timesteps
    lam = -0.5 * np.log(np.expm1(2 * schedule.theta_bars)) - math.log(schedule.sigma_inf)  # log(alpha / sigma), t = 0..n
    t_max = n - int(np.searchsorted(lam[::-1], lambda_min))
    if t_max < 1:
        raise ValueError(f"lambda_min {lambda_min} clips every timestep of {schedule!r}")
    if spacing == "linspace":
        times = np.linspace(0, t_max, steps + 1)[::-1]
    else:  # uniform lambda, mapped back through theta_bar (piecewise linear in t: exact)
        lams = np.linspace(lam[t_max], lam[0], steps + 1) + math.log(schedule.sigma_inf)
        bars = 0.5 * np.log1p(np.exp(-2 * lams))
        times = np.interp(bars, schedule.theta_bars, np.arange(n + 1))
    times = [float(t) for t in times]
    return Grid(timesteps=tuple(times[:-1]), sigmas=tuple(schedule.sigma_ratio(t) for t in times), discrete=False)


def _output_map(prediction: str, sigma_inf: float) -> tuple[float, float]:
    """(kappa, delta) of the VP output on y, o = (out - delta mu) / kappa."""
    if prediction not in PREDICTIONS:
        raise ValueError(f"solver 'mrs' takes prediction one of {PREDICTIONS}, got {prediction!r}")
    return {"eps": (1.0, 0.0), "x0": (sigma_inf, 1.0), "v": (sigma_inf, 0.0), "score": (1 / sigma_inf, 0.0)}[prediction]


def mrs_plan(schedule: MeanReverting, steps: int, prediction: str, *, order: int = 2, sde: bool = False,
             parameterization: str = "data", spacing: str = "linspace", lambda_min: float = -math.inf,
             lower_order_final: bool = False, denoise_last: bool = False) -> Plan:
    """The MRS Plan: `steps` model calls from x_T = mu + sigma_T z to t = 0. lower_order_final: first order on
    the last step and at most second on the one before for fewer than 15 steps (diffusers' rule; the authors'
    code keeps the full order there from 10 steps on). denoise_last: the last call returns its data
    prediction (the authors' option)."""
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}, got {parameterization!r}")
    if not isinstance(sde, bool):
        raise ValueError(f"sde must be True or False, got {sde!r}")
    if sde and order == 3:
        raise ValueError("the MRS SDE solver has orders 1 and 2, got order=3")
    kappa, delta = _output_map(prediction, schedule.sigma_inf)
    grid = mrs_grid(schedule, steps, spacing, lambda_min)
    algorithm = ("sde-" if sde else "") + ("dpmsolver++" if parameterization == "data" else "dpmsolver")
    y_plan = dpm_steps(grid, prediction, algorithm=algorithm, order=order, solver_type="heun",
                       lower_order_final=lower_order_final, final_sigma_zero=False)
    s_inf = schedule.sigma_inf
    k_slot: dict[int, float] = {}
    plan = []
    for i, step in enumerate(y_plan.steps):
        y = step.coeffs
        if denoise_last and i == len(y_plan.steps) - 1:  # x' = x0 of this call: y' = p y + q o
            p, q = data_coeffs(prediction, *grid.alpha_sigma(i))
            y = UpdateCoeffs(p=y.p, q=y.q, a=p, e=q, b=(0.0,) * len(y.b))
        k_slot[step.write_slot] = y.p + s_inf * y.q * delta / kappa
        reads = (step.write_slot, *step.read_slots)
        g = 1.0 - y.a - s_inf * y.e * delta / kappa - sum(b * k_slot[r] for b, r in zip(y.b, reads))
        coeffs = UpdateCoeffs(p=y.p, q=s_inf * y.q / kappa, a=y.a, e=s_inf * y.e / kappa, b=y.b, c=s_inf * y.c,
                              g=g)
        plan.append(Step(t=step.t, coeffs=coeffs, write_slot=step.write_slot, read_slots=step.read_slots))
    return Plan(steps=tuple(plan), history_slots=y_plan.history_slots, discrete_time=False,
                data_prediction=y_plan.data_prediction, init_scale=schedule.alpha_sigma(grid.timesteps[0])[1],
                uses_state=True, mean_state=True)
