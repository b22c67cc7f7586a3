"""Triton kernels of diffsampler (installed as diffsampler.triton_kernels). Importing this package never fails:
`available()` says whether the kernels can run here, and why not."""

from __future__ import annotations

import os


def available() -> tuple[bool, str]:
    """(True, how) when Triton imports and can run: a CUDA device, or TRITON_INTERPRET=1 for CPU tensors."""
    try:
        import triton  # noqa: F401
    except ImportError as err:
        return False, f"triton is not installed ({err}); pip install 'diffsampler[triton]'"
    import torch

    if torch.cuda.is_available():
        return True, "CUDA device"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, "TRITON_INTERPRET=1 (CPU tensors, interpreter)"
    return False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU tensors, slowly)"


def multistep_update_indexed(*args, **kwargs):
    """The indexed step on Triton (signature of diffsampler.reference.multistep_update_indexed)."""
    from .fused_update import multistep_update_indexed as impl

    return impl(*args, **kwargs)


def multistep_update(*args, **kwargs):
    """The fused multistep update on Triton (signature of diffsampler.reference.multistep_update)."""
    from .fused_update import multistep_update as impl

    return impl(*args, **kwargs)


def lml_gram(*args, **kwargs):
    """LML's per-sample Gram on Triton (signature of diffsampler.reference.lml_gram)."""
    from .lml import lml_gram as impl

    return impl(*args, **kwargs)


def resample_ancestors(*args, **kwargs):
    """Normalise, ESS, decision and ancestors on Triton (signature of diffsampler.reference.resample_ancestors)."""
    from .resample import resample_ancestors as impl

    return impl(*args, **kwargs)


def resample_move(*args, **kwargs):
    """The in-place particle move on Triton (signature of diffsampler.reference.resample_move)."""
    from .resample import resample_move as impl

    return impl(*args, **kwargs)
