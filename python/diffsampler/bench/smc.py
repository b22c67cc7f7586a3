"""`python -m diffsampler.bench smc`: Feynman-Kac correctors (diffsampler.smc) against naive score summing (the
same SDE, no weights) on targets known exactly, with exact eps-models of the factors (GaussianMixture.model).

(a) Product of experts p1 p2 of two Gaussian mixtures (the product mixture built exactly by
GaussianMixture.product), 2-D and 8-D: sliced W2 of N outputs (one draw per group of K particles) to N exact
samples, for K = 1, 4, 16, 64, 256. The naive sampler's outputs do not depend on K (unweighted particles, a
uniform draw), so it runs once with N samples. The floor is the sliced W2 between two exact N-samples.
(b) Annealing p^beta: of N(0, s^2 I) (= N(0, s^2 / beta I)): the error of the sampled variance and, as a float64
reference, the discrete-time K -> infinity limit of the FKC recursion; of a well-separated 1-D mixture with equal
widths (mode weights -> w_k^beta / sum): the error of the sampled mode weights (nearest mode).
VP linear schedule, 100 steps, ESS threshold 0.5, systematic resampling; one thread (the exact models are small
float64 tensor ops; on a shared 2-core machine one thread is many times faster).
(c) Flow particle sampling (diffsampler.flow_smc): reward reached per NFE budget by Best-of-N, SMC and Rollover
Budget Forcing on a rare mode (bench/flow_particles.py).
--parts picks the parts; the JSON keeps the other parts' previous results and the PNG is drawn from it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from diffsampler import schedules, smc
from diffsampler.bench import cli, flow_particles
from diffsampler.bench.common import machine_record, slug, write_json
from diffsampler.bench.plots import pyplot, save
from diffsampler.targets import GaussianMixture, sliced_wasserstein

KS = (1, 4, 16, 64, 256)


def poe_2d() -> tuple[GaussianMixture, GaussianMixture]:
    """Four modes on the axes times two broad modes on the diagonal: a product of 8 components, weights 0.36 to
    0.004, which naive summing gets wrong."""
    p1 = GaussianMixture(torch.ones(4), torch.tensor([[-1.0, 0], [1, 0], [0, 1], [0, -1]]), torch.full((4,), 0.3))
    p2 = GaussianMixture(torch.tensor([0.5, 0.5]), torch.tensor([[1.0, 1], [-1.5, -1.5]]), torch.tensor([0.6, 0.9]))
    return p1, p2


def poe_8d() -> tuple[GaussianMixture, GaussianMixture]:
    """4 x 3 random modes in 8-D (means N(0, 0.8^2 I)); the product has 12 components, perplexity 8.4."""
    gen = torch.Generator().manual_seed(3)
    m1 = torch.randn(4, 8, generator=gen, dtype=torch.float64) * 0.8
    m2 = torch.randn(3, 8, generator=gen, dtype=torch.float64) * 0.8
    return (GaussianMixture(torch.ones(4), m1, torch.full((4,), 0.7)),
            GaussianMixture(torch.ones(3), m2, torch.tensor([0.8, 1.0, 1.2])))


def product_of_experts(name, pair, n: int, steps: int, ks=KS) -> dict:
    p1, p2 = pair
    target = p1.product(p2)
    exact = target.sample(n, torch.Generator().manual_seed(100)).float()
    floor = sliced_wasserstein(exact, target.sample(n, torch.Generator().manual_seed(101)).float())
    vp = schedules.VP.linear()
    models = [p1.model(vp), p2.model(vp)]
    run = lambda K, weighted: smc.product(models, n, K, (target.dim,), steps=steps, weighted=weighted,  # noqa: E731
                                          generator=torch.Generator().manual_seed(K))
    naive = sliced_wasserstein(run(1, False).draw, exact)
    rows = []
    for K in ks:
        t0 = time.perf_counter()
        fkc = sliced_wasserstein(run(K, True).draw, exact)
        rows.append(dict(K=K, fkc=fkc, naive=naive, ratio=naive / fkc, seconds=time.perf_counter() - t0))
        print(f"{name:>4} K={K:>4}  sliced W2: FKC {fkc:.4f}  naive {naive:.4f}  naive/FKC {naive / fkc:5.2f}  "
              f"(exact-vs-exact floor {floor:.4f}; {rows[-1]['seconds']:.1f} s)", flush=True)
    return dict(dim=target.dim, components=len(target.weights), n=n, floor=floor, rows=rows)


def gaussian_limit(s2: float, beta: float, steps: int, weighted: bool = True) -> float:
    """Final variance of the K -> infinity (weighted) particles for N(0, s2)^beta by the Gaussian recursion
    (float64): the increment c x^2 maps N(0, V) to N(0, 1 / (1/V - 2c)), the step scales by
    scale (1 - h beta / v) and adds h."""
    var = 1 / beta
    for _, sigma, h, scale in smc._steps(schedules.VP.linear(), steps):
        v = (1 - sigma**2) * s2 + sigma**2
        if weighted:
            var = 1 / (1 / var - 2 * smc.log_weight_increment([torch.tensor([[1 / v]])], [beta], h).item())
        var = (scale * (1 - h * beta / v)) ** 2 * var + h
    return var


def _mode_weights(x: torch.Tensor, weights: torch.Tensor, mix: GaussianMixture) -> torch.Tensor:
    """Weighted mass of each mode (nearest mean) of 1-D points x (n, 1) with weights summing to 1."""
    mode = (x.double() - mix.means.T).abs().argmin(1)
    return torch.zeros(len(mix.weights), dtype=torch.float64).index_add_(0, mode, weights)


def annealing(n: int, ks, steps: int) -> dict:
    """Per K: the N draws' statistic ("draw") and the weighted-particle estimate sum_n sum_k w_nk f(x_nk) / G
    ("weighted", lower variance); naive: N independent samples."""
    vp = schedules.VP.linear()
    out = {"n": n, "gaussian": [], "mixture": []}
    mean, s = torch.zeros(1, 2, dtype=torch.float64), 0.6  # zero mean: the recursion's case
    gauss = GaussianMixture(torch.ones(1), mean, torch.tensor([s]))
    mix = GaussianMixture(torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64), torch.tensor([[-3.0], [0.0], [3.0]]),
                          torch.full((3,), 0.4))

    def run(target, beta, K, weighted, seed):
        res = smc.anneal(target.model(vp), beta, n, K, (target.dim,), steps=steps, weighted=weighted,
                         generator=torch.Generator().manual_seed(seed))
        return res.draw.double(), res.particles.double(), res.log_w.double().softmax(1).reshape(-1) / n

    for beta in (0.5, 2.0, 4.0):
        exact = s**2 / beta
        var = lambda x, w: (w[:, None] * (x - mean) ** 2).sum().item() / 2  # noqa: E731  per coordinate
        naive, _, _ = run(gauss, beta, 1, False, 7)
        row = dict(beta=beta, exact=exact, limit_fkc=gaussian_limit(s**2, beta, steps),
                   limit_naive=gaussian_limit(s**2, beta, steps, weighted=False),
                   naive=var(naive, torch.full((n,), 1.0 / n, dtype=torch.float64)), fkc=[])
        for K in ks:
            draw, parts, w = run(gauss, beta, K, True, 7)
            row["fkc"].append(dict(K=K, draw=var(draw, torch.full((n,), 1.0 / n, dtype=torch.float64)),
                                   weighted=var(parts, w)))
        out["gaussian"].append(row)
        rel = lambda v: f"{v / exact - 1:+.1%}"  # noqa: E731
        print(f"anneal N(0, {s}^2 I), beta={beta}: variance {exact:.4f}; naive {rel(row['naive'])} (its K->inf "
              f"limit {rel(row['limit_naive'])}); FKC K->inf limit {rel(row['limit_fkc'])}; FKC draw / weighted: "
              + ", ".join(f"K={r['K']} {rel(r['draw'])} / {rel(r['weighted'])}" for r in row["fkc"]), flush=True)
    for beta in (0.5, 2.0):
        exact = mix.power(beta).weights
        err = lambda m: (m - exact).abs().max().item()  # noqa: E731
        naive, _, _ = run(mix, beta, 1, False, 8)
        uniform = torch.full((n,), 1.0 / n, dtype=torch.float64)
        row = dict(beta=beta, exact=exact.tolist(), naive=_mode_weights(naive, uniform, mix).tolist(), fkc=[],
                   binomial_se=(exact * (1 - exact) / n).sqrt().max().item())
        row["naive_max_err"] = err(torch.tensor(row["naive"], dtype=torch.float64))
        for K in ks:
            draw, parts, w = run(mix, beta, K, True, 8)
            d, wt = _mode_weights(draw, uniform, mix), _mode_weights(parts, w, mix)
            row["fkc"].append(dict(K=K, draw=d.tolist(), weighted=wt.tolist(), draw_max_err=err(d),
                                   weighted_max_err=err(wt)))
        out["mixture"].append(row)
        print(f"anneal mixture (0.2, 0.3, 0.5) at -3, 0, 3, beta={beta}: mode weights "
              f"{[round(v, 3) for v in row['exact']]}; max error naive {row['naive_max_err']:.3f}, FKC draw / "
              f"weighted: " + ", ".join(f"K={r['K']} {r['draw_max_err']:.3f} / {r['weighted_max_err']:.3f}"
                                         for r in row["fkc"]) + f" (binomial s.e. of N draws "
              f"{row['binomial_se']:.3f})", flush=True)
    return out


def _plot(payload: dict, path: Path) -> None:
    plt = pyplot()

    poe, flow = payload.get("product_of_experts", {}), payload.get("flow_particles")
    panels = len(poe) + (flow is not None)
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.2), squeeze=False)
    axes = list(axes[0])
    if flow is not None:
        flow_particles.plot(axes.pop(), flow)
    for ax, (name, res) in zip(axes, poe.items()):
        ks = [r["K"] for r in res["rows"]]
        ax.plot(ks, [r["fkc"] for r in res["rows"]], "o-", label="FKC")
        ax.plot(ks, [r["naive"] for r in res["rows"]], "s--", label="naive score sum")
        ax.axhline(res["floor"], color="gray", ls=":", label="exact vs exact")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("particles per output K")
        ax.set_ylabel("sliced W2 to the exact product")
        ax.set_title(f"product of experts, {res['dim']}-D, N = {res['n']}")
        ax.legend()
    save(fig, path)


def main(argv=None) -> None:
    ap = cli.parser("smc", __doc__)
    ap.add_argument("--n", type=cli.positive_int, default=1024, help="outputs (groups) per run")
    ap.add_argument("--steps", type=cli.positive_int, default=100)
    ap.add_argument("--ks", type=cli.listed(cli.positive_int), default=",".join(map(str, KS)))
    ap.add_argument("--parts", default="abc", help="which parts to run: a (product of experts), b (annealing), "
                    "c (flow particles)")
    ap.add_argument("--flow-groups", type=cli.positive_int, default=512, help="(c): outputs per budget and method")
    ap.add_argument("--out", default="bench/results", help="directory of the JSON and PNG ('' for none)")
    args = ap.parse_args(argv)
    if not args.parts or set(args.parts) - set("abc"):
        ap.error(f"--parts must be letters among a, b, c, got {args.parts!r}")
    torch.set_num_threads(1)
    ks = args.ks
    t0 = time.perf_counter()
    results, machine = {}, machine_record(torch.device("cpu"))
    if "a" in args.parts:
        results["product_of_experts"] = {name: product_of_experts(name, pair(), args.n, args.steps, ks)
                                         for name, pair in (("2-D", poe_2d), ("8-D", poe_8d))}
    if "b" in args.parts:
        results["annealing"] = annealing(args.n, [k for k in ks if k > 1], args.steps)
    if "c" in args.parts:
        results["flow_particles"] = dict(flow_particles.run(groups=args.flow_groups), machine=machine)
    print(f"total {time.perf_counter() - t0:.0f} s")
    if args.out:
        out = Path(args.out)
        path = out / f"smc-{slug(machine['device'])}.json"
        payload = json.loads(path.read_text()) if path.exists() else {}
        if "a" in args.parts or "b" in args.parts:  # parts (a), (b) share these settings and the machine record
            payload.update(benchmark="smc", machine=machine, steps=args.steps, schedule="VP.linear()",
                           ess_threshold=0.5, method="systematic", note=__doc__.strip().splitlines()[0])
        payload.update(results)
        write_json(path, payload)
        _plot(payload, out / "smc.png")
        print(f"wrote {path} and {out / 'smc.png'}")
