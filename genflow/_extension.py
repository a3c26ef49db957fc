"""Loads the compiled extension ``genflow._C`` if it was built.

Without it genflow runs on the pure-PyTorch reference path and warns once how to build it.
"""
import importlib
import warnings

import torch

try:
    importlib.import_module("genflow._C")  # registers torch.ops.genflow.*

    HAS_EXTENSION = True
    _IMPORT_ERROR = None
except ImportError as error:  # pragma: no cover - exercised only without a build
    HAS_EXTENSION = False
    _IMPORT_ERROR = error

_warned = False


def has_cuda_kernels() -> bool:
    """True when the extension was built with its CUDA kernels."""
    return HAS_EXTENSION and bool(torch.ops.genflow.has_cuda())


def warn_missing_once() -> None:
    """Warn (once per process) that the fused kernels are unavailable and how to get them."""
    global _warned
    if HAS_EXTENSION or _warned:
        return
    _warned = True
    warnings.warn(
        "genflow._C is not built, so genflow runs on its pure-PyTorch reference path "
        f"({_IMPORT_ERROR}). Build the fused kernels with `pip install -e .` from the "
        "repository root (torch must be installed first).",
        RuntimeWarning,
        stacklevel=3,
    )
