"""diffusers' ``FlowMatchLCMScheduler`` on genflow's fused update."""
from __future__ import annotations

import numpy as np
import torch

from ._base import Scheduler, SchedulerOutput, check_choice, fused, randn_like_diffusers
from .flow_match import FlowMatchEulerDiscreteScheduler

__all__ = ["FlowMatchLCMScheduler"]

UPSCALE_MODES = ("nearest", "linear", "bilinear", "bicubic", "trilinear", "area", "nearest-exact")


class FlowMatchLCMScheduler(FlowMatchEulerDiscreteScheduler):
    """Consistency (LCM) sampling for flow-matching models, diffusers' ``FlowMatchLCMScheduler``.

    With the velocity ``out`` on ``x_sigma = (1 - sigma) x0 + sigma noise``::

        x0 = x - sigma out,   x' = (1 - sigma') x0 + sigma' z

    the native ``lcm`` step on the linear path (``alpha = 1 - sigma``; Luo et al. 2023, "Latent
    Consistency Models", Algorithm 1), one fused pass. With ``scale_factors`` (``set_scale_factors``)
    x0 is first resized to ``scale_factors[i]`` times the first output's size (``upscale_mode``) and
    z drawn at the new size (two passes then). The grid, ``set_timesteps`` options (shift, dynamic
    shifting, ``shift_terminal``, Karras / exponential / beta sigmas, ``invert_sigmas``) and
    ``scale_noise`` are ``FlowMatchEulerDiscreteScheduler``'s.
    """

    defaults = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_shift=0.5, max_shift=1.15,
                    base_image_seq_len=256, max_image_seq_len=4096, invert_sigmas=False, shift_terminal=None,
                    use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
                    time_shift_type="exponential", scale_factors=None, upscale_mode="bicubic")

    def __init__(self, **kwargs):
        Scheduler.__init__(self, **kwargs)  # the Euler class's __init__ reads its stochastic_sampling field
        cfg = self.config
        flags = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
        if sum(bool(cfg[f]) for f in flags) > 1:
            raise ValueError(f"at most one of {flags} may be True, got { {f: cfg[f] for f in flags} }")
        check_choice("time_shift_type", cfg.time_shift_type, ("exponential", "linear"))
        check_choice("upscale_mode", cfg.upscale_mode, UPSCALE_MODES)
        n = cfg.num_train_timesteps
        sigmas = torch.from_numpy(np.linspace(1, n, n, dtype=np.float32)[::-1].copy()) / n
        if not cfg.use_dynamic_shifting:
            sigmas = cfg.shift * sigmas / (1 + (cfg.shift - 1) * sigmas)
        self.timesteps = sigmas * n
        self._shift = cfg.shift
        self._init_size = None
        self._scale_factors, self._upscale_mode = cfg.scale_factors, cfg.upscale_mode
        self._set_sigmas(sigmas)
        self.sigma_min = self.sigmas[-1].item()
        self.sigma_max = self.sigmas[0].item()

    def set_scale_factors(self, scale_factors: list, upscale_mode: str) -> None:
        """Resize x0 by ``scale_factors[i]`` at step ``i`` (``len(timesteps) - 1`` of them) with ``upscale_mode``."""
        check_choice("upscale_mode", upscale_mode, UPSCALE_MODES)
        self._scale_factors, self._upscale_mode = scale_factors, upscale_mode

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        """One LCM step from ``timestep`` (see the class docstring).

        Args:
            model_output (Tensor[B, *D]): the velocity prediction.
            timestep (float or 0-dim float Tensor): a value of ``timesteps``.
            sample (Tensor[B, *D]): x at the current sigma.
            generator (torch.Generator or list, optional): for z.
            return_dict (bool): a SchedulerOutput (``prev_sample`` only), else ``(prev_sample,)``.
        """
        if isinstance(timestep, int) or (isinstance(timestep, torch.Tensor) and not timestep.is_floating_point()):
            raise ValueError(f"timestep must be one of FlowMatchLCMScheduler.timesteps (a float), got the integer "
                             f"{timestep!r}; pass the schedule's values, not indices from enumerate(timesteps)")
        resize = bool(self._scale_factors) and bool(self._upscale_mode)
        if resize and len(self.timesteps) != len(self._scale_factors) + 1:
            raise ValueError(f"scale_factors must hold len(timesteps) - 1 = {len(self.timesteps) - 1} values, got "
                             f"{len(self._scale_factors)}")
        if self._init_size is None or self._step_index is None:
            self._init_size = model_output.size()[2:]
        if self._step_index is None:
            self._init_step_index(timestep)
        x = sample.to(torch.float32)
        i = self._step_index
        sigma, sigma_next = self._sig[i], self._sig[i + 1]
        if resize and i < len(self._scale_factors):
            x0 = fused(x, [model_output], [1.0, -sigma])
            size = [round(self._scale_factors[i] * s) for s in self._init_size]
            x0 = torch.nn.functional.interpolate(x0, size=size, mode=self._upscale_mode)
            prev = fused(x0, [], [1.0 - sigma_next], sigma_next, noise=randn_like_diffusers(x0, generator))
        else:
            noise = randn_like_diffusers(x, generator)
            prev = fused(x, [model_output], [1.0 - sigma_next, -(1.0 - sigma_next) * sigma], sigma_next, noise=noise)
        self._step_index += 1
        prev = prev.to(model_output.dtype)
        return SchedulerOutput(prev) if return_dict else (prev,)
