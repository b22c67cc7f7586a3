"""Hostile inputs of the fused ops, run in a subprocess by test_memory_safety.py (a crash is then a failed case).

``python -m memory_probe BACKEND FIRST`` runs the cases from index FIRST on BACKEND (reference | cpu | triton) and
prints one JSON line when a case starts and one with its result. Every buffer a case hands to an op is carved out
of the middle of a larger allocation filled with a sentinel (Arena); the result records whether those guard
regions are unchanged, and how the op answered: "raised" (type, message) or "returned" (the status bits, whether
the outputs are finite, ...).
"""

from __future__ import annotations

import json
import math
import sys

import torch

from diffsampler import ops, reference
from diffsampler.ops import StateRow, StepTable, UpdateCoeffs

SHAPE = (2, 3, 4)
SENTINEL = {torch.float32: 1234.5, torch.float64: 1234.5, torch.int64: -777, torch.int32: -777, torch.bool: True}


class Arena:
    """Buffers as views in the middle of sentinel-filled allocations; `intact` says whether the guards are."""

    def __init__(self):
        self.buffers = []

    def carve(self, value: torch.Tensor) -> torch.Tensor:
        """A copy of value (contiguous) with guards of max(256, 2 numel) elements on either side."""
        n, guard = value.numel(), max(256, 2 * value.numel())
        base = torch.full((2 * guard + n,), SENTINEL[value.dtype], dtype=value.dtype)
        view = base[guard:guard + n].view(value.shape)
        view.copy_(value)
        self.buffers.append((base, guard, n))
        return view

    def intact(self) -> bool:
        return all(bool((base[:g] == SENTINEL[base.dtype]).all() and (base[g + n:] == SENTINEL[base.dtype]).all())
                   for base, g, n in self.buffers)


def _randn(*shape):
    return torch.randn(*shape, generator=GEN)


GEN = torch.Generator().manual_seed(0)
K1 = UpdateCoeffs(p=0.5, q=-0.2, a=0.9, b=(0.3, 0.1), r=(0.05,), g=0.1, state=StateRow(a=0.2, b=(0.1, 0.0), g=0.5))


def indexed_operands(arena, history_slots=3):
    """x, model_out, noise, state, history (history_slots), all carved."""
    return {"x": arena.carve(_randn(*SHAPE)), "model_out": arena.carve(_randn(*SHAPE)),
            "noise": arena.carve(_randn(*SHAPE)), "state": arena.carve(_randn(*SHAPE)),
            "history": arena.carve(torch.zeros(history_slots, *SHAPE))}


def hand_table(arena, slots_row, n_rows=2, n_reads=1):
    """A hand-made StepTable (no history_slots): valid coefficients, the given slots in every row."""
    good = ops.step_table([K1] * n_rows, [0] * n_rows, [(1,)] * n_rows, 3, True)
    slots = torch.tensor([slots_row] * n_rows, dtype=torch.int64)
    return StepTable(arena.carve(good.coeffs), arena.carve(slots), n_reads, True)


def run_indexed(backend, arena, table, step, history_slots=3):
    o = indexed_operands(arena, history_slots)
    x = ops.multistep_update_indexed(o["x"], o["model_out"], table, arena.carve(torch.tensor([step])),
                                     history=o["history"], noise=o["noise"], state=o["state"], backend=backend)
    return {"finite": bool(torch.isfinite(x).all())}


def direct_indexed(backend, arena, slots_row, step):
    """The backend's own entry (no ops checks), with a status word: the device path (clamp and flag)."""
    o = indexed_operands(arena)
    t = hand_table(arena, slots_row)
    status = arena.carve(torch.zeros(1, dtype=torch.int32))
    args = (o["x"], o["model_out"], o["history"], t.coeffs, t.slots, arena.carve(torch.tensor([step])), t.n_reads,
            o["noise"], 0.0, o["state"], status)
    x = backend_fn(backend, "multistep_update_indexed")(*args)
    return {"status": int(status.item()), "finite": bool(torch.isfinite(x).all() and torch.isfinite(o["state"]).all()
                                                         and torch.isfinite(o["history"]).all())}


def backend_fn(backend, name):
    if backend == "reference":
        return getattr(reference, name)
    if backend == "triton":
        from diffsampler import triton_kernels

        return getattr(triton_kernels, name)
    return getattr(torch.ops.diffsampler, name)


def move(backend, arena, bad, direct=False):
    G, K = 2, 5
    particles = arena.carve(_randn(G * K, 3))
    ancestors = torch.arange(K).repeat(G, 1)
    ancestors[1, 2] = bad
    ancestors = arena.carve(ancestors)
    resampled = arena.carve(torch.tensor([True, True]))
    status = arena.carve(torch.zeros(1, dtype=torch.int32))
    if direct:
        backend_fn(backend, "resample_move")(particles, ancestors, resampled, status)
    else:
        ops.move_particles(backend, particles, ancestors, resampled, status)
    return {"status": int(status.item()), "finite": bool(torch.isfinite(particles).all())}


def uniforms(backend, arena, method, values):
    """resample_ancestors on hand-made uniforms through the backend's own entry, with a status word."""
    G, K = 2, 6
    log_w = arena.carve(_randn(G, K))
    width = 1 if method == 0 else K
    u = torch.rand(G, width, generator=GEN, dtype=torch.float64).sort(1).values
    u[1, :len(values)] = torch.tensor(values, dtype=torch.float64)
    status = arena.carve(torch.zeros(1, dtype=torch.int32))
    out = backend_fn(backend, "resample_ancestors")(log_w, arena.carve(u), method, math.inf, status)
    anc = out[1]
    return {"status": int(status.item()), "in_range": bool(((anc >= 0) & (anc < K)).all()),
            "ancestors": anc.tolist()}


def alias_update(backend, arena, which):
    h = arena.carve(_randn(3, *SHAPE))
    x, out, noise, state = (arena.carve(_randn(*SHAPE)) for _ in range(4))
    k = UpdateCoeffs(p=0.5, q=-0.2, a=0.9, b=(0.3, 0.1), c=0.1, g=0.2)
    kwargs = dict(history=h, write_slot=0, read_slots=[1], noise=noise, state=state, check_nan=False,
                  backend=backend)
    if which == "x":
        x = h[0]
    elif which == "noise":
        kwargs["noise"] = h[0]
    elif which == "model_out_shifted":  # a view straddling slots 0 and 1
        out = h.view(-1)[5:5 + out.numel()].view(SHAPE)
    elif which == "state":
        kwargs["state"] = h[0]
    elif which == "expanded_history":
        kwargs["history"] = h[0][None].expand(3, *SHAPE)
    elif which == "state_row_x":
        k = UpdateCoeffs(p=0.5, q=-0.2, a=0.9, b=(0.3, 0.1), c=0.1, g=0.2, state=StateRow(a=0.2, b=(0.1, 0.0)))
        x = state
    ops.multistep_update(x, out, k, **kwargs)
    return {}


def alias_indexed(backend, arena, which):
    o = indexed_operands(arena)
    table = ops.step_table([K1] * 2, [0, 1], [(1,), (2,)], 3, True)
    if which == "x":
        o["x"] = o["history"][2]
    else:
        o["state"] = o["history"][1]
    ops.multistep_update_indexed(o["x"], o["model_out"], table, torch.zeros(1, dtype=torch.int64),
                                 history=o["history"], noise=o["noise"], state=o["state"], backend=backend)
    return {}


def alias_ems(backend, arena):
    h = arena.carve(_randn(2, *SHAPE))
    coeffs = arena.carve(_randn(reference.ems_rows(1, False), *SHAPE[1:]))
    ops.ems_update(h[0], arena.carve(_randn(*SHAPE)), coeffs, history=h, write_slot=0, read_slots=[1],
                   check_nan=False, backend=backend)
    return {}


def table_short_history(backend, arena):
    table = ops.step_table([K1] * 2, [0, 2], [(1,), (1,)], 3, True)
    return run_indexed(backend, arena, table, 1, history_slots=2)


CASES = {
    "indexed_3slot_table_on_2slot_history": table_short_history,
    "indexed_write_slot_-1": lambda b, a: run_indexed(b, a, hand_table(a, [-1, 1, 0, 0]), 0),
    "indexed_write_slot_1e9": lambda b, a: run_indexed(b, a, hand_table(a, [10**9, 1, 0, 0]), 0),
    "indexed_read_slot_-1": lambda b, a: run_indexed(b, a, hand_table(a, [0, -1, 0, 0]), 0),
    "indexed_read_slot_1e9": lambda b, a: run_indexed(b, a, hand_table(a, [0, 10**9, 0, 0]), 0),
    "indexed_step_-1": lambda b, a: run_indexed(b, a, hand_table(a, [0, 1, 2, 2]), -1),
    "indexed_step_100": lambda b, a: run_indexed(b, a, hand_table(a, [0, 1, 2, 2]), 100),
    "indexed_step_2_of_2": lambda b, a: run_indexed(b, a, hand_table(a, [0, 1, 2, 2]), 2),
    "indexed_table_bad_width": lambda b, a: run_indexed(
        b, a, StepTable(a.carve(torch.zeros(2, 5, dtype=torch.float64)), a.carve(torch.zeros(2, 4, dtype=torch.int64)),
                        1, True), 0),
    "indexed_table_float_slots": lambda b, a: run_indexed(
        b, a, StepTable(hand_table(a, [0, 1, 2, 2]).coeffs, a.carve(torch.zeros(2, 4)), 1, True), 0),
    "device_indexed_step_-1": lambda b, a: direct_indexed(b, a, [0, 1, 2, 2], -1),
    "device_indexed_step_100": lambda b, a: direct_indexed(b, a, [0, 1, 2, 2], 100),
    "device_indexed_step_2_of_2": lambda b, a: direct_indexed(b, a, [0, 1, 2, 2], 2),
    "device_indexed_write_slot_-1": lambda b, a: direct_indexed(b, a, [-1, 1, 2, 2], 0),
    "device_indexed_read_slot_1e9": lambda b, a: direct_indexed(b, a, [0, 10**9, 2, 2], 0),
    "move_ancestor_1e7": lambda b, a: move(b, a, 10**7),
    "move_ancestor_-1": lambda b, a: move(b, a, -1),
    "move_ancestor_K": lambda b, a: move(b, a, 5),
    "device_move_ancestor_1e7": lambda b, a: move(b, a, 10**7, direct=True),
    "device_move_ancestor_-1": lambda b, a: move(b, a, -1, direct=True),
    "uniform_nan_systematic": lambda b, a: uniforms(b, a, 0, [float("nan")]),
    "uniform_1.5_systematic": lambda b, a: uniforms(b, a, 0, [1.5]),
    "uniform_-0.5_stratified": lambda b, a: uniforms(b, a, 1, [-0.5]),
    "uniform_nan_multinomial": lambda b, a: uniforms(b, a, 2, [float("nan")]),
    "uniform_unsorted_residual": lambda b, a: uniforms(b, a, 3, [0.9, 0.1]),
    "alias_update_x": lambda b, a: alias_update(b, a, "x"),
    "alias_update_noise": lambda b, a: alias_update(b, a, "noise"),
    "alias_update_model_out_shifted": lambda b, a: alias_update(b, a, "model_out_shifted"),
    "alias_update_state": lambda b, a: alias_update(b, a, "state"),
    "alias_update_expanded_history": lambda b, a: alias_update(b, a, "expanded_history"),
    "alias_update_state_row_x": lambda b, a: alias_update(b, a, "state_row_x"),
    "alias_indexed_x": lambda b, a: alias_indexed(b, a, "x"),
    "alias_indexed_state": lambda b, a: alias_indexed(b, a, "state"),
    "alias_ems_x": lambda b, a: alias_ems(b, a),
}


def main(backend: str, first: int) -> None:
    for i, (name, case) in enumerate(CASES.items()):
        if i < first:
            continue
        print(json.dumps({"i": i, "case": name, "start": True}), flush=True)
        arena = Arena()
        try:
            result = {"outcome": "returned", **case(backend, arena)}
        except Exception as err:  # noqa: BLE001  (the test judges the type and message)
            result = {"outcome": "raised", "type": type(err).__name__, "message": str(err).split("\n")[0][:400]}
        result["guards_intact"] = arena.intact()
        print(json.dumps({"i": i, "case": name, **result}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
