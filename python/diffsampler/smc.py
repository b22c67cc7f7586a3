"""Feynman-Kac correctors (Skreta et al. 2025): sample prod_i p_i^{b_i} from diffusion models of the p_i.

The target path is pi_t ∝ prod_i p_{i,t}^{b_i} (p_{i,t} the noised marginals of model i): temperature annealing
p^beta (one model, b = beta), a product of experts p1 p2 (b = 1, 1), classifier-free guidance p_c^w p_u^(1-w)
(b = w, 1 - w). Each particle follows the reverse SDE of the combined score S = sum_i b_i s_i and carries the
log-weight (docs/smc.md, "Feynman-Kac correctors")

    d log w = gamma^2 / 2 (|S|^2 - sum_i b_i |s_i|^2) dtau,    gamma^2 dtau = h: the step's noise variance,

which makes the weighted particles track pi_t exactly in continuous time. Discretisation per step, with h the
step's variance: VP schedule (x = alpha x0 + sigma eps), h = 1 - abar_t / abar_t',
x' = (x + h S) / sqrt(1 - h) + sqrt(h) z (DDPM's ancestral step with S); EDM (x = x0 + sigma eps),
h = sigma^2 - sigma'^2, x' = x + h S + sqrt(h) z. Models are eps-predictors model(x, t) -> eps (t an int64
timestep for VP, sigma for EDM), so s_i = -eps_i / sigma. The per-step math (the SDE step and the increment) is
one fused pass, ``ops.fkc_update``; all normalisation, ESS and resampling go through ``ops.resample`` (the
decision stays on the device: no host sync in the loop).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import torch

from . import checks, ops
from .reference import fkc_pairs
from .schedules import EDM, VP, discrete_timesteps


class FKCResult(NamedTuple):
    """particles (G*K, *shape) and their normalised log-weights (G, K) at the end; draw (G, *shape): one
    particle per group drawn by weight."""

    particles: torch.Tensor
    log_w: torch.Tensor
    draw: torch.Tensor


def pair_weights(exponents: Sequence[float], h: float) -> list[float]:
    """The weights of the increment h / 2 (|S|^2 - sum_i b_i |s_i|^2) on the score pairs <s_i, s_j>, i <= j, in
    the order of reference.fkc_pairs, from its expansion

        h / 2 [sum_i b_i (b_i - 1) |s_i|^2 + 2 sum_{i<j} b_i b_j <s_i, s_j>]

    Annealing: h/2 beta (beta - 1) |s|^2; product: h <s1, s2>; guidance: h/2 w (w - 1) |s_c - s_u|^2."""
    b = list(exponents)
    return [0.5 * h * (b[i] * (b[i] - 1) if i == j else 2 * b[i] * b[j]) for i, j in fkc_pairs(len(b))]


def log_weight_increment(scores: Sequence[torch.Tensor], exponents: Sequence[float], h: float) -> torch.Tensor:
    """h / 2 (|S|^2 - sum_i b_i |s_i|^2) per row of the scores (n, ...), S = sum_i b_i s_i (pair_weights): one
    row-wise dot product per nonzero pair (float32 or wider), no temporary of the scores' size."""
    flat = [s.flatten(1).float() if s.dtype in (torch.float16, torch.bfloat16) else s.flatten(1) for s in scores]
    total = torch.zeros(flat[0].shape[0], dtype=flat[0].dtype, device=flat[0].device)
    for w, (i, j) in zip(pair_weights(exponents, h), fkc_pairs(len(flat))):
        if w != 0:
            total = total + w * torch.linalg.vecdot(flat[i], flat[j], dim=1)
    return total


def step_coeffs(exponents: Sequence[float], sigma: float, h: float, scale: float) -> dict:
    """ops.fkc_update's coefficients of one step on the eps-predictions (s_i = -eps_i / sigma):
    x' = scale (x + h S) + sqrt(h) z, and the increment's pair weights over sigma^2."""
    return dict(a=scale, e=[-scale * h * b / sigma for b in exponents], c=h**0.5,
                weights=[w / sigma**2 for w in pair_weights(exponents, h)])


def _steps(schedule, steps: int) -> list[tuple[torch.Tensor, float, float, float]]:
    """(model time, sigma, h, scale) per step: x' = scale (x + h S) + sqrt(h) z."""
    if isinstance(schedule, VP):
        ts = discrete_timesteps(schedule.num_train_timesteps, steps, "linspace")
        abar = [float(v) for v in schedule.alphas_cumprod.numpy()[ts]] + [1.0]  # host values, no dispatch
        out = []
        for i, t in enumerate(ts):
            h = 1.0 - abar[i] / abar[i + 1]
            out.append((torch.tensor(int(t)), (1.0 - abar[i]) ** 0.5, h, (1.0 - h) ** -0.5))
        return out
    if isinstance(schedule, EDM):
        sig = schedule.sigmas(steps)
        return [(torch.tensor(s, dtype=torch.float64), s, s * s - n * n, 1.0) for s, n in zip(sig[:-1], sig[1:])]
    raise ValueError(f"schedule must be a schedules.VP or schedules.EDM, got {type(schedule).__name__}")


def _check_target(models, exponents) -> tuple[list, list[float]]:
    """models: a non-empty sequence of callables; exponents: one finite number per model, positive sum."""
    if callable(models) or not isinstance(models, Sequence):
        raise checks.ArgumentTypeError(f"models must be a sequence of callables model(x, t) -> eps, got "
                                       f"{type(models).__name__}")
    exponents = checks.reals("exponents", exponents)
    if not models or len(models) != len(exponents):
        raise ValueError(f"models and exponents must be non-empty and of equal length, got {len(models)} and "
                         f"{len(exponents)}")
    for i, m in enumerate(models):
        checks.model(m, f"models[{i}]")
    if not sum(exponents) > 0:
        raise ValueError(f"exponents must have a positive sum (the start is N(0, I / sum)), got {exponents}")
    return list(models), exponents


def _check_options(options: dict) -> dict:
    """fkc_sample's keywords (those given), checked; ints as int."""
    known = ("schedule", "steps", "weighted", "method", "ess_threshold", "generator", "dtype", "device")
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise checks.ArgumentTypeError(f"unknown FKC option(s) {unknown}; the options are {list(known)}")
    out = dict(options)
    if out.get("schedule") is not None and not isinstance(out["schedule"], (VP, EDM)):
        raise ValueError(f"schedule must be a schedules.VP or schedules.EDM, got {type(out['schedule']).__name__}")
    if "steps" in out:
        out["steps"] = checks.integer("steps", out["steps"], 1)
    if "weighted" in out:
        out["weighted"] = checks.flag("weighted", out["weighted"])
    if "method" in out and out["method"] not in ops.RESAMPLE_METHODS:
        raise ValueError(f"method must be one of {ops.RESAMPLE_METHODS}, got {out['method']!r}")
    if out.get("ess_threshold") is not None:
        out["ess_threshold"] = checks.real("ess_threshold (None: always resample)", out["ess_threshold"], "[0, 1]")
    checks.generator(out.get("generator"))
    if "dtype" in out and not (isinstance(out["dtype"], torch.dtype) and out["dtype"].is_floating_point):
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {out['dtype']!r}")
    if "device" in out:
        try:
            torch.device(out["device"])
        except (RuntimeError, TypeError):
            raise ValueError(f"device must be a torch.device or a device string, got {out['device']!r}") from None
    return out


def fkc_sample(
    models: Sequence[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]],
    exponents: Sequence[float],
    groups: int,
    particles: int,
    shape: Sequence[int],
    *,
    schedule=None,
    steps: int = 200,
    weighted: bool = True,
    method: str = "systematic",
    ess_threshold: float | None = 0.5,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> FKCResult:
    """Sample `groups` outputs of pi ∝ prod_i p_i^{exponents[i]}, each from `particles` (K) weighted particles.

    models: eps-predictors model(x, t) -> eps for x of shape (G*K, *shape), group-major (particle k of group n
        is row n K + k). schedule: ``schedules.VP`` (default ``VP.linear()``) or ``schedules.EDM``.
    The start is N(0, I / sum b) (VP) or N(0, sigma_max^2 I / sum b) (EDM), the noised target at the first step.
    weighted=False gives the naive sampler: the same SDE of the summed scores, no weights, no resampling.
    Resampling: ``ops.resample(log_w, x, method, ess_threshold, generator)`` after every step (K = 1: none).
    See also `FKC` (and its `anneal`, `product`, `guidance`).
    """
    models, exponents = _check_target(models, exponents)
    total = sum(exponents)
    groups, particles = checks.integer("groups", groups, 1), checks.integer("particles", particles, 1)
    shape = checks.integers("shape", shape, 1)
    steps = _check_options(dict(schedule=schedule, steps=steps, weighted=weighted, method=method,
                                ess_threshold=ess_threshold, generator=generator, dtype=dtype, device=device))["steps"]
    schedule = VP.linear() if schedule is None else schedule
    plan = _steps(schedule, steps)
    G, K = groups, particles
    n = G * K
    start = schedule.sigma_max if isinstance(schedule, EDM) else 1.0
    x = torch.randn(n, *shape, generator=generator, device=device, dtype=dtype) * (start / total**0.5)
    log_w = torch.full((G, K), -math.log(K), device=device)
    for t, sigma, h, scale in [(t.to(device), *rest) for t, *rest in plan]:
        eps = []
        for i, m in enumerate(models):
            out = m(x, t)
            if out.shape != x.shape:
                raise ValueError(f"models: model {i} returned shape {tuple(out.shape)} for x of shape "
                                 f"{tuple(x.shape)}")
            eps.append(out.to(x.dtype))
        noise = torch.randn(x.shape, generator=generator, device=device, dtype=torch.float32).to(dtype)
        x, inc = ops.fkc_update(x, eps, noise=noise, check_nan=False, **step_coeffs(exponents, sigma, h, scale))
        if weighted and K > 1:
            log_w = log_w + inc.to(log_w.dtype).reshape(G, K)
            x, log_w = ops.resample(log_w, x, method, ess_threshold, generator)[:2]
    final = ops.resample(log_w, x, method, None, generator, move="gather")
    slot = torch.randint(K, (G,), generator=generator, device=device)
    rows = torch.arange(G, device=device) * K + slot
    return FKCResult(x, log_w, final.particles[rows])


class FKC:
    """A Feynman-Kac corrector for pi ∝ prod_i p_i^{exponents[i]}, run by ``sample``:

        fkc = FKC.product([expert_a, expert_b], schedule=VP.linear(), steps=200)
        result = fkc.sample(groups=16, particles=32, shape=(2,), generator=gen)   # an FKCResult

    options are fkc_sample's keywords (schedule, steps, weighted, method, ess_threshold, generator, dtype,
    device); those given to `sample` override them. The arguments are checked here, at construction."""

    def __init__(self, models: Sequence[Callable], exponents: Sequence[float], **options):
        self.models, self.exponents = _check_target(models, exponents)
        self.options = _check_options(options)

    def sample(self, groups: int, particles: int, shape: Sequence[int], **options) -> FKCResult:
        return fkc_sample(self.models, self.exponents, groups, particles, shape, **{**self.options, **options})

    @classmethod
    def anneal(cls, model, beta: float, **options) -> "FKC":
        """Temperature annealing: samples of p^beta from one eps-model of p (beta > 0)."""
        return cls([model], [checks.real("beta", beta, "(0, inf)")], **options)

    @classmethod
    def product(cls, models, **options) -> "FKC":
        """Product of experts: samples of p_1 p_2 ... from eps-models of each factor."""
        return cls(models, [1.0] * len(models) if isinstance(models, Sequence) else [], **options)

    @classmethod
    def guidance(cls, cond, uncond, w: float, **options) -> "FKC":
        """Classifier-free guidance as the geometric average p_c^w p_u^(1 - w) (w > 0)."""
        w = checks.real("w", w, "(0, inf)")
        return cls([cond, uncond], [w, 1.0 - w], **options)


def anneal(model, beta: float, groups: int, particles: int, shape, **options) -> FKCResult:
    """FKC.anneal(model, beta).sample(groups, particles, shape, **options)."""
    return FKC.anneal(model, beta).sample(groups, particles, shape, **options)


def product(models, groups: int, particles: int, shape, **options) -> FKCResult:
    """FKC.product(models).sample(groups, particles, shape, **options)."""
    return FKC.product(models).sample(groups, particles, shape, **options)


def guidance(cond, uncond, w: float, groups: int, particles: int, shape, **options) -> FKCResult:
    """FKC.guidance(cond, uncond, w).sample(groups, particles, shape, **options)."""
    return FKC.guidance(cond, uncond, w).sample(groups, particles, shape, **options)
