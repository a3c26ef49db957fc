"""The equations the general engine integrates: ``gf.ODE`` and ``gf.SDE``.

A term wraps the user's functions with the calling convention of torchdiffeq and torchsde:
``drift(t, y)`` and ``diffusion(t, y)``, where ``y`` is the batched state ``[B, *D]`` and ``t``
is a tensor of ``y``'s dtype and device: 0-dimensional when every sample is at the same time,
shape ``[B]`` when each sample has its own time (per-sample start and end times).
"""
from typing import Callable, Optional

import torch

from genflow._checks import check_choice

__all__ = ["ODE", "SDE", "NOISE_TYPES", "SDE_TYPES"]

NOISE_TYPES = ("diagonal", "scalar", "additive", "general")
SDE_TYPES = ("ito", "stratonovich")


def _check_callable(name: str, fn) -> Callable:
    if not callable(fn):
        raise TypeError(f"{name} must be a callable fn(t, y) -> Tensor, got {type(fn).__name__}")
    return fn


class ODE:
    """``dy/dt = drift(t, y)``.

    Args:
        drift: ``fn(t, y) -> Tensor[B, *D]``.
    """

    def __init__(self, drift: Callable):
        self.drift = _check_callable("drift", drift)

    def __repr__(self):
        return f"ODE({getattr(self.drift, '__name__', type(self.drift).__name__)})"


class SDE:
    """``dy = drift(t, y) dt + diffusion(t, y) dW`` (Itô), or ``... o dW`` (Stratonovich).

    The shape of ``diffusion(t, y)`` and of the Brownian increment ``dW`` depend on ``noise``
    (torchsde's noise types; Kloeden & Platen, *Numerical Solution of SDEs*, §10):

    - ``"diagonal"``: ``g`` is ``[B, *D]``, one independent Brownian motion per component,
      ``dW`` is ``[B, *D]`` and the noise term is ``g * dW`` (elementwise).
    - ``"scalar"``: ``g`` is ``[B, *D]``, one Brownian motion per sample, ``dW`` is ``[B]``
      and the noise term is ``g * dW[:, None, ...]``.
    - ``"additive"``: like ``"diagonal"`` but ``g`` does not depend on ``y`` (``g(t, y) = g(t)``),
      which the strong-order-1.5 SRA schemes require.
    - ``"general"``: ``g`` is ``[B, D, m]`` for a flat state ``[B, D]``, ``dW`` is ``[B, m]``
      (``m = brownian_size``), the noise term is ``g @ dW``.

    Args:
        drift: ``fn(t, y) -> Tensor[B, *D]``.
        diffusion: ``fn(t, y) -> Tensor`` of the shape above.
        noise: one of ``NOISE_TYPES``.
        sde_type: ``"ito"`` (default) or ``"stratonovich"``; a solver that needs the other
            interpretation says so (``stochastic_heun`` and ``reversible_heun`` integrate
            Stratonovich SDEs).
        brownian_size: ``m`` for ``noise="general"`` (required there, ignored otherwise).
    """

    def __init__(self, drift: Callable, diffusion: Callable, *, noise: str = "diagonal", sde_type: str = "ito",
                 brownian_size: Optional[int] = None):
        self.drift = _check_callable("drift", drift)
        self.diffusion = _check_callable("diffusion", diffusion)
        self.noise = check_choice("noise", noise, NOISE_TYPES)
        self.sde_type = check_choice("sde_type", sde_type, SDE_TYPES)
        if noise == "general":
            if isinstance(brownian_size, bool) or not isinstance(brownian_size, int) or brownian_size < 1:
                raise ValueError(f"brownian_size must be an int >= 1 for noise='general', got {brownian_size!r}")
        self.brownian_size = brownian_size if noise == "general" else None

    def brownian_shape(self, y: torch.Tensor) -> tuple:
        """The shape of one Brownian increment ``dW`` for the state ``y``."""
        if self.noise == "scalar":
            return (y.shape[0],)
        if self.noise == "general":
            return (y.shape[0], self.brownian_size)
        return tuple(y.shape)

    def __repr__(self):
        return f"SDE(noise={self.noise!r}, sde_type={self.sde_type!r})"
