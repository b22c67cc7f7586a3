"""Torch references of every fused op: the ground truth of the tests and the fallback backend.

Each function has the exact signature of the ``torch.ops.diffsampler.*`` schema it mirrors, computes in
float64 for float64 inputs and in float32 otherwise (whatever the storage dtype), and returns in the
storage dtype.
"""

from __future__ import annotations

import math

import torch

from . import step_row
from .error_flags import BITS as ERROR_BITS  # the status word's bits (csrc/cuda/error_flags.h)

MAX_HISTORY_READS = step_row.MAX_READS
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
    if n == 0:  # zero-size samples: nothing to scale
        return flat.new_ones(flat.shape[0])
    pos = ratio * (n - 1)
    lo = int(pos)
    hi = min(lo + 1, n - 1)
    v_lo = flat.kthvalue(lo + 1, dim=1).values
    v_hi = flat.kthvalue(hi + 1, dim=1).values if hi != lo else v_lo
    s = v_lo + (v_hi - v_lo) * (pos - lo)
    return s.clamp(min=1.0, max=max_value)


def threshold(m0: torch.Tensor, x: torch.Tensor, k: step_row.Fields) -> torch.Tensor:
    """Dynamic thresholding of the data prediction m0 mapped to the history value, with the step row's
    (ratio, max_value, hx, hm):  hx x + hm clamp(m0, -s_b, s_b) / s_b,  s_b = threshold_scale(m0, ratio, max_value).
    (hx, hm) = (0, 1) keeps the data prediction; (1 / sigma, -alpha / sigma) gives the noise prediction
    eps = (x - alpha x0) / sigma of a solver keeping those."""
    s = threshold_scale(m0, k.ratio, k.max_value).view(-1, *([1] * (m0.dim() - 1)))
    m0 = torch.minimum(torch.maximum(m0, -s), s) / s
    return m0 if (k.hx, k.hm) == (0.0, 1.0) else k.hx * x + k.hm * m0


def guided_out(out: torch.Tensor, guide: torch.Tensor | None, w) -> torch.Tensor:
    """The model output as the update sees it: out + w guide (guidance's term), or out without a guide."""
    return out if guide is None else out + w * guide.to(out.dtype)


def data_prediction(x, out, reads, p, q, r, clip):
    """m_0 = p x + q out + sum_i r_i m_i, clamped to [-clip, clip] if clip > 0 (before any thresholding)."""
    m0 = p * x + q * out
    for ri, m in zip(r, reads):
        m0 = m0 + ri * m
    return m0.clamp(-clip, clip) if clip > 0 else m0


def combine(x, out, m0, reads, z, s, a, e, c, g, b):
    """a x + e out + b_0 m_0 + sum_i b_i m_i + c z + g s (z, s None: absent); x' with the row's (a, e, c, g, b),
    s' with its (sa, se, sc, sg, sb)."""
    y = a * x + e * out + b[0] * m0
    for bi, m in zip(b[1:], reads):
        y = y + bi * m
    if z is not None:
        y = y + c * z
    if s is not None:
        y = y + g * s
    return y


def multistep_update(
    x: torch.Tensor,
    model_out: torch.Tensor,
    history: torch.Tensor | None,
    write_slot: int,
    read_slots: list[int],
    coeffs: list[float],
    noise: torch.Tensor | None,
    clip: float,
    thresholding: bool,
    state: torch.Tensor | None = None,
    dirs: torch.Tensor | None = None,
    dir_slot: int = 0,
    dir_coeffs: list[float] = (),
    dir_weights: torch.Tensor | None = None,
    guide: torch.Tensor | None = None,
) -> torch.Tensor:
    """One fused solver step (design.md section 2), with LML's low-rank direction correction; coeffs is the
    step row (diffsampler.step_row, WIDTH entries):

        out  = out + w guide                                 if a guide is given (w: the row's guide weight)
        m_0  = p x + q out + sum_i r_i m_i                   data prediction (r: GHVB, DC-Solver; else 0)
        m_0  = clamp(m_0, -clip, clip)                       if clip > 0
        m_0  = hx x + hm clamp(m_0, -s_b, s_b) / s_b         if thresholding (see threshold)
        x'   = a x + e out + sum_i b_i m_i + c z + g s       m_i = history[read_slots[i-1]], i >= 1 (s: if given)
        s'   = sa x + se out + sum_i sb_i m_i + sc z + sg s  written over the state s, if the row's writes_state
        history[write_slot] = m_0                            if history is given

    LML (diffsampler.lml), when dirs (a ring of R past raw directions, shape (R, *x.shape)) is given:
        d_n  = da x + de out + sum_i db_i m_i                dir_coeffs = [da, de, db_0, ..., db_k]
        x'  += W[b, 0] d_n + sum_j W[b, 1 + j] dirs[j]       dir_weights W of shape (B, 1 + R), if given
        dirs[dir_slot] = d_n                                 (after the reads)
    Returns x'; writes history, the state and dirs in place.
    """
    cd = compute_dtype(x.dtype)
    k = step_row.fields(coeffs)
    if k.writes_state and state is None:
        raise ValueError("coeffs rewrites the state (its writes_state entry is set): state is required")
    xf, of = x.to(cd), guided_out(model_out.to(cd), guide, k.guide)
    reads = [history[slot].to(cd) for slot in read_slots]
    m0 = data_prediction(xf, of, reads, k.p, k.q, k.r, clip)
    if thresholding:
        m0 = threshold(m0, xf, k)
    z = noise.to(cd) if noise is not None else None
    s = state.to(cd) if state is not None else None
    x_next = combine(xf, of, m0, reads, z, s, k.a, k.e, k.c, k.g, k.b)
    if dirs is not None:
        d_n = direction(xf, of, m0, reads, dir_coeffs)
        if dir_weights is not None:
            w = dir_weights.to(cd).view(-1, dirs.shape[0] + 1, *([1] * (x.dim() - 1)))
            x_next = x_next + w[:, 0] * d_n
            for j in range(dirs.shape[0]):
                x_next = x_next + w[:, 1 + j] * dirs[j].to(cd)
        dirs[dir_slot].copy_(d_n)
    if k.writes_state:
        state.copy_(combine(xf, of, m0, reads, z, s, k.sa, k.se, k.sc, k.sg, k.sb))
    if history is not None:
        history[write_slot].copy_(m0)
    return x_next.to(x.dtype)


def flag(status: torch.Tensor | None, bad: torch.Tensor, bit: int) -> None:
    """status |= bit where the bool tensor `bad` has any true entry (tensor ops: no host sync)."""
    if status is not None:
        status.bitwise_or_(bad.any().to(torch.int32) * bit)


def clamp_index(i: torch.Tensor, n: int, status: torch.Tensor | None, bit: int) -> torch.Tensor:
    """i clamped into [0, n), flagging `bit` in status where it was outside (csrc/cuda/error_flags.h)."""
    clamped = i.clamp(0, n - 1)
    flag(status, clamped != i, bit)
    return clamped


def multistep_update_indexed(x, model_out, history, table, slots, step, n_reads, noise, clip, state, status=None,
                             guide=None):
    """multistep_update with the step row (diffsampler.step_row) and history slots read on the device from row
    `step` of table (steps, step_row.WIDTH) float64 and of slots (steps, 1 + MAX_HISTORY_READS) int64
    ([write_slot, read_0, read_1, read_2]). step has one element (every sample takes that row) or B (sample b
    takes row step[b]: its coefficients and its history slots, history[slot, b]).

    The first n_reads reads are used; no thresholding, no LML; the state, when given, is rewritten where the
    row's writes_state is set. No host sync: the rows are gathered with tensor ops. A step outside the table or a
    used slot outside the history is clamped into range and flagged in `status`."""
    cd = compute_dtype(x.dtype)
    batch = x.shape[0]
    i = clamp_index(step.reshape(-1), table.shape[0], status, ERROR_BITS["step"])
    per_sample = (step_row.WIDTH, -1) + (1,) * (x.dim() - 1)  # each field (1 or B, 1, ..): broadcasts over x
    k = step_row.fields(table.index_select(0, i).to(cd).t().reshape(per_sample))
    slot = slots.index_select(0, i)[:, :1 + n_reads].expand(batch, 1 + n_reads)
    if history is not None:
        slot = clamp_index(slot, history.shape[0], status, ERROR_BITS["slot"])
    samples = torch.arange(batch, device=x.device)
    xf, of = x.to(cd), guided_out(model_out.to(cd), guide, k.guide)
    reads = [history[slot[:, 1 + j], samples].to(cd) for j in range(n_reads)]
    m0 = data_prediction(xf, of, reads, k.p, k.q, k.r, clip)
    z = noise.to(cd) if noise is not None else None
    s = state.to(cd) if state is not None else None
    x_next = combine(xf, of, m0, reads, z, s, k.a, k.e, k.c, k.g, k.b)
    if state is not None:
        s_next = combine(xf, of, m0, reads, z, s, k.sa, k.se, k.sc, k.sg, k.sb)
        state.copy_(torch.where(k.writes_state != 0, s_next, s))
    if history is not None:
        history.index_put_((slot[:, 0], samples), m0.to(history.dtype))
    return x_next.to(x.dtype)


def direction(x, out, m0, reads, dir_coeffs):
    """LML's raw direction d_n = da x + de out + db_0 m_0 + sum_i db_i m_i (dir_coeffs = [da, de, db_0..db_k])."""
    da, de, *db = dir_coeffs
    d = da * x + de * out + db[0] * m0
    for w, m in zip(db[1:], reads):
        d = d + w * m
    return d


def lml_gram(
    x: torch.Tensor,
    model_out: torch.Tensor,
    history: torch.Tensor | None,
    read_slots: list[int],
    coeffs: list[float],
    clip: float,
    dirs: torch.Tensor,
    dir_coeffs: list[float],
    guide: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample Gram matrix of LML's directions, float64 of shape (B, 1 + R, 1 + R):

        Gram[b] = V_b^T V_b,   V_b = [d_n, dirs[0], ..., dirs[R-1]] restricted to sample b

    with d_n the raw direction of this step (multistep_update's dir_coeffs row, m_0 computed as there from the
    step row coeffs, clip and the guide included). Sums run over all non-batch dimensions.
    """
    cd = compute_dtype(x.dtype)
    k = step_row.fields(coeffs)
    xf, of = x.to(cd), guided_out(model_out.to(cd), guide, k.guide)
    reads = [history[slot].to(cd) for slot in read_slots]
    m0 = data_prediction(xf, of, reads, k.p, k.q, k.r, clip)
    d_n = direction(xf, of, m0, reads, dir_coeffs)
    v = torch.stack([d_n, *[d.to(cd) for d in dirs]], dim=1).reshape(x.shape[0], dirs.shape[0] + 1, -1)
    v = v.to(torch.float64)
    return v @ v.transpose(1, 2)


def damped_solve(a: torch.Tensor, rhs: torch.Tensor, damping: float) -> torch.Tensor:
    """(damping I + a)^{-1} rhs for a batch of small SPD matrices, without the error check's host sync."""
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    return torch.linalg.solve_ex(a + damping * eye, rhs)[0]


def lml_weights(gram: torch.Tensor, mix: torch.Tensor, damping: float, scale: float) -> torch.Tensor:
    """LML's per-sample direction weights W (B, M) with scale (d'' - d) = V W^T, from Gram = V^T V
    (B, M, M) of the basis V = [d, dirs...] and the mixing matrix C (M, r) with U = V C (float64):

        w = (damping I + C^T Gram C)^{-1} C^T Gram e_0,   c = e_0 - C w   (d' = V c)
        ||d'||^2 = c^T Gram c,  ||d||^2 = Gram_00,  W = scale (||d|| / ||d'|| c - e_0);  W = 0 where ||d'|| = 0.
    """
    gram = gram.to(torch.float64)
    c_mat = mix.to(gram)
    w = damped_solve(c_mat.T @ gram @ c_mat, c_mat.T @ gram[:, :, :1], damping)
    e0 = torch.eye(gram.shape[-1], 1, dtype=gram.dtype, device=gram.device)  # built on the device: no upload
    c = e0 - c_mat @ w  # (B, M, 1)
    n2 = (c.transpose(1, 2) @ gram @ c).view(-1)
    d2 = gram[:, 0, 0]
    ok = n2 > 0
    s = torch.where(ok, torch.sqrt(d2 / torch.where(ok, n2, 1.0)), 1.0)
    weights = scale * (s.view(-1, 1) * c.squeeze(-1) - e0.view(1, -1))
    return torch.where(ok.view(-1, 1), weights, 0.0)


# ---- ems_update: the per-step map with tensor coefficients (DPM-Solver-v3's per-dimension statistics) ----
# Rows of its coefficient tensor (R, *x.shape[1:]), k = len(read_slots):
#   [P, Q, A, H, B_0, ..., B_k, C]  (+ [As, Hs, Bs_0, ..., Bs_k, Cs] when the state is rewritten)
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
        x'  = A x + H s + sum_i B_i m_i + C           m_i = history[read_slots[i-1]], i >= 1
        s'  = As x + Hs s + sum_i Bs_i m_i + Cs       written over the state s when coeffs has that row
        history[write_slot] = m_0                     if history is given

    coeffs: (ems_rows(k, state row), *x.shape[1:]) in float32 (float64 with float64 x); H (and the state)
    only count when a state is given. Returns x'; writes history (and the state) in place.
    """
    cd = compute_dtype(x.dtype)
    k = len(read_slots)
    c = coeffs.to(cd)
    xf, of = x.to(cd), model_out.to(cd)
    reads = [history[slot].to(cd) for slot in read_slots]
    s = state.to(cd) if state is not None else None
    m0 = c[0] * xf + c[1] * of

    def row(r):  # r: [A, H, B_0..B_k, C]
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


# ---------------------------------------------------------------------------------------------------------------
# Particle resampling (docs/smc.md). Every backend runs the same exact integer pipeline on the float32 log-weights,
# so the same uniforms give bitwise identical ancestors and resampling decisions everywhere:
#   x_k = max(lw_k - max_j lw_j, -32)                       one float32 subtraction (exact order-free max)
#   X_k = floor(x_k 2^24)  (int64),  q_k = floor(2^28 e^{x_k})  by a fixed-point exp2 (Horner in int64)
#   C = cumsum(q) (exact), T = C_{K-1};  ESS = T^2 / sum q^2  (sum q^2 from three exact int64 sums, in float64)
# Weights below 2^-28 of the group's largest get q = 0 (no offspring); the rest are exact to ~1e-8 relative.
FKC_MAX_OUTS = 4


def fkc_pairs(n_outs: int) -> list[tuple[int, int]]:
    """The (m, n >= m) pairs of fkc_update's weights, row-major."""
    return [(m, n) for m in range(n_outs) for n in range(m, n_outs)]


def fkc_update(x: torch.Tensor, outs: list[torch.Tensor], coeffs: list[float],
               noise: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-step math of Feynman-Kac correctors (diffsampler.smc), coeffs = [a, c, e_0..e_{M-1}, w_pairs]:

        x'      = a x + sum_m e_m out_m + c z
        inc[b]  = sum_{m <= n} w_mn <out_m, out_n>_b        (float64 dot products over sample b)

    Returns (x', inc); x' in x's dtype, computed in float32 (float64 for float64 inputs)."""
    m = len(outs)
    cd = compute_dtype(x.dtype)
    a, c, e, w = coeffs[0], coeffs[1], coeffs[2:2 + m], coeffs[2 + m:]
    y = a * x.to(cd)
    for em, o in zip(e, outs):
        y = y + em * o.to(cd)
    if noise is not None:
        y = y + c * noise.to(cd)
    flat = [o.reshape(o.shape[0], -1).double() for o in outs]
    inc = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    for wp, (i, j) in zip(w, fkc_pairs(m)):
        inc = inc + wp * torch.linalg.vecdot(flat[i], flat[j], dim=1)
    return y.to(x.dtype), inc


METHODS = ("systematic", "stratified", "multinomial", "residual")
RESAMPLE_WEIGHT_BITS = 28  # q_k <= 2^28; with K <= MAX_PARTICLES every int64 sum below stays under 2^63
MAX_PARTICLES = 1 << 17
EXP_FRAC_BITS = 24  # fixed-point input of the exp: x in steps of 2^-24
EXP_LOG2E = 1549082005  # round(log2(e) 2^30)
EXP2_TAYLOR = (1073741824, 744261118, 257941248, 59597083, 10327387, 1431680, 165394, 16377, 1419, 109)  # ln2^i/i! 2^30
EXP_MIN = -32.0


def quantized_weights(lw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, degenerate): q (G, K) int64 = floor(2^28 exp(lw - max lw)) by the fixed-point pipeline above, and the
    (G,) flag of groups with a NaN or +inf entry or all entries -inf, whose weights are reset to uniform (q = 2^28)."""
    lw = lw.to(torch.float32)
    degenerate = torch.isnan(lw).any(1) | (lw == float("inf")).any(1)
    m = torch.where(torch.isnan(lw), float("-inf"), lw).amax(1, keepdim=True)
    degenerate = degenerate | (m[:, 0] == float("-inf"))
    x = torch.where(degenerate[:, None], torch.zeros_like(lw), lw - m).clamp(min=EXP_MIN)
    X = torch.floor(x * float(1 << EXP_FRAC_BITS)).to(torch.int64)
    y = X * EXP_LOG2E                                   # log2 weight, 2^54 scale
    n = y >> 54                                         # its floor: integer part, in [-47, 0]
    f = (y - n * (1 << 54)) >> 24                       # fraction in [0, 1), 2^30 scale
    p = torch.full_like(f, EXP2_TAYLOR[-1])
    for c in EXP2_TAYLOR[-2::-1]:
        p = c + ((p * f) >> 30)                         # 2^f in [2^30, 2^31)
    return p >> (30 - RESAMPLE_WEIGHT_BITS - n), degenerate


def quantized_ess(q: torch.Tensor) -> torch.Tensor:
    """(G,) float64 ESS = T^2 / sum q^2 with T = sum q: q = hi 2^14 + lo, the three int64 sums are exact, and the
    float64 combination is a fixed sequence of correctly rounded operations."""
    hi, lo = q >> 14, q & ((1 << 14) - 1)
    total = q.sum(1).double()
    sq = (hi * hi).sum(1).double() * 2.0**28 + (hi * lo).sum(1).double() * 2.0**15 + (lo * lo).sum(1).double()
    return total * total / sq


def resample_thresholds(method: int, uniforms: torch.Tensor, total: torch.Tensor, count: torch.Tensor,
                        K: int) -> torch.Tensor:
    """(G, K) int64 sorted positions t_j = min(floor(u_j total), total - 1) of the j < count draws in [0, total)
    (count for residual's remainder, else K; the other entries are `total`, beyond every cumulative weight):
        systematic u_j = (j + U) / K;  stratified u_j = (j + U_j) / K;  multinomial u_j = U_(j) (sorted);
        residual u_j = U_(j) / U_(R) (R = count: given the (R+1)-th smallest of K uniforms, the R below it are
        R sorted uniforms on [0, U_(R)]).
    All in float64, one correctly rounded operation at a time (so every backend gets the same integers)."""
    j = torch.arange(K, dtype=torch.float64, device=uniforms.device)[None, :]
    uniforms = unit(uniforms)
    if method == 0:
        u = (j + uniforms[:, :1]) / K
    elif method == 1:
        u = (j + uniforms) / K
    elif method == 2:
        u = uniforms
    else:
        top = uniforms.gather(1, count.clamp(max=K - 1)[:, None])
        u = torch.where(top > 0, uniforms / torch.where(top > 0, top, 1.0), 0.0)
    t = torch.minimum((u * total.double()[:, None]).to(torch.int64), total[:, None] - 1)
    return torch.where(j < count[:, None], t, total[:, None])


def unit(u: torch.Tensor) -> torch.Tensor:
    """Uniforms clamped into [0, 1], NaN as 0 (ds_unit): positions stay in [0, total) whatever the input."""
    return torch.where(u >= 0, u.clamp(max=1.0), 0.0)


def invalid_uniforms(method: int, uniforms: torch.Tensor) -> torch.Tensor:
    """(G, width) bool: uniforms outside [0, 1) or NaN, and for multinomial / residual below their predecessor
    (ds_uniform_ok)."""
    bad = ~((uniforms >= 0) & (uniforms < 1))
    if method >= 2:
        bad[:, 1:] |= uniforms[:, 1:] < uniforms[:, :-1]
    return bad


def offspring_counts(method: int, q: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """(G, K) int64 N_k: the number of draws j whose position falls in [C_{k-1}, C_k), C = cumsum(q); residual:
    N_k = floor(K q_k / T) + the remainder's draws over the cumulative residuals K q_k mod T."""
    G, K = q.shape
    base = torch.zeros_like(q)
    weights, count = q, torch.full((G,), K, dtype=torch.int64, device=q.device)
    if method == 3:
        T = q.sum(1, keepdim=True)
        base = K * q // T
        weights, count = K * q - T * base, K - base.sum(1)
    C = weights.cumsum(1)
    t = resample_thresholds(method, uniforms, C[:, -1], count, K)
    below = torch.searchsorted(t, C, side="left")      # #{j : t_j < C_k}
    return base + below.diff(dim=1, prepend=torch.zeros_like(below[:, :1]))


def inplace_ancestors(counts: torch.Tensor) -> torch.Tensor:
    """(G, K) int64 ancestors (within-group indices) from offspring counts, arranged for an in-place move: a
    particle with N_k >= 1 keeps its slot (a_k = k); the i-th dead slot (in slot order) takes the i-th extra copy
    (the extra copies listed in particle order: N_k - 1 copies of k)."""
    K = counts.shape[1]
    dead = counts == 0
    extras = (counts - 1).clamp(min=0).cumsum(1)
    rank = dead.to(torch.int64).cumsum(1) - 1
    source = torch.searchsorted(extras, rank, side="right").clamp(max=K - 1)  # smallest k' with extras_k' > rank
    return torch.where(dead, source, torch.arange(K, device=counts.device))  # (the clamp: invalid uniforms only)


def resample_ancestors(log_w: torch.Tensor, uniforms: torch.Tensor, method: int, ess_threshold: float,
                       status: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                    torch.Tensor, torch.Tensor]:
    """Normalise, ESS, decide, draw ancestors (docs/smc.md); returns (log_w_out, ancestors, ess, resampled, log_norm).

        m = max_k lw_k,  s = sum_k exp(lw_k - m)
        log_norm = m + log s = logsumexp_k lw_k      (NaN for a degenerate group)
        ESS      = 1 / sum_k w_k^2,  w = softmax(lw)  (from the quantised weights, see quantized_ess)
        resampled = ESS < ess_threshold * K          (float64; ess_threshold = inf: always)
        log_w_out = -log K if resampled or degenerate, else (lw - m) - log s   (exact at any magnitude)
        ancestors = inplace_ancestors(N) if resampled, else k

    log_w (G, K) float32/float64; uniforms (G, 1) (systematic) or (G, K) float64 in [0, 1), sorted per group
    for multinomial and residual (invalid ones are clamped, see unit, and flagged in `status`); method indexes
    METHODS. float64 log_w gives float64 outputs.
    """
    G, K = log_w.shape
    cd = compute_dtype(log_w.dtype)
    flag(status, invalid_uniforms(method, uniforms), ERROR_BITS["uniform"])
    q, degenerate = quantized_weights(log_w)
    ess = quantized_ess(q)
    resampled = ess < ess_threshold * K
    counts = offspring_counts(method, q, uniforms)
    arange = torch.arange(K, device=log_w.device).expand(G, K)
    ancestors = torch.where(resampled[:, None], inplace_ancestors(counts), arange)
    lw = log_w.to(cd)
    m = torch.where(torch.isnan(lw), float("-inf"), lw).amax(1, keepdim=True)
    shifted = lw - torch.where(torch.isfinite(m), m, 0.0)
    log_s = shifted.exp().sum(1, keepdim=True).log()
    log_norm = torch.where(degenerate, float("nan"), (m + log_s)[:, 0])
    uniform = torch.full_like(lw, -math.log(K))
    log_w_out = torch.where((resampled | degenerate)[:, None], uniform, shifted - log_s)
    return log_w_out.to(log_w.dtype), ancestors.contiguous(), ess.to(cd), resampled, log_norm


def resample_move(particles: torch.Tensor, ancestors: torch.Tensor, resampled: torch.Tensor,
                  status: torch.Tensor | None = None) -> None:
    """particles[n K + k] = particles[n K + ancestors[n, k]] for every row (in place), rows = the first dim (G K)
    or the first two (G, K); with in-place ancestors only the dead slots change (the copy of a row onto itself
    is bitwise the same). Ancestors of resampled groups outside [0, K) are clamped and flagged in `status`."""
    G, K = ancestors.shape
    clamped = ancestors.clamp(0, K - 1)
    flag(status, (clamped != ancestors) & resampled[:, None], ERROR_BITS["ancestor"])
    rows = clamped + K * torch.arange(G, device=ancestors.device)[:, None]
    rows = torch.where(resampled[:, None], rows, torch.arange(G * K, device=rows.device).view(G, K)).reshape(-1)
    flat = particles.reshape(G * K, -1)
    particles.copy_(flat[rows].reshape(particles.shape))
