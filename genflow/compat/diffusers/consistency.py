"""diffusers' consistency-model schedulers on genflow's fused update: ``LCMScheduler`` and
``TCDScheduler`` (the native ``lcm`` and ``tcd`` solvers of ``genflow.solvers.consistency`` on a
DDPM table, with diffusers' integer timesteps and its boundary-condition scalings) and
``CMStochasticIterativeScheduler`` (consistency models on an EDM grid)."""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from genflow.solvers.base import dynamic_threshold

from ._base import (Scheduler, SchedulerOutput, check_choice, check_prediction_type, fused, randn_like_diffusers,
                    x0_eps_coefficients)
from ._sigmas import SigmaScheduler
from .edm import karras_ramp

__all__ = ["LCMScheduler", "TCDScheduler", "CMStochasticIterativeScheduler", "SCMScheduler", "LCMSchedulerOutput", "TCDSchedulerOutput"]


class LCMSchedulerOutput(SchedulerOutput):
    """``LCMScheduler.step``'s result: ``prev_sample`` and ``denoised`` (Tensor[B, *D], the
    boundary-condition-scaled x0); reads as diffusers' output does (attributes, indexing, tuples)."""

    __slots__ = ("denoised",)
    _fields = ("prev_sample", "denoised")

    def __init__(self, prev_sample: torch.Tensor, denoised: torch.Tensor):
        super().__init__(prev_sample)
        self.denoised = denoised

    def to_tuple(self) -> tuple:
        return tuple(getattr(self, k) for k in self._fields)

    def keys(self) -> list:
        return list(self._fields)


class TCDSchedulerOutput(LCMSchedulerOutput):
    """``TCDScheduler.step``'s result: ``prev_sample`` and ``pred_noised_sample`` (Tensor[B, *D])."""

    __slots__ = ("pred_noised_sample",)
    _fields = ("prev_sample", "pred_noised_sample")

    def __init__(self, prev_sample: torch.Tensor, pred_noised_sample: torch.Tensor):
        SchedulerOutput.__init__(self, prev_sample)
        self.pred_noised_sample = pred_noised_sample


class _ConsistencyScheduler(Scheduler):
    """Tables, timesteps and bookkeeping shared by the LCM and TCD schedulers."""

    defaults = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    trained_betas=None, original_inference_steps=50, clip_sample=False, clip_sample_range=1.0,
                    set_alpha_to_one=True, steps_offset=0, prediction_type="epsilon", thresholding=False,
                    dynamic_thresholding_ratio=0.995, sample_max_value=1.0, timestep_spacing="leading",
                    timestep_scaling=10.0, rescale_betas_zero_snr=False)
    order = 1

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        check_prediction_type(self.config.prediction_type)
        check_choice("beta_schedule", self.config.beta_schedule, ("linear", "scaled_linear", "squaredcos_cap_v2"))
        self._set_tables()
        self.final_alpha_cumprod = torch.tensor(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]
        self._final_abar = 1.0 if self.config.set_alpha_to_one else self._abar[0]
        self.timesteps = torch.arange(self.config.num_train_timesteps - 1, -1, -1, dtype=torch.int64)
        self.custom_timesteps = False

    def _origin_timesteps(self, original_inference_steps, strength: float) -> np.ndarray:
        """The distillation schedule ``k i - 1`` (``k = N // original_steps``, ``i = 1..original_steps
        strength``), increasing."""
        original = self.config.original_inference_steps if original_inference_steps is None else original_inference_steps
        if original > self.config.num_train_timesteps:
            raise ValueError(f"original_inference_steps must be <= num_train_timesteps = "
                             f"{self.config.num_train_timesteps}, got {original}")
        k = self.config.num_train_timesteps // original
        return np.asarray(list(range(1, int(original * strength) + 1))) * k - 1

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None,
                      original_inference_steps: Optional[int] = None, timesteps=None, strength: float = 1.0) -> None:
        """Set ``timesteps`` (int64, decreasing): ``num_inference_steps`` evenly spaced entries of the
        distillation schedule (``original_inference_steps`` of the ``strength`` part of training time),
        or custom decreasing ``timesteps`` (their last ``strength`` part)."""
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps or timesteps")
        origin = self._origin_timesteps(original_inference_steps, strength)
        original = self.config.original_inference_steps if original_inference_steps is None else original_inference_steps
        if timesteps is not None:
            for i in range(1, len(timesteps)):
                if timesteps[i] >= timesteps[i - 1]:
                    raise ValueError(f"timesteps must be decreasing, got {list(timesteps)}")
            if timesteps[0] >= self.config.num_train_timesteps:
                raise ValueError(f"timesteps must start below num_train_timesteps = {self.config.num_train_timesteps}, "
                                 f"got {timesteps[0]}")
            timesteps = np.array(timesteps, dtype=np.int64)
            self.num_inference_steps = len(timesteps)
            self.custom_timesteps = True
            start = max(self.num_inference_steps - min(int(self.num_inference_steps * strength),
                                                       self.num_inference_steps), 0)
            timesteps = timesteps[start * self.order:]
        else:
            if num_inference_steps > self.config.num_train_timesteps:
                raise ValueError(f"num_inference_steps must be <= num_train_timesteps = "
                                 f"{self.config.num_train_timesteps}, got {num_inference_steps}")
            if len(origin) // num_inference_steps < 1 or num_inference_steps > original:
                raise ValueError(f"num_inference_steps = {num_inference_steps} must be <= original_inference_steps = "
                                 f"{original} and <= the {len(origin)} entries of the distillation schedule "
                                 "(original_inference_steps x strength)")
            self.num_inference_steps = num_inference_steps
            origin = origin[::-1].copy()
            indices = np.floor(np.linspace(0, len(origin), num=num_inference_steps, endpoint=False)).astype(np.int64)
            timesteps = origin[indices]
        self.timesteps = torch.from_numpy(timesteps).to(device=device, dtype=torch.long)
        self._step_index = None
        self._begin_index = None

    def _check_ready(self, timestep) -> int:
        if self.num_inference_steps is None:
            raise ValueError("num_inference_steps is None: call set_timesteps before step")
        if self._step_index is None:
            self._init_step_index(timestep)
        return self._step_index

    def _abar_at(self, t: int) -> float:
        return self._abar[t] if t >= 0 else self._final_abar


class LCMScheduler(_ConsistencyScheduler):
    """Latent Consistency Models' multistep sampling, diffusers' ``LCMScheduler``.

    With ``x0 = x0(x_t, out)`` (clipped or thresholded if configured) and the consistency boundary
    scalings ``c_skip = sd^2 / ((10 t)^2 + sd^2)``, ``c_out = 10 t / sqrt((10 t)^2 + sd^2)`` (``sd = 0.5``,
    ``10 = timestep_scaling``)::

        denoised = c_out x0 + c_skip x_t
        x'       = sqrt(abar') denoised + sqrt(1 - abar') z       (the last step: x' = denoised)

    The update is the native ``lcm`` step (``x' = alpha' x0 + sigma' z``) on ``denoised``. Luo et al.
    (2023), "Latent Consistency Models", Algorithm 1 (Song et al. 2023, "Consistency Models",
    Algorithm 1 and eq. 7 for the scalings). 1 NFE per step; two fused passes (denoised, x').
    """

    def get_scalings_for_boundary_condition_discrete(self, timestep):
        """``(c_skip, c_out)`` at training timestep ``timestep`` (see the class docstring)."""
        self.sigma_data = 0.5
        scaled = timestep * self.config.timestep_scaling
        return (self.sigma_data ** 2 / (scaled ** 2 + self.sigma_data ** 2),
                scaled / (scaled ** 2 + self.sigma_data ** 2) ** 0.5)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        """One LCM step from ``timestep`` (see the class docstring).

        Args:
            model_output (Tensor[B, *D]): the network output at ``(sample, timestep)``.
            timestep (int or 0-dim Tensor): the current entry of ``timesteps``.
            sample (Tensor[B, *D]): x_t.
            generator (torch.Generator or list, optional): for z.
            return_dict (bool): an LCMSchedulerOutput, else ``(prev_sample, denoised)``.
        """
        i = self._check_ready(timestep)
        cfg = self.config
        t = int(timestep)
        t_prev = int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else t
        a, a_prev = self._abar[t], self._abar_at(t_prev)
        c_skip, c_out = self.get_scalings_for_boundary_condition_discrete(float(t))
        (x0_x, x0_out), _ = x0_eps_coefficients(cfg.prediction_type, math.sqrt(a), math.sqrt(1.0 - a))
        if cfg.thresholding or cfg.clip_sample:
            x0 = fused(sample, [model_output], [x0_x, x0_out])
            if cfg.thresholding:
                x0 = dynamic_threshold(x0, cfg.dynamic_thresholding_ratio, cfg.sample_max_value)
            else:
                x0.clamp_(-cfg.clip_sample_range, cfg.clip_sample_range)
            terms, coefs = [x0], [c_skip, c_out]
        else:
            terms, coefs = [model_output], [c_out * x0_x + c_skip, c_out * x0_out]
        denoised = fused(sample, terms, coefs)
        if i != self.num_inference_steps - 1:
            noise = randn_like_diffusers(model_output.shape, generator, model_output.device, denoised.dtype)
            scale = math.sqrt(a_prev)  # the native lcm update x' = alpha' denoised + sigma' z, in one pass
            prev = fused(sample, terms, [scale * c for c in coefs], math.sqrt(1.0 - a_prev), noise=noise)
        else:
            prev = denoised
        self._step_index += 1
        return LCMSchedulerOutput(prev, denoised) if return_dict else (prev, denoised)


class TCDScheduler(_ConsistencyScheduler):
    """Trajectory Consistency Distillation's strategic stochastic sampling, diffusers' ``TCDScheduler``.

    From ``t`` to ``t'`` with ``s = floor((1 - eta) t')`` (``eta``, TCD's gamma, default 0.3)::

        x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s) eps                     (pred_noised_sample)
        x'  = sqrt(abar'/abar_s) x_s + sqrt(1 - abar'/abar_s) z         (the last step or eta = 0: x' = x_s)

    The native ``tcd`` step with diffusers' integer intermediate timestep (and ``t' = 0`` after the
    last step). Zheng et al. (2024), "Trajectory Consistency Distillation", section 4.3, eq. 15.
    1 NFE per step; two fused passes (x_s, x'). When ``set_timesteps`` gets
    ``original_inference_steps`` explicitly, the schedule is drawn from every training timestep
    (diffusers' behaviour, reproduced).
    """

    def _origin_timesteps(self, original_inference_steps, strength: float) -> np.ndarray:
        if original_inference_steps is None:
            return super()._origin_timesteps(None, strength)
        return np.asarray(list(range(0, int(self.config.num_train_timesteps * strength))))

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float = 0.3, generator=None,
             return_dict: bool = True):
        """One TCD step from ``timestep`` (see the class docstring).

        Args:
            model_output (Tensor[B, *D]): the network output at ``(sample, timestep)``.
            timestep (int or 0-dim Tensor): the current entry of ``timesteps``.
            sample (Tensor[B, *D]): x_t.
            eta (float): the stochasticity gamma in [0, 1] (0: DDIM-like, 1: LCM-like).
            generator (torch.Generator or list, optional): for z.
            return_dict (bool): a TCDSchedulerOutput, else ``(prev_sample, pred_noised_sample)``.
        """
        i = self._check_ready(timestep)
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {eta}")
        t = int(timestep)
        t_prev = int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else 0
        t_s = int(torch.floor((1 - eta) * torch.tensor(t_prev)))  # as diffusers rounds it (float32)
        a, a_prev, a_s = self._abar[t], self._abar_at(t_prev), self._abar[t_s]
        (x0_x, x0_out), (eps_x, eps_out) = x0_eps_coefficients(self.config.prediction_type, math.sqrt(a),
                                                               math.sqrt(1.0 - a))
        ca, cs = math.sqrt(a_s), math.sqrt(1.0 - a_s)
        coefs = [ca * x0_x + cs * eps_x, ca * x0_out + cs * eps_out]
        noised = fused(sample, [model_output], coefs)
        if eta > 0 and i != self.num_inference_steps - 1:
            noise = randn_like_diffusers(model_output.shape, generator, model_output.device, noised.dtype)
            ratio = a_prev / a_s
            prev = fused(sample, [model_output], [math.sqrt(ratio) * c for c in coefs], math.sqrt(1.0 - ratio),
                         noise=noise)
        else:
            prev = noised
        self._step_index += 1
        return TCDSchedulerOutput(prev, noised) if return_dict else (prev, noised)


class CMStochasticIterativeScheduler(SigmaScheduler):
    """Consistency models' multistep sampling, diffusers' ``CMStochasticIterativeScheduler``.

    On a Karras grid (``karras_ramp`` of the training ramp at the chosen timesteps), with the
    consistency boundary scalings ``c_skip = sd^2 / ((s - s_min)^2 + sd^2)``,
    ``c_out = (s - s_min) sd / sqrt(s^2 + sd^2)`` (Song et al. 2023, "Consistency Models", eq. 7 and
    Appendix C)::

        denoised = c_out out + c_skip x                 (clipped to [-1, 1] if clip_denoised)
        x'       = denoised + s_noise sqrt(s_hat'^2 - s_min^2) z,   s_hat' = clamp(s', s_min, s_max)

    Song et al. (2023), Algorithm 1 (the native ``lcm`` step in the VE variables). 1 NFE per step;
    one or two fused passes (two when clipping). z is drawn as diffusers draws it (zeros for a
    one-step schedule); ``timesteps = 250 log(sigma)``.
    """

    defaults = dict(num_train_timesteps=40, sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, s_noise=1.0, rho=7.0,
                    clip_denoised=True)
    order = 1

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        c = self.config
        sigmas = karras_ramp(np.linspace(0, 1, c.num_train_timesteps), c.sigma_min, c.sigma_max, c.rho)
        self.timesteps = torch.from_numpy(self.sigma_to_t(sigmas))
        self._set_sigmas(torch.from_numpy(sigmas))
        self.custom_timesteps = False
        self.is_scale_input_called = False

    @property
    def init_noise_sigma(self) -> float:
        return self.config.sigma_max

    @staticmethod
    def sigma_to_t(sigmas):
        """The network's time input ``1000 log(sigma + 1e-44) / 4`` (float64)."""
        return 1000 * 0.25 * np.log(np.asarray(sigmas, dtype=np.float64) + 1e-44)

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None, timesteps=None) -> None:
        """Set ``sigmas`` (float32 [n + 1], ending with ``sigma_min``) and ``timesteps`` (float64 [n])
        from ``num_inference_steps`` (every ``N // n``-th training index) or custom decreasing
        training indices ``timesteps``."""
        c = self.config
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps or timesteps")
        if timesteps is not None:
            if any(timesteps[i] >= timesteps[i - 1] for i in range(1, len(timesteps))):
                raise ValueError(f"timesteps must be decreasing, got {list(timesteps)}")
            if timesteps[0] >= c.num_train_timesteps:
                raise ValueError(f"timesteps must start below num_train_timesteps = {c.num_train_timesteps}, "
                                 f"got {timesteps[0]}")
            indices = np.array(timesteps, dtype=np.int64)
            self.custom_timesteps = True
        else:
            if not 1 <= num_inference_steps <= c.num_train_timesteps:
                raise ValueError(f"num_inference_steps must be in [1, num_train_timesteps = {c.num_train_timesteps}], "
                                 f"got {num_inference_steps}")
            self.num_inference_steps = num_inference_steps
            ratio = c.num_train_timesteps // num_inference_steps
            indices = (np.arange(0, num_inference_steps) * ratio).round()[::-1].copy().astype(np.int64)
            self.custom_timesteps = False
        sigmas = karras_ramp(indices[::-1].copy() / (c.num_train_timesteps - 1), c.sigma_min, c.sigma_max, c.rho)
        self.timesteps = torch.from_numpy(self.sigma_to_t(sigmas)).to(device=device)
        self._set_sigmas(torch.from_numpy(np.concatenate([sigmas, [c.sigma_min]]).astype(np.float32)))
        self._step_index = None
        self._begin_index = None

    def scale_model_input(self, sample: torch.Tensor, timestep=None, *args, **kwargs) -> torch.Tensor:
        """The network input ``sample / sqrt(sigma^2 + sigma_data^2)``."""
        if self._step_index is None:
            self._init_step_index(timestep)
        self.is_scale_input_called = True
        sigma = self._sig[self._step_index]
        return fused(sample, [], [1.0 / math.sqrt(sigma * sigma + self.config.sigma_data ** 2)])

    def get_scalings_for_boundary_condition(self, sigma):
        """``(c_skip, c_out)`` of the consistency parameterisation at ``sigma``."""
        c = self.config
        return (c.sigma_data ** 2 / ((sigma - c.sigma_min) ** 2 + c.sigma_data ** 2),
                (sigma - c.sigma_min) * c.sigma_data / (sigma ** 2 + c.sigma_data ** 2) ** 0.5)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        """One consistency step from ``timestep`` (see the class docstring).

        Args:
            model_output (Tensor[B, *D]): the network output on ``scale_model_input(sample)``.
            timestep (float or 0-dim float Tensor): a value of ``timesteps``.
            sample (Tensor[B, *D]): x at the current sigma.
            generator (torch.Generator or list, optional): for z.
            return_dict (bool): a SchedulerOutput (``prev_sample`` only), else ``(prev_sample,)``.
        """
        self._check_float_timestep(timestep)
        if self._step_index is None:
            self._init_step_index(timestep)
        c, i = self.config, self._step_index
        sigma = self._sig[i]
        sigma_next = self._sig[i + 1] if i + 1 < c.num_train_timesteps else self._sig[-1]
        c_skip, c_out = self.get_scalings_for_boundary_condition(sigma)
        if len(self.timesteps) > 1:
            noise = randn_like_diffusers(model_output.shape, generator, model_output.device, model_output.dtype)
        else:
            noise = torch.zeros_like(model_output)
        sigma_hat = min(max(sigma_next, c.sigma_min), c.sigma_max)
        scale = c.s_noise * math.sqrt(max(sigma_hat ** 2 - c.sigma_min ** 2, 0.0))
        if c.clip_denoised:
            denoised = fused(sample, [model_output], [c_skip, c_out]).clamp_(-1, 1)
            prev = fused(denoised, [], [1.0], scale, noise=noise)
        else:
            prev = fused(sample, [model_output], [c_skip, c_out], scale, noise=noise)
        self._step_index += 1
        return SchedulerOutput(prev) if return_dict else (prev,)


class SCMScheduler(Scheduler):
    """Continuous-time (TrigFlow) consistency sampling, diffusers' ``SCMScheduler`` (Sana-Sprint).

    On the TrigFlow path ``x_s = cos(s) x0 + sin(s) sd z`` (``sd = sigma_data``) with the model's
    velocity ``out``::

        x0 = cos(s) x - sin(s) out,   x' = cos(t) x0 + sin(t) sd z

    the native ``lcm`` step (``alpha = cos``, ``sigma = sd sin``) on Lu & Song (2024), "Simplifying,
    Stabilizing and Scaling Continuous-Time Consistency Models", section 3 (TrigFlow) and Algorithm 1.
    1 NFE per step; two fused passes (x0, x'). ``timesteps``: ``[max, intermediate, 0]`` for two steps,
    else ``linspace(max, 0, n + 1)``, or custom (n + 1 values).
    """

    defaults = dict(num_train_timesteps=1000, prediction_type="trigflow", sigma_data=0.5)
    order = 1

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        check_prediction_type(self.config.prediction_type, ("trigflow",))
        self.timesteps = torch.arange(self.config.num_train_timesteps - 1, -1, -1, dtype=torch.int64)

    def set_timesteps(self, num_inference_steps: int, timesteps=None, device=None, max_timesteps: Optional[float] = 1.57080,
                      intermediate_timesteps: Optional[float] = 1.3) -> None:
        """Set ``timesteps`` (float32 [n + 1], TrigFlow times from ``max_timesteps`` to 0)."""
        if num_inference_steps > self.config.num_train_timesteps:
            raise ValueError(f"num_inference_steps must be <= num_train_timesteps = {self.config.num_train_timesteps}, "
                             f"got {num_inference_steps}")
        if timesteps is not None and len(timesteps) != num_inference_steps + 1:
            raise ValueError(f"timesteps must hold num_inference_steps + 1 = {num_inference_steps + 1} values, got "
                             f"{len(timesteps)}")
        if timesteps is not None and max_timesteps is not None:
            raise ValueError("pass either timesteps or max_timesteps (set it to None), not both")
        if timesteps is None and max_timesteps is None:
            raise ValueError("pass timesteps or max_timesteps")
        if intermediate_timesteps is not None and num_inference_steps != 2:
            raise ValueError(f"intermediate_timesteps needs num_inference_steps = 2, got {num_inference_steps}")
        self.num_inference_steps = num_inference_steps
        if timesteps is not None:
            self.timesteps = torch.as_tensor(timesteps).to(device).float()
        elif intermediate_timesteps is not None:
            self.timesteps = torch.tensor([max_timesteps, intermediate_timesteps, 0], device=device).float()
        else:
            self.timesteps = torch.linspace(max_timesteps, 0, num_inference_steps + 1, device=device).float()
        self._step_index = None
        self._begin_index = None

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        """One TrigFlow consistency step from ``timestep`` (see the class docstring).

        Returns:
            SchedulerOutput ``(prev_sample, pred_original_sample)`` or that tuple.
        """
        if self.num_inference_steps is None:
            raise ValueError("num_inference_steps is None: call set_timesteps before step")
        if self._step_index is None:
            self._init_step_index(timestep)
        s, t = float(self.timesteps[self._step_index]), float(self.timesteps[self._step_index + 1])
        x0 = fused(sample, [model_output], [math.cos(s), -math.sin(s)])
        if len(self.timesteps) > 1:
            noise = randn_like_diffusers(model_output.shape, generator, model_output.device)
            prev = fused(sample, [model_output], [math.cos(t) * math.cos(s), -math.cos(t) * math.sin(s)],
                         math.sin(t) * self.config.sigma_data, noise=noise)
        else:
            prev = x0
        self._step_index += 1
        return SchedulerOutput(prev, x0) if return_dict else (prev, x0)
