"""Builds diffsampler._C (C++ CPU kernels + torch.library registrations) and, where torch has CUDA and nvcc
is present (or DIFFSAMPLER_CUDA=1), the CUDA kernels into the same module. Without CUDA at build time the
CUDA part compiles on first use (diffsampler/_cuda_jit.py)."""

import glob
import os

from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
import torch

ROOT = os.path.dirname(os.path.abspath(__file__))


def want_cuda() -> bool:
    flag = os.environ.get("DIFFSAMPLER_CUDA")
    if flag is not None:
        return flag == "1"
    return torch.version.cuda is not None and CUDA_HOME is not None


def cuda_arch_flags() -> list[str]:
    """sm_80 and sm_90, or exactly the architectures TORCH_CUDA_ARCH_LIST names (e.g. "9.0" builds sm_90 alone)."""
    listed = os.environ.get("TORCH_CUDA_ARCH_LIST", "").replace(",", ";").replace(" ", ";").split(";")
    archs = {a.replace(".", "").replace("+PTX", "") for a in listed} - {""}
    archs = {a for a in archs if a.isdigit()} or {"80", "90"}
    return [f"-gencode=arch=compute_{a},code=sm_{a}" for a in sorted(archs)]


def extension():
    cpu_sources = sorted(glob.glob("csrc/*.cpp"))
    cuda_host = [s for s in cpu_sources if s.endswith("_cuda.cpp")]
    cpu_sources = [s for s in cpu_sources if s not in cuda_host]
    cxx = ["-O3", "-fopenmp"] + ([] if os.environ.get("DIFFSAMPLER_PORTABLE") == "1" else ["-march=native"])
    if want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        return CUDAExtension(
            "diffsampler._C",
            cpu_sources + cuda_host + sorted(glob.glob("csrc/cuda/*.cu")),
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=[("DIFFSAMPLER_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"] + cuda_arch_flags()},
            extra_link_args=["-fopenmp"],
        )
    return CppExtension(
        "diffsampler._C",
        cpu_sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
    )


setup(
    packages=["diffsampler", "diffsampler.solvers", "diffsampler.bench", "diffsampler.integrations", "diffsampler.ops",
              "diffsampler.triton_kernels",
              "diffsampler._csrc"],
    package_dir={
        "diffsampler": "python/diffsampler",
        "diffsampler.triton_kernels": "triton_kernels",
        "diffsampler._csrc": "csrc",
    },
    package_data={"diffsampler._csrc": ["*.h", "*.cpp", "cuda/*.h", "cuda/*.cuh", "cuda/*.cu"]},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
)
