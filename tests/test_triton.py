"""What is Triton's own: its storage dtypes, a loop against the C++ backend, its registered op's opcheck, and
CUDA tensors (its correctness on CPU tensors under TRITON_INTERPRET=1 runs in test_ops.py with every backend)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (conftest.py sets it first, too)

import pytest  # noqa: E402
import torch  # noqa: E402

import diffsampler as ds  # noqa: E402
import diffsampler.triton_kernels  # noqa: F401,E402  (the subpackage, also when ops has not probed it yet)
from update_cases import HISTORY, STATE, DTYPES, case_seed, check_backend, make_case, update_samples  # noqa: E402

ok, why = ds.triton_kernels.available()
pytestmark = pytest.mark.skipif(not ok, reason=f"triton backend unavailable: {why}")


def triton_op(*args):
    return ds.triton_kernels.multistep_update(*args)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32], ids=str)
def test_rejects_other_storage_dtypes(dtype):
    args = make_case((7,), torch.float32, 1, seed=0)
    args = [a.to(dtype) if isinstance(a, torch.Tensor) else a for a in args]
    with pytest.raises(ValueError):
        triton_op(*args)


def test_deterministic_and_same_as_cpu_backend_on_a_loop():
    model = lambda x, t: torch.tanh(x) * (1 + t.float() / 1000)
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    a = ds.sample(model, x, steps=6, solver="unipc", backend="triton")
    b = ds.sample(model, x, steps=6, solver="unipc", backend="triton")
    c = ds.sample(model, x, steps=6, solver="unipc", backend="cpu")
    assert torch.equal(a, b)
    assert ((a - c).abs().max() / c.abs().max()).item() < 1e-5


def _opcheck(device, test_utils):
    from diffsampler.triton_kernels import fused_update  # noqa: F401  (registers the op; lazy elsewhere)

    ops = torch.ops.diffsampler
    for args in update_samples():
        args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
        if args[HISTORY] is None and args[STATE] is None:  # nothing written in place: the functional op
            torch.library.opcheck(ops.multistep_update_functional_triton.default, [*args[:2], *args[5:9]],
                                  test_utils=test_utils)
        else:
            torch.library.opcheck(ops.multistep_update_triton.default, args, test_utils=test_utils)


def test_opcheck_schema():
    """On CPU the interpreter runs the kernels on real memory in Python, so the fake-tensor and AOT checks
    (kernels traced on tensors without storage) only run on a GPU: test_opcheck_cuda."""
    _opcheck("cpu", ("test_schema", "test_autograd_registration"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="test_opcheck_cuda runs these checks")
def test_opcheck_fake_and_aot_on_cpu():
    """Tried for real on CPU; skipped while torch cannot trace interpreted kernels: with TRITON_INTERPRET=1,
    @triton.jit gives an InterpretedFunction, which torch.library.wrap_triton returns unwrapped (torch 2.13,
    torch/_library/triton.py), so under fake/functional tracing (opcheck's test_faketensor and
    test_aot_dispatch_*, torch.compile) the interpreter dereferences fake tensors' storage and fails."""
    try:
        _opcheck("cpu", ("test_faketensor", "test_aot_dispatch_dynamic"))
    except torch.testing._internal.optests.OpCheckError as err:
        if "storage" not in str(err):
            raise
        pytest.skip("torch.library.wrap_triton leaves TRITON_INTERPRET kernels untraced, so fake-tensor / AOT "
                    f"tracing runs the interpreter on fake tensors ({str(err).splitlines()[0][:160]})")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_opcheck_cuda():
    _opcheck("cuda", ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference_on_cuda(dtype):
    for shape in [(7,), (65537,), (3, 5, 7, 11)]:
        for kw in [dict(), dict(threshold=True, slots=4), dict(state=2, noncontig=True)]:
            args = [a.cuda() if isinstance(a, torch.Tensor) else a
                    for a in make_case(shape, dtype, 2, seed=case_seed("triton-cuda", shape, dtype, str(kw)), **kw)]
            check_backend(triton_op, args, dtype)
