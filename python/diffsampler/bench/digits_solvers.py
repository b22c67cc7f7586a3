"""`python -m diffsampler.bench digits`: Fréchet distance of samples by solver and NFE on a learned score.

The denoiser and classifier of diffsampler.digits (trained on first use, then cached) give a learned
eps-prediction model on 8x8 digits; each solver samples `--n` digits from `--seeds` seeds of x_T at each NFE
(all on diffusers' "trailing" grid, from t = 999, but the solvers tied to their own grid: lcm, tcd; the two-call
solvers with as many steps as fit in the NFE), and the FD of each batch to the held-out digits is reported
as the mean and standard deviation over the seeds. Two rows frame it: `data`, the FD of `--n` training digits
(a different subset per seed) to the held-out ones, the floor of the metric at this sample size; and
`dpmpp_2m` at NFE 100, the model's own FD with the discretization error gone.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict
from pathlib import Path

import torch

import diffsampler as ds
from diffsampler import digits
from diffsampler.bench import cli
from diffsampler.bench.common import machine_record, slug, write_json
from diffsampler.bench.plots import pyplot, save
from diffsampler.bench.quality import AS_USED

SOLVERS = ("ddim", "dpmpp_2m", "dpmpp_3m", "unipc", "deis", "euler", "lms", "pndm", "res_multistep", "dpm_2",
           "restart", "dpmpp_2m_sde", "euler_ancestral", "dpmpp_2s_ancestral", "er_sde", "sa_solver", "lcm", "tcd")
STOCHASTIC = ("dpmpp_2m_sde", "euler_ancestral", "dpmpp_2s_ancestral", "er_sde", "sa_solver", "lcm", "tcd")
NFES = (5, 10, 20)
REFERENCE = ("dpmpp_2m", 100)
OPTIONS = dict(timestep_spacing="trailing")  # one grid for every solver, starting at the last training timestep


def sample_digits(model: digits.Denoiser, solver: str, nfe: int, n: int, seed: int) -> torch.Tensor:
    """n digits (n, 64) from `solver` with `nfe` model calls, x_T drawn from `seed`."""
    x_T = torch.randn(n, digits.PIXELS, generator=torch.Generator().manual_seed(seed))
    options = OPTIONS if "timestep_spacing" in ds.solvers.SOLVERS[solver].options() else {}
    options = {**options, **AS_USED.get(solver, {})}
    steps = ds.solvers.steps_for_nfe(solver, model.schedule, nfe, model.prediction, **options)
    with torch.no_grad():
        return ds.sample(model, x_T, steps=steps, solver=solver, schedule=model.schedule,
                         prediction=model.prediction, generator=torch.Generator().manual_seed(seed + 1000), **options)


def _row(solver: str, nfe: int | None, fds: list[float]) -> dict:
    return dict(solver=solver, nfe=nfe, fd=fds, fd_mean=statistics.mean(fds),
                fd_std=statistics.stdev(fds) if len(fds) > 1 else 0.0)


def fd_rows(model, clf, data: digits.Split, solvers=SOLVERS, nfes=NFES, n: int = 1000, seeds=(0, 1, 2)) -> list[dict]:
    """One row per (solver, NFE), then the data floor and the NFE-100 reference."""
    rows = [_row(s, nfe, [digits.frechet_distance(sample_digits(model, s, nfe, n, seed), data.held_x, clf)
                          for seed in seeds]) for s in solvers for nfe in nfes]
    subsets = [torch.randperm(len(data.train_x), generator=torch.Generator().manual_seed(seed))[:n] for seed in seeds]
    rows.append(_row("data", None, [digits.frechet_distance(data.train_x[i], data.held_x, clf) for i in subsets]))
    solver, nfe = REFERENCE
    rows.append(_row(solver, nfe, [digits.frechet_distance(sample_digits(model, solver, nfe, n, seed), data.held_x,
                                                           clf) for seed in seeds]))
    return rows


def _plot(rows: list[dict], grid: torch.Tensor, path: Path) -> None:
    plt = pyplot()
    from matplotlib.ticker import NullLocator

    fig, (ax, img) = plt.subplots(1, 2, figsize=(11, 4.4), gridspec_kw=dict(width_ratios=(1.4, 1)))
    for k, solver in enumerate(SOLVERS):  # one colour each (tab20), dashed for the stochastic ones
        mine = [r for r in rows if r["solver"] == solver and r["nfe"] in NFES]
        stochastic = solver in STOCHASTIC
        ax.errorbar([r["nfe"] for r in mine], [r["fd_mean"] for r in mine], yerr=[r["fd_std"] for r in mine],
                    marker="os^vD<>"[k % 7], capsize=3, label=solver, color=plt.cm.tab20(k % 20),
                    linestyle="--" if stochastic else "-")
    for r, style in zip(rows[-2:], (":", "--")):
        label = "data (train vs held-out)" if r["solver"] == "data" else f"{r['solver']}, NFE {r['nfe']}"
        ax.axhline(r["fd_mean"], color="gray", linestyle=style, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(NFES, [str(n) for n in NFES])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("NFE")
    ax.set_ylabel("FD to held-out digits (classifier features)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    img.imshow(grid, cmap="gray_r", vmin=-1, vmax=1)
    img.set_title(f"{REFERENCE[0]}, NFE 10", fontsize=9)
    img.axis("off")
    save(fig, path)


def mosaic(x: torch.Tensor, rows: int = 8, cols: int = 12) -> torch.Tensor:
    """rows x cols digits of x tiled into one image with a 1-pixel gap."""
    tiles = torch.full((rows, cols, 9, 9), -1.0)
    tiles[:, :, :8, :8] = x[:rows * cols].clamp(-1, 1).reshape(rows, cols, 8, 8)
    return tiles.permute(0, 2, 1, 3).reshape(rows * 9, cols * 9)


def main(argv=None) -> None:
    ap = cli.parser("digits", __doc__)
    ap.add_argument("--n", type=cli.positive_int, default=1000, help="samples per seed")
    ap.add_argument("--seeds", type=cli.positive_int, default=3)
    ap.add_argument("--threads", type=cli.positive_int, default=1,
                    help="torch threads (default 1: a shared machine's oversubscribed OpenMP threads slow it 10x)")
    ap.add_argument("--out", default="bench/results", help="directory of the JSON and PNG ('' for none)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = digits.load_digits()
    t0 = time.perf_counter()
    model, clf = digits.denoiser(), digits.classifier()
    setup_seconds = time.perf_counter() - t0
    acc = digits.accuracy(clf, data.held_x, data.held_y)
    print(f"denoiser and classifier ready in {setup_seconds:.0f} s (cache {digits.cache_dir()}); "
          f"classifier held-out accuracy {acc:.2%}")
    t0 = time.perf_counter()
    rows = fd_rows(model, clf, data, n=args.n, seeds=tuple(range(args.seeds)))
    print(f"FD to {len(data.held_x)} held-out digits, mean ± std over {args.seeds} seeds of {args.n} samples "
          f"({time.perf_counter() - t0:.0f} s):")
    print(f"{'solver':<20}" + "".join(f"{'NFE ' + str(n):>16}" for n in NFES))
    for solver in SOLVERS:
        print(f"{solver:<20}" + "".join(f"{r['fd_mean']:>9.2f} ± {r['fd_std']:<4.2f}" for r in rows
                                        if r["solver"] == solver and r["nfe"] in NFES))
    for r in rows[-2:]:
        print(f"{r['solver']}{'' if r['nfe'] is None else ', NFE ' + str(r['nfe'])}: {r['fd_mean']:.2f} ± {r['fd_std']:.2f}")
    if args.out:
        out = Path(args.out)
        record = machine_record(torch.device("cpu"))
        payload = dict(benchmark="digits", machine=record, note=__doc__.strip().splitlines()[0], n=args.n,
                       seeds=args.seeds, nfes=list(NFES), options=OPTIONS, held_out=len(data.held_x),
                       denoiser=asdict(digits.DenoiserConfig()), classifier=asdict(digits.ClassifierConfig()),
                       version=digits.VERSION, classifier_accuracy=acc, setup_seconds=setup_seconds, rows=rows)
        path = write_json(out / f"digits-{slug(record['device'])}.json", payload)
        _plot(rows, mosaic(sample_digits(model, REFERENCE[0], 10, 96, 0)), out / "digits.png")
        print(f"wrote {path} and {out / 'digits.png'}")
