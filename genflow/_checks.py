"""Shared argument checks (the one validators module): numbers of every numeric type (Python,
NumPy, 0-d tensors), flags, and a name from a fixed set with a "did you mean" hint (DESIGN.md §7:
raise, don't assert; name the argument, what was expected and what was received)."""
import difflib
import math
import numbers
from typing import List, Optional, Sequence

import numpy
import torch

__all__ = ["check_bool", "check_choice", "check_int", "check_points", "check_real", "did_you_mean", "make_generator",
           "per_step"]


def did_you_mean(value, options: Sequence[str], n: int = 1) -> str:
    """`` (did you mean 'x'?)`` for the options closest to ``str(value)``, or ``""``."""
    close = difflib.get_close_matches(str(value), [str(o) for o in options], n=n)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""


def check_choice(name: str, value, options: Sequence[str]):
    """``value`` when it is one of ``options``, else a ``ValueError`` naming ``name``."""
    if not ((value is None or isinstance(value, str)) and value in options):
        raise ValueError(f"{name} must be one of {tuple(options)}, got {value!r}{did_you_mean(value, options)}")
    return value


def _as_scalar(name: str, value, expected: str):
    """A Python scalar from a Python, NumPy or 0-d / one-element tensor number, else TypeError."""
    if hasattr(value, "shape") and hasattr(value, "item") and not isinstance(value, (int, float)):
        if tuple(value.shape) not in ((), (1,)):
            raise TypeError(f"{name} must be {expected}, got an array of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__} {value!r}")
    return value


def check_int(name: str, value, *, low: Optional[int] = None, high: Optional[int] = None) -> int:
    """``value`` as a Python int: a Python, NumPy or 0-d tensor integer (or an integral float
    such as ``4.0``) in ``[low, high]``; a ``TypeError``/``ValueError`` naming ``name`` otherwise."""
    value = _as_scalar(name, value, "an integer")
    if isinstance(value, numbers.Integral):
        value = int(value)
    elif math.isfinite(value) and float(value).is_integer():
        value = int(value)
    else:
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return value


def check_real(name: str, value, *, low: Optional[float] = None, high: Optional[float] = None,
               low_open: bool = False, allow_inf: bool = False) -> float:
    """``value`` as a Python float: a Python, NumPy or 0-d tensor real number, finite unless
    ``allow_inf``, never NaN, and ``>= low`` (``> low`` with ``low_open``) and ``<= high``."""
    value = float(_as_scalar(name, value, "a real number"))
    if math.isnan(value) or (math.isinf(value) and not allow_inf):
        raise ValueError(f"{name} must be a finite number, got {value}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return value


def check_bool(name: str, value) -> bool:
    """``value`` when it is a bool (or a NumPy bool), else a ``TypeError`` naming ``name``."""
    if isinstance(value, (bool, numpy.bool_)):
        return bool(value)
    raise TypeError(f"{name} must be a bool (True or False), got {type(value).__name__} {value!r}")


def check_points(name: str, x, dim: Optional[int] = None, like: Optional[torch.Tensor] = None,
                 min_rows: int = 1) -> None:
    """Raise unless ``x`` is a finite float32/float64 Tensor[N, d] (N >= min_rows, d = dim, dtype
    and device of ``like``)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [N, d], got {type(x).__name__}")
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name} must be float32 or float64, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{name} must have shape [N, d], got {list(x.shape)}")
    if x.shape[0] < min_rows:
        raise ValueError(f"{name} must have at least {min_rows} rows, got shape {list(x.shape)}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} must have d = {dim} columns (like source), got shape {list(x.shape)}")
    if like is not None and (x.dtype != like.dtype or x.device != like.device):
        raise ValueError(f"{name} must have source's dtype and device ({like.dtype}, {like.device}), "
                         f"got ({x.dtype}, {x.device})")
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x).all(dim=1)).sum())
        raise ValueError(f"{name} must be finite: {bad} of its {x.shape[0]} rows hold NaN or Inf")


def per_step(name: str, value, steps: int, *, allow_zero: bool = False) -> List[float]:
    """A per-step list of ``steps`` floats from a number or a sequence of ``steps`` numbers
    (each > 0, or >= 0 with ``allow_zero``)."""
    values = list(value) if isinstance(value, (Sequence, torch.Tensor, numpy.ndarray)) else [value] * steps
    if len(values) != steps:
        raise ValueError(f"{name} must be a number or a sequence of steps = {steps} numbers, got {len(values)}")
    return [check_real(name, v, low=0.0, low_open=not allow_zero) for v in values]


def make_generator(generator, device: torch.device) -> torch.Generator:
    """A torch.Generator on ``device`` from None (fresh seed), an int seed or a Generator."""
    if isinstance(generator, torch.Generator):
        if generator.device.type != torch.device(device).type:
            raise ValueError(f"generator must be on the particles' device {device}, got {generator.device}")
        return generator
    rng = torch.Generator(device=device)
    if generator is None:
        rng.seed()
    elif isinstance(generator, numbers.Integral) and not isinstance(generator, bool):
        rng.manual_seed(int(generator))
    else:
        raise TypeError(f"generator must be None, an int seed or a torch.Generator, got {type(generator).__name__}")
    return rng


def check_float_dtype(name: str, dtype) -> torch.dtype:
    """A floating-point (real) ``torch.dtype``, else a TypeError naming ``name``."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype.is_complex:
        raise TypeError(f"{name} must be a floating-point torch.dtype (e.g. torch.float32), got {dtype!r}")
    return dtype


def state_dtype_for(state_dtype, input_dtype: torch.dtype, cuda_graph: bool, input_name: str) -> torch.dtype:
    """A solver state's dtype (``gf.sample``'s and ``gf.solve``'s ``state_dtype=``): as asked, else
    float32 for a float16/bfloat16 input and the input's dtype otherwise; under ``cuda_graph``
    always the input's (the capture is keyed on it)."""
    if state_dtype is None:
        half = input_dtype in (torch.float16, torch.bfloat16)
        return torch.float32 if half and not cuda_graph else input_dtype
    state_dtype = check_float_dtype("state_dtype", state_dtype)
    if cuda_graph and state_dtype != input_dtype:
        raise ValueError(f"cuda_graph=True keeps the state in {input_name}'s dtype {input_dtype}, got "
                         f"state_dtype={state_dtype}")
    return state_dtype
