"""k-diffusion-style samplers: k-diffusion's published update equations, and the equivalent diffusers
configurations (k-diffusion itself cannot be installed beside the CPU torch)."""

import math

import pytest
import torch

import diffsampler as ds
from diffsampler.integrations import kdiffusion as K
from diffsampler.solvers.dpm import dpm_steps
from diffsampler.solvers.grid import Grid

SIGMAS = K.get_sigmas_karras(12, 0.03, 14.6).double()


def denoiser(x, sigma, scale=1.0):
    """A deterministic nonlinear denoiser in k-diffusion's convention: x = x0 + sigma eps, returns x0."""
    w = torch.linspace(-0.4, 0.4, 16, dtype=x.dtype).reshape(4, 4)
    x_in = x / (sigma.view(-1, 1, 1, 1) ** 2 + 1).sqrt()
    return scale * (0.8 * torch.tanh(torch.einsum("bchw,cd->bdhw", x_in, w)) + 0.1 * x_in)


def start(seed=1):
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * SIGMAS[0]


class ListNoise:
    """A noise_sampler(sigma, sigma_next) handing out a fixed list of draws in order."""

    def __init__(self, shape, n, seed=5):
        g = torch.Generator().manual_seed(seed)
        self.draws = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(n)]
        self.used = 0

    def __call__(self, sigma, sigma_next):
        self.used += 1
        return self.draws[self.used - 1]


def via_diffusers_form(x, algorithm, order, solver_type, noise=None):
    """The same sampler as diffusers' DPMSolverMultistepScheduler runs it (VP scale x_VP = alpha x), over the
    same sigmas: dpm_steps is checked against diffusers in test_sample.py."""
    grid = Grid(timesteps=tuple(range(len(SIGMAS) - 1)), sigmas=tuple(SIGMAS.tolist()))
    plan = dpm_steps(grid, "x0", algorithm=algorithm, order=order, solver_type=solver_type, lower_order_final=False,
                     phi3="k-diffusion")
    y = x * grid.alpha_sigma(0)[0]
    history = torch.empty(order, *x.shape, dtype=x.dtype)
    for i, step in enumerate(plan.steps):
        alpha = grid.alpha_sigma(i)[0]
        out = denoiser(y / alpha, torch.full((x.shape[0],), grid.sigmas[i], dtype=x.dtype))
        y = ds.ops.multistep_update(y, out, step.coeffs, history=history, write_slot=step.write_slot,
                                    read_slots=step.read_slots, noise=noise.draws[i] if step.needs_noise else None)
    return y


def close(a, b, tol=1e-10):
    return ((a - b).abs().max() / b.abs().max()).item() <= tol


def test_dpmpp_2m_is_diffusers_dpmsolver_plus_plus_2m():
    assert close(K.sample_dpmpp_2m(denoiser, start(), SIGMAS, disable=True),
                 via_diffusers_form(start(), "dpmsolver++", 2, "midpoint"))


@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
def test_dpmpp_2m_sde_is_diffusers_sde_dpmsolver_plus_plus_2m(solver_type):
    x = start()
    got = K.sample_dpmpp_2m_sde(denoiser, x, SIGMAS, disable=True, noise_sampler=ListNoise(x.shape, 12),
                                solver_type=solver_type)
    assert close(got, via_diffusers_form(x, "sde-dpmsolver++", 2, solver_type, ListNoise(x.shape, 12)))


def test_dpmpp_3m_sde_is_diffusers_form_with_the_exact_phi3():
    """k-diffusion's 3M SDE = diffusers' third-order SDE-DPM-Solver++ with heun second-order steps, except the
    phi_3 weight, where diffusers flips the sign of the 1/2 (see solvers/dpm.py): diffsampler's default
    ("k-diffusion") has the sign of the integral, which this also checks by quadrature."""
    from scipy.integrate import quad

    x = start()
    got = K.sample_dpmpp_3m_sde(denoiser, x, SIGMAS, disable=True, noise_sampler=ListNoise(x.shape, 12))
    assert close(got, via_diffusers_form(x, "sde-dpmsolver++", 3, "heun", ListNoise(x.shape, 12)))
    h = 0.7
    integral = quad(lambda u: 2 * math.exp(-2 * (h - u)) * u * u / 2, 0, h)[0] / h**2
    assert abs(integral - ((-math.expm1(-2 * h) - 2 * h) / (2 * h) ** 2 + 0.5)) < 1e-12


def _karras_euler(x, sigmas, s_churn=0.0, seed=None):
    """Karras et al. (2022) Algorithm 2 with Euler steps, written out in float64."""
    n = len(sigmas) - 1
    for i in range(n):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        gamma = min(s_churn / n, 2**0.5 - 1)
        sigma_hat = sigma * (1 + gamma)
        if gamma > 0:
            x = x + torch.randn_like(x) * math.sqrt(sigma_hat**2 - sigma**2)
        d = (x - denoiser(x, torch.full((x.shape[0],), sigma_hat, dtype=x.dtype))) / sigma_hat
        x = x + d * (sigma_next - sigma_hat)
    return x


def _karras_heun(x, sigmas):
    """Algorithm 2 with Heun steps (Euler into sigma = 0), written out in float64."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        d = (x - denoiser(x, torch.full((x.shape[0],), sigma, dtype=x.dtype))) / sigma
        x_euler = x + d * (sigma_next - sigma)
        if sigma_next == 0:
            x = x_euler
        else:
            d2 = (x_euler - denoiser(x_euler, torch.full((x.shape[0],), sigma_next, dtype=x.dtype))) / sigma_next
            x = x + (d + d2) / 2 * (sigma_next - sigma)
    return x


def test_euler_and_heun_follow_algorithm_2():
    assert close(K.sample_euler(denoiser, start(), SIGMAS, disable=True), _karras_euler(start(), SIGMAS))
    assert close(K.sample_heun(denoiser, start(), SIGMAS, disable=True), _karras_heun(start(), SIGMAS))


def _dpmpp_sde_by_the_equations(x, sigmas, eta, noise, r=0.5):
    """DPM-Solver++ (stochastic) of k-diffusion, written out in float64 (t = -log sigma)."""
    def ancestral(s_from, s_to):
        up = min(s_to, eta * (s_to**2 * (s_from**2 - s_to**2) / s_from**2) ** 0.5)
        return (s_to**2 - up**2) ** 0.5, up

    call = lambda y, s: denoiser(y, torch.full((y.shape[0],), s, dtype=y.dtype))
    for i in range(len(sigmas) - 1):
        s0, s1 = float(sigmas[i]), float(sigmas[i + 1])
        d = call(x, s0)
        if s1 == 0:
            x = x + (x - d) / s0 * (s1 - s0)
            continue
        s_mid = math.exp(-(-math.log(s0) + r * (math.log(s0) - math.log(s1))))
        down, up = ancestral(s0, s_mid)
        x2 = down / s0 * x - math.expm1(math.log(down) - math.log(s0)) * d + noise(s0, s_mid) * up
        d2 = call(x2, s_mid)
        down, up = ancestral(s0, s1)
        dd = (1 - 1 / (2 * r)) * d + 1 / (2 * r) * d2
        x = down / s0 * x - math.expm1(math.log(down) - math.log(s0)) * dd + noise(s0, s1) * up
    return x


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_dpmpp_sde_follows_its_equations(eta):
    x = start()
    got = K.sample_dpmpp_sde(denoiser, x, SIGMAS, disable=True, eta=eta, noise_sampler=ListNoise(x.shape, 24))
    assert close(got, _dpmpp_sde_by_the_equations(x, SIGMAS, eta, ListNoise(x.shape, 24)))


def test_euler_churn_draws_the_same_noise():
    torch.manual_seed(3)
    got = K.sample_euler(denoiser, start(), SIGMAS, disable=True, s_churn=2.0)
    torch.manual_seed(3)
    assert close(got, _karras_euler(start(), SIGMAS, s_churn=2.0))


@pytest.mark.parametrize("sampler", ["sample_euler", "sample_heun", "sample_dpmpp_2m", "sample_dpmpp_2m_sde",
                                     "sample_dpmpp_3m_sde", "sample_dpmpp_sde", "sample_lms", "sample_ipndm",
                                     "sample_ipndm_v"])
def test_calling_convention(sampler):
    """model(x, sigma * s_in, **extra_args); callback dicts before each update; fp32 runs the fused kernel."""
    seen = []
    x = start().float()
    got = getattr(K, sampler)(denoiser, x, SIGMAS.float(), extra_args={"scale": 0.9}, disable=True,
                              callback=seen.append)
    assert [d["i"] for d in seen] == list(range(len(SIGMAS) - 1))
    assert set(seen[0]) == {"x", "i", "sigma", "sigma_hat", "denoised"} and seen[0]["sigma"] == float(SIGMAS[0])
    assert got.dtype == torch.float32 and torch.isfinite(got).all()


def test_sigma_helpers():
    n, lo, hi = 10, 0.02, 80.0
    k = K.get_sigmas_karras(n, lo, hi)
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    expected = (hi ** (1 / 7) + ramp * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7
    assert k.shape == (n + 1,) and k[-1] == 0 and torch.allclose(k[:-1].double(), expected, rtol=1e-6)
    e = K.get_sigmas_exponential(n, lo, hi)
    assert torch.allclose(e[:-1].log().diff(), e[:-1].log().diff()[0].expand(n - 1), rtol=1e-4) and e[-1] == 0
    v = K.get_sigmas_vp(n)
    assert v[-1] == 0 and torch.allclose(v[0], torch.tensor(math.sqrt(math.exp(19.9 / 2 + 0.1) - 1)))


def test_dpmpp_2m_on_the_gaussian_mixture_converges():
    """The exact denoiser of a Gaussian mixture: the error against a 400-step run falls with the steps."""
    target = ds.targets.GaussianMixture.random(dim=6, modes=3, seed=1)

    def exact(x, sigma):  # VE scale: x = x0 + sigma eps is VP with alpha = 1 / sqrt(1 + sigma^2)
        alpha = 1 / (1 + sigma.double() ** 2).sqrt()
        return target.posterior_mean(x * alpha[:, None], alpha, sigma.double() * alpha).to(x.dtype)

    x = torch.randn(256, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    run = lambda n: K.sample_dpmpp_2m(exact, x * 14.6, K.get_sigmas_karras(n, 0.03, 14.6).double(), disable=True)
    truth = run(400)
    errors = [(run(n) - truth).norm().item() for n in (8, 16, 32)]
    assert errors[0] > 2 * errors[1] > 4 * errors[2]
