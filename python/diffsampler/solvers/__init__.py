"""Solvers: host-side float64 coefficient math that turns a schedule into a Plan of fused updates."""

from __future__ import annotations

import functools
from typing import Callable

from .. import checks
from ..models import check_prediction
from ..schedules import EDM, VP, Flow, VPContinuous
from .ddim import ddim_plan
from .deis import deis_plan, deis_steps
from .dpm import dpm_plan, dpm_steps, flow_dpm_plan
from .dpmv3 import EMS, dpmv3_plan, dpmv3_steps, fit_ems
from .euler import euler_plan, flow_euler_plan
from .grid import Grid, continuous_grid
from .heun import edm_euler_plan, heun_plan
from .momentum import ghvb_plan, ghvb_steps
from .timeshift import TimeShift
from .unipc import unipc_plan, unipc_steps
from .plan import Plan, Step

SOLVERS: dict[str, Callable[..., Plan]] = {
    "ddim": ddim_plan,
    "dpmpp_2m": functools.partial(dpm_plan, algorithm="dpmsolver++", order=2),
    "dpmpp_3m": functools.partial(dpm_plan, algorithm="dpmsolver++", order=3),
    "dpmpp_2m_sde": functools.partial(dpm_plan, algorithm="sde-dpmsolver++", order=2),
    "dpmpp_3m_sde": functools.partial(dpm_plan, algorithm="sde-dpmsolver++", order=3),
    "dpm_2m": functools.partial(dpm_plan, algorithm="dpmsolver", order=2, final_sigmas_type="sigma_min"),
    "dpm_3m": functools.partial(dpm_plan, algorithm="dpmsolver", order=3, final_sigmas_type="sigma_min"),
    "unipc": unipc_plan,
    "deis": deis_plan,
    "ghvb": ghvb_plan,
    "euler": euler_plan,
    "heun": heun_plan,
    "flow_euler": flow_euler_plan,
    "flow_dpmpp_2m": flow_dpm_plan,
    "dpmv3": dpmv3_plan,
}
FLOW_SOLVERS = ("flow_euler", "flow_dpmpp_2m")
# the schedule types each solver runs on (VP for the others); euler on an EDM schedule is Karras' Euler
SCHEDULES = {"flow_euler": (Flow,), "flow_dpmpp_2m": (Flow,), "heun": (EDM,), "euler": (VP, EDM)}
# the solvers that also run on a VPContinuous schedule: their Grid-level step functions and fixed options
CONTINUOUS = {
    "ddim": (dpm_steps, dict(algorithm="dpmsolver++", order=1)),
    "dpmpp_2m": (dpm_steps, dict(algorithm="dpmsolver++", order=2)),
    "dpmpp_3m": (dpm_steps, dict(algorithm="dpmsolver++", order=3)),
    "dpmpp_2m_sde": (dpm_steps, dict(algorithm="sde-dpmsolver++", order=2)),
    "dpmpp_3m_sde": (dpm_steps, dict(algorithm="sde-dpmsolver++", order=3)),
    "unipc": (unipc_steps, {}),
    "deis": (deis_steps, {}),
    "ghvb": (ghvb_steps, {}),
    "dpmv3": (dpmv3_steps, {}),
}


def make_plan(solver: str, schedule, steps: int, prediction: str, **options) -> Plan:
    """The Plan of `solver` on `schedule` with `steps` model calls; options are the solver's keywords."""
    if not isinstance(solver, str) or solver not in SOLVERS:
        raise ValueError(f"solver must be one of {sorted(SOLVERS)}, got {solver!r}")
    want = SCHEDULES.get(solver, (VP,)) + ((VPContinuous,) if solver in CONTINUOUS else ())
    if not isinstance(schedule, want):
        names = " or ".join(f"diffsampler.schedules.{w.__name__}" for w in want)
        raise ValueError(f"solver {solver!r} needs a {names} schedule (VP.linear(), VP.scaled_linear(), "
                         f"VP.cosine(), VP(betas), VPContinuous(), Flow(shift), EDM()), got {schedule!r}")
    steps = checks.integer("steps", steps, 1)
    options = checks.solver_options(options)
    order = options.get("order")
    if order is not None and order > steps:
        raise ValueError(f"order {order} needs at least {order} steps, got steps={steps}")
    check_prediction(prediction)
    try:
        if isinstance(schedule, VPContinuous):
            steps_fn, fixed = CONTINUOUS[solver]
            spacing = options.pop("spacing", "logsnr")
            final = options.pop("final", "eps" if steps_fn in (deis_steps, dpmv3_steps) else "zero")
            if steps_fn is dpm_steps:
                options.setdefault("final_sigma_zero", final == "zero")
            return steps_fn(continuous_grid(schedule, steps, spacing, final), prediction, **fixed, **options)
        if solver == "euler" and isinstance(schedule, EDM):
            return edm_euler_plan(schedule, steps, prediction, **options)
        return SOLVERS[solver](schedule, steps, prediction, **options)
    except TypeError as err:  # an option the solver does not take
        raise ValueError(f"solver {solver!r}: {err}") from None


__all__ = ["SOLVERS", "Plan", "Step", "Grid", "make_plan", "ddim_plan", "dpm_plan", "euler_plan", "flow_euler_plan",
           "unipc_plan", "deis_plan", "dpm_steps", "unipc_steps", "deis_steps", "ghvb_plan", "ghvb_steps",
           "heun_plan", "edm_euler_plan", "TimeShift", "EMS", "fit_ems", "dpmv3_plan", "dpmv3_steps",
           "continuous_grid"]
