"""USF solver plans (Liu et al. 2023): the named multistep solvers as USF plans, the authors' sampling loop written
out in float64 (uni_sampler.update / get_diff_derivative / relax_derivative / sample), convergence orders,
the analytical first step, and the refused parts of the space."""

import functools
import math

import numpy as np
import pytest
import torch

import diffsampler as ds
from diffsampler.guidance import Guidance
from diffsampler.schedules import VP
from diffsampler.solvers import Grid, usf
from diffsampler.solvers.usf import Derivative, StepSpec
from diffsampler.targets import GaussianMixture

TARGET = GaussianMixture.random(dim=8, modes=4, seed=1)


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def noise(n=16, dtype=torch.float64, seed=0):
    return torch.randn(n, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


# --- the authors' loop, written out with lists in float64 -------------------------------------------------------

def taylor_update(xs, ms, lams, alphas, sigmas, target, spec):
    """uni_sampler.update: the Taylor step of `spec` from its start point to `target` = (lambda, alpha, sigma);
    the lists are indexed as USF's, -1 the newest point."""
    s = spec.start
    lam_t, alpha_t, sigma_t = target
    h = lam_t - lams[s]
    data = spec.prediction == "x0"
    hh = -h if data else h
    phis, prev, fac = [], torch.exp(hh), 1
    for i in range(spec.order):  # phi_{i+1}(hh), the authors' recursion
        fac *= max(i, 1)
        prev = (prev - 1 / fac) / hh
        phis.append(prev)
    if data:
        x = (sigma_t / sigmas[s]) * xs[s] + alpha_t * h * phis[0] * ms[s]
    else:
        x = (alpha_t / alphas[s]) * xs[s] - sigma_t * h * phis[0] * ms[s]
    for i in range(1, spec.order):
        d = spec.derivatives[i - 1]  # get_diff_derivative: Taylor-expand the points to the start, solve
        dh = torch.stack([lams[j] - lams[s] for j in d.points])
        df = torch.stack([ms[j] - ms[s] for j in d.points], dim=1)
        fac, rows = 1, []
        for k in range(1, len(d.points) + 1):
            fac *= k
            rows.append(dh**k / fac)
        b = torch.zeros(len(d.points), dtype=torch.float64)
        b[i - 1] = 1.0
        a = torch.linalg.solve(torch.stack(rows), b)
        der = torch.einsum("k,bkc->bc", a, df)
        if i == 1 and d.relaxation != "none":  # relax_derivative
            if d.relaxation == "linear":
                der = der * (1 + d.coefficient * h)
            else:
                r = -h if data else h
                factor = 0.5 * r * r if d.relaxation == "unipc-bh1" else 0.5 * r * torch.expm1(r)
                der = der * factor / (torch.expm1(r) - r)
        if data:
            x = x + alpha_t * h ** (i + 1) * phis[i] * der
        else:
            x = x - sigma_t * h ** (i + 1) * phis[i] * der
    return x


def usf_loop(model, x, sigmas_list, specs, afs=False):
    """uni_sampler.sample on a continuous grid of VP sigma ratios (the model gets the ratio), multistep start
    points, pseudo correctors; afs: x0 = 0 at the first point (no model call there)."""
    ratio = torch.tensor(sigmas_list, dtype=torch.float64)
    alpha_all = 1 / (1 + ratio**2).sqrt()
    sigma_all = ratio * alpha_all
    lam_all = torch.log(alpha_all / sigma_all)
    data = specs[0].prediction == "x0"

    def predict(x, i):
        eps = model(x, ratio[i])
        return (x - sigma_all[i] * eps) / alpha_all[i] if data else eps

    x = x.double()
    xs, lams, alphas, sigmas = [x], [lam_all[0]], [alpha_all[0]], [sigma_all[0]]
    ms = [(torch.zeros_like(x) if data else x / sigma_all[0]) if afs else predict(x, 0)]
    for i, spec in enumerate(specs):
        target = (lam_all[i + 1], alpha_all[i + 1], sigma_all[i + 1])
        x = taylor_update(xs, ms, lams, alphas, sigmas, target, spec)
        if i == len(specs) - 1:
            return x
        xs.append(x)
        ms.append(predict(x, i + 1))
        lams.append(lam_all[i + 1])
        alphas.append(alpha_all[i + 1])
        sigmas.append(sigma_all[i + 1])
        if spec.corrector is not None:  # the pseudo corrector: redo the step with the new point, no model call
            xs[-1] = taylor_update(xs, ms, lams, alphas, sigmas, target, spec.corrector)


def counted(model):
    calls = []

    def fn(x, t):
        calls.append(float(t))
        return model(x, t)

    return fn, calls


SIGMAS = list(np.exp(np.linspace(math.log(12.0), math.log(0.03), 9)))


def mixed(kind):
    """8 steps over the whole space: orders 1-4, every relaxation, pseudo and custom correctors."""
    return (
        StepSpec(1, kind, corrector="pseudo"),
        StepSpec(2, kind, (Derivative((-2,), "dpmsolver-2"),), corrector="pseudo"),
        StepSpec(3, kind, (Derivative((-2,), "linear", 0.3), Derivative((-2, -3))), corrector="pseudo"),
        StepSpec(4, kind),
        StepSpec(2, kind, (Derivative((-2,), "unipc-bh1"),)),
        StepSpec(3, kind, (Derivative((-2, -3), "unipc-bh2"), Derivative((-2, -3))),
                 corrector=StepSpec(3, kind, (Derivative((-1,), "unipc-bh1"), Derivative((-3, -1))), start=-2)),
        StepSpec(2, kind, corrector="pseudo"),
        StepSpec(1, kind),
    )


@pytest.mark.parametrize("kind", ["x0", "eps"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_plan_is_the_authors_loop(kind, dtype, backend):
    if dtype == torch.float64 and backend != "reference":
        pytest.skip("the fused backends compute in float32")
    plan = usf.Plan(mixed(kind), Grid.from_sigmas(SIGMAS))
    model, calls = counted(TARGET.model(None, "eps"))
    x = noise(dtype=dtype)
    got = ds.sample(model, x, solver=plan, backend=backend)
    want = usf_loop(TARGET.model(None, "eps"), x, SIGMAS, plan.steps)
    assert len(calls) == plan.nfe == 8
    assert rel(got, want) < (1e-10 if dtype == torch.float64 else 2e-5)
    assert rel(want, usf_loop(TARGET.model(None, "eps"), x, SIGMAS, [StepSpec(1, kind)] * 8)) > 1e-3  # not DDIM


@pytest.mark.parametrize("prediction", ["x0", "v"])
def test_plan_takes_every_model_prediction(prediction):
    plan = usf.Plan(mixed("x0"), Grid.from_sigmas(SIGMAS))
    x = noise()
    want = usf_loop(TARGET.model(None, "eps"), x, SIGMAS, plan.steps)
    assert rel(ds.sample(TARGET.model(None, prediction), x, solver=plan, prediction=prediction), want) < 1e-10


@pytest.mark.parametrize("kind", ["x0", "eps"])
def test_analytical_first_step(kind, backend):
    specs = (StepSpec(1, kind, corrector="pseudo"), StepSpec(2, kind), StepSpec(2, kind, corrector="pseudo"),
             StepSpec(3, kind), StepSpec(2, kind), StepSpec(3, kind), StepSpec(2, kind), StepSpec(1, kind))
    if kind == "x0":  # x0 = 0 at the first point: every later step may read it
        specs = specs[:1] + (StepSpec(2, kind, corrector="pseudo"), StepSpec(3, kind, corrector="pseudo")) + specs[3:]
    plan = usf.Plan(specs, Grid.from_sigmas(SIGMAS), afs=True)
    dtype = torch.float64 if backend == "reference" else torch.float32
    model, calls = counted(TARGET.model(None, "eps"))
    x = noise(dtype=dtype)
    got = ds.sample(model, x, solver=plan, backend=backend)
    want = usf_loop(TARGET.model(None, "eps"), x, SIGMAS, specs, afs=True)
    assert plan.nfe == 7 and len(calls) == 7 and calls[0] == pytest.approx(SIGMAS[1], rel=1e-6)
    assert rel(got, want) < (1e-10 if dtype == torch.float64 else 2e-5)


STEPS = (5, 8, 12, 20)


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("name, preset, options", [
    ("dpmpp_2m", lambda n, s: usf.dpmpp_2m(n, s), {}),
    ("dpmpp_3m", lambda n, s: usf.dpmpp_3m(n, s), dict(phi3="taylor")),
    ("unipc", lambda n, s: usf.unipc(n, "bh1", schedule=s), dict(variant="bh1")),
    ("unipc", lambda n, s: usf.unipc(n, "bh2", schedule=s), dict(variant="bh2")),
    ("unipc", lambda n, s: usf.unipc(n, "bh2", order=3, schedule=s), dict(variant="bh2", order=3)),
    ("unipc", lambda n, s: usf.unipc(n, "bh1", corrector=False, schedule=s), dict(variant="bh1", corrector=False)),
    ("deis", lambda n, s: usf.deis(n, 2, s), {}),
    ("deis", lambda n, s: usf.deis(n, 3, s), dict(order=3)),
])
def test_named_solver_is_its_usf_plan(steps, name, preset, options):
    sched = VP.linear()
    model = TARGET.model(sched, "eps")
    x = noise()
    want = ds.sample(model, x, steps, solver=name, schedule=sched, **options)
    got = ds.sample(model, x, solver=preset(steps, sched))
    assert rel(got, want) < 1e-10
    assert rel(got, ds.sample(model, x, steps, solver="ddim", schedule=sched)) > 1e-4  # a different solver


def test_default_dpmpp_3m_is_not_in_the_space():
    """k-diffusion's / diffusers' 3M halves the D2 weight; USF relaxes the first derivative only."""
    sched = VP.linear()
    model, x = TARGET.model(sched, "eps"), noise()
    got = ds.sample(model, x, solver=usf.dpmpp_3m(8, sched))
    assert rel(got, ds.sample(model, x, 8, solver="dpmpp_3m", schedule=sched)) > 1e-8


SMOOTH = GaussianMixture(torch.ones(3), 0.4 * torch.randn(3, 8, generator=torch.Generator().manual_seed(2),
                                                      dtype=torch.float64), torch.tensor([0.3, 0.4, 0.5]))


@functools.lru_cache(maxsize=1)
def ode_reference():
    """1600 steps of Taylor order 4 from sigma 10 to 0.05, uniform in lambda (wide modes: no sample changes mode
    between step counts, so the error measures the integrator)."""
    n = 1600
    return ds.sample(SMOOTH.model(None, "eps"), noise(64, seed=3), solver=usf.Plan(
        [StepSpec(min(i + 1, 4), "x0") for i in range(n)], Grid.uniform_lambda(10.0, 0.05, n)))


def ode_errors(specs_of, steps):
    ref = ode_reference()
    return [rel(ds.sample(SMOOTH.model(None, "eps"), noise(64, seed=3),
                          solver=usf.Plan(specs_of(n), Grid.uniform_lambda(10.0, 0.05, n))), ref) for n in steps]


@pytest.mark.parametrize("kind, order, relaxation, corrector, want", [
    ("x0", 1, "none", None, 1), ("x0", 2, "none", None, 2), ("x0", 2, "dpmsolver-2", None, 2),
    ("x0", 3, "none", None, 3), ("x0", 4, "none", None, 4), ("eps", 3, "none", None, 3),
    ("x0", 2, "unipc-bh2", "pseudo", 3), ("x0", 1, "none", "pseudo", 2)])
def test_convergence_order(kind, order, relaxation, corrector, want):
    def specs(n):
        out = []
        for i in range(n):
            k = min(order, i + 1)
            ders = tuple(Derivative(tuple(range(-2, -k - 1, -1)), relaxation if j == 0 else "none")
                         for j in range(k - 1))
            out.append(StepSpec(k, kind, ders, corrector=corrector if i < n - 1 else None))
        return out

    steps = (8, 16, 32, 64)
    errors = ode_errors(specs, steps)
    slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert want - 0.5 < slope < want + 0.8, (errors, slope)


def test_plan_is_cached_and_hashable():
    import importlib

    sample_module = importlib.import_module("diffsampler.sample")

    a, b = usf.dpmpp_2m(6, VP.linear()), usf.dpmpp_2m(6, VP.linear())
    assert a == b and hash(a) == hash(b)
    model, x = TARGET.model(VP.linear(), "eps"), noise()
    ds.sample(model, x, solver=a)
    before = len(sample_module._PLAN_IDS)
    ds.sample(model, x, solver=b)
    assert len(sample_module._PLAN_IDS) == before


GRID = Grid.from_sigmas(SIGMAS)


@pytest.mark.parametrize("build, match", [
    (lambda: StepSpec(5), "order"),
    (lambda: StepSpec(2, "dpmv3"), "DPM-Solver-v3"),
    (lambda: StepSpec(2, "noise"), "prediction"),
    (lambda: StepSpec(2, start=-3), "singlestep"),
    (lambda: StepSpec(2, corrector="implicit"), "implicit"),
    (lambda: StepSpec(2, corrector="always"), "corrector"),
    (lambda: StepSpec(3, derivatives=(Derivative((-2,)),)), "derivatives"),
    (lambda: StepSpec(3, derivatives=(Derivative((-2,)), Derivative((-2,)))), "at least 2 points"),
    (lambda: StepSpec(3, derivatives=(Derivative((-2, -3)), Derivative((-2, -3), "unipc-bh1"))), "only the first"),
    (lambda: StepSpec(2, derivatives=(Derivative((-1,)),)), "start point"),
    (lambda: StepSpec(2, "x0", corrector=StepSpec(2, "x0", (Derivative((-3,)),), start=-2)), "new point -1"),
    (lambda: StepSpec(2, "x0", corrector=StepSpec(2, "eps", start=-2)), "corrector must start"),
    (lambda: Derivative((-2, -2)), "distinct"),
    (lambda: Derivative((0,)), "negative"),
    (lambda: Derivative((-2, -3, -4, -5)), "at most 3"),
    (lambda: Derivative((-2,), "cubic"), "relaxation"),
    (lambda: Derivative((-2,), "none", 0.5), "coefficient"),
    (lambda: usf.Plan([StepSpec(1)] * 7, GRID), "one StepSpec per grid step"),
    (lambda: usf.Plan([StepSpec(1)] * 8, SIGMAS), "grid"),
    (lambda: usf.Plan([StepSpec(1, "x0")] * 4 + [StepSpec(1, "eps")] * 4, GRID), "one prediction type"),
    (lambda: usf.Plan([StepSpec(1, corrector="pseudo")] * 8, GRID), "last step"),
    (lambda: usf.Plan([StepSpec(2)] * 8, GRID), "before the first model call"),
    (lambda: usf.Plan([StepSpec(min(i + 1, 2), corrector="pseudo") for i in range(7)] + [StepSpec(1)], GRID,
                      afs="yes"), "afs"),
    (lambda: usf.Plan([StepSpec(2)] + [StepSpec(1)] * 7, GRID, afs=True), "afs"),
    (lambda: usf.Plan([StepSpec(min(i + 1, 3), "eps") for i in range(8)], GRID, afs=True), "afs with prediction"),
    (lambda: usf.Plan([StepSpec(min(i + 1, 4), corrector="pseudo") for i in range(7)] + [StepSpec(1)], GRID),
     "at most 3"),
    (lambda: usf.Plan([StepSpec(min(i + 1, 2)) for i in range(8)], Grid.from_sigmas(SIGMAS[:-1] + [0.0])),
     "sigma = 0"),
    (lambda: usf.Plan([StepSpec(1)] * 8, Grid.from_sigmas(SIGMAS[:4] + SIGMAS[3:8])), "increase strictly"),
    (lambda: ds.sample(TARGET.model(None), noise(), solver=usf.Plan([StepSpec(1)] * 8, GRID), order=2),
     "no solver options"),
    (lambda: ds.sample(TARGET.model(None), noise(), solver=object()), "usf.Plan"),
    (lambda: usf.unipc(6, "bh3"), "variant"),
    (lambda: ds.sample(TARGET.model(None), noise(), solver=usf.Plan([StepSpec(1)] * 8, GRID),
                       time_shift=ds.solvers.TimeShift()), "schedule="),
    (lambda: ds.sample(TARGET.model(None), noise(), solver=usf.Plan([StepSpec(1)] * 8, GRID),
                       guidance=Guidance(lambda x, t: torch.zeros_like(x))), "schedule="),
])
def test_bad_arguments(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_eps_plan_lands_on_sigma_zero():
    """The first-order noise-prediction step to sigma = 0 is its limit x_s / alpha_s - rho_s eps: DDIM, as the
    data-prediction one."""
    sched = VP.linear()
    model, x = TARGET.model(sched, "eps"), noise()
    eps, data = usf.dpmpp_2m(6, sched), usf.dpmpp_2m(6, sched)
    eps = usf.Plan([StepSpec(1, "eps")] * 6, eps.grid)
    data = usf.Plan([StepSpec(1, "x0")] * 6, data.grid)
    assert rel(ds.sample(model, x, solver=eps), ds.sample(model, x, solver=data)) < 1e-12


def search_setup():
    sched = VP.linear()
    return sched, TARGET.model(sched, "eps"), noise(32, seed=10), noise(256, seed=11)


def test_search_beats_dpmpp_2m_on_held_out_samples():
    from diffsampler.solvers.usf_search import median_relative_error

    sched, model, fit, held_out = search_setup()
    plan, log = usf.search(model, fit, sched, 5, budget=40, seed=0)
    assert plan.nfe == 5 and log["evaluations"] == 40
    assert log["model_calls"] == 500 + 5 * 40  # the reference, then nfe calls per evaluated plan
    assert log["best_metric"] == min(e["metric"] for e in log["entries"])
    later = [e for e in log["entries"] if e["generation"] > 0]
    assert later and all(e["predicted"] is not None for e in later)  # children chosen by the predictor
    ref = ds.sample(model, held_out, 500, solver="dpmpp_2m", schedule=sched)
    searched = median_relative_error(ds.sample(model, held_out, solver=plan), ref)
    fixed = median_relative_error(ds.sample(model, held_out, 5, solver="dpmpp_2m", schedule=sched), ref)
    assert searched < 0.7 * fixed, (searched, fixed)
    again, _ = usf.search(model, fit, sched, 5, budget=40, seed=0)
    assert again == plan  # deterministic given the seed


@pytest.mark.parametrize("kwargs, match", [
    (dict(schedule="vp"), "schedule"), (dict(nfe=1), "nfe"), (dict(budget=0), "budget"),
    (dict(metric="l2"), "metric"), (dict(reference_steps=3), "reference_steps")])
def test_bad_search_arguments(kwargs, match):
    sched, model, fit, _ = search_setup()
    args = dict(model=model, x_fit=fit, schedule=sched, nfe=5)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        usf.search(**args)
