"""LML's fused ops on every backend against the float64 reference: multistep_update with the ring of directions
(dirs, dir_slot, dir_coeffs, dir_weights) and lml_gram, on the C++ CPU kernels, Triton (CPU tensors under
TRITON_INTERPRET=1; CUDA tensors on a GPU) and the CUDA kernels (tests marked gpu, skipped without one)."""

import pytest
import torch

import diffsampler as ds
import diffsampler.triton_kernels  # noqa: F401  (the subpackage, also when ops has not probed it yet)
from diffsampler import reference
from test_cuda import cuda_kernels, to_cuda  # noqa: F401  (cuda_kernels: the fixture that loads the CUDA kernels)
from update_cases import (BOUNDS, DIR_COEFFS, DIR_SLOT, DIRS, backend_op, case_seed, gram_args,
                          lml_case, lml_samples, rel_err, writes_state)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# ||Gram - Gram_ref|| / ||Gram_ref|| (a reduction: fp32 accumulation within a chunk, float64 across)
GRAM_BOUNDS = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
HAS_CUDA = torch.cuda.is_available()
TRITON_OK, TRITON_WHY = ds.triton_kernels.available()

def _double(args):
    return [a.double().clone() if isinstance(a, torch.Tensor) else a for a in args]


def check_update(fn, args, dtype):
    """Run update `fn` on a copy of `args`: x', the history slot, the state and the ring meet the bound against
    the float64 reference (relative to max(||ref||, ||the same on |operands|, |coeffs|||), update_cases'
    convention), and nothing else is written."""
    ref = _double(args)
    ref_x = reference.multistep_update(*ref)
    mag = [a.double().abs() if isinstance(a, torch.Tensor) else a for a in args]
    for i in (5, DIR_COEFFS):
        mag[i] = [abs(c) for c in args[i]]
    mag[7:9] = [0.0, False]  # no clip, no threshold
    scale_x = reference.multistep_update(*mag)
    a = list(args)
    for i in (2, 9, DIRS):
        a[i] = a[i].clone() if a[i] is not None else None
    got_x = fn(*a)
    bound = BOUNDS[dtype]
    assert got_x.dtype == args[0].dtype and got_x.shape == args[0].shape
    assert rel_err(got_x, ref_x, scale_x) < bound, rel_err(got_x, ref_x, scale_x)
    slot = args[DIR_SLOT]
    assert rel_err(a[DIRS][slot], ref[DIRS][slot], mag[DIRS][slot]) < bound
    others = [j for j in range(args[DIRS].shape[0]) if j != slot]
    assert torch.equal(a[DIRS][others], args[DIRS][others]), "a ring slot other than dir_slot was modified"
    if args[2] is not None:
        w = args[3]
        assert rel_err(a[2][w], ref[2][w], mag[2][w]) < bound
        untouched = [s for s in range(args[2].shape[0]) if s != w]
        assert torch.equal(a[2][untouched], args[2][untouched]), "a slot other than write_slot was modified"
    if writes_state(args):
        assert rel_err(a[9], ref[9], mag[9]) < bound


def check_gram(fn, args, dtype):
    got = fn(*gram_args(args))
    ref = reference.lml_gram(*_double(gram_args(args)))
    assert got.dtype == torch.float64 and got.shape == ref.shape
    assert torch.equal(got, got.transpose(1, 2)), "the Gram is not exactly symmetric"
    assert rel_err(got, ref) < GRAM_BOUNDS[dtype], rel_err(got, ref)


# Each backend: (update, gram, operands onto its device).
BACKENDS = {
    "cpu": (lambda *a: torch.ops.diffsampler.multistep_update(*a), lambda *a: torch.ops.diffsampler.lml_gram(*a),
            lambda args: args),
    "triton": (ds.triton_kernels.multistep_update, ds.triton_kernels.lml_gram, lambda args: args),
    "cuda": (lambda *a: torch.ops.diffsampler.multistep_update(*a), lambda *a: torch.ops.diffsampler.lml_gram(*a),
             to_cuda),
    "triton_cuda": (ds.triton_kernels.multistep_update, ds.triton_kernels.lml_gram, to_cuda),
}
needs_triton = pytest.mark.skipif(not TRITON_OK, reason=f"triton backend unavailable: {TRITON_WHY}")
needs_gpu = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]
BACKEND_PARAMS = [
    pytest.param("cpu"),
    pytest.param("triton", marks=needs_triton),
    pytest.param("cuda", marks=needs_gpu),
    pytest.param("triton_cuda", marks=needs_gpu + [needs_triton]),
]
# Small sizes where the Triton interpreter runs them (odd, per-sample sizes not a multiple of a block or a
# 16-byte pack); the GPU backends also get large ones, several Gram chunks per sample, packs across samples.
SHAPES = {
    "cpu": [(1,), (7,), (3, 5, 7), (2, 3, 37), (3, 4099)],
    "triton": [(7,), (3, 5, 7), (2, 3, 37)],
    "cuda": [(1,), (7,), (65537,), (40, 1), (17, 3), (3, 5, 7), (3, 4099), (2, 4, 33, 33), (4, 4, 64, 64)],
    "triton_cuda": [(7,), (17, 3), (3, 4099), (2, 4, 33, 33)],
}
VARIANTS = {  # lml_case options; "history": False forces n_reads = 0
    "plain": dict(),
    "no_noise": dict(noise=False),
    "no_history": dict(history=False),
    "no_weights": dict(weights=None),
    "float64_weights_clip": dict(weights="float64", clip=0.7),
    "threshold": dict(threshold=True),
    "threshold_no_history": dict(threshold=True, history=False),
    "noncontig": dict(noncontig=True),
    "state_row": dict(state=2),
    "no_noise_state_read": dict(noise=False, state=1),
    "guide": dict(guide=True, clip=0.7),
    "guide_state_row_threshold": dict(guide=True, state=2, threshold=True),
}
RANKS_READS = [(1, 0), (2, 1), (3, 2), (4, 3), (4, 0), (1, 3), (5, 1), (6, 2)]  # 6: DS_MAX_DIRS


@pytest.fixture
def backend_ops(request):
    name = request.param
    if name in ("cuda", "triton_cuda"):
        request.getfixturevalue("cuda_kernels")
    return (name, *BACKENDS[name])


def test_lml_samples_match_reference(backend):
    for args in lml_samples():
        check_update(backend_op("multistep_update", backend), args, args[0].dtype)
        check_gram(backend_op("lml_gram", backend), args, args[0].dtype)


def test_opcheck():
    """torch.library.opcheck of the compiled ops on the samples of test_lml_samples_match_reference."""
    for args in lml_samples():
        torch.library.opcheck(torch.ops.diffsampler.multistep_update.default, args)
        torch.library.opcheck(torch.ops.diffsampler.lml_gram.default, gram_args(args))


@pytest.mark.parametrize("backend_ops", BACKEND_PARAMS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", VARIANTS)
def test_update_with_dirs_matches_reference(backend_ops, dtype, variant):
    name, update, _, device = backend_ops
    kw = VARIANTS[variant]
    for rank, n_reads in RANKS_READS:
        if kw.get("history", True) is False:
            n_reads = 0
        for shape in SHAPES[name]:
            args = lml_case(shape, dtype, rank, n_reads, case_seed("lml", name, shape, dtype, variant, rank, n_reads),
                            **kw)
            check_update(update, device(args), dtype)


@pytest.mark.parametrize("backend_ops", BACKEND_PARAMS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gram_matches_reference(backend_ops, dtype):
    name, _, gram, device = backend_ops
    for rank in range(1, 7):
        for n_reads in range(4):
            for i, shape in enumerate(SHAPES[name]):
                clip = 0.7 if (rank + n_reads + i) % 2 else 0.0
                noncontig = (rank + i) % 3 == 0
                args = lml_case(shape, dtype, rank, n_reads, case_seed("gram", name, shape, dtype, rank, n_reads),
                                clip=clip, noncontig=noncontig)
                check_gram(gram, device(args), dtype)


@pytest.mark.parametrize("backend_ops", BACKEND_PARAMS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gram_bitwise_deterministic(backend_ops, dtype):
    name, _, gram, device = backend_ops
    shape = (3, 4099) if name != "triton" else (2, 1500)  # several chunks / blocks per sample
    args = device(lml_case(shape, dtype, 3, 2, case_seed("gram-det", name, dtype)))
    first = gram(*gram_args(args))
    for _ in range(2):
        assert torch.equal(gram(*gram_args(args)), first)


@pytest.mark.parametrize("backend_ops", BACKEND_PARAMS, indirect=True)
def test_gram_over_several_chunks(backend_ops):
    """Samples spanning several Gram blocks (Triton: 1024 elements, CUDA: 2048, CPU: 8192), the last partial."""
    name, _, gram, device = backend_ops
    shape = {"cpu": (2, 3 * 8192 + 5), "triton": (2, 2 * 1024 + 3)}.get(name, (2, 5 * 2048 + 3))
    for rank in (1, 4):
        args = lml_case(shape, torch.float32, rank, 1, case_seed("gram-chunks", name, rank), clip=0.9)
        check_gram(gram, device(args), torch.float32)


@pytest.mark.parametrize("backend", [pytest.param("cpu"), pytest.param("triton", marks=needs_triton)])
def test_public_ops_route_lml(backend):
    """ds.ops.multistep_update / lml_gram with backend= reach the backend's kernels (Triton included) and agree
    with the reference backend."""
    x, out = torch.randn(2, 3, 11), torch.randn(2, 3, 11)
    history = torch.randn(3, 2, 3, 11)
    coeffs = ds.ops.UpdateCoeffs(p=0.5, q=0.8, a=0.9, b=(0.4, 0.3), e=0.1)
    dirs = torch.randn(2, 2, 3, 11)
    dir_coeffs = [0.2, 0.7, -0.4, 0.3]
    kw = dict(history=history, read_slots=[1], clip=0.8)
    results = {}
    for name in (backend, "reference"):
        gram = ds.ops.lml_gram(x, out, coeffs, dirs, dir_coeffs, backend=name, **kw)
        weights = torch.randn(2, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        h, d = history.clone(), dirs.clone()
        y = ds.ops.multistep_update(x, out, coeffs, history=h, write_slot=0, read_slots=[1], clip=0.8, dirs=d,
                                    dir_slot=1, dir_coeffs=dir_coeffs, dir_weights=weights, backend=name)
        results[name] = (gram, y, h, d)
    for got, ref in zip(results[backend], results["reference"]):
        assert rel_err(got, ref) < 1e-5


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_triton)])
def test_sample_loop_with_lml_matches_cpu(backend):
    model = lambda x, t: torch.tanh(x) * (1 + t.float() / 1000)
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    lml = ds.LML(damping=0.5, kappa=0.5, rank=2)
    got = ds.sample(model, x, steps=5, solver="ddim", lml=lml, backend=backend)
    again = ds.sample(model, x, steps=5, solver="ddim", lml=lml, backend=backend)
    cpu = ds.sample(model, x, steps=5, solver="ddim", lml=lml, backend="cpu")
    plain = ds.sample(model, x, steps=5, solver="ddim", backend="cpu")
    assert torch.equal(got, again)
    assert ((got - cpu).abs().max() / cpu.abs().max()).item() < 1e-5
    assert not torch.allclose(cpu, plain), "LML changed nothing: the test cannot tell it ran"


@needs_triton
def test_triton_ops_schema():
    """The registered triton ops' schemas (fake / AOT tracing needs a GPU: test_opcheck_on_cuda)."""
    from diffsampler.triton_kernels import fused_update, lml  # noqa: F401  (registers the ops)

    args = lml_case((2, 3, 5), torch.float32, 2, 2, seed=11, state=2)
    checks = ("test_schema", "test_autograd_registration")
    torch.library.opcheck(torch.ops.diffsampler.multistep_update_triton.default, args, test_utils=checks)
    torch.library.opcheck(torch.ops.diffsampler.lml_gram_triton.default, gram_args(args), test_utils=checks)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_opcheck_on_cuda(cuda_kernels):  # noqa: F811
    for args in lml_samples(dtypes=[torch.float32]):
        args = to_cuda(args)
        torch.library.opcheck(torch.ops.diffsampler.multistep_update.default, args)
        torch.library.opcheck(torch.ops.diffsampler.lml_gram.default, gram_args(args))
        if TRITON_OK:
            from diffsampler.triton_kernels import fused_update, lml  # noqa: F401

            torch.library.opcheck(torch.ops.diffsampler.multistep_update_triton.default, args)
            torch.library.opcheck(torch.ops.diffsampler.lml_gram_triton.default, gram_args(args))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_gram_does_not_depend_on_alignment(cuda_kernels, dtype):  # noqa: F811
    """Views one element into their storage take the scalar loads; each thread sums the same elements in the
    same order as with 16-byte packs, so the Gram has the same bits."""
    args = to_cuda(lml_case((3, 4096), dtype, 3, 2, case_seed("gram-align", dtype)))
    aligned = torch.ops.diffsampler.lml_gram(*gram_args(args))
    for i in (0, 1):
        wide = torch.zeros(args[i].numel() + 1, dtype=dtype, device="cuda")
        wide[1:] = args[i].flatten()
        args[i] = wide[1:].view(args[i].shape)
        assert args[i].data_ptr() % 16 != 0
    assert torch.equal(torch.ops.diffsampler.lml_gram(*gram_args(args)), aligned)
    check_gram(lambda *a: torch.ops.diffsampler.lml_gram(*a), args, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_unaligned_ring_takes_the_scalar_path(cuda_kernels, dtype):  # noqa: F811
    """A ring whose slots are not 16-byte aligned (slot size not a multiple of 16 bytes) and one that is."""
    for shape in [(3, 4099), (2, 4, 32, 32)]:
        args = to_cuda(lml_case(shape, dtype, 3, 2, case_seed("ring-align", shape, dtype)))
        check_update(lambda *a: torch.ops.diffsampler.multistep_update(*a), args, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_lml_step_captures_in_a_cuda_graph(cuda_kernels):  # noqa: F811
    """The Gram (its scratch from torch's allocator) and the update with dirs capture in a CUDA graph (launches
    on the current stream, no host sync); the replay gives the eager numbers bit for bit."""
    args = to_cuda(lml_case((2, 4, 33, 33), torch.float32, 2, 1, seed=5))

    def step(a):
        return torch.ops.diffsampler.lml_gram(*gram_args(a)), torch.ops.diffsampler.multistep_update(*a)

    def fresh():
        return [a.clone() if isinstance(a, torch.Tensor) else a for a in args]

    eager_args = fresh()
    eager = step(eager_args)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside capture
        step(fresh())
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    captured_args = fresh()
    with torch.cuda.graph(graph):
        captured = step(captured_args)
    graph.replay()
    torch.cuda.synchronize()
    for got, ref in zip(captured, eager):
        assert torch.equal(got, ref)
    assert torch.equal(captured_args[DIRS], eager_args[DIRS]) and torch.equal(captured_args[2], eager_args[2])


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["cuda", pytest.param("triton", marks=needs_triton)])
def test_sample_loop_with_lml_on_gpu(cuda_kernels, backend):  # noqa: F811
    model = lambda x, t: torch.tanh(x) * (1 + t.float() / 1000)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    for lml in (ds.LML(damping=0.5, rank=1), ds.LML(damping=0.1, kappa=0.3, rank=3)):
        cpu = ds.sample(model, x, steps=8, solver="ddim", lml=lml, backend="cpu")
        gpu = ds.sample(model, x.cuda(), steps=8, solver="ddim", lml=lml, backend=backend)
        assert ((gpu.cpu() - cpu).abs().max() / cpu.abs().max()).item() < 1e-5
