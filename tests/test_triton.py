"""The Triton backend against the float64 reference, on CPU tensors under TRITON_INTERPRET=1 (conftest.py)."""

import pytest
import torch

import diffsampler as ds
import diffsampler.triton_kernels  # noqa: F401  (the subpackage, also when ops has not probed it yet)
from update_cases import ODD_SHAPES, case_seed, check_backend, make_case

ok, why = ds.triton_kernels.available()
pytestmark = pytest.mark.skipif(not ok, reason=f"triton backend unavailable: {why}")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def triton_op(*args):
    return ds.triton_kernels.multistep_update(*args)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ODD_SHAPES, ids=str)
def test_matches_reference(shape, dtype):
    for n_reads in range(4):
        for noise in (True, False):
            check_backend(triton_op, make_case(shape, dtype, n_reads, noise=noise,
                                               seed=case_seed("triton", shape, dtype, n_reads, noise)), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", ["noncontig", "clip", "threshold", "threshold_no_history", "no_history",
                                     "state_read", "state_row", "state_row_threshold", "state_noncontig"])
def test_variants(dtype, variant):
    for shape in [(1,), (7,), (3, 5, 7, 11), (2, 4, 9, 9)]:
        seed = case_seed("triton", shape, dtype, variant)
        if variant == "noncontig":
            args = make_case(shape, dtype, 2, noncontig=True, seed=seed)
        elif variant == "clip":
            args = make_case(shape, dtype, 2, clip=0.7, seed=seed)
        elif variant == "threshold":
            args = make_case(shape, dtype, 2, threshold=True, slots=4, seed=seed)
        elif variant.startswith("state"):
            args = make_case(shape, dtype, 3, state=1 if variant == "state_read" else 2, seed=seed,
                             threshold=variant.endswith("threshold"), noncontig=variant.endswith("noncontig"))
        else:
            args = make_case(shape, dtype, 0, threshold=variant == "threshold_no_history", seed=seed)
            args[2] = None
        check_backend(triton_op, args, dtype)


def test_noncontiguous_history_slot_written_in_place():
    x, out = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    base = torch.zeros(2, 3, 5, 2)
    history = base.movedim(-1, 0)
    coeffs = ds.ops.UpdateCoeffs(p=0.5, q=2.0, a=1.0, b=(1.0,))
    ds.ops.multistep_update(x, out, coeffs, history=history, write_slot=1, backend="triton")
    assert torch.allclose(base[..., 1], 0.5 * x + 2.0 * out, rtol=1e-6, atol=1e-6)
    assert torch.equal(base[..., 0], torch.zeros(2, 3, 5))


def test_deterministic_and_same_as_cpu_backend_on_a_loop():
    model = lambda x, t: torch.tanh(x) * (1 + t.float() / 1000)
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    a = ds.sample(model, x, steps=6, solver="unipc", backend="triton")
    b = ds.sample(model, x, steps=6, solver="unipc", backend="triton")
    c = ds.sample(model, x, steps=6, solver="unipc", backend="cpu")
    assert torch.equal(a, b)
    assert ((a - c).abs().max() / c.abs().max()).item() < 1e-5


def _opcheck(device, test_utils):
    op = torch.ops.diffsampler.multistep_update_triton.default
    for kw in [dict(), dict(state=2), dict(threshold=True, slots=4)]:
        args = [a.to(device) if isinstance(a, torch.Tensor) else a
                for a in make_case((2, 3, 5), torch.float32, 2, seed=11, **kw)]
        torch.library.opcheck(op, args, test_utils=test_utils)


def test_opcheck_schema():
    """On CPU the interpreter runs the kernels on real memory in Python, so the fake-tensor and AOT checks
    (kernels traced on tensors without storage) only run on a GPU: test_opcheck_cuda."""
    _opcheck("cpu", ("test_schema", "test_autograd_registration"))


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
