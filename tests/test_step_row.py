"""The step row (diffsampler.step_row): one layout for the C/CUDA loader, the Triton loader and the reference, the
one builder behind multistep_update, step_table and thresholding, and the width every op refuses otherwise."""

import pytest
import torch

import diffsampler as ds
import diffsampler.triton_kernels  # noqa: F401  (the subpackage, also when ops has not probed it yet)
from diffsampler import _C, ops, reference, step_row
from diffsampler.ops import StateRow, UpdateCoeffs

TRITON_OK, TRITON_WHY = ds.triton_kernels.available()


def test_c_layout_is_the_python_layout():
    assert dict(_C.ROW_LAYOUT) == step_row.LAYOUT
    assert _C.SLOTS_WIDTH == step_row.SLOTS_WIDTH and _C.MAX_HISTORY_READS == step_row.MAX_READS


@pytest.mark.skipif(not TRITON_OK, reason=f"triton backend unavailable: {TRITON_WHY}")
def test_triton_constexprs_are_the_python_layout():
    from diffsampler.triton_kernels import fused_update

    assert {name: c.value for name, c in fused_update.ROW.items()} == step_row.LAYOUT
    assert fused_update.ROW_WIDTH.value == step_row.WIDTH and fused_update.SLOTS_WIDTH.value == step_row.SLOTS_WIDTH


def test_offsets_are_distinct_and_fill_the_row():
    """Every entry of a row belongs to exactly one field (b, r, sb span their MAX_READS (+ 1) entries)."""
    spans = {"B": step_row.MAX_READS + 1, "R": step_row.MAX_READS, "SB": step_row.MAX_READS + 1}
    used = [o + j for name, o in step_row.LAYOUT.items() if name != "WIDTH" for j in range(spans.get(name, 1))]
    assert sorted(used) == list(range(step_row.WIDTH))


def test_builder_places_every_field():
    k = UpdateCoeffs(p=1.0, q=2.0, a=3.0, b=(4.0, 5.0), e=6.0, c=7.0, g=8.0, r=(9.0,),
                     state=StateRow(a=10.0, b=(11.0, 12.0), e=13.0, c=14.0, g=15.0))
    f = step_row.fields(step_row.row(k))
    assert (f.p, f.q, f.a, f.e, f.c, f.g) == (1.0, 2.0, 3.0, 6.0, 7.0, 8.0)
    assert f.b == (4.0, 5.0, 0.0, 0.0) and f.r == (9.0, 0.0, 0.0)
    assert (f.sa, f.se, f.sc, f.sg, f.sb) == (10.0, 13.0, 14.0, 15.0, (11.0, 12.0, 0.0, 0.0))
    assert f.writes_state == 1.0 and (f.ratio, f.max_value, f.hx, f.hm) == (0.0, 0.0, 0.0, 1.0)
    plain = step_row.fields(step_row.row(UpdateCoeffs(p=1.0, q=0.0, a=1.0, b=(1.0,))))
    assert plain.writes_state == 0.0 and (plain.sa, plain.sg) == (0.0, 0.0)
    kept = step_row.fields(step_row.row(UpdateCoeffs(p=1.0, q=0.0, a=1.0, b=(1.0,)), writes_state=True))
    assert kept.writes_state == 1.0 and kept.sg == 1.0 and kept.sb == (0.0,) * 4  # s' = s


def test_builder_thresholds_the_data_prediction_of_a_noise_history():
    """eps_of = (alpha, sigma): x0 = (x - sigma eps) / alpha is thresholded and mapped back to eps."""
    alpha, sigma = 0.6, 0.8
    k = UpdateCoeffs(p=0.5, q=1.0, a=1.0, b=(1.0, 1.0), r=(0.25,), eps_of=(alpha, sigma))
    f = step_row.fields(step_row.row(k, threshold=(0.9, 1.2)))
    assert f.p == pytest.approx(1 / alpha - sigma / alpha * 0.5) and f.q == pytest.approx(-sigma / alpha)
    assert f.r[0] == pytest.approx(-sigma / alpha * 0.25)
    assert (f.ratio, f.max_value) == (0.9, 1.2)
    assert (f.hx, f.hm) == (pytest.approx(1 / sigma), pytest.approx(-alpha / sigma))
    assert step_row.fields(step_row.row(k, threshold=(0.9, 1.2)))[:2] != step_row.fields(step_row.row(k))[:2]


def test_step_table_rows_are_the_builders_rows():
    ks = [UpdateCoeffs(p=1.0, q=0.5, a=0.9, b=(0.3,), g=0.2),
          UpdateCoeffs(p=1.0, q=0.5, a=0.9, b=(0.3, 0.1), r=(0.4,), state=StateRow(a=0.1, b=(0.2, 0.3), g=0.5))]
    table = ops.step_table(ks, [0, 1], [(), (0,)], 2, True)
    assert table.coeffs.shape == (2, step_row.WIDTH)
    assert table.coeffs.tolist() == [step_row.row(k, writes_state=True) for k in ks]


def _case():
    x, out, z = torch.randn(2, 5), torch.randn(2, 5), torch.randn(2, 5)
    return x, out, torch.zeros(3, 2, 5), z


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=pytest.mark.skipif(
    not TRITON_OK, reason=f"triton backend unavailable: {TRITON_WHY}"))])
def test_ops_refuse_a_row_of_another_width(backend):
    x, out, history, _ = _case()
    row = step_row.row(UpdateCoeffs(p=1.0, q=0.0, a=1.0, b=(1.0,)))
    if backend == "cpu":
        update, gram = torch.ops.diffsampler.multistep_update, torch.ops.diffsampler.lml_gram
        functional = torch.ops.diffsampler.multistep_update_functional
        error = RuntimeError
    else:
        update, gram, functional = ds.triton_kernels.multistep_update, ds.triton_kernels.lml_gram, None
        error = ValueError
    for bad in (row[:-1], row + [0.0], row[:6]):
        with pytest.raises(error, match=f"coeffs must be a step row of {step_row.WIDTH} entries"):
            update(x, out, history, 0, [], bad, None, 0.0, False)
        if functional is not None:
            with pytest.raises(error, match=f"coeffs must be a step row of {step_row.WIDTH} entries"):
                functional(x, out, bad, None, 0.0, False)
        if backend == "cpu":
            with pytest.raises(error, match=f"lml_gram: coeffs must be a step row of {step_row.WIDTH} entries"):
                gram(x, out, history, [], bad, 0.0, torch.zeros(1, 2, 5), [0.0, 0.0, 1.0])


@pytest.mark.parametrize("backend", ["reference", "cpu", pytest.param("triton", marks=pytest.mark.skipif(
    not TRITON_OK, reason=f"triton backend unavailable: {TRITON_WHY}"))])
def test_a_row_that_rewrites_the_state_needs_one(backend):
    x, out, history, _ = _case()
    row = step_row.row(UpdateCoeffs(p=1.0, q=0.0, a=1.0, b=(1.0,)), writes_state=True)
    update = {"reference": reference.multistep_update, "cpu": torch.ops.diffsampler.multistep_update,
              "triton": ds.triton_kernels.multistep_update}[backend]
    with pytest.raises((RuntimeError, ValueError), match="writes_state entry.*state is required"):
        update(x, out, history, 0, [], row, None, 0.0, False)


BACKENDS = ["reference", "cpu", pytest.param("triton", marks=pytest.mark.skipif(
    not TRITON_OK, reason=f"triton backend unavailable: {TRITON_WHY}"))]


@pytest.mark.parametrize("backend", BACKENDS)
def test_indexed_rows_decide_whether_the_state_is_written(backend):
    """A table row with writes_state = 0 reads the state (x' += g s) and leaves it; one with 1 rewrites it: each
    row is self-contained, on every backend."""
    x, out, history, z = _case()
    state = torch.randn(2, 5)
    k = UpdateCoeffs(p=0.5, q=1.0, a=0.9, b=(0.3, 0.2), c=0.1, g=0.4, state=StateRow(a=0.1, b=(0.2, 0.3), g=0.5))
    table = ops.step_table([k, k], [0, 0], [(1,), (1,)], 3, True)
    table.coeffs[1, step_row.WRITES_STATE] = 0.0
    m0 = 0.5 * x + out
    want_x = 0.9 * x + 0.3 * m0 + 0.2 * history[1] + 0.1 * z + 0.4 * state
    want_s = 0.1 * x + 0.2 * m0 + 0.3 * history[1] + 0.5 * state
    for step, written in ((0, True), (1, False)):
        s, h = state.clone(), history.clone()
        got = ops.multistep_update_indexed(x, out, table, torch.tensor([step]), history=h, noise=z, state=s,
                                           backend=backend)
        assert torch.allclose(got, want_x, atol=1e-6), (backend, step)
        assert torch.allclose(s, want_s if written else state, atol=1e-6), (backend, step)


def test_indexed_reference_is_the_eager_reference():
    """The indexed reference runs the eager reference's math on the table's row."""
    x, out, history, z = _case()
    x, out, history, z = x.double(), out.double(), history.double(), z.double()
    state = torch.randn(2, 5, dtype=torch.float64)
    k = UpdateCoeffs(p=0.5, q=1.0, a=0.9, b=(0.3, 0.2), c=0.1, g=0.4, r=(0.7,),
                     state=StateRow(a=0.1, b=(0.2, 0.3), e=0.2, c=0.3, g=0.5))
    table = ops.step_table([k], [0], [(2,)], 3, True)
    s1, h1, s2, h2 = state.clone(), history.clone(), state.clone(), history.clone()
    got = reference.multistep_update_indexed(x, out, h1, table.coeffs, table.slots, torch.tensor([0]), 1, z, 0.0, s1)
    want = reference.multistep_update(x, out, h2, 0, [2], step_row.row(k), z, 0.0, False, s2)
    assert torch.equal(got, want) and torch.equal(h1, h2) and torch.equal(s1, s2)
