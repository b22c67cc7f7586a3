"""Gaussian teleportation: the closed-form probability-flow ODE jump of a Gaussian against the ODE solution written
out here (matrix square roots of the full covariance, and an RK4 integration of the exact Gaussian denoiser's ODE),
on every schedule family through ds.sample; fit() against torch.cov; on a Gaussian mixture the error against a
many-step reference at equal model calls, with and without teleport."""

import math

import numpy as np
import pytest
import torch

import diffsampler as ds
from diffsampler.solvers.grid import continuous_grid, multistep_grid
from diffsampler.targets import GaussianMixture

F64 = torch.float64
VP = ds.schedules.VP.scaled_linear()
VPC = ds.schedules.VPContinuous()
EDM = ds.schedules.EDM()
FLOW = ds.schedules.Flow()
LAM = torch.tensor([4.0, 2.0, 1.0, 0.5, 0.1, 0.01], dtype=F64)


def gaussian(seed: int = 0):
    """(mean, covariance) of a 6-D Gaussian with eigenvalues LAM along random orthonormal directions."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=F64))
    return torch.randn(6, generator=gen, dtype=F64), q @ torch.diag(LAM) @ q.T


def posterior_mean(mu, cov, x, alpha, sigma):
    """E[x0 | x_t = x] = mu + alpha C (alpha^2 C + sigma^2 I)^{-1} (x - alpha mu) for rows x."""
    a = alpha**2 * cov + sigma**2 * torch.eye(len(mu), dtype=F64)
    return mu + (alpha * cov @ torch.linalg.solve(a, (x.double() - alpha * mu).T)).T


def msqrt(a):
    w, v = torch.linalg.eigh(a)
    return v @ torch.diag(w.sqrt()) @ v.T


def exact_flow(mu, cov, x, start, end):
    """The PF-ODE solution x_t = alpha_t mu + (alpha_t^2 C + sigma_t^2 I)^{1/2} (alpha_s^2 C + sigma_s^2 I)^{-1/2}
    (x_s - alpha_s mu), with full-matrix square roots."""
    (a_s, s_s), (a_t, s_t) = start, end
    eye = torch.eye(len(mu), dtype=F64)
    m = msqrt(a_t**2 * cov + s_t**2 * eye) @ torch.linalg.inv(msqrt(a_s**2 * cov + s_s**2 * eye))
    return a_t * mu + (x.double() - a_s * mu) @ m.T


def rk4_flow(mu, cov, x, start, end, n=200):
    """The PF-ODE integrated by RK4 in u = log(sigma / alpha) on y = x / alpha: dy/du = y - E[x0 | y, sigma=e^u]."""
    (a_s, s_s), (a_t, s_t) = start, end
    f = lambda y, u: y - posterior_mean(mu, cov, y, 1.0, math.exp(u))  # noqa: E731
    u0, u1 = math.log(s_s / a_s), math.log(s_t / a_t)
    h, y = (u1 - u0) / n, x.double() / a_s
    for i in range(n):
        u = u0 + i * h
        k1 = f(y, u)
        k2 = f(y + h / 2 * k1, u + h / 2)
        k3 = f(y + h / 2 * k2, u + h / 2)
        k4 = f(y + h * k3, u + h)
        y = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return a_t * y


def models(mu, cov):
    """The exact model of the Gaussian on each schedule: (schedule, prediction, model(x, t))."""
    def eps_on(schedule):
        def eps(x, t):
            a, s = schedule.alpha_sigma_at(t)
            return ((x.double() - a * posterior_mean(mu, cov, x, a, s)) / s).to(x.dtype)
        return eps

    def edm(x, t):
        return posterior_mean(mu, cov, x, 1.0, float(t)).to(x.dtype)

    def flow(x, t):
        s = float(t) / 1000
        return ((x.double() - posterior_mean(mu, cov, x, 1 - s, s)) / s).to(x.dtype)

    return {"vp": (VP, "eps", eps_on(VP)), "vpc": (VPC, "eps", eps_on(VPC)), "edm": (EDM, "x0", edm),
            "flow": (FLOW, "flow", flow)}


def grid_points(kind: str, steps: int, solver: str = ""):
    """(model times, (alpha, sigma) per point) of the solvers' grid on each schedule, written out."""
    if kind == "vp":
        g = multistep_grid(VP, steps)
        return list(g.timesteps), [g.alpha_sigma(i) for i in range(len(g.sigmas))]
    if kind == "vpc":
        g = continuous_grid(VPC, steps)
        return list(g.timesteps), [g.alpha_sigma(i) for i in range(len(g.sigmas))]
    if kind == "edm":
        s = EDM.sigmas(steps)
        return s[:-1], [(1.0, v) for v in s]
    if solver == "flow_dpmpp_2m":  # its own grid (diffusers' use_flow_sigmas), model times t N as integers
        t = 1.0 - np.linspace(1, 1 / 1000, steps + 1)
        s = np.flip(FLOW.shifted(t))[:-1].tolist() + [0.0]
        return [int(v * 1000) for v in s[:-1]], [(1.0 - v, v) for v in s]
    s = [float(v) for v in FLOW.sigmas(steps)]
    return [float(np.float32(v) * np.float32(1000)) for v in s[:-1]], [(1.0 - v, v) for v in s]


def recorded(model):
    calls = []

    def record(x, t):
        calls.append((x.clone(), t.clone()))
        return model(x, t)

    return record, calls


def exact_teleport(mu, cov):
    w, v = torch.linalg.eigh(cov)
    return ds.GaussianTeleport(mu, w, v)


CASES = [("vp", "dpmpp_2m"), ("vp", "euler"), ("vpc", "dpmpp_2m"), ("vpc", "unipc"), ("edm", "heun"),
         ("edm", "restart"), ("flow", "flow_euler"), ("flow", "flow_dpmpp_2m")]


def low_rank_gaussian(seed: int = 0):
    """(mean, covariance, its GaussianTeleport) of U diag(4, 1) U^T + 0.3 (I - U U^T) in 6-D."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=F64))
    u, lam, rest = q[:, :2], torch.tensor([4.0, 1.0], dtype=F64), 0.3
    mu = torch.randn(6, generator=gen, dtype=F64)
    cov = u @ torch.diag(lam) @ u.T + rest * (torch.eye(6, dtype=F64) - u @ u.T)
    return mu, cov, ds.GaussianTeleport(mu, lam, u, rest_var=rest)


@pytest.mark.parametrize("structure", ["full", "low-rank"])
@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("kind, solver", CASES)
def test_the_first_model_call_gets_the_exact_ode_solution_at_the_skip_point(kind, solver, dtype, structure):
    """Through ds.sample: the model's first input is the Gaussian's exact PF-ODE solution from x_T to grid point
    skip, at that point's model time (float64 to 1e-10, float32 to 1e-6); a full covariance, and a rank-2 one
    plus an isotropic remainder."""
    if structure == "full":
        mu, cov = gaussian(0)
        tp = exact_teleport(mu, cov)
    else:
        mu, cov, tp = low_rank_gaussian(0)
    schedule, prediction, model = models(mu, cov)[kind]
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1), dtype=F64)
    steps, skip = 24 if solver == "restart" else 12, 4
    times, points = grid_points(kind, steps, solver)
    record, calls = recorded(model)
    ds.sample(record, x.to(dtype), steps, solver, schedule, prediction, teleport=tp, skip=skip)
    x_t = exact_flow(mu, cov, x * (points[0][1] if kind == "edm" else 1.0), points[0], points[skip])
    got, t = calls[0]
    assert float(t) == pytest.approx(times[skip], rel=1e-12 if dtype == F64 else 1e-6, abs=1e-12)
    assert got.dtype == dtype and (got.double() - x_t).norm() / x_t.norm() < (1e-10 if dtype == F64 else 1e-6)


@pytest.mark.parametrize("kind", ["vp", "edm", "flow"])
def test_the_closed_form_is_the_integrated_ode(kind):
    """teleport.apply against an RK4 integration of the exact denoiser's ODE (200 steps, float64: ~1e-9)."""
    mu, cov = gaussian(1)
    _, points = grid_points(kind, 10)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(2), dtype=F64) * points[1][1]
    got = exact_teleport(mu, cov).apply(x, points[1], points[5])
    want = rk4_flow(mu, cov, x, points[1], points[5])
    assert (got - want).norm() / want.norm() < 1e-8


def test_a_fine_step_solver_run_to_the_skip_time_agrees_to_its_discretisation_error():
    """Heun on a fine sigmas= list from sigma_max to the skip sigma lands where the teleport does (second order:
    the error falls ~4x per doubling)."""
    mu, cov = gaussian(2)
    _, _, model = models(mu, cov)["edm"]
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(3), dtype=F64)
    s0, s1 = EDM.sigma_max, EDM.sigmas(10)[3]
    tp = exact_teleport(mu, cov)
    want = tp.apply(x * s0, (1.0, s0), (1.0, s1))
    errs = []
    for n in (50, 100, 200):
        sig = np.exp(np.linspace(math.log(s0), math.log(s1), n + 1)).tolist()
        got = ds.sample(model, x, None, "heun", EDM, "x0", sigmas=sig)
        errs.append(float((got - want).norm() / want.norm()))
    assert errs[-1] < 1e-5 and errs[0] / errs[1] > 3.5 and errs[1] / errs[2] > 3.5, errs


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("kind, solver", [("edm", "heun"), ("vpc", "dpmpp_2m")])
def test_teleport_then_solver_converges_at_the_solvers_order(kind, solver, dtype, backend):
    """On the Gaussian, teleport to 1/4 of the grid then the solver: the final error against the exact ODE
    endpoint falls at the solver's order 2 (slope of log error vs log steps; measured -2.2 heun, -1.9 dpmpp_2m
    over 16-64 steps), on every backend (float64 on the reference one, which alone stores it)."""
    if dtype == F64 and backend != "reference":
        pytest.skip("the fused backends store float32 / float16 / bfloat16")
    mu, cov = gaussian(3)
    schedule, prediction, model = models(mu, cov)[kind]
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(4), dtype=F64)
    _, points = grid_points(kind, 8)
    want = exact_flow(mu, cov, x * (points[0][1] if kind == "edm" else 1.0), points[0], points[-1])
    tp = exact_teleport(mu, cov)
    ns = (16, 32, 64)
    errs = [float((ds.sample(model, x.to(dtype), n, solver, schedule, prediction, teleport=tp, skip=n // 4,
                             backend=backend).double() - want).norm() / want.norm()) for n in ns]
    slope = np.polyfit(np.log(ns), np.log(errs), 1)[0]
    assert slope < -1.8 and errs[-1] < 3e-3, (errs, slope)


@pytest.mark.parametrize("kind, solver", [("vp", "dpmpp_2m"), ("vpc", "unipc"), ("edm", "heun"), ("flow", "flow_euler"),
                                          ("flow", "flow_dpmpp_2m")])
def test_skip_zero_is_the_plain_solver(kind, solver):
    mu, cov = gaussian(4)
    schedule, prediction, model = models(mu, cov)[kind]
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(5), dtype=F64)
    plain = ds.sample(model, x, 10, solver, schedule, prediction)
    got = ds.sample(model, x, 10, solver, schedule, prediction, teleport=exact_teleport(mu, cov), skip=0)
    assert (got - plain).norm() / plain.norm() < 1e-12


def test_fit_is_the_sample_mean_and_covariance_eigenpairs():
    samples = torch.randn(50, 6, generator=torch.Generator().manual_seed(6), dtype=F64) * LAM.sqrt() + 1.0
    tp = ds.GaussianTeleport.fit(samples)
    w, v = torch.linalg.eigh(torch.cov(samples.T))
    w, v = w.flip(0), v.flip(1)
    assert torch.allclose(tp.mean, samples.mean(0), atol=1e-12)
    assert torch.allclose(tp.eigvals, w, rtol=1e-10, atol=1e-12)
    assert torch.allclose((tp.eigvecs * v).sum(0).abs(), torch.ones(6, dtype=F64), atol=1e-8)
    assert tp.rest_var == 0.0


def test_fit_recovers_a_known_gaussian():
    mu, cov = gaussian(7)
    w, v = torch.linalg.eigh(cov)
    n = 20000
    samples = mu + torch.randn(n, 6, generator=torch.Generator().manual_seed(8), dtype=F64) @ msqrt(cov)
    tp = ds.GaussianTeleport.fit(samples)
    assert (tp.mean - mu).abs().max() < 5 * math.sqrt(4.0 / n)
    assert ((tp.eigvals - w.flip(0)).abs() / w.flip(0)).max() < 0.05
    assert ((tp.eigvecs[:, :4] * v.flip(1)[:, :4]).sum(0).abs() > 0.99).all()


def test_rank_truncation_keeps_the_top_eigenpairs_and_an_isotropic_remainder():
    """fit(rank=2): the top two eigenpairs, rest_var = the mean of the other eigenvalues (the total variance
    kept); its teleport is the exact ODE of U diag(lam) U^T + rest_var (I - U U^T), also on image-shaped data."""
    mu, cov = gaussian(9)
    samples = mu + torch.randn(400, 6, generator=torch.Generator().manual_seed(10), dtype=F64) @ msqrt(cov)
    full, low = ds.GaussianTeleport.fit(samples), ds.GaussianTeleport.fit(samples, rank=2)
    assert low.rank == 2 and torch.allclose(low.eigvals, full.eigvals[:2])
    assert low.rest_var == pytest.approx(float(full.eigvals[2:].mean()), rel=1e-12)
    u = low.eigvecs
    c = u @ torch.diag(low.eigvals) @ u.T + low.rest_var * (torch.eye(6, dtype=F64) - u @ u.T)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(11), dtype=F64) * 3
    start, end = (0.3, 0.95), (0.9, 0.4)
    want = exact_flow(low.mean, c, x, start, end)
    assert (low.apply(x, start, end) - want).norm() / want.norm() < 1e-12
    zero = ds.GaussianTeleport(low.mean, low.eigvals, u)  # rest_var 0, as the authors' code: the rest ~ sigma
    want0 = exact_flow(low.mean, u @ torch.diag(low.eigvals) @ u.T, x, start, end)
    assert (zero.apply(x, start, end) - want0).norm() / want0.norm() < 1e-12
    images = ds.GaussianTeleport.fit(samples.reshape(400, 1, 2, 3), rank=2)
    assert images.shape == (1, 2, 3)
    assert torch.allclose(images.apply(x.reshape(4, 1, 2, 3), start, end).reshape(4, 6), low.apply(x, start, end))


def mixture_errors(solver, schedule, prediction, model, x, ref, tp, nfe, skip_fraction):
    """(plain error, teleported error) against ref at `nfe` model calls."""
    calls = lambda steps: 2 * steps - 1 if solver == "heun" else steps  # noqa: E731
    err = lambda y: float((y - ref).norm() / ref.norm())  # noqa: E731
    steps = next(n for n in range(nfe, 0, -1) if calls(n) <= nfe)
    total = round(steps / (1 - skip_fraction))
    plain = ds.sample(model, x, steps, solver, schedule, prediction)
    tele = ds.sample(model, x, total, solver, schedule, prediction, teleport=tp, skip=total - steps)
    return err(plain), err(tele)


@pytest.fixture(scope="module")
def mixture():
    target = GaussianMixture.random(dim=64, modes=8, seed=0)
    tp = ds.GaussianTeleport.fit(target.sample(20000, torch.Generator().manual_seed(1)))
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(2), dtype=F64)
    return target, tp, x


def test_on_the_mixture_teleport_lowers_the_ode_error_at_equal_model_calls(mixture):
    """64-D mixture, Gaussian fitted from exact samples, 64 x_T: at equal NFE, skipping 30 % of a longer grid
    beats the plain solver (measured: dpmpp_2m 12 NFE 0.091 -> 0.010, 20 NFE 0.0076 -> 0.0038; heun 9 NFE
    1.98 -> 0.56, 15 NFE 0.34 -> 0.17); skipping half the logSNR grid hits the Gaussian approximation's floor
    (0.019 at 20 NFE), worse than the plain 20-step dpmpp_2m."""
    target, tp, x = mixture
    eps = target.model(VPC)
    ref = ds.sample(eps, x, 200, "dpmpp_2m", VPC, "eps")
    plain, tele = mixture_errors("dpmpp_2m", VPC, "eps", eps, x, ref, tp, 12, 0.3)
    assert tele < plain / 3, (plain, tele)
    plain, tele = mixture_errors("dpmpp_2m", VPC, "eps", eps, x, ref, tp, 20, 0.3)
    assert tele < 0.75 * plain, (plain, tele)
    plain, tele = mixture_errors("dpmpp_2m", VPC, "eps", eps, x, ref, tp, 20, 0.5)
    assert tele > 2 * plain, (plain, tele)
    edm = lambda x, s: target.posterior_mean(x, torch.ones((), dtype=F64), s.double())  # noqa: E731
    ref = ds.sample(edm, x, 200, "heun", EDM, "x0")
    for nfe in (9, 15):
        plain, tele = mixture_errors("heun", EDM, "x0", edm, x, ref, tp, nfe, 0.3)
        assert tele < plain / 2, (nfe, plain, tele)


def test_bad_arguments():
    mu, cov = gaussian(0)
    tp = exact_teleport(mu, cov)
    model = models(mu, cov)["vp"][2]
    x = torch.randn(2, 6, dtype=F64)
    for skip, match in ((10, r"skip must be an integer in \[0, 9\]"), (-1, "skip must be"), (1.5, "skip must be")):
        with pytest.raises(ValueError, match=match):
            ds.sample(model, x, 10, "dpmpp_2m", VP, teleport=tp, skip=skip)
    with pytest.raises(ValueError, match="teleport needs skip"):
        ds.sample(model, x, 10, "dpmpp_2m", VP, teleport=tp)
    with pytest.raises(ValueError, match="needs teleport"):
        ds.sample(model, x, 10, "dpmpp_2m", VP, skip=2)
    with pytest.raises(ValueError, match="teleport must be a diffsampler.GaussianTeleport"):
        ds.sample(model, x, 10, "dpmpp_2m", VP, teleport=(mu, cov), skip=2)
    with pytest.raises(ValueError, match="x must have 6 elements per sample"):
        ds.sample(model, torch.randn(2, 5, dtype=F64), 10, "dpmpp_2m", VP, teleport=tp, skip=2)
    with pytest.raises(ValueError, match="solver 'restart' does not take one"):
        ds.sample(model, x, 10, "restart", VP, teleport=tp, skip=2)
    with pytest.raises(ValueError, match="sigmas= a list needs a VP, EDM or Flow schedule"):
        ds.sample(model, x, None, "dpmpp_2m", VPC, teleport=tp, skip=1, sigmas=[2.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="steps must be an integer"):
        ds.sample(model, x, None, "dpmpp_2m", VP, teleport=tp, skip=1)
    with pytest.raises(ValueError, match=r"skip must be an integer in \[0, 1\]"):
        ds.sample(models(mu, cov)["edm"][2], x, None, "heun", EDM, "x0", teleport=tp, skip=2, sigmas=[5.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="does not combine with time_shift or lml"):
        ds.sample(model, x, 10, "dpmpp_2m", VP, teleport=tp, skip=2, lml=ds.LML())
    samples = torch.randn(10, 6, dtype=F64)
    with pytest.raises(ValueError, match=r"rank must be an integer in \[1, 6\]"):
        ds.GaussianTeleport.fit(samples, rank=7)
    with pytest.raises(ValueError, match="at least 2 rows"):
        ds.GaussianTeleport.fit(samples[:1])
    with pytest.raises(ValueError, match="samples must be a floating-point tensor"):
        ds.GaussianTeleport.fit(samples[0])
    w, v = torch.linalg.eigh(cov)
    with pytest.raises(ValueError, match="eigvals must have shape"):
        ds.GaussianTeleport(mu, w[:3], v)
    with pytest.raises(ValueError, match="eigvecs must have shape"):
        ds.GaussianTeleport(mu[:4], w, v)
    with pytest.raises(ValueError, match="orthonormal"):
        ds.GaussianTeleport(mu, w, v * 2)
    with pytest.raises(ValueError, match="eigvals must be finite and >= 0"):
        ds.GaussianTeleport(mu, -w, v)
    with pytest.raises(ValueError, match="rest_var"):
        ds.GaussianTeleport(mu, w[:2], v[:, :2], rest_var=-1.0)
    with pytest.raises(ValueError, match="start sigma"):
        tp.apply(x, (1.0, 0.0), (1.0, 0.5))


def test_bench_teleport_writes_its_rows(tmp_path):
    """`bench teleport` at a tiny size: every (solver, NFE, fraction) row, the NFE-saved summary, JSON and plot."""
    import json

    from diffsampler.bench import teleport as bench

    bench.main(["--samples", "4", "--nfe-max", "5", "--digits-n", "0", "--out", str(tmp_path)])
    data = json.loads(next(tmp_path.glob("teleport-*.json")).read_text())
    rows = data["rows"]
    assert {(r["solver"], r["nfe"]) for r in rows} == {("dpmpp_2m", n) for n in (3, 4, 5)} | {("heun", 3), ("heun", 5)}
    setting = {"dpmpp_2m": (VPC, "eps"), "heun": (EDM, "x0")}
    assert all(r["steps"] - r["skip"] == ds.solvers.steps_for_nfe(r["solver"], *setting[r["solver"]][:1], r["nfe"],
                                                                  setting[r["solver"]][1]) for r in rows)
    assert len(data["nfe_saved"]) == 5 and (tmp_path / "teleport.png").exists()
