"""`python -m diffsampler.bench loop`: a whole N-step sampling loop with a cheap synthetic denoiser, so that
what is measured is the sampler's per-step overhead: diffsampler eager (coefficients as kernel arguments, and
"indexed": read by step index on the device), torch.compile (and on a GPU a CUDA graph of the whole loop and
one of a single step replayed per step) against diffusers' scheduler loop, per-step time in µs and ops
dispatched per step.

The denoiser is out = tanh(x) (one elementwise op), the same in every variant. `--profile DIR` writes a
torch.profiler Chrome trace of the eager loop with a range per model call and per update (NVTX ranges too
on CUDA: run_plan(..., ranges=True)).
"""

from __future__ import annotations

from pathlib import Path

import torch

import diffsampler as ds
from diffsampler.bench import cli
from diffsampler.bench.cli import DTYPES
from diffsampler.bench.common import OpCounter, machine_record, measure, slug, write_json
from diffsampler.bench.plots import plot_loop
from diffsampler.bench.step import ANCHORS
from diffsampler.graphs import run_indexed


def denoiser(x, t):
    return torch.tanh(x)


def _plan(solver: str, steps: int):
    spec = ds.solvers.SOLVERS[solver]
    schedule = spec.default_schedule()
    return ds.solvers.make_plan(solver, schedule, steps, spec.default_prediction(schedule))


def _diffusers_loop(solver: str, steps: int):
    import diffusers

    name, config = ANCHORS[solver]
    sched = getattr(diffusers, name)(**config)

    def loop(x):
        sched.set_timesteps(steps)
        x = x * getattr(sched, "init_noise_sigma", 1.0)
        for t in sched.timesteps:
            inp = sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x
            x = sched.step(denoiser(inp, t), t, x).prev_sample
        return x

    return loop


def ops_per_step(fn, x, steps: int) -> float:
    with OpCounter() as counter:
        fn(x)
    return sum(counter.ops.values()) / steps


def profile(x, plan, out_dir: Path, solver: str) -> Path:
    """A Chrome trace of one eager loop, with its per-step ranges."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if x.is_cuda else [])
    with torch_profile(activities=activities) as prof:
        ds.run_plan(denoiser, x, plan, check_nan=False, ranges=True)
    path = out_dir / f"trace-{solver}-{slug(str(x.device))}.json"
    out_dir.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(path))
    return path


def main(argv=None) -> None:
    ap = cli.parser("loop", __doc__)
    ap.add_argument("--device", type=cli.device, default=cli.default_device())
    ap.add_argument("--size", type=cli.shape, default="8,4,128,128")
    ap.add_argument("--dtype", type=cli.dtype, default="fp32",
                    help="fp32, fp16, bf16, fp64 or torch's names (float32, ...)")
    ap.add_argument("--steps", type=cli.positive_int, default=20)
    ap.add_argument("--solvers", type=cli.listed(cli.choice(ANCHORS, "solver")), default="dpmpp_2m,unipc,ddim,euler")
    ap.add_argument("--min-time", type=cli.positive_float, default=1.0)
    ap.add_argument("--profile", default="", help="directory for Chrome traces ('' for none)")
    ap.add_argument("--out", default="bench/results", help="directory of the JSON ('' for none)")
    args = ap.parse_args(argv)
    device, size = args.device, args.size
    x = torch.randn(size, device=device).to(DTYPES[args.dtype])
    record = machine_record(device)
    print(f"device: {record['device']}, torch {record['torch']}, {args.steps}-step loops at {size} {args.dtype}, "
          f"denoiser tanh(x)")
    header = f"{'solver':<12}{'variant':<16}{'loop [ms]':>11}{'per step [us]':>15}{'ops/step':>10}{'vs diffusers':>14}"
    print(header)
    print("-" * len(header))
    # compiled code leaves its thread pool spinning on a CPU, which slows what runs after it in the process:
    # every eager variant is timed first, the torch.compile ones last
    solvers = args.solvers
    plans = {solver: _plan(solver, args.steps) for solver in solvers}
    times, counts = {}, {}
    for solver in solvers:
        eager = lambda y, plan=plans[solver]: ds.run_plan(denoiser, y, plan, check_nan=False)
        indexed = lambda y, plan=plans[solver]: run_indexed(denoiser, y, plan)
        variants = {"diffsampler": eager, "indexed": indexed}
        if device.type == "cuda":
            variants["cuda graph"] = ds.CapturedSampler(denoiser, steps=args.steps, solver=solver)
            variants["graph per step"] = ds.CapturedSampler(denoiser, steps=args.steps, solver=solver,
                                                            capture="step")
        try:
            variants["diffusers"] = _diffusers_loop(solver, args.steps)
        except ImportError:
            pass
        for name, fn in variants.items():
            times[solver, name] = measure(lambda fn=fn: fn(x), device, min_time=args.min_time)
            if name in ("diffsampler", "indexed", "diffusers"):
                counts[solver, name] = ops_per_step(fn, x, args.steps)
        if args.profile:
            print(f"trace: {profile(x, plans[solver], Path(args.profile), solver)}")
    for solver in solvers:
        torch._dynamo.reset()
        compiled = torch.compile(lambda y, plan=plans[solver]: ds.run_plan(denoiser, y, plan, check_nan=False),
                                 fullgraph=True)
        times[solver, "torch.compile"] = measure(lambda: compiled(x), device, min_time=args.min_time)
    rows = []
    for (solver, name), t in sorted(times.items(), key=lambda kv: solvers.index(kv[0][0])):
        ratio = times[solver, "diffusers"] / t if (solver, "diffusers") in times else None
        n_ops = counts.get((solver, name))
        rows.append(dict(solver=solver, variant=name, seconds=t, per_step_seconds=t / args.steps,
                         ops_per_step=n_ops, speedup_vs_diffusers=ratio))
        print(f"{solver:<12}{name:<16}{t * 1e3:>11.2f}{t / args.steps * 1e6:>15.1f}"
              f"{(f'{n_ops:.1f}' if n_ops is not None else '-'):>10}{(f'{ratio:.1f}x' if ratio else '-'):>14}")
    if args.out:
        payload = dict(benchmark="loop", machine=record, size=list(size), dtype=args.dtype, steps=args.steps,
                       note="whole loops with denoiser tanh(x); ops/step counted with a TorchDispatchMode (the "
                       "denoiser's one op included)", rows=rows)
        path = write_json(Path(args.out) / f"loop-{slug(record['device'])}.json", payload)
        print(f"wrote {path} and {plot_loop(payload, path.with_suffix('.png'))}")
