"""diffusers' ``ScoreSdeVeScheduler`` (the VE SDE's predictor-corrector sampler) on genflow's fused update."""
from __future__ import annotations

import math
from typing import Optional

import torch

from ._base import Scheduler, SchedulerOutput, fused, randn_like_diffusers
from .consistency import LCMSchedulerOutput

__all__ = ["ScoreSdeVeScheduler", "SdeVeOutput"]


class SdeVeOutput(LCMSchedulerOutput):
    """``ScoreSdeVeScheduler.step_pred``'s result: ``prev_sample`` and ``prev_sample_mean`` (Tensor[B, *D])."""

    __slots__ = ("prev_sample_mean",)
    _fields = ("prev_sample", "prev_sample_mean")

    def __init__(self, prev_sample: torch.Tensor, prev_sample_mean: torch.Tensor):
        SchedulerOutput.__init__(self, prev_sample)
        self.prev_sample_mean = prev_sample_mean


class ScoreSdeVeScheduler(Scheduler):
    """Predictor-corrector sampling of the variance-exploding SDE, diffusers' ``ScoreSdeVeScheduler``.

    ``out`` is the score. Predictor (reverse diffusion, ``step_pred``) between the discrete levels
    ``sigma_i`` and ``sigma_{i-1}`` (``g^2 = sigma_i^2 - sigma_{i-1}^2``)::

        mean = x + g^2 out,   x' = mean + g z

    Corrector (Langevin, ``step_correct``) with ``eps = 2 (snr ||z|| / ||out||)^2`` (batch means of the
    per-sample norms)::

        x' = x + eps out + sqrt(2 eps) z

    Song et al. (2021), "Score-Based Generative Modeling through Stochastic Differential Equations",
    Algorithms 2-3 (the native ``pc`` solver's steps). One fused pass per call (two in ``step_pred``,
    which also returns the mean).
    """

    defaults = dict(num_train_timesteps=2000, snr=0.15, sigma_min=0.01, sigma_max=1348.0, sampling_eps=1e-5,
                    correct_steps=1)
    order = 1

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.init_noise_sigma = self.config.sigma_max
        self.timesteps = None
        self.set_sigmas(self.config.num_train_timesteps)

    def set_timesteps(self, num_inference_steps: int, sampling_eps: Optional[float] = None, device=None) -> None:
        """Set ``timesteps`` (float32 [n], from 1 to ``sampling_eps``)."""
        eps = self.config.sampling_eps if sampling_eps is None else sampling_eps
        self.timesteps = torch.linspace(1, eps, num_inference_steps, device=device)

    def set_sigmas(self, num_inference_steps: int, sigma_min: Optional[float] = None, sigma_max: Optional[float] = None,
                   sampling_eps: Optional[float] = None) -> None:
        """Set ``sigmas`` (``sigma_min (sigma_max/sigma_min)^t`` at the timesteps) and
        ``discrete_sigmas`` (``num_inference_steps`` log-uniform levels), as diffusers."""
        c = self.config
        sigma_min = c.sigma_min if sigma_min is None else sigma_min
        sigma_max = c.sigma_max if sigma_max is None else sigma_max
        if self.timesteps is None:
            self.set_timesteps(num_inference_steps, sampling_eps)
        self.discrete_sigmas = torch.exp(torch.linspace(math.log(sigma_min), math.log(sigma_max), num_inference_steps))
        self.sigmas = torch.tensor([sigma_min * (sigma_max / sigma_min) ** t for t in self.timesteps])
        self._discrete = self.discrete_sigmas.double().tolist()

    def step_pred(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
                  return_dict: bool = True):
        """The reverse-diffusion predictor at ``timestep`` (a value of ``timesteps``; see the class docstring).

        Returns:
            SdeVeOutput or ``(prev_sample, prev_sample_mean)``.
        """
        if self.timesteps is None:
            raise ValueError("timesteps is None: call set_timesteps before step_pred")
        index = int((torch.as_tensor(timestep, dtype=torch.float32) * (len(self.timesteps) - 1)).long())
        sigma = self._discrete[index]
        adjacent = self._discrete[index - 1] if index > 0 else 0.0
        g2 = sigma * sigma - adjacent * adjacent
        mean = fused(sample, [model_output], [1.0, g2])
        noise = randn_like_diffusers(sample.shape, generator, sample.device, sample.dtype)
        prev = fused(mean, [noise], [1.0, math.sqrt(g2)])
        return SdeVeOutput(prev, mean) if return_dict else (prev, mean)

    def step_correct(self, model_output: torch.Tensor, sample: torch.Tensor, generator=None, return_dict: bool = True):
        """One Langevin corrector step (see the class docstring).

        Returns:
            SchedulerOutput or ``(prev_sample,)``.
        """
        if self.timesteps is None:
            raise ValueError("timesteps is None: call set_timesteps before step_correct")
        noise = randn_like_diffusers(sample.shape, generator).to(sample.device)
        batch = sample.shape[0]
        grad_norm = torch.linalg.vector_norm(model_output.reshape(batch, -1), dim=-1).mean()
        noise_norm = torch.linalg.vector_norm(noise.reshape(batch, -1), dim=-1).mean()
        step_size = float((self.config.snr * noise_norm / grad_norm) ** 2 * 2)
        prev = fused(sample, [model_output, noise], [1.0, step_size, math.sqrt(2.0 * step_size)])
        return SchedulerOutput(prev) if return_dict else (prev,)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``x0 + discrete_sigmas[timesteps] noise`` (``timesteps``: integer levels, one per sample)."""
        sigmas = self.discrete_sigmas.double()[torch.as_tensor(timesteps).reshape(-1).long().cpu()]
        return fused(original_samples, [noise], [1.0, sigmas if sigmas.numel() > 1 else float(sigmas[0])])
