"""Torch references of every fused op: the ground truth of the tests and the fallback backend.

Each function has the exact signature of the ``torch.ops.diffsampler.*`` schema it mirrors, computes in
float64 for float64 inputs and in float32 otherwise (whatever the storage dtype), and returns in the
storage dtype.
"""

from __future__ import annotations

import torch

# Layout of the flat coefficient list shared by every backend of multistep_update:
#   [p, q, a, e, c, b_0, b_1, ..., b_k, r_1, ..., r_k]   with k = len(read_slots)
COEFF_P, COEFF_Q, COEFF_A, COEFF_E, COEFF_C, COEFF_B0 = range(6)
MAX_HISTORY_READS = 3
MAX_DIRECTIONS = 6  # LML's ring of directions (direction mode: rank <= 4; corrector: rank + 1 and the noise)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the math runs in: float64 stays float64, every other float storage computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def threshold_scale(m0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Per-sample dynamic-thresholding bound s_b = clamp(quantile(|m0_b|, ratio), 1, max_value), shape (B,).

    The quantile interpolates linearly between order statistics, as ``torch.quantile`` does
    (position ratio * (n - 1)); written with ``kthvalue`` so it has no input-size limit.
    """
    flat = m0.reshape(m0.shape[0], -1).abs()
    n = flat.shape[1]
    pos = ratio * (n - 1)
    lo = int(pos)
    hi = min(lo + 1, n - 1)
    v_lo = flat.kthvalue(lo + 1, dim=1).values
    v_hi = flat.kthvalue(hi + 1, dim=1).values if hi != lo else v_lo
    s = v_lo + (v_hi - v_lo) * (pos - lo)
    return s.clamp(min=1.0, max=max_value)


def data_prediction(x, out, reads, p, q, r, clip):
    """m_0 = p x + q out + sum_i r_i m_i, clamped to [-clip, clip] if clip > 0 (before any thresholding)."""
    m0 = p * x + q * out
    for ri, m in zip(r, reads):
        if ri != 0:
            m0 = m0 + ri * m
    return m0.clamp(-clip, clip) if clip > 0 else m0


def multistep_update(
    x: torch.Tensor,
    model_out: torch.Tensor,
    history: torch.Tensor | None,
    write_slot: int,
    read_slots: list[int],
    coeffs: list[float],
    noise: torch.Tensor | None,
    clip: float,
    threshold_ratio: float,
    threshold_max: float,
    state: torch.Tensor | None = None,
    state_coeffs: list[float] = (),
    dirs: torch.Tensor | None = None,
    dir_slot: int = 0,
    dir_coeffs: list[float] = (),
    dir_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """One fused solver step (design.md section 2), with LML's low-rank direction correction.

        m_0  = p x + q out + sum_i r_i m_i                   data prediction (r: GHVB, DC-Solver; else 0)
        m_0  = clamp(m_0, -clip, clip)                       if clip > 0
        m_0  = clamp(m_0, -s_b, s_b) / s_b                   if threshold_ratio > 0 (s_b: threshold_scale)
        x'   = a x + e out + sum_i b_i m_i + c z + g s       m_i = history[read_slots[i-1]], i >= 1
        s'   = sa x + se out + sum_i sb_i m_i + sc z + sg s  written over the state s, if state_coeffs has the row
        history[write_slot] = m_0                            if history is given

    state_coeffs: [] (no state), [g] (state read) or [g, sa, se, sc, sg, sb_0, ..., sb_k].

    LML (diffsampler.lml), when dirs (a ring of R past raw directions, shape (R, *x.shape)) is given:
        g_n  = gx x + ge out + sum_i gb_i m_i                dir_coeffs = [gx, ge, gb_0, ..., gb_k]
        x'  += W[b, 0] g_n + sum_j W[b, 1 + j] dirs[j]       dir_weights W of shape (B, 1 + R), if given
        dirs[dir_slot] = g_n                                 (after the reads)
    Returns x'; writes history, the state and dirs in place.
    """
    cd = compute_dtype(x.dtype)
    k = len(read_slots)
    p, q, a, e, c = coeffs[:COEFF_B0]
    b, r = coeffs[COEFF_B0:COEFF_B0 + k + 1], coeffs[COEFF_B0 + k + 1:]
    xf, of = x.to(cd), model_out.to(cd)
    reads = [history[slot].to(cd) for slot in read_slots]
    m0 = data_prediction(xf, of, reads, p, q, r, clip)
    if threshold_ratio > 0:
        s = threshold_scale(m0, threshold_ratio, threshold_max).view(-1, *([1] * (m0.dim() - 1)))
        m0 = torch.minimum(torch.maximum(m0, -s), s) / s
    z = noise.to(cd) if noise is not None else None
    s = state.to(cd) if state is not None else None

    def row(a, e, c, g, b):
        y = a * xf + b[0] * m0
        if e != 0:
            y = y + e * of
        for bi, m in zip(b[1:], reads):
            y = y + bi * m
        if z is not None:
            y = y + c * z
        if s is not None:
            y = y + g * s
        return y

    g = state_coeffs[0] if len(state_coeffs) else 0.0
    x_next = row(a, e, c, g, b)
    if dirs is not None:
        g_n = direction(xf, of, m0, reads, dir_coeffs)
        if dir_weights is not None:
            w = dir_weights.to(cd).view(-1, dirs.shape[0] + 1, *([1] * (x.dim() - 1)))
            x_next = x_next + w[:, 0] * g_n
            for j in range(dirs.shape[0]):
                x_next = x_next + w[:, 1 + j] * dirs[j].to(cd)
        dirs[dir_slot].copy_(g_n)
    if len(state_coeffs) > 1:
        sa, se, sc, sg = state_coeffs[1:5]
        state.copy_(row(sa, se, sc, sg, state_coeffs[5:]))
    if history is not None:
        history[write_slot].copy_(m0)
    return x_next.to(x.dtype)


def direction(x, out, m0, reads, dir_coeffs):
    """LML's raw direction g_n = gx x + ge out + gb_0 m_0 + sum_i gb_i m_i (dir_coeffs = [gx, ge, gb_0..gb_k])."""
    gx, ge, *gb = dir_coeffs
    g = gx * x + ge * out + gb[0] * m0
    for w, m in zip(gb[1:], reads):
        g = g + w * m
    return g


def lml_gram(
    x: torch.Tensor,
    model_out: torch.Tensor,
    history: torch.Tensor | None,
    read_slots: list[int],
    coeffs: list[float],
    clip: float,
    dirs: torch.Tensor,
    dir_coeffs: list[float],
) -> torch.Tensor:
    """Per-sample Gram matrix of LML's directions, float64 of shape (B, 1 + R, 1 + R):

        G[b] = V_b^T V_b,   V_b = [g_n, dirs[0], ..., dirs[R-1]] restricted to sample b

    with g_n the raw direction of this step (multistep_update's dir_coeffs row, m_0 computed as there, clip
    included). Sums run over all non-batch dimensions.
    """
    cd = compute_dtype(x.dtype)
    k = len(read_slots)
    p, q = coeffs[COEFF_P], coeffs[COEFF_Q]
    r = coeffs[COEFF_B0 + k + 1:]
    xf, of = x.to(cd), model_out.to(cd)
    reads = [history[slot].to(cd) for slot in read_slots]
    m0 = data_prediction(xf, of, reads, p, q, r, clip)
    g_n = direction(xf, of, m0, reads, dir_coeffs)
    v = torch.stack([g_n, *[d.to(cd) for d in dirs]], dim=1).reshape(x.shape[0], dirs.shape[0] + 1, -1)
    v = v.to(torch.float64)
    return v @ v.transpose(1, 2)


# ---- ems_update: the per-step map with tensor coefficients (DPM-Solver-v3's per-dimension statistics) ----
# Rows of its coefficient tensor (R, *x.shape[1:]), k = len(read_slots):
#   [P, Q, A, G, B_0, ..., B_k, C]  (+ [As, Gs, Bs_0, ..., Bs_k, Cs] when the state is rewritten)
EMS_MAX_READS = 3


def ems_rows(n_reads: int, state_row: bool) -> int:
    """The number of coefficient rows of ems_update: 2 + (k + 4), twice the update row with a state row."""
    return 2 + (n_reads + 4) * (2 if state_row else 1)


def ems_update(
    x: torch.Tensor,
    model_out: torch.Tensor,
    coeffs: torch.Tensor,
    history: torch.Tensor | None,
    write_slot: int,
    read_slots: list[int],
    state: torch.Tensor | None = None,
) -> torch.Tensor:
    """One step with per-element coefficients that broadcast over the batch (dimension 0):

        m_0 = P x + Q out
        x'  = A x + G s + sum_i B_i m_i + C           m_i = history[read_slots[i-1]], i >= 1
        s'  = As x + Gs s + sum_i Bs_i m_i + Cs       written over the state s when coeffs has that row
        history[write_slot] = m_0                     if history is given

    coeffs: (ems_rows(k, state row), *x.shape[1:]) in float32 (float64 with float64 x); G (and the state)
    only count when a state is given. Returns x'; writes history (and the state) in place.
    """
    cd = compute_dtype(x.dtype)
    k = len(read_slots)
    c = coeffs.to(cd)
    xf, of = x.to(cd), model_out.to(cd)
    reads = [history[slot].to(cd) for slot in read_slots]
    s = state.to(cd) if state is not None else None
    m0 = c[0] * xf + c[1] * of

    def row(r):  # r: [A, G, B_0..B_k, C]
        y = r[0] * xf + r[2] * m0 + r[3 + k]
        for bi, m in zip(r[3:3 + k], reads):
            y = y + bi * m
        return y + r[1] * s if s is not None else y

    x_next = row(c[2:6 + k])
    if c.shape[0] > 6 + k:
        state.copy_(row(c[6 + k:]))
    if history is not None:
        history[write_slot].copy_(m0)
    return x_next.to(x.dtype)
