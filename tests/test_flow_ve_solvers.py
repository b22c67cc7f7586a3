"""The VE-scale ODE solvers on Flow schedules (ComfyUI's CONST sampling): on x = (1 - t) x0 + t eps the flow
ODE is dx/dt = v = (x - D) / t with D = x - t v, the VE scale's equation with sigma = t, so `lms`, `dpm_2` and
`res_multistep` run their VE steps on the flow sigmas. Checked against the k-diffusion functions on the CONST
denoiser (float64, same model times), the empirical convergence order on an exact Gaussian-mixture flow, and
bad input."""

import math

import pytest
import torch

import diffsampler as ds
from diffsampler.integrations import kdiffusion as K
from diffsampler.schedules import Flow
from diffsampler.targets import GaussianMixture

GM = GaussianMixture.random(dim=4, modes=3)
VELOCITY = GM.flow_model()


def model(x, t):  # the flow model as ds.sample calls it: t in training timesteps
    return VELOCITY(x, t / 1000)


def const_denoiser(x, sigma, **kwargs):
    """ComfyUI's CONST model: D = x - sigma v, v called at the float32 model time the sampler gives."""
    t = (sigma.float() * 1000.0).double()
    return x - sigma.to(x).reshape(-1, *[1] * (x.dim() - 1)) * model(x, t)


SOLVERS = {"lms": K.sample_lms, "dpm_2": K.sample_dpm_2, "res_multistep": K.sample_res_multistep}


def _start(n=64, seed=0):
    return torch.randn(n, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("solver", SOLVERS)
def test_flow_form_is_the_kdiffusion_function_on_the_const_denoiser(solver, shift):
    sch = Flow(shift=shift)
    z = _start()
    got = ds.sample(model, z, 10, solver=solver, schedule=sch, backend="reference")
    want = SOLVERS[solver](const_denoiser, z.clone(), torch.tensor(sch.sigmas(10), dtype=torch.float64),
                           disable=True)
    assert (got - want).abs().max() < 1e-12


@pytest.mark.parametrize("solver,order", [("lms", 3.0), ("dpm_2", 1.8), ("res_multistep", 1.8)])
def test_flow_form_converges_at_its_order(solver, order):
    """Error against a 4000-step LMS solution from the same x_T, 80 -> 160 steps (the asymptotic range: RES's
    step-size ratio estimate makes it first order before it)."""
    sch = Flow(shift=1.0)
    z = _start(256)
    ref = ds.sample(model, z, 4000, solver="lms", schedule=sch, backend="reference")
    err = [(ds.sample(model, z, n, solver=solver, schedule=sch, backend="reference") - ref).norm(dim=1).mean()
           for n in (80, 160)]
    assert math.log2(err[0] / err[1]) > order, err


def test_flow_forms_refuse_other_predictions_and_res_ancestral():
    z = _start(4)
    with pytest.raises(ValueError, match="prediction 'flow' .* on a Flow schedule"):
        ds.sample(model, z, 5, solver="lms", schedule=Flow(), prediction="eps")
    with pytest.raises(ValueError, match="prediction 'flow' .* on a Flow schedule"):
        ds.sample(model, z, 5, solver="dpm_2", schedule=ds.schedules.EDM(), prediction="flow")
    with pytest.raises(ValueError, match="has no flow .CONST. form"):
        ds.sample(model, z, 5, solver="res_multistep", schedule=Flow(), eta=1.0)
