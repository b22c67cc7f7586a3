"""sigmas= an explicit noise-level list (Align Your Steps, ComfyUI grids) for the solvers of ds.sample: the
anchors' results on the same lists, the default grids reproduced when passed explicitly, and the errors."""

import diffusers
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
    import numpy as np

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
    (dict(solver="pndm", steps=None, sigmas=AYS), "does not take sigmas= a list"),
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
    import numpy as np

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
