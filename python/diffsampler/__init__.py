"""diffsampler: fused kernels for diffusion and flow sampling behind a thin PyTorch API."""

from . import models, ops, reference, schedules, serve, smc, solvers, targets
from .ops import backends
from .graphs import CapturedSampler, IndexedLoop, run_indexed
from .lml import LML
from .sample import run_plan, sample
from .teleport import GaussianTeleport

__version__ = "0.1.0"
__all__ = ["sample", "run_plan", "CapturedSampler", "IndexedLoop", "run_indexed", "LML", "GaussianTeleport", "backends",
           "ops", "reference", "schedules", "serve", "smc", "solvers", "models"]
