"""LML's fused reductions: the per-sample Gram of the directions (lml_gram) and the direction weights from it
(lml_weights)."""

from __future__ import annotations

from typing import Sequence

import torch

from .. import step_row
from .backends import BACKEND_NAMES, _select_backend, _status
from .operands import _check_history, _check_x, _indices
from .registry import run
from .update import MAX_DIRECTIONS, UpdateCoeffs, _check_coeffs, _check_dir_args, _check_guide

def lml_gram(
    x: torch.Tensor,
    model_out: torch.Tensor,
    coeffs: UpdateCoeffs,
    dirs: torch.Tensor,
    dir_coeffs: Sequence[float],
    *,
    history: torch.Tensor | None = None,
    read_slots: Sequence[int] = (),
    clip: float | None = None,
    guide: torch.Tensor | None = None,
    guide_scale: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """LML's per-sample Gram matrix, float64 of shape (B, 1 + R, 1 + R): Gram[b] = V_b^T V_b with
    V = [d, dirs[0], ..., dirs[R-1]] and d = da x + de out + db[0] m_0 + sum_i db[i] history[read_slots[i-1]],
    m_0 as multistep_update computes it (clip and the guide, out + guide_scale guide, included; no
    thresholding). One read-only pass; sums over all non-batch dimensions in a fixed order (reproducible run to
    run).
    """
    read_slots = _indices("read_slots", read_slots)
    _check_x(x, model_out)
    _check_history(history, x, None, read_slots)
    _check_coeffs("coeffs", coeffs, len(read_slots))
    if dirs is None:
        raise ValueError("dirs is required (LML's ring of directions)")
    _check_dir_args(x, read_slots, dirs, 0, dir_coeffs, None)
    _check_guide(guide, guide_scale, x)
    row = step_row.cached_row(coeffs)
    if guide is not None:
        row = step_row.with_guide(row, guide_scale)
    args = (x, model_out, history, read_slots, row, float(clip or 0.0), dirs, [float(v) for v in dir_coeffs], guide)
    return run("lml_gram", _select_backend(backend, x), *args)


def lml_weights(gram: torch.Tensor, mix: torch.Tensor, damping: float, scale: float, *,
                backend: str = "auto") -> torch.Tensor:
    """LML's per-sample direction weights W (B, M), float64, from the Gram matrix Gram (B, M, M) of lml_gram and the
    step's mixing matrix C (M, r), U = V C (diffsampler.lml.mixing); equations in reference.lml_weights.

    One op call (a pivoted r x r solve per sample) on CPU tensors (C++) and on CUDA tensors (one thread per
    sample); backend "triton" or "reference", or without the extension, the torch reference (about 15 ops on
    the tensors' device, no host sync).
    """
    if not isinstance(gram, torch.Tensor) or gram.dim() != 3 or gram.shape[1] != gram.shape[2] \
            or not 1 <= gram.shape[1] <= MAX_DIRECTIONS + 1:
        raise ValueError(f"gram must have shape (B, M, M) with 1 <= M <= {MAX_DIRECTIONS + 1}, got "
                         f"{tuple(gram.shape) if isinstance(gram, torch.Tensor) else type(gram).__name__}")
    m = gram.shape[1]
    if not isinstance(mix, torch.Tensor) or mix.dim() != 2 or mix.shape[0] != m or mix.shape[1] > m:
        raise ValueError(f"mix must have shape (M, r) = ({m}, r) with r <= {m}, got "
                         f"{tuple(mix.shape) if isinstance(mix, torch.Tensor) else type(mix).__name__}")
    if gram.dtype != torch.float64 or mix.dtype != torch.float64:
        raise ValueError(f"gram and mix must be float64, got {gram.dtype} and {mix.dtype}")
    if mix.device != gram.device:
        raise ValueError(f"mix must be on gram's device {gram.device}, got {mix.device}")
    if not damping > 0:
        raise ValueError(f"damping must be > 0, got {damping}")
    if backend not in BACKEND_NAMES + ("auto",):
        raise ValueError(f"backend must be one of {('auto',) + BACKEND_NAMES}, got {backend!r}")
    args = (gram, mix, float(damping), float(scale))
    kernel = "cpu" if gram.device.type == "cpu" else "cuda" if gram.is_cuda else None  # the op's kernel here
    if backend in ("cpu", "cuda"):
        if backend != kernel:
            raise ValueError(f"backend {backend!r} needs {backend.upper()} tensors; gram is on {gram.device}")
        ok, why = _status(backend)
        if not ok:
            raise RuntimeError(f"backend {backend!r} is not available: {why}")
    name = kernel if backend in ("auto", kernel) and kernel is not None and _status(kernel)[0] else "reference"
    return run("lml_weights", name, *args)

