"""Triton kernel of the fused multistep update (math: python/diffsampler/reference.py).

One program per BLOCK elements of the flattened (contiguous) operands, fp32 compute whatever the storage
dtype; the operand set (reads, noise, state, m0 write, LML's N_DIRS directions and weights) and the phase are
constexpr, so each combination compiles to a kernel without dead loads. Thresholding runs two launches around
the per-sample quantile (torch ops): CONVERT writes the data prediction, THRESHOLD rescales it, maps it to the
history value (hx x + hm x0) and updates. LML's direction d is
computed from the update's loads: x' += W[b, 0] d + sum_j W[b, 1 + j] dirs[j], then dirs[dir_slot] = d.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from diffsampler import error_flags, reference, step_row

PHASE_FULL, PHASE_CONVERT, PHASE_THRESHOLD = 0, 1, 2
BLOCK = 1024
# The step row's offsets (diffsampler.step_row, the one definition) as constexprs of the kernels.
ROW = {name: tl.constexpr(offset) for name, offset in step_row.LAYOUT.items()}
ROW_P, ROW_Q, ROW_A, ROW_E, ROW_C = ROW["P"], ROW["Q"], ROW["A"], ROW["E"], ROW["C"]
ROW_B, ROW_R, ROW_G, ROW_SA, ROW_SE, ROW_SC, ROW_SG, ROW_SB = (ROW[n] for n in ("B", "R", "G", "SA", "SE", "SC",
                                                                                 "SG", "SB"))
ROW_WRITES_STATE, ROW_GUIDE, ROW_WIDTH = ROW["WRITES_STATE"], ROW["GUIDE"], ROW["WIDTH"]
SLOTS_WIDTH = tl.constexpr(step_row.SLOTS_WIDTH)
ERR_STEP, ERR_SLOT = tl.constexpr(error_flags.BITS["step"]), tl.constexpr(error_flags.BITS["slot"])
STORAGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _load_reads(r0_ptr, r1_ptr, r2_ptr, offs, mask, N_READS: tl.constexpr):
    """The N_READS history reads at offs in fp32, 0 where masked (0.0 stands in for the absent ones)."""
    h0, h1, h2 = 0.0, 0.0, 0.0
    if N_READS > 0:
        h0 = tl.load(r0_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if N_READS > 1:
        h1 = tl.load(r1_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if N_READS > 2:
        h2 = tl.load(r2_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return h0, h1, h2


@triton.jit
def _guided_out(out_ptr, guide_ptr, gw, offs, mask, HAS_GUIDE: tl.constexpr):
    """The model output at offs in fp32 as the update sees it: out + gw guide when HAS_GUIDE, 0 where masked."""
    ov = tl.load(out_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_GUIDE:
        ov += gw * tl.load(guide_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return ov


@triton.jit
def _data_prediction(xv, ov, h0, h1, h2, p, q, r0, r1, r2, clip, N_READS: tl.constexpr, CLIP: tl.constexpr):
    """m0 = p x + q out + sum_i r_i read_i, clamped to [-clip, clip] when CLIP."""
    m0 = p * xv + q * ov
    if N_READS > 0:
        m0 += r0 * h0
    if N_READS > 1:
        m0 += r1 * h1
    if N_READS > 2:
        m0 += r2 * h2
    if CLIP:
        m0 = tl.minimum(tl.maximum(m0, -clip), clip)
    return m0


@triton.jit
def _direction(xv, ov, m0, h0, h1, h2, da, de, db0, db1, db2, db3, N_READS: tl.constexpr):
    """LML's raw direction d = da x + de out + db0 m0 + sum_i db_i read_i."""
    d = da * xv + de * ov + db0 * m0
    if N_READS > 0:
        d += db1 * h0
    if N_READS > 1:
        d += db2 * h1
    if N_READS > 2:
        d += db3 * h2
    return d


@triton.jit
def _row_field(row, offset: tl.constexpr):
    return tl.load(row + offset).to(tl.float32)


@triton.jit
def _load_row(row):
    """The step row at pointer `row` (float64, diffsampler.step_row) as fp32 scalars, in the kernel's order:
    (p, q, a, e, c, g, b0..b3, r0..r2, sa, se, sc, sg, sb0..sb3, writes_state, guide)."""
    return (_row_field(row, ROW_P), _row_field(row, ROW_Q), _row_field(row, ROW_A), _row_field(row, ROW_E),
            _row_field(row, ROW_C), _row_field(row, ROW_G),
            _row_field(row, ROW_B), _row_field(row, ROW_B + 1), _row_field(row, ROW_B + 2), _row_field(row, ROW_B + 3),
            _row_field(row, ROW_R), _row_field(row, ROW_R + 1), _row_field(row, ROW_R + 2),
            _row_field(row, ROW_SA), _row_field(row, ROW_SE), _row_field(row, ROW_SC), _row_field(row, ROW_SG),
            _row_field(row, ROW_SB), _row_field(row, ROW_SB + 1), _row_field(row, ROW_SB + 2),
            _row_field(row, ROW_SB + 3), _row_field(row, ROW_WRITES_STATE), _row_field(row, ROW_GUIDE))


@triton.jit
def _clamp_slot(j, n_slots):
    """A history slot clamped into [0, n_slots)."""
    return tl.minimum(tl.maximum(j, 0), n_slots - 1)


@triton.jit
def _slot_error(j, n_slots, USED: tl.constexpr):
    """The slot error bit when the slot is used and outside [0, n_slots), else 0."""
    if USED:
        return tl.where((j >= 0) & (j < n_slots), 0, ERR_SLOT)
    return 0


@triton.jit
def _multistep_update_kernel(
    x_ptr, out_ptr, r0_ptr, r1_ptr, r2_ptr, z_ptr, s_ptr, m0_ptr, x_next_ptr, scale_ptr,
    d0_ptr, d1_ptr, d2_ptr, d3_ptr, d4_ptr, d5_ptr, dw_ptr, w_ptr, guide_ptr,
    n, per_sample,
    p, q, a, e, c, g, b0, b1, b2, b3, r0, r1, r2, clip, hx, hm,
    sa, se, sc, sg, sb0, sb1, sb2, sb3, writes_state, gw,
    da, de, db0, db1, db2, db3,
    table_ptr, slots_ptr, step_ptr, hist_ptr, n_steps, n_slots, status_ptr,
    N_READS: tl.constexpr, HAS_NOISE: tl.constexpr, STATE: tl.constexpr, WRITE_M0: tl.constexpr,
    CLIP: tl.constexpr, PHASE: tl.constexpr, N_DIRS: tl.constexpr, WEIGHTS: tl.constexpr, BLOCK: tl.constexpr,
    INDEXED: tl.constexpr, PER_SAMPLE_STEPS: tl.constexpr, HAS_GUIDE: tl.constexpr,
):
    # elements [start, end): the whole tensor, or with per-sample steps sample program_id(1)'s
    start, end = 0, n
    if PER_SAMPLE_STEPS:
        sample = tl.program_id(1).to(tl.int64)
        start, end = sample * per_sample, sample * per_sample + per_sample
        step_ptr += sample
    if INDEXED:  # the step's row and history slots, read on the device (_load_row), clamped
        i = tl.load(step_ptr)
        err = tl.where((i >= 0) & (i < n_steps), 0, ERR_STEP)
        i = tl.minimum(tl.maximum(i, 0), n_steps - 1)
        (p, q, a, e, c, g, b0, b1, b2, b3, r0, r1, r2, sa, se, sc, sg, sb0, sb1, sb2, sb3,
         writes_state, gw) = _load_row(table_ptr + i * ROW_WIDTH)
        slot = slots_ptr + i * SLOTS_WIDTH
        w, j0, j1, j2 = tl.load(slot), tl.load(slot + 1), tl.load(slot + 2), tl.load(slot + 3)
        err |= _slot_error(w, n_slots, WRITE_M0)
        err |= _slot_error(j0, n_slots, N_READS > 0) | _slot_error(j1, n_slots, N_READS > 1)
        err |= _slot_error(j2, n_slots, N_READS > 2)
        m0_ptr = hist_ptr + _clamp_slot(w, n_slots) * n
        r0_ptr = hist_ptr + _clamp_slot(j0, n_slots) * n
        r1_ptr = hist_ptr + _clamp_slot(j1, n_slots) * n
        r2_ptr = hist_ptr + _clamp_slot(j2, n_slots) * n
        if (err != 0) & (tl.program_id(0) == 0):
            tl.atomic_or(status_ptr, err.to(tl.int32))
    offs = start + tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < end
    xv = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    ov = _guided_out(out_ptr, guide_ptr, gw, offs, mask, HAS_GUIDE)
    h0, h1, h2 = _load_reads(r0_ptr, r1_ptr, r2_ptr, offs, mask, N_READS)
    if PHASE == 2:
        s = tl.load(scale_ptr + offs // per_sample, mask=mask, other=1.0)
        m0 = tl.load(m0_ptr + offs, mask=mask).to(tl.float32)
        m0 = hx * xv + hm * (tl.minimum(tl.maximum(m0, -s), s) / s)  # the history value (reference.threshold)
    else:
        m0 = _data_prediction(xv, ov, h0, h1, h2, p, q, r0, r1, r2, clip, N_READS, CLIP)
    if WRITE_M0:
        tl.store(m0_ptr + offs, m0.to(m0_ptr.dtype.element_ty), mask=mask)
    if PHASE != 1:
        acc = a * xv + b0 * m0 + e * ov
        sacc = sa * xv + sb0 * m0 + se * ov
        if N_READS > 0:
            acc += b1 * h0
            sacc += sb1 * h0
        if N_READS > 1:
            acc += b2 * h1
            sacc += sb2 * h1
        if N_READS > 2:
            acc += b3 * h2
            sacc += sb3 * h2
        if HAS_NOISE:
            zv = tl.load(z_ptr + offs, mask=mask).to(tl.float32)
            acc += c * zv
            sacc += sc * zv
        if STATE > 0:
            sv = tl.load(s_ptr + offs, mask=mask).to(tl.float32)
            acc += g * sv
            sacc += sg * sv
        if N_DIRS > 0:
            dv = _direction(xv, ov, m0, h0, h1, h2, da, de, db0, db1, db2, db3, N_READS)
            if WEIGHTS:  # W[b, 0] d + sum_j W[b, 1 + j] dirs[j], b = the element's sample
                w_row = w_ptr + (offs // per_sample) * (N_DIRS + 1)
                acc += tl.load(w_row, mask=mask, other=0.0) * dv
                acc += tl.load(w_row + 1, mask=mask, other=0.0) * tl.load(d0_ptr + offs, mask=mask).to(tl.float32)
                if N_DIRS > 1:
                    acc += tl.load(w_row + 2, mask=mask, other=0.0) * tl.load(d1_ptr + offs, mask=mask).to(tl.float32)
                if N_DIRS > 2:
                    acc += tl.load(w_row + 3, mask=mask, other=0.0) * tl.load(d2_ptr + offs, mask=mask).to(tl.float32)
                if N_DIRS > 3:
                    acc += tl.load(w_row + 4, mask=mask, other=0.0) * tl.load(d3_ptr + offs, mask=mask).to(tl.float32)
                if N_DIRS > 4:
                    acc += tl.load(w_row + 5, mask=mask, other=0.0) * tl.load(d4_ptr + offs, mask=mask).to(tl.float32)
                if N_DIRS > 5:
                    acc += tl.load(w_row + 6, mask=mask, other=0.0) * tl.load(d5_ptr + offs, mask=mask).to(tl.float32)
            tl.store(dw_ptr + offs, dv.to(dw_ptr.dtype.element_ty), mask=mask)  # after the ring's reads
        tl.store(x_next_ptr + offs, acc.to(x_next_ptr.dtype.element_ty), mask=mask)
        if STATE == 2:
            if writes_state != 0:  # indexed: the step's row decides
                tl.store(s_ptr + offs, sacc.to(s_ptr.dtype.element_ty), mask=mask)


def _launch(phase, x, out, reads, noise, state, m0, x_next, scale, coeffs, clip, lml=None, indexed=None, guide=None):
    """One kernel launch with the step row `coeffs` (step_row.fields: its hx, hm serve the threshold phase, its
    guide weight the guide, out + w guide, when one is given);
    lml = (ring slots, the slot written, dir_coeffs, weights or None) or None; indexed = (table, slots, step,
    history or None, status): the row and the read/m0 pointers come from the device, the step and slots clamped
    into range (flagged in status); a step of B entries gives each sample its own row (a grid row per sample)."""
    n = x.numel()
    k = step_row.fields(coeffs)
    dummy = x  # stands in for absent pointers; never dereferenced (the constexpr flags skip it)
    ptrs = [*(reads + [dummy] * (3 - len(reads))), noise if noise is not None else dummy,
            state if state is not None else dummy, m0 if m0 is not None else dummy, x_next,
            scale if scale is not None else dummy]
    slots, written, dir_coeffs, weights = lml if lml is not None else ([], dummy, [], None)
    da, de, *db = list(dir_coeffs) + [0.0] * (6 - len(dir_coeffs))  # [da, de, db_0..db_3]
    lml_ptrs = [*slots, *[dummy] * (6 - len(slots)), written, weights if weights is not None else dummy,
                guide if guide is not None else dummy]
    table, slot_table, step, history, status = indexed if indexed is not None else (dummy, dummy, dummy, None, None)
    writes_state = indexed is not None or k.writes_state != 0  # indexed: each step's row decides on the device
    per_sample = max(n // x.shape[0], 1)
    per_sample_steps = indexed is not None and indexed[2].numel() > 1
    grid = (triton.cdiv(per_sample, BLOCK), x.shape[0]) if per_sample_steps else (triton.cdiv(n, BLOCK),)
    torch.library.wrap_triton(_multistep_update_kernel)[grid](
        x, out, *ptrs, *lml_ptrs, n, per_sample,
        k.p, k.q, k.a, k.e, k.c, k.g, *k.b, *k.r, clip, k.hx, k.hm,
        k.sa, k.se, k.sc, k.sg, *k.sb, k.writes_state, k.guide,
        da, de, db[0], db[1], db[2], db[3],
        table, slot_table, step, history if history is not None else dummy, table.shape[0],
        history.shape[0] if history is not None else 1, status if status is not None else dummy,
        N_READS=len(reads), HAS_NOISE=noise is not None, STATE=0 if state is None else (2 if writes_state else 1),
        WRITE_M0=m0 is not None, CLIP=clip > 0, PHASE=phase, N_DIRS=len(slots), WEIGHTS=weights is not None,
        BLOCK=BLOCK, INDEXED=indexed is not None, PER_SAMPLE_STEPS=per_sample_steps, HAS_GUIDE=guide is not None,
    )


def _update(x, model_out, history, write_slot, read_slots, coeffs, noise, clip, thresholding, state, dirs=None,
            dir_slot=0, dir_coeffs=None, dir_weights=None, guide=None):
    """The fused multistep update on Triton; the semantics of reference.multistep_update (coeffs: the step row)."""
    if x.dtype not in STORAGE_DTYPES:
        raise ValueError(f"the triton backend stores float32, float16 or bfloat16; x has dtype {x.dtype}")
    if len(coeffs) != step_row.WIDTH:
        raise ValueError(f"coeffs must be a step row of {step_row.WIDTH} entries (diffsampler.step_row), got "
                         f"{len(coeffs)}")
    k = step_row.fields(coeffs)
    writes_state = k.writes_state != 0
    if writes_state and state is None:
        raise ValueError("coeffs rewrites the state (its writes_state entry is set): state is required")
    x, out = x.contiguous(), model_out.contiguous()
    reads = [history[r].contiguous() for r in read_slots] if history is not None else []
    noise = noise.contiguous() if noise is not None else None
    guide = guide.contiguous() if guide is not None else None
    s = state.contiguous() if state is not None else None
    slot = history[write_slot] if history is not None else None
    m0 = None
    if slot is not None:
        m0 = slot if slot.is_contiguous() else torch.empty_like(slot, memory_format=torch.contiguous_format)
    elif thresholding:
        m0 = torch.empty_like(x)  # scratch of the two-pass threshold
    lml = None
    if dirs is not None:
        slots = [d.contiguous() for d in dirs.unbind(0)]  # views where they already are
        weights = dir_weights.to(torch.float32).contiguous() if dir_weights is not None else None
        lml = (slots, slots[dir_slot], list(dir_coeffs), weights)
    x_next = torch.empty_like(x)
    common = (x, out, reads, noise, s, m0, x_next)
    if x.numel() > 0:
        if thresholding:
            _launch(PHASE_CONVERT, *common, None, coeffs, clip, guide=guide)
            scale = reference.threshold_scale(m0.float(), k.ratio, k.max_value).float().contiguous()
            _launch(PHASE_THRESHOLD, *common, scale, coeffs, clip, lml, guide=guide)
        else:
            _launch(PHASE_FULL, *common, None, coeffs, clip, lml, guide=guide)
    if slot is not None and m0 is not slot:
        slot.copy_(m0)
    if lml is not None and not dirs[dir_slot].is_contiguous():
        dirs[dir_slot].copy_(lml[1])
    if writes_state and s is not state:
        state.copy_(s)
    return x_next


@torch.library.triton_op("diffsampler::multistep_update_triton", mutates_args={"history", "state", "dirs"})
def multistep_update_triton(
    x: torch.Tensor, model_out: torch.Tensor, history: torch.Tensor | None, write_slot: int, read_slots: list[int],
    coeffs: list[float], noise: torch.Tensor | None, clip: float, thresholding: bool,
    state: torch.Tensor | None = None, dirs: Optional[torch.Tensor] = None, dir_slot: int = 0,
    dir_coeffs: Optional[list[float]] = None, dir_weights: Optional[torch.Tensor] = None,
    guide: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    return _update(x, model_out, history, write_slot, read_slots, coeffs, noise, clip, thresholding, state, dirs,
                   dir_slot, dir_coeffs, dir_weights, guide)


@torch.library.triton_op("diffsampler::multistep_update_functional_triton", mutates_args=())
def multistep_update_functional_triton(x: torch.Tensor, model_out: torch.Tensor, coeffs: list[float],
                                      noise: torch.Tensor | None, clip: float, thresholding: bool,
                                      guide: torch.Tensor | None = None) -> torch.Tensor:
    """Without history or state: a functional op (see csrc/multistep_update.h, kMultistepUpdateFunctionalSchema)."""
    return _update(x, model_out, None, 0, [], coeffs, noise, clip, thresholding, None, guide=guide)


def multistep_update(x, model_out, history, write_slot, read_slots, coeffs, noise, clip, thresholding, state=None,
                     dirs=None, dir_slot=0, dir_coeffs=(), dir_weights=None, guide=None):
    """Entry point with the reference's signature: the registered op, the functional one when there is neither
    history nor state nor LML's ring."""
    if history is None and state is None and dirs is None:
        return torch.ops.diffsampler.multistep_update_functional_triton(x, model_out, list(coeffs), noise, clip,
                                                                        thresholding, guide)
    return torch.ops.diffsampler.multistep_update_triton(x, model_out, history, write_slot, list(read_slots),
                                                         list(coeffs), noise, clip, thresholding, state, dirs,
                                                         dir_slot, list(dir_coeffs), dir_weights, guide)


@torch.library.triton_op("diffsampler::multistep_update_indexed_triton", mutates_args={"history", "state", "status"})
def multistep_update_indexed(x: torch.Tensor, model_out: torch.Tensor, history: torch.Tensor | None,
                             table: torch.Tensor, slots: torch.Tensor, step: torch.Tensor, n_reads: int,
                             noise: torch.Tensor | None, clip: float, state: torch.Tensor | None,
                             status: torch.Tensor | None = None, guide: torch.Tensor | None = None) -> torch.Tensor:
    """reference.multistep_update_indexed on Triton: the row and slots are loaded (and clamped, flagged in
    status) by the kernel itself."""
    if x.dtype not in STORAGE_DTYPES:
        raise ValueError(f"the triton backend stores float32, float16 or bfloat16; x has dtype {x.dtype}")
    x, out = x.contiguous(), model_out.contiguous()
    noise = noise.contiguous() if noise is not None else None
    guide = guide.contiguous() if guide is not None else None
    if status is None:  # the kernel always records; nobody reads this one
        status = torch.zeros(1, dtype=torch.int32, device=x.device)
    x_next = torch.empty_like(x)
    reads = [x] * n_reads  # placeholders: the kernel points them at the step's slots
    if x.numel() > 0:  # the kernel loads each step's row: the host row is a placeholder
        _launch(PHASE_FULL, x, out, reads, noise, state, history, x_next, None, [0.0] * step_row.WIDTH, clip,
                indexed=(table, slots, step.reshape(-1).contiguous(), history, status), guide=guide)
    return x_next
