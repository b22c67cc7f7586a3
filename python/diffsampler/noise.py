"""Brownian-tree noise: the increments k-diffusion's and diffusers' SDE samplers draw by default (needs torchsde,
the optional extra `pip install diffsampler[sde]`).

    noise(sigma, sigma') = (W(t') - W(t)) / sqrt(|t' - t|),   t = transform(sigma),

W one torchsde Brownian interval over [t(sigma_min), t(sigma_max)] (tolerance 1e-6, entropy pool 24, halfway
tree: torchsde.BrownianTree's settings), or one per sample for a list of seeds. Queried at any pair of noise
levels in any order, it gives increments of one Brownian path, so a sampler that refines its steps sees
consistent noise. With the same seed the draws are k-diffusion's / diffusers' to the bit; seed None draws one
from torch's global generator, as they do.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import checks


def torchsde():
    try:
        import torchsde as module
    except ImportError:
        raise ImportError("Brownian-tree noise needs torchsde: pip install torchsde (diffsampler[sde])") from None
    return module


class BrownianTreeNoiseSampler:
    """noise_sampler(sigma, sigma_next) -> a standard normal tensor of x's shape, dtype and device."""

    def __init__(self, x: torch.Tensor, sigma_min, sigma_max, seed: int | Sequence[int] | None = None,
                 transform=lambda sigma: sigma):
        sde = torchsde()
        checks.sample_tensor(x)
        lo, hi = transform(torch.as_tensor(sigma_min)), transform(torch.as_tensor(sigma_max))
        (t0, t1), self.sign = ((lo, hi), 1.0) if lo < hi else ((hi, lo), -1.0)
        self.transform = transform
        if seed is None:
            seed = torch.randint(0, 2**63 - 1, []).item()
        self.batched = not isinstance(seed, int)
        seeds = list(seed) if self.batched else [seed]
        if self.batched and len(seeds) != x.shape[0]:
            raise ValueError(f"seed: a list of seeds needs one per sample (x.shape[0] = {x.shape[0]}), got {len(seeds)}")
        shape = x.shape[1:] if self.batched else x.shape
        self.trees = [sde.BrownianInterval(t0=t0, t1=t1, size=shape, dtype=x.dtype, device=x.device, entropy=s,
                                           tol=1e-6, pool_size=24, halfway_tree=True) for s in seeds]

    def __call__(self, sigma, sigma_next) -> torch.Tensor:
        a, b = self.transform(torch.as_tensor(sigma)), self.transform(torch.as_tensor(sigma_next))
        lo, hi, sign = (a, b, 1.0) if a < b else (b, a, -1.0)
        w = torch.stack([tree(lo, hi) for tree in self.trees]) * (self.sign * sign)
        w = w if self.batched else w[0]
        return w / (b - a).abs().sqrt()


def sde_noise_sampler(x: torch.Tensor, sigmas: torch.Tensor, noise_sampler=None):
    """The noise sampler of k-diffusion's SDE samplers: the given one; else a BrownianTreeNoiseSampler over the
    positive sigmas' range when torchsde is installed; else i.i.d. torch.randn_like(x)."""
    if noise_sampler is not None:
        return noise_sampler
    try:
        torchsde()
    except ImportError:
        return lambda sigma, sigma_next: torch.randn_like(x)
    sigmas = torch.as_tensor(sigmas)
    return BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max())
