"""Restart sampling: the k-diffusion-style sample_restart against its authors' algorithm written out in plain
torch (float64), ds.sample's "restart" against it, its reduction to Heun, and sampling quality on an exact
mixture against Heun at the same number of model calls."""

import pytest
import torch

import diffsampler as ds
from diffsampler.integrations import kdiffusion as K
from diffsampler.schedules import karras_sigmas
from diffsampler.targets import GaussianMixture, sliced_wasserstein
from test_integrations_kdiffusion import close, denoiser, start
from test_res_er_sde import edm_denoiser

EDM = ds.schedules.EDM(sigma_min=0.01, sigma_max=20.0)


def written_out(model, x, sigmas, s_noise=1.0, restart_list=None):
    """The authors' restart sampler: the default restart list, the grid of (sigma, sigma') steps with the restart
    segments, Heun steps, a jump x += s_noise sqrt(s^2 - last^2) z (randn_like) where a step starts above the
    last one's end."""
    sig = [float(v) for v in sigmas]
    steps = len(sig) - 1
    if restart_list is None:
        if steps >= 20:
            n, k = (steps // 4, 2) if steps >= 36 else (9, 1)
            sig = [float(v) for v in karras_sigmas(sig[-2], sig[0], steps - n * k)] + [0.0]
            restart_list = {0.1: [n + 1, k, 2]}
        else:
            restart_list = {}
    t = torch.tensor(sig)
    restart_list = {int(torch.argmin(abs(t - key))): v for key, v in restart_list.items()}
    pairs = []
    for i in range(len(sig) - 1):
        pairs.append((sig[i], sig[i + 1]))
        if i + 1 in restart_list:
            n, k, t_max = restart_list[i + 1]
            top = int(torch.argmin(abs(t - t_max)))
            if top < i + 1:
                seg = [float(v) for v in karras_sigmas(sig[i + 1], sig[top], n)]
                pairs += [p for _ in range(k) for p in zip(seg[:-1], seg[1:])]
    s_in = x.new_ones([x.shape[0]])
    last = None
    for old, new in pairs:
        if last is not None and last < old:
            x = x + torch.randn_like(x) * s_noise * (old**2 - last**2) ** 0.5
        d = (x - model(x, old * s_in)) / old
        if new == 0:
            x = x + d * (new - old)
        else:
            x2 = x + d * (new - old)
            d2 = (x2 - model(x2, new * s_in)) / new
            x = x + (d + d2) / 2 * (new - old)
        last = new
    return x


@pytest.mark.parametrize("steps, restart_list", [(12, {0.5: [4, 2, 3.0]}), (24, None), (40, None),
                                                 (16, {0.2: [3, 1, 1.0], 2.0: [3, 2, 6.0]})], ids=str)
def test_sample_restart_is_the_authors_algorithm(steps, restart_list):
    sigmas = torch.tensor(EDM.sigmas(steps), dtype=torch.float64)
    x = start() * sigmas[0]
    torch.manual_seed(3)
    got = K.sample_restart(denoiser, x, sigmas, disable=True, restart_list=restart_list)
    torch.manual_seed(3)
    want = written_out(denoiser, x, sigmas, restart_list=restart_list)
    assert close(got, want)


def test_sample_solver_is_sample_restart():
    target = GaussianMixture.random(dim=8, modes=3, seed=1)
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(0))
    got = ds.sample(edm_denoiser(target), x, steps=24, solver="restart", schedule=EDM, prediction="x0",
                    generator=torch.Generator().manual_seed(6))
    torch.manual_seed(6)  # randn_like(x float32) from the default generator: the same draws as the seeded one
    want = K.sample_restart(edm_denoiser(target), x * EDM.sigma_max, torch.tensor(EDM.sigmas(24)), disable=True)
    assert close(got, want, 1e-5)


def test_no_restart_is_heun_and_model_calls():
    target = GaussianMixture.random(dim=8, modes=3, seed=1)
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a = ds.sample(edm_denoiser(target), x, steps=12, solver="restart", schedule=EDM, prediction="x0")
    b = ds.sample(edm_denoiser(target), x, steps=12, solver="heun", schedule=EDM, prediction="x0")
    assert close(a, b, 1e-14)  # fewer than 20 steps: no restart by default
    plan = ds.solvers.make_plan("restart", EDM, 24, "x0")
    assert len(plan.steps) == 2 * 24 - 1 and sum(s.needs_noise for s in plan.steps) == 1


def test_restart_against_heun_at_the_same_model_calls():
    """Sliced W2 to exact samples of a mixture, exact denoiser, the same intervals (model calls within one):
    started from a too-narrow x_T (sigma_max = 20 for a model of data at sigma_max ~ inf), Heun keeps the start's
    error while Restart's jumps contract it, as the paper argues; from sigma_max = 80 there is little error to
    contract and both end near the sampling floor."""
    target = GaussianMixture.random(dim=8, modes=4, seed=2)
    x = torch.randn(4000, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = target.sample(4000, generator=torch.Generator().manual_seed(1))
    floor = sliced_wasserstein(target.sample(4000, generator=torch.Generator().manual_seed(2)), exact)

    def w2(solver, sigma_max):
        sched = ds.schedules.EDM(sigma_min=0.01, sigma_max=sigma_max)
        out = ds.sample(edm_denoiser(target), x, steps=60, solver=solver, schedule=sched, prediction="x0",
                        generator=torch.Generator().manual_seed(3))
        return sliced_wasserstein(out, exact)

    assert w2("restart", 20.0) < 0.95 * w2("heun", 20.0)
    assert w2("restart", 80.0) < 2 * floor and w2("heun", 80.0) < 2 * floor


@pytest.mark.parametrize("restart, match", [({0.1: (1, 1, 2.0)}, "restart n"), ({0.1: (3, 1)}, "n, K, t_max"),
                                            ([0.1], "dict")])
def test_bad_restart(restart, match):
    with pytest.raises(ValueError, match=match):
        ds.sample(denoiser, start(), steps=24, solver="restart", schedule=EDM, prediction="x0", restart=restart)


def test_restart_on_vp_is_sample_restart_on_its_sigmas():
    """On Stable Diffusion's schedule: the Euler grid's sigmas in the VE scale, the model at each sigma's
    fractional timestep: sample_restart on the same sigmas with the eps model wrapped as its denoiser."""
    import numpy as np

    from diffsampler.schedules import sigma_to_t
    from diffsampler.solvers.ve_grid import VEPoints

    vp = ds.schedules.VP.scaled_linear()
    target = GaussianMixture.random(dim=8, modes=3, seed=0)
    model = target.model(vp, "eps")
    log_train = np.log((((1 - vp.alphas_cumprod.double()) / vp.alphas_cumprod.double()) ** 0.5).numpy())
    points = VEPoints(vp, 24, "eps")
    grid_t = dict(zip(points.sigmas[:-1], points.timesteps))

    def denoiser(x, sigma):
        s = float(sigma[0])
        t = grid_t.get(s, float(sigma_to_t(np.array(s), log_train)))
        return x - s * model(x / (s * s + 1) ** 0.5, torch.tensor(t, dtype=torch.float64)).to(x.dtype)

    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    got = ds.sample(model, x, steps=24, solver="restart", schedule=vp, generator=torch.Generator().manual_seed(6))
    torch.manual_seed(6)  # randn_like(x float32): the same draws as ds.sample's seeded generator
    want = K.sample_restart(denoiser, x * points.init_scale, torch.tensor(points.sigmas), disable=True)
    assert close(got, want, 1e-5)
