"""Minority guidance (Um, Lee & Ye 2024, "Don't Play Favorites: Minority Guidance for Diffusion Models").

The minority score of a clean sample x0 is how badly the model reconstructs it from a moderate noise level t_p:

    s(x0) = E_eps d(x0, x0_hat(alpha x0 + sigma eps, t_p))     (d: LPIPS in the paper; squared L2 by default)

Its quantiles split the data into L classes (class L - 1: the rarest); a classifier p(c | x_t) trained on noised
samples then guides sampling toward a chosen class with `guidance.Guidance.classifier` (classifier guidance).
"""

from __future__ import annotations

from typing import Callable

import torch

from . import checks, classifiers
from .guidance import Guidance
from .models import check_prediction, data_coeffs
from .schedules import VP


def minority_score(x0: torch.Tensor, model: Callable, schedule: VP, t: int, prediction: str = "eps",
                   draws: int = 5, distance: Callable | None = None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """s(x0) of each sample (B,): the mean over `draws` noise draws of distance(x0, x0_hat) (default: the squared
    L2 norm of the difference per sample), x0_hat from model(alpha x0 + sigma eps, t) at the integer timestep t."""
    if not isinstance(schedule, VP):
        raise ValueError(f"minority_score needs a discrete VP schedule, got {schedule!r}")
    t = checks.integer("t", t, 0, schedule.num_train_timesteps - 1)
    draws = checks.integer("draws", draws, 1)
    check_prediction(prediction)
    checks.optional_callable("distance", distance, "distance(x0, x0_hat) -> (B,)")
    distance = distance or (lambda a, b: ((a - b) ** 2).flatten(1).sum(1))
    alpha, sigma = schedule.alpha_sigma(t)
    p, q = data_coeffs(prediction, alpha, sigma)
    tt = torch.tensor(t, device=x0.device)
    total = torch.zeros(x0.shape[0], dtype=torch.float64, device=x0.device)
    for _ in range(draws):
        eps = torch.randn(x0.shape, generator=generator, dtype=torch.float32, device=x0.device).to(x0.dtype)
        xt = alpha * x0 + sigma * eps
        total += distance(x0, p * xt + q * model(xt, tt)).double()
    return total / draws


def minority_classes(scores: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels, thresholds): class k holds the scores in (q_{k-1}, q_k], q_k the (k + 1) / L quantile."""
    num_classes = checks.integer("num_classes", num_classes, 2)
    if scores.dim() != 1 or scores.numel() < num_classes:
        raise ValueError(f"scores must be a 1-D tensor of at least num_classes = {num_classes} values, got shape "
                         f"{tuple(scores.shape)}")
    levels = torch.arange(1, num_classes + 1, dtype=torch.float64) / num_classes
    thresholds = torch.quantile(scores.double(), levels.to(scores.device))
    labels = torch.searchsorted(thresholds, scores.double().contiguous()).clamp(max=num_classes - 1)
    return labels, thresholds


class NoisyClassifier(torch.nn.Module):
    """A small time-conditioned MLP p(c | x_t) on flat samples: [x_t, sin / cos features of t / T] -> logits."""

    def __init__(self, dim: int, num_classes: int, num_train_timesteps: int, width: int = 128):
        super().__init__()
        self.T = num_train_timesteps
        self.net = torch.nn.Sequential(torch.nn.Linear(dim + 8, width), torch.nn.SiLU(), torch.nn.Linear(width, width),
                                       torch.nn.SiLU(), torch.nn.Linear(width, num_classes))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        u = (t.float() / self.T).reshape(-1, 1).expand(x.shape[0], 1)
        freqs = torch.arange(1, 5, device=x.device, dtype=torch.float32) * torch.pi
        feats = torch.cat([torch.sin(u * freqs), torch.cos(u * freqs)], dim=1)
        return self.net(torch.cat([x.flatten(1).float(), feats], dim=1))


def train_classifier(x0: torch.Tensor, labels: torch.Tensor, schedule: VP, num_classes: int, steps: int = 2000,
                     batch: int = 512, lr: float = 2e-3, seed: int = 0) -> NoisyClassifier:
    """Train a NoisyClassifier on x_t = alpha_t x0 + sigma_t eps at uniform random timesteps (cross-entropy)."""
    steps, batch = checks.integer("steps", steps, 1), checks.integer("batch", batch, 1)
    if labels.shape != (x0.shape[0],):
        raise ValueError(f"labels must have one entry per sample, shape ({x0.shape[0]},), got {tuple(labels.shape)}")
    abar = schedule.alphas_cumprod.double()
    data = x0.flatten(1).float()

    def noised(gen):  # (x_t, t) at uniform random timesteps, and the samples' classes
        idx = torch.randint(0, data.shape[0], (batch,), generator=gen)
        t = torch.randint(0, schedule.num_train_timesteps, (batch,), generator=gen)
        a = abar[t].sqrt().float()[:, None]
        s = (1 - abar[t]).sqrt().float()[:, None]
        return (a * data[idx] + s * torch.randn(data[idx].shape, generator=gen), t), labels[idx]

    return classifiers.train(lambda: NoisyClassifier(x0[0].numel(), num_classes, schedule.num_train_timesteps),
                             noised, steps, lr, seed)


def minority_guidance(classifier: Callable, target: int, scale: float = 1.0) -> Guidance:
    """Classifier guidance toward minority class `target`: g = grad_x log softmax(classifier(x_t, t))[target]."""
    target = checks.integer("target", target, 0)

    def log_prob(x, t):
        logits = classifier(x, t)
        if target >= logits.shape[1]:
            raise ValueError(f"target class {target} is out of range for {logits.shape[1]} classes")
        return torch.log_softmax(logits.double(), dim=1)[:, target]

    return Guidance.classifier(log_prob, scale)
