"""A learned score on scikit-learn's 8x8 digits: the data, a small denoiser, a classifier's feature space and
the Fréchet distance in it, with the trained weights cached on disk.

- Data: the 1797 images of `sklearn.datasets.load_digits`, pixels 0..16 scaled to [-1, 1], flattened to 64,
  split into train / held-out by a seeded permutation.
- Denoiser: a noise prediction eps_theta(x_t, t) on the DDPM schedule `VP.linear()`, x_t = alpha_t x0 +
  sigma_t eps. Its network predicts v = alpha_t eps - sigma_t x0 and returns the noise that implies,
      eps_theta = sigma_t x_t + alpha_t v_theta,   trained on   E_{x0, t ~ U{0..N-1}, eps} ||v_theta - v||^2
  (the eps loss weighted by 1 / alpha_t^2): the data prediction x0 = alpha_t x_t - sigma_t v_theta then stays
  well-conditioned near t = N - 1, where a network predicting eps directly has its error amplified by
  sigma_t / alpha_t ~ 160 in x0. The weights kept are an exponential moving average. It is a `model(x, t)`
  for `diffsampler.sample` with `schedule=model.schedule, prediction=model.prediction` ("eps"), any VP solver.
- Fréchet distance between Gaussian fits N(mu_a, C_a), N(mu_b, C_b) of the classifier's penultimate features:
      FD = ||mu_a - mu_b||^2 + tr(C_a + C_b - 2 (C_a^1/2 C_b C_a^1/2)^1/2)          (float64)

Weights are cached under $XDG_CACHE_HOME/diffsampler (default ~/.cache/diffsampler) by a hash of the
configuration and VERSION: a changed hyper-parameter, or a new VERSION, trains anew. Training is seeded and
runs on one thread, so that it gives the same weights whatever torch's thread count.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from diffsampler.schedules import VP

VERSION = 1  # bump when the code of a model or its training changes: the cached weights are then retrained
PIXELS = 64


@dataclass(frozen=True)
class Split:
    train_x: torch.Tensor  # (n, 64) float32 in [-1, 1]
    train_y: torch.Tensor  # (n,) int64 digit labels
    held_x: torch.Tensor
    held_y: torch.Tensor


def load_digits(held_out: float = 0.25, seed: int = 0) -> Split:
    """The digits in [-1, 1], a fraction `held_out` of them (by a permutation seeded by `seed`) held out."""
    if not 0 < held_out < 1:
        raise ValueError(f"held_out must be a fraction in (0, 1), got {held_out}")
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as err:
        raise ImportError("the digits benchmark needs scikit-learn (pip install 'diffsampler[bench]')") from err
    data = sklearn_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 8 - 1
    y = torch.tensor(data.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    held, train = perm[:round(held_out * len(x))], perm[round(held_out * len(x)):]
    return Split(x[train], y[train], x[held], y[held])


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """(len(t), dim) sinusoids [sin(t f_k), cos(t f_k)], f_k = 10000^(-k / (dim/2)), of timesteps t (any shape)."""
    freqs = torch.exp(-math.log(10000.0) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    angles = t.reshape(-1, 1).float() * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class Denoiser(nn.Module):
    """eps_theta(x_t, t) = sigma_t x_t + alpha_t v_theta(x_t, t), v_theta a residual MLP on the 64 pixels with the
    timestep's embedding added before every block. x: (batch, 64) or any (batch, ...) of 64 elements per sample,
    any float dtype (computed in float32); t: a 0-dim tensor (as diffsampler.sample passes it) or one per
    sample, integer or fractional training timesteps (alpha_t^2 interpolated linearly between integers)."""

    prediction = "eps"

    def __init__(self, width: int = 256, depth: int = 3, schedule: str = "linear"):
        super().__init__()
        self.schedule = getattr(VP, schedule)()
        self.width = width
        self.inp = nn.Linear(PIXELS, width)
        self.time = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
            for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(width), nn.SiLU(), nn.Linear(width, PIXELS))

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t) as float32 columns, one row per element of t."""
        abar = self.schedule.alphas_cumprod.to(t.device)
        t = t.reshape(-1, 1).float().clamp(0, len(abar) - 1)
        low = t.floor().long().clamp(max=len(abar) - 2)
        ab = torch.lerp(abar[low], abar[low + 1], t - low)
        return ab.sqrt(), (1 - ab).sqrt()

    def velocity(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v_theta(x_t, t), (batch, 64) float32."""
        h = self.inp(x.reshape(len(x), PIXELS).float())
        emb = self.time(timestep_embedding(t, self.width))
        for block in self.blocks:
            h = h + block(h + emb)
        return self.out(h)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self.alpha_sigma(t)
        eps = sigma * x.reshape(len(x), PIXELS).float() + alpha * self.velocity(x, t)
        return eps.reshape(x.shape).to(x.dtype)


class Classifier(nn.Module):
    """Digit logits from the 64 pixels; `features(x)` is the penultimate layer, the space of the Fréchet distance."""

    def __init__(self, width: int = 128, features: int = 64):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(PIXELS, width), nn.SiLU(), nn.Linear(width, features), nn.SiLU())
        self.head = nn.Linear(features, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.reshape(len(x), PIXELS).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@dataclass(frozen=True)
class DenoiserConfig:
    width: int = 256
    depth: int = 3
    schedule: str = "linear"  # a VP constructor: linear | scaled_linear | cosine
    iters: int = 3000
    batch: int = 256
    lr: float = 2e-3
    ema: float = 0.999
    seed: int = 0
    held_out: float = 0.25
    split_seed: int = 0


@dataclass(frozen=True)
class ClassifierConfig:
    width: int = 128
    features: int = 64
    iters: int = 1000
    batch: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-2
    input_noise: float = 0.2  # std of the Gaussian noise added to training inputs (smoother features)
    seed: int = 0
    held_out: float = 0.25
    split_seed: int = 0


def fit_denoiser(model: Denoiser, config: DenoiserConfig) -> dict:
    """Train `model` on the v loss (AdamW, learning rate decayed linearly to 0); returns the EMA weights."""
    x = load_digits(config.held_out, config.split_seed).train_x
    n_train = model.schedule.num_train_timesteps
    g = torch.Generator().manual_seed(config.seed)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / config.iters)
    for i in range(config.iters):
        x0 = x[torch.randint(len(x), (config.batch,), generator=g)]
        t = torch.randint(n_train, (config.batch,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a, s = model.alpha_sigma(t)
        loss = (model.velocity(a * x0 + s * eps, t) - (a * eps - s * x0)).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        decay.step()
        with torch.no_grad():
            beta = min(config.ema, (1 + i) / (10 + i))
            for e, p in zip(ema.parameters(), model.parameters()):
                e.lerp_(p, 1 - beta)
    return ema.state_dict()


def fit_classifier(model: Classifier, config: ClassifierConfig) -> dict:
    """Train `model` with cross-entropy on noise-augmented training digits (AdamW, linear decay); its weights."""
    data = load_digits(config.held_out, config.split_seed)
    g = torch.Generator().manual_seed(config.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / config.iters)
    for _ in range(config.iters):
        idx = torch.randint(len(data.train_x), (config.batch,), generator=g)
        x = data.train_x[idx] + config.input_noise * torch.randn(config.batch, PIXELS, generator=g)
        loss = nn.functional.cross_entropy(model(x), data.train_y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        decay.step()
    return model.state_dict()


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "diffsampler"


def cache_path(name: str, config) -> Path:
    """The weights' file: the name and a hash of the configuration and VERSION."""
    key = json.dumps(dict(dataclasses.asdict(config), name=name, version=VERSION), sort_keys=True)
    return cache_dir() / f"digits-{name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"


def _load_or_fit(name: str, config, build: Callable[[], nn.Module], fit: Callable, train: bool) -> nn.Module:
    path = cache_path(name, config)
    with torch.random.fork_rng(devices=[]):  # the initial weights are seeded without touching the global RNG
        torch.manual_seed(config.seed)
        model = build()
    if path.exists():
        state = torch.load(path, weights_only=True)
    elif not train:
        raise FileNotFoundError(f"no cached digits {name} for {config} at {path}: call with train=True, or run "
                                "`python -m diffsampler.bench digits` once")
    else:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # the same weights at any thread count, no OpenMP oversubscription when shared
        try:
            state = fit(model, config)
        finally:
            torch.set_num_threads(threads)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)  # atomic: a concurrent reader sees the whole file or none
    model.load_state_dict(state)
    return model.eval().requires_grad_(False)


def denoiser(config: DenoiserConfig = DenoiserConfig(), train: bool = True) -> Denoiser:
    """The trained denoiser of `config`: from the cache, else trained (the default: about 2 minutes on one CPU
    thread) and cached; with train=False a missing cache raises FileNotFoundError."""
    return _load_or_fit("denoiser", config, lambda: Denoiser(config.width, config.depth, config.schedule),
                        fit_denoiser, train)


def classifier(config: ClassifierConfig = ClassifierConfig(), train: bool = True) -> Classifier:
    """The trained classifier of `config`, cached like `denoiser`."""
    return _load_or_fit("classifier", config, lambda: Classifier(config.width, config.features),
                        fit_classifier, train)


def accuracy(model: Classifier, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of x classified as y."""
    with torch.no_grad():
        return (model(x).argmax(dim=1) == y).double().mean().item()


def _psd_sqrt(c: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh(c)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance(samples: torch.Tensor, reference: torch.Tensor, model: Classifier | None = None) -> float:
    """FD between Gaussian fits of the penultimate features of `samples` and `reference` ((n, 64) or (n, 1, 8, 8)
    digits in [-1, 1]) under `model` (default: the default classifier(), trained if not cached); inf when
    `samples` holds a non-finite value (a diverged sampler)."""
    model = classifier() if model is None else model
    for name, x in (("samples", samples), ("reference", reference)):
        if x.dim() < 2 or x[0].numel() != PIXELS or len(x) < 2:
            raise ValueError(f"{name} must hold at least 2 digits of {PIXELS} pixels each, got shape {tuple(x.shape)}")
    if not torch.isfinite(samples).all():
        return math.inf
    with torch.no_grad():
        fa, fb = (model.features(x).double() for x in (samples, reference))
    mu_a, mu_b = fa.mean(0), fb.mean(0)
    c_a, c_b = torch.cov(fa.T), torch.cov(fb.T)
    root_a = _psd_sqrt(c_a)
    cross = torch.linalg.eigvalsh(root_a @ c_b @ root_a).clamp(min=0).sqrt().sum()  # tr (C_a^1/2 C_b C_a^1/2)^1/2
    return ((mu_a - mu_b).square().sum() + c_a.trace() + c_b.trace() - 2 * cross).item()
