"""S3 (Liu et al. 2023): predictor-based evolutionary search of USF plans at a fixed number of model calls.

A candidate (Genome) is the plan's prediction type, the analytical first step, the interior time points (lambda
values, rounded to training timesteps of a discrete VP schedule; the grid runs from its largest timestep to
sigma = 0) and per step: Taylor order, the number of points of the first derivative (1 or order - 1), its
relaxation and coefficient, and the corrector (None or the relaxation of its first derivative). Each generation
mutates / crosses over the best evaluated candidates (the paper's operators: time points, orders, derivative
points, linear relaxation coefficients, correctors, prediction type, afs), ranks the children by a ridge
regression of log metric on a fixed encoding (refit on every evaluated candidate) and evaluates only the
predicted-best few on the fit samples.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace

import numpy as np
import torch

from .. import checks
from ..schedules import VP
from .grid import Grid
from .usf import RELAXATIONS, Derivative, Plan, StepSpec, dpmpp_2m, dpmpp_3m, unipc

ORDERS = {1: 0.2, 2: 0.4, 3: 0.3, 4: 0.1}  # the paper's Taylor order proposal (configs/evo_search.yml)
FEATURE_STEPS = 12  # steps encoded per candidate (longer plans are cut)


@dataclass(frozen=True)
class Gene:
    """One step: Taylor order, first-derivative points (1 or order - 1), its relaxation and coefficient, and
    the corrector: None or the relaxation of the pseudo corrector's first derivative."""

    order: int
    d1_points: int
    relaxation: str = "none"
    coefficient: float = 0.0
    corrector: str | None = None


@dataclass(frozen=True)
class Genome:
    kind: str  # "x0" | "eps"
    afs: bool
    lams: tuple[float, ...]  # the interior grid points' lambda, decreasing noise (increasing lambda)
    genes: tuple[Gene, ...]


def gene_spec(gene: Gene, kind: str) -> StepSpec:
    """The StepSpec of a gene (the derivatives after the first use the order - 1 previous points)."""
    k = gene.order
    ders = []
    for n in range(1, k):
        count = gene.d1_points if n == 1 else k - 1
        ders.append(Derivative(tuple(range(-2, -count - 2, -1)), gene.relaxation if n == 1 else "none",
                               gene.coefficient if n == 1 and gene.relaxation == "linear" else 0.0))
    spec = StepSpec(k, kind, tuple(ders))
    if gene.corrector is None:
        return spec
    fix = spec.pseudo_corrector()
    first = replace(fix.derivatives[0], relaxation=gene.corrector)
    return replace(spec, corrector=StepSpec(fix.order, kind, (first,) + fix.derivatives[1:], start=-2))


class Space:
    """The search space on a discrete VP schedule at `nfe` model calls."""

    def __init__(self, schedule: VP, nfe: int):
        self.schedule, self.nfe = schedule, nfe
        n = schedule.num_train_timesteps
        self.t_lams = np.array([-math.log(schedule.sigma_ratio(t)) for t in range(n)])  # decreasing in t
        self.lam_start = self.t_lams[-1]

    def timestep(self, lam: float) -> int:
        """The training timestep whose lambda is nearest."""
        return int(np.argmin(np.abs(self.t_lams - lam)))

    def grid(self, g: Genome) -> Grid | None:
        ts = [self.schedule.num_train_timesteps - 1] + [self.timestep(v) for v in g.lams]
        if any(b >= a for a, b in zip(ts, ts[1:])):
            return None
        sigmas = [float(np.float32(self.schedule.sigma_ratio(t))) for t in ts] + [0.0]
        return Grid(timesteps=tuple(ts), sigmas=tuple(sigmas))

    def plan(self, g: Genome) -> Plan | None:
        """The Plan of a genome, or None where it breaks a constraint (repeated timesteps, > 3 reads, ...)."""
        grid = self.grid(g)
        if grid is None:
            return None
        try:
            return Plan(tuple(gene_spec(x, g.kind) for x in g.genes), grid, g.afs, name="usf searched")
        except ValueError:
            return None

    def genome(self, plan: Plan) -> Genome:
        """The genome of a plan on this schedule's grid (the presets of the initial population)."""
        genes = []
        for s in plan.steps:
            d1 = s.derivatives[0] if s.derivatives else None
            corrector = None if s.corrector is None else s.corrector.derivatives[0].relaxation
            genes.append(Gene(s.order, len(d1.points) if d1 else 0, d1.relaxation if d1 else "none",
                              d1.coefficient if d1 else 0.0, corrector))
        lams = tuple(plan.grid.lam(i) for i in range(1, len(plan.grid)))
        return Genome(plan.steps[0].prediction, plan.afs, lams, tuple(genes))

    def fix(self, g: Genome) -> Genome:
        """Orders capped by the history (min(order, i + 1)), 1 on the step to sigma = 0 and after afs; d1 points
        within 1..order - 1; no corrector on the last step."""
        genes, n = [], len(g.genes)
        for i, x in enumerate(g.genes):
            k = 1 if i == n - 1 or (g.afs and i == 0) else min(x.order, i + 1)
            d1 = 0 if k == 1 else min(max(x.d1_points, 1), k - 1)
            genes.append(Gene(k, d1, x.relaxation if k > 1 else "none", x.coefficient if k > 1 else 0.0,
                              x.corrector if i < n - 1 else None))
        return replace(g, lams=tuple(sorted(g.lams)), genes=tuple(genes))

    def random_gene(self, rng: random.Random, i: int) -> Gene:
        k = min(_pick(rng, ORDERS), i + 1)
        return Gene(k, rng.choice([1, k - 1]) if k > 1 else 0, "linear" if k > 1 else "none", 0.0,
                    rng.choice([None, "none"]))

    def mutate(self, g: Genome, rng: random.Random) -> Genome:
        """The paper's mutation: each time point with prob 0.3 (a Gaussian move in lambda), each step's order,
        derivative points, relaxation coefficient and corrector with prob 0.3, prediction type and afs with
        prob 0.1 (afs toggles a time point so the model calls stay nfe)."""
        lams = list(g.lams)
        span = (self.t_lams[0] - self.lam_start) / (len(lams) + 2)
        lams = [v + rng.gauss(0, 0.3 * span) if rng.random() < 0.3 else v for v in lams]
        genes = list(g.genes)
        for i, x in enumerate(genes):
            if rng.random() < 0.3:
                k = _pick(rng, ORDERS)
                x = Gene(k, k - 1, x.relaxation, x.coefficient, x.corrector)
            if x.order > 1 and rng.random() < 0.3:
                x = replace(x, d1_points=rng.choice([1, x.order - 1]))
            if x.order > 1 and rng.random() < 0.3:
                if rng.random() < 0.5:
                    x = replace(x, relaxation="linear", coefficient=x.coefficient + rng.gauss(0, 0.1)
                                if x.relaxation == "linear" else rng.gauss(0, 0.1))
                else:
                    x = replace(x, relaxation=rng.choice(RELAXATIONS[:-1]), coefficient=0.0)
            if rng.random() < 0.3:
                x = replace(x, corrector=rng.choice([None, "none", "unipc-bh1", "unipc-bh2"]))
            genes[i] = x
        kind = ("eps" if g.kind == "x0" else "x0") if rng.random() < 0.1 else g.kind
        afs = g.afs
        if rng.random() < 0.1:
            afs = not afs
            if afs:  # one more step: a point between the first two
                first = lams[0] if lams else self.t_lams[0]
                lams.insert(0, 0.5 * (self.lam_start + first))
                genes.insert(1, self.random_gene(rng, 1))
            elif len(lams) > 0:
                lams.pop(0)
                genes.pop(1)
        return self.fix(Genome(kind, afs, tuple(lams), tuple(genes)))

    def crossover(self, a: Genome, b: Genome, rng: random.Random) -> Genome:
        """Per step, the gene of either parent; the time points, prediction type and afs of one of them."""
        if len(a.genes) != len(b.genes) or a.afs != b.afs:
            return a
        genes = tuple(x if rng.random() < 0.5 else y for x, y in zip(a.genes, b.genes))
        base = a if rng.random() < 0.5 else b
        return self.fix(replace(base, genes=genes))

    def encode(self, g: Genome) -> np.ndarray:
        """A fixed-length encoding: prediction type, afs, then per step (up to FEATURE_STEPS) the normalised
        lambda of its start point, order one-hot, d1 points, relaxation one-hot, coefficient, corrector flags."""
        lo, hi = self.lam_start, self.t_lams[0]
        out = [float(g.kind == "eps"), float(g.afs)]
        starts = [lo] + list(g.lams)
        for i in range(FEATURE_STEPS):
            if i < len(g.genes):
                x = g.genes[i]
                out += [(starts[i] - lo) / (hi - lo)] + [float(x.order == k) for k in (1, 2, 3, 4)]
                out += [float(x.d1_points)] + [float(x.relaxation == r) for r in RELAXATIONS] + [x.coefficient]
                out += [float(x.corrector is not None), float(x.corrector not in (None, "none"))]
            else:
                out += [0.0] * (9 + len(RELAXATIONS))
        return np.array(out)


def eps_taylor(plan: Plan) -> Plan:
    """The plan's orders as plain Taylor steps of the noise prediction on its grid (DEIS, landing on sigma = 0)."""
    specs = tuple(StepSpec(s.order, "eps", tuple(Derivative(tuple(range(-2, -s.order - 1, -1)))
                                                 for _ in range(s.order - 1))) for s in plan.steps)
    return Plan(specs, plan.grid, name="usf eps taylor")


def _pick(rng: random.Random, probs: dict):
    u, total = rng.random(), 0.0
    for key, p in probs.items():
        total += p
        if u < total:
            return key
    return key


def ridge(features: np.ndarray, targets: np.ndarray, penalty: float = 1e-2):
    """predict(F) of the ridge regression of targets on [1, features] (closed form)."""
    mean, scale = features.mean(0), features.std(0) + 1e-9
    z = np.hstack([np.ones((len(features), 1)), (features - mean) / scale])
    reg = penalty * np.eye(z.shape[1])
    reg[0, 0] = 0.0
    w = np.linalg.solve(z.T @ z + reg, z.T @ targets)
    return lambda f: np.hstack([np.ones((len(f), 1)), (f - mean) / scale]) @ w


def median_relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """The median over samples of ||x - ref|| / ||ref|| (per sample, flattened)."""
    x, ref = x.double().flatten(1), ref.double().flatten(1)
    return float(((x - ref).norm(dim=1) / ref.norm(dim=1)).median())


def search(model, x_fit: torch.Tensor, schedule: VP, nfe: int, budget: int = 64, metric=None, seed: int = 0, *,
           prediction: str = "eps", reference_steps: int = 500, children: int = 64, evaluate: int = 4,
           parents: int = 8, backend: str = "auto"):
    """S3's search: (the best Plan found, its log). See the module docstring.

    budget: the number of candidate plans evaluated on x_fit (each costs nfe model calls on the batch);
    metric(x, ref) -> float (lower is better; default median_relative_error) against a reference_steps-step
    DPM-Solver++(2M) run from the same x_fit. The log: one entry per evaluation (generation, plan, metric,
    predicted log metric, model calls spent so far, reference included) and the totals."""
    if not isinstance(schedule, VP):
        raise ValueError(f"schedule must be a discrete diffsampler.schedules.VP, got {type(schedule).__name__}")
    checks.model(model)
    checks.sample_tensor(x_fit, "x_fit")
    nfe = checks.integer("nfe", nfe, 2, 50)
    budget = checks.integer("budget", budget, 1)
    seed = checks.integer("seed", seed)
    reference_steps = checks.integer("reference_steps", reference_steps, nfe, schedule.num_train_timesteps - 1)
    children = checks.integer("children", children, 1)
    evaluate = checks.integer("evaluate", evaluate, 1)
    parents = checks.integer("parents", parents, 1)
    if metric is not None and not callable(metric):
        raise ValueError(f"metric must be None or a callable metric(x, ref) -> float, got {metric!r}")
    metric = median_relative_error if metric is None else metric
    from ..sample import sample

    calls = [0]

    def counted(x, t):
        calls[0] += 1
        return model(x, t)

    ref = sample(counted, x_fit, reference_steps, solver="dpmpp_2m", schedule=schedule, prediction=prediction,
                 backend=backend)
    space = Space(schedule, nfe)
    rng = random.Random(seed)
    archive: dict[Genome, float] = {}
    log = []

    def run(g: Genome, generation: int, predicted: float | None) -> None:
        plan = space.plan(g)
        x = sample(counted, x_fit, solver=plan, prediction=prediction, backend=backend)
        value = float(metric(x, ref))
        archive[g] = value if math.isfinite(value) else math.inf
        log.append(dict(generation=generation, metric=archive[g], predicted=predicted, model_calls=calls[0],
                        plan=plan))

    start = [p for sigmas in ("default", "lu", "karras") for p in (
        dpmpp_2m(nfe, schedule, sigmas=sigmas), dpmpp_3m(nfe, schedule, sigmas=sigmas),
        unipc(nfe, "bh1", schedule=schedule, sigmas=sigmas), unipc(nfe, "bh2", schedule=schedule, sigmas=sigmas),
        eps_taylor(dpmpp_2m(nfe, schedule, sigmas=sigmas)), eps_taylor(dpmpp_3m(nfe, schedule, sigmas=sigmas)))]
    seeds = [space.fix(space.genome(p)) for p in start]
    while len(seeds) < len(start) + parents:  # the presets and mutants of them
        seeds.append(space.mutate(rng.choice(seeds[:len(start)]), rng))
    for g in seeds:
        if len(archive) < budget and g not in archive and space.plan(g) is not None:
            run(g, 0, None)
    generation = 0
    while len(archive) < budget:
        generation += 1
        ranked = sorted(archive, key=archive.get)
        pool = ranked[:parents]
        kids = []
        for _ in range(children * 4):
            if len(kids) >= children:
                break
            g = space.mutate(rng.choice(pool), rng)
            if rng.random() < 0.3:
                g = space.crossover(g, rng.choice(pool), rng)
            if g not in archive and g not in kids and space.plan(g) is not None:
                kids.append(g)
        if not kids:
            break
        seen = [g for g in archive if math.isfinite(archive[g])]
        predict = ridge(np.stack([space.encode(g) for g in seen]), np.log([archive[g] for g in seen]))
        scores = predict(np.stack([space.encode(g) for g in kids]))
        for j in np.argsort(scores)[:min(evaluate, budget - len(archive))]:
            run(kids[j], generation, float(scores[j]))
    best = min(archive, key=archive.get)
    plan = space.plan(best)
    summary = dict(evaluations=len(archive), generations=generation, model_calls=calls[0],
                   reference_calls=reference_steps, best_metric=archive[best], nfe=plan.nfe)
    return plan, dict(entries=log, **summary)
