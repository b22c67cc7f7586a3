"""The demo: its numbers say what they should (on the exact-score target the higher-order solvers have the lower
ODE error at every NFE shown), and the command runs and writes its PNG."""

import os
import subprocess
import sys
from pathlib import Path

import torch

from diffsampler import demo

ROOT = Path(__file__).resolve().parents[1]


def test_higher_order_solvers_have_lower_error():
    q = demo.quality_table(300, [5, 10, 20], "auto")
    err = {name: r["error"] for name, r in q["rows"].items()}
    for i in range(3):
        assert err["dpmpp_2m"][i] < err["ddim"][i] and err["unipc"][i] < err["dpmpp_2m"][i]
    for name in ("dpmpp_2m", "dpmpp_3m", "unipc"):  # second order or better: 20 steps at least 4x below 10 steps
        assert err[name][2] < err[name][1] / 4
    assert err["ddim"][2] > err["ddim"][1] / 3  # first order: about 2x per doubling
    sw2 = {name: r["sliced_w2"] for name, r in q["rows"].items()}
    assert sw2["dpmpp_2m"][0] < sw2["ddim"][0]  # at NFE 5 the distribution shows it too


def test_overhead_rows():
    rows = demo.overhead_table((1, 4, 8, 8), torch.device("cpu"), "auto", min_time=0.01)
    assert set(rows) == set(demo.OVERHEAD_SOLVERS)
    assert all(r["fused"] > 0 and r["floor"] > 0 for r in rows.values())


def test_demo_command(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "python") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    png = tmp_path / "demo.png"
    r = subprocess.run([sys.executable, "-m", "diffsampler.demo", "--n", "100", "--nfes", "5,10", "--size", "1,4,16,16",
                        "--plot", str(png)], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "(1) quality" in r.stdout and "(2) per-step overhead" in r.stdout and png.stat().st_size > 10_000
    bad = subprocess.run([sys.executable, "-m", "diffsampler.demo", "--backend", "gpu"], capture_output=True,
                         text=True, timeout=120, env=env, cwd=tmp_path)
    assert bad.returncode == 2 and "argument --backend" in bad.stderr and "Traceback" not in bad.stderr
