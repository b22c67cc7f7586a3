"""ComfyUI's further k-diffusion-style samplers (LCM, Heun++, gradient estimation, SEEDS): their published update
equations written out in float64 with the same noise draws, the convergence order of the ODE solvers on an exact
Gaussian-mixture denoiser, and bad input."""

import functools
import math

import pytest
import torch

from diffsampler.integrations import kdiffusion as K
from diffsampler.targets import GaussianMixture
from test_integrations_kdiffusion import SIGMAS, ListNoise, close, denoiser, start

FLOW_SIGMAS = torch.linspace(0.98, 0, 11, dtype=torch.float64)


def call(x, sigma):
    return denoiser(x, torch.full((x.shape[0],), float(sigma), dtype=x.dtype))


def d_of(x, sigma):
    return (x - call(x, sigma)) / sigma


def lcm_eq(x, sigmas, noise, flow=False, s_noise=1.0, s_noise_end=None):
    n = len(sigmas) - 1
    for i in range(n):
        s_next = float(sigmas[i + 1])
        x = call(x, sigmas[i])
        if s_next > 0:
            end = s_noise if s_noise_end is None else s_noise_end
            w = s_noise + (end - s_noise) * (i / (n - 1))
            x = ((1 - s_next) * x if flow else x) + s_next * w * noise(sigmas[i], s_next)
    return x


def heunpp2_eq(x, sigmas):
    sig = [float(v) for v in sigmas]
    for i in range(len(sig) - 1):
        d, dt = d_of(x, sig[i]), sig[i + 1] - sig[i]
        if sig[i + 1] == sig[-1]:
            x = x + d * dt
            continue
        x1 = x + d * dt
        d1 = d_of(x1, sig[i + 1])
        if sig[i + 2] == sig[-1]:
            w1 = sig[i + 1] / (2 * sig[0])
            x = x + ((1 - w1) * d + w1 * d1) * dt
            continue
        x2 = x1 + d1 * (sig[i + 2] - sig[i + 1])
        d2 = d_of(x2, sig[i + 2])
        w1, w2 = sig[i + 1] / (3 * sig[0]), sig[i + 2] / (3 * sig[0])
        x = x + ((1 - w1 - w2) * d + w1 * d1 + w2 * d2) * dt
    return x


def gradient_estimation_eq(x, sigmas, gamma=2.0):
    d_prev = None
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        d = d_of(x, s)
        if s_next == 0:
            x = x - s * d
        else:
            x = x + d * (s_next - s)
            if d_prev is not None:
                x = x + (gamma - 1) * (d - d_prev) * (s_next - s)
        d_prev = d
    return x


def seeds_eq(x, sigmas, rs, weights, eta, noise, s_noise=1.0):
    """The exponential Runge-Kutta stages of SEEDS in lambda = -log sigma (data prediction, VE scale): stage k at
    sigma e^{-r_k h}, x_k = e^{-r_k h (1 + eta)} x + sigma_k (sum_j A_kj(h) D_j) / sigma_k + sigma_k s_noise W_k,
    with W the Ornstein-Uhlenbeck path over the stages; weights(he) -> the rows A (one per stage after the first
    and x'), each a list of the weights of D_0, D_1, ..."""
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        D = [call(x, s)]
        if s_next == 0:
            x = D[0]
            continue
        h = math.log(s / s_next)
        he = h * (1 + eta)
        grid = [0.0, *rs, 1.0]
        W = torch.zeros_like(x)
        for k, row in enumerate(weights(he), start=1):
            sk = s * math.exp(-grid[k] * h)
            dr = grid[k] - grid[k - 1]
            if eta > 0 and s_noise > 0:
                W = W * math.exp(-dr * h * eta) + math.sqrt(1 - math.exp(-2 * dr * h * eta)) * noise(
                    s * math.exp(-grid[k - 1] * h), sk)
            xk = math.exp(-grid[k] * he) * x + sum(a * Dj for a, Dj in zip(row, D)) + sk * s_noise * W
            if k == len(grid) - 1:
                x = xk
            else:
                D.append(call(xk, sk))
    return x


def phi1(u):  # u phi_1(-u)
    return 1 - math.exp(-u)


def phi2(u):  # u phi_2(-u)
    return (math.exp(-u) - 1 + u) / u


def seeds_2_weights(r, solver_type):
    def weights(he):
        first = [[phi1(r * he)]]
        if solver_type == "phi_1":
            return first + [[phi1(he) * (1 - 1 / (2 * r)), phi1(he) / (2 * r)]]
        return first + [[phi1(he) - phi2(he) / r, phi2(he) / r]]
    return weights


def seeds_3_weights(r1, r2):
    def weights(he):
        a = r2 / r1 * phi2(r2 * he)
        return [[phi1(r1 * he)], [phi1(r2 * he) - a, a], [phi1(he) - phi2(he) / r2, 0.0, phi2(he) / r2]]
    return weights


def test_lcm_is_its_equation():
    x = start()
    got = K.sample_lcm(denoiser, x, SIGMAS, disable=True, noise_sampler=ListNoise(x.shape, 12))
    assert close(got, lcm_eq(x, SIGMAS, ListNoise(x.shape, 12)))
    got = K.sample_lcm(denoiser, x, SIGMAS, disable=True, noise_sampler=ListNoise(x.shape, 12), s_noise=0.5,
                       s_noise_end=1.5)
    assert close(got, lcm_eq(x, SIGMAS, ListNoise(x.shape, 12), s_noise=0.5, s_noise_end=1.5))
    xf = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = K.sample_lcm_RF(denoiser, xf, FLOW_SIGMAS, disable=True, noise_sampler=ListNoise(x.shape, 12))
    assert close(got, lcm_eq(xf, FLOW_SIGMAS, ListNoise(x.shape, 12), flow=True))


def test_lcm_noise_clip():
    x = start()
    noise = ListNoise(x.shape, 12)
    got = K.sample_lcm(denoiser, x, SIGMAS, disable=True, noise_sampler=noise, noise_clip_std=0.5)
    clipped = ListNoise(x.shape, 12)
    clipped.draws = [z.clamp(-0.5 * float(z.std()), 0.5 * float(z.std())) for z in clipped.draws]
    assert close(got, lcm_eq(x, SIGMAS, clipped))


def test_heunpp2_is_its_equation():
    x = start()
    calls = []
    counted = lambda x, sigma: calls.append(1) or denoiser(x, sigma)  # noqa: E731
    got = K.sample_heunpp2(counted, x, SIGMAS, disable=True)
    assert close(got, heunpp2_eq(x, SIGMAS))
    assert len(calls) == 3 * (len(SIGMAS) - 3) + 2 + 1


def test_gradient_estimation_is_its_equation():
    x = start()
    for gamma in (2.0, 1.5):
        got = K.sample_gradient_estimation(denoiser, x, SIGMAS, disable=True, ge_gamma=gamma)
        assert close(got, gradient_estimation_eq(x, SIGMAS, gamma))


@pytest.mark.parametrize("eta, s_noise, r, solver_type", [(0.0, 1.0, 0.5, "phi_1"), (1.0, 1.0, 0.5, "phi_1"),
                                                          (0.7, 0.8, 0.4, "phi_2"), (1.0, 1.0, 1.0, "phi_2")])
def test_seeds_2_is_its_equation(eta, s_noise, r, solver_type):
    x = start()
    got = K.sample_seeds_2(denoiser, x, SIGMAS, disable=True, eta=eta, s_noise=s_noise, r=r,
                           solver_type=solver_type, noise_sampler=ListNoise(x.shape, 30))
    want = seeds_eq(x, SIGMAS, [r], seeds_2_weights(r, solver_type), eta, ListNoise(x.shape, 30), s_noise)
    assert close(got, want)


@pytest.mark.parametrize("eta, s_noise, r_1, r_2", [(0.0, 1.0, 1 / 3, 2 / 3), (1.0, 1.0, 1 / 3, 2 / 3),
                                                    (0.5, 0.7, 0.25, 0.6)])
def test_seeds_3_is_its_equation(eta, s_noise, r_1, r_2):
    x = start()
    got = K.sample_seeds_3(denoiser, x, SIGMAS, disable=True, eta=eta, s_noise=s_noise, r_1=r_1, r_2=r_2,
                           noise_sampler=ListNoise(x.shape, 40))
    want = seeds_eq(x, SIGMAS, [r_1, r_2], seeds_3_weights(r_1, r_2), eta, ListNoise(x.shape, 40), s_noise)
    assert close(got, want)


def test_exp_heun_2_x0_is_seeds_2_at_r_1():
    x = start()
    want = seeds_eq(x, SIGMAS, [1.0], seeds_2_weights(1.0, "phi_2"), 0.0, None)
    assert close(K.sample_exp_heun_2_x0(denoiser, x, SIGMAS, disable=True), want)
    got = K.sample_exp_heun_2_x0_sde(denoiser, x, SIGMAS, disable=True, eta=0.6, noise_sampler=ListNoise(x.shape, 30))
    assert close(got, seeds_eq(x, SIGMAS, [1.0], seeds_2_weights(1.0, "phi_2"), 0.6, ListNoise(x.shape, 30)))


def test_seeds_2_without_noise_is_dpmpp_2s():
    """SEEDS-2's ODE step with r = 1/2 and phi_1 weights is DPM-Solver++(2S): x' = (sigma'/sigma) x + (1 -
    sigma'/sigma) D_mid."""
    x = start()
    got = K.sample_seeds_2(denoiser, x, SIGMAS, disable=True, eta=0.0)
    assert close(got, K.sample_dpmpp_2s_ancestral(denoiser, x, SIGMAS, disable=True, eta=0.0))


def test_fused_float32():
    """The fused CPU kernel (float32) gives the float64 equations' numbers."""
    x = start()
    xf = x.float()
    model = lambda x, s: denoiser(x, s)  # noqa: E731

    def noise(n):
        draws = ListNoise(x.shape, n)
        return lambda s, s_next: draws(s, s_next).float()
    cases = [(K.sample_lcm(model, xf, SIGMAS.float(), disable=True, noise_sampler=noise(12)),
              lcm_eq(x, SIGMAS.float().double(), ListNoise(x.shape, 12))),
             (K.sample_heunpp2(model, xf, SIGMAS.float(), disable=True), heunpp2_eq(x, SIGMAS.float().double())),
             (K.sample_gradient_estimation(model, xf, SIGMAS.float(), disable=True),
              gradient_estimation_eq(x, SIGMAS.float().double())),
             (K.sample_seeds_3(model, xf, SIGMAS.float(), disable=True, noise_sampler=noise(40)),
              seeds_eq(x, SIGMAS.float().double(), [1 / 3, 2 / 3], seeds_3_weights(1 / 3, 2 / 3), 1.0,
                       ListNoise(x.shape, 40)))]
    cases += [(K.sample_dpm_fast(model, xf, 0.03, 14.6, 9, disable=True), dpm_fast_eq(x, 0.03, 14.6, 9)),
              (K.sample_deis(model, xf, SIGMAS.float(), disable=True), deis_eq(x, SIGMAS.float().double(), 3, "tab"))]
    for got, want in cases:
        assert got.dtype == torch.float32 and close(got.double(), want, 1e-5)
    # the embedded pair in the state rows; the step sizes follow the float32 error estimates
    got = K.sample_dpm_adaptive(model, xf, 0.03, 14.6, disable=True)
    assert got.dtype == torch.float32 and close(got.double(), dpm_adaptive_eq(x, 0.03, 14.6)[0], 1e-4)


TARGET = GaussianMixture.random(dim=8, modes=3, seed=2)


def exact(x, sigma):
    return TARGET.posterior_mean(x, torch.ones_like(sigma), sigma)


def grid(n):
    return K.get_sigmas_karras(n, 0.02, 20.0).double()


X0 = torch.randn(64, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@functools.lru_cache(maxsize=1)
def reference():
    return K.sample_heun(exact, X0 * grid(2000)[0], grid(2000), disable=True)


def ode_errors(fn, steps, **kw):
    x0, ref = X0, reference()
    errors = []
    for n in steps:
        s = grid(n)
        errors.append(float((fn(exact, x0 * s[0], s, disable=True, **kw) - ref).norm() / ref.norm()))
    return errors


def orders(errors):
    return [math.log(errors[k] / errors[k + 1]) / math.log(2) for k in range(len(errors) - 1)]


@pytest.mark.parametrize("fn, kw, steps, band", [
    (K.sample_seeds_2, dict(eta=0.0), (20, 40, 80), (1.7, 2.3)),
    (K.sample_seeds_2, dict(eta=0.0, r=1.0, solver_type="phi_2"), (20, 40, 80), (1.7, 2.3)),
    (K.sample_seeds_3, dict(eta=0.0), (20, 40, 80), (2.5, 3.4)),
    (K.sample_gradient_estimation, dict(ge_gamma=1.5), (20, 40, 80), (1.7, 2.3)),  # Adams-Bashforth 2's weights
    (K.sample_gradient_estimation, {}, (40, 80, 160), (0.8, 1.3)),  # gamma = 2 extrapolates d to sigma'
    (K.sample_heunpp2, {}, (40, 80, 160), (0.8, 1.3)),  # its weights tend to Euler's as sigma / sigma_0 -> 0
    (K.sample_deis, dict(max_order=2), (20, 40, 80), (1.7, 2.3)),
    (K.sample_deis, dict(max_order=3), (20, 40, 80), (2.3, 3.4)),
    (K.sample_deis, dict(max_order=3, deis_mode="rhoab"), (20, 40, 80), (2.3, 3.4)),
])
def test_ode_order(fn, kw, steps, band):
    p = orders(ode_errors(fn, steps, **kw))
    assert all(band[0] < v < band[1] for v in p), p


def test_bad_input():
    x = start()
    with pytest.raises(ValueError, match="solver_type"):
        K.sample_seeds_2(denoiser, x, SIGMAS, disable=True, solver_type="phi_3")
    with pytest.raises(ValueError, match="r_1"):
        K.sample_seeds_3(denoiser, x, SIGMAS, disable=True, r_1=0.7, r_2=0.5)
    with pytest.raises(ValueError, match="r"):
        K.sample_seeds_2(denoiser, x, SIGMAS, disable=True, r=0.0)
    with pytest.raises(ValueError, match="eta"):
        K.sample_seeds_3(denoiser, x, SIGMAS, disable=True, eta=-1.0)
    with pytest.raises(ValueError, match="ge_gamma"):
        K.sample_gradient_estimation(denoiser, x, SIGMAS, disable=True, ge_gamma=float("nan"))
    with pytest.raises(ValueError, match="s_noise_end"):
        K.sample_lcm(denoiser, x, SIGMAS, disable=True, s_noise_end=-1.0)
    with pytest.raises(ValueError, match="noise_clip_std"):
        K.sample_lcm(denoiser, x, SIGMAS, disable=True, noise_clip_std=-1.0)
    with pytest.raises(ValueError, match="sigmas"):
        K.sample_lcm_RF(denoiser, x, SIGMAS, disable=True)  # flow sigmas are in [0, 1]
    with pytest.raises(ValueError, match="s_churn"):
        K.sample_heunpp2(denoiser, x, SIGMAS, disable=True, s_churn=-1.0)
    with pytest.raises(ValueError, match="sigmas"):
        K.sample_seeds_2(denoiser, x, torch.tensor([2.0, 2.0, 0.0]), disable=True)  # steps in log sigma


def guided(x, sigma, scale=3.0):
    """A CFG++ model: (the guided D = U + scale (C - U), the unconditional U) of two denoisers."""
    uncond, cond = denoiser(x, sigma), denoiser(x, sigma, scale=1.3)
    return uncond + scale * (cond - uncond), uncond


def euler_cfg_pp_eq(x, sigmas, eta=0.0, noise=None, s_noise=1.0):
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        D, U = guided(x, torch.full((x.shape[0],), s, dtype=x.dtype))
        up = min(s_next, eta * math.sqrt(s_next**2 * (s**2 - s_next**2) / s**2))
        x = D + math.sqrt(s_next**2 - up**2) * (x - U) / s
        if up > 0:
            x = x + s_noise * up * noise(s, s_next)
    return x


def test_euler_ancestral_cfg_pp_is_its_equation():
    x = start()
    got = K.sample_euler_ancestral_cfg_pp(guided, x, SIGMAS, disable=True, eta=0.8, s_noise=0.9,
                                          noise_sampler=ListNoise(x.shape, 12))
    assert close(got, euler_cfg_pp_eq(x, SIGMAS, 0.8, ListNoise(x.shape, 12), 0.9))
    assert close(K.sample_euler_ancestral_cfg_pp(guided, x, SIGMAS, disable=True, eta=0.0),
                 K.sample_euler_cfg_pp(guided, x, SIGMAS, disable=True))


def dpmpp_2s_ancestral_cfg_pp_eq(x, sigmas, eta=1.0, noise=None, s_noise=1.0):
    """ComfyUI's sample_dpmpp_2s_ancestral_cfg_pp written out (t = -log sigma, r = 1/2)."""
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        D, U = guided(x, torch.full((x.shape[0],), s, dtype=x.dtype))
        up = min(s_next, eta * math.sqrt(s_next**2 * (s**2 - s_next**2) / s**2))
        down = math.sqrt(s_next**2 - up**2)
        if down == 0:
            x = D
        else:
            t, t_next = -math.log(s), -math.log(down)
            h = t_next - t
            s_mid = math.exp(-(t + 0.5 * h))
            x2 = (s_mid / s) * (x + (D - U)) - math.expm1(-0.5 * h) * D
            D2, _ = guided(x2, torch.full((x.shape[0],), s_mid, dtype=x.dtype))
            x = (down / s) * (x + (D - U)) - math.expm1(-h) * D2
        if s_next > 0:
            x = x + noise(s, s_next) * s_noise * up
    return x


def test_dpmpp_2s_ancestral_cfg_pp_is_its_equation():
    x = start()
    for eta in (1.0, 0.5, 0.0):
        got = K.sample_dpmpp_2s_ancestral_cfg_pp(guided, x, SIGMAS, disable=True, eta=eta, s_noise=0.9,
                                                 noise_sampler=ListNoise(x.shape, 12))
        assert close(got, dpmpp_2s_ancestral_cfg_pp_eq(x, SIGMAS, eta, ListNoise(x.shape, 12), 0.9)), eta
    xf = x.float()
    got = K.sample_dpmpp_2s_ancestral_cfg_pp(guided, xf, SIGMAS.float(), disable=True, eta=0.0)  # the fused kernel
    want = dpmpp_2s_ancestral_cfg_pp_eq(x, SIGMAS.float().double(), 0.0, ListNoise(x.shape, 12))
    assert close(got.double(), want, 1e-5)


def dpmpp_2m_cfg_pp_eq(x, sigmas):
    U_prev = None
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        D, U = guided(x, torch.full((x.shape[0],), s, dtype=x.dtype))
        if s_next == 0:
            x = D
        else:
            h = math.log(s / s_next)
            x = math.exp(-h) * (x - U) + D
            if U_prev is not None:
                r = math.log(float(sigmas[i - 1]) / s) / h
                x = x - math.expm1(-h) / (2 * r) * (D - U_prev)
        U_prev = U
    return x


def test_cfg_pp_is_its_equation():
    x = start()
    seen = []
    got = K.sample_euler_cfg_pp(guided, x, SIGMAS, disable=True, callback=lambda info: seen.append(info["denoised"]))
    assert close(got, euler_cfg_pp_eq(x, SIGMAS))
    assert len(seen) == len(SIGMAS) - 1 and close(seen[-1], got)  # the guided D, x' = D into sigma' = 0
    assert close(K.sample_dpmpp_2m_cfg_pp(guided, x, SIGMAS, disable=True), dpmpp_2m_cfg_pp_eq(x, SIGMAS))
    xf = x.float()
    got = K.sample_dpmpp_2m_cfg_pp(guided, xf, SIGMAS.float(), disable=True)  # the fused CPU kernel
    assert got.dtype == torch.float32 and close(got.double(), dpmpp_2m_cfg_pp_eq(x, SIGMAS.float().double()), 1e-5)


def gradient_estimation_cfg_pp_eq(x, sigmas, gamma=2.0):
    d_prev = None
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        D, U = guided(x, torch.full((x.shape[0],), s, dtype=x.dtype))
        d = (x - U) / s
        if s_next == 0:
            x = D
        else:
            x = D + d * s_next
            if d_prev is not None:
                x = x + (gamma - 1) * (d - d_prev) * (s_next - s)
        d_prev = d
    return x


def test_gradient_estimation_cfg_pp_is_its_equation():
    x = start()
    for gamma in (2.0, 1.5):
        got = K.sample_gradient_estimation_cfg_pp(guided, x, SIGMAS, disable=True, ge_gamma=gamma)
        assert close(got, gradient_estimation_cfg_pp_eq(x, SIGMAS, gamma))
    plain = lambda x, sigma: (denoiser(x, sigma), denoiser(x, sigma))  # noqa: E731
    assert close(K.sample_gradient_estimation(plain, x, SIGMAS, disable=True, cfg_pp=True),
                 K.sample_gradient_estimation(denoiser, x, SIGMAS, disable=True))


def res_multistep_cfg_pp_eq(x, sigmas, eta=0.0, noise=None):
    """ComfyUI's RES multistep CFG++: the exponential second-order step of U from x + D - U (Zhang et al.'s
    b1 = phi_1 - phi_2 / c2, b2 = phi_2 / c2), the Euler step x' = D + sigma_down (x - U) / sigma."""
    U_prev, prev = None, None
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        D, U = guided(x, torch.full((x.shape[0],), s, dtype=x.dtype))
        up = min(s_next, eta * math.sqrt(s_next**2 * (s**2 - s_next**2) / s**2))
        down = math.sqrt(s_next**2 - up**2)
        if down == 0 or U_prev is None:
            x = D + down * (x - U) / s
        else:
            h = math.log(s / down)
            c2 = (math.log(prev[1]) - math.log(prev[0])) / h  # (t_prev - t_prev_down) / h, t = -log sigma
            phi1, phi2 = -math.expm1(-h) / h, (-math.expm1(-h) / h - 1) / -h
            x = math.exp(-h) * (x + D - U) + h * ((phi1 - phi2 / c2) * U + phi2 / c2 * U_prev)
        if s_next > 0 and up > 0:
            x = x + up * noise(s, s_next)
        U_prev, prev = U, (s, down)
    return x


def test_res_multistep_cfg_pp_is_its_equation():
    x = start()
    assert close(K.sample_res_multistep_cfg_pp(guided, x, SIGMAS, disable=True), res_multistep_cfg_pp_eq(x, SIGMAS))
    got = K.sample_res_multistep_ancestral_cfg_pp(guided, x, SIGMAS, disable=True, eta=0.7,
                                                  noise_sampler=ListNoise(x.shape, 12))
    assert close(got, res_multistep_cfg_pp_eq(x, SIGMAS, 0.7, ListNoise(x.shape, 12)))


def test_cfg_pp_without_guidance_is_the_plain_sampler():
    """With D = U (scale 0) CFG++ is the plain sampler."""
    x = start()
    plain = lambda x, sigma: (denoiser(x, sigma), denoiser(x, sigma))  # noqa: E731
    assert close(K.sample_euler_cfg_pp(plain, x, SIGMAS, disable=True),
                 K.sample_euler(denoiser, x, SIGMAS, disable=True))
    assert close(K.sample_dpmpp_2m_cfg_pp(plain, x, SIGMAS, disable=True),
                 K.sample_dpmpp_2m(denoiser, x, SIGMAS, disable=True))
    assert close(K.sample_res_multistep_cfg_pp(plain, x, SIGMAS, disable=True),
                 K.sample_res_multistep(denoiser, x, SIGMAS, disable=True))


def test_cfg_pp_bad_model():
    with pytest.raises(ValueError, match="uncond_denoised"):
        K.sample_euler_cfg_pp(denoiser, start(), SIGMAS, disable=True)


def dpm_solver_eq(x, t, t_next, order, r1=None):
    """k-diffusion's DPMSolver steps (Lu et al. 2022) in t = -log sigma with eps = (x - D) / sigma."""
    sig = lambda t: math.exp(-t)  # noqa: E731
    eps = lambda x, t: d_of(x, sig(t))  # noqa: E731
    h = t_next - t
    e0 = eps(x, t)
    if order == 1:
        return x - sig(t_next) * math.expm1(h) * e0
    r1 = r1 or (1 / 2 if order == 2 else 1 / 3)
    u1 = x - sig(t + r1 * h) * math.expm1(r1 * h) * e0
    e1 = eps(u1, t + r1 * h)
    if order == 2:
        return x - sig(t_next) * math.expm1(h) * e0 - sig(t_next) / (2 * r1) * math.expm1(h) * (e1 - e0)
    r2 = 2 / 3
    u2 = x - sig(t + r2 * h) * math.expm1(r2 * h) * e0 - sig(t + r2 * h) * (r2 / r1) * (
        math.expm1(r2 * h) / (r2 * h) - 1) * (e1 - e0)
    e2 = eps(u2, t + r2 * h)
    return x - sig(t_next) * math.expm1(h) * e0 - sig(t_next) / r2 * (math.expm1(h) / h - 1) * (e2 - e0)


def dpm_fast_eq(x, sigma_min, sigma_max, n, eta=0.0, noise=None):
    m = n // 3 + 1
    orders = [3] * (m - 2) + [2, 1] if n % 3 == 0 else [3] * (m - 1) + [n % 3]
    ts = torch.linspace(-math.log(sigma_max), -math.log(sigma_min), m + 1, dtype=torch.float64).tolist()
    for i, order in enumerate(orders):
        s, s_next = math.exp(-ts[i]), math.exp(-ts[i + 1])
        down, up = s_next, 0.0
        if eta:
            up0 = min(s_next, eta * math.sqrt(s_next**2 * (s**2 - s_next**2) / s**2))
            down = max(math.sqrt(s_next**2 - up0**2), sigma_min)
            up = math.sqrt(max(s_next**2 - down**2, 0.0))
        x = dpm_solver_eq(x, ts[i], -math.log(down), order)
        if eta:
            x = x + up * noise(s, s_next)
    return x


@pytest.mark.parametrize("n", [1, 2, 3, 7, 9, 10])
def test_dpm_fast_is_its_equation(n):
    x = start()
    calls = []
    counted = lambda x, sigma: calls.append(1) or denoiser(x, sigma)  # noqa: E731
    got = K.sample_dpm_fast(counted, x, 0.03, 14.6, n, disable=True)
    assert close(got, dpm_fast_eq(x, 0.03, 14.6, n)) and len(calls) == n
    got = K.sample_dpm_fast(denoiser, x, 0.03, 14.6, n, disable=True, eta=0.8, noise_sampler=ListNoise(x.shape, 9))
    assert close(got, dpm_fast_eq(x, 0.03, 14.6, n, eta=0.8, noise=ListNoise(x.shape, 9)))


def dpm_adaptive_eq(x, sigma_min, sigma_max, order=3, rtol=0.05, atol=0.0078, h=0.05, pid=(0.0, 1.0, 0.0),
                    safety=0.81, eta=0.0, noise=None):
    """k-diffusion's adaptive DPM-Solver written out: the embedded pair, the error norm and its PID controller."""
    k = 1.5 if eta else order
    b = [(pid[0] + pid[1] + pid[2]) / k, -(pid[0] + 2 * pid[2]) / k, pid[2] / k]
    errs, s, t_end, x_prev = None, -math.log(sigma_max), -math.log(sigma_min), x
    info = dict(n_accept=0, n_reject=0)
    while s < t_end - 1e-5:
        t = min(t_end, s + h)
        t_to, up = t, 0.0
        if eta:
            sig, sig_next = math.exp(-s), math.exp(-t)
            up0 = min(sig_next, eta * math.sqrt(sig_next**2 * (sig**2 - sig_next**2) / sig**2))
            t_to = min(t_end, -math.log(math.sqrt(sig_next**2 - up0**2)))
            up = math.sqrt(max(sig_next**2 - math.exp(-2 * t_to), 0.0))
        if order == 2:
            low, high = dpm_solver_eq(x, s, t_to, 1), dpm_solver_eq(x, s, t_to, 2)
        else:
            low, high = dpm_solver_eq(x, s, t_to, 2, r1=1 / 3), dpm_solver_eq(x, s, t_to, 3)
        delta = torch.maximum(torch.tensor(atol, dtype=x.dtype), rtol * torch.maximum(low.abs(), x_prev.abs()))
        inv = 1 / (float(torch.linalg.norm((low - high) / delta)) / x.numel() ** 0.5 + 1e-8)
        errs = [inv, inv, inv] if errs is None else [inv, errs[1], errs[2]]
        factor = 1 + math.atan(errs[0] ** b[0] * errs[1] ** b[1] * errs[2] ** b[2] - 1)
        h *= factor
        if factor >= safety:
            errs = [errs[0], errs[0], errs[1]]
            x_prev, x, s = low, high + (up * noise(math.exp(-s), math.exp(-t)) if eta else 0), t
            info["n_accept"] += 1
        else:
            info["n_reject"] += 1
    return x, info


@pytest.mark.parametrize("order, kw", [(3, {}), (2, {}), (3, dict(rtol=0.01, atol=0.001, h_init=0.5)),
                                       (3, dict(pcoeff=0.3, icoeff=0.6, dcoeff=0.2, h_init=1.0))])
def test_dpm_adaptive_is_its_equation(order, kw):
    x = start()
    got, info = K.sample_dpm_adaptive(denoiser, x, 0.03, 14.6, disable=True, order=order, return_info=True, **kw)
    eq_kw = dict(rtol=kw.get("rtol", 0.05), atol=kw.get("atol", 0.0078), h=kw.get("h_init", 0.05),
                 pid=(kw.get("pcoeff", 0.0), kw.get("icoeff", 1.0), kw.get("dcoeff", 0.0)))
    want, want_info = dpm_adaptive_eq(x, 0.03, 14.6, order, **eq_kw)
    assert close(got, want) and info["n_accept"] == want_info["n_accept"] and \
        info["n_reject"] == want_info["n_reject"] and info["nfe"] == order * info["steps"], (info, want_info)
    assert close(K.sample_dpm_adaptive(denoiser, x, 0.03, 14.6, disable=True, order=order, **kw), got, 0)


def test_dpm_adaptive_with_noise():
    x = start()
    got = K.sample_dpm_adaptive(denoiser, x, 0.03, 14.6, disable=True, eta=0.7, noise_sampler=ListNoise(x.shape, 99))
    want, _ = dpm_adaptive_eq(x, 0.03, 14.6, eta=0.7, noise=ListNoise(x.shape, 99))
    assert close(got, want)


def test_dpm_bad_input():
    x = start()
    with pytest.raises(ValueError, match="sigma_min"):
        K.sample_dpm_fast(denoiser, x, 0.0, 14.6, 10, disable=True)
    with pytest.raises(ValueError, match="sigma_min must be below"):
        K.sample_dpm_adaptive(denoiser, x, 14.6, 0.03, disable=True)
    with pytest.raises(ValueError, match="n"):
        K.sample_dpm_fast(denoiser, x, 0.03, 14.6, 0, disable=True)
    with pytest.raises(ValueError, match="order"):
        K.sample_dpm_adaptive(denoiser, x, 0.03, 14.6, disable=True, order=1)
    with pytest.raises(ValueError, match="h_init"):
        K.sample_dpm_adaptive(denoiser, x, 0.03, 14.6, disable=True, h_init=0.0)
    with pytest.raises(ValueError, match="atol"):
        K.sample_dpm_adaptive(denoiser, x, 0.03, 14.6, disable=True, atol=0.0)


def test_dpm_adaptive_tolerance_and_order():
    """Tighter tolerances take more steps and land closer to the exact ODE solution; DPM-Solver-fast is third order."""
    x = X0 * 20.0
    ref = K.sample_heun(exact, x, grid(3000)[:-1], disable=True)
    err = lambda y: float((y - ref).norm() / ref.norm())  # noqa: E731
    loose, info_loose = K.sample_dpm_adaptive(exact, x, 0.02, 20.0, disable=True, return_info=True)
    tight, info_tight = K.sample_dpm_adaptive(exact, x, 0.02, 20.0, disable=True, rtol=1e-3, atol=1e-4,
                                              return_info=True)
    assert info_tight["n_accept"] > info_loose["n_accept"] and err(tight) < err(loose) / 10
    p = orders([err(K.sample_dpm_fast(exact, x, 0.02, 20.0, n, disable=True)) for n in (29, 59, 119)])
    assert all(2.6 < v < 3.5 for v in p), p


def deis_eq(x, sigmas, max_order, mode):
    """DEIS's AB step x' = x + int d dsigma with d the Lagrange polynomial through the last derivatives, in the
    VP time of the linear-beta schedule through sigma(1e-3) = 0.002, sigma(1) = 80 ('tab') or in sigma
    ('rhoab'), integrated over sigma by scipy's quad."""
    from scipy.integrate import quad

    bd = 2 * (math.log(0.002**2 + 1) / 1e-3 - math.log(80.0**2 + 1)) / (1e-3 - 1)
    bm = math.log(80.0**2 + 1) - bd / 2  # sigma(tau) = sqrt(e^{bd tau^2 / 2 + bm tau} - 1), inverted:
    tau_of = lambda s: (math.sqrt(bm**2 + 2 * bd * math.log(s**2 + 1)) - bm) / bd  # noqa: E731
    var = tau_of if mode == "tab" else (lambda s: s)
    sig = [float(v) for v in sigmas]
    ds = []
    for i in range(len(sig) - 1):
        ds.insert(0, d_of(x, sig[i]))
        k = 1 if sig[i + 1] == 0 else min(i + 1, max_order)
        nodes = [var(sig[i - j]) for j in range(k)]
        for j in range(k):
            basis = lambda u, j=j: math.prod((u - n) / (nodes[j] - n) for l, n in enumerate(nodes) if l != j)  # noqa
            c = quad(lambda s: basis(var(s)), sig[i], sig[i + 1], epsabs=0, epsrel=1e-13)[0]  # d sigma
            x = x + c * ds[j]
    return x


@pytest.mark.parametrize("max_order, mode", [(3, "tab"), (2, "tab"), (4, "tab"), (3, "rhoab")])
def test_deis_is_its_equation(max_order, mode):
    x = start()
    got = K.sample_deis(denoiser, x, SIGMAS, disable=True, max_order=max_order, deis_mode=mode)
    assert close(got, deis_eq(x, SIGMAS, max_order, mode))


def test_deis_bad_input():
    x = start()
    with pytest.raises(ValueError, match="deis_mode"):
        K.sample_deis(denoiser, x, SIGMAS, disable=True, deis_mode="bogus")
    with pytest.raises(ValueError, match="max_order"):
        K.sample_deis(denoiser, x, SIGMAS, disable=True, max_order=5)


@pytest.mark.parametrize("sampler", ["sample_lcm", "sample_heunpp2", "sample_gradient_estimation", "sample_seeds_2",
                                     "sample_seeds_3", "sample_deis", "sample_euler_cfg_pp",
                                     "sample_dpmpp_2m_cfg_pp", "sample_gradient_estimation_cfg_pp",
                                     "sample_res_multistep_cfg_pp"])
def test_calling_convention(sampler):
    """model(x, sigma * s_in, **extra_args); one callback dict per step, with the guided D for CFG++."""
    seen = []
    model = guided if "cfg_pp" in sampler else denoiser
    got = getattr(K, sampler)(model, start().float(), SIGMAS.float(), extra_args={"scale": 0.9}, disable=True,
                              callback=seen.append)
    assert [d["i"] for d in seen] == list(range(len(SIGMAS) - 1))
    assert set(seen[0]) == {"x", "i", "sigma", "sigma_hat", "denoised"} and seen[0]["sigma"] == float(SIGMAS[0])
    assert got.dtype == torch.float32 and torch.isfinite(got).all()


def test_dpm_fast_callback():
    """k-diffusion's DPMSolver callback: per step, with t = -log sigma."""
    seen = []
    K.sample_dpm_fast(denoiser, start(), 0.03, 14.6, 7, disable=True, callback=seen.append)
    assert [d["i"] for d in seen] == [0, 1, 2] and {"t", "t_up", "sigma", "denoised"} <= set(seen[0])
