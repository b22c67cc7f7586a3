"""`python -m diffsampler.bench serve`: continuous batching (diffsampler.serve.BatchSampler) against serving one
request at a time with diffsampler.sample, on one stream of requests with mixed step counts arriving at random
times.

The model is a small convolutional denoiser with a timestep embedding per sample (random weights: the cost of a
network, not its quality). Arrivals are a Poisson stream at `--load` times the rate one-at-a-time serving can
sustain. Both servers run on one clock that advances by the measured compute time of what they run and jumps
over idle time (no sleeping), so the table gives throughput (requests per second of that clock) and latency
(finish - arrival, mean and p90) for the same stream.
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

import torch

import diffsampler as ds
from diffsampler.bench import cli
from diffsampler.bench.common import machine_record, slug, write_json
from diffsampler.serve import BatchSampler


class ConvDenoiser(torch.nn.Module):
    """conv3x3 -> + time embedding -> SiLU -> conv3x3 -> SiLU -> conv3x3, t of shape (B,) or ()."""

    def __init__(self, channels: int = 4, width: int = 64):
        super().__init__()
        self.inp = torch.nn.Conv2d(channels, width, 3, padding=1)
        self.mid = torch.nn.Conv2d(width, width, 3, padding=1)
        self.out = torch.nn.Conv2d(width, channels, 3, padding=1)
        self.emb = torch.nn.Linear(16, width)

    @torch.no_grad()
    def forward(self, x, t):
        t = t.to(torch.float32).reshape(-1).expand(x.shape[0])
        freqs = torch.exp(-math.log(1e4) * torch.arange(8, dtype=torch.float32, device=x.device) / 8)
        e = self.emb(torch.cat([torch.sin(t[:, None] * freqs), torch.cos(t[:, None] * freqs)], 1))
        h = torch.nn.functional.silu(self.inp(x) + e[:, :, None, None])
        return self.out(torch.nn.functional.silu(self.mid(h)))


def stream(n: int, steps: list[int], rate: float, seed: int) -> list[tuple[float, int]]:
    """(arrival second, step count) of n requests: Poisson arrivals at `rate` per second, step counts drawn
    from `steps`."""
    gen = torch.Generator().manual_seed(seed)
    gaps = -torch.log(torch.rand(n, generator=gen, dtype=torch.float64)) / rate
    arrivals = torch.cumsum(gaps, 0).tolist()
    picks = torch.randint(0, len(steps), (n,), generator=gen).tolist()
    return [(a, steps[p]) for a, p in zip(arrivals, picks)]


def serve_one_at_a_time(model, requests, x_T, solver):
    """Finish times of FIFO serving with one sample() call per request."""
    clock, finish = 0.0, []
    for (arrival, steps), x in zip(requests, x_T):
        clock = max(clock, arrival)
        t0 = time.perf_counter()
        ds.sample(model, x[None], steps, solver, check_nan=False)
        clock += time.perf_counter() - t0
        finish.append(clock)
    return finish


def serve_batched(model, requests, x_T, solver, capacity):
    """Finish times with a BatchSampler of `capacity` rows admitting requests as they arrive."""
    server = BatchSampler(model, capacity, x_T[0].shape)
    clock, finish, ids, nxt = 0.0, [None] * len(requests), {}, 0
    while nxt < len(requests) or server.pending:
        while nxt < len(requests) and requests[nxt][0] <= clock and server.pending < capacity:
            ids[server.submit(x_T[nxt], requests[nxt][1], solver)] = nxt
            nxt += 1
        if not server.pending:
            clock = requests[nxt][0]  # idle until the next arrival
            continue
        t0 = time.perf_counter()
        done = server.step()
        clock += time.perf_counter() - t0
        for rid in done:
            finish[ids.pop(rid)] = clock
    ds.error_flags.check(server.status)
    return finish


def summary(name, requests, finish):
    latency = sorted(f - a for (a, _), f in zip(requests, finish))
    return dict(server=name, throughput=len(requests) / max(finish), mean_latency=statistics.fmean(latency),
                p90_latency=latency[int(0.9 * (len(latency) - 1))])


def main(argv=None) -> None:
    ap = cli.parser("serve", __doc__)
    ap.add_argument("--device", type=cli.device, default=cli.default_device())
    ap.add_argument("--size", type=cli.shape, default="4,32,32", help="the sample shape (C,H,W)")
    ap.add_argument("--requests", type=cli.positive_int, default=24)
    ap.add_argument("--steps", type=cli.listed(cli.positive_int), default="10,20,30",
                    help="step counts the requests draw from")
    ap.add_argument("--solver", default="dpmpp_2m")
    ap.add_argument("--load", type=cli.positive_float, default=2.0,
                    help="arrival rate over the rate one-at-a-time serving sustains")
    ap.add_argument("--capacity", type=cli.listed(cli.positive_int), default="4,8")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/results", help="directory of the JSON ('' for none)")
    args = ap.parse_args(argv)
    device, shape = args.device, tuple(args.size)
    if len(shape) != 3:
        ap.error(f"--size must be C,H,W, got {args.size}")
    torch.manual_seed(args.seed)
    model = ConvDenoiser(shape[0]).to(device)
    record = machine_record(device)
    probe = torch.randn(shape, device=device)
    ds.sample(model, probe[None], 2, args.solver, check_nan=False)  # warm up
    t0 = time.perf_counter()
    ds.sample(model, probe[None], 10, args.solver, check_nan=False)
    per_step = (time.perf_counter() - t0) / 10
    mean_steps = statistics.fmean(args.steps)
    rate = args.load / (per_step * mean_steps)
    requests = stream(args.requests, args.steps, rate, args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    x_T = [torch.randn(shape, generator=gen).to(device) for _ in requests]
    print(f"device: {record['device']}, torch {record['torch']}, {args.requests} requests of {shape}, "
          f"{args.solver} with {args.steps} steps, load {args.load} (one step alone: {per_step * 1e3:.2f} ms)")
    rows = [summary("one at a time", requests, serve_one_at_a_time(model, requests, x_T, args.solver))]
    for c in args.capacity:
        rows.append(summary(f"batched, {c} rows", requests, serve_batched(model, requests, x_T, args.solver, c)))
    base = rows[0]["throughput"]
    header = f"{'server':<20}{'requests/s':>12}{'vs alone':>10}{'mean latency [s]':>18}{'p90 [s]':>10}"
    print(header + "\n" + "-" * len(header))
    for r in rows:
        r["throughput_vs_alone"] = r["throughput"] / base
        print(f"{r['server']:<20}{r['throughput']:>12.2f}{r['throughput_vs_alone']:>9.2f}x"
              f"{r['mean_latency']:>18.3f}{r['p90_latency']:>10.3f}")
    if args.out:
        payload = dict(benchmark="serve", machine=record, sample_shape=list(shape), requests=args.requests,
                       steps=args.steps, solver=args.solver, load=args.load, step_seconds_alone=per_step,
                       note="ConvDenoiser (3 convs, width 64) with a timestep embedding per sample; Poisson "
                       "arrivals; one clock of measured compute time, idle time skipped", rows=rows)
        path = write_json(Path(args.out) / f"serve-{slug(record['device'])}.json", payload)
        print(f"wrote {path}")
