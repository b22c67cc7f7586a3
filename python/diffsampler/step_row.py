"""The step row: every coefficient one fused step reads, in one fixed-width float64 layout (the one definition).

    out = out + w d                                         (the guide d, when one is given: guidance's term)
    m_0 = p x + q out + sum_{i>=1} r_i m_i                 (then clip, then thresholding when the op's flag is on:
    m_0 = hx x + hm clamp(m_0, -s_b, s_b) / s_b,  s_b = clamp(quantile(|m_0|, ratio), 1, max_value) per sample)
    x'  = a x + e out + sum_{i>=0} b_i m_i + c z + g s
    s'  = sa x + se out + sum_{i>=0} sb_i m_i + sc z + sg s  (written over s when writes_state = 1)

Eager calls pass one row (`coeffs`, a list of WIDTH floats); an indexed step table is (steps, WIDTH). A row is
self-contained (no field depends on another row), so a table of one row per sample reads the same way. The C
layout (csrc/cuda/update_params.h, DS_ROW_*, exported as diffsampler._C.ROW_LAYOUT) and the Triton constexprs
(triton_kernels/fused_update.py) are bound to these offsets; tests/test_step_row.py checks they agree.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from .models import data_coeffs, noise_coeffs

MAX_READS = 3  # history reads m_1..m_k per step
P, Q, A, E, C = range(5)
B = 5  # b_0..b_MAX_READS
R = B + MAX_READS + 1  # r_1..r_MAX_READS
G = R + MAX_READS
SA, SE, SC, SG = G + 1, G + 2, G + 3, G + 4
SB = SG + 1  # sb_0..sb_MAX_READS
WRITES_STATE = SB + MAX_READS + 1  # 1.0: s' is written over the state; 0.0: the state is only read
THR_RATIO, THR_MAX, THR_HX, THR_HM = WRITES_STATE + 1, WRITES_STATE + 2, WRITES_STATE + 3, WRITES_STATE + 4
GUIDE = THR_HM + 1  # w, the guide's weight in out (used when a guide is given)
WIDTH = GUIDE + 1
SLOTS_WIDTH = 1 + MAX_READS  # a step table's slots row: [write_slot, read_0, .., read_{MAX_READS-1}]

LAYOUT = {"P": P, "Q": Q, "A": A, "E": E, "C": C, "B": B, "R": R, "G": G, "SA": SA, "SE": SE, "SC": SC, "SG": SG,
          "SB": SB, "WRITES_STATE": WRITES_STATE, "THR_RATIO": THR_RATIO, "THR_MAX": THR_MAX, "THR_HX": THR_HX,
          "THR_HM": THR_HM, "GUIDE": GUIDE, "WIDTH": WIDTH}


def _pad(values, n: int) -> list[float]:
    return [float(v) for v in values] + [0.0] * (n - len(values))


def row(coeffs, writes_state: bool | None = None, threshold: tuple[float, float] | None = None) -> list[float]:
    """The step row of an ops.UpdateCoeffs (b, state.b and r zero-padded to MAX_READS reads).

    writes_state: whether s' is written over the state: by coeffs.state, or, without one, s' = s (sg = 1: a
    table's steps without a state row keep it); None: coeffs.state is not None.
    threshold: (ratio, max_value) of dynamic thresholding, or None (fields ratio = max = hx = 0, hm = 1). With
    coeffs.eps_of = (alpha, sigma) m_0 is a noise prediction: the row converts to x0 = (x - sigma eps) / alpha
    (p, q, r scaled) and maps the thresholded x0 back with eps = hx x + hm x0 = (x - alpha x0) / sigma.
    The guide weight w is 0 (with_guide sets it: it changes from call to call).
    """
    writes_state = coeffs.state is not None if writes_state is None else bool(writes_state)
    p, q, r = float(coeffs.p), float(coeffs.q), _pad(coeffs.r, MAX_READS)
    thr = [0.0, 0.0, 0.0, 1.0]
    if threshold is not None:
        thr = [float(threshold[0]), float(threshold[1]), 0.0, 1.0]
        if coeffs.eps_of is not None:
            xp, mp = data_coeffs("eps", *coeffs.eps_of)  # x0 = xp x + mp eps
            p, q, r = xp + mp * p, mp * q, [mp * v for v in r]
            thr[2:] = noise_coeffs("x0", *coeffs.eps_of)  # eps = hx x + hm x0
    s = coeffs.state
    if s is None:
        s_row = [0.0, 0.0, 0.0, 1.0 if writes_state else 0.0] + [0.0] * (MAX_READS + 1)
    else:
        s_row = [float(s.a), float(s.e), float(s.c), float(s.g)] + _pad(s.b, MAX_READS + 1)
    out = [p, q, float(coeffs.a), float(coeffs.e), float(coeffs.c), *_pad(coeffs.b, MAX_READS + 1), *r,
           float(coeffs.g), *s_row, 1.0 if writes_state else 0.0, *[float(v) for v in thr], 0.0]
    assert len(out) == WIDTH
    return out


@functools.lru_cache(maxsize=4096)
def _cached(coeffs, writes_state, threshold) -> tuple[float, ...]:
    return tuple(row(coeffs, writes_state, threshold))


def cached_row(coeffs, writes_state: bool | None = None,
               threshold: tuple[float, float] | None = None) -> tuple[float, ...]:
    """row() as an immutable tuple, computed once per distinct (hashable) arguments: the eager op's row of a
    plan's step, which a loop passes every time it runs (traced code computes it: the trace holds constants)."""
    if torch.compiler.is_compiling():
        return tuple(row(coeffs, writes_state, threshold))
    try:
        return _cached(coeffs, writes_state, threshold)
    except TypeError:  # unhashable fields (lists): no cache
        return tuple(row(coeffs, writes_state, threshold))


def with_guide(r, w: float) -> tuple[float, ...]:
    """Step row r with the guide weight w (out = out + w d, d the op's guide operand)."""
    return (*r[:GUIDE], float(w), *r[GUIDE + 1:])


class Fields(NamedTuple):
    """A step row's fields by name (scalars of a list, or 0-dim tensors of a row tensor)."""

    p: object
    q: object
    a: object
    e: object
    c: object
    b: tuple
    r: tuple
    g: object
    sa: object
    se: object
    sc: object
    sg: object
    sb: tuple
    writes_state: object
    ratio: object
    max_value: object
    hx: object
    hm: object
    guide: object


def fields(r) -> Fields:
    """The named fields of one step row r (a sequence of WIDTH numbers or a 1-D tensor): the loader of the
    reference and of the eager Triton launch."""
    return Fields(r[P], r[Q], r[A], r[E], r[C], tuple(r[B + j] for j in range(MAX_READS + 1)),
                  tuple(r[R + j] for j in range(MAX_READS)), r[G], r[SA], r[SE], r[SC], r[SG],
                  tuple(r[SB + j] for j in range(MAX_READS + 1)), r[WRITES_STATE], r[THR_RATIO], r[THR_MAX],
                  r[THR_HX], r[THR_HM], r[GUIDE])
