"""The ancestral and second-order k-diffusion samplers (and ComfyUI's flow variants): their published update
equations written out in float64, the same noise draws, and the equal diffusers schedulers on the same sigmas."""

import math

import diffusers
import numpy as np
import pytest
import torch

from diffsampler.integrations import kdiffusion as K
from test_integrations_kdiffusion import SIGMAS, ListNoise, close, denoiser, start

FLOW_SIGMAS = torch.linspace(0.98, 0, 11, dtype=torch.float64)  # flow sigmas in [0, 1), ending at 0


def call(x, sigma):
    return denoiser(x, torch.full((x.shape[0],), sigma, dtype=x.dtype))


def split(s_from, s_to, eta):
    """k-diffusion's get_ancestral_step: (sigma_down, sigma_up)."""
    up = min(s_to, eta * math.sqrt(s_to**2 * (s_from**2 - s_to**2) / s_from**2))
    return math.sqrt(s_to**2 - up**2), up


def rf_split(s, s_next, eta):
    """ComfyUI's flow split: (sigma_down, alpha ratio, renoise)."""
    down = s_next * (1 + (s_next / s - 1) * eta)
    ratio = (1 - s_next) / (1 - down)
    return down, ratio, math.sqrt(max(s_next**2 - down**2 * ratio**2, 0.0))


def euler_ancestral_eq(x, sigmas, eta, noise, s_noise=1.0):
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        down, up = split(s, s_next, eta)
        x = x + (x - call(x, s)) / s * (down - s)
        if s_next > 0:
            x = x + noise(s, s_next) * s_noise * up
    return x


def dpm_2_eq(x, sigmas, s_churn=0.0):
    n = len(sigmas) - 1
    for i in range(n):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        if s_churn:  # Karras et al.'s churn: sigma_hat = sigma (1 + gamma), x + sqrt(sigma_hat^2 - sigma^2) z
            s_hat = s * (1 + min(s_churn / n, 2**0.5 - 1))
            x, s = x + torch.randn_like(x) * math.sqrt(s_hat**2 - s**2), s_hat
        d = (x - call(x, s)) / s
        if s_next == 0:
            x = x + d * (s_next - s)
            continue
        mid = math.exp((math.log(s) + math.log(s_next)) / 2)
        x2 = x + d * (mid - s)
        x = x + (x2 - call(x2, mid)) / mid * (s_next - s)
    return x


def dpm_2_ancestral_eq(x, sigmas, eta, noise):
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        down, up = split(s, s_next, eta)
        d = (x - call(x, s)) / s
        if down == 0:
            x = x + d * (down - s)
            continue
        mid = math.exp((math.log(s) + math.log(down)) / 2)
        x2 = x + d * (mid - s)
        x = x + (x2 - call(x2, mid)) / mid * (down - s) + noise(s, s_next) * up
    return x


def dpmpp_2s_ancestral_eq(x, sigmas, eta, noise):
    """t = -log sigma, h = t(sigma_down) - t(sigma), the midpoint s = t + h / 2."""
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        down, up = split(s, s_next, eta)
        denoised = call(x, s)
        if down == 0:
            x = denoised
        else:
            t, h = -math.log(s), math.log(s) - math.log(down)
            s_mid = math.exp(-(t + h / 2))
            x2 = s_mid / s * x - math.expm1(-h / 2) * denoised
            x = down / s * x - math.expm1(-h) * call(x2, s_mid)
        if s_next > 0:
            x = x + noise(s, s_next) * up
    return x


def euler_ancestral_rf_eq(x, sigmas, eta, noise):
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = call(x, s)
        if s_next == 0:
            x = denoised
            continue
        down, ratio, renoise = rf_split(s, s_next, eta)
        x = down / s * x + (1 - down / s) * denoised
        if eta > 0:
            x = ratio * x + noise(s, s_next) * renoise
    return x


def dpmpp_2s_ancestral_rf_eq(x, sigmas, eta, noise):
    """lambda = log((1 - sigma) / sigma), sigma(lambda) = 1 / (e^lambda + 1)."""
    lam = lambda sigma: math.log((1 - sigma) / sigma)
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = call(x, s)
        if s_next == 0:
            x = denoised
            continue
        down, ratio, renoise = rf_split(s, s_next, eta)
        s_mid = 0.9999 if s == 1.0 else 1 / (math.exp(lam(s) + (lam(down) - lam(s)) / 2) + 1)
        u = s_mid / s * x + (1 - s_mid / s) * denoised
        x = down / s * x + (1 - down / s) * call(u, s_mid)
        if eta > 0:
            x = ratio * x + noise(s, s_next) * renoise
    return x


def dpm_2_ancestral_rf_eq(x, sigmas, eta, noise):
    """ComfyUI's sample_dpm_2_ancestral_RF: the DPM-2 step (midpoint in log sigma) to sigma_down, then the flow
    renoising x = ratio x + renoise z; an Euler step where sigma_down = 0."""
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        down, ratio, renoise = rf_split(s, s_next, eta) if s_next > 0 else (0.0, 1.0, 0.0)
        denoised = call(x, s)
        d = (x - denoised) / s
        if down == 0:
            x = x + d * (down - s)
            continue
        mid = math.exp((math.log(s) + math.log(down)) / 2)
        x2 = x + d * (mid - s)
        d2 = (x2 - call(x2, mid)) / mid
        x = ratio * (x + d2 * (down - s)) + noise(s, s_next) * renoise
    return x


@pytest.mark.parametrize("eta", [1.0, 0.5, 0.0])
def test_dpm_2_ancestral_rf_follows_comfyui(eta):
    x = start() / SIGMAS[0]
    noise = ListNoise(x.shape, 12)
    got = K.sample_dpm_2_ancestral_RF(denoiser, x, FLOW_SIGMAS, disable=True, eta=eta, noise_sampler=noise)
    assert close(got, dpm_2_ancestral_rf_eq(x, FLOW_SIGMAS, eta, ListNoise(x.shape, 12)))
    assert noise.used == len(FLOW_SIGMAS) - 2  # drawn at every DPM-2 step, as ComfyUI (renoise 0 at eta 0)


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_euler_ancestral_follows_its_equations(eta):
    x = start()
    got = K.sample_euler_ancestral(denoiser, x, SIGMAS, disable=True, eta=eta, s_noise=0.9,
                                   noise_sampler=ListNoise(x.shape, 12))
    assert close(got, euler_ancestral_eq(x, SIGMAS, eta, ListNoise(x.shape, 12), s_noise=0.9))


def test_euler_ancestral_eta_0_is_euler():
    assert close(K.sample_euler_ancestral(denoiser, start(), SIGMAS, disable=True, eta=0.0),
                 K.sample_euler(denoiser, start(), SIGMAS, disable=True))


def test_dpm_2_follows_its_equations():
    assert close(K.sample_dpm_2(denoiser, start(), SIGMAS, disable=True), dpm_2_eq(start(), SIGMAS))
    torch.manual_seed(3)
    got = K.sample_dpm_2(denoiser, start(), SIGMAS, disable=True, s_churn=2.0)
    torch.manual_seed(3)
    assert close(got, dpm_2_eq(start(), SIGMAS, s_churn=2.0))


@pytest.mark.parametrize("eta", [1.0, 0.0])
def test_dpm_2_ancestral_follows_its_equations(eta):
    x = start()
    got = K.sample_dpm_2_ancestral(denoiser, x, SIGMAS, disable=True, eta=eta, noise_sampler=ListNoise(x.shape, 12))
    assert close(got, dpm_2_ancestral_eq(x, SIGMAS, eta, ListNoise(x.shape, 12)))
    if eta == 0:
        assert close(got, K.sample_dpm_2(denoiser, x, SIGMAS, disable=True))


@pytest.mark.parametrize("eta", [1.0, 0.3])
def test_dpmpp_2s_ancestral_follows_its_equations(eta):
    x = start()
    got = K.sample_dpmpp_2s_ancestral(denoiser, x, SIGMAS, disable=True, eta=eta,
                                      noise_sampler=ListNoise(x.shape, 12))
    assert close(got, dpmpp_2s_ancestral_eq(x, SIGMAS, eta, ListNoise(x.shape, 12)))


@pytest.mark.parametrize("first", [0.98, 1.0])
@pytest.mark.parametrize("eta", [1.0, 0.5, 0.0])
def test_rf_variants_follow_comfyui(eta, first):
    sigmas = FLOW_SIGMAS.clone()
    sigmas[0] = first
    x = start() / SIGMAS[0]
    for ours, eq in ((K.sample_euler_ancestral_RF, euler_ancestral_rf_eq),
                     (K.sample_dpmpp_2s_ancestral_RF, dpmpp_2s_ancestral_rf_eq)):
        noise = ListNoise(x.shape, 12)
        got = ours(denoiser, x, sigmas, disable=True, eta=eta, noise_sampler=noise)
        assert close(got, eq(x, sigmas, eta, ListNoise(x.shape, 12)))
        assert noise.used == (0 if eta == 0 else len(sigmas) - 2)


def test_rf_eta_0_is_flow_euler():
    x = start() / SIGMAS[0]
    assert close(K.sample_euler_ancestral_RF(denoiser, x, FLOW_SIGMAS, disable=True, eta=0.0),
                 K.sample_euler(denoiser, x, FLOW_SIGMAS, disable=True))


def test_rf_sigmas_above_1_are_refused():
    with pytest.raises(ValueError, match="sigmas"):
        K.sample_euler_ancestral_RF(denoiser, start(), SIGMAS, disable=True)


def test_noise_draws_follow_k_diffusion():
    """One draw per step into sigma' > 0 (DPM-2 ancestral: where sigma_down > 0)."""
    x = start()
    for sampler in (K.sample_euler_ancestral, K.sample_dpm_2_ancestral, K.sample_dpmpp_2s_ancestral):
        noise = ListNoise(x.shape, 12)
        sampler(denoiser, x, SIGMAS, disable=True, noise_sampler=noise)
        assert noise.used == len(SIGMAS) - 2


# diffusers' k-schedulers run the same samplers on their own (float32) sigmas, with eps models
SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def eps_model(x, t):
    w = torch.linspace(-0.3, 0.3, 16, dtype=x.dtype).reshape(4, 4)
    return torch.tanh(torch.einsum("bchw,cd->bdhw", x, w)) + 0.05 * x * (1 + float(t) / 1000)


def diffusers_run(scheduler, x, steps, seed):
    """diffusers' loop over an eps model; returns x and the k-diffusion denoiser over the scheduler's sigmas."""
    scheduler.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    x = x * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        kw = {"generator": g} if "generator" in scheduler.step.__code__.co_varnames else {}
        x = scheduler.step(eps_model(scheduler.scale_model_input(x, t), t), t, x, **kw).prev_sample
    return x


def as_denoiser(scheduler):
    """k-diffusion's wrapper of the same eps model: D = x - sigma eps(x / sqrt(sigma^2 + 1), t(sigma))."""
    log_sigmas = (((1 - scheduler.alphas_cumprod) / scheduler.alphas_cumprod) ** 0.5).log().double().numpy()

    def model(x, sigma):  # t: linear in log sigma between the training steps
        s = float(sigma[0])
        t = np.interp(math.log(s), log_sigmas, np.arange(len(log_sigmas)))
        return x - s * eps_model((x / math.sqrt(s * s + 1)).float(), float(t)).double()
    return model


class GeneratorNoise:
    """noise_sampler drawing as diffusers does (randn_tensor of a generator, float32)."""

    def __init__(self, shape, seed):
        self.g, self.shape = torch.Generator().manual_seed(seed), shape

    def __call__(self, sigma, sigma_next):
        return torch.randn(self.shape, generator=self.g).double()


@pytest.mark.parametrize("name, sampler", [("EulerAncestralDiscreteScheduler", "sample_euler_ancestral"),
                                           ("KDPM2DiscreteScheduler", "sample_dpm_2"),
                                           ("KDPM2AncestralDiscreteScheduler", "sample_dpm_2_ancestral")])
def test_diffusers_k_schedulers_run_the_same_sampler(name, sampler):
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    scheduler = getattr(diffusers, name)(**SD)
    theirs = diffusers_run(scheduler, x, 9, seed=3)
    scheduler.set_timesteps(9)
    sigmas = torch.unique_consecutive(scheduler.sigmas.double())  # KDPM2's interleaved grid: its distinct sigmas
    kw = {} if sampler == "sample_dpm_2" else {"noise_sampler": GeneratorNoise(x.shape, 3)}
    ours = getattr(K, sampler)(as_denoiser(scheduler), x.double() * sigmas[0], sigmas, disable=True, **kw)
    assert close(ours, theirs.double(), tol=2e-5)


@pytest.mark.parametrize("sampler", ["sample_euler_ancestral", "sample_dpm_2", "sample_dpm_2_ancestral",
                                     "sample_dpmpp_2s_ancestral", "sample_euler_ancestral_RF",
                                     "sample_dpmpp_2s_ancestral_RF", "sample_dpm_2_ancestral_RF"])
def test_calling_convention(sampler):
    """model(x, sigma * s_in, **extra_args); one callback per step; fp32 runs the fused kernel."""
    seen = []
    sigmas = (FLOW_SIGMAS if sampler.endswith("RF") else SIGMAS).float()
    got = getattr(K, sampler)(denoiser, start().float(), sigmas, extra_args={"scale": 0.9}, disable=True,
                              callback=seen.append)
    assert [d["i"] for d in seen] == list(range(len(sigmas) - 1))
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    with pytest.raises(ValueError, match="s_noise"):
        getattr(K, sampler)(denoiser, start(), SIGMAS, disable=True, s_noise=-1.0)
