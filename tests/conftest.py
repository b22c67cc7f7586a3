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
