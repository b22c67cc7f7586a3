"""diffsampler.sample against diffusers' schedulers (the anchors) and on the analytic Gaussian mixture."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

import diffsampler as ds
from diffsampler.targets import GaussianMixture, sliced_wasserstein

DIFFUSERS_PREDICTION = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def make_model(channels=4, seed=0):
    """A deterministic nonlinear 'denoiser' model(x, t) with diffusers' calling convention (t: int64 tensor)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(channels, channels, generator=g) * 0.4

    def model(x, t):
        s = t.float().reshape(-1, 1, 1, 1) / 1000  # a 0-dim t or one per sample
        return torch.tanh(torch.einsum("bchw,cd->bdhw", x, w) * (1 + s)) + 0.1 * x * s

    return model


def run_diffusers(scheduler, model, x, steps, generator=None, **step_kw):
    scheduler.set_timesteps(steps)
    if generator is not None:
        step_kw["generator"] = generator
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t), t, x, **step_kw).prev_sample
    return x


def max_rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_dpmpp_2m_matches_diffusers_defaults(prediction, backend):
    """A full 20-step loop: max relative difference <= 1e-5 in fp32 (design.md section 2)."""
    model, x = make_model(), torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    sched = DPMSolverMultistepScheduler(**SD, prediction_type=DIFFUSERS_PREDICTION[prediction])
    expected = run_diffusers(sched, model, x, 20)
    got = ds.sample(model, x, steps=20, solver="dpmpp_2m", schedule=ds.schedules.VP.scaled_linear(),
                    prediction=prediction, backend=backend)
    assert max_rel(got, expected) <= 1e-5


@pytest.mark.parametrize(
    "config, options",
    [
        (dict(final_sigmas_type="sigma_min", lower_order_final=False), dict(final_sigmas_type="sigma_min",
                                                                            lower_order_final=False)),
        (dict(timestep_spacing="leading", steps_offset=1), dict(timestep_spacing="leading", steps_offset=1)),
        (dict(timestep_spacing="trailing"), dict(timestep_spacing="trailing")),
        (dict(euler_at_final=True, final_sigmas_type="sigma_min"), dict(euler_at_final=True,
                                                                        final_sigmas_type="sigma_min")),
        (dict(solver_order=1), None),
    ],
)
@pytest.mark.parametrize("steps", [7, 20])
def test_dpmpp_options_match_diffusers(config, options, steps):
    model, x = make_model(), torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    expected = run_diffusers(DPMSolverMultistepScheduler(**SD, **config), model, x, steps)
    if options is None:  # solver_order=1: DPM-Solver++ 1 (no history), driven step by step through the op
        got = x
        for step in ds.solvers.dpm_plan(ds.schedules.VP.scaled_linear(), steps, "eps", order=1).steps:
            got = ds.ops.multistep_update(got, model(got, torch.tensor(step.t)), step.coeffs)
    else:
        got = ds.sample(model, x, steps=steps, solver="dpmpp_2m", schedule=ds.schedules.VP.scaled_linear(), **options)
    assert max_rel(got, expected) <= 1e-5


def test_dpmpp_thresholding_matches_diffusers():
    model, x = make_model(), 3 * torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    sched = DPMSolverMultistepScheduler(**SD, thresholding=True, dynamic_thresholding_ratio=0.9,
                                        sample_max_value=1.5, prediction_type="sample")
    expected = run_diffusers(sched, lambda x, t: 2 * model(x, t), x, 10)
    got = ds.sample(lambda x, t: 2 * model(x, t), x, steps=10, schedule=ds.schedules.VP.scaled_linear(),
                    prediction="x0", threshold_ratio=0.9, threshold_max=1.5)
    assert max_rel(got, expected) <= 1e-5


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_ddim_matches_diffusers(prediction, spacing):
    model, x = make_model(), torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    sched = DDIMScheduler(prediction_type=DIFFUSERS_PREDICTION[prediction], clip_sample=False,
                          timestep_spacing=spacing)
    expected = run_diffusers(sched, model, x, 20)
    got = ds.sample(model, x, steps=20, solver="ddim", schedule=ds.schedules.VP.linear(), prediction=prediction,
                    timestep_spacing=spacing)
    assert max_rel(got, expected) <= 1e-5


def test_ddim_eta_clip_and_noise_match_diffusers():
    """DDIM defaults (clip_sample=True) with eta = 1: the same noise from the same generator seed."""
    model, x = make_model(), torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    sched = DDIMScheduler(set_alpha_to_one=False)
    expected = run_diffusers(sched, model, x, 15, generator=torch.Generator().manual_seed(9), eta=1.0)
    got = ds.sample(model, x, steps=15, solver="ddim", schedule=ds.schedules.VP.linear(), clip=1.0, eta=1.0,
                    set_alpha_to_one=False, generator=torch.Generator().manual_seed(9))
    assert max_rel(got, expected) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_loop_close_to_fp32(dtype):
    model, x = make_model(), torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    ref = ds.sample(model, x, steps=20)
    got = ds.sample(lambda x, t: model(x.float(), t).to(dtype), x.to(dtype), steps=20)
    assert got.dtype == dtype
    assert ((got.float() - ref).norm() / ref.norm()).item() < 3e-2


def test_gaussian_mixture_ode_converges():
    """On the exact denoiser, error against a 1000-step float64 DDIM reference drops with NFE, and samples
    are close to the exact distribution."""
    target = GaussianMixture.random(dim=8, modes=4, seed=0)
    schedule = ds.schedules.VP.scaled_linear()
    model = target.model(schedule, "eps")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=g, dtype=torch.float64)
    truth = ds.sample(model, x, steps=1000, solver="ddim", schedule=schedule, timestep_spacing="trailing")
    for solver in ("ddim", "dpmpp_2m"):
        errs = [(ds.sample(model, x, steps=n, solver=solver, schedule=schedule, timestep_spacing="trailing")
                 - truth).norm().item() for n in (10, 20, 50)]
        assert errs[0] > errs[1] > errs[2], (solver, errs)
    exact = target.sample(512, generator=g)
    assert sliced_wasserstein(truth, exact) < 3 * sliced_wasserstein(target.sample(512, generator=g), exact)


def test_progress_bar(capsys):
    model, x = make_model(), torch.randn(1, 4, 4, 4)
    ds.sample(model, x, steps=3, progress=True)
    assert "3/3" in capsys.readouterr().err


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(solver="dpm_9m"), r"solver must be one of \[.*'ddim'.*'dpmpp_2m'.*\], got 'dpm_9m'"),
        (dict(prediction="noise"), "prediction must be one of"),
        (dict(steps=0), "steps must be an integer >= 1"),
        (dict(steps=2000), "steps must be <= num_train_timesteps"),
        (dict(schedule="cosine"), "needs a diffsampler.schedules.VP or diffsampler.schedules.VPContinuous schedule"),
        (dict(timestep_spacing="random"), "timestep_spacing must be one of"),
        (dict(eta=-1.0, solver="ddim"), "eta must be >= 0"),
        (dict(final_sigmas_type="one"), "final_sigmas_type must be one of"),
        (dict(bogus_option=1), "unexpected keyword argument 'bogus_option'"),
        (dict(solver="unipc", order=3, steps=2), "order 3 needs at least 3 steps, got steps=2"),
        (dict(schedule="cosine"), r"VP.cosine\(\), VP\(betas\), VPContinuous\(\), Flow\(shift\), EDM\(\)\), got 'cosine'"),
    ],
)
def test_sample_bad_input(kw, match):
    with pytest.raises(ValueError, match=match):
        ds.sample(make_model(), torch.randn(1, 4, 4, 4), **kw)


def test_sample_nan_model_output_names_it():
    with pytest.raises(ValueError, match="model_out contains non-finite"):
        ds.sample(lambda x, t: x * float("nan"), torch.randn(1, 4, 4, 4), steps=3)


def _dpm_case(algorithm, order, solver_type, sigmas, final, steps, prediction="eps"):
    """(diffusers scheduler, diffsampler options) of one DPM-Solver configuration."""
    cfg = dict(algorithm_type=algorithm, solver_order=order, solver_type=solver_type, final_sigmas_type=final,
               prediction_type=DIFFUSERS_PREDICTION[prediction])
    if sigmas != "default":
        cfg[f"use_{sigmas}_{'lambdas' if sigmas == 'lu' else 'sigmas'}"] = True
    opts = dict(algorithm=algorithm, order=order, solver_type=solver_type, sigmas=sigmas, final_sigmas_type=final,
                phi3="diffusers")
    return DPMSolverMultistepScheduler(**SD, **cfg), opts


DPM_CASES = [
    (alg, order, st, "default", fin, steps)
    for alg in ("dpmsolver++", "dpmsolver", "sde-dpmsolver++", "sde-dpmsolver")
    for order in (1, 2, 3)
    for st in ("midpoint", "heun")
    for fin in ("zero", "sigma_min")
    for steps in (8, 20)
    if (alg.endswith("++") or fin == "sigma_min") and not (alg == "sde-dpmsolver" and order == 3)
    and not (order == 1 and st == "heun")
] + [(alg, 2, "midpoint", sig, fin, 20) for alg in ("dpmsolver++", "sde-dpmsolver++")
     for sig in ("karras", "exponential", "beta", "lu") for fin in ("zero", "sigma_min")]


@pytest.mark.parametrize("case", DPM_CASES, ids=lambda c: "-".join(map(str, c)))
def test_dpm_family_matches_diffusers(case):
    """Every DPM-Solver variant diffusers has: algorithm x order x solver_type x final sigma x sigma spacing,
    SDE noise from the same generator seed.

    Third-order SDE-DPM-Solver++: its phi_3 term ((1 - e^{-2h} - 2h) / (2h)^2 - 1/2) cancels badly in float32,
    and diffusers evaluates its coefficients in float32 (1e-4 off at 20 steps); diffsampler computes them in
    float64. There the anchor is diffusers with its sigmas in float64 (the same formulas, exact coefficients).
    """
    alg, order, st, sig, fin, steps = case
    model, x = make_model(), torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    sched, opts = _dpm_case(*case)
    sched.set_timesteps(steps)
    if alg == "sde-dpmsolver++" and order == 3:
        sched.sigmas = sched.sigmas.double()
    g = torch.Generator().manual_seed(3)
    expected = x
    for t in sched.timesteps:
        expected = sched.step(model(expected, t), t, expected, generator=g).prev_sample
    plan = ds.solvers.dpm_plan(ds.schedules.VP.scaled_linear(), steps, "eps", **opts)
    got, g = x, torch.Generator().manual_seed(3)
    history = torch.empty(plan.history_slots, *x.shape) if plan.history_slots else None
    for step in plan.steps:
        noise = torch.randn(x.shape, generator=g) if alg.startswith("sde") else None
        got = ds.ops.multistep_update(got, model(got, torch.tensor(step.t)), step.coeffs, history=history,
                                      write_slot=step.write_slot, read_slots=step.read_slots, noise=noise)
    assert max_rel(got, expected) <= 1e-5


@pytest.mark.parametrize("solver", ["dpmpp_3m", "dpmpp_2m_sde", "dpmpp_3m_sde", "dpm_2m", "dpm_3m"])
def test_dpm_solver_names_through_sample(solver):
    alg, order = ds.solvers.SOLVERS[solver].presets["algorithm"], ds.solvers.SOLVERS[solver].presets["order"]
    final = "zero" if alg.endswith("++") else "sigma_min"
    model, x = make_model(), torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    sched, _ = _dpm_case(alg, order, "midpoint", "default", final, 20)
    if order == 3 and alg.startswith("sde"):
        sched.set_timesteps(20)
        sched.sigmas = sched.sigmas.double()
        sched.set_timesteps = lambda steps: None  # keep the float64 sigmas (see test_dpm_family_matches_diffusers)
    expected = run_diffusers(sched, model, x, 20, generator=torch.Generator().manual_seed(4))
    options = dict(phi3="diffusers") if solver == "dpmpp_3m_sde" else {}
    got = ds.sample(model, x, steps=20, solver=solver, schedule=ds.schedules.VP.scaled_linear(),
                    generator=torch.Generator().manual_seed(4), **options)
    assert max_rel(got, expected) <= 1e-5


def test_noise_prediction_solver_rejects_clip_alone():
    with pytest.raises(ValueError, match="keeps noise predictions"):
        ds.sample(make_model(), torch.randn(1, 4, 4, 4), solver="dpm_2m", clip=1.0)


@pytest.mark.parametrize("solver, scheduler", [("dpm_2m", "DPMSolverMultistepScheduler"),
                                               ("deis", "DEISMultistepScheduler")])
def test_noise_prediction_solver_thresholds_as_diffusers_does(solver, scheduler):
    """A solver keeping noise predictions thresholds the data prediction they imply (diffusers' numbers)."""
    import diffusers

    model, x = make_model(), 3 * torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    config = dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min") if solver == "dpm_2m" else {}
    sched = getattr(diffusers, scheduler)(**SD, **config, thresholding=True, dynamic_thresholding_ratio=0.9,
                                          sample_max_value=1.2)
    expected = run_diffusers(sched, model, x, 10)
    got = ds.sample(model, x, steps=10, solver=solver, threshold_ratio=0.9, threshold_max=1.2)
    assert max_rel(got, expected) <= 1e-5
    assert max_rel(ds.sample(model, x, steps=10, solver=solver), expected) > 1e-3  # thresholding acted


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("sigmas", ["default", "karras", "exponential"])
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_euler_matches_diffusers(spacing, sigmas, prediction):
    """EulerDiscreteScheduler: VE-scale state, init_noise_sigma, scale_model_input, float timesteps."""
    from diffusers import EulerDiscreteScheduler

    model, x = make_model(), torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    cfg = dict(timestep_spacing=spacing, prediction_type=DIFFUSERS_PREDICTION[prediction])
    if sigmas != "default":
        cfg[f"use_{sigmas}_sigmas"] = True
    sched = EulerDiscreteScheduler(**SD, **cfg)
    sched.set_timesteps(12)
    expected = x * sched.init_noise_sigma
    for t in sched.timesteps:
        expected = sched.step(model(sched.scale_model_input(expected, t), t), t, expected).prev_sample
    got = ds.sample(model, x, steps=12, solver="euler", prediction=prediction, timestep_spacing=spacing,
                    sigmas=sigmas)
    assert max_rel(got, expected) <= 1e-5


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [5, 28])
def test_flow_euler_matches_diffusers(shift, steps):
    from diffusers import FlowMatchEulerDiscreteScheduler

    model, x = make_model(), torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    expected = run_diffusers(FlowMatchEulerDiscreteScheduler(shift=shift), model, x, steps)
    got = ds.sample(model, x, steps=steps, solver="flow_euler", schedule=ds.schedules.Flow(shift=shift))
    assert max_rel(got, expected) <= 1e-5


def test_flow_solver_on_vp_schedule_is_an_error():
    with pytest.raises(ValueError, match="solver 'flow_euler' needs a diffsampler.schedules.Flow schedule"):
        ds.sample(make_model(), torch.randn(1, 4, 4, 4), solver="flow_euler", schedule=ds.schedules.VP.linear())
    with pytest.raises(ValueError, match="solver 'dpmpp_2m' needs a diffsampler.schedules.VP or"):
        ds.sample(make_model(), torch.randn(1, 4, 4, 4), solver="dpmpp_2m", schedule=ds.schedules.Flow())


UNIPC_CASES = [
    (order, variant, px0, final, steps, disable, sigmas)
    for order in (1, 2, 3) for variant in ("bh1", "bh2") for px0 in (True, False)
    for final in ("zero", "sigma_min") for steps in (6, 20) for disable in ((), (0, 3))
    for sigmas in ("default", "karras")
    if (px0 or final == "sigma_min") and not (variant == "bh1" and px0 and final == "zero")
    and (steps == 20 or sigmas == "default")
]


@pytest.mark.parametrize("case", UNIPC_CASES, ids=lambda c: "-".join(map(str, c)))
def test_unipc_matches_diffusers(case):
    """UniPC predictor-corrector, every order / variant / final sigma / disabled-corrector combination that
    diffusers computes (bh1 with a zero final sigma is NaN there: see test_unipc_bh1_zero_final_is_finite)."""
    from diffusers import UniPCMultistepScheduler

    order, variant, px0, final, steps, disable, sigmas = case
    model, x = make_model(), torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    sched = UniPCMultistepScheduler(**SD, solver_order=order, solver_type=variant, predict_x0=px0,
                                    final_sigmas_type=final, disable_corrector=list(disable),
                                    use_karras_sigmas=sigmas == "karras")
    expected = run_diffusers(sched, model, x, steps)
    got = ds.sample(model, x, steps=steps, solver="unipc", order=order, variant=variant, predict_x0=px0,
                    final_sigmas_type=final, disable_corrector=disable, sigmas=sigmas)
    assert max_rel(got, expected) <= 1e-5


def test_unipc_bh1_zero_final_is_finite():
    """diffusers returns NaN here (B(h) = h = -inf times a zero residual at the last, first-order step);
    the limit is the data prediction, which is what diffsampler returns."""
    from diffusers import UniPCMultistepScheduler

    model, x = make_model(), torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    assert torch.isnan(run_diffusers(UniPCMultistepScheduler(**SD, solver_type="bh1"), model, x, 10)).all()
    got = ds.sample(model, x, steps=10, solver="unipc", variant="bh1")
    bh2 = ds.sample(model, x, steps=10, solver="unipc", variant="bh2")
    assert torch.isfinite(got).all() and max_rel(got, bh2) < 0.05


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("steps", [6, 20])
@pytest.mark.parametrize("sigmas", ["default", "karras"])
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_deis_matches_diffusers(order, steps, sigmas, prediction):
    from diffusers import DEISMultistepScheduler

    model, x = make_model(), torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    sched = DEISMultistepScheduler(**SD, solver_order=order, use_karras_sigmas=sigmas == "karras",
                                   prediction_type=DIFFUSERS_PREDICTION[prediction])
    expected = run_diffusers(sched, model, x, steps)
    got = ds.sample(model, x, steps=steps, solver="deis", order=order, sigmas=sigmas, prediction=prediction)
    assert max_rel(got, expected) <= 1e-5


def test_cosine_schedule_matches_diffusers():
    model, x = make_model(), torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    sched = DPMSolverMultistepScheduler(beta_schedule="squaredcos_cap_v2")
    expected = run_diffusers(sched, model, x, 15)
    got = ds.sample(model, x, steps=15, solver="dpmpp_2m", schedule=ds.schedules.VP.cosine())
    assert torch.equal(ds.schedules.VP.cosine().alphas_cumprod, sched.alphas_cumprod)
    assert max_rel(got, expected) <= 1e-5


def test_classifier_free_guidance_is_one_batched_call():
    calls = []
    w = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))

    def model(x, t, emb):
        calls.append(x.shape[0])
        return torch.tanh(torch.einsum("bchw,cd->bdhw", x, w)) + emb.view(-1, 1, 1, 1) * (1 + t.float() / 1000)

    cond, uncond = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0])
    guided = ds.models.classifier_free_guidance(model, 7.5, cond={"emb": cond}, uncond={"emb": uncond})
    x, t = torch.randn(2, 4, 5, 5), torch.tensor(500)
    out = guided(x, t)
    u, c = model(x, t, uncond), model(x, t, cond)
    assert calls[0] == 4 and torch.allclose(out, u + 7.5 * (c - u), atol=1e-6)
    result = ds.sample(guided, x, steps=5)
    assert torch.isfinite(result).all()


def _ghvb_by_the_paper(model, x, steps, order, beta):
    """The GHVB loop as the paper's reference wrapper runs it over DPMSolverMultistepScheduler's timesteps
    (DDIM coordinates, velocity EMA, beta-generalised Adams-Bashforth mixing), written out in float64."""
    sched = DPMSolverMultistepScheduler(**SD)
    sched.set_timesteps(steps)
    ac = sched.alphas_cumprod.double()
    mix = {1: lambda e, b: b * e[-1],
           2: lambda e, b: ((2 + b) * e[-1] - (2 - b) * e[-2]) / 2,
           3: lambda e, b: ((18 + 5 * b) * e[-1] - (24 - 8 * b) * e[-2] + (6 - b) * e[-3]) / 12,
           4: lambda e, b: ((46 + 9 * b) * e[-1] - (78 - 19 * b) * e[-2] + (42 - 5 * b) * e[-3]
                            - (10 - b) * e[-4]) / 24}
    vel, ets = None, []
    for i, t in enumerate(sched.timesteps):
        prev = 0 if i == len(sched.timesteps) - 1 else sched.timesteps[i + 1]
        s0, s1 = ac[t].sqrt(), ac[prev].sqrt()
        dg = (1 - ac[prev]).sqrt() / s1 - (1 - ac[t]).sqrt() / s0
        eps = model(x, t).double()
        vel = eps if vel is None else (1 - beta) * vel + beta * eps
        ets = (ets + [vel])[-order:]
        x = (x / s0 + dg * mix[min(order, len(ets))](ets, beta) / beta) * s1
    return x


@pytest.mark.parametrize("order, beta", [(1, 1.0), (1, 0.8), (2, 0.5), (3, 0.3), (4, 0.9), (2, 1.0)])
def test_ghvb_follows_the_paper(order, beta):
    model, x = make_model(), torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2)).double()
    expected = _ghvb_by_the_paper(lambda y, t: model(y.float(), t).double(), x, 12, order, beta)
    got = ds.sample(lambda y, t: model(y.float(), t).double(), x, steps=12, solver="ghvb", order=order, beta=beta)
    assert max_rel(got, expected) <= 1e-6  # float64 math on both sides; the grid's sigmas are float32 (diffusers')


def test_ghvb_beta_one_order_one_is_ddim():
    model, x = make_model(), torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    ghvb = ds.sample(model, x, steps=10, solver="ghvb", order=1, beta=1.0)
    plan = ds.solvers.dpm_plan(ds.schedules.VP.scaled_linear(), 10, "eps", algorithm="dpmsolver++", order=1,
                               final_sigmas_type="sigma_min")
    assert max_rel(ghvb, ds.run_plan(model, x, plan)) <= 1e-5


def test_heun_and_euler_on_edm_follow_algorithm_1():
    """Karras et al. (2022) Algorithm 1 (Heun, Euler into sigma = 0) written out, against the fused plans."""
    from diffsampler.integrations.kdiffusion import sample_euler, sample_heun

    w = torch.linspace(-0.4, 0.4, 16, dtype=torch.float64).reshape(4, 4)

    def denoiser(x, sigma):
        x_in = x / (sigma.reshape(-1, *([1] * (x.dim() - 1))) ** 2 + 1).sqrt()
        return 0.8 * torch.tanh(torch.einsum("bchw,cd->bdhw", x_in, w.to(x.dtype))) + 0.1 * x_in

    edm = ds.schedules.EDM(sigma_min=0.01, sigma_max=20.0)
    x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigmas = torch.tensor(edm.sigmas(9), dtype=torch.float64)
    calls = []
    counted = lambda y, t: calls.append(1) or denoiser(y, t.expand(y.shape[0]))
    got = ds.sample(counted, x, steps=9, solver="heun", schedule=edm)
    assert len(calls) == 2 * 9 - 1
    assert max_rel(got, sample_heun(denoiser, x * sigmas[0], sigmas, disable=True)) <= 1e-12
    got = ds.sample(lambda y, t: denoiser(y, t.expand(y.shape[0])), x, steps=9, solver="euler", schedule=edm)
    assert max_rel(got, sample_euler(denoiser, x * sigmas[0], sigmas, disable=True)) <= 1e-12


def _apply_time_shift_by_the_paper(x, t, window, cutoff, alphas_cumprod):
    """The authors' per-sample shifted timestep, written out: the window clipped at the ends, argmin of the
    squared gap between the sample variance and 1 - abar."""
    n = len(alphas_cumprod)
    var = x.reshape(x.shape[0], -1).var(dim=-1)
    lo, hi = max(t - window, 0), min(t + window, n - 1)
    noise_var = 1 - alphas_cumprod[lo:hi + 1]
    shifted = ((var[:, None] - noise_var[None]) ** 2).argmin(dim=1) + lo
    return shifted if t > cutoff else torch.full((x.shape[0],), t)


@pytest.mark.parametrize("t, window, cutoff", [(500, 10, 300), (5, 10, 0), (995, 20, 100), (200, 10, 300)])
def test_time_shift_picks_the_paper_timestep(t, window, cutoff):
    schedule = ds.schedules.VP.linear()
    scale = torch.linspace(0.3, 1.2, 5).view(5, 1, 1, 1)  # samples of different variance
    x = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * scale
    seen = []
    shift = ds.solvers.TimeShift(window=window, cutoff=cutoff).wrap(lambda y, tt: seen.append(tt) or y, schedule)
    shift(x, torch.tensor(t))
    expected = _apply_time_shift_by_the_paper(x, t, window, cutoff, schedule.alphas_cumprod)
    assert torch.equal(seen[0], expected)
    if t == 500:
        assert len(set(seen[0].tolist())) > 1  # the samples' variances differ: so do their timesteps


def test_time_shift_in_sample():
    model, x = make_model(), torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    plain = ds.sample(model, x, steps=10, solver="ddim", schedule=ds.schedules.VP.linear())
    off = ds.sample(model, x, steps=10, solver="ddim", schedule=ds.schedules.VP.linear(),
                    time_shift=ds.solvers.TimeShift(window=0))
    on = ds.sample(model, x, steps=10, solver="ddim", schedule=ds.schedules.VP.linear(),
                   time_shift=ds.solvers.TimeShift(window=20, cutoff=200))
    assert torch.equal(plain, off) and not torch.equal(plain, on)
    with pytest.raises(ValueError, match="time_shift needs integer training timesteps"):
        ds.sample(model, x, steps=4, solver="euler", time_shift=ds.solvers.TimeShift())


def _dc_solver_by_the_paper(model, x, steps, ratios, dc_order=2):
    """DC-Solver's sampling step as the authors' scheduler runs it, written over diffusers' UniPC: corrector
    with the raw prediction, then the newest stored prediction replaced by the Lagrange interpolation (in
    timesteps) of the last dc_order + 1 at t* = t_prev + ratio (t - t_prev), then the predictor."""
    from diffusers import UniPCMultistepScheduler

    sched = UniPCMultistepScheduler(**SD)
    sched.set_timesteps(steps)
    size = max(sched.config.solver_order, dc_order + 1)
    sched.model_outputs, sched.timestep_list = [None] * size, [None] * size
    for i, t in enumerate(sched.timesteps):
        sched._step_index = i
        m = sched.convert_model_output(model(x, t), sample=x)
        if i > 0:
            x = sched.multistep_uni_c_bh_update(this_model_output=m, last_sample=sched.last_sample, this_sample=x,
                                                order=sched.this_order)
        sched.model_outputs = sched.model_outputs[1:] + [m]
        sched.timestep_list = sched.timestep_list[1:] + [t]
        sched.this_order = min(sched.config.solver_order, len(sched.timesteps) - i, sched.lower_order_nums + 1)
        sched.last_sample = x
        if ratios[i] != 1.0:
            ts = [float(v) for v in sched.timestep_list[-(dc_order + 1):]][::-1]
            t_star = ratios[i] * (ts[0] - ts[1]) + ts[1]
            comp = 0
            for j in range(dc_order + 1):
                w = 1.0
                for k in range(dc_order + 1):
                    if k != j:
                        w *= (t_star - ts[k]) / (ts[j] - ts[k])
                comp = comp + w * sched.model_outputs[-(j + 1)]
            sched.model_outputs[-1] = comp
        x = sched.multistep_uni_p_bh_update(model_output=None, sample=x, order=sched.this_order)
        sched.lower_order_nums = min(sched.lower_order_nums + 1, sched.config.solver_order)
    return x


def test_dc_solver_follows_the_paper():
    model, x = make_model(), torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    ratios = [1.0, 1.0, 1.04, 0.97, 1.1, 1.02, 0.95, 1.0, 1.05, 1.01]
    expected = _dc_solver_by_the_paper(model, x, 10, ratios)
    got = ds.sample(model, x, steps=10, solver="unipc", dc_ratios=ratios)
    assert max_rel(got, expected) <= 1e-5
    plain = ds.sample(model, x, steps=10, solver="unipc")
    assert max_rel(got, plain) > 1e-4  # the compensation changed the result
    same = ds.sample(model, x, steps=10, solver="unipc", dc_ratios=[1.0] * 10)
    assert torch.equal(same, plain)


def test_fit_dc_ratios():
    """Fitting gives one ratio per step inside the search interval, 1 where there is nothing to interpolate
    (the first dc_order steps) or to match (the last), and a plan that samples; a wrong count is an error."""
    from diffsampler.solvers.dc import fit_dc_ratios

    target = ds.targets.GaussianMixture.random(dim=8, modes=3, seed=2)
    schedule = ds.schedules.VP.scaled_linear()
    model = target.model(schedule, "eps")
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(100), dtype=torch.float64)
    ratios = fit_dc_ratios(model, x, schedule, 6, evals=10)
    assert len(ratios) == 6 and ratios[:2] == [1.0, 1.0] and ratios[-1] == 1.0
    assert all(0.5 <= r <= 1.5 for r in ratios) and any(r != 1.0 for r in ratios)
    result = ds.sample(model, x, steps=6, solver="unipc", schedule=schedule, dc_ratios=ratios)
    assert torch.isfinite(result).all()
    with pytest.raises(ValueError, match="dc_ratios must have one ratio per step"):
        ds.sample(model, x, steps=6, solver="unipc", schedule=schedule, dc_ratios=[1.0] * 5)


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [6, 20])
def test_flow_dpmpp_2m_matches_diffusers(shift, steps):
    model, x = make_model(), torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    sched = DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=shift, prediction_type="flow_prediction")
    expected = run_diffusers(sched, model, x, steps)
    got = ds.sample(model, x, steps=steps, solver="flow_dpmpp_2m", schedule=ds.schedules.Flow(shift=shift))
    assert max_rel(got, expected) <= 1e-5


def test_continuous_vp_schedule():
    """Continuous-time linear VP: sigmas as k-diffusion's get_sigmas_vp, an exact logSNR inverse, and the
    multistep solvers converging at their order on the smooth Gaussian mixture (median error over samples)."""
    from diffsampler.bench.quality import TARGETS
    from diffsampler.integrations.kdiffusion import get_sigmas_vp

    sch = ds.schedules.VPContinuous()
    grid = ds.solvers.continuous_grid(sch, 9, spacing="time", final="eps")
    # k-diffusion computes exp(.) - 1 in float32: 2e-4 off at t = eps, where diffsampler uses expm1 in float64
    assert torch.allclose(torch.tensor(grid.sigmas, dtype=torch.float64), get_sigmas_vp(10)[:-1].double(), rtol=1e-3)
    assert abs(sch.t_of_lambda(-math.log(sch.sigma_ratio(0.37))) - 0.37) < 1e-12
    model = TARGETS["smooth-16d"]().model(sch)
    x = torch.randn(128, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    truth = ds.sample(model, x, steps=400, solver="unipc", order=3, schedule=sch, final="eps")
    err = lambda n, solver: ((ds.sample(model, x, steps=n, solver=solver, schedule=sch, final="eps") - truth)
                             .norm(dim=1) / truth.norm(dim=1)).median().item()
    for solver, order in [("ddim", 1), ("dpmpp_2m", 2), ("deis", 2)]:
        slope = math.log(err(20, solver) / err(40, solver)) / math.log(2)
        assert abs(slope - order) < 0.4, (solver, slope)
    with pytest.raises(ValueError, match="cannot land on sigma = 0"):
        ds.sample(model, x, steps=5, solver="deis", schedule=sch, final="zero")


def _hb_dpmpp_2m_by_the_paper(model, x, steps, beta):
    """DPM-Solver++ 2M with heavy-ball momentum as the paper's scheduler runs it: diffusers' scheduler with its
    second-order update replaced by x_t = (sigma_t/sigma_s) x - alpha_t (e^{-h} - 1) v, v the running average
    of D0 + D1 / 2 (v = D at the first second-order step)."""
    sched = DPMSolverMultistepScheduler(**SD)
    sched.set_timesteps(steps)
    vel = [None]

    def second_order(model_output_list, sample=None, noise=None):
        i = sched.step_index
        sig = [sched._sigma_to_alpha_sigma_t(sched.sigmas[j]) for j in (i + 1, i, i - 1)]
        (alpha_t, sigma_t), (alpha_s0, sigma_s0), (alpha_s1, sigma_s1) = sig
        lam = [torch.log(a) - torch.log(s) for a, s in sig]
        h, h0 = lam[0] - lam[1], lam[1] - lam[2]
        m0, m1 = model_output_list[-1], model_output_list[-2]
        diff = m0 + 0.5 * (m0 - m1) / (h0 / h)
        vel[0] = diff if vel[0] is None else (1 - beta) * vel[0] + beta * diff
        return (sigma_t / sigma_s0) * sample - alpha_t * (torch.exp(-h) - 1.0) * vel[0]

    sched.multistep_dpm_solver_second_order_update = second_order
    for t in sched.timesteps:
        x = sched.step(model(x, t), t, x).prev_sample
    return x


@pytest.mark.parametrize("beta", [1.0, 0.8, 0.5])
def test_heavy_ball_dpmpp_2m_follows_the_paper(beta):
    model, x = make_model(), torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    expected = _hb_dpmpp_2m_by_the_paper(model, x, 12, beta)
    got = ds.sample(model, x, steps=12, solver="dpmpp_2m", momentum=beta)
    assert max_rel(got, expected) <= 1e-5
    if beta == 1.0:  # no momentum: DPM-Solver++ 2M itself
        assert max_rel(got, ds.sample(model, x, steps=12, solver="dpmpp_2m")) <= 1e-6


def test_sample_builds_each_plan_once():
    """sample() caches its plan per distinct arguments (values with their types: eta 0 and 0.0 differ as keys
    but build equal plans); arguments that do not hash (a numpy array) build anew."""
    from diffsampler.sample import cached_plan

    sch = ds.schedules.VP.scaled_linear()
    first = cached_plan("ddim", sch, 5, None, (("eta", 0.5),))
    assert cached_plan("ddim", sch, 5, None, (("eta", 0.5),)) is first
    assert cached_plan("ddim", sch, 6, None, (("eta", 0.5),)) is not first
    assert cached_plan("ddim", sch, 5, None, (("eta", 0),)) == cached_plan("ddim", sch, 5, None, (("eta", 0.0),))
    listed = cached_plan("unipc", sch, 5, None, (("dc_ratios", [1.0] * 5),))  # a list hashes as a tuple
    assert cached_plan("unipc", sch, 5, None, (("dc_ratios", [1.0] * 5),)) is listed
    ratios = np.ones(5)  # an array does not hash: built anew
    assert cached_plan("unipc", sch, 5, None, (("dc_ratios", ratios),)) is not cached_plan(
        "unipc", sch, 5, None, (("dc_ratios", ratios),))


def test_every_registered_solver_runs_on_each_of_its_schedules():
    """The registry is the one list of solver names: each builds a plan on every schedule type it names
    (on its defaults), and describe() has a line per name."""
    from diffsampler.schedules import EDM, VP, Flow, MeanReverting, VPContinuous

    schedules = {VP: VP.scaled_linear(), EDM: EDM(), Flow: Flow(shift=3.0), VPContinuous: VPContinuous(),
                 MeanReverting: MeanReverting()}
    lines = ds.solvers.describe().splitlines()
    assert [line.split()[0] for line in lines] == list(ds.solvers.SOLVERS)
    for name, spec in ds.solvers.SOLVERS.items():
        if name == "dpmv3":  # needs its statistics (test_dpmv3.py)
            continue
        for kind in spec.schedules:
            schedule = schedules[kind]
            plan = ds.solvers.make_plan(name, schedule, 6, spec.default_prediction(schedule))
            assert len(plan.steps) >= 6, (name, kind)
        with pytest.raises(ValueError, match=f"solver {name!r} needs a"):
            ds.solvers.make_plan(name, object(), 6, "eps")
