"""The CUDA kernels, compiled on first use when the package was installed without them.

`load()` returns (available, reason). When diffsampler._C already has CUDA kernels (installed where torch had
CUDA and nvcc), nothing is compiled; otherwise `torch.utils.cpp_extension.load` builds the CUDA registration
with ninja once, into the user cache dir (keyed by torch version and a hash of the sources), and loads it.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import torch

SOURCES = ("multistep_update.cpp", "multistep_update_cuda.cpp", "cuda/multistep_update.cu",
           "ems_update.cpp", "ems_update_cuda.cpp", "cuda/ems_update.cu", "lml_weights_cuda.cpp", "cuda/lml_weights.cu",
           "resample_cuda.cpp", "cuda/resample.cu", "fkc_update.cpp", "fkc_update_cuda.cpp", "cuda/fkc_update.cu")


def source_dir() -> Path:
    """csrc as installed package data (wheels) or the repository's (editable installs)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_csrc", here.parents[1] / "csrc"):
        if (candidate / SOURCES[-1]).exists():
            return candidate
    raise FileNotFoundError(f"the CUDA sources ({', '.join(SOURCES)}) are not next to the package ({here})")


def _build_dir(src: Path) -> Path:
    digest = hashlib.sha256()
    for name in sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.suffix in (".h", ".cpp", ".cu")):
        digest.update(name.encode())
        digest.update((src / name).read_bytes())
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "diffsampler" / f"cuda-torch{torch.__version__}-{digest.hexdigest()[:12]}"


@functools.cache
def load() -> tuple[bool, str]:
    """(True, how) once torch.ops.diffsampler.multistep_update has CUDA kernels, else (False, why); never raises."""
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is built without CUDA"
    if not torch.cuda.is_available():
        return False, "no CUDA device (torch.cuda.is_available() is False)"
    try:
        from . import _C  # noqa: F401  (defines the op schema the CUDA kernels register under)
    except ImportError as err:
        return False, f"the C++ extension diffsampler._C (the op schema) is not built ({err})"
    if torch._C._dispatch_has_kernel_for_dispatch_key("diffsampler::multistep_update", "CUDA"):
        return True, "built with the package"
    try:
        from torch.utils.cpp_extension import load as jit_load

        src = source_dir()
        build = _build_dir(src)
        build.mkdir(parents=True, exist_ok=True)
        jit_load(name="diffsampler_cuda", sources=[str(src / s) for s in SOURCES], extra_include_paths=[str(src)],
                 extra_cflags=["-O3", "-DDIFFSAMPLER_WITH_CUDA=1"], extra_cuda_cflags=["-O3"],
                 build_directory=str(build), is_python_module=False, verbose=False)
    except Exception as err:  # a missing toolchain must not break the other backends
        return False, f"JIT compilation of the CUDA kernels failed: {err}"
    return True, f"compiled on first use into {build}"
