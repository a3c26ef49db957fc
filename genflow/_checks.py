"""Shared argument checks: a name from a fixed set, with a "did you mean" hint (DESIGN.md §7:
raise, don't assert; name the argument, what was expected and what was received)."""
import difflib
from typing import Sequence

__all__ = ["check_choice", "did_you_mean"]


def did_you_mean(value, options: Sequence[str], n: int = 1) -> str:
    """`` (did you mean 'x'?)`` for the options closest to ``str(value)``, or ``""``."""
    close = difflib.get_close_matches(str(value), [str(o) for o in options], n=n)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""


def check_choice(name: str, value, options: Sequence[str]):
    """``value`` when it is one of ``options``, else a ``ValueError`` naming ``name``."""
    if not ((value is None or isinstance(value, str)) and value in options):
        raise ValueError(f"{name} must be one of {tuple(options)}, got {value!r}{did_you_mean(value, options)}")
    return value
