"""CUDA-graph capture of sampling loops, for serving: capture once per input shape, replay per call.

The loop is sync-free (tests/test_sync_free.py): the model times are uploaded before capture and every step
is one fused update. Two modes:
- capture="loop": the whole loop in one graph, the coefficients as kernel arguments (one replay per call);
- capture="step": one step in one graph (IndexedLoop: the time, input scale, coefficients and history
  slots are read by a step counter on the device), replayed once per step. Capture costs one step whatever the
  step count, and the graph's memory is one step's; not for LML, thresholding or DPM-Solver-v3.
The model is captured too and must allow it (static shapes, no host syncs, no CPU tensors made per call).
Where capture is impossible (a CPU tensor, no CUDA, a model that syncs, a torch.Generator for the noise) the
sampler logs the reason once and runs eagerly: the numbers are the same either way.

CapturedForward captures a model's forward alone (a pipeline's denoiser, whatever loop calls it): one graph per
signature of its arguments, the tensors copied into the graph's static inputs and the outputs cloned per call.
"""

from __future__ import annotations

import functools
import logging
from typing import Callable

import torch
from torch.utils import _pytree as pytree

from . import error_flags, ops
from .sample import model_times, prepare, run_plan, scale_table, scaled_input
from .solvers import Plan

log = logging.getLogger("diffsampler")


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
        if plan.mean_state:
            raise ValueError("IndexedLoop: a mean-reverting plan (solver 'mrs') needs its condition mu as the state; "
                             "run it with sample() / run_plan()")
        self.plan, self.clip, self.backend = plan, clip, backend
        self.table = ops.step_table([s.coeffs for s in plan.steps], [s.write_slot for s in plan.steps],
                                    [s.read_slots for s in plan.steps], plan.history_slots, plan.uses_state,
                                    x.device)
        self.times = model_times(plan, x)
        self.scales = scale_table([s.input_scale for s in plan.steps], x)
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
            inp = scaled_input(x, self.scales, self.counter)
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


class CapturedSampler:
    """``sampler = CapturedSampler(model, steps=20, solver="dpmpp_2m", schedule=...)``; ``x0 = sampler(x_T)``.

    Takes the keywords of ``diffsampler.sample`` (but ``generator``: captured noise comes from the device's
    default generator). One graph per (shape, dtype, device) of x_T; ``warmup`` eager runs precede a capture
    (lazy initialisation of the model and libraries must not happen inside it). capture: "loop" (the whole
    loop, one replay) or "step" (one step replayed per step; see the module docstring).
    """

    def __init__(self, model, steps: int = 20, solver: str = "dpmpp_2m", schedule=None, prediction=None, *,
                 warmup: int = 1, capture: str = "loop", **options):
        if capture not in ("loop", "step"):
            raise ValueError(f"capture must be 'loop' or 'step', got {capture!r}")
        if capture == "step" and (options.get("lml") is not None or options.get("threshold_ratio") is not None):
            raise ValueError("capture='step' supports neither lml nor threshold_ratio; use capture='loop'")
        if options.get("generator") is not None:
            raise ValueError("CapturedSampler draws noise from the default CUDA generator; generator must be None")
        if options.get("check_nan"):
            raise ValueError("check_nan syncs the host every step and cannot be captured; leave it off")
        options["check_nan"] = False
        self.model, self.plan, self.options = prepare(model, steps, solver, schedule, prediction, options)
        if capture == "step" and any(s.tensor_coeffs is not None for s in self.plan.steps):
            raise ValueError("capture='step' does not index DPM-Solver-v3's steps; use capture='loop'")
        self.warmup, self.capture = warmup, capture
        self.graphs: dict[tuple, tuple] = {}
        self.fallbacks: dict[tuple, str] = {}

    def _eager(self, x):
        if self.capture == "step":
            return run_indexed(self.model, x, self.plan, clip=self.options.get("clip"),
                               backend=self.options.get("backend", "auto"))
        return run_plan(self.model, x, self.plan, **self.options)

    def __call__(self, x_T: torch.Tensor) -> torch.Tensor:
        key = (tuple(x_T.shape), x_T.dtype, x_T.device)
        if key in self.fallbacks:
            return self._eager(x_T)
        if key not in self.graphs:
            reason = self._capture(key, x_T)
            if reason is not None:
                self.fallbacks[key] = reason
                log.warning("diffsampler: running %s eagerly: %s", key, reason)
                return self._eager(x_T)
        graph, static_in, static_out, loop = self.graphs[key]
        static_in.copy_(x_T)
        if loop is None:
            graph.replay()
            return static_out.clone()
        if self.plan.init_scale != 1.0:
            static_in.mul_(self.plan.init_scale)
        loop.reset()
        for _ in self.plan.steps:
            graph.replay()
        loop.check()  # the step counter and table slots stayed in range (one sync at the end)
        return static_in.clone()

    def _capture(self, key, x_T: torch.Tensor) -> str | None:
        """Capture the loop for this key; the reason it cannot be, or None."""
        if not x_T.is_cuda:
            return f"x_T is on {x_T.device}, CUDA graphs need a CUDA tensor"
        if self.capture == "step":
            return self._capture_step(key, x_T)
        try:
            static_in = x_T.clone()
            times = model_times(self.plan, static_in)
            coeffs = self.plan.upload_tensor_coeffs(static_in)  # DPM-Solver-v3's, uploaded before the capture
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    run_plan(self.model, static_in, self.plan, times=times, tensor_coeffs=coeffs, **self.options)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = run_plan(self.model, static_in, self.plan, times=times, tensor_coeffs=coeffs,
                                      **self.options)
        except Exception as err:  # a model or op that cannot be captured: eager, with the reason
            return f"capture failed: {type(err).__name__}: {err}"
        self.graphs[key] = (graph, static_in, static_out, None)
        return None

    def _capture_step(self, key, x_T: torch.Tensor) -> str | None:
        """One step of IndexedLoop in a graph that writes its result back into its input."""
        opts = {"clip": self.options.get("clip"), "backend": self.options.get("backend", "auto")}
        try:
            static_in = x_T.clone()
            loop = IndexedLoop(self.plan, static_in, **opts)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    loop.reset()
                    static_in.copy_(loop.step(self.model, static_in))
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            loop.reset()
            with torch.cuda.graph(graph):
                static_in.copy_(loop.step(self.model, static_in))
        except Exception as err:  # a model or op that cannot be captured: eager, with the reason
            return f"capture failed: {type(err).__name__}: {err}"
        self.graphs[key] = (graph, static_in, None, loop)
        return None


class CapturedForward:
    """``module.forward = CapturedForward(module.forward)``: the forward captured in a CUDA graph per signature
    of its arguments and replayed, the caller's code unchanged.

    A signature is the nesting of the positional and keyword arguments, each tensor's (shape, dtype, device)
    and the value of every other argument (which must be hashable). Its first call warms up ``warmup`` times
    on a side stream and captures; every call copies the argument tensors into the graph's static inputs,
    replays, and returns clones of the output tensors (a caller may keep them across calls). The forward must
    allow capture (no host syncs, no CPU tensors made per call) and its weights must stay where they are
    after the capture (no ``.to()``, no reloading). Where capture is impossible (CPU tensors, autograd on,
    an unhashable argument, a forward that fails under capture) it runs eagerly and logs the reason once; the
    reasons are kept in ``fallbacks``.
    """

    def __init__(self, fn: Callable, warmup: int = 1):
        if not callable(fn):
            raise ValueError(f"CapturedForward: fn must be callable, got {type(fn).__name__}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"CapturedForward: warmup must be an integer >= 1, got {warmup!r}")
        functools.update_wrapper(self, fn)
        self.fn, self.warmup = fn, warmup
        self.graphs: dict[tuple, tuple] = {}
        self.failed: dict[tuple, str] = {}  # signature -> why its capture failed
        self.fallbacks: list[str] = []  # every distinct reason for an eager call, in order

    def __call__(self, *args, **kwargs):
        leaves, spec = _flatten(args, kwargs)
        key, reason = _signature(leaves, spec)
        if reason is None:
            reason = self.failed.get(key)
        if reason is None and key not in self.graphs:
            reason = self._capture(key, leaves, spec)
        if reason is not None:
            if reason not in self.fallbacks:
                self.fallbacks.append(reason)
                log.warning("diffsampler: running %s eagerly: %s", getattr(self.fn, "__qualname__", "the forward"),
                            reason)
            return self.fn(*args, **kwargs)
        graph, static, out = self.graphs[key]
        for dst, src in zip(static, leaves):
            if isinstance(dst, torch.Tensor):
                dst.copy_(src)
        graph.replay()
        return _fresh(out)

    def _capture(self, key, leaves, spec) -> str | None:
        """Capture the forward for this signature; the reason it cannot be, or None."""
        static = [v.clone() if isinstance(v, torch.Tensor) else v for v in leaves]
        args, kwargs = _unflatten(static, spec)
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    self.fn(*args, **kwargs)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self.fn(*args, **kwargs)
        except Exception as err:  # a forward that cannot be captured: eager, with the reason
            self.failed[key] = f"capture failed: {type(err).__name__}: {err}"
            return self.failed[key]
        self.graphs[key] = (graph, static, out)
        return None


# the argument types of a flat call, flattened without pytree (whose cost per call is that of a small kernel)
_PLAIN = (torch.Tensor, type(None), bool, int, float, str)


def _flatten(args: tuple, kwargs: dict) -> tuple[list, object]:
    """The arguments' leaves and their structure: (number of positional arguments, keyword names) when each is
    a tensor or a plain value, else pytree's spec of the nesting."""
    values = (*args, *kwargs.values())
    if all(isinstance(v, _PLAIN) for v in values):
        return list(values), (len(args), tuple(kwargs))
    return pytree.tree_flatten((args, kwargs))


def _unflatten(leaves: list, spec) -> tuple[tuple, dict]:
    if isinstance(spec, tuple):
        n, names = spec
        return tuple(leaves[:n]), dict(zip(names, leaves[n:]))
    return pytree.tree_unflatten(leaves, spec)


def _fresh(out):
    """The outputs with every tensor cloned out of the graph's static memory."""
    if type(out) is tuple and all(isinstance(v, torch.Tensor) for v in out):
        return tuple(v.clone() for v in out)
    return pytree.tree_map_only(torch.Tensor, torch.clone, out)


def _signature(leaves: list, spec) -> tuple[tuple | None, str | None]:
    """The capture key of flattened arguments, or the reason they cannot be captured."""
    if torch.is_grad_enabled():
        return None, "autograd is on; a captured forward is for inference (run under torch.no_grad())"
    parts = []
    for v in leaves:
        if isinstance(v, torch.Tensor):
            if not v.is_cuda:
                return None, f"an argument is on {v.device}; CUDA graphs need CUDA tensors"
            parts.append((tuple(v.shape), v.dtype, v.device))
        else:
            parts.append((type(v), v))
    key = (spec, torch.is_inference_mode_enabled(), tuple(parts))
    try:
        hash(key)
    except TypeError as err:
        return None, f"an argument is not hashable ({err}); the signature of a capture must be"
    return key, None
