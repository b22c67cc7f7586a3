import os
import sys

import pytest

# Triton kernels run on CPU tensors through the interpreter; it must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(__file__))  # the shared helpers (update_cases) import as top-level modules

import update_cases  # noqa: E402


def pytest_report_header(config):
    return f"diffsampler random inputs: DIFFSAMPLER_TEST_SEED={update_cases.SESSION_SEED}"


@pytest.fixture(params=["reference", "cpu", "triton"])
def backend(request):
    """Each backend that runs CPU tensors here (Triton through the interpreter); an unavailable one is skipped
    with the reason."""
    from diffsampler.ops.backends import _status

    ok, why = _status(request.param)
    if not ok:
        pytest.skip(f"backend {request.param!r} is not available: {why}")
    return request.param


@pytest.fixture(params=["cuda", "triton"])
def gpu_backend(request):
    """Each backend that runs CUDA tensors, for tests marked gpu: skipped without a CUDA device, and a backend
    that is not available on one is skipped with the reason. Triton runs compiled for the GPU only with
    TRITON_INTERPRET=0 set (unset, this file turns the interpreter on; scripts/gpu_check.sh sets 0)."""
    import torch

    from diffsampler.ops.backends import _status

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    ok, why = _status(request.param)
    if not ok:
        pytest.skip(f"backend {request.param!r} is not available: {why}")
    return request.param
