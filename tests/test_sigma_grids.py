"""Noise-level grids: ComfyUI's scheduler names and k-diffusion's grids against their definitions, against the
diffusers grids they coincide with, and their bad-input errors."""

import math

import numpy as np
import pytest
import torch

import diffsampler as ds
from diffsampler import sigma_grids as G

SD = ds.schedules.VP.scaled_linear()
SD_SIGMAS = G.ModelSigmas(SD)


def test_model_sigmas_are_the_training_sigmas():
    ab = SD.alphas_cumprod.double()
    assert torch.allclose(SD_SIGMAS.sigmas.double(), ((1 - ab) / ab).sqrt(), rtol=1e-6)
    assert SD_SIGMAS.sigma_min == pytest.approx(0.0292, abs=1e-4) and SD_SIGMAS.sigma_max == pytest.approx(14.6146, abs=1e-4)
    t = torch.tensor([0.0, 10.0, 999.0, 412.5])
    back = SD_SIGMAS.timestep(SD_SIGMAS.sigma(t[:3]))
    assert back.tolist() == [0, 10, 999]
    # log-linear between training steps
    mid = SD_SIGMAS.sigma(t[3])
    assert float(mid) == pytest.approx(math.sqrt(float(SD_SIGMAS.sigmas[412] * SD_SIGMAS.sigmas[413])), rel=1e-5)


def test_ddim_uniform_is_diffusers_leading_grid_with_offset_one():
    """ComfyUI's ddim_uniform picks the training sigmas at DDIM's leading timesteps (steps_offset 1, SD's
    config) when the step count divides the training steps."""
    import diffusers

    for steps in (10, 20, 25):
        sched = diffusers.DDIMScheduler.from_config(dict(beta_schedule="scaled_linear", beta_start=0.00085,
                                                         beta_end=0.012, steps_offset=1))
        sched.set_timesteps(steps)
        want = SD_SIGMAS.sigmas[sched.timesteps.long()]
        got = G.ddim_uniform(SD_SIGMAS, steps)
        assert torch.equal(got[:-1], want) and got[-1] == 0


def test_simple_and_normal_follow_their_definitions():
    steps = 7
    simple = G.simple(SD_SIGMAS, steps)
    idx = [999 - int(i * 1000 / steps) for i in range(steps)]
    assert torch.equal(simple[:-1], SD_SIGMAS.sigmas[idx]) and simple[-1] == 0
    normal = G.normal(SD_SIGMAS, steps)
    assert len(normal) == steps + 1 and normal[-1] == 0
    assert float(normal[0]) == pytest.approx(SD_SIGMAS.sigma_max, rel=1e-6)
    assert float(normal[-2]) == pytest.approx(SD_SIGMAS.sigma_min, rel=1e-6)  # normal ends at sigma_min
    sgm = G.sgm_uniform(SD_SIGMAS, steps)
    assert len(sgm) == steps + 1 and float(sgm[-2]) > 2 * SD_SIGMAS.sigma_min  # sgm leaves sigma_min out
    want = [float(SD_SIGMAS.sigma(torch.tensor(999 - 999 * i / steps))) for i in range(steps)]
    assert np.allclose(sgm[:-1].numpy(), want, rtol=1e-5)
    assert (normal[:-1].diff() < 0).all() and (sgm[:-1].diff() < 0).all()


def test_beta_uses_the_beta_quantiles_and_drops_repeats():
    from scipy.stats import beta

    got = G.beta(SD_SIGMAS, 10)
    ts = np.rint(beta.ppf(1 - np.arange(10) / 10, 0.6, 0.6) * 999).astype(int)
    assert torch.equal(got[:-1], SD_SIGMAS.sigmas[ts])
    many = G.beta(SD_SIGMAS, 800)  # quantiles closer than a training step repeat a sigma: kept once
    assert len(many) < 801 and (many[:-1].diff() < 0).all()


def test_exponential_karras_kl_optimal_by_name():
    lo, hi = SD_SIGMAS.sigma_min, SD_SIGMAS.sigma_max
    exp = G.comfy_sigmas(SD_SIGMAS, "exponential", 9)
    assert np.allclose(np.diff(np.log(exp[:-1].double().numpy())), math.log(lo / hi) / 8, rtol=1e-5)
    karras = G.comfy_sigmas(SD_SIGMAS, "karras", 9)
    assert np.allclose(karras[:-1].numpy(), ds.schedules.karras_sigmas(lo, hi, 9), rtol=1e-6)
    kl = G.comfy_sigmas(SD_SIGMAS, "kl_optimal", 9)
    assert np.allclose(np.diff(np.arctan(kl[:-1].double().numpy())), (math.atan(lo) - math.atan(hi)) / 8, rtol=1e-4)
    assert kl[-1] == 0


def test_polyexponential_and_laplace():
    assert torch.allclose(G.polyexponential(9, 0.03, 14.6), G.exponential(9, 0.03, 14.6), rtol=1e-6)
    p = G.polyexponential(9, 0.03, 14.6, rho=2.0)
    ramp = np.linspace(1, 0, 9) ** 2
    assert np.allclose(p[:-1].numpy(), np.exp(ramp * math.log(14.6 / 0.03) + math.log(0.03)), rtol=1e-5)
    lap = G.laplace(9, 1e-3, 1e3)  # mu = 0: symmetric in log sigma about 0, no final 0 (as ComfyUI)
    assert len(lap) == 9 and lap[4] == pytest.approx(1.0, rel=1e-4)
    assert np.allclose((lap * lap.flip(0)).numpy(), 1.0, rtol=1e-3)
    assert G.laplace(9, 0.5, 2.0).min() == 0.5 and G.laplace(9, 0.5, 2.0).max() == 2.0  # clamped


def test_ays_tables_and_their_log_linear_interpolation():
    ten = G.ays("SD1", 10)
    assert np.allclose(ten[:-1].numpy(), G.AYS["SD1"][:-1]) and ten[-1] == 0
    twenty = G.ays("SDXL", 20)
    assert len(twenty) == 21 and twenty[-1] == 0
    table = np.array(G.AYS["SDXL"])
    assert np.allclose(twenty[::2][:-1].numpy(), table[:-1], rtol=1e-6)  # every other point is the table's
    assert np.allclose(twenty[1:-1:2].numpy(), np.sqrt(table[:-1] * table[1:]), rtol=1e-6)  # log midpoints
    assert len(G.ays("SVD", 4)) == 5


def test_flow_model_sigmas_as_comfyui_holds_them():
    flow = G.ModelSigmas(ds.schedules.Flow(shift=3.0))
    u = np.arange(1, 1001) / 1000
    assert np.allclose(flow.sigmas.numpy(), 3 * u / (1 + 2 * u), rtol=1e-6)
    assert float(flow.timestep(torch.tensor(0.5))) == 500.0
    simple = G.simple(flow, 4)
    assert float(simple[0]) == 1.0 and simple[-1] == 0 and (simple.diff() < 0).all()


def test_linear_quadratic():
    got = G.linear_quadratic(SD_SIGMAS, 10)
    assert len(got) == 11 and got[-1] == 0 and float(got[0]) == pytest.approx(SD_SIGMAS.sigma_max)
    lin = (1 - got[:5] / SD_SIGMAS.sigma_max).double().numpy()  # the linear part up to threshold 0.025
    assert np.allclose(lin, np.arange(5) * 0.025 / 5, atol=1e-7)
    assert (got.diff() <= 0).all()


@pytest.mark.parametrize("call, match", [
    (lambda: G.comfy_sigmas(SD_SIGMAS, "uniformish", 5), "name must be one of"),
    (lambda: G.simple(SD_SIGMAS, 0), "steps"),
    (lambda: G.ays("SD3", 5), "model_type"),
    (lambda: G.exponential(5, 2.0, 1.0), "sigma_min <= sigma_max"),
    (lambda: G.kl_optimal(1, 0.1, 1.0), "n >= 2"),
    (lambda: G.simple("sd", 5), "model_sigmas"),
    (lambda: G.linear_quadratic(SD_SIGMAS, 4, linear_steps=4), "linear_steps"),
])
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_kdiffusion_names():
    from diffsampler.integrations import kdiffusion as K

    assert torch.equal(K.get_sigmas_exponential(7, 0.03, 14.6), G.exponential(7, 0.03, 14.6))
    ref = torch.linspace(math.log(14.6), math.log(0.03), 7).exp()  # k-diffusion's formula
    assert torch.equal(K.get_sigmas_exponential(7, 0.03, 14.6)[:-1], ref)
    assert K.get_sigmas_polyexponential is G.polyexponential and K.get_sigmas_laplace is G.laplace
