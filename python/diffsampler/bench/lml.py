"""`python -m diffsampler.bench lml`: does Levenberg-Marquardt-Langevin help, and what does it cost?

Quality, on analytic Gaussian mixtures (2-D ring, 64-D random) whose exact samples and density are known,
sampled through `diffsampler.sample` on the DDPM linear VP schedule (1000 training steps): sliced
Wasserstein-2 to exact data samples (lower is better) and mean log-likelihood of the samples under the exact
density (higher is better), without LML and with it, over NFE 5 / 10 / 20 and a sweep of damping, kappa and
rank (direction mode) and of the corrector mode at the same NFE (steps = NFE / (1 + n_steps)).
Protocol: the settings are ranked on tuning seeds (x_T and reference samples) and the winner per (target,
solver, NFE) is then reported on separate test seeds, beside the baseline on those same seeds; the single
setting best over all cells on the tuning seeds is reported too. Nothing is chosen on the test seeds.

Overhead: one step at (8, 4, 128, 128) fp32 on this machine: the fused update alone, the LML step (Gram
pass + on-device solve + fused update with the correction) at rank 1 and 4, and diffusers' step() followed by
the authors' torch formula; with the bytes each moves.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
from pathlib import Path

import torch

import diffsampler as ds
from diffsampler.bench.common import copy_bandwidth, machine_record, measure, slug, write_json
from diffsampler.schedules import VP
from diffsampler.targets import GaussianMixture, sliced_wasserstein

TARGETS = {"ring-2d": GaussianMixture.ring, "random-64d": lambda: GaussianMixture.random(dim=64, modes=8)}
SOLVERS = ("ddim", "dpmpp_2m")
NFES = (5, 10, 20)
DAMPINGS = (1e-3, 1e-2, 1e-1, 1.0)
KAPPAS = (0.25, 0.5, 0.75)
RANKS = (1, 2, 4)
TUNE_SEEDS, TEST_SEEDS = (0, 1), (100, 101, 102)


def settings(nfe: int):
    """(label, LML or None, steps) of every setting compared at `nfe` model calls."""
    yield "none", None, nfe
    for damping, kappa, rank in itertools.product(DAMPINGS, KAPPAS, RANKS):
        yield f"direction l={damping:g} k={kappa:g} r={rank}", ds.LML(damping, kappa, rank), nfe
    if nfe % 2 == 0:
        for damping, rank in itertools.product(DAMPINGS, (1, 2)):
            lml = ds.LML(damping, 0.5, rank, mode="corrector")
            yield f"corrector l={damping:g} k=0.5 r={rank}", lml, nfe // 2


def score(target, solver, lml, steps, seed, n):
    """(sliced W2, mean log-likelihood) of n samples from x_T drawn with `seed`."""
    schedule = VP.linear()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, target.dim, generator=g)
    y = ds.sample(target.model(schedule), x, steps, solver, schedule, lml=lml, generator=g, check_nan=False)
    exact = target.sample(n, torch.Generator().manual_seed(10_000 + seed)).float()
    return sliced_wasserstein(y.double(), exact.double()), target.log_prob(y.double()).mean().item()


def quality(n: int, targets=TARGETS, solvers=SOLVERS, nfes=NFES) -> dict:
    rows = []
    for (tname, make), solver, nfe in itertools.product(targets.items(), solvers, nfes):
        target = make()
        cells = []
        for label, lml, steps in settings(nfe):
            tune = [score(target, solver, lml, steps, s, n) for s in TUNE_SEEDS]
            cells.append(dict(label=label, lml=lml, steps=steps, tune_sw2=statistics.mean(t[0] for t in tune)))
        base = cells[0]
        best = min(cells[1:], key=lambda c: c["tune_sw2"])
        test = {c["label"]: [score(target, solver, c["lml"], c["steps"], s, n) for s in TEST_SEEDS]
                for c in (base, best)}
        rows.append(dict(target=tname, solver=solver, nfe=nfe, best=best["label"],
                         tune_sw2={c["label"]: c["tune_sw2"] for c in cells},
                         test_sw2_none=statistics.mean(t[0] for t in test["none"]),
                         test_sw2_best=statistics.mean(t[0] for t in test[best["label"]]),
                         test_logp_none=statistics.mean(t[1] for t in test["none"]),
                         test_logp_best=statistics.mean(t[1] for t in test[best["label"]])))
        r = rows[-1]
        print(f"{tname:<11}{solver:<10}{nfe:>4}  SW2 {r['test_sw2_none']:.4f} -> {r['test_sw2_best']:.4f}  "
              f"logp {r['test_logp_none']:8.3f} -> {r['test_logp_best']:8.3f}  ({r['best']})", flush=True)
    floors = {}
    for tname, make in targets.items():  # the noise floor of the metric: exact samples against exact samples
        target = make()
        floors[tname] = statistics.mean(
            sliced_wasserstein(target.sample(n, torch.Generator().manual_seed(20_000 + s)),
                               target.sample(n, torch.Generator().manual_seed(10_000 + s))) for s in TEST_SEEDS)
        print(f"{tname}: sliced W2 between two exact sample sets of {n}: {floors[tname]:.4f}")
    return dict(rows=rows, global_best=_global_best(rows), sw2_exact_vs_exact=floors)


def _global_best(rows) -> dict:
    """The setting with the best mean tuning-seed SW2 relative to no LML, over all cells where it exists."""
    labels = set.intersection(*(set(r["tune_sw2"]) for r in rows)) - {"none"}
    ratio = {lab: statistics.mean(r["tune_sw2"][lab] / r["tune_sw2"]["none"] for r in rows) for lab in labels}
    best = min(ratio, key=ratio.get)
    return dict(label=best, mean_tune_sw2_ratio=ratio[best])


def overhead(shape=(8, 4, 128, 128), min_time: float = 0.5) -> dict:
    """Seconds per step of the plain fused update, the LML step and diffusers + the authors' formula."""
    import diffusers

    from diffsampler import lml as lml_math
    from diffsampler.ops import UpdateCoeffs, lml_gram, multistep_update

    device = torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    x, out = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    history = torch.randn(2, *shape, generator=g)
    coeffs = UpdateCoeffs(p=1.02, q=-0.2, a=0.95, b=(0.9, -0.4))
    dc = [0.0, 0.0, 0.9, -0.4]
    result = {}
    result["fused update"] = measure(lambda: multistep_update(x, out, coeffs, history=history, write_slot=0,
                                                              read_slots=[1], check_nan=False), device, min_time)
    for rank in (1, 4):
        dirs = torch.randn(rank, *shape, generator=g)
        mix = torch.tensor(lml_math.mixing(7, rank, 0.5), dtype=torch.float64)

        def lml_step(dirs=dirs, mix=mix):
            gram = lml_gram(x, out, coeffs, dirs, dc, history=history, read_slots=[1])
            w = lml_math.correction_weights(gram, mix, 1e-3, 1.0)
            return multistep_update(x, out, coeffs, history=history, write_slot=0, read_slots=[1], dirs=dirs,
                                    dir_slot=7 % rank, dir_coeffs=dc, dir_weights=w, check_nan=False)

        result[f"LML step rank {rank}"] = measure(lml_step, device, min_time)
        result[f"LML Gram pass rank {rank}"] = measure(
            lambda dirs=dirs: lml_gram(x, out, coeffs, dirs, dc, history=history, read_slots=[1]), device, min_time)

    sched = diffusers.DPMSolverMultistepScheduler()
    sched.set_timesteps(20)
    prev = torch.randn(shape, generator=g)

    def authors_step():
        sched._step_index = 5
        sched.model_outputs = [out, out]
        sched.lower_order_nums = 2
        y = sched.step(out, sched.timesteps[5], x).prev_sample
        inc = y - 0.95 * x  # the authors add lm_correct(increment) to the carried x
        u = 0.5 * prev + 0.5 * inc
        dims = tuple(range(1, inc.dim()))
        ip = (inc * u).sum(dims, keepdim=True)
        g1 = inc - u * ip / (1e-3 + (u * u).sum(dims, keepdim=True))
        norm = torch.linalg.vector_norm
        return 0.95 * x + g1 * norm(inc, dim=dims, keepdim=True) / norm(g1, dim=dims, keepdim=True)

    result["diffusers step + authors' LM formula"] = measure(authors_step, device, min_time)
    result["diffusers step"] = measure(lambda: (setattr(sched, "_step_index", 5),
                                                sched.step(out, sched.timesteps[5], x)), device, min_time)
    nbytes = x.numel() * 4
    moved = {"fused update": 5, "LML step rank 1": 5 + 4 + 2, "LML step rank 4": 5 + 7 + 8,
             "LML Gram pass rank 1": 4, "LML Gram pass rank 4": 7}
    bw = copy_bandwidth(device, nbytes=8 * nbytes)
    return dict(shape=list(shape), seconds=result, copy_bandwidth=bw,
                predicted_seconds={k: v * nbytes / bw for k, v in moved.items()},
                bytes_moved={k: v * nbytes for k, v in moved.items()})


def _plot(q: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [(t, s) for t in TARGETS for s in SOLVERS]
    fig, axes = plt.subplots(1, len(cells), figsize=(4.2 * len(cells), 3.8))
    for ax, (t, s) in zip(axes, cells):
        rows = [r for r in q["rows"] if r["target"] == t and r["solver"] == s]
        nfes = [r["nfe"] for r in rows]
        ax.plot(nfes, [r["test_sw2_none"] for r in rows], "o-", label="no LML")
        ax.plot(nfes, [r["test_sw2_best"] for r in rows], "s--", label="best LML (chosen on tuning seeds)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(nfes, [str(n) for n in nfes])
        ax.set_title(f"{t} {s}", fontsize=9)
        ax.set_xlabel("NFE")
        ax.set_ylabel("sliced W2 to exact (test seeds)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m diffsampler.bench lml", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="samples per run")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--skip-overhead", action="store_true")
    ap.add_argument("--out", default="bench/results", help="directory of the JSON and PNG ('' for none)")
    args = ap.parse_args(argv)
    payload = dict(benchmark="lml", machine=machine_record(torch.device("cpu")), note=__doc__.strip().splitlines()[0],
                   sweep=dict(dampings=DAMPINGS, kappas=KAPPAS, ranks=RANKS, nfes=NFES, tune_seeds=TUNE_SEEDS,
                              test_seeds=TEST_SEEDS, n=args.n))
    if not args.skip_quality:
        print("target     solver     NFE  sliced W2 (test seeds): none -> best   mean log p: none -> best   (best)")
        payload["quality"] = quality(args.n)
        gb = payload["quality"]["global_best"]
        print(f"best single setting on the tuning seeds: {gb['label']} (mean SW2 ratio to none "
              f"{gb['mean_tune_sw2_ratio']:.3f})")
    if not args.skip_overhead:
        o = overhead()
        payload["overhead"] = o
        base = o["seconds"]["fused update"]
        print(f"\nstep overhead at {tuple(o['shape'])} fp32, copy bandwidth {o['copy_bandwidth'] / 1e9:.1f} GB/s")
        for k, v in o["seconds"].items():
            pred = o["predicted_seconds"].get(k)
            print(f"  {k:<40}{v * 1e3:9.2f} ms  {v / base:6.2f}x the fused update"
                  + (f"   (floor {pred * 1e3:.2f} ms)" if pred else ""))
    if args.out:
        out = Path(args.out)
        path = write_json(out / f"lml-{slug(payload['machine']['device'])}.json", payload)
        if "quality" in payload:
            _plot(payload["quality"], out / "lml.png")
        print(f"\nwrote {path}")
