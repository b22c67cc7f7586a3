"""Gaussian teleportation (Wang & Vastola, "The unreasonable effectiveness of Gaussian score approximation for
diffusion models and its applications"): replace the first steps of a sampler by the closed-form solution of the
probability-flow ODE of the Gaussian fitted to the data.

For x_t = alpha_t x0 + sigma_t eps and data N(mu, U diag(lam) U^T + lam_rest (I - U U^T)), the probability-flow
ODE keeps every standardised eigen-coordinate fixed, so from time s to time t

    x_t = alpha_t mu + sum_k g_k(s, t) u_k u_k^T (x_s - alpha_s mu) + g_rest(s, t) (I - U U^T) (x_s - alpha_s mu),
    g(s, t) = sqrt(alpha_t^2 lam + sigma_t^2) / sqrt(alpha_s^2 lam + sigma_s^2).

sample(..., teleport=tp, skip=k) moves x_T this way to the solver's grid point k and runs the solver over the
remaining grid (the solver restarts there: multistep solvers warm up again).
"""

from __future__ import annotations

import torch

from . import checks
from .schedules import EDM, VP, Flow, VPContinuous
from .solvers import SOLVERS, SolverSpec, solver_spec
from .solvers.dpm import flow_dpm_plan, flow_dpm_sigmas
from .solvers.grid import Grid, continuous_grid, multistep_grid

GRID_OPTIONS = ("timestep_spacing", "steps_offset", "sigmas", "final_sigmas_type")  # the VP grid's own options


class GaussianTeleport:
    """The Gaussian N(mean, U diag(eigvals) U^T + rest_var (I - U U^T)) in the model's data scale (x0 as the
    model sees it, e.g. images in [-1, 1]).

    mean: the data mean, any shape (flattened to dim = mean.numel()); eigvecs: (dim, rank) orthonormal columns;
    eigvals: (rank,) variances >= 0 along them; rest_var >= 0: the variance of each direction orthogonal to
    them (Wang & Vastola's code keeps all eigenpairs, so no remainder; a remainder of variance 0 shrinks as
    sigma_t / sigma_s)."""

    def __init__(self, mean: torch.Tensor, eigvals: torch.Tensor, eigvecs: torch.Tensor, rest_var: float = 0.0):
        for name, value in (("mean", mean), ("eigvals", eigvals), ("eigvecs", eigvecs)):
            if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                raise ValueError(f"{name} must be a floating-point tensor, got {type(value).__name__}")
        self.mean = mean.detach().to(torch.float64).reshape(-1)
        self.eigvals = eigvals.detach().to(torch.float64)
        self.eigvecs = eigvecs.detach().to(torch.float64)
        self.rest_var = checks.real("rest_var", rest_var, "[0, inf)")
        dim = self.mean.numel()
        if self.eigvecs.dim() != 2 or self.eigvecs.shape[0] != dim or self.eigvecs.shape[1] > dim:
            raise ValueError(f"eigvecs must have shape (dim, rank) with dim = mean.numel() = {dim} and rank <= dim, "
                             f"got {tuple(eigvecs.shape)}")
        if self.eigvals.shape != (self.eigvecs.shape[1],):
            raise ValueError(f"eigvals must have shape (rank,) = ({self.eigvecs.shape[1]},), one per column of "
                             f"eigvecs, got {tuple(eigvals.shape)}")
        if not (torch.isfinite(self.eigvals).all() and (self.eigvals >= 0).all()):
            raise ValueError("eigvals must be finite and >= 0")
        if not torch.isfinite(self.mean).all():
            raise ValueError("mean must be finite")
        gram = self.eigvecs.T @ self.eigvecs
        if not torch.allclose(gram, torch.eye(len(gram), dtype=torch.float64), atol=1e-6):
            raise ValueError("eigvecs must have orthonormal columns (eigvecs.T @ eigvecs = I)")
        self.shape = tuple(mean.shape)

    @property
    def dim(self) -> int:
        return self.mean.numel()

    @property
    def rank(self) -> int:
        return self.eigvecs.shape[1]

    @classmethod
    def fit(cls, samples: torch.Tensor, rank: int | None = None, rest_var: float | None = None) -> "GaussianTeleport":
        """The sample mean and the top `rank` eigenpairs of the sample covariance (unbiased, 1 / (n - 1)) of
        samples (n, *shape), by an SVD of the centred samples. rank None: every eigenpair the samples give
        (min(n, dim)). rest_var None: the mean of the discarded eigenvalues, (trace - sum of the kept) /
        (dim - rank), which keeps the total variance (0 when rank = dim)."""
        if not isinstance(samples, torch.Tensor) or not samples.is_floating_point() or samples.dim() < 2:
            raise ValueError(f"samples must be a floating-point tensor (n, *shape), got "
                             f"{getattr(samples, 'shape', type(samples).__name__)}")
        n = samples.shape[0]
        if n < 2:
            raise ValueError(f"samples needs at least 2 rows to estimate a covariance, got {n}")
        x = samples.detach().to(torch.float64).reshape(n, -1)
        if not torch.isfinite(x).all():
            raise ValueError("samples must be finite")
        dim = x.shape[1]
        rank = min(n, dim) if rank is None else checks.integer("rank", rank, 1, min(n, dim))
        mean = x.mean(0)
        _, s, vh = torch.linalg.svd(x - mean, full_matrices=False)
        eig = s**2 / (n - 1)
        if rest_var is None:
            rest_var = float((eig.sum() - eig[:rank].sum()).clamp(min=0) / (dim - rank)) if rank < dim else 0.0
        return cls(mean.reshape(samples.shape[1:]), eig[:rank], vh[:rank].T.contiguous(), rest_var)

    def apply(self, x: torch.Tensor, start: tuple[float, float], end: tuple[float, float]) -> torch.Tensor:
        """The probability-flow ODE solution of the Gaussian from x at start = (alpha_s, sigma_s) to end =
        (alpha_t, sigma_t) (the module's equation), computed in float64, returned in x's dtype."""
        checks.sample_tensor(x)
        if x[0].numel() != self.dim:
            raise ValueError(f"x must have {self.dim} elements per sample (the teleport's mean has shape "
                             f"{self.shape}), got x.shape = {tuple(x.shape)}")
        (a_s, s_s), (a_t, s_t) = start, end
        checks.real("start sigma", s_s, "(0, inf)")
        mean, vecs = self.mean.to(x.device), self.eigvecs.to(x.device)
        d = x.reshape(len(x), -1).to(torch.float64) - a_s * mean
        coords = d @ vecs
        gain = ((a_t**2 * self.eigvals + s_t**2) / (a_s**2 * self.eigvals + s_s**2)).sqrt().to(x.device)
        gain_rest = ((a_t**2 * self.rest_var + s_t**2) / (a_s**2 * self.rest_var + s_s**2)) ** 0.5
        out = a_t * mean + (coords * gain) @ vecs.T + gain_rest * (d - coords @ vecs.T)
        return out.reshape(x.shape).to(x.dtype)

    def __repr__(self) -> str:
        return f"GaussianTeleport(dim={self.dim}, rank={self.rank}, rest_var={self.rest_var:.4g})"


def solver_grid(solver: str, schedule, steps, options: dict):
    """(the Grid of the solver's points, whether the rest runs as a sigmas= list): a sigmas= list itself, EDM's
    Karras sigmas, Flow's sigmas (flow_dpmpp_2m's own grid), a VPContinuous grid, or on a discrete VP schedule
    the multistep schedulers' grid (integer timesteps; options timestep_spacing, steps_offset, sigmas,
    final_sigmas_type)."""
    spec = solver_spec(solver)
    explicit = options.get("sigmas")
    listed = explicit is not None and not isinstance(explicit, str)
    if listed or isinstance(schedule, (EDM, Flow)):
        if not isinstance(schedule, (EDM, Flow, VP)):
            raise ValueError(f"sigmas= a list needs a VP, EDM or Flow schedule, got {schedule!r}")
        if listed:
            sigmas = checks.sigmas(explicit)
        elif spec.plans.get(Flow) is flow_dpm_plan:
            sigmas = flow_dpm_sigmas(schedule, checks.integer("steps", steps, 1))
        else:
            sigmas = [float(s) for s in schedule.sigmas(checks.integer("steps", steps, 1))]
        return Grid(timesteps=tuple(sigmas[:-1]), sigmas=tuple(sigmas), flow=isinstance(schedule, Flow),
                    ve=isinstance(schedule, EDM), discrete=False), True
    steps = checks.integer("steps", steps, 1)
    if isinstance(schedule, VPContinuous):
        return continuous_grid(schedule, steps, options.get("spacing", "logsnr"),
                               options.get("final", spec.grid_final)), False
    if isinstance(schedule, VP):
        if Grid not in spec.plans and spec.grid_steps is None:
            takes = ", ".join(n for n, s in SOLVERS.items() if Grid in s.plans or s.grid_steps is not None)
            raise ValueError(f"teleport on a discrete VP schedule runs the remaining steps on a Grid; solver "
                             f"{solver!r} does not take one (solvers that do: {takes}; or use an EDM schedule)")
        final = spec.presets.get("final_sigmas_type", "zero" if spec.grid_final == "zero" else "sigma_min")
        grid = {k: options[k] for k in GRID_OPTIONS if k in options}
        return multistep_grid(schedule, steps, **{"final_sigmas_type": final, **grid}), False
    raise ValueError(f"teleport needs a VP, VPContinuous, EDM or Flow schedule, got {schedule!r}")


def teleported(teleport, skip, x: torch.Tensor, solver: str, schedule, prediction, steps, options: dict):
    """(x, schedule, prediction, steps, options) of the sample() call that runs `solver` over its grid from
    point `skip` on, x teleported there: x_T = x at the grid's first point (sigma_max x in the VE scale of
    EDM), x_skip = teleport.apply(x_T, point 0, point skip), handed to the remaining run in its scale."""
    if not isinstance(teleport, GaussianTeleport):
        raise ValueError(f"teleport must be a diffsampler.GaussianTeleport, got {type(teleport).__name__}")
    if skip is None:
        raise ValueError("teleport needs skip= the number of the solver's leading steps it replaces")
    if schedule is None:
        schedule = solver_spec(solver).default_schedule()
    if prediction is None:
        prediction = SolverSpec.default_prediction(schedule)
    grid, listed = solver_grid(solver, schedule, steps, options)
    skip = checks.integer("skip", skip, 0, len(grid) - 1)
    scale0, scale = (grid.sigmas[0], grid.sigmas[skip]) if grid.ve else (1.0, 1.0)
    x = teleport.apply(x * scale0 if scale0 != 1.0 else x, grid.alpha_sigma(0), grid.alpha_sigma(skip)) / scale
    if listed:
        return x, schedule, prediction, None, dict(options, sigmas=list(grid.sigmas[skip:]))
    used = ("spacing", "final") if isinstance(schedule, VPContinuous) else GRID_OPTIONS  # the grid's, now in it
    options = {k: v for k, v in options.items() if k not in used}
    rest = Grid(timesteps=grid.timesteps[skip:], sigmas=grid.sigmas[skip:], discrete=grid.discrete)
    return x, rest, prediction, len(rest), options
