"""Solvers: host-side float64 coefficient math that turns a schedule into a Plan of fused updates.

SOLVERS holds one SolverSpec per solver name; make_plan, sample()'s defaults and describe() read it.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Callable, Mapping

from .. import checks
from ..models import check_prediction
from ..schedules import EDM, VP, Flow, MeanReverting, VPContinuous
from .ancestral import dpm2_plan, dpmpp_2s_ancestral_plan, euler_ancestral_plan
from .ddim import ddim_plan
from .deis import deis_plan, deis_steps
from .consistency import lcm_plan, tcd_plan
from .dpm import dpm_plan, dpm_steps, flow_dpm_plan
from .dpmv3 import EMS, dpmv3_plan, dpmv3_steps, fit_ems
from .euler import euler_grid_plan, euler_plan, flow_euler_plan
from .flow_sde import flow_sde_plan
from .explicit import ExplicitVP, explicit_schedule, vp_grid
from .grid import Grid, continuous_grid
from .heun import edm_euler_plan, heun_plan
from .lms import lms_plan
from .momentum import ghvb_plan, ghvb_steps
from .mrs import mrs_plan
from .pndm import pndm_plan
from .timeshift import TimeShift
from .unipc import unipc_plan, unipc_steps
from .plan import Plan, Step
from .res import er_sde_plan, res_multistep_plan
from .restart import restart_plan
from .sa_solver import sa_plan, sa_steps
from . import usf


@dataclass(frozen=True)
class SolverSpec:
    """One solver name: its Plan builder per schedule type, and the options the name presets.

    plans: schedule type -> builder(schedule, steps, prediction, **options).
    grid_steps: builder(grid, prediction, **options) over a continuous_grid, for VPContinuous schedules (None:
        the solver does not run on them); grid_final: where that grid ends ("zero": sigma = 0, "eps": t = eps).
    presets: options every builder of the name gets (keyword arguments of sample() override them).
    explicit_vp: the VP builder reads a sigmas= list (an ExplicitVP schedule); else such a list runs on the
        Grid builders.
    """

    about: str
    plans: Mapping[type, Callable[..., Plan]]
    grid_steps: Callable[..., Plan] | None = None
    grid_final: str = "zero"
    presets: Mapping[str, object] = field(default_factory=dict)
    explicit_vp: bool = False  # its VP builder takes sigmas= lists itself (solvers.explicit.ExplicitVP)

    @property
    def schedules(self) -> tuple[type, ...]:
        """The schedule types the solver runs on."""
        kinds = tuple(k for k in self.plans if k is not Grid)
        return kinds + ((VPContinuous,) if self.grid_steps is not None else ())

    def default_schedule(self):
        """Flow() for the flow solvers, EDM() for those that run on EDM only, MeanReverting() for mrs, else
        VP.scaled_linear()."""
        first = next(iter(self.plans))
        return {Flow: Flow, EDM: EDM, MeanReverting: MeanReverting}.get(first, VP.scaled_linear)()

    @staticmethod
    def default_prediction(schedule) -> str:
        """"flow" on a Flow schedule, "x0" (a denoiser) on an EDM one, else "eps"."""
        return "flow" if isinstance(schedule, Flow) else ("x0" if isinstance(schedule, EDM) else "eps")

    def options(self) -> list[str]:
        """The keyword options of the solver's plan builders, presets excluded (on VPContinuous also
        spacing="logsnr" | "time" and final="zero" | "eps", the grid's)."""
        names = set()
        for build in self.plans.values():
            params = inspect.signature(build).parameters.values()
            names |= {p.name for p in params if p.kind == p.KEYWORD_ONLY}
        return sorted(names - set(self.presets))


def _dpm(algorithm: str, order: int, about: str) -> SolverSpec:
    """A DPM-Solver name; the noise-prediction ones (dpmsolver) end at a sigma > 0 (sigma_min, t = eps)."""
    return SolverSpec(about, {VP: dpm_plan}, dpm_steps, grid_final="zero" if algorithm.endswith("++") else "eps",
                      presets=dict(algorithm=algorithm, order=order))


SOLVERS: dict[str, SolverSpec] = {
    "ddim": SolverSpec("DDIM, as diffusers' DDIMScheduler (eta > 0: stochastic)", {VP: ddim_plan},
                       functools.partial(dpm_steps, algorithm="dpmsolver++", order=1)),
    "dpmpp_2m": _dpm("dpmsolver++", 2, "DPM-Solver++(2M), data prediction (DPMSolverMultistepScheduler)"),
    "dpmpp_3m": _dpm("dpmsolver++", 3, "DPM-Solver++(3M)"),
    "dpmpp_2m_sde": _dpm("sde-dpmsolver++", 2, "SDE-DPM-Solver++(2M), draws noise every step"),
    "dpmpp_3m_sde": _dpm("sde-dpmsolver++", 3, "SDE-DPM-Solver++(3M)"),
    "dpm_2m": _dpm("dpmsolver", 2, "DPM-Solver(2M), noise prediction; ends at sigma_min"),
    "dpm_3m": _dpm("dpmsolver", 3, "DPM-Solver(3M), noise prediction; ends at sigma_min"),
    "unipc": SolverSpec("UniPC predictor-corrector (UniPCMultistepScheduler); DC-Solver with dc_ratios",
                        {VP: unipc_plan}, unipc_steps),
    "deis": SolverSpec("DEIS log-rho multistep (DEISMultistepScheduler); ends at a sigma > 0", {VP: deis_plan},
                       deis_steps, grid_final="eps"),
    "sa_solver": SolverSpec("SA-Solver stochastic Adams predictor-corrector (SASolverScheduler), tau: the "
                            "stochasticity (0: the ODE); ends at a sigma > 0", {VP: sa_plan}, sa_steps,
                            grid_final="eps"),
    "ghvb": SolverSpec("generalized heavy-ball momentum (GHVB), order - 1 + beta", {VP: ghvb_plan}, ghvb_steps),
    "euler": SolverSpec("Euler in the VE scale: EulerDiscreteScheduler on VP, Karras' Euler on EDM",
                        {VP: euler_plan, EDM: edm_euler_plan, Grid: euler_grid_plan}),
    "lms": SolverSpec("linear multistep in sigma, order 1-4: LMSDiscreteScheduler on VP, k-diffusion's sample_lms on "
                      "EDM and (CONST) Flow", {VP: lms_plan, EDM: lms_plan, Flow: lms_plan, Grid: lms_plan}),
    "pndm": SolverSpec("PNDM (PNDMScheduler): PLMS with skip_prk_steps (steps + 1 model calls), else a pseudo "
                       "Runge-Kutta warm-up (steps + 9)", {VP: pndm_plan}, explicit_vp=True),
    "heun": SolverSpec("Karras et al.'s Heun (2 model calls per step but the last)", {EDM: heun_plan}),
    "euler_ancestral": SolverSpec("ancestral Euler (eta, s_noise): EulerAncestralDiscreteScheduler on VP, "
                                  "k-diffusion's on EDM, ComfyUI's RF variant on Flow",
                                  {VP: euler_ancestral_plan, EDM: euler_ancestral_plan, Flow: euler_ancestral_plan},
                                  explicit_vp=True),
    "dpm_2": SolverSpec("DPM-2, midpoint in log sigma (2 model calls per step but the last): KDPM2DiscreteScheduler "
                        "on VP, k-diffusion's sample_dpm_2 on EDM and (CONST) Flow",
                        {VP: dpm2_plan, EDM: dpm2_plan, Flow: dpm2_plan},
                        explicit_vp=True),
    "dpmpp_2s_ancestral": SolverSpec("ancestral DPM-Solver++(2S) (eta, s_noise; 2 model calls per step but the "
                                     "last): k-diffusion's on VP / EDM, ComfyUI's RF variant on Flow",
                                     {VP: dpmpp_2s_ancestral_plan, EDM: dpmpp_2s_ancestral_plan,
                                      Flow: dpmpp_2s_ancestral_plan}, explicit_vp=True),
    "flow_euler": SolverSpec("flow-matching Euler (FlowMatchEulerDiscreteScheduler)", {Flow: flow_euler_plan}),
    "flow_dpmpp_2m": SolverSpec("DPM-Solver++(2M) on flow sigmas", {Flow: flow_dpm_plan}),
    "flow_sde": SolverSpec("SiT's SDE sampler of flow models (diffusion form w(t), Euler-Maruyama or stochastic "
                           "Heun, last step mean / tweedie / euler)", {Flow: flow_sde_plan}),
    "lcm": SolverSpec("LCM multistep sampling of a latent consistency model (LCMScheduler); renoises every step",
                      {VP: lcm_plan}, explicit_vp=True),
    "tcd": SolverSpec("TCD strategic stochastic sampling (TCDScheduler), gamma: the stochasticity (0: deterministic)",
                      {VP: tcd_plan}, explicit_vp=True),
    "res_multistep": SolverSpec("RES second-order exponential multistep in the VE scale (ComfyUI's res_multistep; on "
                                "Flow its CONST form); eta > 0: its ancestral variant",
                                {VP: res_multistep_plan, EDM: res_multistep_plan, Flow: res_multistep_plan,
                                 Grid: res_multistep_plan}),
    "er_sde": SolverSpec("ER-SDE-Solver-3 (extended reverse-time SDE, ComfyUI's er_sde); on Flow its CONST form",
                         {VP: er_sde_plan, EDM: er_sde_plan, Flow: er_sde_plan, Grid: er_sde_plan}),
    "restart": SolverSpec("Restart sampling (Heun with re-noising jumps t_min -> t_max, K times), its authors' "
                          "default restart for >= 20 steps; on VP the Euler grid in the VE scale",
                          {EDM: restart_plan, VP: restart_plan}, explicit_vp=True),
    "mrs": SolverSpec("MR Sampler for mean-reverting (IR-SDE) models: DPM-Solver(++) ODE (order 1-3) or SDE (sde=True, "
                      "1-2) steps on x - mu; needs mu= (the condition) and a MeanReverting schedule",
                      {MeanReverting: mrs_plan}),
    "dpmv3": SolverSpec("DPM-Solver-v3: needs ems (fit_ems or EMS.constant); ends at sigma_min / eps",
                        {VP: dpmv3_plan}, dpmv3_steps, grid_final="eps"),
}


def solver_spec(solver: str) -> SolverSpec:
    if not isinstance(solver, str) or solver not in SOLVERS:
        raise ValueError(f"solver must be one of {sorted(SOLVERS)}, got {solver!r} (or a diffsampler.solvers.usf.Plan "
                         "object)")
    return SOLVERS[solver]


def describe() -> str:
    """One line per solver: name, schedule types, description, options (VPContinuous adds spacing, final)."""
    lines = []
    for name, spec in SOLVERS.items():
        kinds = "/".join(t.__name__ for t in spec.schedules)
        lines.append(f"{name:<20}{kinds:<18}{spec.about}; options: {', '.join(spec.options()) or 'none'}")
    return "\n".join(lines)


def make_plan(solver: str, schedule, steps: int, prediction: str, **options) -> Plan:
    """The Plan of `solver` on `schedule` with `steps` model calls; options are the solver's keywords (sigmas= a
    list: solvers.explicit; on VP it runs on the list's Grid unless the solver's VP builder takes it). A
    usf.Plan carries its own grid: schedule and steps are not used, and it takes no options."""
    if isinstance(solver, usf.Plan):
        if options:
            raise ValueError(f"a usf.Plan takes no solver options (its StepSpecs hold them), got {sorted(options)}")
        check_prediction(prediction)
        return solver.to_plan(prediction)
    spec = solver_spec(solver)
    explicit = options.get("sigmas")
    if explicit is not None and not isinstance(explicit, str):
        options = {k: v for k, v in options.items() if k != "sigmas"}
        schedule, steps = explicit_schedule(schedule, explicit, steps)
        if isinstance(schedule, ExplicitVP) and not spec.explicit_vp:
            schedule = vp_grid(schedule, schedule.explicit)
    if isinstance(schedule, Grid):
        if Grid not in spec.plans and spec.grid_steps is None:
            takes = ", ".join(n for n, s in SOLVERS.items() if Grid in s.plans or s.grid_steps or s.explicit_vp)
            raise ValueError(f"solver {solver!r} does not take sigmas= a list on a VP schedule (it runs on its own "
                             f"grid); solvers that do: {takes}")
    elif not isinstance(schedule, spec.schedules):
        names = " or ".join(f"diffsampler.schedules.{w.__name__}" for w in spec.schedules)
        raise ValueError(f"solver {solver!r} needs a {names} schedule (VP.linear(), VP.scaled_linear(), "
                         f"VP.cosine(), VP(betas), VPContinuous(), Flow(shift), EDM()), got {schedule!r}")
    steps = checks.integer("steps", steps, 1)
    options = checks.solver_options(options)
    order = options.get("order")
    if order is not None and order > steps:
        raise ValueError(f"order {order} needs at least {order} steps, got steps={steps}")
    check_prediction(prediction)
    options = {**spec.presets, **options}
    try:
        if isinstance(schedule, VPContinuous):
            schedule = continuous_grid(schedule, steps, options.pop("spacing", "logsnr"),
                                       options.pop("final", spec.grid_final))
        if isinstance(schedule, Grid) and Grid not in spec.plans:
            return spec.grid_steps(schedule, prediction, **options)
        build = next(b for kind, b in spec.plans.items() if isinstance(schedule, kind))
        return build(schedule, steps, prediction, **options)
    except TypeError as err:  # an option the solver does not take
        raise ValueError(f"solver {solver!r}: {err}") from None


def steps_for_nfe(solver: str, schedule, nfe: int, prediction: str, **options) -> int:
    """The most steps whose plan makes at most `nfe` model calls (a Plan has one Step per call: the two-call
    solvers take about nfe / 2 steps)."""
    nfe = checks.integer("nfe", nfe, 1)
    for steps in range(nfe, 0, -1):
        try:
            if len(make_plan(solver, schedule, steps, prediction, **options).steps) <= nfe:
                return steps
        except ValueError:
            continue
    raise ValueError(f"solver {solver!r} has no plan of at most {nfe} model calls with these options")


__all__ = ["SOLVERS", "SolverSpec", "solver_spec", "describe", "steps_for_nfe", "Plan", "Step", "Grid", "make_plan",
           "ddim_plan", "dpm_plan", "euler_plan", "flow_euler_plan", "unipc_plan", "deis_plan", "dpm_steps",
           "unipc_steps", "deis_steps", "ghvb_plan", "ghvb_steps", "heun_plan", "edm_euler_plan", "TimeShift", "EMS",
           "fit_ems", "dpmv3_plan", "dpmv3_steps", "continuous_grid", "lcm_plan", "tcd_plan", "res_multistep_plan",
           "er_sde_plan", "euler_ancestral_plan", "dpm2_plan", "dpmpp_2s_ancestral_plan", "lms_plan", "pndm_plan",
           "restart_plan", "sa_plan", "sa_steps", "flow_sde_plan", "usf"]
