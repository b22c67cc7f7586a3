"""The sampling loop: one model call and one fused update per step."""

from __future__ import annotations

import contextlib
import operator
from typing import Callable

import torch

from . import checks, ops, reference
from .solvers import Plan, SolverSpec, make_plan, solver_spec
from .teleport import teleported


def sample(
    model: Callable[..., torch.Tensor],
    x: torch.Tensor,
    steps: int | None = 20,
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
    mu: torch.Tensor | None = None,
    teleport=None,
    skip: int | None = None,
    guidance=None,
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
    solver: a name of ``diffsampler.solvers.SOLVERS`` or a ``diffsampler.solvers.usf.Plan`` (which carries its
        own grid: steps and schedule are then not used); ``print(diffsampler.solvers.describe())`` lists each
        with its schedule types and options (keyword arguments of sample()). The discrete-VP solvers' defaults
        are those of the diffusers scheduler they follow; "heun" and "euler" on an ``EDM()`` are Karras et
        al.'s (the model gets sigma and returns the denoised x0 by default).
    clip / threshold_ratio, threshold_max: clamp the data prediction to [-clip, clip], or dynamic thresholding.
    generator: the torch.Generator of the noise of stochastic steps (DDIM with eta > 0, the SDE solvers).
    check_nan: raise ValueError, naming the step and its time, when the model returns NaN or inf (a host sync
        per step; off for speed). Skipped inside torch.compile, whose graph cannot sync; the plan is built on
        the host once per distinct arguments (cached), so ``torch.compile(lambda x: sample(model, x, ...),
        fullgraph=True)`` traces only the loop.
    time_shift: a ``diffsampler.solvers.TimeShift(window, cutoff)``: query the model at the timestep whose
        noise variance matches each sample's (TS-DPM); discrete VP schedules.
    lml: a ``diffsampler.LML(damping, kappa, rank, freeze)``: precondition each step's direction with the
        damped low-rank Hessian approximation of Levenberg-Marquardt-Langevin (diffsampler.lml); no extra
        model call, one extra read-only pass per step. Not with thresholding.
    cuda_graph: True or "loop": capture the whole loop (model included) in a CUDA graph and replay it; "step":
        capture one step and replay it per step, its coefficients read by step index on the device
        (diffsampler.graphs; no NaN check, noise from the default generator); eager with a logged reason where
        it cannot.
    mu: the condition of a ``MeanReverting`` schedule (solver "mrs"; the degraded image of IR-SDE), broadcast to
        x's shape: x_T = mu + sigma_T x.
    teleport, skip: a ``diffsampler.GaussianTeleport`` and the number of the solver's leading steps it replaces:
        x_T is moved in closed form along the probability-flow ODE of that Gaussian to the solver's grid point
        `skip`, and the solver runs over the rest of its grid (diffsampler.teleport; on a discrete VP
        schedule the grid is the multistep schedulers' one, for the solvers that run on a Grid).
    guidance: a ``diffsampler.guidance.Guidance``: every model output moved along grad_x log p(y | x_t) (a
        classifier's, or a function's of the Tweedie estimate), scaled by its schedule; the solver steps on the
        guided output.
    """
    checks.model(model)
    checks.sample_tensor(x)
    checks.sampling_options(clip, threshold_ratio, threshold_max, check_nan, generator)
    if teleport is not None:
        if time_shift is not None or lml is not None:
            raise ValueError("teleport does not combine with time_shift or lml")
        x, schedule, prediction, steps, solver_options = teleported(teleport, skip, x, solver, schedule, prediction,
                                                                    steps, solver_options)
    elif skip is not None:
        raise ValueError(f"skip={skip!r} needs teleport= a diffsampler.GaussianTeleport")
    options = dict(time_shift=time_shift, lml=lml, clip=clip, threshold_ratio=threshold_ratio, threshold_max=threshold_max,
                   backend=backend, **solver_options)
    if cuda_graph:
        from .graphs import CapturedSampler

        if generator is not None:
            raise ValueError("cuda_graph=True draws noise from the default CUDA generator; generator must be None")
        if mu is not None or guidance is not None:
            raise ValueError("cuda_graph does not take mu (mean-reverting sampling) or guidance; run it eagerly")
        capture = "loop" if cuda_graph is True else cuda_graph
        return CapturedSampler(model, steps, solver, schedule, prediction, capture=capture, **options)(x)
    check_nan = check_nan and not torch.compiler.is_compiling()
    model, plan, options = prepare(model, steps, solver, schedule, prediction, dict(options, check_nan=check_nan))
    guide = guided(guidance, model, plan, solver, schedule, prediction, solver_options) if guidance is not None \
        else None
    return run_plan(model, x, plan, generator=generator, progress=progress,
                    desc=f"diffsampler {getattr(solver, 'name', solver)}", mu=mu, guide=guide, **options)


UPDATE_OPTIONS = ("clip", "threshold_ratio", "threshold_max", "check_nan", "backend", "lml")


def prepare(model, steps, solver, schedule, prediction, options: dict):
    """(model, Plan, update options) of a sample() call: defaults, the plan, the checks, the time shift.
    `options` holds sample()'s keywords; those that are not update options go to the solver."""
    options = dict(options)
    update = {k: options.pop(k) for k in UPDATE_OPTIONS if k in options}
    time_shift = options.pop("time_shift", None)
    options.pop("generator", None)
    plan = cached_plan(solver, schedule, steps, prediction, tuple(options.items()))
    if time_shift is not None or update.get("lml") is not None:
        if not isinstance(solver, str) and schedule is None:
            raise ValueError("time_shift and lml with a usf.Plan need schedule= (the schedule of the plan's grid)")
        schedule, prediction = _defaults(solver, schedule, prediction)
    if time_shift is not None:
        from .solvers import TimeShift

        if not isinstance(time_shift, TimeShift):
            raise ValueError(f"time_shift must be a diffsampler.solvers.TimeShift, got {type(time_shift).__name__}")
        if not plan.discrete_time:
            raise ValueError(f"time_shift needs integer training timesteps; solver {solver!r} has none")
        model = time_shift.wrap(model, schedule)
    thresholding = update.get("threshold_ratio") is not None
    if plan.mean_state:
        used = [k for k in ("clip", "threshold_ratio", "lml") if update.get(k) is not None] + (
            ["time_shift"] if time_shift is not None else [])
        if used:
            raise ValueError(f"solver {solver!r} (mean-reverting) does not take {', '.join(used)}: its history "
                             "holds the data prediction less a multiple of mu")
    if not plan.data_prediction:  # a noise-prediction history: the op thresholds the x0 it implies (eps_of)
        if thresholding and not all(s.coeffs is not None and s.coeffs.eps_of is not None for s in plan.steps):
            raise ValueError(f"threshold_ratio acts on a data prediction; solver {solver!r} keeps neither one nor "
                             "the noise prediction's (alpha, sigma)")
        if update.get("clip") and not thresholding:
            raise ValueError(f"clip acts on a data prediction; solver {solver!r} keeps noise predictions (it "
                             "clips the data prediction they imply only together with threshold_ratio)")
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


def guided(guidance, model, plan: Plan, solver: str, schedule, prediction, solver_options: dict):
    """`guidance` bound to the model on the solver's schedule: call(x, t, t_host) -> (out, g, w), the guided
    output out + w g (diffsampler.guidance.Guidance.bind)."""
    from .guidance import Guidance
    from .schedules import VP

    if not isinstance(guidance, Guidance):
        raise ValueError(f"guidance must be a diffsampler.guidance.Guidance, got {type(guidance).__name__}")
    if not isinstance(solver, str) and schedule is None:
        raise ValueError("guidance with a usf.Plan needs schedule= (the schedule of the plan's grid)")
    schedule, prediction = _defaults(solver, schedule, prediction)
    explicit = solver_options.get("sigmas")
    if isinstance(schedule, VP) and (not plan.discrete_time or (explicit is not None and not isinstance(explicit, str))):
        raise ValueError(f"guidance on a VP schedule needs the model's integer training timesteps; solver {solver!r} "
                         "gives it fractional times here (a sigmas= list, or the Euler-type grid): use a multistep "
                         "solver on VP, or an EDM / Flow schedule")
    return guidance.bind(model, schedule, prediction)


def _defaults(solver, schedule, prediction):
    """sample()'s defaults: schedule None -> the solver's default schedule, prediction None -> the schedule's
    (a usf.Plan has its own grid: prediction None -> "eps")."""
    if not isinstance(solver, str):
        return schedule, "eps" if prediction is None else prediction
    if schedule is None:
        schedule = solver_spec(solver).default_schedule()
    return schedule, SolverSpec.default_prediction(schedule) if prediction is None else prediction


_PLANS: dict[int, Plan] = {}  # the newest PLAN_CACHE_SIZE plans by id
_PLAN_IDS: dict[tuple, int] = {}  # the id of the plan of each hashable set of arguments
PLAN_CACHE_SIZE = 64


def cached_plan(solver, schedule, steps, prediction, options: tuple) -> Plan:
    """The Plan of these sample() arguments, built on the host once per distinct arguments (a plan is a pure
    function of them). Under torch.compile the build runs at trace time (plan_id is a constant of the graph)
    and the traced code only reads the plan."""
    options = tuple((k, _static(v)) for k, v in options)
    return _PLANS[plan_id(solver, schedule, _static(steps), prediction, options)]


@torch.compiler.assume_constant_result
def plan_id(solver, schedule, steps, prediction, options: tuple) -> int:
    """The id in _PLANS of the plan of these arguments, built now where it is not cached. The key holds each
    value with its type (5 and 5.0 are different arguments); arguments that do not hash (a numpy array)
    build their plan anew."""
    key = (solver, schedule, _typed(steps), prediction, tuple((k, _typed(v)) for k, v in options))
    try:
        if key in _PLAN_IDS:
            return _PLAN_IDS[key]
    except TypeError:
        key = None
    schedule, prediction = _defaults(solver, schedule, prediction)
    plan = make_plan(solver, schedule, steps, prediction, **dict(options))
    new = max(_PLANS, default=-1) + 1
    _PLANS[new] = plan
    if key is not None:
        _PLAN_IDS[key] = new
    if len(_PLANS) > PLAN_CACHE_SIZE:
        oldest = min(_PLANS)
        del _PLANS[oldest]
        for k in [k for k, v in _PLAN_IDS.items() if v == oldest]:
            del _PLAN_IDS[k]
    return new


def _static(value):
    """The value itself in the traced region too: torch.compile turns an int or float argument that changed
    between calls into a symbolic one, and the plan needs the number (these round trips give it back, with a
    guard on it)."""
    if not torch.compiler.is_compiling():
        return value
    if type(value) is int:
        return operator.index(value)
    if type(value) is float:
        return float.fromhex(value.hex())
    if type(value) in (list, tuple):
        return type(value)(_static(v) for v in value)
    return value


def _typed(value):
    """A value with its type, lists and tuples as tuples of typed values: a hashable key part."""
    if isinstance(value, (list, tuple)):
        return type(value), tuple(_typed(v) for v in value)
    return type(value), value


def model_times(plan: Plan, x: torch.Tensor) -> torch.Tensor:
    """The model times of a Plan as one tensor on x's device: uploaded once, indexed per step without a sync."""
    return time_table(plan.timesteps, plan.discrete_time, x)


def time_table(times, discrete: bool, x: torch.Tensor) -> torch.Tensor:
    """Model times as one tensor on x's device: int64 for discrete ones; float32, or float64 for float64 x,
    otherwise."""
    t_dtype = torch.int64 if discrete else (torch.float64 if x.dtype == torch.float64 else torch.float32)
    return torch.tensor(list(times), dtype=t_dtype, device=x.device)


def scale_table(scales, x: torch.Tensor) -> torch.Tensor | None:
    """Per-step input scales (Euler's scale_model_input) on x's device, in the dtype x * a Python float computes
    in (float64 for float64 x, else float32); None when every scale is 1."""
    scales = list(scales)
    if all(v == 1.0 for v in scales):
        return None
    return torch.tensor(scales, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32, device=x.device)


def scaled_input(x: torch.Tensor, scales: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x times scales[index] (index: one step for the batch, or one per sample), as run_plan's x * input_scale."""
    s = scales.index_select(0, index).view(-1, *[1] * (x.dim() - 1))
    return (x.to(s.dtype) * s).to(x.dtype)


def run_plan(model: Callable[..., torch.Tensor], x: torch.Tensor, plan: Plan, *,
             generator: torch.Generator | None = None, progress: bool = False, desc: str = "diffsampler",
             return_state: bool = False, times: torch.Tensor | None = None, ranges: bool = False,
             tensor_coeffs: list | None = None, lml=None, lml_time_scale: float | None = None, lml_schedule=None,
             lml_prediction: str = "eps", mu: torch.Tensor | None = None, guide=None, **update_options):
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
    mu: the condition of a mean-reverting plan (Plan.mean_state): the read-only state, x_T = mu + init_scale x.
    guide: guidance's call(x, t, t_host) -> (out, g, w) in place of the model (sample's `guided`): the update
        takes g as its guide operand, out + w g inside the fused op.
    """
    checks.model(model)
    checks.sample_tensor(x)
    check_nan = checks.flag("check_nan", update_options.pop("check_nan", True))
    plan.check_defined()
    history = x.new_empty((plan.history_slots, *x.shape)) if plan.history_slots else None
    state = mean_state(mu, x) if plan.mean_state else (torch.zeros_like(x) if plan.uses_state else None)
    if mu is not None and not plan.mean_state:
        raise ValueError("mu is the condition of a mean-reverting schedule (solver 'mrs'); this plan has none")
    if plan.init_scale != 1.0:
        x = x * plan.init_scale
    if plan.mean_state:
        x = x + state
    times = model_times(plan, x) if times is None else times
    tensor_coeffs = plan.upload_tensor_coeffs(x) if tensor_coeffs is None else tensor_coeffs
    lml_run = None
    if lml is not None:
        from .lml import LMLRun

        lml_run = LMLRun(lml, plan, x, lml_time_scale, lml_schedule, lml_prediction)
    update = _update_fn(history, state, generator, tensor_coeffs, lml_run, update_options)

    def evaluate(i: int, step, x: torch.Tensor):  # (out, guide, its weight)
        if guide is None:
            return model(x, times[i]), None, 0.0
        return guide(x, times[i], step.t)

    correct = None
    if lml_run is not None and lml_run.corrector:
        backend = update_options.get("backend", "auto")
        correct = lambda i, step, x: lml_run.correct(i, step, x, lambda y: evaluate(i, step, y), generator, backend)
    span = _Ranges(x.is_cuda) if ranges else _no_range
    steps = plan.steps
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=desc, total=len(plan.steps))
    for i, step in enumerate(steps):
        if correct is not None:
            with span(i, "corrector"):
                x = correct(i, step, x)
        with span(i, "model"):
            out, g, w = evaluate(i, step, x * step.input_scale if step.input_scale != 1.0 else x)
            if check_nan:
                checks.model_output(out, x, i, step.t)
                if g is not None:
                    checks.model_output(g, x, i, step.t, "the guidance gradient")
        with span(i, "update"):
            x = update(i, step, x, out, g, w)
    return (x, state) if return_state else x


def mean_state(mu, x: torch.Tensor) -> torch.Tensor:
    """The condition mu of a mean-reverting plan as its state: x's shape, dtype and device, contiguous."""
    if not isinstance(mu, torch.Tensor):
        raise ValueError(f"a mean-reverting plan needs mu= a tensor (the condition x_T reverts to), got "
                         f"{type(mu).__name__}")
    if mu.device != x.device or not mu.is_floating_point():
        raise ValueError(f"mu must be a floating tensor on x's device {x.device}, got {mu.dtype} on {mu.device}")
    try:
        return mu.to(x.dtype).expand(x.shape).contiguous()
    except RuntimeError:
        raise ValueError(f"mu of shape {tuple(mu.shape)} does not broadcast to x's shape {tuple(x.shape)}") from None


def _update_fn(history, state, generator, tensor_coeffs, lml_run, options: dict):
    """The update of one step, chosen once per loop: update(i, step, x, out, guide, w) -> x' (guide: guidance's
    term, out + w guide; None: none). The fused multistep update (with LML's direction arguments when lml_run is
    set), or DPM-Solver-v3's ems_update on the steps with tensor coefficients (which adds the guide to out
    first: ems_update takes none). The loop checks the model output (check_nan), the ops do not."""
    options = dict(options, check_nan=False)

    def noise_of(x):
        # drawn in float32 as diffusers does, so a seed gives the same noise in every storage dtype
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32).to(x.dtype)

    def fused(i, step, x, out, guide, w):
        z = noise_of(x) if step.needs_noise else None
        return ops.multistep_update(x, out, step.coeffs, history=history, write_slot=step.write_slot,
                                    read_slots=step.read_slots, noise=z, state=state, guide=guide, guide_scale=w,
                                    **options)

    if lml_run is not None:
        clip, backend = options.get("clip"), options.get("backend", "auto")

        def with_lml(i, step, x, out, guide, w):
            extra = lml_run.update_args(i, step, x, out, history, clip, backend, guide, w)
            z = noise_of(x) if step.needs_noise else None
            return ops.multistep_update(x, out, step.coeffs, history=history, write_slot=step.write_slot,
                                        read_slots=step.read_slots, noise=z, state=state, guide=guide,
                                        guide_scale=w, **extra, **options)

        return with_lml
    if tensor_coeffs is None:
        return fused
    if options.get("clip") or options.get("threshold_ratio") is not None:
        raise ValueError("clip / threshold_ratio act on a data prediction; this plan's steps (ems_update) keep none")
    ems_options = {k: options[k] for k in ("check_nan", "backend") if k in options}

    def ems(i, step, x, out, guide, w):  # DPM-Solver-v3
        if tensor_coeffs[i] is None:
            return fused(i, step, x, out, guide, w)
        return ops.ems_update(x, reference.guided_out(out, guide, w), tensor_coeffs[i], history=history,
                              write_slot=step.write_slot, read_slots=step.read_slots, state=state, **ems_options)

    return ems


_NO_RANGE = contextlib.nullcontext()


def _no_range(i: int, phase: str):
    return _NO_RANGE


class _Ranges:
    """A torch.profiler range (and an NVTX range on CUDA) per phase of a step, named "step {i} {phase}"."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    @contextlib.contextmanager
    def __call__(self, i: int, phase: str):
        from torch.profiler import record_function

        name = f"step {i} {phase}"
        with record_function(name):
            if self.cuda:
                torch.cuda.nvtx.range_push(name)
            try:
                yield
            finally:
                if self.cuda:
                    torch.cuda.nvtx.range_pop()


def __getattr__(name: str):
    """IndexedLoop and run_indexed live with the capture code (diffsampler.graphs); this keeps
    `from diffsampler.sample import IndexedLoop` working."""
    if name in ("IndexedLoop", "run_indexed"):
        from . import graphs

        return getattr(graphs, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
