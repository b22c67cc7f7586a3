"""diffusers' own scheduler tests (tests/diffusers_suite, vendored) on the drop-ins: every test that passes on
diffusers' classes passes with diffsampler's drop-ins swapped in.

The suite runs twice, in two pytest subprocesses at once (the swap happens before the test modules import their
classes, so it cannot share a process): once on diffusers' classes, once on the drop-ins. Tests that fail on
diffusers too (here: those needing torchsde or the model hub, which is offline) are not required to pass."""

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

diffusers = pytest.importorskip("diffusers")

import diffsampler  # noqa: E402

SUITE = Path(__file__).parent / "diffusers_suite"
ROOT = SUITE.parent.parent
PACKAGE_PARENT = Path(diffsampler.__file__).parent.parent


def _start(classes: str, report: Path) -> subprocess.Popen:
    env = {**os.environ, "DIFFSAMPLER_DIFFUSERS_SUITE": classes, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(PACKAGE_PARENT), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "pytest", str(SUITE), "--tb=short", "-p", "no:cacheprovider", f"--junitxml={report}",
           "-W", "ignore::DeprecationWarning"]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _outcomes(report: Path) -> dict:
    """test id -> ("passed", "") or (failure kind, its message), from a junit XML report."""
    outcomes = {}
    for case in ET.parse(report).iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        bad = [child for child in case if child.tag in ("failure", "error", "skipped")]
        outcomes[name] = (bad[0].tag, bad[0].get("message", "")) if bad else ("passed", "")
    return outcomes


def test_diffusers_scheduler_suite_passes_on_the_drop_ins(tmp_path):
    runs = {classes: (_start(classes, tmp_path / f"{classes}.xml"), tmp_path / f"{classes}.xml")
            for classes in ("diffusers", "diffsampler")}
    outcomes = {}
    for classes, (proc, report) in runs.items():
        log, _ = proc.communicate(timeout=600)
        assert report.exists(), f"the suite did not run on {classes}' classes:\n{log[-4000:]}"
        assert "scheduler classes: " + classes in log, log[-4000:]
        outcomes[classes] = _outcomes(report)
    upstream = {name for name, (kind, _) in outcomes["diffusers"].items() if kind == "passed"}
    assert len(upstream) > 100, f"only {len(upstream)} of diffusers' scheduler tests passed on diffusers itself"
    broken = {name: outcomes["diffsampler"].get(name, ("missing", "")) for name in sorted(upstream)
              if outcomes["diffsampler"].get(name, ("missing",))[0] != "passed"}
    assert not broken, (f"{len(broken)} tests pass on diffusers {diffusers.__version__} but not on the drop-ins:\n"
                        + "\n".join(f"{name}: {kind}: {message[:300]}" for name, (kind, message) in broken.items()))
