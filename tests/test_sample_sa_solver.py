"""ds.sample's "sa_solver" (SA-Solver on a VP schedule): the SASolverScheduler drop-in's loop on the same model,
grid and noise, and its empirical convergence order on an exact Gaussian-mixture denoiser (tau = 0: the ODE)."""

import math

import pytest
import torch

import diffsampler as ds
from diffsampler.bench.quality import TARGETS
from diffsampler.integrations import diffusers as fused
from test_sample import SD, make_model, max_rel


def _drop_in(model, x, steps, tau, generator=None, **config):
    scheduler = fused.SASolverScheduler(**SD, tau_func=lambda t: tau, **config)
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t), t, x, generator=generator).prev_sample
    return x


@pytest.mark.parametrize("tau", [0.0, 0.7])
@pytest.mark.parametrize("options, config", [
    (dict(), dict()),
    (dict(predictor_order=3, corrector_order=1, prediction="v"), dict(predictor_order=3, corrector_order=1,
                                                                      prediction_type="v_prediction")),
    (dict(predict_x0=False, sigmas="karras"), dict(algorithm_type="noise_prediction", use_karras_sigmas=True)),
    (dict(corrector_order=4, lower_order_final=False, timestep_spacing="trailing"),
     dict(corrector_order=4, lower_order_final=False, timestep_spacing="trailing")),
], ids=str)
def test_sa_solver_matches_the_drop_in(options, config, tau, backend):
    model, x = make_model(), torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    expected = _drop_in(model, x, 12, tau, torch.Generator().manual_seed(5), **config)
    got = ds.sample(model, x, steps=12, solver="sa_solver", schedule=ds.schedules.VP.scaled_linear(), tau=tau,
                    generator=torch.Generator().manual_seed(5), backend=backend, **options)
    assert max_rel(got, expected) <= 1e-5


def test_sa_solver_tau_draws_noise():
    model, x = make_model(), torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    runs = [ds.sample(model, x, steps=10, solver="sa_solver", tau=tau, generator=torch.Generator().manual_seed(seed))
            for tau, seed in ((0.5, 1), (0.5, 2), (0.0, 1), (0.0, 2))]
    assert max_rel(runs[0], runs[1]) > 1e-2
    assert torch.equal(runs[2], runs[3])


@pytest.mark.parametrize("predictor_order, corrector_order, order", [(1, 2, 2), (2, 2, 2), (2, 3, 3)])
@pytest.mark.parametrize("predict_x0", [True, False])
def test_sa_solver_ode_convergence_order(predictor_order, corrector_order, order, predict_x0):
    """tau = 0 on VPContinuous (exact mixture denoiser): the error against a 400-step UniPC-3 reference falls as
    steps^-order, order the corrector's number of interpolation nodes."""
    sch = ds.schedules.VPContinuous()
    model = TARGETS["smooth-16d"]().model(sch)
    x = torch.randn(128, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    truth = ds.sample(model, x, steps=400, solver="unipc", order=3, schedule=sch, final="eps")

    def err(n):
        got = ds.sample(model, x, steps=n, solver="sa_solver", schedule=sch, final="eps", tau=0.0,
                        predictor_order=predictor_order, corrector_order=corrector_order, predict_x0=predict_x0)
        return ((got - truth).norm(dim=1) / truth.norm(dim=1)).median().item()

    slope = math.log(err(40) / err(80)) / math.log(2)
    assert abs(slope - order) < 0.5, slope


def test_sa_solver_needs_a_final_sigma_above_zero():
    with pytest.raises(ValueError, match="final sigma > 0"):
        ds.sample(make_model(), torch.randn(1, 4, 4, 4), steps=5, solver="sa_solver",
                  schedule=ds.schedules.VPContinuous(), final="zero")
    with pytest.raises(ValueError, match="tau must be"):
        ds.sample(make_model(), torch.randn(1, 4, 4, 4), steps=5, solver="sa_solver", tau=-1.0)
