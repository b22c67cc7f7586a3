"""The step benchmark at a tiny size (a smoke run: the JSON rows, rotation over operand copies)."""

import json

import torch

from diffsampler.bench import step


def test_rotating_calls_each_copy_in_turn():
    calls = []
    fn = step.rotating([lambda i=i: calls.append(i) for i in range(3)])
    for _ in range(7):
        fn()
    assert calls == [0, 1, 2, 0, 1, 2, 0]
    assert step.copies_needed(torch.device("cpu"), 1 << 20, rotate=False) == 1
    assert step.copies_needed(torch.device("cpu"), 16 << 20, rotate=True) == 1 + 2 * 64 // 16
    assert step.copies_needed(torch.device("cpu"), 1 << 10, rotate=True) == step.MAX_COPIES


def test_step_bench_writes_rows(tmp_path):
    step.main(["--device", "cpu", "--sizes", "1,3,5,7", "--dtypes", "fp32", "--solvers", "dpmpp_2m,ghvb",
               "--min-time", "0.01", "--rotate", "--out", str(tmp_path)])
    (path,) = tmp_path.glob("step-*.json")
    rows = json.loads(path.read_text())["rows"]
    impls = {(r["solver"], r["impl"]) for r in rows}
    assert {("dpmpp_2m", "cpu"), ("dpmpp_2m", "diffusers"), ("ghvb", "cpu")} <= impls
    assert all(r["seconds"] > 0 and r["operand_copies"] > 1 for r in rows)


def test_guided_step_bench_writes_both_forms(tmp_path):
    step.main(["--device", "cpu", "--guided", "--sizes", "2,3,5", "--dtypes", "fp32,bf16", "--min-time", "0.01",
               "--out", str(tmp_path)])
    (path,) = tmp_path.glob("guided-step-*.json")
    rows = json.loads(path.read_text())["rows"]
    assert {(r["dtype"], r["impl"]) for r in rows} == {(d, i) for d in ("fp32", "bf16")
                                                       for i in ("guide operand", "add + op")}
    assert all(r["seconds"] > 0 and r["bytes_moved_one_pass"] == 6 * 30 * (4 if r["dtype"] == "fp32" else 2)
               for r in rows)
