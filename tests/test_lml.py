"""LML (Levenberg-Marquardt-Langevin): the fused ops against the reference, the low-rank algebra against an
explicit inverse, the identity at kappa = 0, and the drop-in schedulers against an independent float64
re-implementation of the authors' formula on top of diffusers' own schedulers."""

import math

import diffusers
import pytest
import torch

import diffsampler as ds
from diffsampler import lml, ops
from diffsampler.integrations.diffusers import DDIMLMScheduler, DPMSolverMultistepLMScheduler
from diffsampler.schedules import VP
from diffsampler.targets import GaussianMixture

from update_cases import SESSION_SEED

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-6, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def lml_case(dtype, shape=(3, 5, 7, 9), reads=2, rank=2, weights=True, seed=0, contiguous=True):
    gen = torch.Generator().manual_seed(SESSION_SEED + seed)

    def randn(*s):
        t = torch.randn(*s, generator=gen)
        if not contiguous:  # a strided view with the same values
            t = torch.randn(*s[:-1], 2 * s[-1], generator=gen)[..., ::2]
        return t.to(dtype)

    x, out = randn(*shape), randn(*shape)
    history = randn(reads + 1, *shape)
    dirs = randn(rank, *shape)
    coeffs = ops.UpdateCoeffs(p=0.9, q=-0.4, a=0.7, b=tuple([0.6] + [-0.3 / (j + 1) for j in range(reads)]), e=0.05,
                              r=tuple([0.1] * min(reads, 1)))
    dir_coeffs = [0.2, -0.5] + [0.4] + [0.25 * (-1) ** j for j in range(reads)]
    w = torch.randn(shape[0], rank + 1, generator=gen, dtype=torch.float64) if weights else None
    return dict(x=x, out=out, history=history, dirs=dirs, coeffs=coeffs, dir_coeffs=dir_coeffs, weights=w,
                read_slots=list(range(1, reads + 1)))


def run_update(case, backend, dir_slot=1, clip=None, threshold_ratio=None):
    h, d = case["history"].clone(), case["dirs"].clone()
    y = ops.multistep_update(case["x"], case["out"], case["coeffs"], history=h, write_slot=0,
                             read_slots=case["read_slots"], dirs=d, dir_slot=dir_slot, dir_coeffs=case["dir_coeffs"],
                             dir_weights=case["weights"], clip=clip, threshold_ratio=threshold_ratio,
                             threshold_max=2.0, backend=backend)
    return y, h, d


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reads,rank,weights", [(0, 1, True), (1, 1, False), (2, 2, True), (3, 4, True)])
@pytest.mark.parametrize("contiguous", [True, False])
def test_update_with_dirs_cpu_matches_reference(dtype, reads, rank, weights, contiguous):
    case = lml_case(dtype, reads=reads, rank=rank, weights=weights, contiguous=contiguous)
    slot = rank - 1
    y_ref, h_ref, d_ref = run_update(dict(case, x=case["x"].double(), out=case["out"].double(),
                                          history=case["history"].double(), dirs=case["dirs"].double()),
                                     "reference", dir_slot=slot, clip=1.5)
    y, h, d = run_update(case, "cpu", dir_slot=slot, clip=1.5)
    assert rel(y, y_ref) < TOL[dtype]
    assert rel(h[0], h_ref[0]) < TOL[dtype]
    assert rel(d, d_ref) < TOL[dtype]
    assert torch.equal(d[:slot], case["dirs"][:slot])  # only dir_slot is written


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_update_with_dirs_and_thresholding(dtype):
    case = lml_case(dtype, reads=1, rank=1)
    case["x"] = case["x"] * 3
    ref = run_update(dict(case, x=case["x"].double(), out=case["out"].double(), history=case["history"].double(),
                          dirs=case["dirs"].double()), "reference", dir_slot=0, threshold_ratio=0.9)
    got = run_update(case, "cpu", dir_slot=0, threshold_ratio=0.9)
    for a, b in zip(got, ref):
        assert rel(a, b) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 3), (3, 5, 7, 9), (2, 3 * 8192 + 17)])
@pytest.mark.parametrize("contiguous", [True, False])
def test_gram_cpu_matches_reference(dtype, shape, contiguous):
    case = lml_case(dtype, shape=shape, reads=2, rank=3, contiguous=contiguous)
    def gram(c, backend):
        return ops.lml_gram(c["x"], c["out"], case["coeffs"], c["dirs"], case["dir_coeffs"], history=c["history"],
                            read_slots=case["read_slots"], clip=1.5, backend=backend)

    ref = gram({k: case[k].double() for k in ("x", "out", "history", "dirs")}, "reference")
    got = gram(case, "cpu")
    assert got.dtype == torch.float64 and got.shape == (shape[0], 4, 4)
    assert rel(got, ref) < (1e-5 if dtype == torch.float32 else 1e-2)
    assert torch.equal(got, gram(case, "cpu"))  # fixed summation order: bitwise reproducible


def explicit_direction(directions, kappa, damping, rank):
    """d'' at the last step from the raw directions d_0..d_n (float64, one sample): the explicit inverse."""
    n = len(directions) - 1
    us = []
    for j in range(1, min(rank, n + 1) + 1):
        us.append(kappa * directions[n - j] + (1 - kappa) * directions[n - j + 1] if j <= n else directions[0])
    u = torch.stack(us, 1)
    m = damping * torch.eye(len(directions[0]), dtype=torch.float64) + u @ u.T
    d1 = damping * torch.linalg.solve(m, directions[n])
    return d1 * directions[n].norm() / d1.norm()


@pytest.mark.parametrize("rank", [1, 2, 3, 4])
@pytest.mark.parametrize("kappa", [0.3, 1.0])
def test_woodbury_weights_equal_the_explicit_inverse(rank, kappa):
    torch.manual_seed(SESSION_SEED)
    dim, steps, damping, scale = 11, 6, 0.7, 1.3
    directions = [torch.randn(dim, dtype=torch.float64) for _ in range(steps)]
    dirs = torch.zeros(rank, dim, dtype=torch.float64)
    for n, d in enumerate(directions):
        basis = torch.stack([d, *dirs])
        w = lml.correction_weights((basis @ basis.T)[None], torch.tensor(lml.mixing(n, rank, kappa), dtype=torch.float64), damping, scale)
        got = d + (w[0] @ basis) / scale  # d'' = d + (scale (d'' - d)) / scale
        assert torch.allclose(got, explicit_direction(directions[:n + 1], kappa, damping, rank), rtol=1e-10, atol=1e-12)
        dirs[n % rank] = d


def test_rank1_is_the_authors_formula():
    d, dp = torch.randn(50, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    kappa, lam = 0.4, 0.05
    u = kappa * dp + (1 - kappa) * d
    d1 = d - u * (d @ u) / (lam + u @ u)
    want = d1 * d.norm() / d1.norm()
    basis = torch.stack([d, dp])
    w = lml.correction_weights((basis @ basis.T)[None], torch.tensor(lml.mixing(1, 1, kappa), dtype=torch.float64), lam, 1.0)
    assert torch.allclose(d + w[0] @ basis, want, rtol=1e-12)


def test_zero_direction_falls_back_to_g():
    gram = torch.zeros(2, 2, 2, dtype=torch.float64)
    w = lml.correction_weights(gram, torch.tensor(lml.mixing(1, 1, 0.5)), 1e-3, 1.0)
    assert torch.equal(w, torch.zeros(2, 2, dtype=torch.float64))


def test_mixing_warm_up():
    assert lml.mixing(0, 3, 0.25) == [[1.0], [0.0], [0.0], [0.0]]  # u = d at the first step
    m = lml.mixing(1, 3, 0.25)  # u_1 = 0.25 d_0 + 0.75 d_1, u_2 = d_0; d_0 in slot 0
    assert m == [[0.75, 0.0], [0.25, 1.0], [0.0, 0.0], [0.0, 0.0]]


@pytest.fixture(scope="module")
def ring():
    return GaussianMixture.ring(), VP.linear()


@pytest.mark.parametrize("solver", ["ddim", "dpmpp_2m", "dpmpp_3m", "dpm_2m", "unipc", "deis"])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_kappa_zero_is_the_identity(ring, solver, backend):
    gm, schedule = ring
    x = torch.randn(32, 2, generator=torch.Generator().manual_seed(SESSION_SEED))
    plain = ds.sample(gm.model(schedule), x, 8, solver, schedule, backend=backend)
    got = ds.sample(gm.model(schedule), x, 8, solver, schedule, backend=backend, lml=ds.LML(kappa=0.0, damping=0.3))
    assert rel(got, plain) < 1e-6
    # rank > 1 keeps the past raw directions in U even at kappa = 0: no longer the identity
    got = ds.sample(gm.model(schedule), x, 8, solver, schedule, backend=backend,
                    lml=ds.LML(kappa=0.0, damping=0.3, rank=3))
    assert rel(got, plain) > 1e-4


@pytest.mark.parametrize("solver", ["ddim", "dpmpp_2m", "dpmpp_3m", "unipc"])
def test_sample_cpu_matches_reference(ring, solver):
    _, schedule = ring
    # 64-D: d is far from the span of U, so ||d|| / ||d'|| (which amplifies fp32 rounding) stays moderate
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(SESSION_SEED))
    target = GaussianMixture.random(dim=64, modes=3, seed=1)
    args = (target.model(schedule), x, 10, solver, schedule)
    # The truth is the float64 reference. LML's rescale ||d|| / ||d'|| amplifies fp32 rounding (docs/lml.md): for
    # DDIM, d = eps barely changes between high-noise steps, so d' is tiny unless the damping is large. Over 60 seeds
    # the fp32 reference itself is up to 1.3e-4 (DDIM, damping 50) and 4e-5 (the others) away from float64, and the
    # fused CPU path up to 1.0e-4 and 2.6e-5: the bounds leave a factor 3 over the reference's own worst case. The
    # fused and reference fp32 runs are not compared to each other, since both carry the amplified rounding.
    opts = dict(lml=ds.LML(kappa=0.6, damping=50.0 if solver == "ddim" else 0.5, rank=2))
    truth = ds.sample(target.model(schedule), x.double(), 10, solver, schedule, backend="reference", **opts)
    got = ds.sample(*args, backend="cpu", **opts)
    tol = 4e-4 if solver == "ddim" else 1.2e-4
    assert rel(got, truth) < tol
    assert rel(got, ds.sample(*args, backend="cpu")) > 10 * tol  # and LML changed the result


def test_freeze_skips_the_early_steps(ring):
    gm, schedule = ring
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(1))
    model = gm.model(schedule)
    plan = ds.solvers.make_plan("ddim", schedule, 5, "eps")
    run = lml.LMLRun(ds.LML(kappa=0.5, freeze=0.5), plan, x, 1000.0)
    assert run.active == [t < 500 for t in plan.timesteps] and any(run.active) and not all(run.active)
    frozen = ds.sample(model, x, 5, "ddim", schedule, lml=ds.LML(kappa=0.5, freeze=1.0))
    assert torch.equal(frozen, ds.sample(model, x, 5, "ddim", schedule))


@pytest.mark.parametrize("kwargs,match", [
    (dict(damping=0.0), "damping"), (dict(damping=-1.0), "damping"), (dict(kappa=1.5), "kappa"),
    (dict(kappa=-0.1), "kappa"), (dict(rank=0), "rank"), (dict(rank=5), "rank"), (dict(rank=1.5), "rank"),
    (dict(mode="newton"), "mode"), (dict(freeze=2.0), "freeze"),
])
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ds.LML(**kwargs)


def test_bad_combinations(ring):
    gm, schedule = ring
    x = torch.randn(4, 2)
    with pytest.raises(ValueError, match="threshold"):
        ds.sample(gm.model(schedule), x, 4, "ddim", schedule, threshold_ratio=0.9, lml=ds.LML())
    with pytest.raises(ValueError, match="diffsampler.LML"):
        ds.sample(gm.model(schedule), x, 4, "ddim", schedule, lml=0.5)
    with pytest.raises(ValueError, match="dir_coeffs"):
        ops.multistep_update(x, x, ops.UpdateCoeffs(1, 0, 1, (0,)), dirs=torch.zeros(1, 4, 2), dir_coeffs=[1.0])
    with pytest.raises(ValueError, match="dirs must"):
        ops.lml_gram(x, x, ops.UpdateCoeffs(1, 0, 1, (0,)), torch.zeros(7, 4, 2), [0, 1, 0])


def test_zero_model_output_gives_no_nan():
    x = torch.zeros(3, 4, 4)
    out = ds.sample(lambda x, t: torch.zeros_like(x), x, 5, "dpmpp_2m", VP.linear(), lml=ds.LML(damping=1e-3))
    assert torch.isfinite(out).all()


# --- the drop-ins against the authors' formula re-implemented here, on top of diffusers' own schedulers ---

def authors_lm(prev, d, lamb, kappa):
    """The authors' lm_correct (per sample, sums over non-batch dims), float64; prev None at the first step."""
    u = d if prev is None else kappa * prev + (1 - kappa) * d
    dims = tuple(range(1, d.dim()))
    shape = (-1,) + (1,) * (d.dim() - 1)
    inner = (d * u).sum(dims).view(shape)
    d1 = d - u * inner / (lamb + (u * u).sum(dims).view(shape))
    norm = torch.linalg.vector_norm
    return d1 * norm(d, dim=dims).view(shape) / norm(d1, dim=dims).view(shape)


def toy_model(x, t):
    """A deterministic eps model (smooth in x and t)."""
    s = float(t) / 1000.0
    return torch.tanh(0.8 * x + 0.3 * s) * (0.9 + 0.1 * s) + 0.05 * x.flip(-1)


def loop(scheduler, x, steps, correct=None):
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        out = toy_model(x, t)
        step = scheduler.step(out, t, x)
        x = correct(t, x, out, step.prev_sample) if correct else step.prev_sample
    return x


@pytest.mark.parametrize("config", [
    dict(lamb=1.0, kappa=0.5),
    dict(lamb=0.01, kappa=0.8, freeze=0.3),
    dict(lamb=0.1, kappa=0.5, clip_sample=False, beta_schedule="scaled_linear", timestep_spacing="trailing"),
])
def test_ddim_lm_matches_the_authors_formula(config):
    freeze = config.pop("freeze", 0.0)
    lamb, kappa = config.pop("lamb"), config.pop("kappa")
    x = torch.randn(2, 3, 6, 5, generator=torch.Generator().manual_seed(SESSION_SEED))
    ours = loop(DDIMLMScheduler(lm=True, lamb=lamb, kappa=kappa, freeze=freeze, **config), x, 10)

    base = diffusers.DDIMScheduler(**config)
    base.alphas_cumprod = base.alphas_cumprod.double()
    base.final_alpha_cumprod = base.final_alpha_cumprod.double()
    state = {"prev": None}

    def correct(t, x, eps, plain):  # x' = plain - k eps + k lm(eps), k = sqrt(1 - abar_prev) (eta = 0)
        prev_t = int(t) - base.config.num_train_timesteps // base.num_inference_steps
        ab_prev = base.alphas_cumprod[prev_t] if prev_t >= 0 else base.final_alpha_cumprod
        k = torch.sqrt(1 - ab_prev)
        new = plain
        if int(t) < 1000 - 1000 * freeze:
            new = plain - k * eps + k * authors_lm(state["prev"], eps, lamb, kappa)
        state["prev"] = eps
        return new

    want = loop(base, x.double(), 10, correct)
    assert rel(ours, want) < 1e-5
    assert rel(ours, loop(DDIMLMScheduler(**config), x, 10)) > 1e-4  # the correction did something


@pytest.mark.parametrize("config", [
    dict(solver_order=2, lamb=0.5, kappa=0.5),
    dict(solver_order=3, lamb=0.05, kappa=0.3),
    dict(solver_order=2, lamb=1.0, kappa=0.7, algorithm_type="dpmsolver", solver_type="heun",
         final_sigmas_type="sigma_min"),
])
def test_dpm_lm_matches_the_authors_formula(config):
    lamb, kappa = config.pop("lamb"), config.pop("kappa")
    x = torch.randn(2, 4, 5, 3, generator=torch.Generator().manual_seed(SESSION_SEED + 1))
    ours = loop(DPMSolverMultistepLMScheduler(lm=True, lamb=lamb, kappa=kappa, **config), x, 12)

    base = diffusers.DPMSolverMultistepScheduler(**config)
    base.alphas_cumprod = base.alphas_cumprod.double()
    state = {"prev": None}

    def correct(t, x, out, plain):  # the increment after the carried x: plain - ratio x
        i = base.step_index - 1
        s0, s1 = base.sigmas[i].double(), base.sigmas[i + 1].double()
        a0, sg0 = base._sigma_to_alpha_sigma_t(s0)
        a1, sg1 = base._sigma_to_alpha_sigma_t(s1)
        ratio = sg1 / sg0 if base.config.algorithm_type == "dpmsolver++" else a1 / a0
        inc = plain - ratio * x
        new = ratio * x + authors_lm(state["prev"], inc, lamb, kappa)
        state["prev"] = inc
        return new

    want = loop(base, x.double(), 12, correct)
    assert rel(ours, want) < 1e-5
    assert rel(ours, loop(DPMSolverMultistepLMScheduler(**config), x, 12)) > 1e-4


def test_dropins_match_sample_with_lml():
    """The drop-in and sample(lml=...) run the same math: DPM++ 2M with LML rank 1 through both paths."""
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    sched = DPMSolverMultistepLMScheduler(lm=True, lamb=0.2, kappa=0.5, beta_schedule="linear")
    got = loop(sched, x, 8)
    want = ds.sample(toy_model, x, 8, "dpmpp_2m", VP.linear(), lml=ds.LML(damping=0.2, kappa=0.5))
    assert rel(got, want) < 1e-5


def test_lm_config_round_trips():
    s = DDIMLMScheduler(beta_schedule="scaled_linear", lm=True, kappa=0.5, lamb=0.001, freeze=0.2)
    again = DDIMLMScheduler.from_config(s.config)
    assert (again.config.lamb, again.config.kappa, again.config.freeze, again.config.lm) == (0.001, 0.5, 0.2, True)
    assert again.config.beta_schedule == "scaled_linear"
    d = DPMSolverMultistepLMScheduler.from_config(diffusers.DPMSolverMultistepScheduler(solver_order=3).config,
                                                  lm=True, lamb=0.001)
    assert d.config.solver_order == 3 and d.config.lm and d.config.lamb == 0.001 and math.isclose(d.config.kappa, 0)


# --- corrector mode ---

def test_corrector_weights_are_p_s_and_the_root_of_p():
    """V ps = P s and V pz = P^{1/2} z with P = (lambda I + U U^T)^{-1}, against the explicit D x D matrices."""
    torch.manual_seed(SESSION_SEED)
    dim, slots, rank, lam = 9, 3, 2, 0.3
    s, z = torch.randn(dim, dtype=torch.float64), torch.randn(dim, dtype=torch.float64)
    ring = 2 * torch.randn(slots, dim, dtype=torch.float64)
    basis = torch.stack([s, *ring, z])
    mix = torch.tensor(lml.corrector_mixing(3, rank, 0.4, slots), dtype=torch.float64)
    u = (basis.T @ mix)
    p = torch.linalg.inv(lam * torch.eye(dim, dtype=torch.float64) + u @ u.T)
    evals, q = torch.linalg.eigh(p)
    root = q @ torch.diag(evals.sqrt()) @ q.T
    w = lml.corrector_weights((basis @ basis.T)[None], mix, lam, snr=0.2, alpha=0.9)[0]
    ps, rz = p @ s, root @ z
    eps = 2 * 0.9 * (0.2 * rz.norm() / ps.norm()) ** 2
    assert torch.allclose(w @ basis, eps * ps + (2 * eps).sqrt() * rz, rtol=1e-10, atol=1e-12)


def test_corrector_mixing_warm_up():
    assert lml.corrector_mixing(0, 2, 0.5, 3) == [[]] * 5  # no direction yet: plain Langevin
    assert lml.corrector_mixing(1, 2, 0.5, 3) == [[0.0], [1.0], [0.0], [0.0], [0.0]]  # u_1 = d_0
    # level 2: u_1 = kappa d_0 + (1 - kappa) d_1, u_2 = d_0 (d_m in slot m % 3)
    assert lml.corrector_mixing(2, 2, 0.25, 3) == [[0.0, 0.0], [0.25, 1.0], [0.75, 0.0], [0.0, 0.0], [0.0, 0.0]]


@pytest.mark.parametrize("lam", [1.0, 0.01])
def test_preconditioned_langevin_keeps_a_gaussian(lam):
    """Exact score of N(0, v I): the preconditioned corrector keeps the variance (5 %) along and across U,
    which noise P z instead of P^{1/2} z (or no preconditioning of the noise) would not."""
    gen = torch.Generator().manual_seed(SESSION_SEED)
    # n = 16000: over 40 seeds the variance ratio along U has a standard deviation of 0.012 and a mean of
    # +0.002 (the step's discretisation), so the 5 % bound is 4 standard deviations (n = 4000 failed 3 % of seeds)
    n, dim, slots, v = 16000, 6, 2, 1.7
    x = v**0.5 * torch.randn(n, dim, generator=gen, dtype=torch.float64)
    ring = 3 * torch.randn(slots, 1, dim, generator=gen, dtype=torch.float64).expand(slots, n, dim)
    mix = torch.tensor(lml.corrector_mixing(2, 1, 0.5, slots), dtype=torch.float64)
    for _ in range(40):
        z = torch.randn(n, dim, generator=gen, dtype=torch.float64)
        basis = torch.stack([-x / v, *ring, z], 1)
        w = lml.corrector_weights(basis @ basis.transpose(1, 2), mix, lam, snr=0.16, alpha=1.0)
        x = x + (w.unsqueeze(1) @ basis).squeeze(1)
    u = ring[:, 0].T @ mix[1:-1]
    along = (x @ (u / u.norm())).var().item()
    assert abs(along / v - 1) < 0.05 and abs(x.var().item() / v - 1) < 0.05


@pytest.mark.parametrize("solver", ["ddim", "dpmpp_2m"])
def test_corrector_sample_cpu_matches_reference(ring, solver):
    gm, schedule = ring
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(SESSION_SEED))
    opts = dict(lml=ds.LML(mode="corrector", damping=0.01, kappa=0.5, rank=2, n_steps=2))
    runs = [ds.sample(gm.model(schedule), x, 6, solver, schedule, backend=b,
                      generator=torch.Generator().manual_seed(5), **opts) for b in ("reference", "cpu", "cpu")]
    assert rel(runs[1], runs[0]) < 1e-4 and torch.equal(runs[1], runs[2])
    assert rel(runs[1], ds.sample(gm.model(schedule), x, 6, solver, schedule)) > 1e-2


def test_corrector_counts_model_calls(ring):
    gm, schedule = ring
    calls = []
    model = gm.model(schedule)

    def counted(x, t):
        calls.append(int(t))
        return model(x, t)

    ds.sample(counted, torch.randn(4, 2), 5, "ddim", schedule, lml=ds.LML(mode="corrector", n_steps=3))
    assert len(calls) == 5 * (1 + 3)


def test_corrector_needs_a_discrete_vp_schedule():
    with pytest.raises(ValueError, match="corrector"):
        ds.sample(lambda x, t: x, torch.randn(2, 3), 4, "flow_euler", ds.schedules.Flow(),
                  lml=ds.LML(mode="corrector"))
    with pytest.raises(ValueError, match="n_steps"):
        ds.LML(mode="corrector", n_steps=0)
    with pytest.raises(ValueError, match="snr"):
        ds.LML(mode="corrector", snr=0.0)
