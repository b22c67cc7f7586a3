"""The sampling loop: one model call and one fused update per step."""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from . import checks, error_flags, ops
from .solvers import FLOW_SOLVERS, Plan, make_plan


def sample(
    model: Callable[..., torch.Tensor],
    x: torch.Tensor,
    steps: int = 20,
    solver: str = "dpmpp_2m",
    schedule=None,
    prediction: str | None = None,
    *,
    generator: torch.Generator | None = None,
    progress: bool = False,
    backend: str = "auto",
    clip: float | None = None,
    threshold_ratio: float | None = None,
    threshold_max: float = 1.0,
    check_nan: bool = True,
    time_shift=None,
    lml=None,
    cuda_graph: bool | str = False,
    **solver_options,
) -> torch.Tensor:
    """Integrate from x (pure noise at the first timestep) to a sample, calling ``model(x, t)`` once per step.

    model: any callable ``model(x, t) -> tensor`` of x's shape; t is a 0-dim tensor on x's device (int64
        training timesteps for discrete VP schedules, as diffusers passes them).
    x: standard normal noise; solvers that integrate in the VE scale (euler) multiply it by their
        init_noise_sigma first, as diffusers pipelines do.
    schedule: a ``diffsampler.schedules.VP`` (default: ``VP.scaled_linear()``, Stable Diffusion's), a
        ``VPContinuous()`` (continuous-time linear VP, the model gets t in [eps, 1]; options spacing="logsnr" |
        "time", final="zero" | "eps"; the multistep solvers), a ``Flow`` for the flow solvers, an ``EDM()``
        for heun / euler.
    prediction: what the model returns: "eps" | "x0" | "v" | "flow" | "score" (default "eps", "flow" for the
        flow solvers).
    solver: "ddim" (options eta, timestep_spacing="leading", steps_offset, set_alpha_to_one); the DPM-Solver
        family "dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "dpmpp_3m_sde" (data prediction) and "dpm_2m", "dpm_3m"
        (noise prediction) with options solver_type="midpoint"|"heun", timestep_spacing="linspace",
        sigmas="default"|"karras"|"exponential"|"beta"|"lu", final_sigmas_type="zero"|"sigma_min",
        lower_order_final=True, euler_at_final, steps_offset. Defaults are those of diffusers'
        DDIMScheduler / DPMSolverMultistepScheduler. "euler" (EulerDiscreteScheduler: options timestep_spacing,
        sigmas, final_sigmas_type; model input x / sqrt(sigma^2 + 1)); "flow_euler"
        (FlowMatchEulerDiscreteScheduler, prediction "flow", the schedule's shift); "heun" (Karras et al.'s
        2nd-order Heun on a ``schedules.EDM()``, 2 model calls per step but the last; the model gets sigma and
        returns the denoised x0 by default); "euler" on an EDM schedule is Karras' Euler. "dpmv3"
        (DPM-Solver-v3, VP / VPContinuous: option ems, required, from solvers.dpmv3.fit_ems or EMS.constant;
        order, predictor_pseudo, corrector, corrector_pseudo, lower_order_final; ends at sigma_min / eps).
    clip / threshold_ratio, threshold_max: clamp the data prediction to [-clip, clip], or dynamic thresholding.
    generator: the torch.Generator of the noise of stochastic steps (DDIM with eta > 0, the SDE solvers).
    check_nan: raise ValueError, naming the step and its time, when the model returns NaN or inf (a host sync
        per step; off for speed).
    time_shift: a ``diffsampler.solvers.TimeShift(window, cutoff)``: query the model at the timestep whose
        noise variance matches each sample's (TS-DPM); discrete VP schedules.
    lml: a ``diffsampler.LML(damping, kappa, rank, freeze)``: precondition each step's direction with the
        damped low-rank Hessian approximation of Levenberg-Marquardt-Langevin (diffsampler.lml); no extra
        model call, one extra read-only pass per step. Not with thresholding.
    cuda_graph: True or "loop": capture the whole loop (model included) in a CUDA graph and replay it; "step":
        capture one step and replay it per step, its coefficients read by step index on the device
        (diffsampler.graphs; no NaN check, noise from the default generator); eager with a logged reason where
        it cannot.
    """
    checks.model(model)
    checks.sample_tensor(x)
    checks.sampling_options(clip, threshold_ratio, threshold_max, check_nan, generator)
    options = dict(time_shift=time_shift, lml=lml, clip=clip, threshold_ratio=threshold_ratio, threshold_max=threshold_max,
                   backend=backend, **solver_options)
    if cuda_graph:
        from .graphs import CapturedSampler

        if generator is not None:
            raise ValueError("cuda_graph=True draws noise from the default CUDA generator; generator must be None")
        capture = "loop" if cuda_graph is True else cuda_graph
        return CapturedSampler(model, steps, solver, schedule, prediction, capture=capture, **options)(x)
    model, plan, options = prepare(model, steps, solver, schedule, prediction, dict(options, check_nan=check_nan))
    return run_plan(model, x, plan, generator=generator, progress=progress, desc=f"diffsampler {solver}",
                    **options)


UPDATE_OPTIONS = ("clip", "threshold_ratio", "threshold_max", "check_nan", "backend", "lml")


def prepare(model, steps, solver, schedule, prediction, options: dict):
    """(model, Plan, update options) of a sample() call: defaults, the plan, the checks, the time shift.
    `options` holds sample()'s keywords; those that are not update options go to the solver."""
    from .schedules import EDM, VP, Flow

    options = dict(options)
    update = {k: options.pop(k) for k in UPDATE_OPTIONS if k in options}
    time_shift = options.pop("time_shift", None)
    options.pop("generator", None)
    flow = solver in FLOW_SOLVERS
    if schedule is None:
        schedule = Flow() if flow else (EDM() if solver == "heun" else VP.scaled_linear())
    if prediction is None:
        prediction = "flow" if flow else ("x0" if isinstance(schedule, EDM) else "eps")
    plan = make_plan(solver, schedule, steps, prediction, **options)
    if time_shift is not None:
        from .solvers import TimeShift

        if not isinstance(time_shift, TimeShift):
            raise ValueError(f"time_shift must be a diffsampler.solvers.TimeShift, got {type(time_shift).__name__}")
        if not plan.discrete_time:
            raise ValueError(f"time_shift needs integer training timesteps; solver {solver!r} has none")
        model = time_shift.wrap(model, schedule)
    if (update.get("clip") or update.get("threshold_ratio") is not None) and not plan.data_prediction:
        raise ValueError(f"clip / threshold_ratio act on a data prediction; solver {solver!r} keeps noise predictions")
    if update.get("lml") is not None:
        from .lml import LML

        if not isinstance(update["lml"], LML):
            raise ValueError(f"lml must be a diffsampler.LML, got {type(update['lml']).__name__}")
        if update.get("threshold_ratio") is not None:
            raise ValueError("lml does not combine with threshold_ratio (dynamic thresholding): its Gram pass "
                             "would need the per-sample quantile first")
        update["lml_time_scale"] = getattr(schedule, "num_train_timesteps", None)
        update["lml_schedule"], update["lml_prediction"] = schedule, prediction
    else:
        update.pop("lml", None)
    return model, plan, update


def model_times(plan: Plan, x: torch.Tensor) -> torch.Tensor:
    """The model times of a Plan as one tensor on x's device (int64 for discrete ones; float32, or float64 for
    float64 x, otherwise): uploaded once, indexed per step without a sync."""
    t_dtype = torch.int64 if plan.discrete_time else (torch.float64 if x.dtype == torch.float64 else torch.float32)
    return torch.tensor(plan.timesteps, dtype=t_dtype, device=x.device)


def run_plan(model: Callable[..., torch.Tensor], x: torch.Tensor, plan: Plan, *,
             generator: torch.Generator | None = None, progress: bool = False, desc: str = "diffsampler",
             return_state: bool = False, times: torch.Tensor | None = None, ranges: bool = False,
             tensor_coeffs: list | None = None, lml=None, lml_time_scale: float | None = None, lml_schedule=None,
             lml_prediction: str = "eps", **update_options):
    """The loop of any Plan: per step, out = model(input_scale * x, t) and one fused update.

    update_options go to every ops.multistep_update call (clip, threshold_ratio, threshold_max, backend);
    check_nan (default True) checks every model output: x's shape, finite (checks.model_output).
    Continuous model times are float32 (float64 when x is float64); discrete ones int64.
    return_state: return (x, the solver's state tensor or None), e.g. UniPC's last corrected sample.
    times: model_times(plan, x) made beforehand (a CUDA-graph capture cannot upload them); tensor_coeffs:
    plan.upload_tensor_coeffs(x) likewise (DPM-Solver-v3's per-step coefficient tensors).
    ranges: name each model call and update for profilers (torch.profiler ranges, NVTX on CUDA).
    lml: a diffsampler.LML applied to every step (lml_time_scale: the T of its freeze option, default the
        largest model time of the plan; lml_schedule and
        lml_prediction: the schedule and model output of its corrector mode).
    """
    checks.model(model)
    checks.sample_tensor(x)
    check_nan = checks.flag("check_nan", update_options.pop("check_nan", True))
    plan.check_defined()
    history = x.new_empty((plan.history_slots, *x.shape)) if plan.history_slots else None
    state = torch.zeros_like(x) if plan.uses_state else None
    if plan.init_scale != 1.0:
        x = x * plan.init_scale
    times = model_times(plan, x) if times is None else times
    tensor_coeffs = plan.upload_tensor_coeffs(x) if tensor_coeffs is None else tensor_coeffs
    if tensor_coeffs is not None and (update_options.get("clip") or update_options.get("threshold_ratio") is not None):
        raise ValueError("clip / threshold_ratio act on a data prediction; this plan's steps (ems_update) keep none")
    steps_iter = plan.steps
    if progress:
        from tqdm.auto import tqdm

        steps_iter = tqdm(steps_iter, desc=desc, total=len(plan.steps))
    phase = _Ranges(x.is_cuda) if ranges else None
    if lml is not None:
        from .lml import LMLRun

        lml_run = LMLRun(lml, plan, x, lml_time_scale, lml_schedule, lml_prediction)
    for i, step in enumerate(steps_iter):
        if lml is not None and lml_run.corrector:
            with phase(f"step {i} corrector") if phase else contextlib.nullcontext():
                x = lml_run.correct(i, step, x, model, times[i], generator, update_options.get("backend", "auto"))
        with phase(f"step {i} model") if phase else contextlib.nullcontext():
            out = model(x * step.input_scale if step.input_scale != 1.0 else x, times[i])
            if check_nan:
                checks.model_output(out, x, i, step.t)
        with phase(f"step {i} update") if phase else contextlib.nullcontext():
            noise = None
            if step.needs_noise:
                # drawn in float32 as diffusers does, so a seed gives the same noise in every storage dtype
                noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32).to(x.dtype)
            if tensor_coeffs is not None and tensor_coeffs[i] is not None:  # DPM-Solver-v3
                x = ops.ems_update(x, out, tensor_coeffs[i], history=history, write_slot=step.write_slot,
                                   read_slots=step.read_slots, state=state, check_nan=False,
                                   **{k: update_options[k] for k in ("backend",) if k in update_options})
            else:
                extra = {}
                if lml is not None:
                    extra = lml_run.update_args(i, step, x, out, history, update_options.get("clip"),
                                                update_options.get("backend", "auto"))
                x = ops.multistep_update(x, out, step.coeffs, history=history, write_slot=step.write_slot,
                                         read_slots=step.read_slots, noise=noise, state=state, **extra,
                                         check_nan=False, **update_options)
    return (x, state) if return_state else x


class IndexedLoop:
    """A Plan whose every step is the same code, for per-step CUDA-graph capture: the model time, the input
    scale and the update's coefficients and history slots are read by a step counter on the device
    (ops.step_table, ops.multistep_update_indexed), so one captured step replays for every step.

    ``loop = IndexedLoop(plan, x)``; ``loop.reset()``; then ``x = loop.step(model, x)`` once per step. It
    launches the model, one gather of the time (one more for the input scale where a step has one), one noise
    draw per step where any step is stochastic, the update and the counter increment. Not for LML, thresholding
    or DPM-Solver-v3 (their steps differ in kind). The numbers are those of run_plan: bitwise on the C++ CPU
    and CUDA backends in float32 for deterministic solvers (a step with fewer history reads adds zero-weighted
    reads of zeros); for stochastic ones as long as the steps that draw noise are the same (they are when only
    the last step is deterministic, as with a final sigma of 0)."""

    def __init__(self, plan: Plan, x: torch.Tensor, *, clip: float | None = None, backend: str = "auto"):
        plan.check_defined()
        if any(s.coeffs is None or s.tensor_coeffs is not None for s in plan.steps):
            raise ValueError("IndexedLoop: the plan has DPM-Solver-v3 steps (ems_update), which are not indexed")
        self.plan, self.clip, self.backend = plan, clip, backend
        self.table = ops.step_table([s.coeffs for s in plan.steps], [s.write_slot for s in plan.steps],
                                    [s.read_slots for s in plan.steps], plan.history_slots, plan.uses_state,
                                    x.device)
        self.times = model_times(plan, x)
        scales = [s.input_scale for s in plan.steps]
        opmath = torch.float64 if x.dtype == torch.float64 else torch.float32  # as x * a Python float computes
        self.scales = None if all(v == 1.0 for v in scales) else torch.tensor(scales, dtype=opmath, device=x.device)
        self.noisy = any(s.needs_noise for s in plan.steps)
        shape = tuple(x.shape)
        self.history = x.new_zeros((plan.history_slots, *shape)) if plan.history_slots else None
        self.state = x.new_zeros(shape) if plan.uses_state else None
        self.counter = torch.zeros(1, dtype=torch.int64, device=x.device)
        self.status = error_flags.new(x.device)  # set by a step the op had to clamp (check reads it)
        self.taken = 0  # the counter's host mirror (eager calls of step; a graph replays without it)

    def reset(self) -> None:
        """Back to step 0: zero history and state (reads without weight must read finite values)."""
        for t in (self.history, self.state, self.counter):
            if t is not None:
                t.zero_()
        self.taken = 0

    def step(self, model: Callable[..., torch.Tensor], x: torch.Tensor,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """One step at the counter's index: out = model(input_scale x, t), the update; the counter advances."""
        if self.taken >= len(self.plan.steps):
            raise ValueError(f"IndexedLoop: all {len(self.plan.steps)} steps were taken; call reset() first")
        self.taken += 1
        t = self.times.index_select(0, self.counter).view(())
        inp = x
        if self.scales is not None:
            inp = (x.to(self.scales.dtype) * self.scales.index_select(0, self.counter)).to(x.dtype)
        out = model(inp, t)
        noise = None
        if self.noisy:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32).to(x.dtype)
        x = ops.multistep_update_indexed(x, out, self.table, self.counter, history=self.history, noise=noise,
                                         clip=self.clip, state=self.state, status=self.status, backend=self.backend)
        self.counter.add_(1)
        return x

    def check(self) -> None:
        """Raise if a step since the last check read a clamped step index or slot (error_flags.check: one host
        sync; call it after the loop)."""
        error_flags.check(self.status)


def run_indexed(model: Callable[..., torch.Tensor], x: torch.Tensor, plan: Plan, *,
                generator: torch.Generator | None = None, clip: float | None = None,
                backend: str = "auto") -> torch.Tensor:
    """run_plan through IndexedLoop: the same loop with every step's coefficients read on the device."""
    loop = IndexedLoop(plan, x, clip=clip, backend=backend)
    if plan.init_scale != 1.0:
        x = x * plan.init_scale
    for _ in plan.steps:
        x = loop.step(model, x, generator)
    loop.check()
    return x


class _Ranges:
    """A torch.profiler range (and an NVTX range on CUDA) per phase of a step."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    @contextlib.contextmanager
    def __call__(self, name: str):
        from torch.profiler import record_function

        with record_function(name):
            if self.cuda:
                torch.cuda.nvtx.range_push(name)
            try:
                yield
            finally:
                if self.cuda:
                    torch.cuda.nvtx.range_pop()
