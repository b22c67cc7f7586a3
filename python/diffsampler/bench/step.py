"""`python -m diffsampler.bench step`: the solver update alone (no model), each backend against diffusers'
scheduler step() and against the memory floor, in one run.

Prediction: the fused update is memory-bound. A DPM-Solver++ 2M step reads x, the model output and one history
slot and writes x' and m0 (5 tensors); a DDIM step reads x and the output and writes x' (3 tensors); UniPC
also reads and rewrites its state (7 with two reads). The floor
is the time of a plain copy moving the same number of bytes on the same device (so the same cache level: the
smaller sizes fit in a CPU's last-level cache); `floor/t` is the fraction of that bandwidth reached.

Rotating buffers (`--rotate`, on by default on a GPU): each timed call uses the next of several copies of all
operands, enough that they exceed the device's L2 twice over, so every call reads from DRAM as in a real loop
(the copy floor is then measured at the same total working set).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import diffsampler as ds
from diffsampler.bench import cli
from diffsampler.bench.cli import DTYPES
from diffsampler.bench.common import copy_bandwidth, machine_record, measure, slug, write_json
from diffsampler.bench.plots import plot_step

SIZES = [(1, 4, 64, 64), (8, 4, 128, 128), (64, 4, 128, 128)]
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
STEP_INDEX = 5  # a multistep step in the middle of a 20-step loop (history full, corrector on)
# solver -> (diffusers scheduler class, its config); the solvers without one (ghvb) are timed fused only
UNANCHORED = ("ghvb",)
ANCHORS = {
    "ddim": ("DDIMScheduler", dict(SD, clip_sample=False)),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", SD),
    "dpmpp_3m": ("DPMSolverMultistepScheduler", dict(SD, solver_order=3)),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", dict(SD, algorithm_type="sde-dpmsolver++")),
    "dpmpp_3m_sde": ("DPMSolverMultistepScheduler", dict(SD, algorithm_type="sde-dpmsolver++", solver_order=3)),
    "dpm_2m": ("DPMSolverMultistepScheduler", dict(SD, algorithm_type="dpmsolver", final_sigmas_type="sigma_min")),
    "dpm_3m": ("DPMSolverMultistepScheduler", dict(SD, algorithm_type="dpmsolver", final_sigmas_type="sigma_min",
                                                   solver_order=3)),
    "unipc": ("UniPCMultistepScheduler", SD),
    "deis": ("DEISMultistepScheduler", SD),
    "euler": ("EulerDiscreteScheduler", SD),
    "flow_euler": ("FlowMatchEulerDiscreteScheduler", {}),
}


def diffusers_step(solver: str, x, out):
    """A callable running diffusers' step() for the same step on the same tensors (None without diffusers or
    without a diffusers class for the solver)."""
    if solver not in ANCHORS:
        return None
    try:
        import diffusers
    except ImportError:
        return None
    name, config = ANCHORS[solver]
    sched = getattr(diffusers, name)(**config)
    sched.set_timesteps(20)
    sched.is_scale_input_called = True  # Euler: the timed step alone, without its (unfused) input scaling
    if solver == "ddim":
        t = sched.timesteps[STEP_INDEX]
        return lambda: sched.step(out, t, x)
    for i in range(STEP_INDEX):  # fill its history so the timed step is a full multistep (and corrector) step
        sched.step(out, sched.timesteps[i], x)
    t = sched.timesteps[STEP_INDEX]

    def step():
        sched._step_index = STEP_INDEX
        return sched.step(out, t, x)

    return step


def rotating(fns):
    """One callable calling fns[0], fns[1], ... in turn (each on its own copy of the operands)."""
    state = {"i": -1}

    def call():
        state["i"] = (state["i"] + 1) % len(fns)
        return fns[state["i"]]()

    return call


MAX_COPIES = 32  # small sizes stay in the cache anyway (and are launch-bound on a GPU)


def copies_needed(device: torch.device, n_bytes: int, rotate: bool) -> int:
    """Operand copies whose total exceeds twice the device's L2 (a CPU: 64 MiB), at most MAX_COPIES (1 without
    rotation)."""
    if not rotate:
        return 1
    cache = torch.cuda.get_device_properties(device).L2_cache_size if device.type == "cuda" else 64 << 20
    return min(1 + -(-2 * cache // n_bytes), MAX_COPIES)


def fused_step(solver: str, backend: str, x, out):
    """(callable running the fused update of the same step, bytes it moves)."""
    spec = ds.solvers.SOLVERS[solver]
    schedule = spec.default_schedule()
    plan = ds.solvers.make_plan(solver, schedule, 20, spec.default_prediction(schedule))
    step = plan.steps[STEP_INDEX]
    history = torch.randn((plan.history_slots, *x.shape), device=x.device).to(x.dtype) if plan.history_slots else None
    state = torch.randn_like(x) if plan.uses_state else None
    noise = torch.randn_like(x) if step.needs_noise else None
    tensors = 3 + len(step.read_slots) + (history is not None) + (noise is not None)  # x, out, x' + reads, m0, z
    tensors += 0 if state is None else (2 if step.coeffs.state is not None else 1)
    fn = lambda: ds.ops.multistep_update(x, out, step.coeffs, history=history, write_slot=step.write_slot,
                                         read_slots=step.read_slots, noise=noise, state=state, check_nan=False,
                                         backend=backend)
    return fn, tensors * x.numel() * x.element_size()


def run(device: torch.device, sizes, dtypes, solvers, out_dir: Path | None, min_time: float,
        rotate: bool = False) -> dict:
    avail = ds.backends()
    backends = ["reference"] + [b for b in ("cpu",) if device.type == "cpu" and avail[b]]
    backends += [b for b in ("cuda", "triton") if device.type == "cuda" and avail[b]]
    bandwidth = copy_bandwidth(device)
    record = machine_record(device)
    print(f"device: {record['device']} ({record['threads']} threads), torch {record['torch']}, "
          f"copy bandwidth {bandwidth / 1e9:.1f} GB/s (256 MiB)")
    if "triton" not in backends:
        print(f"triton: {'not timed on CPU (interpreter)' if device.type == 'cpu' else avail['reasons'].get('triton')}")
    rows = []
    header = f"{'size':<18}{'dtype':<6}{'solver':<13}{'impl':<11}{'time [us]':>11}{'floor [us]':>11}" \
             f"{'floor/t':>9}{'vs diffusers':>14}"
    print(header)
    print("-" * len(header))
    for size in sizes:
        for dname in dtypes:
            dtype = DTYPES[dname]
            g = torch.Generator(device=device).manual_seed(0)
            x, out = (torch.randn(size, generator=g, device=device).to(dtype) for _ in range(2))
            for solver in solvers:
                n_bytes = fused_step(solver, "reference", x, out)[1]
                pairs = [(x, out)] + [(x.clone(), out.clone()) for _ in range(copies_needed(device, n_bytes, rotate) - 1)]
                impls = {b: rotating([fused_step(solver, b, *pair)[0] for pair in pairs]) for b in backends
                         if b == "reference" or dtype != torch.float64}  # fp64 runs on the reference only
                floor = n_bytes / copy_bandwidth(device, n_bytes * len(pairs), min_time=min_time)
                diffusers_fns = [diffusers_step(solver, *pair) for pair in pairs]
                if diffusers_fns[0] is not None:
                    impls["diffusers"] = rotating(diffusers_fns)
                times = {name: measure(fn, device, min_time=min_time) for name, fn in impls.items()}
                t_diff = times.get("diffusers")
                for name, t in times.items():
                    speedup = t_diff / t if t_diff else None
                    rows.append(dict(size=list(size), dtype=dname, solver=solver, impl=name, seconds=t,
                                     operand_copies=len(pairs),
                                     bytes_moved=n_bytes, floor_seconds=floor, floor_fraction=floor / t, speedup_vs_diffusers=speedup))
                    print(f"{str(size):<18}{dname:<6}{solver:<13}{name:<11}{t * 1e6:>11.1f}{floor * 1e6:>11.1f}"
                          f"{floor / t:>9.2f}{(f'{speedup:.1f}x' if speedup else '-'):>14}")
    result = dict(benchmark="step", machine=record, copy_bandwidth_bytes_per_s=bandwidth, step_index=STEP_INDEX,
                  note="time of the solver update alone (model excluded); floor = time of a copy moving the same bytes",
                  rows=rows)
    if out_dir is not None:
        path = write_json(out_dir / f"step-{slug(record['device'])}.json", result)
        print(f"wrote {path} and {plot_step(result, path.with_suffix('.png'))}")
    return result


DROPIN_STEPS = 20


def dropin_loop(cls, size, dtype, device):
    """A callable running a whole DROPIN_STEPS-step loop of scheduler class `cls` (set_timesteps and every step()
    on one fixed model output, no model), and its number of step() calls."""
    import inspect

    params = inspect.signature(cls.__init__).parameters
    sched = cls(**{k: v for k, v in SD.items() if k in params})
    g = torch.Generator(device=device).manual_seed(0)
    x, out = (torch.randn(size, generator=g, device=device).to(dtype) for _ in range(2))
    sched.set_timesteps(DROPIN_STEPS, device=device)
    calls = len(sched.timesteps)

    def loop():
        sched.set_timesteps(DROPIN_STEPS, device=device)
        sched.is_scale_input_called = True  # the Euler-type classes' warning: their input scaling is not timed
        y = x
        for t in sched.timesteps:
            y = sched.step(out, t, y).prev_sample
        return y

    return loop, calls


def dropin_rows(device: torch.device, size, dtype_name: str, min_time: float) -> list[dict]:
    """Every drop-in of integrations.diffusers against diffusers' own class: a whole loop of step() calls each
    (model excluded), per call, and the floor of the least a step moves (read x and the output, write x')."""
    from diffsampler.integrations.diffusers import FUSED
    import diffusers

    dtype = DTYPES[dtype_name]
    n_bytes = 3 * torch.Size(size).numel() * torch.empty((), dtype=dtype).element_size()
    floor = n_bytes / copy_bandwidth(device, n_bytes, min_time=min_time)
    rows = []
    print(f"{'scheduler':<36}{'calls':>6}{'fused [us]':>12}{'diffusers [us]':>16}{'speed-up':>10}{'floor/fused':>13}")
    for name in sorted(FUSED):
        fused, calls = dropin_loop(FUSED[name], size, dtype, device)
        theirs, _ = dropin_loop(getattr(diffusers, name), size, dtype, device)
        t_fused = measure(fused, device, min_time=min_time) / calls
        t_theirs = measure(theirs, device, min_time=min_time) / calls
        rows.append(dict(scheduler=name, calls=calls, size=list(size), dtype=dtype_name, fused_seconds=t_fused,
                         diffusers_seconds=t_theirs, speedup=t_theirs / t_fused, floor_seconds=floor,
                         floor_fraction=floor / t_fused))
        print(f"{name:<36}{calls:>6}{t_fused * 1e6:>12.1f}{t_theirs * 1e6:>16.1f}{t_theirs / t_fused:>9.1f}x"
              f"{floor / t_fused:>13.2f}")
    return rows


def run_dropins(device: torch.device, size, dtype_name: str, out_dir: Path | None, min_time: float) -> dict:
    record = machine_record(device)
    print(f"device: {record['device']} ({record['threads']} threads), torch {record['torch']}; every drop-in's "
          f"{DROPIN_STEPS}-step loop of step() calls against diffusers', per call, size {tuple(size)} {dtype_name}")
    rows = dropin_rows(device, size, dtype_name, min_time)
    result = dict(benchmark="dropins", machine=record, steps=DROPIN_STEPS,
                  note="per step() call of a whole loop (set_timesteps included, model excluded) against diffusers' "
                       "class; floor = a copy moving 3 tensors (x and the output read, x' written)", rows=rows)
    if out_dir is not None:
        path = write_json(out_dir / f"dropins-{slug(record['device'])}.json", result)
        print(f"wrote {path}")
    return result


GUIDED_SOLVER = "dpmpp_2m"


def guided_rows(device: torch.device, sizes, dtype_names, min_time: float) -> list[dict]:
    """A guided DPM-Solver++ 2M step two ways on the fused backend: the gradient as the op's guide operand (one
    pass: x, the output, the gradient and a read in; x' and m0 out: 6 tensors) against the guided output formed
    first (a torch.add: 3 tensors more) and the plain op on it; the floor of the one-pass form beside each."""
    backend = "cuda" if device.type == "cuda" else "cpu"
    step = ds.solvers.make_plan(GUIDED_SOLVER, ds.schedules.VP.scaled_linear(), 20, "eps").steps[STEP_INDEX]
    rows = []
    print(f"{'size':<18}{'dtype':<6}{'impl':<16}{'time [us]':>11}{'floor [us]':>11}{'floor/t':>9}")
    for size in sizes:
        for dname in dtype_names:
            dtype = DTYPES[dname]
            g = torch.Generator(device=device).manual_seed(0)
            x, out, grad = (torch.randn(size, generator=g, device=device).to(dtype) for _ in range(3))
            history = torch.randn((2, *size), generator=g, device=device).to(dtype)
            n_bytes = (5 + len(step.read_slots)) * x.numel() * x.element_size()  # x, out, guide, reads in; x', m0
            args = dict(history=history, write_slot=step.write_slot, read_slots=step.read_slots, check_nan=False,
                        backend=backend)
            impls = {
                "guide operand": lambda: ds.ops.multistep_update(x, out, step.coeffs, guide=grad, guide_scale=0.3,
                                                                 **args),
                "add + op": lambda: ds.ops.multistep_update(x, torch.add(out, grad, alpha=0.3), step.coeffs,
                                                                **args),
            }
            floor = n_bytes / copy_bandwidth(device, n_bytes, min_time=min_time)
            for name, fn in impls.items():
                t = measure(fn, device, min_time=min_time)
                rows.append(dict(size=list(size), dtype=dname, solver=GUIDED_SOLVER, impl=name, seconds=t,
                                 bytes_moved_one_pass=n_bytes, floor_seconds=floor, floor_fraction=floor / t))
                print(f"{str(size):<18}{dname:<6}{name:<16}{t * 1e6:>11.1f}{floor * 1e6:>11.1f}{floor / t:>9.2f}")
    return rows


def run_guided(device: torch.device, sizes, dtype_names, out_dir: Path | None, min_time: float) -> dict:
    record = machine_record(device)
    print(f"device: {record['device']} ({record['threads']} threads), torch {record['torch']}; a guided "
          f"{GUIDED_SOLVER} step, the gradient inside the op against a torch.add before it")
    result = dict(benchmark="guided_step", machine=record, step_index=STEP_INDEX,
                  note="a guided solver step (model and gradient excluded): the guide operand of the fused op vs "
                       "the guided output formed first; floor = a copy moving the one-pass form's bytes",
                  rows=guided_rows(device, sizes, dtype_names, min_time))
    if out_dir is not None:
        path = write_json(out_dir / f"guided-step-{slug(record['device'])}.json", result)
        print(f"wrote {path}")
    return result


def main(argv=None) -> None:
    ap = cli.parser("step", __doc__)
    ap.add_argument("--device", type=cli.device, default=cli.default_device())
    ap.add_argument("--sizes", type=cli.listed(cli.shape, ";"), default=";".join(",".join(map(str, s)) for s in SIZES),
                    help="semicolon-separated shapes, e.g. '8,4,128,128;1,4,64,64'")
    ap.add_argument("--dtypes", type=cli.listed(cli.dtype), default="fp32,bf16",
                    help="comma-separated: fp32, fp16, bf16, fp64 (reference only) or torch's names (float32, ...)")
    ap.add_argument("--solvers", type=cli.listed(cli.choice((*ANCHORS, *UNANCHORED), "solver")),
                    default=",".join((*ANCHORS, *UNANCHORED)))
    ap.add_argument("--min-time", type=cli.positive_float, default=0.5, help="seconds of timing per measurement")
    ap.add_argument("--rotate", action=argparse.BooleanOptionalAction, default=None,
                    help="rotate operand copies past the L2 (default: on for CUDA, off on a CPU)")
    ap.add_argument("--out", default="bench/results", help="directory of the JSON ('' for none)")
    ap.add_argument("--dropins", action="store_true",
                    help="instead: every diffusers drop-in's loop of step() calls against diffusers' class, at the "
                         "first --sizes and --dtypes (dropins-*.json)")
    ap.add_argument("--guided", action="store_true",
                    help="instead: a guided step with the gradient inside the op against a torch.add before it, at "
                         "--sizes and --dtypes (guided-step-*.json)")
    args = ap.parse_args(argv)
    if args.guided:
        return run_guided(args.device, args.sizes, args.dtypes, Path(args.out) if args.out else None, args.min_time)
    if args.dropins:
        return run_dropins(args.device, args.sizes[0], args.dtypes[0], Path(args.out) if args.out else None,
                           args.min_time)
    rotate = args.device.type == "cuda" if args.rotate is None else args.rotate
    run(args.device, args.sizes, args.dtypes, args.solvers, Path(args.out) if args.out else None, args.min_time,
        rotate)
