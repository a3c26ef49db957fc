"""diffusers' ``FlowMatchHeunDiscreteScheduler`` on genflow's fused update."""
from __future__ import annotations

import math

import numpy as np
import torch

from genflow.ownership import OutputOwnership

from ._base import Scheduler, SchedulerOutput, fused, fused_planned, grid_plans, pack, randn_like_diffusers

__all__ = ["FlowMatchHeunDiscreteScheduler"]


class FlowMatchHeunDiscreteScheduler(Scheduler):
    """Heun's method for flow-matching models (velocity ``out = noise - x0`` on
    ``x_sigma = (1 - sigma) x0 + sigma noise``), diffusers' ``FlowMatchHeunDiscreteScheduler``.

    Each interval ``sigma -> sigma'`` takes two ``step`` calls (the inner timesteps appear twice)::

        first call:   x'' = x + (sigma' - sigma_hat) d1,         d1 = (sigma / sigma_hat) out(x, sigma)
        second call:  x'  = x + (sigma' - sigma_hat) (d1 + out(x'', sigma')) / 2

    The last interval (to sigma = 0) is a single Euler call. With ``s_churn`` the state is first
    moved to ``sigma_hat = sigma (1 + gamma)`` by ``sqrt(sigma_hat^2 - sigma^2) s_noise z`` (Karras
    et al. 2022, Algorithm 2; diffusers scales the first derivative by ``sigma / sigma_hat``, and
    draws z on the second call too, where it has no effect: both reproduced). Second order,
    2n - 1 model evaluations for n intervals, one fused pass per call. Karras et al. (2022),
    "Elucidating the Design Space of Diffusion-Based Generative Models", Algorithm 1; Lipman et al.
    (2023), "Flow Matching for Generative Modeling". ``scale_noise`` is the forward path.
    """

    defaults = dict(num_train_timesteps=1000, shift=1.0)
    order = 2

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        n, shift = self.config.num_train_timesteps, self.config.shift
        sigmas = torch.from_numpy(np.linspace(1, n, n, dtype=np.float32)[::-1].copy()) / n
        sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
        self.timesteps = sigmas * n
        self._set_sigmas(sigmas)
        self.sigma_min = self.sigmas[-1].item()
        self.sigma_max = self.sigmas[0].item()
        self.dt = None
        self.ownership = OutputOwnership()

    def _set_sigmas(self, sigmas: torch.Tensor) -> None:
        self.sigmas = sigmas.to("cpu")
        self._sig = self.sigmas.double().tolist()
        self._plans = grid_plans(self, self._sig)

    @property
    def state_in_first_order(self) -> bool:
        """True when the next ``step`` call is the first call of an interval."""
        return self.dt is None

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """Set ``sigmas`` (float32 [2n], inner values repeated, ending with 0) uniform in training
        time between the table's ends, shifted by ``shift``, and ``timesteps = sigma N`` ([2n - 1])."""
        if not isinstance(num_inference_steps, int) or isinstance(num_inference_steps, bool) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an int >= 1, got {num_inference_steps!r}")
        self.num_inference_steps = num_inference_steps
        n, shift = self.config.num_train_timesteps, self.config.shift
        t = np.linspace(self.sigma_max * n, self.sigma_min * n, num_inference_steps)
        sigmas = t / n
        sigmas = torch.from_numpy(shift * sigmas / (1 + (shift - 1) * sigmas)).to(dtype=torch.float32)
        timesteps = sigmas * n
        self.timesteps = torch.cat([timesteps[:1], timesteps[1:].repeat_interleave(2)]).to(device=device)
        sigmas = torch.cat([sigmas, torch.zeros(1)])
        self._set_sigmas(torch.cat([sigmas[:1], sigmas[1:-1].repeat_interleave(2), sigmas[-1:]]))
        self.dt = None
        self.sample = None
        self._first_output = None
        self.ownership = OutputOwnership()  # the first output is held: never memory the model reuses
        self._step_index = None
        self._begin_index = None

    def scale_noise(self, sample: torch.Tensor, timestep, noise: torch.Tensor) -> torch.Tensor:
        """The forward path ``sigma noise + (1 - sigma) sample`` at ``timestep`` (image-to-image)."""
        if self._step_index is None:
            self._init_step_index(timestep)
        sigma = self._sig[self._step_index]
        return fused(sample, [noise], [1.0 - sigma, sigma])

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, s_churn: float = 0.0,
             s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0, generator=None,
             return_dict: bool = True):
        """One call of the two-call Heun step (see the class docstring).

        Args:
            model_output (Tensor[B, *D]): the velocity at ``(sample, timestep)``.
            timestep (float or 0-dim float Tensor): a value of ``timesteps``.
            sample (Tensor[B, *D]): x (first call) or x'' (second call).
            s_churn, s_tmin, s_tmax, s_noise (float): Karras et al.'s stochastic churn.
            generator (torch.Generator or list, optional): for z when churn is active.
            return_dict (bool): a SchedulerOutput, else ``(prev_sample,)``.
        """
        if isinstance(timestep, int) or (isinstance(timestep, torch.Tensor) and not timestep.is_floating_point()):
            raise ValueError(f"timestep must be one of FlowMatchHeunDiscreteScheduler.timesteps (a float), got the "
                             f"integer {timestep!r}; pass the schedule's values, not indices from enumerate(timesteps)")
        if self._step_index is None:
            self._init_step_index(timestep)
        i, first = self._step_index, self.state_in_first_order
        x = sample.to(torch.float32)
        sigma, sigma_next = (self._sig[i], self._sig[i + 1]) if first else (self._sig[i - 1], self._sig[i])
        gamma = min(s_churn / (len(self._sig) - 1), 2 ** 0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * (gamma + 1)
        if gamma > 0:
            noise = randn_like_diffusers(model_output.shape, generator, model_output.device, model_output.dtype)
            x = fused(x, [noise], [1.0, s_noise * math.sqrt(sigma_hat ** 2 - sigma ** 2)])
        if first:
            self.dt, self._d1_scale = sigma_next - sigma_hat, sigma / sigma_hat
            plan = self._plans.get(("heun1", i, sigma_hat))
            if plan is None:
                plan = self._plans[("heun1", i, sigma_hat)] = pack([1.0, self.dt * self._d1_scale])
            prev = fused_planned(x, [model_output], plan)
            self.sample = x
            self._first_output = self.ownership.own(model_output, sample, lambda: f"{type(self).__name__}.step")
        else:
            half = 0.5 * self.dt
            prev = fused(self.sample, [self._first_output, model_output], [1.0, half * self._d1_scale, half])
            self.dt, self.sample, self._first_output = None, None, None
        prev = prev.to(model_output.dtype)
        self._step_index += 1
        if not return_dict:
            return (prev,)
        return SchedulerOutput(prev)
