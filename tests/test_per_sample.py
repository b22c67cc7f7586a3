"""Heterogeneous batches: one step row per sample. The indexed op with a step per sample, and the eager op with
a (B, WIDTH) row tensor, against every sample stepped alone (the float64 reference as the truth; bitwise against
the same kernel on the C++ CPU backend in float32), on every backend, and their bad input."""

import pytest
import torch

from diffsampler import error_flags, ops, step_row
from diffsampler.ops import StateRow, UpdateCoeffs

from test_indexed import random_steps
from update_cases import DTYPES, SESSION_SEED, backend_op, case_seed, rel_err

BOUND = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2}


def operands(seed, shape, dtype, noncontig=False):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(s, generator=gen, dtype=torch.float64).to(dtype)  # noqa: E731
    x, out, noise = rand(*shape), rand(*shape), rand(*shape)
    if noncontig:
        out = rand(*shape, 2)[..., 1]
    return gen, x, out, noise, rand(3, *shape), rand(*shape)


def indexed_alone(x, out, table, step, history, noise, state, clip, backend):
    """Every sample alone through the one-step indexed op: (x', history, state)."""
    xs = []
    for b in range(x.shape[0]):
        h, s = history[:, b:b + 1].clone(), state[b:b + 1].clone()
        xs.append(ops.multistep_update_indexed(x[b:b + 1], out[b:b + 1], table, step[b:b + 1], history=h,
                                               noise=noise[b:b + 1], clip=clip, state=s, backend=backend))
        history[:, b:b + 1], state[b:b + 1] = h, s
    return torch.cat(xs), history, state


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", ["plain", "clip", "noncontig", "odd"])
def test_per_sample_steps_are_each_sample_alone(backend, dtype, variant):
    seed = case_seed("per-sample", variant, dtype)
    shape = (5, 1, 1023) if variant == "odd" else (4, 3, 8, 8)
    gen, x, out, noise, history, state = operands(seed, shape, dtype, variant == "noncontig")
    table = ops.step_table(*random_steps(gen), 3, True)
    step = torch.randint(0, table.coeffs.shape[0], (shape[0],), generator=gen)
    step[0] = step[1]  # two samples share a row, the others may not
    clip = 0.7 if variant == "clip" else None
    h, s = history.clone(), state.clone()
    got = ops.multistep_update_indexed(x, out, table, step, history=h, noise=noise, clip=clip, state=s,
                                       backend=backend)
    wide = torch.float64 if dtype == torch.float32 else dtype
    truth = indexed_alone(x.to(wide), out.to(wide), table, step, history.to(wide), noise.to(wide), state.to(wide),
                          clip, "reference")
    for g, t in zip((got, h, s), truth):
        assert g.dtype == dtype and rel_err(g, t) < BOUND[dtype]
    if backend == "cpu" and dtype == torch.float32:  # the same kernel on each sample's elements
        alone = indexed_alone(x, out, table, step, history.clone(), noise, state.clone(), clip, "cpu")
        for g, a in zip((got, h, s), alone):
            assert torch.equal(g, a)


def per_sample_coeffs(gen, batch, n_reads):
    """One random UpdateCoeffs per sample with n_reads reads; every other one rewrites the state."""
    def u(n=1):
        v = (torch.rand(n, generator=gen, dtype=torch.float64) - 0.5).tolist()
        return v if n > 1 else v[0]

    def b():
        return tuple(u(n_reads + 1)) if n_reads else (u(),)

    return [UpdateCoeffs(p=u(), q=u(), a=u(), b=b(), e=u(), c=u(), g=u(),
                         state=StateRow(a=u(), b=b(), e=u(), c=u(), g=u()) if i % 2 else None,
                         r=tuple(u(n_reads)) if n_reads > 1 else ((u(),) if n_reads else ()))
            for i in range(batch)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_reads", [0, 2])
def test_eager_rows_are_each_sample_alone(backend, dtype, n_reads):
    seed = case_seed("eager-rows", n_reads, dtype)
    shape = (3, 2, 33)
    gen, x, out, noise, history, state = operands(seed, shape, dtype)
    coeffs = per_sample_coeffs(gen, shape[0], n_reads)
    reads = (1, 2)[:n_reads]
    rows = ops.step_rows(coeffs, writes_state=True)
    h, s = history.clone(), state.clone()
    got = ops.multistep_update(x, out, rows, history=h, write_slot=0, read_slots=reads, noise=noise, state=s,
                               check_nan=False, backend=backend)

    def alone(x, history, state, backend):
        xs = []
        for b, k in enumerate(coeffs):
            hb, sb = history[:, b:b + 1].clone(), state[b:b + 1].clone()
            xs.append(ops.multistep_update(x[b:b + 1], out[b:b + 1].to(x.dtype), k, history=hb, write_slot=0,
                                           read_slots=reads, noise=noise[b:b + 1].to(x.dtype), state=sb,
                                           check_nan=False, backend=backend))
            history[:, b:b + 1], state[b:b + 1] = hb, sb
        return torch.cat(xs), history, state

    wide = torch.float64 if dtype == torch.float32 else dtype
    truth = alone(x.to(wide), history.to(wide), state.to(wide), "reference")
    for g, t in zip((got, h, s), truth):
        assert rel_err(g, t) < BOUND[dtype]
    if backend == "cpu" and dtype == torch.float32:
        for g, a in zip((got, h, s), alone(x, history.clone(), state.clone(), "cpu")):
            assert torch.equal(g, a)


def test_rows_without_noise_or_state_drop_those_terms():
    """Rows are device data: their c and g apply only where noise and state are given."""
    gen = torch.Generator().manual_seed(SESSION_SEED)
    x, out = torch.randn(2, 9, generator=gen), torch.randn(2, 9, generator=gen)
    k = [UpdateCoeffs(p=0.3, q=0.2, a=0.9, b=(0.4,), c=0.5, g=0.7), UpdateCoeffs(p=0.1, q=0.6, a=1.1, b=(-0.2,))]
    plain = [UpdateCoeffs(p=0.3, q=0.2, a=0.9, b=(0.4,)), k[1]]
    got = ops.multistep_update(x, out, ops.step_rows(k), backend="cpu")
    want = ops.multistep_update(x, out, ops.step_rows(plain), backend="cpu")
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend_name", ["reference", "triton"])
def test_a_bad_per_sample_step_is_clamped_and_flagged(backend_name):
    """On the device a sample's step outside the table is clamped and flagged (the backend-level op, as a GPU
    runs it); the public op on CPU tensors raises at once."""
    from diffsampler.ops.backends import _status

    if not _status(backend_name)[0]:
        pytest.skip(f"{backend_name} is not available")
    gen = torch.Generator().manual_seed(SESSION_SEED)
    table = ops.step_table(*random_steps(gen), 3, True)
    last = table.coeffs.shape[0] - 1
    x, out = torch.randn(3, 10, generator=gen), torch.randn(3, 10, generator=gen)
    runs = []
    for step in (torch.tensor([0, last + 7, 1]), torch.tensor([0, last, 1])):
        status = error_flags.new("cpu")
        args = (x, out, torch.zeros(3, 3, 10), table.coeffs, table.slots, step, table.n_reads, torch.zeros(3, 10),
                0.0, torch.zeros(3, 10), status)
        runs.append((backend_op("multistep_update_indexed", backend_name)(*args), status))
    (bad, bad_status), (good, good_status) = runs
    assert torch.equal(bad, good)
    assert bad_status.item() == error_flags.BITS["step"] and good_status.item() == 0
    with pytest.raises(RuntimeError, match="clamped a step index"):
        ops.multistep_update_indexed(x, out, table, torch.tensor([0, last + 7, 1]), history=torch.zeros(3, 3, 10),
                                     state=torch.zeros(3, 10), backend=backend_name)


def test_bad_input():
    k = UpdateCoeffs(p=1.0, q=0.0, a=1.0, b=(0.5,))
    table = ops.step_table([k, k], [0, 1], [(), ()], 2, False)
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"one per sample \(shape \(3,\)\)"):
        ops.multistep_update_indexed(x, x, table, torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="one per sample"):
        ops.multistep_update_indexed(x, x, table, torch.zeros(3, 1, dtype=torch.int64))
    for bad in (5, -1, 1 << 40):  # hostile indices never reach memory: each sample's row is checked
        with pytest.raises(RuntimeError, match=f"step {bad} is outside the table's"):
            ops.multistep_update_indexed(x, x, table, torch.tensor([0, bad, 1]), backend="cpu")
    rows = ops.step_rows([k] * 3)
    with pytest.raises(ValueError, match="float64 step rows of every sample"):
        ops.multistep_update(x, x, rows[:2])
    with pytest.raises(ValueError, match="float64 step rows of every sample"):
        ops.multistep_update(x, x, rows.float())
    with pytest.raises(ValueError, match="neither thresholding"):
        ops.multistep_update(x, x, rows, threshold_ratio=0.9)
    with pytest.raises(ValueError, match="history must be contiguous"):
        ops.multistep_update(x, x, rows, history=torch.zeros(2, 4, 3).transpose(1, 2))
    with pytest.raises(ValueError, match="read_slots must be in"):
        ops.multistep_update(x, x, rows, history=torch.zeros(2, 3, 4), read_slots=(0,))
    with pytest.raises(ValueError, match=r"coeffs\[1\] must be an UpdateCoeffs"):
        ops.step_rows([k, "k"])
    assert rows.shape == (3, step_row.WIDTH)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend_name", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, 3, 8, 8), (5, 1023), (64, 4, 32, 32)], ids=str)
def test_per_sample_steps_on_the_gpu(backend_name, dtype, shape):
    """The CUDA and Triton kernels with a step per sample against every sample alone on the reference."""
    gen, x, out, noise, history, state = operands(case_seed("per-sample-gpu", shape, dtype), shape, dtype)
    table = ops.step_table(*random_steps(gen), 3, True)
    step = torch.randint(0, table.coeffs.shape[0], (shape[0],), generator=gen)
    wide = torch.float64 if dtype == torch.float32 else dtype
    truth = indexed_alone(x.to(wide), out.to(wide), table, step, history.to(wide), noise.to(wide), state.to(wide),
                          None, "reference")
    cuda = lambda t: t.cuda()  # noqa: E731
    dev_table = ops.StepTable(cuda(table.coeffs), cuda(table.slots), table.n_reads, table.state, table.history_slots)
    h, s = cuda(history), cuda(state)
    status = error_flags.new("cuda")
    got = ops.multistep_update_indexed(cuda(x), cuda(out), dev_table, cuda(step), history=h, noise=cuda(noise),
                                       state=s, status=status, backend=backend_name)
    for g, t in zip((got, h, s), truth):
        assert g.dtype == dtype and rel_err(g, t) < BOUND[dtype]
    assert status.item() == 0
