"""The DPM-Solver family's remaining drop-ins (EDM and cosine DPM-Solver++, SA-Solver) against diffusers' classes:
full loops, fp32 max relative difference <= 1e-5, the same noise from the same generator."""

import math

import diffusers
import pytest
import torch

from diffsampler.integrations import diffusers as fused
from diffsampler.solvers.grid import Grid
from test_integrations_diffusers import X, both, run
from test_sample import SD, make_model, max_rel

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
def test_cosine_final_sigma_min_is_refused():
    """diffusers' step() queries its Brownian tree below sigma_min on the last step there (RecursionError)."""
    pytest.importorskip("torchsde")
    with pytest.raises(RecursionError):
        run(diffusers.CosineDPMSolverMultistepScheduler(final_sigmas_type="sigma_min"), make_model(), X, 5,
            dict(generator=torch.Generator().manual_seed(1)), scale_input=True)
    scheduler = fused.CosineDPMSolverMultistepScheduler(final_sigmas_type="sigma_min")
    scheduler.set_timesteps(5)
    with pytest.raises(ValueError, match="final_sigmas_type='zero'"):
        scheduler.step(X, scheduler.timesteps[0], X)


@brownian
def test_cosine_third_order_is_refused():
    pytest.importorskip("torchsde")
    scheduler = fused.CosineDPMSolverMultistepScheduler(solver_order=3)
    scheduler.set_timesteps(10)
    t = scheduler.timesteps[0]
    with pytest.raises(ValueError, match="solver_order <= 2"):
        scheduler.step(X, t, X)


@pytest.mark.parametrize("name", ["EDMDPMSolverMultistepScheduler", "CosineDPMSolverMultistepScheduler",
                                  "SASolverScheduler"])
def test_in_fused(name):
    assert fused.FUSED[name] is getattr(fused, name)
    assert issubclass(fused.FUSED[name], getattr(diffusers, name))


SA_CONFIGS = [
    dict(),
    dict(predictor_order=1, corrector_order=1),
    dict(predictor_order=3, corrector_order=4),
    dict(predictor_order=4, corrector_order=1),
    dict(algorithm_type="noise_prediction"),
    dict(algorithm_type="noise_prediction", predictor_order=3, corrector_order=3, prediction_type="sample"),
    dict(use_karras_sigmas=True),
    dict(use_exponential_sigmas=True, prediction_type="v_prediction"),
    dict(use_beta_sigmas=True, lower_order_final=False),
    dict(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction"),
    dict(thresholding=True, prediction_type="sample", sample_max_value=1.5),
    dict(timestep_spacing="trailing", beta_schedule="squaredcos_cap_v2"),
]
SA_TAUS = {"default": None, "ode": lambda t: 0.0, "half": lambda t: 0.5 if t > 300 else 0.2}


def _sa_config(config, tau):
    return {**SD, **config} if SA_TAUS[tau] is None else {**SD, **config, "tau_func": SA_TAUS[tau]}


def _sa_run64(scheduler, steps):
    """A float64 loop with diffusers' sigmas in float64 too (its coefficient math is then float64 as ours)."""
    scheduler.set_timesteps(steps)
    scheduler.sigmas = scheduler.sigmas.double()
    model, x, generator = make_model(), X.double(), torch.Generator().manual_seed(1)
    for t in scheduler.timesteps:
        x = scheduler.step(model(x.float(), t).double(), t, x, generator=generator).prev_sample
    return x


@pytest.mark.parametrize("config", SA_CONFIGS, ids=str)
@pytest.mark.parametrize("tau", SA_TAUS)
@pytest.mark.parametrize("steps", [7, 20])
def test_sa_solver(config, tau, steps):
    """fp32 loops within 1e-5 of diffusers' (at orders 3-4 5e-5: diffusers' float32 Lagrange coefficients in
    monomial form round to that, and 1e-4 for a noise prediction from x0, eps = (x - alpha x0) / sigma, which
    amplifies it by 1 / sigma); in float64 both agree to 1e-12."""
    cfg = _sa_config(config, tau)
    ours, theirs = both("SASolverScheduler", cfg, make_model(), X, steps, seed=1)
    high = max(cfg.get("predictor_order", 2), cfg.get("corrector_order", 2)) > 2
    tol = (1e-4 if cfg.get("prediction_type") == "sample" and "noise_prediction" in str(cfg) else 5e-5) if high \
        else 1e-5
    assert max_rel(ours, theirs) <= tol
    ours, theirs = (_sa_run64(cls(**cfg), steps) for cls in (fused.SASolverScheduler, diffusers.SASolverScheduler))
    assert max_rel(ours, theirs) <= 1e-12


def test_sa_solver_gap_at_orders_3_4_is_diffusers_float32_coefficients():
    """The reason for test_sa_solver's looser bound at orders 3-4: diffusers' own get_coefficients_fn in float64
    equals our quadrature of the Lagrange integrals (up to its factor e^{-(1 + tau^2) lambda_t}) to 1e-12; in
    float32, its monomial expansion loses 1e-6 relative on the (alternating, cancelling) coefficients."""
    from diffsampler.solvers.sa_solver import _lagrange_integrals

    sched = diffusers.SASolverScheduler()
    nodes, lam_t, tau = [3.5, 3.0, 2.5, 2.0], 4.0, 1.0
    for order in (1, 2, 3, 4):
        lams = nodes[:order]
        ours = _lagrange_integrals(lams, lam_t, lam_t - lams[0], 1 + tau * tau)
        coeffs = {dt: [float(v) for v in sched.get_coefficients_fn(
            order, torch.tensor(lams[0], dtype=dt), torch.tensor(lam_t, dtype=dt),
            [torch.tensor(v, dtype=dt) for v in lams], torch.tensor(tau, dtype=dt))] for dt in (torch.float64,
                                                                                          torch.float32)}
        factor = math.exp(-(1 + tau * tau) * lam_t)
        assert max(abs(d * factor / o - 1) for d, o in zip(coeffs[torch.float64], ours)) < 1e-12
        err32 = max(abs(a - b) for a, b in zip(coeffs[torch.float32], coeffs[torch.float64]))
        if order == 4:
            assert err32 > 1e-6 * max(abs(v) for v in coeffs[torch.float64])


def test_sa_solver_noise_is_the_generators():
    ours, theirs = both("SASolverScheduler", SD, make_model(), X, 7, seed=1)
    other = run(fused.SASolverScheduler(**SD), make_model(), X, 7, dict(generator=torch.Generator().manual_seed(2)))
    assert max_rel(ours, theirs) <= 1e-5 < max_rel(other, theirs)


def test_sa_solver_img2img_start_late():
    ours, theirs = both("SASolverScheduler", {**SD, "predictor_order": 3, "corrector_order": 3}, make_model(), X, 20,
                        seed=1, start=8)
    assert max_rel(ours, theirs) <= 3e-5


def test_sa_solver_noise_prediction_thresholds_x0():
    """diffusers' step() fails with thresholding in noise_prediction (it indexes its alpha table with None); the
    drop-in thresholds the implied x0 as in data_prediction: a sample model predicting x0 = 3 ends near 1 (the
    bound; the grid ends at the smallest training sigma, not 0), not near 3."""
    cfg = {**SD, "algorithm_type": "noise_prediction", "prediction_type": "sample", "thresholding": True,
           "tau_func": SA_TAUS["ode"]}
    with pytest.raises(RuntimeError):
        run(diffusers.SASolverScheduler(**cfg), lambda x, t: 3 * torch.ones_like(x), X, 7)
    for algorithm in ("noise_prediction", "data_prediction"):
        out = run(fused.SASolverScheduler(**{**cfg, "algorithm_type": algorithm}), lambda x, t: 3 * torch.ones_like(x),
                  X, 7)
        assert (out - 1).abs().max() < 0.25
