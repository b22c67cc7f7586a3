"""Steps in the VE scale x = x0 + sigma eps (Karras et al. 2022), where diffusers' Euler schedulers, the EDM
solvers and k-diffusion sample; D = p x + q out is the data prediction, d = (x - D) / sigma.

    data prediction  eps: D = x - sigma eps;  x0: D = out;  v: D = x / (sigma^2 + 1) - sigma v / sqrt(sigma^2 + 1)
                     EDM preconditioned: D = c_skip x + c_out out (edm_data_coeffs)
    Euler            x' = x + (sigma' - sigma) d
    Heun             stage 1 the Euler step to x2, keeping its start s; stage 2
                     x' = s + (sigma' - sigma) (d + d2) / 2 = (1 + r/2) s - r/2 D + r2/2 x2 - r2/2 D2,
                     r = (sigma' - sigma) / sigma, r2 = (sigma' - sigma) / sigma'
    churn            sigma_hat = sigma (1 + gamma), gamma = min(s_churn / n, sqrt(2) - 1) for sigma in
                     [s_tmin, s_tmax] (else 0), x_hat = x + s_noise sqrt(sigma_hat^2 - sigma^2) z
    ancestral split  sigma_up = min(sigma_to, eta sqrt(sigma_to^2 (sigma_from^2 - sigma_to^2) / sigma_from^2)),
                     sigma_down = sqrt(sigma_to^2 - sigma_up^2)
    DPM-Solver++ SDE (k-diffusion's sample_dpmpp_sde, two calls per step, h = log(sigma / sigma'),
                     fac = 1 / (2 r)): an ancestral Euler step to sigma(t + r h), then from the start s
                     x' = (sigma_down / sigma) s + (1 - sigma_down / sigma) ((1 - fac) D + fac D2) + sigma_up z
    LCM              x' = k D + s_noise sigma' z  (k = 1; flow, CONST: k = 1 - sigma')
    Heun++ (heunpp2) x' = x + (sigma_1 - sigma) (w_0 d + w_1 d_1 [+ w_2 d_2]), d_k the derivatives at the Euler
                     chain x_1 = x + (sigma_1 - sigma) d, x_2 = x_1 + (sigma_2 - sigma_1) d_1 over the next grid
                     sigmas, w_k = sigma_k / (m sigma_0) (k >= 1, m the number of calls), w_0 = 1 - sum; the call
                     count m = 3, or 2 before the last interval, 1 (Euler) on it
    gradient estimation (Permenter & Yuan 2024)  x' = x + (sigma' - sigma) (gamma d - (gamma - 1) d_prev), the
                     first step Euler, x' = D into sigma' = 0
"""

from __future__ import annotations

import dataclasses
import math

from ..ops import StateRow, UpdateCoeffs

KEEP_START = StateRow(a=1.0, b=(0.0,))  # the state becomes the step's start x


def ve_data_coeffs(prediction: str, sigma: float) -> tuple[float, float]:
    """(p, q) of D = p x + q out. "flow": a velocity v = eps - x0 on a Flow schedule, x = (1 - sigma) x0 +
    sigma eps, D = x - sigma v; there dx/dsigma = v = (x - D) / sigma is the VE scale's ODE, so every VE-scale
    ODE step integrates the flow ODE (ComfyUI's CONST sampling)."""
    if prediction in ("eps", "flow"):
        return 1.0, -sigma
    if prediction == "x0":
        return 0.0, 1.0
    if prediction == "v":
        return 1.0 / (sigma * sigma + 1), -sigma / math.sqrt(sigma * sigma + 1)
    raise ValueError(f"the VE-scale solvers (euler, heun) take prediction 'eps', 'x0', 'v' or (on Flow) 'flow', got "
                     f"{prediction!r}")


def edm_data_coeffs(prediction: str, sigma: float, sigma_data: float) -> tuple[float, float]:
    """(p, q) of EDM's preconditioned denoiser D = c_skip x + c_out out (diffusers' EDMEulerScheduler):
    c_skip = sigma_data^2 / (sigma^2 + sigma_data^2), c_out = +- sigma sigma_data / sqrt(sigma^2 + sigma_data^2)
    (+ for "epsilon", - for "v_prediction")."""
    if prediction not in ("epsilon", "v_prediction"):
        raise ValueError(f"EDM's preconditioning takes prediction_type 'epsilon' or 'v_prediction', got {prediction!r}")
    norm = sigma * sigma + sigma_data * sigma_data
    c_out = sigma * sigma_data / math.sqrt(norm)
    return sigma_data * sigma_data / norm, c_out if prediction == "epsilon" else -c_out


def euler_coeffs(p: float, q: float, sigma: float, sigma_next: float, **extra) -> UpdateCoeffs:
    """x' = x + (sigma' - sigma) (x - D) / sigma; extra: more UpdateCoeffs fields (noise c, a state row)."""
    r = (sigma_next - sigma) / sigma
    return UpdateCoeffs(p=p, q=q, a=1.0 + r, b=(-r,), **extra)


def heun_coeffs(p: float, q: float, p2: float, q2: float, sigma: float, sigma_next: float
                ) -> tuple[UpdateCoeffs, UpdateCoeffs]:
    """The two fused calls of a Heun step (sigma_next > 0): stage 1 writes D into history slot 0 and keeps
    its start in the state; stage 2 (conversion p2, q2 at sigma_next) writes slot 1 and reads slot 0."""
    r, r2 = (sigma_next - sigma) / sigma, (sigma_next - sigma) / sigma_next
    second = UpdateCoeffs(p=p2, q=q2, a=r2 / 2, b=(-r2 / 2, -r / 2), g=1.0 + r / 2)
    return euler_coeffs(p, q, sigma, sigma_next, state=KEEP_START), second


def scaled_result(coeffs: UpdateCoeffs, k: float) -> UpdateCoeffs:
    """The step whose result is k x' (every term of x' times k; m_0 and the state row unchanged): a VE-scale
    result taken back to the VP scale (k = alpha), or ComfyUI's flow ancestral rescale."""
    if k == 1.0:
        return coeffs
    return dataclasses.replace(coeffs, a=k * coeffs.a, e=k * coeffs.e, b=tuple(k * v for v in coeffs.b),
                               c=k * coeffs.c, g=k * coeffs.g)


def churn(sigma: float, n: int, s_churn: float, s_tmin: float, s_tmax: float, s_noise: float
          ) -> tuple[float, float]:
    """(sigma_hat, the weight of the noise added to x): Karras et al.'s churn over n steps."""
    gamma = min(s_churn / n, 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
    sigma_hat = sigma * (gamma + 1)
    return sigma_hat, (s_noise * (sigma_hat**2 - sigma**2) ** 0.5 if gamma > 0 else 0.0)


def ancestral_split(sigma_from: float, sigma_to: float, eta: float) -> tuple[float, float]:
    """(sigma_down, sigma_up) of an ancestral step from sigma_from to sigma_to."""
    if not eta:
        return sigma_to, 0.0
    up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    return (sigma_to**2 - up**2) ** 0.5, up


def dpmpp_sde_midpoint(sigma: float, sigma_next: float, r: float) -> float:
    """sigma(t + r h) of a DPM-Solver++ SDE step, t = -log sigma."""
    return sigma * math.exp(-r * (math.log(sigma) - math.log(sigma_next)))


def dpmpp_sde_coeffs(sigma: float, sigma_next: float, eta: float, r: float, s_noise: float,
                     data: tuple[float, float] = (0.0, 1.0), data2: tuple[float, float] | None = None
                     ) -> tuple[float, UpdateCoeffs, UpdateCoeffs]:
    """(sigma of the intermediate call, stage 1, stage 2) of a DPM-Solver++ SDE step (sigma_next > 0); data,
    data2: the (p, q) of D at sigma and of D2 at the intermediate sigma (default: a denoiser, p = 0, q = 1).
    Stage 1 writes D into history slot 0 and keeps the start in the state; stage 2 writes slot 1 and reads
    slot 0; noise where c != 0."""
    s_mid = dpmpp_sde_midpoint(sigma, sigma_next, r)
    down, up = ancestral_split(sigma, s_mid, eta)
    first = euler_coeffs(*data, sigma, down, c=up * s_noise, state=KEEP_START)
    down, up = ancestral_split(sigma, sigma_next, eta)
    w, fac = 1.0 - down / sigma, 1 / (2 * r)
    p2, q2 = data2 or data
    second = UpdateCoeffs(p=p2, q=q2, a=0.0, b=(w * fac, w * (1 - fac)), g=down / sigma, c=up * s_noise)
    return s_mid, first, second


def lcm_coeffs(p: float, q: float, sigma_next: float, s_noise: float, flow: bool = False) -> UpdateCoeffs:
    """x' = D + s_noise sigma' z, or (flow) x' = (1 - sigma') D + s_noise sigma' z."""
    return UpdateCoeffs(p=p, q=q, a=0.0, b=(1.0 - sigma_next if flow else 1.0,), c=s_noise * sigma_next)


def heunpp2_step(convert, sigma: float, sigmas, i: int) -> tuple[list[float], list[UpdateCoeffs]]:
    """(the model sigmas, the fused calls) of Heun++ step i from sigma (sigma_i, or its churned sigma_hat) over
    the grid `sigmas`; convert(sigma) -> (p, q). Call 0 writes D into history slot 0 and keeps the start in the
    state; a call with two b entries reads slot 0; the three-call step's second call rewrites the state to the
    part of x' that the start, D and d_1 make."""
    s = [sigma, *sigmas[i + 1:i + 3]]
    end = sigmas[-1]
    if s[1] == end:
        return s[:1], [euler_coeffs(*convert(sigma), sigma, s[1])]
    m = 2 if s[2] == end else 3
    dt = s[1] - sigma
    w = [s[k] / (m * sigmas[0]) for k in range(1, m)]
    w = [1.0 - sum(w), *w]
    first = euler_coeffs(*convert(sigma), sigma, s[1], state=KEEP_START)
    r0, r1 = w[0] * dt / sigma, w[1] * dt / s[1]  # the weights of d and d_1 in x' - s
    part = dict(a=r1, b=(-r1, -r0), g=1.0 + r0)  # s + r0 (s - D) + r1 (x_1 - D_1)
    if m == 2:
        return s[:2], [first, UpdateCoeffs(*convert(s[1]), **part)]
    h1 = (s[2] - s[1]) / s[1]
    second = UpdateCoeffs(*convert(s[1]), a=1.0 + h1, b=(-h1, 0.0), state=StateRow(**part))
    r2 = w[2] * dt / s[2]
    return s, [first, second, UpdateCoeffs(*convert(s[2]), a=r2, b=(-r2,), g=1.0)]


def gradient_estimation_coeffs(p: float, q: float, sigma: float, sigma_next: float, ge_gamma: float,
                               first: bool, cfg_pp: bool = False) -> UpdateCoeffs:
    """The step with m_0 = d = (x - D) / sigma (the history keeps the derivatives); a step not `first` reads
    the previous d. cfg_pp (solvers.cfg_pp's convention: out = U, the state s = the guided D): d = (x - U) /
    sigma and x' = s + sigma' d + (gamma - 1) (sigma' - sigma) (d - d_prev) (x' = s into sigma' = 0)."""
    pd, qd = (1.0 - p) / sigma, -q / sigma
    if sigma_next == 0:
        return UpdateCoeffs(p=pd, q=qd, a=0.0, b=(0.0,), g=1.0) if cfg_pp else \
            UpdateCoeffs(p=pd, q=qd, a=1.0, b=(-sigma,))
    dt = sigma_next - sigma
    extra = 0.0 if first else (ge_gamma - 1.0) * dt  # the weight of d - d_prev
    b = (sigma_next + extra if cfg_pp else dt + extra,) + (() if first else (-extra,))
    return UpdateCoeffs(p=pd, q=qd, a=0.0 if cfg_pp else 1.0, b=b, g=1.0 if cfg_pp else 0.0)
