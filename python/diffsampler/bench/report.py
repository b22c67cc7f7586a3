"""`python -m diffsampler.bench report [--write docs/benchmarks.md] [--size 8,4,128,128] [--plots]`: the page of
benchmark tables (docs/benchmarks.md) from the committed results in bench/results/ (step, drop-ins, loop, serve, quality,
dpmv3, digits, teleport, lml, resample, SMC-overhead and pipeline JSON); --plots redraws the PNG beside each step / loop /
resample JSON."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from diffsampler.bench import cli


def step_table(path: Path, size: list[int]) -> str:
    data = json.loads(path.read_text())
    m = data["machine"]
    rows = defaultdict(dict)
    for r in data["rows"]:
        if r["size"] == size:
            rows[(r["dtype"], r["solver"])][r["impl"]] = r
    fused = "cuda" if m["device_type"] == "cuda" else "cpu"
    lines = [f"{m['device']} ({m['threads']} threads), torch {m['torch']}, diffusers {m['diffusers']}, "
             f"{m['date'][:10]}, size {tuple(size)} (`{path}`):", "",
             f"| dtype | solver | fused `{fused}` [µs] | diffusers `step()` [µs] | speed-up | copy floor [µs] | "
             "floor / fused |", "|---|---|---|---|---|---|---|"]
    for (dtype, solver), impls in rows.items():
        f, d = impls.get(fused), impls.get("diffusers")
        if f is None or d is None:
            continue
        lines.append(f"| {dtype} | {solver} | {f['seconds'] * 1e6:.0f} | {d['seconds'] * 1e6:.0f} | "
                     f"{f['speedup_vs_diffusers']:.1f}x | {f['floor_seconds'] * 1e6:.0f} | {f['floor_fraction']:.2f} |")
    return "\n".join(lines)


def quality_table(path: Path, target: str) -> str:
    data = json.loads(path.read_text())
    nfes = data["nfes"]
    lines = [f"{target} (`{path}`): median relative ODE error at sigma_min by NFE, the slope of the last two "
             "points, and the sliced W2 to exact samples at the largest NFE:", "",
             "| solver | order | " + " | ".join(f"NFE {n}" for n in nfes) + " | slope | sliced W2 |",
             "|---|---|" + "---|" * len(nfes) + "---|---|"]
    for c in data["results"][target]:
        lines.append(f"| {c['solver']} | {c['order'] or '-'} | " + " | ".join(f"{e:.1e}" for e in c["errors"])
                     + f" | {c['slopes'][-1]:.2f} | {c['sliced_w2'][-1]:.4f} |")
    for name, rows in data["results"].items():
        if name.endswith(":dc-solver"):
            lines += ["", f"DC-Solver on {name.split(':')[0]} (median relative error at sigma = 0, UniPC -> "
                      "UniPC + compensation): " + ", ".join(f"NFE {r['nfe']}: {r['unipc']:.4f} -> {r['dc_unipc']:.4f}"
                                                             for r in rows)]
    return "\n".join(lines)


def catalogue_table(path: Path, target: str) -> str:
    """Every VP solver as users run it (bench quality's catalogue), or '' when the run has none."""
    rows = json.loads(path.read_text())["results"].get(target + ":catalogue")
    if not rows:
        return ""
    nfes = rows[0]["nfes"]
    lines = [f"Every solver of `ds.sample` on Stable Diffusion's schedule as a user runs it ({target}, diffusers' "
             "trailing grid, as many steps as fit in the NFE): sliced W2 to exact samples, and the median ODE error "
             "against a 999-step DDIM run for the deterministic ones:", "",
             "| solver | " + " | ".join(f"W2 @{n}" for n in nfes) + " | " + " | ".join(f"ODE err @{n}" for n in nfes)
             + " |", "|---|" + "---|" * (2 * len(nfes))]
    for r in rows[:-1]:
        errs = " | ".join("sde" if e is None else f"{e:.1e}" for e in r["ode_error"])
        lines.append(f"| {r['solver']} | " + " | ".join(f"{v:.4f}" for v in r["sliced_w2"]) + f" | {errs} |")
    lines += ["", f"Exact against exact samples (the floor at this sample size): {rows[-1]['sliced_w2'][0]:.4f}."]
    return "\n".join(lines)


def dropins_table(path: Path) -> str:
    data = json.loads(path.read_text())
    m = data["machine"]
    r0 = data["rows"][0]
    lines = [f"{m['device']} ({m['threads']} threads), torch {m['torch']}, diffusers {m['diffusers']}, "
             f"{m['date'][:10]}, size {tuple(r0['size'])} {r0['dtype']} (`{path}`):", "",
             "| scheduler | step() calls | fused [µs] | diffusers [µs] | speed-up | floor / fused |",
             "|---|---|---|---|---|---|"]
    for r in data["rows"]:
        lines.append(f"| {r['scheduler']} | {r['calls']} | {r['fused_seconds'] * 1e6:.0f} | "
                     f"{r['diffusers_seconds'] * 1e6:.0f} | {r['speedup']:.1f}x | {r['floor_fraction']:.2f} |")
    return "\n".join(lines)


def guided_step_table(path: Path) -> str:
    data = json.loads(path.read_text())
    m = data["machine"]
    lines = [f"{m['device']} ({m['threads']} threads), torch {m['torch']}, {m['date'][:10]}, one "
             f"{data['rows'][0]['solver']} step (`{path}`):", "",
             "| size | dtype | guide operand [µs] | add + op [µs] | speed-up | floor [µs] | floor / guide operand |",
             "|---|---|---|---|---|---|---|"]
    pairs = {}
    for r in data["rows"]:
        pairs.setdefault((tuple(r["size"]), r["dtype"]), {})[r["impl"]] = r
    for (size, dtype), rows in pairs.items():
        fused, two = rows["guide operand"], rows["add + op"]
        lines.append(f"| {size} | {dtype} | {fused['seconds'] * 1e6:.0f} | {two['seconds'] * 1e6:.0f} | "
                     f"{two['seconds'] / fused['seconds']:.2f}x | {fused['floor_seconds'] * 1e6:.0f} | "
                     f"{fused['floor_fraction']:.2f} |")
    return "\n".join(lines)


def dpmv3_table(path: Path) -> str:
    """The README's DPM-Solver-v3 table (bench quality --dpmv3)."""
    data = json.loads(path.read_text())
    names = list(next(iter(data["results"].values()))["errors"])
    lines = [f"DPM-Solver-v3 (`{path}`): median relative ODE error at sigma_min", "",
             "| target | NFE | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for target, r in data["results"].items():
        for i, nfe in enumerate(r["nfes"]):
            lines.append(f"| {target} | {nfe} | " + " | ".join(f"{r['errors'][n][i]:.1e}" for n in names) + " |")
    return "\n".join(lines)


def loop_table(path: Path) -> str:
    data = json.loads(path.read_text())
    m = data["machine"]
    lines = [f"{m['device']} ({m['threads']} threads), torch {m['torch']}, {data['steps']}-step loops at "
             f"{tuple(data['size'])} {data['dtype']}, denoiser tanh(x), {m['date'][:10]} (`{path}`):", "",
             "| solver | variant | loop [ms] | per step [µs] | ops per step | vs diffusers |", "|---|---|---|---|---|---|"]
    for r in data["rows"]:
        ops = f"{r['ops_per_step']:.1f}" if r["ops_per_step"] is not None else "-"
        ratio = f"{r['speedup_vs_diffusers']:.1f}x" if r["speedup_vs_diffusers"] else "-"
        lines.append(f"| {r['solver']} | {r['variant']} | {r['seconds'] * 1e3:.1f} | {r['per_step_seconds'] * 1e6:.0f} | "
                     f"{ops} | {ratio} |")
    return "\n".join(lines)


def nfe_tables(path: Path) -> str:
    from diffsampler.bench import nfe

    data = json.loads(path.read_text())
    titles = {"mrs": "Mean-reverting restoration (MR Sampler against IR-SDE's Euler-Maruyama sampler), sliced W2 to "
                     "the exact posterior",
              "flow_sde": "Flow SDE samplers against the flow ODE solvers at equal model calls, sliced W2 to exact samples",
              "dmcmc": "Denoising MCMC (DLG + dpmpp_2m, exact classifier) against the solver alone, sliced W2 to exact "
                       "samples by NFE per sample",
              "usf": "USF plans found by S3's search against the best fixed solver at the same NFE, held-out x_T"}
    return "\n\n".join(f"{titles[part]} (`{path}`):\n\n{nfe.TABLES[part](res)}"
                        for part, res in data["results"].items())


def guidance_table(path: Path) -> str:
    from diffsampler.bench import guidance

    data = json.loads(path.read_text())
    return (f"`{path}`:\n\n" + guidance.table(data["minority"]) + "\n\nInverse problems (8-D mixture prior, "
            "y = A x0 + N(0, 0.1^2)): sliced W2 to the exact posterior against NFE, guided by the exact likelihood "
            "and by the first-order Tweedie (DPS-style) one:\n\n" + guidance.inverse_table(data["inverse"]))


def lml_table(path: Path) -> str:
    data = json.loads(path.read_text())
    m = data["machine"]
    lines = []
    if "quality" in data:
        q = data["quality"]
        lines += [f"LML quality (`{path}`, {data.get('machine_quality', m)['date'][:10]}), on the test seeds, without LML and with the setting "
                  "that was best on the tuning seeds; sliced W2 to exact samples and mean log-likelihood on the "
                  "mixtures, Fréchet distance to the held-out digits on the learned score (lower is better):", "",
                  "| target | solver | NFE | none | LML | log p none | log p LML | chosen on tuning seeds |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in q["rows"] + q.get("digits", {}).get("rows", []):
            logp = (f"{r['test_logp_none']:.3f} | {r['test_logp_best']:.3f}" if r["test_logp_none"] is not None
                    else "- | -")
            lines.append(f"| {r['target']} | {r['solver']} | {r['nfe']} | {r['test_none']:.4f} | "
                         f"{r['test_best']:.4f} | {logp} | {r['best']} |")
        lines += ["", "Best single setting over all cells on the tuning seeds: "
                  + "; ".join(f"{name} {res['global_best']['label']} (mean ratio to no LML {res['global_best']['mean_tune_ratio']:.3f})"
                              for name, res in (("mixtures", q), ("digits", q.get("digits"))) if res)
                  + ". Sliced W2 between two exact sample sets of the same size (the metric's noise floor): "
                  + ", ".join(f"{k} {v:.4f}" for k, v in q.get("sw2_exact_vs_exact", {}).items()) + "."]
    for key in sorted(k for k in data if k.startswith("overhead")):  # "overhead" (1 thread), then the others
        o = data[key]
        mo = data.get("machine_" + key, m)
        base = o["seconds"]["fused update"]
        lines += ["", f"Step cost at {tuple(o['shape'])} fp32, {mo['device']} ({o.get('threads', mo['threads'])} "
                  f"threads), {mo['date'][:10]}:", "",
                  "| step | ms | vs fused update | floor [ms] |", "|---|---|---|---|"]
        for k, v in o["seconds"].items():
            floor = o["predicted_seconds"].get(k)
            lines.append(f"| {k} | {v * 1e3:.2f} | {v / base:.2f}x | {f'{floor * 1e3:.2f}' if floor else '-'} |")
    return "\n".join(lines)


def digits_table(path: Path) -> str:
    data = json.loads(path.read_text())
    m = data["machine"]
    nfes = data["nfes"]
    threads = f"{m['threads']} thread" + ("s" if m["threads"] != 1 else "")
    lines = [f"{m['device']} ({threads}), torch {m['torch']}, {m['date'][:10]}: FD to the "
             f"{data['held_out']} held-out digits, mean ± std over {data['seeds']} seeds of {data['n']} samples; "
             f"classifier held-out accuracy {data['classifier_accuracy']:.1%} (`{path}`):", "",
             "| solver | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|" + "---|" * len(nfes)]
    by_solver = defaultdict(dict)
    for r in data["rows"]:
        if r["nfe"] in nfes:
            by_solver[r["solver"]][r["nfe"]] = f"{r['fd_mean']:.2f} ± {r['fd_std']:.2f}"
    lines += [f"| {solver} | " + " | ".join(cells.get(n, "") for n in nfes) + " |" for solver, cells in by_solver.items()]
    frames = [("training digits" if r["nfe"] is None else f"{r['solver']} at NFE {r['nfe']}")
              + f" {r['fd_mean']:.2f} ± {r['fd_std']:.2f}" for r in data["rows"] if r["nfe"] not in nfes]
    lines += ["", "For scale: " + "; ".join(frames) + "."]
    return "\n".join(lines)


def resample_table(path: Path) -> str:
    """The resampling op against torch (bench resample): best times in µs, the floor in brackets."""
    data = json.loads(path.read_text())
    m = data["machine"]
    impls = ["fused in-place", "fused gather", "torch multinomial+index_select", "torch systematic"]
    cells = defaultdict(dict)
    for r in data["rows"]:
        cells[(r["K"], tuple(r["particle_shape"]), r["level"], r["dead"])][r["impl"]] = r
    lines = [f"{m['device']} ({m['threads']} thread(s)), torch {m['torch']}, {m['date'][:10]}; one group, systematic; "
             f"best of 5 batches in µs, in brackets the floor (bytes moved at the copy bandwidth) (`{path}`):", "",
             "| K × particle | level (dead) | " + " | ".join(impls) + " | in-place vs multinomial |",
             "|---|---|" + "---|" * (len(impls) + 1)]
    for (k, shape, level, dead), row in cells.items():
        what = f"{k} × {shape} fp32" if shape else f"{k} scalars"
        vals = []
        for impl in impls:
            r = row.get(impl)
            floor = f" ({r['floor_seconds'] * 1e6:.0f})" if r and r.get("floor_seconds") and shape else ""
            vals.append(f"{r['best_seconds'] * 1e6:.0f}{floor}" if r else "-")
        speedup = row.get("fused in-place", {}).get("speedup_vs_multinomial")
        lines.append(f"| {what} | {level} ({dead}) | " + " | ".join(vals) + f" | {f'{speedup:.1f}x' if speedup else '-'} |")
    return "\n".join(lines)


def smc_overhead_table(path: Path) -> str:
    """What SMC adds to a step (bench resample --parts overhead)."""
    data = json.loads(path.read_text())
    m = data["machine"]
    lines = [f"{m['device']} ({m['threads']} thread(s)), {m['date'][:10]}; {data['note']} (`{path}`):", "",
             "| part | µs | x plain step |", "|---|---|---|"]
    lines += [f"| {r['part']} | {r['seconds'] * 1e6:.0f} | {r['vs_plain_step']:.3f} |" for r in data["rows"]]
    return "\n".join(lines)


def serve_table(path: Path) -> str:
    """Continuous batching against one request at a time (bench serve)."""
    data = json.loads(path.read_text())
    m = data["machine"]
    lines = [f"{m['device']} ({m['threads']} threads), torch {m['torch']}, {m['date'][:10]}; {data['requests']} "
             f"requests of {tuple(data['sample_shape'])}, {data['solver']} with {data['steps']} steps, Poisson "
             f"arrivals at {data['load']}x the one-at-a-time rate (`{path}`):", "",
             "| server | requests/s | vs one at a time | mean latency [s] | p90 latency [s] |", "|---|---|---|---|---|"]
    lines += [f"| {r['server']} | {r['throughput']:.2f} | {r['throughput_vs_alone']:.2f}x | {r['mean_latency']:.3f} | "
              f"{r['p90_latency']:.3f} |" for r in data["rows"]]
    return "\n".join(lines)


def pipeline_table(path: Path) -> str:
    """Whole diffusers pipelines (bench pipeline): seconds per image with diffusers' scheduler, accelerate(pipe)
    and accelerate(pipe, cuda_graph=True), and how their images compare."""
    data = json.loads(path.read_text())
    m, c = data["machine"], data["config"]
    lines = [f"{m['device']} ({m['threads']} threads), torch {m['torch']}, diffusers {m['diffusers']}, "
             f"{m['date'][:10]}; {c['steps']} steps, guidance {c['guidance_scale']}, batch {c['batch']}, {c['dtype']}, "
             f"output: {c['output']} (`{path}`):", "",
             "| pipeline (denoiser, parameters) | latent | diffusers [s/image] | `accelerate` [s/image] | "
             "`cuda_graph=True` [s/image] | accelerate vs diffusers | graph vs accelerate | graph == accelerate | "
             "max abs diff to diffusers | CUDA graph |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        t = r["seconds_per_image"]
        graph = (f"{r['cuda_graphs_captured']} captured" if not r["cuda_graph_fallbacks"]
                 else "eager: " + "; ".join(r["cuda_graph_fallbacks"]))
        lines.append(f"| {r['pipeline_class']} + {r['scheduler']} ({r['denoiser']}, "
                     f"{r['denoiser_parameters'] / 1e6:.2f} M) | {'x'.join(map(str, r['latent']))} | "
                     f"{t['diffusers']:.3f} | {t['accelerate']:.3f} | {t['accelerate + cuda_graph']:.3f} | "
                     f"{r['speedup_vs_diffusers']['accelerate']:.2f}x | {r['speedup_graph_vs_accelerate']:.2f}x | "
                     f"{'yes' if r['graph_equals_accelerate'] else 'NO'} | "
                     f"{r['accelerate_vs_diffusers_max_abs_diff']:.1e} (of {r['output_max_abs']:.1f}) | {graph} |")
    return "\n".join(lines)


def teleport_table(path: Path) -> str:
    """Gaussian teleportation at equal NFE (bench teleport): the error (FD on digits) per skip fraction at a few
    NFE, and the teleported NFE that reaches the plain solver's error."""
    data = json.loads(path.read_text())
    m, fractions = data["machine"], data["fractions"]
    shown = (5, 7, 9, 10, 15, 20, 21, 29, 30)
    lines = [f"{m['device']} ({m['threads']} threads), torch {m['torch']}, {m['date'][:10]}; median ODE error "
             f"on the 64-D mixture ({data['samples']} x_T), FD of {data['digits_n']} digits on the learned score "
             f"(mean of 3 seeds) (`{path}`):", "",
             "| target | solver | NFE | " + " | ".join("no teleport" if f == 0 else f"skip {f:.0%}" for f in fractions)
             + " | teleported NFE at equal quality |", "|---|---|---|" + "---|" * (len(fractions) + 1)]
    saved = {(s["target"], s["solver"], s["nfe"]): s["teleport_nfe"] for s in data["nfe_saved"]}
    cells = defaultdict(dict)
    for r in data["rows"]:
        if r["nfe"] in shown:
            cells[(r["target"], r["solver"], r["nfe"])][r["fraction"]] = r.get("error", r.get("fd"))
    for (target, solver, nfe), row in cells.items():
        equal = saved.get((target, solver, nfe))
        lines.append(f"| {target} | {solver} | {nfe} | " + " | ".join(f"{row[f]:.3g}" for f in fractions)
                     + f" | {'-' if equal is None else equal} |")
    return "\n".join(lines)


# (glob, title, what is measured, table) in page order; the discussion of each lives on the topic pages
SECTIONS = [
    ("step-*.json", "Step overhead (`bench step`)",
     "The solver update alone (no model) on the fused backend against the diffusers scheduler's `step()` for the "
     "same step, and against the memory floor: a copy moving the same bytes on the same device.", step_table),
    ("dropins-*.json", "Every diffusers drop-in (`bench step --dropins`)",
     "A whole 20-step loop of `step()` calls of each drop-in against diffusers' own class on one fixed model "
     "output (model excluded, `set_timesteps` included), per call.", dropins_table),
    ("guided-step-*.json", "Guidance inside the fused step (`bench step --guided`)",
     "A guided step with the gradient as the op's guide operand (out + w g in registers) against the guided "
     "output formed first (`torch.add`) and the plain op on it; the floor is the one-pass form's bytes (the "
     "model and the gradient's own cost excluded).", guided_step_table),
    ("loop-*.json", "Whole loops (`bench loop`)",
     "A 20-step loop with a one-op denoiser (`tanh`), so the sampler's own overhead shows, against diffusers' "
     "scheduler loop; ops per step counted with a TorchDispatchMode.", loop_table),
    ("serve-*.json", "Continuous batching (`bench serve`)",
     "`diffsampler.serve.BatchSampler` (requests join a running batch at any step; one fused update with a step "
     "per sample) against one `sample()` call per request, on one stream of requests with mixed step counts and "
     "a small convolutional denoiser.", serve_table),
    ("quality-*.json", "Quality on analytic targets (`bench quality`)",
     "Gaussian mixtures have exact denoisers: each solver's ODE error against a 1000-step float64 reference from "
     "the same x_T, on one grid uniform in logSNR from sigma 14.6 to 0.03.", quality_table),
    ("dpmv3-quality-*.json", "DPM-Solver-v3 (`bench quality --dpmv3`)",
     "Fitted empirical model statistics against DPM-Solver++(2M) and UniPC, same grid and reference.", dpmv3_table),
    ("digits-*.json", "Learned score: 8x8 digits (`bench digits`)",
     "Fréchet distance of a classifier's features of 1000 samples to the held-out digits, per solver and NFE.",
     digits_table),
    ("nfe-*.json", "Fewer model calls (`bench nfe`)",
     "Error against NFE with and without each method that cuts model calls, on targets with exact answers, "
     "held-out seeds.", nfe_tables),
    ("teleport-*.json", "Gaussian teleportation (`bench teleport`)",
     "The first steps of a longer grid replaced by the closed-form ODE solution of the data's Gaussian fit, at "
     "the same model calls as the plain solver.", teleport_table),
    ("guidance-*.json", "Guidance (`bench guidance`)",
     "Classifier guidance toward the rarest minority-score class on a mixture whose mode shares are known; "
     "linear inverse problems whose posterior is exact.",
     guidance_table),
    ("lml-*.json", "LML (`bench lml`)",
     "LML settings chosen on tuning seeds and reported on test seeds, and the cost of its step.", lml_table),
    ("resample-*.json", "Resampling (`bench resample`)",
     "The fused resampling op against `torch.multinomial` + `index_select` and a torch systematic resampler.",
     resample_table),
    ("smc-step-overhead-*.json", "Per-step SMC overhead (`bench resample --parts overhead`)",
     "K = 64 particles of (4,128,128) fp32 as one batch, against the plain fused DPM++ 2M step.", smc_overhead_table),
    ("pipeline-*.json", "Whole diffusers pipelines (`bench pipeline`)",
     "Stable Diffusion and SD3 pipelines of diffusers with small random denoisers at a real latent size and "
     "classifier-free guidance: time per image with diffusers' scheduler, with `accelerate(pipe)` and with "
     "`accelerate(pipe, cuda_graph=True)`, from one seed.", pipeline_table),
]


def page(root: Path, size: list[int], target: str) -> str:
    """docs/benchmarks.md: every committed result's table."""
    lines = ["# Benchmarks", "",
             "Generated by `python -m diffsampler.bench report --write docs/benchmarks.md` from the JSON in "
             "`bench/results/` (each records its machine, versions and date); do not edit by hand. Each "
             "`python -m diffsampler.bench <subcommand>` rewrites its JSON; then regenerate this page. What the "
             "numbers show is discussed on the topic pages: [solvers](solvers.md), [production](production.md), "
             "[LML](lml.md), [SMC](smc.md) (which also holds the SMC, flow-particle and distributed tables).", ""]
    for pattern, title, what, table in SECTIONS:
        paths = sorted(root.glob(pattern))
        if pattern == "quality-*.json":  # not the dpmv3 file, which has its own section
            paths = [p for p in paths if not p.name.startswith("dpmv3")]
        if not paths:
            continue
        lines += [f"## {title}", "", what, ""]
        for path in paths:
            args = {step_table: (size,), quality_table: (target,)}.get(table, ())
            lines += [table(path, *args), ""]
            if table is quality_table and catalogue_table(path, target):
                lines += [catalogue_table(path, target), ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = cli.parser("report", __doc__)
    ap.add_argument("--results", default="bench/results")
    ap.add_argument("--size", type=cli.shape, default="8,4,128,128", help="the step table's size")
    ap.add_argument("--target", default="smooth-16d", help="the quality table's target")
    ap.add_argument("--plots", action="store_true", help="also (re)draw the PNG of each step / loop / resample JSON")
    ap.add_argument("--write", default="", help="write the page (docs/benchmarks.md) instead of printing it")
    args = ap.parse_args(argv)
    root = Path(args.results)
    if args.plots:
        from diffsampler.bench import plots

        for kind in ("step", "loop", "resample"):
            for path in sorted(root.glob(f"{kind}-*.json")):
                print(f"wrote {getattr(plots, f'plot_{kind}')(json.loads(path.read_text()), path.with_suffix('.png'))}")
    text = page(root, list(args.size), args.target)
    if args.write:
        Path(args.write).write_text(text)
        print(f"wrote {args.write}")
    else:
        print(text)
