"""The package's error types and the divergence test every solve shares (lowest layer: imports torch only).

``NonFiniteError`` is what the time loops (``genflow.engine``), ``gf.sample``, the particle
flows and the trainer raise when a state turns NaN or Inf; ``diverged_rows`` finds the samples
that did.
"""
import torch

__all__ = ["NonFiniteError", "diverged_rows"]


class NonFiniteError(RuntimeError, FloatingPointError):
    """A solve or particle flow diverged: a step wrote NaN or Inf into the state
    (``check_finite=True``; exported as ``gf.NonFiniteError``). Also a ``FloatingPointError``,
    which the particle flows raised before."""


def diverged_rows(x: torch.Tensor) -> torch.Tensor:
    """bool [B]: the samples (rows) of ``x`` holding a NaN or Inf."""
    return ~torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1)
