"""Generalized heavy-ball momentum (GHVB; Wizadwongsa et al. 2023, "Diffusion Sampling with Momentum for
Mitigating Divergence Artifacts").

In the DDIM coordinates xbar = x / alpha, sbar = sigma / alpha the probability-flow ODE is d xbar / d sbar = eps.
GHVB keeps a velocity v, an exponential average of eps, and takes an Adams-Bashforth-like step on the last
k velocities with weights that depend on beta:

    v_n   = (1 - beta) v_{n-1} + beta eps_n            (v_0 = eps_0)
    xbar' = xbar + (sbar' - sbar) sum_j w_j(beta) v_{n-j}  (k = min(order, n + 1) terms)

beta = 1 is PLMS (Adams-Bashforth of order k); order 1 with beta = 1 is DDIM. The fused update stores v_n as
its "m0" (m0 = beta eps + (1 - beta) m_1: the op's r weights), so the velocity history is the ordinary history ring.
"""

from __future__ import annotations

from ..models import noise_coeffs
from ..ops import UpdateCoeffs
from ..schedules import VP
from .grid import Grid, multistep_grid
from .plan import Plan, Step

# Adams-Bashforth weights generalised by beta, newest first, before the division by beta
# (the reference code's mixer): order k -> (denominator, [(constant, beta coefficient) per term]).
_MIXER = {
    1: (1, [(0, 1)]),
    2: (2, [(2, 1), (-2, 1)]),
    3: (12, [(18, 5), (-24, 8), (6, -1)]),
    4: (24, [(46, 9), (-78, 19), (42, -5), (-10, 1)]),
}


def mixer_weights(order: int, beta: float) -> list[float]:
    """w_j of v_{n-j}, j = 0 .. order - 1."""
    den, terms = _MIXER[order]
    return [(c0 + cb * beta) / den / beta for c0, cb in terms]


def ghvb_plan(schedule: VP, steps: int, prediction: str, *, order: int = 2, beta: float = 0.5,
              timestep_spacing: str = "linspace", steps_offset: int = 0, sigmas: str = "default") -> Plan:
    """GHVB (paper order order - 1 + beta) on the multistep grid; like the reference wrapper of diffusers'
    DPMSolverMultistepScheduler, the last step lands on training timestep 0."""
    grid = multistep_grid(schedule, steps, timestep_spacing=timestep_spacing, steps_offset=steps_offset,
                          sigmas=sigmas, final_sigmas_type="sigma_min")
    return ghvb_steps(grid, prediction, order=order, beta=beta)


def ghvb_steps(grid: Grid, prediction: str, *, order: int = 2, beta: float = 0.5) -> Plan:
    if order not in _MIXER:
        raise ValueError(f"order must be one of {sorted(_MIXER)} for ghvb, got {order}")
    if not 0 < beta <= 1:
        raise ValueError(f"beta must be in (0, 1], got {beta}")
    slots = max(order, 2)  # the velocity of the previous step is read even at order 1 (the momentum term)
    plan = []
    for i, t in enumerate(grid.timesteps):
        (alpha_s, sigma_s), (alpha_t, sigma_t) = grid.alpha_sigma(i), grid.alpha_sigma(i + 1)
        k = min(order, i + 1)
        n_reads = min(max(k - 1, 1 if i > 0 else 0), i)
        w = mixer_weights(k, beta) + [0.0] * (n_reads + 1 - k)
        dg = sigma_t / alpha_t - sigma_s / alpha_s
        p, q = noise_coeffs(prediction, alpha_s, sigma_s)
        momentum = beta if i > 0 else 1.0  # v_0 = eps_0
        coeffs = UpdateCoeffs(p=momentum * p, q=momentum * q, r=(1.0 - momentum,) if i > 0 else (),
                              a=alpha_t / alpha_s, b=tuple(alpha_t * dg * wj for wj in w))
        plan.append(Step(t=t, coeffs=coeffs, write_slot=i % slots,
                         read_slots=tuple((i - j) % slots for j in range(1, n_reads + 1))))
    return Plan(steps=tuple(plan), history_slots=slots, discrete_time=grid.discrete, data_prediction=False)
