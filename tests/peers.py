"""Access to the peer libraries used as test oracles (k-diffusion, diffusers).

k-diffusion's package ``__init__`` imports torchvision and training tools that do not install
beside a CPU torch, so its ``sampling`` module is loaded on its own, with the one helper it needs
from ``k_diffusion.utils`` (``append_dims``) provided here. Tests that need a peer call
``k_diffusion_sampling()`` / ``diffusers()``, which skip the test when the peer is missing.
"""
import importlib
import importlib.util
import sys
import types

import pytest


def _append_dims(x, target_dims):
    """k-diffusion's ``utils.append_dims``: append singleton dims until ``x.ndim == target_dims``."""
    return x[(...,) + (None,) * (target_dims - x.ndim)]


def k_diffusion_sampling():
    """The module ``k_diffusion.sampling`` (the test is skipped if k-diffusion is not installed)."""
    if "k_diffusion.sampling" in sys.modules:
        return sys.modules["k_diffusion.sampling"]
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None:
        pytest.skip("k-diffusion is not installed (pip install --no-deps k-diffusion==0.1.1.post1 torchsde==0.2.6 trampoline==0.1.2 torchdiffeq==0.2.5)")
    package = types.ModuleType("k_diffusion")
    package.__path__ = list(spec.submodule_search_locations)
    utils = types.ModuleType("k_diffusion.utils")
    utils.append_dims = _append_dims
    package.utils = utils
    sys.modules["k_diffusion"] = package
    sys.modules["k_diffusion.utils"] = utils
    return importlib.import_module("k_diffusion.sampling")


def diffusers():
    """The ``diffusers`` package (the test is skipped if it is not installed)."""
    return pytest.importorskip("diffusers")
