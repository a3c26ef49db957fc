"""Drop-in replacements for the peers' sampler APIs, running on genflow's fused engine.

``gf.compat.k_diffusion.sample_<name>`` (k-diffusion's samplers) and
``gf.compat.diffusers.<SchedulerName>`` (diffusers' schedulers). Neither needs the peer installed;
the submodules load on first access.
"""
import importlib

__all__ = ["diffusers", "k_diffusion"]


def __getattr__(name):
    if name in __all__:
        module = importlib.import_module(f"{__name__}.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
