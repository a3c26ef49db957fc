"""diffusers' ``DPMSolverSDEScheduler`` (k-diffusion's DPM-Solver++ SDE) on genflow's fused update."""
from __future__ import annotations

import math

import numpy as np
import torch

from genflow.compat.k_diffusion.noise import BrownianTreeNoiseSampler

from ._base import SchedulerOutput, TIMESTEP_SPACINGS, check_choice, check_prediction_type, fused
from ._sigmas import SigmaScheduler, sigma_to_t
from .kdpm2 import ve_x0_coefficients

__all__ = ["DPMSolverSDEScheduler"]


def _ancestral_split(sigma: float, sigma_to: float):
    """``(s_up, s_down)`` of an ancestral step from ``sigma`` to ``sigma_to`` (eta = 1):
    ``s_up = min(s', sqrt(s'^2 (s^2 - s'^2) / s^2))``, ``s_down = sqrt(s'^2 - s_up^2)``."""
    up = min(sigma_to, math.sqrt(sigma_to ** 2 * (sigma ** 2 - sigma_to ** 2) / sigma ** 2))
    return up, math.sqrt(max(sigma_to ** 2 - up ** 2, 0.0))


class DPMSolverSDEScheduler(SigmaScheduler):
    """DPM-Solver++ (stochastic, second order), diffusers' ``DPMSolverSDEScheduler`` (k-diffusion's
    ``sample_dpmpp_sde`` with ``r = 1/2``, ``eta = 1``).

    Each interval ``s -> s'`` takes two ``step`` calls, with ``s_m = sqrt(s s')`` (the log-midpoint)
    and the ancestral split ``(s_up, s_down)`` of each stage::

        first call:   y_m = (d_m/s) y + (1 - d_m/s) x0(y, s) + s_up,m z_1         (d_m = s_down toward s_m)
        second call:  y'  = (d/s) y + (1 - d/s) x0(y_m, s_m) + s_up z_2            (d = s_down toward s')

    z_1, z_2 are increments of one Brownian path over ``[min sigma, max sigma]`` (torchsde's tree,
    seeded by ``noise_sampler_seed`` as diffusers: ``genflow.compat.k_diffusion.BrownianTreeNoiseSampler``,
    queried at diffusers' float32 noise levels), scaled by ``s_noise``. The last interval (to
    ``s' = 0``) is one Euler call. Lu et al. (2022b), "DPM-Solver++", section 4 (SDE-DPM-Solver++2S),
    in k-diffusion's ancestral form. 2n - 1 model evaluations; two fused passes per call (x0, the update).
    """

    defaults = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="linear",
                    trained_betas=None, prediction_type="epsilon", use_karras_sigmas=False,
                    use_exponential_sigmas=False, use_beta_sigmas=False, noise_sampler_seed=None,
                    timestep_spacing="linspace", steps_offset=0)
    order = 2

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        check_prediction_type(self.config.prediction_type, ("epsilon", "v_prediction"))
        check_choice("timestep_spacing", self.config.timestep_spacing, TIMESTEP_SPACINGS)
        check_choice("beta_schedule", self.config.beta_schedule, ("linear", "scaled_linear", "squaredcos_cap_v2"))
        self._check_sigma_grid_flags()
        self._set_tables()
        self.set_timesteps(self.config.num_train_timesteps)
        self.use_karras_sigmas = self.config.use_karras_sigmas
        self.noise_sampler_seed = self.config.noise_sampler_seed

    @property
    def state_in_first_order(self) -> bool:
        """True when the next ``step`` call is the first call of an interval."""
        return self.sample is None

    def set_timesteps(self, num_inference_steps: int, device=None, num_train_timesteps=None) -> None:
        """Set ``sigmas`` (float32 [2n], inner values repeated, ending with 0) and ``timesteps``
        (float64 [2n - 1]: each interval's start, then its log-midpoint's fractional timestep)."""
        self.num_inference_steps = num_inference_steps
        timesteps = self._spaced_timesteps(num_inference_steps, num_train_timesteps).astype(np.float64)
        if self.config.timestep_spacing == "linspace":  # diffusers spaces these in float64
            n_train = num_train_timesteps or self.config.num_train_timesteps
            timesteps = np.linspace(0, n_train - 1, num_inference_steps, dtype=float)[::-1].copy()
        train = self._train_sigmas()
        log_sigmas = np.log(train)
        sigmas = np.interp(timesteps, np.arange(0, len(train)), train)
        sigmas, regridded = self._regrid(sigmas, log_sigmas, num_inference_steps)
        if regridded is not None:
            timesteps = regridded
        t = -np.log(sigmas)
        mid = np.exp(-(t[:-1] + np.diff(t) * 0.5))  # the log-midpoints
        mid_timesteps = sigma_to_t(mid, log_sigmas)
        sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
        timesteps = torch.from_numpy(timesteps)
        timesteps = torch.cat([timesteps[:1], timesteps[1:].repeat_interleave(2)])
        timesteps[1::2] = torch.from_numpy(np.asarray(mid_timesteps))
        self.timesteps = timesteps.to(device=device)
        self._set_sigmas(torch.cat([sigmas[:1], sigmas[1:-1].repeat_interleave(2), sigmas[-1:]]))
        self.sample = None
        self.mid_point_sigma = None
        self.noise_sampler = None
        self._step_index = None
        self._begin_index = None

    def scale_model_input(self, sample: torch.Tensor, timestep=None, *args, **kwargs) -> torch.Tensor:
        """The network input ``sample / sqrt(s^2 + 1)`` at the interval's start (first call) or its
        log-midpoint (second call)."""
        if self._step_index is None:
            self._init_step_index(timestep)
        s = self._sig[self._step_index] if self.state_in_first_order else float(self.mid_point_sigma)
        return fused(sample, [], [1.0 / math.sqrt(s * s + 1.0)])

    @staticmethod
    def _roundtrip(sigma: torch.Tensor) -> torch.Tensor:
        """``exp(-(-log sigma))`` in float32: the noise level diffusers queries its path at."""
        return sigma.log().neg().neg().exp()

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True,
             s_noise: float = 1.0):
        """One call of the two-call stochastic DPM-Solver++ step (see the class docstring).

        Args:
            model_output (Tensor[B, *D]): the network output on ``scale_model_input(sample)``.
            timestep (float or 0-dim Tensor): a value of ``timesteps``.
            sample (Tensor[B, *D]): y (first call) or y_m (second call).
            return_dict (bool): a SchedulerOutput, else (prev_sample, pred_original_sample).
            s_noise (float): the scale of the Brownian increments.
        """
        if self._step_index is None:
            self._init_step_index(timestep)
        if self.noise_sampler is None:
            positive = self.sigmas[self.sigmas > 0]
            self.noise_sampler = BrownianTreeNoiseSampler(sample, positive.min().item(), self.sigmas.max().item(),
                                                          seed=self.noise_sampler_seed)
        i, first = self._step_index, self.state_in_first_order
        kind = self.config.prediction_type
        j = i if first else i - 1
        s, s_next = self._sig[j], self._sig[j + 1]
        if first and s_next == 0.0:  # Euler to sigma = 0: y' = x0
            a, b = ve_x0_coefficients(kind, s)
            x0 = fused(sample, [model_output], [a, b])
            self._step_index += 1
            return SchedulerOutput(x0, x0) if return_dict else (x0, x0)
        sigma32 = self.sigmas[j]
        if first:
            t, t_next = sigma32.log().neg(), self.sigmas[j + 1].log().neg()
            mid32 = (t + (t_next - t) * 0.5).neg().exp()  # the log-midpoint, in float32 as diffusers
            target32, s_eval, base = mid32, s, sample
        else:
            target32, s_eval, base = self._roundtrip(self.sigmas[j + 1]), float(self.mid_point_sigma), self.sample
        up, down = _ancestral_split(s, float(target32))
        a, b = ve_x0_coefficients(kind, s_eval)
        x0 = fused(sample, [model_output], [a, b])
        noise = self.noise_sampler(self._roundtrip(sigma32), target32).to(model_output.device, model_output.dtype)
        keep = 1.0 - down / s  # y' = (down/s) base + keep x0 + up s_noise z, x0 = a sample + b out
        if first:
            prev = fused(base, [model_output], [down / s + keep * a, keep * b], up * s_noise, noise=noise)
            self.sample, self.mid_point_sigma = sample, target32
        else:
            prev = fused(base, [sample, model_output], [down / s, keep * a, keep * b], up * s_noise, noise=noise)
            self.sample, self.mid_point_sigma = None, None
        self._step_index += 1
        return SchedulerOutput(prev, x0) if return_dict else (prev, x0)
