"""The public fused ops (torch.library custom ops with fake implementations), by op family, and their backends.

    backends.py   the probes, backends() and the one place that picks a backend for an input
    registry.py   the op table (reference, Triton and compiled implementations, fakes) and its one dispatch, run
    operands.py   operand checks shared by the ops
    update.py     UpdateCoeffs, StateRow, multistep_update, step_rows, step_table, StepTable,
                  multistep_update_indexed
    lml.py        lml_gram, lml_weights
    ems.py        ems_update
    fkc.py        fkc_update (Feynman-Kac correctors' step and log-weight increment)
    resample.py   resample, draw_ancestors, move_particles and their helpers
"""

from .backends import BACKEND_NAMES, FUSED_DTYPES, STORAGE_DTYPES, backends
from .ems import ems_update
from .fkc import fkc_update
from .lml import lml_gram, lml_weights
from .resample import (RESAMPLE_METHODS, RESAMPLE_MOVES, ResampleResult, ancestor_rows, draw_ancestors,
                       move_particles, resample, resample_uniforms)
from .update import (MAX_DIRECTIONS, MAX_HISTORY_READS, StateRow, StepTable, UpdateCoeffs, multistep_update,
                     multistep_update_indexed, step_rows, step_table)

__all__ = [
    "BACKEND_NAMES", "FUSED_DTYPES", "STORAGE_DTYPES", "MAX_DIRECTIONS", "MAX_HISTORY_READS", "RESAMPLE_METHODS",
    "RESAMPLE_MOVES", "ResampleResult", "StateRow", "StepTable", "UpdateCoeffs", "ancestor_rows", "backends",
    "draw_ancestors", "ems_update", "fkc_update", "lml_gram", "lml_weights", "move_particles", "multistep_update",
    "multistep_update_indexed", "resample", "resample_uniforms", "step_rows", "step_table",
]
