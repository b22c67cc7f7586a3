"""Triton kernel of ems_update (math: python/diffsampler/reference.py, ems_update).

One program per BLOCK elements of the flattened (contiguous) operands, fp32 compute whatever the storage dtype;
the coefficient rows are indexed by the position in the sample (offs mod per_sample). The number of reads, the
state mode and the m0 write are constexpr.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024
STORAGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _ems_update_kernel(x_ptr, out_ptr, r0_ptr, r1_ptr, r2_ptr, s_ptr, m0_ptr, x_next_ptr, c_ptr, n, D,
                       N_READS: tl.constexpr, STATE: tl.constexpr, WRITE_M0: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    d = offs % D
    xv = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    ov = tl.load(out_ptr + offs, mask=mask).to(tl.float32)
    m0 = tl.load(c_ptr + d, mask=mask) * xv + tl.load(c_ptr + D + d, mask=mask) * ov
    if WRITE_M0:
        tl.store(m0_ptr + offs, m0.to(m0_ptr.dtype.element_ty), mask=mask)
    acc = (tl.load(c_ptr + 2 * D + d, mask=mask) * xv + tl.load(c_ptr + 4 * D + d, mask=mask) * m0
           + tl.load(c_ptr + (5 + N_READS) * D + d, mask=mask))
    sc = c_ptr + (6 + N_READS) * D  # the state row
    if STATE == 2:
        sacc = (tl.load(sc + d, mask=mask) * xv + tl.load(sc + 2 * D + d, mask=mask) * m0
                + tl.load(sc + (3 + N_READS) * D + d, mask=mask))
    if N_READS > 0:
        h = tl.load(r0_ptr + offs, mask=mask).to(tl.float32)
        acc += tl.load(c_ptr + 5 * D + d, mask=mask) * h
        if STATE == 2:
            sacc += tl.load(sc + 3 * D + d, mask=mask) * h
    if N_READS > 1:
        h = tl.load(r1_ptr + offs, mask=mask).to(tl.float32)
        acc += tl.load(c_ptr + 6 * D + d, mask=mask) * h
        if STATE == 2:
            sacc += tl.load(sc + 4 * D + d, mask=mask) * h
    if N_READS > 2:
        h = tl.load(r2_ptr + offs, mask=mask).to(tl.float32)
        acc += tl.load(c_ptr + 7 * D + d, mask=mask) * h
        if STATE == 2:
            sacc += tl.load(sc + 5 * D + d, mask=mask) * h
    if STATE > 0:
        sv = tl.load(s_ptr + offs, mask=mask).to(tl.float32)
        acc += tl.load(c_ptr + 3 * D + d, mask=mask) * sv
        if STATE == 2:
            sacc += tl.load(sc + D + d, mask=mask) * sv
    tl.store(x_next_ptr + offs, acc.to(x_next_ptr.dtype.element_ty), mask=mask)
    if STATE == 2:
        tl.store(s_ptr + offs, sacc.to(s_ptr.dtype.element_ty), mask=mask)


@torch.library.triton_op("diffsampler::ems_update_triton", mutates_args={"history", "state"})
def ems_update_triton(x: torch.Tensor, model_out: torch.Tensor, coeffs: torch.Tensor, history: torch.Tensor | None,
                      write_slot: int, read_slots: list[int], state: torch.Tensor | None) -> torch.Tensor:
    if x.dtype not in STORAGE_DTYPES:
        raise ValueError(f"the triton backend stores float32, float16 or bfloat16; x has dtype {x.dtype}")
    k = len(read_slots)
    x, out, c = x.contiguous(), model_out.contiguous(), coeffs.contiguous()
    reads = [history[r].contiguous() for r in read_slots] if history is not None else []
    s = state.contiguous() if state is not None else None
    state_mode = 0 if state is None else (2 if c.shape[0] > 6 + k else 1)
    slot = history[write_slot] if history is not None else None
    m0 = None
    if slot is not None:
        m0 = slot if slot.is_contiguous() else torch.empty_like(slot, memory_format=torch.contiguous_format)
    x_next = torch.empty_like(x)
    n = x.numel()
    if n > 0:
        dummy = x  # stands in for absent pointers; never dereferenced (the constexpr flags skip it)
        ptrs = [*(reads + [dummy] * (3 - k)), s if s is not None else dummy, m0 if m0 is not None else dummy]
        torch.library.wrap_triton(_ems_update_kernel)[(triton.cdiv(n, BLOCK),)](
            x, out, *ptrs, x_next, c, n, n // x.shape[0],
            N_READS=k, STATE=state_mode, WRITE_M0=m0 is not None, BLOCK=BLOCK)
    if slot is not None and m0 is not slot:
        slot.copy_(m0)
    if state_mode == 2 and s is not state:
        state.copy_(s)
    return x_next


def ems_update(x, model_out, coeffs, history, write_slot, read_slots, state=None):
    """Entry point with the reference's signature (diffsampler.reference.ems_update): the registered op."""
    return torch.ops.diffsampler.ems_update_triton(x, model_out, coeffs, history, write_slot, list(read_slots), state)
