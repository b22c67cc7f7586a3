"""The drop-in diffusers schedulers give diffusers' numbers, inside loops and inside real pipelines."""

import diffusers
import pytest
import torch

from diffsampler.integrations import diffusers as fused
from test_sample import SD, make_model, max_rel


def run(scheduler, model, x, steps, step_kw=None, scale_input=False, start=0):
    """A denoising loop over scheduler.timesteps[start:] (img2img starts late)."""
    scheduler.set_timesteps(steps)
    if start:
        scheduler.set_begin_index(start)
    x = x * getattr(scheduler, "init_noise_sigma", 1.0)
    for t in scheduler.timesteps[start:]:
        inp = scheduler.scale_model_input(x, t) if scale_input else x
        x = scheduler.step(model(inp, t), t, x, **(step_kw or {})).prev_sample
    return x


def both(name, config, model, x, steps, step_kw=None, seed=None, **kw):
    """(ours, diffusers') results of the same loop; step_kw gets a fresh generator of `seed` per run."""
    results = []
    for cls in (getattr(fused, name), getattr(diffusers, name)):
        kws = dict(step_kw or {})
        if seed is not None:
            kws["generator"] = torch.Generator().manual_seed(seed)
        results.append(run(cls(**config), model, x, steps, kws, **kw))
    return results


X = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))

DPM_CONFIGS = [
    dict(),
    dict(solver_order=3),
    dict(algorithm_type="sde-dpmsolver++"),
    dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min"),
    dict(solver_type="heun", use_karras_sigmas=True),
    dict(use_lu_lambdas=True, prediction_type="v_prediction"),
    dict(use_exponential_sigmas=True, final_sigmas_type="sigma_min", lower_order_final=False),
    dict(thresholding=True, prediction_type="sample", sample_max_value=1.5),
    dict(timestep_spacing="trailing", rescale_betas_zero_snr=True),
    dict(beta_schedule="squaredcos_cap_v2"),
    dict(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction"),
]


@pytest.mark.parametrize("config", DPM_CONFIGS, ids=str)
@pytest.mark.parametrize("steps", [7, 20])
def test_dpmsolver_multistep(config, steps):
    cfg = {**SD, **config} if "beta_schedule" not in config else config
    ours, theirs = both("DPMSolverMultistepScheduler", cfg, make_model(), X, steps, seed=1)
    assert max_rel(ours, theirs) <= 1e-5


@pytest.mark.parametrize("config", [dict(), dict(solver_order=3), dict(solver_type="bh1", final_sigmas_type="sigma_min"),
                                    dict(predict_x0=False, final_sigmas_type="sigma_min"),
                                    dict(disable_corrector=[0, 2]), dict(use_karras_sigmas=True),
                                    dict(use_flow_sigmas=True, prediction_type="flow_prediction")], ids=str)
def test_unipc_multistep(config):
    ours, theirs = both("UniPCMultistepScheduler", {**SD, **config}, make_model(), X, 12)
    assert max_rel(ours, theirs) <= 1e-5


@pytest.mark.parametrize("config", [dict(), dict(solver_order=3), dict(use_karras_sigmas=True),
                                    dict(prediction_type="v_prediction")], ids=str)
def test_deis_multistep(config):
    ours, theirs = both("DEISMultistepScheduler", {**SD, **config}, make_model(), X, 12)
    assert max_rel(ours, theirs) <= 1e-5


@pytest.mark.parametrize("config, step_kw", [
    (dict(), dict()),
    (dict(clip_sample=False, prediction_type="v_prediction"), dict()),
    (dict(set_alpha_to_one=False), dict(eta=1.0)),
    (dict(), dict(eta=0.5, use_clipped_model_output=True)),
    (dict(thresholding=True, prediction_type="sample"), dict(eta=0.3)),
    (dict(timestep_spacing="trailing", rescale_betas_zero_snr=True, clip_sample=False,
          prediction_type="v_prediction"), dict()),
], ids=str)
def test_ddim(config, step_kw):
    ours, theirs = both("DDIMScheduler", config, make_model(), X, 15, step_kw, seed=2 if step_kw.get("eta") else None)
    assert max_rel(ours, theirs) <= 1e-5


@pytest.mark.parametrize("config, step_kw", [
    (dict(), dict()),
    (dict(prediction_type="v_prediction", use_karras_sigmas=True), dict()),
    (dict(timestep_spacing="leading", steps_offset=1), dict()),
    (dict(), dict(s_churn=1.0)),
], ids=str)
def test_euler(config, step_kw):
    ours, theirs = both("EulerDiscreteScheduler", {**SD, **config}, make_model(), X, 12, step_kw,
                        seed=3 if step_kw else None, scale_input=True)
    assert max_rel(ours, theirs) <= 1e-5


@pytest.mark.parametrize("config", [dict(), dict(shift=3.0), dict(stochastic_sampling=True)], ids=str)
def test_flow_match_euler(config):
    ours, theirs = both("FlowMatchEulerDiscreteScheduler", config, make_model(), X, 10, seed=4)
    assert max_rel(ours, theirs) <= 1e-5


@pytest.mark.parametrize("name", ["DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler"])
def test_img2img_start_late(name):
    """set_begin_index: the warm-up orders count from the first step taken, as diffusers' do."""
    ours, theirs = both(name, SD, make_model(), X, 20, start=8)
    assert max_rel(ours, theirs) <= 1e-5


def test_from_config_round_trip():
    original = diffusers.DPMSolverMultistepScheduler(**SD, solver_order=3, use_karras_sigmas=True)
    ours = fused.DPMSolverMultistepScheduler.from_config(original.config)
    assert isinstance(ours, diffusers.DPMSolverMultistepScheduler)
    assert dict(ours.config) == dict(original.config)


def _tiny_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(8, 16), norm_num_groups=4,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"))


def test_inside_ddim_pipeline():
    """A real pipeline (offline, a tiny random UNet2DModel): accelerate() swaps the scheduler, same images."""
    pipe = diffusers.DDIMPipeline(unet=_tiny_unet(), scheduler=diffusers.DDIMScheduler())
    expected = pipe(batch_size=2, num_inference_steps=10, eta=0.5, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images
    new = fused.accelerate(pipe, verbose=False)
    assert isinstance(new, fused.DDIMScheduler) and pipe.scheduler is new
    got = pipe(batch_size=2, num_inference_steps=10, eta=0.5, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert abs(got - expected).max() <= 1e-5


@pytest.mark.parametrize("scheduler", [diffusers.DPMSolverMultistepScheduler(),
                                       diffusers.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")],
                         ids=["dpmpp_2m", "dpmpp_2m_sde"])
def test_inside_ddpm_pipeline(scheduler):
    pipe = diffusers.DDPMPipeline(unet=_tiny_unet(), scheduler=scheduler)
    expected = pipe(batch_size=2, num_inference_steps=10, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images
    fused.accelerate(pipe, verbose=False)
    assert isinstance(pipe.scheduler, fused.DPMSolverMultistepScheduler)
    got = pipe(batch_size=2, num_inference_steps=10, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert abs(got - expected).max() <= 1e-5


def test_accelerate_reports_what_it_did(capsys):
    pipe = diffusers.DDPMPipeline(unet=_tiny_unet(), scheduler=diffusers.CMStochasticIterativeScheduler())
    assert fused.accelerate(pipe) is pipe.scheduler
    assert "no fused drop-in for CMStochasticIterativeScheduler" in capsys.readouterr().out
    pipe.scheduler = diffusers.UniPCMultistepScheduler()
    fused.accelerate(pipe)
    assert "replaced diffusers.UniPCMultistepScheduler" in capsys.readouterr().out
    fused.accelerate(pipe)
    assert "already the fused scheduler" in capsys.readouterr().out


@pytest.mark.parametrize("config", [
    dict(), dict(solver_order=3), dict(solver_order=3, solver_type="heun"), dict(solver_type="heun"),
    dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min", solver_order=3),
    dict(algorithm_type="sde-dpmsolver++"), dict(algorithm_type="sde-dpmsolver++", solver_order=3),
    dict(use_karras_sigmas=True, lower_order_final=True), dict(solver_order=1),
], ids=str)
@pytest.mark.parametrize("steps", [7, 12])
def test_dpmsolver_singlestep(config, steps):
    ours, theirs = both("DPMSolverSinglestepScheduler", {**SD, **config}, make_model(), X, steps, seed=5)
    assert max_rel(ours, theirs) <= 1e-5


def test_dpmsolver_singlestep_img2img():
    ours, theirs = both("DPMSolverSinglestepScheduler", {**SD, "solver_order": 3}, make_model(), X, 12, start=4)
    assert max_rel(ours, theirs) <= 1e-5


NOISE_HISTORY = [  # solvers whose history holds noise predictions
    ("DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min")),
    ("DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver", final_sigmas_type="sigma_min")),
    ("DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver", solver_order=3, final_sigmas_type="sigma_min",
                                         prediction_type="v_prediction")),
    ("DEISMultistepScheduler", dict()),
    ("DEISMultistepScheduler", dict(solver_order=3, prediction_type="v_prediction")),
]


@pytest.mark.parametrize("name, config", NOISE_HISTORY, ids=str)
def test_thresholding_acts_on_the_data_prediction(name, config):
    """thresholding=True thresholds x0 and keeps the noise prediction it implies, as diffusers does, also where
    the history holds noise predictions (thresholding really acts here: without it the result differs)."""
    seed = 1 if config.get("algorithm_type", "").startswith("sde") else None
    cfg = {**SD, **config, "thresholding": True, "sample_max_value": 1.2}
    ours, theirs = both(name, cfg, make_model(), X, 12, seed=seed)
    assert max_rel(ours, theirs) <= 1e-5
    assert ours.abs().max() < 2.0
    unthresholded, _ = both(name, {**SD, **config}, make_model(), X, 12, seed=seed)
    assert max_rel(unthresholded, theirs) > 1e-3


def test_unipc_noise_prediction_ignores_thresholding_as_diffusers_does():
    """diffusers' UniPC thresholds only with predict_x0; with predict_x0=False, thresholding=True changes nothing."""
    config = dict(predict_x0=False, final_sigmas_type="sigma_min")
    ours, theirs = both("UniPCMultistepScheduler", {**SD, **config, "thresholding": True, "sample_max_value": 1.2},
                        make_model(), X, 12)
    assert max_rel(ours, theirs) <= 1e-5
    plain, _ = both("UniPCMultistepScheduler", {**SD, **config}, make_model(), X, 12)
    assert max_rel(plain, ours) <= 1e-6


@pytest.mark.parametrize("name, config", [("DPMSolverMultistepScheduler", dict(prediction_type="sample")),
                                          ("DDIMScheduler", dict(prediction_type="sample")),
                                          ("DEISMultistepScheduler", dict())], ids=str)
@pytest.mark.parametrize("bounds", [dict(dynamic_thresholding_ratio=0.0), dict(sample_max_value=0.5)], ids=str)
def test_threshold_bounds_diffusers_accepts(name, config, bounds):
    """dynamic_thresholding_ratio=0 is the 0-quantile (not "off") and sample_max_value < 1 bounds at that value."""
    ours, theirs = both(name, {**SD, **config, "thresholding": True, **bounds}, make_model(), X, 10)
    assert max_rel(ours, theirs) <= 1e-5


@pytest.mark.parametrize("name", ["DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
                                  "DEISMultistepScheduler", "UniPCMultistepScheduler"])
def test_repeated_timestep(name):
    """num_train_timesteps=25 with 25 steps repeats timestep 12: every step diffusers computes (the zero-length
    one included) gives its numbers; the first where diffusers' update divides by that zero length (NaN from
    there on) raises, naming the config."""
    model = make_model()
    ours, theirs = getattr(fused, name)(num_train_timesteps=25), getattr(diffusers, name)(num_train_timesteps=25)
    ours.set_timesteps(25)
    theirs.set_timesteps(25)
    x_ours = x_theirs = X
    for i, t in enumerate(theirs.timesteps):
        nxt = theirs.step(model(x_theirs, t), t, x_theirs).prev_sample
        if not torch.isfinite(nxt).all():
            with pytest.raises(ValueError, match=r"step\(\) at step \d+: .*zero length.*num_train_timesteps=25"):
                ours.step(model(x_ours, t), t, x_ours)
            break
        x_ours = ours.step(model(x_ours, t), t, x_ours).prev_sample
        assert max_rel(x_ours, nxt) <= 1e-5, i
        x_theirs = nxt
    else:
        pytest.fail("diffusers stayed finite: the grid does not repeat a timestep")
    assert i > 12


@pytest.mark.parametrize("order", [1, 2])
def test_unipc_zero_length_final_step(order):
    """Karras sigmas ending at sigma_min with final_sigmas_type="sigma_min": the last step has zero length (the
    identity in diffusers too)."""
    config = dict(SD, use_karras_sigmas=True, final_sigmas_type="sigma_min", lower_order_final=False,
                  solver_order=order)
    ours, theirs = both("UniPCMultistepScheduler", config, make_model(), X, 10)
    assert max_rel(ours, theirs) <= 1e-5


@pytest.mark.parametrize("scheduler, reason", [
    (diffusers.DDPMScheduler(variance_type="fixed_large_log"), "fixed_large_log"),
    (diffusers.DPMSolverMultistepInverseScheduler(algorithm_type="sde-dpmsolver++"), "sde-dpmsolver"),
    (diffusers.EulerAncestralDiscreteScheduler(prediction_type="sample"), "prediction_type='sample'"),
], ids=lambda v: type(v).__name__ if not isinstance(v, str) else v)
def test_accelerate_keeps_the_configs_it_does_not_fuse_and_says_why(scheduler, reason, capsys):
    pipe = diffusers.DDPMPipeline(unet=_tiny_unet(), scheduler=scheduler)
    assert fused.accelerate(pipe) is scheduler and pipe.scheduler is scheduler
    out = capsys.readouterr().out
    assert "kept (not fused)" in out and reason in out


def test_accelerate_picks_every_drop_in(capsys):
    for name, cls in fused.FUSED.items():
        base = getattr(diffusers, name)
        pipe = diffusers.DDPMPipeline(unet=_tiny_unet(), scheduler=base())
        assert isinstance(fused.accelerate(pipe), cls), name
        assert f"replaced diffusers.{name}" in capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(fused.FUSED))
def test_step_does_not_scan_the_model_output(name):
    """A drop-in's step() dispatches no NaN scan of the model output (diffusers' has none; on a GPU it would make
    every step wait for the device): no reduction over it among the ops of a whole loop."""
    import inspect

    from diffsampler.bench.common import OpCounter

    cls = fused.FUSED[name]
    params = inspect.signature(cls.__init__).parameters
    sched = cls(**{k: v for k, v in SD.items() if k in params})
    sched.set_timesteps(6)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    out = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    kw = {"generator": torch.Generator().manual_seed(2)} if "generator" in inspect.signature(sched.step).parameters \
        else {}
    with OpCounter() as counter:
        for t in sched.timesteps:
            x = sched.step(out, t, x, **kw).prev_sample
    assert torch.isfinite(x).all()
    scans = {op for op in counter.ops if op in ("aten::aminmax", "aten::isfinite", "aten::isnan")}
    assert not scans, scans
