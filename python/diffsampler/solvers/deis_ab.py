"""DEIS's Adams-Bashforth forms (Zhang & Chen 2023) on the VE-scale derivative d = (x - D) / sigma, as ComfyUI's
sample_deis (after zju-pi/diff-sampler) takes them: x' = x + sum_j C_j d_{i-j} over the last k = min(i + 1,
max_order) derivatives (k = 1, Euler, into sigma' = 0), with

    tab     C_j = int_{tau_i}^{tau_{i+1}} sigma'(tau) L_j(tau) d tau,  L_j the Lagrange basis through tau_{i-l}, in
            the time tau of the linear-beta VP schedule sigma(tau) = sqrt(e^{beta_d tau^2 / 2 + beta_min tau} - 1)
            fitted to sigma(eps_s = 1e-3) = 0.002, sigma(1) = 80 (the integral by 64-point Gauss-Legendre;
            ComfyUI sums 10000 points, to about 1e-5 of the weights)
    rhoab   C_j = int_{sigma_i}^{sigma_{i+1}} L_j(sigma) d sigma, the Lagrange basis in sigma itself (the LMS weights)
"""

from __future__ import annotations

import math

import numpy as np

from .lms import lms_weights

DEIS_MODES = ("tab", "rhoab")
_EPS_S, _SIGMA_MIN, _SIGMA_MAX = 1e-3, 0.002, 80.0
_BETA_D = 2 * (math.log(_SIGMA_MIN**2 + 1) / _EPS_S - math.log(_SIGMA_MAX**2 + 1)) / (_EPS_S - 1)
_BETA_MIN = math.log(_SIGMA_MAX**2 + 1) - 0.5 * _BETA_D
_NODES, _WEIGHTS = np.polynomial.legendre.leggauss(64)


def vp_time(sigma: float) -> float:
    """tau(sigma) of the fitted VP schedule: (sqrt(beta_min^2 + 2 beta_d log(sigma^2 + 1)) - beta_min) / beta_d."""
    return (math.sqrt(_BETA_MIN**2 + 2 * _BETA_D * math.log1p(sigma * sigma)) - _BETA_MIN) / _BETA_D


def _dsigma_dtau(tau: np.ndarray) -> np.ndarray:
    e = np.exp(0.5 * _BETA_D * tau**2 + _BETA_MIN * tau)
    return (_BETA_D * tau + _BETA_MIN) * e / (2 * np.sqrt(e - 1))


def _lagrange(tau: np.ndarray, nodes: list[float], j: int) -> np.ndarray:
    out = np.ones_like(tau)
    for l, node in enumerate(nodes):
        if l != j:
            out = out * (tau - node) / (nodes[j] - node)
    return out


def tab_weights(sigmas, i: int, order: int) -> tuple[float, ...]:
    """(C_0, ..., C_{order-1}) of the tAB step from sigmas[i] to sigmas[i + 1] > 0."""
    nodes = [vp_time(float(sigmas[i - j])) for j in range(order)]
    lo, hi = nodes[0], vp_time(float(sigmas[i + 1]))
    tau = lo + (hi - lo) * (_NODES + 1) / 2
    scale = (hi - lo) / 2 * _WEIGHTS * _dsigma_dtau(tau)
    return tuple(float(np.sum(scale * _lagrange(tau, nodes, j))) for j in range(order))


def deis_ab_weights(sigmas, i: int, max_order: int, mode: str) -> tuple[float, ...]:
    """The weights C_j of step i (k = min(i + 1, max_order) of them, one into sigma' = 0)."""
    k = 1 if sigmas[i + 1] == 0 else min(i + 1, max_order)
    if k == 1:
        return (float(sigmas[i + 1]) - float(sigmas[i]),)
    return tab_weights(sigmas, i, k) if mode == "tab" else lms_weights(sigmas, i, k)
