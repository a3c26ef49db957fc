"""Shared pieces of the fuzz suite: hypothesis settings per profile, the call counter, tensor
strategies (shapes, strides, dtypes, special values) and the valid/invalid call checkers.

Profiles (``GENFLOW_FUZZ`` environment variable): ``ci`` (default; derandomized, so a CI run is
reproducible) and ``long`` (``LONG_FACTOR`` times more examples, random seeds). Neither writes a
hypothesis database.
"""
import os
import re

import torch
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st

PROFILE = os.environ.get("GENFLOW_FUZZ", "ci")
if PROFILE not in ("ci", "long"):
    raise ValueError(f"GENFLOW_FUZZ must be 'ci' or 'long', got {PROFILE!r}")
LONG_FACTOR = 20
HANG_SECONDS = 120 if PROFILE == "ci" else 3600  # per test: a hang dumps the stacks and exits

_BASE = settings(deadline=None, database=None, derandomize=PROFILE == "ci", print_blob=True,
                 phases=[p for p in Phase if p != Phase.explain],
                 suppress_health_check=list(HealthCheck))

COUNTS = {"valid": 0, "invalid": 0}
INVALID_TYPES = (ValueError, TypeError, RuntimeError)


def fuzz(examples: int):
    """Hypothesis settings for a fuzz test: ``examples`` in CI, ``LONG_FACTOR`` times more in the long run."""
    return settings(_BASE, max_examples=examples * (LONG_FACTOR if PROFILE == "long" else 1))


def valid(fn, *args, **kwargs):
    """Call ``fn`` with arguments that must be accepted; counted as a valid fuzzed call."""
    COUNTS["valid"] += 1
    return fn(*args, **kwargs)


def invalid(names, fn, *args, **kwargs):
    """Call ``fn`` with arguments it must reject with a ValueError/TypeError/RuntimeError whose
    message names one of ``names`` (a string or a tuple of strings). Returns the exception."""
    COUNTS["invalid"] += 1
    names = (names,) if isinstance(names, str) else tuple(names)
    try:
        fn(*args, **kwargs)
    except INVALID_TYPES as err:
        message = str(err)
        assert message.strip(), f"{fn.__name__} raised {type(err).__name__} with an empty message"
        assert any(re.search(rf"(?<![A-Za-z_]){re.escape(n)}", message) for n in names), (
            f"{fn.__name__}: message {message!r} does not name any of {names}")
        return err
    raise AssertionError(f"{fn.__name__} accepted invalid arguments (expected an error naming {names})")


# ---------------------------------------------------------------- tensors

SIZES = (0, 1, 2, 3, 5, 7, 13)
FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
BAD_DTYPES = (torch.int32, torch.int64, torch.bool, torch.uint8, torch.complex64)
LAYOUTS = ("contiguous", "transposed", "sliced", "expanded")
VALUES = ("normal", "normal", "normal", "huge", "tiny", "nan", "inf", "zero")


def shapes(min_rank: int = 1, max_rank: int = 4, min_batch: int = 0, sizes=SIZES):
    """Shapes [B, *D] with sizes from ``sizes`` (0, 1, odd and prime sizes)."""
    return st.lists(st.sampled_from(sizes), min_size=min_rank, max_size=max_rank).filter(
        lambda s: s[0] >= min_batch)


def make_values(shape, dtype, seed: int, values: str = "normal") -> torch.Tensor:
    """A float64 tensor of ``shape`` with ``values`` (normal; huge 1e30; tiny 1e-30; some NaN/Inf;
    zeros), rounded to ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if values == "huge":
        x = x * 1e30
    elif values == "tiny":
        x = x * 1e-30
    elif values == "zero":
        x = torch.zeros_like(x)
    elif values in ("nan", "inf") and x.numel() > 0:
        mask = torch.rand(shape, generator=g) < 0.3
        x = torch.where(mask, torch.full_like(x, float(values) * (-1 if seed % 2 else 1)), x)
    return x.to(dtype)


def with_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """``x``'s values in a non-contiguous layout (transposed, sliced or expanded where possible)."""
    if layout == "transposed" and x.dim() >= 2:
        return x.transpose(0, 1).contiguous().transpose(0, 1)
    if layout == "sliced" and x.dim() >= 1:
        big = torch.zeros(x.shape[:-1] + (2 * x.shape[-1],), dtype=x.dtype)
        big[..., ::2] = x
        return big[..., ::2]
    if layout == "expanded" and x.dim() >= 1 and x.shape[0] > 0:
        return x[:1].expand(x.shape)
    return x


@st.composite
def tensors(draw, shape, dtype, values=None, layout=None):
    """A tensor of ``shape`` and ``dtype`` with drawn values and memory layout."""
    seed = draw(st.integers(0, 2**31 - 1))
    values = draw(st.sampled_from(VALUES)) if values is None else values
    layout = draw(st.sampled_from(LAYOUTS)) if layout is None else layout
    return with_layout(make_values(shape, dtype, seed, values), layout)


def finite_floats(lo: float, hi: float):
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False)


BAD_FLOATS = (float("nan"), float("inf"), float("-inf"))
BAD_SCALARS = BAD_FLOATS + ("1.0", None, True, [1.0])


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float, what: str = "") -> None:
    """``actual`` equals ``expected`` to tolerance, NaN where it is NaN, infinities equal."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


TOL = {torch.float64: (1e-12, 1e-300), torch.float32: (1e-6, 1e-38), torch.bfloat16: (1e-2, 1e-38),
       torch.float16: (1e-3, 1e-7)}


def absmax(t: torch.Tensor) -> float:
    """The largest finite |value| of ``t`` (1 when there is none): a scale for absolute tolerances."""
    t = t.double().abs()
    t = t[torch.isfinite(t)]
    return max(1.0, float(t.max())) if t.numel() else 1.0
