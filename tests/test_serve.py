"""Continuous batching (diffsampler.serve.BatchSampler): requests with different solvers, step counts and
arrival times in one running batch, each against diffsampler.sample run on it alone (bitwise on the C++ CPU
backend in float32), and its bad input."""

import pytest
import torch

import diffsampler as ds
from diffsampler.serve import BatchSampler

from update_cases import SESSION_SEED, case_seed, rel_err

SHAPE = (2, 5, 5)


def model(x, t):
    """Per-sample and exactly rounded (one multiply, one add per element): a sample's output does not depend on
    the batch it is in, so batched and alone runs can agree bitwise."""
    tt = t.to(x.dtype).reshape(-1, *[1] * (x.dim() - 1))
    return x * (0.8 + tt * 1e-4) + tt * 1e-5


DISCRETE = [  # (steps, solver, options, arrival tick): discrete training timesteps
    (6, "dpmpp_2m", {}, 0),
    (5, "unipc", {}, 0),
    (4, "ddim", {"eta": 1.0}, 1),
    (5, "dpmpp_3m", {}, 2),
    (3, "deis", {}, 2),
    (7, "dpmpp_2m_sde", {}, 3),
]
CONTINUOUS = [  # float times; Euler scales x_T and each model input
    (5, "euler", {}, 0),
    (3, "euler", {}, 1),
    (4, "flow_euler", {}, 1),
    (2, "flow_euler", {}, 4),
]


def serve_all(requests, backend, capacity=3, pad=False):
    """Submit requests at their arrival ticks (or as soon as a row is free after it); {index: x0} and x_T."""
    server = BatchSampler(model, capacity, SHAPE, backend=backend, pad=pad)
    x_T = {i: torch.randn(SHAPE, generator=torch.Generator().manual_seed(case_seed("serve", i))) for i in
           range(len(requests))}
    waiting, ids, done, tick = list(range(len(requests))), {}, {}, 0
    while waiting or server.pending:
        while waiting and requests[waiting[0]][3] <= tick and len(ids) - len(done) < capacity:
            i = waiting.pop(0)
            steps, solver, options, _ = requests[i]
            ids[server.submit(x_T[i], steps, solver, generator=torch.Generator().manual_seed(100 + i),
                              **options)] = i
        done.update({ids[rid]: x for rid, x in server.step().items()})
        tick += 1
    ds.error_flags.check(server.status)
    return done, x_T


@pytest.mark.parametrize("pad", [False, True], ids=["busy-rows", "padded"])
@pytest.mark.parametrize("requests", [DISCRETE, CONTINUOUS], ids=["discrete", "continuous"])
def test_every_request_is_its_own_sample_call(backend, requests, pad):
    done, x_T = serve_all(requests, backend, pad=pad)
    assert sorted(done) == list(range(len(requests)))
    for i, (steps, solver, options, _) in enumerate(requests):
        alone = ds.sample(model, x_T[i][None], steps, solver, generator=torch.Generator().manual_seed(100 + i),
                          check_nan=False, backend=backend, **options)[0]
        if backend == "cpu":
            assert torch.equal(done[i], alone), solver
        else:
            assert rel_err(done[i], alone) < 1e-5, solver


def test_requests_differ_from_one_another():
    """The results are not all one request's (a test that every row was stepped with its own plan)."""
    done, _ = serve_all(DISCRETE, "cpu")
    assert len({tuple(x.flatten().tolist()) for x in done.values()}) == len(DISCRETE)


def test_bad_input():
    server = BatchSampler(model, 1, SHAPE, backend="cpu")
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="x_T must be a tensor of sample_shape"):
        server.submit(torch.randn(3, *SHAPE))
    server.submit(x, 3, "ddim")
    with pytest.raises(ValueError, match="all 1 rows are taken"):
        server.submit(x, 3, "ddim")
    server.run()
    with pytest.raises(ValueError, match="discrete .* or every one continuous"):
        server.submit(x, 3, "flow_euler")
    with pytest.raises(ValueError, match="DPM-Solver-v3"):
        import numpy as np

        server.submit(x, 3, "dpmv3", ems=ds.solvers.dpmv3.EMS.constant(np.linspace(-12.0, 12.0, 200)))
    with pytest.raises(ValueError, match="capacity must be an int"):
        BatchSampler(model, 0, SHAPE)
    assert server.step() == {}
    assert SESSION_SEED >= 0
