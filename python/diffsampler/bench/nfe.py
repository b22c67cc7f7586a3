"""python -m diffsampler.bench nfe: error against NFE with and without the methods that cut model calls, on
targets with exact answers, on held-out seeds.

Part "mrs": mean-reverting restoration (IR-SDE's schedule, `schedules.MeanReverting()`): x0 = mu + r with the
residual r from a 16-D Gaussian mixture, so the model of x_t = mu + alpha_t r + sigma_t eps is exact and so is the
posterior p(x0 | mu). The MR Sampler (solver "mrs": ODE orders 1-3, SDE orders 1-2, the authors' linspace grid)
against IR-SDE's own Euler-Maruyama reverse SDE (its sampler, `em_ir_sde`) at each NFE: sliced W2 of 16000
samples to 16000 exact posterior samples (seeds the runs never see), and for the ODEs the relative error against a
1000-step third-order run from the same x_T.

Part "flow_sde": SiT's SDE samplers of a flow model (solver "flow_sde": diffusion forms, Euler-Maruyama and the
stochastic Heun, last steps) against the flow ODE solvers (flow_euler, flow_dpmpp_2m) at equal model calls
(`solvers.steps_for_nfe`), on the exact velocity of a 16-D, 8-mode Gaussian mixture: sliced W2 of 8000 samples to
8000 exact ones.

Part "dmcmc": Denoising Langevin Gibbs (`diffsampler.dmcmc.DLG`, exact denoiser and exact noise-level classifier
over 200 levels from 80 to 0.01) on an 8-D, 4-mode Gaussian mixture: per round each of 2000 persistent chains
takes n Langevin-Gibbs steps and is denoised by K steps of dpmpp_2m (k-diffusion's form on the VE grid) from its
own level; the round's NFE per sample counts the score calls (n + K) and the classifier calls (n). The chains
start once as the authors start them (a 20-step dpmpp_2m sample plus 0.5 noise, then 30 Langevin-Gibbs steps;
81 calls per chain, not counted in a round). Against dpmpp_2m and heun alone from sigma = 80 on the same Karras
grid: sliced W2 of each batch to 2000 exact samples (mean over 3 rounds for DLG). The same on the learned digits
score (its VP noise prediction as a VE denoiser, a trained noise-level classifier): Fréchet distance of 1000
samples to the held-out digits.

Part "usf": USF plans found by S3's search (solvers.usf.search) at NFE 4, 5, 6, 8 and 10 on the exact eps model of
Gaussian mixtures (8-D random, 2-D ring) under VP.linear(), fitted on 32 x_T and measured on held-out x_T the
search never saw: median relative ODE error against a 999-step DPM-Solver++(2M) run from the same x_T and sliced
W2 to exact samples, against the best fixed solver at the same NFE (DPM-Solver++ 2M / 3M, UniPC bh1 / bh2, DEIS,
LMS, GHVB, RES, PLMS, SA-Solver with tau 0, each on the default, Karras, uniform-logSNR sigmas and the trailing
grid), with the search's cost in model calls and the NFE the best
fixed solver needs to match the searched plan's error.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

import diffsampler as ds
from diffsampler.bench import cli
from diffsampler.bench.common import machine_record, slug, write_json
from diffsampler.schedules import MeanReverting
from diffsampler.targets import GaussianMixture, sliced_wasserstein

PARTS = ("mrs", "flow_sde", "dmcmc", "usf")
USF_NFES = (4, 5, 6, 8, 10)
FIXED_NFES = (4, 5, 6, 8, 10, 12, 15, 20, 25, 30)
MRS_NFES = (5, 10, 20, 50, 100)
EM_NFES = (5, 10, 20, 50, 100, 200, 500)
NOISE_SEED, EXACT_SEED, SDE_SEED = 0, 1, 2


def restoration_target(dim: int = 16):
    """(residual mixture, mu): 4 modes with means of about 0.5 per coordinate and stds 0.06-0.25 (HQ - LQ
    residuals of images in [0, 1], beside sigma_inf = 0.196), mu a fixed ramp in [-0.4, 0.5]."""
    g = GaussianMixture.random(dim=dim, modes=4, seed=1)
    return (GaussianMixture(g.weights, g.means * 0.5, g.stds * 1.25),
            torch.linspace(-0.4, 0.5, dim, dtype=torch.float64))


def eps_model(schedule: MeanReverting, residual: GaussianMixture, mu: torch.Tensor):
    """The exact noise prediction of x_t = mu + alpha_t r + sigma_t eps (float64)."""
    def model(x, t):
        a, s = schedule.alpha_sigma_at(t)
        y = x.double() - mu
        return ((y - a * residual.posterior_mean(y, a, s)) / s).to(x.dtype)

    return model


def em_ir_sde(model, z: torch.Tensor, mu: torch.Tensor, schedule: MeanReverting, nfe: int,
              generator: torch.Generator) -> torch.Tensor:
    """IR-SDE's sampler: Euler-Maruyama on the reverse SDE dx = [theta (mu - x) - g^2 score] dt + g dW,
    g^2 = 2 sigma_inf^2 theta, score = -eps / sigma_t, over nfe uniform steps from t = T to 0 (theta per unit t
    is constant on each (k - 1, k]), from x_T = mu + sigma_T z."""
    n = schedule.num_train_timesteps
    times = torch.linspace(n, 0, nfe + 1, dtype=torch.float64)
    x = mu + schedule.alpha_sigma(n)[1] * z
    for t, t_next in zip(times[:-1].tolist(), times[1:].tolist()):
        theta = float(schedule.thetas[min(n, math.ceil(t))])
        g2 = 2 * schedule.sigma_inf ** 2 * theta
        score = -model(x, torch.tensor(t, dtype=torch.float64)) / schedule.alpha_sigma(t)[1]
        dt = t - t_next
        x = x - (theta * (mu - x) - g2 * score) * dt
        x = x + math.sqrt(g2 * dt) * torch.randn(x.shape, generator=generator, dtype=torch.float64)
    return x


def mrs_part(n: int = 16000, dim: int = 16) -> dict:
    schedule = MeanReverting()
    residual, mu = restoration_target(dim)
    model = eps_model(schedule, residual, mu)
    z = torch.randn(n, dim, generator=torch.Generator().manual_seed(NOISE_SEED), dtype=torch.float64)
    exact = residual.sample(n, torch.Generator().manual_seed(EXACT_SEED)) + mu
    floor = sum(sliced_wasserstein(residual.sample(n, torch.Generator().manual_seed(EXACT_SEED + k)) + mu, exact)
                for k in (100, 101, 102)) / 3
    run = lambda nfe, **kw: ds.sample(model, z, nfe, solver="mrs", schedule=schedule, mu=mu,  # noqa: E731
                                      generator=torch.Generator().manual_seed(SDE_SEED), **kw)
    reference = run(1000, order=3)
    methods = {}
    for name, kw in (("MRS ODE 1", dict(order=1)), ("MRS ODE 2", dict(order=2)), ("MRS ODE 3", dict(order=3)),
                     ("MRS ODE 3, linear-lambda", dict(order=3, spacing="linear-lambda")),
                     ("MRS SDE 1", dict(order=1, sde=True)), ("MRS SDE 2", dict(order=2, sde=True))):
        rows = []
        for nfe in MRS_NFES:
            x = run(nfe, **kw)
            ode = None if kw.get("sde") else ((x - reference).norm() / reference.norm()).item()
            rows.append(dict(nfe=nfe, sliced_w2=sliced_wasserstein(x, exact), ode_error=ode))
        methods[name] = rows
    methods["IR-SDE Euler-Maruyama"] = [
        dict(nfe=nfe, sliced_w2=sliced_wasserstein(em_ir_sde(model, z, mu, schedule, nfe,
                                                             torch.Generator().manual_seed(SDE_SEED)), exact),
             ode_error=None) for nfe in EM_NFES]
    em = methods["IR-SDE Euler-Maruyama"]
    match = {name: {r["nfe"]: next((e["nfe"] for e in em if e["sliced_w2"] <= r["sliced_w2"]), None)
                    for r in rows if r["nfe"] in (10, 20)} for name, rows in methods.items() if name.startswith("MRS")}
    return dict(schedule=repr(schedule), dim=dim, samples=n, modes=len(residual.weights), floor=floor,
                methods=methods, em_nfe_to_match=match)


def usf_targets() -> dict:
    return {"gmm-8d": GaussianMixture.random(dim=8, modes=4, seed=1), "ring-2d": GaussianMixture.ring()}


FIXED_BASE = (("dpmpp_2m", "dpmpp_2m", {}), ("dpmpp_3m", "dpmpp_3m", {}), ("unipc bh1", "unipc", dict(variant="bh1")),
              ("unipc bh2", "unipc", dict(variant="bh2")), ("deis", "deis", {}), ("lms", "lms", {}),
              ("ghvb", "ghvb", {}), ("res_multistep", "res_multistep", {}),
              ("plms", "pndm", dict(skip_prk_steps=True)), ("sa_solver tau=0", "sa_solver", dict(tau=0.0)))
FIXED_GRIDS = (("", {}), (" karras", dict(sigmas="karras")), (" lu", dict(sigmas="lu")),
               (" trailing", dict(timestep_spacing="trailing")))
FIXED = [(label + suffix, name, dict(kw, **grid)) for label, name, kw in FIXED_BASE for suffix, grid in FIXED_GRIDS]


def fixed_runs(model, z, schedule, measure) -> dict:
    """{label: {nfe: measure(x)}} of every FIXED solver at each FIXED_NFES (as many steps as fit in nfe calls;
    a solver / grid without a plan of that many calls is left out there)."""
    from diffsampler.solvers import steps_for_nfe

    out = {}
    for label, name, kw in FIXED:
        rows = {}
        for nfe in FIXED_NFES:
            try:
                steps = steps_for_nfe(name, schedule, nfe, "eps", **kw)
            except ValueError:
                continue
            if len(ds.solvers.make_plan(name, schedule, steps, "eps", **kw).steps) == nfe:
                rows[nfe] = measure(ds.sample(model, z, steps, solver=name, schedule=schedule, **kw))
        out[label] = rows
    return out


def best_at(fixed: dict, nfe: int) -> float:
    return min(f[nfe]["ode_error"] for f in fixed.values() if nfe in f)


def usf_part(n: int = 16000, fit: int = 32, budget: int = 64) -> dict:
    from diffsampler.solvers import usf
    from diffsampler.solvers.usf_search import median_relative_error

    schedule = ds.schedules.VP.linear()
    out = {}
    for tname, target in usf_targets().items():
        model = target.model(schedule, "eps")
        x_fit = torch.randn(fit, target.dim, generator=torch.Generator().manual_seed(NOISE_SEED + 10),
                            dtype=torch.float64)
        z = torch.randn(n, target.dim, generator=torch.Generator().manual_seed(NOISE_SEED), dtype=torch.float64)
        exact = target.sample(n, torch.Generator().manual_seed(EXACT_SEED))
        reference = ds.sample(model, z, 999, solver="dpmpp_2m", schedule=schedule)
        measure = lambda x: dict(ode_error=median_relative_error(x, reference),  # noqa: E731
                                 sliced_w2=sliced_wasserstein(x, exact))
        fixed = fixed_runs(model, z, schedule, measure)
        rows = []
        for nfe in USF_NFES:
            t0 = time.perf_counter()
            plan, log = usf.search(model, x_fit, schedule, nfe, budget=budget, seed=0)
            seconds = time.perf_counter() - t0
            got = measure(ds.sample(model, z, solver=plan))
            best = min((k for k in fixed if nfe in fixed[k]), key=lambda k: fixed[k][nfe]["ode_error"])
            match = next((m for m in FIXED_NFES if best_at(fixed, m) <= got["ode_error"]), None)
            rows.append(dict(nfe=nfe, searched=got, best_fixed=best, fixed=fixed[best][nfe],
                             fixed_nfe_to_match=match, search_model_calls=log["model_calls"],
                             search_sample_evaluations=log["model_calls"] * fit, search_seconds=seconds,
                             evaluations=log["evaluations"], fit_metric=log["best_metric"],
                             plan=dict(timesteps=list(plan.grid.timesteps), afs=plan.afs,
                                       prediction=plan.steps[0].prediction,
                                       orders=[s.order for s in plan.steps],
                                       correctors=[s.corrector is not None for s in plan.steps])))
        out[tname] = dict(dim=target.dim, rows=rows, fit_samples=fit, budget=budget,
                          best_fixed_by_nfe={m: best_at(fixed, m) for m in FIXED_NFES})
    return dict(schedule=repr(schedule), samples=n, targets=out)


def usf_table(res: dict) -> str:
    lines = ["| target | NFE | searched ODE err | best fixed (ODE err) | searched W2 | fixed W2 | fixed NFE to match "
             "| search cost (model calls, x 32 samples) |", "|---|---|---|---|---|---|---|---|"]
    for tname, t in res["targets"].items():
        for r in t["rows"]:
            match = r["fixed_nfe_to_match"] or f"> {max(FIXED_NFES)}"
            lines.append(f"| {tname} | {r['nfe']} | {r['searched']['ode_error']:.4f} | {r['best_fixed']} "
                         f"({r['fixed']['ode_error']:.4f}) | {r['searched']['sliced_w2']:.4f} | "
                         f"{r['fixed']['sliced_w2']:.4f} | {match} | {r['search_model_calls']} |")
    lines += ["", "ODE error: median over held-out x_T of the relative error against a 999-step DPM-Solver++(2M) run "
              "from the same x_T; the search cost includes its 500-step reference on the fit samples."]
    return "\n".join(lines)


def usf_plot(ax, res: dict) -> None:
    for tname, t in res["targets"].items():
        rows = t["rows"]
        line = ax.plot([r["nfe"] for r in rows], [r["searched"]["ode_error"] for r in rows], marker="o",
                       label=f"{tname} USF searched")[0]
        fixed = t["best_fixed_by_nfe"]
        ax.plot([int(k) for k in fixed], list(fixed.values()), ls="--", color=line.get_color(),
                label=f"{tname} best fixed")
    ax.set_yscale("log")
    ax.set_xlabel("NFE")
    ax.set_ylabel("median relative ODE error (held-out x_T)")
    ax.set_title("USF search (S3) against the best fixed solver")
    ax.legend(fontsize=7)


FLOW_METHODS = {
    "flow_euler (ODE)": ("flow_euler", {}),
    "flow_dpmpp_2m (ODE)": ("flow_dpmpp_2m", {}),
    "SDE sigma, Euler-Maruyama": ("flow_sde", dict(diffusion="sigma")),
    "SDE sigma, EM, Tweedie last": ("flow_sde", dict(diffusion="sigma", last_step="tweedie")),
    "SDE sigma, Heun": ("flow_sde", dict(diffusion="sigma", method="heun")),
    "SDE sbdm (sample_eps 0.04), EM": ("flow_sde", dict(diffusion="sbdm", sample_eps=0.04)),
    "SDE decreasing, EM": ("flow_sde", dict(diffusion="decreasing")),
    "SDE increasing-decreasing, EM": ("flow_sde", dict(diffusion="increasing-decreasing")),
}
FLOW_NFES = (5, 10, 20, 50)


def flow_sde_part(n: int = 8000, dim: int = 16) -> dict:
    from diffsampler.schedules import Flow
    from diffsampler.solvers import steps_for_nfe

    target = GaussianMixture.random(dim=dim, modes=8, seed=3)
    velocity = target.flow_model()
    model = lambda x, t: velocity(x, t / 1000)  # noqa: E731  the Flow solvers' model time is 1000 t
    z = torch.randn(n, dim, generator=torch.Generator().manual_seed(NOISE_SEED), dtype=torch.float64)
    exact = target.sample(n, torch.Generator().manual_seed(EXACT_SEED))
    floor = sum(sliced_wasserstein(target.sample(n, torch.Generator().manual_seed(EXACT_SEED + k)), exact)
                for k in (100, 101, 102)) / 3
    methods = {}
    for name, (solver, kw) in FLOW_METHODS.items():
        rows = []
        for nfe in FLOW_NFES:
            steps = steps_for_nfe(solver, Flow(), nfe, "flow", **kw)
            x = ds.sample(model, z, steps, solver, Flow(), "flow", generator=torch.Generator().manual_seed(SDE_SEED),
                          **kw)
            rows.append(dict(nfe=nfe, steps=steps, sliced_w2=sliced_wasserstein(x, exact)))
        methods[name] = rows
    return dict(dim=dim, modes=8, samples=n, floor=floor, methods=methods)


def flow_table(res: dict) -> str:
    lines = ["| method | " + " | ".join(f"W2 @{n}" for n in FLOW_NFES) + " |", "|---|" + "---|" * len(FLOW_NFES)]
    for name, rows in res["methods"].items():
        lines.append(f"| {name} | " + " | ".join(f"{r['sliced_w2']:.4f}" for r in rows) + " |")
    lines += ["", f"Exact against independent exact samples (the estimator's floor, mean of 3): {res['floor']:.4f}."]
    return "\n".join(lines)


def w2_plot(ax, res: dict, title: str, ylabel: str, dashed: str) -> None:
    """Sliced W2 against NFE per method (log-log), the methods whose name holds `dashed` dashed, the floor dotted."""
    for name, rows in res["methods"].items():
        ax.plot([r["nfe"] for r in rows], [r["sliced_w2"] for r in rows], marker="o", label=name,
                ls="--" if dashed in name else "-")
    ax.axhline(res["floor"], color="gray", ls=":", label="exact vs exact")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("NFE")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)


def flow_plot(ax, res: dict) -> None:
    w2_plot(ax, res, f"flow SDE samplers, {res['dim']}-D mixture", "sliced W2 to exact samples", "ODE")


def table(res: dict) -> str:
    nfes = sorted({r["nfe"] for rows in res["methods"].values() for r in rows})
    lines = ["| method | " + " | ".join(f"W2 @{n}" for n in nfes) + " | Euler-Maruyama NFE to match @10, @20 |",
             "|---|" + "---|" * (len(nfes) + 1)]
    for name, rows in res["methods"].items():
        by = {r["nfe"]: r["sliced_w2"] for r in rows}
        match = res["em_nfe_to_match"].get(name)
        match = ", ".join(str(v) if v else f"> {max(nfes)}" for v in match.values()) if match else ""
        lines.append(f"| {name} | " + " | ".join(f"{by[n]:.4f}" if n in by else "" for n in nfes) + f" | {match} |")
    lines += ["", f"Exact against independent exact samples (the estimator's floor at this sample size, mean of 3): "
              f"{res['floor']:.4f}; differences below it are noise."]
    return "\n".join(lines)


def plot(ax, res: dict) -> None:
    w2_plot(ax, res, f"mean-reverting restoration, {res['dim']}-D", "sliced W2 to the exact posterior", "Euler")


DMCMC_ALONE_NFES = (3, 5, 8, 10, 15, 20, 30, 40)
DMCMC_CONFIGS = ((1, 2), (1, 3), (2, 3), (2, 5), (3, 5), (3, 8), (5, 8), (5, 10))  # (Langevin steps, K)
DMCMC_ETA, DMCMC_ROUNDS = 0.002, 3


def dmcmc_part(n: int = 2000, dim: int = 8) -> dict:
    from diffsampler import dmcmc
    from diffsampler.sample import run_plan

    target = GaussianMixture.random(dim=dim, modes=4, seed=0)
    model = lambda x, t: target.posterior_mean(x, 1.0, t).to(x.dtype)  # noqa: E731  D(x, sigma), VE
    sigmas = dmcmc.noise_levels(80.0, 0.01, 200)
    classifier = dmcmc.exact_classifier(target, sigmas)
    exact = target.sample(n, torch.Generator().manual_seed(EXACT_SEED))
    floor = sum(sliced_wasserstein(target.sample(n, torch.Generator().manual_seed(EXACT_SEED + k)), exact)
                for k in (100, 101, 102)) / 3
    z = torch.randn(n, dim, generator=torch.Generator().manual_seed(NOISE_SEED), dtype=torch.float64)

    def alone(solver: str, steps: int) -> tuple[torch.Tensor, int]:
        plan = dmcmc.denoise_plan(solver, dmcmc.denoise_grid(80.0, 0.01, steps, 7.0), "x0", {})
        return run_plan(model, 80.0 * z / plan.init_scale, plan), len(plan.steps)

    methods = {}
    for solver in ("dpmpp_2m", "heun"):
        rows = []
        for nfe in DMCMC_ALONE_NFES:
            x, calls = alone(solver, nfe if solver == "dpmpp_2m" else (nfe + 1) // 2)
            rows.append(dict(nfe=calls, score_calls=calls, classifier_calls=0, sliced_w2=sliced_wasserstein(x, exact)))
        methods[f"{solver} alone"] = rows
    start, _ = alone("dpmpp_2m", 20)
    start = start + 0.5 * torch.randn(n, dim, generator=torch.Generator().manual_seed(SDE_SEED), dtype=torch.float64)
    warm = dmcmc.DLG(model, classifier, sigmas, eta=DMCMC_ETA, generator=torch.Generator().manual_seed(SDE_SEED))
    warm.init(start)
    warm.langevin(30)
    def mode(x):  # each sample's most likely mixture component
        return target._noised_log_joint(x, torch.ones(()), torch.zeros(()))[0].argmax(1)

    rows = []
    for n_langevin, steps in DMCMC_CONFIGS:
        dlg = dmcmc.DLG(model, classifier, sigmas, eta=DMCMC_ETA, n_langevin=n_langevin, solver="dpmpp_2m",
                        steps=steps, generator=torch.Generator().manual_seed(SDE_SEED + 1))
        dlg.init(warm.x, warm.level)
        w2, modes = [], []
        for _ in range(DMCMC_ROUNDS):
            x0, nfe = dlg.sample()
            w2.append(sliced_wasserstein(x0, exact))
            modes.append(mode(x0))
        rows.append(dict(nfe=nfe.total, score_calls=nfe.score, classifier_calls=nfe.classifier, langevin=n_langevin,
                         steps=steps, sliced_w2=sum(w2) / len(w2), rounds=w2,
                         median_level_sigma=sigmas[int(dlg.level.median())],
                         mode_changed=(modes[-1] != modes[0]).double().mean().item()))
    methods["DLG + dpmpp_2m"] = rows
    return dict(dim=dim, modes=4, samples=n, levels=len(sigmas), eta=DMCMC_ETA, warmup_calls=20 + 1 + 2 * 30,
                floor=floor, methods=methods, digits=dmcmc_digits(min(n, 1000)))


def dmcmc_digits(n: int) -> dict:
    """DLG on the learned digits score (diffsampler.digits' VP noise prediction as a VE denoiser,
    dmcmc.vp_denoiser) with a trained noise-level classifier (dmcmc.train_noise_classifier, 200 levels from 80
    to 0.02): Fréchet distance of each batch of n to the held-out digits."""
    from diffsampler import digits, dmcmc
    from diffsampler.sample import run_plan

    net = digits.denoiser()
    model = dmcmc.vp_denoiser(net, net.schedule)
    split = digits.load_digits()
    sigmas = dmcmc.noise_levels(80.0, 0.02, 200)
    levels = dmcmc.train_noise_classifier(split.train_x, sigmas, iters=2000)
    classifier = lambda x: levels(x).detach()  # noqa: E731
    z = torch.randn(n, digits.PIXELS, generator=torch.Generator().manual_seed(NOISE_SEED))
    fd = lambda x: digits.frechet_distance(x.float(), split.held_x)  # noqa: E731

    def alone(steps: int):
        plan = dmcmc.denoise_plan("dpmpp_2m", dmcmc.denoise_grid(80.0, 0.015, steps, 7.0), "x0", {})
        with torch.no_grad():
            return run_plan(model, 80.0 * z / plan.init_scale, plan, check_nan=False)

    methods = {"dpmpp_2m alone": [dict(nfe=k, score_calls=k, classifier_calls=0, fd=fd(alone(k)))
                                  for k in DMCMC_ALONE_NFES]}
    start = alone(20) + 0.5 * torch.randn(n, digits.PIXELS, generator=torch.Generator().manual_seed(SDE_SEED))
    rows = []
    with torch.no_grad():
        warm = dmcmc.DLG(model, classifier, sigmas, eta=DMCMC_ETA, generator=torch.Generator().manual_seed(SDE_SEED))
        warm.init(start)
        warm.langevin(30)
        for n_langevin, steps in DMCMC_CONFIGS:
            dlg = dmcmc.DLG(model, classifier, sigmas, eta=DMCMC_ETA, n_langevin=n_langevin, solver="dpmpp_2m",
                            steps=steps, sigma_min=0.015, generator=torch.Generator().manual_seed(SDE_SEED + 1))
            dlg.init(warm.x, warm.level)
            scores = []
            for _ in range(DMCMC_ROUNDS):
                x0, nfe = dlg.sample()
                scores.append(fd(x0))
            rows.append(dict(nfe=nfe.total, score_calls=nfe.score, classifier_calls=nfe.classifier,
                             langevin=n_langevin, steps=steps, fd=sum(scores) / len(scores), rounds=scores,
                             median_level_sigma=sigmas[int(dlg.level.median())]))
    methods["DLG + dpmpp_2m"] = rows
    floor = fd(split.train_x[:n])
    return dict(samples=n, floor=floor, methods=methods)


def dmcmc_table(res: dict) -> str:
    lines = ["| method | Langevin steps n | denoising K | NFE per sample (score + classifier) | sliced W2 | "
             "median chain sigma | chains changing mode, first to last round |", "|---|---|---|---|---|---|---|"]
    for name, rows in res["methods"].items():
        for r in rows:
            sigma = f"{r['median_level_sigma']:.3f}" if "median_level_sigma" in r else ""
            moved = f"{100 * r['mode_changed']:.1f} %" if "mode_changed" in r else ""
            lines.append(f"| {name} | {r.get('langevin', '')} | {r.get('steps', '')} | {r['nfe']} "
                         f"({r['score_calls']} + {r['classifier_calls']}) | {r['sliced_w2']:.4f} | {sigma} | {moved} |")
    lines += ["", f"Exact against independent exact samples (the estimator's floor, mean of 3): {res['floor']:.4f}. "
              f"DLG's chains cost {res['warmup_calls']} calls each once (their start), not counted per round; "
              f"Langevin eta = {res['eta']}, {res['levels']} levels. The last column: the fraction of chains whose "
              f"last round's sample lies in another mixture component than their first round's ({DMCMC_ROUNDS} "
              "rounds): how far the chains travel."]
    if "digits" in res:
        dg = res["digits"]
        lines += ["", f"Learned digits (Fréchet distance of {dg['samples']} samples to the held-out digits; the "
                  "digits' VP noise prediction as a VE denoiser, a trained noise-level classifier):", "",
                  "| method | Langevin steps n | denoising K | NFE per sample (score + classifier) | FD |",
                  "|---|---|---|---|---|"]
        for name, rows in dg["methods"].items():
            for r in rows:
                lines.append(f"| {name} | {r.get('langevin', '')} | {r.get('steps', '')} | {r['nfe']} "
                             f"({r['score_calls']} + {r['classifier_calls']}) | {r['fd']:.2f} |")
        lines += ["", f"{dg['samples']} training digits against the held-out ones (the metric's floor): "
                  f"{dg['floor']:.2f}."]
    return "\n".join(lines)


def dmcmc_plot(ax, res: dict) -> None:
    for name, rows in res["methods"].items():
        rows = sorted(rows, key=lambda r: r["nfe"])
        ax.plot([r["nfe"] for r in rows], [r["sliced_w2"] for r in rows], marker="o", label=name,
                ls="-" if name.startswith("DLG") else "--")
    ax.axhline(res["floor"], color="gray", ls=":", label="exact vs exact")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("NFE per sample (score + classifier calls)")
    ax.set_ylabel("sliced W2 to exact samples")
    ax.set_title(f"Denoising MCMC, {res['dim']}-D mixture")
    ax.legend(fontsize=7)


TABLES = {"mrs": table, "flow_sde": flow_table, "dmcmc": dmcmc_table, "usf": usf_table}
PLOTS = {"mrs": plot, "flow_sde": flow_plot, "dmcmc": dmcmc_plot, "usf": usf_plot}
RUNS = {"mrs": mrs_part, "flow_sde": flow_sde_part, "dmcmc": dmcmc_part, "usf": usf_part}


def main(argv=None) -> None:
    ap = cli.parser("nfe", __doc__)
    ap.add_argument("--parts", type=cli.listed(cli.choice(PARTS, "part")), default=",".join(PARTS))
    ap.add_argument("--n", type=cli.positive_int, default=None, help="samples per run (default: each part's)")
    ap.add_argument("--out", default="bench/results", help="directory of the JSON and PNG ('' for none)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    machine = machine_record(torch.device("cpu"))
    results = {}
    for part in args.parts:
        t0 = time.perf_counter()
        results[part] = RUNS[part](**({} if args.n is None else dict(n=args.n)))
        print(f"{part} ({time.perf_counter() - t0:.0f} s)\n{TABLES[part](results[part])}", flush=True)
    if args.out:
        import json

        out = Path(args.out)
        path = out / f"nfe-{slug(machine['device'])}.json"
        payload = json.loads(path.read_text()) if path.exists() else {}
        payload.update(benchmark="nfe", machine=machine, note=__doc__.strip().splitlines()[0])
        payload.setdefault("results", {}).update(results)
        write_json(path, payload)
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        parts = payload["results"]
        fig, axes = plt.subplots(1, len(parts), figsize=(6 * len(parts), 4.5), squeeze=False)
        for ax, part in zip(axes[0], parts):
            PLOTS[part](ax, parts[part])
        fig.tight_layout()
        fig.savefig(out / "nfe.png", dpi=110)
        print(f"wrote {path} and {out / 'nfe.png'}")
