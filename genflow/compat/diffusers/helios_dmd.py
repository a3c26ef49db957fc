"""diffusers' ``HeliosDMDScheduler`` (Helios' distilled pyramid sampler) on genflow's fused update."""
from __future__ import annotations

import math

import numpy as np
import torch

from ._base import Scheduler, SchedulerOutput, check_choice, check_prediction_type, fused
from .flow_match import FlowMatchEulerDiscreteScheduler

__all__ = ["HeliosDMDScheduler"]


class HeliosDMDScheduler(Scheduler):
    """Few-step DMD sampling on the linear flow path, stage by stage, diffusers' ``HeliosDMDScheduler``.

    With the velocity ``v`` at ``x_sigma = (1 - sigma) x0 + sigma z0``, ``sigma`` read from the
    pipeline's ``dmd_sigmas`` at the ``dmd_timesteps`` entry nearest the integer part of ``timestep``,
    and ``sigma'`` likewise at ``all_timesteps[cur_sampling_step + 1]``::

        x0 = x - sigma v,   x' = (1 - sigma') x0 + sigma' z0

    where ``z0`` is the stage's starting noise (``dmd_noisy_tensor``, not a fresh draw); the last
    step returns ``x0``. This is the native ``lcm`` step on the linear path (``alpha = 1 - sigma``;
    Luo et al. 2023, "Latent Consistency Models", Algorithm 1) with a fixed re-noising draw, as in
    distribution-matching distillation (Yin et al. 2024, "One-step Diffusion with Distribution
    Matching Distillation", section 3), one fused pass, order 1, one model call a step.

    ``set_timesteps(n, stage_index)`` gives stage ``stage_index`` of ``stages`` pyramid stages
    ``n`` timesteps (``2 n`` with ``is_amplify_first_chunk``) spread evenly over the stage's share
    of the training timesteps (shares in proportion to each stage's flow length, stage starts
    corrected by ``gamma`` for the pyramid's up-sampling renoise), and sigmas evenly from 0.999
    down, ending in 0; ``stages=1`` gives one SD3-style shifted grid.
    """

    defaults = dict(num_train_timesteps=1000, shift=1.0, stages=3, stage_range=[0, 1 / 3, 2 / 3, 1], gamma=1 / 3,
                    prediction_type="flow_prediction", use_flow_sigmas=True, use_dynamic_shifting=False,
                    time_shift_type="linear")

    time_shift = FlowMatchEulerDiscreteScheduler.time_shift

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        cfg = self.config
        check_choice("time_shift_type", cfg.time_shift_type, ("exponential", "linear"))
        check_prediction_type(cfg.prediction_type, ("flow_prediction",))
        if not isinstance(cfg.stages, int) or cfg.stages < 1:
            raise ValueError(f"stages must be an int >= 1, got {cfg.stages!r}")
        if len(cfg.stage_range) != cfg.stages + 1:
            raise ValueError(f"stage_range must hold stages + 1 = {cfg.stages + 1} values, got {cfg.stage_range!r}")
        self.gamma = cfg.gamma
        self._init_training_grid()
        self._init_stages()
        self.sigma_min = self.sigmas[-1].item()
        self.sigma_max = self.sigmas[0].item()

    def _init_training_grid(self) -> None:
        """The training grid: ``n`` shifted sigmas from 1 down to ``1/n`` (float64) and ``timesteps = n sigma``."""
        n, shift = self.config.num_train_timesteps, self.config.shift
        s = 1.0 - np.linspace(1, 1 / n, n + 1)
        s = np.flip(shift * s / (1 + (shift - 1) * s))[:-1].copy()
        self.sigmas = torch.from_numpy(s)
        self.timesteps = self.sigmas * n

    def _init_stages(self) -> None:
        """Each stage's start and end sigma, share of the flow and timestep / sigma tables."""
        cfg = self.config
        n, stages = cfg.num_train_timesteps, cfg.stages
        self.start_sigmas, self.end_sigmas, self.ori_start_sigmas = {}, {}, {}
        self.timestep_ratios, self.timesteps_per_stage, self.sigmas_per_stage = {}, {}, {}
        lengths = []
        for k in range(stages):
            first = max(int(cfg.stage_range[k] * n), 0)
            last = min(int(cfg.stage_range[k + 1] * n), n)
            start = self.sigmas[first].item()
            end = self.sigmas[last].item() if last < n else 0.0
            self.ori_start_sigmas[k] = start
            if k:  # the up-sampled sample's renoise moves the stage's start
                signal = 1 - start
                start = 1 - signal / (math.sqrt(1 + 1 / cfg.gamma) * (1 - signal) + signal)
            self.start_sigmas[k], self.end_sigmas[k] = start, end
            lengths.append(start - end)
        total = sum(lengths)
        stage_sigmas = torch.from_numpy(np.linspace(0.999, 0, n + 1)[:-1])
        for k in range(stages):
            lo = sum(lengths[:k]) / total if k else 0.0
            hi = 0.9999999999999999 if k == stages - 1 else sum(lengths[:k + 1]) / total
            self.timestep_ratios[k] = (lo, hi)
            t_max = min(self.timesteps[int(lo * n)].item(), 999)
            t_min = self.timesteps[min(int(hi * n), n - 1)].item()
            self.timesteps_per_stage[k] = torch.from_numpy(np.linspace(t_max, t_min, n + 1)[:-1])
            self.sigmas_per_stage[k] = stage_sigmas.clone()

    def set_timesteps(self, num_inference_steps: int, stage_index=None, device=None, sigmas=None, mu=None,
                      is_amplify_first_chunk: bool = False) -> None:
        """``num_inference_steps`` (twice that with ``is_amplify_first_chunk``) timesteps of stage
        ``stage_index`` (needed when ``stages > 1``) and ``num_inference_steps + 1`` sigmas ending in 0.

        Args:
            num_inference_steps (int): >= 1.
            stage_index (int, optional): the pyramid stage, ``0 <= stage_index < stages``.
            device (torch.device or str, optional): where ``timesteps`` and ``sigmas`` live.
            sigmas (array of floats, optional): with ``stages=1``, the grid (before its last value).
            mu (float, optional): the resolution shift; needed with ``use_dynamic_shifting``.
            is_amplify_first_chunk (bool): double the steps (Helios' first video chunk).
        """
        cfg = self.config
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an int >= 1, got {num_inference_steps!r}")
        if cfg.use_dynamic_shifting and (mu is None or cfg.shift != 1.0):
            raise ValueError(f"use_dynamic_shifting needs mu and shift=1.0, got mu={mu!r}, shift={cfg.shift!r}")
        count = (2 * num_inference_steps if is_amplify_first_chunk else num_inference_steps) + 1
        self.num_inference_steps = count
        self._init_training_grid()
        if cfg.stages == 1:
            if sigmas is None:
                sigmas = np.linspace(1, 1 / cfg.num_train_timesteps, count + 1)[:-1].astype(np.float32)
                if cfg.shift != 1.0:
                    sigmas = self.time_shift(cfg.shift, 1.0, sigmas)
            sigmas = np.asarray(sigmas)
            timesteps = torch.from_numpy(sigmas * cfg.num_train_timesteps)
            sigmas = torch.from_numpy(sigmas)
        else:
            if not isinstance(stage_index, int) or not 0 <= stage_index < cfg.stages:
                raise ValueError(f"stage_index must be an int in [0, {cfg.stages}), got {stage_index!r}")
            table, grid = self.timesteps_per_stage[stage_index], self.sigmas_per_stage[stage_index]
            timesteps = torch.from_numpy(np.linspace(table[0].item(), table[-1].item(), count))
            sigmas = torch.from_numpy(np.linspace(grid[0].item(), grid[-1].item(), count))
        self.timesteps = timesteps[:-1].to(device=device)
        self.sigmas = torch.cat([sigmas[:-1], torch.zeros(1)]).to(device=device)
        self._step_index = None
        self._begin_index = None
        if cfg.use_dynamic_shifting:
            self.sigmas = self.time_shift(mu, 1.0, self.sigmas)
            if cfg.stages == 1:
                self.timesteps = self.sigmas[:-1] * cfg.num_train_timesteps
            else:
                table = self.timesteps_per_stage[stage_index]
                self.timesteps = table.min() + self.sigmas[:-1] * (table.max() - table.min())

    def reset_scheduler_history(self) -> None:
        """Forget the step and begin indices."""
        self._step_index = None
        self._begin_index = None

    @staticmethod
    def _sigma_at(timestep, sigmas: torch.Tensor, timesteps: torch.Tensor) -> float:
        """``sigmas`` at the entry of ``timesteps`` nearest the integer part of ``timestep`` (the first on ties)."""
        target = math.trunc(float(timestep))
        return float(sigmas[torch.argmin((timesteps.double().cpu() - target).abs())])

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True, cur_sampling_step: int = 0, dmd_noisy_tensor=None, dmd_sigmas=None,
             dmd_timesteps=None, all_timesteps=None):
        """One DMD step from ``timestep`` (see the class docstring).

        Args:
            model_output (Tensor[B, *D]): the velocity prediction.
            timestep (float or 0-dim Tensor): ``all_timesteps[cur_sampling_step]``.
            sample (Tensor[B, *D]): x at the current sigma.
            generator: unused (the re-noising draw is ``dmd_noisy_tensor``).
            return_dict (bool): a SchedulerOutput (``prev_sample`` only), else ``(prev_sample,)``.
            cur_sampling_step (int): the step's index in ``all_timesteps``.
            dmd_noisy_tensor (Tensor[B, *D]): the stage's starting noise (needed before the last step).
            dmd_sigmas, dmd_timesteps (Tensor): the scheduler's ``sigmas`` and ``timesteps``.
            all_timesteps (Tensor): the timesteps the pipeline loops over.
        """
        for name, value in (("dmd_sigmas", dmd_sigmas), ("dmd_timesteps", dmd_timesteps),
                            ("all_timesteps", all_timesteps)):
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"{name} must be a Tensor (the pipeline passes the scheduler's sigmas, timesteps "
                                f"and its loop's timesteps), got {type(value).__name__}")
        sigmas, timesteps = dmd_sigmas.double().cpu(), dmd_timesteps.double().cpu()
        sigma = self._sigma_at(timestep, sigmas, timesteps)
        x = sample.to(torch.float32)
        if cur_sampling_step < len(all_timesteps) - 1:
            if not isinstance(dmd_noisy_tensor, torch.Tensor):
                raise TypeError(f"dmd_noisy_tensor must be a Tensor before the last step, got "
                                f"{type(dmd_noisy_tensor).__name__}")
            sigma_next = self._sigma_at(all_timesteps[cur_sampling_step + 1], sigmas, timesteps)
            prev = fused(x, [model_output, dmd_noisy_tensor], [1.0 - sigma_next, -(1.0 - sigma_next) * sigma,
                                                               sigma_next])
            prev = prev.to(dmd_noisy_tensor.dtype)
        else:
            prev = fused(x, [model_output], [1.0, -sigma]).to(model_output.dtype)
        return SchedulerOutput(prev) if return_dict else (prev,)
