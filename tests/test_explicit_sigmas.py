"""sigmas= an explicit noise-level list (Align Your Steps, ComfyUI grids) for the solvers of ds.sample: the
anchors' results on the same lists, the default grids reproduced when passed explicitly, and the errors."""

import diffusers
import numpy as np
import pytest
import torch

import diffsampler as ds
from diffsampler import sigma_grids
from diffsampler.integrations import kdiffusion as K
from diffsampler.targets import GaussianMixture
from test_sample import SD, make_model, max_rel

X = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
VP = ds.schedules.VP.scaled_linear()
AYS = sigma_grids.ays("SD1", 10).tolist()


def test_euler_on_explicit_sigmas_is_diffusers_euler_with_custom_sigmas():
    model = make_model()
    sched = diffusers.EulerDiscreteScheduler(**SD, timestep_spacing="leading")  # init sigma sqrt(s^2 + 1)
    sched.set_timesteps(sigmas=AYS)  # the list with its final sigma, as here
    x = X * sched.init_noise_sigma
    for t in sched.timesteps:
        x = sched.step(model(sched.scale_model_input(x, t), t), t, x).prev_sample
    got = ds.sample(model, X, steps=None, solver="euler", schedule=VP, sigmas=AYS)
    assert max_rel(got, x) <= 1e-5


@pytest.mark.parametrize("solver", ["dpmpp_2m", "unipc", "ddim", "res_multistep"])
def test_multistep_solvers_on_a_sigma_list_converge_to_the_same_sample(solver):
    """Any grid ends at the same ODE solution: a 10-step AYS list and a 100-step one interpolated from it."""
    target = GaussianMixture.random(dim=8, modes=3, seed=0)
    model = target.model(VP, "eps")
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = ds.sample(model, x, steps=400, solver="dpmpp_2m", schedule=VP)
    errs = [float((ds.sample(model, x, steps=None, solver=solver, schedule=VP, sigmas=sigma_grids.ays("SD1", n).tolist())
                   - ref).norm() / ref.norm()) for n in (10, 40)]
    assert errs[1] < errs[0] / 4 and errs[1] < 0.01, errs


def test_edm_and_flow_lists_are_the_grids_the_solvers_use():
    edm = ds.schedules.EDM()
    model = lambda x, s: torch.tanh(x) * 0.5  # noqa: E731 (an x0 model)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(ds.sample(model, x, steps=12, solver="heun", schedule=edm, prediction="x0"),
                       ds.sample(model, x, steps=None, solver="heun", schedule=edm, prediction="x0",
                                 sigmas=edm.sigmas(12)))
    ays = sigma_grids.ays("SVD", 6).double()
    got = ds.sample(model, x.double(), steps=None, solver="heun", schedule=edm, prediction="x0", sigmas=ays)
    want = K.sample_heun(lambda x, s: model(x, s), x.double() * float(ays[0]), ays, disable=True)
    assert max_rel(got, want) <= 1e-10
    flow = ds.schedules.Flow(shift=3.0)
    v = lambda x, t: x * 0.3  # noqa: E731
    assert torch.equal(ds.sample(v, x, steps=8, solver="flow_euler", schedule=flow),
                       ds.sample(v, x, steps=None, solver="flow_euler", schedule=flow, sigmas=flow.sigmas(8).tolist()))


def test_flow_dpmpp_2m_runs_on_a_sigma_list():
    """Its own grid passed as a list gives the same sample; another list is the grid it runs on (model times
    t N truncated to integers, as its own grid's); a list from sigma 1 (lambda -inf) is refused."""
    flow = ds.schedules.Flow(shift=3.0)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    times = []
    v = lambda x, t: times.append(int(t)) or x * 0.3  # noqa: E731
    own = np.flip(flow.shifted(1.0 - np.linspace(1, 1 / 1000, 9)))[:-1].tolist() + [0.0]
    assert torch.equal(ds.sample(v, x, steps=8, solver="flow_dpmpp_2m", schedule=flow),
                       ds.sample(v, x, steps=None, solver="flow_dpmpp_2m", schedule=flow, sigmas=own))
    times.clear()
    other = flow.sigmas(6).tolist()[1:]
    ds.sample(v, x, steps=None, solver="flow_dpmpp_2m", schedule=flow, sigmas=other)
    assert times == [int(s * 1000) for s in other[:-1]]
    with pytest.raises(ValueError, match="flow_dpmpp_2m needs sigmas below 1"):
        ds.sample(v, x, steps=None, solver="flow_dpmpp_2m", schedule=flow, sigmas=flow.sigmas(6).tolist())


@pytest.mark.parametrize("solver, steps", [("lcm", 4), ("tcd", 4), ("dpm_2m", 10), ("dpm_3m", 10)])
def test_own_grid_as_a_list_is_the_own_grid(solver, steps):
    """The consistency samplers' training timesteps and DPM-Solver's (noise prediction, ending at sigma_min)
    grid, passed as sigma lists: the same plan (DPM-Solver's to float32 rounding of its sigmas)."""
    plan = ds.solvers.make_plan(solver, VP, steps, "eps")
    times = [s.t for s in plan.steps]
    final = 0.0 if solver in ("lcm", "tcd") else VP.sigma_ratio(0)
    listed = ds.solvers.make_plan(solver, VP, None, "eps", sigmas=[VP.sigma_ratio(t) for t in times] + [final])
    if solver in ("lcm", "tcd"):
        assert listed == plan
    else:  # the list runs on its Grid, whose model times are the sigmas' fractional timesteps: the same points
        assert [round(s.t) for s in listed.steps] == times
        assert max(abs(a.coeffs.a - b.coeffs.a) + sum(abs(u - v) for u, v in zip(a.coeffs.b, b.coeffs.b))
                   for a, b in zip(listed.steps, plan.steps)) < 1e-5


@pytest.mark.parametrize("kwargs, match", [
    (dict(solver="dpmpp_2m", steps=7, sigmas=AYS), "does not match sigmas"),
    (dict(solver="dpmpp_2m", steps=None, sigmas=[1.0, 2.0, 0.0]), "non-increasing"),
    (dict(solver="heun", steps=None, sigmas=AYS), "does not take sigmas= a list"),
    (dict(solver="pndm", steps=7, sigmas=AYS), "does not match sigmas"),
    (dict(solver="pndm", steps=None, sigmas=[14.6, 3.0, 5.0, 1.0, 0.0]), "non-increasing"),
    (dict(solver="pndm", steps=None, sigmas=[14.6, 3.0, 1.0, 0.0]), "PRK warm-up needs steps >= 4"),
    (dict(solver="pndm", steps=None, sigmas=[14.6, 0.0], skip_prk_steps=True), "PLMS needs steps >= 2"),
    (dict(solver="pndm", steps=None, sigmas=[14.6, 3.0, 3.0, 1.0, 0.0]), "give the same training timestep"),
    (dict(solver="pndm", steps=None, sigmas=[14.6, 3.0, 1.0, 0.02, 0.01]), "give the same training timestep"),
    (dict(solver="lcm", steps=None, sigmas=AYS[:-1]), "ends at 0"),
    (dict(solver="lcm", steps=None, sigmas=[14.6, 14.59, 0.0]), "repeated training timesteps"),
    (dict(solver="dpm_2m", steps=None, sigmas=AYS), "cannot land on sigma = 0"),
    (dict(solver="flow_euler", steps=None, sigmas=[2.0, 1.0, 0.0], schedule=ds.schedules.Flow()), "flow times"),
])
def test_bad_lists(kwargs, match):
    kwargs = {"schedule": VP, **kwargs}
    with pytest.raises(ValueError, match=match):
        ds.sample(make_model(), X, **kwargs)


@pytest.mark.parametrize("solver, fn", [("euler_ancestral", K.sample_euler_ancestral),
                                        ("dpmpp_2s_ancestral", K.sample_dpmpp_2s_ancestral)])
def test_ancestral_solvers_on_a_vp_list_are_the_kdiffusion_functions(solver, fn):
    """euler_ancestral + Align Your Steps on SD (a common ComfyUI pick): k-diffusion's function on the same list
    with the eps model wrapped as its denoiser, the same noise draws (ds.sample's generator, float32)."""
    from diffsampler.schedules import sigma_to_t
    from test_res_er_sde import GeneratorNoise

    target = GaussianMixture.random(dim=8, modes=3, seed=0)
    model = target.model(VP, "eps")
    log_train = np.log((((1 - VP.alphas_cumprod.double()) / VP.alphas_cumprod.double()) ** 0.5).numpy())

    def denoiser(x, sigma):
        s = float(sigma[0])
        t = torch.tensor(float(sigma_to_t(np.array(s), log_train)), dtype=torch.float64)
        return x - s * model(x / (s * s + 1) ** 0.5, t)

    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ays = torch.tensor(AYS, dtype=torch.float64)
    got = ds.sample(model, x, steps=None, solver=solver, schedule=VP, sigmas=AYS,
                    generator=torch.Generator().manual_seed(4))
    want = fn(denoiser, x * (1 + ays[0] ** 2) ** 0.5, ays, disable=True, noise_sampler=GeneratorNoise(x.shape, 4))
    assert max_rel(got, want) <= 1e-10


# ---- pndm: PLMS / PRK on a list (solvers.pndm) ----

TRAIN_LOG = np.log((((1 - VP.alphas_cumprod.double()) / VP.alphas_cumprod.double()) ** 0.5).numpy())


def train_sigma(t) -> np.ndarray:
    """The sigma ratio at (fractional) training timesteps t, log sigma interpolated between the integers."""
    return np.exp(np.interp(t, np.arange(len(TRAIN_LOG)), TRAIN_LOG))


def smooth_model(prediction="eps"):
    """A float64 model(x, t) smooth in a fractional t (an eps or v output)."""
    w = torch.randn(4, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 0.4
    lift = 1.0 if prediction == "eps" else -0.5

    def model(x, t):
        s = t.double().reshape(-1, 1, 1, 1) / 1000
        return torch.tanh(torch.einsum("bchw,cd->bdhw", x, w) * (1 + s)) + lift * 0.1 * x * s

    return model


def plms_weights_by_moments(nodes, t, t_next):
    """The w with sum_j w_j p(nodes_j) = the mean of p over [t, t_next] for every polynomial p of degree
    < len(nodes) (the Adams-Bashforth weights, from the moment equations in u = (tau - t) / (t_next - t))."""
    u = (np.asarray(nodes) - t) / (t_next - t)
    k = np.arange(len(nodes))
    return np.linalg.solve(u[None, :] ** k[:, None], 1 / (k + 1))


def pndm_by_the_equations(model, x, sigmas, skip_prk, prediction="eps"):
    """PNDM on a VP sigma-ratio list in plain float64 torch: DDIM's transfer between the list's alpha_bar
    1 / (1 + s^2); model timesteps t_i interpolated in log sigma (a final 0: t_{N-1} - (t_{N-2} - t_{N-1}));
    PRK's half steps at the midpoint timestep; PLMS's Adams-Bashforth weights over the stored outputs'
    timesteps."""
    s, n = [float(v) for v in sigmas], len(sigmas) - 1
    t = list(np.interp(np.log(np.maximum(s, 1e-300)), TRAIN_LOG, np.arange(len(TRAIN_LOG))))
    if s[-1] == 0:
        t[-1] = 2 * t[-2] - t[-3]
    ab = [1 / (1 + v * v) for v in s]

    def call(x, time):
        return model(x, torch.tensor(time, dtype=torch.float64))

    def transfer(base, a, a_next, out):  # x' = alpha' x0 + sigma' eps with eps = out (or from v) held fixed
        eps = out if prediction == "eps" else a**0.5 * out + (1 - a) ** 0.5 * base
        return a_next**0.5 * (base - (1 - a) ** 0.5 * eps) / a**0.5 + (1 - a_next) ** 0.5 * eps

    if skip_prk:
        e0 = call(x, t[0])
        e1 = call(transfer(x, ab[0], ab[1], e0), t[1])
        x, stored, start = transfer(x, ab[0], ab[1], (e0 + e1) / 2), [(t[0], e0)], 1
    else:
        stored, start = [], 3
        for b in range(3):
            mid = (t[b] + t[b + 1]) / 2
            ab_mid = 1 / (1 + float(train_sigma(mid)) ** 2)
            ea = call(x, t[b])
            eb = call(transfer(x, ab[b], ab_mid, ea), mid)
            ec = call(transfer(x, ab[b], ab_mid, eb), mid)
            ed = call(transfer(x, ab[b], ab[b + 1], ec), t[b + 1])
            x = transfer(x, ab[b], ab[b + 1], (ea + 2 * eb + 2 * ec + ed) / 6)
            stored.append((t[b], ea))
    for i in range(start, n):
        stored = (stored + [(t[i], call(x, t[i]))])[-4:]
        newest_first = stored[::-1]
        w = plms_weights_by_moments([tau for tau, _ in newest_first], t[i], t[i + 1])
        x = transfer(x, ab[i], ab[i + 1], sum(float(wj) * e for wj, (_, e) in zip(w, newest_first)))
    return x


def test_plms_weights_on_equal_steps_are_adams_bashforths():
    from diffsampler.solvers.pndm import ADAMS_BASHFORTH, plms_weights

    times = [700.0, 600.0, 500.0, 400.0, 300.0]
    for n in range(1, 5):
        assert np.allclose(plms_weights(times, 3, n), ADAMS_BASHFORTH[n - 1], rtol=0, atol=1e-14)
    uneven = [900.0, 700.0, 560.0, 480.0, 430.0]
    assert np.allclose(plms_weights(uneven, 3, 4), plms_weights_by_moments(uneven[3::-1], 480.0, 430.0), rtol=0,
                       atol=1e-12)


@pytest.mark.parametrize("skip_prk_steps", [True, False])
@pytest.mark.parametrize("set_alpha_to_one", [False, True])
def test_pndm_own_grid_as_a_list_is_the_own_grid(skip_prk_steps, set_alpha_to_one):
    """The own grid's model timesteps ("leading", steps_offset 0) as sigma ratios: the same samples. Its last
    call steps from timestep 0 into the final alpha: alpha_bar[0] (a no-op, so the list ends at sigma_0 with
    one call fewer) or 1 (the list's final 0)."""
    steps, model, x = 10, smooth_model(), X.double()
    kw = dict(solver="pndm", schedule=VP, skip_prk_steps=skip_prk_steps)
    own = ds.sample(model, x, steps=steps, set_alpha_to_one=set_alpha_to_one, **kw)
    sigmas = train_sigma(np.arange(steps)[::-1] * (1000 // steps)).tolist() + ([0.0] if set_alpha_to_one else [])
    listed = ds.sample(model, x, steps=None, sigmas=sigmas, **kw)
    assert max_rel(listed, own) <= 1e-10
    own_plan = ds.solvers.make_plan("pndm", VP, steps, "eps", skip_prk_steps=skip_prk_steps)
    listed_plan = ds.solvers.make_plan("pndm", VP, None, "eps", sigmas=sigmas, skip_prk_steps=skip_prk_steps)
    calls = len(own_plan.steps) - (0 if set_alpha_to_one else 1)
    assert listed_plan.timesteps == own_plan.timesteps[:calls]


KARRAS_VP = ds.schedules.karras_sigmas(0.05, 14.6, 12).tolist()


@pytest.mark.parametrize("sigmas", [AYS, KARRAS_VP, KARRAS_VP + [0.0]], ids=["ays", "karras", "karras_to_0"])
@pytest.mark.parametrize("skip_prk_steps", [True, False])
def test_pndm_on_an_uneven_list_follows_its_equations(sigmas, skip_prk_steps):
    model, x = smooth_model(), X.double()
    got = ds.sample(model, x, steps=None, solver="pndm", schedule=VP, sigmas=sigmas, skip_prk_steps=skip_prk_steps)
    assert max_rel(got, pndm_by_the_equations(model, x, sigmas, skip_prk_steps)) <= 1e-10


def test_pndm_v_prediction_on_a_list_follows_its_equations():
    model, x = smooth_model("v"), X.double()
    got = ds.sample(model, x, steps=None, solver="pndm", schedule=VP, sigmas=KARRAS_VP, prediction="v")
    assert max_rel(got, pndm_by_the_equations(model, x, KARRAS_VP, False, "v")) <= 1e-10


def test_pndm_convergence_order_on_refined_lists():
    """Karras lists (rho 7, sigma ratio 14.6 down to 0.1) of 20..320 steps against an RK4 reference in the sigma
    ratio s (x / alpha = x0 + s eps, d(x / alpha) / ds = eps) on a 3-mode mixture's exact model. PLMS and PRK
    alike measure 2.57, 2.78, 2.45, 2.03 per doubling: second order, not Adams-Bashforth's 4, as the equations
    say: the weights average eps over the model timestep t where the exact step averages it over s, a local
    error (s'' de/dt / 12) h^3 (the same weights taken in s measure 2.84, 3.51, 3.87, 3.98; Adams-Bashforth's
    constant table 3.74, 2.19, 1.98, 2.00)."""
    target = GaussianMixture.random(dim=8, modes=3, seed=0)
    eps_at = target.model(None, "eps")  # t: the sigma ratio itself
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def model(y, t):
        return eps_at(y, torch.tensor(float(train_sigma(float(t))), dtype=torch.float64))

    def rk4(y, sigmas):
        f = lambda y, s: eps_at(y / (1 + s * s) ** 0.5, torch.tensor(s, dtype=torch.float64))  # noqa: E731
        y = y * (1 + sigmas[0] ** 2) ** 0.5
        for a, b in zip(sigmas[:-1], sigmas[1:]):
            h = b - a
            k1 = f(y, a)
            k2 = f(y + h / 2 * k1, a + h / 2)
            k3 = f(y + h / 2 * k2, a + h / 2)
            y = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + f(y + h * k3, b))
        return y / (1 + sigmas[-1] ** 2) ** 0.5

    reference, ns = rk4(x, ds.schedules.karras_sigmas(0.1, 14.6, 801).tolist()), [20, 40, 80, 160, 320]
    for skip in (True, False):
        errors = [(ds.sample(model, x, steps=None, solver="pndm", schedule=VP, skip_prk_steps=skip,
                             sigmas=ds.schedules.karras_sigmas(0.1, 14.6, n + 1).tolist()) - reference).norm().item()
                  for n in ns]
        orders = [float(np.log2(a / b)) for a, b in zip(errors, errors[1:])]
        assert all(1.9 < p < 3.0 for p in orders) and orders[-1] < 2.2, (orders, errors)
