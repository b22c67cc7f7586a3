"""diffsampler: fused kernels for diffusion and flow sampling behind a thin PyTorch API."""

from . import models, ops, reference, schedules, solvers, targets
from .ops import backends
from .sample import sample

__version__ = "0.1.0"
__all__ = ["sample", "backends", "ops", "reference", "schedules", "solvers", "models"]
