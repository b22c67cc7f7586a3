"""torch.compile(fullgraph=True) of whole sampling loops, every solver: no graph break, the eager numbers."""

import pytest
import torch

import diffsampler as ds

CASES = {
    "ddim": (ds.schedules.VP.scaled_linear(), "eps"),
    "dpmpp_2m": (ds.schedules.VP.scaled_linear(), "eps"),
    "dpmpp_3m": (ds.schedules.VP.scaled_linear(), "eps"),
    "dpmpp_2m_sde": (ds.schedules.VP.scaled_linear(), "eps"),
    "dpm_2m": (ds.schedules.VP.scaled_linear(), "eps"),
    "unipc": (ds.schedules.VP.scaled_linear(), "eps"),
    "deis": (ds.schedules.VP.scaled_linear(), "eps"),
    "ghvb": (ds.schedules.VP.scaled_linear(), "eps"),
    "euler": (ds.schedules.VP.scaled_linear(), "eps"),
    "heun": (ds.schedules.EDM(), "x0"),
    "flow_euler": (ds.schedules.Flow(shift=3.0), "flow"),
    "flow_dpmpp_2m": (ds.schedules.Flow(shift=3.0), "flow"),
}


@pytest.mark.parametrize("solver", sorted(CASES))
def test_fullgraph_loop(solver):
    schedule, prediction = CASES[solver]
    plan = ds.solvers.make_plan(solver, schedule, 6, prediction)
    model = lambda x, t: torch.tanh(x) * (1 + t.float() / 1000)
    loop = lambda x: ds.run_plan(model, x, plan, check_nan=False, backend="cpu")
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    eager = loop(x)
    torch._dynamo.reset()
    compiled = torch.compile(loop, fullgraph=True, backend="aot_eager")
    torch.manual_seed(0)
    assert torch.equal(compiled(x), eager)


@pytest.mark.parametrize("solver", ["ddim", "dpmpp_2m"])
def test_inductor_loop(solver):
    """The default backend (inductor) lowers both forms of the op: the functional one (no history, DDIM) and
    the mutating one (DPM-Solver++ 2M's history)."""
    plan = ds.solvers.make_plan(solver, ds.schedules.VP.scaled_linear(), 4, "eps")
    model = lambda x, t: torch.tanh(x) * (1 + t.float() / 1000)
    loop = lambda x: ds.run_plan(model, x, plan, check_nan=False, backend="cpu")
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    assert torch.allclose(torch.compile(loop, fullgraph=True)(x), loop(x), rtol=1e-5, atol=1e-6)


def test_opcheck_functional_op():
    from update_cases import make_case

    args = make_case((2, 3, 5), torch.float32, 0, seed=3)
    torch.library.opcheck(torch.ops.diffsampler.multistep_update_functional.default,
                          [args[0], args[1], args[5], args[6], 0.0, False])


@pytest.mark.parametrize("solver", ["dpmpp_2m", "heun", "flow_euler", "ddim"])
def test_fullgraph_one_call_sample(solver):
    """ds.sample itself compiles with fullgraph=True (its defaults, check_nan included): the plan is built on
    the host at trace time, once per distinct arguments; a changed step count or option retraces with its
    own plan."""
    schedule, prediction = CASES[solver]
    model = lambda x, t: torch.tanh(x) * (1 + t.float() / 1000)
    args = {"steps": 6, "eta": 0.5} if solver == "ddim" else {"steps": 6}
    loop = lambda x: ds.sample(model, x, solver=solver, schedule=schedule, **args)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    compiled = torch.compile(loop, fullgraph=True, backend="aot_eager")
    for steps, eta in ((6, 0.5), (4, 0.25)):
        args["steps"] = steps
        if "eta" in args:
            args["eta"] = eta
        torch.manual_seed(1)
        got = compiled(x)
        torch.manual_seed(1)
        assert torch.equal(got, loop(x))


# --- on a GPU (marked gpu): the loops above as CUDA tensors, on the CUDA and Triton kernels ---------------------


@pytest.mark.gpu
@pytest.mark.parametrize("solver", ["ddim", "dpmpp_2m", "unipc", "dpmpp_2m_sde"])
def test_fullgraph_loop_on_gpu(gpu_backend, solver):
    """No graph break around the CUDA op or the Triton op, and the eager numbers bit for bit (aot_eager runs the
    same kernels; the SDE's noise from the same seeded generator state)."""
    schedule, prediction = CASES[solver]
    plan = ds.solvers.make_plan(solver, schedule, 6, prediction)
    model = lambda x, t: torch.tanh(x) * (1 + t.float() / 1000)
    loop = lambda x: ds.run_plan(model, x, plan, check_nan=False, backend=gpu_backend)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)).cuda()
    torch.manual_seed(0)
    eager = loop(x)
    torch._dynamo.reset()
    compiled = torch.compile(loop, fullgraph=True, backend="aot_eager")
    torch.manual_seed(0)
    got = compiled(x)
    assert got.is_cuda and torch.equal(got, eager)


@pytest.mark.gpu
@pytest.mark.parametrize("solver", ["ddim", "dpmpp_2m"])
def test_inductor_loop_on_gpu(gpu_backend, solver):
    """Inductor on the GPU lowers both forms of the op (functional: DDIM; mutating: DPM-Solver++ 2M's history)."""
    plan = ds.solvers.make_plan(solver, ds.schedules.VP.scaled_linear(), 4, "eps")
    model = lambda x, t: torch.tanh(x) * (1 + t.float() / 1000)
    loop = lambda x: ds.run_plan(model, x, plan, check_nan=False, backend=gpu_backend)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)).cuda()
    torch._dynamo.reset()
    assert torch.allclose(torch.compile(loop, fullgraph=True)(x), loop(x), rtol=1e-5, atol=1e-6)
