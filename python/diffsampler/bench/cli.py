"""The argument parser of every `python -m diffsampler.bench` subcommand and its value types: a bad value is an
argparse error (exit code 2 and a message naming the option), never a traceback."""

from __future__ import annotations

import argparse
from typing import Callable, Iterable

import torch

# short name -> dtype; the short name is what the results' JSON records
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
_SHORT = {dtype: name for name, dtype in DTYPES.items()}


def parser(name: str, doc: str | None, prog: str | None = None) -> argparse.ArgumentParser:
    """The parser of `python -m diffsampler.bench <name>` (or of `prog`), its help the module docstring."""
    return argparse.ArgumentParser(prog=prog or f"python -m diffsampler.bench {name}", description=doc,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def dtype(text: str) -> str:
    """A dtype's short name (fp32, fp16, bf16, fp64) from it or from torch's names: float32, torch.float32, float,
    half, bfloat16, double, ..."""
    key = text.strip().lower().removeprefix("torch.")
    if key in DTYPES:
        return key
    value = getattr(torch, key, None)
    if isinstance(value, torch.dtype) and value in _SHORT:
        return _SHORT[value]
    raise argparse.ArgumentTypeError(f"unknown dtype {text!r}: expected one of {', '.join(DTYPES)} or torch's names "
                                     "(float32, float16, bfloat16, float64, torch.float32, ...)")


def listed(item: Callable[[str], object], sep: str = ",") -> Callable[[str], list]:
    """A type for a `sep`-separated, non-empty list of values of type `item`."""
    def parse(text: str) -> list:
        parts = [p for p in text.split(sep) if p.strip()]
        if not parts:
            raise argparse.ArgumentTypeError(f"expected a {sep!r}-separated list, got {text!r}")
        return [item(p.strip()) for p in parts]
    return parse


def choice(options: Iterable[str], what: str) -> Callable[[str], str]:
    """A type accepting one of `options` (the error lists them)."""
    options = tuple(options)

    def parse(text: str) -> str:
        if text not in options:
            raise argparse.ArgumentTypeError(f"unknown {what} {text!r}: expected one of {', '.join(options)}")
        return text
    return parse


def _number(cast: Callable[[str], float], ok: Callable[[float], bool], expected: str) -> Callable[[str], float]:
    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value
    return parse


positive_int = _number(int, lambda v: v >= 1, "a positive integer")
nonnegative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _number(float, lambda v: 0 < v < float("inf"), "a positive number")


def shape(text: str) -> tuple[int, ...]:
    """A tensor shape written 8,4,128,128 (positive sizes)."""
    try:
        return tuple(listed(positive_int)(text))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a shape of positive integers like 8,4,128,128, got {text!r}") \
            from None


def device(text: str) -> torch.device:
    """A device that exists here (cpu, or cuda[:i] when CUDA is available)."""
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {text!r}: expected cpu or cuda[:index]") from None
    if dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"unsupported device {text!r}: expected cpu or cuda[:index]")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"device {text!r}: CUDA is not available here")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"device {text!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    return dev


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
