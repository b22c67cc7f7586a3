"""Fitting DC-Solver's compensation ratios (Zhao et al. 2024) from reference trajectories.

For each step i >= dc_order (earlier steps have too few predictions to interpolate), with the earlier ratios
fixed, the ratio is chosen so that after step i (compensated prediction, predictor) and the corrector of step
i + 1, the sample is closest (mean squared error) to a fine reference trajectory at t_{i+1}: the authors'
objective. The authors minimise it with 20 AdamW steps through autograd; here the coefficient math is host
float64, so a derivative-free golden-section search over [lo, hi] does it (`evals` model calls per step), and
ratio 1 (no compensation) is kept when nothing beats it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch

from .. import ops
from ..sample import run_plan
from ..schedules import VP
from .unipc import unipc_plan


def _reference_states(model, x_T, schedule: VP, prediction: str, times: list[int], steps: int) -> dict[int, torch.Tensor]:
    """The states of a `steps`-step DDIM run (trailing spacing: every training timestep is on it when
    steps = num_train_timesteps) at the requested timesteps, from the same x_T."""
    from .ddim import ddim_plan

    plan = ddim_plan(schedule, steps, prediction, timestep_spacing="trailing")
    wanted, states = set(times), {}
    x = x_T
    for i, step in enumerate(plan.steps):
        if step.t in wanted:
            states[step.t] = x
        out = model(x, torch.tensor(step.t, device=x.device))
        x = ops.multistep_update(x, out, step.coeffs, check_nan=False)
    missing = wanted - set(states) - {0}
    if missing:
        raise ValueError(f"the reference run has no state at timesteps {sorted(missing)}")
    states[0] = x  # the end of the run
    return states


def fit_dc_ratios(model: Callable, x_T: torch.Tensor, schedule: VP, steps: int, *, prediction: str = "eps",
                  dc_order: int = 2, lo: float = 0.5, hi: float = 1.5, evals: int = 16,
                  reference_steps: int | None = None, **unipc_options) -> list[float]:
    """One ratio per step for `unipc_plan(..., dc_ratios=...)`, fitted on the samples x_T (use a few, and not
    the seeds you evaluate on). The reference is a DDIM run over every training timestep by default."""
    n_train = schedule.num_train_timesteps
    plan = unipc_plan(schedule, steps, prediction, dc_order=dc_order, **unipc_options)
    times = [s.t for s in plan.steps]
    targets = _reference_states(model, x_T, schedule, prediction, times[1:],
                                reference_steps or n_train)
    ratios = [1.0] * steps

    def run_to(i: int, ratio_i: float):
        """x_c after step i with ratio_i and the corrector of step i + 1 (from scratch: exact and simple)."""
        trial = ratios[:i] + [ratio_i] + [1.0] * (steps - i - 1)
        p = unipc_plan(schedule, steps, prediction, dc_order=dc_order, dc_ratios=trial, **unipc_options)
        head = dataclasses.replace(p, steps=p.steps[:i + 2])
        _, corrected = run_plan(model, x_T, head, check_nan=False, return_state=True)
        return corrected  # the state after step i + 1 is its corrected sample

    for i in range(dc_order, steps - 1):
        target = targets[times[i + 1]]
        loss = lambda r: torch.mean((run_to(i, r) - target) ** 2).item()
        best_r, best = 1.0, loss(1.0)
        a, b = lo, hi
        golden = (math.sqrt(5) - 1) / 2
        c, d = b - golden * (b - a), a + golden * (b - a)
        fc, fd = loss(c), loss(d)
        for _ in range(max(evals - 3, 0)):
            if fc < fd:
                b, d, fd = d, c, fc
                c = b - golden * (b - a)
                fc = loss(c)
            else:
                a, c, fc = c, d, fd
                d = a + golden * (b - a)
                fd = loss(d)
        r, f = (c, fc) if fc < fd else (d, fd)
        ratios[i] = r if f < best else best_r
    return ratios
