"""diffusers' ``KDPM2DiscreteScheduler`` and ``KDPM2AncestralDiscreteScheduler`` on genflow's fused update."""
from __future__ import annotations

import math

import numpy as np
import torch

from ._base import (SchedulerOutput, TIMESTEP_SPACINGS, check_choice, check_prediction_type, fused, fused_planned,
                    pack, randn_like_diffusers, x0_eps_coefficients)
from ._sigmas import SigmaScheduler

__all__ = ["KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler"]


def ve_x0_coefficients(prediction_type: str, s: float):
    """``(a, b)`` with ``x0 = a y + b out`` in the VE variables ``y = x / alpha`` at noise level
    ``s``: the VP map of ``x0_eps_coefficients`` (``alpha = 1/sqrt(1 + s^2)``) with ``x = alpha y``."""
    alpha = 1.0 / math.sqrt(s * s + 1.0)
    a, b = x0_eps_coefficients(prediction_type, alpha, s * alpha)[0]
    return a * alpha, b


def _float32_timesteps(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """``sigma_to_t`` of the float32 ``sigmas`` as diffusers evaluates it for the KDPM2 midpoints:
    on float32 torch tensors, so the interpolation ``(1 - w) low + w (low + 1)`` stays in float32
    (``sigma_to_t`` widens it to float64, as NumPy does). The bracket ``low`` is ``sigma_to_t``'s:
    the last table entry at or below ``log sigma``, clipped to ``[0, N - 2]``."""
    log_sigma = np.log(np.maximum(sigmas, np.float32(1e-10)))
    low = np.clip((log_sigma[None, :] >= log_sigmas[:, None]).sum(axis=0) - 1, 0, len(log_sigmas) - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = np.clip((lo - log_sigma) / (lo - hi), np.float32(0), np.float32(1))
    return (np.float32(1) - w) * low.astype(np.float32) + w * (low + 1).astype(np.float32)


def _expand(values: torch.Tensor) -> torch.Tensor:
    """``[v0, v1, v1, ..., vn, vn, vn]``: diffusers' two-calls-per-interval layout of a grid."""
    return torch.cat([values[:1], values[1:].repeat_interleave(2), values[-1:]])


class _KDPM2Base(SigmaScheduler):
    """The shared part of the two DPM-2 schedulers: config, grid and the two-call protocol.

    ``sigmas``, ``sigmas_interpol`` and ``timesteps`` are diffusers' (each interval's two calls
    appear as repeated entries); ``step`` alternates a first call (Euler to the log-midpoint, the
    model then evaluated there) and a second call (the full step with the midpoint's derivative).
    Subclasses give ``_interval_sigmas`` (the midpoints of the float32 grid), ``_interleave`` (the
    timestep layout) and ``_input_sigma_second`` (the noise level of a second call's model input).
    """

    defaults = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="linear",
                    trained_betas=None, use_karras_sigmas=False, use_exponential_sigmas=False,
                    use_beta_sigmas=False, prediction_type="epsilon", timestep_spacing="linspace", steps_offset=0)
    order = 2

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        check_prediction_type(self.config.prediction_type, ("epsilon", "v_prediction"))
        check_choice("timestep_spacing", self.config.timestep_spacing, TIMESTEP_SPACINGS)
        check_choice("beta_schedule", self.config.beta_schedule, ("linear", "scaled_linear", "squaredcos_cap_v2"))
        self._check_sigma_grid_flags()
        self._set_tables()
        self.set_timesteps(self.config.num_train_timesteps)

    @property
    def state_in_first_order(self) -> bool:
        """True when the next ``step`` call is the first call of an interval."""
        return self.sample is None

    def set_timesteps(self, num_inference_steps: int, device=None, num_train_timesteps=None) -> None:
        """Set ``timesteps`` (2n - 1 entries) and ``sigmas``/``sigmas_interpol`` (2n + 2) by
        ``timestep_spacing`` over ``num_train_timesteps`` (default the config's), optionally re-gridded
        (Karras timesteps rounded, as diffusers does)."""
        self.num_inference_steps = num_inference_steps
        timesteps = self._spaced_timesteps(num_inference_steps, num_train_timesteps)
        train = self._train_sigmas()
        log_sigmas = np.log(train)
        sigmas = np.interp(timesteps, np.arange(0, len(train)), train)
        sigmas, regridded = self._regrid(sigmas, log_sigmas, num_inference_steps)
        if regridded is not None:
            timesteps = regridded.round() if self.config.use_karras_sigmas else regridded
        self.log_sigmas = torch.from_numpy(log_sigmas).to(device)
        sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
        interpol = self._interval_sigmas(sigmas)
        timesteps = torch.from_numpy(timesteps)
        t_interpol = _float32_timesteps(interpol.numpy(), log_sigmas)
        t_interpol = torch.from_numpy(t_interpol).to(timesteps.dtype)
        self.timesteps = self._interleave(timesteps, t_interpol).to(device)
        self.sigmas_interpol = _expand(interpol).to(device)
        self.sample = None
        self._step_index = None
        self._begin_index = None
        self._set_sigmas(_expand(sigmas))
        self._sig_interpol = self.sigmas_interpol.double().tolist()

    def scale_model_input(self, sample: torch.Tensor, timestep=None, *args, **kwargs) -> torch.Tensor:
        """The network input ``sample / sqrt(s^2 + 1)`` with ``s`` the noise level the model is
        evaluated at (the interval's start on the first call, its midpoint on the second)."""
        if self._step_index is None:
            self._init_step_index(timestep)
        first = self.state_in_first_order
        key = ("scale", self._step_index, first)
        plan = self._plans.get(key)
        if plan is None:
            s = self._sig[self._step_index] if first else self._input_sigma_second(self._step_index)
            plan = self._plans[key] = pack([1.0 / math.sqrt(s * s + 1.0)])
        return fused_planned(sample, [], plan)


class KDPM2DiscreteScheduler(_KDPM2Base):
    """DPM-2 (k-diffusion ``sample_dpm_2``) in sigma, diffusers' ``KDPM2DiscreteScheduler``.

    Each interval ``s -> s'`` takes two ``step`` calls, with ``s_m = sqrt(s s')`` (the log-midpoint)
    and ``d(y, s) = (y - x0(y, out)) / s``::

        first call:   y_m = y + (s_m - s) d(y, s)
        second call:  y'  = y + (s' - s) d(y_m, s_m)

    The last interval (to ``s' = 0``, where ``s_m = 0``) is a single Euler call. Second order
    (DPM-Solver-2 with ``r1 = 1/2``, Lu et al. 2022, "DPM-Solver", Algorithm 1; the sigma-space
    form is Karras et al. 2022, "Elucidating the Design Space", section 3 and k-diffusion's
    ``sample_dpm_2``), 2n - 1 model evaluations for n intervals; each call is two fused passes
    (x0, then the update). ``prediction_type`` "epsilon" or "v_prediction" (diffusers has no "sample").
    """

    def _interval_sigmas(self, sigmas):
        # log-midpoints of each interval (entry k: between sigma_{k-1} and sigma_k), as diffusers
        return sigmas.log().lerp(sigmas.roll(1).log(), 0.5).exp()

    def _interleave(self, timesteps, interpol):
        return torch.cat([timesteps[:1], torch.stack((interpol[1:-1, None], timesteps[1:, None]), dim=-1).flatten()])

    def _input_sigma_second(self, i: int) -> float:
        return self._sig_interpol[i]

    def _plans_at(self, i: int, first: bool):
        """Packed ``(x0, update)`` coefficients of the call at index ``i``: Euler from ``s`` to the
        midpoint (terms y, out), or ``y_saved + (s' - s)(y_m - x0_m)/s_m`` (terms y_m, out)."""
        kind = self.config.prediction_type
        if first:
            s, s_m = self._sig[i], self._sig_interpol[i + 1]
            a, b = ve_x0_coefficients(kind, s)
            r = (s_m - s) / s
            return pack([a, b]), pack([1.0 + r * (1.0 - a), -r * b])
        s, s_m, s_next = self._sig[i - 1], self._sig_interpol[i], self._sig[i]
        a, b = ve_x0_coefficients(kind, s_m)
        g = (s_next - s) / s_m
        return pack([a, b]), pack([1.0, g * (1.0 - a), -g * b])

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        """One call of the two-call DPM-2 step (see the class docstring).

        Args:
            model_output (Tensor[B, *D]): the network output on ``scale_model_input(sample)``.
            timestep (float or 0-dim Tensor): a value of ``timesteps``.
            sample (Tensor[B, *D]): y (first call) or y_m (second call).
            return_dict (bool): a SchedulerOutput, else (prev_sample, pred_original_sample).
        """
        if self._step_index is None:
            self._init_step_index(timestep)
        first, i = self.state_in_first_order, self._step_index
        plans = self._plans.get(("kdpm2", i, first))
        if plans is None:
            plans = self._plans[("kdpm2", i, first)] = self._plans_at(i, first)
        x0 = fused_planned(sample, [model_output], plans[0])
        if first:
            prev = fused_planned(sample, [model_output], plans[1])
            self.sample = sample
        else:
            prev = fused_planned(self.sample, [sample, model_output], plans[1])
            self.sample = None
        self._step_index += 1
        if not return_dict:
            return prev, x0
        return SchedulerOutput(prev, x0)


class KDPM2AncestralDiscreteScheduler(_KDPM2Base):
    """Ancestral DPM-2 (k-diffusion ``sample_dpm_2_ancestral``) in sigma, diffusers'
    ``KDPM2AncestralDiscreteScheduler``.

    Per interval ``s -> s'``: ``s_up = sqrt(s'^2 (s^2 - s'^2) / s^2)``, ``s_down = sqrt(s'^2 - s_up^2)``,
    ``s_m = sqrt(s s_down)``, and with ``d(y, s) = (y - x0(y, out)) / s``::

        first call:   y_m = y + (s_m - s) d(y, s)
        second call:  y'  = y + (s_down - s) d(y_m, s_m) + s_up z

    The last interval is a single Euler call to ``s' = 0`` without noise. A weak first-order
    sampler of the reverse SDE (second order as an ODE step to ``s_down``), 2n - 1 model evaluations;
    each call is two fused passes, the noise added inside the second. Karras et al. (2022),
    "Elucidating the Design Space", section 4 (ancestral sampling) and k-diffusion's
    ``sample_dpm_2_ancestral``. z is drawn as diffusers draws it (``randn_tensor`` with the
    ``generator``), on the second call only.
    """

    def _interval_sigmas(self, sigmas):
        # diffusers' tables, in float32 as diffusers builds them
        nxt = sigmas.roll(-1)
        nxt[-1] = 0.0
        up = (nxt ** 2 * (sigmas ** 2 - nxt ** 2) / sigmas ** 2) ** 0.5
        down = (nxt ** 2 - up ** 2) ** 0.5
        down[-1] = 0.0
        interpol = sigmas.log().lerp(down.log(), 0.5).exp()
        interpol[-2:] = 0.0
        self.sigmas_up, self.sigmas_down = _expand(up), _expand(down)
        self._sig_up, self._sig_down = self.sigmas_up.double().tolist(), self.sigmas_down.double().tolist()
        return interpol

    def _interleave(self, timesteps, interpol):
        return torch.cat([timesteps[:1], torch.stack((interpol[:-2, None], timesteps[1:, None]), dim=-1).flatten()])

    def _input_sigma_second(self, i: int) -> float:
        return self._sig_interpol[i - 1]

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        """One call of the two-call ancestral DPM-2 step (see the class docstring).

        Args:
            model_output (Tensor[B, *D]): the network output on ``scale_model_input(sample)``.
            timestep (float or 0-dim Tensor): a value of ``timesteps``.
            sample (Tensor[B, *D]): y (first call) or y_m (second call).
            generator (torch.Generator or list, optional): for z.
            return_dict (bool): a SchedulerOutput, else (prev_sample, pred_original_sample).
        """
        if self._step_index is None:
            self._init_step_index(timestep)
        first, i = self.state_in_first_order, self._step_index
        kind = self.config.prediction_type
        if first:
            plans = self._plans.get(("kdpm2a", i))
            if plans is None:
                s, s_m = self._sig[i], self._sig_interpol[i]
                a, b = ve_x0_coefficients(kind, s)
                r = (s_m - s) / s
                plans = self._plans[("kdpm2a", i)] = (pack([a, b]), pack([1.0 + r * (1.0 - a), -r * b]))
            x0 = fused_planned(sample, [model_output], plans[0])
            prev = fused_planned(sample, [model_output], plans[1])
            self.sample = sample
        else:
            s, s_m, s_down, s_up = self._sig[i - 1], self._sig_interpol[i - 1], self._sig_down[i - 1], self._sig_up[i - 1]
            a, b = ve_x0_coefficients(kind, s_m)
            x0 = fused(sample, [model_output], [a, b])
            noise = randn_like_diffusers(model_output.shape, generator, model_output.device, model_output.dtype)
            g = (s_down - s) / s_m
            prev = fused(self.sample, [sample, model_output], [1.0, g * (1.0 - a), -g * b], s_up, noise=noise)
            self.sample = None
        self._step_index += 1
        if not return_dict:
            return prev, x0
        return SchedulerOutput(prev, x0)
