"""A sampling step dispatches a fixed, small set of ops and never synchronises (groundwork of issue 6):
counted with a TorchDispatchMode on CPU, per solver."""

import pytest
import torch

import diffsampler as ds
from diffsampler.bench.common import OpCounter

SYNCING = {"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::equal"}


# per step, with check_nan=False and a model that dispatches nothing of its own: the fused update and the
# indexing of the model time (plus the noise draw of SDE steps, none on the last, noise-free step)
PER_STEP = {"diffsampler::multistep_update": 1, "aten::select": 1}


@pytest.mark.parametrize("solver", ["ddim", "dpmpp_2m", "dpmpp_3m", "unipc", "deis", "ghvb", "dpmpp_2m_sde"])
def test_ops_per_step_are_fixed_and_sync_free(solver):
    steps = 8
    x = torch.randn(2, 3, 4, 4)
    plan = ds.solvers.make_plan(solver, ds.schedules.VP.scaled_linear(), steps, "eps")
    out = torch.zeros_like(x)
    with OpCounter() as counter:
        ds.run_plan(lambda y, t: out, x, plan, check_nan=False, backend="cpu")
    expected = {name: n * steps for name, n in PER_STEP.items()}
    if not plan.history_slots and not plan.uses_state:  # the functional form of the op
        expected["diffsampler::multistep_update_functional"] = expected.pop("diffsampler::multistep_update")
    expected["aten::lift_fresh"] = 1  # the model times, uploaded once
    if plan.history_slots:
        expected["aten::new_empty"] = 1  # the history ring, once
    if plan.uses_state:
        expected["aten::zeros_like"] = 1  # the state, once
    if solver.endswith("_sde"):
        expected["aten::randn"] = steps - 1
    assert dict(counter.ops) == expected
    assert not SYNCING & set(counter.ops)


@pytest.mark.parametrize("rank", [1, 3])
def test_lml_steps_are_sync_free(rank):
    """An LML step adds one Gram pass and one weights op (the r x r solve, C++ on the CPU): no sync, and no
    host-to-device upload inside the loop (the mixing matrices are uploaded before it)."""
    steps = 8
    x = torch.randn(2, 3, 4, 4)
    plan = ds.solvers.make_plan("dpmpp_2m", ds.schedules.VP.scaled_linear(), steps, "eps")
    out = torch.zeros_like(x)
    lml = ds.LML(damping=0.1, kappa=0.5, rank=rank)
    with OpCounter() as total:
        ds.run_plan(lambda y, t: out, x, plan, check_nan=False, backend="cpu", lml=lml)
    assert not SYNCING & set(total.ops)
    assert total.ops["diffsampler::lml_gram"] == steps and total.ops["diffsampler::multistep_update"] == steps
    assert total.ops["diffsampler::lml_weights"] == steps
    # host-to-device uploads: the model times and the distinct mixing matrices, all before the loop
    assert total.ops["aten::lift_fresh"] == 1 + rank + min(max(steps - rank, 0), rank)


# --- on a GPU (marked gpu): torch.cuda.set_sync_debug_mode("error") raises on any host sync ----------------------


def _never_syncs(fn):

    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        return fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.parametrize("solver", ["ddim", "dpmpp_2m", "unipc", "dpmpp_2m_sde"])
def test_loop_never_syncs_on_gpu(gpu_backend, solver):
    """A 20-step loop on each GPU backend (test_graphs checks the default one, test_loop_never_syncs)."""
    from diffsampler.sample import model_times

    x = torch.randn(2, 4, 16, 16, device="cuda")
    plan = ds.solvers.make_plan(solver, ds.schedules.VP.scaled_linear(), 20, "eps")
    times = model_times(plan, x)  # uploaded before the checked region
    model = lambda y, t: torch.tanh(y) * (1 + t.float() / 1000)
    out = _never_syncs(lambda: ds.run_plan(model, x, plan, times=times, check_nan=False, backend=gpu_backend))
    assert torch.isfinite(out).all()


@pytest.mark.gpu
def test_resample_with_a_threshold_never_syncs_on_gpu(gpu_backend):
    """The ESS decision is taken on the device (docs/smc.md): no host sync without check=True."""
    lw, particles = torch.randn(3, 10, device="cuda") * 2, torch.randn(30, 4, device="cuda")
    before = particles.clone()
    out = _never_syncs(lambda: ds.ops.resample(lw, particles, "systematic", 0.5, backend=gpu_backend))
    rows = ds.ops.ancestor_rows(out.ancestors)
    assert torch.equal(particles, before[rows])
