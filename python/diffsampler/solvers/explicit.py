"""`sigmas=` an explicit noise-level list (Align Your Steps, ComfyUI grids, user-tuned schedules) for any solver.

    EDM:  the list is the solver's Karras sigmas (VE sigma; the model gets sigma);
    Flow: the list is the flow sigmas t (x = (1 - t) x0 + t eps);
    VP:   the list holds sigma ratios sigma_t / alpha_t; the model gets each sigma's fractional training
          timestep (log-sigma interpolation, as diffusers' sigma_to_t): the solver runs on that Grid (the
          multistep solvers, and the VE-scale ones that take a Grid) or on the ExplicitVP schedule itself (the
          solvers whose SolverSpec says explicit_vp).
The list is descending, positive but its last entry, which may be 0; steps = len(sigmas) - 1 (sample()'s
default steps=20 gives way to it; any other steps must agree).
"""

from __future__ import annotations

import numpy as np

from .. import checks
from ..schedules import EDM, VP, Flow, sigma_to_t
from .grid import Grid

DEFAULT_STEPS = 20  # sample()'s default steps, which an explicit list overrides


class ExplicitEDM(EDM):
    """An EDM schedule whose grid is a given sigma list."""

    def __init__(self, base: EDM, sigmas: tuple[float, ...]):
        super().__init__(base.sigma_min, base.sigma_max, base.rho)
        self.explicit = sigmas

    def sigmas(self, steps: int) -> list[float]:
        return list(self.explicit)

    def __repr__(self) -> str:
        return f"EDM(sigmas={list(self.explicit)})"


class ExplicitFlow(Flow):
    """A Flow schedule whose grid is a given sigma list."""

    def __init__(self, base: Flow, sigmas: tuple[float, ...]):
        super().__init__(base.num_train_timesteps, base.shift)
        self.explicit = sigmas

    def sigmas(self, steps: int) -> np.ndarray:
        return np.asarray(self.explicit, dtype=np.float32)

    def __repr__(self) -> str:
        return f"Flow(sigmas={list(self.explicit)})"


class ExplicitVP(VP):
    """A discrete VP schedule with a given list of sigma ratios: the VE-scale solvers that build their own
    steps on a VP schedule (the ancestral ones) read `explicit`; the others run on its Grid (vp_grid)."""

    def __init__(self, base: VP, sigmas: tuple[float, ...]):
        super().__init__(base.betas)
        self.explicit = sigmas

    def __repr__(self) -> str:
        return f"VP(sigmas={list(self.explicit)})"


def log_train_sigmas(schedule: VP) -> np.ndarray:
    """log(sigma_t / alpha_t) at every training timestep, ascending, in float64 (of the float32 alpha_bar)."""
    ab = schedule.alphas_cumprod.double()
    return np.log((((1 - ab) / ab) ** 0.5).numpy())


def vp_grid(schedule: VP, sigmas: tuple[float, ...]) -> Grid:
    """The Grid of explicit sigma ratios on a discrete VP schedule: fractional model timesteps."""
    t = sigma_to_t(np.asarray(sigmas[:-1]), log_train_sigmas(schedule))
    return Grid(timesteps=tuple(float(v) for v in t), sigmas=tuple(sigmas), discrete=False)


def explicit_schedule(schedule, sigmas, steps: int):
    """(the schedule or Grid a solver runs on, steps) for sigmas= a list on `schedule`."""
    sigmas = tuple(checks.sigmas(sigmas))
    if steps is not None and steps != len(sigmas) - 1 and steps != DEFAULT_STEPS:
        raise ValueError(f"steps={steps} does not match sigmas= a list of {len(sigmas)} noise levels "
                         f"({len(sigmas) - 1} steps); pass steps=None or {len(sigmas) - 1}")
    if isinstance(schedule, EDM):
        return ExplicitEDM(schedule, sigmas), len(sigmas) - 1
    if isinstance(schedule, Flow):
        if sigmas[0] > 1:
            raise ValueError(f"sigmas on a Flow schedule are flow times in [0, 1], got sigmas[0] = {sigmas[0]}")
        return ExplicitFlow(schedule, sigmas), len(sigmas) - 1
    if isinstance(schedule, VP):
        return ExplicitVP(schedule, sigmas), len(sigmas) - 1
    raise ValueError(f"sigmas= a list needs a VP, EDM or Flow schedule, got {schedule!r}")
