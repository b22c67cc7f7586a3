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
        expected["diffsampler::multistep_update_pure"] = expected.pop("diffsampler::multistep_update")
    expected["aten::lift_fresh"] = 1  # the model times, uploaded once
    if plan.history_slots:
        expected["aten::new_empty"] = 1  # the history ring, once
    if plan.uses_state:
        expected["aten::zeros_like"] = 1  # the state, once
    if solver.endswith("_sde"):
        expected["aten::randn"] = steps - 1
    assert dict(counter.ops) == expected
    assert not SYNCING & set(counter.ops)
