"""Gradient guidance: each model output moved along g = grad_x log p(y | x_t), with a scale schedule w(t).

The guided score is score + w g; in the model's own output form (x_t = alpha x0 + sigma eps):

    eps:   eps - sigma w g                     x0:    x0 + (sigma^2 / alpha) w g
    v:     v - (sigma / alpha) (alpha^2 + sigma^2) w g        (v = alpha eps - sigma x0)
    flow:  v - (sigma / alpha) (alpha + sigma) w g            (v = eps - x0, alpha = 1 - t, sigma = t)
    score: score + w g

g comes from a classifier on x_t (`Guidance.classifier`: log p(y | x_t) by autograd) or from a function of the
Tweedie estimate x0(x_t) (`Guidance.on_x0`: autograd through the model, as DPS), or any callable. The solver then
steps on the guided output, which the fused update forms itself (its guide operand: out + w g in the same pass);
its history holds the guided data predictions.
"""

from __future__ import annotations

from typing import Callable

import torch

from . import checks
from .models import check_prediction, data_coeffs
from .schedules import EDM, VP, Flow, VPContinuous


def output_shift(prediction: str, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """kappa with out' = out + kappa w g for a score shift w g (the table above); 0 where alpha = 0, where x_t holds
    no information on the data and log p(y | x_t) is constant."""
    check_prediction(prediction)
    safe = torch.where(alpha > 0, alpha, torch.ones_like(alpha))
    kappa = {"eps": lambda: -sigma, "x0": lambda: sigma * sigma / safe,
             "v": lambda: -(sigma / safe) * (safe * safe + sigma * sigma),
             "flow": lambda: -(sigma / safe) * (safe + sigma), "score": lambda: torch.ones_like(sigma)}[prediction]()
    return torch.where(alpha > 0, kappa, torch.zeros_like(kappa))


def alpha_sigma_of(schedule, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t, sigma_t) at the model times t that the solvers give the model on `schedule` (float64)."""
    t = t.double()
    if isinstance(schedule, VP):
        return schedule.alpha_sigma_at(t.round().long())
    if isinstance(schedule, VPContinuous):
        return schedule.alpha_sigma_at(t)
    if isinstance(schedule, EDM):
        return torch.ones_like(t), t
    if isinstance(schedule, Flow):
        s = t / schedule.num_train_timesteps
        return 1 - s, s
    raise ValueError(f"guidance needs a VP, VPContinuous, EDM or Flow schedule, got {schedule!r}")


class Guidance:
    """grad(x, t) -> g = grad_x log p(y | x_t) (x's shape), or log_likelihood(x0) -> (B,) whose gradient through the
    model's Tweedie estimate is g (`on_x0`); scaled by `scale`: a number or a callable of the model time t (a 0-dim
    float64 CPU tensor) returning one."""

    def __init__(self, grad: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None, scale=1.0, *,
                 log_likelihood: Callable[[torch.Tensor], torch.Tensor] | None = None):
        checks.optional_callable("grad", grad, "grad(x, t)")
        checks.optional_callable("log_likelihood", log_likelihood, "log_likelihood(x0)")
        if (grad is None) == (log_likelihood is None):
            raise ValueError("Guidance takes one of grad= (grad(x, t) -> grad_x log p(y | x_t)) and log_likelihood= "
                             "(log_likelihood(x0) -> (B,))")
        if not callable(scale):
            scale = checks.real("scale", scale)
        self.grad, self.log_likelihood, self.scale = grad, log_likelihood, scale

    @classmethod
    def classifier(cls, log_prob: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], scale=1.0) -> "Guidance":
        """g = grad_x sum_b log_prob(x, t)[b]: log_prob(x_t, t) -> (B,) log p(y | x_t) of a classifier on x_t."""
        if not callable(log_prob):
            raise checks.ArgumentTypeError(f"log_prob must be a callable log_prob(x, t) -> (B,), got {log_prob!r}")

        def grad(x, t):
            with torch.enable_grad():
                xg = x.detach().requires_grad_(True)
                lp = log_prob(xg, t)
                if lp.shape != (x.shape[0],):
                    raise ValueError(f"log_prob must return one log-probability per sample, shape ({x.shape[0]},), "
                                     f"got {tuple(lp.shape)}")
                return torch.autograd.grad(lp.sum(), xg)[0]

        return cls(grad, scale)

    @classmethod
    def on_x0(cls, log_likelihood: Callable[[torch.Tensor], torch.Tensor], scale=1.0) -> "Guidance":
        """g = grad_x log_likelihood(x0(x_t)) through the model (DPS's approximation of log p(y | x_t)):
        log_likelihood(x0) -> (B,). Needs a differentiable model; one backward pass through it per call."""
        return cls(scale=scale, log_likelihood=log_likelihood)

    def scale_at(self, t: torch.Tensor) -> float:
        w = self.scale(t) if callable(self.scale) else self.scale
        return checks.real("scale(t)", float(w))

    def bind(self, model: Callable, schedule, prediction: str) -> Callable:
        """call(x, t, t_host) -> (out, g, w): the model output at (x, t), the gradient g and its weight
        w = scale(t) kappa in the output, so that the guided output is out + w g (the fused update adds it: its
        guide operand). t_host: t as a host number (w is computed on the host from it: no sync)."""
        check_prediction(prediction)
        alpha_sigma_of(schedule, torch.zeros(()))  # refuses other schedules now

        def call(x, t, t_host):
            t_cpu = torch.tensor(float(t_host), dtype=torch.float64)
            w = self.scale_at(t_cpu)
            if w == 0:  # no gradient to compute
                return model(x, t), None, 0.0
            alpha, sigma = (float(v) for v in alpha_sigma_of(schedule, t_cpu))
            if self.log_likelihood is not None:
                with torch.enable_grad():
                    xg = x.detach().requires_grad_(True)
                    out = model(xg, t)
                    p, q = data_coeffs(prediction, alpha, sigma)
                    ll = self.log_likelihood(p * xg + q * out)
                    if ll.shape != (x.shape[0],):
                        raise ValueError(f"log_likelihood must return one value per sample, shape ({x.shape[0]},), "
                                         f"got {tuple(ll.shape)}")
                    g = torch.autograd.grad(ll.sum(), xg)[0]
                out = out.detach()
            else:
                out = model(x, t)
                g = self.grad(x, t)
            if not isinstance(g, torch.Tensor) or g.shape != x.shape:
                got = tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__
                raise ValueError(f"the guidance gradient must have x's shape {tuple(x.shape)}, got {got}")
            kappa = float(output_shift(prediction, *torch.tensor([alpha, sigma], dtype=torch.float64)))
            return out, g.to(out.dtype), w * kappa

        return call

    def __repr__(self) -> str:
        kind = "on_x0" if self.log_likelihood is not None else "grad"
        return f"Guidance({kind}, scale={'schedule' if callable(self.scale) else self.scale})"

