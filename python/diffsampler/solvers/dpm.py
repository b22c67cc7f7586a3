"""DPM-Solver / DPM-Solver++ multistep (Lu et al. 2022), ODE and SDE variants, as diffusers'
DPMSolverMultistepScheduler computes them.

With sigma the ratio sigma_t / alpha_t, lambda = log(alpha_t / sigma_t), h = lambda_t - lambda_s and the
divided differences of the history (r_i = h_i / h):
    D0 = m0,  D1 = (m0 - m1) / r0                      (2nd order)
    D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1),  D2 = (D1_0 - D1_1) / (r0 + r1)   (3rd order)
each variant is x_t = a x_s + c0 D0 + c1 D1 + c2 D2 + c z (see update_terms); expanding the D's gives the
fused update's b_i on m0, m1, m2. dpmsolver++ keeps data predictions in the history, dpmsolver noise
predictions.
"""

from __future__ import annotations

import math

from ..models import data_coeffs, noise_coeffs
from ..ops import StateRow, UpdateCoeffs
from ..schedules import VP
from .grid import Grid, multistep_grid
from .plan import Plan, Step, ring_slots

ALGORITHMS = ("dpmsolver++", "dpmsolver", "sde-dpmsolver++", "sde-dpmsolver")
SOLVER_TYPES = ("midpoint", "heun")


PHI3 = ("k-diffusion", "diffusers", "taylor")


def update_terms(algorithm: str, solver_type: str, order: int, alpha_s, sigma_s, alpha_t, sigma_t, h,
                 phi3: str = "k-diffusion", eta: float = 1.0):
    """(a, c0, c1, c2, c): x_t = a x_s + c0 D0 + c1 D1 + c2 D2 + c z for one step of the given order.

    phi terms per variant (em = e^{-h} - 1, e2 = 1 - e^{-h_eta}, ep = e^{h} - 1); "heun" and order 3 use the
    exact first-order phi for D1, "midpoint" half of the D0 weight. sde-dpmsolver++ takes the noise scale
    eta (k-diffusion's; 1: the SDE, 0: the ODE): h_eta = (1 + eta) h, a = (sigma_t / sigma_s) e^{-eta h},
    c = sigma_t sqrt(1 - e^{-2 eta h}) (0 for h < 0: EDM's float32 grid ends a rounding below its final
    sigma_min, a step diffusers' float32 lambdas make of length 0).

    The D2 weight of the third-order steps (`phi3`). D2 = (D1_0 - D1_1) / (r0 + r1) estimates h^2 x0''/2, so
    the Taylor expansion of the exponential integrator asks for 2 alpha_t int_0^h w(u) u^2/2 du / h^2, with
    w(u) = e^{-(h-u)} (ODE) or 2 e^{-2(h-u)} (SDE). "k-diffusion": half of that, as DPM-Solver's reference
    code, k-diffusion and diffusers write it (the ODE 3M is then second order: bench/quality measures it);
    "diffusers": the same but for the SDE's 1/2, whose sign diffusers 0.42 flips; "taylor": the full weight
    (third order)."""
    c1 = c2 = c = 0.0
    if algorithm == "dpmsolver++":
        em = math.expm1(-h)
        a, c0 = sigma_t / sigma_s, -alpha_t * em
        if order > 1:
            c1 = 0.5 * c0 if order == 2 and solver_type == "midpoint" else alpha_t * (em / h + 1.0)
        if order > 2:
            c2 = -alpha_t * ((em + h) / h**2 - 0.5) * (2.0 if phi3 == "taylor" else 1.0)
    elif algorithm == "sde-dpmsolver++":
        h_eta = h + eta * h
        e2 = -math.expm1(-h_eta)
        a, c0 = sigma_t / sigma_s * math.exp(-eta * h), alpha_t * e2
        c = sigma_t * math.sqrt(max(0.0, -math.expm1(-2.0 * eta * h)))
        if order > 1:
            c1 = 0.5 * c0 if order == 2 and solver_type == "midpoint" else alpha_t * (e2 / (-h_eta) + 1.0)
        if order > 2:
            c2 = alpha_t * ((e2 - h_eta) / h_eta**2 + (-0.5 if phi3 == "diffusers" else 0.5))
            c2 *= 2.0 if phi3 == "taylor" else 1.0
    elif algorithm == "dpmsolver":
        ep = math.expm1(h)
        a, c0 = alpha_t / alpha_s, -sigma_t * ep
        if order > 1:
            c1 = 0.5 * c0 if order == 2 and solver_type == "midpoint" else -sigma_t * (ep / h - 1.0)
        if order > 2:
            c2 = -sigma_t * ((ep - h) / h**2 - 0.5) * (2.0 if phi3 == "taylor" else 1.0)
    else:  # sde-dpmsolver, orders 1 and 2
        ep = math.expm1(h)
        a, c0, c = alpha_t / alpha_s, -2.0 * sigma_t * ep, sigma_t * math.sqrt(math.expm1(2.0 * h))
        if order > 1:
            c1 = 0.5 * c0 if solver_type == "midpoint" else -2.0 * sigma_t * (ep / h - 1.0)
    return a, c0, c1, c2, c


def history_weights(order: int, c0: float, c1: float, c2: float, r0: float, r1: float) -> tuple[float, ...]:
    """b on (m0, m1, m2) of c0 D0 + c1 D1 + c2 D2 (the divided differences above)."""
    if order == 1:
        return (c0,)
    if order == 2:
        return (c0 + c1 / r0, -c1 / r0)
    k = r0 / (r0 + r1)
    u = c1 * (1 + k) + c2 / (r0 + r1)  # weight of D1_0 = (m0 - m1) / r0
    w = -c1 * k - c2 / (r0 + r1)  # weight of D1_1 = (m1 - m2) / r1
    return (c0 + u / r0, -u / r0 + w / r1, -w / r1)


def dpm_plan(schedule: VP, steps: int, prediction: str, *, algorithm: str = "dpmsolver++", order: int = 2,
             solver_type: str = "midpoint", timestep_spacing: str = "linspace", steps_offset: int = 0,
             sigmas: str = "default", final_sigmas_type: str | None = None, lower_order_final: bool = True,
             euler_at_final: bool = False, phi3: str = "k-diffusion", momentum: float | None = None) -> Plan:
    """The DPM-Solver multistep Plan on a VP schedule. `sigmas`: "default" (the training sigmas at the spaced
    timesteps), "karras", "exponential", "beta" or "lu" (uniform logSNR), as diffusers' use_*_sigmas options.
    `phi3`: the D2 weight of third-order steps, "k-diffusion" | "diffusers" | "taylor" (see update_terms)."""
    if final_sigmas_type is None:  # diffusers' default "zero"; the noise-prediction algorithms end at sigma_min
        final_sigmas_type = "zero" if algorithm.endswith("++") else "sigma_min"
    if final_sigmas_type == "last":
        raise ValueError("final_sigmas_type must be one of ('zero', 'sigma_min'), got 'last'")
    grid = multistep_grid(schedule, steps, timestep_spacing=timestep_spacing, steps_offset=steps_offset,
                          sigmas=sigmas, final_sigmas_type=final_sigmas_type)
    return dpm_steps(grid, prediction, algorithm=algorithm, order=order, solver_type=solver_type,
                     lower_order_final=lower_order_final, euler_at_final=euler_at_final,
                     final_sigma_zero=final_sigmas_type == "zero", phi3=phi3, momentum=momentum)


def dpm_steps(grid: Grid, prediction: str, *, algorithm: str = "dpmsolver++", order: int = 2,
              solver_type: str = "midpoint", lower_order_final: bool = True, euler_at_final: bool = False,
              final_sigma_zero: bool | None = None, start: int = 0, phi3: str = "k-diffusion",
              momentum: float | None = None, precondition=None) -> Plan:
    """The DPM-Solver multistep Plan over any Grid (the drop-in scheduler passes diffusers' own grid); the
    loop starts at step `start` (img2img), where the history is empty. final_sigma_zero (default: the grid
    ends at sigma = 0): the last step is first order, as diffusers' final_sigmas_type="zero".

    momentum = beta: heavy-ball momentum on the second-order steps of DPM-Solver++ 2M (Wizadwongsa et al.
    2023): v = (1 - beta) v + beta D (v = D at the first second-order step), D = D0 + D1 / 2, and
    x_t = (sigma_t / sigma_s) x - alpha_t (e^{-h} - 1) v; v is the fused op's state, first-order steps are
    unchanged (as the paper's MomentumDPMSolverMultistepScheduler).

    precondition: sigma -> (p, q) of the data prediction x0 = p x + q out at each grid sigma, in place of
    `prediction`'s conversion (EDM's x0 = c_skip x + c_out out: solvers.ve.edm_data_coeffs); DPM-Solver++ only."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    if final_sigma_zero is None:
        final_sigma_zero = grid.sigmas[-1] == 0
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order}")
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"solver_type must be one of {SOLVER_TYPES}, got {solver_type!r}")
    if not algorithm.endswith("++") and final_sigma_zero:
        raise ValueError(f"algorithm {algorithm!r} (noise prediction) cannot land on sigma = 0: it needs a grid ending "
                         f"at a sigma > 0 (final_sigmas_type='sigma_min'; a sigmas= list: a last entry > 0)")
    if order == 3 and algorithm == "sde-dpmsolver":
        raise ValueError("sde-dpmsolver has no third-order update (diffusers neither); use order <= 2")
    if phi3 not in PHI3:
        raise ValueError(f"phi3 must be one of {PHI3}, got {phi3!r}")
    if momentum is not None:
        if (algorithm, order, solver_type) != ("dpmsolver++", 2, "midpoint"):
            raise ValueError("momentum is defined for DPM-Solver++ 2M (midpoint) only, as in the paper")
        if not 0 < momentum <= 1:
            raise ValueError(f"momentum (beta) must be in (0, 1], got {momentum}")
    if precondition is not None and not algorithm.endswith("++"):
        raise ValueError(f"precondition gives a data prediction: algorithm must be 'dpmsolver++' or "
                         f"'sde-dpmsolver++', got {algorithm!r}")
    convert = data_coeffs if algorithm.endswith("++") else noise_coeffs
    n = len(grid)
    plan = []
    started = False  # has a second-order step set the velocity yet
    for i, t in enumerate(grid.timesteps):
        this_order = min(order, i - start + 1) if i >= start else 1
        if i == n - 1 and (euler_at_final or (lower_order_final and n < 15) or final_sigma_zero):
            this_order = 1
        elif i == n - 2 and lower_order_final and n < 15:
            this_order = min(this_order, 2)
        (alpha_s, sigma_s), (alpha_t, sigma_t) = grid.alpha_sigma(i), grid.alpha_sigma(i + 1)
        h = grid.lam(i + 1) - grid.lam(i)
        p, q = precondition(grid.sigmas[i]) if precondition else convert(prediction, alpha_s, sigma_s)
        eps_of = None if algorithm.endswith("++") else (alpha_s, sigma_s)
        write, reads = ring_slots(i, this_order, order)
        undefined = None if h == 0 else grid.repeated(range(i - this_order + 1, i + 1))
        if undefined:
            plan.append(Step(t=t, coeffs=None, write_slot=write, read_slots=reads, undefined=undefined))
            continue
        if h == 0:  # a repeated sigma (sigma_min after a grid ending at sigma_min): the step is the identity
            coeffs = UpdateCoeffs(p=p, q=q, a=1.0, b=(0.0,) * this_order, eps_of=eps_of)
        else:
            a, c0, c1, c2, c = update_terms(algorithm, solver_type, this_order, alpha_s, sigma_s, alpha_t,
                                             sigma_t, h, phi3)
            r0 = (grid.lam(i) - grid.lam(i - 1)) / h if this_order > 1 else 0.0
            r1 = (grid.lam(i - 1) - grid.lam(i - 2)) / h if this_order > 2 else 0.0
            b = history_weights(this_order, c0, c1, c2, r0, r1)
            if momentum is not None and this_order == 2:  # v' = (1 - beta) v + beta D, x' = a x + c0 v'
                beta = momentum if started else 1.0
                started = True
                d = tuple(w / c0 for w in b)  # D = D0 + D1 / 2 in m0, m1
                row = StateRow(a=0.0, b=tuple(beta * w for w in d), g=1.0 - beta)
                coeffs = UpdateCoeffs(p=p, q=q, a=a, b=tuple(c0 * beta * w for w in d), g=c0 * (1.0 - beta),
                                      state=row)
            else:
                coeffs = UpdateCoeffs(p=p, q=q, a=a, b=b, c=c, eps_of=eps_of)
        plan.append(Step(t=t, coeffs=coeffs, write_slot=write, read_slots=reads))
    return Plan(steps=tuple(plan), history_slots=order if order > 1 else 0, discrete_time=grid.discrete,
                data_prediction=algorithm.endswith("++"), uses_state=momentum is not None)


def flow_dpm_sigmas(schedule, steps: int) -> list[float]:
    """flow_dpmpp_2m's own grid: the shifted linspace(1, 1/N, steps + 1) without its end, then 0."""
    import numpy as np

    t = 1.0 - np.linspace(1, 1 / schedule.num_train_timesteps, steps + 1)
    return [float(v) for v in np.flip(schedule.shifted(t))[:-1]] + [0.0]


def flow_dpm_plan(schedule, steps: int, prediction: str, *, order: int = 2, solver_type: str = "midpoint",
                  final_sigmas_type: str = "zero", lower_order_final: bool = True,
                  euler_at_final: bool = False) -> Plan:
    """DPM-Solver++ on a flow-matching schedule (alpha = 1 - t, sigma = t), as diffusers'
    DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=shift, prediction_type="flow_prediction"):
    the grid is the shifted linspace(1, 1/N, steps + 1) without its end, the model is given t N truncated to
    an integer (diffusers casts it to int64). A sigmas= list (solvers.explicit) is the grid itself."""
    import numpy as np

    from .explicit import ExplicitFlow
    from .grid import Grid

    if final_sigmas_type != "zero":
        raise ValueError("flow_dpmpp_2m supports final_sigmas_type='zero' only")
    n_train = schedule.num_train_timesteps
    if isinstance(schedule, ExplicitFlow):
        sigmas, final = np.asarray(schedule.explicit[:-1], dtype=np.float64), float(schedule.explicit[-1])
        if sigmas[0] >= 1:
            raise ValueError(f"flow_dpmpp_2m needs sigmas below 1 (lambda = log((1 - s) / s) is -inf at s = 1), "
                             f"got sigmas[0] = {sigmas[0]}")
    else:
        sigmas, final = np.asarray(flow_dpm_sigmas(schedule, steps)[:-1]), 0.0
    times = (sigmas * n_train).astype(np.int64)
    grid = Grid(timesteps=tuple(int(v) for v in times),
                sigmas=tuple(float(np.float32(s)) for s in list(sigmas) + [final]), flow=True)
    return dpm_steps(grid, prediction, algorithm="dpmsolver++", order=order, solver_type=solver_type,
                     lower_order_final=lower_order_final, euler_at_final=euler_at_final, final_sigma_zero=final == 0)


def singlestep_steps(grid: Grid, prediction: str, order_list, *, algorithm: str = "dpmsolver++",
                     solver_type: str = "midpoint", start: int = 0, phi3: str = "diffusers") -> Plan:
    """DPM-Solver singlestep (diffusers' DPMSolverSinglestepScheduler) over a Grid and its order list.

    A macro step of order k spans k grid intervals: its first model call takes a first-order step and keeps
    its start x in the state; the k-th call jumps from that start with all k predictions of the macro step
    (second order: D0 = m_start, D1 = (m0 - m_start) / r0; third: the divided differences of diffusers'
    singlestep update). The order is lowered where fewer predictions exist (img2img's late start)."""
    if algorithm not in ("dpmsolver++", "dpmsolver", "sde-dpmsolver++"):
        raise ValueError(f"algorithm must be dpmsolver++, dpmsolver or sde-dpmsolver++, got {algorithm!r}")
    convert = data_coeffs if algorithm.endswith("++") else noise_coeffs
    slots = max(order_list) if max(order_list) > 1 else 1
    plan = []
    for i, t in enumerate(grid.timesteps):
        k = min(order_list[i], i - start + 1) if i >= start else 1
        (alpha_t, sigma_t) = grid.alpha_sigma(i + 1)
        s = i - k + 1  # the macro step's start
        alpha_s, sigma_s = grid.alpha_sigma(s)
        h = grid.lam(i + 1) - grid.lam(s)
        p, q = convert(prediction, *grid.alpha_sigma(i))
        eps_of = None if algorithm.endswith("++") else grid.alpha_sigma(i)
        reads = tuple((i - j) % slots for j in range(1, k))
        undefined = None if h == 0 else grid.repeated(range(s, i + 1))
        if undefined:
            plan.append(Step(t=t, coeffs=None, write_slot=i % slots, read_slots=reads, undefined=undefined))
            continue
        if k == 1:
            a, c0, _, _, c = update_terms(algorithm, solver_type, 1, alpha_s, sigma_s, alpha_t, sigma_t, h)
            coeffs = UpdateCoeffs(p=p, q=q, a=a, b=(c0,), c=c, state=StateRow(a=1.0, b=(0.0,)), eps_of=eps_of)
        elif h == 0:  # a zero-length macro step: x' = its start (the state)
            coeffs = UpdateCoeffs(p=p, q=q, a=0.0, b=(0.0,) * k, g=1.0, eps_of=eps_of)
        else:
            a, c0, c1, c2, c = update_terms(algorithm, "heun" if k == 3 else solver_type, k, alpha_s, sigma_s,
                                             alpha_t, sigma_t, h, phi3)
            if k == 2:  # D0 = m1, D1 = (m0 - m1) / r0
                r0 = (grid.lam(i) - grid.lam(s)) / h
                b = (c1 / r0, c0 - c1 / r0)
            else:  # D0 = m2, D1_0 = (m1 - m2) / r1, D1_1 = (m0 - m2) / r0
                r0, r1 = (grid.lam(i) - grid.lam(s)) / h, (grid.lam(i - 1) - grid.lam(s)) / h
                if solver_type == "midpoint":  # c1 D1_1
                    w0, w1 = c1 / r0, 0.0
                else:  # c1 D1 + c2 D2, D1 = (r0 D1_0 - r1 D1_1) / (r0 - r1), D2 = 2 (D1_1 - D1_0) / (r0 - r1)
                    d10 = (c1 * r0 - 2 * c2) / (r0 - r1)  # weight of D1_0
                    d11 = (-c1 * r1 + 2 * c2) / (r0 - r1)  # weight of D1_1
                    w0, w1 = d11 / r0, d10 / r1
                b = (w0, w1, c0 - w0 - w1)
            coeffs = UpdateCoeffs(p=p, q=q, a=0.0, b=b, c=c, g=a, eps_of=eps_of)
        plan.append(Step(t=t, coeffs=coeffs, write_slot=i % slots, read_slots=reads))
    return Plan(steps=tuple(plan), history_slots=slots, discrete_time=grid.discrete,
                data_prediction=algorithm.endswith("++"), uses_state=True)
