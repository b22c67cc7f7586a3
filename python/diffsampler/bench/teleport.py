"""`python -m diffsampler.bench teleport`: Gaussian teleportation (Wang & Vastola) at equal NFE, with and without
replacing a solver's first steps by the closed-form probability-flow ODE solution of the data's Gaussian fit.

- mixture: the 64-D random Gaussian mixture (targets.GaussianMixture.random), its Gaussian fitted from 20000
  exact samples; the ODE error (median over `--samples` x_T of ||x - x_ref|| / ||x_ref||) against a 1000-step
  float64 run of the same solver on the same schedule from the same x_T: dpmpp_2m on VPContinuous() (t = 1 to
  sigma 0), heun on EDM() (sigma 80 to 0).
- digits: the learned 8x8-digits score of `bench digits`, its Gaussian fitted to the training digits; Fréchet
  distance of `--digits-n` samples to the held-out digits (dpmpp_2m, diffusers' trailing grid), over 3 seeds.
A skip fraction f runs the solver's grid of round(steps / (1 - f)) steps from its point total - steps, so that
every row makes the same model calls; "NFE saved" is the plain solver's NFE less the fewest teleported model
calls (over the fractions) that reach its error.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

import diffsampler as ds
from diffsampler.bench import cli
from diffsampler.bench.common import machine_record, slug, write_json
from diffsampler.bench.plots import pyplot, save
from diffsampler.targets import GaussianMixture

FRACTIONS = (0.0, 0.15, 0.3, 0.5)
VPC, EDM = ds.schedules.VPContinuous(), ds.schedules.EDM()
DIGIT_NFES = (5, 10, 20)


def edm_x0(target: GaussianMixture):
    """The mixture's exact denoiser at EDM noise level sigma."""
    return lambda x, s: target.posterior_mean(x, torch.ones((), dtype=torch.float64), s.double()).to(x.dtype)


def split(steps: int, fraction: float) -> tuple[int, int]:
    """(total grid steps, skip) that leave `steps` steps after skipping `fraction` of the grid."""
    total = round(steps / (1 - fraction))
    return total, total - steps


def mixture_rows(solver: str, schedule, prediction: str, model, x: torch.Tensor, tp, nfes) -> list[dict]:
    """Median ODE error per NFE and skip fraction against the 1000-step run of the solver."""
    ref = ds.sample(model, x, 1000, solver, schedule, prediction)
    rows = []
    for nfe in nfes:
        steps = ds.solvers.steps_for_nfe(solver, schedule, nfe, prediction)
        for f in FRACTIONS:
            total, skip = split(steps, f)
            kw = dict(teleport=tp, skip=skip) if skip else {}
            y = ds.sample(model, x, total, solver, schedule, prediction, **kw)
            err = ((y - ref).norm(dim=1) / ref.norm(dim=1)).median().item()
            rows.append(dict(target="mixture-64d", solver=solver, schedule=repr(schedule), nfe=nfe, fraction=f,
                             steps=total, skip=skip, error=err))
    return rows


def nfe_saved(rows: list[dict], metric: str) -> list[dict]:
    """Per plain NFE: the fewest teleported model calls reaching its `metric` (None where none does)."""
    out = []
    for plain in (r for r in rows if r["fraction"] == 0):
        reach = [r["nfe"] for r in rows if r["fraction"] > 0 and r[metric] <= plain[metric]]
        best = min(reach) if reach else None
        out.append(dict(solver=plain["solver"], target=plain["target"], nfe=plain["nfe"], teleport_nfe=best,
                        saved=None if best is None else plain["nfe"] - best))
    return out


def digits_rows(n: int, seeds=(0, 1, 2)) -> list[dict]:
    """FD to the held-out digits per NFE and skip fraction (dpmpp_2m, trailing grid)."""
    from diffsampler import digits

    data = digits.load_digits()
    model, clf = digits.denoiser(), digits.classifier()
    tp = ds.GaussianTeleport.fit(data.train_x)
    rows = []
    for nfe in DIGIT_NFES:
        for f in FRACTIONS:
            total, skip = split(nfe, f)
            fds = []
            for seed in seeds:
                x = torch.randn(n, digits.PIXELS, generator=torch.Generator().manual_seed(seed))
                kw = dict(teleport=tp, skip=skip) if skip else {}
                with torch.no_grad():
                    y = ds.sample(model, x, total, "dpmpp_2m", model.schedule, model.prediction,
                                  timestep_spacing="trailing", **kw)
                fds.append(digits.frechet_distance(y, data.held_x, clf))
            rows.append(dict(target="digits", solver="dpmpp_2m", nfe=nfe, fraction=f, steps=total, skip=skip,
                             fd=statistics.mean(fds), fd_std=statistics.stdev(fds), fds=fds))
    return rows


def _plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    from matplotlib.ticker import NullLocator

    panels = [("mixture-64d", "dpmpp_2m", "error"), ("mixture-64d", "heun", "error"), ("digits", "dpmpp_2m", "fd")]
    panels = [p for p in panels if any(r["target"] == p[0] and r["solver"] == p[1] for r in rows)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4), squeeze=False)
    for ax, (target, solver, metric) in zip(axes[0], panels):
        for f in FRACTIONS:
            mine = [r for r in rows if r["target"] == target and r["solver"] == solver and r["fraction"] == f]
            ax.plot([r["nfe"] for r in mine], [r[metric] for r in mine], marker="o", ms=3,
                    label="no teleport" if f == 0 else f"teleport, skip {f:.0%}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        nfes = sorted({r["nfe"] for r in rows if r["target"] == target and r["solver"] == solver})
        ticks = [n for n in (3, 5, 10, 20, 30) if nfes[0] <= n <= nfes[-1]]
        ax.set_xticks(ticks, [str(n) for n in ticks])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("NFE")
        ax.set_ylabel("median ODE error" if metric == "error" else "FD to held-out digits")
        ax.set_title(f"{target}: {solver}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    save(fig, path)


def main(argv=None) -> None:
    ap = cli.parser("teleport", __doc__)
    ap.add_argument("--samples", type=cli.positive_int, default=256, help="x_T per mixture row")
    ap.add_argument("--nfe-max", type=cli.positive_int, default=30)
    ap.add_argument("--digits-n", type=cli.nonnegative_int, default=1000, help="digits per seed (0: no digits)")
    ap.add_argument("--out", default="bench/results", help="directory of the JSON and PNG ('' for none)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    target = GaussianMixture.random(dim=64, modes=8, seed=0)
    tp = ds.GaussianTeleport.fit(target.sample(20000, torch.Generator().manual_seed(1)))
    x = torch.randn(args.samples, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    rows = mixture_rows("dpmpp_2m", VPC, "eps", target.model(VPC), x, tp, range(3, args.nfe_max + 1))
    rows += mixture_rows("heun", EDM, "x0", edm_x0(target), x, tp, range(3, args.nfe_max + 1, 2))
    saved = nfe_saved([r for r in rows if r["solver"] == "dpmpp_2m"], "error")
    saved += nfe_saved([r for r in rows if r["solver"] == "heun"], "error")
    if args.digits_n:
        digit_rows = digits_rows(args.digits_n)
        rows += digit_rows
        saved += nfe_saved(digit_rows, "fd")
    seconds = time.perf_counter() - t0
    print(f"{'target':<12}{'solver':<10}{'NFE':>4}" + "".join(f"{'skip ' + format(f, '.0%'):>12}" for f in FRACTIONS))
    for key in dict.fromkeys((r["target"], r["solver"], r["nfe"]) for r in rows):
        mine = [r for r in rows if (r["target"], r["solver"], r["nfe"]) == key]
        print(f"{key[0]:<12}{key[1]:<10}{key[2]:>4}" + "".join(f"{r.get('error', r.get('fd')):>12.4g}" for r in mine))
    for s in saved:
        print(f"{s['target']} {s['solver']} NFE {s['nfe']}: teleported NFE at equal quality {s['teleport_nfe']}")
    print(f"({seconds:.0f} s)")
    if args.out:
        out = Path(args.out)
        record = machine_record(torch.device("cpu"))
        payload = dict(benchmark="teleport", machine=record, note=__doc__.strip().splitlines()[0],
                       fractions=list(FRACTIONS), samples=args.samples, digits_n=args.digits_n, seconds=seconds,
                       teleport=dict(mixture=repr(tp)), rows=rows, nfe_saved=saved)
        path = write_json(out / f"teleport-{slug(record['device'])}.json", payload)
        _plot(rows, out / "teleport.png")
        print(f"wrote {path} and {out / 'teleport.png'}")
