"""diffusers' ``EulerDiscreteScheduler`` and ``EulerAncestralDiscreteScheduler`` on genflow's fused update."""
from __future__ import annotations

import math

import numpy as np
import torch

from ._base import (SchedulerOutput, TIMESTEP_SPACINGS, check_choice, check_prediction_type, fused, fused_planned, pack,
                    randn_like_diffusers)
from ._sigmas import SigmaScheduler, sigma_to_t

__all__ = ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler"]


def _x0_coefficients(prediction_type: str, sigma: float, sigma_hat: float):
    """``x0 = a y + b out`` in the VE variables ``y = x / alpha`` (Karras et al. 2022, Table 1):
    eps: ``y - sigma_hat out``; v: ``y / (sigma^2 + 1) - sigma / sqrt(sigma^2 + 1) out``; sample: ``out``."""
    if prediction_type == "epsilon":
        return 1.0, -sigma_hat
    if prediction_type == "v_prediction":
        return 1.0 / (sigma * sigma + 1.0), -sigma / math.sqrt(sigma * sigma + 1.0)
    return 0.0, 1.0


def _state(sample: torch.Tensor) -> torch.Tensor:
    """The state in float32 at least (diffusers upcasts half-precision samples for the step)."""
    return sample if sample.dtype in (torch.float32, torch.float64) else sample.float()


class EulerDiscreteScheduler(SigmaScheduler):
    """Euler's method on the probability-flow ODE in sigma, diffusers' ``EulerDiscreteScheduler``.

    With ``d = (y - x0(y, out)) / sigma_hat`` (the ODE drift ``dy/dsigma``)::

        sigma_hat = sigma_i (1 + gamma),  gamma = min(s_churn / n, sqrt(2) - 1) if s_tmin <= sigma_i <= s_tmax
        y_hat     = y + sqrt(sigma_hat^2 - sigma_i^2) s_noise z          (only when gamma > 0)
        y_next    = y_hat + (sigma_{i+1} - sigma_hat) d

    First order, one model evaluation per step, two fused passes (x0 and y_next, each reading
    y, out and z once). Karras et al. (2022), "Elucidating the Design Space of Diffusion-Based
    Generative Models", Algorithm 2 with the Euler step only. Note diffusers' v-prediction x0
    uses ``sigma``, not ``sigma_hat``; reproduced.
    """

    defaults = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                    trained_betas=None, prediction_type="epsilon", interpolation_type="linear",
                    use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
                    sigma_min=None, sigma_max=None, timestep_spacing="linspace", timestep_type="discrete",
                    steps_offset=0, rescale_betas_zero_snr=False, final_sigmas_type="zero")
    order = 1
    _prediction_types = ("epsilon", "sample", "original_sample", "v_prediction")

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        cfg = self.config
        check_prediction_type(cfg.prediction_type, self._prediction_types)
        check_choice("timestep_spacing", cfg.timestep_spacing, TIMESTEP_SPACINGS)
        check_choice("interpolation_type", cfg.interpolation_type, ("linear", "log_linear"))
        check_choice("timestep_type", cfg.timestep_type, ("discrete", "continuous"))
        check_choice("final_sigmas_type", cfg.final_sigmas_type, ("zero", "sigma_min"))
        self._check_sigma_grid_flags()
        self._set_tables()
        if cfg.rescale_betas_zero_snr:
            self.alphas_cumprod[-1] = 2.0 ** -24  # diffusers: keep the first sigma finite
            self._abar[-1] = 2.0 ** -24
        sigmas = torch.from_numpy(self._train_sigmas()[::-1].copy())
        n = cfg.num_train_timesteps
        if self._continuous_v:
            self.timesteps = 0.25 * sigmas.log()
        else:
            self.timesteps = torch.from_numpy(np.linspace(0, n - 1, n, dtype=float)[::-1].copy()).float()
        self._set_sigmas(torch.cat([sigmas, torch.zeros(1)]))
        self.is_scale_input_called = False
        self.use_karras_sigmas = cfg.use_karras_sigmas
        self.use_exponential_sigmas = cfg.use_exponential_sigmas
        self.use_beta_sigmas = cfg.use_beta_sigmas

    @property
    def _continuous_v(self) -> bool:
        return self.config.timestep_type == "continuous" and self.config.prediction_type == "v_prediction"

    def set_timesteps(self, num_inference_steps=None, device=None, timesteps=None, sigmas=None) -> None:
        """Set ``timesteps`` and ``sigmas``: from ``num_inference_steps`` (by ``timestep_spacing``,
        interpolated in the training sigmas, optionally re-gridded), or from custom ``timesteps``
        (decreasing training timesteps) or custom ``sigmas`` (n + 1 values, ending with the final one)."""
        cfg = self.config
        given = [name for name, v in (("num_inference_steps", num_inference_steps), ("timesteps", timesteps),
                                      ("sigmas", sigmas)) if v is not None]
        if len(given) != 1:
            raise ValueError(f"pass exactly one of num_inference_steps, timesteps or sigmas, got {given or 'none'}")
        if timesteps is not None:
            for flag in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
                if cfg[flag]:
                    raise ValueError(f"timesteps= cannot be used with {flag}=True")
            if self._continuous_v:
                raise ValueError("timesteps= cannot be used with timestep_type='continuous' and v_prediction")
        if num_inference_steps is None:
            num_inference_steps = len(timesteps) if timesteps is not None else len(sigmas) - 1
        self.num_inference_steps = num_inference_steps
        train = self._train_sigmas()
        log_sigmas = np.log(train)
        if sigmas is not None:
            sigmas = np.array(sigmas).astype(np.float32)
            timesteps = np.array([sigma_to_t(s, log_sigmas) for s in sigmas[:-1]])
        else:
            if timesteps is not None:
                timesteps = np.array(timesteps).astype(np.float32)
            else:
                timesteps = self._spaced_timesteps(num_inference_steps)
            if cfg.interpolation_type == "linear":
                sigmas = np.interp(timesteps, np.arange(0, len(train)), train)
            else:
                sigmas = torch.linspace(np.log(train[-1]), np.log(train[0]), num_inference_steps + 1).exp().numpy()
            sigmas, regridded = self._regrid(sigmas, log_sigmas, self.num_inference_steps)
            if regridded is not None:
                timesteps = regridded
            last = 0.0 if cfg.final_sigmas_type == "zero" else float(train[0])
            sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
        sigmas = torch.from_numpy(sigmas).to(dtype=torch.float32, device=device)
        if self._continuous_v:
            self.timesteps = (0.25 * sigmas[:-1].log()).to(device=device)
        else:
            self.timesteps = torch.from_numpy(timesteps.astype(np.float32)).to(device=device)
        self._step_index = None
        self._begin_index = None
        self._set_sigmas(sigmas)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, s_churn: float = 0.0,
             s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0, generator=None,
             return_dict: bool = True):
        """One Euler step from ``timestep`` (see the class docstring).

        Args:
            model_output (Tensor[B, *D]): the network output on ``scale_model_input(sample)``.
            timestep (float or 0-dim float Tensor): a value of ``timesteps``.
            sample (Tensor[B, *D]): y at the current sigma.
            s_churn, s_tmin, s_tmax, s_noise (float): Karras et al.'s stochastic churn.
            generator (torch.Generator or list, optional): for z when churn is active.
            return_dict (bool): a SchedulerOutput, else (prev_sample, pred_original_sample).
        """
        self._check_float_timestep(timestep)
        if self._step_index is None:
            self._init_step_index(timestep)
        y = _state(sample)
        sigma, sigma_next = self._sig[self._step_index], self._sig[self._step_index + 1]
        gamma = min(s_churn / (len(self._sig) - 1), 2 ** 0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * (gamma + 1)
        noise, churn = None, 0.0
        if gamma > 0:
            noise = randn_like_diffusers(model_output.shape, generator, model_output.device, model_output.dtype)
            churn = s_noise * math.sqrt(sigma_hat ** 2 - sigma ** 2)
        plans = None if gamma > 0 else self._plans.get(("euler", self._step_index))
        if plans is None:
            a, b = _x0_coefficients(self.config.prediction_type, sigma, sigma_hat)
            # y_next = y_hat + (sigma_next - sigma_hat) (y_hat - x0) / sigma_hat, with x0 = a y_hat + b out
            r = (sigma_next - sigma_hat) / sigma_hat
            c = 1.0 + r * (1.0 - a)
            if gamma > 0:
                x0 = fused(y, [model_output], [a, b], a * churn, noise=noise)
                prev = fused(y, [model_output], [c, -r * b], c * churn, noise=noise)
            else:
                plans = self._plans[("euler", self._step_index)] = (pack([a, b]), pack([c, -r * b]))
        if gamma <= 0:
            x0 = fused_planned(y, [model_output], plans[0])
            prev = fused_planned(y, [model_output], plans[1])
        if prev.dtype != model_output.dtype:
            prev = prev.to(model_output.dtype)
        self._step_index += 1
        if not return_dict:
            return prev, x0
        return SchedulerOutput(prev, x0)


class EulerAncestralDiscreteScheduler(SigmaScheduler):
    """Ancestral Euler sampling in sigma, diffusers' ``EulerAncestralDiscreteScheduler``.

    From sigma_i to sigma_{i+1} (``d = (y - x0(y, out)) / sigma_i``)::

        sigma_up   = sqrt(sigma_{i+1}^2 (sigma_i^2 - sigma_{i+1}^2) / sigma_i^2)
        sigma_down = sqrt(sigma_{i+1}^2 - sigma_up^2)
        y_next     = y + (sigma_down - sigma_i) d + sigma_up z

    z is drawn on every step (also the last, where sigma_up = 0), as diffusers does. One model
    evaluation per step, two fused passes. Karras et al. (2022) / k-diffusion ``sample_euler_ancestral``
    (Crowson); the ancestral split is DDPM's posterior in the VE variables. ``prediction_type
    ="sample"``, which diffusers rejects at ``step``, is supported (x0 = out).
    """

    defaults = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                    trained_betas=None, prediction_type="epsilon", timestep_spacing="linspace", steps_offset=0,
                    rescale_betas_zero_snr=False)
    order = 1

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        check_prediction_type(self.config.prediction_type)
        check_choice("timestep_spacing", self.config.timestep_spacing, TIMESTEP_SPACINGS)
        self._set_tables()
        if self.config.rescale_betas_zero_snr:
            self.alphas_cumprod[-1] = 2.0 ** -24  # diffusers: keep the first sigma finite
            self._abar[-1] = 2.0 ** -24
        sigmas = np.concatenate([self._train_sigmas()[::-1], [0.0]]).astype(np.float32)
        n = self.config.num_train_timesteps
        self.timesteps = torch.from_numpy(np.linspace(0, n - 1, n, dtype=float)[::-1].copy())
        self._set_sigmas(torch.from_numpy(sigmas))
        self.is_scale_input_called = False

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """Set ``timesteps`` by ``timestep_spacing`` and ``sigmas`` (interpolated, then 0), built
        once per config and arguments."""
        def build():
            timesteps = self._spaced_timesteps(num_inference_steps)
            train = self._train_sigmas()
            sigmas = np.interp(timesteps, np.arange(0, len(train)), train)
            sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
            return torch.from_numpy(timesteps).to(device=device), torch.from_numpy(sigmas)
        self._set_schedule((num_inference_steps, str(device)), build)
        self.num_inference_steps = num_inference_steps
        self._step_index = None
        self._begin_index = None

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        """One ancestral Euler step from ``timestep`` (see the class docstring).

        Args:
            model_output (Tensor[B, *D]): the network output on ``scale_model_input(sample)``.
            timestep (float or 0-dim float Tensor): a value of ``timesteps``.
            sample (Tensor[B, *D]): y at the current sigma.
            generator (torch.Generator or list, optional): for z.
            return_dict (bool): a SchedulerOutput, else (prev_sample, pred_original_sample).
        """
        self._check_float_timestep(timestep)
        if self._step_index is None:
            self._init_step_index(timestep)
        y = _state(sample)
        sigma, sigma_to = self._sig[self._step_index], self._sig[self._step_index + 1]
        sigma_up = math.sqrt(sigma_to ** 2 * (sigma ** 2 - sigma_to ** 2) / sigma ** 2)
        sigma_down = math.sqrt(max(sigma_to ** 2 - sigma_up ** 2, 0.0))
        key = ("x0", self._step_index)
        a, b = _x0_coefficients(self.config.prediction_type, sigma, sigma)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = pack([a, b])
        x0 = fused_planned(y, [model_output], plan)
        noise = randn_like_diffusers(model_output.shape, generator, model_output.device, model_output.dtype)
        r = (sigma_down - sigma) / sigma
        prev = fused(y, [model_output], [1.0 + r * (1.0 - a), -r * b], sigma_up, noise=noise)
        if prev.dtype != model_output.dtype:
            prev = prev.to(model_output.dtype)
        self._step_index += 1
        if not return_dict:
            return prev, x0
        return SchedulerOutput(prev, x0)
