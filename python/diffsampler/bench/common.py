"""Timing, the memory-bandwidth floor, and the machine record shared by the benchmarks."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_record(device: torch.device) -> dict:
    """Device name, versions and date (on a GPU its capability, multiprocessors, memory and L2 too), stored
    beside every result."""
    record = {
        "device": device_name(device),
        "device_type": device.type,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    for pkg in ("diffsampler", "diffusers", "triton"):
        try:
            record[pkg] = __import__(pkg).__version__
        except ImportError:
            record[pkg] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        record.update(cuda=torch.version.cuda, capability=f"{props.major}.{props.minor}",
                      sm_count=props.multi_processor_count, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                      l2_cache_mib=round(props.L2_cache_size / 2**20, 1))
    return record


def measure(fn: Callable[[], object], device: torch.device, min_time: float = 0.3, warmup: int = 3,
            best: bool = False) -> float:
    """Median (or with best, the fastest) seconds per call of fn() over 5 batches: warmed up, repeated for at
    least `min_time` seconds in all. On CUDA, timed with events around each batch."""
    for _ in range(warmup):
        fn()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    once = max(time.perf_counter() - t0, 1e-6)
    reps = max(1, int(min_time / 5 / once))
    samples = []
    for _ in range(5):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3 / reps)
        else:
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            samples.append((time.perf_counter() - t0) / reps)
    return min(samples) if best else statistics.median(samples)


def copy_bandwidth(device: torch.device, nbytes: int = 256 << 20, min_time: float = 1.0) -> float:
    """Measured bytes/s of a device-to-device copy moving `nbytes` in all (nbytes / 2 read, nbytes / 2 written).
    Measure it at the working-set size of the op it is a floor for: small sizes run from cache. A floor is a
    best case: the fastest of the batches."""
    src = torch.empty(max(nbytes // 8, 1), dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    seconds = measure(lambda: dst.copy_(src), device, min_time=min_time, best=True)
    return 2 * src.numel() * 4 / seconds


def write_json(path: Path, payload: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-").lower()


class OpCounter(TorchDispatchMode):
    """Counts the ops dispatched inside `with OpCounter() as c:` by schema name (c.ops)."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func._schema.name] += 1
        return func(*args, **(kwargs or {}))
