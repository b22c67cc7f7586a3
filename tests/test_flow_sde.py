"""flow_sde (SiT's SDE sampler of flow models) and flow_smc.sde_step: against SiT's Sampler.sample_sde written out
in plain float64 torch in SiT's own time, the SDE's weak order on an exact Gaussian (moments propagated exactly
through the plan's coefficients: no Monte-Carlo noise), samples of exact mixtures, every backend, bad arguments."""

import dataclasses
import math

import numpy as np
import pytest
import torch

import diffsampler as ds
import diffsampler.flow_smc as F
from diffsampler.schedules import Flow
from diffsampler.solvers import make_plan
from diffsampler.targets import GaussianMixture, sliced_wasserstein

FORMS = ["constant", "sbdm", "sigma", "linear", "decreasing", "increasing-decreasing"]
LAST_STEPS = ["mean", "tweedie", "euler", None]


def flow_model(gm):
    """The exact velocity with the Flow solvers' model time (1000 t)."""
    m = gm.flow_model()
    return lambda x, t: m(x, t / 1000)


def sit_sample_sde(model, x, num_steps, form, norm, method, last_step, last_step_size, sample_eps, gen):
    """SiT's Sampler.sample_sde on its linear path (ICPlan) with a velocity model, in SiT's time tau (x = tau x1
    + (1 - tau) x0, x1 data, tau = 1 data): v_SiT = x1 - x0 = -(our velocity), score from the velocity, the
    diffusion forms of ICPlan.compute_diffusion, check_interval's t0 / t1, the Euler / Heun steps of
    integrators.sde and the last steps of Sampler.__get_last_step. Our model sees flow time 1 - tau as the Flow
    solvers pass it (float32 t times 1000). One change: Heun's first noise x + sqrt(2 D dt) z is drawn into x_T
    (x_T scaled by sqrt(1 + 2 D dt), the same law)."""
    def velocity(x, tau):
        return -model(x, torch.tensor(float(np.float32(1 - tau) * np.float32(1000)), dtype=torch.float64))

    def score(x, tau):  # reverse_alpha_ratio = alpha / alpha' = tau, var = sigma^2 - tau sigma' sigma = 1 - tau
        return (tau * velocity(x, tau) - x) / (1 - tau)

    def diffusion(tau):
        if form == "sbdm":  # norm (alpha'/alpha sigma^2 - sigma sigma'), alpha = tau, sigma = 1 - tau
            return norm * ((1 - tau) ** 2 / tau + (1 - tau))
        return {"constant": norm, "sigma": norm * (1 - tau), "linear": norm * (1 - tau),
                "decreasing": 0.25 * (norm * math.cos(math.pi * tau) + 1) ** 2,
                "increasing-decreasing": norm * math.sin(math.pi * tau) ** 2}[form]

    def drift(x, tau):
        return velocity(x, tau) + diffusion(tau) * score(x, tau)

    def randn():
        return torch.randn(x.shape, generator=gen, dtype=torch.float32).double()

    if last_step is None:
        last_step_size = 0.0
    t0 = sample_eps if form == "sbdm" else 0.0
    t1 = 1 - sample_eps if last_step_size == 0 else 1 - last_step_size
    ts = torch.linspace(t0, t1, num_steps, dtype=torch.float64).tolist()
    dt = ts[1] - ts[0]
    for i, tau in enumerate(ts[:-1]):
        if method == "euler":
            dw = randn() * math.sqrt(dt)
            x = x + drift(x, tau) * dt + math.sqrt(2 * diffusion(tau)) * dw
        else:
            noise = math.sqrt(2 * diffusion(tau) * dt)
            xhat = x * math.sqrt(1 + noise**2) if i == 0 else x + noise * randn()
            k1 = drift(xhat, tau)
            xp = xhat + dt * k1
            k2 = drift(xp, tau + dt)
            x = xhat + 0.5 * dt * (k1 + k2)
    tau = t1
    if last_step == "mean":
        return x + drift(x, tau) * last_step_size
    if last_step == "tweedie":
        return x / tau + (1 - tau) ** 2 / tau * score(x, tau)
    if last_step == "euler":
        return x + velocity(x, tau) * last_step_size
    return x


@pytest.mark.parametrize("last_step", LAST_STEPS)
@pytest.mark.parametrize("method", ["euler", "heun"])
@pytest.mark.parametrize("form", FORMS)
def test_flow_sde_is_sits_sampler(form, method, last_step):
    gm = GaussianMixture.random(dim=3, modes=4, seed=1)
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    eps = 0.05 if form == "sbdm" or (method == "heun" and last_step is None) else 0.0
    opts = dict(diffusion=form, diffusion_norm=0.7, method=method, last_step=last_step, last_step_size=0.06,
                sample_eps=eps)
    got = ds.sample(flow_model(gm), x, 7, "flow_sde", Flow(), generator=torch.Generator().manual_seed(3),
                    backend="reference", **opts)
    want = sit_sample_sde(flow_model(gm), x, 7, form, 0.7, method, last_step, 0.06, eps,
                          torch.Generator().manual_seed(3))
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-10


def test_model_calls_and_defaults():
    """SiT's defaults (Euler-Maruyama, last step mean of size 0.04): steps - 1 SDE calls from t = 1 to 0.04 and the
    last step's; Heun 2 (steps - 1) + 1; no last step: steps - 1."""
    plan = make_plan("flow_sde", Flow(), 25, "flow")
    times = [s.t / 1000 for s in plan.steps]
    assert len(times) == 25 and times[0] == 1.0 and abs(times[-1] - 0.04) < 1e-7
    assert np.allclose(np.diff(times), -0.04, atol=1e-6)
    assert all(s.needs_noise for s in plan.steps[:-1]) and not plan.steps[-1].needs_noise
    assert len(make_plan("flow_sde", Flow(), 25, "flow", method="heun").steps) == 49
    assert len(make_plan("flow_sde", Flow(), 25, "flow", last_step=None).steps) == 24


def test_shift_and_sigmas_list():
    """Flow(shift) shifts the uniform grid and keeps its end points; sigmas= a list is the grid, its last
    interval (to 0) the last step."""
    shift = 3.0
    times = [s.t / 1000 for s in make_plan("flow_sde", Flow(shift=shift), 6, "flow").steps]
    unshift = lambda s: s / (shift - (shift - 1) * s)  # noqa: E731
    u = np.linspace(1.0, unshift(0.04), 6)
    assert np.allclose(times, shift * u / (1 + (shift - 1) * u), atol=1e-6)
    assert times[0] == 1.0 and abs(times[-1] - 0.04) < 1e-7
    plan = make_plan("flow_sde", Flow(), None, "flow", sigmas=[1.0, 0.6, 0.3, 0.1, 0.0])
    assert np.allclose([s.t / 1000 for s in plan.steps], [1.0, 0.6, 0.3, 0.1], atol=1e-6)
    assert plan.steps[-1].coeffs.c == 0 and plan.steps[-2].coeffs.c > 0


# ---- weak order on a Gaussian target: exact moments through the plan's coefficients ----

MU, S = 0.7, 0.3  # the target N(MU, S^2) of each coordinate


def gaussian_moments(plan, t_first, t_last, last_step):
    """(mean, variance) of a plan's output on the target N(MU, S^2), exactly: the velocity is linear in x
    (m_0 = E[x0 | x_t] = k x + d), so every fused update maps the Gaussian (x, state) linearly, started at the
    exact marginal at t_first times the plan's init_scale. Also the limit of steps -> infinity: the exact marginal
    at t_last, through the last step if there is one."""
    def posterior(t):
        var_t = (1 - t) ** 2 * S**2 + t**2
        k = (1 - t) * S**2 / var_t
        return k, MU - k * (1 - t) * MU

    def step(mean, cov, t, c):
        k, d = posterior(t)  # m_0 = k x + d, v = (x - m_0) / t; x' = a x + e v + b0 m_0 + g s + c z
        ax, const = c.a + c.e * (1 - k) / t + c.b[0] * k, -c.e * d / t + c.b[0] * d
        if c.state is not None:
            r = c.state
            sx, sc, sg = r.a + r.e * (1 - k) / t + r.b[0] * k, -r.e * d / t + r.b[0] * d, r.g
        else:
            sx, sc, sg = 0.0, 0.0, 1.0
        m = np.array([[ax, c.g], [sx, sg]])
        noise = np.array([c.c, c.state.c if c.state is not None else 0.0])
        return m @ mean + np.array([const, sc]), m @ cov @ m.T + np.outer(noise, noise)

    def marginal(t):
        return np.array([(1 - t) * MU, 0.0]), np.array([[(1 - t) ** 2 * S**2 + t**2, 0.0], [0.0, 0.0]])

    mean, cov = marginal(t_first)
    mean, cov = mean * plan.init_scale, cov * plan.init_scale**2
    for s in plan.steps:
        mean, cov = step(mean, cov, s.t / 1000, s.coeffs)
    limit = marginal(t_last)
    if last_step is not None:
        limit = step(*limit, t_last, plan.steps[-1].coeffs)
    return (mean[0], cov[0, 0]), (limit[0][0], limit[1][0, 0])


STEPS = [128, 256, 512, 1024]


def weak_order(diffusion, method="euler", last_step="mean", sample_eps=0.0):
    """The fitted order (slope of log moment error against log steps) and the errors over STEPS."""
    errors = []
    for n in STEPS:
        plan = make_plan("flow_sde", Flow(), n, "flow", diffusion=diffusion, method=method, last_step=last_step,
                         sample_eps=sample_eps)
        t_first = 1 - sample_eps if diffusion == "sbdm" else 1.0
        t_last = 0.04 if last_step is not None else sample_eps
        (m, v), (lm, lv) = gaussian_moments(plan, t_first, t_last, last_step)
        errors.append(abs(m - lm) + abs(v - lv))
    return -np.polyfit(np.log(STEPS), np.log(errors), 1)[0], errors


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("method, last_step", [("euler", None), ("euler", "mean"), ("heun", "tweedie")])
def test_weak_order_one(form, method, last_step):
    """Euler-Maruyama (to t = 0, or SiT's mean last step at 0.04) and SiT's stochastic Heun (noise, then a Heun step
    of the drift: a splitting) have weak order 1: the moment error halves as the steps double."""
    eps = 0.02 if form == "sbdm" or (method == "heun" and last_step is None) else 0.0
    order, errors = weak_order(form, method, last_step, eps)
    assert 0.85 < order < 1.15, (order, errors)
    assert errors[-1] < 2e-3


def test_the_moment_check_fails_a_wrong_sde():
    """The moment harness can fail: with the noise 10 % too weak for its drift the plan misses the target."""
    good = make_plan("flow_sde", Flow(), 512, "flow", diffusion="sigma", last_step=None)
    (m, v), _ = gaussian_moments(good, 1.0, 0.0, None)
    assert abs(m - MU) + abs(v - S**2) < 2e-4
    weak = [dataclasses.replace(s, coeffs=dataclasses.replace(s.coeffs, c=0.9 * s.coeffs.c)) for s in good.steps]
    (m, v), _ = gaussian_moments(dataclasses.replace(good, steps=tuple(weak)), 1.0, 0.0, None)
    assert abs(v - S**2) > 1e-2  # the variance 0.09 off by 0.016


# ---- samples of an exact mixture ----


def test_default_samples_match_the_mixture():
    """SiT's defaults at 64 steps: sliced W2 to exact samples of a ring mixture at the level of two exact samples."""
    gm = GaussianMixture.ring()
    exact = gm.sample(2000, torch.Generator().manual_seed(1))
    floor = max(sliced_wasserstein(gm.sample(2000, torch.Generator().manual_seed(s)), exact) for s in (7, 8, 9))
    x = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = ds.sample(flow_model(gm), x, 64, "flow_sde", Flow(), generator=torch.Generator().manual_seed(5))
    assert sliced_wasserstein(y, exact) < 1.5 * floor


BROAD = GaussianMixture(torch.tensor([0.3, 0.5, 0.2], dtype=torch.float64),
                        torch.tensor([[1.0, 0.3], [-0.8, 0.5], [0.1, -1.0]], dtype=torch.float64),
                        torch.tensor([0.35, 0.5, 0.4], dtype=torch.float64))  # modes wide enough for h < std^2


def coupled_em(gm, x, levels, fine, **opts):
    """F = E[|x|^2] and E[cos(x_0 + x_1)] of Euler-Maruyama samples on grids of `levels` intervals from t = 1 to
    0.04 then SiT's mean last step,
    all driven by the one Brownian path of `fine` intervals (a coarse step's z: the sum of its fine increments
    over sqrt(their count)), each step the plan's fused update."""
    z = torch.randn(fine, *x.shape, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    out = []
    for n in levels:
        plan = make_plan("flow_sde", Flow(), n + 1, "flow", **opts)
        y, k = x, fine // n
        for j, step in enumerate(plan.steps):
            noise = z[j * k:(j + 1) * k].sum(0) / math.sqrt(k) if step.needs_noise else None
            y = ds.ops.multistep_update(y, flow_model(gm)(y, torch.tensor(step.t, dtype=torch.float64)), step.coeffs,
                                        noise=noise, backend="reference")
        out.append(torch.stack([y.pow(2).sum(1).mean(), torch.cos(y[:, 0] + y[:, 1]).mean()]))
    return out


@pytest.mark.parametrize("form", ["sigma", "sbdm", "decreasing"])
def test_euler_maruyama_weak_order_on_a_mixture(form):
    """On a 2-D mixture: the change of E[f] between n and 2n steps falls as 1 / n (weak order 1). The levels share
    one Brownian path, so the Monte-Carlo noise of each change is of the (additive-noise) strong error, O(1 / n)
    itself over sqrt(samples): it cannot fake or hide the order."""
    x = torch.randn(2000, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    levels = [8, 16, 32, 64, 128]
    f = coupled_em(BROAD, x, levels, 128, diffusion=form, sample_eps=0.02 if form == "sbdm" else 0.0)
    changes = [(f[i] - f[i + 1]).abs().sum().item() for i in range(len(levels) - 1)]
    order = -np.polyfit(np.log(levels[:-1]), np.log(changes), 1)[0]
    assert 0.75 < order < 1.3, (order, changes)


# ---- backends and dtypes ----


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_every_backend_fp32_against_float64(backend, method):
    gm = GaussianMixture.random(dim=4, modes=3, seed=2)
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    run = lambda x, b: ds.sample(flow_model(gm), x, 6, "flow_sde", Flow(), method=method,  # noqa: E731
                                 diffusion="increasing-decreasing", generator=torch.Generator().manual_seed(1),
                                 backend=b)
    ref = run(x, "reference")
    got = run(x.float(), backend)
    assert got.dtype == torch.float32
    assert ((got.double() - ref).norm() / ref.norm()).item() < 1e-5


@pytest.mark.parametrize("path", ["linear", "vp"])
def test_flow_smc_sde_step_is_the_written_out_step(backend, path):
    """flow_smc.sde_step (the fused op, a row per sample) against x - dt (v - gamma^2 / 2 score) + gamma sqrt(dt) z
    in plain float64 torch, with one time per row."""
    path_ = F.LINEAR if path == "linear" else F.VPInterpolant()
    gen = torch.Generator().manual_seed(4)
    x, v, z = (torch.randn(6, 3, 2, generator=gen, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([0.9, 0.7, 0.5, 0.35, 0.2, 0.1], dtype=torch.float64)
    t_next, gamma = t - 0.05, 3 * t**2
    a, s, da, ds_ = path_.coefficients(t)
    score = ((da / (s * (a * ds_ - s * da)))[:, None, None] * x - (a / (s * (a * ds_ - s * da)))[:, None, None] * v)
    r = lambda c: c[:, None, None]  # noqa: E731
    want = x - r(t - t_next) * (v - r(gamma**2 / 2) * score) + r(gamma * (t - t_next).sqrt()) * z
    for dtype, bound in ((torch.float64, 1e-12), (torch.float32, 1e-6)):
        if dtype == torch.float64 and backend != "reference":
            continue
        got = F.sde_step(x.to(dtype), v.to(dtype), t, t_next, gamma, path_, z.to(dtype), backend=backend)
        assert got.dtype == dtype and ((got.double() - want).norm() / want.norm()).item() < bound


# ---- bad arguments ----


@pytest.mark.parametrize("opts, match", [
    (dict(diffusion="SBDM"), "diffusion must be one of"),
    (dict(method="rk4"), "method must be one of"),
    (dict(last_step="Mean"), "last_step must be one of"),
    (dict(last_step_size=0.0), "last_step_size must be in"),
    (dict(last_step_size=1.0), "last_step_size must be in"),
    (dict(diffusion_norm=-1.0), "diffusion_norm must be >= 0"),
    (dict(sample_eps=1.0), "sample_eps must be in"),
    (dict(diffusion="sbdm"), "infinite at t = 1: pass sample_eps > 0"),
    (dict(method="heun", last_step=None), "method 'heun' .* end above 0"),
    (dict(last_step=None, sample_eps=0.5, diffusion="sbdm"), "interval is empty"),
    (dict(steps=1), "needs steps >= 2"),
    (dict(prediction="eps"), "takes prediction 'flow'"),
    (dict(sigmas=[1.0, 0.5, 0.1], steps=None), "ends at 0 with a last step"),
    (dict(schedule=ds.schedules.VP.linear()), "needs a diffsampler.schedules.Flow schedule"),
    (dict(order=2), "unexpected keyword"),
])
def test_bad_arguments(opts, match):
    opts = dict(opts)
    schedule, steps, prediction = opts.pop("schedule", Flow()), opts.pop("steps", 10), opts.pop("prediction", "flow")
    with pytest.raises(ValueError, match=match):
        make_plan("flow_sde", schedule, steps, prediction, **opts)
