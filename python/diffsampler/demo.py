"""The demo: what diffsampler is for, in one screen of text and one PNG.

    python -m diffsampler.demo [--n 1000] [--nfes 5,10,20] [--size 8,4,128,128] [--backend auto] [--plot demo.png]

(1) Quality against model calls (NFE) on an 8-mode 2-D ring of Gaussians, whose denoiser is exact in closed form
    (diffsampler.targets), so each solver is scored against the true answer, not against another sampler. Every
    solver runs in float32 through the fused update on one grid uniform in logSNR from sigma 14.6 to 0.03:
    - ODE error: the median over samples of |x - x_ref| / |x_ref|, x_ref a 1000-step float64 UniPC-3 run from
      the same x_T (converged far below the errors shown);
    - sliced W2: the sliced Wasserstein-2 distance to exact samples of the marginal at sigma 0.03 (the reference's
      own distance, printed below, is the floor set by the sample size).
(2) Per-step overhead: the solver update alone (no model) against diffusers' step() for the same step of the same
    scheduler (Stable Diffusion's scaled-linear schedule, step 5 of 20), fp32 at --size, and the time of a copy
    moving the same bytes (the memory floor).
"""

from __future__ import annotations

import time

import torch

import diffsampler as ds
from diffsampler.bench import cli, quality, step
from diffsampler.bench.common import copy_bandwidth, measure
from diffsampler.solvers import Grid, dpm_steps, unipc_steps
from diffsampler.targets import sliced_wasserstein

# name -> plan over a Grid (no lower-order final steps, so that each solver's order shows)
SOLVERS = {
    "ddim": lambda grid: dpm_steps(grid, "eps", order=1, lower_order_final=False, final_sigma_zero=False),
    "dpmpp_2m": lambda grid: dpm_steps(grid, "eps", order=2, lower_order_final=False, final_sigma_zero=False),
    "dpmpp_3m": lambda grid: dpm_steps(grid, "eps", order=3, lower_order_final=False, final_sigma_zero=False),
    "unipc": lambda grid: unipc_steps(grid, "eps", order=2, lower_order_final=False),
}
REFERENCE = lambda grid: unipc_steps(grid, "eps", order=3, lower_order_final=False)  # noqa: E731
OVERHEAD_SOLVERS = ("ddim", "dpmpp_2m", "unipc")
BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")


def solve(model, x_T: torch.Tensor, plan_fn, nfe: int, backend: str) -> torch.Tensor:
    """The sample at sigma_min after `nfe` model calls on the logSNR grid (x_T: standard normal at sigma_max)."""
    grid = Grid.uniform_lambda(quality.SIGMA_MAX, quality.SIGMA_MIN, nfe)
    return ds.run_plan(model, x_T, plan_fn(grid), backend=backend)


def quality_table(n: int, nfes: list[int], backend: str) -> dict:
    """{"rows": {solver: {"error": [...], "sliced_w2": [...]}} (one value per NFE), "sw2_floor": the reference's
    own sliced W2 (what a converged solver reaches with these samples)}."""
    target = quality.TARGETS["ring-2d"]()
    model = target.model(None, "eps")
    x_T = torch.randn(n, target.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    truth = solve(model, x_T, REFERENCE, 1000, "reference")
    exact = quality.noised_exact(target, n, 1)
    rows = {}
    for name, plan_fn in SOLVERS.items():
        errors, sw2 = [], []
        for nfe in nfes:
            x = solve(model, x_T.float(), plan_fn, nfe, backend).double()
            errors.append(((x - truth).norm(dim=1) / truth.norm(dim=1)).median().item())
            sw2.append(sliced_wasserstein(x, exact))
        rows[name] = dict(error=errors, sliced_w2=sw2)
    return dict(rows=rows, sw2_floor=sliced_wasserstein(truth, exact))


def overhead_table(size: tuple[int, ...], device: torch.device, backend: str, min_time: float = 0.5) -> dict:
    """{solver: {"fused": s, "diffusers": s or None, "floor": s}} for one step at `size`, fp32."""
    g = torch.Generator(device=device).manual_seed(0)
    x, out = (torch.randn(size, generator=g, device=device) for _ in range(2))
    rows = {}
    for solver in OVERHEAD_SOLVERS:
        fused, n_bytes = step.fused_step(solver, backend, x, out)
        reference = step.diffusers_step(solver, x, out)
        rows[solver] = dict(fused=measure(fused, device, min_time=min_time, best=True),
                            diffusers=measure(reference, device, min_time=min_time, best=True) if reference else None,
                            floor=n_bytes / copy_bandwidth(device, n_bytes, min_time=min_time))
    return rows


def plot(path: str, nfes: list[int], q: dict, o: dict, size) -> str:
    try:
        from diffsampler.bench.plots import pyplot, save

        plt = pyplot()
    except ImportError:
        return "matplotlib is not installed: no plot"
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, r in q["rows"].items():
        a.loglog(nfes, r["error"], "o-", label=name)
    a.set_xticks(nfes, [str(v) for v in nfes])
    a.set_xticks([], minor=True)
    a.set_xlabel("model calls (NFE)")
    a.set_ylabel("median ODE error vs float64 reference")
    a.set_title("quality: 8-mode 2-D ring, exact denoiser, logSNR grid")
    a.legend()
    names = list(o)
    series = {"fused update": [o[s]["fused"] for s in names], "copy floor": [o[s]["floor"] for s in names]}
    if all(o[s]["diffusers"] for s in names):
        series["diffusers step()"] = [o[s]["diffusers"] for s in names]
    width = 0.8 / len(series)
    for j, (label, values) in enumerate(series.items()):
        b.bar([i + (j - (len(series) - 1) / 2) * width for i in range(len(names))], [v * 1e6 for v in values],
              width, label=label)
    b.set_xticks(range(len(names)))
    b.set_xticklabels(names)
    b.set_yscale("log")
    b.set_ylabel("µs per step (model excluded)")
    b.set_title(f"per-step overhead at {tuple(size)} fp32")
    b.legend()
    return f"plot: {save(fig, path)}"


def main(argv=None) -> None:
    ap = cli.parser("demo", __doc__, prog="python -m diffsampler.demo")
    ap.add_argument("--n", type=cli.positive_int, default=1000, help="samples per solver and NFE")
    ap.add_argument("--nfes", type=cli.listed(cli.positive_int), default="5,10,20")
    ap.add_argument("--size", type=cli.shape, default="8,4,128,128", help="shape of the per-step overhead part")
    ap.add_argument("--device", type=cli.device, default=cli.default_device(), help="of the overhead part")
    ap.add_argument("--backend", type=cli.choice(BACKENDS, "backend"), default="auto")
    ap.add_argument("--threads", type=cli.positive_int, default=1,
                    help="CPU threads (default 1: on a busy machine OpenMP's thread barriers swamp the timings)")
    ap.add_argument("--plot", default="demo.png", help="PNG path ('' for none)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    avail = ds.backends()
    if args.backend != "auto" and not avail[args.backend]:
        ap.error(f"argument --backend: {args.backend} is not available here: {avail['reasons'][args.backend]}")
    t0 = time.perf_counter()
    print("backends here:", ", ".join(k for k, v in avail.items() if k != "reasons" and v),
          f"(--backend {args.backend})")

    q = quality_table(args.n, args.nfes, args.backend)
    print(f"\n(1) quality against model calls: 8-mode 2-D ring, exact denoiser, {args.n} samples, grid uniform in "
          f"logSNR\n    (sigma {quality.SIGMA_MAX} -> {quality.SIGMA_MIN}); lower is better")
    head = "".join(f"{'NFE ' + str(v):>9}" for v in args.nfes)
    print(f"    {'solver':<10}{'ODE error':<{9 * len(args.nfes)}}  {'sliced W2':<{9 * len(args.nfes)}}")
    print(f"    {'':<10}{head}  {head}")
    for name, r in q["rows"].items():
        print(f"    {name:<10}" + "".join(f"{e:>9.1e}" for e in r["error"]) + "  "
              + "".join(f"{w:>9.4f}" for w in r["sliced_w2"]))
    print(f"    sliced W2 of the 1000-step reference (the floor with {args.n} samples): {q['sw2_floor']:.4f}")

    o = overhead_table(args.size, args.device, args.backend)
    has_diffusers = all(r["diffusers"] for r in o.values())
    where = f"{args.device.type}, {args.threads} thread(s)" if args.device.type == "cpu" else args.device.type
    print(f"\n(2) per-step overhead: the update alone at {args.size} fp32 on {where}, µs per step (best of 5)")
    print(f"    {'solver':<10}{'fused':>9}{'diffusers':>11}{'speed-up':>10}{'copy floor':>12}   "
          "(diffusers: the same scheduler's step())")
    for name, r in o.items():
        d = f"{r['diffusers'] * 1e6:>11.0f}{r['diffusers'] / r['fused']:>9.1f}x" if r["diffusers"] else f"{'-':>11}{'-':>10}"
        print(f"    {name:<10}{r['fused'] * 1e6:>9.0f}{d}{r['floor'] * 1e6:>12.0f}")
    if not has_diffusers:
        print("    diffusers is not installed: its step() is not timed (pip install diffusers)")
    if args.plot:
        print("\n" + plot(args.plot, args.nfes, q, o, args.size))
    print(f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
