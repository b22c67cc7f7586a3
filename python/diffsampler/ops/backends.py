"""The backends and the one place that picks one for an op's input.

A CUDA tensor goes to the CUDA extension if built (or JIT-compiled), else Triton, else the torch reference; a CPU
tensor goes to the C++ extension, else the reference. ``backend=`` forces one of
``"reference" | "cpu" | "cuda" | "triton"`` and raises if it is not available for the input.
"""

from __future__ import annotations

import torch

BACKEND_NAMES = ("reference", "cpu", "cuda", "triton")
FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
STORAGE_DTYPES = FUSED_DTYPES + (torch.float64,)


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
