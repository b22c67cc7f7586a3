"""k-diffusion-style samplers on the fused update.

Same signatures and numbers as k-diffusion's `sample_*` functions: `model(x, sigma, **extra_args)` returns the
denoised x0, x lives in the VE scale (x = x0 + sigma eps, start from noise * sigmas[0]), `sigmas` ends with 0.
`sigmas`: any 1-D tensor, array or sequence of at least 2 finite noise levels, non-increasing (decreasing for the
samplers that step in log sigma: dpmpp_2m, dpmpp_2m_sde, dpmpp_3m_sde), > 0 but the last, which may be 0.
The coefficients are computed in float64 from the sigmas; each step is one fused call (Heun: two).

Noise: the SDE samplers take k-diffusion's `noise_sampler(sigma, sigma_next)`; without one they draw from
k-diffusion's default, a Brownian tree over the sigmas' range (diffsampler.noise.BrownianTreeNoiseSampler: the
same bits from the same global seed) when torchsde is installed, else i.i.d. `torch.randn_like(x)`. Euler,
Heun and DPM-2 without churn do not draw the unused noise k-diffusion draws every step, so the global RNG is left
untouched.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from .. import checks, ops, sigma_grids
from ..noise import BrownianTreeNoiseSampler, sde_noise_sampler  # noqa: F401 (k-diffusion's name, re-exported)
from ..ops import UpdateCoeffs
from ..schedules import karras_sigmas
from ..solvers.ancestral import dpm2_ancestral_step, dpm2_step, dpmpp_2s_ancestral_step, euler_ancestral_step
from ..solvers.cfg_pp import dpmpp_2m_cfg_pp_coeffs, dpmpp_2s_ancestral_cfg_pp_coeffs, euler_cfg_pp_coeffs
from ..solvers.deis_ab import DEIS_MODES, deis_ab_weights
from ..solvers.dpm import history_weights, update_terms
from ..solvers.dpm_single import PIDStepSize, dpm_solver_step, fast_orders
from ..solvers.lms import MAX_ORDER, lms_coeffs, lms_step
from ..solvers.pndm import ipndm_weights
from ..solvers.res import er_noise_scaler, er_sde_coeffs, res_multistep_coeffs
from ..solvers.restart import intervals, restart_calls
from ..solvers.seeds import seeds_2_step, seeds_3_step
from ..solvers.ve import (ancestral_split, churn, dpmpp_sde_coeffs, euler_coeffs, gradient_estimation_coeffs, heun_coeffs,
                          heunpp2_step, lcm_coeffs)

DENOISED = (0.0, 1.0)  # (p, q): the model output is the data prediction itself


def _zero_appended(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def get_sigmas_karras(n, sigma_min, sigma_max, rho=7.0, device="cpu"):
    """Karras et al. (2022): n sigmas from sigma_max to sigma_min, uniform in sigma^(1/rho), then 0."""
    return _zero_appended(torch.as_tensor(karras_sigmas(sigma_min, sigma_max, n, rho), dtype=torch.float32)).to(device)


# k-diffusion's and ComfyUI's other grids, by their names (diffsampler.sigma_grids)
get_sigmas_exponential = sigma_grids.exponential
get_sigmas_polyexponential = sigma_grids.polyexponential
get_sigmas_laplace = sigma_grids.laplace


def get_sigmas_vp(n, beta_d=19.9, beta_min=0.1, eps_s=1e-3, device="cpu"):
    """Continuous-time linear VP: sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1), t from 1 to eps_s, then 0."""
    t = torch.linspace(1, eps_s, n, device=device)
    return _zero_appended(torch.sqrt(torch.exp(beta_d * t**2 / 2 + beta_min * t) - 1))


def default_noise_sampler(x):
    return lambda sigma, sigma_next: torch.randn_like(x)


def _progress(items, disable):
    """items, with a tqdm progress bar unless disabled (or tqdm is missing)."""
    if disable:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return items
    return tqdm(items, disable=disable)


def _steps(n: int, disable):
    return _progress(range(n), disable)


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

    def ancestral(self, x, denoised, step, state, noise=None):
        """A step of solvers.ancestral: one fused call, or two (TwoCalls) without history reads: stage 1 writes
        D into slot 0 and keeps the start in `state`, the model is called at sigma_mid, stage 2 combines."""
        if isinstance(step, UpdateCoeffs):
            return ops.multistep_update(x, denoised, step, noise=noise if step.c else None)
        sigma_mid, first, second = step
        x2 = ops.multistep_update(x, denoised, first, history=self.history, write_slot=0, state=state)
        denoised_2 = self.model(x2, sigma_mid * self.s_in, **self.extra_args)
        return ops.multistep_update(x2, denoised_2, second, history=self.history, write_slot=0, state=state,
                                    noise=noise if second.c else None)

    def update(self, x, denoised, coeffs, i, n_hist=0, noise=None, state=None):
        """x' from the fused op; history slot i % slots gets the denoised x0, the n_hist before it are read."""
        if self.history is None:
            return ops.multistep_update(x, denoised, coeffs, noise=noise, state=state)
        reads = [(i - k) % self.slots for k in range(1, n_hist + 1)]
        return ops.multistep_update(x, denoised, coeffs, history=self.history, write_slot=i % self.slots,
                                    read_slots=reads, noise=noise, state=state)


def _check_churn(s_churn, s_tmin, s_tmax, s_noise) -> None:
    checks.real("s_churn", s_churn, "[0, inf)")
    checks.real("s_tmin", s_tmin, "[0, inf]")
    checks.real("s_tmax", s_tmax, "[0, inf]")
    checks.real("s_noise", s_noise, "[0, inf)")


def _check_noise(eta, s_noise, noise_sampler) -> None:
    checks.real("eta", eta, "[0, inf)")
    checks.real("s_noise", s_noise, "[0, inf)")
    checks.optional_callable("noise_sampler", noise_sampler, "noise_sampler(sigma, sigma_next)")


def _churned(x, sigmas, i, s_churn, s_tmin, s_tmax, s_noise):
    """(x_hat, sigma_hat) of Karras et al.'s churn (solvers.ve.churn) at step i."""
    sigma_hat, weight = churn(sigmas[i], len(sigmas) - 1, s_churn, s_tmin, s_tmax, s_noise)
    return (x + torch.randn_like(x) * weight if weight else x), sigma_hat


@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0.0, s_tmin=0.0,
                 s_tmax=float("inf"), s_noise=1.0):
    """Karras et al. (2022) Algorithm 2, Euler steps."""
    _check_churn(s_churn, s_tmin, s_tmax, s_noise)
    loop = _Loop(model, x, sigmas, extra_args, callback, slots=0)
    s = loop.sigmas
    for i in _steps(len(s) - 1, disable):
        x, sigma_hat = _churned(x, s, i, s_churn, s_tmin, s_tmax, s_noise)
        denoised = loop.denoise(x, i, sigma_hat, sigma_hat)
        x = loop.update(x, denoised, euler_coeffs(*DENOISED, sigma_hat, s[i + 1]), i)
    return x


@torch.no_grad()
def sample_heun(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0.0, s_tmin=0.0,
                s_tmax=float("inf"), s_noise=1.0):
    """Karras et al. (2022) Algorithm 2, Heun steps (Euler into sigma = 0): solvers.ve.heun_coeffs."""
    _check_churn(s_churn, s_tmin, s_tmax, s_noise)
    loop = _Loop(model, x, sigmas, extra_args, callback, slots=2)
    s = loop.sigmas
    state = torch.zeros_like(x)
    for i in _steps(len(s) - 1, disable):
        x, sigma_hat = _churned(x, s, i, s_churn, s_tmin, s_tmax, s_noise)
        denoised = loop.denoise(x, i, sigma_hat, sigma_hat)
        if s[i + 1] == 0:
            x = ops.multistep_update(x, denoised, euler_coeffs(*DENOISED, sigma_hat, s[i + 1]))
            continue
        first, second = heun_coeffs(*DENOISED, *DENOISED, sigma_hat, s[i + 1])
        x2 = ops.multistep_update(x, denoised, first, history=loop.history, write_slot=0, state=state)
        denoised_2 = loop.model(x2, s[i + 1] * loop.s_in, **loop.extra_args)
        x = ops.multistep_update(x2, denoised_2, second, history=loop.history, write_slot=1, read_slots=[0],
                                 state=state)
    return x


def _dpmpp_loop(model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler, order, solver_type,
                sde=True):
    """DPM-Solver++(2M / 3M), ODE (eta = 0) or SDE, in k-diffusion's form: x in the VE scale (alpha = 1),
    h = log(sigma / sigma'), the step of solvers.dpm.update_terms with the order of the history there is
    (the first step first order), and x' = D at sigma' = 0."""
    _check_noise(eta, s_noise, noise_sampler)
    loop = _Loop(model, x, sigmas, extra_args, callback, slots=order, strict=True)
    noise_sampler = sde_noise_sampler(x, sigmas, noise_sampler) if sde else None
    algorithm = "sde-dpmsolver++" if eta else "dpmsolver++"
    s = loop.sigmas
    hs = []  # step sizes in t = -log sigma of the steps taken so far
    for i in _steps(len(s) - 1, disable):
        denoised = loop.denoise(x, i, s[i])
        if s[i + 1] == 0:  # the denoising step
            x = loop.update(x, denoised, euler_coeffs(*DENOISED, s[i], 0.0), i)
            continue
        h = math.log(s[i]) - math.log(s[i + 1])
        n_hist = min(len(hs), order - 1)
        a, c0, c1, c2, c = update_terms(algorithm, solver_type, n_hist + 1, 1.0, s[i], 1.0, s[i + 1], h,
                                        phi3="k-diffusion", eta=eta)
        r0 = hs[-1] / h if n_hist >= 1 else 0.0
        r1 = hs[-2] / h if n_hist >= 2 else 0.0
        coeffs = UpdateCoeffs(*DENOISED, a=a, b=history_weights(n_hist + 1, c0, c1, c2, r0, r1), c=c * s_noise)
        noise = noise_sampler(s[i], s[i + 1]) if eta else None
        x = loop.update(x, denoised, coeffs, i, n_hist, noise=noise)
        hs.append(h)
    return x


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """DPM-Solver++(2M) in k-diffusion's form: x' = (sigma'/sigma) x - (e^{-h} - 1) ((1 + 1/(2r)) D -
    1/(2r) D_old), r = h_last / h (first order at the first step and into sigma = 0)."""
    return _dpmpp_loop(model, x, sigmas, extra_args, callback, disable, 0.0, 1.0, None, 2, "midpoint", sde=False)


@torch.no_grad()
def sample_dpmpp_2m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                        noise_sampler=None, solver_type="midpoint"):
    """DPM-Solver++(2M) SDE."""
    if solver_type not in ("heun", "midpoint"):
        raise ValueError("solver_type must be 'heun' or 'midpoint'")
    return _dpmpp_loop(model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler, 2,
                       solver_type)


@torch.no_grad()
def sample_dpmpp_3m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                        noise_sampler=None):
    """DPM-Solver++(3M) SDE."""
    return _dpmpp_loop(model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler, 3, "heun")


@torch.no_grad()
def sample_dpmpp_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                     noise_sampler=None, r=1 / 2):
    """DPM-Solver++ (stochastic, 2 model calls per step; solvers.ve.dpmpp_sde_coeffs): an ancestral first-order
    step to the intermediate sigma(t + r h), then from the step's start (kept in the fused state)."""
    _check_noise(eta, s_noise, noise_sampler)
    checks.real("r", r, "(0, 1]")
    loop = _Loop(model, x, sigmas, extra_args, callback, slots=2)
    noise_sampler = sde_noise_sampler(x, sigmas, noise_sampler)
    s = loop.sigmas
    state = torch.zeros_like(x)
    for i in _steps(len(s) - 1, disable):
        denoised = loop.denoise(x, i, s[i])
        if s[i + 1] == 0:
            x = ops.multistep_update(x, denoised, euler_coeffs(*DENOISED, s[i], 0.0))
            continue
        s_mid, first, second = dpmpp_sde_coeffs(s[i], s[i + 1], eta, r, s_noise)
        z = noise_sampler(s[i], s_mid)  # drawn even when unused, as k-diffusion does
        x2 = ops.multistep_update(x, denoised, first, history=loop.history, write_slot=0, state=state,
                                  noise=z if first.c else None)
        denoised_2 = loop.model(x2, s_mid * loop.s_in, **loop.extra_args)
        z = noise_sampler(s[i], s[i + 1])
        x = ops.multistep_update(x2, denoised_2, second, history=loop.history, write_slot=1, read_slots=[0],
                                 state=state, noise=z if second.c else None)
    return x


def _multistep_history_loop(loop, x, coeffs_of, noise_sampler, disable):
    """Steps whose coefficients coeffs_of(i) -> (UpdateCoeffs, n_reads) read the last n_reads data predictions
    from the ring; noise from noise_sampler where c != 0."""
    s = loop.sigmas
    for i in _steps(len(s) - 1, disable):
        denoised = loop.denoise(x, i, s[i])
        coeffs, n_hist = coeffs_of(i)
        noise = noise_sampler(s[i], s[i + 1]) if coeffs.c else None
        x = loop.update(x, denoised, coeffs, i, n_hist, noise=noise)
    return x


def _flow_sigmas(loop) -> None:
    if loop.sigmas[0] > 1:
        raise ValueError(f"sigmas: the flow (CONST, rectified-flow) samplers take sigmas in [0, 1], got sigmas[0] = "
                         f"{loop.sigmas[0]}")


def _denoised(sigma):
    return DENOISED


def _ancestral_loop(model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler, step_of, draws,
                    flow=False):
    """The loop of the ancestral samplers: step_of(sigma, sigma_next) -> a step of solvers.ancestral;
    draws(sigma_next, step) says whether k-diffusion (ComfyUI) calls noise_sampler(sigma, sigma_next) there."""
    _check_noise(eta, s_noise, noise_sampler)
    loop = _Loop(model, x, sigmas, extra_args, callback, slots=1)
    if flow:
        _flow_sigmas(loop)
    noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
    s = loop.sigmas
    state = None
    for i in _steps(len(s) - 1, disable):
        denoised = loop.denoise(x, i, s[i])
        step = step_of(s[i], s[i + 1])
        if state is None and not isinstance(step, UpdateCoeffs):
            state = torch.zeros_like(x)
        z = noise_sampler(s[i], s[i + 1]) if draws(s[i + 1], step) else None
        x = loop.ancestral(x, denoised, step, state, z)
    return x


@torch.no_grad()
def sample_lms(model, x, sigmas, extra_args=None, callback=None, disable=None, order=4):
    """Linear multistep (solvers.lms): x' = x + sum_j c_j d_{i-j} over the derivatives d = (x - D) / sigma of
    the last min(i + 1, order) steps (the ring), c_j the exact integrals of the Lagrange basis through their
    sigmas."""
    order = checks.integer("order", order, 1, MAX_ORDER)
    loop = _Loop(model, x, sigmas, extra_args, callback, slots=MAX_ORDER, strict=order > 1)

    def coeffs_of(i):
        coeffs, _, reads = lms_step(loop.sigmas, i, "x0", order, i)
        return coeffs, len(reads)

    return _multistep_history_loop(loop, x, coeffs_of, None, disable)


def _ipndm_loop(model, x, sigmas, extra_args, callback, disable, max_order, variable):
    """iPNDM in sigma (solvers.pndm.ipndm_weights): x' = x + h sum_j c_j d_{i-j}, the derivatives d = (x - D) /
    sigma of the last min(i + 1, max_order) steps in the ring; into sigma = 0 x' = D."""
    max_order = checks.integer("max_order", max_order, 1, MAX_ORDER)
    loop = _Loop(model, x, sigmas, extra_args, callback, slots=MAX_ORDER, strict=variable)

    def coeffs_of(i):
        weights = ipndm_weights(loop.sigmas, i, max_order, variable)
        return lms_coeffs(*DENOISED, loop.sigmas[i], weights), len(weights) - 1

    return _multistep_history_loop(loop, x, coeffs_of, None, disable)


@torch.no_grad()
def sample_ipndm(model, x, sigmas, extra_args=None, callback=None, disable=None, max_order=4):
    """iPNDM (ComfyUI's sample_ipndm): Adams-Bashforth's fixed weights (1; 3/2, -1/2; 23/12, -16/12, 5/12;
    55/24, -59/24, 37/24, -9/24) on the derivative history, x' = x + (sigma' - sigma) sum_j c_j d_{i-j}."""
    return _ipndm_loop(model, x, sigmas, extra_args, callback, disable, max_order, False)


@torch.no_grad()
def sample_ipndm_v(model, x, sigmas, extra_args=None, callback=None, disable=None, max_order=4):
    """iPNDM-v (ComfyUI's sample_ipndm_v): iPNDM with the step-size-dependent weights of
    solvers.pndm.ipndm_v_weights (sigmas must decrease)."""
    return _ipndm_loop(model, x, sigmas, extra_args, callback, disable, max_order, True)


@torch.no_grad()
def sample_res_multistep(model, x, sigmas, extra_args=None, callback=None, disable=None, s_noise=1.0,
                         noise_sampler=None, eta=0.0):
    """RES second-order exponential multistep (solvers.res.res_multistep_coeffs), ComfyUI's res_multistep; eta > 0
    is its ancestral variant (noise from noise_sampler, default randn_like)."""
    _check_noise(eta, s_noise, noise_sampler)
    loop = _Loop(model, x, sigmas, extra_args, callback, slots=2)
    noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
    s, prev = loop.sigmas, [None]

    def coeffs_of(i):
        coeffs, down = res_multistep_coeffs(DENOISED, s[i], s[i + 1], eta, s_noise, prev[0])
        prev[0] = (s[i], down)
        return coeffs, len(coeffs.b) - 1

    return _multistep_history_loop(loop, x, coeffs_of, noise_sampler, disable)


@torch.no_grad()
def sample_res_multistep_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0,
                                   s_noise=1.0, noise_sampler=None):
    """sample_res_multistep with eta = 1 (ComfyUI's res_multistep_ancestral)."""
    return sample_res_multistep(model, x, sigmas, extra_args, callback, disable, s_noise, noise_sampler, eta)


@torch.no_grad()
def sample_er_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, s_noise=1.0, noise_sampler=None,
                  noise_scaler=None, max_stage=3):
    """ER-SDE-Solver (solvers.res.er_sde_coeffs) in the VE scale (lambda = sigma), ComfyUI's er_sde: stages up
    to max_stage, noise_scaler(lambda) the noise function (default l (e^{l^0.3} + 10))."""
    _check_noise(0.0, s_noise, noise_sampler)
    checks.optional_callable("noise_scaler", noise_scaler, "noise_scaler(lambda)")
    if max_stage not in (1, 2, 3):
        raise ValueError(f"max_stage must be 1, 2 or 3, got {max_stage!r}")
    loop = _Loop(model, x, sigmas, extra_args, callback, slots=3)
    noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
    scaler = er_noise_scaler if noise_scaler is None else noise_scaler
    s = loop.sigmas

    def coeffs_of(i):
        if s[i + 1] == 0:
            return UpdateCoeffs(*DENOISED, a=0.0, b=(1.0,)), 0
        stage = min(max_stage, i + 1)
        coeffs = er_sde_coeffs(DENOISED, [s[i - k] for k in range(stage)], s[i + 1], 1.0, 1.0, stage, s_noise,
                               scaler)
        return coeffs, stage - 1

    return _multistep_history_loop(loop, x, coeffs_of, noise_sampler, disable)


@torch.no_grad()
def sample_euler_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                           noise_sampler=None):
    """Ancestral Euler: x' = x + (sigma_down - sigma) d + s_noise sigma_up z (solvers.ancestral); z is drawn
    wherever sigma' > 0, as k-diffusion draws it."""
    step_of = lambda sigma, nxt: euler_ancestral_step(_denoised, sigma, nxt, eta, s_noise)
    return _ancestral_loop(model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler, step_of,
                           lambda nxt, step: nxt > 0)


@torch.no_grad()
def sample_euler_ancestral_RF(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                              noise_sampler=None):
    """ComfyUI's flow (CONST) ancestral Euler: x' = k (x + (sigma_down - sigma) d) + s_noise w z
    (solvers.ancestral.rf_ancestral_split), x' = D into sigma' = 0; z drawn where sigma' > 0 and eta > 0."""
    step_of = lambda sigma, nxt: euler_ancestral_step(_denoised, sigma, nxt, eta, s_noise, flow=True)
    return _ancestral_loop(model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler, step_of,
                           lambda nxt, step: nxt > 0 and eta > 0, flow=True)


@torch.no_grad()
def sample_dpm_2(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0.0, s_tmin=0.0,
                 s_tmax=float("inf"), s_noise=1.0):
    """DPM-2 (k-diffusion's, after Karras et al.'s Algorithm 2): the midpoint in log sigma, Euler into sigma = 0
    (solvers.ancestral.dpm2_step); churn as sample_euler's."""
    _check_churn(s_churn, s_tmin, s_tmax, s_noise)
    loop = _Loop(model, x, sigmas, extra_args, callback, slots=1)
    s = loop.sigmas
    state = torch.zeros_like(x)
    for i in _steps(len(s) - 1, disable):
        x, sigma_hat = _churned(x, s, i, s_churn, s_tmin, s_tmax, s_noise)
        denoised = loop.denoise(x, i, sigma_hat, sigma_hat)
        x = loop.ancestral(x, denoised, dpm2_step(_denoised, sigma_hat, s[i + 1]), state)
    return x


@torch.no_grad()
def sample_dpm_2_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                           noise_sampler=None):
    """Ancestral DPM-2: the DPM-2 step to sigma_down, then + s_noise sigma_up z (no noise where sigma_down = 0,
    an Euler step there, as k-diffusion)."""
    step_of = lambda sigma, nxt: dpm2_ancestral_step(_denoised, sigma, nxt, eta, s_noise)
    return _ancestral_loop(model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler, step_of,
                           lambda nxt, step: not isinstance(step, UpdateCoeffs))


@torch.no_grad()
def sample_dpm_2_ancestral_RF(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                              noise_sampler=None):
    """ComfyUI's flow (CONST) ancestral DPM-2: the DPM-2 step to sigma_down, then x' = k x + s_noise w z
    (solvers.ancestral.dpm2_ancestral_step); z drawn wherever the step is not the Euler one, as ComfyUI."""
    step_of = lambda sigma, nxt: dpm2_ancestral_step(_denoised, sigma, nxt, eta, s_noise, flow=True)
    return _ancestral_loop(model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler, step_of,
                           lambda nxt, step: not isinstance(step, UpdateCoeffs), flow=True)


@torch.no_grad()
def sample_dpmpp_2s_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                              noise_sampler=None):
    """Ancestral DPM-Solver++(2S) (solvers.ancestral.dpmpp_2s_ancestral_step): to sigma_down with sigma_mid =
    sqrt(sigma sigma_down), + s_noise sigma_up z where sigma' > 0."""
    step_of = lambda sigma, nxt: dpmpp_2s_ancestral_step(_denoised, sigma, nxt, eta, s_noise)
    return _ancestral_loop(model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler, step_of,
                           lambda nxt, step: nxt > 0)


@torch.no_grad()
def sample_dpmpp_2s_ancestral_RF(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0,
                                 s_noise=1.0, noise_sampler=None):
    """ComfyUI's flow (CONST) DPM-Solver++(2S) ancestral: ComfyUI's split (rf_ancestral_split) and the midpoint
    in lambda = log((1 - sigma) / sigma); x' = D into sigma' = 0; z drawn where sigma' > 0 and eta > 0."""
    step_of = lambda sigma, nxt: dpmpp_2s_ancestral_step(_denoised, sigma, nxt, eta, s_noise, flow=True)
    return _ancestral_loop(model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler, step_of,
                           lambda nxt, step: nxt > 0 and eta > 0, flow=True)


@torch.no_grad()
def sample_restart(model, x, sigmas, extra_args=None, callback=None, disable=None, s_noise=1.0, restart_list=None):
    """Restart sampling (solvers.restart), as its authors' restart_sampler: Heun steps, and at each restart point
    t_min a jump back to t_max with fresh noise (torch.randn_like, drawn where they draw it), K times;
    restart_list {t_min: [n, K, t_max]}, None: their default for >= 20 steps."""
    checks.real("s_noise", s_noise, "[0, inf)")
    loop = _Loop(model, x, sigmas, extra_args, callback, slots=2)
    pairs = intervals(loop.sigmas, restart_list)
    calls = restart_calls(pairs, lambda s: DENOISED, s_noise)
    state = torch.zeros_like(x)
    interval = 0
    for sigma, coeffs, write, reads in _progress(calls, disable):
        denoised = loop.model(x, sigma * loop.s_in, **loop.extra_args)
        if write == 0:  # the first call of an interval: the authors' callback
            if loop.callback is not None:
                loop.callback({"x": x, "i": interval, "sigma": pairs[interval][1], "sigma_hat": sigma,
                               "denoised": denoised})
            interval += 1
        noise = torch.randn_like(x) if coeffs.c else None
        x = ops.multistep_update(x, denoised, coeffs, history=loop.history, write_slot=write, read_slots=reads,
                                 noise=noise, state=state)
    return x


def _calls(loop, x, denoised, sigmas, calls, state, noises=()):
    """One step of several fused calls: call k combines the model output at sigmas[k] (call 0: denoised, the
    step's first), writes history slot k (the last slot for any later k), reads slots 0 .. n - 1 with n + 1 b
    entries, and adds noises[k] (None or missing: no noise)."""
    for k, coeffs in enumerate(calls):
        if k:
            denoised = loop.model(x, sigmas[k] * loop.s_in, **loop.extra_args)
        z = noises[k] if k < len(noises) else None
        x = ops.multistep_update(x, denoised, coeffs, history=loop.history, write_slot=min(k, loop.slots - 1),
                                 read_slots=list(range(len(coeffs.b) - 1)), noise=z, state=state)
    return x


def _lcm(model, x, sigmas, extra_args, callback, disable, noise_sampler, s_noise, s_noise_end, noise_clip_std,
         flow):
    checks.real("s_noise", s_noise, "[0, inf)")
    s_end = s_noise if s_noise_end is None else checks.real("s_noise_end", s_noise_end, "[0, inf)")
    clip = checks.real("noise_clip_std", noise_clip_std, "[0, inf)")
    checks.optional_callable("noise_sampler", noise_sampler, "noise_sampler(sigma, sigma_next)")
    loop = _Loop(model, x, sigmas, extra_args, callback, slots=0)
    if flow:
        _flow_sigmas(loop)
    noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
    s = loop.sigmas
    n = len(s) - 1
    for i in _steps(n, disable):
        denoised = loop.denoise(x, i, s[i])
        weight = s_noise + (s_end - s_noise) * (i / (n - 1) if n > 1 else 0.0)
        z = noise_sampler(s[i], s[i + 1]) if s[i + 1] > 0 else None
        if z is not None and clip > 0:
            bound = float(clip * z.std())
            z = z.clamp(-bound, bound)
        x = loop.update(x, denoised, lcm_coeffs(*DENOISED, s[i + 1], weight if z is not None else 0.0, flow), i,
                        noise=z)
    return x


@torch.no_grad()
def sample_lcm(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None, s_noise=1.0,
               s_noise_end=None, noise_clip_std=0.0):
    """LCM's multistep consistency sampling (ComfyUI's sample_lcm): x' = D + s sigma' z, s from s_noise to
    s_noise_end linearly over the steps, z clamped to +- noise_clip_std std(z) when that is > 0."""
    return _lcm(model, x, sigmas, extra_args, callback, disable, noise_sampler, s_noise, s_noise_end,
                noise_clip_std, False)


@torch.no_grad()
def sample_lcm_RF(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None, s_noise=1.0,
                  s_noise_end=None, noise_clip_std=0.0):
    """sample_lcm in ComfyUI's flow (CONST) form: x' = (1 - sigma') D + s sigma' z."""
    return _lcm(model, x, sigmas, extra_args, callback, disable, noise_sampler, s_noise, s_noise_end,
                noise_clip_std, True)


@torch.no_grad()
def sample_heunpp2(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0.0, s_tmin=0.0,
                   s_tmax=float("inf"), s_noise=1.0):
    """Heun++ (ComfyUI's sample_heunpp2; solvers.ve.heunpp2_step): up to 3 model calls per step, the derivatives
    along the Euler chain over the next grid sigmas weighed by sigma_k / (m sigma_0); churn as sample_euler's."""
    _check_churn(s_churn, s_tmin, s_tmax, s_noise)
    loop = _Loop(model, x, sigmas, extra_args, callback, slots=2)
    s = loop.sigmas
    state = torch.zeros_like(x)
    for i in _steps(len(s) - 1, disable):
        x, sigma_hat = _churned(x, s, i, s_churn, s_tmin, s_tmax, s_noise)
        denoised = loop.denoise(x, i, sigma_hat, sigma_hat)
        x = _calls(loop, x, denoised, *heunpp2_step(_denoised, sigma_hat, s, i), state)
    return x


@torch.no_grad()
def sample_gradient_estimation(model, x, sigmas, extra_args=None, callback=None, disable=None, ge_gamma=2.0,
                               cfg_pp=False):
    """Gradient estimation (Permenter & Yuan 2024; ComfyUI's sample_gradient_estimation):
    x' = x + (sigma' - sigma) (ge_gamma d - (ge_gamma - 1) d_prev), the derivatives d in the fused history;
    cfg_pp: its CFG++ form (model returns (denoised, uncond_denoised), d = (x - U) / sigma, x' = D + sigma' d +
    (ge_gamma - 1) (sigma' - sigma) (d - d_prev))."""
    ge_gamma = checks.real("ge_gamma", ge_gamma)
    coeffs_of = lambda s, i: _history_coeffs(  # noqa: E731
        gradient_estimation_coeffs(*DENOISED, s[i], s[i + 1], ge_gamma, i == 0, cfg_pp=bool(cfg_pp)))
    if cfg_pp:
        return _cfg_pp_loop(model, x, sigmas, extra_args, callback, disable, coeffs_of)
    loop = _Loop(model, x, sigmas, extra_args, callback, slots=2)
    return _multistep_history_loop(loop, x, lambda i: coeffs_of(loop.sigmas, i), None, disable)


@torch.no_grad()
def sample_gradient_estimation_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None, ge_gamma=2.0):
    """sample_gradient_estimation with cfg_pp=True (ComfyUI's name)."""
    return sample_gradient_estimation(model, x, sigmas, extra_args, callback, disable, ge_gamma, cfg_pp=True)


def _history_coeffs(coeffs):
    """(coeffs, the history reads its b makes)."""
    return coeffs, len(coeffs.b) - 1


def _seeds_loop(model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler, step_of):
    """The SEEDS steps step_of(sigma, sigma_next) -> (sigmas, calls) (solvers.seeds); x' = D into sigma' = 0."""
    _check_noise(eta, s_noise, noise_sampler)
    loop = _Loop(model, x, sigmas, extra_args, callback, slots=2, strict=True)
    noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
    s = loop.sigmas
    state = torch.zeros_like(x)
    for i in _steps(len(s) - 1, disable):
        denoised = loop.denoise(x, i, s[i])
        if s[i + 1] == 0:
            x = loop.update(x, denoised, euler_coeffs(*DENOISED, s[i], 0.0), i)
            continue
        chain, calls = step_of(s[i], s[i + 1])
        noises = [noise_sampler(chain[k], chain[k + 1]) for k in range(len(calls))] if eta > 0 and s_noise > 0 \
            else ()  # drawn as ComfyUI does, weight 0 or not (r = 1)
        x = _calls(loop, x, denoised, chain, calls, state, noises)
    return x


@torch.no_grad()
def sample_seeds_2(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                   noise_sampler=None, r=0.5, solver_type="phi_1"):
    """SEEDS-2 (ComfyUI's sample_seeds_2; solvers.seeds): two stages in lambda = -log sigma, the second at
    sigma e^{-r h}; solver_type 'phi_1' or 'phi_2' (the weights of its second stage)."""
    checks.real("r", r, "(0, 1]")
    if solver_type not in ("phi_1", "phi_2"):
        raise ValueError(f"solver_type must be 'phi_1' or 'phi_2', got {solver_type!r}")
    step_of = lambda sigma, nxt: seeds_2_step(_denoised, sigma, nxt, eta, s_noise, r, solver_type)
    return _seeds_loop(model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler, step_of)


@torch.no_grad()
def sample_exp_heun_2_x0(model, x, sigmas, extra_args=None, callback=None, disable=None, solver_type="phi_2"):
    """The exponential Heun method in data prediction (ComfyUI's): sample_seeds_2 with r = 1, no noise."""
    return sample_seeds_2(model, x, sigmas, extra_args, callback, disable, eta=0.0, s_noise=0.0, r=1.0,
                          solver_type=solver_type)


@torch.no_grad()
def sample_exp_heun_2_x0_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                             noise_sampler=None, solver_type="phi_2"):
    """Its stochastic form (ComfyUI's): sample_seeds_2 with r = 1."""
    return sample_seeds_2(model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler, r=1.0,
                          solver_type=solver_type)


@torch.no_grad()
def sample_seeds_3(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                   noise_sampler=None, r_1=1 / 3, r_2=2 / 3):
    """SEEDS-3 (ComfyUI's sample_seeds_3; solvers.seeds): three stages, at sigma e^{-r_1 h} and sigma e^{-r_2 h}."""
    r_1, r_2 = checks.real("r_1", r_1, "(0, 1)"), checks.real("r_2", r_2, "(0, 1]")
    if not r_1 < r_2:
        raise ValueError(f"r_1 must be below r_2 (the stages in order), got r_1 = {r_1}, r_2 = {r_2}")
    step_of = lambda sigma, nxt: seeds_3_step(_denoised, sigma, nxt, eta, s_noise, r_1, r_2)
    return _seeds_loop(model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler, step_of)


def _guided(loop, x, i):
    """(D, U) of a CFG++ model call: model(x, sigma, **extra_args) returns the guided and the unconditional data
    predictions (denoised, uncond_denoised); the callback gets the guided one."""
    out = loop.model(x, loop.sigmas[i] * loop.s_in, **loop.extra_args)
    if not (isinstance(out, tuple) and len(out) == 2 and all(isinstance(t, torch.Tensor) for t in out)):
        raise ValueError(f"model: the CFG++ samplers take a model returning the tuple (denoised, uncond_denoised), "
                         f"got {type(out).__name__}")
    if loop.callback is not None:
        loop.callback({"x": x, "i": i, "sigma": loop.sigmas[i], "sigma_hat": loop.sigmas[i], "denoised": out[0]})
    return out


def _cfg_pp_loop(model, x, sigmas, extra_args, callback, disable, coeffs_of, strict=False, noise_sampler=None):
    """coeffs_of(sigmas, i) -> (UpdateCoeffs, n_reads) of solvers.cfg_pp: out = U (into the ring), state = D
    (read only); noise from noise_sampler where c != 0."""
    loop = _Loop(model, x, sigmas, extra_args, callback, slots=2, strict=strict)
    s = loop.sigmas
    for i in _steps(len(s) - 1, disable):
        denoised, uncond = _guided(loop, x, i)
        coeffs, n_hist = coeffs_of(s, i)
        noise = noise_sampler(s[i], s[i + 1]) if coeffs.c else None
        x = loop.update(x, uncond, coeffs, i, n_hist, noise=noise, state=denoised)
    return x


@torch.no_grad()
def sample_euler_ancestral_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0,
                                  s_noise=1.0, noise_sampler=None):
    """Ancestral Euler CFG++ (ComfyUI's sample_euler_ancestral_cfg_pp; solvers.cfg_pp): x' = D + sigma_down
    (x - U) / sigma + s_noise sigma_up z; model returns (denoised, uncond_denoised)."""
    _check_noise(eta, s_noise, noise_sampler)
    noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
    return _cfg_pp_loop(model, x, sigmas, extra_args, callback, disable,
                        lambda s, i: (euler_cfg_pp_coeffs(s[i], s[i + 1], eta, s_noise), 0),
                        noise_sampler=noise_sampler)


@torch.no_grad()
def sample_dpmpp_2s_ancestral_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0,
                                     s_noise=1.0, noise_sampler=None):
    """ComfyUI's DPM-Solver++(2S) ancestral CFG++ (solvers.cfg_pp.dpmpp_2s_ancestral_cfg_pp_coeffs): two calls per
    step (the second at sigma_mid = sqrt(sigma sigma_down), its guided D_2 used), + s_noise sigma_up z where
    sigma' > 0; model returns (denoised, uncond_denoised)."""
    _check_noise(eta, s_noise, noise_sampler)
    noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
    loop = _Loop(model, x, sigmas, extra_args, callback, slots=2)
    s = loop.sigmas
    for i in _steps(len(s) - 1, disable):
        denoised, uncond = _guided(loop, x, i)
        first, second, sigma_mid = dpmpp_2s_ancestral_cfg_pp_coeffs(s[i], s[i + 1], eta, s_noise)
        if second is None:
            noise = noise_sampler(s[i], s[i + 1]) if s[i + 1] > 0 else None
            x = ops.multistep_update(x, denoised, first, noise=noise if first.c else None)
            continue
        x2 = ops.multistep_update(x, denoised, first, history=loop.history, write_slot=0, state=uncond)
        denoised_2 = loop.model(x2, sigma_mid * loop.s_in, **loop.extra_args)
        if not (isinstance(denoised_2, tuple) and len(denoised_2) == 2):
            raise ValueError("model: the CFG++ samplers take a model returning the tuple (denoised, uncond_denoised)")
        noise = noise_sampler(s[i], s[i + 1]) if s[i + 1] > 0 else None
        x = ops.multistep_update(x2, denoised_2[0], second, history=loop.history, write_slot=1, read_slots=[0],
                                 noise=noise if second.c else None)
    return x


@torch.no_grad()
def sample_euler_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """Euler CFG++ (ComfyUI's sample_euler_cfg_pp): x' = D + sigma' (x - U) / sigma; model returns
    (denoised, uncond_denoised)."""
    return _cfg_pp_loop(model, x, sigmas, extra_args, callback, disable,
                        lambda s, i: (euler_cfg_pp_coeffs(s[i], s[i + 1]), 0))


@torch.no_grad()
def sample_dpmpp_2m_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """DPM-Solver++(2M) CFG++ (ComfyUI's sample_dpmpp_2m_cfg_pp; solvers.cfg_pp): x' = e^{-h} x + D - e^{-h} U -
    expm1(-h) / (2 r) (D - U_prev); model returns (denoised, uncond_denoised)."""
    def coeffs_of(s, i):
        h_prev = math.log(s[i - 1] / s[i]) if i > 0 else None
        coeffs = dpmpp_2m_cfg_pp_coeffs(s[i], s[i + 1], h_prev)
        return coeffs, len(coeffs.b) - 1

    return _cfg_pp_loop(model, x, sigmas, extra_args, callback, disable, coeffs_of, strict=True)


def _dpm_range(sigma_min, sigma_max) -> tuple[float, float]:
    lo, hi = checks.real("sigma_min", sigma_min, "(0, inf)"), checks.real("sigma_max", sigma_max, "(0, inf)")
    if not lo < hi:
        raise ValueError(f"sigma_min must be below sigma_max, got {lo} and {hi}")
    return lo, hi


def _dpm_noise(sigma: float, sigma_next: float, eta: float, sigma_min: float) -> tuple[float, float]:
    """(the sigma the deterministic step goes to, the noise weight) of k-diffusion's DPMSolver with eta:
    max(sigma_down, sigma_min) and sqrt(sigma'^2 - that^2)."""
    if not eta:
        return sigma_next, 0.0
    down = max(ancestral_split(sigma, sigma_next, eta)[0], sigma_min)
    return down, math.sqrt(max(sigma_next**2 - down**2, 0.0))


class _DPMSolverLoop(_Loop):
    """_Loop with k-diffusion's DPMSolver callback: {'x', 'i', 't', 't_up', 'denoised', 'sigma', 'sigma_hat',
    ...} (sigma = e^{-t})."""

    def denoise_at(self, x, sigma, info):
        denoised = self.model(x, sigma * self.s_in, **self.extra_args)
        if self.callback is not None:
            t = -math.log(sigma)
            self.callback({"sigma": sigma, "sigma_hat": sigma, "x": x, "t": t, "t_up": t, "denoised": denoised,
                           **info})
        return denoised


@torch.no_grad()
def sample_dpm_fast(model, x, sigma_min, sigma_max, n, extra_args=None, callback=None, disable=None, eta=0.0,
                    s_noise=1.0, noise_sampler=None):
    """DPM-Solver-fast (k-diffusion's; solvers.dpm_single): n model calls over floor(n / 3) + 1 steps uniform
    in t = -log sigma from sigma_max to sigma_min, orders 3, ..., 3 and then (2, 1) or n % 3; eta > 0 steps to
    max(sigma_down, sigma_min) and adds s_noise sqrt(sigma'^2 - that^2) z."""
    lo, hi = _dpm_range(sigma_min, sigma_max)
    n = checks.integer("n", n, 1)
    _check_noise(eta, s_noise, noise_sampler)
    orders = fast_orders(n)
    ts = torch.linspace(-math.log(hi), -math.log(lo), len(orders) + 1, dtype=torch.float64).tolist()
    sig = [math.exp(-t) for t in ts]
    loop = _DPMSolverLoop(model, x, sig, extra_args, callback, slots=3, strict=True)
    noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
    state = torch.zeros_like(x)
    for i in _steps(len(orders), disable):
        to, up = _dpm_noise(sig[i], sig[i + 1], eta, lo)
        denoised = loop.denoise_at(x, sig[i], {"i": i})
        chain, calls = dpm_solver_step(_denoised, sig[i], to, orders[i], noise=up * s_noise)
        noises = [None] * (len(calls) - 1) + [noise_sampler(sig[i], sig[i + 1])] if eta else ()
        x = _calls(loop, x, denoised, chain, calls, state, noises)
    return x


def _relative_error(x_low, x_high, x_prev, rtol, atol) -> float:
    """k-diffusion's error estimate: the RMS of (x_low - x_high) / max(atol, rtol max(|x_low|, |x_prev|))."""
    scale = torch.maximum(torch.maximum(x_low.abs(), x_prev.abs()) * rtol, x_low.new_tensor(atol))
    return float(torch.linalg.norm((x_low - x_high) / scale)) / x_low.numel() ** 0.5


@torch.no_grad()
def sample_dpm_adaptive(model, x, sigma_min, sigma_max, extra_args=None, callback=None, disable=None, order=3,
                        rtol=0.05, atol=0.0078, h_init=0.05, pcoeff=0.0, icoeff=1.0, dcoeff=0.0, accept_safety=0.81,
                        eta=0.0, s_noise=1.0, noise_sampler=None, return_info=False):
    """DPM-Solver-12 / 23 (k-diffusion's adaptive DPM-Solver): from sigma_max to sigma_min in t = -log sigma,
    each attempt a step of `order` (2 or 3) with the embedded lower order in the fused state, the error estimate
    (one reduction) and solvers.dpm_single.PIDStepSize on the host; eta as sample_dpm_fast's (the noise, one
    more fused call, on accepted steps). Returns x, or (x, info) with info's steps, nfe, n_accept, n_reject."""
    lo, hi = _dpm_range(sigma_min, sigma_max)
    if order not in (2, 3):
        raise ValueError(f"order must be 2 or 3, got {order!r}")
    rtol, atol = checks.real("rtol", rtol, "[0, inf)"), checks.real("atol", atol, "(0, inf)")
    h_init = checks.real("h_init", h_init, "(-inf, inf)")
    if h_init == 0:
        raise ValueError("h_init must not be 0 (the first step size in t = -log sigma)")
    coeffs = [checks.real(name, v) for name, v in (("pcoeff", pcoeff), ("icoeff", icoeff), ("dcoeff", dcoeff))]
    accept_safety = checks.real("accept_safety", accept_safety)
    _check_noise(eta, s_noise, noise_sampler)
    loop = _DPMSolverLoop(model, x, [hi, lo], extra_args, callback, slots=3, strict=True)
    noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
    s, t_end = -math.log(hi), -math.log(lo)
    pid = PIDStepSize(abs(h_init), *coeffs, 1.5 if eta else order, accept_safety)
    info = {"steps": 0, "nfe": 0, "n_accept": 0, "n_reject": 0}
    buffers, x_prev = [torch.zeros_like(x), torch.zeros_like(x)], x
    while s < t_end - 1e-5:
        t = min(t_end, s + pid.h)
        to, up = _dpm_noise(math.exp(-s), math.exp(-t), eta, lo)
        denoised = loop.model(x, math.exp(-s) * loop.s_in, **loop.extra_args)
        chain, calls = dpm_solver_step(_denoised, math.exp(-s), to, order, embedded=True)
        x_high = _calls(loop, x, denoised, chain, calls, buffers[0])
        error = _relative_error(buffers[0], x_high, x_prev, rtol, atol)
        if pid.propose_step(error):
            x_prev, buffers = buffers[0], buffers[::-1]
            if eta:
                noise = UpdateCoeffs(p=0.0, q=0.0, a=1.0, b=(0.0,), e=up * s_noise)
                x_high = ops.multistep_update(x_high, noise_sampler(math.exp(-s), math.exp(-t)), noise)
            x, s = x_high, t
            info["n_accept"] += 1
        else:
            info["n_reject"] += 1
        info["nfe"] += order
        info["steps"] += 1
        if loop.callback is not None:
            loop.callback({"sigma": math.exp(-s), "sigma_hat": math.exp(-s), "x": x, "i": info["steps"] - 1, "t": s,
                           "t_up": s, "denoised": denoised, "error": error, "h": pid.h, **info})
    return (x, info) if return_info else x


@torch.no_grad()
def sample_deis(model, x, sigmas, extra_args=None, callback=None, disable=None, max_order=3, deis_mode="tab"):
    """DEIS (ComfyUI's sample_deis; solvers.deis_ab): x' = x + sum_j C_j d_{i-j} over the last min(i + 1,
    max_order) derivatives in the fused ring, C_j the integrals of DEIS's Lagrange basis in the VP time
    ('tab') or in sigma ('rhoab'); Euler into sigma' = 0."""
    max_order = checks.integer("max_order", max_order, 1, MAX_ORDER)
    if deis_mode not in DEIS_MODES:
        raise ValueError(f"deis_mode must be one of {DEIS_MODES}, got {deis_mode!r}")
    loop = _Loop(model, x, sigmas, extra_args, callback, slots=MAX_ORDER, strict=max_order > 1)

    def coeffs_of(i):
        weights = deis_ab_weights(loop.sigmas, i, max_order, deis_mode)
        return lms_coeffs(*DENOISED, loop.sigmas[i], weights), len(weights) - 1

    return _multistep_history_loop(loop, x, coeffs_of, None, disable)


def _res_cfg_pp(model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler):
    _check_noise(eta, s_noise, noise_sampler)
    noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
    prev = [None]

    def coeffs_of(s, i):
        coeffs, down = res_multistep_coeffs(DENOISED, s[i], s[i + 1], eta, s_noise, prev[0], cfg_pp=True)
        prev[0] = (s[i], down)
        return _history_coeffs(coeffs)

    return _cfg_pp_loop(model, x, sigmas, extra_args, callback, disable, coeffs_of, noise_sampler=noise_sampler)


@torch.no_grad()
def sample_res_multistep_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None, s_noise=1.0,
                                noise_sampler=None):
    """RES multistep CFG++ (ComfyUI's; solvers.res.res_multistep_coeffs with cfg_pp): the RES step of U from
    x + D - U, the Euler step x' = D + (sigma_down / sigma) (x - U); model returns (denoised, uncond_denoised)."""
    return _res_cfg_pp(model, x, sigmas, extra_args, callback, disable, 0.0, s_noise, noise_sampler)


@torch.no_grad()
def sample_res_multistep_ancestral_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0,
                                          s_noise=1.0, noise_sampler=None):
    """sample_res_multistep_cfg_pp with eta (ComfyUI's res_multistep_ancestral_cfg_pp)."""
    return _res_cfg_pp(model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler)
