"""Shared argument checks (the one validators module): numbers of every numeric type (Python,
NumPy, 0-d tensors), flags, and a name from a fixed set with a "did you mean" hint (DESIGN.md §7:
raise, don't assert; name the argument, what was expected and what was received)."""
import difflib
import math
import numbers
from typing import Optional, Sequence

import numpy

__all__ = ["check_bool", "check_choice", "check_int", "check_real", "did_you_mean"]


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
    raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
