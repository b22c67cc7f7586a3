"""Levenberg-Marquardt-Langevin (Wang et al., ICCV 2025): each step's direction d is preconditioned by a
damped low-rank approximation of the Hessian, at no extra model call.

Per sample, with U = [u_1..u_r] built from the solver's recent raw directions d_n, d_{n-1}, ...:

    u_j  = kappa d_{n-j} + (1 - kappa) d_{n-j+1}      (j <= n;  u_{n+1} = d_0, the first step's u = d)
    d'   = d - U (lambda I_r + U^T U)^{-1} U^T d       (= lambda (lambda I + U U^T)^{-1} d, Woodbury)
    d''  = d' ||d|| / ||d'||                           (d'' = d when d = 0)

and the step uses d'' in place of d. Rank 1 is the authors' formula d - u <d, u> / (lambda + <u, u>).
With kappa = 0 and rank 1, u = d and d'' = d: the identity. With rank r > 1, U also holds the past directions.
Everything is linear in the basis V = [d_n, dirs[0..R-1]] (the ring of the last R raw directions), so one
read-only pass computes the Gram matrix Gram = V^T V per sample (ops.lml_gram), an r x r solve on the device
gives the coefficients (no host sync), and the fused update applies x' += scale (d'' - d) without writing d''
(ops.multistep_update's dirs arguments), recording d in the ring.

mode="corrector" adds the Langevin half the authors' code leaves out: at each noise level, before the solver
step, n_steps Langevin corrections (score-SDE's corrector, n_steps extra model calls per level)
preconditioned by P = (lambda I + U U^T)^{-1}, U from the directions of the previous steps:

    x += eps P s + sqrt(2 eps) P^{1/2} z,   eps = 2 alpha_t (snr mean_b ||P^{1/2} z|| / mean_b ||P s||)^2

(alpha_t = 1 - beta_t; with P = I this is score-SDE's step size rule, and measured on the preconditioned
vectors it does not depend on the scale of P), P s = (s - U (lambda I + U^T U)^{-1} U^T s) / lambda and
P^{1/2} z = (z - U Q diag(c_k / l_k) Q^T U^T z) / sqrt(lambda), U^T U = Q diag(l) Q^T,
c_k = 1 - sqrt(lambda / (lambda + l_k)). The solver steps themselves are not corrected in this mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import checks, ops, reference
from .solvers.plan import Plan, Step

MODES = ("direction", "corrector")
MAX_RANK = 4


@dataclass(frozen=True)
class LML:
    """LML options for ``diffsampler.sample(..., lml=LML(...))``.

    damping: lambda > 0 (the authors recommend about 1e-3 for Stable Diffusion, 0.005 for CelebA-HQ DDIM,
        0.01 for FLUX Euler); kappa in [0, 1]: weight of the previous direction in u (kappa = 0 makes u = d and
        LML the identity); rank: directions kept (1 is the paper's method, up to 4); freeze: no correction at
        the model times t >= (1 - freeze) T (T: the schedule's num_train_timesteps, 1 for continuous time).
    """

    damping: float = 1.0
    kappa: float = 0.5
    rank: int = 1
    freeze: float = 0.0
    mode: str = "direction"
    snr: float = 0.16
    n_steps: int = 1

    def __post_init__(self):
        checked = dict(damping=checks.real("LML damping", self.damping, "(0, inf)"),
                       kappa=checks.real("LML kappa", self.kappa, "[0, 1]"),
                       rank=checks.integer("LML rank", self.rank, 1, MAX_RANK),
                       freeze=checks.real("LML freeze", self.freeze, "[0, 1]"),
                       snr=checks.real("LML snr", self.snr, "(0, inf)"),
                       n_steps=checks.integer("LML n_steps", self.n_steps, 1))
        if self.mode not in MODES:
            raise ValueError(f"LML mode must be one of {MODES}, got {self.mode!r}")
        for name, value in checked.items():  # a frozen dataclass: plain ints and floats from here on
            object.__setattr__(self, name, value)


def mixing(n: int, rank: int, kappa: float) -> list[list[float]]:
    """U in the basis [d_n, dirs[0..rank-1]] at step n (0-based): a (1 + rank) x min(rank, n + 1) matrix.

    d_{n-j} (j >= 1) lives in ring slot (n - j) % rank, i.e. basis row 1 + (n - j) % rank."""
    def row(j: int) -> int:  # basis row of d_{n-j}
        return 0 if j == 0 else 1 + (n - j) % rank

    cols = []
    for j in range(1, min(rank, n + 1) + 1):
        col = [0.0] * (1 + rank)
        if j <= n:
            col[row(j)] += kappa
            col[row(j - 1)] += 1.0 - kappa
        else:  # j = n + 1: the first step's u = d_0
            col[row(n)] = 1.0
        cols.append(col)
    return [list(r) for r in zip(*cols)]


def correction_weights(gram: torch.Tensor, mix: torch.Tensor, damping: float, scale: float,
                       backend: str = "auto") -> torch.Tensor:
    """Per-sample weights W (B, 1 + R) with scale (d'' - d) = V W^T, from Gram = V^T V (B, 1 + R, 1 + R).

    In the basis V: d = e_0, U = V C, so U^T U = C^T Gram C and U^T d = C^T Gram e_0; w solves
    (lambda I + C^T Gram C) w = C^T Gram e_0, d' = V c with c = e_0 - C w, ||d'||^2 = c^T Gram c,
    ||d||^2 = Gram_00, and W = scale (||d|| / ||d'|| c - e_0); W = 0 where ||d'|| = 0 (ops.lml_weights: one C++
    call on the CPU, torch ops without a host sync on other devices).
    """
    return ops.lml_weights(gram.to(torch.float64), mix.to(torch.float64), damping, scale, backend=backend)


def corrector_mixing(n: int, rank: int, kappa: float, slots: int) -> list[list[float]]:
    """U at noise level n in the corrector's basis [s, ring_0..ring_{slots-1}, z], with the directions
    d_0..d_{n-1} of the steps before recorded (d_m in ring slot m % slots): a (slots + 2) x min(rank, n) matrix,
    the u_j the direction mode would use at step n - 1."""
    cols = []
    for j in range(1, min(rank, n) + 1):
        col = [0.0] * (slots + 2)
        if j < n:
            col[1 + (n - 1 - j) % slots] += kappa
            col[1 + (n - j) % slots] += 1.0 - kappa
        else:  # j = n: the first step's u = d_0
            col[1] = 1.0
        cols.append(col)
    return [list(r) for r in zip(*cols)] if cols else [[] for _ in range(slots + 2)]


def corrector_weights(gram: torch.Tensor, mix: torch.Tensor, damping: float, snr: float, alpha: float):
    """Weights W (B, M) of one preconditioned Langevin step x += V W^T in the basis V = [s, ring.., z] (M terms)
    from Gram = V^T V: W = eps ps + sqrt(2 eps) pz with P s = V ps and P^{1/2} z = V pz (module docstring)."""
    gram = gram.to(torch.float64)
    m = gram.shape[-1]
    eye = torch.eye(m, dtype=gram.dtype, device=gram.device)
    ps = eye[:, :1].expand(gram.shape[0], m, 1) / damping
    pz = eye[:, -1:].expand(gram.shape[0], m, 1) / damping**0.5
    c = mix.to(gram)
    if c.shape[-1]:
        a = c.T @ gram @ c
        ps = ps - c @ reference.damped_solve(a, c.T @ gram[:, :, :1], damping) / damping
        lam, q = torch.linalg.eigh(a)
        root = (lam.clamp_min(0) + damping).sqrt()
        f = 1.0 / (root * (root + damping**0.5))  # c_k / l_k, finite at l_k = 0
        pz = pz - c @ (q @ (f.unsqueeze(-1) * (q.transpose(1, 2) @ (c.T @ gram[:, :, -1:])))) / damping**0.5
    norm_s = (ps.transpose(1, 2) @ gram @ ps).view(-1).clamp_min(0).sqrt().mean()
    norm_z = (pz.transpose(1, 2) @ gram @ pz).view(-1).clamp_min(0).sqrt().mean()
    eps = torch.where(norm_s > 0, 2 * alpha * (snr * norm_z / norm_s.clamp_min(1e-300)) ** 2, 0.0)
    return (eps * ps + (2 * eps).sqrt() * pz).squeeze(-1)


class LMLRun:
    """LML's state over one sampling loop: the ring of raw directions and the per-step mixing matrices."""

    def __init__(self, lml: LML, plan: Plan, x: torch.Tensor, time_scale: float | None = None, schedule=None,
                 prediction: str = "eps"):
        if any(step.coeffs is None for step in plan.steps):
            raise ValueError("lml needs a solver whose step is the fused multistep update; dpmv3's per-element "
                             "coefficients (ems_update) have no LML path")
        self.lml = lml
        self.corrector = lml.mode == "corrector"
        # corrector: rank + 1 recorded directions (u_r needs d_{n-1-r}) and a slot for the noise
        self.slots = lml.rank + 1 if self.corrector else lml.rank
        self.dirs = torch.zeros((self.slots + self.corrector, *x.shape), dtype=x.dtype, device=x.device)
        if time_scale is None:  # T of the freeze option: the largest model time of the plan
            time_scale = max(abs(float(step.t)) for step in plan.steps)
        self.active = [lml.freeze == 0 or step.t < (1.0 - lml.freeze) * time_scale for step in plan.steps]
        if self.corrector:
            from .schedules import VP

            if not (isinstance(schedule, VP) and plan.discrete_time and plan.init_scale == 1.0
                    and all(step.input_scale == 1.0 for step in plan.steps)):
                raise ValueError("LML mode 'corrector' needs a discrete VP schedule and a solver sampling in the "
                                 f"VP scale (ddim, dpm*, unipc, deis, ghvb); got {schedule!r}")
            self.schedule, self.prediction = schedule, prediction
        # every mixing matrix the loop will use, uploaded now: none inside the loop (no host-to-device copy)
        self._mix: dict[int, torch.Tensor] = {}
        for i in range(len(plan.steps)):
            if self._key(i) not in self._mix:
                self._mix[self._key(i)] = self._mixing(i, x.device)

    def _key(self, i: int) -> int:
        """Once the ring is full (step `slots` on) a mixing matrix depends on the step only through its ring
        position."""
        return i if i < self.slots else self.slots + i % self.slots

    def _mixing(self, i: int, device) -> torch.Tensor:
        lml = self.lml
        if self.corrector:
            m = corrector_mixing(i, lml.rank, lml.kappa, self.slots)
            return torch.tensor(m, dtype=torch.float64, device=device).view(self.slots + 2, -1)
        return torch.tensor(mixing(i, lml.rank, lml.kappa), dtype=torch.float64, device=device)

    def mixing(self, i: int) -> torch.Tensor:
        """The mixing matrix of step i (direction mode: lml.mixing; corrector: lml.corrector_mixing)."""
        return self._mix[self._key(i)]

    def update_args(self, i: int, step: Step, x: torch.Tensor, out: torch.Tensor, history, clip, backend,
                    guide=None, guide_scale: float = 0.0) -> dict:
        """ops.multistep_update's dirs arguments for step i (one lml_gram pass and a tiny solve when active;
        in corrector mode the direction is only recorded); guide: the update's guide (out + guide_scale guide)."""
        d = step.lml_direction()
        dir_coeffs = [d.x, d.out, *d.b]
        weights = None
        if self.active[i] and not self.corrector:
            gram = ops.lml_gram(x, out, step.coeffs, self.dirs, dir_coeffs, history=history,
                                read_slots=step.read_slots, clip=clip, guide=guide, guide_scale=guide_scale,
                                backend=backend)
            weights = correction_weights(gram, self.mixing(i), self.lml.damping, d.scale, backend)
        if self.corrector:
            weights = torch.zeros(x.shape[0], self.dirs.shape[0] + 1, dtype=torch.float64, device=x.device)
        return dict(dirs=self.dirs, dir_slot=i % self.slots, dir_coeffs=dir_coeffs, dir_weights=weights)

    def correct(self, i: int, step: Step, x: torch.Tensor, evaluate, generator, backend):
        """Corrector mode: n_steps preconditioned Langevin steps at the noise level of step i (a model call, a
        Gram pass and one fused update each); x unchanged on frozen levels. evaluate(x) -> (out, guide, w): the
        model output at step i's time, with guidance's term out + w guide (guide None: none)."""
        if not self.active[i]:
            return x
        from .models import data_coeffs

        ts = int(step.t)
        alpha, sigma = self.schedule.alpha_sigma(ts)
        p, q = data_coeffs(self.prediction, alpha, sigma)
        score = [(alpha * p - 1.0) / sigma**2, alpha * q / sigma**2, 0.0]  # s = (alpha x0 - x) / sigma^2
        plain = ops.UpdateCoeffs(p=0.0, q=0.0, a=1.0, b=(0.0,))
        mix = self.mixing(i)
        step_alpha = 1.0 - float(self.schedule.betas[ts])
        z = self.dirs[-1]
        for _ in range(self.lml.n_steps):
            out, guide, gw = evaluate(x)
            z.copy_(torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32))
            gram = ops.lml_gram(x, out, plain, self.dirs, score, guide=guide, guide_scale=gw, backend=backend)
            w = corrector_weights(gram, mix, self.lml.damping, self.lml.snr, step_alpha)
            # x += W_0 s + sum_j W_j dirs[j]; the update records s over the used noise slot
            x = ops.multistep_update(x, out, plain, dirs=self.dirs, dir_slot=self.slots, dir_coeffs=score,
                                     dir_weights=w, guide=guide, guide_scale=gw, check_nan=False, backend=backend)
        return x
