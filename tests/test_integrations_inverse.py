"""The inversion drop-ins (DDIMInverseScheduler, DPMSolverMultistepInverseScheduler) give diffusers' numbers,
and inverting then sampling with the same solver returns close to the start."""

import warnings

import diffusers
import pytest
import torch

from diffsampler.integrations import diffusers as fused
from test_sample import SD, make_model, max_rel

X = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))


def loop(cls, steps, x=X, **config):
    sched = cls(**{**SD, **config})
    sched.set_timesteps(steps)
    model, x0s = make_model(), []
    for t in sched.timesteps:
        out = sched.step(model(x, t), t, x, return_dict=False)
        x = out[0]
        x0s.append(out[1] if len(out) > 1 else x)
    return x, x0s


@pytest.mark.parametrize("config", [dict(), dict(prediction_type="v_prediction"),
                                    dict(prediction_type="sample", set_alpha_to_one=False), dict(clip_sample=False), dict(timestep_spacing="trailing"),
                                    dict(set_alpha_to_one=False, steps_offset=1)], ids=str)
@pytest.mark.parametrize("steps", [7, 20])
def test_ddim_inverse(config, steps):
    (a, xa), (b, xb) = loop(fused.DDIMInverseScheduler, steps, **config), loop(diffusers.DDIMInverseScheduler,
                                                                                 steps, **config)
    assert max_rel(a, b) <= 1e-5
    # x0 is the model's output on x, which grows to ~100 here: fp32 rounding of x shows up amplified in it
    assert max(max_rel(p, q) for p, q in zip(xa, xb)) <= 5e-5


@pytest.mark.parametrize("config", [dict(), dict(solver_order=3), dict(solver_type="heun"),
                                    dict(use_karras_sigmas=True), dict(prediction_type="v_prediction"),
                                    dict(timestep_spacing="trailing"), dict(lower_order_final=False),
                                    dict(algorithm_type="dpmsolver", solver_order=3)], ids=str)
@pytest.mark.parametrize("steps", [7, 20])
def test_dpmsolver_multistep_inverse(config, steps):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # diffusers deprecates algorithm_type="dpmsolver"
        a, _ = loop(fused.DPMSolverMultistepInverseScheduler, steps, **config)
        b, _ = loop(diffusers.DPMSolverMultistepInverseScheduler, steps, **config)
    assert max_rel(a, b) <= 1e-5


def test_dpmsolver_multistep_inverse_with_repeated_timesteps_dropped():
    """As many steps as training timesteps: diffusers drops the repeated ones and keeps more sigmas than steps
    (its own test_timesteps steps there), the drop-in steps over the sigmas step() reads (the first 10 steps,
    before the grid repeats a sigma, where both divide by zero)."""
    xs = []
    for cls in (fused.DPMSolverMultistepInverseScheduler, diffusers.DPMSolverMultistepInverseScheduler):
        sched = cls(**{**SD, "num_train_timesteps": 25})
        sched.set_timesteps(25)
        x, model = X, make_model()
        for t in sched.timesteps[:10]:
            x = sched.step(model(x, t), t, x).prev_sample
        xs.append(x)
    assert len(sched.sigmas) > len(sched.timesteps) + 1 and max_rel(*xs) <= 1e-5


def test_ddim_inverse_sample_prediction_at_alpha_one_is_refused():
    b, _ = loop(diffusers.DDIMInverseScheduler, 7, prediction_type="sample")
    assert not torch.isfinite(b).all()
    with pytest.raises(ValueError, match="set_alpha_to_one=False"):
        loop(fused.DDIMInverseScheduler, 7, prediction_type="sample")


def test_sde_inversion_is_refused_where_diffusers_returns_nan():
    b, _ = loop(diffusers.DPMSolverMultistepInverseScheduler, 7, algorithm_type="sde-dpmsolver++")
    assert torch.isnan(b).all()
    with pytest.raises(ValueError, match="sqrt\\(1 - e\\^\\(-2h\\)\\)"):
        loop(fused.DPMSolverMultistepInverseScheduler, 7, algorithm_type="sde-dpmsolver++")


def test_inversion_round_trip_converges():
    """Invert a sample to noise with DDIM inversion, sample it back with DDIM: the gap to the start is the two
    first-order discretisations' and shrinks about linearly with the step size."""
    model, x0 = make_model(), X * 0.5

    def round_trip(steps):
        inv = fused.DDIMInverseScheduler(**SD, clip_sample=False)
        inv.set_timesteps(steps)
        x = x0
        for t in inv.timesteps:
            x = inv.step(model(x, t), t, x).prev_sample
        fwd = fused.DDIMScheduler(**SD, clip_sample=False)
        fwd.set_timesteps(steps)
        for t in fwd.timesteps:
            x = fwd.step(model(x, t), t, x).prev_sample
        return max_rel(x, x0)

    gaps = [round_trip(n) for n in (50, 200)]
    assert gaps[1] < gaps[0] / 3, gaps


def test_accelerate_picks_them():
    assert fused.FUSED["DDIMInverseScheduler"] is fused.DDIMInverseScheduler
    assert fused.FUSED["DPMSolverMultistepInverseScheduler"] is fused.DPMSolverMultistepInverseScheduler
