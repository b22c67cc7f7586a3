"""Restart sampling (Xu et al. 2023), as its authors' sampler (restart_sampler in stable-diffusion-webui) runs it:
Heun steps down a Karras grid; on reaching a restart point t_min, jump back up to t_max with fresh noise,
x = x + s_noise sqrt(t_max^2 - t_min^2) z, and integrate down to t_min again over n - 1 Karras steps, K times.

    restart: {t_min: (n, K, t_max)} (each sigma snapped to the nearest grid sigma); None: the authors' default,
    for >= 20 steps {0.1: (10, 1, 2.0)} (>= 36 steps: {0.1: (steps // 4 + 1, 2, 2.0)}) on a main grid of
    steps - (n - 1) K Karras steps between the grid's first and last positive sigma, so that the number of
    intervals stays `steps`; fewer than 20 steps: no restart.
Each jump is folded into the fused call that ends the interval before it (its noise term), so every model call
is one fused update, as Heun's (solvers.ve.heun_coeffs).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .. import checks
from ..ops import UpdateCoeffs
from ..schedules import karras_sigmas
from .plan import Plan
from .ve import euler_coeffs, heun_coeffs
from .ve_grid import VEPoints


def _karras(n: int, lo: float, hi: float) -> list[float]:
    return [float(v) for v in karras_sigmas(lo, hi, n)]


def default_restart(sigmas: list[float]) -> tuple[list[float], dict]:
    """The authors' default: (the main grid, the restart list) for a grid of len(sigmas) - 1 intervals."""
    steps = len(sigmas) - 1
    if steps < 20:
        return sigmas, {}
    n, k = (steps // 4, 2) if steps >= 36 else (9, 1)
    main = _karras(steps - n * k, sigmas[-2], sigmas[0]) + [0.0]
    return main, {0.1: (n + 1, k, 2.0)}


def check_restart(restart) -> dict:
    if not isinstance(restart, dict):
        raise ValueError(f"restart must be a dict {{t_min: (n, K, t_max)}} or None, got {type(restart).__name__}")
    out = {}
    for t_min, spec in restart.items():
        checks.real("restart t_min", t_min, "(0, inf)")
        if not isinstance(spec, (tuple, list)) or len(spec) != 3:
            raise ValueError(f"restart[{t_min}] must be (n, K, t_max), got {spec!r}")
        n, k, t_max = spec
        out[float(t_min)] = (checks.integer("restart n", n, 2), checks.integer("restart K", k, 0),
                             checks.real("restart t_max", t_max, "(0, inf)"))
    return out


def intervals(sigmas: list[float], restart) -> list[tuple[float, float]]:
    """The (sigma, sigma') pairs the sampler integrates, restart segments inserted after their t_min."""
    if restart is None:
        sigmas, restart = default_restart(sigmas)
    restart = check_restart(restart)
    arr = np.asarray(sigmas)
    at = {int(np.argmin(np.abs(arr - t_min))): spec for t_min, spec in restart.items()}
    out = []
    for i in range(len(sigmas) - 1):
        out.append((sigmas[i], sigmas[i + 1]))
        if i + 1 in at:
            n, k, t_max = at[i + 1]
            top = int(np.argmin(np.abs(arr - t_max)))
            if top < i + 1:
                seg = _karras(n, sigmas[i + 1], sigmas[top])
                out += [pair for _ in range(k) for pair in zip(seg[:-1], seg[1:])]
    return out


def restart_calls(pairs, prediction_of, s_noise: float) -> list[tuple[float, UpdateCoeffs, int, tuple]]:
    """(sigma the model is called at, the fused update, write slot, read slots) per model call: Heun on each
    interval (Euler into 0), the restart jump before an interval that starts above the previous one's end in the
    noise term of that previous interval's last call."""
    calls = []
    for j, (s, nxt) in enumerate(pairs):
        p, q = prediction_of(s)
        if nxt == 0:
            interval = [(s, euler_coeffs(p, q, s, nxt), 0, ())]
        else:
            first, second = heun_coeffs(p, q, *prediction_of(nxt), s, nxt)
            interval = [(s, first, 0, ()), (nxt, second, 1, (0,))]
        if j + 1 < len(pairs) and pairs[j + 1][0] > nxt:
            jump = s_noise * (pairs[j + 1][0] ** 2 - nxt**2) ** 0.5
            sigma, coeffs, write, reads = interval[-1]
            interval[-1] = (sigma, dataclasses.replace(coeffs, c=jump), write, reads)
        calls += interval
    return calls


def restart_plan(schedule, steps: int, prediction: str, *, restart=None, s_noise: float = 1.0,
                 timestep_spacing: str = "linspace", steps_offset: int = 0) -> Plan:
    """On an EDM schedule (Karras' sigmas, the model gets sigma) or a VP one (EulerDiscreteScheduler's grid in
    the VE scale, the model at each sigma's fractional timestep): `steps` intervals with the default restart."""
    points = VEPoints(schedule, steps, prediction, timestep_spacing, steps_offset)
    on_grid = {sigma: i for i, sigma in enumerate(points.sigmas[:-1])}
    calls = restart_calls(intervals(points.sigmas, restart), points.coeffs, s_noise)
    plan = [points.step(sigma, coeffs, on_grid.get(sigma), write_slot=w, read_slots=r)
            for sigma, coeffs, w, r in calls]
    return Plan(steps=tuple(plan), history_slots=2, discrete_time=False, init_scale=points.init_scale,
                uses_state=True)
