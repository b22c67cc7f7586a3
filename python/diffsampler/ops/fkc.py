"""fkc_update: the per-step math of Feynman-Kac correctors (diffsampler.smc) in one pass: the particles' SDE step
and their log-weight increment."""

from __future__ import annotations

from typing import Sequence

import torch

from .. import reference
from .backends import _select_backend
from .operands import _check_like, _check_nan, _check_x
from .registry import run

MAX_OUTS = reference.FKC_MAX_OUTS


def fkc_update(
    x: torch.Tensor,
    outs: Sequence[torch.Tensor],
    *,
    a: float,
    e: Sequence[float],
    weights: Sequence[float],
    c: float = 0.0,
    noise: torch.Tensor | None = None,
    check_nan: bool = True,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One fused pass over x, the M <= 4 model outputs and the noise:

        x'      = a x + sum_m e[m] outs[m] + c noise
        inc[b]  = sum_{m <= n} w_mn <outs[m], outs[n]>_b      (float64, one per sample b)

    weights: the w_mn in the order of reference.fkc_pairs(M) ((0, 0), (0, 1), .., (1, 1), ..). Returns (x', inc).
    x' is computed in float32 (float64 on the reference for float64 inputs) and stored in x's dtype.
    """
    if isinstance(outs, torch.Tensor) or not isinstance(outs, Sequence) or not 1 <= len(outs) <= MAX_OUTS:
        raise ValueError(f"outs must be a sequence of 1 to {MAX_OUTS} tensors of x's shape, got "
                         f"{type(outs).__name__}{'' if isinstance(outs, torch.Tensor) else f' of {len(outs)}'}")
    m = len(outs)
    for i, o in enumerate(outs):
        _check_x(x, o) if i == 0 else _check_like(f"outs[{i}]", o, x)
        _check_nan(o, check_nan)
    e, weights = [float(v) for v in e], [float(v) for v in weights]
    if len(e) != m:
        raise ValueError(f"e must have one weight per output ({m}), got {len(e)}")
    if len(weights) != m * (m + 1) // 2:
        raise ValueError(f"weights must have M (M + 1) / 2 = {m * (m + 1) // 2} entries (reference.fkc_pairs({m})), "
                         f"got {len(weights)}")
    if noise is not None:
        _check_like("noise", noise, x)
    elif c != 0:
        raise ValueError("noise is required: the noise coefficient c is not 0")
    return run("fkc_update", _select_backend(backend, x), x, list(outs), [float(a), float(c), *e, *weights], noise)
