"""k-diffusion-style samplers on the fused update.

Same signatures and numbers as k-diffusion's `sample_*` functions: `model(x, sigma, **extra_args)` returns the
denoised x0, x lives in the VE scale (x = x0 + sigma eps, start from noise * sigmas[0]), `sigmas` ends with 0.
`sigmas`: any 1-D tensor, array or sequence of at least 2 finite noise levels, non-increasing (decreasing for the
samplers that step in log sigma: dpmpp_2m, dpmpp_2m_sde, dpmpp_3m_sde), > 0 but the last, which may be 0.
The coefficients are computed in float64 from the sigmas; each step is one fused call (Heun: two).

Noise: the SDE samplers take k-diffusion's `noise_sampler(sigma, sigma_next)`; without one they draw i.i.d.
`torch.randn_like(x)` (k-diffusion's default there is a Brownian tree from torchsde: statistically the same
increments, other bits; pass its BrownianTreeNoiseSampler to reproduce them). Euler and Heun without churn do
not draw the unused noise k-diffusion draws every step, so the global RNG is left untouched.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from .. import checks, ops
from ..ops import StateRow, UpdateCoeffs
from ..schedules import karras_sigmas
from ..solvers.dpm import _history_weights

DENOISED = dict(p=0.0, q=1.0)  # the model output is the data prediction itself


def _zero_appended(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def get_sigmas_karras(n, sigma_min, sigma_max, rho=7.0, device="cpu"):
    """Karras et al. (2022): n sigmas from sigma_max to sigma_min, uniform in sigma^(1/rho), then 0."""
    return _zero_appended(torch.as_tensor(karras_sigmas(sigma_min, sigma_max, n, rho), dtype=torch.float32)).to(device)


def get_sigmas_exponential(n, sigma_min, sigma_max, device="cpu"):
    """n sigmas uniform in log sigma, then 0."""
    return _zero_appended(torch.linspace(math.log(sigma_max), math.log(sigma_min), n, device=device).exp())


def get_sigmas_vp(n, beta_d=19.9, beta_min=0.1, eps_s=1e-3, device="cpu"):
    """Continuous-time linear VP: sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1), t from 1 to eps_s, then 0."""
    t = torch.linspace(1, eps_s, n, device=device)
    return _zero_appended(torch.sqrt(torch.exp(beta_d * t**2 / 2 + beta_min * t) - 1))


def default_noise_sampler(x):
    return lambda sigma, sigma_next: torch.randn_like(x)


def _steps(n: int, disable):
    if disable:
        return range(n)
    try:
        from tqdm.auto import trange
    except ImportError:
        return range(n)
    return trange(n, disable=disable)


class _Loop:
    """The loop state every sampler shares: model call with k-diffusion's calling convention, the callback,
    the history ring and the fused update."""

    def __init__(self, model, x, sigmas, extra_args, callback, slots: int, strict: bool = False):
        checks.model(model)
        checks.sample_tensor(x)
        checks.optional_callable("callback", callback, "callback(info)")
        if extra_args is not None and not isinstance(extra_args, Mapping):
            raise checks.ArgumentTypeError(f"extra_args must be a dict of the model's keywords or None, got "
                                           f"{type(extra_args).__name__}")
        self.model, self.extra_args, self.callback = model, extra_args or {}, callback
        self.sigmas = checks.sigmas(sigmas, strict)
        self.s_in = x.new_ones([x.shape[0]])
        self.history = x.new_empty((slots, *x.shape)) if slots else None
        self.slots = slots

    def denoise(self, x, i, sigma, sigma_hat=None):
        denoised = self.model(x, sigma * self.s_in, **self.extra_args)
        if self.callback is not None:
            self.callback({"x": x, "i": i, "sigma": self.sigmas[i], "sigma_hat": sigma_hat or self.sigmas[i],
                           "denoised": denoised})
        return denoised

    def update(self, x, denoised, coeffs, i, n_hist=0, noise=None, state=None):
        """x' from the fused op; history slot i % slots gets the denoised x0, the n_hist before it are read."""
        if self.history is None:
            return ops.multistep_update(x, denoised, coeffs, noise=noise, state=state)
        reads = [(i - k) % self.slots for k in range(1, n_hist + 1)]
        return ops.multistep_update(x, denoised, coeffs, history=self.history, write_slot=i % self.slots,
                                    read_slots=reads, noise=noise, state=state)


def _euler_coeffs(sigma_hat: float, sigma_next: float) -> UpdateCoeffs:
    """x' = x + (x - D) / sigma_hat (sigma_next - sigma_hat)."""
    r = (sigma_next - sigma_hat) / sigma_hat
    return UpdateCoeffs(**DENOISED, a=1.0 + r, b=(-r,))


def _check_churn(s_churn, s_tmin, s_tmax, s_noise) -> None:
    checks.real("s_churn", s_churn, "[0, inf)")
    checks.real("s_tmin", s_tmin, "[0, inf]")
    checks.real("s_tmax", s_tmax, "[0, inf]")
    checks.real("s_noise", s_noise, "[0, inf)")


def _check_noise(eta, s_noise, noise_sampler) -> None:
    checks.real("eta", eta, "[0, inf)")
    checks.real("s_noise", s_noise, "[0, inf)")
    checks.optional_callable("noise_sampler", noise_sampler, "noise_sampler(sigma, sigma_next)")


def _churn(x, sigmas, i, s_churn, s_tmin, s_tmax, s_noise):
    """Karras et al.'s churn: sigma_hat = sigma (1 + gamma) and x + eps sqrt(sigma_hat^2 - sigma^2)."""
    sigma = sigmas[i]
    gamma = min(s_churn / (len(sigmas) - 1), 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
    sigma_hat = sigma * (gamma + 1)
    if gamma > 0:
        x = x + torch.randn_like(x) * s_noise * (sigma_hat**2 - sigma**2) ** 0.5
    return x, sigma_hat


@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0.0, s_tmin=0.0,
                 s_tmax=float("inf"), s_noise=1.0):
    """Karras et al. (2022) Algorithm 2, Euler steps."""
    _check_churn(s_churn, s_tmin, s_tmax, s_noise)
    loop = _Loop(model, x, sigmas, extra_args, callback, slots=0)
    s = loop.sigmas
    for i in _steps(len(s) - 1, disable):
        x, sigma_hat = _churn(x, s, i, s_churn, s_tmin, s_tmax, s_noise)
        denoised = loop.denoise(x, i, sigma_hat, sigma_hat)
        x = loop.update(x, denoised, _euler_coeffs(sigma_hat, s[i + 1]), i)
    return x


@torch.no_grad()
def sample_heun(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0.0, s_tmin=0.0,
                s_tmax=float("inf"), s_noise=1.0):
    """Karras et al. (2022) Algorithm 2, Heun steps (Euler into sigma = 0).

    Stage 1 is an Euler step that also keeps its start x in the state and D in the history; stage 2 is
    x' = x + (d + d2) / 2 dt = (1 + r/2) s - r/2 D + r2/2 x2 - r2/2 D2, r = dt / sigma_hat, r2 = dt / sigma_next."""
    _check_churn(s_churn, s_tmin, s_tmax, s_noise)
    loop = _Loop(model, x, sigmas, extra_args, callback, slots=2)
    s = loop.sigmas
    state = torch.zeros_like(x)
    for i in _steps(len(s) - 1, disable):
        x, sigma_hat = _churn(x, s, i, s_churn, s_tmin, s_tmax, s_noise)
        denoised = loop.denoise(x, i, sigma_hat, sigma_hat)
        euler = _euler_coeffs(sigma_hat, s[i + 1])
        if s[i + 1] == 0:
            x = ops.multistep_update(x, denoised, euler)
            continue
        keep_start = UpdateCoeffs(p=euler.p, q=euler.q, a=euler.a, b=euler.b, state=StateRow(a=1.0, b=(0.0,)))
        x2 = ops.multistep_update(x, denoised, keep_start, history=loop.history, write_slot=0, state=state)
        denoised_2 = loop.model(x2, s[i + 1] * loop.s_in, **loop.extra_args)
        dt = s[i + 1] - sigma_hat
        r, r2 = dt / sigma_hat, dt / s[i + 1]
        heun = UpdateCoeffs(**DENOISED, a=r2 / 2, b=(-r2 / 2, -r / 2), g=1.0 + r / 2)
        x = ops.multistep_update(x2, denoised_2, heun, history=loop.history, write_slot=1, read_slots=[0],
                                 state=state)
    return x


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """DPM-Solver++(2M) in k-diffusion's form: t = -log sigma, h = t' - t,
    x' = (sigma'/sigma) x - (e^{-h} - 1) ((1 + 1/(2r)) D - 1/(2r) D_old), r = h_last / h (first order at the first
    step and into sigma = 0)."""
    loop = _Loop(model, x, sigmas, extra_args, callback, slots=2, strict=True)
    s = loop.sigmas
    for i in _steps(len(s) - 1, disable):
        denoised = loop.denoise(x, i, s[i])
        em = -1.0 if s[i + 1] == 0 else math.expm1(-(math.log(s[i]) - math.log(s[i + 1])))
        a = s[i + 1] / s[i]
        if i == 0 or s[i + 1] == 0:
            coeffs, n_hist = UpdateCoeffs(**DENOISED, a=a, b=(-em,)), 0
        else:
            r = (math.log(s[i - 1]) - math.log(s[i])) / (math.log(s[i]) - math.log(s[i + 1]))
            coeffs, n_hist = UpdateCoeffs(**DENOISED, a=a, b=(-em * (1 + 1 / (2 * r)), em / (2 * r))), 1
        x = loop.update(x, denoised, coeffs, i, n_hist)
    return x


def _sde_loop(model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler, order, solver_type):
    """DPM-Solver++(2M / 3M) SDE in k-diffusion's form: h = log(sigma / sigma'), h_eta = h (1 + eta),
    x' = e^{-h_eta} x + (1 - e^{-h_eta}) D + phi terms of the divided differences + sigma' sqrt(1 - e^{-2 eta h}) z."""
    _check_noise(eta, s_noise, noise_sampler)
    loop = _Loop(model, x, sigmas, extra_args, callback, slots=order, strict=True)
    noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
    s = loop.sigmas
    hs = []  # step sizes in t = -log sigma of the steps taken so far
    for i in _steps(len(s) - 1, disable):
        denoised = loop.denoise(x, i, s[i])
        if s[i + 1] == 0:  # the denoising step
            x = loop.update(x, denoised, UpdateCoeffs(**DENOISED, a=0.0, b=(1.0,)), i)
            continue
        h = math.log(s[i]) - math.log(s[i + 1])
        h_eta = h + eta * h
        c0 = -math.expm1(-h_eta)
        a = s[i + 1] / s[i] * math.exp(-eta * h)  # = e^{-h_eta}
        n_hist = min(len(hs), order - 1)
        phi_2 = c0 / -h_eta + 1  # (1 - e^{-h_eta}) / (-h_eta) + 1
        c1 = (0.5 * c0 if solver_type == "midpoint" else phi_2) if order == 2 else phi_2
        c2 = -(phi_2 / h_eta - 0.5) if order == 3 else 0.0
        r0 = hs[-1] / h if n_hist >= 1 else 0.0
        r1 = hs[-2] / h if n_hist >= 2 else 0.0
        b = _history_weights(n_hist + 1, c0, c1, c2, r0, r1)
        c = s[i + 1] * math.sqrt(-math.expm1(-2 * eta * h)) * s_noise if eta else 0.0
        noise = noise_sampler(s[i], s[i + 1]) if eta else None
        x = loop.update(x, denoised, UpdateCoeffs(**DENOISED, a=a, b=b, c=c), i, n_hist, noise=noise)
        hs.append(h)
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                        noise_sampler=None, solver_type="midpoint"):
    """DPM-Solver++(2M) SDE."""
    if solver_type not in ("heun", "midpoint"):
        raise ValueError("solver_type must be 'heun' or 'midpoint'")
    return _sde_loop(model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler, 2, solver_type)


@torch.no_grad()
def sample_dpmpp_3m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                        noise_sampler=None):
    """DPM-Solver++(3M) SDE."""
    return _sde_loop(model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler, 3, "heun")


def _ancestral_step(sigma_from: float, sigma_to: float, eta: float) -> tuple[float, float]:
    """(sigma_down, sigma_up): sigma_up = min(sigma_to, eta sqrt(sigma_to^2 (sigma_from^2 - sigma_to^2) /
    sigma_from^2)), sigma_down = sqrt(sigma_to^2 - sigma_up^2)."""
    if not eta:
        return sigma_to, 0.0
    up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    return (sigma_to**2 - up**2) ** 0.5, up


@torch.no_grad()
def sample_dpmpp_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                     noise_sampler=None, r=1 / 2):
    """DPM-Solver++ (stochastic, 2 model calls per step): an ancestral first-order step to the intermediate
    sigma(t + r h), then from the step's start (kept in the fused state) with D = (1 - 1/(2r)) D1 + 1/(2r) D2."""
    _check_noise(eta, s_noise, noise_sampler)
    checks.real("r", r, "(0, 1]")
    loop = _Loop(model, x, sigmas, extra_args, callback, slots=2)
    noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
    s = loop.sigmas
    state = torch.zeros_like(x)
    fac = 1 / (2 * r)
    for i in _steps(len(s) - 1, disable):
        denoised = loop.denoise(x, i, s[i])
        if s[i + 1] == 0:
            x = ops.multistep_update(x, denoised, _euler_coeffs(s[i], s[i + 1]))
            continue
        h = math.log(s[i]) - math.log(s[i + 1])
        s_mid = s[i] * math.exp(-r * h)  # sigma(t + r h)
        down, up = _ancestral_step(s[i], s_mid, eta)
        # x2 = (sigma_down / sigma) x + (1 - sigma_down / sigma) D + up z: k-diffusion's exponential form
        first = UpdateCoeffs(**DENOISED, a=down / s[i], b=(1.0 - down / s[i],), c=up * s_noise,
                             state=StateRow(a=1.0, b=(0.0,)))
        z = noise_sampler(s[i], s_mid)  # drawn even when unused, as k-diffusion does
        x2 = ops.multistep_update(x, denoised, first, history=loop.history, write_slot=0, state=state,
                                  noise=z if up else None)
        denoised_2 = loop.model(x2, s_mid * loop.s_in, **loop.extra_args)
        down, up = _ancestral_step(s[i], s[i + 1], eta)
        w = 1.0 - down / s[i]  # -(e^{t - t'} - 1) with e^{t - t'} = sigma'/sigma
        second = UpdateCoeffs(**DENOISED, a=0.0, b=(w * fac, w * (1 - fac)), g=down / s[i], c=up * s_noise)
        z = noise_sampler(s[i], s[i + 1])
        x = ops.multistep_update(x2, denoised_2, second, history=loop.history, write_slot=1, read_slots=[0],
                                 state=state, noise=z if up else None)
    return x
