"""USF (Liu et al. 2023, "A Unified Sampling Framework for Solver Searching of Diffusion Probabilistic Models"):
a per-step solver plan of exponential-integrator Taylor steps, as one fused update per model call.

With lambda = log(alpha / sigma), h = lambda_t - lambda_s and phi_k(z) = int_0^1 e^{(1-u) z} u^{k-1}/(k-1)! du,
a step of Taylor order K from the start point s to t integrates the data (x0) or noise (eps) prediction m:

    x0:   x_t = (sigma_t / sigma_s) x_s + alpha_t sum_{n<K} h^{n+1} phi_{n+1}(-h) D_n
    eps:  x_t = (alpha_t / alpha_s) x_s - sigma_t sum_{n<K} h^{n+1} phi_{n+1}(h) D_n

with D_0 = m_s and D_n (n >= 1) the n-th lambda-derivative of m at s estimated from history points j:
D_n = sum_j w_j (m_j - m_s), where w solves sum_j w_j (lambda_j - lambda_s)^i / i! = [i == n], i = 1..|points|.
D_1 may be relaxed (multiplied) by rho(hr), hr = -h for x0 and h for eps:
    dpmsolver-2, unipc-bh2: hr (e^hr - 1) / (2 (e^hr - 1 - hr));  unipc-bh1: hr^2 / (2 (e^hr - 1 - hr));
    linear: 1 + coefficient h.
A "pseudo" corrector redoes the step s -> t once the model has been called at t (start point -2, the point
before; point -1, the new model output, among every derivative's points), without another model call; the
stored predictions stay those of the uncorrected sample. Everything is linear in (x, out, the history of m, the
last corrected sample), so a plan is host-side float64 coefficients of ops.multistep_update (solvers.plan.Plan).

Points are numbered as in USF's lists: -1 is the newest model call (the predictor's start), -2 the one before.
Supported: multistep steps (start -1), pseudo correctors (start -2), one prediction type ("x0" or "eps") per
plan, the analytical first step (afs: x0 = 0 at the first point, no model call there). Refused with a
ValueError: other start points (singlestep), the implicit corrector, DPM-Solver-v3's prediction, a corrector on
the last step (it would need a model call at the final time) and more than 3 history reads per fused update.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .. import checks
from ..models import data_coeffs, noise_coeffs
from ..ops import MAX_HISTORY_READS, StateRow, UpdateCoeffs
from ..schedules import VP
from . import plan as solver_plan
from .grid import Grid, multistep_grid

PREDICTIONS = ("x0", "eps")
RELAXATIONS = ("none", "dpmsolver-2", "unipc-bh1", "unipc-bh2", "linear")
CORRECTORS = ("none", "pseudo")
REFUSED = {"implicit": "the implicit corrector (an extra model call at the corrected sample)",
           "dpmv3": "DPM-Solver-v3's prediction (per-element statistics; use solver='dpmv3')"}


@dataclass(frozen=True)
class Derivative:
    """How one lambda-derivative of the prediction is estimated: the history points of its finite-difference
    system (relative indices: -2 the model call before the newest, ...; -1 the new point in a corrector) and
    the relaxation of the first derivative ("none" | "dpmsolver-2" | "unipc-bh1" | "unipc-bh2" | "linear" with
    its coefficient)."""

    points: tuple[int, ...]
    relaxation: str = "none"
    coefficient: float = 0.0

    def __post_init__(self):
        points = checks.integers("points", self.points)
        object.__setattr__(self, "points", tuple(points))
        if not points or len(set(points)) != len(points) or max(points) > -1:
            raise ValueError(f"points must be distinct negative relative indices (-1 the newest model call), "
                             f"got {self.points!r}")
        if len(points) > MAX_HISTORY_READS:
            raise ValueError(f"points: at most {MAX_HISTORY_READS} history points per derivative (the fused "
                             f"update's reads), got {len(points)}")
        if self.relaxation not in RELAXATIONS:
            raise ValueError(f"relaxation must be one of {RELAXATIONS}, got {self.relaxation!r}")
        object.__setattr__(self, "coefficient", checks.real("coefficient", self.coefficient))
        if self.relaxation != "linear" and self.coefficient != 0:
            raise ValueError(f"coefficient is the linear relaxation's; relaxation {self.relaxation!r} takes none")


@dataclass(frozen=True)
class StepSpec:
    """One USF step: Taylor `order` 1-4 from the start point, the `prediction` it integrates ("x0" | "eps"),
    one Derivative per derivative order 1..order-1 (default: the order - 1 previous points, no relaxation),
    and its corrector: None / "none", "pseudo" (USF's default corrector spec: order + 1, start -2, every
    derivative from the predictor's points shifted back by one and the new point -1) or a StepSpec with
    start=-2 (e.g. UniPC's relaxed corrector)."""

    order: int = 1
    prediction: str = "x0"
    derivatives: tuple[Derivative, ...] | None = None
    start: int = -1
    corrector: "StepSpec | str | None" = None

    def __post_init__(self):
        order = checks.integer("order", self.order, 1, 4)
        if self.prediction in REFUSED:
            raise ValueError(f"prediction {self.prediction!r}: {REFUSED[self.prediction]} is not supported")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {self.prediction!r}")
        if self.start not in (-1, -2):
            raise ValueError(f"start must be -1 (multistep; -2 for a corrector), got {self.start!r}: singlestep "
                             "start points are not supported")
        base = self.start  # the start point's relative index
        if self.derivatives is None:
            ders = tuple(Derivative(tuple(range(base - 1, base - order, -1))) for _ in range(order - 1))
            if base == -2 and order > 1:  # a corrector: the new point and the points before the start
                ders = tuple(Derivative(tuple(range(-3, -order - 1, -1)) + (-1,)) for _ in range(order - 1))
        else:
            ders = tuple(self.derivatives)
        if len(ders) != order - 1 or not all(isinstance(d, Derivative) for d in ders):
            raise ValueError(f"derivatives must hold order - 1 = {order - 1} Derivative specs, got {ders!r}")
        for n, d in enumerate(ders, start=1):
            if len(d.points) < n:
                raise ValueError(f"derivative {n} needs at least {n} points, got {d.points}")
            if base in d.points:
                raise ValueError(f"derivative {n}: points {d.points} include the start point {base}")
            if base == -1 and -1 in d.points:
                raise ValueError(f"derivative {n}: point -1 is the start point of a predictor")
            if base == -2 and -1 not in d.points:
                raise ValueError(f"derivative {n}: a corrector's points must include the new point -1, got {d.points}")
            if n > 1 and d.relaxation != "none":
                raise ValueError(f"derivative {n}: only the first derivative is relaxed (USF), got {d.relaxation!r}")
        object.__setattr__(self, "order", order)
        object.__setattr__(self, "derivatives", ders)
        corrector = self.corrector
        if corrector in REFUSED:
            raise ValueError(f"corrector {corrector!r}: {REFUSED[corrector]} is not supported; use 'pseudo'")
        if corrector == "none":
            corrector = None
        elif corrector == "pseudo":
            corrector = self.pseudo_corrector()
        elif corrector is not None and not isinstance(corrector, StepSpec):
            raise ValueError(f"corrector must be None, 'none', 'pseudo' or a StepSpec, got {corrector!r}")
        if corrector is not None:
            if base != -1:
                raise ValueError("a corrector has no corrector of its own")
            if corrector.start != -2 or corrector.prediction != self.prediction:
                raise ValueError(f"corrector must start at -2 with the step's prediction {self.prediction!r}, got "
                                 f"start={corrector.start}, prediction={corrector.prediction!r}")
        object.__setattr__(self, "corrector", corrector)

    def pseudo_corrector(self) -> "StepSpec":
        """USF's corrector of this predictor: order + 1 from -2; each derivative's points shifted back by one plus
        the new point -1, one more derivative with the last one's points; no relaxation."""
        if self.order == 1:
            return StepSpec(2, self.prediction, (Derivative((-1,)),), start=-2)
        ders = [Derivative(tuple(p - 1 for p in d.points) + (-1,)) for d in self.derivatives]
        return StepSpec(self.order + 1, self.prediction, tuple(ders + [ders[-1]]), start=-2)


def phi(k: int, z: float) -> float:
    """phi_k(z) = int_0^1 e^{(1-u) z} u^{k-1} / (k-1)! du (phi_0 = e^z): a series for |z| < 1, else the
    recursion phi_k = (phi_{k-1} - 1/(k-1)!) / z."""
    if abs(z) < 1:
        return sum(z**j / math.factorial(j + k) for j in range(30))
    value = math.exp(z)
    for i in range(1, k + 1):
        value = (value - 1 / math.factorial(i - 1)) / z
    return value


def relaxation_factor(d: Derivative, h: float, prediction: str) -> float:
    """rho of D_1 (1 for the higher derivatives and "none"): USF's empirical relaxations at hr = -h (x0) or h
    (eps), linear 1 + coefficient h."""
    if d.relaxation == "none":
        return 1.0
    if d.relaxation == "linear":
        return 1.0 + d.coefficient * h
    hr = -h if prediction == "x0" else h
    em = math.expm1(hr)
    if d.relaxation == "unipc-bh1":
        return 0.5 * hr * hr / (em - hr)
    return 0.5 * hr * em / (em - hr)  # dpmsolver-2, unipc-bh2


def difference_weights(deltas: list[float], n: int) -> np.ndarray:
    """w with D_n = sum_j w_j (m_j - m_s): sum_j w_j deltas_j^i / i! = [i == n] for i = 1..len(deltas)."""
    k = len(deltas)
    system = np.array([[d**i / math.factorial(i) for d in deltas] for i in range(1, k + 1)])
    rhs = np.zeros(k)
    rhs[n - 1] = 1.0
    return np.linalg.solve(system, rhs)


def step_weights(grid: Grid, spec: StepSpec, s: int, t: int, points) -> tuple[float, dict[int, float]]:
    """(a, {grid point: weight}) of x_t = a x_s + sum_j weight_j m_j, spec's Taylor step from grid point s to
    t; points(rel) is the grid point of a relative index."""
    (alpha_s, sigma_s), (alpha_t, sigma_t) = grid.alpha_sigma(s), grid.alpha_sigma(t)
    h = grid.lam(t) - grid.lam(s)
    if spec.prediction == "x0":
        a, scale, z = sigma_t / sigma_s, alpha_t, -h
        w = {s: -alpha_t * math.expm1(-h)}
    else:
        a, scale, z = alpha_t / alpha_s, -sigma_t, h
        # sigma_t e^h = alpha_t sigma_s / alpha_s: the first-order step to sigma = 0 is x_s / alpha_s - rho_s eps
        w = {s: -sigma_t * math.expm1(h) if sigma_t > 0 else -alpha_t * sigma_s / alpha_s}
    for n, d in enumerate(spec.derivatives, start=1):
        js = [points(p) for p in d.points]
        coeff = scale * h ** (n + 1) * phi(n + 1, z) * relaxation_factor(d, h, spec.prediction)
        for j, wj in zip(js, difference_weights([grid.lam(j) - grid.lam(s) for j in js], n)):
            w[j] = w.get(j, 0.0) + coeff * wj
            w[s] -= coeff * wj
    return a, w


@dataclass(frozen=True)
class Plan:
    """A USF solver plan: one StepSpec per grid interval (step i goes from grid point i to i + 1), on a Grid
    (solvers.grid: model times and sigma ratios); afs: the analytical first step (x0 = 0 at grid point 0, so
    no model call there: nfe = len(steps) - 1). `ds.sample(model, x, solver=plan)` runs it (its steps and
    schedule come from the plan; sample's steps and schedule are not used)."""

    steps: tuple[StepSpec, ...]
    grid: Grid
    afs: bool = False
    name: str = field(default="usf", compare=False)

    def __post_init__(self):
        steps = tuple(self.steps)
        object.__setattr__(self, "steps", steps)
        if not isinstance(self.grid, Grid):
            raise ValueError(f"grid must be a diffsampler.solvers.Grid, got {type(self.grid).__name__}")
        if not steps or not all(isinstance(s, StepSpec) for s in steps):
            raise ValueError("steps must be a non-empty sequence of usf.StepSpec")
        if len(steps) != len(self.grid):
            raise ValueError(f"steps must hold one StepSpec per grid step ({len(self.grid)}), got {len(steps)}")
        checks.flag("afs", self.afs)
        kinds = {s.prediction for s in steps}
        if len(kinds) > 1:
            raise ValueError(f"one prediction type per plan (the history ring holds one kind), got {sorted(kinds)}")
        lams = [self.grid.lam(i) for i in range(len(self.grid) + 1)]
        if any(not b > a for a, b in zip(lams, lams[1:])):
            raise ValueError("grid: lambda = log(alpha / sigma) must increase strictly along the grid (no repeated "
                             "or reversed sigmas)")
        n = len(steps)
        if steps[-1].corrector is not None:
            raise ValueError("the last step cannot have a corrector: it would need a model call at the final time")
        if self.afs and (steps[0].order != 1 or n < 2):
            raise ValueError("afs: the analytical first step is first order (steps[0].order = 1) and needs a "
                             "second step")
        if math.isinf(lams[-1]) and steps[-1].order != 1:
            raise ValueError("the last step lands on sigma = 0 (infinite lambda): it must be order 1; or end the grid "
                             "at a sigma > 0")
        for i, spec in enumerate(steps):
            for rel in _relative_points(spec):
                if i + 1 + rel < 0:
                    raise ValueError(f"steps[{i}] reads point {rel} before the first model call")
            if spec.corrector is not None:
                for rel in _relative_points(spec.corrector):
                    if i + 2 + rel < 0:
                        raise ValueError(f"steps[{i}].corrector reads point {rel} before the first model call")
        self.to_plan("eps")  # the fused updates' constraints (reads, afs points)

    @property
    def nfe(self) -> int:
        return len(self.steps) - int(self.afs)

    def to_plan(self, prediction: str = "eps") -> solver_plan.Plan:
        """The diffsampler Plan (one fused update per model call) of a model returning `prediction`."""
        grid, steps, kind = self.grid, self.steps, self.steps[0].prediction
        convert = data_coeffs if kind == "x0" else noise_coeffs
        first = 1 if self.afs else 0
        calls = []
        for i in range(first, len(steps)):
            start = {"X": 1.0}  # the predictor's start sample: x, or the correction of the last step
            if i > 0 and steps[i - 1].corrector is not None:
                c_a, c_w = step_weights(grid, steps[i - 1].corrector, i - 1, i, lambda r, i=i: i + 1 + r)
                start = {"S": c_a, **c_w}
            a, w = step_weights(grid, steps[i], i, i + 1, lambda r, i=i: i + 1 + r)
            total = {k: a * v for k, v in start.items()}
            for j, v in w.items():
                total[j] = total.get(j, 0.0) + v
            if self.afs:
                total, start = self._afs_fold(total, i), self._afs_fold(start, i)
            calls.append((i, total, start if steps[i].corrector is not None else None))
        lookback = max((i - j for i, total, _ in calls for j in total if isinstance(j, int)), default=0)
        slots = lookback + 1 if lookback else 0
        plan = []
        for i, total, start in calls:
            reads = sorted((j for j in total if isinstance(j, int) and j != i), reverse=True)
            if len(reads) > MAX_HISTORY_READS:
                raise ValueError(f"steps[{i}] (with the corrector of the step before) reads {len(reads)} history "
                                 f"points {reads}; the fused update reads at most {MAX_HISTORY_READS}")
            alpha, sigma = grid.alpha_sigma(i)
            p, q = convert(prediction, alpha, sigma)
            b = tuple(total.get(j, 0.0) for j in [i] + reads)
            state = None
            if start is not None:
                state = StateRow(a=start.get("X", 0.0), b=tuple(start.get(j, 0.0) for j in [i] + reads),
                                 g=start.get("S", 0.0))
            coeffs = UpdateCoeffs(p=p, q=q, a=total.get("X", 0.0), b=b, g=total.get("S", 0.0), state=state,
                                  eps_of=None if kind == "x0" else (alpha, sigma))
            plan.append(solver_plan.Step(t=grid.timesteps[i], coeffs=coeffs, write_slot=i % slots if slots else 0,
                                         read_slots=tuple(j % slots for j in reads)))
        init = grid.alpha_sigma(1)[1] / grid.alpha_sigma(0)[1] if self.afs else 1.0
        return solver_plan.Plan(steps=tuple(plan), history_slots=slots, discrete_time=grid.discrete,
                                data_prediction=kind == "x0", init_scale=init,
                                uses_state=any(s.corrector is not None for s in steps))

    def _afs_fold(self, weights: dict, i: int) -> dict:
        """The analytical first point in the weights of call i: x_1 = (sigma_1 / sigma_0) x_0 exactly, its
        prediction is x0 = 0 (eps = x_0 / sigma_0 = x_1 / sigma_1, readable in the first call only)."""
        out = dict(weights)
        sigma0, sigma1 = self.grid.alpha_sigma(0)[1], self.grid.alpha_sigma(1)[1]
        if i == 1 and "S" in out:  # the start of a corrected step 0: x_0
            out["X"] = out.get("X", 0.0) + out.pop("S") * sigma0 / sigma1
        if 0 in out:
            w = out.pop(0)
            if self.steps[0].prediction == "eps":
                if i != 1:
                    raise ValueError(f"afs with prediction 'eps': the analytical first point is readable by the "
                                     f"first model call's update only, and steps[{i}] reads it")
                out["X"] = out.get("X", 0.0) + w / sigma1
        return out


def _relative_points(spec: StepSpec) -> set[int]:
    return {p for d in spec.derivatives for p in d.points}


def _orders(n: int, order: int, lower_final: tuple[int, ...]) -> list[int]:
    """The warm-up orders min(order, i + 1), capped by lower_final[k] at step n - 1 - k."""
    orders = [min(order, i + 1) for i in range(n)]
    for k, cap in enumerate(lower_final):
        if k < n:
            orders[n - 1 - k] = min(orders[n - 1 - k], cap)
    return orders


def _taylor(order: int, prediction: str, relaxation: str = "none") -> StepSpec:
    """Taylor `order` from the order - 1 previous points, the first derivative relaxed."""
    ders = [Derivative(tuple(range(-2, -order - 1, -1)), relaxation if n == 0 else "none") for n in range(order - 1)]
    return StepSpec(order, prediction, tuple(ders))


def dpmpp(steps: int, order: int = 2, schedule: VP | None = None, **grid_options) -> Plan:
    """DPM-Solver++ multistep (solver="dpmpp_2m" / "dpmpp_3m" with phi3="taylor") on the multistep grid:
    second-order steps relax D_1 by dpmsolver-2 (the midpoint form), third-order ones are plain Taylor; the
    warm-up and lower_order_final orders of the named solver; the grid ends at sigma = 0."""
    schedule = VP.scaled_linear() if schedule is None else schedule
    grid = multistep_grid(schedule, steps, final_sigmas_type="zero", **grid_options)
    n = len(grid)
    orders = _orders(n, order, (1, 2) if n < 15 else (1,))
    specs = [_taylor(k, "x0", "dpmsolver-2" if k == 2 else "none") for k in orders]
    return Plan(tuple(specs), grid, name=f"usf dpmpp_{order}m")


def dpmpp_2m(steps: int, schedule: VP | None = None, **grid_options) -> Plan:
    """DPM-Solver++(2M) as a USF plan (= solver="dpmpp_2m")."""
    return dpmpp(steps, 2, schedule, **grid_options)


def dpmpp_3m(steps: int, schedule: VP | None = None, **grid_options) -> Plan:
    """DPM-Solver++(3M) with the full Taylor weight of D_2 as a USF plan (= solver="dpmpp_3m", phi3="taylor";
    the default phi3="k-diffusion" halves that weight, which USF's relaxations (first derivative only) do not
    express)."""
    return dpmpp(steps, 3, schedule, **grid_options)


def unipc(steps: int, variant: str = "bh2", order: int = 2, corrector: bool = True, schedule: VP | None = None,
          **grid_options) -> Plan:
    """UniPC (= solver="unipc", data prediction) as a USF plan: the predictor of order 2 relaxes D_1 by
    unipc-<variant> (rho_p = 1/2), order 3 is plain Taylor (rho_p solves the full system, B(h) cancels); the
    corrector after a first-order step is Taylor 2 from the new point relaxed by unipc-<variant> (rho_c = 1/2),
    after order p >= 2 plain Taylor p + 1 from the new point and p - 1 points before the start."""
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"variant must be 'bh1' or 'bh2', got {variant!r}")
    schedule = VP.scaled_linear() if schedule is None else schedule
    grid = multistep_grid(schedule, steps, final_sigmas_type="zero", **grid_options)
    n = len(grid)
    orders = [min(order, n - i, i + 1) for i in range(n)]
    relax = f"unipc-{variant}"
    specs = []
    for i, k in enumerate(orders):
        fix = None
        if corrector and i < n - 1:
            p = k
            if p == 1:
                fix = StepSpec(2, "x0", (Derivative((-1,), relax),), start=-2)
            else:
                pts = tuple(range(-3, -p - 2, -1)) + (-1,)
                fix = StepSpec(p + 1, "x0", tuple(Derivative(pts) for _ in range(p)), start=-2)
        spec = _taylor(k, "x0", relax if k == 2 else "none")
        specs.append(StepSpec(spec.order, "x0", spec.derivatives, corrector=fix))
    return Plan(tuple(specs), grid, name=f"usf unipc {variant}")


def deis(steps: int, order: int = 2, schedule: VP | None = None, **grid_options) -> Plan:
    """DEIS log-rho multistep (= solver="deis"): the Lagrange polynomial of eps in log rho = -lambda integrated
    exactly is the Taylor step of that order with its derivatives from the order - 1 previous points, noise
    prediction; the grid ends at the smallest training sigma."""
    schedule = VP.scaled_linear() if schedule is None else schedule
    grid = multistep_grid(schedule, steps, final_sigmas_type="sigma_min", **grid_options)
    n = len(grid)
    orders = _orders(n, order, (1, 2) if n < 15 else ())
    return Plan(tuple(_taylor(k, "eps") for k in orders), grid, name=f"usf deis{order}")


def search(model, x_fit, schedule: VP, nfe: int, budget: int = 64, metric=None, seed: int = 0, **options):
    """S3's predictor-based evolutionary search of a USF plan with `nfe` model calls on a discrete VP schedule:
    returns (Plan, log). See solvers.usf_search.search for the options and the log."""
    from .usf_search import search as s3

    return s3(model, x_fit, schedule, nfe, budget, metric, seed, **options)
