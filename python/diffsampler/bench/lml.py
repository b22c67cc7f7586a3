"""`python -m diffsampler.bench lml`: does Levenberg-Marquardt-Langevin help, and what does it cost?

Quality, on analytic Gaussian mixtures (2-D ring, 64-D random) whose exact samples and density are known,
sampled through `diffsampler.sample` on the DDPM linear VP schedule (1000 training steps): sliced
Wasserstein-2 to exact data samples (lower is better) and mean log-likelihood of the samples under the exact
density (higher is better), without LML and with it, over NFE 5 / 10 / 20 and a sweep of damping, kappa and
rank (direction mode) and of the corrector mode at the same NFE (steps = NFE / (1 + n_steps)).
And on a learned score, where the score's own error is what a second-order correction could address: the
8x8-digits denoiser of `bench digits` (trained on first use, cached), scored by the Frechet distance to the
held-out digits in its classifier's feature space.
Protocol: the settings are ranked on tuning seeds (x_T and reference samples) and the winner per (target,
solver, NFE) is then reported on separate test seeds, beside the baseline on those same seeds; the single
setting best over all cells on the tuning seeds is reported too. Nothing is chosen on the test seeds.

Overhead: one step at (8, 4, 128, 128) fp32 on this machine: the fused update alone, the LML step (Gram
pass + on-device solve + fused update with the correction) at rank 1 and 4, and diffusers' step() followed by
the authors' torch formula; with the bytes each moves.
"""

from __future__ import annotations

import itertools
import json
import statistics
from pathlib import Path

import torch

import diffsampler as ds
from diffsampler.bench import cli
from diffsampler.bench.common import copy_bandwidth, machine_record, measure, slug, write_json
from diffsampler.bench.plots import pyplot, save
from diffsampler.schedules import VP
from diffsampler.targets import GaussianMixture, sliced_wasserstein

TARGETS = {"ring-2d": GaussianMixture.ring, "random-64d": lambda: GaussianMixture.random(dim=64, modes=8)}
SOLVERS = ("ddim", "dpmpp_2m")
NFES = (5, 10, 20)
DAMPINGS = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)  # the authors use 1e-3..1e-2; large ones approach no LML
KAPPAS = (0.25, 0.5, 0.75)
RANKS = (1, 2, 4)
TUNE_SEEDS, TEST_SEEDS = (0, 1), (100, 101, 102)


def settings(nfe: int, ranks=RANKS, corrector_dampings=DAMPINGS):
    """(label, LML or None, steps) of every setting compared at `nfe` model calls."""
    yield "none", None, nfe
    for damping, kappa, rank in itertools.product(DAMPINGS, KAPPAS, ranks):
        yield f"direction l={damping:g} k={kappa:g} r={rank}", ds.LML(damping, kappa, rank), nfe
    if nfe % 2 == 0:
        for damping, rank in itertools.product(corrector_dampings, (1, 2)):  # (scale-free step size: damping
            # only sets how strongly U's directions are damped)
            lml = ds.LML(damping, 0.5, rank, mode="corrector")
            yield f"corrector l={damping:g} k=0.5 r={rank}", lml, nfe // 2


def mixture_scorer(target: GaussianMixture, n: int):
    """score(solver, lml, steps, seed) -> (sliced W2 to exact samples, mean log-likelihood) of n samples."""
    schedule = VP.linear()

    def score(solver, lml, steps, seed):
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(n, target.dim, generator=gen)
        y = ds.sample(target.model(schedule), x, steps, solver, schedule, lml=lml, generator=gen, check_nan=False)
        exact = target.sample(n, torch.Generator().manual_seed(10_000 + seed)).float()
        return sliced_wasserstein(y.double(), exact.double()), target.log_prob(y.double()).mean().item()

    return score


def digits_scorer(n: int):
    """score(solver, lml, steps, seed) -> (FD to the held-out digits, None): the learned score of bench digits."""
    from diffsampler import digits

    model, clf, data = digits.denoiser(), digits.classifier(), digits.load_digits()

    def score(solver, lml, steps, seed):
        x = torch.randn(n, digits.PIXELS, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            y = ds.sample(model, x, steps, solver, model.schedule, model.prediction, lml=lml, check_nan=False,
                          generator=torch.Generator().manual_seed(seed + 1), timestep_spacing="trailing")
        return digits.frechet_distance(y, data.held_x, clf), None

    return score


def sweep(name: str, score, solvers=SOLVERS, nfes=NFES, **setting_options) -> list[dict]:
    """Per (solver, NFE): every setting on the tuning seeds, then no LML and the best one on the test seeds."""
    rows = []
    for solver, nfe in itertools.product(solvers, nfes):
        cells = []
        for label, lml, steps in settings(nfe, **setting_options):
            tune = [score(solver, lml, steps, s)[0] for s in TUNE_SEEDS]
            cells.append(dict(label=label, lml=lml, steps=steps, tune=statistics.mean(tune)))
        best = min(cells[1:], key=lambda c: c["tune"])
        test = {c["label"]: [score(solver, c["lml"], c["steps"], s) for s in TEST_SEEDS] for c in (cells[0], best)}

        def mean(label, k):
            vals = [t[k] for t in test[label]]
            return None if vals[0] is None else statistics.mean(vals)

        rows.append(dict(target=name, solver=solver, nfe=nfe, best=best["label"],
                         tune={c["label"]: c["tune"] for c in cells},
                         test_none=mean("none", 0), test_best=mean(best["label"], 0),
                         test_logp_none=mean("none", 1), test_logp_best=mean(best["label"], 1)))
        r = rows[-1]
        logp = (f"  logp {r['test_logp_none']:8.3f} -> {r['test_logp_best']:8.3f}"
                if r["test_logp_none"] is not None else "")
        print(f"{name:<11}{solver:<10}{nfe:>4}  {r['test_none']:.4f} -> {r['test_best']:.4f}{logp}  ({r['best']})",
              flush=True)
    return rows


def quality(n: int, targets=TARGETS, digits_n: int = 500) -> dict:
    rows = []
    for tname, make in targets.items():
        rows += sweep(tname, mixture_scorer(make(), n))
    floors = {}
    for tname, make in targets.items():  # the noise floor of the metric: exact samples against exact samples
        target = make()
        floors[tname] = statistics.mean(
            sliced_wasserstein(target.sample(n, torch.Generator().manual_seed(20_000 + s)),
                               target.sample(n, torch.Generator().manual_seed(10_000 + s))) for s in TEST_SEEDS)
        print(f"{tname}: sliced W2 between two exact sample sets of {n}: {floors[tname]:.4f}")
    result = dict(rows=rows, global_best=_global_best(rows), sw2_exact_vs_exact=floors)
    if digits_n:
        digit_rows = sweep("digits", digits_scorer(digits_n), ranks=(1, 2), corrector_dampings=(1e-2, 1.0, 100.0))
        result["digits"] = dict(rows=digit_rows, global_best=_global_best(digit_rows), n=digits_n)
    return result


def _global_best(rows) -> dict:
    """The setting with the best mean tuning-seed SW2 relative to no LML, over all cells where it exists."""
    labels = set.intersection(*(set(r["tune"]) for r in rows)) - {"none"}
    ratio = {lab: statistics.mean(r["tune"][lab] / r["tune"]["none"] for r in rows) for lab in labels}
    best = min(ratio, key=ratio.get)
    return dict(label=best, mean_tune_ratio=ratio[best])


def overhead(shape=(8, 4, 128, 128), min_time: float = 0.2, rounds: int = 5,
             device: torch.device = torch.device("cpu")) -> dict:
    """Seconds per step of the plain fused update, the LML step and its three parts (Gram pass, weights, update
    with the correction), and diffusers + the authors' formula (when diffusers is installed), on `device`. Each
    is the fastest of `rounds` interleaved rounds (a round: the median of 5 batches): on a shared machine other
    load only adds time."""
    from diffsampler import lml as lml_math
    from diffsampler.ops import UpdateCoeffs, lml_gram, multistep_update

    gen = torch.Generator().manual_seed(0)
    x, out = torch.randn(shape, generator=gen).to(device), torch.randn(shape, generator=gen).to(device)
    history = torch.randn(2, *shape, generator=gen).to(device)
    coeffs = UpdateCoeffs(p=1.02, q=-0.2, a=0.95, b=(0.9, -0.4))
    dc = [0.0, 0.0, 0.9, -0.4]
    upd = dict(history=history, write_slot=0, read_slots=[1], check_nan=False)
    steps = {"fused update": lambda: multistep_update(x, out, coeffs, **upd)}
    for rank in (1, 4):
        dirs = torch.randn(rank, *shape, generator=gen).to(device)
        mix = torch.tensor(lml_math.mixing(7, rank, 0.5), dtype=torch.float64, device=device)
        lml = dict(dirs=dirs, dir_slot=7 % rank, dir_coeffs=dc)

        def gram(dirs=dirs):
            return lml_gram(x, out, coeffs, dirs, dc, history=history, read_slots=[1])

        def lml_step(gram=gram, mix=mix, lml=lml):
            w = lml_math.correction_weights(gram(), mix, 1e-3, 1.0)
            return multistep_update(x, out, coeffs, dir_weights=w, **lml, **upd)

        def weights(matrix=gram(), mix=mix):
            return lml_math.correction_weights(matrix, mix, 1e-3, 1.0)

        def update(lml=lml, w=weights()):
            return multistep_update(x, out, coeffs, dir_weights=w, **lml, **upd)

        steps[f"LML step rank {rank}"] = lml_step
        steps[f"LML Gram pass rank {rank}"] = gram
        steps[f"LML weights rank {rank}"] = weights
        steps[f"LML update pass rank {rank}"] = update
    steps.update(_diffusers_steps(x, out, torch.randn(shape, generator=gen).to(device)))
    result = {k: float("inf") for k in steps}
    for _ in range(rounds):
        for k, fn in steps.items():
            result[k] = min(result[k], measure(fn, device, min_time))
    nbytes = x.numel() * 4
    # tensors read or written: the update 5 (x, out, a history read; x', m0); the Gram 3 + r (x, out, the
    # history read, r directions); the update with the correction 5 + r + 1 (the ring read, d written)
    moved = {"fused update": 5}
    for r in (1, 4):
        moved.update({f"LML step rank {r}": 5 + (3 + r) + (r + 1), f"LML Gram pass rank {r}": 3 + r,
                      f"LML update pass rank {r}": 5 + r + 1})
    bw = copy_bandwidth(device, nbytes=8 * nbytes)
    return dict(shape=list(shape), device=str(device), threads=torch.get_num_threads(), seconds=result,
                copy_bandwidth=bw, predicted_seconds={k: v * nbytes / bw for k, v in moved.items()},
                bytes_moved={k: v * nbytes for k, v in moved.items()})


def _diffusers_steps(x, out, prev) -> dict:
    """diffusers' DPM-Solver++ 2M step() on the same tensors, alone and followed by the authors' LM formula
    ({} without diffusers)."""
    try:
        import diffusers
    except ImportError:
        return {}
    sched = diffusers.DPMSolverMultistepScheduler()
    sched.set_timesteps(20)

    def authors_step():
        sched._step_index = 5
        sched.model_outputs = [out, out]
        sched.lower_order_nums = 2
        y = sched.step(out, sched.timesteps[5], x).prev_sample
        inc = y - 0.95 * x  # the authors add lm_correct(increment) to the carried x
        u = 0.5 * prev + 0.5 * inc
        dims = tuple(range(1, inc.dim()))
        ip = (inc * u).sum(dims, keepdim=True)
        d1 = inc - u * ip / (1e-3 + (u * u).sum(dims, keepdim=True))
        norm = torch.linalg.vector_norm
        return 0.95 * x + d1 * norm(inc, dim=dims, keepdim=True) / norm(d1, dim=dims, keepdim=True)

    return {"diffusers step + authors' LM formula": authors_step,
            "diffusers step": lambda: (setattr(sched, "_step_index", 5), sched.step(out, sched.timesteps[5], x))}


def _plot(q: dict, path: Path) -> None:
    plt = pyplot()

    all_rows = q["rows"] + q.get("digits", {}).get("rows", [])
    cells = sorted({(r["target"], r["solver"]) for r in all_rows}, key=lambda c: (list(TARGETS) + ["digits"]).index(c[0]))
    fig, axes = plt.subplots(1, len(cells), figsize=(3.6 * len(cells), 3.6))
    for ax, (t, s) in zip(axes, cells):
        rows = [r for r in all_rows if r["target"] == t and r["solver"] == s]
        nfes = [r["nfe"] for r in rows]
        ax.plot(nfes, [r["test_none"] for r in rows], "o-", label="no LML")
        ax.plot(nfes, [r["test_best"] for r in rows], "s--", label="best LML (chosen on tuning seeds)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(nfes, [str(n) for n in nfes])
        ax.set_title(f"{t} {s}", fontsize=9)
        ax.set_xlabel("NFE")
        ax.set_ylabel("FD to held-out (test seeds)" if t == "digits" else "sliced W2 to exact (test seeds)")
    axes[0].legend(fontsize=7)
    save(fig, path)


def main(argv=None) -> None:
    ap = cli.parser("lml", __doc__)
    ap.add_argument("--n", type=cli.positive_int, default=2000, help="samples per run on the mixtures")
    ap.add_argument("--digits-n", type=cli.nonnegative_int, default=500, help="digits per run (0: skip the learned score)")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--skip-overhead", action="store_true")
    ap.add_argument("--device", type=cli.device, default="cpu",
                    help="where the overhead is timed (cpu or cuda; the quality sweep runs on the CPU)")
    ap.add_argument("--threads", type=cli.positive_int, default=1,
                    help="torch threads (default 1: on a shared machine, waits at thread barriers swamp timings)")
    ap.add_argument("--out", default="bench/results", help="directory of the JSON and PNG ('' for none)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    payload = dict(benchmark="lml", machine=machine_record(args.device), note=__doc__.strip().splitlines()[0],
                   sweep=dict(dampings=DAMPINGS, kappas=KAPPAS, ranks=RANKS, nfes=NFES, tune_seeds=TUNE_SEEDS,
                              test_seeds=TEST_SEEDS, n=args.n))
    if not args.skip_quality:
        print("target     solver     NFE  SW2 or FD (test seeds): none -> best   mean log p: none -> best   (best)")
        payload["quality"] = quality(args.n, digits_n=args.digits_n)
        for key, q in (("mixtures", payload["quality"]), ("digits", payload["quality"].get("digits"))):
            if q:
                gb = q["global_best"]
                print(f"{key}: best single setting on the tuning seeds: {gb['label']} (mean ratio to none "
                      f"{gb['mean_tune_ratio']:.3f})")
    overhead_key = "overhead" if args.threads == 1 else f"overhead_{args.threads}_threads"
    if not args.skip_overhead:
        o = overhead(device=args.device)
        payload[overhead_key] = o
        base = o["seconds"]["fused update"]
        print(f"\nstep overhead at {tuple(o['shape'])} fp32 on {o['device']}, {args.threads} thread(s), copy bandwidth "
              f"{o['copy_bandwidth'] / 1e9:.1f} GB/s")
        for k, v in o["seconds"].items():
            pred = o["predicted_seconds"].get(k)
            print(f"  {k:<40}{v * 1e3:9.2f} ms  {v / base:6.2f}x the fused update"
                  + (f"   (floor {pred * 1e3:.2f} ms)" if pred else ""))
    if args.out:
        out = Path(args.out)
        path = out / f"lml-{slug(payload['machine']['device'])}.json"
        if path.exists():  # a partial run keeps the other parts of the last one
            old = json.loads(path.read_text())
            for key in [k for k in old if k == "quality" or k.startswith("overhead")]:
                if key not in payload:
                    payload[key] = old[key]
                    payload.setdefault("machine_" + key, old.get("machine_" + key, old["machine"]))
        for key in [k for k in payload if k == "quality" or k.startswith("overhead")]:
            payload.setdefault("machine_" + key, payload["machine"])
        write_json(path, payload)
        if "quality" in payload:
            _plot(payload["quality"], out / "lml.png")
        print(f"\nwrote {path}")
