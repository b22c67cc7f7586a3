"""Refused arguments of the public API: sample / run_plan, the solvers' options, the k-diffusion functions, FKC,
LML and the flow particle samplers. Each error names the argument and what was expected, at the entry point."""

import math

import numpy as np
import pytest
import torch

import diffsampler as ds
from diffsampler import flow_smc, smc
from diffsampler.integrations import kdiffusion as kd
from diffsampler.schedules import VP
from diffsampler.solvers import TimeShift, make_plan


def model(x, t):
    return 0.1 * x


@pytest.fixture
def x():
    return torch.randn(2, 3, generator=torch.Generator().manual_seed(0))


# ---- solver options: finite and in range, checked before any model call

@pytest.mark.parametrize("solver,options,name", [
    ("ddim", dict(eta=math.nan), "eta"),
    ("ddim", dict(eta=math.inf), "eta"),
    ("ddim", dict(eta=-0.5), "eta"),
    ("ddim", dict(eta="1"), "eta"),
    ("ghvb", dict(beta=math.nan), "beta"),
    ("dpmpp_2m", dict(momentum=math.inf), "momentum"),
    ("unipc", dict(dc_ratios=[1.0, math.nan, 1.0, 1.0, 1.0]), r"dc_ratios\[1\]"),
    ("unipc", dict(disable_corrector=(1.5,)), r"disable_corrector\[0\]"),
    ("ddim", dict(steps_offset=1.5), "steps_offset"),
    ("dpmpp_2m", dict(lower_order_final="no"), "lower_order_final"),
    ("unipc", dict(corrector=None), "corrector"),
    ("dpmpp_2m", dict(clip=math.inf), "clip"),
    ("dpmpp_2m", dict(clip=math.nan), "clip"),
    ("dpmpp_2m", dict(threshold_ratio=0.9, threshold_max=math.inf), "threshold_max"),
    ("dpmpp_2m", dict(check_nan="yes"), "check_nan"),
    ("dpmpp_2m", dict(generator=0), "generator"),
    ("dpmpp_2m", dict(time_shift=10), "time_shift"),
])
def test_bad_option_is_named_before_the_model_runs(x, solver, options, name):
    calls = []

    def counting(x, t):
        calls.append(t)
        return 0.1 * x

    with pytest.raises(ValueError, match=name):
        ds.sample(counting, x, 5, solver, **options)
    assert calls == []


def test_unhashable_solver_name(x):
    with pytest.raises(ValueError, match="solver must be one of"):
        ds.sample(model, x, 5, ["ddim"])


# ---- integers: any integral, never bool

@pytest.mark.parametrize("steps", [np.int64(5), np.int32(5), torch.tensor(5)])
def test_integral_steps_are_accepted(x, steps):
    assert torch.equal(ds.sample(model, x, steps), ds.sample(model, x, 5))


@pytest.mark.parametrize("steps", [True, 5.0, np.float64(5), "5", torch.tensor([5]), torch.tensor(5.0)])
def test_non_integer_steps_are_refused(x, steps):
    with pytest.raises(TypeError, match="steps must be an integer >= 1"):
        ds.sample(model, x, steps)
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        make_plan("ddim", VP.scaled_linear(), steps, "eps")


@pytest.mark.parametrize("solver", ["dpmpp_3m", "unipc", "deis", "ghvb"])
def test_integer_order(x, solver):
    assert torch.equal(ds.sample(model, x, 5, solver, order=np.int64(2)), ds.sample(model, x, 5, solver, order=2))
    for bad in (True, 2.0):
        with pytest.raises(TypeError, match="order must be an integer"):
            ds.sample(model, x, 5, solver, order=bad)


# ---- x and model at the entry

@pytest.mark.parametrize("bad_x,match", [
    ([[1.0, 2.0]], "x must be a torch.Tensor"), (None, "x must be a torch.Tensor"),
    (torch.ones(2, 3, dtype=torch.int64), "x must be a floating-point tensor"),
])
def test_x_must_be_a_float_tensor(bad_x, match):
    plan = make_plan("ddim", VP.scaled_linear(), 5, "eps")
    for call in (lambda: ds.sample(model, bad_x, 5), lambda: ds.run_plan(model, bad_x, plan)):
        with pytest.raises(TypeError, match=match):
            call()


@pytest.mark.parametrize("bad_model", [None, 3, "unet"])
def test_model_must_be_callable(x, bad_model):
    plan = make_plan("ddim", VP.scaled_linear(), 5, "eps")
    for call in (lambda: ds.sample(bad_model, x, 5), lambda: ds.run_plan(bad_model, x, plan)):
        with pytest.raises(TypeError, match="model must be callable"):
            call()


@pytest.mark.parametrize("solver", ["dpmpp_2m", "ddim", "unipc", "dpmpp_2m_sde", "euler"])
def test_meta_x_runs_shape_only(solver):
    """A meta x (shape inference without data) runs the loop; there is nothing to check for NaN."""
    out = ds.sample(model, torch.empty(2, 3, device="meta"), 5, solver)
    assert out.is_meta and out.shape == (2, 3)


# ---- the loop's check of the model output

@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_non_finite_model_output_names_the_step_and_time(x, bad):
    plan = make_plan("dpmpp_2m", VP.scaled_linear(), 5, "eps")

    def diverging(x, t):
        return torch.full_like(x, bad) if int(t) == plan.steps[2].t else 0.1 * x

    where = rf"at step 2 \(t = {plan.steps[2].t}\)"
    with pytest.raises(ValueError, match=r"model_out contains non-finite values \(NaN or inf\) " + where):
        ds.sample(diverging, x, 5)
    ds.sample(diverging, x, 5, check_nan=False)  # off: no check


def test_model_output_of_the_wrong_shape_names_the_step(x):
    with pytest.raises(ValueError, match=r"model must return a tensor of x's shape \(2, 3\), got \(2,\) at step 0"):
        ds.sample(lambda x, t: x[:, 0], x, 5)


# ---- the k-diffusion functions' sigmas and options

def denoiser(x, sigma):
    return 0.5 * x


KD_SAMPLERS = [kd.sample_euler, kd.sample_heun, kd.sample_dpmpp_2m, kd.sample_dpmpp_2m_sde, kd.sample_dpmpp_3m_sde,
               kd.sample_dpmpp_sde, kd.sample_lms, kd.sample_ipndm, kd.sample_ipndm_v]


@pytest.mark.parametrize("sampler", KD_SAMPLERS)
def test_kdiffusion_sigmas_as_a_sequence(x, sampler):
    sigmas = kd.get_sigmas_karras(5, 0.1, 10.0)
    run = lambda s: sampler(denoiser, x * 10.0, s, disable=True)  # noqa: E731
    torch.manual_seed(0)
    ref = run(sigmas)
    for as_seq in (sigmas.tolist(), tuple(sigmas.tolist()), sigmas.numpy(), list(sigmas)):
        torch.manual_seed(0)
        assert torch.equal(run(as_seq), ref)


@pytest.mark.parametrize("sampler", KD_SAMPLERS)
@pytest.mark.parametrize("sigmas,match", [
    ([1.0, -0.5, 0.0], r"sigmas\[1\] must be >= 0 and finite"),
    ([1.0, math.nan, 0.0], r"sigmas\[1\] must be >= 0 and finite"),
    ([math.inf, 1.0, 0.0], r"sigmas\[0\] must be >= 0 and finite"),
    ([1.0, 2.0, 0.0], "sigmas must be (non-increasing|decreasing)"),
    ([1.0, 0.0, 0.0], "sigmas must be > 0 but the last"),
    ([], "at least 2 entries"),
    ([1.0], "at least 2 entries"),
    (torch.ones(2, 2), "sigmas must be 1-D"),
    (1.0, "sigmas must be a 1-D tensor or a sequence"),
])
def test_kdiffusion_bad_sigmas(x, sampler, sigmas, match):
    with pytest.raises(ValueError, match=match):
        sampler(denoiser, x, sigmas, disable=True)


@pytest.mark.parametrize("sampler", [kd.sample_dpmpp_2m, kd.sample_dpmpp_2m_sde, kd.sample_dpmpp_3m_sde])
def test_kdiffusion_log_sigma_samplers_need_decreasing_sigmas(x, sampler):
    with pytest.raises(ValueError, match="sigmas must be decreasing"):
        sampler(denoiser, x, [2.0, 1.0, 1.0, 0.5, 0.0], disable=True)


@pytest.mark.parametrize("sampler", [kd.sample_euler, kd.sample_heun, kd.sample_dpmpp_sde, kd.sample_ipndm])
def test_kdiffusion_repeated_sigma_is_a_zero_step(x, sampler):
    torch.manual_seed(0)
    out = sampler(denoiser, x, [2.0, 1.0, 1.0, 0.0], disable=True)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("call,name", [
    (lambda x, s: kd.sample_euler(denoiser, x, s, s_churn=math.nan), "s_churn"),
    (lambda x, s: kd.sample_heun(denoiser, x, s, s_noise=-1.0), "s_noise"),
    (lambda x, s: kd.sample_dpmpp_2m_sde(denoiser, x, s, eta=math.nan), "eta"),
    (lambda x, s: kd.sample_dpmpp_3m_sde(denoiser, x, s, eta=-1.0), "eta"),
    (lambda x, s: kd.sample_dpmpp_sde(denoiser, x, s, r=0.0), "r must be"),
    (lambda x, s: kd.sample_dpmpp_sde(denoiser, x, s, noise_sampler=1), "noise_sampler"),
    (lambda x, s: kd.sample_euler(denoiser, x, s, callback=1), "callback"),
    (lambda x, s: kd.sample_euler(denoiser, x, s, extra_args=[1]), "extra_args"),
    (lambda x, s: kd.sample_euler(None, x, s), "model must be callable"),
    (lambda x, s: kd.sample_euler(denoiser, x.tolist(), s), "x must be a torch.Tensor"),
])
def test_kdiffusion_bad_options(x, call, name):
    with pytest.raises(ValueError, match=name):
        call(x, kd.get_sigmas_karras(4, 0.1, 10.0))


def test_kdiffusion_infinite_s_tmax_is_the_default(x):
    kd.sample_euler(denoiser, x, kd.get_sigmas_karras(4, 0.1, 10.0), s_tmax=math.inf, disable=True)


# ---- LML, TimeShift, FKC and the flow particle samplers: checked at construction / entry

def test_integer_options_of_the_classes():
    assert ds.LML(rank=np.int64(2)).rank == 2 and type(ds.LML(rank=np.int64(2)).rank) is int
    assert TimeShift(window=np.int64(3)).window == 3
    for bad in (dict(rank=True), dict(n_steps=False), dict(rank=2.0)):
        with pytest.raises(TypeError, match="rank|n_steps"):
            ds.LML(**bad)
    for bad in (dict(window=True), dict(window=1.5), dict(cutoff=300.0)):
        with pytest.raises(TypeError, match="window|cutoff"):
            TimeShift(**bad)


@pytest.mark.parametrize("kwargs,name", [
    (dict(damping=math.inf), "damping"), (dict(snr=math.inf), "snr"), (dict(kappa=math.nan), "kappa"),
    (dict(damping="1"), "damping"),
])
def test_lml_reals(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ds.LML(**kwargs)



@pytest.mark.parametrize("make,name", [
    (lambda: smc.FKC([None], [1.0]), r"models\[0\] must be callable"),
    (lambda: smc.FKC(model, [1.0]), "models must be a sequence"),
    (lambda: smc.FKC([model], [1.0, 2.0]), "equal length"),
    (lambda: smc.FKC([model], [math.nan]), r"exponents\[0\]"),
    (lambda: smc.FKC([model], [-1.0]), "positive sum"),
    (lambda: smc.FKC([model], [1.0], steps=0), "steps"),
    (lambda: smc.FKC([model], [1.0], steps=True), "steps"),
    (lambda: smc.FKC([model], [1.0], method="best"), "method"),
    (lambda: smc.FKC([model], [1.0], ess_threshold=2.0), "ess_threshold"),
    (lambda: smc.FKC([model], [1.0], schedule="vp"), "schedule"),
    (lambda: smc.FKC([model], [1.0], dtype=torch.int64), "dtype"),
    (lambda: smc.FKC([model], [1.0], device="gpu0"), "device"),
    (lambda: smc.FKC([model], [1.0], weighted="no"), "weighted"),
    (lambda: smc.FKC([model], [1.0], stepz=10), "unknown FKC option"),
    (lambda: smc.FKC.anneal(model, True), "beta"),
    (lambda: smc.FKC.anneal(model, math.inf), "beta"),
    (lambda: smc.FKC.guidance(model, model, math.nan), "w"),
    (lambda: smc.FKC.product(model), "models must be a sequence"),
])
def test_fkc_checks_at_construction(make, name):
    with pytest.raises(ValueError, match=name):
        make()


def test_fkc_integral_sizes():
    fkc = smc.FKC.product([model, model], steps=np.int64(3))
    res = fkc.sample(np.int64(2), np.int64(3), (np.int64(2),), generator=torch.Generator().manual_seed(0))
    assert res.particles.shape == (6, 2) and res.draw.shape == (2, 2)
    for bad in (dict(groups=True), dict(particles=2.0), dict(shape=(True,))):
        args = {**dict(groups=2, particles=3, shape=(2,)), **bad}
        with pytest.raises(TypeError, match="groups|particles|shape"):
            fkc.sample(**args)


def velocity(x, t):
    return -0.5 * x


@pytest.mark.parametrize("call,name", [
    (lambda: flow_smc.sample(velocity, True, (2,)), "n must be an integer"),
    (lambda: flow_smc.sample(velocity, 2, (2,), steps=True), "steps must be an integer"),
    (lambda: flow_smc.sample(velocity, 2, (2,), diffusion=math.inf), "diffusion"),
    (lambda: flow_smc.best_of_n(velocity, lambda x0: x0[:, 0], True, 2, (2,)), "groups"),
    (lambda: flow_smc.smc(velocity, lambda x0: x0[:, 0], 2, 2, (2,), temperature=math.inf), "temperature"),
    (lambda: flow_smc.smc(velocity, lambda x0: x0[:, 0], 2, 2, (2,), ess_threshold=math.nan), "ess_threshold"),
    (lambda: flow_smc.rollover_budget_forcing(velocity, lambda x0: x0[:, 0], 2, 40.0, (2,)), "budget"),
    (lambda: flow_smc.VPInterpolant(0.1, math.inf), "beta_max"),
])
def test_flow_smc_bad_arguments(call, name):
    with pytest.raises(ValueError, match=name):
        call()


def test_flow_smc_integral_sizes():
    gen = torch.Generator().manual_seed(0)
    out = flow_smc.sample(velocity, np.int64(3), (np.int64(2),), steps=np.int64(4), generator=gen)
    assert out.shape == (3, 2)
