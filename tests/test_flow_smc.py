"""Flow particle sampling (diffsampler.flow_smc) on exact Gaussian-mixture targets: the score and Tweedie estimate
from the velocity against the mixture's exact ones, the SDE with the ODE's marginals (and not with a wrong factor
on gamma^2), the VP interpolant conversion (same ODE end points, velocity from the exact VP denoiser), Best-of-N,
SMC towards a tilted target known in closed form, Rollover Budget Forcing's budget accounting, no host sync,
determinism, half precision, and bad input."""

import math

import pytest
import torch

from diffsampler import flow_smc as F
from diffsampler import schedules
from diffsampler.targets import GaussianMixture, sliced_wasserstein


def mixture() -> GaussianMixture:
    return GaussianMixture(torch.tensor([1.0, 1.0, 2.0]), torch.tensor([[-1.0, 0.0], [1.0, 0.0], [0.0, 1.2]]),
                           torch.tensor([0.2, 0.3, 0.25]))


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def points(n=64, seed=0, dim=2):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 1.3


def test_flow_model_of_one_gaussian_is_the_closed_form():
    """N(mu, s^2 I): x_t ~ N((1 - t) mu, ((1 - t)^2 s^2 + t^2) I), E[x0 | x_t] linear in x_t, v = (x - x0) / t."""
    mu, s = torch.tensor([[0.7, -0.4]], dtype=torch.float64), 0.3
    model = GaussianMixture(torch.ones(1), mu, torch.tensor([s], dtype=torch.float64)).flow_model()
    x = points()
    for t in (0.05, 0.4, 0.9, 1.0):
        a = 1 - t
        x0 = mu + a * s**2 / (a * a * s**2 + t * t) * (x - a * mu)
        torch.testing.assert_close(model(x, torch.tensor(t, dtype=torch.float64)), (x - x0) / t, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("t", [0.03, 0.3, 0.7, 0.97])
def test_score_and_denoiser_from_velocity_are_exact_on_the_linear_path(t):
    gm, x = mixture(), points(seed=1)
    v = gm.flow_model()(x, torch.tensor(t))
    xg = x.clone().requires_grad_(True)
    exact_score, = torch.autograd.grad(gm.noised_log_prob(xg, 1 - t, t).sum(), xg)
    assert rel(F.flow_score(v, x, t), exact_score) < 1e-5
    assert rel(F.denoise(v, x, t), gm.posterior_mean(x, 1 - t, t)) < 1e-5
    # one per row gives the same
    tt = torch.full((len(x),), t)
    assert rel(F.flow_score(v, x, tt), exact_score) < 1e-5


def test_vp_interpolant_is_vpcontinuous_and_its_time_map_keeps_the_snr():
    vp, ref = F.VPInterpolant(), schedules.VPContinuous()
    r = torch.linspace(0.01, 1.0, 50, dtype=torch.float64)
    a, s, da, ds = vp.coefficients(r)
    torch.testing.assert_close(a, torch.tensor([math.exp(ref.log_alpha(v)) for v in r.tolist()],
                                               dtype=torch.float64), rtol=1e-12, atol=0)
    torch.testing.assert_close(a**2 + s**2, torch.ones_like(r), rtol=1e-12, atol=0)
    t, scale, dt, dscale = vp.flow_time(r)
    torch.testing.assert_close((1 - t) / t, a / s, rtol=1e-12, atol=0)  # equal signal-to-noise ratio
    torch.testing.assert_close(scale * t, s, rtol=1e-12, atol=0)  # x_r = s_r x_t: sigma_r = s_r t
    h = 1e-6  # derivatives against central differences
    for k, d in ((0, da), (1, ds)):
        fd = (vp.coefficients(r + h)[k] - vp.coefficients(r - h)[k]) / (2 * h)
        torch.testing.assert_close(d, fd, rtol=1e-6, atol=1e-8)
    for k, d in ((0, dt), (1, dscale)):
        fd = (vp.flow_time(r + h)[k] - vp.flow_time(r - h)[k]) / (2 * h)
        torch.testing.assert_close(d, fd, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(vp.time_of(t), r, rtol=1e-9, atol=0)  # the inverse time map
    grid = F.time_grid(8, "matched", vp)  # uniform in r down to the linear grid's last noise level t = 1/8
    assert grid[0] == 1 and grid[-1] == 0 and abs(vp.flow_time(grid[-2])[0].item() - 1 / 8) < 1e-12
    torch.testing.assert_close(grid[:-1].diff(), torch.full((7,), (grid[-2] - 1).item() / 7, dtype=torch.float64))
    torch.testing.assert_close(F.time_grid(8, "matched"), F.time_grid(8))
    exp = torch.tensor([1, (1 - 1 / 16) ** 0.5, 0.75**0.5, (1 - 9 / 16) ** 0.5, 0], dtype=torch.float64)
    torch.testing.assert_close(F.time_grid(4, "exp"), exp)  # sqrt(1 - (i / 4)^2), the paper's code


@pytest.mark.parametrize("r", [0.05, 0.3, 0.6, 1.0])
def test_vp_velocity_is_consistent_with_the_exact_vp_denoiser(r):
    """u_r from the linear flow model equals alpha' x0 + sigma' eps built from the exact VP denoiser at r, and
    the score / Tweedie estimate read back from u_r on the VP path are the VP marginal's."""
    gm, x = mixture(), points(seed=2)
    vp_model, times = F.to_vp(gm.flow_model(), 10)
    assert times[0] == 1 and times[-1] == 0 and len(times) == 11
    u = vp_model(x, torch.tensor(r))
    path = F.VPInterpolant()
    a, s, da, ds = (c.item() for c in path.coefficients(torch.tensor(r)))
    x0 = gm.model(None, "x0")(x, torch.tensor(s / a))  # schedule=None: the VP ratio sigma / alpha, alpha^2 + s^2 = 1
    eps = (x - a * x0) / s
    assert rel(u, da * x0 + ds * eps) < 1e-6
    assert rel(F.denoise(u, x, r, path), x0) < 1e-5
    xg = x.clone().requires_grad_(True)
    exact_score, = torch.autograd.grad(gm.noised_log_prob(xg, a, s).sum(), xg)
    assert rel(F.flow_score(u, x, r, path), exact_score) < 1e-5


def ode(model, path, times, x):
    for i in range(len(times) - 2):
        v = model(x, times[i].float().expand(len(x)))
        x = F.sde_step(x, v, times[i], times[i + 1], 0.0, path)
    v = model(x, times[-2].float().expand(len(x)))
    return F.denoise(v, x, times[-2], path)


def test_vp_ode_ends_at_the_linear_ode_samples():
    """Both ODEs move the same particles (x_r = s_r x_{t(r)}): from the same start x_{t(1)} they end at the same
    samples up to discretisation (first order: the gap shrinks ~4x from 250 to 1000 steps), while samples of
    different starts are ~1 apart."""
    gm = mixture()
    model = gm.flow_model()
    vp_model, _ = F.to_vp(model, 1)
    path = F.VPInterpolant()
    t1, s1 = (c.item() for c in path.flow_time(torch.tensor(1.0))[:2])
    x = torch.randn(256, 2, generator=torch.Generator().manual_seed(3))
    gaps = []
    for steps in (250, 1000):
        lin = ode(model, F.LINEAR, torch.linspace(t1, 0, steps + 1, dtype=torch.float64), x)
        vp = ode(vp_model, path, torch.linspace(1, 0, steps + 1, dtype=torch.float64), x * s1)
        gaps.append((lin - vp).norm(dim=1).median().item())
    assert gaps[1] < 0.01 and gaps[0] / gaps[1] > 2.5, gaps
    assert (lin - lin.roll(1, 0)).norm(dim=1).median().item() > 0.5


EXACT_N = 4000


def sde_w2(path, factor=0.5, steps=100):
    """Sliced W2 to exact samples of SDE samples whose drift uses v - factor gamma^2 score (0.5 is right)."""
    gm = mixture()
    model, path_ = (gm.flow_model(), F.LINEAR) if path == "linear" else (F.to_vp(gm.flow_model(), 1)[0],
                                                                          F.VPInterpolant())
    gen = torch.Generator().manual_seed(0)
    times = F.time_grid(steps)
    x = torch.randn(EXACT_N, 2, generator=gen)
    for i in range(steps - 1):
        v = model(x, times[i].float().expand(EXACT_N))
        gamma = 3.0 * times[i].item() ** 2  # the default gamma = 3 t^2
        wrong = F.flow_score(v, x, times[i], path_) * (factor - 0.5) * gamma * gamma  # extra drift of a wrong factor
        x = F.sde_step(x, v, times[i], times[i + 1], gamma, path_, torch.randn(x.shape, generator=gen))
        x = x + (times[i] - times[i + 1]).item() * wrong
    return sliced_wasserstein(F.denoise(model(x, times[-2].float().expand(EXACT_N)), x, times[-2], path_),
                              gm.sample(EXACT_N, torch.Generator().manual_seed(1)).float())


@pytest.mark.parametrize("path", ["linear", "vp"])
def test_sde_samples_the_exact_target(path):
    gm = mixture()
    exact = gm.sample(EXACT_N, torch.Generator().manual_seed(1)).float()
    draw = lambda seed: gm.sample(EXACT_N, torch.Generator().manual_seed(seed)).float()  # noqa: E731
    floor = sorted(sliced_wasserstein(draw(10 + i), draw(20 + i)) for i in range(5))[2]  # median: 0.022
    sde = F.sample(gm.flow_model(), EXACT_N, (2,), steps=100, path=path, diffusion=3.0,
                   generator=torch.Generator().manual_seed(0))
    ode_ = F.sample(gm.flow_model(), EXACT_N, (2,), steps=100, path=path, diffusion=0.0,
                    generator=torch.Generator().manual_seed(0))
    w_sde, w_ode = sliced_wasserstein(sde, exact), sliced_wasserstein(ode_, exact)
    # at N = 4000 the distances are sampling noise (two exact samples: 0.017-0.05): the SDE is as close as the ODE
    assert w_sde < 2 * floor and w_ode < 2 * floor and abs(w_sde - w_ode) < floor, (w_sde, w_ode, floor)
    assert abs(sde_w2(path) - w_sde) < 1e-6  # the hand-written loop above is the library's
    for factor in (1.0, 0.0):  # gamma^2 score instead of gamma^2 / 2 score, or none
        assert sde_w2(path, factor) > 2.5 * max(w_sde, floor)


def reward_near(c, s):
    return lambda x0: -((x0.float() - c) ** 2).sum(1) / (2 * s * s)


def test_best_of_n_keeps_the_argmax():
    gm = mixture()
    reward = reward_near(torch.tensor([0.5, 0.5]), 0.4)
    for diffusion in (0.0, 3.0):
        res = F.best_of_n(gm.flow_model(), reward, 5, 7, (2,), steps=8, diffusion=diffusion,
                          generator=torch.Generator().manual_seed(0))
        assert res.candidates.shape == (35, 2) and res.candidate_rewards.shape == (5, 7) and res.nfe == 56
        torch.testing.assert_close(res.candidate_rewards.reshape(-1), reward(res.candidates))
        best = res.candidate_rewards.argmax(1)
        torch.testing.assert_close(res.samples, res.candidates.reshape(5, 7, 2)[torch.arange(5), best])
        torch.testing.assert_close(res.rewards, res.candidate_rewards.max(1).values)
        assert (res.rewards >= res.candidate_rewards.T).all()


def test_smc_samples_the_reward_tilted_target():
    """p(x) exp(r(x) / T) with r = -|x - c|^2 / (2 s^2) is the mixture times N(c, T s^2 I): a mixture
    (GaussianMixture.product). Weighted draws of SMC approach it; the untilted sampler does not."""
    gm, c, s, temp = mixture(), torch.tensor([0.6, -0.3]), 0.5, 1.0
    tilted = gm.product(GaussianMixture(torch.ones(1), c[None], torch.tensor([s * math.sqrt(temp)])))
    n = 1024
    exact = tilted.sample(n, torch.Generator().manual_seed(1)).float()
    floor = sliced_wasserstein(exact, tilted.sample(n, torch.Generator().manual_seed(2)).float())
    plain = F.sample(gm.flow_model(), n, (2,), steps=40, path="vp", diffusion=3.0,
                     generator=torch.Generator().manual_seed(0))
    res = F.smc(gm.flow_model(), reward_near(c, s), n, 16, (2,), steps=40, temperature=temp,
                generator=torch.Generator().manual_seed(0))
    w_smc, w_plain = sliced_wasserstein(res.samples, exact), sliced_wasserstein(plain, exact)
    assert w_smc < 2 * floor and w_plain > 3 * w_smc, (w_smc, w_plain, floor)
    assert res.nfe == 16 * 40 and res.log_w.shape == (n, 16)
    torch.testing.assert_close(res.log_w.logsumexp(1), torch.zeros(n), atol=1e-5, rtol=0)
    torch.testing.assert_close(res.rewards, reward_near(c, s)(res.samples))
    best = F.smc(gm.flow_model(), reward_near(c, s), 64, 16, (2,), steps=10, select="max",
                 generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(best.rewards, best.particle_rewards.max(1).values)


class Counter:
    """A reward that ignores x0 and returns +-(number of calls so far): always or never improving."""

    def __init__(self, sign):
        self.sign, self.calls = sign, 0

    def __call__(self, x0):
        self.calls += 1
        return torch.full((x0.shape[0],), self.sign * float(self.calls))


@pytest.mark.parametrize("budget,steps,initial", [(60, 6, 5), (37, 5, 1), (200, 10, None)])
def test_rbf_spends_the_budget_and_rolls_unused_quota_over(budget, steps, initial):
    model = mixture().flow_model()
    init = max(1, budget // 10) if initial is None else initial
    quota, rounds = (budget - init) // steps, budget - init
    # every candidate improves: one draw per transition, the rest rolls over to the last one
    up = F.rollover_budget_forcing(model, Counter(1), 3, budget, (2,), steps=steps, initial=initial,
                                   generator=torch.Generator().manual_seed(0))
    assert (up.draws[:, :-1] == 1).all() and (up.draws[:, -1] == rounds - (steps - 2)).all()
    assert (up.nfe == budget).all()
    # no candidate improves: each transition uses its quota exactly, keeps its best (= first) candidate
    down = F.rollover_budget_forcing(model, Counter(-1), 3, budget, (2,), steps=steps, initial=initial,
                                     generator=torch.Generator().manual_seed(0))
    assert (down.draws[:, :-1] == quota).all() and (down.nfe == budget).all()
    first_of_last = 1 + (steps - 2) * quota + 1  # calls: the initial one, the searched transitions, then the last
    assert (down.rewards == -first_of_last).all()


def test_rbf_on_a_real_reward_stays_within_its_quotas_and_improves_on_one_sample():
    gm, c = mixture(), torch.tensor([0.5, 0.6])
    reward = reward_near(c, 0.3)
    budget, steps, G = 60, 6, 128
    res = F.rollover_budget_forcing(gm.flow_model(), reward, G, budget, (2,), steps=steps, initial=6,
                                    generator=torch.Generator().manual_seed(0))
    quota = (budget - 6) // steps
    assert (res.nfe == budget).all() and (res.draws >= 1).all()
    cumulative = res.draws[:, :-1].cumsum(1)
    assert (cumulative <= quota * torch.arange(1, steps - 1)).all()  # a transition spends at most its rolled quota
    assert (res.draws[:, :-1] < quota).any()  # and some transitions found an improvement early
    torch.testing.assert_close(res.rewards, reward(res.samples))
    plain = F.sample(gm.flow_model(), G, (2,), steps=steps, generator=torch.Generator().manual_seed(1))
    assert res.rewards.mean() > reward(plain).mean() + 1.0


def test_fixed_seed_gives_identical_output_and_half_precision_runs():
    gm = mixture()
    reward = reward_near(torch.tensor([0.5, 0.5]), 0.4)
    run = lambda dtype: F.smc(gm.flow_model(), reward, 4, 8, (2,), steps=6, dtype=dtype,  # noqa: E731
                              generator=torch.Generator().manual_seed(5))
    a, b = run(torch.float32), run(torch.float32)
    assert torch.equal(a.samples, b.samples) and torch.equal(a.log_w, b.log_w)
    r1 = F.rollover_budget_forcing(gm.flow_model(), reward, 4, 30, (2,), steps=4,
                                   generator=torch.Generator().manual_seed(5))
    r2 = F.rollover_budget_forcing(gm.flow_model(), reward, 4, 30, (2,), steps=4,
                                   generator=torch.Generator().manual_seed(5))
    assert torch.equal(r1.samples, r2.samples) and torch.equal(r1.draws, r2.draws)
    for dtype in (torch.float16, torch.bfloat16):
        h = run(dtype)
        assert h.samples.dtype == dtype and torch.isfinite(h.samples.float()).all()
        # same noise, same resampling uniforms: the half-precision run follows the fp32 one closely
        assert (h.samples.float() - a.samples).norm(dim=1).median() < 0.1


def test_loops_never_synchronise_except_the_first_reward_check():
    from diffsampler.bench.common import OpCounter
    from test_sync_free import SYNCING

    model = lambda x, t: 0.5 * x  # noqa: E731  a pure torch op
    reward = lambda x0: -(x0**2).flatten(1).sum(1)  # noqa: E731
    for run in (lambda: F.smc(model, reward, 3, 4, (2, 3), steps=6, generator=torch.Generator().manual_seed(0)),
                lambda: F.rollover_budget_forcing(model, reward, 3, 40, (2, 3), steps=5,
                                                  generator=torch.Generator().manual_seed(0)),
                lambda: F.best_of_n(model, reward, 3, 4, (2, 3), steps=5, diffusion=1.0,
                                    generator=torch.Generator().manual_seed(0))):
        with OpCounter() as counter:
            run()
        assert sum(counter.ops[op] for op in SYNCING) == 1, {op: counter.ops[op] for op in SYNCING}


def test_bad_input_raises_value_errors_naming_the_argument():
    model = mixture().flow_model()
    reward = reward_near(torch.tensor([0.0, 0.0]), 1.0)
    smc = lambda **kw: F.smc(**{**dict(model=model, reward=reward, groups=2, particles=3, shape=(2,),  # noqa: E731
                                       steps=3), **kw})
    rbf = lambda **kw: F.rollover_budget_forcing(**{**dict(model=model, reward=reward, groups=2,  # noqa: E731
                                                           budget=20, shape=(2,), steps=4), **kw})
    cases = [
        (lambda: smc(model="not callable"), "model"),
        (lambda: smc(reward=3), "reward"),
        (lambda: smc(reward=lambda x0: x0), "reward"),  # shape (B, 2), not (B,)
        (lambda: smc(reward=lambda x0: torch.full((x0.shape[0],), math.nan)), "reward"),
        (lambda: smc(model=lambda x, t: x[:, :1]), "model"),
        (lambda: smc(particles=0), "particles"),
        (lambda: smc(groups=1.5), "groups"),
        (lambda: smc(steps=0), "steps"),
        (lambda: smc(temperature=0.0), "temperature"),
        (lambda: smc(select="best"), "select"),
        (lambda: smc(method="nope"), "method"),
        (lambda: smc(ess_threshold=2.0), "ess_threshold"),
        (lambda: smc(path="cosine"), "path"),
        (lambda: smc(spacing="log"), "spacing"),
        (lambda: smc(diffusion=-1.0), "diffusion"),
        (lambda: smc(shape=(2, 0)), "shape"),
        (lambda: rbf(budget=4), "budget"),  # < initial + steps
        (lambda: rbf(budget=20, initial=0), "initial"),
        (lambda: rbf(steps=1), "steps"),
        (lambda: F.best_of_n(model, reward, 2, 0, (2,)), "particles"),
        (lambda: F.sample(model, 0, (2,)), "n"),
        (lambda: F.to_vp(None, 4), "model"),
        (lambda: F.VPInterpolant(20.0, 0.1), "beta_min"),
    ]
    for call, name in cases:
        with pytest.raises(ValueError, match=name):
            call()


def test_bench_part_c_runs_at_tiny_sizes():
    from diffsampler.bench import flow_particles

    res = flow_particles.run(groups=4, tune_groups=4, budgets=(40,), tune_budget=40)
    assert set(res["methods"]) == {"BoN ODE", "BoN SDE", "SMC linear", "SMC VP", "RBF linear", "RBF VP"}
    for m in res["methods"].values():
        assert len(m["rows"]) == 1 and m["rows"][0]["nfe"] == 40 and math.isfinite(m["rows"][0]["mean"])
