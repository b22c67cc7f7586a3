"""Noise-level grids by the names k-diffusion and ComfyUI give them (descending sigmas in the VE scale).

Grids over a range:  exponential      uniform in log sigma
                     polyexponential  sigma_i = exp(ramp_i^rho (log s_max - log s_min) + log s_min), ramp 1 -> 0
                     laplace          sigma_i = clamp(exp(mu - beta sign(1/2 - x_i) log(1 - 2|1/2 - x_i| + 1e-5)))
                                      over x_i uniform in [0, 1] (Tiankai et al. 2024; no final 0, as ComfyUI)
                     kl_optimal       sigma_i = tan((1 - u_i) atan s_max + u_i atan s_min), u_i = i / (n - 1)
                     ays              Align Your Steps (Sabour et al. 2024): NVIDIA's tables for SD 1.5 / SDXL / SVD,
                                      interpolated linearly in log sigma to any count
Grids over a model's training sigmas (ModelSigmas, ComfyUI's scheduler names): simple, sgm_uniform, normal,
ddim_uniform, beta, linear_quadratic; `comfy_sigmas(model_sigmas, name, steps)` picks one by name.

All return float32 tensors, as k-diffusion and ComfyUI do; the 0 at the end is appended unless noted.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from . import checks
from .schedules import VP, Flow, karras_sigmas

# Align Your Steps noise levels (11 sigmas, 10 steps), as published with the paper and used by ComfyUI
AYS = {
    "SD1": [14.6146412293, 6.4745760956, 3.8636745985, 2.6946151520, 1.8841921177, 1.3943805092, 0.9642583904,
            0.6523686016, 0.3977456272, 0.1515232662, 0.0291671582],
    "SDXL": [14.6146412293, 6.3184485287, 3.7681790315, 2.1811480769, 1.3405244945, 0.8620721141, 0.5550693289,
             0.3798540708, 0.2332364134, 0.1114188177, 0.0291671582],
    "SVD": [700.00, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.002],
}


def _with_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def _range(n, sigma_min, sigma_max) -> tuple[int, float, float]:
    n = checks.integer("n", n, 1)
    checks.real("sigma_min", sigma_min, "(0, inf)")
    checks.real("sigma_max", sigma_max, "(0, inf)")
    if not 0 < sigma_min <= sigma_max:
        raise ValueError(f"need 0 < sigma_min <= sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    return n, float(sigma_min), float(sigma_max)


def exponential(n, sigma_min, sigma_max, device="cpu") -> torch.Tensor:
    """n sigmas uniform in log sigma, then 0."""
    n, lo, hi = _range(n, sigma_min, sigma_max)
    return _with_zero(torch.linspace(math.log(hi), math.log(lo), n, device=device).exp())


def polyexponential(n, sigma_min, sigma_max, rho=1.0, device="cpu") -> torch.Tensor:
    """n sigmas polynomial in log sigma (rho = 1: uniform in log sigma), then 0."""
    n, lo, hi = _range(n, sigma_min, sigma_max)
    checks.real("rho", rho, "(0, inf)")
    ramp = torch.linspace(1, 0, n, device=device) ** rho
    return _with_zero(torch.exp(ramp * (math.log(hi) - math.log(lo)) + math.log(lo)))


def laplace(n, sigma_min, sigma_max, mu=0.0, beta=0.5, device="cpu") -> torch.Tensor:
    """n sigmas dense around log sigma = mu (Laplace quantiles), clamped to [sigma_min, sigma_max]; no final 0."""
    n, lo, hi = _range(n, sigma_min, sigma_max)
    checks.real("mu", mu)
    checks.real("beta", beta, "(0, inf)")
    x = torch.linspace(0, 1, n, device=device)
    lmb = mu - beta * torch.sign(0.5 - x) * torch.log(1 - 2 * torch.abs(0.5 - x) + 1e-5)
    return torch.clamp(torch.exp(lmb), min=lo, max=hi)


def kl_optimal(n, sigma_min, sigma_max, device="cpu") -> torch.Tensor:
    """n sigmas uniform in atan(sigma) from sigma_max to sigma_min, then 0 (needs n >= 2)."""
    n, lo, hi = _range(n, sigma_min, sigma_max)
    if n < 2:
        raise ValueError(f"kl_optimal needs n >= 2, got {n}")
    u = torch.arange(n, dtype=torch.float32, device=device) / (n - 1)
    return _with_zero((u * math.atan(lo) + (1 - u) * math.atan(hi)).tan())


def loglinear(sigmas, count: int) -> np.ndarray:
    """`count` values interpolating the descending `sigmas` linearly in log sigma over an index in [0, 1]."""
    xs = np.linspace(0, 1, len(sigmas))
    ys = np.log(np.asarray(sigmas, dtype=np.float64)[::-1])
    return np.exp(np.interp(np.linspace(0, 1, count), xs, ys))[::-1].copy()


def ays(model_type: str, steps, device="cpu") -> torch.Tensor:
    """Align Your Steps: `steps` sigmas of the table for model_type ("SD1", "SDXL", "SVD"), then 0 (the table's
    last sigma is replaced by 0, as ComfyUI's AlignYourStepsScheduler does)."""
    if model_type not in AYS:
        raise ValueError(f"model_type must be one of {sorted(AYS)}, got {model_type!r}")
    steps = checks.integer("steps", steps, 1)
    table = AYS[model_type]
    sigmas = np.array(table) if steps + 1 == len(table) else loglinear(table, steps + 1)
    sigmas[-1] = 0
    return torch.tensor(sigmas, dtype=torch.float32, device=device)


class ModelSigmas:
    """A model's training noise levels, ascending in float32 (ComfyUI's model_sampling): sigma_t for t in
    0..N-1 of a VP schedule (sqrt((1 - abar_t) / abar_t)), or a flow model's shifted t in 1/N..1.

    timestep(sigma): the nearest training step in log sigma (VP) or sigma * multiplier (flow);
    sigma(t): log sigma interpolated linearly between training steps (VP) or shift(t / multiplier) (flow)."""

    def __init__(self, schedule, multiplier: float = 1000.0):
        if isinstance(schedule, VP):
            self.sigmas = schedule.train_sigmas()
            self.flow = None
        elif isinstance(schedule, Flow):
            n = schedule.num_train_timesteps
            self.multiplier = float(multiplier)
            self.flow = schedule
            self.sigmas = self.sigma(torch.arange(1, n + 1, dtype=torch.float32) / n * self.multiplier)
        else:
            raise ValueError(f"schedule must be a diffsampler.schedules.VP or Flow, got {schedule!r}")
        self.log_sigmas = self.sigmas.log()

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def timestep(self, sigma) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float32)
        if self.flow is not None:
            return sigma * self.multiplier
        return (sigma.log() - self.log_sigmas[:, None]).abs().argmin(dim=0).view(sigma.shape)

    def sigma(self, t) -> torch.Tensor:
        t = torch.as_tensor(t).float()
        if self.flow is not None:
            s = self.flow.shift
            u = t / self.multiplier
            return u if s == 1.0 else s * u / (1 + (s - 1) * u)
        t = t.clamp(0, len(self.sigmas) - 1)
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()


def _model(model_sigmas) -> ModelSigmas:
    if isinstance(model_sigmas, (VP, Flow)):
        return ModelSigmas(model_sigmas)
    if not isinstance(model_sigmas, ModelSigmas):
        raise ValueError(f"model_sigmas must be a diffsampler.sigma_grids.ModelSigmas (or a VP / Flow schedule), "
                         f"got {type(model_sigmas).__name__}")
    return model_sigmas


def simple(model_sigmas, steps) -> torch.Tensor:
    """Every (N / steps)-th training sigma from the top: sigma[N - 1 - floor(i N / steps)], then 0."""
    s, steps = _model(model_sigmas), checks.integer("steps", steps, 1)
    stride = len(s.sigmas) / steps
    return _with_zero(torch.stack([s.sigmas[-(1 + int(i * stride))] for i in range(steps)]))


def ddim_uniform(model_sigmas, steps) -> torch.Tensor:
    """The training sigmas at t = 1, 1 + k, 1 + 2k, ... (k = N // steps), descending, then 0 (DDIM's leading
    grid with steps_offset 1); when sigma[1] is 0 one more step and no 0 appended."""
    s, steps = _model(model_sigmas), checks.integer("steps", steps, 1)
    zero = math.isclose(float(s.sigmas[1]), 0, abs_tol=1e-5)
    stride = max(len(s.sigmas) // (steps + 1 if zero else steps), 1)
    picked = s.sigmas[1::stride].flip(0)
    return picked if zero else _with_zero(picked)


def normal(model_sigmas, steps, sgm: bool = False) -> torch.Tensor:
    """sigma(t) at `steps` times uniform from timestep(sigma_max) to timestep(sigma_min), then 0; sgm: the
    `steps` first of steps + 1 such times (sigma_min itself left out: ComfyUI's sgm_uniform)."""
    s, steps = _model(model_sigmas), checks.integer("steps", steps, 1)
    start, end = s.timestep(s.sigma_max), s.timestep(s.sigma_min)
    if sgm:
        ts = torch.linspace(float(start), float(end), steps + 1)[:-1]
    elif math.isclose(float(s.sigma(end)), 0, abs_tol=1e-5):
        return torch.stack([s.sigma(t) for t in torch.linspace(float(start), float(end), steps + 1)])
    else:
        ts = torch.linspace(float(start), float(end), steps)
    return _with_zero(torch.stack([s.sigma(t) for t in ts]))


def sgm_uniform(model_sigmas, steps) -> torch.Tensor:
    """normal(..., sgm=True)."""
    return normal(model_sigmas, steps, sgm=True)


def beta(model_sigmas, steps, alpha=0.6, beta=0.6) -> torch.Tensor:
    """The training sigmas at the Beta(alpha, beta) quantiles of 1 - i / steps (Lee et al. 2024), repeated
    steps dropped, then 0. Needs scipy."""
    from scipy.stats import beta as beta_dist

    s, steps = _model(model_sigmas), checks.integer("steps", steps, 1)
    checks.real("alpha", alpha, "(0, inf)")
    checks.real("beta", beta, "(0, inf)")
    ts = np.rint(beta_dist.ppf(1 - np.linspace(0, 1, steps, endpoint=False), alpha, beta) * (len(s.sigmas) - 1))
    kept = [int(t) for i, t in enumerate(ts) if i == 0 or t != ts[i - 1]]
    return _with_zero(s.sigmas[kept])


def linear_quadratic(model_sigmas, steps, threshold_noise=0.025, linear_steps=None) -> torch.Tensor:
    """Mochi's schedule in units of sigma_max: 1 - u with u linear up to threshold_noise over the first
    linear_steps (default steps // 2), then quadratic up to 1 (the last sigma 0)."""
    s, steps = _model(model_sigmas), checks.integer("steps", steps, 1)
    checks.real("threshold_noise", threshold_noise, "(0, 1)")
    if steps == 1:
        u = [0.0, 1.0]
    else:
        lin = steps // 2 if linear_steps is None else checks.integer("linear_steps", linear_steps, 1)
        if lin >= steps:
            raise ValueError(f"linear_steps must be < steps = {steps}, got {lin}")
        diff = lin - threshold_noise * steps
        quad = steps - lin
        a = diff / (lin * quad**2)
        b = threshold_noise / lin - 2 * diff / quad**2
        c = a * lin**2
        u = [i * threshold_noise / lin for i in range(lin)] + [a * i * i + b * i + c for i in range(lin, steps)] + [1.0]
    return torch.tensor([1.0 - v for v in u], dtype=torch.float32) * s.sigma_max


def comfy_sigmas(model_sigmas, name: str, steps) -> torch.Tensor:
    """ComfyUI's scheduler `name` over the model's training sigmas (its calculate_sigmas)."""
    s = _model(model_sigmas)
    if name == "karras":
        return _with_zero(torch.as_tensor(karras_sigmas(s.sigma_min, s.sigma_max, steps), dtype=torch.float32))
    if name == "exponential":
        return exponential(steps, s.sigma_min, s.sigma_max)
    if name == "kl_optimal":
        return kl_optimal(steps, s.sigma_min, s.sigma_max)
    if name not in SCHEDULERS:
        raise ValueError(f"name must be one of {sorted(SCHEDULERS) + ['exponential', 'karras', 'kl_optimal']}, "
                         f"got {name!r}")
    return SCHEDULERS[name](s, steps)


SCHEDULERS = {"simple": simple, "sgm_uniform": sgm_uniform, "normal": normal, "ddim_uniform": ddim_uniform,
              "beta": beta, "linear_quadratic": linear_quadratic}
