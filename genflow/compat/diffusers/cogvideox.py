"""diffusers' CogVideoX schedulers on genflow's fused update: ``CogVideoXDDIMScheduler`` and
``CogVideoXDPMScheduler``.

Both read a DDPM table whose ``alphas_cumprod`` is SNR-shifted, ``abar / (k + (1 - k) abar)``
(``k = snr_shift_scale``, i.e. the SNR divided by k), and optionally rescaled to zero terminal SNR
(Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1, on
``sqrt(abar)``), built as diffusers builds it (``scaled_linear`` betas in float64).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from genflow.solvers.dpm_coefficients import dpm_multistep_coefficients

from ._base import (Scheduler, SchedulerOutput, betas_for, check_choice, check_prediction_type, fused,
                    randn_like_diffusers, spaced_timesteps, x0_eps_coefficients)

__all__ = ["CogVideoXDDIMScheduler", "CogVideoXDPMScheduler"]


def _log_snr(abar: float) -> float:
    """``lambda = log(alpha/sigma) = log(abar/(1 - abar))/2`` (+-inf at abar = 1, 0)."""
    if abar <= 0.0 or abar >= 1.0:
        return -math.inf if abar <= 0.0 else math.inf
    return 0.5 * math.log(abar / (1.0 - abar))


class _CogVideoXScheduler(Scheduler):
    """The shifted table, the timesteps and the x0 view shared by the two CogVideoX schedulers."""

    defaults = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    trained_betas=None, clip_sample=True, set_alpha_to_one=True, steps_offset=0,
                    prediction_type="epsilon", clip_sample_range=1.0, sample_max_value=1.0,
                    timestep_spacing="leading", rescale_betas_zero_snr=False, snr_shift_scale=3.0)
    order = 1

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        c = self.config
        check_prediction_type(c.prediction_type)
        check_choice("beta_schedule", c.beta_schedule, ("linear", "scaled_linear", "squaredcos_cap_v2"))
        check_choice("timestep_spacing", c.timestep_spacing, ("linspace", "leading", "trailing"))
        if c.trained_betas is None and c.beta_schedule == "scaled_linear":
            self.betas = torch.linspace(c.beta_start ** 0.5, c.beta_end ** 0.5, c.num_train_timesteps,
                                        dtype=torch.float64) ** 2
        else:
            self.betas = betas_for({**c, "rescale_betas_zero_snr": False}).float()
        self.alphas = 1.0 - self.betas
        abar = torch.cumprod(self.alphas, dim=0)
        abar = abar / (c.snr_shift_scale + (1 - c.snr_shift_scale) * abar)
        if c.rescale_betas_zero_snr:
            root = abar.sqrt()
            first, last = root[0].clone(), root[-1].clone()
            abar = ((root - last) * (first / (first - last))) ** 2
        self.alphas_cumprod = abar
        self._abar = abar.double().tolist()
        self.final_alpha_cumprod = torch.tensor(1.0) if c.set_alpha_to_one else abar[0]
        self._final_abar = 1.0 if c.set_alpha_to_one else self._abar[0]
        self.timesteps = torch.arange(c.num_train_timesteps - 1, -1, -1, dtype=torch.int64)

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """Set ``timesteps`` (int64 [n], decreasing) by ``timestep_spacing``."""
        self.num_inference_steps = num_inference_steps
        self.timesteps = torch.from_numpy(spaced_timesteps(self.config, num_inference_steps)).to(device)

    def _tables(self, t: int):
        """``(abar_t, abar_prev)`` with ``prev = t - N // n`` (the final value below 0)."""
        if self.num_inference_steps is None:
            raise ValueError("num_inference_steps is None: call set_timesteps before step")
        prev = t - self.config.num_train_timesteps // self.num_inference_steps
        return self._abar[t], (self._abar[prev] if prev >= 0 else self._final_abar), prev

    def _x0(self, model_output, sample, a: float):
        (x0_x, x0_out), _ = x0_eps_coefficients(self.config.prediction_type, math.sqrt(a), math.sqrt(1.0 - a))
        return x0_x, x0_out


class CogVideoXDDIMScheduler(_CogVideoXScheduler):
    """diffusers' ``CogVideoXDDIMScheduler``: deterministic DDIM on the shifted table.

    ``x' = sqrt((1 - a')/(1 - a)) x + (sqrt(a') - sqrt(a) sqrt((1 - a')/(1 - a))) x0`` (Song et al. 2021,
    eq. 12 with eta = 0, written in ``x`` and ``x0``); ``eta``, ``clip_sample`` and the noise arguments
    are accepted and unused, as in diffusers. 1 NFE per step; two fused passes (x0, x').
    """

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator=None, variance_noise=None, return_dict: bool = True):
        """One DDIM step from ``timestep`` to ``timestep - N // n``.

        Returns:
            SchedulerOutput or ``(prev_sample, pred_original_sample)``.
        """
        a, a_prev, _ = self._tables(int(timestep))
        x0_x, x0_out = self._x0(model_output, sample, a)
        c_x = math.sqrt((1.0 - a_prev) / (1.0 - a))
        c_x0 = math.sqrt(a_prev) - math.sqrt(a) * c_x
        x0 = fused(sample, [model_output], [x0_x, x0_out])
        prev = fused(sample, [model_output], [c_x + c_x0 * x0_x, c_x0 * x0_out])
        return SchedulerOutput(prev, x0) if return_dict else (prev, x0)


class CogVideoXDPMScheduler(_CogVideoXScheduler):
    """diffusers' ``CogVideoXDPMScheduler``: SDE-DPM-Solver++(2M) on the shifted table.

    The native ``dpm_multistep_coefficients`` (data prediction, ``eta = 1``, midpoint, ``variant="diffusers"``):
    ``x' = (sigma'/sigma) e^{-h} x + alpha' (1 - e^{-2h}) D + sigma' sqrt(1 - e^{-2h}) z`` with
    ``D = x0`` on the first step (no ``old_pred_original_sample``) and the last, else
    ``D = (1 + 1/(2r)) x0 - x0_old/(2r)``, ``r = h_last/h`` (Lu et al. 2022b, "DPM-Solver++", section 4).
    As diffusers, z is drawn once more on second-order steps (the first draw unused), first-order
    steps return a tuple whatever ``return_dict`` says, and ``return_dict`` defaults to False.
    1 NFE per step; two fused passes (x0, x').
    """

    def step(self, model_output: torch.Tensor, old_pred_original_sample: Optional[torch.Tensor], timestep,
             timestep_back, sample: torch.Tensor, eta: float = 0.0, use_clipped_model_output: bool = False,
             generator=None, variance_noise=None, return_dict: bool = False):
        """One step from ``timestep``; ``timestep_back`` is the previous step's timestep (None at the start).

        Returns:
            ``(prev_sample, pred_original_sample)`` (or a SchedulerOutput on second-order steps with ``return_dict``).
        """
        a, a_prev, prev_t = self._tables(int(timestep))
        x0_x, x0_out = self._x0(model_output, sample, a)
        x0 = fused(sample, [model_output], [x0_x, x0_out])
        h = _log_snr(a_prev) - _log_snr(a)
        noise = randn_like_diffusers(sample.shape, generator, sample.device, sample.dtype)
        second = old_pred_original_sample is not None and prev_t >= 0
        h_prev = [_log_snr(a) - _log_snr(self._abar[int(timestep_back)])] if second else []
        coefs, scale = dpm_multistep_coefficients(h, h_prev, math.sqrt(a), math.sqrt(1.0 - a), math.sqrt(a_prev),
                                                  math.sqrt(1.0 - a_prev), data_prediction=True, eta=1.0,
                                                  solver_type="midpoint", variant="diffusers")
        if not second:
            return fused(x0, [sample], [coefs[1], coefs[0]], scale, noise=noise), x0
        noise = randn_like_diffusers(sample.shape, generator, sample.device, sample.dtype)
        prev = fused(x0, [sample, old_pred_original_sample], [coefs[1], coefs[0], coefs[2]], scale, noise=noise)
        return SchedulerOutput(prev, x0) if return_dict else (prev, x0)
