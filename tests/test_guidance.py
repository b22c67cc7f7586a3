"""Gradient guidance and minority guidance: with the exact log p(y | x_t) of a linear-Gaussian observation of a
Gaussian prior, the guided sampler samples the exact posterior (every output form, VP / EDM / Flow, every
backend); minority scores, classes, the noisy classifier, and guidance raising the share of a rare mode."""

import math

import pytest
import torch

import diffsampler as ds
from diffsampler import minority
from diffsampler.guidance import Guidance, alpha_sigma_of, output_shift
from diffsampler.schedules import EDM, VP, Flow
from diffsampler.targets import GaussianMixture

DIM, S0, TAU = 3, 0.8, 0.3
MEAN = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64)
Y = torch.tensor([1.0, 0.4, -0.6], dtype=torch.float64)
PRIOR = GaussianMixture(torch.ones(1), MEAN[None], torch.tensor([S0]))
POST_VAR = 1 / (1 / S0**2 + 1 / TAU**2)
POST_MEAN = POST_VAR * (MEAN / S0**2 + Y / TAU**2)


def exact_grad(schedule):
    """grad_x log p(y | x_t) for y = x0 + N(0, TAU^2 I), x0 ~ N(MEAN, S0^2 I)."""
    def grad(x, t):
        a, s = alpha_sigma_of(schedule, t)
        k = a * S0**2 / (a * a * S0**2 + s * s)  # d E[x0 | x_t] / d x_t
        m = MEAN + k * (x.double() - a * MEAN)
        v = S0**2 * s * s / (a * a * S0**2 + s * s)
        return (k * (Y - m) / (v + TAU**2)).to(x.dtype)

    return grad


def flow_model(gm):
    v = gm.flow_model()
    return lambda x, t: v(x, t / 1000)


CASES = [("dpmpp_2m", VP.linear(), p) for p in ("eps", "x0", "v", "score")] + [
    ("heun", EDM(), "x0"), ("flow_euler", Flow(), "flow")]


@pytest.mark.parametrize("solver,schedule,prediction", CASES, ids=lambda v: str(v)[:12])
def test_guided_sampler_samples_the_exact_posterior(solver, schedule, prediction):
    if isinstance(schedule, Flow):
        model = flow_model(PRIOR)
    elif isinstance(schedule, EDM):
        model = lambda x, t: PRIOR.posterior_mean(x, torch.ones(()), t.double()).to(x.dtype)  # noqa: E731
    else:
        model = PRIOR.model(schedule, prediction)
    z = torch.randn(20000, DIM, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    steps = 400 if solver == "flow_euler" else 100  # first order
    x = ds.sample(model, z, steps, solver=solver, schedule=schedule, prediction=prediction,
                  guidance=Guidance(exact_grad(schedule)), backend="reference")
    se = math.sqrt(POST_VAR / 20000)
    assert (x.mean(0) - POST_MEAN).abs().max() < 5 * se + 2e-3, (x.mean(0), POST_MEAN)
    assert (x.std(0) / math.sqrt(POST_VAR) - 1).abs().max() < 0.02, x.std(0)  # 40 steps: 4 % low
    unguided = ds.sample(model, z, 20, solver=solver, schedule=schedule, prediction=prediction, backend="reference")
    assert (unguided.mean(0) - MEAN).abs().max() < 0.03  # the test can tell guided from unguided


def test_every_output_form_gives_the_same_guided_path():
    """The shift table: the exact model in each output form, guided, takes the same ODE path (float64)."""
    sch = VP.linear()
    z = torch.randn(64, DIM, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    outs = [ds.sample(PRIOR.model(sch, p), z, 12, schedule=sch, prediction=p, guidance=Guidance(exact_grad(sch), 0.7),
                      backend="reference") for p in ("eps", "x0", "v", "score")]
    for x in outs[1:]:
        assert (x - outs[0]).abs().max() < 1e-7  # unguided, the forms differ by 3e-8 (float32 alphas)


def test_every_backend_float32(backend):
    sch = VP.linear()
    g = Guidance(exact_grad(sch), scale=lambda t: 1.0 if t >= 200 else 0.5)
    z = torch.randn(32, DIM, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    want = ds.sample(PRIOR.model(sch), z, 15, schedule=sch, guidance=g, backend="reference")
    got = ds.sample(PRIOR.model(sch), z.float(), 15, schedule=sch, guidance=g, backend=backend)
    assert (got.double() - want).norm() / want.norm() < 1e-5


def test_on_x0_is_the_gradient_through_the_tweedie_estimate():
    """Guidance.on_x0 with log N(y; x0, tau^2) equals grad_x of it through E[x0 | x_t] written out."""
    sch = VP.linear()
    model = PRIOR.model(sch, "eps")
    x = torch.randn(5, DIM, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    t = torch.tensor(400)
    ll = lambda x0: -((x0 - Y) ** 2).sum(1) / (2 * TAU**2)  # noqa: E731
    out, g, w = Guidance.on_x0(ll, scale=1.0).bind(model, sch, "eps")(x, t, 400)
    got = out + w * g
    a, s = alpha_sigma_of(sch, t)
    k = a * S0**2 / (a * a * S0**2 + s * s)
    m = MEAN + k * (x - a * MEAN)
    want = model(x, t) + output_shift("eps", a, s) * k * (Y - m) / TAU**2
    assert (got - want).abs().max() < 1e-6 * want.abs().max()  # float32 alphas in the schedule


def test_minority_score_classes_and_guidance_raise_the_rare_share():
    sch = VP.linear()
    means = torch.tensor([[-1.0, 0.0], [1.0, 0.0], [0.0, 1.2], [0.0, -1.3]], dtype=torch.float64)
    gm = GaussianMixture(torch.tensor([0.32, 0.32, 0.32, 0.04]), means, torch.full((4,), 0.15))
    model = gm.model(sch, "eps")
    x0 = gm.sample(6000, torch.Generator().manual_seed(0))
    rare = ((x0[:, None] - means) ** 2).sum(-1).argmin(1) == 3
    scores = minority.minority_score(x0, model, sch, 600, generator=torch.Generator().manual_seed(1))
    labels, thresholds = minority.minority_classes(scores, 10)
    assert torch.bincount(labels, minlength=10).min() >= 590  # quantile classes are equal-sized
    assert rare[labels == 9].double().mean() > 0.3 > rare[labels < 8].double().mean() * 10
    clf = minority.train_classifier(x0, labels, sch, 10, steps=800)
    z = torch.randn(3000, 2, generator=torch.Generator().manual_seed(5))

    def share(scale):
        x = ds.sample(model, z, 30, schedule=sch, guidance=minority.minority_guidance(clf, 9, scale))
        return (((x.double()[:, None] - means) ** 2).sum(-1).argmin(1) == 3).double().mean().item()

    plain, guided = share(0.0), share(3.0)
    assert abs(plain - 0.04) < 0.015 and guided > 0.4, (plain, guided)


def test_exact_model_with_one_time_per_row():
    """targets.GaussianMixture.model with a time per sample is each row's own call (guidance's per-sample kappa)."""
    sch = VP.linear()
    x, t = torch.randn(3, DIM, dtype=torch.float64), torch.tensor([10, 500, 900])
    for prediction in ("eps", "x0", "v", "score"):
        model = PRIOR.model(sch, prediction)
        rows = torch.stack([model(x[i:i + 1], t[i])[0] for i in range(3)])
        assert torch.allclose(model(x, t), rows, atol=1e-12)


def test_bad_input():
    sch = VP.linear()
    model = PRIOR.model(sch)
    x = torch.randn(4, DIM, dtype=torch.float64)
    with pytest.raises(ValueError, match="one of grad="):
        Guidance()
    with pytest.raises(ValueError, match="scale"):
        Guidance(exact_grad(sch), scale=float("nan"))
    with pytest.raises(ValueError, match="guidance must be"):
        ds.sample(model, x, 5, guidance=lambda x, t: x)
    with pytest.raises(ValueError, match="x's shape"):
        ds.sample(model, x, 5, guidance=Guidance(lambda x, t: x[:, :1]))
    with pytest.raises(ValueError, match="one log-probability per sample"):
        ds.sample(model, x, 5, guidance=Guidance.classifier(lambda x, t: x.sum()))
    with pytest.raises(ValueError, match="integer training timesteps"):
        ds.sample(model, x, 5, solver="euler", guidance=Guidance(exact_grad(sch)))
    with pytest.raises(ValueError, match="guidance needs a VP"):
        ds.sample(model, x, 5, solver="mrs", mu=x, guidance=Guidance(exact_grad(sch)))
    with pytest.raises(ValueError, match="num_classes"):
        minority.minority_classes(torch.rand(5), 10)
    with pytest.raises(ValueError, match="t must be"):
        minority.minority_score(x, model, sch, 1000)
    with pytest.raises(ValueError, match="out of range"):
        ds.sample(model, x, 5, guidance=minority.minority_guidance(lambda x, t: torch.zeros(len(x), 3), 5))


# ---- the guide term inside the fused op: out + w guide, in the same pass ----


def _hand_guided(model, schedule, prediction, grad, scale):
    """model(x, t) returning out + scale kappa g, the guided output written out (the op's guide term undone)."""
    def guided(x, t):
        a, s = (v.double() for v in alpha_sigma_of(schedule, t))
        return model(x, t) + scale * output_shift(prediction, a, s).to(x) * grad(x, t)

    return guided


@pytest.mark.parametrize("solver", ["dpmpp_2m", "unipc", "dpmpp_3m", "dpmv3", "lml", "lml_corrector"])
def test_fused_guide_equals_the_guided_output(solver):
    """sample(guidance=) with the guide inside the op equals the solver run on the hand-guided model (float64):
    multistep solvers with a state, DPM-Solver-v3's ems steps (the guide added first), LML's direction and
    corrector modes (its Gram and its Langevin steps see the guided output too)."""
    sch = VP.linear()
    model = PRIOR.model(sch, "eps")
    z = torch.randn(64, DIM, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    kw = dict(schedule=sch, prediction="eps", backend="reference")
    if solver == "dpmv3":
        from diffsampler.solvers.dpmv3 import fit_ems

        kw["ems"] = fit_ems(model, z[:32], sch, points=30)
    if solver.startswith("lml"):
        kw["lml"] = ds.LML(rank=2, mode="corrector", n_steps=1) if solver == "lml_corrector" else ds.LML(rank=2)
        solver = "ddim"
    g = exact_grad(sch)
    seed = lambda: torch.Generator().manual_seed(2)  # noqa: E731  (the corrector's Langevin noise)
    got = ds.sample(model, z, 10, solver=solver, guidance=Guidance(g, scale=0.7), generator=seed(), **kw)
    want = ds.sample(_hand_guided(model, sch, "eps", g, 0.7), z, 10, solver=solver, generator=seed(), **kw)
    assert (got - want).abs().max() < 1e-10 * want.abs().max()


def test_guide_operand_on_every_backend_with_per_sample_rows(backend):
    """Per-sample rows with their own guide weights (step_row.GUIDE) on the indexed kernel: the guided output
    out + w_b guide, written out, through the float64 reference without a guide."""
    gen = torch.Generator().manual_seed(5)
    x, out, guide = (torch.randn(3, 4, 5, generator=gen) for _ in range(3))
    coeffs = [ds.ops.UpdateCoeffs(p=0.2 * b, q=1.0, a=0.9, b=(0.4, 0.1), e=0.3) for b in range(3)]
    rows = ds.ops.step_rows(coeffs)
    w = torch.tensor([0.5, -1.25, 2.0], dtype=torch.float64)
    rows[:, ds.step_row.GUIDE] = w
    history = torch.randn(2, *x.shape, generator=gen)
    h_ref = history.double().clone()
    want = ds.ops.multistep_update(x.double(), out.double() + w.view(-1, 1, 1) * guide.double(), rows, history=h_ref,
                                   write_slot=0, read_slots=[1], backend="reference")
    h = history.clone()
    got = ds.ops.multistep_update(x, out, rows, history=h, write_slot=0, read_slots=[1], guide=guide, backend=backend)
    assert (got.double() - want).abs().max() < 1e-5
    assert (h.double() - h_ref).abs().max() < 1e-5
    no_guide = ds.ops.multistep_update(x, out, rows, history=history.clone(), write_slot=0, read_slots=[1],
                                       backend=backend)  # the rows' guide weights need a guide operand
    assert (no_guide - got).abs().max() > 1e-2


@pytest.mark.parametrize("kwargs,match", [
    (dict(guide_scale=0.5), "guide is required: guide_scale is not 0"),
    (dict(guide=torch.zeros(2, 3), guide_scale=1.0), r"guide must have shape \(2, 4\)"),
    (dict(guide=torch.zeros(2, 4, dtype=torch.float64), guide_scale=1.0), "guide must have x's dtype"),
    (dict(guide=torch.zeros(2, 4), guide_scale=float("nan")), "guide_scale must be a finite number"),
    (dict(guide=torch.zeros(2, 4), guide_scale=True), "guide_scale must be a finite number"),
])
def test_guide_bad_input(kwargs, match):
    x = torch.zeros(2, 4)
    with pytest.raises(ValueError, match=match):
        ds.ops.multistep_update(x, x.clone(), ds.ops.UpdateCoeffs(p=0.0, q=1.0, a=1.0, b=(0.5,)), **kwargs)


def test_guide_sharing_a_written_buffer_is_refused():
    x = torch.zeros(2, 4)
    history = torch.zeros(2, 2, 4)
    with pytest.raises(ValueError, match="guide shares memory with history"):
        ds.ops.multistep_update(x, x.clone(), ds.ops.UpdateCoeffs(p=0.0, q=1.0, a=1.0, b=(0.5,)), history=history,
                                write_slot=0, guide=history[0], guide_scale=1.0)
    rows = ds.ops.step_rows([ds.ops.UpdateCoeffs(p=0.0, q=1.0, a=1.0, b=(0.5,))] * 2)
    with pytest.raises(ValueError, match="guide_scale is a per-sample rows' own field"):
        ds.ops.multistep_update(x, x.clone(), rows, guide=x.clone(), guide_scale=1.0)


def test_nan_guidance_gradient_is_caught():
    sch = VP.linear()
    z = torch.randn(4, DIM, dtype=torch.float64)
    bad = Guidance(lambda x, t: torch.full_like(x, float("nan")))
    with pytest.raises(ValueError, match="the guidance gradient contains non-finite values"):
        ds.sample(PRIOR.model(sch, "eps"), z, 5, schedule=sch, guidance=bad)


@pytest.mark.parametrize("guide,match", [(torch.zeros(2, 3), "guide must have x's shape"),
                                         (torch.zeros(2, 4, dtype=torch.float16), "guide must have x's dtype")])
def test_compiled_ops_check_the_guide_themselves(guide, match):
    """The compiled ops, called directly (no Python checks), refuse a guide unlike x before any kernel runs."""
    from diffsampler import step_row

    x = torch.zeros(2, 4)
    row = step_row.row(ds.ops.UpdateCoeffs(p=0.0, q=1.0, a=1.0, b=(0.5,)))
    with pytest.raises(RuntimeError, match=match):
        torch.ops.diffsampler.multistep_update(x, x.clone(), None, 0, [], row, None, 0.0, False, guide=guide)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.diffsampler.multistep_update_functional(x, x.clone(), row, None, 0.0, False, guide)
    table = ds.ops.step_table([ds.ops.UpdateCoeffs(p=0.0, q=1.0, a=1.0, b=(0.5,))], [0], [[]], 0, False)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.diffsampler.multistep_update_indexed(x, x.clone(), None, table.coeffs, table.slots,
                                                       torch.zeros(1, dtype=torch.int64), 0, None, 0.0, None,
                                                       guide=guide)
