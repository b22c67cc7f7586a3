"""Posterior sampling for linear inverse problems y = A x0 + N(0, noise_std^2 I) with a diffusion prior.

Operators act on the last axis of flat samples (B, D): `mask` (inpainting), `blur` (circular convolution),
`downsample` (block means); each is a callable A(x0) with its matrix (`.matrix(D)`) for exact answers.

`first_order_tweedie(A, y, noise_std)` is the DPS family's likelihood: p(y | x_t) ~ N(y; A x0_hat(x_t),
noise_std^2 I), x0_hat the model's Tweedie estimate, its gradient through the model
(`guidance.Guidance.on_x0`): ds.sample(..., guidance=first_order_tweedie(...)). It ignores Cov[x0 | x_t], which
biases the posterior where that covariance is large beside noise_std^2 (STSL's second-order correction is not
implemented: its exact update is not available here; docs/guidance.md).
"""

from __future__ import annotations

from typing import Callable

import torch

from . import checks
from .guidance import Guidance


class Operator:
    """A linear map on the last axis: A(x) for x of shape (..., D)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], name: str):
        self.fn, self.name = fn, name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)

    def matrix(self, dim: int) -> torch.Tensor:
        """The (out, dim) float64 matrix of A on vectors of length dim."""
        return self.fn(torch.eye(dim, dtype=torch.float64)).T.contiguous()

    def __repr__(self) -> str:
        return self.name


def mask(keep: torch.Tensor) -> Operator:
    """Inpainting: the entries where keep is true (a bool vector of length D)."""
    if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or keep.dim() != 1 or not keep.any():
        raise ValueError("keep must be a 1-D bool tensor with at least one true entry")
    return Operator(lambda x: x[..., keep.to(x.device)], f"mask({int(keep.sum())} of {keep.numel()})")


def blur(kernel: torch.Tensor) -> Operator:
    """Circular convolution of the last axis with `kernel` (odd length, centred)."""
    if not isinstance(kernel, torch.Tensor) or kernel.dim() != 1 or kernel.numel() % 2 == 0:
        raise ValueError("kernel must be a 1-D tensor of odd length")
    half = kernel.numel() // 2

    def fn(x):
        k = kernel.to(device=x.device, dtype=x.dtype)
        return sum(k[j] * torch.roll(x, half - j, dims=-1) for j in range(k.numel()))

    return Operator(fn, f"blur({kernel.numel()} taps)")


def downsample(factor: int) -> Operator:
    """Means of consecutive blocks of `factor` entries of the last axis (its length a multiple of factor)."""
    factor = checks.integer("factor", factor, 1)

    def fn(x):
        if x.shape[-1] % factor:
            raise ValueError(f"downsample({factor}) needs a last axis that is a multiple of {factor}, got {x.shape[-1]}")
        return x.reshape(*x.shape[:-1], x.shape[-1] // factor, factor).mean(-1)

    return Operator(fn, f"downsample({factor})")


def first_order_tweedie(A: Callable[[torch.Tensor], torch.Tensor], y: torch.Tensor, noise_std: float,
                        scale=1.0) -> Guidance:
    """Guidance by log N(y; A x0_hat(x_t), noise_std^2 I): the DPS-style first-order Tweedie likelihood."""
    if not callable(A):
        raise checks.ArgumentTypeError(f"A must be a callable A(x0) -> y, got {A!r}")
    noise_std = checks.real("noise_std", noise_std, "(0, inf)")

    def log_likelihood(x0):
        r = (A(x0) - y.to(device=x0.device, dtype=x0.dtype)).flatten(1)
        return -(r * r).sum(1) / (2 * noise_std**2)

    return Guidance.on_x0(log_likelihood, scale)
