"""What a solver hands the sampling loop: per step, the model time and the fused update's coefficients."""

from __future__ import annotations

from dataclasses import dataclass

from ..ops import UpdateCoeffs


@dataclass(frozen=True)
class Direction:
    """The step's update direction for LML: g = x_w x + out_w out + sum_i b_i m_i, entering x' as scale * g.

    The default (Step.direction None) is the whole increment x' - a x - c z - g s (scale 1), as the
    LML authors' DPM-Solver code has it; DDIM uses its noise prediction and flow Euler its velocity."""

    scale: float
    x: float
    out: float
    b: tuple[float, ...]


@dataclass(frozen=True)
class Step:
    """One model call followed by one fused update (ops.multistep_update)."""

    t: float  # the time the model is given (an integer training timestep for discrete VP schedules)
    coeffs: UpdateCoeffs
    write_slot: int = 0
    read_slots: tuple[int, ...] = ()
    input_scale: float = 1.0  # the model is called on input_scale * x (Euler's scale_model_input)
    direction: Direction | None = None  # LML's direction (None: the whole increment)

    @property
    def needs_noise(self) -> bool:
        return self.coeffs.c != 0

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

    @property
    def timesteps(self) -> list[float]:
        return [s.t for s in self.steps]


def ring_slots(i: int, order: int, slots: int) -> tuple[int, tuple[int, ...]]:
    """History ring of `slots` entries: step i writes slot i % slots and reads the order - 1 steps before it."""
    return i % slots, tuple((i - j) % slots for j in range(1, order))
