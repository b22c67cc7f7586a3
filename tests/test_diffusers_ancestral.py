"""The drop-ins of diffusers' ancestral, EDM and interleaved second-order schedulers give diffusers' numbers (and
draw the same noise from the same generator), over config variants, in loops and inside a pipeline."""

import diffusers
import pytest
import torch

from diffsampler.integrations import diffusers as fused
from test_integrations_diffusers import X, _tiny_unet, both, run
from test_sample import SD, make_model, max_rel

SPACINGS = [
    dict(),
    dict(prediction_type="v_prediction"),
    dict(timestep_spacing="leading", steps_offset=1),
    dict(timestep_spacing="trailing"),
    dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
]
SIGMA_SPACINGS = [dict(use_karras_sigmas=True), dict(use_exponential_sigmas=True), dict(use_beta_sigmas=True),
                  dict(use_karras_sigmas=True, prediction_type="v_prediction")]
TWO_CALL = ["HeunDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler"]
NOISY = {"EulerAncestralDiscreteScheduler", "KDPM2AncestralDiscreteScheduler"}
CASES = [(name, config) for name in ["EulerAncestralDiscreteScheduler", *TWO_CALL] for config in SPACINGS] + \
    [(name, config) for name in TWO_CALL for config in SIGMA_SPACINGS] + \
    [("EulerAncestralDiscreteScheduler", dict(timestep_spacing="trailing", rescale_betas_zero_snr=True))]


@pytest.mark.parametrize("name, config", CASES, ids=str)
@pytest.mark.parametrize("steps", [7, 20])
def test_vp_drop_ins(name, config, steps):
    seed = 11 if name in NOISY else None
    ours, theirs = both(name, {**SD, **config}, make_model(), X, steps, seed=seed, scale_input=True)
    assert max_rel(ours, theirs) <= 1e-5


@pytest.mark.parametrize("name", sorted(NOISY))
def test_same_noise_per_seed(name):
    """Another seed gives another result (the noise is used), the same seed diffusers' (both calls above)."""
    a, _ = both(name, SD, make_model(), X, 10, seed=1, scale_input=True)
    b, theirs = both(name, SD, make_model(), X, 10, seed=2, scale_input=True)
    assert max_rel(b, theirs) <= 1e-5 and max_rel(a, b) > 1e-2


@pytest.mark.parametrize("config", [dict(prediction_type="sample"), dict(clip_sample=True, clip_sample_range=0.5),
                                    dict(prediction_type="sample", clip_sample=True)], ids=str)
def test_heun_x0_and_clip(config):
    ours, theirs = both("HeunDiscreteScheduler", {**SD, **config}, make_model(), X, 12, scale_input=True)
    assert max_rel(ours, theirs) <= 1e-5


def test_heun_clip_acts():
    ours, _ = both("HeunDiscreteScheduler", {**SD, "clip_sample": True, "clip_sample_range": 0.2}, make_model(), X,
                   12, scale_input=True)
    _, plain = both("HeunDiscreteScheduler", SD, make_model(), X, 12, scale_input=True)
    assert max_rel(ours, plain) > 1e-3


@pytest.mark.parametrize("name", ["EulerAncestralDiscreteScheduler", "KDPM2DiscreteScheduler",
                                  "KDPM2AncestralDiscreteScheduler"])
def test_unsupported_prediction_raises_as_diffusers(name):
    model = make_model()
    for cls in (getattr(fused, name), getattr(diffusers, name)):
        scheduler = cls(**SD, prediction_type="sample")
        scheduler.set_timesteps(5)
        t = scheduler.timesteps[0]
        with pytest.raises(NotImplementedError):
            scheduler.step(model(X, t), t, X)


@pytest.mark.parametrize("config, step_kw", [
    (dict(), dict()),
    (dict(prediction_type="v_prediction"), dict()),
    (dict(sigma_schedule="exponential"), dict()),
    (dict(final_sigmas_type="sigma_min", sigma_data=1.0), dict()),
    (dict(), dict(s_churn=2.0, s_tmin=0.05, s_tmax=50.0)),
], ids=str)
@pytest.mark.parametrize("steps", [7, 20])
def test_edm_euler(config, step_kw, steps):
    ours, theirs = both("EDMEulerScheduler", config, make_model(), X, steps, step_kw,
                        seed=4 if step_kw else None, scale_input=True)
    assert max_rel(ours, theirs) <= 1e-5


def test_edm_euler_given_pred_original_sample():
    """step(pred_original_sample=D) steps on D and returns it (the model output is ignored)."""
    results = []
    for cls in (fused.EDMEulerScheduler, diffusers.EDMEulerScheduler):
        scheduler = cls()
        scheduler.set_timesteps(5)
        t = scheduler.timesteps[0]
        out = scheduler.step(torch.zeros_like(X), t, X * 80, pred_original_sample=X * 0.5)
        assert torch.equal(out.pred_original_sample, X * 0.5)
        results.append(out.prev_sample)
    assert max_rel(*results) <= 1e-6


@pytest.mark.parametrize("config, step_kw", [(dict(), dict()), (dict(shift=3.0), dict()),
                                             (dict(), dict(s_churn=1.5, s_tmax=0.8))], ids=str)
@pytest.mark.parametrize("steps", [7, 20])
def test_flow_match_heun(config, step_kw, steps):
    ours, theirs = both("FlowMatchHeunDiscreteScheduler", config, make_model(), X, steps, step_kw,
                        seed=6 if step_kw else None)
    assert max_rel(ours, theirs) <= 1e-5


@pytest.mark.parametrize("name", TWO_CALL)
def test_pred_original_sample_and_state(name):
    """Each call returns diffusers' pred_original_sample; state_in_first_order alternates as diffusers'."""
    model = make_model()
    schedulers = [getattr(fused, name)(**SD), getattr(diffusers, name)(**SD)]
    xs = [X * 10, X * 10]
    kws = [{"generator": torch.Generator().manual_seed(2)} if name in NOISY else {} for _ in schedulers]
    for s in schedulers:
        s.set_timesteps(6)
    for t in schedulers[1].timesteps:
        outs = []
        for k, s in enumerate(schedulers):
            first = s.state_in_first_order
            out = s.step(model(s.scale_model_input(xs[k], t), t), t, xs[k], return_dict=False, **kws[k])
            outs.append((first, out))
            xs[k] = outs[-1][1][0]
        assert outs[0][0] == outs[1][0]
        assert max_rel(outs[0][1][1], outs[1][1][1]) <= 1e-5
        assert max_rel(outs[0][1][0], outs[1][1][0]) <= 1e-5


@pytest.mark.parametrize("name", TWO_CALL + ["FlowMatchHeunDiscreteScheduler"])
def test_img2img_start_late(name):
    cfg = SD if name != "FlowMatchHeunDiscreteScheduler" else {}
    ours, theirs = both(name, cfg, make_model(), X, 10, seed=3 if name in NOISY else None, start=6,
                        scale_input=name != "FlowMatchHeunDiscreteScheduler")
    assert max_rel(ours, theirs) <= 1e-5


def test_rerun_after_set_timesteps():
    """A second run (set_timesteps again, another batch size) starts from a fresh state."""
    model = make_model()
    ours, theirs = fused.KDPM2DiscreteScheduler(**SD), diffusers.KDPM2DiscreteScheduler(**SD)
    run(ours, model, X, 5, scale_input=True)
    x = X[:1]
    assert max_rel(run(ours, model, x, 6, scale_input=True), run(theirs, model, x, 6, scale_input=True)) <= 1e-5


@pytest.mark.parametrize("name", sorted(NOISY))
def test_inside_ddpm_pipeline(name):
    pipe = diffusers.DDPMPipeline(unet=_tiny_unet(), scheduler=getattr(diffusers, name)())
    expected = pipe(batch_size=2, num_inference_steps=8, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images
    fused.accelerate(pipe, verbose=False)
    assert isinstance(pipe.scheduler, getattr(fused, name))
    got = pipe(batch_size=2, num_inference_steps=8, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert abs(got - expected).max() <= 1e-5


def test_fused_lists_the_drop_ins():
    for name in ("EulerAncestralDiscreteScheduler", "EDMEulerScheduler", "FlowMatchHeunDiscreteScheduler", *TWO_CALL):
        assert fused.FUSED[name] is getattr(fused, name)
        assert issubclass(fused.FUSED[name], getattr(diffusers, name))
