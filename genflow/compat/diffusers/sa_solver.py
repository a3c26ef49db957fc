"""diffusers' ``SASolverScheduler`` on genflow's fused update (data prediction)."""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from genflow.ownership import OutputOwnership
from genflow.solvers.sa_solver import sa_coefficients

from ._base import Scheduler, alphas_cumprod_for, betas_for, check_choice, check_prediction_type, fused, randn_like_diffusers
from ._multistep import MultistepScheduler, flow_sigmas, multistep_timesteps

__all__ = ["SASolverScheduler", "diffusers_second_order_shift"]


def diffusers_second_order_shift(h: float, tau: float, alpha_next: float, predictor: bool, h_prev: float) -> float:
    """diffusers' extra term for order 2 (its "modification ... similar to UniPC", not in Xue et al.):
    added to the newest data prediction's weight and subtracted from the previous one's. With
    ``r = 1 + tau^2``: ``r alpha' (h^2/2 - (r h - 1 + e^{-r h})/r^2) / h_prev`` in the predictor
    (``h_prev`` the previous step's log-SNR length) and ``r alpha' (h/2 - (r h - 1 + e^{-r h})/(r^2 h))``
    in the corrector. Both vanish like ``(1 + tau^2)^2 alpha' h^2 / 6`` as ``h -> 0`` (with ``h_prev ~ h``):
    a second-order term times a first difference of the data predictions, so the order is kept."""
    r = 1.0 + tau * tau
    inner = (r * h - 1.0 + math.exp(-r * h)) / (r * r)
    if predictor:
        return r * alpha_next * (h * h / 2.0 - inner) / h_prev
    return r * alpha_next * (h / 2.0 - inner / h)


def _default_tau(t) -> float:
    """diffusers' default ``tau_func``: 1 for training timesteps in [200, 800], else 0."""
    return 1 if 200 <= t <= 800 else 0


class SASolverScheduler(MultistepScheduler):
    """SA-Solver (stochastic Adams predictor-corrector), diffusers' ``SASolverScheduler``.

    With ``h = lambda' - lambda``, ``tau = tau_func(t)`` and the data predictions ``m_j``::

        predictor (eq. 15):  x' = e^{-tau^2 h} (sigma'/sigma) x + sum_j b_j m_{i-j} + sigma' sqrt(1 - e^{-2 tau^2 h}) z
        corrector (eq. 18):  redo the previous step with the nodes including the new m_i (same z)

    where ``b_j = alpha' sa_coefficients(lambda, lambda', nodes, tau)_j`` (the native
    ``genflow.solvers.sa_solver`` weights) over ``predictor_order`` (``corrector_order``) nodes, orders
    rising while the history fills and falling at the end (``lower_order_final``), plus diffusers'
    order-2 shift (``diffusers_second_order_shift``, pinned in the tests). z is drawn every step as
    diffusers draws it. Xue et al. (2023), "SA-Solver: Stochastic Adams Solver for Fast Sampling of
    Diffusion Models", Algorithm 1 (data prediction). 1 NFE per step; three fused passes per step
    (the data prediction kept for the history, the corrector, the predictor).
    ``algorithm_type="noise_prediction"`` has no native counterpart and is rejected.
    """

    defaults = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                    trained_betas=None, predictor_order=2, corrector_order=2, prediction_type="epsilon",
                    tau_func=None, thresholding=False, dynamic_thresholding_ratio=0.995, sample_max_value=1.0,
                    algorithm_type="data_prediction", lower_order_final=True, use_karras_sigmas=False,
                    use_exponential_sigmas=False, use_beta_sigmas=False, use_flow_sigmas=False, flow_shift=1.0,
                    lambda_min_clipped=-float("inf"), variance_type=None, timestep_spacing="linspace",
                    steps_offset=0)

    def __init__(self, **kwargs):
        Scheduler.__init__(self, **kwargs)  # MultistepScheduler.__init__ reads a solver_order this class lacks
        c = self.config
        check_prediction_type(c.prediction_type, ("epsilon", "sample", "v_prediction", "flow_prediction"))
        check_choice("beta_schedule", c.beta_schedule, ("linear", "scaled_linear", "squaredcos_cap_v2"))
        check_choice("algorithm_type", c.algorithm_type, ("data_prediction",))
        check_choice("timestep_spacing", c.timestep_spacing, ("linspace", "leading", "trailing"))
        for name in ("predictor_order", "corrector_order"):
            if c[name] not in (1, 2, 3, 4) or isinstance(c[name], bool):
                raise ValueError(f"{name} must be 1, 2, 3 or 4, got {c[name]!r}")
        if sum(bool(c[k]) for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")) > 1:
            raise ValueError("use_karras_sigmas, use_exponential_sigmas and use_beta_sigmas are exclusive")
        self.betas = betas_for(c).float()
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = alphas_cumprod_for(c).float()
        self.alpha_t = torch.sqrt(self.alphas_cumprod)
        self.sigma_t = torch.sqrt(1 - self.alphas_cumprod)
        self.lambda_t = torch.log(self.alpha_t) - torch.log(self.sigma_t)
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        n = c.num_train_timesteps
        self.timesteps = torch.from_numpy(np.linspace(0, n - 1, n, dtype=np.float32)[::-1].copy())
        self.init_noise_sigma = 1.0
        self.tau_func = _default_tau if c.tau_func is None else c.tau_func
        self.predict_x0 = True
        self._grid(self.sigmas)
        self._reset()

    def _history_length(self) -> int:
        return max(self.config.predictor_order, self.config.corrector_order - 1)

    def _reset(self) -> None:
        self.model_outputs = [None] * self._history_length()
        self.timestep_list = [None] * self._history_length()
        self.lower_order_nums = 0
        self.last_sample = None
        self.last_noise = None
        self.ownership = OutputOwnership()

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None) -> None:
        """Build the grid as diffusers does (spacing up to the ``lambda_min_clipped`` timestep, or the
        Karras / exponential / beta / flow sigmas; the last sigma is the table's smallest or repeated)."""
        c = self.config
        clipped = int(torch.searchsorted(torch.flip(self.lambda_t, [0]), c.lambda_min_clipped))
        timesteps = multistep_timesteps(c.timestep_spacing, num_inference_steps, c.num_train_timesteps,
                                        c.steps_offset, c.num_train_timesteps - clipped)
        grid = [k for k in ("karras", "exponential", "beta") if c[f"use_{k}_sigmas"]]
        if grid:
            sigmas, timesteps = self._converted(grid[0], num_inference_steps)
            timesteps = timesteps.round() if grid[0] == "karras" else timesteps
            sigmas = np.concatenate([sigmas, sigmas[-1:]])
        elif c.use_flow_sigmas:
            sigmas = flow_sigmas(num_inference_steps, c.num_train_timesteps, c.flow_shift)
            timesteps = sigmas * c.num_train_timesteps
            sigmas = np.concatenate([sigmas, sigmas[-1:]])
        else:
            table = self._train_sigmas()
            sigmas = np.concatenate([np.interp(timesteps, np.arange(0, len(table)), table), [self._sigma_min_train()]])
        self._finish(timesteps, sigmas, device)

    def _weights(self, start: int, end: int, order: int, tau: float, predictor: bool):
        """``[b_j]`` of the step ``start -> end`` over the ``order`` nodes ``lambda_i, lambda_{i-1}, ..``
        (``i = start`` for the predictor, ``end`` for the corrector), diffusers' order-2 shift included."""
        lam, newest = self._lam, start if predictor else end
        nodes = [lam[newest - k] for k in range(order)]
        weights = [self._alpha[end] * b for b in sa_coefficients(lam[start], lam[end], nodes, tau)]
        if order == 2:
            h = lam[end] - lam[start]
            shift = diffusers_second_order_shift(h, tau, self._alpha[end], predictor,
                                                 lam[start] - lam[start - 1] if predictor else h)
            weights[0] += shift
            weights[1] -= shift
        return weights

    def _adams(self, x, start: int, end: int, outputs, order: int, tau: float, noise, predictor: bool):
        """``e^{-tau^2 h} (sigma'/sigma) x + sum_j b_j outputs[j] + sigma' sqrt(1 - e^{-2 tau^2 h}) z``."""
        h = self._lam[end] - self._lam[start]
        decay = math.exp(-tau * tau * h) * self._sigma[end] / self._sigma[start]
        scale = self._sigma[end] * math.sqrt(-math.expm1(-2.0 * tau * tau * h))
        return fused(x, outputs, [decay] + self._weights(start, end, order, tau, predictor), scale, noise=noise)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        """One SA-Solver step: the corrector of the previous step (with this step's data prediction),
        then the predictor to the next grid point (see the class docstring).

        Args:
            model_output (Tensor[B, *D]): the network output at ``(sample, timestep)``.
            timestep (int or Tensor): the current entry of ``timesteps``.
            sample (Tensor[B, *D]): x at ``timestep``.
            generator (torch.Generator or list, optional): for z.
            return_dict (bool): SchedulerOutput if True, else ``(prev_sample,)``.
        """
        i = self._start_step(timestep)
        c, n = self.config, len(self.timesteps)
        out = self._mean_output(model_output, sample)
        x0 = self._materialise(sample, self._view(out, sample, i, True, c.thresholding), i)
        if i > 0 and self.last_sample is not None:  # SA-Corrector of the step i-1 -> i
            outputs = [x0] + [self.model_outputs[-1 - k] for k in range(self.this_corrector_order - 1)]
            sample = self._adams(self.last_sample, i - 1, i, outputs, self.this_corrector_order,
                                 float(self.tau_func(self.timestep_list[-1])), self.last_noise, predictor=False)
        self.model_outputs = self.model_outputs[1:] + [x0]
        self.timestep_list = self.timestep_list[1:] + [timestep]
        noise = randn_like_diffusers(model_output.shape, generator, model_output.device, model_output.dtype)
        predictor_order, corrector_order = c.predictor_order, c.corrector_order
        if c.lower_order_final:
            predictor_order, corrector_order = min(predictor_order, n - i), min(corrector_order, n - i + 1)
        self.this_predictor_order = min(predictor_order, self.lower_order_nums + 1)
        self.this_corrector_order = min(corrector_order, self.lower_order_nums + 2)
        self.last_sample, self.last_noise = sample, noise
        outputs = [self.model_outputs[-1 - k] for k in range(self.this_predictor_order)]
        prev = self._adams(sample, i, i + 1, outputs, self.this_predictor_order, float(self.tau_func(timestep)), noise,
                           predictor=True)
        if self.lower_order_nums < self._history_length():
            self.lower_order_nums += 1
        self._step_index += 1
        return self._output(prev, return_dict)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`` at the training timesteps (as diffusers)."""
        return Scheduler.add_noise(self, original_samples, noise, timesteps)
