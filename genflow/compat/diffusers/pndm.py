"""diffusers' pseudo-numerical schedulers on genflow's fused update: ``PNDMScheduler`` and
``IPNDMScheduler``.

Both move a combination ``e`` of noise predictions by the DDIM transfer of ``genflow.solvers.pndm``
(``x' = (alpha'/alpha) x + alpha' (s' - s) e`` with ``s = sigma/alpha``, exact for a constant
``eps``), with the uniform-grid Adams-Bashforth weights ``genflow.solvers.pndm.adams_bashforth_weights``;
every update is one fused pass reading the sample and the combined outputs once.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from genflow.ownership import OutputOwnership
from genflow.solvers.pndm import adams_bashforth_weights

from ._base import (Scheduler, SchedulerOutput, check_choice, check_prediction_type, fused, fused_planned, grid_plans,
                    pack, spaced_timesteps)

__all__ = ["PNDMScheduler", "IPNDMScheduler"]

_RK4 = (1 / 6, 1 / 3, 1 / 3, 1 / 6)  # the pseudo Runge-Kutta combination (Liu et al. 2022, eq. 9)


def _transfer_coefficients(alpha: float, sigma: float, alpha_next: float, sigma_next: float):
    """``(c_x, c_e)`` of the DDIM transfer ``x' = c_x x + c_e e``: ``alpha'/alpha`` and
    ``alpha' (s' - s) = sigma' - alpha' sigma / alpha`` (Liu et al. 2022, eq. 11; Song et al. 2021, eq. 12)."""
    return alpha_next / alpha, sigma_next - alpha_next * sigma / alpha


class PNDMScheduler(Scheduler):
    """Pseudo numerical methods for diffusion models, diffusers' ``PNDMScheduler``.

    Three pseudo fourth-order Runge-Kutta steps (four ``step`` calls each, at ``t``, the midpoint
    twice and ``t'``: ``x_k = phi(x, e_k, t, t_k)``, then ``x' = phi(x, (e1 + 2 e2 + 2 e3 + e4)/6, t, t')``),
    then pseudo linear multistep (PLMS) steps ``x' = phi(x, (55 e_i - 59 e_{i-1} + 37 e_{i-2}
    - 9 e_{i-3})/24, t, t')`` on the history of the Runge-Kutta steps' first outputs. With
    ``skip_prk_steps`` the warm-up is PLMS's pseudo improved Euler step (two calls) and Adams orders
    rising 1..4. ``phi`` is the DDIM transfer. Liu et al. (2022), "Pseudo Numerical Methods for
    Diffusion Models on Manifolds", eqs. 9-12 (the native ``pndm``/``plms`` solvers). Second order
    on smooth grids; ``steps + 9`` model evaluations (``steps + 1`` with ``skip_prk_steps``).
    For ``v_prediction`` the combined outputs are converted to noise with the step's starting
    sample and timestep, as diffusers does. One fused pass per call.
    """

    defaults = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                    trained_betas=None, skip_prk_steps=False, set_alpha_to_one=False, prediction_type="epsilon",
                    timestep_spacing="leading", steps_offset=0)
    order = 1

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        check_prediction_type(self.config.prediction_type, ("epsilon", "v_prediction"))
        check_choice("timestep_spacing", self.config.timestep_spacing, ("linspace", "leading", "trailing"))
        check_choice("beta_schedule", self.config.beta_schedule, ("linear", "scaled_linear", "squaredcos_cap_v2"))
        self._set_tables()
        self.final_alpha_cumprod = torch.tensor(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]
        self._final_abar = 1.0 if self.config.set_alpha_to_one else self._abar[0]
        self.pndm_order = 4
        self._timesteps = np.arange(0, self.config.num_train_timesteps)[::-1].copy()
        self.prk_timesteps = self.plms_timesteps = self.timesteps = None
        self._reset()

    def _reset(self) -> None:
        self.ets = []  # the model outputs the multistep combines (newest last)
        self.counter = 0
        self.cur_sample = None
        self._prk_outputs = []
        self.ownership = OutputOwnership()  # held outputs are never memory the model reuses

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """Set ``timesteps`` (int64, decreasing): the Runge-Kutta calls' timesteps (the last four
        spaced timesteps with their midpoints), then the PLMS ones."""
        n, n_train = num_inference_steps, self.config.num_train_timesteps
        self.num_inference_steps = n
        self._timesteps = spaced_timesteps(self.config, n)[::-1].copy()  # increasing
        if self.config.skip_prk_steps:
            self.prk_timesteps = np.array([], dtype=np.int64)
            t = self._timesteps
            self.plms_timesteps = np.concatenate([t[:-1], t[-2:-1], t[-1:]])[::-1].copy()
        else:
            prk = np.array(self._timesteps[-self.pndm_order:]).repeat(2) + np.tile(
                np.array([0, n_train // n // 2]), self.pndm_order)
            self.prk_timesteps = prk[:-1].repeat(2)[1:-1][::-1].copy()
            self.plms_timesteps = self._timesteps[:-3][::-1].copy()
        timesteps = np.concatenate([self.prk_timesteps, self.plms_timesteps]).astype(np.int64)
        self.timesteps = torch.from_numpy(timesteps).to(device)
        self._reset()

    def _own(self, model_output, sample):
        return self.ownership.own(model_output, sample, lambda: f"{type(self).__name__}.step")

    def _transfer(self, x, t: int, t_next: int, outputs, weights) -> torch.Tensor:
        """``phi(x, e, t, t_next)`` with ``e`` the combination ``sum_j weights[j] outputs[j]`` of model
        outputs (converted to noise at ``(x, t)`` for ``v_prediction``): one fused pass."""
        a = self._abar[t]
        a_next = self._abar[t_next] if t_next >= 0 else self._final_abar
        c_x, c_e = _transfer_coefficients(math.sqrt(a), math.sqrt(1.0 - a), math.sqrt(a_next), math.sqrt(1.0 - a_next))
        if self.config.prediction_type == "v_prediction":  # e = sqrt(a) v + sqrt(1 - a) x
            c_x, c_e = c_x + c_e * math.sqrt(1.0 - a), c_e * math.sqrt(a)
        return fused(x, list(outputs), [c_x] + [c_e * w for w in weights])

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        """One call: a Runge-Kutta stage while ``counter < len(prk_timesteps)``, else a PLMS step.

        Args:
            model_output (Tensor[B, *D]): the network output at ``(sample, timestep)``.
            timestep (int or 0-dim Tensor): the current entry of ``timesteps``.
            sample (Tensor[B, *D]): x at ``timestep``.
            return_dict (bool): a SchedulerOutput, else ``(prev_sample,)``.
        """
        if self.num_inference_steps is None:
            raise ValueError("num_inference_steps is None: call set_timesteps before step")
        if self.counter < len(self.prk_timesteps) and not self.config.skip_prk_steps:
            prev = self._step_prk(model_output, int(timestep), sample)
        else:
            prev = self._step_plms(model_output, int(timestep), sample)
        self.counter += 1
        return SchedulerOutput(prev) if return_dict else (prev,)

    def step_prk(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        """A Runge-Kutta stage call (diffusers' entry point; ``step`` chooses it itself)."""
        prev = self._step_prk(model_output, int(timestep), sample)
        self.counter += 1
        return SchedulerOutput(prev) if return_dict else (prev,)

    def step_plms(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        """A PLMS call (diffusers' entry point; ``step`` chooses it itself)."""
        prev = self._step_plms(model_output, int(timestep), sample)
        self.counter += 1
        return SchedulerOutput(prev) if return_dict else (prev,)

    def _step_prk(self, model_output, t: int, sample):
        stage = self.counter % 4
        t_next = t - (0 if self.counter % 2 else self.config.num_train_timesteps // self.num_inference_steps // 2)
        t_start = int(self.prk_timesteps[self.counter // 4 * 4])
        if stage == 0:
            owned = self._own(model_output, sample)
            self._prk_outputs = [owned]
            self.ets.append(owned)
            self.cur_sample = sample
        elif stage < 3:
            self._prk_outputs.append(self._own(model_output, sample))
        x = self.cur_sample if self.cur_sample is not None else sample
        if stage < 3:
            return self._transfer(x, t_start, t_next, [model_output], [1.0])
        outputs, self._prk_outputs = self._prk_outputs + [model_output], []
        return self._transfer(x, t_start, t_next, outputs, _RK4)

    def _step_plms(self, model_output, t: int, sample):
        if not self.config.skip_prk_steps and len(self.ets) < 3:
            raise ValueError("PNDMScheduler's PLMS steps need the three Runge-Kutta steps first (12 calls); "
                             "call step along the whole of timesteps")
        ratio = self.config.num_train_timesteps // self.num_inference_steps
        t_next = t - ratio
        if self.counter != 1:
            self.ets = self.ets[-3:] + [self._own(model_output, sample)]
        else:  # the pseudo improved Euler step's second call: from the first call's start
            t_next, t = t, t + ratio
        x = sample
        if len(self.ets) == 1 and self.counter == 0:
            outputs, weights = [model_output], [1.0]
            self.cur_sample = sample
        elif len(self.ets) == 1 and self.counter == 1:
            outputs, weights = [model_output, self.ets[-1]], [0.5, 0.5]
            x, self.cur_sample = self.cur_sample, None
        else:
            weights = adams_bashforth_weights(len(self.ets))
            outputs = self.ets[::-1]
        return self._transfer(x, t, t_next, outputs, weights)


class IPNDMScheduler(Scheduler):
    """Improved PNDM (fourth-order Adams-Bashforth with a lower-order warm start), diffusers'
    ``IPNDMScheduler``.

    On diffusers' own grid ``sigma_i = sin^2(pi r_i / 2)``, ``alpha_i = sqrt(1 - sigma_i^2)``
    (``r`` uniform from 1 to 0; ``timesteps = 2 atan2(sigma, alpha)/pi``) with the model's output
    read as a velocity, ``e_i = sigma_i x + alpha_i out``::

        e = e_i, (3 e_i - e_{i-1})/2, (23, -16, 5)/12, then (55, -59, 37, -9)/24 combinations
        x' = alpha' (x - sigma e) / max(alpha, 1e-8) + sigma' e            (the DDIM transfer)

    Zhang & Chen (2023), "Fast Sampling of Diffusion Models with Exponential Integrator" (iPNDM,
    the native ``ipndm`` solver). 1 NFE per step; two fused passes (the update, folding ``e_i`` in,
    and ``e_i`` itself for the history).
    """

    defaults = dict(num_train_timesteps=1000, trained_betas=None)
    order = 1

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.pndm_order = 4
        self.set_timesteps(self.config.num_train_timesteps)

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """Set ``timesteps`` (float32 [n]) and the grid's ``betas`` (sigma) and ``alphas``, as diffusers."""
        if not isinstance(num_inference_steps, int) or isinstance(num_inference_steps, bool) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an int >= 1, got {num_inference_steps!r}")
        self.num_inference_steps = num_inference_steps
        steps = torch.cat([torch.linspace(1, 0, num_inference_steps + 1)[:-1], torch.tensor([0.0])])
        if self.config.trained_betas is not None:
            self.betas = torch.tensor(self.config.trained_betas, dtype=torch.float32)
        else:
            self.betas = torch.sin(steps * math.pi / 2) ** 2
        self.alphas = (1.0 - self.betas ** 2) ** 0.5
        self.timesteps = (torch.atan2(self.betas, self.alphas) / math.pi * 2)[:-1].to(device)
        self._sigma, self._alpha = self.betas.double().tolist(), self.alphas.double().tolist()
        self._plans = grid_plans(self, self._sigma + self._alpha)
        self.ets = []
        self._step_index = None
        self._begin_index = None

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        """One iPNDM step from ``timestep`` (see the class docstring).

        Args:
            model_output (Tensor[B, *D]): the network output at ``(sample, timestep)``.
            timestep (float or 0-dim Tensor): a value of ``timesteps``.
            sample (Tensor[B, *D]): x at ``timestep``.
            return_dict (bool): a SchedulerOutput, else ``(prev_sample,)``.
        """
        if self.num_inference_steps is None:
            raise ValueError("num_inference_steps is None: call set_timesteps before step")
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        sigma, alpha = self._sigma[i], self._alpha[i]
        history = self.ets[::-1][:3]
        plans = self._plans.get(("ipndm", i, len(history)))
        if plans is None:
            weights = adams_bashforth_weights(len(history) + 1)
            c_x, c_e = _transfer_coefficients(max(alpha, 1e-8), sigma, self._alpha[i + 1], self._sigma[i + 1])
            # x' = c_x x + c_e (w0 (sigma x + alpha out) + sum_j w_j e_{i-j}); e_i = sigma x + alpha out
            plans = self._plans[("ipndm", i, len(history))] = (
                pack([c_x + c_e * weights[0] * sigma, c_e * weights[0] * alpha] + [c_e * w for w in weights[1:]]),
                pack([sigma, alpha]))
        prev = fused_planned(sample, [model_output] + history, plans[0])
        if i + 1 < len(self.timesteps):  # e_i for the later steps (a new tensor: nothing of the model's is held)
            self.ets = self.ets[-2:] + [fused_planned(sample, [model_output], plans[1])]
        self._step_index += 1
        return SchedulerOutput(prev) if return_dict else (prev,)
