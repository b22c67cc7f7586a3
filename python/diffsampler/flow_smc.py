"""Flow particle sampling: inference-time scaling for flow models (Kim, Yoon, Hwang, Sung 2025, "Inference-Time
Scaling for Flow Models via Stochastic Generation and Rollover Budget Forcing", arXiv 2503.19385).

Convention: a flow model is any callable model(x, t) -> v, x of shape (B, *shape), t a float32 tensor (B,) (one
time per row), v = E[eps - x0 | x_t = x] the velocity of the linear interpolant x_t = (1 - t) x0 + t eps:
t = 1 is noise, t = 0 data (diffusers' flow matching, `schedules.Flow`). Derivations: docs/smc.md, "Flow particle
sampling".

- Interpolant x_t = alpha_t x0 + sigma_t eps with velocity v = alpha' x0 + sigma' eps (D = alpha sigma' - sigma alpha'):
  x0 = (sigma' x - sigma v) / D (`denoise`, the Tweedie estimate), score = (alpha' x - alpha v) / (sigma D)
  (`flow_score`).
- Reverse SDE with the ODE's marginals, integrated from t = 1 to 0 (`sde_step`, Euler-Maruyama, dt = t - t' > 0):
  x' = x - dt (v - gamma^2 / 2 score) + gamma sqrt(dt) z, gamma = gamma(t) = diffusion * t^2 (the paper's code:
  3 t^2); gamma = 0 is the flow ODE (Euler).
- `to_vp`: the same model on the VP path alpha_r = exp(-T/2), sigma_r = sqrt(1 - e^-T), T = beta_min r +
  (beta_max - beta_min) r^2 / 2 (`schedules.VPContinuous`): t(r) = sigma_r / (alpha_r + sigma_r) (equal SNR),
  x_r = s_r x_t with s_r = alpha_r + sigma_r, u_r(x) = (s_r' / s_r) x + s_r t'(r) v(x / s_r, t(r)).
- Every sampler runs `steps` transitions on the grid t_0 = 1 > ... > t_steps = 0: one model call at t_0..t_{steps-1}
  (so `steps` NFE per sample); the last transition is the Tweedie step x0 = denoise(v, x, t_{steps-1}) (the Euler
  step of the linear ODE to t = 0, and what the paper's code outputs). Rewards reward(x0) -> (B,) are evaluated on
  the Tweedie estimate after every model call.
- `best_of_n`, `smc` (potential exp((r_t - r_{t-1}) / temperature), resampling by ``ops.resample``) and
  `rollover_budget_forcing` take G groups of K particles, group-major (row n K + k) like `diffsampler.smc`.

Each transition is one fused update (`sde_step`: ops.multistep_update with a step row per sample, the
coefficients of solver "flow_sde"); rewards, Tweedie estimates and resampling are torch ops. The loops have a
fixed trip count and decide on the device (`torch.where`, ``ops.resample``); the only host syncs are the
one-time checks of the first reward (finite).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import torch

from . import checks, ops, step_row
from .solvers.flow_sde import drift_coeffs

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Reward = Callable[[torch.Tensor], torch.Tensor]
SPACINGS = ("uniform", "exp", "matched")


class Linear:
    """The linear (rectified-flow) interpolant alpha_t = 1 - t, sigma_t = t."""

    name = "linear"

    def coefficients(self, t: torch.Tensor):
        """alpha, sigma, d alpha / dt, d sigma / dt at t (float64 tensors of t's shape)."""
        t = t.double()
        return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)

    def __repr__(self) -> str:
        return "Linear()"


class VPInterpolant:
    """The VP path of `schedules.VPContinuous`: alpha_r = exp(-T/2), sigma_r = sqrt(1 - exp(-T)),
    T = beta_min r + (beta_max - beta_min) r^2 / 2 (the paper's code: beta_min = 0.1, beta_max = 20)."""

    name = "vp"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        beta_min, beta_max = checks.real("beta_min", beta_min), checks.real("beta_max", beta_max)
        if not 0 < beta_min < beta_max:
            raise ValueError(f"need 0 < beta_min < beta_max, got {beta_min}, {beta_max}")
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)

    def coefficients(self, r: torch.Tensor):
        """alpha, sigma, d alpha / dr, d sigma / dr at r > 0 (float64 tensors of r's shape)."""
        r = r.double()
        T = self.beta_min * r + 0.5 * (self.beta_max - self.beta_min) * r * r
        dT = self.beta_min + (self.beta_max - self.beta_min) * r
        alpha = torch.exp(-0.5 * T)
        sigma = torch.sqrt(-torch.expm1(-T))
        return alpha, sigma, -0.5 * dT * alpha, 0.5 * dT * alpha * alpha / sigma

    def flow_time(self, r: torch.Tensor):
        """t(r) = sigma_r / (alpha_r + sigma_r) (the linear time of equal SNR), the scale s_r = alpha_r + sigma_r
        (x_r = s_r x_t), dt/dr and ds/dr, float64."""
        a, s, da, ds = self.coefficients(r)
        scale = a + s
        t = s / scale
        return t, scale, (ds * a - s * da) / scale**2, da + ds

    def time_of(self, t: torch.Tensor) -> torch.Tensor:
        """The r of equal SNR to linear time t, capped at 1 (t >= t(1)): T = log(1 + (t / (1 - t))^2), the root of
        beta_min r + (beta_max - beta_min) r^2 / 2 = T."""
        t = t.double()
        T = torch.log1p((t / (1 - t)) ** 2)
        b, d = self.beta_min, self.beta_max - self.beta_min
        return ((torch.sqrt(b * b + 2 * d * T) - b) / d).clamp(max=1.0)

    def __repr__(self) -> str:
        return f"VPInterpolant(beta_min={self.beta_min}, beta_max={self.beta_max})"


LINEAR = Linear()


def _rows(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-row coefficient (B,) or scalar as float32 broadcastable against x (B, *shape)."""
    c = c.float()
    return c.reshape(-1, *([1] * (x.dim() - 1))) if c.dim() else c


def _times(t, x: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(t, dtype=torch.float64, device=x.device)


def denoise(v: torch.Tensor, x: torch.Tensor, t, path=LINEAR) -> torch.Tensor:
    """The Tweedie estimate E[x0 | x_t = x] from the velocity: x0 = (sigma' x - sigma v) / D,
    D = alpha sigma' - sigma alpha' (linear: x0 = x - t v). t: a scalar or one per row. float32."""
    a, s, da, ds = path.coefficients(_times(t, x))
    det = a * ds - s * da
    return _rows(ds / det, x) * x.float() - _rows(s / det, x) * v.float()


def flow_score(v: torch.Tensor, x: torch.Tensor, t, path=LINEAR) -> torch.Tensor:
    """grad log p_t(x) from the velocity: score = -eps / sigma = (alpha' x - alpha v) / (sigma D)
    (linear: -(x + (1 - t) v) / t). t: a scalar or one per row, 0 < t. float32."""
    a, s, da, ds = path.coefficients(_times(t, x))
    sd = s * (a * ds - s * da)
    return _rows(da / sd, x) * x.float() - _rows(a / sd, x) * v.float()


def diffusion_coefficient(diffusion, t: torch.Tensor) -> torch.Tensor:
    """gamma(t): diffusion * t^2 for a number (the paper's code: 3 t^2, "square" with norm 3), else diffusion(t)."""
    if callable(diffusion):
        return torch.as_tensor(diffusion(t), dtype=torch.float64, device=t.device)
    return diffusion * t.double() ** 2


def sde_step_rows(x: torch.Tensor, t, t_next, g, path=LINEAR) -> torch.Tensor:
    """The (B, step_row.WIDTH) float64 rows of `sde_step` for ops.multistep_update: per sample
    x' = a x + e v + c z with (a, e) = solvers.flow_sde.drift_coeffs(alpha, sigma, alpha', sigma', w, dt),
    w = gamma^2 / 2, c = gamma sqrt(dt), and m_0 = the Tweedie estimate (sigma' x - sigma v) / D."""
    t, t_next, gamma = _times(t, x), _times(t_next, x), _times(g, x)
    batch = (x.shape[0],)
    alpha, sigma, d_alpha, d_sigma = (c.expand(batch) for c in path.coefficients(t))
    dt, w = (t - t_next).expand(batch), (0.5 * gamma * gamma).expand(batch)
    det = alpha * d_sigma - sigma * d_alpha
    rows = torch.zeros(x.shape[0], step_row.WIDTH, dtype=torch.float64, device=x.device)
    rows[:, step_row.A], rows[:, step_row.E] = drift_coeffs(alpha, sigma, d_alpha, d_sigma, w, dt)
    rows[:, step_row.C] = gamma.expand(batch) * dt.sqrt()
    rows[:, step_row.P], rows[:, step_row.Q] = d_sigma / det, -sigma / det
    return rows


def sde_step(x: torch.Tensor, v: torch.Tensor, t, t_next, g, path=LINEAR,
             noise: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """One Euler-Maruyama step from t to t_next < t of the reverse SDE with the flow ODE's marginals,

        x' = x - dt (v - gamma^2 / 2 score) + gamma sqrt(dt) z,    dt = t - t_next,

    score = flow_score(v, x, t, path); the argument g is the diffusion coefficient gamma(t) (diffusion_coefficient),
    g = 0 (noise may be None) the Euler step of the ODE. t, t_next, g: scalars or one per row. It is the
    fused step of solver "flow_sde" with w = gamma^2 / 2 (one ops.multistep_update with a row per sample,
    `sde_step_rows`). Returns x's dtype."""
    v = v.to(x.dtype)
    noise = None if noise is None else noise.to(x.dtype)
    return ops.multistep_update(x, v, sde_step_rows(x, t, t_next, g, path), noise=noise, check_nan=False,
                                backend=backend)


def to_vp(model: Model, steps: int, beta_min: float = 0.1, beta_max: float = 20.0):
    """The flow model on the VP path: (vp_model, times). vp_model(x, r) -> u_r = (s' / s) x + s t'(r) v(x / s, t(r))
    with t(r), s = alpha_r + sigma_r of equal SNR (`VPInterpolant.flow_time`); times: steps + 1 uniform r from 1
    to 0 (float64). Its ODE moves x_r = s_r x_{t(r)}: the same samples as the linear ODE at r = 0 (s_0 = 1)."""
    return _vp_model(_checked(model), VPInterpolant(beta_min, beta_max)), time_grid(steps, "uniform")


def _vp_model(model: Model, path: VPInterpolant) -> Model:
    def vp_model(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        t, scale, dt, dscale = path.flow_time(_times(r, x))
        v = model((x.float() / _rows(scale, x)).to(x.dtype), t.float().expand(x.shape[0]))
        return (_rows(dscale / scale, x) * x.float() + _rows(scale * dt, x) * v.float()).to(x.dtype)

    return vp_model


def time_grid(steps: int, spacing: str = "uniform", path=LINEAR) -> torch.Tensor:
    """steps + 1 times of `path` from 1 to 0 (float64): "uniform" 1 - i / steps; "exp" sqrt(1 - (i / steps)^2)
    (the paper's code, dense near 1); "matched" uniform from 1 down to the time of the linear grid's last noise
    level (t = 1 / steps; on the VP path r = time_of(1 / steps)), then 0, so that every path's output is the
    Tweedie estimate at the same noise level (on the linear path the same as "uniform")."""
    steps = checks.integer("steps", steps, 1)
    u = torch.arange(steps + 1, dtype=torch.float64) / steps
    if spacing == "uniform":
        return 1 - u
    if spacing == "exp":
        return (1 - u * u).clamp_min(0).sqrt()
    if spacing == "matched":
        end = torch.tensor(1.0 / steps, dtype=torch.float64)
        end = path.time_of(end) if isinstance(path, VPInterpolant) else end
        return torch.cat([torch.linspace(1, end.item(), steps, dtype=torch.float64), u.new_zeros(1)])
    raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")


class _Plan(NamedTuple):
    model: Model  # on the sampling path
    path: object
    times: torch.Tensor  # float64 (steps + 1,), on the device


def _checked(model) -> Model:
    """The model with its output shape checked on every call (host metadata, no sync)."""
    if not callable(model):
        raise ValueError(f"model must be a callable model(x, t) -> v, got {type(model).__name__}")

    def checked(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        v = model(x, t)
        if not isinstance(v, torch.Tensor) or v.shape != x.shape:
            got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"model must return a tensor of x's shape {tuple(x.shape)}, got {got}")
        return v

    return checked


def _plan(model, path, steps: int, spacing: str, device) -> _Plan:
    model = _checked(model)
    path = LINEAR if path == "linear" else VPInterpolant() if path == "vp" else path
    if not isinstance(path, (Linear, VPInterpolant)):
        raise ValueError(f"path must be 'linear', 'vp' or a VPInterpolant, got {path!r}")
    times = time_grid(steps, spacing, path).to(device)
    return _Plan(_vp_model(model, path) if isinstance(path, VPInterpolant) else model, path, times)


def _check_common(groups, particles, shape, diffusion) -> tuple[int, int, tuple[int, ...], object]:
    """(groups, particles, shape, diffusion) checked, as ints and a float (or the callable t -> gamma(t))."""
    groups, particles = checks.integer("groups", groups, 1), checks.integer("particles", particles, 1)
    shape = checks.integers("shape", shape, 1)
    if not callable(diffusion):
        diffusion = checks.real("diffusion (gamma = diffusion t^2, or a callable t -> gamma(t))", diffusion, "[0, inf)")
    return groups, particles, shape, diffusion


def _velocity(plan: _Plan, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """One model call at times t (float64, a scalar or (B,)), passed as float32 (B,)."""
    return plan.model(x, t.float().expand(x.shape[0]))


class _RewardFn:
    """Calls reward(x0) -> (B,) float32; checks the shape every call and finiteness once (one host sync)."""

    def __init__(self, reward):
        if not callable(reward):
            raise ValueError(f"reward must be a callable reward(x0) -> (B,), got {type(reward).__name__}")
        self.reward, self.checked = reward, False

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        r = self.reward(x0)
        if not isinstance(r, torch.Tensor) or r.shape != (x0.shape[0],):
            got = tuple(r.shape) if isinstance(r, torch.Tensor) else type(r).__name__
            raise ValueError(f"reward must return a tensor of shape ({x0.shape[0]},), got {got}")
        if not self.checked:
            if not bool(torch.isfinite(r).all()):
                raise ValueError("reward returned NaN or infinite values")
            self.checked = True
        return r.float()


def _noise(x: torch.Tensor, gamma: torch.Tensor, generator) -> torch.Tensor | None:
    if not isinstance(gamma, torch.Tensor) and gamma == 0:
        return None
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)


def _transition(plan: _Plan, x, v, i, diffusion, generator):
    """The SDE step from times[i] to times[i + 1] (i an int or a (B,) index tensor), in x's dtype."""
    t, t_next = plan.times[i], plan.times[i + 1]
    gamma = diffusion_coefficient(diffusion, t) if (callable(diffusion) or diffusion) else 0.0
    return sde_step(x, v, t, t_next, gamma, plan.path, _noise(x, gamma, generator)).to(x.dtype)


def _sample_loop(plan: _Plan, x, diffusion, generator, reward: _RewardFn | None = None):
    """Runs all transitions; returns the final Tweedie samples and, with a reward, their rewards."""
    steps = len(plan.times) - 1
    for i in range(steps):
        v = _velocity(plan, x, plan.times[i])
        if i < steps - 1:
            x = _transition(plan, x, v, i, diffusion, generator)
    x0 = denoise(v, x, plan.times[steps - 1], plan.path).to(x.dtype)
    return x0, (reward(x0) if reward is not None else None)


def sample(model: Model, n: int, shape: Sequence[int], *, steps: int = 20, path="linear", diffusion=0.0,
           spacing: str = "uniform", generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
           device: torch.device | str = "cpu") -> torch.Tensor:
    """n samples (n, *shape) of the flow model: diffusion = 0 the Euler ODE, else the SDE with gamma = diffusion t^2
    (or a callable t -> gamma(t)); path "linear" or "vp" (`to_vp`). `steps` NFE per sample."""
    n = checks.integer("n", n, 1)
    _, _, shape, diffusion = _check_common(1, 1, shape, diffusion)
    plan = _plan(model, path, steps, spacing, device)
    x = torch.randn(n, *shape, generator=generator, device=device, dtype=dtype)
    return _sample_loop(plan, x, diffusion, generator)[0]


class BestOfNResult(NamedTuple):
    """samples (G, *shape) and rewards (G,): the best of each group; nfe: model calls per output (K steps);
    candidates (G*K, *shape) and candidate_rewards (G, K): all of them."""

    samples: torch.Tensor
    rewards: torch.Tensor
    nfe: int
    candidates: torch.Tensor
    candidate_rewards: torch.Tensor


def _pick(values: torch.Tensor, rows: torch.Tensor, K: int) -> torch.Tensor:
    """rows[n] is a within-group index; returns values[n K + rows[n]]."""
    return values[torch.arange(len(rows), device=values.device) * K + rows]


def best_of_n(model: Model, reward: Reward, groups: int, particles: int, shape: Sequence[int], *, steps: int = 20,
              path="linear", diffusion=0.0, spacing: str = "uniform", generator: torch.Generator | None = None,
              dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> BestOfNResult:
    """Best-of-N: K = `particles` independent full samples per group (ODE by default, SDE with diffusion > 0),
    keep the one of the largest reward. NFE per output: K steps."""
    groups, particles, shape, diffusion = _check_common(groups, particles, shape, diffusion)
    reward = _RewardFn(reward)
    plan = _plan(model, path, steps, spacing, device)
    x = torch.randn(groups * particles, *shape, generator=generator, device=device, dtype=dtype)
    x0, r = _sample_loop(plan, x, diffusion, generator, reward)
    r = r.reshape(groups, particles)
    best = r.argmax(1)
    return BestOfNResult(_pick(x0, best, particles), r.gather(1, best[:, None])[:, 0], particles * steps, x0, r)


class SMCResult(NamedTuple):
    """samples (G, *shape) and rewards (G,): one output per group (`select`); nfe: model calls per output
    (K steps); particles (G*K, *shape) the final Tweedie samples, log_w (G, K) their normalised log-weights,
    particle_rewards (G, K)."""

    samples: torch.Tensor
    rewards: torch.Tensor
    nfe: int
    particles: torch.Tensor
    log_w: torch.Tensor
    particle_rewards: torch.Tensor


def smc(model: Model, reward: Reward, groups: int, particles: int, shape: Sequence[int], *, steps: int = 20,
        path="vp", diffusion=3.0, temperature: float = 1.0, method: str = "systematic",
        ess_threshold: float | None = 0.5, select: str = "draw", spacing: str = "uniform",
        generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu") -> SMCResult:
    """SMC with reward potentials: K particles per group follow the SDE; after each model call the log-weight gains
    (r_t - r_{t-1}) / temperature (r_t = reward of the Tweedie estimate, r_{-1} = 0), so a particle's weight since
    its last resampling is exp(r_t / temperature) over its ancestor's; the weights target
    p_t(x) exp(r(x0_t) / temperature), at the end p(x) exp(r(x) / temperature).
    ``ops.resample(log_w, x, method, ess_threshold, generator)`` before every transition (velocities and
    rewards follow their particles). select: "draw" one particle per group by weight (a sample of the tilted
    target), "max" the particle of the largest reward."""
    groups, particles, shape, diffusion = _check_common(groups, particles, shape, diffusion)
    temperature = checks.real("temperature", temperature, "(0, inf)")
    if select not in ("draw", "max"):
        raise ValueError(f"select must be 'draw' or 'max', got {select!r}")
    if method not in ops.RESAMPLE_METHODS:
        raise ValueError(f"method must be one of {ops.RESAMPLE_METHODS}, got {method!r}")
    checks.optional_real("ess_threshold (None: always resample)", ess_threshold, "[0, 1]")
    reward = _RewardFn(reward)
    plan = _plan(model, path, steps, spacing, device)
    G, K = groups, particles
    x = torch.randn(G * K, *shape, generator=generator, device=device, dtype=dtype)
    log_w = torch.full((G, K), -math.log(K), device=device)
    r_prev = torch.zeros(G * K, device=device)
    for i in range(steps):
        if i > 0:
            x = _transition(plan, x, v, i - 1, diffusion, generator)
        v = _velocity(plan, x, plan.times[i])
        x0 = denoise(v, x, plan.times[i], plan.path)
        r = reward(x0.to(dtype))
        log_w = log_w + ((r - r_prev) / temperature).reshape(G, K)
        r_prev = r
        if i < steps - 1 and K > 1:
            res = ops.resample(log_w, x, method, ess_threshold, generator)
            rows = ops.ancestor_rows(res.ancestors)
            x, log_w, v, r_prev = res.particles, res.log_w, v[rows], r_prev[rows]
    x0 = x0.to(dtype)
    log_w = log_w - log_w.logsumexp(1, keepdim=True)
    if select == "max":
        pick = r_prev.reshape(G, K).argmax(1)
    else:  # one weighted draw: a final resampling (unbiased: P(ancestor k) = w_k) and a uniformly random slot
        final = ops.resample(log_w, x0, method, None, generator, move="gather")
        slot = torch.randint(K, (G,), generator=generator, device=device)
        pick = final.ancestors.gather(1, slot[:, None])[:, 0]
    return SMCResult(_pick(x0, pick, K), _pick(r_prev, pick, K), K * steps, x0, log_w, r_prev.reshape(G, K))


class RBFResult(NamedTuple):
    """samples (G, *shape) and rewards (G,); nfe (G,) model calls per output (= budget); draws (G, steps - 1)
    candidates drawn at each transition t_i -> t_{i+1}, i = 0..steps-2 (the initial selection excluded)."""

    samples: torch.Tensor
    rewards: torch.Tensor
    nfe: torch.Tensor
    draws: torch.Tensor


def rollover_budget_forcing(model: Model, reward: Reward, groups: int, budget: int, shape: Sequence[int], *,
                            steps: int = 10, initial: int | None = None, path="vp", diffusion=3.0,
                            spacing: str = "uniform", generator: torch.Generator | None = None,
                            dtype: torch.dtype = torch.float32,
                            device: torch.device | str = "cpu") -> RBFResult:
    """Rollover Budget Forcing, one chain per group with `budget` model calls (as the paper's code, rbf.py):

    1. `initial` noises (default budget // 10: the code's 25 of 250 per chain), the one whose Tweedie reward is
       largest starts the chain; its reward is the best so far.
    2. The quota q = (budget - initial) // steps per transition. At transition i (t_i -> t_{i+1}) draw candidates
       one at a time (an SDE step from the current state + one model call at t_{i+1}, reward of its Tweedie):
       the first that beats the best reward so far is taken at once and its unused quota rolls over
       (next quota = q + leftover); if the quota runs out first, the best candidate of this transition is taken
       (next quota = q).
    3. The last transition (t_{steps-2} -> t_{steps-1}) spends all the rest on candidates from one state and keeps
       the best; the output is its Tweedie estimate at t_{steps-1}.
    Groups advance independently (per-row times); every round costs one model call per group, so the loop has
    budget - initial rounds and no host sync."""
    groups, _, shape, diffusion = _check_common(groups, 1, shape, diffusion)
    steps = checks.integer("steps (one searched transition and the final one)", steps, 2)
    budget = checks.integer("budget", budget, 1)
    initial = max(1, budget // 10) if initial is None else checks.integer("initial", initial, 1)
    if not budget >= initial + steps:
        raise ValueError(f"budget must be an integer >= initial + steps = {initial + steps} (a quota of at least "
                         f"one candidate per transition), got {budget!r}")
    reward = _RewardFn(reward)
    plan = _plan(model, path, steps, spacing, device)
    G, last = groups, steps - 2  # index of the last searched transition
    quota = (budget - initial) // steps
    # 1. the initial selection
    x = torch.randn(G * initial, *shape, generator=generator, device=device, dtype=dtype)
    v = _velocity(plan, x, plan.times[0])
    r = reward(denoise(v, x, plan.times[0], plan.path).to(dtype)).reshape(G, initial)
    best_r, first = r.max(1)
    x, v = _pick(x, first, initial), _pick(v, first, initial)
    # 2-3. per group: step index, candidates drawn at this transition, its quota, the transition's best candidate
    index = torch.zeros(G, dtype=torch.long, device=device)
    count = torch.zeros(G, dtype=torch.long, device=device)
    limit = torch.full((G,), quota, dtype=torch.long, device=device)
    draws = torch.zeros(G, steps - 1, dtype=torch.long, device=device)
    cand_x, cand_v = x.clone(), v.clone()
    cand_r = torch.full((G,), -math.inf, device=device)
    rows = (G,) + (1,) * len(shape)
    for _ in range(budget - initial):
        y = _transition(plan, x, v, index, diffusion, generator)
        w = _velocity(plan, y, plan.times[index + 1])
        ry = reward(denoise(w, y, plan.times[index + 1], plan.path).to(dtype))
        count += 1
        draws[torch.arange(G, device=device), index] += 1
        better = ry > cand_r
        cand_x = torch.where(better.reshape(rows), y, cand_x)
        cand_v = torch.where(better.reshape(rows), w, cand_v)
        cand_r = torch.where(better, ry, cand_r)
        improved = ry > best_r
        best_r = torch.where(improved, ry, best_r)
        searching = index < last
        rollover = improved & searching
        advance = rollover | ((count == limit) & searching)
        x = torch.where(advance.reshape(rows), cand_x, x)  # an improving candidate is the transition's best
        v = torch.where(advance.reshape(rows), cand_v, v)
        limit = torch.where(rollover, limit - count + quota, torch.where(advance, quota, limit))
        count = torch.where(advance, 0, count)
        cand_r = torch.where(advance, -math.inf, cand_r)
        index = index + advance.long()
    samples = denoise(cand_v, cand_x, plan.times[steps - 1], plan.path).to(dtype)
    nfe = torch.full((G,), initial, dtype=torch.long, device=device) + draws.sum(1)
    return RBFResult(samples, cand_r, nfe, draws)
