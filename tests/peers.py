"""Access to the peer libraries used as test oracles: each helper skips the test when the peer
is missing (genflow/peers.py does the loading)."""
import pytest

from genflow import peers


def k_diffusion_sampling():
    """The module ``k_diffusion.sampling`` (the test is skipped if k-diffusion is not installed)."""
    module = peers.k_diffusion_sampling()
    if module is None:
        pytest.skip(f"k-diffusion is not installed ({peers.K_DIFFUSION_INSTALL})")
    return module


def diffusers():
    """The ``diffusers`` package (the test is skipped if it is not installed)."""
    return pytest.importorskip("diffusers")
