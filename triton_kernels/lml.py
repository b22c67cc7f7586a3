"""Triton kernel of LML's per-sample Gram matrix (math: python/diffsampler/reference.py, lml_gram).

Program b chunks + c covers elements [c BLOCK, (c + 1) BLOCK) of sample b: it computes d = the direction row from the
update's operands (m0 clipped, never thresholded) and writes the (1 + R)^2 dot products of
v = [d, dirs[0..R-1]] over its elements (an fp32 tree sum, then float64) to partial[b, c]. The partials are
summed over c in float64 by torch: no atomics, the same bits run to run.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from diffsampler import step_row

from .fused_update import STORAGE_DTYPES, _data_prediction, _direction, _guided_out, _load_reads

BLOCK = 1024


@triton.jit
def _entry(base, a: tl.constexpr, c: tl.constexpr, M: tl.constexpr, va, vc):
    """Gram[a, c] = Gram[c, a] = sum va vc over the program's elements."""
    s = tl.sum(va * vc, axis=0).to(tl.float64)
    tl.store(base + a * M + c, s)
    if a != c:
        tl.store(base + c * M + a, s)


@triton.jit
def _lml_gram_kernel(
    x_ptr, out_ptr, r0_ptr, r1_ptr, r2_ptr, d0_ptr, d1_ptr, d2_ptr, d3_ptr, d4_ptr, d5_ptr, partial_ptr, guide_ptr,
    per_sample, chunks,
    p, q, r0, r1, r2, clip, da, de, db0, db1, db2, db3, gw,
    N_READS: tl.constexpr, N_DIRS: tl.constexpr, CLIP: tl.constexpr, BLOCK: tl.constexpr, HAS_GUIDE: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // chunks
    c = pid % chunks
    local = c * BLOCK + tl.arange(0, BLOCK)
    mask = local < per_sample
    offs = b * per_sample + local
    xv = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    ov = _guided_out(out_ptr, guide_ptr, gw, offs, mask, HAS_GUIDE)
    h0, h1, h2 = _load_reads(r0_ptr, r1_ptr, r2_ptr, offs, mask, N_READS)
    m0 = _data_prediction(xv, ov, h0, h1, h2, p, q, r0, r1, r2, clip, N_READS, CLIP)
    d = _direction(xv, ov, m0, h0, h1, h2, da, de, db0, db1, db2, db3, N_READS)  # 0 past the sample's end
    M: tl.constexpr = N_DIRS + 1
    base = partial_ptr + pid * (M * M)
    _entry(base, 0, 0, M, d, d)
    v1 = tl.load(d0_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    _entry(base, 0, 1, M, d, v1)
    _entry(base, 1, 1, M, v1, v1)
    if N_DIRS > 1:
        v2 = tl.load(d1_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        _entry(base, 0, 2, M, d, v2)
        _entry(base, 1, 2, M, v1, v2)
        _entry(base, 2, 2, M, v2, v2)
    if N_DIRS > 2:
        v3 = tl.load(d2_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        _entry(base, 0, 3, M, d, v3)
        _entry(base, 1, 3, M, v1, v3)
        _entry(base, 2, 3, M, v2, v3)
        _entry(base, 3, 3, M, v3, v3)
    if N_DIRS > 3:
        v4 = tl.load(d3_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        _entry(base, 0, 4, M, d, v4)
        _entry(base, 1, 4, M, v1, v4)
        _entry(base, 2, 4, M, v2, v4)
        _entry(base, 3, 4, M, v3, v4)
        _entry(base, 4, 4, M, v4, v4)
    if N_DIRS > 4:
        v5 = tl.load(d4_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        _entry(base, 0, 5, M, d, v5)
        _entry(base, 1, 5, M, v1, v5)
        _entry(base, 2, 5, M, v2, v5)
        _entry(base, 3, 5, M, v3, v5)
        _entry(base, 4, 5, M, v4, v5)
        _entry(base, 5, 5, M, v5, v5)
    if N_DIRS > 5:
        v6 = tl.load(d5_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        _entry(base, 0, 6, M, d, v6)
        _entry(base, 1, 6, M, v1, v6)
        _entry(base, 2, 6, M, v2, v6)
        _entry(base, 3, 6, M, v3, v6)
        _entry(base, 4, 6, M, v4, v6)
        _entry(base, 5, 6, M, v5, v6)
        _entry(base, 6, 6, M, v6, v6)


@torch.library.triton_op("diffsampler::lml_gram_triton", mutates_args=())
def lml_gram_triton(x: torch.Tensor, model_out: torch.Tensor, history: Optional[torch.Tensor], read_slots: list[int],
                    coeffs: list[float], clip: float, dirs: torch.Tensor, dir_coeffs: list[float],
                    guide: Optional[torch.Tensor] = None) -> torch.Tensor:
    """LML's Gram on Triton; the semantics of reference.lml_gram (float64, shape (B, 1 + R, 1 + R))."""
    if x.dtype not in STORAGE_DTYPES:
        raise ValueError(f"the triton backend stores float32, float16 or bfloat16; x has dtype {x.dtype}")
    batch, n_dirs = x.shape[0], dirs.shape[0]
    per_sample = x.numel() // batch
    x, out = x.contiguous(), model_out.contiguous()
    guide = guide.contiguous() if guide is not None else None
    reads = [history[r].contiguous() for r in read_slots] if history is not None else []
    slots = [d.contiguous() for d in dirs.unbind(0)]
    k = len(reads)
    row = step_row.fields(coeffs)
    p, q, r = row.p, row.q, row.r
    da, de, *db = list(dir_coeffs) + [0.0] * (6 - len(dir_coeffs))  # [da, de, db_0..db_3]
    chunks = max(triton.cdiv(per_sample, BLOCK), 1)
    partial = torch.zeros((batch, chunks, n_dirs + 1, n_dirs + 1), dtype=torch.float64, device=x.device)
    if per_sample > 0:
        torch.library.wrap_triton(_lml_gram_kernel)[(batch * chunks,)](
            x, out, *reads, *[x] * (3 - k), *slots, *[x] * (6 - n_dirs), partial, guide if guide is not None else x,
            per_sample, chunks, p, q, r[0], r[1], r[2], clip, da, de, db[0], db[1], db[2], db[3], row.guide,
            N_READS=k, N_DIRS=n_dirs, CLIP=clip > 0, BLOCK=BLOCK, HAS_GUIDE=guide is not None,
        )
    return partial.sum(dim=1)


def lml_gram(x, model_out, history, read_slots, coeffs, clip, dirs, dir_coeffs, guide=None):
    """Entry point with the reference's signature: the registered op."""
    return torch.ops.diffsampler.lml_gram_triton(x, model_out, history, list(read_slots), list(coeffs), clip, dirs,
                                                 list(dir_coeffs), guide)
