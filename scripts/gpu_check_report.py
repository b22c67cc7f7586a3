"""The JSON side of scripts/gpu_check.sh: the environment record, the summary table, the requirements of a
wheel, and the probe wheel of the dry run. Standard library only (plus torch/triton where they import), so it
runs on a bare GPU machine before anything is installed.

    python scripts/gpu_check_report.py env OUT.json
    python scripts/gpu_check_report.py summary WORK OUT
    python scripts/gpu_check_report.py requires WHEEL
    python scripts/gpu_check_report.py probe-wheel DIR
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

# read-only nvidia-smi fields (nvidia-smi --help-query-gpu): the card as it was found
SMI_FIELDS = ("name", "driver_version", "memory.total", "memory.used", "compute_cap", "persistence_mode",
              "compute_mode", "mig.mode.current", "clocks.sm", "clocks.mem", "clocks.max.sm", "power.limit",
              "temperature.gpu", "utilization.gpu")
HEADLINE_SOLVER = "dpmpp_2m"  # the headline row of bench step: DPM-Solver++ 2M, a full multistep step


def _run(cmd: list[str], timeout: float = 30) -> str | None:
    """stdout of cmd, or None when it is missing or fails."""
    if shutil.which(cmd[0]) is None:
        return None
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def nvidia_smi() -> dict:
    """The card's name, driver, memory, clocks and modes by a read-only query ({"error": ...} without one)."""
    text = _run(["nvidia-smi", f"--query-gpu={','.join(SMI_FIELDS)}", "--format=csv,noheader"])
    if text is None:
        return {"error": "nvidia-smi is not on PATH or failed"}
    return {"gpus": [dict(zip(SMI_FIELDS, (v.strip() for v in line.split(",")))) for line in text.splitlines()]}


def torch_record() -> dict:
    try:
        import torch
    except ImportError as err:
        return {"torch": None, "error": str(err)}
    record = {"torch": torch.__version__, "torch_cuda": torch.version.cuda,
              "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        record.update(device=props.name, capability=f"{props.major}.{props.minor}", sm_count=props.multi_processor_count,
                      memory_gib=round(props.total_memory / 2**30, 1), device_count=torch.cuda.device_count())
    return record


def version_of(distribution: str) -> str | None:
    """The installed version (None if absent), without importing the package."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def env_record() -> dict:
    nvcc = _run(["nvcc", "--version"])
    record = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "host": platform.node(), "python": platform.python_version(), "executable": sys.executable,
              "cpu_count": os.cpu_count(), **torch_record(),
              "triton": version_of("triton"), "diffusers": version_of("diffusers"),
              "nvcc": nvcc.splitlines()[-1] if nvcc else None, "nvidia_smi": nvidia_smi(),
              "git_commit": _run(["git", "-C", str(Path(__file__).resolve().parents[1]), "rev-parse", "HEAD"]),
              "environment": {k: os.environ.get(k) for k in ("TORCH_CUDA_ARCH_LIST", "TRITON_INTERPRET",
                                                             "CUDA_VISIBLE_DEVICES")}}
    return record


def requires(wheel: Path) -> list[str]:
    """The requirements of a wheel that apply without extras (markers evaluated for this python)."""
    from packaging.requirements import Requirement

    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        lines = zf.read(meta).decode().splitlines()
    specs = []
    for line in lines:
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            specs.append(f"{req.name}{req.specifier}")
    return specs


def probe_wheel(folder: Path) -> Path:
    """A minimal pure-Python wheel (gpu_check_probe 0.0.0, one empty module) for the dry run's wheel step."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "gpu_check_probe-0.0.0-py3-none-any.whl"
    info = "gpu_check_probe-0.0.0.dist-info"
    files = {"gpu_check_probe.py": "",
             f"{info}/METADATA": "Metadata-Version: 2.1\nName: gpu_check_probe\nVersion: 0.0.0\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: gpu_check\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    return path


def pytest_counts(xml_path: Path) -> dict | None:
    """passed / failed / errors / skipped and the first failing test ids of a junit XML (None if absent)."""
    if not xml_path.exists():
        return None
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as err:
        return {"error": f"unreadable junit XML: {err}"}
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failing = [f"{case.get('classname')}::{case.get('name')}" for s in suites for case in s.iter("testcase")
               if case.find("failure") is not None or case.find("error") is not None]
    return {"passed": total["tests"] - total["failures"] - total["errors"] - total["skipped"],
            "failed": total["failures"], "errors": total["errors"], "skipped": total["skipped"],
            "failing": failing[:10]}


def headlines(bench_dir: Path, size: list[int]) -> list[dict]:
    """bench step's fraction of the copy bandwidth (floor/t) of the fused GPU backends at `size`."""
    rows = []
    for path in sorted(bench_dir.glob("step-*.json")):
        for row in json.loads(path.read_text())["rows"]:
            if row["size"] == size and row["solver"] == HEADLINE_SOLVER and row["impl"] in ("cpu", "cuda", "triton"):
                rows.append({k: row[k] for k in ("dtype", "impl", "seconds", "floor_fraction",
                                                  "speedup_vs_diffusers")})
    return rows


def read_steps(path: Path) -> list[dict]:
    """The steps' lines written by gpu_check.sh: name, status (pass/fail/skipped), seconds, note."""
    steps = []
    for line in path.read_text().splitlines() if path.exists() else []:
        name, status, seconds, note = (line.split("\t") + ["", "", ""])[:4]
        steps.append({"step": name, "status": status, "seconds": float(seconds or 0), "note": note})
    return steps


def summary(work: Path, out: Path) -> str:
    """summary.json and summary.txt in `out`; returns the text (the table printed last by gpu_check.sh)."""
    size = [int(s) for s in os.environ.get("GPU_CHECK_HEADLINE_SIZE", "64,4,128,128").split(",")]
    steps = read_steps(work / "steps.tsv")
    tests = pytest_counts(out / "pytest-gpu.xml")
    heads = headlines(work / "bench", size)
    ok = all(s["status"] != "fail" for s in steps)
    result = {"ok": ok, "steps": steps, "pytest_gpu": tests, "headline_size": size, "headlines": heads}
    lines = ["", "== gpu_check summary " + "=" * 50, f"{'step':<16}{'status':<9}{'seconds':>8}  note"]
    lines += [f"{s['step']:<16}{s['status']:<9}{s['seconds']:>8.1f}  {s['note']}" for s in steps]
    if tests is None:
        lines.append("pytest -m gpu: no junit XML (step not run)")
    elif "error" in tests:
        lines.append(f"pytest -m gpu: {tests['error']}")
    else:
        lines.append(f"pytest -m gpu: {tests['passed']} passed, {tests['failed']} failed, {tests['errors']} errors, "
                     f"{tests['skipped']} skipped")
        lines += [f"  failing: {name}" for name in tests["failing"]]
    shape = "x".join(map(str, size))
    if heads:
        lines.append(f"bench step, {HEADLINE_SOLVER} at {shape}: fraction of copy bandwidth (floor/t), vs diffusers")
        for h in heads:
            speedup = f"{h['speedup_vs_diffusers']:.1f}x" if h["speedup_vs_diffusers"] else "-"
            lines.append(f"  {h['impl']:<7}{h['dtype']:<6}{h['floor_fraction']:>6.2f}  {h['seconds'] * 1e6:9.1f} us  "
                         f"{speedup}")
    else:
        lines.append(f"bench step: no {HEADLINE_SOLVER} row at {shape} (step bench not run or failed)")
    lines.append(f"overall: {'PASS' if ok else 'FAIL'}")
    text = "\n".join(lines) + "\n"
    (out / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "summary.txt").write_text(text)
    return text


def main(argv: list[str]) -> int:
    commands = {"env": 1, "summary": 2, "requires": 1, "probe-wheel": 1}
    if not argv or argv[0] not in commands or len(argv) != 1 + commands[argv[0]]:
        print(__doc__, file=sys.stderr)
        return 2
    cmd, args = argv[0], [Path(a) for a in argv[1:]]
    if cmd == "env":
        args[0].write_text(json.dumps(env_record(), indent=2) + "\n")
    elif cmd == "summary":
        print(summary(*args), end="")
    elif cmd == "requires":
        print("\n".join(requires(args[0])))
    else:
        print(probe_wheel(args[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
