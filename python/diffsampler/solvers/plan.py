"""What a solver hands the sampling loop: per step, the model time and the fused update's coefficients."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..ops import UpdateCoeffs


@dataclass(frozen=True)
class Direction:
    """The step's update direction for LML: d = x_w x + out_w out + sum_i b_i m_i, entering x' as scale * d.

    The default (Step.direction None) is the whole increment x' - a x - c z - g s (scale 1), as the
    LML authors' DPM-Solver code has it; DDIM uses its noise prediction and flow Euler its velocity."""

    scale: float
    x: float
    out: float
    b: tuple[float, ...]


@dataclass(frozen=True)
class Step:
    """One model call followed by one fused update (ops.multistep_update, or ops.ems_update when the step has
    tensor_coeffs: float64 rows over a sample's elements, broadcast to x.shape[1:] once per run; DPM-Solver-v3)."""

    t: float  # the time the model is given (an integer training timestep for discrete VP schedules)
    coeffs: UpdateCoeffs | None
    write_slot: int = 0
    read_slots: tuple[int, ...] = ()
    input_scale: float = 1.0  # the model is called on input_scale * x (Euler's scale_model_input)
    direction: Direction | None = None  # LML's direction (None: the whole increment)
    tensor_coeffs: torch.Tensor | None = field(default=None, compare=False)
    undefined: str | None = None  # why the step has no update (coeffs None): Grid.repeated

    @property
    def needs_noise(self) -> bool:
        return self.coeffs is not None and self.coeffs.c != 0

    def lml_direction(self) -> Direction:
        if self.direction is not None:
            return self.direction
        return Direction(scale=1.0, x=0.0, out=self.coeffs.e, b=tuple(self.coeffs.b))


@dataclass(frozen=True)
class Plan:
    """The whole loop, computed once on the host in float64 before any model call."""

    steps: tuple[Step, ...]
    history_slots: int  # 0: the solver keeps no history of data predictions
    discrete_time: bool  # the model gets integer training timesteps (int64) rather than float times
    data_prediction: bool = True  # m0 is the data prediction (False: noise prediction, DPM-Solver's dpmsolver)
    init_scale: float = 1.0  # x_T = init_scale * N(0, I) (diffusers' init_noise_sigma)
    uses_state: bool = False  # the steps read / rewrite a state tensor (zeros at the start)
    mean_state: bool = False  # the state is the condition mu of a mean-reverting schedule: x_T = mu + init_scale z

    @property
    def timesteps(self) -> list[float]:
        return [s.t for s in self.steps]

    def check_defined(self) -> None:
        """Raises ValueError for the first step without an update (Step.undefined)."""
        for i, step in enumerate(self.steps):
            if step.undefined:
                raise ValueError(f"step {i} has no update: {step.undefined}; use a grid without repeated sigmas")

    def upload_tensor_coeffs(self, x: torch.Tensor) -> list[torch.Tensor | None] | None:
        """Each step's tensor coefficients broadcast to x's sample shape, contiguous on x's device in float32
        (float64 for float64 x): uploaded once per run, indexed per step without a copy. None when no step
        has any."""
        if all(step.tensor_coeffs is None for step in self.steps):
            return None
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        out = []
        for step in self.steps:
            c = step.tensor_coeffs
            if c is None:
                out.append(None)
                continue
            try:
                shape = torch.broadcast_shapes(c.shape[1:], x.shape[1:])
            except RuntimeError:
                shape = None
            if shape != x.shape[1:]:
                raise ValueError(f"ems: the statistics' shape {tuple(c.shape[1:])} does not broadcast to the "
                                 f"sample shape x.shape[1:] = {tuple(x.shape[1:])}")
            c = c.reshape(c.shape[0], *[1] * (x.dim() - c.dim()), *c.shape[1:])  # right-aligned, as broadcasting
            out.append(c.to(device=x.device, dtype=dtype).expand(c.shape[0], *x.shape[1:]).contiguous())
        return out


def ring_slots(i: int, order: int, slots: int) -> tuple[int, tuple[int, ...]]:
    """History ring of `slots` entries: step i writes slot i % slots and reads the order - 1 steps before it."""
    return i % slots, tuple((i - j) % slots for j in range(1, order))
