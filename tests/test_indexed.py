"""Indexed steps (issue 6): a whole schedule's coefficients on the device, read by a step counter. The op
against the host-coefficient update on every backend, whole loops against run_plan (bitwise on the C++ CPU
backend in float32), the ops a step dispatches, and bad input."""

import numpy as np
import pytest
import torch
from torch.library import opcheck

import diffsampler as ds
from diffsampler import ops
from diffsampler.ops import StateRow, UpdateCoeffs
from diffsampler.graphs import IndexedLoop, run_indexed
from diffsampler.sample import prepare

from test_sync_free import SYNCING
from update_cases import DTYPES, SESSION_SEED, backend_op, indexed_samples, rel_err

from diffsampler.bench.common import OpCounter



def random_steps(gen, n_steps=5, state=True):
    """Steps with 0..2 history reads over a ring of 3 slots, some with a state row, some reading it only."""
    def u(*shape):
        return (torch.rand(*shape, generator=gen, dtype=torch.float64) - 0.5).tolist()

    coeffs, writes, reads = [], [], []
    for i in range(n_steps):
        k = min(i, 2)
        p, q, a, e, c = u(5)
        row = None
        if state and i % 2:
            row = StateRow(a=u(1)[0], b=tuple(u(k + 1)), e=u(1)[0], c=u(1)[0], g=u(1)[0])
        coeffs.append(UpdateCoeffs(p=p, q=q, a=a, b=tuple(u(k + 1)), e=e, c=c, g=u(1)[0] if state else 0.0,
                                   state=row, r=tuple(u(k))))
        writes.append(i % 3)
        reads.append(tuple((i - j) % 3 for j in range(1, k + 1)))
    return coeffs, writes, reads


def run_steps(indexed, backend, dtype, seed, shape=(3, 5, 7, 9), state=True, clip=None, noncontig=False):
    """Five steps through the indexed op or the host-coefficient op; x, history and state at the end."""
    gen = torch.Generator().manual_seed(seed)
    coeffs, writes, reads = random_steps(gen, state=state)
    x = torch.randn(shape, generator=gen).to(dtype)
    outs = [torch.randn(shape, generator=gen).to(dtype) for _ in coeffs]
    noises = [torch.randn(shape, generator=gen).to(dtype) for _ in coeffs]
    if noncontig:  # strided model outputs and noise (history and state are ours: contiguous)
        outs = [torch.stack([o, o], -1)[..., 0] for o in outs]
        noises = [torch.stack([z, z], -1)[..., 0] for z in noises]
    history = torch.zeros(3, *shape, dtype=dtype)
    s = torch.zeros(shape, dtype=dtype) if state else None
    table = ops.step_table(coeffs, writes, reads, 3, state)
    counter = torch.zeros(1, dtype=torch.int64)
    for i, k in enumerate(coeffs):
        if indexed:
            x = ops.multistep_update_indexed(x, outs[i], table, counter, history=history, noise=noises[i],
                                             clip=clip, state=s, backend=backend)
            counter += 1
        else:
            x = ops.multistep_update(x, outs[i], k, history=history, write_slot=writes[i], read_slots=reads[i],
                                     noise=noises[i], clip=clip, state=s, check_nan=False, backend=backend)
    return x, history, s


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", ["state", "no_state", "clip", "noncontig", "odd"])
def test_indexed_op_matches_the_host_coefficient_op(backend, dtype, variant):
    opts = dict(state=variant != "no_state", clip=0.7 if variant == "clip" else None, noncontig=variant == "noncontig",
                shape=(1, 1023) if variant == "odd" else (3, 5, 7, 9))
    seed = SESSION_SEED + hash(variant) % 1000
    got = run_steps(True, backend, dtype, seed, **opts)
    truth = run_steps(False, "reference", torch.float64 if dtype == torch.float32 else dtype, seed, **opts)
    plain = run_steps(False, backend, dtype, seed, **opts)
    for g, t, p in zip(got, truth, plain):
        if g is None:
            continue
        assert rel_err(g, t) < (1e-5 if dtype == torch.float32 else 2e-2)
        if backend == "cpu" and dtype == torch.float32:  # the same kernel, the same float coefficients
            assert torch.equal(g, p)


def test_padded_reads_change_nothing_when_the_ring_holds_data():
    """A step with fewer reads than the table gets zero-weighted reads of live slots: still the same x'."""
    gen = torch.Generator().manual_seed(SESSION_SEED)
    x, out = torch.randn(2, 33, generator=gen), torch.randn(2, 33, generator=gen)
    history = torch.randn(3, 2, 33, generator=gen)
    k0 = UpdateCoeffs(p=0.5, q=-0.2, a=0.9, b=(0.3,))
    k2 = UpdateCoeffs(p=0.5, q=-0.2, a=0.9, b=(0.3, 0.1, -0.2), r=(0.05, 0.0))
    table = ops.step_table([k0, k2], [0, 0], [(), (1, 2)], 3, False)
    assert table.n_reads == 2 and table.slots[0].tolist() == [0, 1, 2, 0]
    got = ops.multistep_update_indexed(x, out, table, torch.zeros(1, dtype=torch.int64), history=history.clone(),
                                       backend="cpu")
    want = ops.multistep_update(x, out, k0, history=history.clone(), check_nan=False, backend="cpu")
    assert torch.equal(got, want)
    assert not torch.equal(got, ops.multistep_update_indexed(x, out, table, torch.ones(1, dtype=torch.int64),
                                                             history=history.clone(), backend="cpu"))


@pytest.mark.parametrize("solver", [s for s in ds.solvers.SOLVERS if s not in ("dpmv3", "mrs")] + ["unipc_dc"])
def test_indexed_loop_is_run_plan(solver):
    """Whole loops of every solver but DPM-Solver-v3 (and UniPC with DC-Solver's compensation): bitwise equal
    to run_plan on the C++ CPU backend."""
    options = {"dc_ratios": [1.0 + 0.01 * i for i in range(8)]} if solver == "unipc_dc" else {}
    if solver == "dpmpp_2s_ancestral":  # noise at every other call: IndexedLoop draws it at every step (other bits)
        options = {"eta": 0.0}
    solver = solver.removesuffix("_dc")
    schedule = {"heun": ds.schedules.EDM()}.get(solver, ds.schedules.VP.linear())
    if solver.startswith("flow"):
        schedule = ds.schedules.Flow(shift=3.0)
    _, plan, _ = prepare(None, 8, solver, schedule, None, options)
    def model(x, t):  # smooth, time-dependent (the gathered time is used), finite on every schedule
        return torch.tanh(x) + 1e-3 * t.to(x.dtype) * x

    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(SESSION_SEED))
    g1, g2 = (torch.Generator().manual_seed(SESSION_SEED + 1) for _ in range(2))
    want = ds.run_plan(model, x, plan, generator=g1, check_nan=False, backend="cpu")
    got = run_indexed(model, x, plan, generator=g2, backend="cpu")
    assert torch.isfinite(want).all()
    assert torch.equal(got, want)


def test_indexed_loop_refuses_mean_reverting_plans():
    _, plan, _ = prepare(None, 8, "mrs", None, None, {})
    with pytest.raises(ValueError, match="mean-reverting plan"):
        run_indexed(lambda x, t: x, torch.randn(4, 2), plan, backend="cpu")


@pytest.mark.parametrize("solver", ["dpmpp_2m", "unipc", "dpmpp_2m_sde"])
def test_indexed_step_dispatches_a_fixed_set_and_never_syncs(solver):
    steps = 8
    x = torch.randn(2, 3, 4, 4)
    plan = ds.solvers.make_plan(solver, ds.schedules.VP.scaled_linear(), steps, "eps")
    loop = IndexedLoop(plan, x, backend="cpu")
    out = torch.zeros_like(x)
    with OpCounter() as counter:
        for _ in range(steps):
            x = loop.step(lambda y, t: out, x)
    per_step = {"diffsampler::multistep_update_indexed": 1, "aten::index_select": 1, "aten::view": 1,
                "aten::add_": 1}
    if solver.endswith("_sde"):
        per_step["aten::randn"] = 1
    assert dict(counter.ops) == {name: n * steps for name, n in per_step.items()}
    assert not SYNCING & set(counter.ops)


def _sample_table():
    return ops.step_table(*random_steps(torch.Generator().manual_seed(SESSION_SEED)), 3, True)


def check_indexed_samples(backend, move=lambda args: args):
    """One indexed step of each sample (its operands through `move`) on `backend` against the float64 reference:
    x', the history, the state, each on the operands' device and in their dtype."""
    for args in indexed_samples(_sample_table()):
        args = move(args)
        want = [a.double().clone() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
        want = [want[0], ds.reference.multistep_update_indexed(*want), want[2], want[9]]
        got = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        got = [got[0], backend_op("multistep_update_indexed", backend)(*got), got[2], got[9]]
        bound = 1e-5 if args[0].dtype == torch.float32 else 2e-2
        for g, w in zip(got[1:], want[1:]):
            assert g.device == args[0].device and g.dtype == args[0].dtype and rel_err(g, w) < bound


def test_indexed_samples_match_reference(backend):
    check_indexed_samples(backend)


def test_opcheck_indexed():
    """torch.library.opcheck of the compiled op on the samples of test_indexed_samples_match_reference."""
    for args in indexed_samples(_sample_table()):
        opcheck(torch.ops.diffsampler.multistep_update_indexed.default, args)


def test_bad_input():
    k = UpdateCoeffs(p=1.0, q=0.0, a=1.0, b=(0.5,))
    table = ops.step_table([k], [0], [()], 2, False)
    x = torch.randn(2, 3)
    step = torch.zeros(1, dtype=torch.int64)
    with pytest.raises(ValueError, match="step must be an int64"):
        ops.multistep_update_indexed(x, x, table, torch.zeros(1), history=torch.zeros(2, 2, 3))
    with pytest.raises(ValueError, match="table must be an ops.StepTable"):
        ops.multistep_update_indexed(x, x, (table.coeffs, table.slots), step)
    with pytest.raises(ValueError, match="state must be None"):
        ops.multistep_update_indexed(x, x, table, step, state=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="history must be contiguous"):
        ops.multistep_update_indexed(x, x, table, step, history=torch.zeros(2, 3, 2).transpose(1, 2))
    with pytest.raises(ValueError, match="history_slots must exceed"):
        ops.step_table([k, UpdateCoeffs(p=1.0, q=0.0, a=1.0, b=(0.5, 0.5))], [0, 1], [(), (0,)], 1, False)
    with pytest.raises(ValueError, match="pass state=True"):
        ops.step_table([UpdateCoeffs(p=1.0, q=0.0, a=1.0, b=(0.5,), g=0.2)], [0], [()], 2, False)
    with pytest.raises(ValueError, match="read_slots must be in"):
        ops.step_table([UpdateCoeffs(p=1.0, q=0.0, a=1.0, b=(0.5, 0.5))], [0], [(0,)], 2, False)
    ems = ds.solvers.dpmv3.EMS.constant(np.linspace(-12.0, 12.0, 200))
    _, plan, _ = prepare(None, 5, "dpmv3", ds.schedules.VP.linear(), "eps", {"ems": ems})
    with pytest.raises(ValueError, match="DPM-Solver-v3"):
        IndexedLoop(plan, x)


def test_indexed_step_compiles_fullgraph():
    """One step function compiles to at most two graphs that serve every step (the device counter is an input,
    not a constant)."""
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(SESSION_SEED))
    plan = ds.solvers.make_plan("unipc", ds.schedules.VP.scaled_linear(), 6, "eps")

    def model(y, t):
        return torch.tanh(y) * (1 + t.float() / 1000)

    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    loop = IndexedLoop(plan, x, backend="cpu")
    step = torch.compile(lambda y: loop.step(model, y), fullgraph=True, backend="aot_eager")
    got = x
    for _ in plan.steps:
        got = step(got)
    assert torch.equal(got, ds.run_plan(model, x, plan, check_nan=False, backend="cpu"))
    # one graph per value of the host-side step mirror at first, then dynamo makes it dynamic: two in all
    assert counters["stats"]["unique_graphs"] <= 2


def test_steps_past_the_table_raise():
    x = torch.randn(2, 3)
    plan = ds.solvers.make_plan("dpmpp_2m", ds.schedules.VP.scaled_linear(), 3, "eps")
    loop = IndexedLoop(plan, x, backend="cpu")
    for _ in range(3):
        x = loop.step(lambda y, t: y, x)
    with pytest.raises(ValueError, match="all 3 steps were taken; call reset"):
        loop.step(lambda y, t: y, x)
    loop.reset()
    loop.step(lambda y, t: y, x)
    table = loop.table
    with pytest.raises(RuntimeError, match="step 3 is outside the table's"):
        ops.multistep_update_indexed(x, x, table, torch.tensor([3]), history=torch.zeros(2, 2, 3), backend="cpu")


# --- on a GPU (marked gpu): the samples, opcheck and whole loops as CUDA tensors, on the CUDA and Triton kernels --


@pytest.mark.gpu
def test_indexed_samples_match_reference_on_gpu(gpu_backend):
    """test_indexed_samples_match_reference with every operand, the table and the step on the GPU."""
    from test_cuda import to_cuda

    check_indexed_samples(gpu_backend, to_cuda)


@pytest.mark.gpu
def test_opcheck_indexed_on_gpu(gpu_backend):
    from test_cuda import to_cuda

    if gpu_backend == "triton":
        from diffsampler.triton_kernels import fused_update  # noqa: F401  (registers the Triton op)
    op = {"cuda": "multistep_update_indexed", "triton": "multistep_update_indexed_triton"}[gpu_backend]
    op = getattr(torch.ops.diffsampler, op)
    for args in indexed_samples(_sample_table(), dtypes=[torch.float32]):
        opcheck(op.default, to_cuda(args))


@pytest.mark.gpu
@pytest.mark.parametrize("solver", ["ddim", "dpmpp_2m", "dpmpp_3m", "unipc", "deis", "ghvb"])
def test_indexed_loop_is_run_plan_on_gpu(gpu_backend, solver):
    """test_indexed_loop_is_run_plan on the GPU: the device-indexed loop against the host-coefficient loop on
    the same backend (the same step row, read from the device instead of passed as arguments)."""
    _, plan, _ = prepare(None, 8, solver, ds.schedules.VP.linear(), None, {})

    def model(x, t):
        return torch.tanh(x) + 1e-3 * t.to(x.dtype) * x

    x = torch.randn(16, 2, 9, generator=torch.Generator().manual_seed(SESSION_SEED)).cuda()
    want = ds.run_plan(model, x, plan, check_nan=False, backend=gpu_backend)
    got = run_indexed(model, x, plan, backend=gpu_backend)
    assert torch.isfinite(want).all() and got.is_cuda
    assert rel_err(got, want) < 1e-6, rel_err(got, want)
