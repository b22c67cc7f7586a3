"""Levenberg-Marquardt-Langevin (Wang et al., ICCV 2025): each step's direction g is preconditioned by a
damped low-rank approximation of the Hessian, at no extra model call.

Per sample, with U = [u_1..u_r] built from the solver's recent raw directions g_n, g_{n-1}, ...:

    u_j  = kappa g_{n-j} + (1 - kappa) g_{n-j+1}      (j <= n;  u_{n+1} = g_0, the first step's u = g)
    g'   = g - U (lambda I_r + U^T U)^{-1} U^T g       (= lambda (lambda I + U U^T)^{-1} g, Woodbury)
    g''  = g' ||g|| / ||g'||                           (g'' = g when g = 0)

and the step uses g'' in place of g. Rank 1 is the authors' formula g - u <g, u> / (lambda + <u, u>).
Everything is linear in the basis V = [g_n, dirs[0..R-1]] (the ring of the last R raw directions), so one
read-only pass computes the Gram matrix V^T V per sample (ops.lml_gram), an r x r solve on the device gives
the coefficients (no host sync), and the fused update applies x' += scale (g'' - g) without writing g''
(ops.multistep_update's dirs arguments), recording g in the ring.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import ops
from .ops import MAX_DIRECTIONS
from .solvers.plan import Plan, Step

MODES = ("direction",)


@dataclass(frozen=True)
class LML:
    """LML options for ``diffsampler.sample(..., lml=LML(...))``.

    damping: lambda > 0 (the authors recommend about 1e-3 for Stable Diffusion, 0.005 for CelebA-HQ DDIM,
        0.01 for FLUX Euler); kappa in [0, 1]: weight of the previous direction in u (kappa = 0 makes u = g and
        LML the identity); rank: directions kept (1 is the paper's method, up to 4); freeze: no correction at
        the model times t >= (1 - freeze) T (T: the schedule's num_train_timesteps, 1 for continuous time).
    """

    damping: float = 1.0
    kappa: float = 0.5
    rank: int = 1
    freeze: float = 0.0
    mode: str = "direction"

    def __post_init__(self):
        if not self.damping > 0:
            raise ValueError(f"LML damping must be > 0, got {self.damping}")
        if not 0 <= self.kappa <= 1:
            raise ValueError(f"LML kappa must be in [0, 1], got {self.kappa}")
        if not isinstance(self.rank, int) or not 1 <= self.rank <= MAX_DIRECTIONS:
            raise ValueError(f"LML rank must be an integer in [1, {MAX_DIRECTIONS}], got {self.rank!r}")
        if not 0 <= self.freeze <= 1:
            raise ValueError(f"LML freeze must be in [0, 1], got {self.freeze}")
        if self.mode not in MODES:
            raise ValueError(f"LML mode must be one of {MODES}, got {self.mode!r}")


def mixing(n: int, rank: int, kappa: float) -> list[list[float]]:
    """U in the basis [g_n, dirs[0..rank-1]] at step n (0-based): a (1 + rank) x min(rank, n + 1) matrix.

    g_{n-j} (j >= 1) lives in ring slot (n - j) % rank, i.e. basis row 1 + (n - j) % rank."""
    def row(j: int) -> int:  # basis row of g_{n-j}
        return 0 if j == 0 else 1 + (n - j) % rank

    cols = []
    for j in range(1, min(rank, n + 1) + 1):
        col = [0.0] * (1 + rank)
        if j <= n:
            col[row(j)] += kappa
            col[row(j - 1)] += 1.0 - kappa
        else:  # j = n + 1: the first step's u = g_0
            col[row(n)] = 1.0
        cols.append(col)
    return [list(r) for r in zip(*cols)]


def correction_weights(gram: torch.Tensor, mix: torch.Tensor, damping: float, scale: float) -> torch.Tensor:
    """Per-sample weights W (B, 1 + R) with scale (g'' - g) = V W^T, from G = V^T V (B, 1 + R, 1 + R).

    In the basis V: g = e_0, U = V C, so U^T U = C^T G C and U^T g = C^T G e_0; w solves
    (lambda I + C^T G C) w = C^T G e_0 (torch.linalg.solve_ex: no host sync), g' = V c with c = e_0 - C w,
    ||g'||^2 = c^T G c, ||g||^2 = G_00, and W = scale (||g|| / ||g'|| c - e_0); W = 0 where ||g'|| = 0.
    """
    g = gram.to(torch.float64)
    c_mat = mix.to(g)
    a = c_mat.T @ g @ c_mat
    a = a + damping * torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    rhs = (c_mat.T @ g[:, :, :1])
    w, _ = torch.linalg.solve_ex(a, rhs)
    e0 = torch.zeros(g.shape[-1], 1, dtype=g.dtype, device=g.device)
    e0[0] = 1.0
    c = e0 - c_mat @ w  # (B, 1 + R, 1)
    n2 = (c.transpose(1, 2) @ g @ c).view(-1)
    g2 = g[:, 0, 0]
    ok = n2 > 0
    s = torch.where(ok, torch.sqrt(g2 / torch.where(ok, n2, 1.0)), 1.0)
    weights = scale * (s.view(-1, 1) * c.squeeze(-1) - e0.view(1, -1))
    return torch.where(ok.view(-1, 1), weights, 0.0)


class LMLRun:
    """LML's state over one sampling loop: the ring of raw directions and the per-step mixing matrices."""

    def __init__(self, lml: LML, plan: Plan, x: torch.Tensor, time_scale: float):
        self.lml = lml
        self.dirs = torch.zeros((lml.rank, *x.shape), dtype=x.dtype, device=x.device)
        self.active = [step.t < (1.0 - lml.freeze) * time_scale for step in plan.steps]
        self._mix: dict[int, torch.Tensor] = {}

    def mixing(self, i: int) -> torch.Tensor:
        """mixing(i) as a device tensor; past the warm-up it depends on i only through i % rank (cached)."""
        r = self.lml.rank
        key = i if i < r else r + i % r
        if key not in self._mix:
            self._mix[key] = torch.tensor(mixing(i, r, self.lml.kappa), dtype=torch.float64, device=self.dirs.device)
        return self._mix[key]

    def update_args(self, i: int, step: Step, x: torch.Tensor, out: torch.Tensor, history, clip, backend) -> dict:
        """ops.multistep_update's dirs arguments for step i (one lml_gram pass and a tiny solve when active)."""
        d = step.lml_direction()
        dir_coeffs = [d.x, d.out, *d.b]
        weights = None
        if self.active[i]:
            gram = ops.lml_gram(x, out, step.coeffs, self.dirs, dir_coeffs, history=history,
                                read_slots=step.read_slots, clip=clip, backend=backend)
            weights = correction_weights(gram, self.mixing(i), self.lml.damping, d.scale)
        return dict(dirs=self.dirs, dir_slot=i % self.lml.rank, dir_coeffs=dir_coeffs, dir_weights=weights)
