"""Triton kernels of the resampling ops (math: python/diffsampler/reference.py and csrc/cuda/resample_math.h).

resample_ancestors: one program per group, passes over the group in BLOCK tiles with carried exact int64 sums
(tl.cumsum per tile plus the carry: a blocked scan, deterministic): max -> quantised weights, their cumulative sum
(workspace) and ESS -> the resample decision -> offspring counts by a binary search of each cumulative weight among
the sorted draw positions -> the in-place ancestor arrangement (survivors keep their slot, dead slots take the
extra copies in order, by a binary search over the extras' cumulative sum). Stores a later pass reads are fenced
by tl.debug_barrier. resample_move: one program per (row, BLOCK chunk), which copies only if the row's group was
resampled and its ancestor is another row. Invalid uniforms are clamped and flagged (DS_ERR_UNIFORM), ancestors
outside [0, K) clamped and flagged (DS_ERR_ANCESTOR).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from diffsampler import error_flags

BLOCK = 1024
MOVE_BLOCK = 4096
ERR_ANCESTOR, ERR_UNIFORM = tl.constexpr(error_flags.BITS["ancestor"]), tl.constexpr(error_flags.BITS["uniform"])


@triton.jit
def _weight_q(x):
    """floor(2^28 exp(x)) for x <= 0 by the fixed-point pipeline (ds_weight_q)."""
    x = tl.maximum(x, -32.0)
    X = tl.floor(x * 16777216.0).to(tl.int64)
    y = X * 1549082005
    n = y >> 54
    f = (y - n * 18014398509481984) >> 24
    p = tl.full(f.shape, 109, tl.int64)
    p = 1419 + ((p * f) >> 30)
    p = 16377 + ((p * f) >> 30)
    p = 165394 + ((p * f) >> 30)
    p = 1431680 + ((p * f) >> 30)
    p = 10327387 + ((p * f) >> 30)
    p = 59597083 + ((p * f) >> 30)
    p = 257941248 + ((p * f) >> 30)
    p = 744261118 + ((p * f) >> 30)
    p = 1073741824 + ((p * f) >> 30)
    return p >> (2 - n)


@triton.jit
def _unit(u):
    """u clamped into [0, 1], NaN as 0 (ds_unit)."""
    return tl.where(u >= 0, tl.minimum(u, 1.0), 0.0)


@triton.jit
def _position(u_row, j, K, count, total, METHOD: tl.constexpr):
    """min(floor(u_j total), total - 1) of draw j (ds_position, the uniforms through _unit); j a tensor of indices
    < count. float64 division is IEEE (correctly rounded) in Triton, like the other backends' (float32's `/` would
    not be)."""
    jf = j.to(tl.float64)
    if METHOD == 0:
        v = (jf + _unit(tl.load(u_row))) / K.to(tl.float64)
    elif METHOD == 1:
        v = (jf + _unit(tl.load(u_row + j))) / K.to(tl.float64)
    elif METHOD == 2:
        v = _unit(tl.load(u_row + j))
    else:
        top = _unit(tl.load(u_row + tl.minimum(count, K - 1)))
        v = tl.where(top > 0, _unit(tl.load(u_row + j)) / tl.where(top > 0, top, 1.0), 0.0)
    t = (v * total.to(tl.float64)).to(tl.int64)
    return tl.minimum(t, total - 1)


@triton.jit
def _draws_below(u_row, c, K, count, total, METHOD: tl.constexpr, STEPS: tl.constexpr):
    """#{j < count : position(j) < c} for each c (positions are sorted in j): a vectorised binary search."""
    lo = tl.zeros(c.shape, tl.int64)
    hi = tl.zeros(c.shape, tl.int64) + count
    for _ in range(STEPS):
        active = lo < hi
        mid = (lo + hi) // 2
        below = _position(u_row, tl.where(active, mid, 0), K, count, total, METHOD) < c
        lo = tl.where(active & below, mid + 1, lo)
        hi = tl.where(active & (~below), mid, hi)
    return lo


@triton.jit(do_not_specialize=["K", "width"])  # K = 1 must stay a tensor (K.to(...) below)
def _resample_ancestors_kernel(lw_ptr, u_ptr, lw_out_ptr, anc_ptr, ess_ptr, res_ptr, log_norm_ptr, cum_ptr, cnt_ptr,
                               limit_ptr, status_ptr, K, width, METHOD: tl.constexpr, STEPS: tl.constexpr,
                               BLOCK: tl.constexpr):
    group = tl.program_id(0).to(tl.int64)
    lw_row, u_row = lw_ptr + group * K, u_ptr + group * width
    cum_row, cnt_row, anc_row = cum_ptr + group * K, cnt_ptr + group * K, anc_ptr + group * K
    lanes = tl.arange(0, BLOCK).to(tl.int64)
    invalid = tl.full((), 0, tl.int32)  # uniforms outside [0, 1), NaN, or unsorted (ds_uniform_ok): flagged
    for start in range(0, width, BLOCK):
        offs = start + lanes
        mask = offs < width
        u = tl.load(u_row + offs, mask=mask, other=0.0)
        bad = ~((u >= 0) & (u < 1))
        if METHOD >= 2:
            prev = tl.load(u_row + offs - 1, mask=mask & (offs > 0), other=0.0)
            bad = bad | (u < prev)
        invalid += tl.sum((bad & mask).to(tl.int32))
    if invalid > 0:
        tl.atomic_or(status_ptr, tl.full((), ERR_UNIFORM, tl.int32))
    m = tl.full((), float("-inf"), tl.float32)
    bad = tl.full((), 0, tl.int32)
    for start in range(0, K, BLOCK):
        offs = start + lanes
        v = tl.load(lw_row + offs, mask=offs < K, other=float("-inf"))
        nan = v != v
        bad += tl.sum((nan | (v == float("inf"))).to(tl.int32))
        m = tl.maximum(m, tl.max(tl.where(nan, float("-inf"), v)))
    degenerate = (bad > 0) | (m == float("-inf"))
    m = tl.where(degenerate, 0.0, m)  # a degenerate group's weights are uniform (x = 0 below)
    total = tl.full((), 0, tl.int64)
    sa = tl.full((), 0, tl.int64)
    sb = tl.full((), 0, tl.int64)
    sc = tl.full((), 0, tl.int64)
    s = tl.full((), 0.0, tl.float32)
    for start in range(0, K, BLOCK):
        offs = start + lanes
        mask = offs < K
        x = tl.where(degenerate, 0.0, tl.load(lw_row + offs, mask=mask, other=0.0) - m)
        q = tl.where(mask, _weight_q(x), 0)
        tl.store(cum_row + offs, tl.cumsum(q, 0) + total, mask=mask)
        total += tl.sum(q)
        hi = q >> 14
        lo = q & 16383
        sa += tl.sum(hi * hi)
        sb += tl.sum(hi * lo)
        sc += tl.sum(lo * lo)
        s += tl.sum(tl.where(mask, tl.exp(x), 0.0))
    td = total.to(tl.float64)
    sq = sa.to(tl.float64) * 268435456.0 + sb.to(tl.float64) * 32768.0 + sc.to(tl.float64)
    ess = td * td / sq
    resampled = ess < tl.load(limit_ptr)  # ess_threshold K in float64 (a float argument would be float32)
    log_s = tl.log(s)
    log_norm = m + log_s
    tl.store(ess_ptr + group, ess.to(tl.float32))
    tl.store(res_ptr + group, resampled.to(tl.int8))
    tl.store(log_norm_ptr + group, tl.where(degenerate, float("nan"), log_norm))
    uniform = -tl.log(K.to(tl.float32))
    for start in range(0, K, BLOCK):
        offs = start + lanes
        mask = offs < K
        v = tl.load(lw_row + offs, mask=mask, other=0.0)
        tl.store(lw_out_ptr + group * K + offs, tl.where(resampled | degenerate, uniform, (v - m) - log_s), mask=mask)
        tl.store(anc_row + offs, offs, mask=mask)
    if resampled:
        count = tl.zeros((), tl.int64) + K
        weight_total = total
        if METHOD == 3:  # floor(K q / T) copies; the remainders K q mod T are the weights of the remainder draws
            tl.debug_barrier()
            carry = tl.full((), 0, tl.int64)
            for start in range(0, K, BLOCK):
                offs = start + lanes
                mask = offs < K
                x = tl.where(degenerate, 0.0, tl.load(lw_row + offs, mask=mask, other=0.0) - m)
                kq = K * tl.where(mask, _weight_q(x), 0)
                base = kq // total
                r = kq - total * base
                tl.store(cnt_row + offs, base, mask=mask)
                tl.store(cum_row + offs, tl.cumsum(r, 0) + carry, mask=mask)
                carry += tl.sum(r)
                count -= tl.sum(base)
            weight_total = carry
        tl.debug_barrier()
        for start in range(0, K, BLOCK):
            offs = start + lanes
            mask = offs < K
            c = tl.load(cum_row + offs, mask=mask, other=0)
            prev = tl.load(cum_row + offs - 1, mask=mask & (offs > 0), other=0)
            n = (_draws_below(u_row, c, K, count, weight_total, METHOD, STEPS)
                 - _draws_below(u_row, prev, K, count, weight_total, METHOD, STEPS))
            if METHOD == 3:
                n += tl.load(cnt_row + offs, mask=mask, other=0)
            tl.store(cnt_row + offs, n, mask=mask)
        tl.debug_barrier()
        extras = tl.full((), 0, tl.int64)
        deaths = tl.full((), 0, tl.int64)
        for start in range(0, K, BLOCK):  # extras' cumulative sum into cum_row; dead slots get -1 - their rank
            offs = start + lanes
            mask = offs < K
            n = tl.load(cnt_row + offs, mask=mask, other=1)
            dead = (n == 0).to(tl.int64)
            tl.store(cum_row + offs, tl.cumsum(tl.maximum(n - 1, 0), 0) + extras, mask=mask)
            rank = tl.cumsum(dead, 0) - 1 + deaths
            tl.store(anc_row + offs, tl.where(dead > 0, -1 - rank, offs), mask=mask)
            extras += tl.sum(tl.maximum(n - 1, 0))
            deaths += tl.sum(dead)
        tl.debug_barrier()
        for start in range(0, K, BLOCK):  # dead slot of rank r: the smallest k' whose extras' sum exceeds r
            offs = start + lanes
            mask = offs < K
            a = tl.load(anc_row + offs, mask=mask, other=0)
            rank = -1 - a
            lo = tl.zeros((BLOCK,), tl.int64)
            hi = tl.zeros((BLOCK,), tl.int64) + K
            for _ in range(STEPS):
                active = lo < hi
                mid = (lo + hi) // 2
                above = tl.load(cum_row + mid, mask=active, other=0) > rank
                lo = tl.where(active & (~above), mid + 1, lo)
                hi = tl.where(active & above, mid, hi)
            tl.store(anc_row + offs, tl.minimum(lo, K - 1), mask=mask & (a < 0))  # (the min: invalid uniforms)


@triton.jit
def _resample_move_kernel(p_ptr, anc_ptr, res_ptr, status_ptr, K, row, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    group = r // K
    raw = tl.load(anc_ptr + r)
    a = tl.minimum(tl.maximum(raw, 0), K - 1)  # clamped into the group; flagged below
    resampled = tl.load(res_ptr + group) != 0
    if resampled & (raw != a) & (tl.program_id(1) == 0):
        tl.atomic_or(status_ptr, tl.full((), ERR_ANCESTOR, tl.int32))
    if resampled & (a != r - group * K):
        offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < row
        v = tl.load(p_ptr + (group * K + a) * row + offs, mask=mask)
        tl.store(p_ptr + r * row + offs, v, mask=mask)


def _status_word(status: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """The caller's status word, or a scratch one (the kernels always record)."""
    return status if status is not None else torch.zeros(1, dtype=torch.int32, device=device)


@torch.library.triton_op("diffsampler::resample_ancestors_triton", mutates_args={"status"})
def resample_ancestors_triton(log_w: torch.Tensor, uniforms: torch.Tensor, method: int, ess_threshold: float,
                              status: torch.Tensor | None = None
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Signature and outputs of diffsampler.reference.resample_ancestors; log_w float32, uniforms float64."""
    G, K = log_w.shape
    log_w, uniforms = log_w.contiguous(), uniforms.contiguous()
    lw_out = torch.empty_like(log_w)
    ancestors = torch.empty((G, K), dtype=torch.int64, device=log_w.device)
    ess, log_norm = log_w.new_empty(G), log_w.new_empty(G)
    resampled = torch.empty(G, dtype=torch.int8, device=log_w.device)
    cum, cnt = torch.empty_like(ancestors), torch.empty_like(ancestors)
    limit = torch.full((1,), ess_threshold * K, dtype=torch.float64, device=log_w.device)  # a fill: no copy, no sync
    torch.library.wrap_triton(_resample_ancestors_kernel)[(G,)](
        log_w, uniforms, lw_out, ancestors, ess, resampled, log_norm, cum, cnt, limit,
        _status_word(status, log_w.device), K, uniforms.shape[1],
        METHOD=method, STEPS=max(1, math.ceil(math.log2(K + 1))), BLOCK=BLOCK)
    return lw_out, ancestors, ess, resampled.bool(), log_norm


@torch.library.triton_op("diffsampler::resample_move_triton", mutates_args={"particles", "status"})
def resample_move_triton(particles: torch.Tensor, ancestors: torch.Tensor, resampled: torch.Tensor,
                         status: torch.Tensor | None = None) -> None:
    """reference.resample_move on Triton: copies the rows of dead slots of resampled groups, in place (ancestors
    clamped into [0, K), flagged in status)."""
    G, K = ancestors.shape
    work = particles if particles.is_contiguous() else particles.contiguous()
    row_bytes = work.numel() // (G * K) * work.element_size()
    word = torch.int32 if row_bytes % 4 == 0 else torch.uint8
    flat = work.view(-1).view(torch.uint8).view(word)
    row = row_bytes // flat.element_size()
    if row > 0:
        torch.library.wrap_triton(_resample_move_kernel)[(G * K, triton.cdiv(row, MOVE_BLOCK))](
            flat, ancestors.contiguous(), resampled.to(torch.int8), _status_word(status, particles.device), K, row,
            BLOCK=MOVE_BLOCK)
    if work is not particles:
        particles.copy_(work)


def resample_ancestors(log_w: torch.Tensor, uniforms: torch.Tensor, method: int, ess_threshold: float,
                       status: torch.Tensor | None = None):
    """Entry point with the reference's signature (the registered op)."""
    if log_w.dtype != torch.float32 or uniforms.dtype != torch.float64:
        raise ValueError(f"log_w must be float32 and uniforms float64, got {log_w.dtype} and {uniforms.dtype}")
    return torch.ops.diffsampler.resample_ancestors_triton(log_w, uniforms, int(method), float(ess_threshold),
                                                           status)


def resample_move(particles: torch.Tensor, ancestors: torch.Tensor, resampled: torch.Tensor,
                  status: torch.Tensor | None = None) -> None:
    """Entry point with the reference's signature (the registered op)."""
    torch.ops.diffsampler.resample_move_triton(particles, ancestors, resampled, status)
