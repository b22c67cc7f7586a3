"""The bench command line: torch's dtype names are accepted, and bad values are argparse errors (exit code 2 and
a message naming the option), not tracebacks."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffsampler.bench import cli

ROOT = Path(__file__).resolve().parents[1]


def bench(*args, timeout=240):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "python") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "diffsampler.bench", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


@pytest.mark.parametrize("text, short", [("fp32", "fp32"), ("float32", "fp32"), ("torch.float32", "fp32"),
                                         ("float", "fp32"), ("float16", "fp16"), ("half", "fp16"),
                                         ("bfloat16", "bf16"), ("BF16", "bf16"), ("float64", "fp64"),
                                         ("torch.double", "fp64")])
def test_dtype_names(text, short):
    assert cli.dtype(text) == short
    assert cli.DTYPES[short] == getattr(torch, text.lower().removeprefix("torch."), cli.DTYPES[short])


@pytest.mark.parametrize("text", ["float33", "int64", "abs", "", "fp8"])
def test_bad_dtype_is_an_argument_error(text):
    with pytest.raises(argparse.ArgumentTypeError, match="dtype"):
        cli.dtype(text)


def test_step_accepts_torch_dtype_names(tmp_path):
    r = bench("step", "--device", "cpu", "--sizes", "1,3,5", "--dtypes", "float32,torch.bfloat16,float64",
              "--solvers", "ddim", "--min-time", "0.005", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    rows = json.loads(next(tmp_path.glob("step-*.json")).read_text())["rows"]
    assert {(r["dtype"], r["impl"]) for r in rows} >= {("fp32", "cpu"), ("bf16", "cpu"), ("fp64", "reference")}
    assert not any(r["dtype"] == "fp64" and r["impl"] == "cpu" for r in rows)  # fp64: the reference only


@pytest.mark.parametrize("args, option", [
    (("step", "--dtypes", "float33"), "--dtypes"),
    (("step", "--sizes", "8,x,4"), "--sizes"),
    (("step", "--sizes", "0,4"), "--sizes"),
    (("step", "--solvers", "dpmpp_9m"), "--solvers"),
    (("step", "--device", "tpu0"), "--device"),
    (("step", "--min-time", "-1"), "--min-time"),
    (("loop", "--dtype", "int8"), "--dtype"),
    (("loop", "--steps", "0"), "--steps"),
    (("resample", "--parts", "everything"), "--parts"),
    (("quality", "--targets", "ring-3d"), "--targets"),
    (("smc", "--ks", "4,x"), "--ks"),
    (("report", "--size", "8;4"), "--size"),
    (("nfe", "--parts", "mrs,teleport"), "--parts"),
    (("guidance", "--n", "0"), "--n"),
    (("teleport", "--nfe-max", "0"), "--nfe-max"),
])
def test_bad_values_are_argparse_errors(args, option):
    r = bench(*args)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert f"error: argument {option}" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_nfe_writes_its_table(tmp_path):
    r = bench("nfe", "--parts", "mrs", "--n", "200", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    res = json.loads(next(tmp_path.glob("nfe-*.json")).read_text())["results"]["mrs"]
    assert set(res["methods"]) >= {"MRS ODE 2", "IR-SDE Euler-Maruyama"} and (tmp_path / "nfe.png").exists()


def test_nfe_dmcmc_part(tmp_path):
    r = bench("nfe", "--parts", "dmcmc", "--n", "200", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    res = json.loads(next(tmp_path.glob("nfe-*.json")).read_text())["results"]["dmcmc"]
    assert set(res["methods"]) == {"dpmpp_2m alone", "heun alone", "DLG + dpmpp_2m"}
    assert all(r["nfe"] == r["score_calls"] + r["classifier_calls"] for r in res["methods"]["DLG + dpmpp_2m"])
    assert "| DLG + dpmpp_2m | 1 | 2 | 4 (3 + 1) |" in r.stdout


def test_unknown_subcommand():
    r = bench("stepp")
    assert r.returncode == 2 and "unknown subcommand 'stepp'" in r.stderr and "Traceback" not in r.stderr
