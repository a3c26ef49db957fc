"""Loads the compiled extension ``genflow._C`` if it was built, and checks requested devices.

Without it genflow runs on the pure-PyTorch reference path and warns once how to build it.
:func:`check_device` is the one check of a ``device=`` argument: CUDA asked of a torch build or
a machine without it is an error naming the argument, not torch's assertion deep inside.
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


def check_device(name: str, device):
    """``device`` as a ``torch.device`` (None stays None), or an error naming ``name``.

    Raises:
        TypeError: ``device`` is not a string, int or ``torch.device``.
        ValueError: not a device name, or a CUDA device this torch build or machine lacks
            (no CUDA support in torch, no visible GPU, or an index past the last GPU).
    """
    if device is None:
        return None
    if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
        raise TypeError(f"{name} must be a device such as 'cpu' or 'cuda:0', got {type(device).__name__} {device!r}")
    try:
        dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    except RuntimeError:
        raise ValueError(f"{name} must be a device such as 'cpu' or 'cuda:0', got {device!r}") from None
    if dev.type != "cuda":
        return dev
    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        raise ValueError(f"{name}={device!r} asks for CUDA, but this torch build has no CUDA support "
                         f"(torch {torch.__version__}); use device='cpu' or install a CUDA build of torch")
    count = torch.cuda.device_count()
    if count == 0:
        raise ValueError(f"{name}={device!r} asks for CUDA, but no GPU is visible on this machine "
                         "(torch.cuda.device_count() == 0; check CUDA_VISIBLE_DEVICES and the driver)")
    if dev.index is not None and dev.index >= count:
        raise ValueError(f"{name}={device!r} asks for GPU {dev.index}, but this machine shows {count} "
                         f"(indices 0..{count - 1})")
    return dev


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
