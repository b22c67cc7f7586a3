"""Noise schedules: x_t = alpha_t x0 + sigma_t eps, and the timestep grids a sampler visits.

VP schedules follow diffusers exactly (betas and their cumulative product in float32), so that sampling with
the same steps gives the same numbers as diffusers' schedulers.
"""

from __future__ import annotations

import math

import numpy as np
import torch

SPACINGS = ("linspace", "leading", "trailing")


def discrete_timesteps(num_train_timesteps: int, steps: int, spacing: str, steps_offset: int = 0) -> np.ndarray:
    """`steps` descending integer training timesteps, as diffusers' DDIMScheduler.set_timesteps spaces them.

        linspace: round(linspace(0, N - 1, steps)),  leading: arange(steps) * (N // steps) + offset,
        trailing: round(arange(N, 0, -N / steps)) - 1
    """
    n = num_train_timesteps
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if steps > n:
        raise ValueError(f"steps must be <= num_train_timesteps = {n}, got {steps}")
    if spacing == "linspace":
        t = np.linspace(0, n - 1, steps).round()[::-1]
    elif spacing == "leading":
        t = (np.arange(0, steps) * (n // steps)).round()[::-1] + steps_offset
    elif spacing == "trailing":
        t = np.round(np.arange(n, 0, -n / steps)) - 1
    else:
        raise ValueError(f"timestep_spacing must be one of {SPACINGS}, got {spacing!r}")
    return t.copy().astype(np.int64)


class VP:
    """Discrete variance-preserving schedule: alpha_t^2 = prod_{s<=t} (1 - beta_s), sigma_t^2 = 1 - alpha_t^2."""

    def __init__(self, betas: torch.Tensor):
        betas = torch.as_tensor(betas, dtype=torch.float32)
        if betas.dim() != 1 or len(betas) < 2 or not ((betas > 0) & (betas < 1)).all():
            raise ValueError("betas must be a 1-D tensor of at least 2 values in (0, 1)")
        self.betas = betas
        # float32 cumprod, as diffusers computes it: the same alphas to the last bit
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.num_train_timesteps = len(betas)

    @classmethod
    def linear(cls, beta_start: float = 0.0001, beta_end: float = 0.02, num_train_timesteps: int = 1000) -> "VP":
        """beta_t linear in t (DDPM)."""
        return cls(torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32))

    @classmethod
    def scaled_linear(cls, beta_start: float = 0.00085, beta_end: float = 0.012,
                      num_train_timesteps: int = 1000) -> "VP":
        """sqrt(beta_t) linear in t (Stable Diffusion)."""
        return cls(torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2)

    @classmethod
    def cosine(cls, num_train_timesteps: int = 1000, max_beta: float = 0.999) -> "VP":
        """Nichol & Dhariwal's cosine schedule (diffusers' "squaredcos_cap_v2"): alpha_bar(t) =
        cos^2((t + 0.008) / 1.008 pi / 2), beta_i = min(1 - alpha_bar((i + 1) / N) / alpha_bar(i / N), max_beta)."""
        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        n = num_train_timesteps
        betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
        return cls(torch.tensor(betas, dtype=torch.float32))

    def alpha_bar(self, t: int) -> float:
        """alpha_t^2 at an integer training timestep (float32 value, as diffusers holds it)."""
        return float(self.alphas_cumprod[int(t)])

    def alpha_sigma(self, t: int) -> tuple[float, float]:
        ab = self.alpha_bar(t)
        return math.sqrt(ab), math.sqrt(1.0 - ab)

    def sigma_ratio(self, t: int) -> float:
        """sigma_t / alpha_t (the "sigma" of DPM-Solver and k-diffusion), rounded to float32 as diffusers does."""
        ab = self.alphas_cumprod[int(t)]
        return float(((1 - ab) / ab) ** 0.5)

    def train_sigmas(self) -> torch.Tensor:
        """sigma_t / alpha_t at every training timestep, ascending, in float32 as diffusers holds them."""
        ab = self.alphas_cumprod
        return ((1 - ab) / ab) ** 0.5

    def alpha_sigma_at(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha_t, sigma_t for a tensor of integer timesteps (on t's device, float64)."""
        ab = self.alphas_cumprod.to(device=t.device, dtype=torch.float64)[t.long()]
        return ab.sqrt(), (1 - ab).sqrt()

    def __repr__(self) -> str:
        return f"VP(num_train_timesteps={self.num_train_timesteps}, beta=[{self.betas[0]:.5g}, {self.betas[-1]:.5g}])"


def sigma_to_alpha_sigma(ratio: float) -> tuple[float, float]:
    """VP (alpha, sigma) from the ratio sigma/alpha: alpha = 1 / sqrt(1 + ratio^2), sigma = ratio alpha."""
    alpha = 1.0 / math.sqrt(ratio * ratio + 1.0)
    return alpha, ratio * alpha


SIGMA_SPACINGS = ("default", "karras", "exponential", "beta", "lu")


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each sigma ratio: linear interpolation in log sigma between the two
    neighbouring training sigmas (clamped to the grid)."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return ((1 - w) * low + w * (low + 1)).reshape(np.shape(sigma))


def t_to_sigma(t: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """The sigma ratio at fractional training timesteps t: log sigma interpolated linearly between the two
    neighbouring training sigmas (the inverse of sigma_to_t on [0, N - 1]; clamped to the grid)."""
    return np.exp(np.interp(t, np.arange(len(log_sigmas)), log_sigmas))


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022: sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """Uniform in log sigma."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def beta_sigmas(sigma_min: float, sigma_max: float, n: int, alpha: float = 0.6, beta: float = 0.6) -> np.ndarray:
    """sigma_min + ppf_Beta(alpha, beta)(1 - i/(n-1)) (sigma_max - sigma_min) (Lee et al. 2024); needs scipy."""
    try:
        from scipy.stats import beta as beta_dist
    except ImportError as err:
        raise ImportError("sigmas='beta' needs scipy (pip install scipy)") from err
    return np.array([sigma_min + beta_dist.ppf(u, alpha, beta) * (sigma_max - sigma_min)
                     for u in 1 - np.linspace(0, 1, n)])


def sigma_grid(schedule: VP, timesteps: np.ndarray, kind: str = "default", *,
               endpoints: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """(fractional model timesteps, sigma ratios) of `len(timesteps)` steps, as diffusers' schedulers place them.

    default: the training sigma ratios at `timesteps` (interpolated). karras / exponential / beta: that
    spacing between the smallest and largest sigma of the training schedule (endpoints="train", the
    multistep schedulers) or of the default grid (endpoints="grid", EulerDiscreteScheduler); lu: uniform in
    lambda = -log sigma over the training range. The timesteps are then those of each sigma on the training
    grid, unrounded: each scheduler rounds or truncates them its own way.
    """
    if kind not in SIGMA_SPACINGS:
        raise ValueError(f"sigmas must be one of {SIGMA_SPACINGS}, got {kind!r}")
    train = schedule.train_sigmas().numpy()
    grid = np.interp(timesteps, np.arange(len(train)), train)
    if kind == "default":
        return timesteps, grid
    n = len(timesteps)
    s_min, s_max = (float(train[0]), float(train[-1])) if endpoints == "train" else (grid[-1], grid[0])
    if kind == "karras":
        sigmas = karras_sigmas(s_min, s_max, n)
    elif kind == "exponential":
        sigmas = exponential_sigmas(s_min, s_max, n)
    elif kind == "beta":
        sigmas = beta_sigmas(s_min, s_max, n)
    else:
        sigmas = np.exp(-np.linspace(-math.log(s_max), -math.log(s_min), n))
    return sigma_to_t(sigmas, np.log(train)), sigmas


class Flow:
    """Flow matching (rectified flow): x_t = (1 - t) x0 + t eps, so alpha_t = 1 - t, sigma_t = t, with the
    timestep shift of SD3 / FLUX: t -> shift t / (1 + (shift - 1) t), as diffusers' FlowMatchEulerDiscreteScheduler."""

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0):
        if num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {num_train_timesteps}")
        if not shift > 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        self.num_train_timesteps = num_train_timesteps
        self.shift = float(shift)

    def shifted(self, t: np.ndarray) -> np.ndarray:
        return self.shift * t / (1 + (self.shift - 1) * t)

    def model_time(self, t: float) -> float:
        """The model's time at flow time t: t times num_train_timesteps in float32, as
        FlowMatchEulerDiscreteScheduler's timesteps."""
        return float(np.float32(t) * np.float32(self.num_train_timesteps))

    def sigmas(self, steps: int) -> np.ndarray:
        """`steps` descending sigmas (= t) then a final 0, in float32 as diffusers holds them."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        n = self.num_train_timesteps
        train = self.shifted(np.linspace(1, n, n, dtype=np.float32)[::-1] / n)  # float32, as diffusers
        s_max, s_min = float(train[0]), float(train[-1])
        # diffusers inverts its shift to get the grid's end points in training timesteps (sigma * n)
        t = np.linspace(s_max * n, s_min * n, steps) / n
        return np.append(self.shifted(t).astype(np.float32), np.float32(0.0))

    def __repr__(self) -> str:
        return f"Flow(num_train_timesteps={self.num_train_timesteps}, shift={self.shift})"


class EDM:
    """Variance-exploding EDM schedule (Karras et al. 2022): x_sigma = x0 + sigma eps (alpha = 1), sampled on
    the Karras sigmas sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, then 0.
    The model is given sigma itself as its time."""

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        if not rho > 0:
            raise ValueError(f"rho must be > 0, got {rho}")
        self.sigma_min, self.sigma_max, self.rho = float(sigma_min), float(sigma_max), float(rho)

    def sigmas(self, steps: int) -> list[float]:
        """`steps` Karras sigmas from sigma_max to sigma_min, then 0 (float64)."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        return [float(v) for v in karras_sigmas(self.sigma_min, self.sigma_max, steps, self.rho)] + [0.0]

    def __repr__(self) -> str:
        return f"EDM(sigma_min={self.sigma_min}, sigma_max={self.sigma_max}, rho={self.rho})"


class VPContinuous:
    """Continuous-time linear VP (Song et al. 2021): log alpha_t = -beta_d t^2 / 4 - beta_min t / 2, t in
    [eps, 1] (sigma_t^2 = 1 - alpha_t^2). The model is given t itself. Grids: uniform in t ("time") or in
    logSNR ("logsnr"), from t = 1 to t = eps, then a final step to sigma = 0 ("zero") or none ("eps")."""

    SPACINGS = ("time", "logsnr")

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, eps: float = 1e-3):
        if not 0 <= beta_min < beta_max:
            raise ValueError(f"need 0 <= beta_min < beta_max, got {beta_min}, {beta_max}")
        if not 0 < eps < 1:
            raise ValueError(f"eps must be in (0, 1), got {eps}")
        self.beta_min, self.beta_d, self.eps = float(beta_min), float(beta_max - beta_min), float(eps)

    def log_alpha(self, t: float) -> float:
        return -0.25 * self.beta_d * t * t - 0.5 * self.beta_min * t

    def sigma_ratio(self, t: float) -> float:
        """sigma_t / alpha_t = sqrt(e^{-2 log alpha} - 1) (k-diffusion's get_sigmas_vp)."""
        return math.sqrt(math.expm1(-2.0 * self.log_alpha(t)))

    def alpha_sigma_at(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha_t, sigma_t = sqrt(1 - alpha_t^2) for a tensor of times (float64, on t's device)."""
        log_alpha = self.log_alpha(t.double())
        return torch.exp(log_alpha), torch.sqrt(-torch.expm1(2 * log_alpha))

    def t_of_lambda(self, lam: float) -> float:
        """The t with lambda = log(alpha / sigma) = lam: solve the quadratic in t of log(1 + e^{-2 lam})."""
        log_alpha = -0.5 * math.log1p(math.exp(-2.0 * lam))
        a, b, c = 0.25 * self.beta_d, 0.5 * self.beta_min, log_alpha
        return (-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)

    def times(self, steps: int, spacing: str = "logsnr") -> list[float]:
        """steps + 1 times from 1 to eps."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if spacing == "time":
            return [float(v) for v in np.linspace(1.0, self.eps, steps + 1)]
        if spacing == "logsnr":
            lam = lambda t: -math.log(self.sigma_ratio(t))
            return [self.t_of_lambda(v) for v in np.linspace(lam(1.0), lam(self.eps), steps + 1)]
        raise ValueError(f"spacing must be one of {self.SPACINGS}, got {spacing!r}")

    def __repr__(self) -> str:
        return f"VPContinuous(beta_min={self.beta_min}, beta_max={self.beta_min + self.beta_d}, eps={self.eps})"


class MeanReverting:
    """Mean-reverting diffusion (IR-SDE, Luo et al. 2023): dx = theta_t (mu - x) dt + sigma_inf sqrt(2 theta_t) dW,
    so x_t = mu + alpha_t (x0 - mu) + sigma_t eps with

        alpha_t = exp(-theta_bar_t),  sigma_t = sigma_inf sqrt(1 - alpha_t^2),  theta_bar_t = int_0^t theta.

    theta per unit of t is IR-SDE's: `theta_schedule` "cosine" | "linear" | "constant" over t = 0..T
    (num_train_timesteps), scaled so that alpha_T = eps. theta_bar is IR-SDE's cumulative sum at integer t and
    linear between them (theta piecewise constant), so alpha_t and sigma_t keep their identity at every t. y = x - mu
    in units of sigma_inf is a VP process: y / sigma_inf = alpha_t y0 / sigma_inf + sqrt(1 - alpha_t^2) eps
    (`sigma_ratio`: its sigma / alpha). sigma_inf: IR-SDE's max_sigma (its max_sigma = 50 means 50 / 255)."""

    THETA_SCHEDULES = ("cosine", "linear", "constant")

    def __init__(self, sigma_inf: float = 50 / 255, num_train_timesteps: int = 100, theta_schedule: str = "cosine",
                 eps: float = 0.005):
        if not (isinstance(sigma_inf, (int, float)) and sigma_inf > 0 and math.isfinite(sigma_inf)):
            raise ValueError(f"sigma_inf must be a finite number > 0, got {sigma_inf!r}")
        if not isinstance(num_train_timesteps, int) or num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be an int >= 2, got {num_train_timesteps!r}")
        if theta_schedule not in self.THETA_SCHEDULES:
            raise ValueError(f"theta_schedule must be one of {self.THETA_SCHEDULES}, got {theta_schedule!r}")
        if not (isinstance(eps, (int, float)) and 0 < eps < 1):
            raise ValueError(f"eps (alpha at t = T) must be in (0, 1), got {eps!r}")
        self.sigma_inf, self.num_train_timesteps = float(sigma_inf), num_train_timesteps
        self.theta_schedule, self.eps = theta_schedule, float(eps)
        thetas = self._thetas(num_train_timesteps, theta_schedule)
        cumsum = np.cumsum(thetas)
        self.dt = -math.log(eps) / cumsum[-1]
        self.thetas = thetas * self.dt  # theta per unit of t
        self.theta_bars = cumsum * self.dt  # theta_bar at t = 0..T

    @staticmethod
    def _thetas(n: int, kind: str) -> np.ndarray:
        """IR-SDE's T + 1 thetas (before its dt scaling)."""
        if kind == "constant":
            return np.ones(n + 1)
        if kind == "linear":
            scale = 1000 / (n + 1)
            return np.linspace(scale * 1e-4, scale * 0.02, n + 1)
        x = np.linspace(0, n + 2, n + 3) / (n + 2)
        ac = np.cos((x + 0.008) / 1.008 * math.pi / 2) ** 2
        return 1 - (ac / ac[0])[1:-1]

    def theta_bar(self, t: float) -> float:
        t = float(t)
        if not 0 <= t <= self.num_train_timesteps:
            raise ValueError(f"t must be in [0, {self.num_train_timesteps}], got {t}")
        return float(np.interp(t, np.arange(self.num_train_timesteps + 1), self.theta_bars))

    def alpha_sigma(self, t: float) -> tuple[float, float]:
        """alpha_t, sigma_t of x_t = mu + alpha_t (x0 - mu) + sigma_t eps."""
        alpha = math.exp(-self.theta_bar(t))
        return alpha, self.sigma_inf * math.sqrt(-math.expm1(-2 * self.theta_bar(t)))

    def sigma_ratio(self, t: float) -> float:
        """sqrt(1 - alpha_t^2) / alpha_t: the VP sigma ratio of (x - mu) / sigma_inf."""
        return math.sqrt(math.expm1(2 * self.theta_bar(t)))

    def alpha_sigma_at(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha_t, sigma_t for a tensor of times in [0, T] (float64, on t's device)."""
        knots = torch.arange(self.num_train_timesteps + 1, dtype=torch.float64, device=t.device)
        bars = torch.as_tensor(self.theta_bars, dtype=torch.float64, device=t.device)
        t = t.double().clamp(0, self.num_train_timesteps)
        i = t.floor().long().clamp(max=self.num_train_timesteps - 1)
        bar = bars[i] + (t - knots[i]) * (bars[i + 1] - bars[i])
        return torch.exp(-bar), self.sigma_inf * torch.sqrt(-torch.expm1(-2 * bar))

    def __repr__(self) -> str:
        return (f"MeanReverting(sigma_inf={self.sigma_inf:.6g}, num_train_timesteps={self.num_train_timesteps}, "
                f"theta_schedule={self.theta_schedule!r}, eps={self.eps})")
