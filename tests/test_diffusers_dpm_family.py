"""The DPM-Solver family's remaining drop-ins (EDM and cosine DPM-Solver++, SA-Solver) against diffusers' classes:
full loops, fp32 max relative difference <= 1e-5, the same noise from the same generator."""

import diffusers
import pytest
import torch

from diffsampler.integrations import diffusers as fused
from diffsampler.solvers.grid import Grid
from test_integrations_diffusers import X, both, run
from test_sample import make_model, max_rel

EDM_DPM_CONFIGS = [
    dict(),
    dict(solver_order=3),
    dict(solver_order=1),
    dict(algorithm_type="sde-dpmsolver++"),
    dict(solver_type="heun", sigma_schedule="exponential"),
    dict(prediction_type="v_prediction", final_sigmas_type="sigma_min", sigma_data=1.0),
    dict(solver_order=3, lower_order_final=False, euler_at_final=True, rho=5.0),
    dict(thresholding=True, sample_max_value=1.5),
    dict(algorithm_type="sde-dpmsolver++", solver_type="heun", sigma_schedule="exponential", solver_order=1),
    dict(algorithm_type="sde-dpmsolver++", final_sigmas_type="sigma_min"),  # the last step goes up a rounding
]


COSINE_DPM_CONFIGS = [
    dict(),
    dict(solver_order=1),
    dict(solver_type="heun", sigma_schedule="karras"),
    dict(prediction_type="epsilon", sigma_data=0.5, sigma_max=80.0, sigma_min=0.002, rho=5.0,
         sigma_schedule="karras"),
    dict(lower_order_final=False, euler_at_final=True),
]
brownian = pytest.mark.filterwarnings("ignore:Should have:UserWarning")  # torchsde: queries a rounding outside


def test_ve_grid_has_alpha_one():
    grid = Grid(timesteps=(0.0,), sigmas=(2.0, 0.5), ve=True, discrete=False)
    assert grid.alpha_sigma(0) == (1.0, 2.0)
    assert grid.lam(1) - grid.lam(0) == pytest.approx(torch.log(torch.tensor(4.0)).item())
    with pytest.raises(ValueError, match="flow and ve"):
        Grid(timesteps=(0.0,), sigmas=(2.0, 0.5), ve=True, flow=True)


@pytest.mark.parametrize("config", EDM_DPM_CONFIGS, ids=str)
@pytest.mark.parametrize("steps", [7, 20])
def test_edm_dpmsolver_multistep(config, steps):
    ours, theirs = both("EDMDPMSolverMultistepScheduler", config, make_model(), X, steps, seed=1, scale_input=True)
    assert max_rel(ours, theirs) <= 1e-5


def test_edm_dpmsolver_img2img_start_late():
    ours, theirs = both("EDMDPMSolverMultistepScheduler", dict(solver_order=3), make_model(), X, 20, start=8,
                        scale_input=True)
    assert max_rel(ours, theirs) <= 1e-5


@pytest.mark.parametrize("schedule", ["karras", "exponential"])
def test_edm_sde_heun_last_step_of_length_zero(schedule):
    """The float32 grid ends a rounding below sigma_min: diffusers' lambdas make that second-order step of length
    h = 0 and its heun weight (1 - e^{-2h}) / (-2h) + 1 NaN; the drop-in's float64 h < 0 gives a finite step."""
    config = dict(algorithm_type="sde-dpmsolver++", final_sigmas_type="sigma_min", sigma_schedule=schedule,
                  solver_type="heun")
    ours, theirs = both("EDMDPMSolverMultistepScheduler", config, make_model(), X, 20, seed=1, scale_input=True)
    assert torch.isnan(theirs).any() and torch.isfinite(ours).all()


def test_edm_sde_third_order_is_refused():
    scheduler = fused.EDMDPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=3)
    scheduler.set_timesteps(10)
    t = scheduler.timesteps[0]
    with pytest.raises(ValueError, match="solver_order <= 2"):
        scheduler.step(X, t, X)


def test_edm_sample_prediction_raises_as_diffusers():
    for cls in (fused.EDMDPMSolverMultistepScheduler, diffusers.EDMDPMSolverMultistepScheduler):
        scheduler = cls(prediction_type="sample")
        scheduler.set_timesteps(5)
        t = scheduler.timesteps[0]
        with pytest.raises(ValueError):
            scheduler.step(X, t, X)


@brownian
@pytest.mark.parametrize("config", COSINE_DPM_CONFIGS, ids=str)
@pytest.mark.parametrize("steps", [7, 20])
def test_cosine_dpmsolver_multistep(config, steps):
    pytest.importorskip("torchsde")
    ours, theirs = both("CosineDPMSolverMultistepScheduler", config, make_model(), X, steps, seed=1, scale_input=True)
    assert max_rel(ours, theirs) <= 1e-5


@brownian
def test_cosine_dpmsolver_noise_is_the_generators():
    """Another seed gives another Brownian path: the comparison above sees the noise."""
    pytest.importorskip("torchsde")
    results = []
    for cls, seed in ((fused.CosineDPMSolverMultistepScheduler, 1), (diffusers.CosineDPMSolverMultistepScheduler, 2)):
        generator = torch.Generator().manual_seed(seed)
        results.append(run(cls(), make_model(), X, 7, dict(generator=generator), scale_input=True))
    assert max_rel(*results) > 1e-2


@brownian
def test_cosine_third_order_is_refused():
    pytest.importorskip("torchsde")
    scheduler = fused.CosineDPMSolverMultistepScheduler(solver_order=3)
    scheduler.set_timesteps(10)
    t = scheduler.timesteps[0]
    with pytest.raises(ValueError, match="solver_order <= 2"):
        scheduler.step(X, t, X)


@pytest.mark.parametrize("name", ["EDMDPMSolverMultistepScheduler", "CosineDPMSolverMultistepScheduler"])
def test_in_fused(name):
    assert fused.FUSED[name] is getattr(fused, name)
    assert issubclass(fused.FUSED[name], getattr(diffusers, name))
