"""The status word of the ops whose indices are only known on the device (docs/validation.md).

A kernel that meets such an index out of range (a step or history slot of multistep_update_indexed, an ancestor of
resample_move, a uniform of resample_ancestors) clamps it into range, so no access leaves its buffer, and ORs an
error bit into an int32 tensor of one element. Reading it is a host sync: ops read it at once for CPU tensors; on
a device the loops call `check` at their end. The bits are those of csrc/cuda/error_flags.h.
"""

from __future__ import annotations

import torch

BITS = {"step": 1, "slot": 2, "ancestor": 4, "uniform": 8}
MEANINGS = {
    "step": "a step index outside the step table",
    "slot": "a step table's history slot outside the history",
    "ancestor": "an ancestor outside [0, K)",
    "uniform": "a resampling uniform outside [0, 1) or NaN (or unsorted for multinomial / residual)",
}

_DEFAULT: dict[torch.device, torch.Tensor] = {}


def new(device: torch.device | str) -> torch.Tensor:
    """A cleared status word on `device`: int32 of shape (1,)."""
    return torch.zeros(1, dtype=torch.int32, device=device)


def default(device: torch.device | str) -> torch.Tensor:
    """The status word ops use on `device` when the caller passes none (made once per device)."""
    device = torch.device(device)
    if device not in _DEFAULT:
        _DEFAULT[device] = new(device)
    return _DEFAULT[device]


def describe(bits: int) -> str:
    """The errors a status value records, in words."""
    return "; ".join(MEANINGS[name] for name, bit in BITS.items() if bits & bit)


def check(status: torch.Tensor | torch.device | str | None = None) -> None:
    """Raise a RuntimeError naming what was clamped if `status` (a status word, or a device: its default word;
    None: every default word made so far) has a bit set, after clearing it. One host sync per word."""
    if status is None:
        words = list(_DEFAULT.values())
    elif isinstance(status, torch.Tensor):
        words = [status]
    else:
        words = [default(status)]
    for word in words:
        bits = int(word.item())
        if bits:
            word.zero_()
            raise RuntimeError(f"diffsampler: a kernel clamped {describe(bits)} (status bits {bits}); the results "
                               f"of that call are not meaningful")


def validate(status: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """`status` checked as a status word on `device`, or the device's default word when None."""
    if status is None:
        return default(device)
    if not (isinstance(status, torch.Tensor) and status.dtype == torch.int32 and status.numel() == 1
            and status.is_contiguous() and status.device == device):
        raise ValueError(f"status must be an int32 tensor of one element on {device} (error_flags.new), got "
                         f"{status.dtype if isinstance(status, torch.Tensor) else type(status).__name__}")
    return status
