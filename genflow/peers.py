"""Optional access to the peer libraries (k-diffusion, diffusers, torchdiffeq, torchsde, torchode, ...).

genflow never needs them; the demo, ``genflow bench`` and the tests use them to compare. k-diffusion's
package ``__init__`` imports torchvision and training tools that do not install beside a CPU torch,
so its ``sampling`` module is loaded on its own, with the one helper it needs from
``k_diffusion.utils`` (``append_dims``) provided here when the real package cannot be imported.
"""
import importlib
import importlib.util
import sys
import types

__all__ = ["K_DIFFUSION_INSTALL", "k_diffusion_sampling", "optional"]

K_DIFFUSION_INSTALL = ("pip install --no-deps k-diffusion==0.1.1.post1 torchsde==0.2.6 trampoline==0.1.2 "
                       "torchdiffeq==0.2.5")


def _append_dims(x, target_dims):
    """k-diffusion's ``utils.append_dims``: append singleton dims until ``x.ndim == target_dims``."""
    return x[(...,) + (None,) * (target_dims - x.ndim)]


def k_diffusion_sampling():
    """The module ``k_diffusion.sampling``, or None when k-diffusion is not installed."""
    if "k_diffusion.sampling" in sys.modules:
        return sys.modules["k_diffusion.sampling"]
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None:
        return None
    if "k_diffusion" not in sys.modules:
        package = types.ModuleType("k_diffusion")
        package.__path__ = list(spec.submodule_search_locations)
        package.__spec__ = spec  # the real package's spec: importlib.util.find_spec keeps working on it
        utils = types.ModuleType("k_diffusion.utils")
        utils.append_dims = _append_dims
        package.utils = utils
        sys.modules["k_diffusion"] = package
        sys.modules["k_diffusion.utils"] = utils
    return importlib.import_module("k_diffusion.sampling")


def optional(name: str):
    """The module ``name`` (e.g. "diffusers", "torchdiffeq", "torchsde"), or None if not installed."""
    if importlib.util.find_spec(name.split(".")[0]) is None:
        return None
    return importlib.import_module(name)
