"""Time-shift sampling (TS-DPM; Li et al., ICLR 2024, "Alleviating Exposure Bias in Diffusion Models through
Sampling with Shifted Time Steps").

The solver's coefficients stay those of its own grid; only the time the model is given changes. For each
sample b at a scheduled training timestep t above `cutoff`, the model is queried at

    t_b = argmin_{|tau - t| <= window} (Var(x_b) - (1 - abar_tau))^2      (Var over all elements, unbiased)

the timestep whose forward-process noise variance matches the sample's, as the authors' code does. All on
device: no host sync, so it composes with graph capture.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .. import checks
from ..schedules import VP


@dataclass(frozen=True)
class TimeShift:
    window: int = 10
    cutoff: int = 300

    def __post_init__(self):
        object.__setattr__(self, "window", checks.integer("window", self.window, 0))
        object.__setattr__(self, "cutoff", checks.integer("cutoff", self.cutoff))

    def wrap(self, model: Callable[..., torch.Tensor], schedule: VP) -> Callable[..., torch.Tensor]:
        """model(x, t) that calls `model` at the shifted per-sample timesteps (an int64 tensor of shape (B,))."""
        if not isinstance(schedule, VP):
            raise ValueError(f"time_shift needs a discrete VP schedule, got {type(schedule).__name__}")
        noise_var = 1 - schedule.alphas_cumprod  # float32, the forward-process variance at each timestep
        offsets = torch.arange(-self.window, self.window + 1)
        last = schedule.num_train_timesteps - 1

        def shifted(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            t = t.long()
            window = (t.reshape(-1, 1) + offsets.to(x.device)).clamp(0, last)  # (1 or B, 2w + 1)
            var = x.reshape(x.shape[0], -1).float().var(dim=1)
            dist = (var[:, None] - noise_var.to(x.device)[window]) ** 2
            t_shift = window.expand(x.shape[0], -1).gather(1, dist.argmin(dim=1, keepdim=True)).squeeze(1)
            return model(x, torch.where(t > self.cutoff, t_shift, t.expand(x.shape[0])))

        return shifted
