"""diffusers' ``DDPMScheduler`` on genflow's fused update."""
from __future__ import annotations

import math

import numpy as np
import torch

from genflow.solvers.base import dynamic_threshold

from ._base import (Scheduler, SchedulerOutput, check_choice, check_prediction_type, fused, randn_like_diffusers, spaced_timesteps, TIMESTEP_SPACINGS, x0_eps_coefficients)

__all__ = ["DDPMScheduler"]

VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range")


class DDPMScheduler(Scheduler):
    """Ancestral sampling of the DDPM posterior, diffusers' ``DDPMScheduler`` interface and results.

    From ``x_t`` to the previous timestep ``s`` of the schedule (``t - 1`` before
    ``set_timesteps``; ``abar_s = 1`` after the last step), with ``a = abar``,
    ``beta = 1 - a_t/a_s``::

        x0  = x0(x_t, out)                       (clipped or thresholded if configured)
        x_s = sqrt(a_s) beta/(1 - a_t) x0 + sqrt(a_t/a_s) (1 - a_s)/(1 - a_t) x_t + std z

    ``z`` is drawn whenever ``t > 0`` (so also on the last step, as diffusers does);
    ``std^2 = (1 - a_s)/(1 - a_t) beta`` (``"fixed_small"``, ``"fixed_small_log"``), ``beta``
    (``"fixed_large"``), the model's variance (``"learned"``) or its log-interpolation between the
    two (``"learned_range"``, Nichol & Dhariwal 2021 eq. 15), the last two from the second half of
    the output channels. One model evaluation per step; two fused passes. Ho et al. (2020),
    "Denoising Diffusion Probabilistic Models", eq. 6-7 and Algorithm 2.

    ``"fixed_large_log"``, which diffusers accepts but turns into NaN samples (it takes the
    square root of ``log beta``), is rejected.
    """

    defaults = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                    trained_betas=None, variance_type="fixed_small", clip_sample=True,
                    prediction_type="epsilon", thresholding=False, dynamic_thresholding_ratio=0.995,
                    clip_sample_range=1.0, sample_max_value=1.0, timestep_spacing="leading", steps_offset=0,
                    rescale_betas_zero_snr=False)
    order = 1

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        check_prediction_type(self.config.prediction_type)
        check_choice("timestep_spacing", self.config.timestep_spacing, TIMESTEP_SPACINGS)
        check_choice("variance_type", self.config.variance_type, VARIANCE_TYPES)
        self._set_tables()
        self.one = torch.tensor(1.0)
        self.custom_timesteps = False
        self.variance_type = self.config.variance_type
        self.timesteps = torch.arange(self.config.num_train_timesteps - 1, -1, -1, dtype=torch.int64)
        self._prev = None

    def set_timesteps(self, num_inference_steps=None, device=None, timesteps=None) -> None:
        """Set ``timesteps`` (int64 [n], decreasing): spaced by ``timestep_spacing``, or the given
        custom ``timesteps`` (decreasing, below ``num_train_timesteps``)."""
        n_train = self.config.num_train_timesteps
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("pass either num_inference_steps or timesteps, not both")
        if timesteps is not None:
            t = np.array([int(v) for v in timesteps], dtype=np.int64)
            if t.size == 0 or np.any(t[1:] >= t[:-1]):
                raise ValueError(f"timesteps must be a non-empty strictly decreasing sequence, got {list(t)}")
            if t[0] >= n_train or t[-1] < 0:
                raise ValueError(f"timesteps must lie in [0, num_train_timesteps = {n_train}), got {list(t)}")
            self.custom_timesteps = True
        else:
            if num_inference_steps is None:
                raise ValueError("pass num_inference_steps or timesteps")
            t = spaced_timesteps(self.config, num_inference_steps)
            self.num_inference_steps = num_inference_steps
            self.custom_timesteps = False
        self.timesteps = torch.from_numpy(t).to(device)
        values = t.tolist()
        self._prev = {a: b for a, b in zip(values, values[1:] + [-1])}

    def previous_timestep(self, timestep) -> int:
        """The timestep after ``timestep`` in the schedule (-1 after the last; ``t - 1`` when no
        schedule was set)."""
        t = int(timestep)
        if self._prev is None:
            return t - 1
        if t not in self._prev:
            raise ValueError(f"timestep must be one of the scheduler's timesteps, got {t}")
        return self._prev[t]

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        """One DDPM step from ``timestep`` (see the class docstring).

        Args:
            model_output (Tensor[B, *D] or Tensor[B, 2C, ...] for learned variances).
            timestep (int or 0-dim Tensor): the current training timestep.
            sample (Tensor[B, *D]): x_t.
            generator (torch.Generator or list, optional): for z.
            return_dict (bool): a SchedulerOutput, else (prev_sample, pred_original_sample).
        """
        cfg = self.config
        t = int(timestep)
        s = self.previous_timestep(t)
        learned = cfg.variance_type in ("learned", "learned_range")
        predicted_variance = None
        if learned:
            if model_output.dim() < 2 or model_output.shape[1] != 2 * sample.shape[1]:
                raise ValueError(f"variance_type={cfg.variance_type!r} needs model_output with twice sample's "
                                 f"channels ({2 * sample.shape[1]}), got shape {list(model_output.shape)}")
            model_output, predicted_variance = torch.split(model_output, sample.shape[1], dim=1)
        a_t = self._abar[t]
        a_s = self._abar[s] if s >= 0 else 1.0
        beta = 1.0 - a_t / a_s
        (x0_x, x0_out), _ = x0_eps_coefficients(cfg.prediction_type, math.sqrt(a_t), math.sqrt(1.0 - a_t))

        x0 = fused(sample, [model_output], [x0_x, x0_out])
        if cfg.thresholding:
            x0 = dynamic_threshold(x0, cfg.dynamic_thresholding_ratio, cfg.sample_max_value)
        elif cfg.clip_sample:
            x0.clamp_(-cfg.clip_sample_range, cfg.clip_sample_range)

        c_x0 = math.sqrt(a_s) * beta / (1.0 - a_t)
        c_x = math.sqrt(a_t / a_s) * (1.0 - a_s) / (1.0 - a_t)
        if t <= 0:
            prev = fused(x0, [sample], [c_x0, c_x])
        else:
            z = randn_like_diffusers(model_output.shape, generator, model_output.device, model_output.dtype)
            small = max((1.0 - a_s) / (1.0 - a_t) * beta, 1e-20)
            if cfg.variance_type in ("fixed_small", "fixed_small_log"):
                prev = fused(x0, [sample], [c_x0, c_x], math.sqrt(small), noise=z)
            elif cfg.variance_type == "fixed_large":
                prev = fused(x0, [sample], [c_x0, c_x], math.sqrt(beta), noise=z)
            else:
                if cfg.variance_type == "learned":
                    scale = predicted_variance.sqrt()
                else:
                    frac = (predicted_variance + 1) / 2
                    scale = torch.exp(0.5 * (frac * math.log(beta) + (1 - frac) * math.log(small)))
                prev = fused(x0, [sample, scale * z], [c_x0, c_x, 1.0])
        if not return_dict:
            return prev, x0
        return SchedulerOutput(prev, x0)
