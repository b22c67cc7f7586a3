"""Drop-in diffusers schedulers whose step() is the fused multistep update.

Each class subclasses diffusers' own (same config, `from_config(pipe.scheduler.config)`, same
`set_timesteps` / `scale_model_input` / `add_noise`) and replaces `step()`: the per-step coefficients come
from diffsampler's solver math (float64, on the host) over the scheduler's own timesteps and sigmas, and the
tensor work is one `diffsampler.ops.multistep_update` call. The results equal diffusers' (fp32 max relative
difference <= 1e-5 over full loops, `tests/test_integrations_diffusers.py`).

`accelerate(pipe)` swaps a pipeline's scheduler for the fused equivalent and says which it chose;
`accelerate(pipe, cuda_graph=True)` also replays the denoiser from a CUDA graph.
"""

from __future__ import annotations

import inspect
import math
import warnings

import diffusers
import torch
from diffusers.schedulers.scheduling_utils import SchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from .. import checks, ops
from ..graphs import CapturedForward
from ..lml import correction_weights, mixing
from ..noise import BrownianTreeNoiseSampler
from ..solvers.ancestral import dpm2_coeffs
from ..solvers.consistency import lcm_coeffs, tcd_coeffs, tcd_inner_timestep
from ..solvers.ddim import ddim_coeffs
from ..solvers.ddpm import ddpm_coeffs, fixed_std, posterior_variance
from ..solvers.deis import deis_steps
from ..solvers.dpm import dpm_steps, singlestep_steps
from ..solvers.euler import flow_euler_coeffs
from ..solvers.grid import Grid
from ..solvers.lms import MAX_ORDER as LMS_MAX_ORDER, lms_step
from ..solvers.sa_solver import sa_steps
from ..solvers.pndm import ADAMS_BASHFORTH, RING, ipndm_coeffs, pndm_call, pndm_coeffs
from ..solvers.unipc import unipc_steps
from ..solvers.ve import (ancestral_split, churn, dpmpp_sde_coeffs, edm_data_coeffs, euler_coeffs, heun_coeffs,
                          ve_data_coeffs)

# the config keys that shape a multistep scheduler's grid (named by the error of a step that divides by zero)
GRID_CONFIG = ("num_train_timesteps", "timestep_spacing", "steps_offset", "use_karras_sigmas", "use_exponential_sigmas",
               "use_beta_sigmas", "use_lu_sigmas", "final_sigmas_type", "solver_order", "lower_order_final")
PREDICTIONS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v", "flow_prediction": "flow"}


def _fused_step(x, model_output, coeffs, **kwargs):
    """ops.multistep_update as a step() runs it: without the NaN scan (diffusers' step() has none, and its
    reduction would make every step wait for the device)."""
    return ops.multistep_update(x, model_output, coeffs, check_nan=False, **kwargs)


def _prediction(config) -> str:
    if config.prediction_type not in PREDICTIONS:
        raise ValueError(f"prediction_type {config.prediction_type!r} is not supported; "
                         f"expected one of {sorted(PREDICTIONS)}")
    return PREDICTIONS[config.prediction_type]


def _threshold_kwargs(config) -> dict:
    if getattr(config, "thresholding", False):
        return dict(threshold_ratio=config.dynamic_thresholding_ratio, threshold_max=config.sample_max_value)
    return {}


def _same_dtype(model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
    """diffusers returns the model output's dtype; the fused op takes one dtype for all operands."""
    return sample if sample.dtype == model_output.dtype else sample.to(model_output.dtype)


class _MultistepMixin:
    """step() over a Plan built from the scheduler's own grid, from the step it starts at (img2img starts
    late: the warm-up orders count from there, as diffusers' lower_order_nums does)."""

    def set_timesteps(self, *args, **kwargs):
        super().set_timesteps(*args, **kwargs)
        self._fused_plan = self._fused_history = self._fused_state = None

    def _lml_args(self, step, sample, model_output) -> dict:
        return {}

    def _noised_step(self, model_output, timestep, sample, generator, return_dict):
        """The fused step with diffusers' randn_tensor noise (the output's dtype) for algorithm_type
        "sde-dpmsolver++", as a SchedulerOutput or a tuple."""
        noise = None
        if self.config.algorithm_type == "sde-dpmsolver++":
            noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                 dtype=model_output.dtype)
        prev = self._fused_step(model_output, timestep, sample, noise)
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    def _threshold_args(self) -> dict:
        return _threshold_kwargs(self.config)

    def _undefined_step(self, step) -> ValueError:
        """The error of a step whose update divides by zero (diffusers' own step() returns NaN there)."""
        c = self.config
        config = ", ".join(f"{k}={c[k]!r}" for k in GRID_CONFIG if k in c)
        return ValueError(f"{type(self).__name__}.step() at step {self.step_index}: {step.undefined}; diffusers' "
                          f"formula divides by zero there as well (NaN). The grid of num_inference_steps="
                          f"{self.num_inference_steps} with {config} repeats a sigma: use fewer steps or another "
                          f"timestep_spacing")

    _ve = False  # the scheduler's sigmas are VE noise levels, alpha = 1 (EDM's schedulers)

    def _grid(self) -> Grid:
        """The scheduler's grid: its timesteps and the sigmas its step() reads (sigmas[i], sigmas[i + 1]; the
        inverse scheduler keeps more sigmas than that where it drops repeated timesteps)."""
        flow = bool(getattr(self.config, "use_flow_sigmas", False))
        sigmas = self.sigmas.double().tolist()[:len(self.timesteps) + 1]
        return Grid(timesteps=tuple(self.timesteps.tolist()), sigmas=tuple(sigmas), flow=flow, ve=self._ve,
                    discrete=not self._ve)

    def _fused_step(self, model_output, timestep, sample, noise=None):
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after "
                             "creating the scheduler")
        if self.step_index is None:
            self._init_step_index(timestep)
        if self._fused_plan is None:
            self._fused_plan = self._build_plan(start=self.step_index)
        plan = self._fused_plan
        step = plan.steps[self.step_index]
        if step.undefined:
            raise self._undefined_step(step)
        sample = _same_dtype(model_output, sample)
        if self._fused_history is None and plan.history_slots:
            self._fused_history = sample.new_empty((plan.history_slots, *sample.shape))
        if self._fused_state is None and plan.uses_state:
            self._fused_state = torch.zeros_like(sample)
        if step.needs_noise and noise is not None:
            noise = noise.to(device=sample.device, dtype=sample.dtype)
        prev = _fused_step(sample, model_output, step.coeffs, history=self._fused_history,
                                    write_slot=step.write_slot, read_slots=step.read_slots,
                                    noise=noise if step.needs_noise else None, state=self._fused_state,
                                    **self._threshold_args(), **self._lml_args(step, sample, model_output))
        self._step_index += 1
        return prev


class _DPMSolverMultistep(_MultistepMixin):
    """step() of the DPM-Solver multistep schedulers; the inverse one (data to noise) forces no lower order at
    its last step and refuses the SDE algorithms (diffusers' inverse SDE step takes sqrt(1 - e^{-2h}) with
    h < 0 and returns NaN, or fails an assertion at third order)."""

    _inverse = False

    def _build_plan(self, start: int):
        c = self.config
        return dpm_steps(self._grid(), _prediction(c), algorithm=c.algorithm_type, order=c.solver_order,
                         solver_type=c.solver_type, lower_order_final=c.lower_order_final,
                         euler_at_final=c.euler_at_final,
                         final_sigma_zero=not self._inverse and c.final_sigmas_type == "zero", start=start,
                         phi3="diffusers")

    def step(self, model_output, timestep, sample, generator=None, variance_noise=None, return_dict=True):
        c = self.config
        sde = c.algorithm_type.startswith("sde")
        if self._inverse and sde:
            raise ValueError(f"{type(self).__name__}: algorithm_type={c.algorithm_type!r} is not supported: an SDE "
                             f"step from data to noise has noise weight sqrt(1 - e^(-2h)) with h < 0 (diffusers' "
                             f"step() returns NaN there); use 'dpmsolver++' or 'dpmsolver'")
        if c.variance_type in ("learned", "learned_range") and c.prediction_type == "epsilon":
            model_output = model_output[:, :3]
        noise = None
        if sde:
            noise = variance_noise if variance_noise is not None else randn_tensor(
                model_output.shape, generator=generator, device=model_output.device,
                dtype=torch.float32)
        prev = self._fused_step(model_output, timestep, sample, noise)
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)


class DPMSolverMultistepScheduler(_DPMSolverMultistep, diffusers.DPMSolverMultistepScheduler):
    """diffusers' DPMSolverMultistepScheduler (all algorithm types, orders 1-3, midpoint / heun, every sigma
    spacing and final sigma) with the fused update."""


class DPMSolverMultistepInverseScheduler(_DPMSolverMultistep, diffusers.DPMSolverMultistepInverseScheduler):
    """diffusers' DPMSolverMultistepInverseScheduler (inversion for editing: the same solver from data to noise
    over its ascending grid) with the fused update."""

    _inverse = True


class _EDMDPMSolver(_MultistepMixin):
    """step() of diffusers' EDM-preconditioned DPM-Solver++ schedulers: DPM-Solver++ over a VE Grid (alpha = 1,
    sigma_t = sigma) on the data prediction x0 = c_skip x + c_out out (solvers.ve.edm_data_coeffs)."""

    _ve = True

    def _algorithm(self) -> str:
        return self.config.algorithm_type

    def _build_plan(self, start: int):
        c, algorithm = self.config, self._algorithm()
        if algorithm == "sde-dpmsolver++" and c.solver_order == 3:
            raise ValueError(f"{type(self).__name__}: solver_order=3 with algorithm_type='sde-dpmsolver++' has no "
                             f"third-order update (diffusers' step() fails there); use solver_order <= 2")
        return dpm_steps(self._grid(), "x0", algorithm=algorithm, order=c.solver_order, solver_type=c.solver_type,
                         lower_order_final=c.lower_order_final, euler_at_final=c.euler_at_final,
                         final_sigma_zero=c.final_sigmas_type == "zero", start=start, phi3="diffusers",
                         precondition=lambda sigma: edm_data_coeffs(c.prediction_type, sigma, c.sigma_data))


class EDMDPMSolverMultistepScheduler(_EDMDPMSolver, diffusers.EDMDPMSolverMultistepScheduler):
    """diffusers' EDMDPMSolverMultistepScheduler (karras / exponential sigmas, eps / v, orders 1-3, midpoint /
    heun, dpmsolver++ and sde-dpmsolver++ up to order 2, both final sigmas, thresholding) with the fused update."""

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        return self._noised_step(model_output, timestep, sample, generator, return_dict)


class CosineDPMSolverMultistepScheduler(_EDMDPMSolver, diffusers.CosineDPMSolverMultistepScheduler):
    """diffusers' CosineDPMSolverMultistepScheduler (Stable Audio: SDE-DPM-Solver++ orders 1-2 on EDM's
    preconditioning, the model given atan(sigma) 2 / pi) with the fused update; its Brownian-tree noise is
    diffusers' draws (diffsampler.noise.BrownianTreeNoiseSampler seeded by the generator, queried at the same
    sigmas). Needs torchsde. final_sigmas_type="sigma_min" is refused (diffusers' step() fails there)."""

    def _algorithm(self) -> str:
        return "sde-dpmsolver++"

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        if self.config.final_sigmas_type == "sigma_min":
            raise ValueError(f"{type(self).__name__}: final_sigmas_type='sigma_min' is not supported: the last step "
                             f"queries the Brownian tree below its sigma_min (diffusers' step() recurses without end "
                             f"in torchsde there); use final_sigmas_type='zero'")
        if self.step_index is None:
            self._init_step_index(timestep)
        if self.noise_sampler is None:
            seed = None if generator is None else [g.initial_seed() for g in generator] \
                if isinstance(generator, list) else generator.initial_seed()
            self.noise_sampler = BrownianTreeNoiseSampler(model_output, self.config.sigma_min, self.config.sigma_max,
                                                          seed)
        noise = self.noise_sampler(self.sigmas[self.step_index], self.sigmas[self.step_index + 1])
        prev = self._fused_step(model_output, timestep, sample, noise)
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)


class DPMSolverSinglestepScheduler(_MultistepMixin, diffusers.DPMSolverSinglestepScheduler):
    """diffusers' DPMSolverSinglestepScheduler (orders 1-3, midpoint / heun, dpmsolver(++) and SDE) with the
    fused update; a macro step's start sample is the fused op's state."""

    def _build_plan(self, start: int):
        c = self.config
        return singlestep_steps(self._grid(), _prediction(c), self.order_list, algorithm=c.algorithm_type,
                                solver_type=c.solver_type, start=start)

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        if self.config.variance_type in ("learned", "learned_range") and self.config.prediction_type == "epsilon":
            model_output = model_output[:, :3]
        return self._noised_step(model_output, timestep, sample, generator, return_dict)


class UniPCMultistepScheduler(_MultistepMixin, diffusers.UniPCMultistepScheduler):
    """diffusers' UniPCMultistepScheduler (bh1 / bh2, orders 1-3, predict_x0 or not, disable_corrector) with the
    predictor and the corrector in one fused call per step. A `solver_p` scheduler runs diffusers' own step."""

    def _build_plan(self, start: int):
        c = self.config
        return unipc_steps(self._grid(), _prediction(c), order=c.solver_order, solver_type=c.solver_type,
                           predict_x0=c.predict_x0, disable_corrector=tuple(c.disable_corrector),
                           lower_order_final=c.lower_order_final, start=start)

    def step(self, model_output, timestep, sample, return_dict=True):
        if self.solver_p is not None:
            warnings.warn("diffsampler UniPCMultistepScheduler: solver_p is set, running diffusers' own step()")
            return super().step(model_output, timestep, sample, return_dict=return_dict)
        prev = self._fused_step(model_output, timestep, sample)
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    def _threshold_args(self) -> dict:
        """diffusers thresholds UniPC's data prediction only with predict_x0; its noise-prediction mode ignores
        thresholding=True."""
        return _threshold_kwargs(self.config) if self.config.predict_x0 else {}


class DEISMultistepScheduler(_MultistepMixin, diffusers.DEISMultistepScheduler):
    """diffusers' DEISMultistepScheduler (log-rho, orders 1-3) with the fused update."""

    def _build_plan(self, start: int):
        c = self.config
        return deis_steps(self._grid(), _prediction(c), order=c.solver_order, lower_order_final=c.lower_order_final,
                          start=start)

    def step(self, model_output, timestep, sample, return_dict=True):
        prev = self._fused_step(model_output, timestep, sample)
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)


class SASolverScheduler(_MultistepMixin, diffusers.SASolverScheduler):
    """diffusers' SASolverScheduler (predictor / corrector orders 1-4, tau_func, data_prediction /
    noise_prediction, every sigma spacing) with the predictor and the corrector in one fused call per step
    (solvers.sa_solver). Thresholding acts on x0 with noise_prediction too (diffusers' step() fails there)."""

    def _build_plan(self, start: int):
        c = self.config
        prediction = _prediction(c)
        if c.algorithm_type == "noise_prediction" and prediction == "flow":
            raise ValueError("prediction_type 'flow_prediction' needs algorithm_type='data_prediction'")
        taus = [float(self.tau_func(t)) for t in self.timesteps]
        return sa_steps(self._grid(), prediction, tau=taus, predictor_order=c.predictor_order,
                        corrector_order=c.corrector_order, predict_x0=self.predict_x0,
                        lower_order_final=c.lower_order_final, start=start)

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        c = self.config
        if c.variance_type in ("learned", "learned_range") and c.prediction_type == "epsilon":
            model_output = model_output[:, :3]
        noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                             dtype=model_output.dtype)
        prev = self._fused_step(model_output, timestep, sample, noise)
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)


def _with_prediction(sample, model_output, coeffs, noise=None, **kwargs):
    """x' and the data prediction m0 (written into a fresh one-slot history: schedulers that return
    pred_original_sample hand it to the caller)."""
    m0 = sample.new_empty((1, *sample.shape))
    prev = _fused_step(sample, model_output, coeffs, history=m0, noise=noise, **kwargs)
    return prev, m0[0]


class DDIMScheduler(diffusers.DDIMScheduler):
    """diffusers' DDIMScheduler (eta, clip_sample, thresholding, use_clipped_model_output) with the fused update."""

    def _lml_args(self, t, sample, model_output, coeffs, eps, direction, clip) -> dict:
        return {}

    def step(self, model_output, timestep, sample, eta=0.0, use_clipped_model_output=False, generator=None,
             variance_noise=None, return_dict=True):
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after "
                             "creating the scheduler")
        c = self.config
        t = int(timestep)
        prev_t = t - c.num_train_timesteps // self.num_inference_steps
        ab_t = float(self.alphas_cumprod[t])
        ab_prev = float(self.alphas_cumprod[prev_t]) if prev_t >= 0 else float(self.final_alpha_cumprod)
        std = eta * math.sqrt(float(self._get_variance(t, prev_t)))
        coeffs, direction = ddim_coeffs(_prediction(c), ab_t, ab_prev, std, clipped_eps=use_clipped_model_output)
        noise = None
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError("Cannot pass both generator and variance_noise. Please make sure that either "
                                 "`generator` or `variance_noise` stays `None`.")
            noise = variance_noise if variance_noise is not None else randn_tensor(
                model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype)
            noise = noise.to(model_output.dtype)
        clip = c.clip_sample_range if c.clip_sample and not c.thresholding else None
        # the noise prediction as a row over (x, out, m0), entering x' as `direction.scale` * eps (LML's direction d)
        eps = (direction.x, direction.out, *direction.b)
        sample = _same_dtype(model_output, sample)
        lml = self._lml_args(t, sample, model_output, coeffs, eps, direction.scale, clip)
        prev, x0 = _with_prediction(sample, model_output, coeffs, noise=noise if std != 0 else None, clip=clip,
                                    **_threshold_kwargs(c), **lml)
        if not return_dict:
            return prev, x0
        return diffusers.schedulers.scheduling_ddim.DDIMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)


def _vp_prediction(config, name: str) -> str:
    """The prediction of a VP scheduler that takes epsilon, sample or v_prediction only."""
    pred = _prediction(config)
    if pred not in ("eps", "x0", "v"):
        raise ValueError(f"prediction_type given as {config.prediction_type} must be one of `epsilon`, `sample` or "
                         f"`v_prediction` for {name}")
    return pred


def _clip(config):
    return config.clip_sample_range if config.clip_sample and not config.thresholding else None


class DDPMScheduler(diffusers.DDPMScheduler):
    """diffusers' DDPMScheduler (every variance type but fixed_large_log, clip_sample, thresholding) with the
    fused update (solvers.ddpm). The learned variance types form their per-element noise std from the model's
    variance channels before the fused call; fixed_large_log is refused: diffusers' step() takes the square
    root of log(beta_t) < 0 there and returns NaN."""

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        c = self.config
        if self.variance_type == "fixed_large_log":
            raise ValueError("DDPMScheduler: variance_type='fixed_large_log' is not supported: diffusers' step() "
                             "takes the square root of log(beta_t) < 0 and returns NaN; use 'fixed_large'")
        t = int(timestep)
        prev_t = int(self.previous_timestep(t))
        learned = self.variance_type in ("learned", "learned_range")
        predicted_variance = None
        if learned and model_output.shape[1] == sample.shape[1] * 2:
            model_output, predicted_variance = torch.split(model_output, sample.shape[1], dim=1)
        ab_t = float(self.alphas_cumprod[t])
        ab_prev = float(self.alphas_cumprod[prev_t]) if prev_t >= 0 else float(self.one)
        noise, std = None, 0.0
        if t > 0:
            noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                 dtype=model_output.dtype)
            if learned:
                if predicted_variance is None:
                    raise ValueError(f"DDPMScheduler: variance_type={self.variance_type!r} needs a model output with "
                                     f"2 * {sample.shape[1]} channels (the variance after the prediction), got "
                                     f"{model_output.shape[1]}")
                noise, std = self._learned_std(predicted_variance, ab_t, ab_prev) * noise, 1.0
            else:
                std = fixed_std(self.variance_type, ab_t, ab_prev)
        coeffs = ddpm_coeffs(_vp_prediction(c, "the DDPMScheduler"), ab_t, ab_prev, std)
        prev, x0 = _with_prediction(_same_dtype(model_output, sample), model_output, coeffs, noise=noise,
                                    clip=_clip(c), **_threshold_kwargs(c))
        if not return_dict:
            return prev, x0
        return diffusers.schedulers.scheduling_ddpm.DDPMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    def _learned_std(self, v, ab_t: float, ab_prev: float) -> torch.Tensor:
        """The per-element noise std of the learned variance types (solvers.ddpm)."""
        if self.variance_type == "learned":
            return v**0.5
        tilde, beta = posterior_variance(ab_t, ab_prev)
        frac = (v + 1) / 2
        return torch.exp(0.5 * (frac * math.log(beta) + (1 - frac) * math.log(tilde)))


class LCMScheduler(diffusers.LCMScheduler):
    """diffusers' LCMScheduler (eps / sample / v, clip_sample, thresholding, custom timesteps, strength) with
    the fused update (solvers.consistency.lcm_coeffs): one call gives prev_sample and `denoised`."""

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after "
                             "creating the scheduler")
        if self.step_index is None:
            self._init_step_index(timestep)
        c, i, t = self.config, self.step_index, int(timestep)
        prev_t = int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else t
        ab_prev = float(self.alphas_cumprod[prev_t]) if prev_t >= 0 else float(self.final_alpha_cumprod)
        last = i == self.num_inference_steps - 1
        coeffs = lcm_coeffs(_vp_prediction(c, "`LCMScheduler`"), float(self.alphas_cumprod[t]), ab_prev, t,
                            c.timestep_scaling, last)
        sample = _same_dtype(model_output, sample)
        noise = None if last else randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                               dtype=model_output.dtype)
        denoised = torch.zeros_like(sample)
        prev = _fused_step(sample, model_output, coeffs, noise=noise, state=denoised, clip=_clip(c),
                                    **_threshold_kwargs(c))
        self._step_index += 1
        if not return_dict:
            return prev, denoised
        return diffusers.schedulers.scheduling_lcm.LCMSchedulerOutput(prev_sample=prev, denoised=denoised)


class TCDScheduler(diffusers.TCDScheduler):
    """diffusers' TCDScheduler (eps / sample / v, gamma as step()'s eta, custom timesteps, strength) with the
    fused update (solvers.consistency.tcd_coeffs): one call gives prev_sample and `pred_noised_sample`. Like
    diffusers' step(), it neither clips nor thresholds."""

    def step(self, model_output, timestep, sample, eta=0.3, generator=None, return_dict=True):
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after "
                             "creating the scheduler")
        if not 0 <= eta <= 1:
            raise ValueError(f"TCDScheduler.step: eta (TCD's gamma) must be in [0, 1], got {eta}")
        if self.step_index is None:
            self._init_step_index(timestep)
        i, t = self.step_index, int(timestep)
        prev_t = int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else 0
        s = tcd_inner_timestep(prev_t, eta)
        last = i == self.num_inference_steps - 1
        ab_prev = float(self.alphas_cumprod[prev_t]) if prev_t >= 0 else float(self.final_alpha_cumprod)
        coeffs = tcd_coeffs(_vp_prediction(self.config, "`TCDScheduler`"), float(self.alphas_cumprod[t]), ab_prev,
                            float(self.alphas_cumprod[s]), eta, last)
        sample = _same_dtype(model_output, sample)
        noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                             dtype=model_output.dtype) if coeffs.c else None
        noised = torch.zeros_like(sample)
        prev = _fused_step(sample, model_output, coeffs, noise=noise, state=noised)
        self._step_index += 1
        if not return_dict:
            return prev, noised
        return diffusers.schedulers.scheduling_tcd.TCDSchedulerOutput(prev_sample=prev, pred_noised_sample=noised)


class DDIMInverseScheduler(diffusers.DDIMInverseScheduler):
    """diffusers' DDIMInverseScheduler (DDIM inversion for editing: x0 and eps at t, then the deterministic DDIM
    map to the next, noisier timestep; clip_sample) with the fused update."""

    def step(self, model_output, timestep, sample, return_dict=True):
        c = self.config
        prev_t = int(timestep)
        t = min(prev_t - c.num_train_timesteps // self.num_inference_steps, c.num_train_timesteps - 1)
        ab_t = float(self.alphas_cumprod[t]) if t >= 0 else float(self.initial_alpha_cumprod)
        pred = _vp_prediction(c, "the DDIMInverseScheduler")
        if pred == "x0" and ab_t == 1:
            raise ValueError("DDIMInverseScheduler: prediction_type='sample' at alpha_bar = 1 (the first step with "
                             "set_alpha_to_one=True) gives eps = (x - x0) / 0 (diffusers returns inf / NaN); use "
                             "set_alpha_to_one=False")
        coeffs, _ = ddim_coeffs(pred, ab_t,
                                float(self.alphas_cumprod[prev_t]), 0.0)
        clip = c.clip_sample_range if c.clip_sample else None
        prev, x0 = _with_prediction(_same_dtype(model_output, sample), model_output, coeffs, clip=clip)
        if not return_dict:
            return prev, x0
        return diffusers.schedulers.scheduling_ddim.DDIMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)


def _churned_start(sched, timestep, model_output, sample, s_churn, s_tmin, s_tmax, s_noise, generator):
    """(sample, sigma, sigma_hat) at the start of an Euler-type step: diffusers' integer-index check, the step
    index, and Karras' churn (noise added before the conversion, a separate pass, as in diffusers)."""
    if isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)):
        raise ValueError(f"Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to "
                         f"`{type(sched).__bases__[-1].__name__}.step()` is not supported. Make sure to pass one of "
                         f"the `scheduler.timesteps` as a timestep.")
    if sched.step_index is None:
        sched._init_step_index(timestep)
    sigma = float(sched.sigmas[sched.step_index])
    sigma_hat, weight = churn(sigma, len(sched.sigmas) - 1, s_churn, s_tmin, s_tmax, s_noise)
    sample = _same_dtype(model_output, sample)
    if weight:
        sample = sample + randn_tensor(model_output.shape, dtype=model_output.dtype, device=model_output.device,
                                       generator=generator) * weight
    return sample, sigma, sigma_hat


class EulerDiscreteScheduler(diffusers.EulerDiscreteScheduler):
    """diffusers' EulerDiscreteScheduler (eps / x0 / v, every sigma spacing, s_churn) with the fused update."""

    def step(self, model_output, timestep, sample, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0,
             generator=None, return_dict=True):
        sample, sigma, sigma_hat = _churned_start(self, timestep, model_output, sample, s_churn, s_tmin, s_tmax,
                                                  s_noise, generator)
        pred = _prediction(self.config)
        if pred not in ("eps", "x0", "v"):
            raise ValueError(f"prediction_type {self.config.prediction_type!r} is not supported by Euler")
        # diffusers converts eps at sigma_hat and v at sigma
        p, q = ve_data_coeffs(pred, sigma_hat if pred == "eps" else sigma)
        coeffs = euler_coeffs(p, q, sigma_hat, float(self.sigmas[self.step_index + 1]))
        prev, x0 = _with_prediction(sample, model_output, coeffs)
        self._step_index += 1
        if not return_dict:
            return prev, x0
        return diffusers.schedulers.scheduling_euler_discrete.EulerDiscreteSchedulerOutput(
            prev_sample=prev, pred_original_sample=x0)


class FlowMatchEulerDiscreteScheduler(diffusers.FlowMatchEulerDiscreteScheduler):
    """diffusers' FlowMatchEulerDiscreteScheduler (shift, dynamic shifting, stochastic_sampling) with the fused
    update; per-token timesteps run diffusers' own step()."""

    def step(self, model_output, timestep, sample, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0,
             generator=None, per_token_timesteps=None, return_dict=True):
        if per_token_timesteps is not None:
            return super().step(model_output, timestep, sample, s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax,
                                s_noise=s_noise, generator=generator, per_token_timesteps=per_token_timesteps,
                                return_dict=return_dict)
        if isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)):
            raise ValueError("Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to "
                             "`FlowMatchEulerDiscreteScheduler.step()` is not supported. Make sure to pass one of "
                             "the `scheduler.timesteps` as a timestep.")
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma, sigma_next = float(self.sigmas[self.step_index]), float(self.sigmas[self.step_index + 1])
        sample = _same_dtype(model_output, sample)
        noise = None
        if self.config.stochastic_sampling:
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
        coeffs = flow_euler_coeffs(sigma, sigma_next, stochastic=self.config.stochastic_sampling)
        prev = _fused_step(sample, model_output, coeffs, noise=noise)
        self._step_index += 1
        if not return_dict:
            return (prev,)
        return diffusers.schedulers.scheduling_flow_match_euler_discrete.FlowMatchEulerDiscreteSchedulerOutput(
            prev_sample=prev)


class LMSDiscreteScheduler(diffusers.LMSDiscreteScheduler):
    """diffusers' LMSDiscreteScheduler (eps / x0 / v, every sigma spacing, step orders 1-4) with the fused
    update (solvers.lms): the derivatives list is a ring of 4 history slots. A step of order > 4 runs
    diffusers' own step()."""

    def set_timesteps(self, *args, **kwargs):
        super().set_timesteps(*args, **kwargs)
        self._fused_history, self._fused_taken = None, 0
        self._fused_sigmas = tuple(self.sigmas.double().tolist())

    def step(self, model_output, timestep, sample, order=4, return_dict=True):
        order = checks.integer("order", order, 1)
        if order > LMS_MAX_ORDER:
            warnings.warn(f"diffsampler LMSDiscreteScheduler: order {order} > {LMS_MAX_ORDER} (the fused op's "
                          f"history reads), running diffusers' own step()")
            return super().step(model_output, timestep, sample, order=order, return_dict=return_dict)
        if not self.is_scale_input_called:
            warnings.warn("The `scale_model_input` function should be called before `step` to ensure correct "
                          "denoising. See `StableDiffusionPipeline` for a usage example.")
        if self.step_index is None:
            self._init_step_index(timestep)
        i, sigma = self.step_index, self._fused_sigmas[self.step_index]
        p, q = ve_data_coeffs(_prediction(self.config), sigma)
        coeffs, write, reads = lms_step(self._fused_sigmas, i, _prediction(self.config), order, self._fused_taken)
        sample = _same_dtype(model_output, sample)
        if self._fused_history is None:
            self._fused_history = sample.new_empty((LMS_MAX_ORDER, *sample.shape))
        prev = _fused_step(sample, model_output, coeffs, history=self._fused_history, write_slot=write,
                                    read_slots=reads)
        x0 = sample * p + model_output * q
        self._fused_taken += 1
        self._step_index += 1
        if not return_dict:
            return prev, x0
        return diffusers.schedulers.scheduling_lms_discrete.LMSDiscreteSchedulerOutput(prev_sample=prev,
                                                                                       pred_original_sample=x0)


class PNDMScheduler(diffusers.PNDMScheduler):
    """diffusers' PNDMScheduler (PLMS with skip_prk_steps, else the PRK warm-up; epsilon / v_prediction) with the
    fused update (solvers.pndm): the stored outputs are a ring of history slots, the kept start the state."""

    def set_timesteps(self, *args, **kwargs):
        super().set_timesteps(*args, **kwargs)
        self._fused_history = self._fused_state = None
        self._fused_stored = 0

    def step(self, model_output, timestep, sample, return_dict=True):
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after creating "
                             "the scheduler")
        c = self.config
        prediction = {"epsilon": "eps", "v_prediction": "v"}.get(c.prediction_type)
        if prediction is None:
            raise ValueError(f"prediction_type given as {c.prediction_type} must be one of `epsilon` or "
                             f"`v_prediction`")
        prk = not c.skip_prk_steps and self.counter < len(self.prk_timesteps)
        if not c.skip_prk_steps and not prk and self._fused_stored < 3:
            raise ValueError(f"{self.__class__} can only be run AFTER scheduler has been run in 'prk' mode for at "
                             f"least 12 iterations")
        call = pndm_call(self.counter, int(timestep), c.num_train_timesteps // self.num_inference_steps,
                         self._fused_stored, bool(c.skip_prk_steps), self.prk_timesteps)
        ab = self.alphas_cumprod
        ab_prev = float(ab[call.t_prev]) if call.t_prev >= 0 else float(self.final_alpha_cumprod)
        coeffs = pndm_coeffs(prediction, float(ab[call.t]), ab_prev, call)
        sample = _same_dtype(model_output, sample)
        if self._fused_history is None:
            self._fused_history = sample.new_empty((RING + (0 if c.skip_prk_steps else 2), *sample.shape))
            self._fused_state = torch.zeros_like(sample)
        prev = _fused_step(sample, model_output, coeffs, history=self._fused_history,
                                    write_slot=call.write_slot, read_slots=call.read_slots, state=self._fused_state)
        self._fused_stored = call.stored
        self.counter += 1
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)


class IPNDMScheduler(diffusers.IPNDMScheduler):
    """diffusers' IPNDMScheduler with the fused update (solvers.pndm.ipndm_coeffs): its `ets` are a ring of 4
    history slots, Adams-Bashforth over the ones stored since set_timesteps."""

    def set_timesteps(self, *args, **kwargs):
        super().set_timesteps(*args, **kwargs)
        self._fused_history, self._fused_stored = None, 0

    def step(self, model_output, timestep, sample, return_dict=True):
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after creating "
                             "the scheduler")
        if self.step_index is None:
            self._init_step_index(timestep)
        i, n = self.step_index, min(self._fused_stored + 1, RING)
        coeffs = ipndm_coeffs(float(self.alphas[i]), float(self.betas[i]), float(self.alphas[i + 1]),
                              float(self.betas[i + 1]), ADAMS_BASHFORTH[n - 1])
        sample = _same_dtype(model_output, sample)
        if self._fused_history is None:
            self._fused_history = sample.new_empty((RING, *sample.shape))
        stored = self._fused_stored
        prev = _fused_step(sample, model_output, coeffs, history=self._fused_history,
                                    write_slot=stored % RING, read_slots=[(stored - j) % RING for j in range(1, n)])
        self._fused_stored += 1
        self._step_index += 1
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)
def _optional_base(name: str):
    """diffusers' class `name`, or None when it needs a package that is missing (DPMSolverSDEScheduler: torchsde)."""
    try:
        return getattr(diffusers, name)
    except (ImportError, AttributeError):
        return None


HAS_SDE_SCHEDULER = _optional_base("DPMSolverSDEScheduler") is not None  # diffusers' class needs torchsde

if HAS_SDE_SCHEDULER:
    class DPMSolverSDEScheduler(diffusers.DPMSolverSDEScheduler):
        """diffusers' DPMSolverSDEScheduler (eps / v, every sigma spacing, noise_sampler_seed, s_noise) with the
        fused update: each interval's two step() calls are the two stages of solvers.ve.dpmpp_sde_coeffs (r = 1/2,
        eta = 1), the interval's start kept in the fused state; the Brownian-tree noise is diffusers' draws
        (diffsampler.noise.BrownianTreeNoiseSampler, queried at the same noise levels). Needs torchsde."""

        def set_timesteps(self, *args, **kwargs):
            super().set_timesteps(*args, **kwargs)
            self._fused_history = self._fused_state = None

        def step(self, model_output, timestep, sample, return_dict=True, s_noise=1.0):
            if self.step_index is None:
                self._init_step_index(timestep)
            if self.noise_sampler is None:
                positive = self.sigmas[self.sigmas > 0]
                self.noise_sampler = BrownianTreeNoiseSampler(sample, positive.min().item(), self.sigmas.max().item(),
                                                              self.noise_sampler_seed)
            pred = _prediction(self.config)
            if pred not in ("eps", "v"):
                raise NotImplementedError(f"prediction_type not implemented yet: {self.config.prediction_type}")
            first = self.state_in_first_order
            i = self.step_index
            sigma_t, next_t = (self.sigmas[i], self.sigmas[i + 1]) if first else (self.sigmas[i - 1], self.sigmas[i])
            sigma, sigma_next = float(sigma_t), float(next_t)
            sample = _same_dtype(model_output, sample)
            if sigma_next == 0:
                coeffs = euler_coeffs(*ve_data_coeffs(pred, sigma), sigma, 0.0)
                prev, x0 = _with_prediction(sample, model_output, coeffs)
            else:
                # the noise levels diffusers queries its tree at: sigma_fn(t_fn(.)) of its float32 sigmas
                t, t_next = sigma_t.log().neg(), next_t.log().neg()
                t_mid = t + (t_next - t) * 0.5
                s_mid = float(t_mid.neg().exp())
                _, stage1, stage2 = dpmpp_sde_coeffs(sigma, sigma_next, 1.0, 0.5, s_noise,
                                                     ve_data_coeffs(pred, sigma), ve_data_coeffs(pred, s_mid))
                if first:
                    if self._fused_history is None:
                        self._fused_history = sample.new_empty((2, *sample.shape))
                        self._fused_state = torch.zeros_like(sample)
                    noise = self.noise_sampler(t.neg().exp(), t_mid.neg().exp())
                else:
                    noise = self.noise_sampler(t.neg().exp(), t_next.neg().exp())
                noise = noise.to(device=sample.device, dtype=sample.dtype)
                coeffs, write, reads = (stage1, 0, ()) if first else (stage2, 1, (0,))
                prev = _fused_step(sample, model_output, coeffs, history=self._fused_history,
                                            write_slot=write, read_slots=reads, noise=noise if coeffs.c else None,
                                            state=self._fused_state)
                x0 = self._fused_history[write].clone()
                # diffusers' first-order flag: the stored start (here the fused state) and the midpoint sigma
                self.sample, self.mid_point_sigma = (self._fused_state, t_mid.neg().exp()) if first else (None, None)
            self._step_index += 1
            if not return_dict:
                return prev, x0
            return diffusers.schedulers.scheduling_dpmsolver_sde.DPMSolverSDESchedulerOutput(
                prev_sample=prev, pred_original_sample=x0)


class EulerAncestralDiscreteScheduler(diffusers.EulerAncestralDiscreteScheduler):
    """diffusers' EulerAncestralDiscreteScheduler (eps / v, every sigma spacing) with the fused update:
    x' = x + (sigma_down - sigma) d + sigma_up z (solvers.ve.ancestral_split, eta = 1)."""

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        if self.config.prediction_type not in ("epsilon", "v_prediction"):  # diffusers' own error
            return super().step(model_output, timestep, sample, generator=generator, return_dict=return_dict)
        if isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)):
            raise ValueError("Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to "
                             "`EulerDiscreteScheduler.step()` is not supported. Make sure to pass one of the "
                             "`scheduler.timesteps` as a timestep.")
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma, sigma_next = float(self.sigmas[self.step_index]), float(self.sigmas[self.step_index + 1])
        down, up = ancestral_split(sigma, sigma_next, 1.0)
        sample = _same_dtype(model_output, sample)
        noise = randn_tensor(model_output.shape, dtype=model_output.dtype, device=model_output.device,
                             generator=generator)  # drawn at every step, as diffusers draws it
        coeffs = euler_coeffs(*ve_data_coeffs(_prediction(self.config), sigma), sigma, down, c=up)
        prev, x0 = _with_prediction(sample, model_output, coeffs, noise=noise if coeffs.c else None)
        self._step_index += 1
        if not return_dict:
            return prev, x0
        return diffusers.schedulers.scheduling_euler_ancestral_discrete.EulerAncestralDiscreteSchedulerOutput(
            prev_sample=prev, pred_original_sample=x0)


class EDMEulerScheduler(diffusers.EDMEulerScheduler):
    """diffusers' EDMEulerScheduler (karras / exponential sigmas, eps / v preconditioning, s_churn) with the fused
    update: the Euler step on D = c_skip x + c_out out (solvers.ve.edm_data_coeffs)."""

    def step(self, model_output, timestep, sample, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0,
             generator=None, return_dict=True, pred_original_sample=None):
        sample, sigma, sigma_hat = _churned_start(self, timestep, model_output, sample, s_churn, s_tmin, s_tmax,
                                                  s_noise, generator)
        if pred_original_sample is None:
            out, (p, q) = model_output, edm_data_coeffs(self.config.prediction_type, sigma_hat, self.config.sigma_data)
        else:
            out, (p, q) = pred_original_sample.to(sample.dtype), (0.0, 1.0)
        prev, x0 = _with_prediction(sample, out, euler_coeffs(p, q, sigma_hat, float(self.sigmas[self.step_index + 1])))
        self._step_index += 1
        if not return_dict:
            return prev, x0
        return diffusers.schedulers.scheduling_edm_euler.EDMEulerSchedulerOutput(prev_sample=prev,
                                                                               pred_original_sample=x0)


class _TwoCallMixin:
    """diffusers' interleaved second-order schedulers (Heun, KDPM2, ...): step() alternates a first-order call
    and the second-order call that completes the step from its start. Here the start is the fused op's state
    tensor (rewritten by the first call, StateRow KEEP_START) and the two data predictions are slots 0 and 1 of
    a fresh history per step (the second call reads slot 0; each call returns its slot as pred_original_sample)."""

    def set_timesteps(self, *args, **kwargs):
        super().set_timesteps(*args, **kwargs)
        self._fused_second, self._fused_state, self._fused_history = False, None, None

    @property
    def state_in_first_order(self) -> bool:
        return not self._fused_second

    def _stage_index(self, timestep) -> int:
        """The index of the step's first call (its sigmas)."""
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after "
                             "creating the scheduler")
        if self.step_index is None:
            self._init_step_index(timestep)
        return self.step_index - 1 if self._fused_second else self.step_index

    def _stage(self, sample, model_output, coeffs: tuple, noise=None, clip=None):
        """Runs the current stage of coeffs = (first, second); (x', the stage's data prediction)."""
        stage = int(self._fused_second)
        sample = _same_dtype(model_output, sample)
        if not stage:
            self._fused_history = sample.new_empty((2, *sample.shape))
            if self._fused_state is None or self._fused_state.shape != sample.shape \
                    or self._fused_state.dtype != sample.dtype or self._fused_state.device != sample.device:
                self._fused_state = torch.zeros_like(sample)
        step = coeffs[stage]
        reads = (0,) if len(step.b) == 2 else ()
        if noise is not None:
            noise = noise.to(device=sample.device, dtype=sample.dtype)
        prev = _fused_step(sample, model_output, step, history=self._fused_history, write_slot=stage,
                                    read_slots=reads, noise=noise if step.c else None, state=self._fused_state,
                                    clip=clip)
        self._fused_second = not stage
        self._step_index += 1
        return prev, self._fused_history[stage]


class HeunDiscreteScheduler(_TwoCallMixin, diffusers.HeunDiscreteScheduler):
    """diffusers' HeunDiscreteScheduler (eps / x0 / v, every sigma spacing, clip_sample) with the fused update:
    solvers.ve.heun_coeffs, an Euler step into sigma = 0."""

    def step(self, model_output, timestep, sample, return_dict=True):
        j = self._stage_index(timestep)
        sigma, sigma_next = float(self.sigmas[j]), float(self.sigmas[j + 1])
        pred = _prediction(self.config)
        p, q = ve_data_coeffs(pred, sigma)
        coeffs = (euler_coeffs(p, q, sigma, 0.0), None) if sigma_next == 0 else \
            heun_coeffs(p, q, *ve_data_coeffs(pred, sigma_next), sigma, sigma_next)
        clip = self.config.clip_sample_range if self.config.clip_sample else None
        prev, x0 = self._stage(sample, model_output, coeffs, clip=clip)
        if not return_dict:
            return prev, x0
        return diffusers.schedulers.scheduling_heun_discrete.HeunDiscreteSchedulerOutput(prev_sample=prev,
                                                                                       pred_original_sample=x0)


class KDPM2DiscreteScheduler(_TwoCallMixin, diffusers.KDPM2DiscreteScheduler):
    """diffusers' KDPM2DiscreteScheduler (eps / v, every sigma spacing) with the fused update: DPM-2 with the
    midpoint sigmas_interpol (solvers.ancestral.dpm2_coeffs), an Euler step into sigma = 0."""

    def step(self, model_output, timestep, sample, return_dict=True):
        if self.config.prediction_type not in ("epsilon", "v_prediction"):  # diffusers' own error
            return super().step(model_output, timestep, sample, return_dict=return_dict)
        j = self._stage_index(timestep)
        sigma, mid, sigma_next = (float(v) for v in (self.sigmas[j], self.sigmas_interpol[j + 1],
                                                       self.sigmas[j + 1]))
        prev, x0 = self._stage(sample, model_output, _dpm2_stages(self.config, sigma, mid, sigma_next))
        if not return_dict:
            return prev, x0
        return diffusers.schedulers.scheduling_k_dpm_2_discrete.KDPM2DiscreteSchedulerOutput(
            prev_sample=prev, pred_original_sample=x0)


class KDPM2AncestralDiscreteScheduler(_TwoCallMixin, diffusers.KDPM2AncestralDiscreteScheduler):
    """diffusers' KDPM2AncestralDiscreteScheduler (eps / v, every sigma spacing) with the fused update: DPM-2 to
    sigma_down, + sigma_up z at the second call (solvers.ancestral.dpm2_coeffs), an Euler step into sigma = 0."""

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        if self.config.prediction_type not in ("epsilon", "v_prediction"):  # diffusers' own error
            return super().step(model_output, timestep, sample, generator=generator, return_dict=return_dict)
        j = self._stage_index(timestep)
        sigma, mid, down, up = (float(v[j]) for v in (self.sigmas, self.sigmas_interpol, self.sigmas_down,
                                                      self.sigmas_up))
        noise = None
        if self._fused_second:
            noise = randn_tensor(model_output.shape, dtype=model_output.dtype, device=model_output.device,
                                 generator=generator)
        prev, x0 = self._stage(sample, model_output, _dpm2_stages(self.config, sigma, mid, down, up), noise)
        if not return_dict:
            return prev, x0
        return diffusers.schedulers.scheduling_k_dpm_2_ancestral_discrete.KDPM2AncestralDiscreteSchedulerOutput(
            prev_sample=prev, pred_original_sample=x0)


def _dpm2_stages(config, sigma, mid, sigma_to, noise=0.0) -> tuple:
    """KDPM2's two calls: eps / v converted at sigma, then at the midpoint; an Euler step where mid = 0 (the
    step into sigma = 0)."""
    pred = _prediction(config)
    p, q = ve_data_coeffs(pred, sigma)
    if mid == 0:
        return euler_coeffs(p, q, sigma, 0.0), None
    return dpm2_coeffs(p, q, *ve_data_coeffs(pred, mid), sigma, mid, sigma_to, noise=noise)


class FlowMatchHeunDiscreteScheduler(_TwoCallMixin, diffusers.FlowMatchHeunDiscreteScheduler):
    """diffusers' FlowMatchHeunDiscreteScheduler (shift, s_churn) with the fused update: Heun on D = x - sigma v
    (solvers.ve.heun_coeffs), an Euler step into sigma = 0."""

    def step(self, model_output, timestep, sample, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0,
             generator=None, return_dict=True):
        if isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)):
            raise ValueError("Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to "
                             "`FlowMatchHeunDiscreteScheduler.step()` is not supported. Make sure to pass one of "
                             "the `scheduler.timesteps` as a timestep.")
        j = self._stage_index(timestep)
        sigma, sigma_next = float(self.sigmas[j]), float(self.sigmas[j + 1])
        sigma_hat, weight = churn(sigma, len(self.sigmas) - 1, s_churn, s_tmin, s_tmax, s_noise)
        sample = _same_dtype(model_output, sample)
        if weight:  # churn, added to either call's sample as diffusers adds it
            sample = sample + randn_tensor(model_output.shape, dtype=model_output.dtype, device=model_output.device,
                                           generator=generator) * weight
        if self._fused_second:
            sigma_hat = self._fused_sigma_hat  # the first call's
        self._fused_sigma_hat = sigma_hat
        coeffs = (euler_coeffs(1.0, -sigma, sigma_hat, 0.0), None) if sigma_next == 0 else \
            heun_coeffs(1.0, -sigma, 1.0, -sigma_next, sigma_hat, sigma_next)
        prev, _ = self._stage(sample, model_output, coeffs)
        if not return_dict:
            return (prev,)
        return diffusers.schedulers.scheduling_flow_match_heun_discrete.FlowMatchHeunDiscreteSchedulerOutput(
            prev_sample=prev)


class _LMRing:
    """The authors' rank-1 LM correction (config keys lamb, lm, kappa) over a one-slot ring of the previous raw
    direction, reset by set_timesteps (the authors' classes keep it across runs: a fresh run's first step
    would see the last run's direction)."""

    def _lm_reset(self):
        self._lm_dirs, self._lm_mix, self._lm_count = None, None, 0

    def _lm_args(self, active, sample, model_output, coeffs, dir_coeffs, scale, history=None, read_slots=(),
                 clip=None) -> dict:
        if self._lm_dirs is None:  # the ring and the two mixing matrices (first step: u = d; then the EMA)
            self._lm_dirs = torch.zeros((1, *sample.shape), dtype=sample.dtype, device=sample.device)
            self._lm_mix = [torch.tensor(mixing(n, 1, float(self.config.kappa)), dtype=torch.float64,
                                         device=sample.device) for n in (0, 1)]
        weights = None
        if active:
            gram = ops.lml_gram(sample, model_output, coeffs, self._lm_dirs, dir_coeffs, history=history,
                                read_slots=read_slots, clip=clip)
            weights = correction_weights(gram, self._lm_mix[min(self._lm_count, 1)], float(self.config.lamb), scale)
        self._lm_count += 1
        return dict(dirs=self._lm_dirs, dir_slot=0, dir_coeffs=list(dir_coeffs), dir_weights=weights)


def _lm_init(base, extra: dict):
    """An __init__ taking base's config plus the LM keys `extra` (registered to the config, so from_config /
    save_config carry them); its signature lists both, as diffusers' ConfigMixin reads it."""

    def __init__(self, *args, **kwargs):
        lm = {k: kwargs.pop(k, v) for k, v in extra.items()}
        base.__init__(self, *args, **kwargs)
        self.register_to_config(**lm)
        self._lm_reset()

    sig = inspect.signature(base.__init__)
    params = [p for p in sig.parameters.values() if p.kind != p.VAR_KEYWORD]
    params += [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v) for k, v in extra.items()]
    __init__.__signature__ = sig.replace(parameters=params)
    return __init__


class DDIMLMScheduler(_LMRing, DDIMScheduler):
    """DDIM with the LML correction of the authors' DDIMLMScheduler (zituitui/LML-diffusion-sampler): when
    `lm` and timestep < 1000 (1 - freeze), the noise prediction eps in the direction term is replaced by the
    rank-1 damped-Hessian direction (lamb: damping, kappa: weight of the previous eps)."""

    __init__ = _lm_init(DDIMScheduler, dict(lamb=1.0, lm=False, kappa=0.0, freeze=0.0))

    def set_timesteps(self, *args, **kwargs):
        super().set_timesteps(*args, **kwargs)
        self._lm_reset()

    def _lml_args(self, t, sample, model_output, coeffs, eps, direction, clip) -> dict:
        active = bool(self.config.lm) and t < 1000 - 1000 * float(self.config.freeze)
        return self._lm_args(active, sample, model_output, coeffs, eps, direction, clip=clip)


class DPMSolverMultistepLMScheduler(_LMRing, DPMSolverMultistepScheduler):
    """DPM-Solver(++) multistep with the LML correction of the authors' DPMSolverMultistepLMScheduler: with
    `lm`, the ODE variants' increment sum_i b_i D_i is replaced by its rank-1 damped-Hessian correction (lamb,
    kappa); the SDE variants run unchanged, as there."""

    __init__ = _lm_init(DPMSolverMultistepScheduler, dict(lamb=1.0, lm=False, kappa=0.0))

    def set_timesteps(self, *args, **kwargs):
        super().set_timesteps(*args, **kwargs)
        self._lm_reset()

    def _lml_args(self, step, sample, model_output) -> dict:
        if self.config.algorithm_type.startswith("sde"):
            return {}
        d = step.lml_direction()
        return self._lm_args(bool(self.config.lm), sample, model_output, step.coeffs, [d.x, d.out, *d.b], d.scale,
                             history=self._fused_history, read_slots=step.read_slots)


FUSED = {cls.__bases__[-1].__name__: cls for cls in (
    DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler, UniPCMultistepScheduler, DEISMultistepScheduler, DDIMScheduler,
    EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, DDPMScheduler, LCMScheduler, TCDScheduler,
    DPMSolverMultistepInverseScheduler, DDIMInverseScheduler, EulerAncestralDiscreteScheduler, EDMEulerScheduler,
    HeunDiscreteScheduler, KDPM2DiscreteScheduler, KDPM2AncestralDiscreteScheduler, FlowMatchHeunDiscreteScheduler,
    LMSDiscreteScheduler, PNDMScheduler, IPNDMScheduler, EDMDPMSolverMultistepScheduler,
    CosineDPMSolverMultistepScheduler, SASolverScheduler)}
if HAS_SDE_SCHEDULER:
    FUSED["DPMSolverSDEScheduler"] = DPMSolverSDEScheduler


# the pipeline attributes that hold the denoiser, in the order they are looked for
DENOISERS = ("unet", "transformer")


def unfused_reason(name: str, config) -> str | None:
    """Why diffusers' scheduler `name` with `config` keeps its own step() (None: the drop-in fuses it)."""
    c = config
    pred, alg = c.get("prediction_type"), c.get("algorithm_type", "")
    if name == "DDPMScheduler" and c.get("variance_type") == "fixed_large_log":
        return "variance_type='fixed_large_log' (diffusers' step() returns NaN there: sqrt of log(beta_t) < 0)"
    if name == "DPMSolverMultistepInverseScheduler" and alg.startswith("sde"):
        return f"algorithm_type={alg!r} (an SDE step from data to noise: diffusers' step() returns NaN there)"
    if name in ("EulerAncestralDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
                "DPMSolverSDEScheduler") and pred == "sample":
        return "prediction_type='sample' (diffusers' step() does not implement it either)"
    return None


def accelerate(pipe, verbose: bool = True, cuda_graph: bool = False):
    """Replace `pipe.scheduler` by its fused drop-in (same config); returns the new scheduler, or the old one
    (with a message) when there is none for its class or its config is one the drop-in does not fuse
    (unfused_reason, named in the message).

    With cuda_graph=True the denoiser's forward (`pipe.unet`, else `pipe.transformer`) is also captured in a
    CUDA graph per input shape and replayed at every step (graphs.CapturedForward; the pipeline's code is
    unchanged, the scheduler step and the guidance arithmetic stay eager). Where it cannot be captured (CPU
    tensors, autograd on, a forward that fails under capture) it runs eagerly and logs the reason once; the
    images are those of the eager run either way. Capture happens at the first call per shape: move the
    pipeline to its device before it."""
    if not isinstance(verbose, bool):
        raise ValueError(f"accelerate: verbose must be True or False, got {verbose!r}")
    if not isinstance(cuda_graph, bool):
        raise ValueError(f"accelerate: cuda_graph must be True or False, got {cuda_graph!r}")
    old = pipe.scheduler
    name = type(old).__name__
    if type(old) in FUSED.values():
        message = f"diffsampler: {name} is already the fused scheduler"
        new = old
    elif name in FUSED and unfused_reason(name, old.config):
        new = old
        message = f"diffsampler: {name} kept (not fused): {unfused_reason(name, old.config)}"
    elif name in FUSED:
        new = FUSED[name].from_config(old.config)
        pipe.scheduler = new
        message = f"diffsampler: replaced diffusers.{name} by diffsampler.integrations.diffusers.{name}"
    else:
        new = old
        message = (f"diffsampler: no fused drop-in for {name}; the pipeline keeps it "
                   f"(fused: {', '.join(sorted(FUSED))})")
    if cuda_graph:
        message += "\n" + _capture_denoiser(pipe)
    if verbose:
        print(message)
    return new


def _capture_denoiser(pipe) -> str:
    """Wrap the pipeline's denoiser forward in a CapturedForward (once); what was done."""
    attr = next((a for a in DENOISERS if isinstance(getattr(pipe, a, None), torch.nn.Module)), None)
    if attr is None:
        raise ValueError(f"accelerate(cuda_graph=True): {type(pipe).__name__} has no denoiser module; expected "
                         f"one of {', '.join('pipe.' + a for a in DENOISERS)}")
    module = getattr(pipe, attr)
    if isinstance(module.forward, CapturedForward):
        return f"diffsampler: pipe.{attr}.forward is already captured"
    module.forward = CapturedForward(module.forward)
    return f"diffsampler: pipe.{attr}.forward is captured in a CUDA graph per input shape (eager where it cannot be)"


def captured_forward(pipe) -> CapturedForward | None:
    """The CapturedForward that accelerate(pipe, cuda_graph=True) put on the denoiser, or None."""
    for attr in DENOISERS:
        forward = getattr(getattr(pipe, attr, None), "forward", None)
        if isinstance(forward, CapturedForward):
            return forward
    return None
