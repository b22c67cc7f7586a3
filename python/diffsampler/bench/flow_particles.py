"""Part (c) of `python -m diffsampler.bench smc`: flow particle sampling (diffsampler.flow_smc) with a reward
whose optimum is known, on an exact flow model (GaussianMixture.flow_model).

Target: 8 modes in 8-D (std 0.3), one of them rare (weight 3%); reward r(x) = -|x - mu_rare|^2, optimum 0 at the
rare mode's centre. Per NFE budget (model calls per output): the mean reward of G outputs and its gap to 0, for
Best-of-N over ODE and SDE samples, SMC and Rollover Budget Forcing on the linear and the VP path. All runs take
20 steps (20 NFE per full sample); the VP runs use the "matched" grid (uniform in r down to the linear grid's last
noise level), so that every method's output is the Tweedie estimate at the same noise level t = 0.05 (the uniform
r grid ends at t = 0.15, whose blurrier outputs sit nearer the mode centre, which this reward favours). Settings
(diffusion c in gamma = c t^2, SMC temperature, RBF's initial share) are chosen at one budget on tuning seeds, then
every budget is measured on other seeds. SMC returns the particle of the largest reward (select="max"), like
Best-of-N.
"""

from __future__ import annotations

import itertools
import math
import time

import torch

from diffsampler import flow_smc
from diffsampler.targets import GaussianMixture

STEPS = 20
BUDGETS = (40, 80, 160, 320, 640)
TUNE_BUDGET = 160
TUNE_SEED, TEST_SEED = 1000, 0
DIFFUSIONS = (1.0, 3.0, 6.0, 10.0, 20.0)  # gamma = diffusion t^2; the paper's code uses 3


def rare_mode_target() -> tuple[GaussianMixture, torch.Tensor]:
    """8 modes in 8-D (means N(0, 0.9^2 I), std 0.3); mode 0 has weight 0.03, the others equal."""
    gen = torch.Generator().manual_seed(7)
    means = torch.randn(8, 8, generator=gen, dtype=torch.float64) * 0.9
    weights = torch.tensor([0.03] + [0.97 / 7] * 7, dtype=torch.float64)
    return GaussianMixture(weights, means, torch.full((8,), 0.3, dtype=torch.float64)), means[0]


def reward_fn(centre: torch.Tensor):
    c = centre.float()
    return lambda x0: -((x0.float() - c) ** 2).sum(1)


def _method_runs(model, reward, dim: int):
    """name -> (run(budget, groups, seed, **setting) -> rewards (G,), tuning grid of settings)."""
    gen = lambda seed: torch.Generator().manual_seed(seed)  # noqa: E731
    k = lambda budget: max(1, budget // STEPS)  # noqa: E731  particles per output

    def bon(diffusion_default):
        def run(budget, G, seed, diffusion=diffusion_default):
            return flow_smc.best_of_n(model, reward, G, k(budget), (dim,), steps=STEPS, diffusion=diffusion,
                                      generator=gen(seed)).rewards
        return run

    def smc(path):
        def run(budget, G, seed, diffusion=3.0, temperature=1.0):
            return flow_smc.smc(model, reward, G, k(budget), (dim,), steps=STEPS, path=path, diffusion=diffusion,
                                temperature=temperature, select="max", spacing="matched", generator=gen(seed)).rewards
        return run

    def rbf(path):
        def run(budget, G, seed, diffusion=3.0, initial_share=0.1):
            return flow_smc.rollover_budget_forcing(model, reward, G, budget, (dim,), steps=STEPS,
                                                    initial=max(1, int(budget * initial_share)), path=path,
                                                    diffusion=diffusion, spacing="matched", generator=gen(seed)).rewards
        return run

    grid = lambda **axes: [dict(zip(axes, v)) for v in itertools.product(*axes.values())]  # noqa: E731
    scales = DIFFUSIONS
    return {
        "BoN ODE": (bon(0.0), [{}]),
        "BoN SDE": (bon(3.0), grid(diffusion=scales)),
        "SMC linear": (smc("linear"), grid(diffusion=scales, temperature=(0.1, 0.3, 1.0))),
        "SMC VP": (smc("vp"), grid(diffusion=scales, temperature=(0.1, 0.3, 1.0))),
        "RBF linear": (rbf("linear"), grid(diffusion=scales, initial_share=(0.0, 0.1))),
        "RBF VP": (rbf("vp"), grid(diffusion=scales, initial_share=(0.0, 0.1))),
    }


def run(groups: int = 512, tune_groups: int = 128, budgets=BUDGETS, tune_budget: int = TUNE_BUDGET) -> dict:
    target, centre = rare_mode_target()
    model, reward = target.flow_model(), reward_fn(centre)
    dim = target.dim
    plain = flow_smc.sample(model, groups, (dim,), steps=STEPS, generator=torch.Generator().manual_seed(TEST_SEED))
    base = reward(plain)
    out = dict(dim=dim, modes=len(target.weights), rare_weight=target.weights[0].item(), std=0.3, steps=STEPS,
               groups=groups, tune_groups=tune_groups, tune_budget=tune_budget, tune_seed=TUNE_SEED,
               test_seed=TEST_SEED, optimum=0.0, single_sample=dict(mean=base.mean().item(), nfe=STEPS),
               methods={})
    print(f"(c) flow particles: {dim}-D, {len(target.weights)} modes, reward -|x - mu_rare|^2 (optimum 0, rare mode "
          f"weight {target.weights[0].item():.2f}); one ODE sample: mean reward {base.mean().item():.3f}", flush=True)
    for name, (fn, settings) in _method_runs(model, reward, dim).items():
        t0 = time.perf_counter()
        tuned = [(fn(tune_budget, tune_groups, TUNE_SEED, **s).mean().item(), s) for s in settings]
        best_score, best = max(tuned, key=lambda v: v[0])
        rows = []
        for budget in budgets:
            r = fn(budget, groups, TEST_SEED, **best).double()
            rows.append(dict(nfe=budget, mean=r.mean().item(), gap=-r.mean().item(),
                             stderr=(r.std() / math.sqrt(groups)).item()))
        out["methods"][name] = dict(setting=best, tuning=[dict(setting=s, mean=m) for m, s in tuned], rows=rows,
                                    seconds=time.perf_counter() - t0)
        print(f"  {name:<10} {best}: mean reward " + ", ".join(f"{r['nfe']} NFE {r['mean']:.3f}" for r in rows)
              + f" ({out['methods'][name]['seconds']:.0f} s)", flush=True)
    return out


def plot(ax, res: dict) -> None:
    for name, m in res["methods"].items():
        nfe = [r["nfe"] for r in m["rows"]]
        ax.errorbar(nfe, [r["gap"] for r in m["rows"]], yerr=[2 * r["stderr"] for r in m["rows"]], marker="o",
                    capsize=2, label=name)
    ax.axhline(-res["single_sample"]["mean"], color="gray", ls=":", label=f"one sample ({res['steps']} NFE)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("NFE per output")
    ax.set_ylabel("gap to the optimal reward (mean over outputs)")
    ax.set_title(f"flow particles: rare mode in {res['dim']}-D, {res['groups']} outputs")
    ax.legend(fontsize=8)
