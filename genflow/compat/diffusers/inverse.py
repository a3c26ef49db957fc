"""diffusers' inversion schedulers on genflow's fused update: ``DDIMInverseScheduler`` and
``DPMSolverMultistepInverseScheduler`` (they run the deterministic samplers from data toward noise,
e.g. to find the latent of an image before editing it)."""
from __future__ import annotations

import math

import numpy as np
import torch

from ._base import (Scheduler, SchedulerOutput, check_choice, check_prediction_type, fused_planned, grid_plans,
                    pack, spaced_timesteps, x0_eps_coefficients)
from ._multistep import MultistepScheduler, flow_sigmas
from ._sigmas import beta_sigmas, exponential_sigmas, karras_sigmas, sigma_to_t
from .dpm_solver import ALGORITHMS, SOLVER_TYPES, DPMSolverMultistepScheduler

__all__ = ["DDIMInverseScheduler", "DPMSolverMultistepInverseScheduler"]

_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


class DDIMInverseScheduler(Scheduler):
    """DDIM run forward in time (DDIM inversion), diffusers' ``DDIMInverseScheduler``.

    From training timestep ``t - N // n`` to ``t`` (the ``timestep`` passed, increasing), with
    ``a = abar`` at the start (1 or ``abar_0`` below 0, ``set_alpha_to_one``) and ``a' = abar_t``::

        x0 = x0(x, out)  (clipped to +-clip_sample_range if clip_sample),   eps = eps(x, out)
        x' = sqrt(a') x0 + sqrt(1 - a') eps

    Deterministic DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 12 with
    eta = 0, read forward: eq. 13's ODE integrated toward noise), first order, one model evaluation
    per step; two fused passes (x0, then x'). Note ``eps`` is the unclipped model's, as in diffusers.
    """

    defaults = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                    trained_betas=None, clip_sample=True, set_alpha_to_one=True, steps_offset=0,
                    prediction_type="epsilon", clip_sample_range=1.0, timestep_spacing="leading",
                    rescale_betas_zero_snr=False)
    order = 1

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        check_prediction_type(self.config.prediction_type)
        if self.config.prediction_type == "sample" and self.config.set_alpha_to_one:
            raise ValueError("prediction_type='sample' needs set_alpha_to_one=False in DDIMInverseScheduler: "
                             "inversion starts at alpha_cumprod = 1 (no noise), where the noise implied by "
                             "a predicted sample is 0/0")
        check_choice("timestep_spacing", self.config.timestep_spacing, ("leading", "trailing"))
        check_choice("beta_schedule", self.config.beta_schedule, _BETA_SCHEDULES)
        self._set_tables()
        self.initial_alpha_cumprod = torch.tensor(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]
        self._initial_abar = 1.0 if self.config.set_alpha_to_one else self._abar[0]
        self.timesteps = torch.arange(0, self.config.num_train_timesteps, dtype=torch.int64)
        self._plans = grid_plans(self, ())  # the step plans by (start, end) timestep: the table is the config's

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """Set ``timesteps`` (int64 [n], increasing) by ``timestep_spacing``: DDIM's, reversed."""
        t = spaced_timesteps(self.config, num_inference_steps)[::-1].copy()
        self.num_inference_steps = num_inference_steps
        self.timesteps = torch.from_numpy(t).to(device)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        """One inverse DDIM step to ``timestep`` (see the class docstring).

        Args:
            model_output (Tensor[B, *D]): the network output at ``(sample, timestep)``.
            timestep (int or 0-dim Tensor): the entry of ``timesteps`` (the step's end).
            sample (Tensor[B, *D]): x at ``timestep - N // n``.
            return_dict (bool): a SchedulerOutput, else (prev_sample, pred_original_sample).
        """
        if self.num_inference_steps is None:
            raise ValueError("num_inference_steps is None: call set_timesteps before step")
        cfg = self.config
        end = int(timestep)
        start = min(end - cfg.num_train_timesteps // self.num_inference_steps, cfg.num_train_timesteps - 1)
        plans = self._plans.get((start, end))
        if plans is None:
            a = self._abar[start] if start >= 0 else self._initial_abar
            (x0_x, x0_out), (eps_x, eps_out) = x0_eps_coefficients(cfg.prediction_type, math.sqrt(a),
                                                                   math.sqrt(1.0 - a))
            a_end = self._abar[end]
            direction = math.sqrt(1.0 - a_end)
            plans = self._plans[(start, end)] = (pack([x0_x, x0_out]),
                                                 pack([math.sqrt(a_end), direction * eps_x, direction * eps_out]))
        x0 = fused_planned(sample, [model_output], plans[0])
        if cfg.clip_sample:
            x0.clamp_(-cfg.clip_sample_range, cfg.clip_sample_range)
        prev = fused_planned(x0, [sample, model_output], plans[1])
        if not return_dict:
            return prev, x0
        return SchedulerOutput(prev, x0)


class DPMSolverMultistepInverseScheduler(DPMSolverMultistepScheduler):
    """Multistep DPM-Solver(++) run from data toward noise, diffusers' ``DPMSolverMultistepInverseScheduler``.

    ``DPMSolverMultistepScheduler``'s steps (the native ``dpm_multistep_coefficients``,
    ``variant="diffusers"``; Lu et al. 2022a/b) on an increasing grid: ``timestep_spacing`` counts
    up from 0 to the noisiest timestep (the one ``lambda_min_clipped`` allows), and ``sigmas`` end
    with that timestep's sigma (or repeat the last one on a Karras / exponential / beta / flow grid,
    whose ends are taken in increasing order, as diffusers does). Repeated timesteps are dropped from
    ``timesteps`` but not from ``sigmas`` (diffusers' behaviour, reproduced). ``lower_order_final``
    and ``euler_at_final`` act as in the forward scheduler; there is no ``final_sigmas_type``.
    1 NFE per step, one fused call per step.
    """

    defaults = dict(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
        solver_order=2, prediction_type="epsilon", thresholding=False, dynamic_thresholding_ratio=0.995,
        sample_max_value=1.0, algorithm_type="dpmsolver++", solver_type="midpoint", lower_order_final=True,
        euler_at_final=False, use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
        use_flow_sigmas=False, flow_shift=1.0, lambda_min_clipped=-float("inf"), variance_type=None,
        timestep_spacing="linspace", steps_offset=0,
    )

    def __init__(self, **kwargs):
        MultistepScheduler.__init__(self, **kwargs)  # the forward class's checks need its final_sigmas_type
        c = self.config
        check_choice("beta_schedule", c.beta_schedule, _BETA_SCHEDULES)
        fields = {}
        if c.algorithm_type == "deis":  # a DEIS config swapped in (from_config): diffusers' mapping
            fields["algorithm_type"] = "dpmsolver++"
        else:
            check_choice("algorithm_type", c.algorithm_type, ALGORITHMS)
        if c.solver_type in ("logrho", "bh1", "bh2"):
            fields["solver_type"] = "midpoint"
        else:
            check_choice("solver_type", c.solver_type, SOLVER_TYPES)
        check_choice("variance_type", c.variance_type, (None, "learned", "learned_range"))
        if fields:
            self._replace_config(**fields)
        if self.config.algorithm_type == "sde-dpmsolver" and c.solver_order == 3:
            raise ValueError("algorithm_type='sde-dpmsolver' supports solver_order 1 or 2, got solver_order=3")
        n = c.num_train_timesteps
        self.timesteps = torch.from_numpy(np.linspace(0, n - 1, n, dtype=np.float32))
        self.use_karras_sigmas = c.use_karras_sigmas
        self.use_exponential_sigmas = c.use_exponential_sigmas
        self.use_beta_sigmas = c.use_beta_sigmas

    def _spaced(self, steps: int, noisiest: int) -> np.ndarray:
        """Increasing integer timesteps from 0 to ``noisiest`` by ``timestep_spacing``."""
        c = self.config
        if c.timestep_spacing == "linspace":
            return np.linspace(0, noisiest, steps + 1).round()[:-1].copy().astype(np.int64)
        if c.timestep_spacing == "leading":
            ratio = (noisiest + 1) // (steps + 1)
            return (np.arange(0, steps + 1) * ratio).round()[:-1].copy().astype(np.int64) + c.steps_offset
        ratio = c.num_train_timesteps / steps
        return np.arange(noisiest + 1, 0, -ratio).round()[::-1].copy().astype(np.int64) - 1

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """Build the increasing inference grid (see the class docstring)."""
        c = self.config
        if c.algorithm_type.startswith("sde"):
            raise ValueError(f"algorithm_type={c.algorithm_type!r} cannot run toward noise: its noise scale "
                             "sigma' sqrt(1 - e^(-2h)) is imaginary for h < 0 (diffusers returns NaN); use "
                             "'dpmsolver++' or 'dpmsolver'")
        if not isinstance(num_inference_steps, int) or isinstance(num_inference_steps, bool) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an int >= 1, got {num_inference_steps!r}")
        clipped = int(torch.searchsorted(torch.flip(self.lambda_t, [0]), c.lambda_min_clipped))
        self.noisiest_timestep = c.num_train_timesteps - 1 - clipped
        timesteps = self._spaced(num_inference_steps, self.noisiest_timestep)
        table = self._train_sigmas()  # increasing: its "first" end is the smallest sigma
        log_table = np.log(table)
        grids = (("use_karras_sigmas", karras_sigmas), ("use_exponential_sigmas", exponential_sigmas),
                 ("use_beta_sigmas", beta_sigmas))
        chosen = [grid for flag, grid in grids if c[flag]]
        if chosen:
            sigmas = chosen[0](table, num_inference_steps)
            timesteps = sigma_to_t(sigmas, log_table)
            if c.use_karras_sigmas:
                timesteps = timesteps.round().astype(np.int64)
            sigmas = np.concatenate([sigmas, sigmas[-1:]])
        elif c.use_flow_sigmas:
            sigmas = flow_sigmas(num_inference_steps, c.num_train_timesteps, c.flow_shift)
            timesteps = sigmas * c.num_train_timesteps
            sigmas = np.concatenate([sigmas, sigmas[-1:]])
        else:
            abar = self.alphas_cumprod[self.noisiest_timestep]
            sigma_max = float(((1 - abar) / abar) ** 0.5)
            sigmas = np.concatenate([np.interp(timesteps, np.arange(0, len(table)), table), [sigma_max]])
        _, first = np.unique(timesteps, return_index=True)
        self._finish(timesteps[np.sort(first)], sigmas, device)

    def _order(self, i: int) -> int:
        c, n = self.config, len(self.timesteps)
        final = i == n - 1 and (c.euler_at_final or (c.lower_order_final and n < 15))
        second = i == n - 2 and c.lower_order_final and n < 15
        if c.solver_order == 1 or self.lower_order_nums < 1 or final:
            return 1
        if c.solver_order == 2 or self.lower_order_nums < 2 or second:
            return 2
        return 3
