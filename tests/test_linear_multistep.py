"""The linear multistep family: LMS (diffusers' LMSDiscreteScheduler, k-diffusion's sample_lms), PNDM / PLMS
(PNDMScheduler) and iPNDM, against their published equations, each other, diffusers, and the convergence order
on analytic targets."""

import math

import diffusers
import numpy as np
import pytest
import torch
from scipy import integrate

import diffsampler as ds
from diffsampler.integrations import diffusers as fused
from diffsampler.integrations import kdiffusion as K
from diffsampler.solvers.lms import lms_weights
from diffsampler.targets import GaussianMixture
from test_integrations_diffusers import X, _tiny_unet, both, run
from test_sample import SD, make_model, max_rel

SIGMAS = K.get_sigmas_karras(12, 0.03, 14.6).double()


def denoiser(x, sigma):
    """A deterministic nonlinear denoiser in k-diffusion's convention (x = x0 + sigma eps, returns x0)."""
    w = torch.linspace(-0.4, 0.4, 16, dtype=x.dtype).reshape(4, 4)
    x_in = x / (sigma.view(-1, 1, 1, 1) ** 2 + 1).sqrt()
    return 0.8 * torch.tanh(torch.einsum("bchw,cd->bdhw", x_in, w)) + 0.1 * x_in


def quad_weight(sigmas, i, order, j):
    """The published coefficient: quad of the Lagrange basis polynomial j through sigmas[i - k], k < order."""
    def basis(tau):
        return math.prod((tau - sigmas[i - k]) / (sigmas[i - j] - sigmas[i - k]) for k in range(order) if k != j)

    return integrate.quad(basis, sigmas[i], sigmas[i + 1], epsrel=1e-4)[0]


def lms_by_the_equations(model, x, sigmas, order):
    """k-diffusion's sample_lms written from its equations in plain torch (float64)."""
    s = sigmas.tolist()
    ds_ = []
    for i in range(len(s) - 1):
        d = (x - model(x, torch.full((x.shape[0],), s[i], dtype=x.dtype))) / s[i]
        ds_ = (ds_ + [d])[-order:]
        k = min(i + 1, order)
        x = x + sum(quad_weight(s, i, k, j) * dj for j, dj in zip(range(k), reversed(ds_)))
    return x


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_exact_weights_are_quad_to_its_rounding(order):
    s = SIGMAS.tolist()
    for i in range(order - 1, len(s) - 1):
        ours = lms_weights(s, i, order)
        theirs = [quad_weight(s, i, order, j) for j in range(order)]
        scale = max(abs(v) for v in theirs)
        assert max(abs(a - b) for a, b in zip(ours, theirs)) <= 1e-13 * scale


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_sample_lms_follows_its_equations(order):
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * SIGMAS[0]
    got = K.sample_lms(denoiser, x, SIGMAS, disable=True, order=order)
    assert max_rel(got, lms_by_the_equations(denoiser, x, SIGMAS, order)) <= 1e-10


def test_sample_lms_is_diffusers_lms_on_the_same_sigmas():
    """diffusers' loop on an eps model; the same model as a k-diffusion denoiser over diffusers' sigmas."""
    model, sched = make_model(), diffusers.LMSDiscreteScheduler(**SD)
    sched.set_timesteps(15)
    time_of = {float(s): t for s, t in zip(sched.sigmas.tolist(), sched.timesteps)}

    def den(x, sigma):
        s = float(sigma[0])
        return x - s * model(x / math.sqrt(s * s + 1), time_of[s])

    x = X * sched.init_noise_sigma
    theirs = x
    for t in sched.timesteps:
        theirs = sched.step(model(sched.scale_model_input(theirs, t), t), t, theirs).prev_sample
    assert max_rel(K.sample_lms(den, x, sched.sigmas, disable=True), theirs) <= 1e-5


LMS_CONFIGS = [dict(), dict(use_karras_sigmas=True), dict(use_exponential_sigmas=True), dict(use_beta_sigmas=True),
               dict(prediction_type="v_prediction"), dict(prediction_type="sample"),
               dict(timestep_spacing="leading", steps_offset=1), dict(timestep_spacing="trailing"),
               dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)]


@pytest.mark.parametrize("config", LMS_CONFIGS, ids=str)
@pytest.mark.parametrize("steps", [7, 20])
def test_lms_discrete(config, steps):
    ours, theirs = both("LMSDiscreteScheduler", {**SD, **config}, make_model(), X, steps, scale_input=True)
    assert max_rel(ours, theirs) <= 1e-5


@pytest.mark.parametrize("order", [1, 2, 3])
def test_lms_discrete_step_order(order):
    ours, theirs = both("LMSDiscreteScheduler", SD, make_model(), X, 12, dict(order=order), scale_input=True)
    assert max_rel(ours, theirs) <= 1e-5


def test_lms_discrete_img2img_start_late():
    ours, theirs = both("LMSDiscreteScheduler", SD, make_model(), X, 20, scale_input=True, start=8)
    assert max_rel(ours, theirs) <= 1e-5


def test_lms_discrete_returns_the_data_prediction():
    model = make_model()
    outs = []
    for cls in (fused.LMSDiscreteScheduler, diffusers.LMSDiscreteScheduler):
        sched = cls(**SD, prediction_type="v_prediction")
        sched.set_timesteps(5)
        t = sched.timesteps[0]
        outs.append(sched.step(model(sched.scale_model_input(X, t), t), t, X))
    assert type(outs[0]) is type(outs[1])
    assert max_rel(outs[0].pred_original_sample, outs[1].pred_original_sample) <= 1e-6


def test_lms_discrete_order_above_the_ring_runs_diffusers_step():
    with pytest.warns(UserWarning, match="order 5 > 4"):
        ours, theirs = both("LMSDiscreteScheduler", SD, make_model(), X, 8, dict(order=5), scale_input=True)
    assert max_rel(ours, theirs) == 0


@pytest.mark.parametrize("order", [0, 1.5, 5])
def test_lms_bad_order(order):
    with pytest.raises(ValueError, match="order must be an integer"):
        K.sample_lms(denoiser, SIGMAS[0] * torch.ones(1, 4, 2, 2, dtype=torch.float64), SIGMAS, order=order)
    if order != 5:  # the drop-in runs diffusers' step above 4
        sched = fused.LMSDiscreteScheduler(**SD)
        sched.set_timesteps(4)
        with pytest.raises(ValueError, match="order must be an integer"):
            sched.step(X, sched.timesteps[0], X, order=order)


@pytest.mark.parametrize("sampler", [K.sample_lms, K.sample_ipndm_v])
def test_lagrange_weights_need_decreasing_sigmas(sampler):
    """The weights divide by the differences of past sigmas (k-diffusion and ComfyUI divide by zero there): a
    repeated sigma is refused."""
    with pytest.raises(ValueError, match="sigmas must be decreasing"):
        sampler(denoiser, torch.ones(1, 4, 2, 2, dtype=torch.float64), [2.0, 1.0, 1.0, 0.5, 0.0], disable=True)


S0, S1, LAM, MU = 2.0, 0.2, 0.5, 0.3  # dx/dsigma = LAM (S0 - sigma)^4 (x - MU) from S0 to S1


def flat_start_denoiser(x, sigma):
    """D = x - sigma d with d = LAM (S0 - sigma)^4 (x - MU): flat to fourth order at the start, so the
    lower-order warm-up steps of LMS err by O(h^5) and do not cap the order of the method."""
    s = float(sigma[0])
    return x - s * LAM * (S0 - s) ** 4 * (x - MU)


def flat_start_exact(x):
    return MU + (x - MU) * math.exp(-LAM * (S0 - S1) ** 5 / 5)


def fitted_order(errors, ns):
    return -np.polyfit(np.log(ns), np.log(errors), 1)[0]


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_lms_convergence_order(order):
    """The global error of sample_lms over n uniform steps in sigma against the exact solution: the fitted
    order is within 0.3 of `order` (measured: 1.05, 2.01, 2.83, 4.06); a wrong weight drops it by >= 1."""
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2.0
    ns = [100, 200, 400]
    errors = [(K.sample_lms(flat_start_denoiser, x, torch.linspace(S0, S1, n + 1, dtype=torch.float64),
                            disable=True, order=order) - flat_start_exact(x)).abs().max().item() for n in ns]
    assert abs(fitted_order(errors, ns) - order) < 0.3, errors


PNDM_CONFIGS = [dict(skip_prk_steps=True), dict(), dict(prediction_type="v_prediction"),
                dict(skip_prk_steps=True, prediction_type="v_prediction"),
                dict(skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1),
                dict(set_alpha_to_one=False, steps_offset=1), dict(skip_prk_steps=True, timestep_spacing="linspace"),
                dict(timestep_spacing="trailing"), dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)]


@pytest.mark.parametrize("config", PNDM_CONFIGS, ids=str)
@pytest.mark.parametrize("steps", [7, 20])
def test_pndm(config, steps):
    ours, theirs = both("PNDMScheduler", {**SD, **config}, make_model(), X, steps)
    assert max_rel(ours, theirs) <= 1e-5


@pytest.mark.parametrize("skip_prk_steps", [False, True])
def test_inside_pndm_pipeline(skip_prk_steps):
    """A real pipeline (offline, a tiny random UNet2DModel): accelerate() swaps the scheduler, same images."""
    pipe = diffusers.PNDMPipeline(unet=_tiny_unet(), scheduler=diffusers.PNDMScheduler(skip_prk_steps=skip_prk_steps))
    expected = pipe(batch_size=2, num_inference_steps=10, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images
    fused.accelerate(pipe, verbose=False)
    assert isinstance(pipe.scheduler, fused.PNDMScheduler)
    got = pipe(batch_size=2, num_inference_steps=10, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert abs(got - expected).max() <= 1e-5


def test_pndm_rejects_sample_prediction_as_diffusers_does():
    sched = fused.PNDMScheduler(prediction_type="sample")
    sched.set_timesteps(5)
    with pytest.raises(ValueError, match="must be one of `epsilon` or `v_prediction`"):
        sched.step(X, sched.timesteps[0], X)


AB = {1: [1], 2: [3 / 2, -1 / 2], 3: [23 / 12, -16 / 12, 5 / 12], 4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}


def ipndm_v_by_the_equations(h_n, h_n_1, h_n_2=None, h_n_3=None):
    """ComfyUI's sample_ipndm_v weights, written from its equations (h_n = t_next - t_cur,
    h_n_1 = t_cur - t_prev, ...)."""
    if h_n_2 is None:
        return [(2 + h_n / h_n_1) / 2, -(h_n / h_n_1) / 2]
    temp1 = (1 - h_n / (3 * (h_n + h_n_1)) * (h_n * (h_n + h_n_1)) / (h_n_1 * (h_n_1 + h_n_2))) / 2
    if h_n_3 is None:
        return [(2 + h_n / h_n_1) / 2 + temp1, -(h_n / h_n_1) / 2 - (1 + h_n_1 / h_n_2) * temp1, temp1 * h_n_1 / h_n_2]
    ratio = h_n_1 * (h_n_1 + h_n_2) / (h_n_2 * (h_n_2 + h_n_3))
    temp2 = ((1 - h_n / (3 * (h_n + h_n_1))) / 2
             + (1 - h_n / (2 * (h_n + h_n_1))) * h_n / (6 * (h_n + h_n_1 + h_n_2))) \
        * (h_n * (h_n + h_n_1) * (h_n + h_n_1 + h_n_2)) / (h_n_1 * (h_n_1 + h_n_2) * (h_n_1 + h_n_2 + h_n_3))
    return [(2 + h_n / h_n_1) / 2 + temp1 + temp2,
            -(h_n / h_n_1) / 2 - (1 + h_n_1 / h_n_2) * temp1 - (1 + h_n_1 / h_n_2 + ratio) * temp2,
            temp1 * h_n_1 / h_n_2 + (h_n_1 / h_n_2 + ratio * (1 + h_n_2 / h_n_3)) * temp2,
            -temp2 * ratio * h_n_1 / h_n_2]


def ipndm_by_the_equations(model, x, sigmas, max_order, variable):
    """ComfyUI's sample_ipndm / sample_ipndm_v in plain torch (float64)."""
    t = sigmas.tolist()
    buffer = []
    for i in range(len(t) - 1):
        denoised = model(x, torch.full((x.shape[0],), t[i], dtype=x.dtype))
        d = (x - denoised) / t[i]
        order = min(max_order, i + 1)
        if t[i + 1] == 0:
            x_next = denoised
        else:
            steps = [t[i + 1] - t[i]] + [t[i - j] - t[i - j - 1] for j in range(order - 1)]
            c = ipndm_v_by_the_equations(*steps) if variable and order > 1 else AB[order]
            x_next = x + (t[i + 1] - t[i]) * sum(cj * dj for cj, dj in zip(c, [d] + buffer[::-1]))
        buffer = (buffer + [d])[-(max_order - 1):] if max_order > 1 else []
        x = x_next
    return x


@pytest.mark.parametrize("variable", [False, True], ids=["ipndm", "ipndm_v"])
@pytest.mark.parametrize("max_order", [1, 2, 3, 4])
def test_sample_ipndm_follows_its_equations(max_order, variable):
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * SIGMAS[0]
    sampler = K.sample_ipndm_v if variable else K.sample_ipndm
    got = sampler(denoiser, x, SIGMAS, disable=True, max_order=max_order)
    assert max_rel(got, ipndm_by_the_equations(denoiser, x, SIGMAS, max_order, variable)) <= 1e-10


def test_ipndm_v_weights_on_equal_steps():
    """Adams-Bashforth's up to order 3; ComfyUI's order 4 is (57, -65, 43, -11) / 24 there (third order)."""
    from diffsampler.solvers.pndm import ipndm_v_weights

    for k in (2, 3):
        assert np.allclose(ipndm_v_weights(*[-0.1] * k), AB[k], rtol=0, atol=1e-14)
    assert np.allclose(ipndm_v_weights(*[-0.1] * 4), np.array([57, -65, 43, -11]) / 24, rtol=0, atol=1e-14)


def _order_on(sampler, max_order, sigmas_of):
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2.0
    ns = [100, 200, 400]
    errors = [(sampler(flat_start_denoiser, x, sigmas_of(n), disable=True, max_order=max_order)
               - flat_start_exact(x)).abs().max().item() for n in ns]
    return fitted_order(errors, ns), errors


@pytest.mark.parametrize("max_order", [1, 2, 3, 4])
def test_ipndm_convergence_order(max_order):
    """Fixed Adams-Bashforth weights on uniform steps (measured 1.05, 2.01, 2.83, 4.02)."""
    order, errors = _order_on(K.sample_ipndm, max_order, lambda n: torch.linspace(S0, S1, n + 1, dtype=torch.float64))
    assert abs(order - max_order) < 0.3, errors


@pytest.mark.parametrize("max_order", [1, 2, 3])
def test_ipndm_v_convergence_order_on_uneven_steps(max_order):
    """The variable-step weights keep the order on a smoothly uneven grid (measured 1.00, 1.99, 2.97), where
    the fixed weights drop to 2 at most."""
    def uneven(n):
        u = torch.linspace(0, 1, n + 1, dtype=torch.float64)
        return S0 - (S0 - S1) * (u + 0.2 * torch.sin(torch.pi * u))

    order, errors = _order_on(K.sample_ipndm_v, max_order, uneven)
    assert abs(order - max_order) < 0.3, errors
    if max_order == 3:
        assert _order_on(K.sample_ipndm, max_order, uneven)[0] < 2.5


@pytest.mark.parametrize("steps", [7, 20, 50])
def test_ipndm_discrete(steps):
    ours, theirs = both("IPNDMScheduler", {}, make_model(), X, steps)
    assert max_rel(ours, theirs) <= 1e-5


def test_ipndm_discrete_img2img_start_late():
    ours, theirs = both("IPNDMScheduler", {}, make_model(), X, 20, start=5)
    assert max_rel(ours, theirs) <= 1e-5


# ---- diffsampler.sample: the "lms" and "pndm" solvers ----

LMS_SOLVER_CASES = [(dict(), dict()), (dict(use_karras_sigmas=True), dict(sigmas="karras")),
                    (dict(use_beta_sigmas=True), dict(sigmas="beta")),
                    (dict(prediction_type="v_prediction"), dict(prediction="v")),
                    (dict(timestep_spacing="leading", steps_offset=1),
                     dict(timestep_spacing="leading", steps_offset=1))]


@pytest.mark.parametrize("config, options", LMS_SOLVER_CASES, ids=str)
@pytest.mark.parametrize("order", [2, 4])
def test_lms_solver_matches_diffusers(config, options, order, backend):
    model = make_model()
    expected = run(diffusers.LMSDiscreteScheduler(**SD, **config), model, X, 12, dict(order=order), scale_input=True)
    got = ds.sample(model, X, steps=12, solver="lms", schedule=ds.schedules.VP.scaled_linear(), order=order,
                    backend=backend, **options)
    assert max_rel(got, expected) <= 1e-5


@pytest.mark.parametrize("order", [1, 3, 4])
def test_lms_solver_on_edm_is_sample_lms(order):
    edm = ds.schedules.EDM(sigma_min=0.03, sigma_max=14.6)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = ds.sample(denoiser, x, steps=12, solver="lms", schedule=edm, prediction="x0", order=order)
    sigmas = torch.tensor(edm.sigmas(12), dtype=torch.float64)
    assert max_rel(got, K.sample_lms(denoiser, x * sigmas[0], sigmas, disable=True, order=order)) <= 1e-10


def test_lms_solver_on_an_explicit_sigma_list_is_sample_lms():
    sigmas = [14.6, 6.0, 2.5, 1.1, 0.4, 0.1, 0.0]
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    got = ds.sample(denoiser, x, steps=None, solver="lms", schedule=ds.schedules.EDM(), prediction="x0",
                    sigmas=sigmas, order=3)
    expected = K.sample_lms(denoiser, x * sigmas[0], sigmas, disable=True, order=3)
    assert max_rel(got, expected) <= 1e-10


def test_lms_thresholds_the_data_prediction(backend):
    """The ring holds derivatives (a noise prediction, eps_of): thresholding acts on the x0 they imply, so
    first-order LMS with thresholding is Euler with thresholding."""
    model, x = make_model(), 3 * X
    kw = dict(steps=8, schedule=ds.schedules.VP.scaled_linear(), threshold_ratio=0.9, threshold_max=1.2,
              backend=backend)
    got = ds.sample(model, x, solver="lms", order=1, **kw)
    assert max_rel(got, ds.sample(model, x, solver="euler", **kw)) <= 1e-5
    assert max_rel(got, ds.sample(model, x, solver="lms", order=1, **{**kw, "threshold_ratio": None})) > 1e-3


PNDM_SOLVER_CASES = [dict(skip_prk_steps=True), dict(),
                     dict(skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1),
                     dict(set_alpha_to_one=True, timestep_spacing="trailing"), dict(prediction_type="v_prediction")]


@pytest.mark.parametrize("config", PNDM_SOLVER_CASES, ids=str)
def test_pndm_solver_matches_diffusers(config, backend):
    model = make_model()
    expected = run(diffusers.PNDMScheduler(**SD, **config), model, X, 12)
    options = {k: v for k, v in config.items() if k != "prediction_type"}
    got = ds.sample(model, X, steps=12, solver="pndm", schedule=ds.schedules.VP.scaled_linear(),
                    prediction="v" if "prediction_type" in config else "eps", backend=backend, **options)
    assert max_rel(got, expected) <= 1e-5


@pytest.mark.parametrize("skip_prk_steps, calls", [(True, 11), (False, 19)])
def test_pndm_solver_model_calls(skip_prk_steps, calls):
    plan = ds.solvers.make_plan("pndm", ds.schedules.VP.scaled_linear(), 10, "eps", skip_prk_steps=skip_prk_steps)
    sched = diffusers.PNDMScheduler(**SD, skip_prk_steps=skip_prk_steps)
    sched.set_timesteps(10)
    assert len(plan.steps) == calls and plan.timesteps == [float(t) for t in sched.timesteps]


@pytest.mark.parametrize("kw, match", [(dict(solver="pndm", steps=3), "PRK warm-up needs steps >= 4"),
                                       (dict(solver="lms", order=5, steps=6), "order must be an integer in"),
                                       (dict(solver="pndm", prediction="x0"), "PNDM takes prediction 'eps' or 'v'")])
def test_multistep_solvers_bad_input(kw, match):
    with pytest.raises(ValueError, match=match):
        ds.sample(make_model(), X, **{"steps": 8, **kw})


def test_lms_solver_convergence_order_on_a_gaussian_mixture():
    """EDM grids of 20..160 steps against a 3000-step order-4 run on a 4-mode mixture's exact denoiser: the
    fitted orders (measured 1.00, 1.88, 2.64, 3.31; the low-order warm-up and the stiff end keep them below
    the asymptotic ones) within a band a wrong weight leaves."""
    g = torch.Generator().manual_seed(0)
    target = GaussianMixture(torch.ones(4), torch.randn(4, 8, generator=g, dtype=torch.float64), torch.full((4,), 0.5))
    x = torch.randn(256, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    edm = ds.schedules.EDM(sigma_min=0.002, sigma_max=80.0)

    def model(y, sigma):
        return target.posterior_mean(y, torch.ones(()), sigma.double().reshape(-1)[0])

    def run_lms(n, order):
        return ds.sample(model, x, steps=n, solver="lms", schedule=edm, prediction="x0", order=order)

    reference, ns = run_lms(3000, 4), [20, 40, 80, 160]
    orders = [fitted_order([(run_lms(n, k) - reference).norm().item() for n in ns], ns) for k in (1, 2, 3, 4)]
    assert all(k - 0.75 < got < k + 0.3 for k, got in zip((1, 2, 3, 4), orders)), orders


def test_pndm_solver_converges_on_a_gaussian():
    """Uniform steps of r timesteps on a constant-beta VP schedule from t = 960 to 0, against the exact flow of a
    Gaussian. PNDM's transfer averages eps over t rather than over sigma / alpha, so it is first order in
    general (measured order 1.39 over r = 40..5 for PLMS and PRK alike), its errors 0.37 to 0.13 of DDIM's."""
    mean, std = 0.5, 0.7
    target = GaussianMixture(torch.ones(1), torch.full((1, 8), mean, dtype=torch.float64), torch.full((1,), std))
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def error(r, solver, **options):
        n = 960 // r + 1
        schedule = ds.schedules.VP(torch.full((n * r,), 0.005, dtype=torch.float64))
        got = ds.sample(target.model(schedule, "eps"), x, steps=n, solver=solver, schedule=schedule, **options)
        a_start, a_end = schedule.alphas_cumprod.double()[[960, 0]].sqrt().tolist()
        z = (x - a_start * mean) / math.sqrt(a_start**2 * std**2 + 1 - a_start**2)
        return (got - a_end * mean - math.sqrt(a_end**2 * std**2 + 1 - a_end**2) * z).abs().max().item()

    rs = [40, 20, 10, 5]
    ddim = [error(r, "ddim", timestep_spacing="leading", set_alpha_to_one=False) for r in rs]
    for skip in (True, False):
        errors = [error(r, "pndm", skip_prk_steps=skip) for r in rs]
        assert all(a > b for a, b in zip(errors, errors[1:])), errors
        assert 1.2 < fitted_order(errors, [1 / r for r in rs]) < 1.7, errors
        assert all(e < 0.4 * d for e, d in zip(errors, ddim)), (errors, ddim)
