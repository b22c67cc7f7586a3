"""diffusers' own scheduler tests on the drop-ins: every test that passes on diffusers' classes passes with
diffsampler's drop-ins swapped in.

The tests come from a diffusers checkout named by DIFFSAMPLER_DIFFUSERS_TESTS (its tests/ directory, at a commit
close to the installed diffusers); without it the suite skips. It runs twice, in two pytest subprocesses at once
(the swap, tests/diffusers_swap.py, happens before the test modules import their classes, so it cannot share a
process): once on diffusers' classes, once on the drop-ins. Tests that fail on diffusers too (here: those needing
the model hub, which is offline, or a newer diffusers than the installed one) are not required to pass."""

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import pytest

diffusers = pytest.importorskip("diffusers")

import diffsampler  # noqa: E402
from diffsampler.integrations.diffusers import FUSED  # noqa: E402

TESTS_ENV = "DIFFSAMPLER_DIFFUSERS_TESTS"
HOW_TO_RUN = (f"set {TESTS_ENV} to a diffusers checkout's tests/ directory (at a commit close to the installed "
              f"diffusers {diffusers.__version__}) to run diffusers' scheduler tests on the drop-ins, e.g. "
              f"`git clone https://github.com/huggingface/diffusers /tmp/diffusers && {TESTS_ENV}=/tmp/diffusers/tests "
              f"python -m pytest -q -s tests/test_diffusers_suite.py` (or scripts/diffusers_suite.sh /tmp/diffusers)")
# what the scheduler tests import from a checkout's tests/
NEEDED = ("__init__.py", "testing_utils.py", "others/__init__.py", "others/test_utils.py", "schedulers/__init__.py")
COMMON = "test_schedulers.py"  # the tests that cover several classes at once
# each drop-in's test file in diffusers' tests/schedulers/; None where diffusers has none
TEST_FILES = {
    "DDIMScheduler": "test_scheduler_ddim.py",
    "DDIMInverseScheduler": "test_scheduler_ddim_inverse.py",
    "DDPMScheduler": "test_scheduler_ddpm.py",
    "DEISMultistepScheduler": "test_scheduler_deis.py",
    "DPMSolverMultistepScheduler": "test_scheduler_dpm_multi.py",
    "DPMSolverMultistepInverseScheduler": "test_scheduler_dpm_multi_inverse.py",
    "DPMSolverSDEScheduler": "test_scheduler_dpm_sde.py",
    "DPMSolverSinglestepScheduler": "test_scheduler_dpm_single.py",
    "EDMDPMSolverMultistepScheduler": "test_scheduler_edm_dpmsolver_multistep.py",
    "EDMEulerScheduler": "test_scheduler_edm_euler.py",
    "EulerDiscreteScheduler": "test_scheduler_euler.py",
    "EulerAncestralDiscreteScheduler": "test_scheduler_euler_ancestral.py",
    "HeunDiscreteScheduler": "test_scheduler_heun.py",
    "IPNDMScheduler": "test_scheduler_ipndm.py",
    "KDPM2AncestralDiscreteScheduler": "test_scheduler_kdpm2_ancestral.py",
    "KDPM2DiscreteScheduler": "test_scheduler_kdpm2_discrete.py",
    "LCMScheduler": "test_scheduler_lcm.py",
    "LMSDiscreteScheduler": "test_scheduler_lms.py",
    "PNDMScheduler": "test_scheduler_pndm.py",
    "SASolverScheduler": "test_scheduler_sasolver.py",
    "TCDScheduler": "test_scheduler_tcd.py",
    "UniPCMultistepScheduler": "test_scheduler_unipc.py",
    "CosineDPMSolverMultistepScheduler": None,
    "FlowMatchEulerDiscreteScheduler": None,
    "FlowMatchHeunDiscreteScheduler": None,
}
SUITES = ("diffusers", "diffsampler")
PLUGIN_DIR = Path(__file__).parent
PACKAGE_PARENT = Path(diffsampler.__file__).parent.parent


def _tests_dir() -> Path:
    """The checkout's tests/ directory, or a skip saying how to name one."""
    if not os.environ.get(TESTS_ENV):
        pytest.skip(HOW_TO_RUN)
    tests = Path(os.environ[TESTS_ENV]).expanduser().resolve()
    missing = [name for name in (*NEEDED, f"schedulers/{COMMON}") if not (tests / name).is_file()]
    if missing:
        raise ValueError(f"{TESTS_ENV}={tests}: expected a diffusers checkout's tests/ directory, "
                         f"but it lacks {', '.join(missing)}")
    return tests


def _start(classes: str, tests: Path, files: list, report: Path) -> subprocess.Popen:
    """pytest on `files` of the checkout whose tests/ is `tests`, on the classes named, writing a junit report."""
    path = [str(PLUGIN_DIR), str(PACKAGE_PARENT), os.environ.get("PYTHONPATH")]
    env = {**os.environ, "DIFFSAMPLER_DIFFUSERS_SUITE": classes, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, path))}
    rootdir = tests.parent  # the test modules import as tests.schedulers.*
    cmd = [sys.executable, "-m", "pytest", *map(str, files), "-p", "diffusers_swap", "-p", "no:cacheprovider",
           f"--rootdir={rootdir}", "--tb=short", "-o", "junit_family=xunit1", f"--junitxml={report}",
           "-W", "ignore::DeprecationWarning"]
    return subprocess.Popen(cmd, cwd=rootdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _outcomes(report: Path) -> dict:
    """(test file name, test id) -> ("passed", "") or (failure kind, its message), from a junit XML report."""
    outcomes = {}
    for case in ET.parse(report).iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        bad = [child for child in case if child.tag in ("failure", "error", "skipped")]
        result = (bad[0].tag, bad[0].get("message", "")) if bad else ("passed", "")
        outcomes[Path(case.get("file", "")).name, name] = result
    return outcomes


def _tally(outcomes: dict) -> str:
    """One line per test file: its tests passing on diffusers' classes and on the drop-ins."""
    passed = {classes: Counter(file for (file, _), (kind, _) in runs.items() if kind == "passed")
              for classes, runs in outcomes.items()}
    files = sorted({file for runs in outcomes.values() for file, _ in runs})
    return "\n".join(f"{file}: {passed['diffusers'][file]} on diffusers, {passed['diffsampler'][file]} on the drop-ins"
                     for file in files)


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    """The checkout's tests/ directory and, per class set, the outcomes of its scheduler tests."""
    tests = _tests_dir()
    files = [tests / "schedulers" / name for name in (COMMON, *filter(None, TEST_FILES.values()))]
    files = [file for file in files if file.is_file()]
    reports = {classes: tmp_path_factory.mktemp("diffusers_suite") / f"{classes}.xml" for classes in SUITES}
    runs = {classes: _start(classes, tests, files, reports[classes]) for classes in SUITES}
    outcomes = {}
    for classes, proc in runs.items():
        log, _ = proc.communicate(timeout=1200)
        assert reports[classes].exists(), f"the suite did not run on {classes}' classes:\n{log[-4000:]}"
        assert f"scheduler classes: {classes}; diffusers {diffusers.__version__} from " in log, log[-4000:]
        outcomes[classes] = _outcomes(reports[classes])
    print(f"\ndiffusers' scheduler tests from {tests}:\n{_tally(outcomes)}")
    return tests, outcomes


def test_every_drop_in_is_mapped_to_its_diffusers_test_file():
    assert sorted(TEST_FILES) == sorted(FUSED)


@pytest.mark.parametrize("file", [COMMON, *sorted(filter(None, TEST_FILES.values()))])
def test_diffusers_scheduler_tests_pass_on_the_drop_ins(suite, file):
    tests, outcomes = suite
    if not (tests / "schedulers" / file).is_file():
        pytest.skip(f"{tests} has no schedulers/{file}")
    runs = {classes: {name: result for (in_file, name), result in outcomes[classes].items() if in_file == file}
            for classes in SUITES}
    upstream = sorted(name for name, (kind, _) in runs["diffusers"].items() if kind == "passed")
    assert upstream, (f"no test of schedulers/{file} passed on diffusers {diffusers.__version__} itself: "
                      f"{runs['diffusers']}")
    broken = {name: runs["diffsampler"].get(name, ("missing", "")) for name in upstream
              if runs["diffsampler"].get(name, ("missing",))[0] != "passed"}
    assert not broken, (f"{len(broken)} tests of schedulers/{file} pass on diffusers {diffusers.__version__} but not "
                        "on the drop-ins:\n"
                        + "\n".join(f"{name}: {kind}: {message[:300]}" for name, (kind, message) in broken.items()))
