"""The points a multistep solver visits, shared by the solver math and the diffusers drop-ins."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..schedules import VP, VPContinuous, discrete_timesteps, sigma_grid, sigma_to_alpha_sigma

FINAL_SIGMAS = ("zero", "sigma_min", "last")


@dataclass(frozen=True)
class Grid:
    """Model times t_0..t_{n-1} and sigma ratios sigma_0..sigma_n (sigma_n: where the last step lands).

    VP: alpha = 1 / sqrt(1 + sigma^2), sigma_t = sigma alpha; flow sigmas: alpha = 1 - sigma, sigma_t = sigma;
    VE (x = x0 + sigma eps, EDM's schedulers): alpha = 1, sigma_t = sigma.
    lambda = log(alpha / sigma_t) (+inf at sigma = 0).
    """

    timesteps: tuple
    sigmas: tuple[float, ...]
    flow: bool = False
    ve: bool = False
    discrete: bool = True  # the model gets integer training timesteps (else float times)

    def __post_init__(self):
        if self.flow and self.ve:
            raise ValueError("a Grid is VP, flow or VE: flow and ve cannot both be set")
        if len(self.sigmas) != len(self.timesteps) + 1:
            raise ValueError("a Grid has one sigma more than timesteps (the final one)")

    @classmethod
    def from_sigmas(cls, sigmas, flow: bool = False) -> "Grid":
        """A continuous-time grid: the model is given each step's sigma ratio itself as its time."""
        sigmas = tuple(float(s) for s in sigmas)
        return cls(timesteps=sigmas[:-1], sigmas=sigmas, flow=flow, discrete=False)

    @classmethod
    def uniform_lambda(cls, sigma_max: float, sigma_min: float, steps: int) -> "Grid":
        """`steps` steps uniform in lambda = -log sigma (VP) from sigma_max to sigma_min, continuous time."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        return cls.from_sigmas(np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), steps + 1)))

    def __len__(self) -> int:
        return len(self.timesteps)

    def alpha_sigma(self, i: int) -> tuple[float, float]:
        s = self.sigmas[i]
        if self.ve:
            return 1.0, s
        return (1.0 - s, s) if self.flow else sigma_to_alpha_sigma(s)

    def lam(self, i: int) -> float:
        alpha, sigma = self.alpha_sigma(i)
        return math.inf if sigma == 0 else math.log(alpha) - math.log(sigma)

    def repeated(self, points) -> str | None:
        """Why a step whose divided differences use the grid points `points` is undefined: two of them have the
        same sigma (a repeated timestep), and it would divide by the zero length between them; None if none."""
        points = sorted(points)
        for j, k in zip(points, points[1:]):
            if self.lam(j) == self.lam(k):
                return (f"the update divides by the zero length between grid points {j} and {k} "
                        f"(sigma {self.sigmas[j]:.6g} repeats at timesteps {self.timesteps[j]!r}, "
                        f"{self.timesteps[k] if k < len(self.timesteps) else 'final'!r})")
        return None


def multistep_timesteps(schedule: VP, steps: int, spacing: str, steps_offset: int = 0) -> np.ndarray:
    """The multistep schedulers' grid (DPMSolverMultistep, UniPC, DEIS): the DDIM grid of steps + 1 points
    without its last (t = 0) point, except "trailing", which is the DDIM trailing grid."""
    n = schedule.num_train_timesteps
    if spacing == "trailing":
        t = discrete_timesteps(n, steps, spacing)
    elif spacing == "linspace":
        discrete_timesteps(n, steps, spacing)  # checks steps and spacing
        t = np.linspace(0, n - 1, steps + 1).round()[::-1][:-1].copy().astype(np.int64)
    else:
        t = discrete_timesteps(n, steps + 1, spacing, steps_offset)[:-1].copy()
    if len(np.unique(t)) != len(t):
        raise ValueError(f"steps={steps} repeats timesteps on the {spacing!r} grid of {n}; use fewer steps")
    return t


def multistep_grid(schedule: VP, steps: int, *, timestep_spacing: str = "linspace", steps_offset: int = 0,
                   sigmas: str = "default", final_sigmas_type: str = "zero") -> Grid:
    """The Grid of diffusers' multistep schedulers on a VP schedule; final sigma 0 ("zero"), the smallest
    training sigma ("sigma_min") or the grid's own last sigma ("last", DEIS)."""
    if final_sigmas_type not in FINAL_SIGMAS:
        raise ValueError(f"final_sigmas_type must be one of {FINAL_SIGMAS}, got {final_sigmas_type!r}")
    t, ratios = sigma_grid(schedule, multistep_timesteps(schedule, steps, timestep_spacing, steps_offset), sigmas)
    if sigmas in ("karras", "lu"):  # then cast to int64, as diffusers does (truncating the other spacings)
        t = t.round()
    final = {"zero": 0.0, "sigma_min": schedule.sigma_ratio(0), "last": ratios[-1]}[final_sigmas_type]
    ratios = [float(np.float32(r)) for r in list(ratios) + [final]]  # diffusers keeps its sigmas in float32
    return Grid(timesteps=tuple(int(v) for v in t.astype(np.int64)), sigmas=tuple(ratios))


def continuous_grid(schedule: VPContinuous, steps: int, spacing: str = "logsnr", final: str = "zero") -> Grid:
    """`steps` steps from t = 1 to t = eps (spacing "time" or "logsnr") on a continuous VP schedule; with
    final="zero" the last step lands on sigma = 0 instead of t = eps. The model gets t."""
    if final not in ("zero", "eps"):
        raise ValueError(f"final must be 'zero' or 'eps', got {final!r}")
    times = schedule.times(steps, spacing)
    sigmas = [schedule.sigma_ratio(t) for t in times]
    if final == "zero":
        sigmas[-1] = 0.0
    return Grid(timesteps=tuple(times[:-1]), sigmas=tuple(sigmas), discrete=False)
