"""The public fused ops, their argument checks, and the one place that picks a backend.

Dispatch: a CUDA tensor goes to the CUDA extension if built (or JIT-compiled), else Triton, else the torch
reference; a CPU tensor goes to the C++ extension, else the reference. ``backend=`` forces one of
``"reference" | "cpu" | "cuda" | "triton"`` and raises if it is not available for the input.
"""

from __future__ import annotations

import operator
import numbers
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch

from .. import error_flags, reference
from ..models import data_coeffs, noise_coeffs

BACKEND_NAMES = ("reference", "cpu", "cuda", "triton")
FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
STORAGE_DTYPES = FUSED_DTYPES + (torch.float64,)
MAX_HISTORY_READS = reference.MAX_HISTORY_READS
MAX_DIRECTIONS = reference.MAX_DIRECTIONS


def _probe_cpp() -> tuple[bool, str]:
    try:
        from .. import _C  # noqa: F401  (registers torch.ops.diffsampler.*)
    except ImportError as err:
        return False, f"the C++ extension diffsampler._C is not built ({err})"
    return True, "built"


def _probe_cuda() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "no CUDA device (torch.cuda.is_available() is False)"
    ok, why = _status("cpu")
    if not ok:
        return False, why
    from .. import _cuda_jit

    return _cuda_jit.load()


def _probe_triton() -> tuple[bool, str]:
    try:
        from .. import triton_kernels
    except ImportError as err:
        return False, f"diffsampler.triton_kernels does not import ({err})"
    return triton_kernels.available()


_PROBES = {"reference": lambda: (True, "torch ops"), "cpu": _probe_cpp, "cuda": _probe_cuda, "triton": _probe_triton}
_STATUS: dict[str, tuple[bool, str]] = {}  # filled once per backend (a plain dict: torch.compile reads it as a constant)


def _status(name: str) -> tuple[bool, str]:
    if name not in _STATUS:
        _STATUS[name] = _PROBES[name]()
    return _STATUS[name]


def backends() -> dict:
    """Which backends can run here: ``{"reference": True, "cpu": ..., "cuda": ..., "triton": ..., "reasons": {...}}``.

    A reason is given for every backend that is not available. Asking about "cuda" compiles the CUDA kernels
    on first use when the package was installed without them (cached afterwards).
    """
    status = {name: _status(name) for name in BACKEND_NAMES}
    result = {name: ok for name, (ok, _) in status.items()}
    result["reasons"] = {name: why for name, (ok, why) in status.items() if not ok}
    return result


def _select_backend(backend: str, x: torch.Tensor) -> str:
    if backend not in BACKEND_NAMES + ("auto",):
        raise ValueError(f"backend must be one of {('auto',) + BACKEND_NAMES}, got {backend!r}")
    if x.device.type == "meta" and backend == "auto":  # shapes only: the registered ops' fake implementations
        return "cpu" if _status("cpu")[0] and x.dtype in FUSED_DTYPES else "reference"
    if backend == "auto":
        if x.dtype not in FUSED_DTYPES:
            return "reference"
        if x.is_cuda:
            for name in ("cuda", "triton"):
                if _status(name)[0]:
                    return name
            return "reference"
        return "cpu" if x.device.type == "cpu" and _status("cpu")[0] else "reference"
    if backend == "reference":
        return backend
    if x.dtype not in FUSED_DTYPES:
        raise ValueError(f"backend {backend!r} stores float32, float16 or bfloat16; x has dtype {x.dtype}")
    if backend == "cpu" and x.device.type != "cpu":
        raise ValueError(f"backend 'cpu' needs CPU tensors; x is on {x.device}")
    if backend == "cuda" and not x.is_cuda:
        raise ValueError(f"backend 'cuda' needs CUDA tensors; x is on {x.device}")
    ok, why = _status(backend)
    if not ok:
        raise RuntimeError(f"backend {backend!r} is not available: {why}")
    return backend


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
    prediction (DPM-Solver, DEIS, UniPC without predict_x0); thresholding then acts on x0 (threshold_list).

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

    def as_list(self) -> list[float]:
        """The flat layout every backend takes: [p, q, a, e, c, b_0, ..., b_k, r_1, ..., r_k]."""
        r = tuple(self.r) + (0.0,) * (len(self.b) - 1 - len(self.r))
        return [float(v) for v in (self.p, self.q, self.a, self.e, self.c, *self.b, *r)]

    def threshold_lists(self, ratio: float, max_value: float) -> tuple[list[float], list[float]]:
        """(coeffs, threshold_coeffs) of a thresholded step: the conversion yields the data prediction x0, the
        threshold maps it back to the history value. Noise prediction (eps_of = (alpha, sigma)):
        x0 = (x - sigma eps) / alpha applied to m_0 = p x + q out + sum r m_i, then eps = (x - alpha x0) / sigma."""
        flat = self.as_list()
        if self.eps_of is None:
            return flat, [float(ratio), float(max_value), 0.0, 1.0]
        xp, mp = data_coeffs("eps", *self.eps_of)  # x0 = xp x + mp eps
        hx, hm = noise_coeffs("x0", *self.eps_of)  # eps = hx x + hm x0
        k = len(self.b) - 1
        flat[0], flat[1] = xp + mp * flat[0], mp * flat[1]
        flat[6 + k:] = [mp * v for v in flat[6 + k:]]
        return flat, [float(ratio), float(max_value), hx, hm]

    def state_list(self, has_state: bool) -> list[float]:
        """state_coeffs of the backends: [] (no state), [g] (state read) or [g, sa, se, sc, sg, sb_0..sb_k]."""
        if not has_state:
            return []
        if self.state is None:
            return [float(self.g)]
        r = self.state
        return [float(v) for v in (self.g, r.a, r.e, r.c, r.g, *r.b)]


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
    operands = [(n, o) for n, o in (*written.items(), *read.items()) if o is not None]
    first = operands[0][1] if operands else None
    if first is None or not _has_data(first[0] if isinstance(first, tuple) else first):
        return
    for name, w in written.items():
        if w is None:
            continue
        w0, w1 = _span(w)
        for other, o in operands:
            if other == name:
                continue
            o0, o1 = _span(o)
            if w0 < o1 and o0 < w1:
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
    """With check_nan: refuse a model output with NaN or +-inf (one reduction and a host sync; not on meta)."""
    if check_nan and _has_data(model_out) and not torch.isfinite(model_out).all():
        raise ValueError("model_out contains non-finite values (NaN or inf: the model diverged or got bad input); "
                         "pass check_nan=False to skip this check")


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
    coeffs: UpdateCoeffs,
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
    check_nan: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """One fused solver step: convert, optionally clip / threshold, update, write history; returns x'.

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
        g    = gx x + ge out + gb[0] m_0 + sum_i gb[i] history[read_slots[i-1]]   (dir_coeffs = [gx, ge, gb...])
        x'  += W[b, 0] g + sum_j W[b, 1 + j] dirs[j]                               (dir_weights W: (B, 1 + R))
        dirs[dir_slot] = g

    All operands share x's shape, dtype and device; history has shape (slots, *x.shape) and is written in
    place, and so are `state` when coeffs.state is set and `dirs`.
    Computes in float32 (float64 for float64 inputs, on the reference). ``check_nan`` scans model_out for NaN
    and inf (one reduction and a host sync per call); turn it off in graph-captured or compiled loops.
    Written buffers (history[write_slot], a rewritten state, dirs[dir_slot]) must not share memory with the
    other operands (docs/validation.md).
    """
    write_slot, read_slots, dir_slot = _index("write_slot", write_slot), _indices("read_slots", read_slots), \
        _index("dir_slot", dir_slot)
    _check_update_args(x, model_out, coeffs, history, write_slot, read_slots, noise, clip, threshold_ratio,
                       threshold_max, state, check_nan)
    lml = _check_dir_args(x, read_slots, dirs, dir_slot, dir_coeffs, dir_weights)
    _check_no_overlap({"history[write_slot]": (history, write_slot) if history is not None else None,
                       "state": state if coeffs.state is not None else None,
                       "dirs[dir_slot]": (dirs, dir_slot) if lml else None},
                      {"x": x, "model_out": model_out, "noise": noise, "state": state, "dir_weights": dir_weights,
                       **{f"history[{r}]": (history, r) for r in read_slots},
                       **{f"dirs[{j}]": (dirs, j) for j in range(dirs.shape[0] if lml else 0) if j != dir_slot}})
    thresholding = threshold_ratio is not None
    flat, threshold_coeffs = coeffs.threshold_lists(threshold_ratio, threshold_max) if thresholding \
        else (coeffs.as_list(), [])
    args = (x, model_out, history, int(write_slot), read_slots, flat, noise, float(clip or 0.0), thresholding,
            threshold_coeffs, state, coeffs.state_list(state is not None))
    if lml:
        args += (dirs, int(dir_slot), [float(v) for v in dir_coeffs], dir_weights)
    name = _select_backend(backend, x)
    if name == "reference":
        return reference.multistep_update(*args)
    if name == "triton":
        from .. import triton_kernels

        return triton_kernels.multistep_update(*args)
    if history is None and state is None and not lml:  # functional: inductor lowers it, not the mutating one
        return torch.ops.diffsampler.multistep_update_pure(x, model_out, args[5], noise, *args[7:10])
    return torch.ops.diffsampler.multistep_update(*args)


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
                         f"[gx, ge, gb_0, ..., gb_k], got {len(dir_coeffs)}")
    if not 0 <= dir_slot < dirs.shape[0]:
        raise ValueError(f"dir_slot must be in [0, {dirs.shape[0]}), got {dir_slot}")
    if dir_weights is not None:
        if not isinstance(dir_weights, torch.Tensor) or tuple(dir_weights.shape) != (x.shape[0], dirs.shape[0] + 1):
            raise ValueError(f"dir_weights must have shape (B, 1 + R) = {(x.shape[0], dirs.shape[0] + 1)}, got "
                             f"{tuple(dir_weights.shape) if isinstance(dir_weights, torch.Tensor) else dir_weights}")
        if dir_weights.device != x.device:
            raise ValueError(f"dir_weights must be on x's device {x.device}, got {dir_weights.device}")
    return True


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
    backend: str = "auto",
) -> torch.Tensor:
    """LML's per-sample Gram matrix, float64 of shape (B, 1 + R, 1 + R): G[b] = V_b^T V_b with
    V = [g, dirs[0], ..., dirs[R-1]] and g = gx x + ge out + gb[0] m_0 + sum_i gb[i] history[read_slots[i-1]],
    m_0 as multistep_update computes it (clip included, no thresholding). One read-only pass; sums over all
    non-batch dimensions in a fixed order (reproducible run to run).
    """
    read_slots = _indices("read_slots", read_slots)
    _check_x(x, model_out)
    _check_history(history, x, None, read_slots)
    _check_coeffs("coeffs", coeffs, len(read_slots))
    if dirs is None:
        raise ValueError("dirs is required (LML's ring of directions)")
    _check_dir_args(x, read_slots, dirs, 0, dir_coeffs, None)
    args = (x, model_out, history, read_slots, coeffs.as_list(), float(clip or 0.0), dirs,
            [float(v) for v in dir_coeffs])
    name = _select_backend(backend, x)
    if name == "reference":
        return reference.lml_gram(*args)
    if name == "triton":
        from .. import triton_kernels

        return triton_kernels.lml_gram(*args)
    return torch.ops.diffsampler.lml_gram(*args)


def lml_weights(gram: torch.Tensor, mix: torch.Tensor, damping: float, scale: float, *,
                backend: str = "auto") -> torch.Tensor:
    """LML's per-sample direction weights W (B, M), float64, from the Gram G (B, M, M) of lml_gram and the
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
    if backend in ("auto", kernel) and kernel is not None and _status(kernel)[0]:
        return torch.ops.diffsampler.lml_weights(*args)
    return reference.lml_weights(*args)


if _status("cpu")[0]:

    @torch.library.register_fake("diffsampler::multistep_update")
    def _multistep_update_fake(x, model_out, history, write_slot, read_slots, coeffs, noise, clip,
                               thresholding, threshold_coeffs, state=None, state_coeffs=(), dirs=None, dir_slot=0,
                               dir_coeffs=(), dir_weights=None):
        return x.new_empty(x.shape)

    @torch.library.register_fake("diffsampler::lml_gram")
    def _lml_gram_fake(x, model_out, history, read_slots, coeffs, clip, dirs, dir_coeffs):
        m = dirs.shape[0] + 1
        return x.new_empty((x.shape[0], m, m), dtype=torch.float64)

    @torch.library.register_fake("diffsampler::lml_weights")
    def _lml_weights_fake(gram, mix, damping, scale):
        return gram.new_empty(gram.shape[:2])

    @torch.library.register_fake("diffsampler::multistep_update_pure")
    def _multistep_update_pure_fake(x, model_out, coeffs, noise, clip, thresholding, threshold_coeffs):
        return x.new_empty(x.shape)


# ---- indexed steps: a whole schedule's coefficients on the device, read by step index ----


class StepTable(NamedTuple):
    """The coefficients and history slots of a whole schedule on the device (made once, host float64 math):

        coeffs[i] = [p, q, a, e, c, b_0..b_3, r_0..r_2, g, sa, se, sc, sg, sb_0..sb_3]   (steps, 21) float64
        slots[i]  = [write_slot, read_0, read_1, read_2]                                 (steps, 4) int64

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
        flat = k.as_list()  # [p, q, a, e, c, b_0..b_k, r_1..r_k]
        b, r = flat[5:6 + len(reads)], flat[6 + len(reads):]
        row = k.state or StateRow(a=0.0, b=(0.0,) * len(b), g=1.0)
        fill = lambda v, m: list(v) + [0.0] * (m - len(v))  # noqa: E731
        rows.append(flat[:5] + fill(b, MAX_HISTORY_READS + 1) + fill(r, MAX_HISTORY_READS)
                    + [k.g, row.a, row.e, row.c, row.g] + fill(row.b, MAX_HISTORY_READS + 1))
        slot_rows.append([w if history_slots else 0] + fill(reads + pad, MAX_HISTORY_READS))
    return StepTable(torch.tensor(rows, dtype=torch.float64, device=device),
                     torch.tensor(slot_rows, dtype=torch.int64, device=device), n_reads, bool(state), history_slots)


def _check_step_table(table, x, history) -> None:
    """The table's tensors (as ops.step_table makes them) on x's device, and a history with its slots."""
    if not isinstance(table, StepTable):
        raise ValueError(f"table must be an ops.StepTable (ops.step_table), got {type(table).__name__}")
    c, sl = table.coeffs, table.slots
    if not (isinstance(c, torch.Tensor) and c.dtype == torch.float64 and c.dim() == 2 and c.shape[0] >= 1
            and c.shape[1] == reference.ROW_WIDTH and c.is_contiguous()):
        raise ValueError(f"table.coeffs must be a contiguous float64 tensor of shape (steps >= 1, "
                         f"{reference.ROW_WIDTH}), got {getattr(c, 'dtype', type(c).__name__)} "
                         f"{tuple(getattr(c, 'shape', ()))}")
    if not (isinstance(sl, torch.Tensor) and sl.dtype == torch.int64 and tuple(sl.shape) ==
            (c.shape[0], reference.SLOTS_WIDTH) and sl.is_contiguous()):
        raise ValueError(f"table.slots must be a contiguous int64 tensor of shape ({c.shape[0]}, "
                         f"{reference.SLOTS_WIDTH}), got {getattr(sl, 'dtype', type(sl).__name__)} "
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
    backend: str = "auto",
) -> torch.Tensor:
    """multistep_update with the coefficients and history slots of step `step` (an int64 tensor of one element
    on x's device) read on the device from `table` (ops.step_table): a captured step replays for every step.

    history (contiguous, zeros before the first step: reads without weight must be finite) and state are
    written in place. No NaN check, no host sync; thresholding and LML are not supported here.

    A step outside the table, or a table slot outside the history, is only known on the device: the kernel
    clamps it into range and sets a bit of `status` (error_flags.new(); None: error_flags.default(x.device)),
    which error_flags.check reads when the caller may sync. CPU tensors are checked at once (a RuntimeError)."""
    _check_x(x, model_out)
    _check_step_table(table, x, history)
    if not (isinstance(step, torch.Tensor) and step.numel() == 1 and step.dtype == torch.int64
            and step.device == x.device):
        raise ValueError(f"step must be an int64 tensor of one element on x's device {x.device}")
    status = error_flags.validate(status, x.device)
    if noise is not None:
        _check_like("noise", noise, x)
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
                                                               "step": step, "table.coeffs": table.coeffs})
    args = (x, model_out, history, table.coeffs, table.slots, step, table.n_reads, noise, float(clip or 0.0), state,
            status)
    name = _select_backend(backend, x)
    if name == "reference":
        x_next = reference.multistep_update_indexed(*args)
    elif name == "triton":
        from .. import triton_kernels

        x_next = triton_kernels.multistep_update_indexed(*args)
    else:
        x_next = torch.ops.diffsampler.multistep_update_indexed(*args)
    _check_cpu_status(name, status)
    return x_next


def _check_cpu_status(name: str, status: torch.Tensor) -> None:
    """A backend that clamps and flags, on CPU tensors: read the status word now (free; the C++ CPU kernels
    raise by themselves)."""
    if name != "cpu" and status.device.type == "cpu" and not torch.compiler.is_compiling():
        error_flags.check(status)


if _status("cpu")[0]:

    @torch.library.register_fake("diffsampler::multistep_update_indexed")
    def _multistep_update_indexed_fake(x, model_out, history, table, slots, step, n_reads, noise, clip, state,
                                       status=None):
        return x.new_empty(x.shape)


# ---- ems_update: one step with per-element coefficient tensors (DPM-Solver-v3, solvers/dpmv3.py) ----


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
        x'  = A x + G s + sum_i B_i m_i + C          m_i = history[read_slots[i-1]], i >= 1
        s'  = As x + Gs s + sum_i Bs_i m_i + Cs      (the state row, when coeffs has it)
        history[write_slot] = m_0

    coeffs: float32 (float64 for float64 x) of shape (rows, *x.shape[1:]), rows [P, Q, A, G, B_0..B_k, C]
    (+ [As, Gs, Bs_0..Bs_k, Cs]), k = len(read_slots) <= 3. DPM-Solver-v3 precomputes them per step from its
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
    name = _select_backend(backend, x)
    if name == "reference":
        return reference.ems_update(*args)
    if name == "triton":
        from ..triton_kernels.ems_update import ems_update as triton_ems_update

        return triton_ems_update(*args)
    return torch.ops.diffsampler.ems_update(*args)


# ---------------------------------------------------------------------------------------------------------------
# Resampling (SMC building block; docs/smc.md)

RESAMPLE_METHODS = reference.METHODS
RESAMPLE_MOVES = ("inplace", "gather")


class ResampleResult(tuple):
    """``(particles, log_w, ancestors, ess)``; unpacks as that 4-tuple. Also on device, without a sync:
    ``resampled`` (G,) bool, whether each group was resampled, and ``log_norm`` (G,), the logsumexp of the incoming
    log-weights (NaN for a degenerate group): summed over steps it is the log marginal-likelihood estimate."""

    def __new__(cls, particles, log_w, ancestors, ess, resampled, log_norm):
        self = super().__new__(cls, (particles, log_w, ancestors, ess))
        self.resampled, self.log_norm = resampled, log_norm
        return self

    particles = property(lambda self: self[0])
    log_w = property(lambda self: self[1])
    ancestors = property(lambda self: self[2])
    ess = property(lambda self: self[3])


def resample_uniforms(method: str, G: int, K: int, generator: torch.Generator | None,
                      device: torch.device) -> torch.Tensor:
    """The uniforms the kernels take, float64: (G, 1) for systematic, (G, K) for stratified, and (G, K) sorted per
    group for multinomial and residual (their draws are positions of sorted uniforms)."""
    u = torch.rand(G, 1 if method == "systematic" else K, dtype=torch.float64, generator=generator, device=device)
    return u.sort(1).values if method in ("multinomial", "residual") else u


def ancestor_rows(ancestors: torch.Tensor) -> torch.Tensor:
    """Global row indices (G K,) of within-group ancestors (G, K): row g K + ancestors[g, k] of the particles
    (G K, ...), e.g. for particles.index_select(0, rows) or a kernel reading particles[ancestors] directly."""
    G, K = ancestors.shape
    return (ancestors + K * torch.arange(G, device=ancestors.device)[:, None]).reshape(-1)


def _check_resample_args(log_w, particles, method, ess_threshold, move, backend) -> None:
    if not isinstance(log_w, torch.Tensor) or log_w.dim() != 2 or 0 in log_w.shape:
        raise ValueError(f"log_w must be a (G, K) tensor with G, K >= 1, got "
                         f"{tuple(log_w.shape) if isinstance(log_w, torch.Tensor) else type(log_w).__name__}")
    if log_w.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"log_w must be float32 or float64, got {log_w.dtype}")
    G, K = log_w.shape
    if K > reference.MAX_PARTICLES:
        raise ValueError(f"log_w: at most {reference.MAX_PARTICLES} particles per group, got K = {K}")
    if method not in RESAMPLE_METHODS:
        raise ValueError(f"method must be one of {RESAMPLE_METHODS}, got {method!r}")
    if ess_threshold is not None and not (isinstance(ess_threshold, (int, float)) and 0 <= ess_threshold <= 1):
        raise ValueError(f"ess_threshold must be None (always resample) or a number in [0, 1], got {ess_threshold!r}")
    if move not in RESAMPLE_MOVES:
        raise ValueError(f"move must be one of {RESAMPLE_MOVES}, got {move!r}")
    if not isinstance(particles, torch.Tensor):
        raise ValueError(f"particles must be a torch.Tensor, got {type(particles).__name__}")
    flat = particles.dim() >= 1 and particles.shape[0] == G * K
    if not (flat or (particles.dim() >= 2 and tuple(particles.shape[:2]) == (G, K))):
        raise ValueError(f"particles must have shape (G*K, ...) = ({G * K}, ...) or (G, K, ...) = ({G}, {K}, ...) "
                         f"for log_w of shape {(G, K)}, got {tuple(particles.shape)}")
    if particles.device != log_w.device:
        raise ValueError(f"particles must be on log_w's device {log_w.device}, got {particles.device}")
    if backend not in ("auto", "reference") and log_w.dtype != torch.float32:
        raise ValueError(f"backend {backend!r} takes float32 log_w; got {log_w.dtype} (use backend='reference')")


def draw_ancestors(log_w: torch.Tensor, method: str, ess_threshold: float | None,
                   generator: torch.Generator | None, backend: str = "auto") -> tuple[str, tuple]:
    """The decision half of `resample` on checked arguments: draws the uniforms from `generator` and runs the
    backend's resample_ancestors; returns (backend name, (log_w_out, ancestors, ess, resampled, log_norm))."""
    G, K = log_w.shape
    uniforms = resample_uniforms(method, G, K, generator, log_w.device)
    status = error_flags.default(log_w.device)
    args = (log_w, uniforms, RESAMPLE_METHODS.index(method), float("inf") if ess_threshold is None
            else float(ess_threshold), status)
    name = _select_backend(backend, log_w)
    if name == "reference":
        out = reference.resample_ancestors(*args)
    elif name == "triton":
        from .. import triton_kernels

        out = triton_kernels.resample_ancestors(*args)
    else:
        out = torch.ops.diffsampler.resample_ancestors(*args)
    return name, out


def move_particles(name: str, particles: torch.Tensor, ancestors: torch.Tensor, resampled: torch.Tensor,
                   status: torch.Tensor | None = None) -> None:
    """In place: particles[g K + k] = particles[g K + ancestors[g, k]] where ancestors[g, k] != k in resampled
    groups (the move half of `resample`, on backend `name`); sources must be rows that are not written.

    ancestors (G, K) int64 and resampled (G,) bool on particles' device. An ancestor of a resampled group outside
    [0, K) is clamped into the group and sets a bit of `status` (None: error_flags.default of the device);
    CPU tensors raise at once."""
    if not (isinstance(ancestors, torch.Tensor) and ancestors.dtype == torch.int64 and ancestors.dim() == 2
            and 0 not in ancestors.shape):
        raise ValueError(f"ancestors must be a (G, K) int64 tensor with G, K >= 1, got "
                         f"{getattr(ancestors, 'dtype', type(ancestors).__name__)} "
                         f"{tuple(getattr(ancestors, 'shape', ()))}")
    G, K = ancestors.shape
    if not (isinstance(resampled, torch.Tensor) and resampled.dtype == torch.bool and tuple(resampled.shape) == (G,)):
        raise ValueError(f"resampled must be a ({G},) bool tensor, got {getattr(resampled, 'dtype', resampled)}")
    if not isinstance(particles, torch.Tensor) or not (
            (particles.dim() >= 1 and particles.shape[0] == G * K)
            or (particles.dim() >= 2 and tuple(particles.shape[:2]) == (G, K))):
        raise ValueError(f"particles must have shape (G*K, ...) = ({G * K}, ...) or (G, K, ...) = ({G}, {K}, ...), "
                         f"got {tuple(getattr(particles, 'shape', ()))}")
    if ancestors.device != particles.device or resampled.device != particles.device:
        raise ValueError(f"ancestors and resampled must be on particles' device {particles.device}")
    status = error_flags.validate(status, particles.device)
    ancestors, resampled = ancestors.contiguous(), resampled.contiguous()
    if name == "reference":
        reference.resample_move(particles, ancestors, resampled, status)
    elif name == "triton":
        from .. import triton_kernels

        triton_kernels.resample_move(particles, ancestors, resampled, status)
    else:
        torch.ops.diffsampler.resample_move(particles, ancestors, resampled, status)
    _check_cpu_status(name, status)


def resample(
    log_w: torch.Tensor,
    particles: torch.Tensor,
    method: str = "systematic",
    ess_threshold: float | None = None,
    generator: torch.Generator | None = None,
    *,
    move: str = "inplace",
    check: bool = False,
    backend: str = "auto",
) -> ResampleResult:
    """Resample G groups of K particles by their log-weights; returns (particles, log_w, ancestors, ess).

        w = softmax(log_w) per group,  ESS = 1 / sum_k w_k^2,  resampled = ESS < ess_threshold K  (None: always)
        ancestors[g, k] = a: particle k of group g is now the old particle a of the same group (within-group
        index; ancestor_rows gives the global rows); = k where nothing was resampled
        log_w out: -log K in resampled groups, log_w - logsumexp(log_w) (normalised) in the others
        result.log_norm = logsumexp(log_w) per group; result.resampled the (G,) bool decision

    method: "systematic" (u_k = (k + U) / K), "stratified" (u_k = (k + U_k) / K), "multinomial" (K sorted
    uniforms), "residual" (floor(K w_k) copies, the remainder multinomial); the uniforms come from `generator`
    and every backend gives the same ancestors from them. The decision is taken on the device: no host sync.

    particles: (G*K, ...) (group-major) or (G, K, ...), any dtype. move="inplace" (default) overwrites only the
    slots of particles without offspring, in `particles` itself (survivors keep their slots: ancestors[g, k] = k
    whenever particle k has offspring), and returns it; move="gather" returns a new tensor particles[rows] and
    leaves `particles` unchanged.

    A group with a NaN or +inf log-weight, or all -inf, is degenerate: its weights are reset to uniform on the
    device (its log_norm is NaN). check=True raises a ValueError naming such groups (one host sync).

    A 1-D log_w of shape (K,) is one group (as torch.multinomial takes weights): particles (K, ...), and the
    results are shaped like the input (log_w and ancestors (K,), ess, resampled and log_norm 0-dim).
    """
    if isinstance(log_w, torch.Tensor) and log_w.dim() == 1:
        r = resample(log_w[None], particles, method, ess_threshold, generator, move=move, check=check,
                     backend=backend)
        return ResampleResult(r.particles, r.log_w[0], r.ancestors[0], r.ess[0], r.resampled[0], r.log_norm[0])
    _check_resample_args(log_w, particles, method, ess_threshold, move, backend)
    G, K = log_w.shape
    name, (log_w_out, ancestors, ess, resampled, log_norm) = draw_ancestors(log_w, method, ess_threshold,
                                                                            generator, backend)
    if check and not _has_data(log_norm):
        raise ValueError(f"check=True reads the log-weights on the host; not possible on {log_norm.device} tensors")
    if check:
        bad = torch.isnan(log_norm).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"log_w: group(s) {bad} have a NaN or +inf log-weight or all -inf "
                             f"(reset to uniform weights when check=False)")
    if move == "gather":
        particles = particles.reshape(G * K, -1).index_select(0, ancestor_rows(ancestors)).view(particles.shape)
    else:
        move_particles(name, particles, ancestors, resampled)
    return ResampleResult(particles, log_w_out, ancestors, ess, resampled, log_norm)


if _status("cpu")[0]:

    @torch.library.register_fake("diffsampler::ems_update")
    def _ems_update_fake(x, model_out, coeffs, history, write_slot, read_slots, state=None):
        return x.new_empty(x.shape)

    @torch.library.register_fake("diffsampler::resample_ancestors")
    def _resample_ancestors_fake(log_w, uniforms, method, ess_threshold, status=None):
        G, K = log_w.shape
        return (log_w.new_empty(G, K), log_w.new_empty((G, K), dtype=torch.int64), log_w.new_empty(G),
                log_w.new_empty(G, dtype=torch.bool), log_w.new_empty(G))

    @torch.library.register_fake("diffsampler::resample_move")
    def _resample_move_fake(particles, ancestors, resampled, status=None):
        return None
