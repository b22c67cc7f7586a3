"""Argument checks of the public API: each refused argument gets an error naming it and what was expected.

Integers are any ``numbers.Integral`` (Python and numpy integers, a 0-dim integer tensor) but bool; reals any
``numbers.Real`` but bool, finite unless the allowed interval is closed at infinity ("[0, inf]").
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Callable, Sequence

import numpy as np
import torch


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type: a TypeError, and a ValueError like every other refused argument."""


def _is_bool(value) -> bool:
    return isinstance(value, (bool, np.bool_)) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool)


def integer(name: str, value, minimum: int | None = None, maximum: int | None = None) -> int:
    """value as an int, refused unless it is an integer in [minimum, maximum]."""
    bound = (f" >= {minimum}" if maximum is None else f" in [{minimum}, {maximum}]") if minimum is not None else (
        f" <= {maximum}" if maximum is not None else "")
    expected = f"{name} must be an integer{bound}"
    if _is_bool(value) or (isinstance(value, torch.Tensor) and value.dim() != 0):
        raise ArgumentTypeError(f"{expected}, got {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise ArgumentTypeError(f"{expected}, got {value!r} ({type(value).__name__})") from None
    if (minimum is not None and v < minimum) or (maximum is not None and v > maximum):
        raise ValueError(f"{expected}, got {v}")
    return v


def real(name: str, value, interval: str = "(-inf, inf)") -> float:
    """value as a float, refused unless it is a number in `interval` ("[0, 1)", "(0, inf)", "[0, inf]", ...):
    NaN never, an infinity only where the interval is closed at it."""
    lo, hi = (v.strip() for v in interval[1:-1].split(","))
    low, high = float(lo), float(hi)
    if math.isinf(low) and math.isinf(high):
        bound = "finite" if interval == "(-inf, inf)" else f"in {interval}"
    elif math.isinf(high):
        bound = f"{'>=' if interval[0] == '[' else '>'} {lo}" + (" (or inf)" if interval[-1] == "]" else " and finite")
    elif math.isinf(low):
        bound = f"{'<=' if interval[-1] == ']' else '<'} {hi}" + (" (or -inf)" if interval[0] == "[" else " and finite")
    else:
        bound = f"in {interval}"
    if _is_bool(value) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(f"{name} must be a number, {bound}; got {value!r} ({type(value).__name__})")
    v = float(value)
    above = v >= low if interval[0] == "[" else v > low
    below = v <= high if interval[-1] == "]" else v < high
    if not (above and below):  # NaN compares false
        raise ValueError(f"{name} must be {bound}, got {v}")
    return v


def optional_real(name: str, value, interval: str = "(-inf, inf)") -> float | None:
    return None if value is None else real(name, value, interval)


def flag(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ArgumentTypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return bool(value)


def model(value, name: str = "model") -> Callable:
    if not callable(value):
        raise ArgumentTypeError(f"{name} must be callable, as model(x, t) -> tensor; got {value!r}")
    return value


def optional_callable(name: str, value, form: str) -> None:
    """None or a callable, used as `form` (e.g. "callback(info)")."""
    if value is not None and not callable(value):
        raise ArgumentTypeError(f"{name} must be None or a callable {form}, got {value!r}")


def generator(value) -> None:
    if value is not None and not isinstance(value, torch.Generator):
        raise ArgumentTypeError(f"generator must be None or a torch.Generator, got {type(value).__name__}")


def sample_tensor(value, name: str = "x") -> torch.Tensor:
    """A floating-point tensor with a batch dimension (B, ...), B >= 1 (meta tensors too)."""
    if not isinstance(value, torch.Tensor):
        raise ArgumentTypeError(f"{name} must be a torch.Tensor of shape (B, ...), got {type(value).__name__}")
    if not value.is_floating_point():
        raise ArgumentTypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if value.dim() < 1 or value.shape[0] == 0:
        raise ValueError(f"{name} must have a non-empty batch dimension 0, got shape {tuple(value.shape)}")
    return value


def model_output(out, x: torch.Tensor, step: int, t, what: str = "model_out") -> None:
    """The model's output (or `what` else the loop computed from the model) at a loop step: a tensor of x's shape
    and, unless it is a meta tensor, finite. The finiteness check is one reduction and a host sync."""
    where = f"at step {step} (t = {t})"
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        source = "the model must return" if what == "model_out" else f"{what} must be"
        raise ValueError(f"{source} a tensor of x's shape {tuple(x.shape)}, got {got} {where}")
    if not out.is_meta and not bool(torch.isfinite(out).all()):
        raise ValueError(f"{what} contains non-finite values (NaN or inf) {where}: the model diverged or got bad "
                         "input; pass check_nan=False to skip this check")


def _entries(name: str, values) -> list:
    """The entries of a 1-D tensor, array or sequence (0-dim tensors as Python numbers)."""
    if isinstance(values, (torch.Tensor, np.ndarray)):
        if values.ndim != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(values.shape)}")
        if isinstance(values, torch.Tensor) and values.is_meta:
            raise ValueError(f"{name} must hold values, got a meta tensor")
        return values.tolist()
    if not isinstance(values, Sequence) or isinstance(values, str):
        raise ArgumentTypeError(f"{name} must be a 1-D tensor or a sequence of numbers, got {type(values).__name__}")
    return [v.item() if isinstance(v, torch.Tensor) and v.dim() == 0 and not v.is_meta else v for v in values]


def reals(name: str, values, interval: str = "(-inf, inf)") -> list[float]:
    return [real(f"{name}[{i}]", v, interval) for i, v in enumerate(_entries(name, values))]


def integers(name: str, values, minimum: int | None = None) -> tuple[int, ...]:
    return tuple(integer(f"{name}[{i}]", v, minimum) for i, v in enumerate(_entries(name, values)))


def sigmas(values, strict: bool = False) -> list[float]:
    """A noise-level sequence sigma_0 > ... > sigma_n >= 0 (a 1-D tensor, array or sequence of n + 1 >= 2
    numbers) as floats: finite, positive but the last (which may be 0), non-increasing, or decreasing where
    `strict` (samplers that step in log sigma)."""
    out = reals("sigmas", values, "[0, inf)")
    if len(out) < 2:
        raise ValueError(f"sigmas must have at least 2 entries (sigma_0 ... the final sigma), got {len(out)}")
    if 0.0 in out[:-1]:
        raise ValueError(f"sigmas must be > 0 but the last, got 0 at index {out.index(0.0)}")
    for i in range(len(out) - 1):
        if out[i + 1] > out[i] or (strict and out[i + 1] == out[i]):
            order = "decreasing" if strict else "non-increasing"
            raise ValueError(f"sigmas must be {order} (from noise to data), got sigmas[{i}] = {out[i]} and "
                             f"sigmas[{i + 1}] = {out[i + 1]}")
    return out


# the numeric and boolean options of the solvers (diffsampler.sample's keywords; the others are names, checked
# by the solver): option -> its check
_FLAGS = ("set_alpha_to_one", "lower_order_final", "euler_at_final", "predict_x0", "corrector", "predictor_pseudo",
          "corrector_pseudo", "skip_prk_steps")
SOLVER_OPTIONS: dict[str, Callable] = {
    "eta": lambda v: real("eta", v, "[0, inf)"),
    "s_noise": lambda v: real("s_noise", v, "[0, inf)"),
    "beta": lambda v: real("beta", v, "(0, 1]"),
    "momentum": lambda v: optional_real("momentum", v, "(0, 1]"),
    "order": lambda v: integer("order", v, 1),
    "dc_order": lambda v: integer("dc_order", v, 1),
    "steps_offset": lambda v: integer("steps_offset", v, 0),
    "disable_corrector": lambda v: integers("disable_corrector", v, 0),
    "dc_ratios": lambda v: None if v is None else reals("dc_ratios", v),
    "gamma": lambda v: real("gamma", v, "[0, 1]"),
    "max_stage": lambda v: integer("max_stage", v, 1),
    "original_steps": lambda v: integer("original_steps", v, 1),
    "timestep_scaling": lambda v: real("timestep_scaling", v, "(0, inf)"),
    "diffusion_norm": lambda v: real("diffusion_norm", v, "[0, inf)"),
    "last_step_size": lambda v: real("last_step_size", v, "(0, 1)"),
    "sample_eps": lambda v: real("sample_eps", v, "[0, 1)"),
    **{name: (lambda v, name=name: flag(name, v)) for name in _FLAGS},
}


def solver_options(options: dict) -> dict:
    """The solver options with their numbers and flags checked (ints as int, reals as float)."""
    return {k: SOLVER_OPTIONS[k](v) if k in SOLVER_OPTIONS else v for k, v in options.items()}


def sampling_options(clip, threshold_ratio, threshold_max, check_nan, rng) -> None:
    """The update options of diffsampler.sample."""
    optional_real("clip", clip, "(0, inf)")
    optional_real("threshold_ratio", threshold_ratio, "[0, 1]")
    real("threshold_max", threshold_max, "(0, inf)")
    flag("check_nan", check_nan)
    generator(rng)


__all__ = ["ArgumentTypeError", "integer", "real", "optional_real", "flag", "model", "optional_callable",
           "generator", "sample_tensor", "model_output", "reals", "integers", "sigmas", "SOLVER_OPTIONS",
           "solver_options", "sampling_options"]
