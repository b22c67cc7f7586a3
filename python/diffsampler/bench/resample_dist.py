"""`python -m diffsampler.bench resample_dist`: resample_distributed on W local gloo processes (one CPU thread each)
against the simplest correct alternative, an all_gather of every particle followed by ops.resample(move="gather")
of the whole batch on every rank, and against ops.resample of the whole batch in one process.

Prediction per call: the single-process op on the whole batch (every rank computes the same ancestors), plus three
small collectives (the rank check, the log-weights, the exchange) at the measured latency L of an 8-number
all_gather, plus the rows that cross ranks at the measured all_to_all bandwidth B: T_1 + 3 L + X P / B, X the rows
the busiest rank receives (P bytes a row); the all_gather alternative receives (W - 1) K_local rows:
T_1 + L + (W - 1) K_local P / B. One group, systematic, always
resampled; "few die" / "most die": Gaussian log-weights with sigma 0.15 / 4 (the same on every rank).
"""

from __future__ import annotations

import os
import socket
import statistics
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import diffsampler as ds
from diffsampler.bench import cli
from diffsampler.bench.common import machine_record, slug, write_json
from diffsampler.smc_dist import all_gather_dim0, resample_distributed

LEVELS = [("few die", 0.15), ("most die", 4.0)]
CASES = [(32, (4, 64, 64)), (50_000, ())]  # (K_local, particle shape), float32


def timed(fn, min_time: float) -> tuple[float, float]:
    """(median, best) seconds per call over 5 batches, each the slowest rank's; the same repetitions on every rank."""
    for _ in range(3):
        fn()
    t0 = time.perf_counter()
    fn()
    once = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
    dist.all_reduce(once, dist.ReduceOp.MAX)
    reps = max(1, int(min_time / 5 / max(once.item(), 1e-6)))
    samples = []
    for _ in range(5):
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        dt = torch.tensor([(time.perf_counter() - t0) / reps], dtype=torch.float64)
        dist.all_reduce(dt, dist.ReduceOp.MAX)
        samples.append(dt.item())
    return statistics.median(samples), min(samples)


def all_gather_then_resample(lw, particles_local, gen, rank):
    """Every particle to every rank, the single-process op on the whole batch, this rank's shard kept."""
    world, K_local = dist.get_world_size(), particles_local.shape[0]
    everything = particles_local.new_empty(world * K_local, *particles_local.shape[1:])
    all_gather_dim0(everything, particles_local)
    out = ds.ops.resample(lw, everything, "systematic", generator=gen, move="gather")
    return out.particles[rank * K_local:(rank + 1) * K_local]


def _worker(rank, world, port, min_time, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=600))
    tiny = torch.zeros(8, dtype=torch.float64)
    gathered = torch.empty(world * 8, dtype=torch.float64)
    latency = timed(lambda: all_gather_dim0(gathered, tiny), min_time)[1]
    block = torch.zeros(world * (1 << 20), dtype=torch.float32)  # 4 MiB to each rank
    recv = torch.empty_like(block)
    a2a = timed(lambda: dist.all_to_all_single(recv, block), min_time)[1]
    bandwidth = (world - 1) * 4 * (1 << 20) / a2a  # bytes received per second per rank
    rows = []
    for K_local, shape in CASES:
        K = world * K_local
        full = torch.randn(K, *shape, generator=torch.Generator().manual_seed(0))
        mine = full[rank * K_local:(rank + 1) * K_local].clone()
        P = mine[0].numel() * mine.element_size()
        for label, sigma in LEVELS:
            lw = sigma * torch.randn(1, K, generator=torch.Generator().manual_seed(1))
            lw_local = lw[:, rank * K_local:(rank + 1) * K_local].contiguous()
            ancestors = ds.ops.resample(lw, full.clone(), "systematic",
                                        generator=torch.Generator().manual_seed(2)).ancestors[0]
            home = torch.arange(K) // K_local
            received = int((ancestors // K_local != home).view(world, K_local).sum(1).max())  # the busiest rank
            gen = torch.Generator().manual_seed(3)
            impls = {
                "distributed": lambda: resample_distributed(lw_local, mine, "systematic", generator=gen),
                "distributed check_ranks=False": lambda: resample_distributed(lw_local, mine, "systematic",
                                                                              generator=gen, check_ranks=False),
                "all_gather + resample": lambda: all_gather_then_resample(lw, mine, gen, rank),
            }
            times = {name: timed(fn, min_time) for name, fn in impls.items()}
            if rank == 0:
                single = full.clone()
                t0 = time.perf_counter()
                for _ in range(20):
                    ds.ops.resample(lw, single, "systematic", generator=gen)
                times["single process"] = ((time.perf_counter() - t0) / 20,) * 2
                compute = times["single process"][1]  # the ancestors of the whole problem, replicated on every rank
                predicted = {"distributed": compute + 3 * latency + received * P / bandwidth,
                             "distributed check_ranks=False": compute + 2 * latency + received * P / bandwidth,
                             "all_gather + resample": compute + latency + (world - 1) * K_local * P / bandwidth,
                             "single process": None}
                for name, (median, best) in times.items():
                    rows.append({"world": world, "K_local": K_local, "particle_shape": list(shape), "level": label,
                                 "rows_received_max": received, "impl": name, "seconds": median,
                                 "best_seconds": best, "predicted_seconds": predicted[name]})
                print(f"K_local={K_local:>6} {str(shape):>12} {label:>8} rows in={received:>6} (max)  best " + "  ".join(
                    f"{n}: {t[1] * 1e6:8.0f} us" + (f" ({predicted[n] * 1e6:.0f})" if predicted[n] else "")
                    for n, t in times.items()), flush=True)
    if rank == 0:
        print(f"all_gather latency {latency * 1e6:.0f} us, all_to_all bandwidth {bandwidth / 1e9:.2f} GB/s per rank")
        if out_dir:
            record = machine_record(torch.device("cpu"))
            result = {"benchmark": "resample_dist", "machine": record, "load_average": os.getloadavg(),
                      "note": f"{world} gloo processes on one machine, 1 thread each; times are the slowest rank's; "
                              "predicted = collectives at the measured latency + received bytes at the measured "
                              "all_to_all bandwidth",
                      "all_gather_latency_seconds": latency, "all_to_all_bytes_per_second": bandwidth, "rows": rows}
            path = write_json(Path(out_dir) / f"resample_dist-{slug(record['device'])}.json", result)
            print(f"wrote {path}")
    dist.destroy_process_group()


def main(argv=None) -> None:
    ap = cli.parser("resample_dist", __doc__)
    ap.add_argument("--world", type=cli.positive_int, default=2, help="gloo processes on this machine")
    ap.add_argument("--min-time", type=cli.positive_float, default=0.5, help="seconds of timing per measurement")
    ap.add_argument("--out", default="bench/results", help="directory of the JSON ('' for none)")
    args = ap.parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(args.world, port, args.min_time, args.out), nprocs=args.world)


if __name__ == "__main__":
    main()
