"""PNDM (Liu et al. 2022, diffusers' PNDMScheduler): pseudo linear multistep (PLMS) on the noise prediction,
with a pseudo Runge-Kutta (PRK) warm-up unless skip_prk_steps.

Each model call is one transfer from timestep t to t' of a base sample s with an eps combination E:

    x' = A s + B E,   A = sqrt(ab' / ab),   B = -(ab' - ab) / (ab sqrt(1 - ab') + sqrt(ab (1 - ab) ab'))
    (v prediction: E = sqrt(ab) V + sqrt(1 - ab) s, V the same combination of the raw outputs)

    PLMS   E = e_0 (the first call, whose start s is kept), then (e_1 + e_0) / 2 from the kept start at the same
           timestep again; then Adams-Bashforth on the stored outputs: (3 e_n - e_{n-1}) / 2,
           (23 e_n - 16 e_{n-1} + 5 e_{n-2}) / 12, (55 e_n - 59 e_{n-1} + 37 e_{n-2} - 9 e_{n-3}) / 24
    PRK    four calls per step (t, t - r/2, t - r/2, t - r, r = n_train // steps) from the kept start s:
           E = e_a, e_b, e_c, then (e_a + 2 e_b + 2 e_c + e_d) / 6; e_a is stored for the PLMS steps after

A sigmas= list (sigma ratios sigma_0 > ... > sigma_N on a VP schedule, ab_i = 1 / (1 + sigma_i^2); a final 0:
ab = 1): the transfer is DDIM's between any two noise levels, so it holds on any grid; only E assumes equal
steps. The calls are the own grid's at the list's points, their model timesteps t_i = sigma_to_t(sigma_i) (a
final 0 has none: the step into it is as long in t as the step before, as the own grid's final step into the
final alpha). PLMS's Adams-Bashforth weights are the variable-step ones in t (on equal steps the table above):

    E = sum_j w_j e_{n-j},   w_j = int_{t_n}^{t_{n+1}} L_j(tau) dtau / (t_{n+1} - t_n),
    L_j the Lagrange basis polynomial through the stored outputs' timesteps t_n, t_{n-1}, ...

and PRK's half steps go to the midpoint model time (t_n + t_{n+1}) / 2, whose alpha_bar is the schedule's
(log-sigma interpolation, schedules.t_to_sigma). E averages eps over t where the exact step averages it over
r = sigma / alpha (x' / alpha' = x / alpha + int eps dr): a local error r''(t) eps'(t) h^3 / 12 in the step h
in t, second order wherever r is not linear in t (on the own grid too).

The raw outputs are the fused op's m_0 (p = 0, q = 1), the stored ones a ring of 4 history slots (PRK's two
mid-step outputs two more); the kept start is the fused state.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import numpy as np

from ..ops import UpdateCoeffs
from ..schedules import VP, sigma_to_t, t_to_sigma
from .explicit import log_train_sigmas
from .lms import lms_weights
from .plan import Plan, Step
from .ve import KEEP_START

RING = 4  # the stored outputs PLMS reads: the current one and 3 history reads
PRK_SLOTS = (RING, RING + 1)  # PRK's mid-step outputs e_b, e_c
ADAMS_BASHFORTH = ((1.0,), (3 / 2, -1 / 2), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))
PRK_CALLS = 12  # the PRK warm-up: three steps of four calls


class Call(NamedTuple):
    """One PNDM model call: its transfer's ends, the eps combination over m_0 and the read slots."""

    t: float  # the transfer's base (own grid: diffusers' `timestep` inside _get_prev_sample; a list: a position)
    t_prev: float  # its target (own grid: < 0 the final alpha)
    weights: tuple[float, ...]  # on m_0, then on read_slots
    write_slot: int
    read_slots: tuple[int, ...]
    from_state: bool  # the base sample is the kept start (the state), not x
    keep_start: bool  # the state becomes this call's x
    stored: int  # the stored outputs after this call


def pndm_slots(counter: int, t: float, t_prev: float, stored: int, skip_prk: bool,
               weights_of: Callable[[int], tuple[float, ...]]) -> Call:
    """Call `counter` from t to t_prev, `stored` outputs kept so far, as PNDMScheduler.step dispatches it;
    weights_of(n): PLMS's weights on the current and the n - 1 last stored outputs."""
    if not skip_prk and counter < PRK_CALLS:
        stage, block = counter % 4, counter // 4
        if stage == 0:
            return Call(t, t_prev, (1.0,), block % RING, (), False, True, stored + 1)
        if stage < 3:
            return Call(t, t_prev, (1.0,), PRK_SLOTS[stage - 1], (), True, False, stored)
        return Call(t, t_prev, (1 / 6, 1 / 6, 1 / 3, 1 / 3), stored % RING, ((stored - 1) % RING, *PRK_SLOTS), True,
                    False, stored)
    if counter == 1:  # the same timestep again: the mean of both outputs, from the first call's start
        return Call(t, t_prev, (1 / 2, 1 / 2), 1, (0,), True, False, stored)
    n = min(stored + 1, RING)
    return Call(t, t_prev, weights_of(n), stored % RING, tuple((stored - j) % RING for j in range(1, n)), False,
                counter == 0, stored + 1)


def pndm_call(counter: int, timestep: int, ratio: int, stored: int, skip_prk: bool, prk_timesteps) -> Call:
    """Call `counter` of a run on the own grid at model timestep `timestep` (ratio = n_train // steps): its
    transfer's training timesteps as PNDMScheduler.step takes them, PLMS's weights Adams-Bashforth's table."""
    if not skip_prk and counter < PRK_CALLS:
        t, t_prev = int(prk_timesteps[counter // 4 * 4]), timestep - (0 if counter % 2 else ratio // 2)
    elif counter == 1:
        t, t_prev = timestep + ratio, timestep
    else:
        t, t_prev = timestep, timestep - ratio
    return pndm_slots(counter, t, t_prev, stored, skip_prk, lambda n: ADAMS_BASHFORTH[n - 1])


def transfer(ab: float, ab_prev: float) -> tuple[float, float]:
    """(A, B) of x' = A x + B eps from alpha_bar ab to ab_prev (PNDM's F-PNDM transfer)."""
    denom = ab * math.sqrt(1 - ab_prev) + math.sqrt(ab * (1 - ab) * ab_prev)
    return math.sqrt(ab_prev / ab), -(ab_prev - ab) / denom


def pndm_coeffs(prediction: str, ab: float, ab_prev: float, call: Call) -> UpdateCoeffs:
    """The fused update of `call`: m_0 = out, x' = A s + B E (s = x, or the state with from_state)."""
    if prediction not in ("eps", "v"):
        raise ValueError(f"PNDM takes prediction 'eps' or 'v', got {prediction!r}")
    a, b = transfer(ab, ab_prev)
    if prediction == "v":  # E = sqrt(ab) V + sqrt(1 - ab) s
        a, b = a + b * math.sqrt(1 - ab), b * math.sqrt(ab)
    return UpdateCoeffs(p=0.0, q=1.0, a=0.0 if call.from_state else a, b=tuple(b * w for w in call.weights),
                        g=a if call.from_state else 0.0, state=KEEP_START if call.keep_start else None,
                        eps_of=(math.sqrt(ab), math.sqrt(1 - ab)) if prediction == "eps" else None)


def pndm_timesteps(n_train: int, steps: int, spacing: str = "leading", steps_offset: int = 0,
                   skip_prk: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(the model timesteps of every call, the PRK timesteps) as PNDMScheduler.set_timesteps places them."""
    if spacing == "linspace":
        base = np.linspace(0, n_train - 1, steps).round().astype(np.int64)
    elif spacing == "leading":
        base = (np.arange(0, steps) * (n_train // steps)).round().astype(np.int64) + steps_offset
    elif spacing == "trailing":
        base = np.round(np.arange(n_train, 0, -n_train / steps))[::-1].astype(np.int64) - 1
    else:
        raise ValueError(f"timestep_spacing must be one of ('linspace', 'leading', 'trailing'), got {spacing!r}")
    if skip_prk:
        prk = np.array([], dtype=np.int64)
        plms = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1]
    else:
        prk = np.array(base[-4:]).repeat(2) + np.tile(np.array([0, n_train // steps // 2]), 4)
        prk = prk[:-1].repeat(2)[1:-1][::-1]
        plms = base[:-3][::-1]
    return np.concatenate([prk, plms]).astype(np.int64), prk.astype(np.int64)


def pndm_plan(schedule: VP, steps: int, prediction: str, *, skip_prk_steps: bool = False,
              timestep_spacing: str = "leading", steps_offset: int = 0, set_alpha_to_one: bool = False) -> Plan:
    """PNDMScheduler's loop (model calls: steps + 1 with skip_prk_steps, else steps + 9); on a sigmas= list
    (an ExplicitVP schedule) the list's grid (pndm_list_plan; the own grid's options are not used)."""
    if not skip_prk_steps and steps < 4:
        raise ValueError(f"PNDM's PRK warm-up needs steps >= 4, got steps={steps} (or pass skip_prk_steps=True)")
    if skip_prk_steps and steps < 2:
        raise ValueError(f"PLMS needs steps >= 2, got steps={steps}")
    if getattr(schedule, "explicit", None) is not None:
        return pndm_list_plan(schedule, prediction, skip_prk_steps)
    n = schedule.num_train_timesteps
    timesteps, prk = pndm_timesteps(n, steps, timestep_spacing, steps_offset, skip_prk_steps)
    ab = schedule.alphas_cumprod.double().tolist()
    final = 1.0 if set_alpha_to_one else ab[0]
    plan, stored = [], 0
    for c, t in enumerate(timesteps.tolist()):
        call = pndm_call(c, t, n // steps, stored, skip_prk_steps, prk)
        coeffs = pndm_coeffs(prediction, ab[call.t], ab[call.t_prev] if call.t_prev >= 0 else final, call)
        plan.append(Step(t=float(t), coeffs=coeffs, write_slot=call.write_slot, read_slots=call.read_slots))
        stored = call.stored
    return Plan(steps=tuple(plan), history_slots=RING if skip_prk_steps else RING + 2, discrete_time=True,
                data_prediction=False, uses_state=True)


# ---- a sigmas= list: positions i (the list's point i) and i + 1/2 (PRK's midpoints) ----


def list_times(schedule: VP, sigmas) -> np.ndarray:
    """The model timestep t_i of each point of the list (sigma_to_t; a final 0: t_{N-1} - (t_{N-2} - t_{N-1}))."""
    t = sigma_to_t(np.asarray(sigmas, dtype=np.float64), log_train_sigmas(schedule))
    if sigmas[-1] == 0:
        t[-1] = 2 * t[-2] - t[-3]
    same = np.flatnonzero(np.diff(t) >= 0)
    if same.size:
        i, low, high = same[0], schedule.sigma_ratio(0), schedule.sigma_ratio(schedule.num_train_timesteps - 1)
        raise ValueError(f"pndm: sigmas[{i}] = {sigmas[i]} and sigmas[{i + 1}] = {sigmas[i + 1]} give the same "
                         f"training timestep {t[i]:g} (sigmas outside the training range [{low:.4g}, {high:.4g}] "
                         "clamp to its ends); PLMS's weights need decreasing timesteps")
    return t


def list_positions(steps: int, skip_prk: bool) -> list[float]:
    """The position of each call's model timestep, in PNDMScheduler's order of its timesteps."""
    if skip_prk:
        return [0, 1, *range(1, steps)]
    return [b + h for b in range(3) for h in (0, 0.5, 0.5, 1)] + list(range(3, steps))


def list_transfer(counter: int, skip_prk: bool) -> tuple[float, float]:
    """The positions (t, t_prev) of call `counter`'s transfer."""
    if not skip_prk and counter < PRK_CALLS:
        block, stage = divmod(counter, 4)
        return block, block + (0.5 if stage < 2 else 1)
    i = max(counter - 1, 0) if skip_prk else counter - PRK_CALLS + 3
    return i, i + 1


def plms_weights(times, i: int, n: int) -> tuple[float, ...]:
    """The variable-step Adams-Bashforth weights w_j (j < n) of the step from times[i] to times[i + 1]: the
    Lagrange basis polynomials through times[i - j] averaged over the step (lms_weights in
    u = (tau - times[i]) / (times[i + 1] - times[i]), over [0, 1])."""
    h = float(times[i + 1] - times[i])
    return lms_weights([(float(times[k]) - float(times[i])) / h for k in range(i - n + 1, i + 2)], n - 1, n)


def pndm_list_plan(schedule: VP, prediction: str, skip_prk: bool) -> Plan:
    """PNDMScheduler's loop on the sigmas= list schedule.explicit (the module docstring): fractional model
    timesteps, the transfers between the list's alpha_bar (and PRK's midpoints'), PLMS's variable-step weights."""
    sigmas = [float(v) for v in schedule.explicit]
    times = list_times(schedule, sigmas)
    log_train = log_train_sigmas(schedule)

    def time_at(p: float) -> float:
        return float(times[math.floor(p)] + times[math.ceil(p)]) / 2

    def alpha_bar(p: float) -> float:
        s = sigmas[int(p)] if p == int(p) else float(t_to_sigma(time_at(p), log_train))
        return 1 / (1 + s * s)

    plan, stored = [], 0
    for c, p in enumerate(list_positions(len(sigmas) - 1, skip_prk)):
        t, t_prev = list_transfer(c, skip_prk)
        call = pndm_slots(c, t, t_prev, stored, skip_prk, lambda n: plms_weights(times, int(t), n))
        coeffs = pndm_coeffs(prediction, alpha_bar(t), alpha_bar(t_prev), call)
        plan.append(Step(t=time_at(p), coeffs=coeffs, write_slot=call.write_slot, read_slots=call.read_slots))
        stored = call.stored
    return Plan(steps=tuple(plan), history_slots=RING if skip_prk else RING + 2, discrete_time=False,
                data_prediction=False, uses_state=True)


# ---- iPNDM (Zhang & Chen 2023): Adams-Bashforth on the stored outputs, without the pseudo warm-up ----


def ipndm_coeffs(alpha: float, sigma: float, alpha_next: float, sigma_next: float, weights) -> UpdateCoeffs:
    """diffusers' IPNDMScheduler step: m_0 = sigma x + alpha out (its `ets`), E = sum_j w_j m_j,
    x' = alpha' (x - sigma E) / max(alpha, 1e-8) + sigma' E. At alpha = 0 (t = 1, sigma = 1) the first step's
    E = m_0 = x makes the data term exactly 0, as diffusers' fp32 x - sigma E is: it is dropped there."""
    w = tuple(float(v) for v in weights)
    if alpha == 0 and len(w) == 1:
        return UpdateCoeffs(p=sigma, q=alpha, a=0.0, b=(sigma_next * w[0],))
    scale = alpha_next / max(alpha, 1e-8)
    return UpdateCoeffs(p=sigma, q=alpha, a=scale, b=tuple((sigma_next - scale * sigma) * v for v in w))


def ipndm_weights(sigmas, i: int, order: int, variable: bool = False) -> tuple[float, ...]:
    """(h c_0, ..., h c_{k-1}), h = sigma' - sigma, k = min(i + 1, order), of the iPNDM step
    x' = x + h sum_j c_j d_{i-j} in sigma (ComfyUI's sample_ipndm): Adams-Bashforth's fixed weights, or with
    `variable` the step-size-dependent weights of ComfyUI's sample_ipndm_v (ipndm_v_weights). Into sigma' = 0
    the first-order step (x' = D)."""
    if isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= RING:
        raise ValueError(f"max_order must be an integer in [1, {RING}], got {order!r}")
    k = 1 if sigmas[i + 1] == 0 else min(i + 1, order)
    h = float(sigmas[i + 1]) - float(sigmas[i])
    steps = [h] + [float(sigmas[i - j]) - float(sigmas[i - j - 1]) for j in range(k - 1)]
    c = ipndm_v_weights(*steps) if variable and k > 1 else ADAMS_BASHFORTH[k - 1]
    return tuple(h * v for v in c)


def ipndm_v_weights(h0: float, *past: float) -> tuple[float, ...]:
    """ComfyUI's (after zju-pi/diff-sampler) variable-step iPNDM weights from the step h0 = sigma' - sigma and
    the past steps h1 = sigma - sigma_{-1}, h2, h3; r = h0 / h1, u = h0 + h1, q = h1 (h1 + h2) / (h2 (h2 + h3)):

        order 2  (1 + r/2, -r/2)
        T1 = (1 - h0^2 / (3 h1 (h1 + h2))) / 2
        order 3  (1 + r/2 + T1, -r/2 - (1 + h1/h2) T1, T1 h1/h2)
        T2 = ((1 - h0 / (3u)) / 2 + (1 - h0 / (2u)) h0 / (6 (u + h2))) h0 u (u + h2) / (h1 (h1 + h2) (h1 + h2 + h3))
        order 4  (1 + r/2 + T1 + T2, -r/2 - (1 + h1/h2) T1 - (1 + h1/h2 + q) T2,
                  T1 h1/h2 + (h1/h2 + q (1 + h2/h3)) T2, -T2 q h1/h2)

    On equal steps orders 2 and 3 are Adams-Bashforth's; order 4 is (57, -65, 43, -11) / 24 there, a
    third-order method (not AB4's (55, -59, 37, -9) / 24), as ComfyUI has it."""
    r = h0 / past[0]
    if len(past) == 1:
        return (1 + r / 2, -r / 2)
    h1, h2 = past[0], past[1]
    u = h0 + h1
    t1 = (1 - h0 / (3 * u) * (h0 * u) / (h1 * (h1 + h2))) / 2
    if len(past) == 2:
        return (1 + r / 2 + t1, -r / 2 - (1 + h1 / h2) * t1, t1 * h1 / h2)
    h3 = past[2]
    q = h1 * (h1 + h2) / (h2 * (h2 + h3))
    t2 = ((1 - h0 / (3 * u)) / 2 + (1 - h0 / (2 * u)) * h0 / (6 * (u + h2))) \
        * (h0 * u * (u + h2)) / (h1 * (h1 + h2) * (h1 + h2 + h3))
    return (1 + r / 2 + t1 + t2, -r / 2 - (1 + h1 / h2) * t1 - (1 + h1 / h2 + q) * t2,
            t1 * h1 / h2 + (h1 / h2 + q * (1 + h2 / h3)) * t2, -t2 * q * h1 / h2)
