"""`python -m diffsampler.bench quality`: error against NFE per solver on analytic Gaussian mixtures.

The exact denoiser of a Gaussian mixture is known in closed form (diffsampler.targets), so each solver is
measured against the exact answer rather than another sampler:
  (a) ODE error: the median over samples of ||x - x_ref|| / ||x_ref|| at sigma_min, where x_ref is a 1000-step
      float64 run of UniPC-3 from the same x_T, over the same endpoints; and the empirical order, the slope of
      log error against log NFE;
  (b) sliced Wasserstein-2 to exact samples of the marginal at sigma_min;
  (c) mean log-likelihood under that exact marginal (the exact samples' value is printed as the ceiling).
All solvers run on one continuous-time grid, uniform in lambda = -log(sigma) from sigma_max = 14.6 to
sigma_min = 0.03 (Stable Diffusion's range), without lower-order final steps, so that the orders show.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

import diffsampler as ds
from diffsampler.bench import cli
from diffsampler.bench.common import machine_record, slug, write_json
from diffsampler.bench.plots import pyplot, save
from diffsampler.solvers import Grid, dpm_steps, deis_steps, ghvb_steps, unipc_steps
from diffsampler.solvers.res import res_multistep_plan
from diffsampler.targets import GaussianMixture, sliced_wasserstein

SIGMA_MAX, SIGMA_MIN = 14.6, 0.03
NFES = (5, 10, 20, 50)


@dataclass(frozen=True)
class Solver:
    name: str
    order: int | None  # the theoretical order of convergence of the ODE error (None: not established)
    plan: Callable  # Grid -> Plan
    note: str = ""


def _multistep(fn, **kw):
    extra = {"final_sigma_zero": False} if fn is dpm_steps else {}
    extra = {"lower_order_final": False, **extra} if fn is not ghvb_steps else {}
    return lambda grid: fn(grid, "eps", **extra, **kw)


SOLVERS = [
    Solver("ddim", 1, _multistep(dpm_steps, order=1), "DPM-Solver++ 1 = DDIM"),
    Solver("dpmpp_2m", 2, _multistep(dpm_steps, order=2)),
    Solver("dpmpp_3m", 3, _multistep(dpm_steps, order=3),
           "published D2 weight (diffusers, k-diffusion): half the Taylor one, second order in practice"),
    Solver("dpmpp_3m_taylor", 3, _multistep(dpm_steps, order=3, phi3="taylor"), "phi3='taylor'"),
    Solver("dpm_2m", 2, _multistep(dpm_steps, order=2, algorithm="dpmsolver"), "noise prediction"),
    Solver("unipc_2", 3, _multistep(unipc_steps, order=2), "UniPC-2 bh2 with corrector: order 3"),
    Solver("unipc_3", 4, _multistep(unipc_steps, order=3), "UniPC-3 bh2 with corrector: order 4"),
    Solver("deis_2", 2, _multistep(deis_steps, order=2)),
    Solver("deis_3", 3, _multistep(deis_steps, order=3)),
    Solver("ghvb_1.5", None, _multistep(ghvb_steps, order=2, beta=0.5), "GHVB order 2, beta 0.5 (paper: 1.5)"),
    Solver("ghvb_2.8", None, _multistep(ghvb_steps, order=3, beta=0.8), "GHVB order 3, beta 0.8 (paper: 2.8)"),
    Solver("res_multistep", 2, lambda grid: res_multistep_plan(grid, len(grid.timesteps), "eps"),
           "RES 2nd-order exponential multistep in the VE scale (ComfyUI's res_multistep)"),
]

TARGETS = {
    "smooth-16d": lambda: GaussianMixture(torch.ones(4), torch.randn(4, 16, generator=torch.Generator().manual_seed(0),
                                                                     dtype=torch.float64) / 4, torch.full((4,), 0.3)),
    "ring-2d": lambda: GaussianMixture.ring(),
    "random-64d": lambda: GaussianMixture.random(dim=64, modes=8, seed=0),
}


def run(target: GaussianMixture, plan_fn: Callable, steps: int, x_T: torch.Tensor) -> torch.Tensor:
    """The sample at sigma_min of one solver with `steps` model calls, from standard-normal x_T (float64)."""
    grid = Grid.uniform_lambda(SIGMA_MAX, SIGMA_MIN, steps)
    alpha_0 = grid.alpha_sigma(0)[0]
    return ds.run_plan(target.model(None, "eps"), x_T * alpha_0 / alpha_0, plan_fn(grid))


def noised_exact(target: GaussianMixture, n: int, seed: int) -> torch.Tensor:
    """Exact samples of the marginal at sigma_min: alpha x0 + sigma eps."""
    g = torch.Generator().manual_seed(seed)
    alpha = 1 / math.sqrt(1 + SIGMA_MIN**2)
    return alpha * target.sample(n, generator=g) + SIGMA_MIN * alpha * torch.randn(n, target.dim, generator=g,
                                                                                     dtype=torch.float64)


def marginal_log_prob(target: GaussianMixture, x: torch.Tensor) -> torch.Tensor:
    alpha = 1 / math.sqrt(1 + SIGMA_MIN**2)
    noised = GaussianMixture(target.weights, alpha * target.means,
                             torch.sqrt(alpha**2 * target.stds**2 + (SIGMA_MIN * alpha) ** 2))
    return noised.log_prob(x)


@dataclass
class Curve:
    solver: str
    order: int
    errors: list[float] = field(default_factory=list)
    sliced_w2: list[float] = field(default_factory=list)
    log_likelihood: list[float] = field(default_factory=list)

    def slopes(self, nfes) -> list[float]:
        return [-math.log(self.errors[i + 1] / self.errors[i]) / math.log(nfes[i + 1] / nfes[i])
                for i in range(len(nfes) - 1)]


def convergence(target: GaussianMixture, solvers=SOLVERS, nfes=NFES, n: int = 512, seed: int = 0,
                metrics: bool = True) -> list[Curve]:
    """One Curve per solver: ODE error (and, with metrics, sliced W2 and log-likelihood) at each NFE."""
    x_T = torch.randn(n, target.dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    truth = run(target, _multistep(unipc_steps, order=3), 1000, x_T)
    exact = noised_exact(target, n, seed + 1)
    curves = []
    for solver in solvers:
        curve = Curve(solver.name, solver.order)
        for nfe in nfes:
            x = run(target, solver.plan, nfe, x_T)
            curve.errors.append(((x - truth).norm(dim=1) / truth.norm(dim=1)).median().item())
            if metrics:
                curve.sliced_w2.append(sliced_wasserstein(x, exact))
                curve.log_likelihood.append(marginal_log_prob(target, x).mean().item())
        curves.append(curve)
    return curves


def dc_comparison(target: GaussianMixture, nfes=(5, 8, 10, 15), n: int = 512) -> list[dict]:
    """UniPC with and without DC-Solver's compensation on the discrete VP (Stable Diffusion) schedule with
    diffusers' default grid: ratios fitted on 32 other samples (seed 100), error against a 999-step DDIM run at
    sigma = 0 on the evaluation samples (seed 0)."""
    from diffsampler.solvers.dc import fit_dc_ratios

    schedule = ds.schedules.VP.scaled_linear()
    model = target.model(schedule, "eps")
    fit_x = torch.randn(32, target.dim, generator=torch.Generator().manual_seed(100), dtype=torch.float64)
    x_T = torch.randn(n, target.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    truth = ds.sample(model, x_T, steps=999, solver="ddim", schedule=schedule, timestep_spacing="trailing")
    rows = []
    for nfe in nfes:
        ratios = fit_dc_ratios(model, fit_x, schedule, nfe)
        errors = []
        for options in ({}, {"dc_ratios": ratios}):
            x = ds.sample(model, x_T, steps=nfe, solver="unipc", schedule=schedule, **options)
            errors.append(((x - truth).norm(dim=1) / truth.norm(dim=1)).median().item())
        rows.append(dict(nfe=nfe, unipc=errors[0], dc_unipc=errors[1], ratios=ratios))
    return rows


def dpmv3_comparison(target: GaussianMixture, nfes=(5, 10, 20), n: int = 512, fit_n: int = 2048,
                     points: int = 201) -> dict:
    """DPM-Solver-v3 on the bench's grid with EMS fitted by fit_ems on `fit_n` other samples (seed 100) at
    `points` lambdas uniform over [sigma_min, sigma_max], against DPM-Solver++(2M), UniPC-2/3 and v3 with the
    degenerate EMS (l = 1, s = b = 0: DPM-Solver++ with v3's corrector); median ODE error as `convergence`."""
    import time

    import numpy as np

    from diffsampler.solvers.dpmv3 import EMS, dpmv3_steps, fit_ems

    model = target.model(None, "eps")
    g = torch.Generator().manual_seed(100)
    start = time.perf_counter()
    ems = fit_ems(model, torch.randn(fit_n, target.dim, generator=g, dtype=torch.float64),
                  np.geomspace(SIGMA_MAX, SIGMA_MIN, points), generator=g)
    fit_seconds = time.perf_counter() - start
    v3 = lambda e, order: lambda grid: dpmv3_steps(grid, "eps", ems=e, order=order, lower_order_final=False)
    solvers = [s for s in SOLVERS if s.name in ("dpmpp_2m", "unipc_2", "unipc_3")] + [
        Solver("dpmv3_2", None, v3(ems, 2), "fitted EMS"), Solver("dpmv3_3", None, v3(ems, 3), "fitted EMS"),
        Solver("dpmv3_2_l1", None, v3(EMS.constant(ems.lambdas), 2), "degenerate EMS l=1, s=b=0")]
    curves = convergence(target, solvers, nfes, n=n, metrics=False)
    return dict(fit_n=fit_n, points=points, fit_seconds=fit_seconds, nfes=list(nfes),
                errors={c.solver: c.errors for c in curves})


CATALOGUE_NFES = (5, 10, 20)
AS_USED = {"pndm": {"skip_prk_steps": True}}  # the options pipelines ship with (Stable Diffusion 1.x's PNDM config)


def catalogue_solvers() -> list[str]:
    """Every solver of ds.sample that runs on a discrete VP schedule without fitted statistics."""
    return [name for name, spec in ds.solvers.SOLVERS.items() if ds.schedules.VP in spec.plans and name != "dpmv3"]


def catalogue(target: GaussianMixture, nfes=CATALOGUE_NFES, n: int = 512, seed: int = 0) -> list[dict]:
    """Every solver as a user runs it: ds.sample on Stable Diffusion's schedule with diffusers' trailing grid
    (the solvers tied to their own grid on it; AS_USED's options), as many steps as fit in the NFE, the exact
    eps model. Per NFE: sliced W2 of the samples to exact data samples, and for the deterministic solvers the
    median ODE error against a 999-step DDIM run from the same x_T at sigma = 0 (the solvers that end at
    sigma_min, dpm_2m / dpm_3m / deis, at their own end; stochastic solvers: None)."""
    schedule = ds.schedules.VP.scaled_linear()
    model = target.model(schedule, "eps")
    x_T = torch.randn(n, target.dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    truth = ds.sample(model, x_T, steps=999, solver="ddim", schedule=schedule, timestep_spacing="trailing")
    exact = target.sample(n, generator=torch.Generator().manual_seed(seed + 1))
    rows = []
    for solver in catalogue_solvers():
        options = {"timestep_spacing": "trailing"} if "timestep_spacing" in ds.solvers.SOLVERS[solver].options() else {}
        options.update(AS_USED.get(solver, {}))
        row = dict(solver=solver, nfes=list(nfes), steps=[], ode_error=[], sliced_w2=[], options=options)
        for nfe in nfes:
            steps = ds.solvers.steps_for_nfe(solver, schedule, nfe, "eps", **options)
            plan = ds.solvers.make_plan(solver, schedule, steps, "eps", **options)
            x = ds.sample(model, x_T, steps=steps, solver=solver, schedule=schedule,
                          generator=torch.Generator().manual_seed(seed + 2), **options)
            stochastic = any(step.needs_noise for step in plan.steps)
            row["steps"].append(steps)
            row["ode_error"].append(None if stochastic else ((x - truth).norm(dim=1) / truth.norm(dim=1)).median().item())
            row["sliced_w2"].append(sliced_wasserstein(x, exact))
        rows.append(row)
    rows.append(dict(solver="exact", sliced_w2=[sliced_wasserstein(target.sample(n, generator=torch.Generator()
                                                                                 .manual_seed(seed + 3)), exact)]))
    return rows


def print_catalogue(name: str, rows: list[dict]) -> None:
    nfes = rows[0]["nfes"]
    print(f"\n{name}, every solver on SD's schedule (trailing grid), sliced W2 to exact data / ODE error:")
    print(f"{'solver':<20}" + "".join(f"{'SW2@' + str(n):>10}" for n in nfes) + "".join(f"{'err@' + str(n):>11}" for n in nfes))
    for r in rows[:-1]:
        errs = "".join(f"{e:>11.2e}" if e is not None else f"{'sde':>11}" for e in r["ode_error"])
        print(f"{r['solver']:<20}" + "".join(f"{v:>10.4f}" for v in r["sliced_w2"]) + errs)
    print(f"exact vs exact sliced W2 (the floor at this sample size): {rows[-1]['sliced_w2'][0]:.4f}")


def _plot_catalogue(results: dict, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(5.6 * len(results), 4.6))
    axes = axes if len(results) > 1 else [axes]
    for ax, (name, rows) in zip(axes, results.items()):
        for k, r in enumerate(rows[:-1]):  # dashed: the stochastic solvers
            ax.loglog(r["nfes"], r["sliced_w2"], marker="os^vD<>"[k % 7], color=plt.cm.tab20(k % 20),
                      linestyle="--" if r["ode_error"][0] is None else "-", label=r["solver"])
        ax.axhline(rows[-1]["sliced_w2"][0], color="gray", linestyle=":", label="exact vs exact")
        ax.set_title(name)
        ax.set_xlabel("NFE")
        ax.set_ylabel("sliced W2 to exact samples")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=6, ncol=2)
    save(fig, path)


def _plot(results: dict, nfes, path: Path) -> None:
    plt = pyplot()

    fig, axes = plt.subplots(1, len(results), figsize=(5.2 * len(results), 4.4))
    for ax, (name, curves) in zip(axes, results.items()):
        for c in curves:
            ax.loglog(nfes, c["errors"], marker="o", label=f"{c['solver']} (p={c['order'] or '-'})")
        ax.set_title(name)
        ax.set_xlabel("NFE")
        ax.set_ylabel("median relative ODE error")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    save(fig, path)


def main(argv=None) -> None:
    ap = cli.parser("quality", __doc__)
    ap.add_argument("--targets", type=cli.listed(cli.choice(TARGETS, "target")), default=None,
                    help=f"comma-separated, among {', '.join(TARGETS)} (default: all; --dpmv3: ring-2d, smooth-16d)")
    ap.add_argument("--nfes", type=cli.listed(cli.positive_int), default=None,
                    help=f"comma-separated (default {','.join(map(str, NFES))}; --dpmv3: 5,10,20)")
    ap.add_argument("--n", type=cli.positive_int, default=512, help="samples per run")
    ap.add_argument("--out", default="bench/results", help="directory of the JSON and PNG ('' for none)")
    ap.add_argument("--no-catalogue", action="store_true",
                    help="skip the table of every solver on Stable Diffusion's schedule (quality-catalogue.png)")
    ap.add_argument("--dpmv3", action="store_true",
                    help="only DPM-Solver-v3 against DPM-Solver++(2M) and UniPC (EMS fitted first; the 2-D and "
                         "16-D targets by default) into dpmv3-quality-*.json")
    args = ap.parse_args(argv)
    if args.dpmv3:
        return _dpmv3_main(args)
    nfes = args.nfes or list(NFES)
    results = {}
    for name in args.targets or TARGETS:
        target = TARGETS[name]()
        curves = convergence(target, nfes=nfes, n=args.n)
        exact = noised_exact(target, args.n, 7)
        ref_sw = sliced_wasserstein(exact, noised_exact(target, args.n, 1))
        print(f"\n{name}: {target.dim}-D, {len(target.weights)} modes; exact-vs-exact sliced W2 {ref_sw:.4f}, "
              f"exact mean log p {marginal_log_prob(target, exact).mean().item():.3f}")
        print(f"{'solver':<17}{'p':>3}" + "".join(f"{'err@' + str(n):>11}" for n in nfes)
              + f"{'slope':>8}" + "".join(f"{'SW2@' + str(n):>10}" for n in nfes)
              + "".join(f"{'logp@' + str(n):>10}" for n in nfes))
        for c in curves:
            print(f"{c.solver:<17}{c.order or '-':>3}" + "".join(f"{e:>11.2e}" for e in c.errors)
                  + f"{c.slopes(nfes)[-1]:>8.2f}" + "".join(f"{v:>10.4f}" for v in c.sliced_w2)
                  + "".join(f"{v:>10.3f}" for v in c.log_likelihood))
        results[name] = [dict(solver=c.solver, order=c.order, errors=c.errors, slopes=c.slopes(nfes),
                              sliced_w2=c.sliced_w2, log_likelihood=c.log_likelihood) for c in curves]
        results[name + ":reference"] = dict(sliced_w2_exact_vs_exact=ref_sw,
                                            log_likelihood_exact=marginal_log_prob(target, exact).mean().item())
        if not args.no_catalogue:
            results[name + ":catalogue"] = catalogue(target, n=args.n)
            print_catalogue(name, results[name + ":catalogue"])
        if target.dim > 2:
            dc = dc_comparison(target)
            results[name + ":dc-solver"] = dc
            print("DC-Solver (UniPC-2 bh2, SD schedule, diffusers grid; ratios fitted on other samples): "
                  + ", ".join(f"NFE {r['nfe']}: {r['unipc']:.4f} -> {r['dc_unipc']:.4f}" for r in dc))
    if args.out:
        out = Path(args.out)
        record = machine_record(torch.device("cpu"))
        payload = dict(benchmark="quality", machine=record, nfes=nfes, sigma_max=SIGMA_MAX, sigma_min=SIGMA_MIN,
                       note=__doc__.strip().splitlines()[0],
                       solvers={s.name: dict(order=s.order, note=s.note) for s in SOLVERS}, results=results)
        path = write_json(out / f"quality-{slug(record['device'])}.json", payload)
        curves_only = {k: v for k, v in results.items() if ":" not in k}
        _plot(curves_only, nfes, out / "quality.png")
        cat = {k.split(":")[0]: v for k, v in results.items() if k.endswith(":catalogue")}
        if cat:
            _plot_catalogue(cat, out / "quality-catalogue.png")
        print(f"\nwrote {path} and {out / 'quality.png'}" + (f", {out / 'quality-catalogue.png'}" if cat else ""))


def _dpmv3_main(args) -> None:
    targets = args.targets or ["smooth-16d", "ring-2d"]
    nfes = args.nfes or [5, 10, 20]
    results = {}
    for name in targets:
        r = results[name] = dpmv3_comparison(TARGETS[name](), nfes, n=args.n)
        print(f"\n{name}: EMS fitted on {r['fit_n']} samples at {r['points']} lambdas in {r['fit_seconds']:.1f} s; "
              f"median ODE error")
        print(f"{'solver':<14}" + "".join(f"{'err@' + str(v):>11}" for v in nfes))
        for solver, errors in r["errors"].items():
            print(f"{solver:<14}" + "".join(f"{e:>11.2e}" for e in errors))
    if args.out:
        record = machine_record(torch.device("cpu"))
        payload = dict(benchmark="quality-dpmv3", machine=record, sigma_max=SIGMA_MAX, sigma_min=SIGMA_MIN,
                       note=dpmv3_comparison.__doc__.split(";")[0], results=results)
        path = write_json(Path(args.out) / f"dpmv3-quality-{slug(record['device'])}.json", payload)
        print(f"\nwrote {path}")
