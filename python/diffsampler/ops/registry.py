"""The op table and its one dispatch.

Every fused op has one entry in OPS: its torch reference (diffsampler.reference, the ground truth), its Triton
function (under diffsampler.triton_kernels, imported on first use), and the fake (shapes-only) implementation of
its compiled op torch.ops.diffsampler.<name> (csrc: CPU and CUDA kernels), registered when the extension is
built. A public op checks its arguments, picks a backend (backends._select_backend) and calls `run`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .. import reference
from .backends import _status


@dataclass(frozen=True)
class Op:
    """reference: the torch function; triton: "module.function" under diffsampler.triton_kernels (None: there is
    no Triton kernel and backend "triton" runs the reference); fake: the compiled op's outputs from its inputs'
    shapes; functional: (name, args -> its args or None) of a functional compiled op taken instead when the
    call writes nothing in place (inductor lowers it, not the mutating op; same outputs, same fake)."""

    reference: Callable
    triton: str | None
    fake: Callable
    functional: tuple[str, Callable] | None = None


def _like_x(x, *args, **kwargs):
    """The updates' output: a new tensor like x."""
    return x.new_empty(x.shape)


def _gram_fake(x, model_out, history, read_slots, coeffs, clip, dirs, dir_coeffs, guide=None):
    m = dirs.shape[0] + 1
    return x.new_empty((x.shape[0], m, m), dtype=torch.float64)


def _lml_weights_fake(gram, mix, damping, scale):
    return gram.new_empty(gram.shape[:2])


def _fkc_fake(x, outs, coeffs, noise):
    return x.new_empty(x.shape), x.new_empty(x.shape[0], dtype=torch.float64)


def _resample_ancestors_fake(log_w, uniforms, method, ess_threshold, status=None):
    G, K = log_w.shape
    return (log_w.new_empty(G, K), log_w.new_empty((G, K), dtype=torch.int64), log_w.new_empty(G),
            log_w.new_empty(G, dtype=torch.bool), log_w.new_empty(G))


def _resample_move_fake(particles, ancestors, resampled, status=None):
    return None


def _update_functional_args(x, model_out, history, write_slot, read_slots, coeffs, noise, clip, thresholding,
                            state=None, dirs=None, dir_slot=0, dir_coeffs=(), dir_weights=None, guide=None):
    """multistep_update_functional's arguments when nothing is written in place (no history, state or LML)."""
    if history is None and state is None and dirs is None:
        return x, model_out, coeffs, noise, clip, thresholding, guide
    return None


OPS = {
    "multistep_update": Op(reference.multistep_update, "fused_update.multistep_update", _like_x,
                           functional=("multistep_update_functional", _update_functional_args)),
    "multistep_update_indexed": Op(reference.multistep_update_indexed, "fused_update.multistep_update_indexed",
                                   _like_x),
    "lml_gram": Op(reference.lml_gram, "lml.lml_gram", _gram_fake),
    "lml_weights": Op(reference.lml_weights, None, _lml_weights_fake),
    "ems_update": Op(reference.ems_update, "ems_update.ems_update", _like_x),
    "fkc_update": Op(reference.fkc_update, "fkc_update.fkc_update", _fkc_fake),
    "resample_ancestors": Op(reference.resample_ancestors, "resample.resample_ancestors", _resample_ancestors_fake),
    "resample_move": Op(reference.resample_move, "resample.resample_move", _resample_move_fake),
}

if _status("cpu")[0]:
    for _name, _op in OPS.items():
        for _compiled in (_name,) + ((_op.functional[0],) if _op.functional else ()):
            torch.library.register_fake(f"diffsampler::{_compiled}")(_op.fake)


def _triton(path: str) -> Callable:
    """The Triton function at `path` (import statements, not importlib: torch.compile traces them)."""
    from ..triton_kernels import ems_update, fkc_update, fused_update, lml, resample  # noqa: F401  (the modules)

    module, function = path.split(".")
    modules = {"ems_update": ems_update, "fkc_update": fkc_update, "fused_update": fused_update, "lml": lml,
               "resample": resample}
    return getattr(modules[module], function)


def run(op: str, name: str, *args):
    """Op `op` on backend `name` (as _select_backend picked it) with the backend-level arguments `args` (the
    signature of reference.<op>)."""
    entry = OPS[op]
    if name == "reference" or (name == "triton" and entry.triton is None):
        return entry.reference(*args)
    if name == "triton":
        return _triton(entry.triton)(*args)
    if entry.functional is not None:
        functional, functional_args = entry.functional
        call_args = functional_args(*args)
        if call_args is not None:
            return getattr(torch.ops.diffsampler, functional)(*call_args)
    return getattr(torch.ops.diffsampler, op)(*args)
