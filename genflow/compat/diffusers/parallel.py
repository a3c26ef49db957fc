"""diffusers' parallel-sampling schedulers on genflow's fused update: ``DDIMParallelScheduler`` and
``DDPMParallelScheduler`` (ParaDiGMS, Shih et al. 2023, "Parallel Sampling of Diffusion Models":
the DDIM / DDPM step of many timesteps at once, one per sample, in ``batch_step_no_noise``)."""
from __future__ import annotations

import math

import torch

from genflow.solvers.base import dynamic_threshold

from ._base import fused, x0_eps_coefficients
from .ddim import DDIMScheduler
from .ddpm import DDPMScheduler

__all__ = ["DDIMParallelScheduler", "DDPMParallelScheduler"]


def _per_sample(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


class _BatchStep:
    """The per-sample tables of ``batch_step_no_noise`` (mixed into the DDIM and DDPM schedulers)."""

    def _batch_tables(self, timesteps: torch.Tensor, batch: int):
        """Per-sample ``(abar_t, abar_prev)`` (lists of floats) of ``timesteps`` (one per sample), with
        ``prev = t - N // n`` and ``abar_prev = 1`` below 0 (diffusers' batched rule, whatever
        ``set_alpha_to_one`` says)."""
        t = torch.as_tensor(timesteps).reshape(-1).tolist()
        if len(t) != batch:
            raise ValueError(f"timesteps must hold one timestep per sample (B = {batch}), got {len(t)}")
        n = self.num_inference_steps if self.num_inference_steps else self.config.num_train_timesteps
        ratio = self.config.num_train_timesteps // n
        abar = self._abar
        return [abar[int(v)] for v in t], [abar[int(v) - ratio] if int(v) - ratio >= 0 else 1.0 for v in t]

    def _batch_x0(self, model_output, sample, a_t):
        """The per-sample x0 prediction (clipped or thresholded if configured) and the per-sample
        ``(eps_x, eps_out)`` coefficients of the noise prediction."""
        cfg = self.config
        views = [x0_eps_coefficients(cfg.prediction_type, math.sqrt(a), math.sqrt(1.0 - a)) for a in a_t]
        x0 = fused(sample, [model_output], [_per_sample([v[0][0] for v in views]), _per_sample([v[0][1] for v in views])])
        if cfg.thresholding:
            x0 = dynamic_threshold(x0, cfg.dynamic_thresholding_ratio, cfg.sample_max_value)
        elif cfg.clip_sample:
            x0.clamp_(-cfg.clip_sample_range, cfg.clip_sample_range)
        return x0, [v[1] for v in views]


class DDIMParallelScheduler(_BatchStep, DDIMScheduler):
    """``DDIMScheduler`` (same config, timesteps and ``step``) plus ``batch_step_no_noise``: the
    deterministic DDIM step (Song et al. 2021, eq. 12, eta = 0) of each sample from its own
    timestep ``t_b`` to ``t_b - N // n``, ``x' = sqrt(a') x0 + sqrt(1 - a') eps``, in two fused passes
    with per-sample coefficients. diffusers' ``DDIMParallelScheduler``."""

    def batch_step_no_noise(self, model_output: torch.Tensor, timesteps: torch.Tensor, sample: torch.Tensor,
                            eta: float = 0.0, use_clipped_model_output: bool = False) -> torch.Tensor:
        """The DDIM step of every sample from its own timestep (Tensor[B]); eta must be 0.

        Returns:
            Tensor[B, *D]: the samples at ``timesteps - N // n``.
        """
        if self.num_inference_steps is None:
            raise ValueError("num_inference_steps is None: call set_timesteps before batch_step_no_noise")
        if eta != 0.0:
            raise ValueError(f"eta must be 0 in batch_step_no_noise (a noise-free step), got {eta}")
        a_t, a_prev = self._batch_tables(timesteps, sample.shape[0])
        x0, eps = self._batch_x0(model_output, sample, a_t)
        c_x0 = _per_sample([math.sqrt(a) for a in a_prev])
        direction = [math.sqrt(1.0 - a) for a in a_prev]
        if use_clipped_model_output:  # eps = (x - sqrt(a_t) x0) / sqrt(1 - a_t) from the clipped x0
            return fused(x0, [sample], [c_x0 - _per_sample([d * math.sqrt(a / (1.0 - a)) for d, a in zip(direction, a_t)]),
                                        _per_sample([d / math.sqrt(1.0 - a) for d, a in zip(direction, a_t)])])
        return fused(x0, [sample, model_output], [c_x0, _per_sample([d * e[0] for d, e in zip(direction, eps)]),
                                                  _per_sample([d * e[1] for d, e in zip(direction, eps)])])


class DDPMParallelScheduler(_BatchStep, DDPMScheduler):
    """``DDPMScheduler`` (same config, timesteps and ``step``) plus ``batch_step_no_noise``: the
    noise-free DDPM posterior mean (Ho et al. 2020, eq. 7) of each sample from its own timestep
    ``t_b`` to ``t_b - N // n``, ``x' = sqrt(a') beta/(1 - a) x0 + sqrt(a/a') (1 - a')/(1 - a) x``, in two
    fused passes with per-sample coefficients. diffusers' ``DDPMParallelScheduler``."""

    def batch_step_no_noise(self, model_output: torch.Tensor, timesteps: torch.Tensor,
                            sample: torch.Tensor) -> torch.Tensor:
        """The noise-free DDPM step of every sample from its own timestep (Tensor[B]).

        Returns:
            Tensor[B, *D]: the posterior means at ``timesteps - N // n``.
        """
        if model_output.shape[1] == 2 * sample.shape[1] and self.variance_type in ("learned", "learned_range"):
            model_output = model_output[:, : sample.shape[1]]
        a_t, a_prev = self._batch_tables(timesteps, sample.shape[0])
        x0, _ = self._batch_x0(model_output, sample, a_t)
        c_x0 = [math.sqrt(p) * (1.0 - a / p) / (1.0 - a) for a, p in zip(a_t, a_prev)]
        c_x = [math.sqrt(a / p) * (1.0 - p) / (1.0 - a) for a, p in zip(a_t, a_prev)]
        return fused(x0, [sample], [_per_sample(c_x0), _per_sample(c_x)])
