"""CUDA-graph capture of sampling loops, for serving: capture once per input shape, replay per call.

The loop is sync-free (tests/test_sync_free.py): the model times are uploaded before capture and every step
is one fused update. Two modes:
- capture="loop": the whole loop in one graph, the coefficients as kernel arguments (one replay per call);
- capture="step": one step in one graph (sample.IndexedLoop: the time, input scale, coefficients and history
  slots are read by a step counter on the device), replayed once per step. Capture costs one step whatever the
  step count, and the graph's memory is one step's; not for LML, thresholding or DPM-Solver-v3.
The model is captured too and must allow it (static shapes, no host syncs, no CPU tensors made per call).
Where capture is impossible (a CPU tensor, no CUDA, a model that syncs, a torch.Generator for the noise) the
sampler logs the reason once and runs eagerly: the numbers are the same either way.
"""

from __future__ import annotations

import logging

import torch

from .sample import IndexedLoop, model_times, prepare, run_indexed, run_plan

log = logging.getLogger("diffsampler")


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
