"""ops.lml_weights (LML's r x r solve from the Gram to the direction weights): the C++ CPU op (and the CUDA one,
tests marked gpu) against the torch reference on random Grams, from lml_gram on fp32 / fp16 / bf16 data,
non-contiguous inputs, degenerate Grams, argument errors and opcheck."""

import pytest
import torch

import diffsampler as ds
from diffsampler import lml, reference
from test_cuda import cuda_kernels  # noqa: F401  (the fixture that loads the CUDA kernels)
from update_cases import SESSION_SEED, rel_err


def random_case(batch, m, r, seed):
    """A Gram V^T V of random V (odd lengths, directions of very different norms) and a random mixing matrix."""
    gen = torch.Generator().manual_seed(SESSION_SEED + seed)
    v = torch.randn(batch, m, 2 * m + 3, generator=gen, dtype=torch.float64)
    v = v * torch.logspace(-2, 2, m, dtype=torch.float64).view(1, m, 1)
    return v @ v.transpose(1, 2), torch.randn(m, r, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("m", range(1, ds.ops.MAX_DIRECTIONS + 2))
def test_cpu_matches_reference(m):
    for r in range(0, m + 1):
        for damping, scale in [(1e-3, 1.0), (0.5, -0.7), (100.0, 2.5)]:
            gram, mix = random_case(5, m, r, seed=10 * m + r)
            got = ds.ops.lml_weights(gram, mix, damping, scale, backend="cpu")
            ref = reference.lml_weights(gram, mix, damping, scale)
            assert got.dtype == torch.float64 and got.shape == (5, m)
            # float64 solves of Grams whose directions differ in norm by 1e4: two solvers agree to about the
            # condition number of the r x r system times the float64 epsilon; relative to |scale| where the
            # weights vanish (m = 1: W = scale (1 - 1) up to rounding)
            err = (got - ref).norm() / max(ref.norm(), abs(scale))
            system = mix.T @ gram @ mix + damping * torch.eye(r, dtype=torch.float64)
            cond = float(torch.linalg.cond(system).max()) if r else 1.0
            assert err < max(1e-12, 100 * cond * torch.finfo(torch.float64).eps), (r, damping, err, cond)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_step_weights_from_lml_gram(dtype):
    """The weights of a real step (Gram of d and a ring of 3 directions in the storage dtype, the mixing of
    step 5 at rank 3) on a (3, 5, 37) batch: CPU op and reference agree on the same Gram."""
    gen = torch.Generator().manual_seed(SESSION_SEED)
    x, out = (torch.randn(3, 5, 37, generator=gen).to(dtype) for _ in range(2))
    dirs = torch.randn(3, 3, 5, 37, generator=gen).to(dtype)
    coeffs = ds.ops.UpdateCoeffs(p=1.1, q=-0.3, a=0.9, b=(0.8,))
    gram = ds.ops.lml_gram(x, out, coeffs, dirs, [0.1, 0.2, 0.7])
    mix = torch.tensor(lml.mixing(5, 3, 0.5), dtype=torch.float64)
    got = lml.correction_weights(gram, mix, 0.01, 0.8)
    ref = reference.lml_weights(gram, mix, 0.01, 0.8)
    assert rel_err(got, ref) < 1e-10
    assert got.abs().sum() > 0


def test_non_contiguous_inputs():
    gram, mix = random_case(4, 4, 2, seed=3)
    gram_t = gram.transpose(1, 2).contiguous().transpose(1, 2)  # same values (symmetric), other strides
    mix_t = mix.T.contiguous().T
    wide = torch.zeros(8, 4, 4, dtype=torch.float64)
    wide[::2] = gram
    assert not gram_t.is_contiguous() and not mix_t.is_contiguous() and not wide[::2].is_contiguous()
    contiguous = ds.ops.lml_weights(gram, mix, 0.1, 1.0, backend="cpu")
    # the Gram's directions span norms 1e-2..1e2 (condition up to 1e8): float64 agrees with the reference to
    # ~1e-12 but not always below it; the strides must not change a bit
    assert rel_err(contiguous, reference.lml_weights(gram, mix, 0.1, 1.0)) < 1e-10
    for matrix, c in [(gram_t, mix_t), (wide[::2], mix)]:
        assert torch.equal(ds.ops.lml_weights(matrix, c, 0.1, 1.0, backend="cpu"), contiguous)


def test_degenerate_grams_give_zero_weights():
    """d = 0 (Gram = 0), and NaN in the Gram: weights 0 (the step keeps d), never NaN; as the reference."""
    mix = torch.tensor(lml.mixing(3, 2, 0.5), dtype=torch.float64)
    gram, _ = random_case(3, 3, 2, seed=4)
    gram[0] = 0
    gram[1, 0, 0] = float("nan")
    got = ds.ops.lml_weights(gram, mix, 1e-3, 1.0, backend="cpu")
    assert torch.equal(got[:2], torch.zeros(2, 3, dtype=torch.float64))
    assert rel_err(got, reference.lml_weights(gram, mix, 1e-3, 1.0)) < 1e-10
    assert got[2].abs().sum() > 0


def test_auto_dispatch_and_reference_backend():
    gram, mix = random_case(2, 3, 1, seed=5)
    ref = reference.lml_weights(gram, mix, 0.3, 1.0)
    assert torch.equal(ds.ops.lml_weights(gram, mix, 0.3, 1.0, backend="reference"), ref)
    assert rel_err(ds.ops.lml_weights(gram, mix, 0.3, 1.0), ref) < 1e-12


@pytest.mark.parametrize("kwargs, match", [
    (dict(gram=torch.zeros(2, 3)), "gram must have shape"),
    (dict(gram=torch.zeros(2, 3, 4, dtype=torch.float64)), "gram must have shape"),
    (dict(gram=torch.zeros(2, 9, 9, dtype=torch.float64)), "gram must have shape"),
    (dict(mix=torch.zeros(2, 1, dtype=torch.float64)), "mix must have shape"),
    (dict(mix=torch.zeros(3, 4, dtype=torch.float64)), "mix must have shape"),
    (dict(gram=torch.zeros(2, 3, 3)), "float64"),
    (dict(mix=torch.zeros(3, 1)), "float64"),
    (dict(damping=0.0), "damping must be > 0"),
    (dict(backend="gpu"), "backend must be one of"),
])
def test_bad_arguments(kwargs, match):
    args = dict(gram=torch.eye(3, dtype=torch.float64).expand(2, 3, 3), mix=torch.ones(3, 1, dtype=torch.float64),
                damping=0.1, scale=1.0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        ds.ops.lml_weights(**args)


def test_opcheck():
    gram, mix = random_case(3, 4, 2, seed=6)
    torch.library.opcheck(torch.ops.diffsampler.lml_weights.default, (gram, mix, 0.1, 0.9))


def test_backend_must_match_the_device():
    gram, mix = random_case(2, 3, 1, seed=7)
    with pytest.raises(ValueError, match="backend 'cuda' needs CUDA tensors"):
        ds.ops.lml_weights(gram, mix, 0.1, 1.0, backend="cuda")
    assert rel_err(ds.ops.lml_weights(gram, mix, 0.1, 1.0, backend="triton"),
                   reference.lml_weights(gram, mix, 0.1, 1.0)) < 1e-12  # triton: the torch reference


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_reference(cuda_kernels):  # noqa: F811
    for m in range(1, ds.ops.MAX_DIRECTIONS + 2):
        for r in range(0, m + 1):
            gram, mix = random_case(70, m, r, seed=100 + 10 * m + r)  # 70 samples: two blocks of threads
            gram[3] = 0
            got = ds.ops.lml_weights(gram.cuda(), mix.cuda(), 0.01, 0.9, backend="cuda")
            ref = reference.lml_weights(gram, mix, 0.01, 0.9)
            assert got.is_cuda and got.shape == (70, m)
            assert (got.cpu() - ref).norm() / max(ref.norm(), 0.9) < 1e-8
    torch.library.opcheck(torch.ops.diffsampler.lml_weights.default, (gram.cuda(), mix.cuda(), 0.1, 0.9))
