"""ops.fkc_update (Feynman-Kac correctors' step and log-weight increment in one pass) on every backend against
the float64 reference, its opcheck, the coefficients' closed forms, and bad input."""

import pytest
import torch
from torch.library import opcheck

from diffsampler import ops, reference, smc

from update_cases import DTYPES, backend_op, case_seed, rel_err


def samples(dtypes=DTYPES):
    """(x, outs, coeffs, noise) per dtype, 1 to 4 outputs, odd shapes (a sample over several chunks), with and
    without noise, one strided output."""
    out = []
    for dtype in dtypes:
        for m, shape in [(1, (3, 5, 7)), (2, (2, 9000)), (3, (1, 1023)), (4, (4, 3, 3)), (2, (1, 65537)), (1, (64, 7))]:
            gen = torch.Generator().manual_seed(case_seed("fkc", m, shape, dtype))
            rand = lambda *s: torch.randn(s, generator=gen, dtype=torch.float64).to(dtype)  # noqa: E731
            outs = [rand(*shape) for _ in range(m)]
            if m == 2:
                outs[1] = rand(*shape, 2)[..., 1]  # strided
            coeffs = (torch.rand(2 + m + m * (m + 1) // 2, generator=gen, dtype=torch.float64) - 0.5).tolist()
            out.append([rand(*shape), outs, coeffs, rand(*shape) if m % 2 else None])
    return out


def test_backends_match_reference(backend):
    for x, outs, coeffs, noise in samples():
        wide = lambda t: t.double() if t.dtype == torch.float32 else t  # noqa: E731
        want = reference.fkc_update(wide(x), [wide(o) for o in outs], coeffs, None if noise is None else wide(noise))
        got = backend_op("fkc_update", backend)(x, outs, coeffs, noise)
        assert got[0].dtype == x.dtype and got[0].shape == x.shape and got[1].dtype == torch.float64
        assert rel_err(got[0], want[0]) < (1e-6 if x.dtype == torch.float32 else 1e-2)
        # the increment from the stored outputs: float64 sums of their products (fp32 block sums on Triton)
        exact = reference.fkc_update(x, outs, coeffs, noise)[1]
        assert rel_err(got[1], exact, scale=exact.abs().sum()) < (1e-5 if backend == "triton" else 1e-12)


def test_opcheck():
    for args in samples([torch.float32, torch.bfloat16]):
        opcheck(torch.ops.diffsampler.fkc_update.default, args)


def test_step_coeffs_give_the_fkc_step():
    """x' = scale (x + h S) + sqrt(h) z and the increment h/2 (|S|^2 - sum b_i |s_i|^2), S = sum b_i s_i."""
    gen = torch.Generator().manual_seed(0)
    x, e1, e2, z = (torch.randn(3, 40, generator=gen, dtype=torch.float64) for _ in range(4))
    b, sigma, h, scale = [0.7, 0.3], 0.8, 0.05, 1.02
    got = ops.fkc_update(x, [e1, e2], noise=z, backend="reference", **smc.step_coeffs(b, sigma, h, scale))
    s1, s2 = -e1 / sigma, -e2 / sigma
    S = b[0] * s1 + b[1] * s2
    torch.testing.assert_close(got[0], scale * (x + h * S) + h**0.5 * z)
    sq = lambda v: (v * v).sum(1)  # noqa: E731
    torch.testing.assert_close(got[1], h / 2 * (sq(S) - b[0] * sq(s1) - b[1] * sq(s2)))


def test_bad_input():
    x = torch.randn(2, 5)
    with pytest.raises(ValueError, match="outs must be a sequence of 1 to 4"):
        ops.fkc_update(x, x, a=1.0, e=[1.0], weights=[1.0])
    with pytest.raises(ValueError, match="outs must be a sequence of 1 to 4"):
        ops.fkc_update(x, [x] * 5, a=1.0, e=[1.0] * 5, weights=[0.0] * 15)
    with pytest.raises(ValueError, match="e must have one weight per output"):
        ops.fkc_update(x, [x, x], a=1.0, e=[1.0], weights=[0.0] * 3)
    with pytest.raises(ValueError, match=r"weights must have M \(M \+ 1\) / 2 = 3"):
        ops.fkc_update(x, [x, x], a=1.0, e=[1.0, 1.0], weights=[0.0])
    with pytest.raises(ValueError, match="noise is required"):
        ops.fkc_update(x, [x], a=1.0, e=[1.0], weights=[1.0], c=0.5)
    with pytest.raises(ValueError, match="outs\\[1\\]"):
        ops.fkc_update(x, [x, x.half()], a=1.0, e=[1.0, 1.0], weights=[0.0] * 3)
    with pytest.raises(ValueError, match="non-finite"):
        ops.fkc_update(x, [x.clone().fill_(float("nan"))], a=1.0, e=[1.0], weights=[1.0])
