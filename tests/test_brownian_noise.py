"""Brownian-tree noise: the draws of diffusers' / k-diffusion's BrownianTreeNoiseSampler to the bit, the
increments of one Brownian path, the k-diffusion SDE samplers' default, and the DPMSolverSDEScheduler drop-in."""

import pytest
import torch

torchsde = pytest.importorskip("torchsde")

import diffusers  # noqa: E402
from diffusers.schedulers.scheduling_dpmsolver_sde import BrownianTreeNoiseSampler as Anchor  # noqa: E402

from diffsampler import noise as N  # noqa: E402
from diffsampler.integrations import diffusers as fused  # noqa: E402
from diffsampler.integrations import kdiffusion as K  # noqa: E402
from test_integrations_kdiffusion import SIGMAS, denoiser, start  # noqa: E402
from test_sample import SD, make_model, max_rel  # noqa: E402

X = torch.zeros(2, 4, 8, 8)
QUERIES = [(14.6, 10.0), (10.0, 3.0), (0.5, 0.03), (3.0, 0.5), (10.0, 14.6), (0.03, 14.6)]


@pytest.mark.parametrize("seed", [3, [1, 2]], ids=["one seed", "a seed per sample"])
def test_same_bits_as_the_anchor_in_any_query_order(seed):
    ours, anchor = N.BrownianTreeNoiseSampler(X, 0.03, 14.6, seed=seed), Anchor(X, 0.03, 14.6, seed=seed)
    for a, b in QUERIES:
        assert torch.equal(ours(a, b), anchor(a, b))


def test_seed_none_draws_its_seed_from_the_global_generator():
    torch.manual_seed(7)
    ours = N.BrownianTreeNoiseSampler(X, 0.03, 14.6)
    torch.manual_seed(7)
    anchor = Anchor(X, 0.03, 14.6)
    assert torch.equal(ours(14.6, 2.0), anchor(14.6, 2.0))


def test_increments_of_one_brownian_path():
    """W(t2) - W(t0) = (W(t1) - W(t0)) + (W(t2) - W(t1)): the scaled draws add up, and each is standard normal."""
    x = torch.zeros(64, 256, dtype=torch.float64)
    tree = N.BrownianTreeNoiseSampler(x, 0.1, 10.0, seed=11)
    whole = tree(8.0, 1.0) * 7.0**0.5
    parts = tree(8.0, 3.0) * 5.0**0.5 + tree(3.0, 1.0) * 2.0**0.5
    assert torch.allclose(whole, parts, atol=1e-5)
    z = tree(5.0, 4.0)
    assert abs(float(z.mean())) < 0.02 and abs(float(z.std()) - 1) < 0.02
    assert abs(float(torch.corrcoef(torch.stack([tree(8.0, 3.0).flatten(), tree(3.0, 1.0).flatten()]))[0, 1])) < 0.02


def test_batched_seeds_need_one_per_sample():
    with pytest.raises(ValueError, match="one per sample"):
        N.BrownianTreeNoiseSampler(X, 0.03, 14.6, seed=[1, 2, 3])


@pytest.mark.parametrize("sampler", ["sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde", "sample_dpmpp_sde"])
def test_kdiffusion_sde_default_is_the_brownian_tree(sampler):
    """Without a noise_sampler, the SDE samplers draw from a Brownian tree seeded from the global generator over
    the positive sigmas' range, as k-diffusion does."""
    x = start().float()
    sigmas = SIGMAS.float()
    torch.manual_seed(5)
    got = getattr(K, sampler)(denoiser, x, sigmas, disable=True)
    torch.manual_seed(5)
    tree = Anchor(x, sigmas[sigmas > 0].min(), sigmas.max())
    want = getattr(K, sampler)(denoiser, x, sigmas, disable=True, noise_sampler=tree)
    assert torch.equal(got, want)


def test_kdiffusion_without_torchsde_draws_randn_like(monkeypatch):
    def missing():
        raise ImportError("no torchsde")

    monkeypatch.setattr(N, "torchsde", missing)
    x = start().float()
    torch.manual_seed(5)
    got = K.sample_dpmpp_2m_sde(denoiser, x, SIGMAS.float(), disable=True)
    torch.manual_seed(5)
    draws = iter([torch.randn_like(x) for _ in range(len(SIGMAS))])
    want = K.sample_dpmpp_2m_sde(denoiser, x, SIGMAS.float(), disable=True, noise_sampler=lambda a, b: next(draws))
    assert torch.equal(got, want)


def loop(cls, steps, **config):
    sched = cls(**{**SD, **config})
    sched.set_timesteps(steps)
    model, x = make_model(), torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    x, x0s = x * sched.init_noise_sigma, []
    for t in sched.timesteps:
        out = sched.step(model(sched.scale_model_input(x, t), t), t, x)
        x = out.prev_sample
        x0s.append(out.pred_original_sample)
    return x, x0s


@pytest.mark.parametrize("config", [dict(noise_sampler_seed=3), dict(noise_sampler_seed=3, prediction_type="v_prediction"),
                                    dict(noise_sampler_seed=4, use_karras_sigmas=True),
                                    dict(noise_sampler_seed=5, timestep_spacing="trailing"),
                                    dict(noise_sampler_seed=6, use_exponential_sigmas=True)], ids=str)
@pytest.mark.parametrize("steps", [5, 12])
def test_dpmsolver_sde_drop_in(config, steps):
    (a, xa), (b, xb) = loop(fused.DPMSolverSDEScheduler, steps, **config), loop(diffusers.DPMSolverSDEScheduler,
                                                                                   steps, **config)
    assert max_rel(a, b) <= 1e-5
    assert max(max_rel(p, q) for p, q in zip(xa, xb)) <= 1e-5


def test_dpmsolver_sde_drop_in_is_picked_by_accelerate():
    assert fused.FUSED["DPMSolverSDEScheduler"] is fused.DPMSolverSDEScheduler
    with pytest.raises(NotImplementedError, match="sample"):
        loop(fused.DPMSolverSDEScheduler, 4, prediction_type="sample")
