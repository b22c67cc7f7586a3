"""RES multistep and ER-SDE: k-diffusion-style functions against the published algorithms written out in plain
torch (float64), ds.sample's solvers against those functions, and convergence on exact Gaussian targets."""

import math

import pytest
import torch

import diffsampler as ds
from diffsampler.integrations import kdiffusion as K
from diffsampler.targets import GaussianMixture
from test_integrations_kdiffusion import SIGMAS, ListNoise, close, denoiser, start


def ancestral(s, s_next, eta):
    if not eta:
        return s_next, 0.0
    up = min(s_next, eta * (s_next**2 * (s**2 - s_next**2) / s**2) ** 0.5)
    return (s_next**2 - up**2) ** 0.5, up


def res_written_out(model, x, sigmas, eta, noise, s_noise=1.0):
    """RES multistep as ComfyUI's res_multistep states it (phi functions of -h, c2 from the previous step)."""
    sig = [float(v) for v in sigmas]
    old_d = old_down = None
    for i in range(len(sig) - 1):
        d = model(x, torch.full((x.shape[0],), sig[i], dtype=x.dtype))
        down, up = ancestral(sig[i], sig[i + 1], eta)
        if down == 0 or old_d is None:
            x = x + (x - d) / sig[i] * (down - sig[i])
        else:
            t, t_old, t_next, t_prev = (-math.log(v) for v in (sig[i], old_down, down, sig[i - 1]))
            h = t_next - t
            c2 = (t_prev - t_old) / h
            phi1 = math.expm1(-h) / -h
            phi2 = (phi1 - 1) / -h
            x = math.exp(-h) * x + h * ((phi1 - phi2 / c2) * d + phi2 / c2 * old_d)
        if sig[i + 1] > 0 and eta:
            x = x + noise(sig[i], sig[i + 1]) * s_noise * up
        old_d, old_down = d, down
    return x


def er_written_out(model, x, sigmas, noise, s_noise=1.0, max_stage=3):
    """ER-SDE-Solver-3 in the VE scale (lambda = sigma, alpha = 1) as the paper's / ComfyUI's er_sde states it."""
    scaler = lambda v: v * ((v**0.3).exp() + 10.0)  # noqa: E731
    lam = sigmas.double()
    idx = torch.arange(200, dtype=torch.float64)
    old_d = old_dd = None
    for i in range(len(lam) - 1):
        d = model(x, torch.full((x.shape[0],), float(lam[i]), dtype=x.dtype))
        stage = min(max_stage, i + 1)
        if lam[i + 1] == 0:
            x = d
        else:
            ls, lt = lam[i], lam[i + 1]
            r = scaler(lt) / scaler(ls)
            x = r * x + (1 - r) * d
            if stage >= 2:
                dt = lt - ls
                pos = lt + idx * (-dt / 200)
                dd = (d - old_d) / (ls - lam[i - 1])
                x = x + (dt + torch.sum(1 / scaler(pos)) * (-dt / 200) * scaler(lt)) * dd
                if stage >= 3:
                    du = (dd - old_dd) / ((ls - lam[i - 2]) / 2)
                    s_u = torch.sum((pos - ls) / scaler(pos)) * (-dt / 200)
                    x = x + (dt**2 / 2 + s_u * scaler(lt)) * du
                old_dd = dd
            if s_noise > 0:
                x = x + noise(float(ls), float(lt)) * s_noise * (lt**2 - ls**2 * r**2).sqrt()
        old_d = d
    return x


@pytest.mark.parametrize("eta", [0.0, 1.0, 0.5])
def test_res_multistep_is_the_published_algorithm(eta):
    x = start()
    got = K.sample_res_multistep(denoiser, x, SIGMAS, disable=True, eta=eta, noise_sampler=ListNoise(x.shape, 12))
    assert close(got, res_written_out(denoiser, x, SIGMAS, eta, ListNoise(x.shape, 12)))
    if eta == 1.0:
        anc = K.sample_res_multistep_ancestral(denoiser, x, SIGMAS, disable=True, noise_sampler=ListNoise(x.shape, 12))
        assert torch.equal(anc, got)


@pytest.mark.parametrize("max_stage", [1, 2, 3])
@pytest.mark.parametrize("s_noise", [1.0, 0.0])
def test_er_sde_is_the_published_algorithm(max_stage, s_noise):
    x = start()
    got = K.sample_er_sde(denoiser, x, SIGMAS, disable=True, s_noise=s_noise, max_stage=max_stage,
                          noise_sampler=ListNoise(x.shape, 12))
    want = er_written_out(denoiser, x, SIGMAS, ListNoise(x.shape, 12), s_noise, max_stage)
    assert close(got, want)


def test_er_sde_takes_a_tensor_noise_scaler():
    x = start()
    scaler = lambda v: v * ((v**0.3).exp() + 10.0)  # noqa: E731 (the default, as a user would pass it)
    a = K.sample_er_sde(denoiser, x, SIGMAS, disable=True, noise_sampler=ListNoise(x.shape, 12), noise_scaler=scaler)
    b = K.sample_er_sde(denoiser, x, SIGMAS, disable=True, noise_sampler=ListNoise(x.shape, 12))
    assert close(a, b, 1e-14)
    c = K.sample_er_sde(denoiser, x, SIGMAS, disable=True, noise_sampler=ListNoise(x.shape, 12),
                        noise_scaler=lambda v: v)  # N(l) = l: another SDE, other samples
    assert not close(a, c, 1e-3)


def edm_denoiser(target):
    return lambda x, sigma: target.posterior_mean(x, torch.ones_like(sigma.double()), sigma.double()).to(x.dtype)


class GeneratorNoise:
    """A noise_sampler drawing torch.randn(x.shape, generator) in order, as ds.sample draws its noise."""

    def __init__(self, shape, seed):
        self.shape, self.g = shape, torch.Generator().manual_seed(seed)

    def __call__(self, sigma, sigma_next):
        return torch.randn(self.shape, generator=self.g).double()  # float32 draws, as ds.sample makes them


@pytest.mark.parametrize("solver, fn, kw", [("res_multistep", K.sample_res_multistep, {}),
                                            ("res_multistep", K.sample_res_multistep, dict(eta=1.0)),
                                            ("er_sde", K.sample_er_sde, {}),
                                            ("er_sde", K.sample_er_sde, dict(max_stage=2))])
def test_sample_solver_is_the_kdiffusion_function(solver, fn, kw, backend):
    target = GaussianMixture.random(dim=8, modes=3, seed=1)
    sched = ds.schedules.EDM(sigma_min=0.01, sigma_max=20.0)
    dtype = torch.float64 if backend == "reference" else torch.float32  # the fused backends store fp32
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(0), dtype=dtype)
    got = ds.sample(edm_denoiser(target), x, steps=9, solver=solver, schedule=sched, prediction="x0",
                    generator=torch.Generator().manual_seed(4), backend=backend, **kw)
    want = fn(edm_denoiser(target), x.double() * sched.sigmas(9)[0], torch.tensor(sched.sigmas(9), dtype=torch.float64),
              disable=True, noise_sampler=GeneratorNoise(x.shape, 4), **kw)
    assert close(got.double(), want, 1e-10 if dtype == torch.float64 else 1e-5)


def ode_errors(solver, steps, **kw):
    target = GaussianMixture.random(dim=8, modes=3, seed=2)
    sched = ds.schedules.EDM(sigma_min=0.01, sigma_max=20.0)
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = ds.sample(edm_denoiser(target), x, steps=3000, solver="heun", schedule=sched, prediction="x0")
    return [float((ds.sample(edm_denoiser(target), x, steps=n, solver=solver, schedule=sched, prediction="x0",
                             **kw) - ref).norm() / ref.norm()) for n in steps]


def test_res_multistep_is_second_order():
    steps = (40, 80, 160)
    err = ode_errors("res_multistep", steps)
    orders = [math.log(err[k] / err[k + 1]) / math.log(2) for k in range(2)]
    assert all(1.6 < p < 2.6 for p in orders), (err, orders)
    euler = ode_errors("euler", steps)
    assert err[-1] < euler[-1] / 10


def test_er_sde_samples_a_gaussian_with_the_right_moments():
    """One Gaussian (the reverse SDE is linear): ER-SDE's sample mean and covariance approach the exact ones as
    the steps grow (weak convergence), from the same starting draws; with s_noise = 0 they do not (the ER-SDE
    drift needs its noise)."""
    target = GaussianMixture(means=torch.tensor([[1.0, -2.0, 0.5, 0.0]], dtype=torch.float64),
                             stds=torch.tensor([0.3], dtype=torch.float64), weights=torch.ones(1, dtype=torch.float64))
    sched = ds.schedules.EDM(sigma_min=0.005, sigma_max=20.0)
    x = torch.randn(20000, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def moment_error(steps, s_noise):
        out = ds.sample(edm_denoiser(target), x, steps=steps, solver="er_sde", schedule=sched, prediction="x0",
                        s_noise=s_noise, generator=torch.Generator().manual_seed(1))
        mean_err = float((out.mean(0) - target.means[0]).norm())
        std_err = float((out.std(0) - 0.3).abs().max())
        return mean_err + std_err

    errors = [moment_error(n, 1.0) for n in (4, 16)]
    assert errors[1] < 0.03 and errors[1] < errors[0], errors
    assert moment_error(16, 0.0) > 2 * errors[1]


def test_flow_er_sde_converges():
    target = GaussianMixture.random(dim=8, modes=3, seed=3)
    sched = ds.schedules.Flow(shift=3.0)
    velocity = target.flow_model()
    model = lambda x, t: velocity(x, t.double() / 1000)  # noqa: E731 (ds.sample gives flow models 1000 sigma)
    x = torch.randn(4000, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    from diffsampler.targets import sliced_wasserstein
    exact = target.sample(4000, generator=torch.Generator().manual_seed(5))
    floor = sliced_wasserstein(target.sample(4000, generator=torch.Generator().manual_seed(6)), exact)
    w = [sliced_wasserstein(ds.sample(model, x, steps=n, solver="er_sde", schedule=sched, prediction="flow",
                                      generator=torch.Generator().manual_seed(2)), exact) for n in (3, 30)]
    assert w[1] < 2 * floor < w[0], (w, floor)


def test_bad_input():
    x = start()
    with pytest.raises(ValueError, match="max_stage"):
        K.sample_er_sde(denoiser, x, SIGMAS, disable=True, max_stage=4)
    with pytest.raises(ValueError, match="eta"):
        K.sample_res_multistep(denoiser, x, SIGMAS, disable=True, eta=-1.0)
    with pytest.raises(ValueError, match="max_stage"):
        ds.sample(denoiser, x, steps=5, solver="er_sde", schedule=ds.schedules.EDM(), prediction="x0", max_stage=0)
