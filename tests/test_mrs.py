"""MR Sampler on mean-reverting (IR-SDE) schedules: against the authors' step formulas written out in float64,
its reduction to DPM-Solver(++) on (x - mu) / sigma_inf, every backend, the ODE orders on an exact restoration
target (a Gaussian mixture of residuals x0 - mu), and bad input."""

import math

import numpy as np
import pytest
import torch

import diffsampler as ds
from diffsampler.sample import run_plan
from diffsampler.schedules import MeanReverting
from diffsampler.solvers.dpm import dpm_steps
from diffsampler.solvers.mrs import mrs_grid
from diffsampler.targets import GaussianMixture

SCHEDULE = MeanReverting()
DIM = 8
_G = GaussianMixture.random(dim=DIM, modes=4, seed=1)
RESIDUAL = GaussianMixture(_G.weights, _G.means * 0.2, _G.stds * 0.5)  # x0 - mu: small beside sigma_inf
MU = torch.linspace(-0.4, 0.5, DIM, dtype=torch.float64)


def exact_model(prediction="eps", schedule=SCHEDULE, residual=RESIDUAL, mu=MU):
    """The exact model of x_t = mu + alpha (x0 - mu) + sigma eps, x0 - mu ~ residual, in each output form."""
    s_inf = schedule.sigma_inf

    def model(x, t):
        a, s = schedule.alpha_sigma_at(t)
        y = x.double() - mu
        y0 = residual.posterior_mean(y, a, s)
        eps = (y - a * y0) / s
        out = {"eps": eps, "x0": y0 + mu, "v": (a * y - y0) * s_inf / s, "score": -eps / s}[prediction]
        return out.to(x.dtype)

    return model


def authors_mrs(model, z, mu, schedule, steps, order, sde, param, pred, generator=None):
    """The authors' MRSampler loop (float64): their output conversion and their ODE / SDE step formulas, the
    first order - 1 steps at lower order, the rest (the last included) at `order`; x_T = mu + sigma_T z."""
    ts = np.linspace(0, schedule.num_train_timesteps, steps + 1)[::-1]
    al, sg = zip(*(schedule.alpha_sigma(t) for t in ts))
    lam = [math.log(a) - math.log(s) for a, s in zip(al, sg)]
    s_inf = schedule.sigma_inf

    def convert(out, x, i):
        a, s = al[i], sg[i]
        if param == "data":
            return {"eps": lambda: (x - s * out) / a - (1 - a) / a * mu, "x0": lambda: out,
                    "v": lambda: a * x - s / s_inf * out + (1 - a) * mu}[pred]()
        return {"eps": lambda: out, "x0": lambda: (x - mu - (out - mu) * a) / s,
                "v": lambda: (out * a + (x - mu) * s / s_inf) / s_inf}[pred]()

    q = []

    def step(x, i, o):
        q.insert(0, convert(model(x, torch.tensor(ts[i - 1], dtype=torch.float64)), x, i - 1))
        h = lam[i] - lam[i - 1]
        a_t, a_s, s_t, s_s = al[i], al[i - 1], sg[i], sg[i - 1]
        d1 = d2 = 0.0
        if o >= 2:
            r0 = (lam[i - 1] - lam[i - 2]) / h
            d1 = (q[0] - q[1]) / r0
        if o == 3:
            r1 = (lam[i - 2] - lam[i - 3]) / h
            d1_1 = (q[1] - q[2]) / r1
            d1, d2 = d1 + (d1 - d1_1) * r0 / (r0 + r1), (d1 - d1_1) / (r0 + r1)
        if not sde:
            if param == "data":
                p1 = math.expm1(-h)
                p2 = p1 / h + 1
                p3 = p2 / h - 0.5
                out = s_t / s_s * x - a_t * (p1 * q[0] - p2 * d1 + p3 * d2)
                return out + mu * (1 - s_t / s_s + s_t / s_s * a_s - a_t)
            p1 = math.expm1(h)
            p2 = p1 / h - 1
            p3 = p2 / h - 0.5
            return a_t / a_s * x - s_t * (p1 * q[0] + p2 * d1 + p3 * d2) + mu * (1 - a_t / a_s)
        z = torch.randn(x.shape, generator=generator, dtype=torch.float32).double()
        if param == "data":
            p1 = -math.expm1(-2 * h)
            p2 = 1 - p1 / 2 / h
            out = s_t / s_s * math.exp(-h) * x + a_t * p1 * q[0] + a_t * p2 * d1 + s_t * math.sqrt(p1) * z
            return out + mu * (1 - a_t / a_s * math.exp(-2 * h) - a_t * p1)
        p1 = math.expm1(h)
        p2 = p1 / h - 1
        out = a_t / a_s * x - 2 * s_t * p1 * q[0] - 2 * s_t * p2 * d1 + s_t * math.sqrt(math.expm1(2 * h)) * z
        return out + mu * (1 - a_t / a_s)

    x = mu + sg[0] * z
    for i in range(1, steps + 1):
        x = step(x, i, min(order, i))
    return x


def noise(n=16, seed=0, dtype=torch.float64):
    return torch.randn(n, DIM, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


CASES = [(o, False, p) for o in (1, 2, 3) for p in ("data", "noise")] + [(o, True, p) for o in (1, 2)
                                                                         for p in ("data", "noise")]


@pytest.mark.parametrize("order,sde,param", CASES)
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_matches_the_authors_sampler(order, sde, param, prediction):
    model = exact_model(prediction)
    for steps in (10, 12):
        got = ds.sample(model, noise(), steps, solver="mrs", schedule=SCHEDULE, prediction=prediction, mu=MU,
                        order=order, sde=sde, parameterization=param, backend="reference",
                        generator=torch.Generator().manual_seed(3))
        want = authors_mrs(model, noise(), MU, SCHEDULE, steps, order, sde, param, prediction,
                           torch.Generator().manual_seed(3))
        assert (got - want).abs().max() < 1e-10 * want.abs().max()


@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "score"])
def test_is_dpm_solver_on_the_scaled_residual(prediction):
    """mu + sigma_inf * (DPM-Solver++ 3M on y = (x - mu) / sigma_inf with the VP model of y): the same sample."""
    sch = MeanReverting(sigma_inf=0.7, num_train_timesteps=50, theta_schedule="linear", eps=0.01)
    model = exact_model(prediction, sch)
    kappa = {"eps": 1.0, "x0": sch.sigma_inf, "v": sch.sigma_inf, "score": 1 / sch.sigma_inf}[prediction]
    shift = MU if prediction == "x0" else 0.0
    y_model = lambda y, t: (model(MU + sch.sigma_inf * y, t) - shift) / kappa  # noqa: E731
    grid = mrs_grid(sch, 9, "linear-lambda")
    plan = dpm_steps(grid, prediction, algorithm="dpmsolver++", order=3, solver_type="heun",
                     lower_order_final=False, final_sigma_zero=False)
    z = noise()
    want = MU + sch.sigma_inf * run_plan(y_model, z * grid.alpha_sigma(0)[1], plan, backend="reference")
    got = ds.sample(model, z, 9, solver="mrs", schedule=sch, prediction=prediction, mu=MU, order=3,
                    spacing="linear-lambda", backend="reference")
    assert (got - want).abs().max() < 1e-12


@pytest.mark.parametrize("sde", [False, True])
def test_every_backend_float32(backend, sde):
    model = exact_model()
    kw = dict(solver="mrs", schedule=SCHEDULE, mu=MU, order=2, sde=sde)
    want = ds.sample(model, noise(), 10, backend="reference", generator=torch.Generator().manual_seed(5), **kw)
    got = ds.sample(model, noise(dtype=torch.float32), 10, backend=backend,
                    generator=torch.Generator().manual_seed(5), **kw)
    assert got.dtype == torch.float32
    assert (got.double() - want).norm() / want.norm() < 1e-5


def test_mu_broadcasts_over_the_batch_and_per_sample():
    model = exact_model()
    z = noise(4)
    shared = ds.sample(model, z, 10, solver="mrs", schedule=SCHEDULE, mu=MU, backend="reference")
    rows = ds.sample(model, z, 10, solver="mrs", schedule=SCHEDULE, mu=MU.expand(4, DIM).clone(),
                     backend="reference")
    assert torch.equal(shared, rows)


def test_ode_orders_on_the_restoration_target():
    """ODE error against a 1000-step third-order run from the same x_T: the fitted slopes of the authors'
    linspace grid are the solver orders (measured: 1.04, 1.95, 2.98)."""
    model, z = exact_model(), noise(256)
    run = lambda steps, order: ds.sample(model, z, steps, solver="mrs", schedule=SCHEDULE, mu=MU,  # noqa: E731
                                         order=order, backend="reference")
    ref = run(1000, 3)
    steps = [10, 20, 40, 80]
    for order, lowest in ((1, 0.85), (2, 1.7), (3, 2.6)):
        errs = [((run(n, order) - ref).norm() / ref.norm()).item() for n in steps]
        slope = -np.polyfit(np.log(steps), np.log(errs), 1)[0]
        assert slope > lowest, (order, errs)


def test_sde_samples_the_exact_restoration_posterior():
    """x0 - mu ~ the residual mixture: SDE samples at 50 steps are near exact ones in sliced W2 (two exact sets
    of 4000 differ by 0.007; measured 0.0075), at 3 steps far (0.15)."""
    from diffsampler.targets import sliced_wasserstein

    model = exact_model()
    exact = RESIDUAL.sample(4000, torch.Generator().manual_seed(1)) + MU
    w2 = {}
    for steps in (3, 50):
        x = ds.sample(model, noise(4000, seed=2), steps, solver="mrs", schedule=SCHEDULE, mu=MU, sde=True,
                      generator=torch.Generator().manual_seed(4))
        w2[steps] = sliced_wasserstein(x, exact)
    assert w2[50] < 0.012 and w2[3] > 0.1, w2


def test_denoise_last_returns_the_last_data_prediction():
    model = exact_model()
    kw = dict(solver="mrs", schedule=SCHEDULE, mu=MU, backend="reference")
    x = ds.sample(model, noise(), 10, denoise_last=True, **kw)
    # the same loop stopped before its last step, then the exact x0 at t_9
    grid = mrs_grid(SCHEDULE, 10)
    a, s = SCHEDULE.alpha_sigma(grid.timesteps[-1])
    plan = ds.solvers.make_plan("mrs", SCHEDULE, 10, "eps")
    from dataclasses import replace

    head = replace(plan, steps=plan.steps[:-1])
    x9 = run_plan(model, noise(), head, mu=MU, backend="reference")
    t9 = torch.tensor(grid.timesteps[-1], dtype=torch.float64)
    want = MU + (x9 - MU - s * model(x9, t9)) / a
    assert (x - want).abs().max() < 1e-12


def test_schedule_matches_ir_sde():
    """IR-SDE's cosine thetas, dt with alpha_T = eps, sigma_bar = sigma_inf sqrt(1 - alpha^2)."""
    sch = MeanReverting(sigma_inf=0.2, num_train_timesteps=100)
    n = 100
    x = torch.linspace(0, n + 2, n + 3, dtype=torch.float64)
    ac = torch.cos((x / (n + 2) + 0.008) / 1.008 * math.pi * 0.5) ** 2
    thetas = 1 - (ac / ac[0])[1:-1]
    bars = torch.cumsum(thetas, 0) * (-math.log(0.005) / thetas.sum())
    for t in (0, 1, 37, 100):
        alpha, sigma = sch.alpha_sigma(t)
        assert alpha == pytest.approx(math.exp(-bars[t]), rel=1e-12)
        assert sigma == pytest.approx(0.2 * math.sqrt(1 - math.exp(-2 * bars[t])), rel=1e-12)
    assert sch.alpha_sigma(100)[0] == pytest.approx(0.005, rel=1e-12)
    a, s = sch.alpha_sigma_at(torch.tensor([12.25, 80.0]))
    assert a[0].item() == pytest.approx(sch.alpha_sigma(12.25)[0], rel=1e-12)
    assert s[1].item() == pytest.approx(sch.alpha_sigma(80)[1], rel=1e-12)


def test_bad_input():
    model = exact_model()
    kw = dict(solver="mrs", schedule=SCHEDULE)
    with pytest.raises(ValueError, match="needs mu= a tensor"):
        ds.sample(model, noise(), 5, **kw)
    with pytest.raises(ValueError, match="does not broadcast"):
        ds.sample(model, noise(), 5, mu=torch.zeros(3), **kw)
    with pytest.raises(ValueError, match="mu is the condition"):
        ds.sample(model, noise(), 5, mu=MU, solver="ddim")
    with pytest.raises(ValueError, match="orders 1 and 2"):
        ds.sample(model, noise(), 5, mu=MU, order=3, sde=True, **kw)
    with pytest.raises(ValueError, match="parameterization"):
        ds.sample(model, noise(), 5, mu=MU, parameterization="velocity", **kw)
    with pytest.raises(ValueError, match="spacing"):
        ds.sample(model, noise(), 5, mu=MU, spacing="karras", **kw)
    with pytest.raises(ValueError, match="prediction"):
        ds.sample(model, noise(), 5, mu=MU, prediction="flow", **kw)
    with pytest.raises(ValueError, match="does not take clip"):
        ds.sample(model, noise(), 5, mu=MU, clip=1.0, **kw)
    with pytest.raises(ValueError, match="clips every timestep"):
        ds.sample(model, noise(), 5, mu=MU, lambda_min=10.0, **kw)
    with pytest.raises(ValueError, match="needs a .*MeanReverting"):
        ds.sample(model, noise(), 5, mu=MU, solver="mrs", schedule=ds.schedules.VP.linear())
    with pytest.raises(ValueError, match="cuda_graph does not take mu"):
        ds.sample(model, noise(), 5, mu=MU, cuda_graph=True, **kw)
    from diffsampler.serve import BatchSampler

    with pytest.raises(ValueError, match="mean-reverting requests"):
        BatchSampler(model, 2, (DIM,), dtype=torch.float64).submit(noise(1)[0], 10, "mrs", SCHEDULE)
    for bad in (dict(sigma_inf=0.0), dict(num_train_timesteps=1), dict(theta_schedule="sigmoid"), dict(eps=1.0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            MeanReverting(**bad)
    with pytest.raises(ValueError, match="t must be in"):
        SCHEDULE.alpha_sigma(101)
