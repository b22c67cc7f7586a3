"""CUDA-graph capture of whole loops (CapturedSampler): the eager fallback with its reason on CPU, and on a GPU
(tests marked gpu) replays equal to eager runs."""

import logging

import pytest
import torch

import diffsampler as ds
from diffsampler.sample import model_times


def model(x, t):
    return torch.tanh(x) * (1 + t.float() / 1000)


def test_cpu_falls_back_to_eager_with_a_reason(caplog):
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    sampler = ds.CapturedSampler(model, steps=6, solver="unipc")
    with caplog.at_level(logging.WARNING, logger="diffsampler"):
        first = sampler(x)
        second = sampler(x + 1)
    assert [r.getMessage() for r in caplog.records].count(caplog.records[0].getMessage()) == 1
    assert "CUDA graphs need a CUDA tensor" in caplog.records[0].getMessage()
    assert torch.equal(first, ds.sample(model, x, steps=6, solver="unipc", check_nan=False))
    assert torch.equal(second, ds.sample(model, x + 1, steps=6, solver="unipc", check_nan=False))
    assert torch.equal(ds.sample(model, x, steps=6, solver="unipc", cuda_graph=True), first)
    step_mode = ds.CapturedSampler(model, steps=6, solver="unipc", capture="step")
    assert torch.equal(step_mode(x), first)  # its eager fallback: the indexed loop, the same numbers


def test_bad_options():
    with pytest.raises(ValueError, match="generator must be None"):
        ds.sample(model, torch.randn(1, 2), steps=3, cuda_graph=True, generator=torch.Generator())
    with pytest.raises(ValueError, match="check_nan syncs the host"):
        ds.CapturedSampler(model, steps=3, check_nan=True)
    with pytest.raises(ValueError, match="capture must be 'loop' or 'step'"):
        ds.CapturedSampler(model, steps=3, capture="steps")
    with pytest.raises(ValueError, match="supports neither lml nor threshold_ratio"):
        ds.CapturedSampler(model, steps=3, capture="step", lml=ds.LML(kappa=0.5))


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("capture", ["loop", "step"])
@pytest.mark.parametrize("solver", ["ddim", "dpmpp_2m", "dpmpp_3m", "unipc", "deis", "ghvb", "euler"])
def test_replay_equals_eager(solver, capture):
    """Deterministic solvers: the replayed graph (the whole loop, or one step per step with its coefficients
    read by step index) gives the eager numbers bitwise, for new inputs too."""
    sampler = ds.CapturedSampler(model, steps=10, solver=solver, capture=capture)
    for seed in (0, 1):
        x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(seed)).cuda()
        eager = ds.sample(model, x, steps=10, solver=solver, check_nan=False)
        assert torch.equal(sampler(x), eager)
    assert len(sampler.graphs) == 1 and not sampler.fallbacks


@pytest.mark.gpu
@gpu
def test_indexed_loop_never_syncs():
    from diffsampler.graphs import IndexedLoop

    x = torch.randn(2, 4, 16, 16, device="cuda")
    plan = ds.solvers.make_plan("unipc", ds.schedules.VP.scaled_linear(), 20, "eps")
    loop = IndexedLoop(plan, x)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in plan.steps:
            x = loop.step(model, x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(x).all()


@pytest.mark.gpu
@gpu
def test_sde_capture_runs():
    sampler = ds.CapturedSampler(model, steps=10, solver="dpmpp_2m_sde")
    out = sampler(torch.randn(2, 4, 16, 16, device="cuda"))
    assert torch.isfinite(out).all() and not sampler.fallbacks


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("solver", ["ddim", "dpmpp_2m", "dpmpp_2m_sde", "unipc", "ghvb"])
def test_loop_never_syncs(solver):
    """A 20-step loop under torch.cuda.set_sync_debug_mode('error'): any host sync raises."""
    x = torch.randn(2, 4, 16, 16, device="cuda")
    plan = ds.solvers.make_plan(solver, ds.schedules.VP.scaled_linear(), 20, "eps")
    times = model_times(plan, x)  # uploaded before the checked region
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = ds.run_plan(model, x, plan, times=times, check_nan=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out).all()


@pytest.mark.gpu
@pytest.mark.parametrize("capture", ["loop", "step"])
@pytest.mark.parametrize("solver", ["dpmpp_2m", "unipc", "ddim"])
def test_replay_equals_eager_on_each_gpu_backend(gpu_backend, solver, capture):
    """test_replay_equals_eager with the backend forced: the Triton kernels capture too, bitwise."""
    sampler = ds.CapturedSampler(model, steps=10, solver=solver, capture=capture, backend=gpu_backend)
    for seed in (0, 1):
        x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(seed)).cuda()
        eager = ds.sample(model, x, steps=10, solver=solver, check_nan=False, backend=gpu_backend)
        assert torch.equal(sampler(x), eager)
    assert len(sampler.graphs) == 1 and not sampler.fallbacks
