"""The C++ CPU kernels' float16 / bfloat16 conversions, bit for bit: the kernel's results equal the float32
reference cast to the storage dtype (torch's cast: round to nearest even). Every stored value is a sum of two
exactly scaled operands (the other terms have weight 0), rounded once in float32 whatever the order or fusing of
the operations, so only the storage conversions can differ. The operands hold NaN, +-inf, -0.0, the dtype's
extremes and subnormals, values whose sums are float32 subnormals, exact ties of the storage rounding and
overflows past its largest value; odd sizes (vector tails) and strided views.

NaN: the kernel's NaN is where the reference's is and is quiet; its sign and payload are not compared (torch's
cast makes every NaN one canonical pattern, the kernel keeps the top bits)."""

import pytest
import torch

from diffsampler import reference, step_row
from diffsampler.ops import StateRow, UpdateCoeffs
from update_cases import case_seed

cpu_op = torch.ops.diffsampler.multistep_update

SHAPES = [(1,), (7,), (33,), (1023,), (2, 3, 5, 7), (4, 4, 33, 33)]
PRECISION = {torch.float16: 11, torch.bfloat16: 8}  # significand bits
EXPONENTS = {torch.float16: (-28, 17), torch.bfloat16: (-140, 129)}  # 2^k scales of the random operands
QUIET_BIT = {torch.float16: 0x200, torch.bfloat16: 0x40}
# (a, e): x' = a x + e out, and (p, q): m0 = p x + q out; powers of two that keep the products exact. fp16's
# second row puts the sums among float32 subnormals (to be stored as +-0).
ROWS = {torch.float16: [((1.0, 2.0**-4), (1.0, 2.0**-11)), ((2.0**-125, 2.0**-125), (1.0, 2.0**-7))],
        torch.bfloat16: [((1.0, 2.0**-3), (1.0, 2.0**-9))]}


def specials(dtype):
    """NaN, +-inf, +-0, the largest, the smallest normal and subnormal values of `dtype` (and for bfloat16
    values in float32's subnormal range)."""
    info = torch.finfo(dtype)
    vals = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, info.max, -info.max, info.tiny, -info.tiny,
            info.smallest_normal / 2 ** (PRECISION[dtype] - 1), -info.smallest_normal / 2 ** (PRECISION[dtype] - 1)]
    if dtype == torch.bfloat16:
        vals += [2.0**-130, -3 * 2.0**-133, 2.0**-127 + 2.0**-133]
    return torch.tensor(vals, dtype=torch.float64)


def operands(shape, dtype, gen, noncontig, e):
    """(x, out) of `dtype`: random signs, significands and exponents, a tenth of the entries special values, and
    an eighth of out a half unit in the last place of x over e (x + e out: an exact tie of the rounding to
    `dtype`). Strided views (every other column) if noncontig."""
    lo, hi = EXPONENTS[dtype]
    n = 1
    for s in shape:
        n *= s
    full = (*shape[:-1], 2 * shape[-1]) if noncontig else shape
    m = n * (2 if noncontig else 1)

    def rand():
        v = torch.randn(m, generator=gen, dtype=torch.float64) * 2.0 ** torch.randint(lo, hi, (m,), generator=gen)
        sp = specials(dtype)
        pick = torch.rand(m, generator=gen) < 0.1
        v[pick] = sp[torch.randint(len(sp), (int(pick.sum()),), generator=gen)]
        return v

    x, out = rand().to(dtype).double(), rand()
    mant, exp = torch.frexp(x)
    half_ulp = torch.ldexp(torch.ones_like(x), exp - PRECISION[dtype] - 1)
    sign = torch.where(torch.rand(m, generator=gen) < 0.5, -1.0, 1.0).double()
    tie = (torch.rand(m, generator=gen) < 0.125) & torch.isfinite(x) & (x.abs() >= torch.finfo(dtype).tiny)
    out = torch.where(tie, sign * half_ulp / e, out)
    x, out = x.to(dtype).view(full), out.to(dtype).view(full)
    if noncontig:
        x, out = x[..., ::2], out[..., ::2]
    return x, out


def randoms(shape, dtype, gen, count):
    """Finite random operands (history slots, noise, state, directions): read with weight 0."""
    return torch.randn((count, *shape), generator=gen, dtype=torch.float64).to(dtype)


def case(shape, dtype, row_index, variant, noncontig, seed):
    """The schema's positional arguments of one multistep_update call whose every stored value is
    round(x + 2^-k out) (see ROWS)."""
    gen = torch.Generator().manual_seed(seed)
    (a, e), (p, q) = ROWS[dtype][row_index]
    x, out = operands(shape, dtype, gen, noncontig, e)
    n_reads = 0 if variant in ("no_history", "lml_no_history") else 2
    state = variant == "state_row"
    coeffs = UpdateCoeffs(p=p, q=q, a=a, e=e, c=0.0, b=(0.0,) * (n_reads + 1), r=(0.0,) * n_reads, g=0.0,
                          state=StateRow(a=e, b=(0.0,) * (n_reads + 1), e=a, c=0.0, g=0.0) if state else None)
    history = randoms(shape, dtype, gen, 4) if n_reads else None
    args = [x, out, history, 3, [0, 2][:n_reads], step_row.row(coeffs), randoms(shape, dtype, gen, 1)[0], 0.0,
            False, randoms(shape, dtype, gen, 1)[0] if state else None]
    if variant.startswith("lml"):  # d = p x + q out, x' += 0 d + 0 dirs[j]
        args += [randoms(shape, dtype, gen, 2), 1, [p, q] + [0.0] * (n_reads + 1),
                 torch.zeros((shape[0], 3), dtype=torch.float32)]
    return args


def written(args):
    """The tensors the call writes in place (history, state, dirs), cloned, in the argument list."""
    a = list(args)
    for i in (2, 9, 10):
        if i < len(a) and a[i] is not None:
            a[i] = a[i].clone()
    return a


def assert_same_bits(got, want, what, zero_signs=True):
    """got's bits are want's; NaN as the module says; without zero_signs +0.0 and -0.0 count as one value."""
    bits = torch.int16
    nan = want.isnan()
    if not zero_signs:
        got, want = got.clone(), want.clone()
        got[got == 0], want[want == 0] = 0, 0
    assert torch.equal(got.isnan(), nan), f"{what}: NaN where the reference has none, or the reverse"
    assert bool((got.view(bits)[nan] & QUIET_BIT[got.dtype]).all()), f"{what}: a signaling NaN stored"
    g, w = got.view(bits)[~nan], want.view(bits)[~nan]
    bad = (g != w).nonzero()
    assert bad.numel() == 0, (f"{what}: {bad.numel()} of {g.numel()} differ, first: got {g[bad[0]].item() & 0xFFFF:#06x}"
                              f" want {w[bad[0]].item() & 0xFFFF:#06x}")


# LML in the update's loop ("lml") and after it ("lml_no_history": m0 not stored). (With a state it runs after
# the loop too but reads m0 back from the history, where a sum may have overflowed to inf: 0 * inf is NaN.)
VARIANTS = ["history", "no_history", "state_row", "lml", "lml_no_history"]


@pytest.mark.parametrize("dtype", list(PRECISION), ids=str)
@pytest.mark.parametrize("variant", VARIANTS)
def test_stores_are_the_reference_rounded(dtype, variant):
    for row_index in range(len(ROWS[dtype])):
        for shape in SHAPES:
            for noncontig in (False, True):
                args = case(shape, dtype, row_index, variant, noncontig,
                            case_seed("half-cpu", shape, dtype, row_index, variant, noncontig))
                want_args, got_args = written(args), written(args)
                want = reference.multistep_update(*want_args)
                got = cpu_op(*got_args)
                what = f"{variant} {shape} row {row_index}{' strided' if noncontig else ''}"
                # LML after the update's loop adds its terms to the stored x': a sum rounded to -0.0 there plus
                # 0 * d is +0.0
                assert_same_bits(got, want, what + " x'", zero_signs=variant != "lml_no_history")
                for i, name in ((2, "history"), (9, "state"), (10, "dirs")):
                    if i < len(args) and args[i] is not None:
                        assert_same_bits(got_args[i], want_args[i], f"{what} {name}")


@pytest.mark.parametrize("dtype", list(PRECISION), ids=str)
def test_the_cases_reach_the_edges(dtype):
    """The stored values of the update cases include ties, subnormals, -0.0, infinities from overflow and NaN
    (so test_stores_are_the_reference_rounded checks them)."""
    args = case((4, 4, 33, 33), dtype, 0, "history", False, case_seed("half-cpu-edges", dtype))
    (a, e), _ = ROWS[dtype][0]
    x, out = args[0].float(), args[1].float()
    sums = (a * x + e * out).double()  # x' before the store
    stored = reference.multistep_update(*written(args)).double()
    nearest = sums.to(dtype).double()
    mirror = 2 * sums - nearest  # the other neighbour of a tie, not representable otherwise
    ties = torch.isfinite(nearest) & (sums != nearest) & (mirror.to(dtype).double() == mirror)
    assert int(ties.sum()) > 100, int(ties.sum())
    info = torch.finfo(dtype)
    assert bool(((stored.abs() < info.smallest_normal) & (stored != 0)).any())
    assert bool((stored.eq(0) & stored.signbit()).any())
    assert bool((torch.isfinite(x) & torch.isfinite(out) & torch.isinf(stored)).any())
    assert bool(stored.isnan().any())
