"""python -m diffsampler.bench guidance: minority guidance on a mixture whose mode shares are known, and
posterior sampling of linear inverse problems with a mixture prior, whose posterior is exact.

Part "minority". Target: 4 modes in 2-D (std 0.15), three common (weight 0.32 each) and one rare (0.04); the exact eps model on
VP.linear(). Minority scores at t_p = 600 (squared L2 reconstruction error, 5 draws) of 20000 exact samples, 10
quantile classes, a time-conditioned MLP classifier trained on them; then DPM-Solver++(2M), 30 steps, guided
toward the rarest class. Per guidance scale: the share of samples nearest the rare mode (exact: 0.04) and the
share far from every mode (> 4 std: off the data). For target shares 0.1, 0.25, 0.5 the scale is found by
bisection on tuning seeds and the share then measured on other seeds.

Part "inverse": an 8-D, 4-mode mixture prior on VP.linear(), y = A x0 + N(0, 0.1^2) for A = a mask (5 of 8), a
3-tap blur and 2x downsampling; DPM-Solver++(2M) guided by the exact log p(y | x_t)
(`GaussianMixture.linear_likelihood`) and by the first-order Tweedie likelihood (`inverse.first_order_tweedie`,
DPS-style), sliced W2 of 2000 samples to 2000 exact posterior samples against NFE.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

import diffsampler as ds
from diffsampler import minority
from diffsampler.bench import cli
from diffsampler.bench.common import machine_record, slug, write_json
from diffsampler.schedules import VP
from diffsampler.targets import GaussianMixture

MEANS = [[-1.0, 0.0], [1.0, 0.0], [0.0, 1.2], [0.0, -1.3]]
WEIGHTS = [0.32, 0.32, 0.32, 0.04]
STD, RARE = 0.15, 3
SCALES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
TARGETS = (0.1, 0.25, 0.5)
TUNE_SEED, TEST_SEED = 100, 0


def target() -> GaussianMixture:
    return GaussianMixture(torch.tensor(WEIGHTS), torch.tensor(MEANS, dtype=torch.float64), torch.full((4,), STD))


def shares(x: torch.Tensor) -> tuple[float, float]:
    """(share nearest the rare mode, share farther than 4 std from every mode)."""
    d = ((x.double()[:, None] - torch.tensor(MEANS, dtype=torch.float64)) ** 2).sum(-1)
    return (d.argmin(1) == RARE).double().mean().item(), (d.min(1).values.sqrt() > 4 * STD).double().mean().item()


def run(n: int = 4000, steps: int = 30, train_steps: int = 1500) -> dict:
    sch, gm = VP.linear(), target()
    model = gm.model(sch, "eps")
    x0 = gm.sample(20000, torch.Generator().manual_seed(1))
    scores = minority.minority_score(x0, model, sch, 600, generator=torch.Generator().manual_seed(2))
    labels, _ = minority.minority_classes(scores, 10)
    rare = shares(x0)[0]
    by_class = [shares(x0[labels == k])[0] for k in range(10)]
    t0 = time.perf_counter()
    clf = minority.train_classifier(x0, labels, sch, 10, steps=train_steps)
    train_s = time.perf_counter() - t0

    def sample(scale: float, seed: int):
        z = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed))
        return ds.sample(model, z, steps, schedule=sch, guidance=minority.minority_guidance(clf, 9, scale))

    t0 = time.perf_counter()
    curve = [dict(scale=s, rare_share=r, off_share=o) for s in SCALES for r, o in [shares(sample(s, TEST_SEED))]]
    seconds = (time.perf_counter() - t0) / len(SCALES)
    chosen = []
    for want in TARGETS:
        lo, hi = 0.0, 8.0
        for _ in range(8):  # bisection on the tuning seed: the share grows with the scale
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if shares(sample(mid, TUNE_SEED))[0] < want else (lo, mid)
        scale = 0.5 * (lo + hi)
        got, off = shares(sample(scale, TEST_SEED))
        chosen.append(dict(target=want, scale=scale, rare_share=got, off_share=off,
                           stderr=math.sqrt(got * (1 - got) / n)))
    return dict(steps=steps, samples=n, exact_rare_share=WEIGHTS[RARE], data_rare_share=rare,
                rare_share_by_class=by_class, classifier_train_seconds=train_s, seconds_per_run=seconds,
                curve=curve, chosen=chosen)


INVERSE_NFES = (10, 25, 50, 100)


def inverse_run(n: int = 2000, dim: int = 8) -> dict:
    from diffsampler import inverse
    from diffsampler.guidance import Guidance, alpha_sigma_of
    from diffsampler.targets import sample_full_mixture, sliced_wasserstein

    sch, tau = VP.linear(), 0.1
    prior = GaussianMixture.random(dim=dim, modes=4, seed=2)
    model = prior.model(sch, "eps")
    x_true = prior.sample(1, torch.Generator().manual_seed(9))[0]
    z = torch.randn(n, dim, generator=torch.Generator().manual_seed(TEST_SEED), dtype=torch.float64)
    keep = torch.tensor([1, 0, 1, 0, 1, 1, 0, 1], dtype=torch.bool)
    ops = {"mask 5/8": inverse.mask(keep), "blur 3 taps": inverse.blur(torch.tensor([0.25, 0.5, 0.25]).double()),
           "downsample 2x": inverse.downsample(2)}
    out = {}
    for name, A in ops.items():
        M = A.matrix(dim)
        y = M @ x_true + tau * torch.randn(M.shape[0], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        w, mu, cov = prior.linear_posterior(M, y, tau)
        exact = sample_full_mixture(w, mu, cov, n, torch.Generator().manual_seed(4))
        floor = sliced_wasserstein(sample_full_mixture(w, mu, cov, n, torch.Generator().manual_seed(5)), exact)
        exact_g = Guidance.classifier(lambda x, t: prior.linear_likelihood(x, *alpha_sigma_of(sch, t), M, y, tau))
        rows = []
        for nfe in INVERSE_NFES:
            rows.append(dict(nfe=nfe, exact_likelihood=sliced_wasserstein(
                ds.sample(model, z, nfe, schedule=sch, guidance=exact_g), exact),
                first_order_tweedie=sliced_wasserstein(
                ds.sample(model, z, nfe, schedule=sch, guidance=inverse.first_order_tweedie(A, y, tau)), exact)))
        out[name] = dict(floor=floor, rows=rows)
    return dict(dim=dim, samples=n, noise_std=tau, operators=out)


def inverse_table(res: dict) -> str:
    lines = ["| operator | guidance | " + " | ".join(f"W2 @{n}" for n in INVERSE_NFES) + " | floor |",
             "|---|---|" + "---|" * (len(INVERSE_NFES) + 1)]
    for name, op in res["operators"].items():
        for key, label in (("exact_likelihood", "exact log p(y given x_t)"), ("first_order_tweedie", "first-order Tweedie")):
            lines.append(f"| {name} | {label} | " + " | ".join(f"{r[key]:.4f}" for r in op["rows"])
                         + f" | {op['floor']:.4f} |")
    return "\n".join(lines)


def table(res: dict) -> str:
    lines = ["| guidance scale | " + " | ".join(f"{r['scale']:g}" for r in res["curve"]) + " |",
             "|---|" + "---|" * len(res["curve"]),
             "| rare-mode share | " + " | ".join(f"{r['rare_share']:.3f}" for r in res["curve"]) + " |",
             "| off the data (> 4 std) | " + " | ".join(f"{r['off_share']:.3f}" for r in res["curve"]) + " |", "",
             "Scale chosen on tuning seeds for a target share, measured on others: "
             + "; ".join(f"target {c['target']:.2f}: scale {c['scale']:.2f} gives {c['rare_share']:.3f} "
                         f"(+- {2 * c['stderr']:.3f}), {c['off_share']:.3f} off the data" for c in res["chosen"]) + ".",
             "", f"Exact rare share {res['exact_rare_share']}; the rarest minority class holds "
             f"{res['rare_share_by_class'][-1]:.2f} rare-mode samples (the others <= "
             f"{max(res['rare_share_by_class'][:-1]):.3f})."]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = cli.parser("guidance", __doc__)
    ap.add_argument("--n", type=cli.positive_int, default=4000, help="samples per run")
    ap.add_argument("--out", default="bench/results", help="directory of the JSON and PNG ('' for none)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    machine = machine_record(torch.device("cpu"))
    res = run(n=args.n)
    print(table(res))
    inv = inverse_run()
    print(inverse_table(inv))
    if args.out:
        out = Path(args.out)
        path = write_json(out / f"guidance-{slug(machine['device'])}.json",
                          dict(benchmark="guidance", machine=machine, minority=res, inverse=inv))
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4.2))
        ax.plot([r["scale"] for r in res["curve"]], [r["rare_share"] for r in res["curve"]], marker="o",
                label="rare-mode share")
        ax.plot([r["scale"] for r in res["curve"]], [r["off_share"] for r in res["curve"]], marker="x", ls="--",
                label="off the data")
        ax.scatter([c["scale"] for c in res["chosen"]], [c["rare_share"] for c in res["chosen"]], color="k",
                   zorder=3, label="chosen for a target share (held-out seeds)")
        ax.axhline(res["exact_rare_share"], color="gray", ls=":", label="exact share")
        ax.set_xlabel("guidance scale")
        ax.set_ylabel("share of samples")
        ax.set_title("minority guidance toward the rarest class")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "guidance.png", dpi=110)
        print(f"wrote {path} and {out / 'guidance.png'}")
