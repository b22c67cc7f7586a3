"""Denoising Langevin Gibbs (diffsampler.dmcmc) against plain float64 torch and exact mixtures."""

import math

import numpy as np
import pytest
import torch

import diffsampler as ds
from diffsampler import dmcmc
from diffsampler.targets import GaussianMixture, sliced_wasserstein


def ve_model(target):
    """The exact denoiser D(x, sigma) = E[x0 | x0 + sigma eps = x], sigma one per row."""
    return lambda x, t: target.posterior_mean(x, 1.0, t).to(x.dtype)


def plain_log_p(target, x, sigmas):
    """log p_sigma(x) per row and level, one level at a time (targets.noised_log_prob), float64."""
    return torch.stack([target.noised_log_prob(x.double(), 1.0, s) for s in sigmas], dim=1)


RING = GaussianMixture.ring()
MIX8 = GaussianMixture.random(dim=8, modes=4, seed=0)
SMOOTH = GaussianMixture(MIX8.weights[:3], MIX8.means[:3, :4], torch.full((3,), 0.5))  # wide modes: a smooth ODE


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_langevin_step_rows_per_chain(backend, dtype):
    """One fused Langevin step with a row per chain equals x + eta_l/2 (D - x)/sigma_l^2 + sqrt(eta_l) z."""
    if dtype == torch.float64 and backend != "reference":
        pytest.skip("the fused backends store float32 / float16 / bfloat16; float64 runs on the reference")
    sigmas, etas = [2.0, 0.7, 0.2, 0.05], [0.3, 0.05, 0.01, 0.001]
    level = torch.tensor([0, 3, 1, 2, 2, 0, 3], dtype=torch.int64)
    x = torch.randn(7, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5)).to(dtype)
    d = dmcmc.DLG(ve_model(RING), None, sigmas, eta=etas, gibbs="fixed", generator=torch.Generator().manual_seed(9),
                  backend=backend).init(x, level)
    d.langevin(1)
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float32).double()
    s = torch.tensor(sigmas, dtype=torch.float64)[level, None]
    e = torch.tensor(etas, dtype=torch.float64)[level, None]
    xd = x.double()
    want = xd + e / 2 * (RING.posterior_mean(xd, 1.0, s.squeeze(1)) - xd) / s**2 + e.sqrt() * z
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    assert d.x.dtype == dtype
    assert ((d.x.double() - want).norm() / want.norm()).item() < tol
    assert torch.equal(d.level, level)


def test_exact_classifier_and_argmax_gibbs():
    """exact_classifier equals log p_sigma(x) level by level; the Gibbs step takes its argmax."""
    sigmas = dmcmc.noise_levels(10.0, 0.01, 12)
    x = MIX8.sample(64, torch.Generator().manual_seed(0)) + 0.3 * torch.randn(64, 8, dtype=torch.float64,
                                                                                generator=torch.Generator().manual_seed(1))
    logits = dmcmc.exact_classifier(MIX8, sigmas)(x)
    plain = plain_log_p(MIX8, x, sigmas)
    assert (logits - plain).abs().max().item() < 1e-9
    d = dmcmc.DLG(ve_model(MIX8), dmcmc.exact_classifier(MIX8, sigmas), sigmas, eta=1e-4,
                  generator=torch.Generator().manual_seed(2)).init(x, 0)
    d.langevin(1)
    assert torch.equal(d.level, plain_log_p(MIX8, d.x, sigmas).argmax(dim=1))
    assert len(set(d.level.tolist())) > 2  # the chains' levels differ: the rows differ


def test_sampled_gibbs_matches_posterior_frequencies():
    """gibbs="sample" draws levels with the classifier's softmax (chi-square over 4 levels, 8000 draws)."""
    sigmas = [1.5, 0.6, 0.3, 0.1]
    x = torch.tensor([[0.75, 0.1]], dtype=torch.float64).expand(8000, 2).contiguous()
    d = dmcmc.DLG(ve_model(RING), dmcmc.exact_classifier(RING, sigmas), sigmas, gibbs="sample",
                  generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(d._gibbs(x), minlength=4).double()
    p = torch.softmax(plain_log_p(RING, x[:1], sigmas)[0], 0)
    assert p.min() > 0.02
    chi2 = (((counts - 8000 * p) ** 2) / (8000 * p)).sum().item()
    assert chi2 < 16.3  # 99.9 % quantile of chi-square with 3 degrees of freedom


def test_fixed_level_chains_reach_the_noised_marginal():
    """Langevin at a fixed level: sliced W2 to exact samples of p_sigma falls with the steps, to the ULA bias."""
    sigma, n = 0.3, 2000
    exact = RING.sample(n, torch.Generator().manual_seed(1))
    exact = exact + sigma * torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    x = 2.0 * torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    d = dmcmc.DLG(ve_model(RING), None, [sigma, 0.1], eta=0.2 * sigma**2, gibbs="fixed",
                  generator=torch.Generator().manual_seed(4)).init(x, 0)
    w = [sliced_wasserstein(d.x, exact)]
    for k in (5, 20, 200):
        d.langevin(k)
        w.append(sliced_wasserstein(d.x, exact))
    assert w[0] > w[1] > w[2] > 0.02 and w[3] < 0.04, w
    floor = sliced_wasserstein(RING.sample(n, torch.Generator().manual_seed(7)) + sigma * torch.randn(
        n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(8)), exact)
    assert w[3] < 1.5 * floor + 0.005


@pytest.mark.parametrize("solver", ["heun", "dpmpp_2m"])
def test_denoising_per_chain_equals_each_chain_alone(solver):
    """The batched denoising (each chain its own level's rows of one table) equals run_plan of that level's
    plan on each chain alone."""
    sigmas = [5.0, 1.0, 0.3]
    x = 2 * torch.randn(6, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    level = torch.tensor([0, 2, 1, 1, 0, 2])
    d = dmcmc.DLG(ve_model(MIX8), None, sigmas, gibbs="fixed", solver=solver, steps=6).init(x, level)
    got = d.denoise(x, level)
    for b in range(6):
        s = sigmas[level[b]]
        plan = dmcmc.denoise_plan(solver, dmcmc.denoise_grid(s, 0.01, 6, 7.0), "x0", {})
        model = lambda x, t: ve_model(MIX8)(x, t.reshape(1))  # noqa: E731
        alone = ds.run_plan(model, x[b:b + 1] / plan.init_scale, plan)
        assert (got[b] - alone[0]).abs().max().item() < 1e-12


@pytest.mark.parametrize("solver, order", [("heun", 2), ("dpmpp_2m", 2), ("euler", 1)])
def test_denoising_convergence_order(solver, order):
    """Per-chain ODE error against a 256-step run from each chain's own level: slope of log error vs log steps."""
    sigmas = [4.0, 1.0, 0.5]
    x = SMOOTH.sample(12, torch.Generator().manual_seed(0)) + 1.5 * torch.randn(
        12, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    level = torch.arange(12) % 3
    options = dict(lower_order_final=False) if solver == "dpmpp_2m" else {}

    def run(k):
        d = dmcmc.DLG(ve_model(SMOOTH), None, sigmas, gibbs="fixed", solver=solver, steps=k, sigma_min=0.05,
                      **options)
        return d.init(x, level).denoise(x, level)

    ref = run(256)
    ks = [8, 16, 32]
    errs = [((run(k) - ref).norm() / ref.norm()).item() for k in ks]
    slope = -np.polyfit(np.log(ks), np.log(errs), 1)[0]
    assert abs(slope - order) < 0.35, (errs, slope)


def test_end_to_end_samples_and_nfe():
    """Exact model and classifier on the 8-D mixture: chains warm-started as the authors do (a solver sample plus
    noise) give samples close to exact ones; the NFE counts every call."""
    n = 1500
    sigmas = dmcmc.noise_levels(80.0, 0.01, 100)
    calls = {"model": 0, "classifier": 0}

    def model(x, t):
        calls["model"] += 1
        return ve_model(MIX8)(x, t)

    exact_cls = dmcmc.exact_classifier(MIX8, sigmas)

    def classifier(x):
        calls["classifier"] += 1
        return exact_cls(x)

    exact = MIX8.sample(n, torch.Generator().manual_seed(1))
    x = MIX8.sample(n, torch.Generator().manual_seed(3)) + 0.5 * torch.randn(
        n, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    d = dmcmc.DLG(model, classifier, sigmas, eta=0.002, n_langevin=3, solver="dpmpp_2m", steps=5,
                  generator=torch.Generator().manual_seed(5)).init(x)
    d.langevin(10)
    x0, nfe = d.run(2)
    assert x0.shape == (2 * n, 8)
    assert nfe == dmcmc.NFE(score=2 * (3 + 5), classifier=2 * 3) and nfe.total == 22
    assert d.nfe == dmcmc.NFE(score=10 + 16, classifier=1 + 10 + 6)
    assert calls == {"model": d.nfe.score, "classifier": d.nfe.classifier}
    w = [sliced_wasserstein(x0[:n], exact), sliced_wasserstein(x0[n:], exact)]
    floor = sliced_wasserstein(MIX8.sample(n, torch.Generator().manual_seed(9)), exact)
    assert max(w) < 2 * floor + 0.02, (w, floor)
    far = sliced_wasserstein(torch.zeros_like(exact), exact)
    assert max(w) < 0.2 * far


def test_tweedie_step():
    """tweedie=s adds one call and maps x to D(x, s)."""
    x = 0.5 * torch.randn(5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    level = torch.zeros(5, dtype=torch.int64)
    plain = dmcmc.DLG(ve_model(MIX8), None, [1.0, 0.5], gibbs="fixed", steps=3).init(x, level)
    tw = dmcmc.DLG(ve_model(MIX8), None, [1.0, 0.5], gibbs="fixed", steps=3, tweedie=0.02).init(x, level)
    a, b = plain.denoise(x, level), tw.denoise(x, level)
    assert (b - MIX8.posterior_mean(a, 1.0, 0.02)).abs().max().item() < 1e-12
    assert tw.nfe.score == plain.nfe.score + 1


def test_noise_classifier_training():
    """A small trained classifier's cross-entropy on (x0 + sigma_l z, l) comes near the exact classifier's (the
    Bayes optimum) and far below the uniform guess (16 levels, 2-D ring)."""
    sigmas = dmcmc.noise_levels(5.0, 0.01, 16)
    net = dmcmc.train_noise_classifier(RING.sample(4000, torch.Generator().manual_seed(0)), sigmas, iters=600,
                                       width=64)
    gen = torch.Generator().manual_seed(1)
    y = torch.randint(0, 16, (4000,), generator=gen)
    x = RING.sample(4000, gen) + torch.tensor(sigmas, dtype=torch.float64)[y, None] * torch.randn(
        4000, 2, dtype=torch.float64, generator=gen)
    with torch.no_grad():
        trained = torch.nn.functional.cross_entropy(net(x).double(), y).item()
    exact = torch.nn.functional.cross_entropy(dmcmc.exact_classifier(RING, sigmas)(x), y).item()
    assert exact < trained < exact + 0.25 and trained < math.log(16) - 0.5, (trained, exact)


def test_vp_denoiser_at_training_sigmas():
    """vp_denoiser of an exact VP noise prediction equals the exact VE denoiser at each training sigma ratio."""
    schedule = ds.schedules.VP.linear()

    def eps(x, t):  # the exact noise prediction at integer timesteps, one per row
        alpha, sigma = (v[:, None] for v in schedule.alpha_sigma_at(t.round().long()))
        return (x - alpha * MIX8.posterior_mean(x, alpha, sigma)) / sigma

    D = dmcmc.vp_denoiser(eps, schedule)
    t = torch.tensor([10, 200, 500, 999, 0, 640])
    sigma = schedule.train_sigmas().double()[t]
    x = MIX8.sample(6, torch.Generator().manual_seed(0)) + sigma[:, None] * torch.randn(
        6, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    want = MIX8.posterior_mean(x, 1.0, sigma)
    assert ((D(x, sigma) - want).norm() / want.norm()).item() < 1e-6  # train_sigmas are float32 ratios


def test_noise_levels():
    s = dmcmc.noise_levels(50.0, 0.01, 1000)
    assert len(s) == 1000 and abs(s[0] - 50.0) < 1e-9
    assert abs(s[-1] - 0.01 * 5000 ** 1e-3) < 1e-12 and all(a > b for a, b in zip(s, s[1:]))
    assert abs(math.log(s[1] / s[0]) - math.log(5000) * (-0.999 / 999)) < 1e-12


def test_bad_arguments():
    m, c, s = ve_model(RING), dmcmc.exact_classifier(RING, [1.0, 0.1]), [1.0, 0.1]
    bad = [
        (dict(model=None), "model"), (dict(classifier=None), "classifier"), (dict(classifier=3), "classifier"),
        (dict(sigmas=[0.1, 1.0]), "sigmas"), (dict(sigmas=[1.0, 0.0]), "sigmas"), (dict(eta=0.0), "eta"),
        (dict(eta=[0.1, 0.2, 0.3]), "eta"), (dict(eta="big"), "eta"), (dict(n_langevin=0), "n_langevin"),
        (dict(gibbs="max"), "gibbs"), (dict(solver="nope"), "solver"), (dict(solver="mrs"), "mrs"),
        (dict(steps=0), "steps"), (dict(sigma_min=0.5), "sigma_min"), (dict(rho=-1), "rho"),
        (dict(tweedie=0.0), "tweedie"), (dict(prediction="logits"), "prediction"), (dict(prediction="v"), "prediction"), (dict(generator=1), "generator"),
        (dict(solver="heun", bogus=1), "bogus"),
    ]
    for change, word in bad:
        kw = {**dict(model=m, classifier=c, sigmas=s), **change}
        with pytest.raises(ValueError, match=word):
            dmcmc.DLG(kw.pop("model"), kw.pop("classifier"), kw.pop("sigmas"), **kw)
    d = dmcmc.DLG(m, c, s)
    x = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="init"):
        d.langevin(1)
    for level in (2, -1, torch.tensor([0, 1]), torch.tensor([0.0, 1.0, 0.0]), torch.tensor([0, 1, 5])):
        with pytest.raises(ValueError, match="level"):
            d.init(x, level)
    with pytest.raises(ValueError, match="x"):
        d.init([1.0, 2.0])
    with pytest.raises(ValueError, match="level"):
        dmcmc.DLG(m, None, s, gibbs="fixed").init(x)
    with pytest.raises(ValueError, match=r"classifier must return logits of shape \(3, 2\)"):
        dmcmc.DLG(m, lambda x: torch.zeros(3, 5), s).init(x)
    with pytest.raises(ValueError, match="rounds"):
        d.init(x, 0).run(0)
    with pytest.raises(ValueError, match="log_prior"):
        dmcmc.exact_classifier(RING, s, log_prior=[0.0])
    with pytest.raises(ValueError, match="sigma_min"):
        dmcmc.noise_levels(1.0, 2.0)
    with pytest.raises(ValueError, match="schedule"):
        dmcmc.vp_denoiser(m, ds.schedules.EDM())
    with pytest.raises(ValueError, match="sigmas"):
        dmcmc.train_noise_classifier(torch.zeros(4, 2), [1.0, 0.0])


@pytest.mark.parametrize("gibbs", ["argmax", "sample"])
def test_a_round_dispatches_fixed_ops_without_sync(gibbs):
    """One round (3 Langevin-Gibbs steps, 5 heun calls) on the C++ backend: one fused indexed update per model
    call, the per-chain levels and kept states on the device, no host synchronisation."""
    from diffsampler.bench.common import OpCounter

    W = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    d = dmcmc.DLG(lambda x, t: x * 0.5, lambda x: x.reshape(len(x), -1) @ W, [4.0, 2.0, 1.0, 0.5, 0.2], gibbs=gibbs,
                  solver="heun", steps=3, n_langevin=3, eta=0.01, backend="cpu",
                  generator=torch.Generator().manual_seed(1)).init(torch.randn(4, 2, 3))
    with OpCounter() as counter:
        d.sample()
    ops = dict(counter.ops)
    assert ops["diffsampler::multistep_update_indexed"] == 8 and ops["aten::randn"] == 3
    assert ops["aten::where"] == 3 and ops["aten::mm"] == 3
    assert ops.get("aten::argmax" if gibbs == "argmax" else "aten::multinomial") == 3
    assert not {"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::equal"} & set(ops)


@pytest.mark.parametrize("prediction", ["eps", "score"])
def test_noise_and_score_models_give_the_denoisers_round(prediction):
    """A round with an eps or score model equals the round with the denoiser it implies (same noise)."""
    D = ve_model(MIX8)
    convert = {"eps": lambda x, t: (x - D(x, t)) / t[:, None], "score": lambda x, t: (D(x, t) - x) / t[:, None] ** 2}
    sigmas = dmcmc.noise_levels(10.0, 0.05, 20)
    x = MIX8.sample(16, torch.Generator().manual_seed(0)) + 0.4 * torch.randn(
        16, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    runs = []
    for model, pred in ((D, "x0"), (convert[prediction], prediction)):
        d = dmcmc.DLG(model, dmcmc.exact_classifier(MIX8, sigmas), sigmas, eta=0.01, n_langevin=3,
                      solver="dpmpp_2m", steps=4, prediction=pred, generator=torch.Generator().manual_seed(2))
        runs.append(d.init(x).sample()[0])
    assert (runs[0] - runs[1]).abs().max().item() < 1e-10
