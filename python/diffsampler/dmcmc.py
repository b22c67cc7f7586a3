"""Denoising MCMC (Kim & Ye 2022): Denoising Langevin Gibbs (DLG) on x = x0 + sigma eps (EDM / VE scale).

A chain is a pair (x, l) with l an index into a descending noise-level set sigma_0 > ... > sigma_{L-1} > 0:

    Langevin on x at its own level:  x' = x + eps_l (D(x, sigma_l) - x) / sigma_l^2 + sqrt(2 eps_l) z,
                                     eps_l = eta_l / 2   (the authors' x + eta/2 score + sqrt(eta) z)
    Gibbs on the level:              l' = argmax_l p(l | x')   (gibbs="sample": l' ~ p(l | x'))

Per round (`DLG.sample`) every chain takes n_langevin Langevin-Gibbs steps and keeps the state of the lowest
noise level it visited (ties: the latest); then each kept state is denoised by a reverse-ODE solver from its
own sigma_l: a K-step grid (Karras, rho) from sigma_l to sigma_min, then 0, optionally followed by a Tweedie
step x = D(x, tweedie). Chains persist across rounds.

Fused: every step is one ops.multistep_update_indexed over a single step table of L Langevin rows, L x n
denoising rows (the plan of each level's grid; each has the same n steps) and a Tweedie row; sample b reads row
l_b (Langevin) or L + l_b n + k (denoising step k). Levels stay on the device: no host sync per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import checks, classifiers, error_flags, ops
from .models import check_prediction, data_coeffs
from .sample import scale_table, scaled_input, time_table
from .schedules import EDM, VP, karras_sigmas
from .solvers import Grid, Plan, make_plan, solver_spec

GIBBS = ("argmax", "sample", "fixed")
VE_PREDICTIONS = ("x0", "eps", "score")


@dataclass(frozen=True)
class NFE:
    """Calls made: of the score model (Langevin, denoising, Tweedie) and of the noise-level classifier."""

    score: int = 0
    classifier: int = 0

    @property
    def total(self) -> int:
        return self.score + self.classifier

    def __add__(self, other: "NFE") -> "NFE":
        return NFE(self.score + other.score, self.classifier + other.classifier)


def noise_levels(sigma_max: float, sigma_min: float = 0.01, levels: int = 1000) -> list[float]:
    """The authors' level set: sigma_i = sigma_min (sigma_max / sigma_min)^{t_i}, t = linspace(1, 1e-3, levels)."""
    sigma_max = checks.real("sigma_max", sigma_max, "(0, inf)")
    sigma_min = checks.real("sigma_min", sigma_min, "(0, inf)")
    if not sigma_min < sigma_max:
        raise ValueError(f"sigma_min must be < sigma_max, got {sigma_min} and {sigma_max}")
    levels = checks.integer("levels", levels, 2)
    t = torch.linspace(1.0, 1e-3, levels, dtype=torch.float64)
    return (sigma_min * (sigma_max / sigma_min) ** t).tolist()


def langevin_coeffs(prediction: str, sigma: float, eps: float) -> ops.UpdateCoeffs:
    """x' = x + eps (D - x) / sigma^2 + sqrt(2 eps) z with the denoiser D = p x + q out (alpha = 1)."""
    p, q = data_coeffs(prediction, 1.0, sigma)
    w = eps / sigma**2
    return ops.UpdateCoeffs(p=p, q=q, a=1.0 - w, b=(w,), c=math.sqrt(2.0 * eps))


def denoise_grid(sigma: float, sigma_min: float, steps: int, rho: float) -> list[float]:
    """`steps` Karras sigmas from sigma down to sigma_min, then 0."""
    return [float(s) for s in karras_sigmas(sigma_min, sigma, steps, rho)] + [0.0]


def denoise_plan(solver: str, sigmas: list[float], prediction: str, options: dict) -> Plan:
    """The plan of `solver` over the VE grid `sigmas`: on EDM (sigmas= a list) where the solver runs on EDM, else
    on a VE Grid (the multistep solvers, e.g. dpmpp_2m in k-diffusion's form)."""
    spec = solver_spec(solver)
    if EDM in spec.plans:
        plan = make_plan(solver, EDM(), None, prediction, sigmas=sigmas, **options)
    elif spec.grid_steps is not None or Grid in spec.plans:
        grid = Grid(timesteps=tuple(sigmas[:-1]), sigmas=tuple(sigmas), ve=True, discrete=False)
        plan = make_plan(solver, grid, len(sigmas) - 1, prediction, **options)
    else:
        raise ValueError(f"solver {solver!r} runs neither on an EDM schedule nor on a VE grid; pick e.g. 'heun', "
                         "'euler' or 'dpmpp_2m'")
    plan.check_defined()
    if plan.mean_state or any(s.tensor_coeffs is not None for s in plan.steps):
        raise ValueError(f"solver {solver!r}: its steps cannot be indexed per chain (mean-reverting or DPM-Solver-v3)")
    return plan


def exact_classifier(target, sigmas, log_prior=None):
    """The exact p(l | x) of a targets.GaussianMixture over the levels `sigmas`: logits (B, L) =
    log prior_l + log p_{sigma_l}(x), p_sigma = sum_k w_k N(mu_k, (s_k^2 + sigma^2) I); uniform prior by default."""
    sig = torch.tensor(checks.reals("sigmas", sigmas, "(0, inf)"), dtype=torch.float64)
    prior = torch.zeros(len(sig), dtype=torch.float64) if log_prior is None else torch.as_tensor(
        log_prior, dtype=torch.float64)
    if prior.shape != sig.shape:
        raise ValueError(f"log_prior must have one entry per level ({len(sig)}), got shape {tuple(prior.shape)}")
    var = target.stds**2 + sig[:, None] ** 2  # (L, K)

    def classifier(x: torch.Tensor) -> torch.Tensor:
        xd = x.double().reshape(x.shape[0], -1)
        d2 = ((xd[:, None, :] - target.means.to(xd.device)) ** 2).sum(-1)  # (B, K)
        v = var.to(xd.device)
        log_joint = (target.weights.log().to(xd.device) - 0.5 * d2[:, None, :] / v
                     - 0.5 * target.dim * torch.log(2 * math.pi * v))  # (B, L, K)
        return torch.logsumexp(log_joint, dim=2) + prior.to(xd.device)

    return classifier


def vp_denoiser(model, schedule):
    """The VE denoiser D(x, sigma) of a noise-prediction model(x_t, t) on a discrete VP `schedule` (a
    schedules.VP): x_t = alpha x with alpha = 1 / sqrt(1 + sigma^2), at the fractional training timestep whose
    sigma ratio sigma_t / alpha_t is sigma (linear in log sigma between training timesteps), and
    D = x - sigma eps(x_t, t). sigma: a (B,) tensor or a scalar; returned in x's dtype."""
    checks.model(model)
    if not isinstance(schedule, VP):
        raise ValueError(f"schedule must be a discrete diffsampler.schedules.VP, got {schedule!r}")
    log_train = schedule.train_sigmas().double().log()

    def denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1).expand(x.shape[0])
        logs, grid = s.log(), log_train.to(x.device)
        i = torch.searchsorted(grid, logs).clamp(1, len(grid) - 1)
        t = (i - 1) + ((logs - grid[i - 1]) / (grid[i] - grid[i - 1])).clamp(0, 1)
        view = (-1, *[1] * (x.dim() - 1))
        alpha = (1 + s * s).rsqrt().view(view)
        eps = model((alpha * x.double()).to(x.dtype), t.to(torch.float64 if x.dtype == torch.float64 else
                                                            torch.float32))
        return (x.double() - s.view(view) * eps.double()).to(x.dtype)

    return denoiser


class DLG:
    """Denoising Langevin Gibbs: ``dlg = DLG(model, classifier, sigmas)``, ``dlg.init(x)``, then
    ``x0, nfe = dlg.sample()`` per round (or ``dlg.run(rounds)``).

    model(x, t): the denoiser at sigma = t (a (B,) tensor: each chain's own), returning `prediction` ("x0":
    D(x, sigma), "eps", "score"; alpha = 1). classifier(x) -> logits (B, L) of p(l | x) over `sigmas`
    (descending, > 0); None with gibbs="fixed" (each chain keeps its level). eta: the Langevin noise variance
    (a number, the authors' fixed step, or one per level). n_langevin: Langevin-Gibbs steps per round.
    solver, steps, sigma_min, rho, solver_options: the denoising (diffsampler solver name on a K-step Karras grid
    from each chain's sigma to sigma_min, then 0); tweedie: None, or the sigma of a final x = D(x, tweedie).
    generator: of the Langevin noise, the sampled levels and stochastic solvers' noise."""

    def __init__(self, model, classifier, sigmas, *, eta=0.8, n_langevin: int = 10, gibbs: str = "argmax",
                 solver: str = "heun", steps: int = 10, sigma_min: float = 0.01, rho: float = 7.0,
                 tweedie: float | None = None, prediction: str = "x0", generator: torch.Generator | None = None,
                 backend: str = "auto", **solver_options):
        self.model = checks.model(model)
        if gibbs not in GIBBS:
            raise ValueError(f"gibbs must be one of {GIBBS}, got {gibbs!r}")
        if classifier is None and gibbs != "fixed":
            raise ValueError(f"classifier must be a callable classifier(x) -> logits (B, L) with gibbs={gibbs!r}; "
                             "None only with gibbs='fixed'")
        checks.optional_callable("classifier", classifier, "classifier(x) -> logits (B, L)")
        self.classifier, self.gibbs = classifier, gibbs
        self.sigmas = checks.sigmas(sigmas, strict=True)
        if self.sigmas[-1] <= 0:
            raise ValueError(f"sigmas must all be > 0 (noise levels of the classifier), got {self.sigmas[-1]} last")
        L = len(self.sigmas)
        if isinstance(eta, (list, tuple, torch.Tensor)):
            etas = checks.reals("eta", eta, "(0, inf)")
            if len(etas) != L:
                raise ValueError(f"eta must be a number or one per level ({L}), got {len(etas)} values")
        else:
            etas = [checks.real("eta", eta, "(0, inf)")] * L
        self.etas = etas
        self.n_langevin = checks.integer("n_langevin", n_langevin, 1)
        self.steps = checks.integer("steps", steps, 1)
        self.sigma_min = checks.real("sigma_min", sigma_min, "(0, inf)")
        if not self.sigma_min < self.sigmas[-1]:
            raise ValueError(f"sigma_min must be below the smallest level {self.sigmas[-1]}, got {self.sigma_min}")
        self.rho = checks.real("rho", rho, "(0, inf)")
        self.tweedie = checks.optional_real("tweedie", tweedie, "(0, inf)")
        if check_prediction(prediction) not in VE_PREDICTIONS:
            raise ValueError(f"prediction must be one of {VE_PREDICTIONS} (a VE model, alpha = 1), got {prediction!r}")
        self.prediction = prediction
        checks.generator(generator)
        self.generator, self.backend = generator, backend
        plans = [denoise_plan(solver, denoise_grid(s, self.sigma_min, self.steps, self.rho), prediction,
                              solver_options) for s in self.sigmas]
        self.n_denoise = len(plans[0].steps)
        if any(len(p.steps) != self.n_denoise for p in plans):
            raise ValueError(f"solver {solver!r}: the plans of the levels differ in length; pick another solver")
        self._plans = plans
        self._noisy = [any(p.steps[k].needs_noise for p in plans) for k in range(self.n_denoise)]
        self.x = self.level = None
        self.nfe = NFE()

    def _rows(self):
        """(coeffs, write slots, read slots, times, input scales) of the table: Langevin, denoising, Tweedie."""
        rows = [(langevin_coeffs(self.prediction, s, e / 2), 0, (), s, 1.0) for s, e in zip(self.sigmas, self.etas)]
        rows += [(st.coeffs, st.write_slot, st.read_slots, st.t, st.input_scale) for p in self._plans for st in p.steps]
        if self.tweedie is not None:
            p, q = data_coeffs(self.prediction, 1.0, self.tweedie)
            rows.append((ops.UpdateCoeffs(p=p, q=q, a=0.0, b=(1.0,)), 0, (), self.tweedie, 1.0))
        return list(zip(*rows))

    def init(self, x: torch.Tensor, level=None) -> "DLG":
        """Start the chains at x (B, ...) on level `level`: an int, an int64 tensor (B,), or None (the Gibbs
        update of x, one classifier call). Builds the step table on x's device."""
        checks.sample_tensor(x)
        coeffs, writes, reads, times, scales = self._rows()
        slots = max(p.history_slots for p in self._plans)
        uses_state = any(p.uses_state for p in self._plans)
        self.table = ops.step_table(coeffs, writes, reads, slots, uses_state, x.device)
        self.times = time_table(times, False, x)
        self.scales = scale_table(scales, x)
        self.history = x.new_zeros((slots, *x.shape)) if slots else None
        self.state = torch.zeros_like(x) if uses_state else None
        self.status = error_flags.new(x.device)
        self.x = x.contiguous().clone()
        L, B = len(self.sigmas), x.shape[0]
        if level is None:
            if self.classifier is None:
                raise ValueError("level must be given (an int or a (B,) int64 tensor) when classifier is None")
            self.level = self._gibbs(self.x)
            self.nfe += NFE(classifier=1)
        elif isinstance(level, torch.Tensor):
            if level.dtype != torch.int64 or tuple(level.shape) != (B,) or level.device != x.device:
                raise ValueError(f"level must be an int64 tensor of shape ({B},) on {x.device}, got {level.dtype} "
                                 f"{tuple(level.shape)} on {level.device}")
            if int(level.min()) < 0 or int(level.max()) >= L:  # once, at the start
                raise ValueError(f"level must hold indices into sigmas, in [0, {L - 1}]")
            self.level = level.clone()
        else:
            self.level = torch.full((B,), checks.integer("level", level, 0, L - 1), dtype=torch.int64,
                                    device=x.device)
        return self

    def _noise(self, x: torch.Tensor) -> torch.Tensor:
        """Standard normal noise of x's shape, drawn in float32 (the same numbers in every dtype)."""
        return torch.randn(x.shape, generator=self.generator, device=x.device, dtype=torch.float32).to(x.dtype)

    def _gibbs(self, x: torch.Tensor) -> torch.Tensor:
        """The new level of each chain: argmax of the classifier's logits, or a draw from their softmax."""
        logits = self.classifier(x)
        if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (x.shape[0], len(self.sigmas)):
            got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f"classifier must return logits of shape ({x.shape[0]}, {len(self.sigmas)}), got {got}")
        if self.gibbs == "argmax":
            return logits.argmax(dim=1)
        probs = torch.softmax(logits.double(), dim=1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(1)

    def _step(self, x: torch.Tensor, row: torch.Tensor, noise: bool) -> torch.Tensor:
        """One model call at each sample's table row and the fused update of that row."""
        t = self.times.index_select(0, row)
        out = self.model(x if self.scales is None else scaled_input(x, self.scales, row), t)
        z = self._noise(x) if noise else None
        return ops.multistep_update_indexed(x, out, self.table, row, history=self.history, noise=z,
                                            state=self.state, status=self.status, backend=self.backend)

    def langevin(self, n: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """n Langevin-Gibbs steps of every chain; returns (x, level) of the lowest level each visited (ties: the
        latest state), starting from the current state."""
        if self.x is None:
            raise ValueError("call init(x) first")
        n = checks.integer("n", n, 1)
        best_x, best = self.x, self.level
        view = (-1, *[1] * (self.x.dim() - 1))
        for _ in range(n):
            self.x = self._step(self.x, self.level, True)
            if self.gibbs != "fixed":
                self.level = self._gibbs(self.x)
            better = self.level >= best
            best_x = torch.where(better.view(view), self.x, best_x)
            best = torch.maximum(best, self.level)
        self.nfe += NFE(score=n, classifier=n if self.gibbs != "fixed" else 0)
        return best_x, best

    def denoise(self, x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        """The reverse ODE of each sample from its own sigma_{level} to 0 (then the Tweedie step, if set)."""
        L, n = len(self.sigmas), self.n_denoise
        base = level * n + L
        for k in range(n):
            x = self._step(x, base + k, self._noisy[k])
        calls = n
        if self.tweedie is not None:
            x = self._step(x, torch.full_like(level, len(self.times) - 1), False)
            calls += 1
        self.nfe += NFE(score=calls)
        return x

    def sample(self) -> tuple[torch.Tensor, NFE]:
        """One round: n_langevin Langevin-Gibbs steps, then every chain's lowest-level state denoised; returns
        (samples (B, ...), the calls of this round)."""
        before = self.nfe
        x0 = self.denoise(*self.langevin(self.n_langevin))
        return x0, NFE(self.nfe.score - before.score, self.nfe.classifier - before.classifier)

    def run(self, rounds: int = 1) -> tuple[torch.Tensor, NFE]:
        """`rounds` rounds of sample(); returns (the rounds' samples concatenated, their calls)."""
        rounds = checks.integer("rounds", rounds, 1)
        outs, total = [], NFE()
        for _ in range(rounds):
            x0, nfe = self.sample()
            outs.append(x0)
            total += nfe
        return torch.cat(outs), total


def train_noise_classifier(x0: torch.Tensor, sigmas, *, iters: int = 2000, batch: int = 256, width: int = 128,
                           lr: float = 2e-3, seed: int = 0) -> torch.nn.Module:
    """A small MLP p(l | x) trained as the authors train theirs: cross-entropy on (x0 + sigma_l z, l), l uniform
    over the levels, x0 drawn from `x0` (n, ...); seeded by `seed`. Its input is (x / r, log r) with r the rms of x (the levels
    span orders of magnitude). Returns the module in eval mode: classifier(x) -> logits (B, L)."""
    checks.sample_tensor(x0, "x0")
    sig = torch.tensor(checks.sigmas(sigmas, strict=True), dtype=torch.float32)
    if sig[-1] <= 0:
        raise ValueError("sigmas must all be > 0")
    iters, batch = checks.integer("iters", iters, 1), checks.integer("batch", batch, 1)
    width, lr = checks.integer("width", width, 1), checks.real("lr", lr, "(0, inf)")
    data = x0.detach().float().reshape(x0.shape[0], -1).cpu()
    seed = checks.integer("seed", seed)

    def noised(gen):  # (x0 + sigma_l z, l), l uniform over the levels
        xb = data[torch.randint(0, len(data), (batch,), generator=gen)]
        y = torch.randint(0, len(sig), (batch,), generator=gen)
        return (xb + sig[y, None] * torch.randn(xb.shape, generator=gen),), y

    return classifiers.train(lambda: NoiseClassifier(data.shape[1], len(sig), width), noised, iters, lr, seed,
                             decay=True)


class NoiseClassifier(torch.nn.Module):
    """MLP logits of p(l | x) on (x / r, log r), r = rms(x) (x flattened)."""

    def __init__(self, dim: int, levels: int, width: int = 128):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(dim + 1, width), torch.nn.SiLU(), torch.nn.Linear(width, width),
                                       torch.nn.SiLU(), torch.nn.Linear(width, levels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], -1).float()
        r = x.pow(2).mean(1, keepdim=True).add(1e-12).sqrt()
        return self.net(torch.cat([x / r, r.log()], dim=1))
