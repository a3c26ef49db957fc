"""Noise sources for samplers.

A sampler asks its source for noise once per draw. ``PhiloxNoise`` hands the fused op a seed
and a fresh stream offset, so the noise is made in-kernel (DESIGN.md §2): offset 0 is the
prior sample ``x_T`` and every later draw takes the next offset. With per-sample seeds each
sample owns its stream, so a sample's noise never depends on the batch it was drawn in.
``SuppliedNoise`` calls a user function instead (k-diffusion's ``noise_sampler`` style).
"""
from typing import Callable, Optional, Sequence, Union

import torch

__all__ = ["PhiloxNoise", "SuppliedNoise", "noise_source"]

_SEED_LIMIT = 2 ** 63 - 1


class PhiloxNoise:
    """In-kernel Philox4x32-10 noise keyed by ``(seed, offset)``; ``seed`` is an int or [B] ints."""

    def __init__(self, seed: Union[int, torch.Tensor]):
        self.seed = seed
        self.offset = 0

    def draw(self, like: torch.Tensor, sigma_from=None, sigma_to=None) -> dict:
        """Keyword arguments for ``fused_update`` that add this draw's noise."""
        self.offset += 1
        return {"seed": self.seed, "offset": self.offset}

    def prior(self, shape, dtype, device) -> torch.Tensor:
        """Standard normal noise of ``shape`` from offset 0 (the prior sample)."""
        from genflow.ops import randn

        return randn(shape, seed=self.seed, offset=0, dtype=dtype, device=device)


class SuppliedNoise:
    """Noise from ``fn(sigma_from, sigma_to) -> Tensor`` (k-diffusion's ``noise_sampler``)."""

    def __init__(self, fn: Callable, generator: Optional[torch.Generator] = None):
        self.fn = fn
        self.generator = generator

    def draw(self, like: torch.Tensor, sigma_from=None, sigma_to=None) -> dict:
        noise = self.fn(sigma_from, sigma_to)
        if not isinstance(noise, torch.Tensor) or noise.shape != like.shape:
            raise ValueError(f"noise_sampler must return a tensor of shape {tuple(like.shape)}")
        return {"noise": noise.to(like.dtype)}

    def prior(self, shape, dtype, device) -> torch.Tensor:
        return torch.randn(shape, dtype=dtype, device=device, generator=self.generator)


def noise_source(generator, batch: int, noise_sampler: Optional[Callable] = None):
    """Build the noise source for ``gf.sample(generator=...)``.

    ``generator`` may be None (a fresh seed from torch's global RNG), an int seed, a sequence
    or int64 tensor of ``batch`` per-sample seeds, or a ``torch.Generator`` (one seed is drawn
    from it). ``noise_sampler`` overrides the in-kernel noise.
    """
    if noise_sampler is not None:
        if not callable(noise_sampler):
            raise TypeError("noise_sampler must be callable")
        return SuppliedNoise(noise_sampler, generator if isinstance(generator, torch.Generator) else None)
    if generator is None:
        return PhiloxNoise(int(torch.randint(0, _SEED_LIMIT, ()).item()))
    if isinstance(generator, torch.Generator):
        return PhiloxNoise(int(torch.randint(0, _SEED_LIMIT, (), generator=generator).item()))
    if isinstance(generator, bool):
        raise TypeError("generator must be an int seed, a sequence of per-sample seeds or a torch.Generator, got bool")
    if isinstance(generator, int):
        if not 0 <= generator <= _SEED_LIMIT:
            raise ValueError(f"generator seed must be in [0, 2**63 - 1], got {generator}")
        return PhiloxNoise(generator)
    if isinstance(generator, (Sequence, torch.Tensor)) and not isinstance(generator, str):
        seeds = torch.as_tensor(generator)
        if seeds.dtype.is_floating_point or seeds.dtype == torch.bool or seeds.shape != (batch,):
            raise ValueError(f"per-sample seeds must be {batch} integers (one per sample), got {seeds.dtype} {tuple(seeds.shape)}")
        if (seeds < 0).any():
            raise ValueError("per-sample seeds must be non-negative")
        return PhiloxNoise(seeds.to(torch.int64))
    raise TypeError(f"generator must be None, an int seed, per-sample seeds or a torch.Generator, got {type(generator).__name__}")
