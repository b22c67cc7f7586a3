"""Hostile inputs never touch memory outside their buffers: out-of-range step indices, table slots, ancestors and
uniforms, tables that do not fit the history, and operands that alias a buffer the op writes. Each case runs in
a subprocess (tests/memory_probe.py), so a crash fails that case instead of the run, with every buffer carved out
of a larger allocation whose guard regions must stay unchanged. The answer is a clear exception (ops on CPU
tensors), or, through a backend's own entry with a status word, the error bit set and finite results."""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import memory_probe
from diffsampler import ops

TESTS = Path(__file__).resolve().parent
BACKENDS = ["reference", "cpu", "triton"]
STEP, SLOT, ANCESTOR, UNIFORM = r"step.*outside the (step )?table", r"slot .*outside the history", \
    r"ancestor.*outside \[0, K", r"uniform"
# case -> the message of the exception on CPU tensors (ops), or for the device_* / uniform_* cases (a backend's
# own entry) the error bit the clamping backends set (the C++ CPU kernels raise: value pattern for them)
EXPECT = {
    "indexed_3slot_table_on_2slot_history": r"history has 2 slots; the table addresses 3",
    "indexed_write_slot_-1": SLOT, "indexed_write_slot_1e9": SLOT, "indexed_read_slot_-1": SLOT,
    "indexed_read_slot_1e9": SLOT, "indexed_step_-1": STEP, "indexed_step_100": STEP, "indexed_step_2_of_2": STEP,
    "indexed_table_bad_width": r"table.coeffs must be", "indexed_table_float_slots": r"table.slots must be",
    "device_indexed_step_-1": (1, STEP), "device_indexed_step_100": (1, STEP), "device_indexed_step_2_of_2": (1, STEP),
    "device_indexed_write_slot_-1": (2, SLOT), "device_indexed_read_slot_1e9": (2, SLOT),
    "move_ancestor_1e7": ANCESTOR, "move_ancestor_-1": ANCESTOR, "move_ancestor_K": ANCESTOR,
    "device_move_ancestor_1e7": (4, ANCESTOR), "device_move_ancestor_-1": (4, ANCESTOR),
    "uniform_nan_systematic": (8, UNIFORM), "uniform_1.5_systematic": (8, UNIFORM),
    "uniform_-0.5_stratified": (8, UNIFORM), "uniform_nan_multinomial": (8, UNIFORM),
    "uniform_unsorted_residual": (8, UNIFORM),
    **{name: r"shares memory with" for name in memory_probe.CASES if name.startswith("alias_")},
}
AGREE = ["uniform_nan_systematic", "uniform_1.5_systematic", "uniform_-0.5_stratified", "uniform_nan_multinomial"]


def run_isolated(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    """python ARGS in a subprocess with this checkout's package and tests on PYTHONPATH (Triton interpreted)."""
    path = [str(TESTS.parent / "python"), str(TESTS), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in path if p), TRITON_INTERPRET="1")
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=TESTS)


@functools.cache
def probe(backend: str) -> dict:
    """Every case's result on backend; a case that kills its process is recorded as crashed and the run resumes
    after it."""
    results, first = {}, 0
    while first < len(memory_probe.CASES):
        proc = run_isolated(["-m", "memory_probe", backend, str(first)])
        lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        for line in lines:
            if not line.get("start"):
                results[line["case"]] = line
        if proc.returncode == 0:
            break
        started = [line for line in lines if line.get("start")]
        crashed = started[-1] if started else {"i": first, "case": list(memory_probe.CASES)[first]}
        results[crashed["case"]] = {"outcome": f"crashed (exit {proc.returncode})", "stderr": proc.stderr[-2000:]}
        first = crashed["i"] + 1
    return results


def _available(backend):
    status = ops.backends()
    if not status[backend]:
        pytest.skip(status["reasons"][backend])


@pytest.mark.parametrize("case", list(memory_probe.CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_hostile_input(backend, case):
    _available(backend)
    got = probe(backend)[case]
    assert got["outcome"] in ("raised", "returned"), got
    assert got["guards_intact"], f"{case} on {backend} wrote outside its buffers"
    want = EXPECT[case]
    if isinstance(want, tuple) and backend != "cpu":  # a backend that clamps and flags
        bit, _ = want
        assert got["outcome"] == "returned", got
        assert got["status"] == bit, got
        assert got.get("finite", True) and got.get("in_range", True), got
        return
    pattern = want[1] if isinstance(want, tuple) else want
    assert got["outcome"] == "raised" and got["type"] in ("ValueError", "RuntimeError"), got
    assert re.search(pattern, got["message"]), got["message"]


@pytest.mark.parametrize("case", AGREE)
def test_clamped_uniforms_give_the_same_ancestors_everywhere(case):
    """Out-of-range uniforms (sorted) are clamped into [0, 1] (NaN as 0) the same way on every backend."""
    _available("triton")
    assert probe("reference")[case]["ancestors"] == probe("triton")[case]["ancestors"]


PROPERTY = r'''
import torch
from hypothesis import given, settings, strategies as st, HealthCheck
from diffsampler import ops
from diffsampler.ops import StepTable, UpdateCoeffs, StateRow
from memory_probe import Arena

BACKEND = "{backend}"
SHAPE = (2, 5)
index = st.one_of(st.integers(-3, 5), st.sampled_from([-10**9, 10**9]))


@settings(max_examples={examples}, deadline=None, suppress_health_check=list(HealthCheck))
@given(n_steps=st.integers(1, 3), slots=st.integers(1, 4), n_reads=st.integers(0, 3), step=index,
       rows=st.lists(st.lists(index, min_size=4, max_size=4), min_size=3, max_size=3), data=st.data())
def prop(n_steps, slots, n_reads, step, rows, data):
    n_reads = min(n_reads, slots - 1)
    k = UpdateCoeffs(p=0.5, q=-0.2, a=0.9, b=(0.3,) + (0.1,) * n_reads, r=(0.05,) * n_reads, g=0.2,
                     state=StateRow(a=0.1, b=(0.2,) * (n_reads + 1), g=0.7))
    good = ops.step_table([k] * n_steps, [0] * n_steps, [tuple(range(1, 1 + n_reads))] * n_steps, slots, True)
    arena = Arena()
    table = StepTable(arena.carve(good.coeffs), arena.carve(torch.tensor(rows[:n_steps])), n_reads, True)
    gen = torch.Generator().manual_seed(0)
    x, out, z, s = (torch.randn(SHAPE, generator=gen) for _ in range(4))
    h = torch.randn(slots, *SHAPE, generator=gen)
    args = [arena.carve(v) for v in (x, out, h, z, s)]
    valid = 0 <= step < n_steps and all(0 <= j < slots for j in rows[step][:1 + n_reads])
    try:
        got = ops.multistep_update_indexed(args[0], args[1], table, arena.carve(torch.tensor([step])),
                                           history=args[2], noise=args[3], state=args[4], backend=BACKEND)
    except RuntimeError as err:
        assert not valid and ("outside" in str(err)), err
    else:
        assert valid
        hr, sr = h.clone(), s.clone()
        want = ops.multistep_update_indexed(x, out, table._replace(coeffs=good.coeffs, slots=table.slots.clone()),
                                            torch.tensor([step]), history=hr, noise=z, state=sr, backend="reference")
        assert torch.allclose(got, want, atol=1e-5) and torch.allclose(args[2], hr, atol=1e-5)
        assert torch.allclose(args[4], sr, atol=1e-5)
    assert arena.intact()


prop()
print("ok")
'''


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_tables_and_steps_stay_in_bounds(backend):
    """Hypothesis over hand-made slot tables and steps (in and out of range, +-1e9) for the indexed op: a valid
    step gives the reference's numbers, an invalid one a RuntimeError, and no buffer's guards change."""
    _available(backend)
    pytest.importorskip("hypothesis")
    proc = run_isolated(["-c", PROPERTY.format(backend=backend, examples=25 if backend == "triton" else 60)])
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["cuda", "triton", "reference"])
def test_device_indices_are_clamped_and_flagged_on_the_gpu(backend):
    """On a GPU nothing syncs: an out-of-range step, slot or ancestor is clamped, its bit set in the status
    word, and error_flags.check raises (and clears it) when called."""
    _available(backend)
    from diffsampler import error_flags
    from diffsampler.ops import StepTable, UpdateCoeffs

    k = UpdateCoeffs(p=0.5, q=-0.2, a=0.9, b=(0.3, 0.1))
    good = ops.step_table([k, k], [0, 1], [(1,), (0,)], 2, False, device="cuda")
    x = torch.randn(2, 3, device="cuda")
    for step, slots, bit in ((100, good.slots, 1), (-1, good.slots, 1), (0, torch.full_like(good.slots, 10**9), 2)):
        status = error_flags.new("cuda")
        history = torch.zeros(2, 2, 3, device="cuda")
        out = ops.multistep_update_indexed(x, x, StepTable(good.coeffs, slots, 1, False), torch.tensor([step]).cuda(),
                                           history=history, status=status, backend=backend)
        assert int(status.item()) == bit and torch.isfinite(out).all()
        with pytest.raises(RuntimeError, match="clamped"):
            error_flags.check(status)
        assert int(status.item()) == 0
    particles, status = torch.randn(10, 3, device="cuda"), error_flags.new("cuda")
    ancestors = torch.arange(5, device="cuda").repeat(2, 1)
    ancestors[1, 3] = 10**7
    ops.move_particles(backend, particles, ancestors, torch.ones(2, dtype=torch.bool, device="cuda"), status)
    assert int(status.item()) == 4 and torch.isfinite(particles).all()
