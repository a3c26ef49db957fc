"""The SD-flow generator as a training family (``make_family("sdflow")``).

A one-step generator ``g_theta(eps)`` is fitted by regression onto its own samples moved by
kernel score-difference flow steps toward the data minibatch (Weber, "The Score-Difference Flow for Implicit Generative Modeling", "Generative
Adversarial Networks": the SD flow takes the discriminator's place)::

    y = g(eps) (detached);  z = y + sigma xi;  y <- y + (h / sigma^2) (D_p(z) - D_q(z))   (inner_steps times)
    loss = mean_b |g(eps_b) - y_b|^2

with ``D_p`` the Gaussian-kernel mean over the data batch and ``D_q`` the one over the
generator's batch (or ``y`` itself, ``denoiser_q="identity"``), both on ``gf.kernel_weighted_mean``.
This is ``genflow.train_sd_generator`` in the Trainer's interface: ``eps`` and ``xi`` of sample
b come from its seed, and under ``torch.distributed`` both kernel means run over the global
batch (all-gathered), so the loss does not depend on how the batch is sharded.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import distributed as dist

from genflow import sdflow
from genflow._checks import check_choice, check_int, check_real
from genflow.ops import kernel_weighted_mean
from genflow.train.families import Family
from genflow.train.objectives import draw_normal

__all__ = ["SDFlowGeneratorFamily"]

_LATENT, _PROXY = 0, 1  # Philox offsets of a sample's latent and of its proxy noise (+ inner step)


def _global(x: torch.Tensor) -> torch.Tensor:
    """x concatenated over the processes (equal slices, as the Trainer gives them), or x."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class SDFlowGeneratorFamily(Family):
    """One-step generator trained with kernel SD-flow targets (see the module docstring).

    Options:
        latent_dim (default: the data dimension), hidden (128), depth (3): the ``MLPGenerator``.
        sigma (0.5): the kernel bandwidth. step_size (default ``sigma^2``: the full denoiser
        difference). inner_steps (1): SD-flow steps per training step. denoiser_q:
        ``"kernel"`` | ``"identity"``. net: a generator ``eps [B, latent_dim] -> [B, D]``.
    """

    name = "sdflow"

    def __init__(self, *, data_shape, num_classes=None, latent_dim: Optional[int] = None, hidden=128, depth=3,
                 sigma=0.5, step_size=None, inner_steps=1, denoiser_q="kernel", net=None):
        if len(data_shape) != 1:
            raise ValueError(f"the sdflow family generates vectors: data_shape must be (D,), got {tuple(data_shape)}")
        if num_classes is not None:
            raise ValueError("the sdflow family is unconditional: num_classes must be None")
        self.latent_dim = check_int("latent_dim", data_shape[0] if latent_dim is None else latent_dim, low=1)
        self.sigma = check_real("sigma", sigma, low=0.0, low_open=True)
        self.step_size = self.sigma ** 2 if step_size is None else \
            check_real("step_size", step_size, low=0.0, low_open=True)
        self.inner_steps = check_int("inner_steps", inner_steps, low=1)
        self.denoiser_q = check_choice("denoiser_q", denoiser_q, sdflow.DENOISERS_Q)
        if net is None:
            net = sdflow.MLPGenerator(self.latent_dim, data_shape[0], hidden=check_int("hidden", hidden, low=1),
                                      depth=check_int("depth", depth, low=1))
        super().__init__({"generator": net}, data_shape, None)

    def loss(self, phase: str, batch: torch.Tensor, *, labels=None, seeds: torch.Tensor) -> torch.Tensor:
        """Mean squared distance between ``g(eps)`` and its SD-flow-moved copy."""
        seeds = self._check(phase, batch, seeds)
        eps = draw_normal((batch.shape[0], self.latent_dim), seeds, _LATENT, dtype=batch.dtype, device=batch.device)
        fake = self.modules["generator"](eps)
        y = fake.detach()
        data = _global(batch.detach())
        for k in range(self.inner_steps):
            z = y + self.sigma * draw_normal(y.shape, seeds, _PROXY + k, dtype=y.dtype, device=y.device)
            d_p = kernel_weighted_mean(z, data, sigma=self.sigma)
            d_q = y if self.denoiser_q == "identity" else kernel_weighted_mean(z, _global(y), sigma=self.sigma)
            y = y + (self.step_size / self.sigma ** 2) * (d_p - d_q)
        return (fake - y).square().sum(1).mean()

    def sample(self, n: int, *, generator=None, labels=None, **kwargs) -> torch.Tensor:
        """``n`` samples ``g(eps)``, ``eps ~ N(0, I)`` from ``generator`` (an int seed, a
        torch.Generator, or None for torch's global generator); one network evaluation."""
        check_int("n", n, low=1)
        if kwargs:
            raise ValueError(f"the sdflow family samples in one step; unexpected options {sorted(kwargs)}")
        if generator is not None and not isinstance(generator, torch.Generator):
            generator = torch.Generator().manual_seed(int(generator))
        eps = torch.randn(n, self.latent_dim, generator=generator).to(self.device)
        with torch.no_grad():
            return self.modules["generator"](eps)

