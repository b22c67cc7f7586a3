"""`python -m diffsampler.bench resample`: the fused resampling op against torch.multinomial + index_select and a
torch systematic resampler (cumsum + searchsorted + index_select), at weight spreads where a few / half / most
particles die.

Prediction: the in-place move reads and writes only the D dead particles' rows, 2 D P bytes (P bytes a particle),
plus the weights and ancestors (~20 K bytes); a gather moves all of them, 2 K P bytes, into a newly allocated
tensor. The floor of each is that byte count at the measured copy bandwidth (at the working-set size).
Each time is recorded as the median and the best of 5 batches; speed-ups use the best, the less disturbed
number on a machine shared with other jobs (the median is in the JSON). For
K = 64 particles of (4,128,128) fp32 (P = 256 KiB) the gather moves 32 MiB whatever dies; the in-place move
moves D / K of it. For scalar particles (P = 4 bytes) the weights dominate, and the ancestor computation
(O(K log K) merge-free search, one pass per group on the CPU) is what is timed.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

import diffsampler as ds
from diffsampler.bench import cli
from diffsampler.bench.common import copy_bandwidth, machine_record, measure, slug, write_json
from diffsampler.bench.plots import plot_resample

# (label, sigma of the Gaussian log-weights): the fraction of particles without offspring grows with sigma
LEVELS = [("few die", 0.15), ("half die", 1.3), ("most die", 4.0)]
CASES = [(64, (4, 128, 128)), (1_000, ()), (10_000, ()), (100_000, ())]


def torch_multinomial(lw, particles, gen):
    """The usual torch resampler: multinomial on the softmax, then a gather."""
    idx = torch.multinomial(torch.softmax(lw[0], 0), lw.shape[1], replacement=True, generator=gen)
    return particles.index_select(0, idx)


def torch_systematic(lw, particles, gen):
    """Systematic resampling in torch ops: u_k = (k + U) / K located in the cumulative weights, then a gather."""
    K = lw.shape[1]
    cdf = torch.softmax(lw[0].double(), 0).cumsum(0)
    u = (torch.arange(K, dtype=torch.float64) + torch.rand((), dtype=torch.float64, generator=gen)) / K
    idx = torch.searchsorted(cdf, u * cdf[-1]).clamp(max=K - 1)
    return particles.index_select(0, idx)


def run(device: torch.device, min_time: float) -> list[dict]:
    rows = []
    gen = torch.Generator(device).manual_seed(0)
    for K, shape in CASES:
        particles = torch.randn(K, *shape, device=device)
        row_bytes = particles[0].numel() * particles.element_size()
        bandwidth = copy_bandwidth(device, nbytes=max(2 * K * row_bytes, 1 << 20), min_time=min_time)
        for label, sigma in LEVELS:
            lw = sigma * torch.randn(1, K, generator=torch.Generator().manual_seed(1)).to(device)
            out = ds.ops.resample(lw, particles.clone(), "systematic", generator=gen)
            dead = int((out.ancestors != torch.arange(K, device=device)).sum())
            impls = {
                "fused in-place": lambda: ds.ops.resample(lw, particles, "systematic", generator=gen),
                "fused gather": lambda: ds.ops.resample(lw, particles, "systematic", generator=gen, move="gather"),
                "torch multinomial+index_select": lambda: torch_multinomial(lw, particles, gen),
                "torch systematic": lambda: torch_systematic(lw, particles, gen),
            }
            bytes_moved = {"fused in-place": 2 * dead * row_bytes + 20 * K}
            for name in ("fused gather", "torch multinomial+index_select", "torch systematic"):
                bytes_moved[name] = 2 * K * row_bytes + 20 * K
            times = {name: (measure(fn, device, min_time=min_time), measure(fn, device, min_time=min_time, best=True))
                     for name, fn in impls.items()}
            base = times["torch multinomial+index_select"][1]
            for name, (median, best) in times.items():
                rows.append({"K": K, "particle_shape": list(shape), "level": label, "sigma": sigma, "dead": dead,
                             "impl": name, "seconds": median, "best_seconds": best, "bytes_moved": bytes_moved[name],
                             "floor_seconds": bytes_moved[name] / bandwidth, "speedup_vs_multinomial": base / best})
            print(f"K={K:>6} {str(shape):>14} {label:>8} dead={dead:>6}  best " + "  ".join(
                f"{n}: {t[1] * 1e6:9.1f} us" for n, t in times.items()), flush=True)
    return rows


def step_overhead(device: torch.device, min_time: float, K: int = 64, shape=(4, 128, 128)) -> list[dict]:
    """Per-step SMC cost against the plain step, K particles as one batch: the fused DPM++ 2M update alone, then
    the SMC extras of a step: FKC's product-of-experts step of two experts (the SDE step and the log-weight
    increment) as torch ops and fused (ops.fkc_update), and ops.resample with an ESS threshold of 0.5 at weights
    where nothing is resampled (ESS/K ~ 0.98), and forced (no threshold) where few / half die."""
    plan = ds.solvers.make_plan("dpmpp_2m", ds.schedules.VP.scaled_linear(), 20, "eps")
    step = plan.steps[5]
    gen = torch.Generator(device).manual_seed(0)
    x, out, s2 = (torch.randn(K, *shape, device=device, generator=gen) for _ in range(3))
    history = torch.randn(plan.history_slots, K, *shape, device=device, generator=gen)
    update = lambda: ds.ops.multistep_update(x, out, step.coeffs, history=history, write_slot=step.write_slot,  # noqa: E731
                                             read_slots=step.read_slots, check_nan=False)
    t_plain = measure(update, device, min_time=min_time, best=True)
    z = torch.randn(K, *shape, device=device, generator=gen)
    b, sigma, h, scale = [1.0, 1.0], 0.5, 0.01, 1.005

    def fkc_torch():  # the step as torch ops: scores, their sum, the SDE step, the increment
        scores = [out / -sigma, s2 / -sigma]
        x_next = scale * (x + h * (b[0] * scores[0] + b[1] * scores[1])) + h**0.5 * z
        return x_next, ds.smc.log_weight_increment(scores, b, h)

    extras = {"FKC step, torch ops": fkc_torch,
              "FKC step, fused": lambda: ds.ops.fkc_update(x, [out, s2], noise=z, check_nan=False,
                                                           **ds.smc.step_coeffs(b, sigma, h, scale))}
    for label, sigma, threshold in (("resample, none due", 0.15, 0.5), ("resample, few die", 0.15, None),
                                    ("resample, half die", 1.3, None)):
        lw = sigma * torch.randn(1, K, generator=torch.Generator().manual_seed(1)).to(device)
        extras[label] = lambda lw=lw, threshold=threshold: ds.ops.resample(lw, x, "systematic", threshold,
                                                                              generator=gen)
    rows = [{"part": "plain step (fused DPM++ 2M update)", "seconds": t_plain, "vs_plain_step": 1.0}]
    print(f"SMC step overhead, K={K} x {shape} fp32: plain step {t_plain * 1e6:.1f} us (best)")
    for name, fn in extras.items():
        t = measure(fn, device, min_time=min_time, best=True)
        rows.append({"part": name, "seconds": t, "vs_plain_step": t / t_plain})
        print(f"  + {name:<26} {t * 1e6:9.1f} us  = {t / t_plain:.2f} x the plain step", flush=True)
    return rows


def main(argv=None) -> None:
    ap = cli.parser("resample", __doc__)
    ap.add_argument("--device", type=cli.device, default="cpu", help="cpu (the fused C++ kernels) or cuda")
    ap.add_argument("--min-time", type=cli.positive_float, default=0.5, help="seconds of timing per measurement")
    ap.add_argument("--threads", type=cli.nonnegative_int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument("--parts", type=cli.listed(cli.choice(("resample", "overhead"), "part")),
                    default="resample,overhead",
                    help="resample (the op against torch; resample-*.json) and/or overhead (per-step SMC cost "
                         "against the plain step; smc-step-overhead-*.json)")
    ap.add_argument("--out", default="bench/results", help="directory of the JSON ('' for none)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    record = machine_record(device)
    parts = args.parts
    if "overhead" in parts:
        overhead = step_overhead(device, args.min_time)
        if args.out:
            path = write_json(Path(args.out) / f"smc-step-overhead-{slug(record['device'])}.json",
                              {"benchmark": "smc step overhead", "machine": record, "load_average": os.getloadavg(),
                               "note": "best of 5 batches; K = 64 particles of (4,128,128) fp32 as one batch",
                               "rows": overhead})
            print(f"wrote {path}")
    if "resample" not in parts:
        return
    rows = run(device, args.min_time)
    if args.out:
        result = {"benchmark": "resample", "machine": record, "load_average": os.getloadavg(),
                  "note": "G = 1 group, systematic; the fused in-place move copies only the dead particles' rows; "
                          "floor = bytes_moved / copy bandwidth measured at 2 K P bytes; speed-ups of best times",
                  "rows": rows}
        path = write_json(Path(args.out) / f"resample-{slug(record['device'])}.json", result)
        print(f"wrote {path} and {plot_resample(result, path.with_suffix('.png'))}")


if __name__ == "__main__":
    main()
