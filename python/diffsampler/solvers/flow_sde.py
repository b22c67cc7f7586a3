"""SDE samplers of flow / stochastic-interpolant models (Ma et al. 2024, SiT: Sampler.sample_sde), on a Flow
schedule x_t = (1 - t) x0 + t eps (t = 1 noise, t = 0 data), the model's velocity v = E[eps - x0 | x_t]:

    dx = (-v + w(t) score) d(-t) + sqrt(2 w(t)) dW,    score = (alpha' x - alpha v) / (sigma D)

(alpha = 1 - t, sigma = t, D = alpha sigma' - sigma alpha'; linear: score = -(x + (1 - t) v) / t): the flow
ODE's marginals for any w >= 0. With h = t - t' > 0 and drift K(x, t) = -v + w(t) score:

    Euler-Maruyama      x' = x + h K(x, t) + sqrt(2 w(t) h) z
    stochastic Heun     x^ = x + sqrt(2 w(t) h) z,  x_p = x^ + h K(x^, t),  x' = x^ + h/2 (K(x^, t) + K(x_p, t'))
    last step (size t_N, to t = 0; no noise)
                        mean: x + t_N K(x, t_N);  euler: x - t_N v;  tweedie: x0 = x - t_N v (= x / alpha +
                        sigma^2 / alpha score, SiT's Tweedie);  None: no last step

Each is linear in (x, v, z), so every model call is one fused update (data prediction m_0 = x - t v). Heun's
first call writes x^ + h/2 K(x^, t) into the state; its noise z is folded into the update before it (the
second call of the previous interval), and the first interval's into x_T's scale sqrt(1 + 2 w(t_0) h_0) (the
same law as x_T + sqrt(2 w h) z).

diffusion forms: SiT's values at its time tau = 1 - t (its linear path x = tau x1 + (1 - tau) x0), written in t,
n = diffusion_norm: constant n; sbdm n t / (1 - t) (SiT's n (sigma^2 alpha'/alpha - sigma sigma')); sigma n t;
linear n t; decreasing (1 - n cos(pi t))^2 / 4; increasing-decreasing n sin(pi t)^2.
The grid (SiT's check_interval for a velocity model): uniform in tau from tau_0 = sample_eps ("sbdm", infinite
at t = 1; else 0) to tau_1 = 1 - last_step_size (1 - sample_eps without a last step) over `steps` points,
i.e. t_i from 1 - tau_0 to 1 - tau_1, shifted as Flow(shift) shifts (end points kept); sigmas= a list: its
entries, the last interval (to 0) being the last step.
"""

from __future__ import annotations

import math

import numpy as np

from ..ops import StateRow, UpdateCoeffs
from ..schedules import Flow
from .plan import Plan, Step

DIFFUSIONS = ("constant", "sbdm", "sigma", "linear", "decreasing", "increasing-decreasing")
METHODS = ("euler", "heun")
LAST_STEPS = ("mean", "tweedie", "euler", None)


def diffusion_w(form: str, t: float, norm: float = 1.0) -> float:
    """w(t) of a diffusion form at flow time t (SiT's value at its time 1 - t)."""
    if form == "constant":
        return norm
    if form == "sbdm":
        return norm * t / (1 - t)
    if form in ("sigma", "linear"):
        return norm * t
    if form == "decreasing":
        return 0.25 * (1 - norm * math.cos(math.pi * t)) ** 2
    if form == "increasing-decreasing":
        return norm * math.sin(math.pi * t) ** 2
    raise ValueError(f"diffusion must be one of {DIFFUSIONS}, got {form!r}")


def drift_coeffs(alpha, sigma, d_alpha, d_sigma, w, h):
    """(a, e) of x + h (-v + w score) = a x + e v, score = (alpha' x - alpha v) / (sigma D),
    D = alpha sigma' - sigma alpha' (floats, or tensors of one coefficient per sample: flow_smc.sde_step)."""
    sd = sigma * (alpha * d_sigma - sigma * d_alpha)
    return 1 + h * w * d_alpha / sd, -h * (1 + w * alpha / sd)


def _linear_drift(t: float, w: float, h: float) -> tuple[float, float]:
    return drift_coeffs(1 - t, t, -1.0, 1.0, w, h)


def _update(t: float, a: float, e: float, **extra) -> UpdateCoeffs:
    """x' = a x + e v written on the data prediction m_0 = x - t v (v = (x - m_0) / t), so clipping and
    thresholding act on it: x' = (a + e / t) x - (e / t) m_0."""
    return UpdateCoeffs(p=1.0, q=-t, a=a + e / t, b=(-e / t,), **extra)


def _state(t: float, a: float, e: float) -> StateRow:
    return StateRow(a=a + e / t, b=(-e / t,))


def flow_sde_grid(schedule: Flow, steps: int, diffusion: str, last_step, last_step_size: float,
                  sample_eps: float) -> list[float]:
    """The flow times t_0 > ... > t_{N-1} of the SDE's model calls (the last step, if any, from t_{N-1} to 0)."""
    explicit = getattr(schedule, "explicit", None)
    if explicit is not None:
        pts = [float(v) for v in explicit]
        if last_step is not None:
            if pts[-1] != 0:
                raise ValueError(f"sigmas= a list ends at 0 with a last step (last_step={last_step!r}: its last "
                                 f"interval is the last step), got sigmas[-1] = {pts[-1]}")
            pts = pts[:-1]
    else:
        if steps < 2:
            raise ValueError(f"solver 'flow_sde' needs steps >= 2 (SiT's num_steps: grid points), got {steps}")
        tau0 = sample_eps if diffusion == "sbdm" else 0.0
        tau1 = 1 - last_step_size if last_step is not None else 1 - sample_eps
        if not tau1 > tau0:
            raise ValueError(f"the SDE's interval is empty: it runs from t = {1 - tau0} to t = {1 - tau1} "
                             f"(last_step_size={last_step_size}, sample_eps={sample_eps})")
        start, end = 1 - tau0, 1 - tau1
        if schedule.shift == 1.0:
            pts = [float(v) for v in np.linspace(start, end, steps)]
        else:
            unshift = lambda s: s / (schedule.shift - (schedule.shift - 1) * s)  # noqa: E731
            pts = [float(v) for v in schedule.shifted(np.linspace(unshift(start), unshift(end), steps))]
            pts[0], pts[-1] = start, end
    if diffusion == "sbdm" and pts[0] >= 1:
        raise ValueError("diffusion 'sbdm' (w = t / (1 - t)) is infinite at t = 1: pass sample_eps > 0 (SiT's "
                         "t0 = sample_eps), or sigmas= a list below 1")
    return pts


def flow_sde_plan(schedule: Flow, steps: int, prediction: str, *, diffusion: str = "sigma",
                  diffusion_norm: float = 1.0, method: str = "euler", last_step: str | None = "mean",
                  last_step_size: float = 0.04, sample_eps: float = 0.0) -> Plan:
    """SiT's SDE sampler on `steps` grid points: Euler-Maruyama (steps - 1 calls) or the stochastic Heun
    (2 (steps - 1) calls), then the last step (one call; none for last_step=None)."""
    if prediction != "flow":
        raise ValueError(f"solver 'flow_sde' takes prediction 'flow' (the velocity eps - x0), got {prediction!r}")
    if diffusion not in DIFFUSIONS:
        raise ValueError(f"diffusion must be one of {DIFFUSIONS}, got {diffusion!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if last_step not in LAST_STEPS:
        raise ValueError(f"last_step must be one of {LAST_STEPS}, got {last_step!r}")
    pts = flow_sde_grid(schedule, steps, diffusion, last_step, last_step_size, sample_eps)
    if method == "heun" and pts[-1] == 0:
        raise ValueError("method 'heun' evaluates the drift at each interval's end, which needs t > 0: the grid "
                         "must end above 0 (a last_step, or sample_eps > 0)")
    w = [diffusion_w(diffusion, t, diffusion_norm) for t in pts]
    noise = [math.sqrt(2 * w[i] * (pts[i] - pts[i + 1])) for i in range(len(pts) - 1)] + [0.0]
    plan = []
    for i in range(len(pts) - 1):
        t, nxt, h = pts[i], pts[i + 1], pts[i] - pts[i + 1]
        if method == "euler":
            plan.append(Step(t=schedule.model_time(t), coeffs=_update(t, *_linear_drift(t, w[i], h), c=noise[i])))
            continue
        a, e = _linear_drift(t, w[i], h)  # x_p = x^ + h K(x^, t); the state x^ + h/2 K(x^, t)
        plan.append(Step(t=schedule.model_time(t), coeffs=_update(t, a, e, state=_state(t, *_linear_drift(t, w[i], h / 2)))))
        a2, e2 = _linear_drift(nxt, w[i + 1], h / 2)  # x' = s + h/2 K(x_p, t') (+ the next interval's noise)
        plan.append(Step(t=schedule.model_time(nxt), coeffs=_update(nxt, a2 - 1, e2, g=1.0, c=noise[i + 1])))
    t = pts[-1]
    if last_step == "tweedie":
        plan.append(Step(t=schedule.model_time(t), coeffs=UpdateCoeffs(p=1.0, q=-t, a=0.0, b=(1.0,))))
    elif last_step is not None:
        plan.append(Step(t=schedule.model_time(t), coeffs=_update(t, *_linear_drift(t, w[-1] if last_step == "mean" else 0.0, t))))
    heun = method == "heun"
    init = math.sqrt(1 + noise[0] ** 2) if heun and len(pts) > 1 else 1.0
    return Plan(steps=tuple(plan), history_slots=0, discrete_time=False, init_scale=init, uses_state=heun)
