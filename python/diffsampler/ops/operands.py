"""Operand checks shared by the ops: tensors like x, integer slots, the history ring, memory overlap of written
buffers, NaN scans, and the status word of clamping backends on CPU tensors."""

from __future__ import annotations

import operator
from typing import Sequence

import torch

from .. import error_flags
from .backends import STORAGE_DTYPES

def _check_like(name: str, t: torch.Tensor, x: torch.Tensor, shape: Sequence[int] | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    shape = tuple(x.shape) if shape is None else tuple(shape)
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if t.dtype != x.dtype:
        raise ValueError(f"{name} must have x's dtype {x.dtype}, got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{name} must be on x's device {x.device}, got {t.device}")


def _check_x(x, model_out) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in STORAGE_DTYPES:
        raise ValueError(f"x must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"x must have a non-empty batch dimension 0, got shape {tuple(x.shape)}")
    _check_like("model_out", model_out, x)


def _index(name: str, value) -> int:
    """value as a Python int: ints and numpy integers pass; floats, bools, tensors and the rest are refused."""
    if isinstance(value, (bool, torch.Tensor)) or not hasattr(type(value), "__index__"):
        raise ValueError(f"{name} must be an integer (int or numpy integer), got {value!r}")
    return operator.index(value)


def _indices(name: str, values) -> list[int]:
    """A sequence of integers (see _index) as a list of ints."""
    if isinstance(values, (str, bytes, torch.Tensor)) or not hasattr(values, "__iter__"):
        raise ValueError(f"{name} must be a sequence of integers, got {values!r}")
    return [_index(f"{name}[{i}]", v) for i, v in enumerate(values)]


def _has_data(t: torch.Tensor) -> bool:
    """Whether t has real memory to inspect (not meta, not traced by torch.compile)."""
    return not torch.compiler.is_compiling() and t.device.type != "meta"


def _span(operand) -> tuple[int, int]:
    """The byte range [first, end) an operand can touch: a tensor, or (tensor, j) for its slot tensor[j] (no
    view is made: views would be dispatched ops)."""
    t, slot = operand if isinstance(operand, tuple) else (operand, None)
    if t.is_contiguous():  # the common case, without a pass over the dims
        n = t.numel() * t.element_size()
        if n == 0:
            return 0, 0
        if slot is not None:
            n //= t.shape[0]
        start = t.data_ptr() + (slot or 0) * n
        return start, start + n
    shape, stride, start = t.shape, t.stride(), t.data_ptr()
    if slot is not None:
        shape, stride, start = shape[1:], stride[1:], start + slot * stride[0] * t.element_size()
    if 0 in shape:
        return 0, 0
    extent = 1 + sum((n - 1) * abs(st) for n, st in zip(shape, stride))
    return start, start + extent * t.element_size()


def _check_no_overlap(written: dict, read: dict) -> None:
    """Refuse an operand whose memory range meets a buffer the op writes in place (the kernels read elements
    after writing others, unlike the reference: the result would depend on the backend). written / read: name
    -> tensor, (tensor, slot) or None; a written buffer may be read by itself. Spans, not elements: two
    interleaved views of one buffer count as overlapping."""
    if all(w is None for w in written.values()):
        return
    operands = [(n, o) for n, o in (*written.items(), *read.items()) if o is not None]
    first = operands[0][1]
    if not _has_data(first[0] if isinstance(first, tuple) else first):
        return
    spans = {n: _span(o) for n, o in operands}
    for name, w in written.items():
        if w is None:
            continue
        w0, w1 = spans[name]
        for other, (o0, o1) in spans.items():
            if other != name and w0 < o1 and o0 < w1:
                raise ValueError(f"{other} shares memory with {name}, which the op writes in place: pass separate "
                                 f"buffers (e.g. {other}.clone())")


def _check_history(history, x, write_slot, read_slots) -> None:
    """history (slots, *x.shape) with write_slot and read_slots inside it and distinct (write_slot None: none)."""
    if history is None:
        if read_slots:
            raise ValueError("read_slots given without a history")
        return
    if not isinstance(history, torch.Tensor) or history.dim() != x.dim() + 1:
        raise ValueError(f"history must be a tensor of shape (slots, *x.shape), got "
                         f"{tuple(history.shape) if isinstance(history, torch.Tensor) else type(history).__name__}")
    _check_like("history", history, x, (history.shape[0], *x.shape))
    slots = history.shape[0]
    if write_slot is not None and not 0 <= write_slot < slots:
        raise ValueError(f"write_slot must be in [0, {slots}), got {write_slot}")
    for r in read_slots:
        if not 0 <= r < slots or r == write_slot:
            raise ValueError(f"read_slots must be in [0, {slots}) and differ from write_slot={write_slot}, "
                             f"got {list(read_slots)}")


def _check_nan(model_out, check_nan: bool) -> None:
    """With check_nan: refuse a model output with NaN or +-inf (one reduction and a host sync; not on meta).
    min and max carry a NaN or an inf anywhere into two scalars: one read, 10x cheaper than isfinite().all()."""
    if (check_nan and _has_data(model_out) and model_out.numel()
            and not torch.isfinite(torch.stack(torch.aminmax(model_out))).all()):
        raise ValueError("model_out contains non-finite values (NaN or inf: the model diverged or got bad input); "
                         "pass check_nan=False to skip this check")


def _check_cpu_status(name: str, status: torch.Tensor) -> None:
    """A backend that clamps and flags, on CPU tensors: read the status word now (free; the C++ CPU kernels
    raise by themselves)."""
    if name != "cpu" and status.device.type == "cpu" and not torch.compiler.is_compiling():
        error_flags.check(status)
