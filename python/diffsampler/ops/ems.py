"""ems_update: one fused step with per-element coefficient tensors (DPM-Solver-v3, solvers/dpmv3.py)."""

from __future__ import annotations

from typing import Sequence

import torch

from .. import reference
from .backends import _select_backend
from .operands import _check_history, _check_like, _check_nan, _check_no_overlap, _check_x, _index, _indices
from .registry import run

def _check_ems_args(x, model_out, coeffs, history, write_slot, read_slots, state, check_nan) -> None:
    _check_x(x, model_out)
    k = len(read_slots)
    if k > reference.EMS_MAX_READS:
        raise ValueError(f"read_slots: at most {reference.EMS_MAX_READS} history terms, got {k}")
    if not isinstance(coeffs, torch.Tensor):
        raise ValueError(f"coeffs must be a torch.Tensor, got {type(coeffs).__name__}")
    want = (torch.float32, torch.float64) if x.dtype == torch.float64 else (torch.float32,)
    if coeffs.dtype not in want or coeffs.device != x.device:
        raise ValueError(f"coeffs must be {' or '.join(map(str, want))} on x's device {x.device}, "
                         f"got {coeffs.dtype} on {coeffs.device}")
    rows = [reference.ems_rows(k, False)] + ([reference.ems_rows(k, True)] if state is not None else [])
    if coeffs.dim() != x.dim() or tuple(coeffs.shape[1:]) != tuple(x.shape[1:]) or coeffs.shape[0] not in rows:
        raise ValueError(f"coeffs must have shape (rows, *x.shape[1:]) with rows in {rows} "
                         f"({k} history reads{', state' if state is not None else ''}), got {tuple(coeffs.shape)}")
    _check_history(history, x, write_slot, read_slots)
    if state is not None:
        _check_like("state", state, x)
    _check_nan(model_out, check_nan)


def ems_update(
    x: torch.Tensor,
    model_out: torch.Tensor,
    coeffs: torch.Tensor,
    *,
    history: torch.Tensor | None = None,
    write_slot: int = 0,
    read_slots: Sequence[int] = (),
    state: torch.Tensor | None = None,
    check_nan: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """One fused step whose coefficients are tensors over a sample's elements (broadcast over the batch):

        m_0 = P x + Q out
        x'  = A x + H s + sum_i B_i m_i + C          m_i = history[read_slots[i-1]], i >= 1
        s'  = As x + Hs s + sum_i Bs_i m_i + Cs      (the state row, when coeffs has it)
        history[write_slot] = m_0

    coeffs: float32 (float64 for float64 x) of shape (rows, *x.shape[1:]), rows [P, Q, A, H, B_0..B_k, C]
    (+ [As, Hs, Bs_0..Bs_k, Cs]), k = len(read_slots) <= 3. DPM-Solver-v3 precomputes them per step from its
    per-dimension statistics (solvers/dpmv3.py). Computes in float32 (float64 on the reference).
    """
    write_slot, read_slots = _index("write_slot", write_slot), _indices("read_slots", read_slots)
    _check_ems_args(x, model_out, coeffs, history, write_slot, read_slots, state, check_nan)
    rewrites_state = state is not None and coeffs.shape[0] == reference.ems_rows(len(read_slots), True)
    _check_no_overlap({"history[write_slot]": (history, write_slot) if history is not None else None,
                       "state": state if rewrites_state else None},
                      {"x": x, "model_out": model_out, "coeffs": coeffs, "state": state,
                       **{f"history[{r}]": (history, r) for r in read_slots}})
    args = (x, model_out, coeffs, history, write_slot, read_slots, state)
    return run("ems_update", _select_backend(backend, x), *args)

