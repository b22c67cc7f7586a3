"""Analytic targets: isotropic Gaussian mixtures, whose noised marginals are Gaussian mixtures too.

For p(x0) = sum_k w_k N(mu_k, s_k^2 I) and x_t = alpha x0 + sigma eps, x_t ~ sum_k w_k N(alpha mu_k, v_k I) with
v_k = alpha^2 s_k^2 + sigma^2, and the exact data prediction is

    E[x0 | x_t] = sum_k r_k(x_t) (mu_k + alpha s_k^2 / v_k (x_t - alpha mu_k)),   r_k = posterior of component k.
"""

from __future__ import annotations

import math

import torch

from .models import check_prediction


class GaussianMixture:
    """sum_k weights[k] N(means[k], stds[k]^2 I) in float64."""

    def __init__(self, weights: torch.Tensor, means: torch.Tensor, stds: torch.Tensor):
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.stds = torch.as_tensor(stds, dtype=torch.float64)
        k, self.dim = self.means.shape
        if self.weights.shape != (k,) or self.stds.shape != (k,):
            raise ValueError("weights and stds must have one entry per mean")
        if not (self.weights > 0).all() or not (self.stds > 0).all():
            raise ValueError("weights and stds must be positive")
        self.weights = self.weights / self.weights.sum()

    @classmethod
    def ring(cls, modes: int = 8, radius: float = 0.8, std: float = 0.05) -> "GaussianMixture":
        """`modes` equal components on a circle in 2-D."""
        angle = torch.arange(modes, dtype=torch.float64) * (2 * math.pi / modes)
        means = radius * torch.stack([angle.cos(), angle.sin()], dim=1)
        return cls(torch.ones(modes), means, torch.full((modes,), std))

    @classmethod
    def random(cls, dim: int = 64, modes: int = 8, seed: int = 0) -> "GaussianMixture":
        """`modes` components with random means (scale 1/sqrt(dim) per coordinate), weights and widths."""
        gen = torch.Generator().manual_seed(seed)
        means = torch.randn(modes, dim, generator=gen, dtype=torch.float64) / math.sqrt(dim) * 2
        weights = torch.rand(modes, generator=gen, dtype=torch.float64) + 0.5
        stds = 0.05 + 0.15 * torch.rand(modes, generator=gen, dtype=torch.float64)
        return cls(weights, means, stds)

    def product(self, other: "GaussianMixture") -> "GaussianMixture":
        """The normalised product p q: component (i, j) is N(m, s^2 I) with s^2 = s_i^2 t_j^2 / (s_i^2 + t_j^2),
        m = (t_j^2 mu_i + s_i^2 nu_j) / (s_i^2 + t_j^2), weight ∝ w_i v_j N(mu_i; nu_j, (s_i^2 + t_j^2) I).
        Components whose weight underflows float64 (below ~1e-308 of the largest) are dropped."""
        if other.dim != self.dim:
            raise ValueError(f"other must have dimension {self.dim}, got {other.dim}")
        var_a, var_b = self.stds[:, None] ** 2, other.stds[None, :] ** 2
        total = var_a + var_b  # (Ka, Kb)
        d2 = ((self.means[:, None, :] - other.means[None, :, :]) ** 2).sum(-1)
        log_w = (self.weights.log()[:, None] + other.weights.log()[None, :] - 0.5 * d2 / total
                 - 0.5 * self.dim * torch.log(2 * math.pi * total))
        means = (var_b[..., None] * self.means[:, None, :] + var_a[..., None] * other.means[None, :, :]) / total[..., None]
        weights = (log_w - log_w.max()).exp().reshape(-1)
        keep = weights > 0
        return GaussianMixture(weights[keep], means.reshape(-1, self.dim)[keep],
                               (var_a * var_b / total).sqrt().reshape(-1)[keep])

    def power(self, beta: float) -> "GaussianMixture":
        """p^beta (normalised) for well-separated components (exact for one): (w_k N(mu_k, s_k^2))^beta ∝
        w_k^beta s_k^(dim (1 - beta)) N(mu_k, s_k^2 / beta); with equal widths the weights are w_k^beta / sum."""
        if not beta > 0:
            raise ValueError(f"beta must be > 0, got {beta!r}")
        log_w = beta * self.weights.log() + self.dim * (1 - beta) * self.stds.log()
        return GaussianMixture((log_w - log_w.max()).exp(), self.means, self.stds / math.sqrt(beta))

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[k] + self.stds[k, None] * eps

    def _noised_log_joint(self, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor):
        """log w_k N(x; alpha mu_k, v_k I) per row and component, and v_k; alpha, sigma broadcast over rows."""
        alpha, sigma = alpha.reshape(-1, 1), sigma.reshape(-1, 1)
        var = alpha**2 * self.stds**2 + sigma**2  # (n or 1, K)
        d2 = ((x[:, None, :] - alpha[..., None] * self.means) ** 2).sum(-1)
        log_joint = self.weights.log() - 0.5 * d2 / var - 0.5 * self.dim * torch.log(2 * math.pi * var)
        return log_joint, var

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x0) per row of x (n, dim)."""
        return self.noised_log_prob(x, torch.ones((), dtype=torch.float64), torch.zeros((), dtype=torch.float64))

    def noised_log_prob(self, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """log p_t(x) of x_t = alpha x0 + sigma eps per row of x (n, dim); alpha, sigma scalars or one per row."""
        alpha = torch.as_tensor(alpha, dtype=torch.float64)
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        log_joint, _ = self._noised_log_joint(x.double(), alpha, sigma)
        return torch.logsumexp(log_joint, dim=1)

    def posterior_mean(self, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """E[x0 | x_t = x] in float64 for rows x (n, dim); alpha, sigma scalars or one per row."""
        x = x.double()
        alpha = torch.as_tensor(alpha, dtype=torch.float64).reshape(-1, 1)
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1)
        log_joint, var = self._noised_log_joint(x, alpha, sigma)
        r = torch.softmax(log_joint, dim=1)  # (n, K)
        gain = alpha * self.stds**2 / var  # (n or 1, K)
        resid = x[:, None, :] - alpha[..., None] * self.means  # (n, K, dim)
        comp_mean = self.means + gain[..., None] * resid
        return (r[..., None] * comp_mean).sum(1)

    def linear_likelihood(self, x: torch.Tensor, alpha, sigma, A: torch.Tensor, y: torch.Tensor,
                          noise_std: float) -> torch.Tensor:
        """log p(y | x_t = x) per row for y = A x0 + N(0, noise_std^2 I) (A: an (m, dim) matrix, y: (m,)):
        sum_k r_k(x) N(y; A m_k(x), noise_std^2 I + c_k A A^T), with x0 | x_t, k ~ N(m_k, c_k I). Differentiable
        in x: its gradient is the exact guidance of the inverse problem."""
        x = x.double()
        alpha = torch.as_tensor(alpha, dtype=torch.float64).reshape(-1, 1)
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1)
        A, y = A.double(), y.double()
        log_joint, var = self._noised_log_joint(x, alpha, sigma)
        log_r = torch.log_softmax(log_joint, dim=1)  # (n, K)
        gain = alpha * self.stds**2 / var  # (n or 1, K)
        m = self.means + gain[..., None] * (x[:, None, :] - alpha[..., None] * self.means)  # (n, K, dim)
        c = (self.stds**2 * sigma**2 / var).expand(x.shape[0], -1)  # (n, K)
        eye = torch.eye(A.shape[0], dtype=torch.float64)
        cov = noise_std**2 * eye + c[..., None, None] * (A @ A.T)  # (n, K, m, m)
        dist = torch.distributions.MultivariateNormal(m @ A.T, covariance_matrix=cov)
        return torch.logsumexp(log_r + dist.log_prob(y), dim=1)

    def linear_posterior(self, A: torch.Tensor, y: torch.Tensor, noise_std: float):
        """p(x0 | y) for y = A x0 + N(0, noise_std^2 I): (weights, means (K, dim), covariances (K, dim, dim)),
        a mixture of full-covariance Gaussians; `sample_full_mixture` draws from it."""
        A, y = A.double(), y.double()
        eye = torch.eye(self.dim, dtype=torch.float64)
        s2 = self.stds**2
        covs = torch.linalg.inv(eye / s2[:, None, None] + (A.T @ A) / noise_std**2)
        means = (covs @ (self.means / s2[:, None] + A.T @ y / noise_std**2)[..., None])[..., 0]
        marg = s2[:, None, None] * (A @ A.T) + noise_std**2 * torch.eye(A.shape[0], dtype=torch.float64)
        logw = self.weights.log() + torch.distributions.MultivariateNormal(self.means @ A.T, marg).log_prob(y)
        return torch.softmax(logw, 0), means, covs

    def model(self, schedule=None, prediction: str = "eps"):
        """The exact denoiser model(x, t) -> prediction, x of shape (n, dim) in any float dtype (computed in
        float64, returned in x's dtype). t: integer timesteps of the discrete VP `schedule` (continuous times of a
        VPContinuous one), or with
        schedule=None the VP sigma ratio sigma_t / alpha_t itself (continuous-time grids, Grid.from_sigmas)."""
        check_prediction(prediction)

        def alpha_sigma(t: torch.Tensor):
            if schedule is not None:
                return schedule.alpha_sigma_at(t)
            ratio = t.double()
            alpha = 1 / (1 + ratio**2).sqrt()
            return alpha, ratio * alpha

        def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            alpha, sigma = alpha_sigma(t)
            x0 = self.posterior_mean(x, alpha, sigma)
            if alpha.dim():  # one time per row
                alpha, sigma = alpha.reshape(-1, 1), sigma.reshape(-1, 1)
            xd = x.double()
            out = {
                "x0": lambda: x0,
                "eps": lambda: (xd - alpha * x0) / sigma,
                "v": lambda: (alpha * xd - x0) / sigma,  # v = alpha eps - sigma x0
                "score": lambda: -(xd - alpha * x0) / sigma**2,
                "flow": lambda: (xd - x0) / sigma,  # v = eps - x0 with sigma = t (flow schedules)
            }[prediction]()
            return out.to(x.dtype)

        return model

    def flow_model(self):
        """The exact flow velocity model(x, t) -> v = E[eps - x0 | x_t = x] of the linear interpolant
        x_t = (1 - t) x0 + t eps (t = 1 noise, t = 0 data; t a scalar or one per row, 0 < t <= 1):
        v = (x - E[x0 | x_t]) / t. Computed in float64, returned in x's dtype."""

        def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            t = torch.as_tensor(t, dtype=torch.float64, device=x.device).reshape(-1, 1)
            x0 = self.posterior_mean(x, 1 - t, t)
            return ((x.double() - x0) / t).to(x.dtype)

        return model


def sample_full_mixture(weights: torch.Tensor, means: torch.Tensor, covs: torch.Tensor, n: int,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """n draws (float64) of sum_k weights[k] N(means[k], covs[k])."""
    k = torch.multinomial(weights, n, replacement=True, generator=generator)
    z = torch.randn(n, means.shape[1], generator=generator, dtype=torch.float64)
    return means[k] + (torch.linalg.cholesky(covs)[k] @ z[..., None])[..., 0]


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, projections: int = 256, seed: int = 0) -> float:
    """Sliced Wasserstein-2 distance between two equal-size point clouds (n, dim), by sorting projections."""
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    gen = torch.Generator().manual_seed(seed)
    dirs = torch.randn(a.shape[1], projections, generator=gen, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    pa, _ = (a.double() @ dirs).sort(dim=0)
    pb, _ = (b.double() @ dirs).sort(dim=0)
    return ((pa - pb) ** 2).mean().sqrt().item()
