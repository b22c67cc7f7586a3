"""The fused solver step and its indexed form: UpdateCoeffs / StateRow (a step's host coefficients),
multistep_update, step_table / StepTable (a schedule's coefficients on the device) and multistep_update_indexed,
with their argument checks."""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch

from .. import error_flags, reference, step_row
from .backends import _select_backend
from .operands import _check_cpu_status, _check_history, _check_like, _check_nan, _check_no_overlap, _check_x, \
    _index, _indices
from .registry import run

MAX_HISTORY_READS = reference.MAX_HISTORY_READS
MAX_DIRECTIONS = reference.MAX_DIRECTIONS
MAX_PER_SAMPLE_STEPS = 65535  # csrc/multistep_update.h kMaxPerSampleSteps (the CUDA grid's second dimension)


@dataclass(frozen=True)
class StateRow:
    """The new state of a step: s' = a x + e out + b[0] m_0 + sum_{i>=1} b[i] m_i + c z + g s."""

    a: float
    b: tuple[float, ...]
    e: float = 0.0
    c: float = 0.0
    g: float = 0.0


@dataclass(frozen=True)
class UpdateCoeffs:
    """Host-side (float64) coefficients of one fused step.

        m_0 = p x + q out + sum_{i>=1} r[i-1] m_i,    x' = a x + e out + b[0] m_0 + sum_{i>=1} b[i] m_i + c z + g s

    (r, the weights of the history reads in m_0: GHVB's momentum, DC-Solver's compensation; empty otherwise.)

    eps_of: (alpha, sigma) of x = alpha x0 + sigma eps when m_0 is a noise prediction eps rather than the data
    prediction (DPM-Solver, DEIS, UniPC without predict_x0); thresholding then acts on x0 (step_row.row).

    s is the optional state tensor (UniPC's corrected sample, Heun's step start, a momentum); with a
    `state` row it is rewritten in the same pass.
    """

    p: float
    q: float
    a: float
    b: tuple[float, ...]
    e: float = 0.0
    c: float = 0.0
    g: float = 0.0
    state: StateRow | None = None
    r: tuple[float, ...] = ()
    eps_of: tuple[float, float] | None = None


def _check_coeffs(name: str, coeffs, n_reads: int) -> None:
    """An UpdateCoeffs for a step with n_reads history reads: b (and state.b) of 1 + n_reads, r of <= n_reads."""
    if not isinstance(coeffs, UpdateCoeffs):
        raise ValueError(f"{name} must be an UpdateCoeffs, got {type(coeffs).__name__}")
    if n_reads > MAX_HISTORY_READS:
        raise ValueError(f"read_slots: at most {MAX_HISTORY_READS} history terms are supported, got {n_reads}")
    if len(coeffs.r) > n_reads:
        raise ValueError(f"{name}.r weighs history reads in m_0: at most len(read_slots) = {n_reads} "
                         f"entries, got {len(coeffs.r)}")
    if len(coeffs.b) != 1 + n_reads:
        raise ValueError(f"{name}.b must have 1 + len(read_slots) = {1 + n_reads} entries, got {len(coeffs.b)}")
    if coeffs.state is not None and len(coeffs.state.b) != len(coeffs.b):
        raise ValueError(f"{name}.state.b must have {len(coeffs.b)} entries like {name}.b, got "
                         f"{len(coeffs.state.b)}")


def _check_update_args(x, model_out, coeffs, history, write_slot, read_slots, noise, clip, threshold_ratio,
                       threshold_max, state, check_nan) -> None:
    _check_x(x, model_out)
    _check_coeffs("coeffs", coeffs, len(read_slots))
    _check_history(history, x, write_slot, read_slots)
    if noise is not None:
        _check_like("noise", noise, x)
    elif coeffs.c != 0 or (coeffs.state is not None and coeffs.state.c != 0):
        raise ValueError("noise is required: the noise coefficient coeffs.c (or coeffs.state.c) is not 0")
    if state is not None:
        _check_like("state", state, x)
    elif coeffs.g != 0 or coeffs.state is not None:
        raise ValueError("state is required: coeffs.g != 0 or coeffs.state is set")
    if clip is not None and not clip > 0:
        raise ValueError(f"clip must be > 0 or None, got {clip}")
    if clip is not None and coeffs.eps_of is not None and threshold_ratio is None:
        raise ValueError("clip acts on the data prediction, and these coeffs keep a noise prediction (coeffs.eps_of); "
                         "the fused op clips it only together with thresholding (threshold_ratio)")
    _check_threshold(threshold_ratio, threshold_max)
    _check_nan(model_out, check_nan)


def _check_threshold(threshold_ratio, threshold_max) -> None:
    """threshold_ratio: None (off) or the quantile in [0, 1]; threshold_max > 0 (below 1 the bound is threshold_max
    itself, as torch.clamp(q, 1, max) gives)."""
    if threshold_ratio is None:
        return
    if isinstance(threshold_ratio, bool) or not isinstance(threshold_ratio, numbers.Real) \
            or not 0 <= threshold_ratio <= 1:
        raise ValueError(f"threshold_ratio must be None (no thresholding) or a quantile in [0, 1], got "
                         f"{threshold_ratio!r}")
    if isinstance(threshold_max, bool) or not isinstance(threshold_max, numbers.Real) or not threshold_max > 0:
        raise ValueError(f"threshold_max must be a number > 0, got {threshold_max!r}")


def multistep_update(
    x: torch.Tensor,
    model_out: torch.Tensor,
    coeffs: UpdateCoeffs | torch.Tensor,
    *,
    history: torch.Tensor | None = None,
    write_slot: int = 0,
    read_slots: Sequence[int] = (),
    noise: torch.Tensor | None = None,
    clip: float | None = None,
    threshold_ratio: float | None = None,
    threshold_max: float = 1.0,
    state: torch.Tensor | None = None,
    dirs: torch.Tensor | None = None,
    dir_slot: int = 0,
    dir_coeffs: Sequence[float] = (),
    dir_weights: torch.Tensor | None = None,
    guide: torch.Tensor | None = None,
    guide_scale: float = 0.0,
    check_nan: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """One fused solver step: convert, optionally clip / threshold, update, write history; returns x'.

        out = out + guide_scale guide              (guide given: guidance's term, in every use of out below)
        m_0 = p x + q out + sum_i r[i-1] history[read_slots[i-1]]   (raw output -> data prediction)
        m_0 = clamp(m_0, -clip, clip)              (clip)
        m_0 = clamp(m_0, -s, s) / s,  s = clamp(quantile(|m_0|, threshold_ratio), 1, threshold_max) per sample
                                                   (threshold_ratio not None; on x0 when coeffs.eps_of is set,
                                                   m_0 = (x - alpha x0) / sigma after it)
        x'  = a x + e out + b[0] m_0 + sum_i b[i] history[read_slots[i-1]] + c noise + g state
        state = (coeffs.state row, the same terms)  if coeffs.state is set
        history[write_slot] = m_0

    LML's low-rank correction (diffsampler.lml builds these arguments), with dirs a ring of R past raw
    directions of shape (R, *x.shape):
        d    = da x + de out + db[0] m_0 + sum_i db[i] history[read_slots[i-1]]   (dir_coeffs = [da, de, db...])
        x'  += W[b, 0] d + sum_j W[b, 1 + j] dirs[j]                               (dir_weights W: (B, 1 + R))
        dirs[dir_slot] = d

    All operands share x's shape, dtype and device; history has shape (slots, *x.shape) and is written in
    place, and so are `state` when coeffs.state is set and `dirs`.
    Computes in float32 (float64 for float64 inputs, on the reference). ``check_nan`` scans model_out for NaN
    and inf (one reduction and a host sync per call); turn it off in graph-captured or compiled loops.
    Written buffers (history[write_slot], a rewritten state, dirs[dir_slot]) must not share memory with the
    other operands (docs/validation.md).

    Heterogeneous batches: coeffs may instead be a (B, step_row.WIDTH) float64 tensor on x's device, one step
    row per sample (ops.step_rows, or rows computed on the device), with the same history slots for every
    sample; history and state must then be contiguous, and neither thresholding nor LML applies. The rows are
    device data, so their noise, state and guide terms apply where noise / state / guide are given and are
    dropped otherwise (each row's guide weight is its step_row.GUIDE entry; guide_scale must stay 0).
    """
    write_slot, read_slots, dir_slot = _index("write_slot", write_slot), _indices("read_slots", read_slots), \
        _index("dir_slot", dir_slot)
    _check_guide(guide, guide_scale, x, per_sample_rows=isinstance(coeffs, torch.Tensor))
    if isinstance(coeffs, torch.Tensor):
        return _update_rows(x, model_out, coeffs, history, write_slot, read_slots, noise, clip, threshold_ratio,
                            state, dirs, guide, check_nan, backend)
    _check_update_args(x, model_out, coeffs, history, write_slot, read_slots, noise, clip, threshold_ratio,
                       threshold_max, state, check_nan)
    lml = _check_dir_args(x, read_slots, dirs, dir_slot, dir_coeffs, dir_weights)
    _check_no_overlap({"history[write_slot]": (history, write_slot) if history is not None else None,
                       "state": state if coeffs.state is not None else None,
                       "dirs[dir_slot]": (dirs, dir_slot) if lml else None},
                      {"x": x, "model_out": model_out, "noise": noise, "state": state, "dir_weights": dir_weights,
                       "guide": guide, **{f"history[{r}]": (history, r) for r in read_slots},
                       **{f"dirs[{j}]": (dirs, j) for j in range(dirs.shape[0] if lml else 0) if j != dir_slot}})
    thresholding = threshold_ratio is not None
    row = step_row.cached_row(coeffs, threshold=(threshold_ratio, threshold_max) if thresholding else None)
    if guide is not None:
        row = step_row.with_guide(row, guide_scale)
    args = (x, model_out, history, int(write_slot), read_slots, row, noise, float(clip or 0.0), thresholding, state,
            dirs, int(dir_slot), [float(v) for v in dir_coeffs], dir_weights, guide)
    return run("multistep_update", _select_backend(backend, x), *args)


def _check_guide(guide, guide_scale, x, per_sample_rows: bool = False) -> None:
    """guide: None or a tensor like x; guide_scale a finite number, 0 without a guide or with per-sample rows
    (whose guide weights are their own)."""
    if guide is not None:
        _check_like("guide", guide, x)
    if isinstance(guide_scale, bool) or not isinstance(guide_scale, numbers.Real) or not math.isfinite(guide_scale):
        raise ValueError(f"guide_scale must be a finite number, got {guide_scale!r}")
    if guide_scale != 0 and guide is None:
        raise ValueError("guide is required: guide_scale is not 0")
    if guide_scale != 0 and per_sample_rows:
        raise ValueError("guide_scale is a per-sample rows' own field (step_row.GUIDE): leave guide_scale at 0")


def step_rows(coeffs: Sequence[UpdateCoeffs], device: torch.device | str = "cpu",
              writes_state: bool | None = None) -> torch.Tensor:
    """The (len(coeffs), step_row.WIDTH) float64 rows of per-sample coefficients, sample b stepping with
    coeffs[b] (multistep_update's heterogeneous form; writes_state as step_row.row)."""
    if len(coeffs) == 0:
        raise ValueError("coeffs must hold one UpdateCoeffs per sample, got none")
    for b, k in enumerate(coeffs):
        if not isinstance(k, UpdateCoeffs):
            raise ValueError(f"coeffs[{b}] must be an UpdateCoeffs, got {type(k).__name__}")
    return torch.tensor([step_row.row(k, writes_state) for k in coeffs], dtype=torch.float64, device=device)


@functools.lru_cache(maxsize=64)
def _shared_slots(write_slot: int, read_slots: tuple[int, ...], batch: int, device: torch.device):
    """(slots, step) of an eager per-sample call: every sample's slots row [write, reads.., 0..] and step b."""
    row = [write_slot, *read_slots] + [0] * (step_row.SLOTS_WIDTH - 1 - len(read_slots))
    return (torch.tensor([row], dtype=torch.int64, device=device).expand(batch, -1).contiguous(),
            torch.arange(batch, dtype=torch.int64, device=device))


def _update_rows(x, model_out, rows, history, write_slot, read_slots, noise, clip, threshold_ratio, state, dirs,
                 guide, check_nan, backend) -> torch.Tensor:
    """multistep_update with one step row per sample: the indexed op over the rows, sample b taking row b."""
    _check_x(x, model_out)
    if not (rows.dtype == torch.float64 and tuple(rows.shape) == (x.shape[0], step_row.WIDTH)
            and rows.device == x.device):
        raise ValueError(f"coeffs as a tensor must be the float64 step rows of every sample, shape (B, "
                         f"step_row.WIDTH) = {(x.shape[0], step_row.WIDTH)} on x's device {x.device}, got "
                         f"{rows.dtype} {tuple(rows.shape)} on {rows.device}")
    if threshold_ratio is not None or dirs is not None:
        raise ValueError("per-sample coeffs rows support neither thresholding (threshold_ratio) nor LML (dirs)")
    if len(read_slots) > MAX_HISTORY_READS:
        raise ValueError(f"read_slots: at most {MAX_HISTORY_READS} history terms are supported, got {len(read_slots)}")
    _check_history(history, x, write_slot, read_slots)
    for name, t in (("history", history), ("state", state)):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous with per-sample coeffs rows (written in place)")
    _check_nan(model_out, check_nan)
    slots, step = _shared_slots(write_slot, tuple(read_slots), x.shape[0], x.device)
    table = StepTable(rows.contiguous(), slots, len(read_slots), state is not None,
                      history.shape[0] if history is not None else None)
    return multistep_update_indexed(x, model_out, table, step, history=history, noise=noise, clip=clip, state=state,
                                    guide=guide, backend=backend)


def _check_dir_args(x, read_slots, dirs, dir_slot, dir_coeffs, dir_weights) -> bool:
    """Checks LML's operands of multistep_update / lml_gram; True when LML is on (dirs given)."""
    if dirs is None:
        if dir_weights is not None or len(dir_coeffs):
            raise ValueError("dir_coeffs / dir_weights need dirs (LML's ring of directions)")
        return False
    if not isinstance(dirs, torch.Tensor) or dirs.dim() != x.dim() + 1 or not 1 <= dirs.shape[0] <= MAX_DIRECTIONS:
        raise ValueError(f"dirs must be a tensor of shape (R, *x.shape) with 1 <= R <= {MAX_DIRECTIONS}, got "
                         f"{tuple(dirs.shape) if isinstance(dirs, torch.Tensor) else type(dirs).__name__}")
    _check_like("dirs", dirs, x, (dirs.shape[0], *x.shape))
    if len(dir_coeffs) != 3 + len(read_slots):
        raise ValueError(f"dir_coeffs must have 3 + len(read_slots) = {3 + len(read_slots)} entries "
                         f"[da, de, db_0, ..., db_k], got {len(dir_coeffs)}")
    if not 0 <= dir_slot < dirs.shape[0]:
        raise ValueError(f"dir_slot must be in [0, {dirs.shape[0]}), got {dir_slot}")
    if dir_weights is not None:
        if not isinstance(dir_weights, torch.Tensor) or tuple(dir_weights.shape) != (x.shape[0], dirs.shape[0] + 1):
            raise ValueError(f"dir_weights must have shape (B, 1 + R) = {(x.shape[0], dirs.shape[0] + 1)}, got "
                             f"{tuple(dir_weights.shape) if isinstance(dir_weights, torch.Tensor) else dir_weights}")
        if dir_weights.device != x.device:
            raise ValueError(f"dir_weights must be on x's device {x.device}, got {dir_weights.device}")
    return True


# ---- indexed steps: a whole schedule's coefficients on the device, read by step index ----


class StepTable(NamedTuple):
    """The coefficients and history slots of a whole schedule on the device (made once, host float64 math):

        coeffs[i] = the step row of step i (diffsampler.step_row)   (steps, step_row.WIDTH) float64
        slots[i]  = [write_slot, read_0, read_1, read_2]            (steps, step_row.SLOTS_WIDTH) int64

    n_reads: the reads every step makes (a step with fewer reads gets zero weights on distinct unused slots);
    state: whether the steps read and rewrite a state (a step without a state row keeps it: sg = 1);
    history_slots: the history size the slots address (a history with fewer slots is refused); None for a
    hand-made table, whose slots are then clamped into the history on the device (and flagged)."""

    coeffs: torch.Tensor
    slots: torch.Tensor
    n_reads: int
    state: bool
    history_slots: int | None = None


def step_table(coeffs: Sequence[UpdateCoeffs], write_slots: Sequence[int], read_slots: Sequence[Sequence[int]],
               history_slots: int, state: bool, device: torch.device | str = "cpu") -> StepTable:
    """A StepTable of the steps (coeffs[i], write_slots[i], read_slots[i]) over a history of history_slots."""
    n = len(coeffs)
    if not (n == len(write_slots) == len(read_slots)) or n == 0:
        raise ValueError(f"coeffs, write_slots and read_slots must be non-empty and of equal length, got {n}, "
                         f"{len(write_slots)}, {len(read_slots)}")
    history_slots = _index("history_slots", history_slots)
    write_slots = _indices("write_slots", write_slots)
    read_slots = [_indices(f"read_slots[{i}]", r) for i, r in enumerate(read_slots)]
    n_reads = max(len(r) for r in read_slots)
    if n_reads > MAX_HISTORY_READS:
        raise ValueError(f"read_slots: at most {MAX_HISTORY_READS} reads per step, got {n_reads}")
    if history_slots < 0 or (n_reads and history_slots <= n_reads):
        raise ValueError(f"history_slots must exceed the reads per step ({n_reads}), got {history_slots}")
    rows, slot_rows = [], []
    for i, (k, w, reads) in enumerate(zip(coeffs, write_slots, read_slots)):
        _check_coeffs(f"coeffs[{i}]", k, len(reads))
        if (k.g != 0 or k.state is not None) and not state:
            raise ValueError(f"coeffs[{i}] uses a state: pass state=True")
        if history_slots:
            _check_history(torch.empty(history_slots, 1), torch.empty(1), w, reads)
        pad = [j for j in range(history_slots) if j != w and j not in reads][:n_reads - len(reads)]
        rows.append(step_row.row(k, writes_state=state))
        slots = reads + pad
        slot_rows.append([w if history_slots else 0] + slots + [0] * (MAX_HISTORY_READS - len(slots)))
    return StepTable(torch.tensor(rows, dtype=torch.float64, device=device),
                     torch.tensor(slot_rows, dtype=torch.int64, device=device), n_reads, bool(state), history_slots)


def _check_step_table(table, x, history) -> None:
    """The table's tensors (as ops.step_table makes them) on x's device, and a history with its slots."""
    if not isinstance(table, StepTable):
        raise ValueError(f"table must be an ops.StepTable (ops.step_table), got {type(table).__name__}")
    c, sl = table.coeffs, table.slots
    if not (isinstance(c, torch.Tensor) and c.dtype == torch.float64 and c.dim() == 2 and c.shape[0] >= 1
            and c.shape[1] == step_row.WIDTH and c.is_contiguous()):
        raise ValueError(f"table.coeffs must be a contiguous float64 tensor of shape (steps >= 1, "
                         f"{step_row.WIDTH}), got {getattr(c, 'dtype', type(c).__name__)} "
                         f"{tuple(getattr(c, 'shape', ()))}")
    if not (isinstance(sl, torch.Tensor) and sl.dtype == torch.int64 and tuple(sl.shape) ==
            (c.shape[0], step_row.SLOTS_WIDTH) and sl.is_contiguous()):
        raise ValueError(f"table.slots must be a contiguous int64 tensor of shape ({c.shape[0]}, "
                         f"{step_row.SLOTS_WIDTH}), got {getattr(sl, 'dtype', type(sl).__name__)} "
                         f"{tuple(getattr(sl, 'shape', ()))}")
    if c.device != x.device or sl.device != x.device:
        raise ValueError(f"table must be on x's device {x.device}, got {c.device}")
    if isinstance(table.n_reads, bool) or not isinstance(table.n_reads, int) or \
            not 0 <= table.n_reads <= MAX_HISTORY_READS:
        raise ValueError(f"table.n_reads must be an int in [0, {MAX_HISTORY_READS}], got {table.n_reads!r}")
    if table.n_reads and history is None:
        raise ValueError(f"the table's steps read {table.n_reads} history slots: history is required")
    if history is not None:
        _check_history(history, x, None, ())
        if not history.is_contiguous():
            raise ValueError("history must be contiguous (its slots are addressed on the device)")
        need = max(table.history_slots or 0, table.n_reads + 1)
        if history.shape[0] < need:
            raise ValueError(f"history has {history.shape[0]} slots; the table addresses {need} "
                             f"(history_slots={table.history_slots}, n_reads={table.n_reads})")


def multistep_update_indexed(
    x: torch.Tensor,
    model_out: torch.Tensor,
    table: StepTable,
    step: torch.Tensor,
    *,
    history: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    clip: float | None = None,
    state: torch.Tensor | None = None,
    status: torch.Tensor | None = None,
    guide: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """multistep_update with the coefficients and history slots of step `step` (an int64 tensor on x's device)
    read on the device from `table` (ops.step_table): a captured step replays for every step. step has one
    element, or one per sample (shape (B,)): sample b then takes row step[b], its coefficients and its history
    slots (history[slot, b]), a batch whose samples are at different steps (diffsampler.serve).

    history (contiguous, zeros before the first step: reads without weight must be finite) and state are
    written in place. guide (x's shape): out + w guide replaces out, w the row's step_row.GUIDE entry. No NaN check, no host sync; thresholding and LML are not supported here.

    A step outside the table, or a table slot outside the history, is only known on the device: the kernel
    clamps it into range and sets a bit of `status` (error_flags.new(); None: error_flags.default(x.device)),
    which error_flags.check reads when the caller may sync. CPU tensors are checked at once (a RuntimeError)."""
    _check_x(x, model_out)
    _check_step_table(table, x, history)
    if not (isinstance(step, torch.Tensor) and step.dtype == torch.int64 and step.device == x.device
            and step.dim() <= 1 and step.numel() in (1, x.shape[0])):
        raise ValueError(f"step must be an int64 tensor on x's device {x.device} of one element or one per "
                         f"sample (shape ({x.shape[0]},)), got "
                         f"{getattr(step, 'dtype', type(step).__name__)} {tuple(getattr(step, 'shape', ()))}")
    if step.numel() > 1 and x.shape[0] > MAX_PER_SAMPLE_STEPS:
        raise ValueError(f"per-sample steps take at most {MAX_PER_SAMPLE_STEPS} samples, got {x.shape[0]}")
    status = error_flags.validate(status, x.device)
    if noise is not None:
        _check_like("noise", noise, x)
    if guide is not None:
        _check_like("guide", guide, x)
    if table.state != (state is not None):
        raise ValueError(f"state must be {'given' if table.state else 'None'}: the table was made with "
                         f"state={table.state}")
    if state is not None:
        _check_like("state", state, x)
        if not state.is_contiguous():
            raise ValueError("state must be contiguous (it is written in place)")
    if clip is not None and not clip > 0:
        raise ValueError(f"clip must be > 0 or None, got {clip}")
    _check_no_overlap({"history": history, "state": state}, {"x": x, "model_out": model_out, "noise": noise,
                                                               "guide": guide, "step": step,
                                                               "table.coeffs": table.coeffs})
    args = (x, model_out, history, table.coeffs, table.slots, step, table.n_reads, noise, float(clip or 0.0), state,
            status, guide)
    name = _select_backend(backend, x)
    x_next = run("multistep_update_indexed", name, *args)
    _check_cpu_status(name, status)
    return x_next

