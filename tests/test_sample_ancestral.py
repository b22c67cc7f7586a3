"""diffsampler.sample's ancestral and two-call solvers (euler_ancestral, dpm_2, dpmpp_2s_ancestral): the
k-diffusion functions / diffusers schedulers on the same model, grid and noise, the weak convergence of the SDE
samplers on a Gaussian target and the ODE order at eta = 0."""

import math

import diffusers
import numpy as np
import pytest
import torch

import diffsampler as ds
from diffsampler.integrations import kdiffusion as K
from diffsampler.schedules import EDM, VP, Flow, sigma_to_t
from test_sample import DIFFUSERS_PREDICTION, SD, make_model, max_rel

W = torch.linspace(-0.4, 0.4, 16, dtype=torch.float64).reshape(4, 4)


def denoiser(x, sigma):
    """A nonlinear denoiser: x = x0 + sigma eps (sigma: one per sample, or 0-dim)."""
    sigma = sigma.reshape(-1, *[1] * (x.dim() - 1))
    x_in = x / (sigma**2 + 1).sqrt()
    return 0.8 * torch.tanh(torch.einsum("bchw,cd->bdhw", x_in, W.to(x.dtype))) + 0.1 * x_in


def generator_noise(shape, seed):
    """noise_sampler drawing as sample() draws (float32 from the generator, then x's dtype)."""
    g = torch.Generator().manual_seed(seed)
    return lambda sigma, sigma_next: torch.randn(shape, generator=g, dtype=torch.float32).double()


X = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.mark.parametrize("solver, sampler, kw", [
    ("euler_ancestral", "sample_euler_ancestral", dict(eta=0.7, s_noise=0.9)),
    ("dpm_2", "sample_dpm_2", dict()),
    ("dpmpp_2s_ancestral", "sample_dpmpp_2s_ancestral", dict(eta=1.0)),
    ("dpmpp_2s_ancestral", "sample_dpmpp_2s_ancestral", dict(eta=0.0)),
])
def test_edm_is_k_diffusion(solver, sampler, kw, backend):
    edm = EDM(sigma_min=0.01, sigma_max=20.0)
    sigmas = torch.tensor(edm.sigmas(8), dtype=torch.float64)
    calls = []
    counted = lambda y, t: calls.append(1) or denoiser(y, t)
    x = X if backend == "reference" else X.float()  # the fused kernels store float32
    got = ds.sample(counted, x, steps=8, solver=solver, schedule=edm, generator=torch.Generator().manual_seed(3),
                    backend=backend, **kw)
    noise = {} if solver == "dpm_2" else {"noise_sampler": generator_noise(X.shape, 3)}
    expected = getattr(K, sampler)(denoiser, X * sigmas[0], sigmas, disable=True, **kw, **noise)
    assert max_rel(got.double(), expected) <= (1e-12 if x.dtype == torch.float64 else 1e-5)
    assert len(calls) == (8 if solver == "euler_ancestral" else 2 * 8 - 1)


def flow_velocity(x, t):
    """A velocity model v(x, t), t = 1000 sigma."""
    return torch.tanh(torch.einsum("bchw,cd->bdhw", x, W.to(x.dtype))) * (1 + t.reshape(-1, 1, 1, 1) / 1000) - x


@pytest.mark.parametrize("solver, sampler", [("euler_ancestral", "sample_euler_ancestral_RF"),
                                             ("dpmpp_2s_ancestral", "sample_dpmpp_2s_ancestral_RF")])
@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_flow_is_comfyui_rf(solver, sampler, eta):
    flow = Flow(shift=3.0)
    sigmas = torch.tensor(flow.sigmas(8), dtype=torch.float64)
    x = X / 10
    got = ds.sample(flow_velocity, x, steps=8, solver=solver, schedule=flow, eta=eta,
                    generator=torch.Generator().manual_seed(4))

    def as_denoiser(y, sigma):  # D = x - sigma v at the model time sample() gives (float32 sigma * 1000)
        s = float(sigma[0])
        t = torch.tensor(float(np.float32(s) * np.float32(1000)), dtype=torch.float64)
        return y - s * flow_velocity(y, t.expand(y.shape[0]))
    expected = getattr(K, sampler)(as_denoiser, x, sigmas, disable=True, eta=eta,
                                   noise_sampler=generator_noise(x.shape, 4))
    assert max_rel(got, expected) <= 1e-12


def run_diffusers(scheduler, model, x, steps, seed):
    scheduler.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    kw = {"generator": g} if "generator" in scheduler.step.__code__.co_varnames else {}
    x = x * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.step(model(scheduler.scale_model_input(x, t), t), t, x, **kw).prev_sample
    return x


@pytest.mark.parametrize("solver, name", [("euler_ancestral", "EulerAncestralDiscreteScheduler"),
                                          ("dpm_2", "KDPM2DiscreteScheduler")])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_vp_is_diffusers(solver, name, spacing, prediction):
    model, x = make_model(), torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    cfg = dict(timestep_spacing=spacing, prediction_type=DIFFUSERS_PREDICTION[prediction], steps_offset=1)
    expected = run_diffusers(getattr(diffusers, name)(**SD, **cfg), model, x, 12, seed=5)
    got = ds.sample(model, x, steps=12, solver=solver, prediction=prediction, timestep_spacing=spacing,
                    steps_offset=1, generator=torch.Generator().manual_seed(5))
    assert max_rel(got, expected) <= 1e-5


def test_vp_dpmpp_2s_ancestral_is_k_diffusion():
    """On VP: k-diffusion's function on the Euler grid's sigmas, the model wrapped as k-diffusion wraps an eps
    model (D = x - sigma eps(x / sqrt(sigma^2 + 1), t(sigma)))."""
    vp = VP.scaled_linear()
    model = make_model()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    got = ds.sample(model, x, steps=10, solver="dpmpp_2s_ancestral", generator=torch.Generator().manual_seed(6))
    plan = ds.solvers.make_plan("dpmpp_2s_ancestral", vp, 10, "eps")
    log_train = np.log((((1 - vp.alphas_cumprod) / vp.alphas_cumprod) ** 0.5).numpy())
    grid_t = {}  # the grid's own (float) timesteps where sample() uses them
    sigmas = [s for s in ds.solvers.ve_grid.VEPoints(vp, 10, "eps").sigmas]
    for i, sigma in enumerate(sigmas[:-1]):
        grid_t[sigma] = plan.steps[2 * i].t

    def wrapped(y, sigma):
        s = float(sigma[0])
        t = grid_t.get(s, float(sigma_to_t(np.array(s), log_train)))
        return y - s * model((y / math.sqrt(s * s + 1)).float(), torch.tensor(t)).double()
    expected = K.sample_dpmpp_2s_ancestral(wrapped, x.double() * plan.init_scale, torch.tensor(sigmas, dtype=torch.float64),
                                           disable=True, noise_sampler=generator_noise(x.shape, 6))
    assert max_rel(got.double(), expected) <= 1e-5


# weak convergence: one Gaussian N(0.7, 0.3^2) in 1-D, its exact denoiser, many samples
MEAN, STD = 0.7, 0.3
ONE_MODE = ds.targets.GaussianMixture(torch.ones(1), torch.tensor([[MEAN]]), torch.tensor([STD]))


def exact_denoiser(target):
    def model(x, sigma):  # VE scale: x = x0 + sigma eps is VP with alpha = 1 / sqrt(1 + sigma^2)
        s = sigma.double().expand(x.shape[0])
        alpha = 1 / (1 + s**2).sqrt()
        return target.posterior_mean(x * alpha[:, None], alpha, s * alpha).to(x.dtype)
    return model


def variance_errors(solver, steps, **kw):
    x = torch.randn(100_000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    edm = EDM(sigma_min=0.01, sigma_max=20.0)
    errors = []
    for n in steps:
        y = ds.sample(exact_denoiser(ONE_MODE), x, steps=n, solver=solver, schedule=edm,
                      generator=torch.Generator().manual_seed(n), **kw)
        assert abs(y.mean().item() - MEAN) < 5e-3
        errors.append(abs(y.var().item() - STD**2))
    return errors


@pytest.mark.parametrize("solver, steps, band", [("euler_ancestral", (8, 16, 32, 64), (0.6, 1.3)),
                                                 ("dpmpp_2s_ancestral", (8, 16, 32), (1.2, 2.2))])
def test_sde_samplers_converge_weakly(solver, steps, band):
    """The sample variance converges to the target's as the steps grow (fitted weak orders ~0.8 and ~1.7 here,
    errors far above the Monte Carlo error 4e-4); with s_noise = 0.9 (a wrong noise weight) it stalls."""
    fitted = lambda errors: -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    errors = variance_errors(solver, steps)
    assert band[0] <= fitted(errors) <= band[1], errors
    assert fitted(variance_errors(solver, steps, s_noise=0.9)) < band[0]


@pytest.mark.parametrize("solver, kw, band", [("dpm_2", dict(), (1.7, 2.5)),
                                              ("dpmpp_2s_ancestral", dict(eta=0.0), (1.6, 2.5)),
                                              ("euler_ancestral", dict(eta=0.0), (0.9, 1.6))])
def test_ode_order_at_eta_0(solver, kw, band):
    """The deterministic solvers' empirical order against an 800-step run on a 3-mode mixture."""
    model = exact_denoiser(ds.targets.GaussianMixture.random(dim=6, modes=3, seed=1))
    x = torch.randn(256, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    edm = EDM(sigma_min=0.03, sigma_max=14.6)
    run = lambda n: ds.sample(model, x, steps=n, solver=solver, schedule=edm, **kw)
    truth = run(800)
    steps = (8, 16, 32, 64)
    errors = [(run(n) - truth).norm().item() for n in steps]
    order = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert band[0] <= order <= band[1], (errors, order)


def test_options_are_checked():
    with pytest.raises(ValueError, match="s_noise"):
        ds.sample(make_model(), X.float(), steps=4, solver="euler_ancestral", s_noise=-1.0)
    with pytest.raises(ValueError, match="prediction 'flow'"):
        ds.solvers.make_plan("dpmpp_2s_ancestral", Flow(), 4, "eps")
    with pytest.raises(ValueError, match="solver 'sa_solver' needs a"):
        ds.solvers.make_plan("sa_solver", Flow(), 4, "flow")
