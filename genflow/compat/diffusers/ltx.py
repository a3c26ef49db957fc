"""diffusers' ``LTXEulerAncestralRFScheduler`` (LTX-Video) on genflow's fused update."""
from __future__ import annotations

import math
from typing import Optional

import torch

from ._base import Scheduler, SchedulerOutput, fused, randn_like_diffusers
from .flow_match import FlowMatchEulerDiscreteScheduler

__all__ = ["LTXEulerAncestralRFScheduler"]


class LTXEulerAncestralRFScheduler(Scheduler):
    """Ancestral Euler for rectified flows (ComfyUI's ``sample_euler_ancestral_RF``), diffusers'
    ``LTXEulerAncestralRFScheduler``.

    On ``x_sigma = (1 - sigma) x0 + sigma noise`` with the velocity ``out`` (``x0 = x - sigma out``),
    from ``sigma`` to ``sigma'``: ``sigma_d = sigma' (1 + (sigma'/sigma - 1) eta)``,
    ``x_d = (sigma_d/sigma) x + (1 - sigma_d/sigma) x0`` (the Euler step to ``sigma_d``), then
    re-noised to ``sigma'`` along the path::

        x' = (1 - sigma')/(1 - sigma_d + 1e-12) x_d + s_noise sqrt(max(sigma'^2 - sigma_d^2 (1 - sigma')^2/(1 - sigma_d)^2, 0)) z

    (no re-noising when ``eta = 0`` or ``s_noise = 0``; ``x' = x0`` at ``sigma' = 0``). Karras et al.
    (2022) / k-diffusion's ancestral step on the linear path (Liu et al. 2023, rectified flow).
    1 NFE per step, one fused pass. The grid is ``FlowMatchEulerDiscreteScheduler``'s with this
    config's defaults, or custom ``sigmas`` (n + 1 values, ``timesteps = sigma N``).
    """

    defaults = dict(num_train_timesteps=1000, eta=1.0, s_noise=1.0)
    order = 1

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.sigmas = None
        self.timesteps = None

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None, sigmas=None, timesteps=None,
                      mu: Optional[float] = None, **kwargs) -> None:
        """Set ``sigmas`` (float32 [n + 1]) and ``timesteps`` (``sigma N``, [n] or [n + 1] for custom sigmas)."""
        if sigmas is None and timesteps is None:
            if num_inference_steps is None:
                raise ValueError("pass num_inference_steps, sigmas or timesteps")
            base = FlowMatchEulerDiscreteScheduler.from_config(self.config)
            base.set_timesteps(num_inference_steps=num_inference_steps, device=device, mu=mu)
            self.num_inference_steps = base.num_inference_steps
            self.sigmas, self.timesteps = base.sigmas.to(device=device), base.timesteps.to(device=device)
        else:
            values = torch.as_tensor(sigmas if sigmas is not None else timesteps).to(torch.float32)
            if values.dim() != 1:
                raise ValueError(f"sigmas must be a 1-D sequence, got shape {tuple(values.shape)}")
            self.sigmas = values.to(device) if device is not None else values
            self.timesteps = self.sigmas * float(self.config.num_train_timesteps)
            self.num_inference_steps = len(values) - 1
        self._sig = self.sigmas.double().tolist()
        self._step_index = None
        self._begin_index = None

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        """One ancestral RF step from ``timestep`` (see the class docstring).

        Returns:
            SchedulerOutput or ``(prev_sample,)`` (in ``sample``'s dtype).
        """
        if isinstance(timestep, int) or (isinstance(timestep, torch.Tensor) and not timestep.is_floating_point()):
            raise ValueError(f"timestep must be one of LTXEulerAncestralRFScheduler.timesteps (a float), got the "
                             f"integer {timestep!r}")
        if self.sigmas is None:
            raise ValueError("sigmas is None: call set_timesteps before step")
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        if i >= len(self._sig) - 1:
            prev = sample
        else:
            x = sample.to(torch.float32)
            sigma, sigma_next = self._sig[i], self._sig[i + 1]
            if abs(sigma_next) < 1e-8:
                prev = fused(x, [model_output], [1.0, -sigma])
            else:
                eta, s_noise = float(self.config.eta), float(self.config.s_noise)
                sigma_down = sigma_next * (1.0 + (sigma_next / sigma - 1.0) * eta)
                ratio = sigma_down / sigma
                scale, noise, renoise = 1.0, None, 0.0
                if eta > 0.0 and s_noise > 0.0:
                    alpha_next, alpha_down = 1.0 - sigma_next, 1.0 - sigma_down
                    scale = alpha_next / (alpha_down + 1e-12)
                    spread = sigma_next ** 2 - sigma_down ** 2 * alpha_next ** 2 / (alpha_down ** 2 + 1e-12)
                    renoise = math.sqrt(max(spread, 0.0)) * s_noise
                    noise = randn_like_diffusers(x, generator)
                # x' = scale (ratio x + (1 - ratio)(x - sigma out)) + renoise z
                prev = fused(x, [model_output], [scale, -scale * (1.0 - ratio) * sigma], renoise, noise=noise)
            prev = prev.to(sample.dtype)
        self._step_index = min(self._step_index + 1, len(self._sig) - 1)
        return SchedulerOutput(prev) if return_dict else (prev,)
