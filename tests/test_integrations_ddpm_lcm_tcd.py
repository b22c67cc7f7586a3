"""The DDPM, LCM and TCD drop-ins give diffusers' numbers and noise (same generator), and ds.sample's "lcm" /
"tcd" solvers the drop-ins'."""

import diffusers
import pytest
import torch

import diffsampler as ds
from diffsampler.integrations import diffusers as fused
from diffsampler.solvers.consistency import lcm_timesteps
from test_integrations_diffusers import _tiny_unet
from test_sample import SD, make_model, max_rel

X = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))


def loop(cls, config, steps, seed=3, model=None, step_kw=None):
    """(final sample, the second output of every step) of a loop with a generator of `seed`."""
    sched = cls(**{**SD, **config})
    sched.set_timesteps(steps)
    model, g, x, seconds = model or make_model(), torch.Generator().manual_seed(seed), X * sched.init_noise_sigma, []
    for t in sched.timesteps:
        out = sched.step(model(x, t), t, x, generator=g, return_dict=False, **(step_kw or {}))
        x = out[0]
        seconds.append(out[1])
    return x, seconds


def assert_same(name, config, steps, **kw):
    (a, sa), (b, sb) = (loop(getattr(m, name), config, steps, **kw) for m in (fused, diffusers))
    assert max_rel(a, b) <= 1e-5
    assert max(max_rel(p, q) for p, q in zip(sa, sb)) <= 1e-5


@pytest.mark.parametrize("config", [
    dict(), dict(variance_type="fixed_large"), dict(variance_type="fixed_small_log"),
    dict(prediction_type="v_prediction", clip_sample=False), dict(prediction_type="sample"),
    dict(thresholding=True, sample_max_value=1.5), dict(timestep_spacing="trailing"),
    dict(beta_schedule="squaredcos_cap_v2", rescale_betas_zero_snr=True, prediction_type="v_prediction"),
], ids=str)
@pytest.mark.parametrize("steps", [7, 20])
def test_ddpm(config, steps):
    assert_same("DDPMScheduler", config, steps)


@pytest.mark.parametrize("config", [dict(), dict(variance_type="fixed_large")], ids=str)
def test_ddpm_every_training_step(config):
    """Each of the 1000 steps from diffusers' own trajectory: at the smallest t, beta_t = 1 - abar_t / abar_prev
    cancels, and diffusers forms it in float32 (1e-4 relative), which the drop-in reproduces (diffusers'
    test_full_loop_with_noise checks the last two steps)."""
    a, b = (getattr(m, "DDPMScheduler")(**{**SD, **config}) for m in (fused, diffusers))
    model, x = make_model(), X
    for i, t in enumerate(b.timesteps):
        out = model(x, t)
        got = a.step(out, t, x, generator=torch.Generator().manual_seed(i)).prev_sample
        x = b.step(out, t, x, generator=torch.Generator().manual_seed(i)).prev_sample
        assert max_rel(got, x) <= 2e-6, (int(t), max_rel(got, x))


def variance_model(kind):
    """A model with 2C output channels: the prediction, then the variance channels (learned: a positive variance;
    learned_range: a mixing value in [-1, 1])."""
    base = make_model()

    def model(x, t):
        out = base(x, t)
        v = torch.sigmoid(out) * 0.02 if kind == "learned" else torch.tanh(2 * out)
        return torch.cat([out, v], dim=1)

    return model


@pytest.mark.parametrize("kind", ["learned", "learned_range"])
def test_ddpm_learned_variance(kind):
    assert_same("DDPMScheduler", dict(variance_type=kind), 10, model=variance_model(kind))


def test_ddpm_fixed_large_log_is_refused_where_diffusers_returns_nan():
    b, _ = loop(diffusers.DDPMScheduler, dict(variance_type="fixed_large_log"), 5)
    assert torch.isnan(b).all()  # sqrt(log(beta_t)) with log(beta_t) < 0
    with pytest.raises(ValueError, match="fixed_large_log"):
        loop(fused.DDPMScheduler, dict(variance_type="fixed_large_log"), 5)


def test_ddpm_learned_without_variance_channels():
    with pytest.raises(ValueError, match="2 \\* 4 channels"):
        loop(fused.DDPMScheduler, dict(variance_type="learned_range"), 5)


@pytest.mark.parametrize("config", [
    dict(), dict(prediction_type="v_prediction"), dict(prediction_type="sample", thresholding=True),
    dict(clip_sample=True), dict(original_inference_steps=20), dict(timestep_scaling=5.0),
    dict(set_alpha_to_one=False),
], ids=str)
@pytest.mark.parametrize("steps", [1, 4, 8])
def test_lcm(config, steps):
    assert_same("LCMScheduler", config, steps)


@pytest.mark.parametrize("config", [dict(), dict(prediction_type="v_prediction"), dict(prediction_type="sample")],
                         ids=str)
@pytest.mark.parametrize("gamma", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("steps", [1, 4, 8])
def test_tcd(config, gamma, steps):
    assert_same("TCDScheduler", config, steps, step_kw=dict(eta=gamma))


@pytest.mark.parametrize("name", ["LCMScheduler", "TCDScheduler"])
def test_img2img_strength_and_custom_timesteps(name):
    results = []
    for cls in (getattr(fused, name), getattr(diffusers, name)):
        sched, model = cls(**SD), make_model()
        outs = []
        for kw in (dict(num_inference_steps=4, strength=0.5), dict(timesteps=[999, 759, 499, 259])):
            sched.set_timesteps(**kw)
            x, g = X.clone(), torch.Generator().manual_seed(1)
            for t in sched.timesteps:
                x = sched.step(model(x, t), t, x, generator=g).prev_sample
            outs.append(x)
        results.append(outs)
    for a, b in zip(*results):
        assert max_rel(a, b) <= 1e-5


def test_lcm_grid_is_diffusers():
    for steps, original in ((1, 50), (4, 50), (8, 50), (6, 20), (50, 50)):
        sched = diffusers.LCMScheduler(**SD, original_inference_steps=original)
        sched.set_timesteps(steps)
        assert lcm_timesteps(1000, steps, original).tolist() == sched.timesteps.tolist()
    with pytest.raises(ValueError, match="original_steps"):
        lcm_timesteps(1000, 60, 50)


@pytest.mark.parametrize("solver, cls", [("lcm", diffusers.LCMScheduler), ("tcd", diffusers.TCDScheduler)])
@pytest.mark.parametrize("prediction, diffusers_name", [("eps", "epsilon"), ("v", "v_prediction")])
@pytest.mark.parametrize("steps", [1, 4, 8])
def test_sample_solver_is_the_scheduler(solver, cls, prediction, diffusers_name, steps, backend):
    got = ds.sample(make_model(), X, steps=steps, solver=solver, schedule=ds.schedules.VP.scaled_linear(),
                    prediction=prediction, generator=torch.Generator().manual_seed(3), backend=backend)
    expected, _ = loop(cls, dict(prediction_type=diffusers_name), steps)
    assert max_rel(got, expected) <= 1e-5


def test_tcd_gamma_zero_is_deterministic_and_one_step_lcm_is_the_consistency_map():
    sched = ds.schedules.VP.scaled_linear()
    a = ds.sample(make_model(), X, steps=4, solver="tcd", schedule=sched, gamma=0.0,
                  generator=torch.Generator().manual_seed(1))
    b = ds.sample(make_model(), X, steps=4, solver="tcd", schedule=sched, gamma=0.0,
                  generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    # one step: x0 = c_skip x + c_out x0_hat at t = 999 (c_skip ~ 0: the model's data prediction)
    model = make_model()
    t = torch.tensor(999)
    ab = float(sched.alphas_cumprod[999])
    x0_hat = (X - (1 - ab) ** 0.5 * model(X, t)) / ab**0.5
    got = ds.sample(model, X, steps=1, solver="lcm", schedule=sched)
    scaled = 9990.0
    c_skip, c_out = 0.25 / (scaled**2 + 0.25), scaled / (scaled**2 + 0.25) ** 0.5
    assert max_rel(got, c_skip * X + c_out * x0_hat) <= 1e-6


def test_lcm_and_tcd_converge_on_an_exact_denoiser():
    """With the exact denoiser of a Gaussian mixture, one LCM step from t = 999 is (up to c_skip) E[x0 | x_T]:
    every step renoises to the next level and denoises exactly again, so the samples stay on the data
    distribution; their sliced W2 to exact samples falls to the sampling noise floor."""
    from diffsampler.targets import GaussianMixture, sliced_wasserstein

    g = torch.Generator().manual_seed(0)
    target = GaussianMixture.random(dim=8, modes=3, seed=0)
    sched = ds.schedules.VP.scaled_linear()
    model = target.model(sched, prediction="eps")
    x = torch.randn(2048, 8, generator=g, dtype=torch.float64)
    exact = target.sample(2048, generator=g)
    floor = sliced_wasserstein(target.sample(2048, generator=g), exact)
    for solver, kw in (("lcm", {}), ("tcd", dict(gamma=0.3))):
        errors = [sliced_wasserstein(ds.sample(model, x, steps=n, solver=solver, schedule=sched,
                                               generator=torch.Generator().manual_seed(n), **kw), exact)
                  for n in (1, 4)]
        assert errors[1] < 3 * floor, (solver, errors, floor)


def test_inside_ddpm_pipeline_with_the_ddpm_drop_in():
    pipe = diffusers.DDPMPipeline(unet=_tiny_unet(), scheduler=diffusers.DDPMScheduler())
    expected = pipe(batch_size=2, num_inference_steps=10, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images
    fused.accelerate(pipe, verbose=False)
    assert isinstance(pipe.scheduler, fused.DDPMScheduler)
    got = pipe(batch_size=2, num_inference_steps=10, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert abs(got - expected).max() <= 1e-5


def test_bad_input():
    with pytest.raises(ValueError, match="eta"):
        loop(fused.TCDScheduler, {}, 4, step_kw=dict(eta=1.5))
    with pytest.raises(ValueError, match="gamma"):
        ds.sample(make_model(), X, steps=4, solver="tcd", schedule=ds.schedules.VP.scaled_linear(), gamma=-0.1)
    with pytest.raises(ValueError, match="steps must be <= original_steps"):
        ds.sample(make_model(), X, steps=60, solver="lcm", schedule=ds.schedules.VP.scaled_linear())
    with pytest.raises(ValueError, match="flow_prediction must be one of"):
        loop(fused.LCMScheduler, dict(prediction_type="flow_prediction"), 4)
