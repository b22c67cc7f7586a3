"""scripts/gpu_check.sh: its dry run on this machine (no GPU, no build) writes the environment record, the
junit XML, the step bench's JSON and the summary, and ends with the summary table; a bad option is a clear
error. And the summary writer's parsing of junit XML and of bench step's rows."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
sys.path.insert(0, str(ROOT / "scripts"))

import gpu_check_report as report  # noqa: E402


def run_script(*args, out: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable)
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=out.parent)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "out"
    return run_script("--dry-run", out=out), out


def test_dry_run_writes_the_results_and_ends_with_the_summary(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["details.tar.gz", "env.json", "pytest-gpu.xml", "summary.json",
                                                     "summary.txt"]
    env = json.loads((out / "env.json").read_text())
    assert env["torch"] and env["python"] and env["date"] and env["environment"]["TRITON_INTERPRET"] == "0"
    summary = json.loads((out / "summary.json").read_text())
    status = {s["step"]: s["status"] for s in summary["steps"]}
    assert status == {"env": "pass", "wheels": "pass", "build": "skipped", "pytest": "pass", "bench-step": "pass",
                      "bench-help": "pass", "bench-pipeline": status["bench-pipeline"], "total": "pass"}
    assert status["bench-pipeline"] in ("pass", "skipped")
    tests = summary["pytest_gpu"]
    assert tests["passed"] + tests["failed"] + tests["errors"] == 0 and tests["skipped"] > 0  # no GPU here
    assert [(h["impl"], h["dtype"]) for h in summary["headlines"]] == [("cpu", "fp32")]
    assert 0 < summary["headlines"][0]["floor_fraction"]
    tail = proc.stdout.rstrip().splitlines()
    assert tail[-1] == "overall: PASS"
    assert any(line.startswith("pytest -m gpu: 0 passed, 0 failed, 0 errors,") for line in tail[-6:])
    assert "== gpu_check summary" in proc.stdout and (out / "summary.txt").read_text() in proc.stdout
    with tarfile.open(out / "details.tar.gz") as tar:
        names = tar.getnames()
    assert "logs/wheels.log" in names and any(n.startswith("bench/step-") and n.endswith(".json") for n in names)


def test_dry_run_wheel_step_takes_both_branches(dry_run):
    _, out = dry_run
    with tarfile.open(out / "details.tar.gz") as tar:
        log = tar.extractfile("logs/wheels.log").read().decode()
    assert "there is no wheel folder" in log and "skipped" in log
    assert "Would install gpu" in log  # pip --dry-run resolved the probe wheel from the fake folder, offline


@pytest.mark.parametrize("args, message", [(["--gpu"], "unknown option '--gpu'"),
                                           (["--dry-run", "--fetch-wheels"], "one option at most")])
def test_bad_option_is_a_clear_error(tmp_path, args, message):
    proc = run_script(*args, out=tmp_path / "out", timeout=30)
    assert proc.returncode == 2 and message in proc.stderr and "usage:" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_help(tmp_path):
    proc = run_script("--help", out=tmp_path / "out", timeout=30)
    assert proc.returncode == 0 and "--fetch-wheels" in proc.stdout and "summary.txt" in proc.stdout


def test_junit_counts(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text('<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="5" failures="1" errors="1" '
                   'skipped="2"><testcase classname="tests.test_a" name="test_ok"/>'
                   '<testcase classname="tests.test_a" name="test_bad"><failure message="x"/></testcase>'
                   '<testcase classname="tests.test_b" name="test_err"><error message="y"/></testcase>'
                   '</testsuite></testsuites>')
    assert report.pytest_counts(xml) == {"passed": 1, "failed": 1, "errors": 1, "skipped": 2,
                                         "failing": ["tests.test_a::test_bad", "tests.test_b::test_err"]}
    assert report.pytest_counts(tmp_path / "absent.xml") is None


def test_summary_marks_a_failed_step_and_reads_the_headline_rows(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    (work / "bench").mkdir(parents=True)
    out.mkdir()
    (work / "steps.tsv").write_text("build\tfail\t12\texit 1; log logs/build.log\nwheels\tskipped\t0\tno folder\n")
    row = dict(size=[64, 4, 128, 128], solver="dpmpp_2m", seconds=2e-4, floor_fraction=0.8, speedup_vs_diffusers=9.0)
    rows = [dict(row, impl=impl, dtype=dtype) for impl in ("reference", "cuda", "triton") for dtype in ("fp32", "bf16")]
    rows.append(dict(row, impl="cuda", dtype="fp32", size=[8, 4, 128, 128]))
    (work / "bench" / "step-gpu.json").write_text(json.dumps({"rows": rows}))
    text = report.summary(work, out)
    result = json.loads((out / "summary.json").read_text())
    assert not result["ok"] and text.rstrip().endswith("overall: FAIL")
    assert [(h["impl"], h["dtype"]) for h in result["headlines"]] == [("cuda", "fp32"), ("cuda", "bf16"),
                                                                       ("triton", "fp32"), ("triton", "bf16")]
    assert "pytest -m gpu: no junit XML" in text and "  cuda   fp32    0.80" in text
