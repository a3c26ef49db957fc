"""diffusers' ``DDIMScheduler`` on genflow's fused update."""
from __future__ import annotations

import math
from typing import Optional

import torch

from genflow.solvers.base import dynamic_threshold
from genflow.solvers.ddim import ddim_noise_split

from ._base import (Scheduler, SchedulerOutput, check_choice, check_prediction_type, fused, randn_like_diffusers, spaced_timesteps, TIMESTEP_SPACINGS, x0_eps_coefficients)

__all__ = ["DDIMScheduler"]


def _log_snr(abar: float) -> float:
    """``lambda = log(alpha/sigma) = log(abar/(1 - abar))/2`` (infinite at abar = 0 or 1)."""
    if abar <= 0.0 or abar >= 1.0:
        return -math.inf if abar <= 0.0 else math.inf
    return 0.5 * math.log(abar / (1.0 - abar))


class DDIMScheduler(Scheduler):
    """Denoising diffusion implicit models, diffusers' ``DDIMScheduler`` interface and results.

    From ``x_t`` at training timestep ``t`` to ``s = t - N // n`` (N training steps, n inference
    steps; diffusers uses this offset for every ``timestep_spacing``), with ``a_t = abar_t``::

        x0   = x0(x_t, out)           (clipped or thresholded if configured)
        eps  = eps(x_t, out)          (from the clipped x0 if use_clipped_model_output)
        std  = eta sqrt((1 - a_s)/(1 - a_t) (1 - a_t/a_s))
        x_s  = sqrt(a_s) x0 + sqrt(1 - a_s - std^2) eps + std z

    where ``a_s`` for ``s < 0`` is 1 (``set_alpha_to_one``) or ``abar_0``. First order, one model
    evaluation per step; two fused passes (x0, then x_s). Song et al. (2021), "Denoising Diffusion
    Implicit Models", eq. 12 and 16.

    Options are diffusers' (see ``defaults``); ``step`` takes ``eta``, ``use_clipped_model_output``,
    ``generator`` and ``variance_noise`` as diffusers' does.
    """

    defaults = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                    trained_betas=None, clip_sample=True, set_alpha_to_one=True, steps_offset=0,
                    prediction_type="epsilon", thresholding=False, dynamic_thresholding_ratio=0.995,
                    clip_sample_range=1.0, sample_max_value=1.0, timestep_spacing="leading",
                    rescale_betas_zero_snr=False)
    order = 1

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        check_prediction_type(self.config.prediction_type)
        check_choice("timestep_spacing", self.config.timestep_spacing, TIMESTEP_SPACINGS)
        self._set_tables()
        self.final_alpha_cumprod = torch.tensor(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]
        self._final_abar = 1.0 if self.config.set_alpha_to_one else self._abar[0]
        self.timesteps = torch.arange(self.config.num_train_timesteps - 1, -1, -1, dtype=torch.int64)

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """Set ``timesteps`` (int64 [n], decreasing) by ``timestep_spacing`` on ``device``."""
        t = spaced_timesteps(self.config, num_inference_steps)
        self.num_inference_steps = num_inference_steps
        self.timesteps = torch.from_numpy(t).to(device)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator=None,
             variance_noise: Optional[torch.Tensor] = None, return_dict: bool = True):
        """One DDIM step from ``timestep`` (see the class docstring).

        Args:
            model_output (Tensor[B, *D]): the network output (``prediction_type``).
            timestep (int or 0-dim Tensor): the current training timestep.
            sample (Tensor[B, *D]): x_t.
            eta (float): 0 is DDIM, 1 the DDPM posterior variance.
            use_clipped_model_output (bool): recompute eps from the clipped x0.
            generator (torch.Generator or list, optional): for the noise when eta > 0.
            variance_noise (Tensor[B, *D], optional): z itself (exclusive with generator).
            return_dict (bool): a SchedulerOutput, else the tuple (prev_sample, pred_original_sample).
        """
        if self.num_inference_steps is None:
            raise ValueError("num_inference_steps is None: call set_timesteps before step")
        cfg = self.config
        t = int(timestep)
        s = t - cfg.num_train_timesteps // self.num_inference_steps
        a_t = self._abar[t]
        a_s = self._abar[s] if s >= 0 else self._final_abar
        alpha_t, sigma_t = math.sqrt(a_t), math.sqrt(1.0 - a_t)
        (x0_x, x0_out), (eps_x, eps_out) = x0_eps_coefficients(cfg.prediction_type, alpha_t, sigma_t)

        x0 = fused(sample, [model_output], [x0_x, x0_out])
        if cfg.thresholding:
            x0 = dynamic_threshold(x0, cfg.dynamic_thresholding_ratio, cfg.sample_max_value)
        elif cfg.clip_sample:
            x0.clamp_(-cfg.clip_sample_range, cfg.clip_sample_range)

        # x' = sqrt(abar_s) x0 + sigma_s r eps + std z, the native DDIM split of the noise
        std, r = ddim_noise_split(_log_snr(a_s) - _log_snr(a_t), math.sqrt(1.0 - a_s), eta)
        direction = math.sqrt(1.0 - a_s) * r
        noise = None
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError("pass either generator= or variance_noise=, not both")
            noise = variance_noise if variance_noise is not None else randn_like_diffusers(
                model_output.shape, generator, model_output.device, model_output.dtype)
        else:
            std = 0.0
        if use_clipped_model_output:
            # eps = (x_t - alpha_t x0) / sigma_t from the clipped x0
            prev = fused(x0, [sample], [math.sqrt(a_s) - direction * alpha_t / sigma_t, direction / sigma_t],
                         std, noise=noise)
        else:
            prev = fused(x0, [sample, model_output], [math.sqrt(a_s), direction * eps_x, direction * eps_out],
                         std, noise=noise)
        if not return_dict:
            return prev, x0
        return SchedulerOutput(prev, x0)
