"""The CUDA backend: its sources compile here (nvcc -c for sm_80 and sm_90; the torch-side host file with the
host compiler), and on a GPU it matches the float64 reference (tests marked gpu, skipped without one)."""

import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch

import diffsampler as ds
from update_cases import ODD_SHAPES, VARIANT_SHAPES, VARIANTS, case_seed, check_backend, make_case, variant_case

CSRC = Path(__file__).resolve().parents[1] / "csrc"
NVCC = shutil.which("nvcc")


def cuda_include() -> Path | None:
    """The CUDA toolkit's include dir next to nvcc (through symlinks), if any."""
    if NVCC is None:
        return None
    for root in (Path(NVCC).resolve().parents[1], Path("/usr/local/cuda")):
        if (root / "include" / "cuda_runtime_api.h").exists():
            return root / "include"
    found = sorted(Path("/usr/local").glob("cuda*/include/cuda_runtime_api.h"))
    return found[-1].parent if found else None


KERNELS = sorted(p.name for p in (CSRC / "cuda").glob("*.cu"))
HOST_FILES = sorted(p.name for p in CSRC.glob("*_cuda.cpp"))


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("arch", ["80", "90"])
@pytest.mark.parametrize("source", KERNELS)
def test_kernels_compile_with_nvcc(source, arch, tmp_path):
    """Every csrc/cuda/*.cu, warnings as errors (no torch headers there: this machine's torch has no CUDA)."""
    obj = tmp_path / f"{source}.sm{arch}.o"
    cmd = [NVCC, "-c", str(CSRC / "cuda" / source), "-I", str(CSRC), "-O3", "-std=c++17",
           f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Werror", "all-warnings", "-Xcompiler", "-Wall,-Werror",
           "-o", str(obj)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert obj.stat().st_size > 0


@pytest.mark.skipif(cuda_include() is None, reason="no CUDA toolkit headers next to nvcc")
@pytest.mark.parametrize("source", HOST_FILES)
def test_host_registration_compiles(source, tmp_path):
    """Every csrc/*_cuda.cpp against torch's headers (syntax and types; linking needs a CUDA torch).
    c10's generated cuda_cmake_macros.h exists only in CUDA builds of torch: an empty one stands in."""
    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("")
    torch_inc = Path(torch.__file__).parent / "include"
    cmd = ["c++", "-fsyntax-only", "-std=c++20", "-Wall", "-Werror", "-I", str(CSRC), "-I", str(torch_inc),
           "-I", str(torch_inc / "torch" / "csrc" / "api" / "include"), "-I", str(cuda_include()),
           "-I", str(tmp_path), "-I", sysconfig.get_paths()["include"], str(CSRC / source)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def cuda_op(*args):
    return torch.ops.diffsampler.multistep_update(*args)


def to_cuda(args):
    """The operands on the GPU with their strides: Tensor.cuda() would make a strided view (the noncontig
    variants) contiguous."""

    def move(a):
        if not isinstance(a, torch.Tensor):
            return a
        moved = torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device="cuda")
        moved.copy_(a)
        assert moved.stride() == a.stride()
        return moved

    return [move(a) for a in args]


@pytest.fixture(scope="module")
def cuda_kernels():
    from diffsampler import _cuda_jit

    ok, why = _cuda_jit.load()
    if not ok:
        pytest.fail(f"a CUDA device is here but the CUDA kernels are not: {why}")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ODD_SHAPES + [(64, 4, 128, 128)], ids=str)
def test_matches_reference(cuda_kernels, shape, dtype):
    for n_reads in range(4):
        for noise in (True, False):
            args = make_case(shape, dtype, n_reads, noise=noise, seed=case_seed("cuda", shape, dtype, n_reads, noise))
            check_backend(cuda_op, to_cuda(args), dtype)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", VARIANTS)
def test_variants(cuda_kernels, dtype, variant):
    for shape in VARIANT_SHAPES:
        args = to_cuda(variant_case(shape, dtype, variant, case_seed("cuda", shape, dtype, variant)))
        if variant.endswith("noncontig") and shape[-1] > 1:
            assert not args[0].is_contiguous()
        check_backend(cuda_op, args, dtype)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_threshold_packs_across_samples(cuda_kernels, dtype):
    """Samples shorter than a 16-byte pack (and not a multiple of it): one pack spans several per-sample bounds."""
    for shape in [(40, 1), (17, 3), (13, 5), (11, 2, 3), (7, 9), (3, 4099)]:
        args = make_case(shape, dtype, 2, threshold=True, slots=4, seed=case_seed("cuda-thr", shape, dtype))
        check_backend(cuda_op, to_cuda(args), dtype)
        args = make_case(shape, dtype, 0, threshold=True, seed=case_seed("cuda-thr0", shape, dtype))
        args[2] = None
        check_backend(cuda_op, to_cuda(args), dtype)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_unaligned_views_take_the_scalar_path(cuda_kernels, dtype):
    """Views starting one element into their storage are not 16-byte aligned: same numbers."""
    args = to_cuda(make_case((4099,), dtype, 2, seed=case_seed("unaligned", dtype)))
    for i in (0, 1, 6):
        wide = torch.zeros(args[i].numel() + 1, dtype=dtype, device="cuda")
        wide[1:] = args[i]
        args[i] = wide[1:]
        assert args[i].data_ptr() % 16 != 0
    check_backend(cuda_op, args, dtype)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_captures_in_a_cuda_graph(cuda_kernels, dtype):
    """The launches go to torch's current stream (capture fails on a launch to another stream) and the host
    side makes no synchronizing call; the replayed graph gives the reference numbers."""

    def captured(*args):
        state = args[9].clone() if args[9] is not None else None  # a state row rewrites it per call
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside capture (the history write is idempotent)
            cuda_op(*args)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            x_next = cuda_op(*args)
        x_next.zero_()
        if state is not None:
            args[9].copy_(state)
        graph.replay()
        torch.cuda.synchronize()
        return x_next

    for kw in [dict(), dict(state=2), dict(noise=False)]:
        args = to_cuda(make_case((4, 4, 33, 33), dtype, 2, seed=case_seed("graph", dtype, kw), **kw))
        check_backend(captured, args, dtype)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", ["no_history", "threshold_no_history"])
def test_functional_op(cuda_kernels, dtype, variant):
    """multistep_update_functional (no history, no state), registered from the same host file, on the same kernels."""

    def functional(x, out, history, write_slot, read_slots, coeffs, noise, clip, thresholding, state):
        assert history is None and not read_slots and state is None
        return torch.ops.diffsampler.multistep_update_functional(x, out, coeffs, noise, clip, thresholding)

    for shape in VARIANT_SHAPES + [(8, 4, 64, 64)]:
        args = to_cuda(variant_case(shape, dtype, variant, case_seed("cuda-functional", shape, dtype, variant)))
        check_backend(functional, args, dtype)
    args = to_cuda(variant_case((2, 3, 5), torch.float32, variant, 5))
    torch.library.opcheck(torch.ops.diffsampler.multistep_update_functional.default,
                          [args[0], args[1], args[5], args[6], *args[7:9]])


@pytest.mark.gpu
@gpu
def test_opcheck_and_sample_on_cuda(cuda_kernels):
    for kw in [dict(), dict(state=2), dict(threshold=True, slots=4)]:
        torch.library.opcheck(torch.ops.diffsampler.multistep_update.default,
                              to_cuda(make_case((2, 3, 5), torch.float32, 2, seed=7, **kw)))
    model = lambda x, t: torch.tanh(x) * (1 + t.float() / 1000)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    cpu = ds.sample(model, x, steps=10, solver="unipc")
    gpu_result = ds.sample(model, x.cuda(), steps=10, solver="unipc", backend="cuda")
    assert ((gpu_result.cpu() - cpu).abs().max() / cpu.abs().max()).item() < 1e-5
