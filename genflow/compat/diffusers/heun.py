"""diffusers' ``HeunDiscreteScheduler`` on genflow's fused update."""
from __future__ import annotations

import math

import numpy as np
import torch

from ._base import SchedulerOutput, TIMESTEP_SPACINGS, check_choice, check_prediction_type, fused_planned, pack
from ._sigmas import SigmaScheduler

__all__ = ["HeunDiscreteScheduler"]


class HeunDiscreteScheduler(SigmaScheduler):
    """Heun's second-order method on the probability-flow ODE in sigma, diffusers' ``HeunDiscreteScheduler``.

    Each interval ``sigma_i -> sigma_{i+1}`` takes two ``step`` calls (diffusers' protocol: the
    inner timesteps appear twice in ``timesteps``), with ``d(y, sigma) = (y - x0(y, out)) / sigma``::

        first call:   y' = y + (sigma_{i+1} - sigma_i) d(y, sigma_i)                (Euler predictor)
        second call:  y_next = y + (sigma_{i+1} - sigma_i) (d(y, sigma_i) + d(y', sigma_{i+1})) / 2

    The last interval (to sigma = 0) is a single Euler call. Second order, 2n - 1 model
    evaluations for n intervals; each call is two fused passes (x0, then the update, which reads
    y, the first x0, y' and the second x0 in one pass). Karras et al. (2022), "Elucidating the Design
    Space of Diffusion-Based Generative Models", Algorithm 1.
    """

    defaults = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="linear",
                    trained_betas=None, prediction_type="epsilon", use_karras_sigmas=False,
                    use_exponential_sigmas=False, use_beta_sigmas=False, clip_sample=False, clip_sample_range=1.0,
                    timestep_spacing="linspace", steps_offset=0)
    order = 2

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        check_prediction_type(self.config.prediction_type)
        check_choice("timestep_spacing", self.config.timestep_spacing, TIMESTEP_SPACINGS)
        self._check_sigma_grid_flags()
        self._set_tables()
        self.use_karras_sigmas = self.config.use_karras_sigmas
        self.set_timesteps(self.config.num_train_timesteps)

    @property
    def state_in_first_order(self) -> bool:
        """True when the next ``step`` call is the Euler predictor of a new interval."""
        return self.dt is None

    def set_timesteps(self, num_inference_steps=None, device=None, num_train_timesteps=None, timesteps=None) -> None:
        """Set ``timesteps`` (float32 [2n - 1], inner values repeated) and ``sigmas`` (float32 [2n],
        inner values repeated, ending with 0): from ``num_inference_steps`` by ``timestep_spacing``
        over ``num_train_timesteps`` (default the config's), or from custom ``timesteps``."""
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps or timesteps")
        if timesteps is not None:
            for flag in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
                if self.config[flag]:
                    raise ValueError(f"timesteps= cannot be used with {flag}=True")
            num_inference_steps = len(timesteps)
        self.num_inference_steps = num_inference_steps
        if timesteps is None:  # the common call: its schedule is built once
            self._set_schedule((num_inference_steps, str(device), num_train_timesteps),
                               lambda: self._schedule(num_inference_steps, device, num_train_timesteps, None))
        else:
            timesteps, sigmas = self._schedule(num_inference_steps, device, num_train_timesteps, timesteps)
            self.timesteps = timesteps
            self._set_sigmas(sigmas)
        self.dt = None
        self.sample = None
        self._x0_first = None
        self._step_index = None
        self._begin_index = None

    def _schedule(self, num_inference_steps, device, num_train_timesteps, timesteps) -> tuple:
        """``(timesteps, sigmas)`` of ``set_timesteps`` (inner values repeated)."""
        n_train = num_train_timesteps or self.config.num_train_timesteps
        if timesteps is not None:
            timesteps = np.array(timesteps, dtype=np.float32)
        else:
            timesteps = self._spaced_timesteps(num_inference_steps, n_train)
        train = self._train_sigmas()
        log_sigmas = np.log(train)
        sigmas = np.interp(timesteps, np.arange(0, len(train)), train)
        sigmas, regridded = self._regrid(sigmas, log_sigmas, num_inference_steps)
        if regridded is not None:
            timesteps = regridded
        sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32)).to(device=device)
        timesteps = torch.from_numpy(timesteps)
        timesteps = torch.cat([timesteps[:1], timesteps[1:].repeat_interleave(2)]).to(device=device,
                                                                                       dtype=torch.float32)
        return timesteps, torch.cat([sigmas[:1], sigmas[1:-1].repeat_interleave(2), sigmas[-1:]])

    def _step_plans(self, i: int, first: bool):
        """Packed ``(x0, update)`` coefficients of the call at index ``i``: x0 from the output at the
        point evaluated (sigma on the first call, sigma_next on the second); the Euler predictor
        ``y + dt (y - x0)/sigma``, or the trapezoid ``y + dt/2 ((y - x0_1)/sigma + (y' - x0_2)/sigma_next)``."""
        sigma, sigma_next = (self._sig[i], self._sig[i + 1]) if first else (self._sig[i - 1], self._sig[i])
        at = sigma if first else sigma_next
        kind = self.config.prediction_type
        if kind == "epsilon":
            a, b = 1.0, -at
        elif kind == "v_prediction":
            a, b = 1.0 / (at * at + 1.0), -at / math.sqrt(at * at + 1.0)
        else:
            a, b = 0.0, 1.0
        dt = sigma_next - sigma
        if first:
            return pack([a, b]), pack([1.0 + dt / sigma, -dt / sigma])
        h, g = dt / (2.0 * sigma), dt / (2.0 * sigma_next)
        return pack([a, b]), pack([1.0 + h, -h, g, -g])

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        """One call of the two-call Heun step (see the class docstring).

        Args:
            model_output (Tensor[B, *D]): the network output on ``scale_model_input(sample)``.
            timestep (float or 0-dim Tensor): a value of ``timesteps``.
            sample (Tensor[B, *D]): y (first call) or y' (second call).
            return_dict (bool): a SchedulerOutput, else (prev_sample, pred_original_sample).
        """
        if self._step_index is None:
            self._init_step_index(timestep)
        first = self.state_in_first_order
        i = self._step_index
        plans = self._plans.get(("heun", i, first))
        if plans is None:
            plans = self._plans[("heun", i, first)] = self._step_plans(i, first)
        x0 = fused_planned(sample, [model_output], plans[0])
        if self.config.clip_sample:
            x0.clamp_(-self.config.clip_sample_range, self.config.clip_sample_range)
        if first:
            prev = fused_planned(sample, [x0], plans[1])
            self.dt, self.sample, self._x0_first = self._sig[i + 1] - self._sig[i], sample, x0
        else:
            prev = fused_planned(self.sample, [self._x0_first, sample, x0], plans[1])
            self.dt, self.sample, self._x0_first = None, None, None
        self._step_index += 1
        if not return_dict:
            return prev, x0
        return SchedulerOutput(prev, x0)
