"""Op-level argument checks and results that must not depend on the backend or the input's magnitude: finiteness
of the model output, integer slots, zero-size samples, one coefficient check for step tables and eager steps,
meta tensors, resampling's normalisation and 1-D log-weights, the error bits shared with the C++ extension."""

import numpy as np
import pytest
import torch

from diffsampler import error_flags, ops, reference
from diffsampler.ops import UpdateCoeffs

BACKENDS = ["reference", "cpu", "triton"]
K1 = UpdateCoeffs(p=0.5, q=-0.2, a=0.9, b=(0.3, 0.1))


def _available(backend):
    status = ops.backends()
    if not status[backend]:
        pytest.skip(status["reasons"][backend])


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_model_output_is_caught(bad):
    x = torch.randn(2, 3)
    out = x.clone()
    out[1, 2] = bad
    with pytest.raises(ValueError, match="model_out contains non-finite values"):
        ops.multistep_update(x, out, UpdateCoeffs(p=1.0, q=0.5, a=0.5, b=(0.5,)))


@pytest.mark.parametrize("slot", [1.0, 1.7, True, torch.tensor(1), "1", None])
def test_write_slot_must_be_an_integer(slot):
    x, h = torch.randn(2, 3), torch.zeros(3, 2, 3)
    with pytest.raises(ValueError, match="write_slot must be an integer"):
        ops.multistep_update(x, x, K1, history=h, write_slot=slot, read_slots=[2])


@pytest.mark.parametrize("slot", [1, np.int64(1), np.int32(1)])
def test_integer_write_slots_are_accepted(slot):
    x, h = torch.randn(2, 3), torch.zeros(3, 2, 3)
    ops.multistep_update(x, x, K1, history=h, write_slot=slot, read_slots=[np.int64(2)], backend="reference")
    assert h[1].abs().sum() > 0 and h[0].abs().sum() == 0


def test_float_read_slots_are_refused():
    x, h = torch.randn(2, 3), torch.zeros(3, 2, 3)
    with pytest.raises(ValueError, match=r"read_slots\[0\] must be an integer"):
        ops.multistep_update(x, x, K1, history=h, write_slot=0, read_slots=[1.5])


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_size_samples_with_thresholding_return_empty(backend):
    _available(backend)
    x = torch.randn(3, 0)
    got = ops.multistep_update(x, x, UpdateCoeffs(p=1.0, q=0.5, a=0.5, b=(0.5,)), threshold_ratio=0.9,
                               threshold_max=2.0, backend=backend)
    assert got.shape == (3, 0)


def test_step_table_checks_coefficients_like_multistep_update():
    short = UpdateCoeffs(p=1.0, q=0.0, a=1.0, b=(0.5,))  # one read needs two b entries
    x, h = torch.randn(2, 3), torch.zeros(2, 2, 3)
    with pytest.raises(ValueError, match=r"coeffs.b must have 1 \+ len\(read_slots\) = 2 entries, got 1"):
        ops.multistep_update(x, x, short, history=h, write_slot=0, read_slots=[1])
    with pytest.raises(ValueError, match=r"coeffs\[0\].b must have 1 \+ len\(read_slots\) = 2 entries, got 1"):
        ops.step_table([short], [0], [(1,)], 2, False)


def test_step_table_records_its_history_size():
    table = ops.step_table([K1], [0], [(1,)], 3, False)
    assert table.history_slots == 3
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="history has 2 slots; the table addresses 3"):
        ops.multistep_update_indexed(x, x, table, torch.zeros(1, dtype=torch.int64), history=torch.zeros(2, 2, 3))


def test_meta_tensors_give_shapes():
    x = torch.empty(2, 3, 4, device="meta")
    h = torch.empty(3, 2, 3, 4, device="meta")
    assert ops.multistep_update(x, x, K1, history=h, write_slot=0, read_slots=[1]).shape == x.shape
    table = ops.step_table([K1], [0], [(1,)], 3, False, device="meta")
    assert ops.multistep_update_indexed(x, x, table, torch.zeros(1, dtype=torch.int64, device="meta"),
                                        history=h).shape == x.shape
    coeffs = torch.empty(reference.ems_rows(1, False), 3, 4, device="meta")
    assert ops.ems_update(x, x, coeffs, history=h, write_slot=0, read_slots=[1]).shape == x.shape
    lw, particles = torch.empty(2, 5, device="meta"), torch.empty(10, 3, device="meta")
    r = ops.resample(lw, particles)
    assert r.ancestors.shape == (2, 5) and r.log_w.shape == (2, 5) and r.ess.shape == (2,)
    with pytest.raises(ValueError, match="check=True reads the log-weights on the host"):
        ops.resample(lw, particles, check=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_resampled_log_weights_stay_normalised_at_large_magnitudes(backend):
    _available(backend)
    lw = -1e6 + torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    r = ops.resample(lw, torch.randn(256, 2), ess_threshold=0.0, backend=backend)  # never resampled
    assert not r.resampled.any()
    total = r.log_w.double().exp().sum(1)
    assert torch.allclose(total, torch.ones(4, dtype=torch.float64), atol=1e-5), total


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_dimensional_log_weights_are_one_group(backend):
    _available(backend)
    lw = torch.randn(7, generator=torch.Generator().manual_seed(1))
    particles = torch.arange(7.0)[:, None].repeat(1, 2)
    r = ops.resample(lw, particles.clone(), generator=torch.Generator().manual_seed(2), backend=backend)
    want = ops.resample(lw[None], particles.clone(), generator=torch.Generator().manual_seed(2), backend=backend)
    assert r.log_w.shape == (7,) and r.ancestors.shape == (7,)
    assert r.ess.shape == () and r.resampled.shape == () and r.log_norm.shape == ()
    assert torch.equal(r.ancestors, want.ancestors[0]) and torch.equal(r.particles, want.particles)


def test_error_bits_agree_with_the_extension():
    if not ops.backends()["cpu"]:
        pytest.skip("the C++ extension is not built")
    from diffsampler import _C

    assert dict(_C.ERROR_BITS) == error_flags.BITS


def test_status_words_are_checked_and_cleared():
    status = error_flags.new("cpu")
    status.fill_(error_flags.BITS["step"] | error_flags.BITS["ancestor"])
    with pytest.raises(RuntimeError, match="a step index outside the step table; an ancestor outside"):
        error_flags.check(status)
    assert status.item() == 0
    error_flags.check(status)  # cleared: nothing to report
    with pytest.raises(ValueError, match="status must be an int32 tensor of one element"):
        ops.multistep_update_indexed(torch.randn(2, 3), torch.randn(2, 3), ops.step_table([K1], [0], [(1,)], 2, False),
                                     torch.zeros(1, dtype=torch.int64), history=torch.zeros(2, 2, 3),
                                     status=torch.zeros(1))


def test_opcheck_with_a_status_word():
    if not ops.backends()["cpu"]:
        pytest.skip("the C++ extension is not built")
    from torch.library import opcheck

    table = ops.step_table([K1], [0], [(1,)], 2, False)
    x = torch.randn(2, 3)
    opcheck(torch.ops.diffsampler.multistep_update_indexed.default,
            (x, x.clone(), torch.zeros(2, 2, 3), table.coeffs, table.slots, torch.zeros(1, dtype=torch.int64), 1,
             None, 0.0, None, error_flags.new("cpu")))
    lw = torch.randn(2, 5)
    u = ops.resample_uniforms("systematic", 2, 5, torch.Generator().manual_seed(0), "cpu")
    opcheck(torch.ops.diffsampler.resample_ancestors.default, (lw, u, 0, 0.9, error_flags.new("cpu")))
    _, anc, _, res, _ = torch.ops.diffsampler.resample_ancestors(lw, u, 0, float("inf"))
    opcheck(torch.ops.diffsampler.resample_move.default, (torch.randn(10, 3), anc, res, error_flags.new("cpu")))
