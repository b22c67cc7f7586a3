"""CUDA-graph capture of whole sampling loops, for serving: capture once per input shape, replay per call.

The loop is sync-free (tests/test_sync_free.py): the model times are uploaded before capture, every step is
one fused update whose coefficients are kernel arguments, so the captured graph replays the whole loop with
one launch. The model is captured too and must allow it (static shapes, no host syncs, no CPU tensors made
per call). Where capture is impossible (a CPU tensor, no CUDA, a model that syncs, a torch.Generator for the
noise) the sampler logs the reason once and runs eagerly: the numbers are the same either way.
"""

from __future__ import annotations

import logging

import torch

from .sample import model_times, prepare, run_plan

log = logging.getLogger("diffsampler")


class CapturedSampler:
    """``sampler = CapturedSampler(model, steps=20, solver="dpmpp_2m", schedule=...)``; ``x0 = sampler(x_T)``.

    Takes the keywords of ``diffsampler.sample`` (but ``generator``: captured noise comes from the device's
    default generator). One graph per (shape, dtype, device) of x_T; ``warmup`` eager runs precede a capture
    (lazy initialisation of the model and libraries must not happen inside it).
    """

    def __init__(self, model, steps: int = 20, solver: str = "dpmpp_2m", schedule=None, prediction=None, *,
                 warmup: int = 1, **options):
        if options.get("generator") is not None:
            raise ValueError("CapturedSampler draws noise from the default CUDA generator; generator must be None")
        if options.get("check_nan"):
            raise ValueError("check_nan syncs the host every step and cannot be captured; leave it off")
        options["check_nan"] = False
        self.model, self.plan, self.options = prepare(model, steps, solver, schedule, prediction, options)
        self.warmup = warmup
        self.graphs: dict[tuple, tuple] = {}
        self.fallbacks: dict[tuple, str] = {}

    def _eager(self, x):
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
        graph, static_in, static_out = self.graphs[key]
        static_in.copy_(x_T)
        graph.replay()
        return static_out.clone()

    def _capture(self, key, x_T: torch.Tensor) -> str | None:
        """Capture the loop for this key; the reason it cannot be, or None."""
        if not x_T.is_cuda:
            return f"x_T is on {x_T.device}, CUDA graphs need a CUDA tensor"
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
        self.graphs[key] = (graph, static_in, static_out)
        return None
