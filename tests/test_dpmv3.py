"""DPM-Solver-v3: the ems_update op on every backend, the solver against the paper's algorithm written out here
from its equations, its reductions to DPM-Solver++ / DPM-Solver, the EMS estimator on a Gaussian (closed form),
the quality on the Gaussian-mixture target, and bad input."""

import math

import numpy as np
import pytest
import torch

import diffsampler as ds
import diffsampler.triton_kernels  # noqa: F401  (the subpackage, also when ops has not probed it yet)
from diffsampler import reference
from diffsampler.solvers import Grid, dpm_steps, unipc_steps
from diffsampler.solvers.dpmv3 import EMS, dpmv3_steps, fit_ems
from update_cases import case_seed, rel_err

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BOUNDS = {torch.float32: 1e-6, torch.float16: 1e-2, torch.bfloat16: 1e-2}
SHAPES = [(1,), (7,), (3, 1023), (2, 4, 9, 9), (3, 5, 7, 11)]


# ---------------------------------------------------------------------------------------------- the op


def ems_case(shape, dtype, n_reads, state_mode, seed, noncontig=False, history=True):
    """Positional arguments of ems_update: x, out, coeffs, history, write_slot, read_slots, state."""
    gen = torch.Generator().manual_seed(seed)

    def operand(s):
        if not noncontig:
            return torch.randn(s, generator=gen, dtype=torch.float64).to(dtype)
        return torch.randn((*s[:-1], 2 * s[-1]), generator=gen, dtype=torch.float64).to(dtype)[..., ::2]

    x, out = operand(shape), operand(shape)
    slots = n_reads + 1
    hist = torch.randn((slots, *shape), generator=gen, dtype=torch.float64).to(dtype) if history else None
    if noncontig and history:  # slot index last in memory: every slot a strided view
        strided = torch.empty((*shape, slots), dtype=dtype).movedim(-1, 0)
        strided.copy_(hist)
        hist = strided
    write = int(torch.randint(slots, (1,), generator=gen))
    reads = [s for s in range(slots) if s != write][:n_reads]
    state = operand(shape) if state_mode else None
    coeffs = torch.randn((reference.ems_rows(n_reads, state_mode == 2), *shape[1:]), generator=gen)
    return [x, out, coeffs, hist, write, reads, state]


def check(fn, args, dtype):
    """fn(*args) against the float64 reference on copies: x', the written slot and the state, relative to
    max(||ref||, ||the same map on |operands| and |coeffs|||) (fp32 is accurate relative to the terms' sizes,
    not to x' where they cancel, as update_cases.reference_result); other slots and a read-only state intact."""
    ref_args = [a.double().clone() if isinstance(a, torch.Tensor) else a for a in args]
    want = reference.ems_update(*ref_args)
    abs_args = [a.double().abs() if isinstance(a, torch.Tensor) else a for a in args]
    scale = reference.ems_update(*abs_args)
    got_args = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]  # clone keeps the strides
    got = fn(*got_args)
    assert got.dtype == args[0].dtype and got.shape == args[0].shape
    assert rel_err(got, want, scale) < BOUNDS[dtype]
    x, out, coeffs, hist, write, reads, state = got_args
    if hist is not None:
        assert rel_err(hist[write], ref_args[3][write], abs_args[3][write]) < BOUNDS[dtype]
        others = [j for j in range(hist.shape[0]) if j != write]
        assert torch.equal(hist[others], args[3][others])
    if state is not None and coeffs.shape[0] > 6 + len(reads):
        assert rel_err(state, ref_args[6], abs_args[6]) < BOUNDS[dtype]
    elif state is not None:
        assert torch.equal(state, args[6]), "a read-only state was modified"


def cpu_op(*args):
    return torch.ops.diffsampler.ems_update(*args)


def triton_op(*args):
    from diffsampler.triton_kernels.ems_update import ems_update

    return ems_update(*args)


BACKENDS = {"cpu": cpu_op, "triton": triton_op}


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_op_matches_reference(backend, shape, dtype):
    if backend == "triton" and not ds.triton_kernels.available()[0]:
        pytest.skip(ds.triton_kernels.available()[1])
    for n_reads in range(4):
        for state_mode in (0, 1, 2):
            args = ems_case(shape, dtype, n_reads, state_mode, case_seed("ems", backend, shape, dtype, n_reads,
                                                                         state_mode))
            check(BACKENDS[backend], args, dtype)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_op_noncontiguous_and_without_history(backend, dtype):
    if backend == "triton" and not ds.triton_kernels.available()[0]:
        pytest.skip(ds.triton_kernels.available()[1])
    for shape in [(7, 3), (2, 4, 9, 9)]:
        args = ems_case(shape, dtype, 2, 2, case_seed("ems-nc", backend, shape, dtype), noncontig=True)
        assert not args[0].is_contiguous() and not args[3][0].is_contiguous()
        check(BACKENDS[backend], args, dtype)
        check(BACKENDS[backend], ems_case(shape, dtype, 0, 1, case_seed("ems-nh", shape, dtype), history=False),
              dtype)


def test_op_public_entry_dispatches_and_opchecks():
    args = ems_case((2, 3, 5), torch.float32, 2, 2, seed=3)
    torch.library.opcheck(torch.ops.diffsampler.ems_update.default, args)
    x, out, coeffs, hist, write, reads, state = args
    for backend in ("auto", "cpu", "reference"):
        h, s = hist.clone(), state.clone()
        got = ds.ops.ems_update(x, out, coeffs, history=h, write_slot=write, read_slots=reads, state=s,
                                backend=backend)
        h2, s2 = hist.double(), state.double()
        want = reference.ems_update(x.double(), out.double(), coeffs.double(), h2, write, reads, s2)
        assert rel_err(got, want) < 1e-6 and rel_err(h, h2) < 1e-6 and rel_err(s, s2) < 1e-6


@pytest.mark.parametrize("change, match", [
    (dict(coeffs=torch.zeros(5, 3, 5)), "rows"),
    (dict(coeffs=torch.zeros(8, 3, 4)), "coeffs must have shape"),
    (dict(coeffs=torch.zeros(8, 3, 5, dtype=torch.float64)), "coeffs must be torch.float32"),
    (dict(read_slots=[0], coeffs=torch.zeros(7, 3, 5)), "differ from write_slot"),
    (dict(model_out=torch.zeros(2, 3)), "model_out must have shape"),
])
def test_op_bad_input(change, match):
    x = torch.zeros(2, 3, 5)
    kw = dict(model_out=torch.zeros(2, 3, 5), coeffs=torch.zeros(8, 3, 5), history=torch.zeros(3, 2, 3, 5),
              write_slot=0, read_slots=[1, 2])
    kw.update(change)
    with pytest.raises(ValueError, match=match):
        ds.ops.ems_update(x, kw.pop("model_out"), kw.pop("coeffs"), **kw)


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_matches_reference(dtype):
    from diffsampler import _cuda_jit

    ok, why = _cuda_jit.load()
    assert ok, why
    for shape in SHAPES + [(8, 4, 64, 64)]:
        for n_reads in range(4):
            for state_mode in (0, 1, 2):
                args = ems_case(shape, dtype, n_reads, state_mode, case_seed("ems-cuda", shape, dtype, n_reads))
                args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]
                check(cpu_op, args, dtype)  # the same op name: dispatched to the CUDA kernel
    args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in ems_case((2, 3, 5), torch.float32, 2, 2, 1)]
    torch.library.opcheck(torch.ops.diffsampler.ems_update.default, args)


# ------------------------------------------------------------- the paper's algorithm, written out in float64


def trapz(y, x):
    return np.trapezoid(y, x, axis=0) if hasattr(np, "trapezoid") else np.trapz(y, x, axis=0)


def cumtrapz(y, x):
    out = np.zeros_like(y)
    for k in range(1, len(x)):
        out[k] = out[k - 1] + 0.5 * (x[k] - x[k - 1]) * (y[k] + y[k - 1])
    return out


def paper_v3(eps_model, x, sigmas, idx, lam, l, s, b, order, p_pseudo, use_corrector, c_pseudo, lower_order_final):
    """DPM-Solver-v3 (Algorithm of the paper; eqs. for x_t, y, the derivative estimates and the corrector) on a
    continuous grid of sigma ratios whose lambdas are EMS grid points idx; integrals by the trapezoid rule on
    the EMS grid: L = int l, S = int s, I = int e^{L+S}, B = int e^{-S} b, C = int e^{L+S} B."""
    L, S = cumtrapz(l, lam), cumtrapz(s, lam)
    I = cumtrapz(np.exp(L + S), lam)
    B = cumtrapz(np.exp(-S) * b, lam)
    C = cumtrapz(np.exp(L + S) * B, lam)
    alpha = lambda k: 1 / math.sqrt(1 + sigmas[k] ** 2)
    sig = lambda k: sigmas[k] * alpha(k)
    n = len(sigmas) - 1
    xs, eps, pts = [], [], []  # cached samples, noise predictions, grid points

    def y(f, i_s, i_j):
        return np.exp(S[i_s] - S[i_j]) * f - np.exp(S[i_s]) * (B[i_j] - B[i_s])

    def derivatives(lams, ys, pseudo):
        m = len(ys) - 1
        if pseudo:
            table = [ys]
            for i in range(1, m + 1):
                table.append([(table[-1][j] - table[-1][j + 1]) / (lams[j] - lams[j + i]) for j in range(m - i + 1)])
            return [table[i][0] * math.factorial(i) for i in range(1, m + 1)]
        R = np.array([[(lams[k] - lams[0]) ** i for i in range(1, m + 1)] for k in range(1, m + 1)])
        sol = np.linalg.solve(R, np.stack([yk - ys[0] for yk in ys[1:]]).reshape(m, -1))
        return [sol[i - 1].reshape(ys[0].shape) * math.factorial(i) for i in range(1, m + 1)]

    def update(points, t):  # points: [s, others...] as indices into the caches; t: target grid point
        s_pt = pts[points[0]]
        i_s, i_t = idx[s_pt], idx[t]
        fs = [(sig(pts[p]) * eps[p] - l[idx[pts[p]]] * xs[p]) / alpha(pts[p]) for p in points]
        ys = [y(f, i_s, idx[pts[p]]) for f, p in zip(fs, points)]
        x_t = (alpha(t) / alpha(s_pt) * np.exp(L[i_s] - L[i_t]) * xs[points[0]]
               - alpha(t) * np.exp(-L[i_t] - S[i_s]) * (I[i_t] - I[i_s]) * ys[0]
               - alpha(t) * np.exp(-L[i_t]) * (C[i_t] - C[i_s] - B[i_s] * (I[i_t] - I[i_s])))
        if len(points) > 1:
            lams = [lam[idx[pts[p]]] for p in points]
            for k, dk in enumerate(derivatives(lams, ys, pseudo=pseudo_now[0]), start=1):
                u = lam[i_s:i_t + 1] - lam[i_s]
                w = np.exp(L[i_s:i_t + 1] + S[i_s:i_t + 1] - L[i_s] - S[i_s]) * (u ** k / math.factorial(k))[:, None]
                x_t = x_t - alpha(t) * np.exp(L[i_s] - L[i_t]) * trapz(w, lam[i_s:i_t + 1]) * dk
        return x_t

    pseudo_now = [False]
    p_prev = 0
    for i in range(n):
        xs.append(x.copy())
        eps.append(eps_model(x, sigmas[i]))
        pts.append(i)
        c_order = p_prev + (1 if c_pseudo else 0)
        if use_corrector and c_order > 1:
            m = len(xs) - 1
            points = [m - 1, m] + [m - j for j in range(2, c_order)]
            pseudo_now[0] = c_pseudo
            x_c = update(points, i)
            n_old = sig(i) * eps[m] - l[idx[i]] * xs[m]  # keep N of the new point
            xs[m] = x_c
            eps[m] = (n_old + l[idx[i]] * x_c) / sig(i)
        p = min(order, i + 1)
        if lower_order_final:
            p = min(p, n - i)
        p_prev = p
        pseudo_now[0] = p_pseudo
        m = len(xs) - 1
        x = update([m - j for j in range(p)], i + 1)
    return x


def smooth_ems(lam, dims, seed):
    """Smooth per-dimension statistics of plausible size: l in (0.1, 1), |s| < 0.6, |b| < 0.3."""
    rng = np.random.default_rng(seed)
    ph = rng.uniform(0, 2 * np.pi, size=(3, *dims))
    lam_b = lam.reshape(-1, *([1] * len(dims)))
    l = 0.55 + 0.4 * np.sin(0.3 * lam_b + ph[0])
    s = 0.6 * np.cos(0.4 * lam_b + ph[1])
    b = 0.3 * np.sin(0.5 * lam_b + ph[2])
    return l, s, b


@pytest.mark.parametrize("order, p_pseudo, corrector, c_pseudo, lower_order_final", [
    (1, False, False, False, True), (1, False, True, True, True), (2, False, True, True, True),
    (2, False, True, False, False), (3, False, True, True, True), (3, True, True, True, False),
    (3, False, False, False, False), (2, True, False, False, True),
])
def test_solver_matches_paper_algorithm(order, p_pseudo, corrector, c_pseudo, lower_order_final):
    steps, sub = 7, 12  # EMS grid: 12 intervals per step, the sampling points on it
    target = ds.targets.GaussianMixture.random(dim=6, modes=3, seed=1)
    model = target.model(None, "eps")
    sigmas = list(np.exp(np.linspace(math.log(14.6), math.log(0.03), steps + 1)))
    grid = Grid.from_sigmas(sigmas)
    lam = np.linspace(-math.log(14.6), -math.log(0.03), steps * sub + 1)
    l, s, b = smooth_ems(lam, (6,), seed=order)
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    eps_np = lambda x_np, sigma: model(torch.from_numpy(x_np), torch.tensor(sigma, dtype=torch.float64)).numpy()
    want = paper_v3(eps_np, x.numpy(), sigmas, [sub * i for i in range(steps + 1)], lam, l, s, b, order, p_pseudo,
                    corrector, c_pseudo, lower_order_final)
    ems = EMS(torch.from_numpy(lam), torch.from_numpy(l), torch.from_numpy(s), torch.from_numpy(b))
    plan = dpmv3_steps(grid, "eps", ems=ems, order=order, predictor_pseudo=p_pseudo, corrector=corrector,
                       corrector_pseudo=c_pseudo, lower_order_final=lower_order_final)
    got = ds.run_plan(model, x, plan)  # float64: the reference backend
    assert rel_err(got, torch.from_numpy(want)) < 1e-11
    got32 = ds.run_plan(model, x.float(), plan, backend="cpu")  # the fused CPU kernel in float32
    assert rel_err(got32, torch.from_numpy(want)) < 2e-5


def test_predictions_and_shapes_broadcast():
    """v / x0 outputs give the eps numbers; per-channel statistics (C, 1, 1) broadcast over (C, H, W) samples,
    scalar ones over any sample."""
    target = ds.targets.GaussianMixture.random(dim=12, modes=3, seed=2)
    grid = Grid.uniform_lambda(14.6, 0.03, 6)
    lam = np.linspace(grid.lam(0), grid.lam(6), 121)
    l, s, b = smooth_ems(lam, (3, 1, 1), seed=5)
    ems = EMS(torch.from_numpy(lam), torch.from_numpy(l), torch.from_numpy(s), torch.from_numpy(b))
    x = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    flat = lambda pred: (lambda x, t: target.model(None, pred)(x.reshape(4, 12), t).reshape(x.shape))
    runs = {p: ds.run_plan(flat(p), x, dpmv3_steps(grid, p, ems=ems, order=3)) for p in ("eps", "v", "x0")}
    assert rel_err(runs["v"], runs["eps"]) < 1e-12 and rel_err(runs["x0"], runs["eps"]) < 1e-12
    full = EMS(ems.lambdas, ems.l.expand(-1, 3, 2, 2), ems.s.expand(-1, 3, 2, 2), ems.b.expand(-1, 3, 2, 2))
    assert rel_err(ds.run_plan(flat("eps"), x, dpmv3_steps(grid, "eps", ems=full, order=3)), runs["eps"]) < 1e-13
    scalar = EMS.constant(lam, 0.7, 0.1, 0.05)
    per_dim = EMS(scalar.lambdas, *(v[:, None, None, None].expand(-1, 3, 2, 2) for v in (scalar.l, scalar.s, scalar.b)))
    a = ds.run_plan(flat("eps"), x, dpmv3_steps(grid, "eps", ems=scalar, order=2))
    assert rel_err(a, ds.run_plan(flat("eps"), x, dpmv3_steps(grid, "eps", ems=per_dim, order=2))) < 1e-13


# -------------------------------------------------------------------------------------------- reductions


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("kind", ["dpmpp", "dpm"])
def test_reduces_to_dpm_solver(order, kind):
    """l = 1, s = b = 0 (the paper's degenerate EMS) is DPM-Solver++ and l = 0, s = -1, b = 0 DPM-Solver (noise
    prediction), with the exact phi weights (solver_type="heun", phi3="taylor"): equal up to the trapezoid
    error of the EMS grid, O(dlambda^2) ~ 1e-7 here."""
    target = ds.targets.GaussianMixture.random(dim=8, modes=4, seed=0)
    model = target.model(None, "eps")
    x = torch.randn(16, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    grid = Grid.uniform_lambda(14.6, 0.03, 8)
    lam = np.linspace(grid.lam(0), grid.lam(8), 8001)
    ems = EMS.constant(lam, 1.0, 0.0, 0.0) if kind == "dpmpp" else EMS.constant(lam, 0.0, -1.0, 0.0)
    algorithm = "dpmsolver++" if kind == "dpmpp" else "dpmsolver"
    want = ds.run_plan(model, x, dpm_steps(grid, "eps", algorithm=algorithm, order=order, solver_type="heun",
                                           phi3="taylor", final_sigma_zero=False))
    got = ds.run_plan(model, x, dpmv3_steps(grid, "eps", ems=ems, order=order, corrector=False))
    assert rel_err(got, want) < 1e-6
    got32 = ds.run_plan(model, x.float(), dpmv3_steps(grid, "eps", ems=ems, order=order, corrector=False))
    assert rel_err(got32, want) < 2e-6


def test_sample_entry_point():
    """sample(solver="dpmv3") on a discrete VP schedule (ending at sigma_min) and on VPContinuous (ending at
    eps) with EMS fitted over the same schedule."""
    target = ds.targets.GaussianMixture.random(dim=4, modes=2, seed=3)
    gen = torch.Generator().manual_seed(0)
    for schedule in (ds.schedules.VP.scaled_linear(), ds.schedules.VPContinuous()):
        def model(x, t):
            if isinstance(schedule, ds.schedules.VP):
                return target.model(schedule, "eps")(x, t)
            log_alpha = -0.25 * schedule.beta_d * t.double() ** 2 - 0.5 * schedule.beta_min * t.double()
            return target.model(None, "eps")(x, torch.sqrt(torch.expm1(-2 * log_alpha)))
        ems = fit_ems(model, torch.randn(64, 4, generator=gen, dtype=torch.float64), schedule, points=60, generator=gen)
        x = torch.randn(8, 4, generator=gen, dtype=torch.float64)
        fine = ds.sample(model, x, steps=200, solver="dpmv3", schedule=schedule, ems=ems, order=3)
        coarse = ds.sample(model, x, steps=10, solver="dpmv3", schedule=schedule, ems=ems, order=3)
        ref = ds.sample(model, x, steps=10, solver="dpmpp_2m", schedule=schedule,
                        **({"final_sigmas_type": "sigma_min"} if isinstance(schedule, ds.schedules.VP) else {"final": "eps"}))
        assert rel_err(coarse, fine) < 0.05 and rel_err(ref, fine) < 0.1
        x32 = ds.sample(model, x.float(), steps=10, solver="dpmv3", schedule=schedule, ems=ems, order=3)
        assert rel_err(x32, coarse) < 1e-5


def test_one_fused_op_per_step_and_no_sync():
    """Per step: ems_update and the model time's index, nothing that syncs; once: the model times, the history
    ring, the state (the coefficient tensors uploaded beforehand, as CapturedSampler does)."""
    from diffsampler.bench.common import OpCounter

    steps = 8
    lam = np.linspace(-math.log(14.6), -math.log(0.03), 41)
    ems = EMS(torch.from_numpy(lam), *map(torch.from_numpy, smooth_ems(lam, (3, 1, 1), 0)))
    plan = dpmv3_steps(Grid.uniform_lambda(14.6, 0.03, steps), "eps", ems=ems, order=3)
    x = torch.randn(2, 3, 4, 4)
    coeffs = plan.upload_tensor_coeffs(x)
    out = torch.zeros_like(x)
    with OpCounter() as counter:
        ds.run_plan(lambda y, t: out, x, plan, check_nan=False, backend="cpu", tensor_coeffs=coeffs)
    assert dict(counter.ops) == {"diffsampler::ems_update": steps, "aten::select": steps,  # per step
                                 "aten::lift_fresh": 1, "aten::new_empty": 1, "aten::zeros_like": 1}  # once


def test_ems_save_load(tmp_path):
    lam = np.linspace(-3.0, 4.0, 11)
    ems = EMS(torch.from_numpy(lam), *map(torch.from_numpy, smooth_ems(lam, (2, 1), 0)))
    ems.save(tmp_path / "ems.pt")
    back = EMS.load(tmp_path / "ems.pt")
    assert all(torch.equal(getattr(back, k), getattr(ems, k)) for k in ("lambdas", "l", "s", "b"))


@pytest.mark.parametrize("backend, options", [("aot_eager", dict(order=3)),
                                              ("inductor", dict(order=1, corrector=False))])
def test_compiles_fullgraph(backend, options):
    """The whole loop traces without graph breaks; inductor lowers the op (its history write is a mutation
    even at order 1 without corrector, where nothing reads it back)."""
    lam = np.linspace(-math.log(14.6), -math.log(0.03), 61)
    plan = dpmv3_steps(Grid.uniform_lambda(14.6, 0.03, 4), "eps", ems=EMS(torch.from_numpy(lam),
                       *map(torch.from_numpy, smooth_ems(lam, (3, 1, 1), 0))), **options)
    model = lambda x, t: torch.tanh(x) * (1 + t.float() / 10)
    loop = lambda x: ds.run_plan(model, x, plan, check_nan=False, backend="cpu")
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    compiled = torch.compile(loop, fullgraph=True, backend=backend)(x)
    assert torch.allclose(compiled, loop(x), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ the estimator


def gaussian(mu, sd):
    """N(mu, diag(sd^2)) with its exact noise prediction (continuous time: t is the sigma ratio)."""
    def model(x, t):
        r = t.double()
        alpha = 1 / (1 + r ** 2).sqrt()
        sigma = r * alpha
        x0 = mu + alpha * sd ** 2 / (alpha ** 2 * sd ** 2 + sigma ** 2) * (x - alpha * mu)
        return (x - alpha * x0) / sigma
    return model


def test_fit_ems_on_a_gaussian_closed_form():
    """For N(mu, diag(sd^2)) the data prediction is linear, d eps/dx is diagonal: l = sigma^2 / (alpha^2 sd^2 +
    sigma^2) = 1 / (1 + sd^2 e^{2 lambda}) exactly (Rademacher probes are exact on a diagonal Jacobian, central
    differences on a linear model); f = -mu l is the same for every sample, so s = 0 and b = f' =
    2 mu sd^2 e^{2 lambda} l^2 (3-point differences: O(dlambda^2)). With these EMS the solver is exact up to
    the trapezoid error, where DPM-Solver++(2M) is not."""
    mu = torch.tensor([0.5, -1.0, 0.0, 2.0, 0.3], dtype=torch.float64)
    sd = torch.tensor([0.3, 1.0, 0.1, 0.5, 2.0], dtype=torch.float64)
    model = gaussian(mu, sd)
    gen = torch.Generator().manual_seed(case_seed("gaussian-ems"))
    ems = fit_ems(model, torch.randn(32, 5, generator=gen, dtype=torch.float64), np.geomspace(14.6, 0.03, 201),
                  probes=1, generator=gen)
    lam = ems.lambdas[:, None]
    l_true = 1 / (1 + sd ** 2 * torch.exp(2 * lam))
    assert (ems.l - l_true).abs().max() < 1e-9
    assert ems.s.abs().max() == 0
    b_true = 2 * mu * sd ** 2 * torch.exp(2 * lam) * l_true ** 2
    assert (ems.b - b_true).abs().max() < 1e-3 * b_true.abs().max()
    x = torch.randn(64, 5, generator=gen, dtype=torch.float64)
    a0, a1 = 1 / math.sqrt(1 + 14.6 ** 2), 1 / math.sqrt(1 + 0.03 ** 2)  # (x - alpha mu) / std is constant
    exact = a1 * mu + torch.sqrt(a1 ** 2 * sd ** 2 + (0.03 * a1) ** 2) * (x - a0 * mu) / torch.sqrt(
        a0 ** 2 * sd ** 2 + (14.6 * a0) ** 2)
    grid = Grid.uniform_lambda(14.6, 0.03, 5)
    v3 = ds.run_plan(model, x, dpmv3_steps(grid, "eps", ems=ems, order=2))
    dpmpp = ds.run_plan(model, x, dpm_steps(grid, "eps", order=2, final_sigma_zero=False))
    assert rel_err(v3, exact) < 1e-4 < 1e-2 < rel_err(dpmpp, exact)


def test_fit_ems_s_and_b_where_f_varies():
    """Where f varies over the samples, (s, b) is the least-squares line of f' on f. A model that ignores x
    (J = 0, so l = 0 exactly) and gives sample i the noise prediction with sigma eps / alpha = f_i(lambda) =
    a_i e^{s* u} + (b* / s*)(e^{s* u} - 1), u = lambda - lambda_0, has f' = s* f + b* on every sample."""
    s_true, b_true = 0.4, 0.25
    a = torch.linspace(-1.0, 1.0, 40, dtype=torch.float64)[:, None]
    lam0 = -math.log(14.6)

    def model(x, t):
        r = t.double()
        u = -torch.log(r) - lam0
        f = a * torch.exp(s_true * u) + b_true / s_true * torch.expm1(s_true * u)
        return (f / r).expand(x.shape).clone()  # eps = f alpha / sigma = f / r

    gen = torch.Generator().manual_seed(1)
    ems = fit_ems(model, torch.randn(40, 3, generator=gen, dtype=torch.float64), np.geomspace(14.6, 0.03, 101),
                  generator=gen)
    assert ems.l.abs().max() < 1e-12
    assert (ems.s - s_true).abs().max() < 1e-3
    assert (ems.b - b_true).abs().max() < 1e-3


# --------------------------------------------------------------------------------------------- quality


@pytest.fixture(scope="module")
def gmm_errors():
    """Median ODE errors at NFE 5, 10, 20 on bench/quality's smooth 16-D mixture against its 1000-step float64
    reference; EMS fitted on 2048 other samples over 201 points (seeded)."""
    from diffsampler.bench.quality import SIGMA_MAX, SIGMA_MIN, TARGETS, _multistep, run

    target = TARGETS["smooth-16d"]()
    model = target.model(None, "eps")
    x_T = torch.randn(128, target.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    truth = run(target, _multistep(unipc_steps, order=3), 1000, x_T)
    gen = torch.Generator().manual_seed(100)
    ems = fit_ems(model, torch.randn(2048, target.dim, generator=gen, dtype=torch.float64),
                  np.geomspace(SIGMA_MAX, SIGMA_MIN, 201), generator=gen)
    solvers = {"dpmpp_2m": _multistep(dpm_steps, order=2), "unipc_2": _multistep(unipc_steps, order=2),
               "dpmv3": lambda grid: dpmv3_steps(grid, "eps", ems=ems, order=2, lower_order_final=False)}
    return {name: [((run(target, fn, nfe, x_T) - truth).norm(dim=1) / truth.norm(dim=1)).median().item()
                   for nfe in (5, 10, 20)] for name, fn in solvers.items()}


def test_quality_on_the_mixture(gmm_errors):
    """v3 with fitted EMS beats DPM-Solver++(2M) at NFE 5, 10 and 20 and UniPC-2 at 5 and 10 (at 20 UniPC-2
    is as good or better: README)."""
    v3, dpmpp, unipc = gmm_errors["dpmv3"], gmm_errors["dpmpp_2m"], gmm_errors["unipc_2"]
    assert all(a < 0.75 * b for a, b in zip(v3, dpmpp)), gmm_errors
    assert v3[0] < 0.75 * unipc[0] and v3[1] < 0.75 * unipc[1], gmm_errors
    assert v3[0] > v3[1] > v3[2], gmm_errors


# ------------------------------------------------------------------------------------------- bad input


def test_bad_input():
    lam = np.linspace(-2.7, 3.6, 50)
    ok = EMS.constant(lam)
    with pytest.raises(ValueError, match="lambdas must be finite and strictly increasing"):
        EMS.constant(lam[::-1].copy())
    with pytest.raises(ValueError, match="l must have shape"):
        EMS(torch.from_numpy(lam), torch.ones(49), torch.zeros(50), torch.zeros(50))
    with pytest.raises(ValueError, match="must broadcast together"):
        EMS(torch.from_numpy(lam), torch.ones(50, 3), torch.zeros(50, 4), torch.zeros(50))
    with pytest.raises(ValueError, match="ems: the EMS lambda grid .* must cover the sampling range"):
        dpmv3_steps(Grid.uniform_lambda(14.6, 0.01, 5), "eps", ems=ok)  # lambda(0.01) = 4.6 > 3.6
    with pytest.raises(ValueError, match="sigmas must decrease strictly"):
        dpmv3_steps(Grid.from_sigmas([14.6, 1.0, 1.0, 0.1]), "eps", ems=ok)
    with pytest.raises(ValueError, match="ems: the grid ends at sigma = 0"):
        dpmv3_steps(Grid.from_sigmas([14.6, 1.0, 0.0]), "eps", ems=ok)
    with pytest.raises(ValueError, match="ems: DPM-Solver-v3 needs"):
        ds.sample(lambda x, t: x, torch.zeros(1, 3), steps=5, solver="dpmv3")
    shaped = EMS(torch.from_numpy(lam), torch.ones(50, 4), torch.zeros(50, 4), torch.zeros(50, 4))
    plan = dpmv3_steps(Grid.uniform_lambda(14.6, 0.03, 5), "eps", ems=shaped)
    with pytest.raises(ValueError, match=r"ems: the statistics' shape \(4,\) does not broadcast"):
        ds.run_plan(lambda x, t: x, torch.zeros(2, 3), plan)
    with pytest.raises(ValueError, match="order must be 1, 2 or 3"):
        dpmv3_steps(Grid.uniform_lambda(14.6, 0.03, 5), "eps", ems=ok, order=4)
    with pytest.raises(ValueError, match="clip / threshold_ratio"):
        ds.run_plan(lambda x, t: x, torch.zeros(2, 4), plan, clip=1.0)
    with pytest.raises(ValueError, match="points must be an integer >= 3"):
        fit_ems(lambda x, t: x, torch.zeros(2, 4), [1.0, 0.5], points=2)
