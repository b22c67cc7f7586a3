"""Triton kernel of fkc_update (math: python/diffsampler/reference.py, fkc_update): one program per (block of
BLOCK elements, sample); the update in fp32 and the block's weighed pair sums, which the host adds per sample
in float64."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from diffsampler import reference

BLOCK = 1024
STORAGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _pair(u, v, w):
    return w * tl.sum(u * v, axis=0)


@triton.jit
def _fkc_update_kernel(x_ptr, o0_ptr, o1_ptr, o2_ptr, o3_ptr, z_ptr, x_next_ptr, partial_ptr, per_sample, blocks,
                       a, c, e0, e1, e2, e3, w00, w01, w02, w03, w11, w12, w13, w22, w23, w33,
                       N_OUTS: tl.constexpr, HAS_NOISE: tl.constexpr, BLOCK: tl.constexpr):
    sample = tl.program_id(1).to(tl.int64)
    local = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = local < per_sample
    offs = sample * per_sample + local
    o0 = tl.load(o0_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    acc = a * tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) + e0 * o0
    total = _pair(o0, o0, w00)
    if N_OUTS > 1:
        o1 = tl.load(o1_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        acc += e1 * o1
        total += _pair(o0, o1, w01) + _pair(o1, o1, w11)
    if N_OUTS > 2:
        o2 = tl.load(o2_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        acc += e2 * o2
        total += _pair(o0, o2, w02) + _pair(o1, o2, w12) + _pair(o2, o2, w22)
    if N_OUTS > 3:
        o3 = tl.load(o3_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        acc += e3 * o3
        total += _pair(o0, o3, w03) + _pair(o1, o3, w13) + _pair(o2, o3, w23) + _pair(o3, o3, w33)
    if HAS_NOISE:
        acc += c * tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(x_next_ptr + offs, acc.to(x_next_ptr.dtype.element_ty), mask=mask)
    tl.store(partial_ptr + sample * blocks + tl.program_id(0), total)


@torch.library.triton_op("diffsampler::fkc_update_triton", mutates_args=())
def fkc_update(x: torch.Tensor, outs: list[torch.Tensor], coeffs: list[float],
               noise: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """reference.fkc_update on Triton (the pair sums of a block in fp32, the blocks added in float64)."""
    if x.dtype not in STORAGE_DTYPES:
        raise ValueError(f"the triton backend stores float32, float16 or bfloat16; x has dtype {x.dtype}")
    m = len(outs)
    batch = x.shape[0]
    per_sample = max(x.numel() // max(batch, 1), 1)
    x = x.contiguous()
    outs = [o.contiguous() for o in outs]
    z = noise.contiguous() if noise is not None else None
    x_next = torch.empty_like(x)
    blocks = triton.cdiv(per_sample, BLOCK)
    partial = torch.zeros(batch, blocks, dtype=torch.float32, device=x.device)
    if x.numel() > 0:
        a, c, *rest = [float(v) for v in coeffs]
        e = rest[:m] + [0.0] * (4 - m)
        w = dict(zip(reference.fkc_pairs(m), rest[m:]))
        pairs = [w.get(p, 0.0) for p in reference.fkc_pairs(4)]
        ptrs = outs + [x] * (4 - m)
        torch.library.wrap_triton(_fkc_update_kernel)[(blocks, batch)](
            x, *ptrs, z if z is not None else x, x_next, partial, per_sample, blocks, a, c, *e, *pairs,
            N_OUTS=m, HAS_NOISE=z is not None, BLOCK=BLOCK)
    return x_next, partial.double().sum(1)
