"""diffusers' EDM schedulers on genflow's fused update: ``EDMEulerScheduler``,
``EDMDPMSolverMultistepScheduler`` and ``CosineDPMSolverMultistepScheduler``.

Both work in Karras et al.'s (2022) variables: the state ``x = x0 + sigma eps`` (alpha = 1), the
model preconditioned as in their Table 1 (``c_in``, ``c_noise`` on the way in, ``x0 = c_skip x +
c_out F`` on the way out, ``genflow.train.objectives.edm_coefficients``) and a Karras (rho) or
log-uniform sigma grid between ``sigma_max`` and ``sigma_min``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from genflow.train.objectives import edm_coefficients

from ._base import (Scheduler, SchedulerOutput, check_choice, check_prediction_type, fused, fused_planned, grid_plans,
                    pack, randn_like_diffusers)
from genflow.compat.k_diffusion.noise import BrownianTreeNoiseSampler
from genflow.solvers.dpm_coefficients import dpm_multistep_coefficients

from ._sigmas import SigmaScheduler
from .dpm_solver import DPMSolverMultistepScheduler

__all__ = ["EDMEulerScheduler", "EDMDPMSolverMultistepScheduler", "CosineDPMSolverMultistepScheduler", "karras_ramp"]


def karras_ramp(ramp, sigma_min: float, sigma_max: float, rho: float):
    """Karras et al. (2022) eq. 5 on given ramp values (array or tensor in [0, 1], its dtype kept):
    ``(smax^(1/rho) + ramp (smin^(1/rho) - smax^(1/rho)))^rho``."""
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def _edm_sigmas(config, ramp: torch.Tensor) -> torch.Tensor:
    """diffusers' EDM grid on ``ramp`` (values in [0, 1], in the ramp's dtype): ``karras_ramp``, or for
    ``"exponential"`` ``exp`` of a float32 ``linspace(log smin, log smax)`` reversed (diffusers' form,
    ramp values unused)."""
    smin, smax = config.sigma_min, config.sigma_max
    if config.sigma_schedule == "karras":
        return karras_ramp(ramp, smin, smax, config.rho)
    return torch.linspace(math.log(smin), math.log(smax), len(ramp)).exp().flip(0)


def _edm_x0(config, sigma: float):
    """``(c_skip, c_out)`` of ``x0 = c_skip x + c_out out`` at ``sigma`` (Karras et al. 2022, Table 1);
    ``c_out`` is negated for ``v_prediction`` (diffusers' convention)."""
    c_skip, c_out, _, _ = edm_coefficients(torch.tensor(sigma, dtype=torch.float64), config.sigma_data)
    sign = 1.0 if config.prediction_type == "epsilon" else -1.0
    return float(c_skip), sign * float(c_out)


def _c_in(config, sigma: float) -> float:
    return float(edm_coefficients(torch.tensor(sigma, dtype=torch.float64), config.sigma_data)[2])


def _c_noise(sigmas: torch.Tensor) -> torch.Tensor:
    """The network's time input ``c_noise = log(sigma)/4`` (float32, as diffusers' ``timesteps``)."""
    return edm_coefficients(sigmas, 0.5)[3]


def _check_edm_config(config) -> None:
    check_choice("sigma_schedule", config.sigma_schedule, ("karras", "exponential"))
    check_choice("final_sigmas_type", config.final_sigmas_type, ("zero", "sigma_min"))
    # diffusers lists "sample" but its precondition_outputs rejects it at the first step
    check_prediction_type(config.prediction_type, ("epsilon", "v_prediction"))


class EDMEulerScheduler(SigmaScheduler):
    """Euler's method on the EDM probability-flow ODE, diffusers' ``EDMEulerScheduler``.

    With ``x0 = c_skip(sigma_hat) x_hat + c_out(sigma_hat) F`` and ``d = (x_hat - x0)/sigma_hat``::

        sigma_hat = sigma_i (1 + gamma),  gamma = min(s_churn / n, sqrt(2) - 1) if s_tmin <= sigma_i <= s_tmax
        x_hat     = x + sqrt(sigma_hat^2 - sigma_i^2) s_noise z          (only when gamma > 0)
        x_next    = x_hat + (sigma_{i+1} - sigma_hat) d

    First order, one model evaluation per step, two fused passes (x0 and x_next). Karras et al.
    (2022), "Elucidating the Design Space of Diffusion-Based Generative Models", Algorithm 2 with
    the Euler step only, Table 1 preconditioning. ``timesteps`` are ``c_noise = log(sigma)/4``.
    """

    defaults = dict(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, sigma_schedule="karras",
                    num_train_timesteps=1000, prediction_type="epsilon", rho=7.0, final_sigmas_type="zero")
    order = 1

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        _check_edm_config(self.config)
        n = self.config.num_train_timesteps
        self._grid(torch.arange(n + 1, dtype=torch.float64) / n, None)
        self.is_scale_input_called = False

    @property
    def init_noise_sigma(self) -> float:
        return (self.config.sigma_max ** 2 + 1) ** 0.5

    def _grid(self, ramp: torch.Tensor, device) -> None:
        sigmas = _edm_sigmas(self.config, ramp).to(dtype=torch.float32, device=device)
        self.timesteps = _c_noise(sigmas)
        last = sigmas[-1:] if self.config.final_sigmas_type == "sigma_min" else torch.zeros(1, device=sigmas.device)
        self._step_index = None
        self._begin_index = None
        self._set_sigmas(torch.cat([sigmas, last]))

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None, sigmas=None) -> None:
        """Set ``sigmas`` (float32 [n + 1]) and ``timesteps`` (``c_noise``, float32 [n]) from
        ``num_inference_steps`` (a uniform ramp) or from ``sigmas``, diffusers' custom ramp values
        in [0, 1] mapped through the configured grid."""
        if (num_inference_steps is None) == (sigmas is None):
            raise ValueError("pass exactly one of num_inference_steps or sigmas")
        self.num_inference_steps = num_inference_steps
        if sigmas is None:
            ramp = torch.linspace(0, 1, num_inference_steps, dtype=torch.float64)
        else:
            ramp = torch.as_tensor(sigmas).to(torch.float64)
        self._grid(ramp, device)

    def scale_model_input(self, sample: torch.Tensor, timestep=None, *args, **kwargs) -> torch.Tensor:
        """The network input ``c_in(sigma) sample = sample / sqrt(sigma^2 + sigma_data^2)``."""
        return self.scaled_input(sample, timestep, lambda i: _c_in(self.config, self._sig[i]))

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, s_churn: float = 0.0,
             s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0, generator=None,
             return_dict: bool = True, pred_original_sample: Optional[torch.Tensor] = None):
        """One Euler step from ``timestep`` (see the class docstring).

        Args:
            model_output (Tensor[B, *D]): the network output F on ``scale_model_input(sample)``.
            timestep (float or 0-dim float Tensor): a value of ``timesteps``.
            sample (Tensor[B, *D]): x at the current sigma.
            s_churn, s_tmin, s_tmax, s_noise (float): Karras et al.'s stochastic churn.
            generator (torch.Generator or list, optional): for z when churn is active.
            return_dict (bool): a SchedulerOutput, else (prev_sample, pred_original_sample).
            pred_original_sample (Tensor[B, *D], optional): x0 itself (then ``model_output`` is unused).
        """
        self._check_float_timestep(timestep)
        if self._step_index is None:
            self._init_step_index(timestep)
        x = sample.to(torch.float32)
        i = self._step_index
        sigma, sigma_next = self._sig[i], self._sig[i + 1]
        gamma = min(s_churn / (len(self._sig) - 1), 2 ** 0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * (gamma + 1)
        if gamma > 0:
            noise = randn_like_diffusers(model_output.shape, generator, model_output.device, model_output.dtype)
            x = fused(x, [noise], [1.0, s_noise * math.sqrt(sigma_hat ** 2 - sigma ** 2)])
        r = (sigma_next - sigma_hat) / sigma_hat  # x_next = (1 + r) x_hat - r x0
        if pred_original_sample is not None:
            x0 = pred_original_sample
            prev = fused(x, [x0], [1.0 + r, -r])
        else:
            plans = self._plans.get(("edm_euler", i, sigma_hat))
            if plans is None:
                a, b = _edm_x0(self.config, sigma_hat)
                plans = self._plans[("edm_euler", i, sigma_hat)] = (pack([a, b]), pack([1.0 + r - r * a, -r * b]))
            x0 = fused_planned(x, [model_output], plans[0])
            prev = fused_planned(x, [model_output], plans[1])
        prev = prev.to(model_output.dtype)
        self._step_index += 1
        if not return_dict:
            return prev, x0
        return SchedulerOutput(prev, x0)


class EDMDPMSolverMultistepScheduler(DPMSolverMultistepScheduler):
    """Multistep DPM-Solver++ on the EDM grid, diffusers' ``EDMDPMSolverMultistepScheduler``.

    ``DPMSolverMultistepScheduler``'s steps (the native ``dpm_multistep_coefficients``,
    ``variant="diffusers"``; orders 1-3, ``midpoint``/``heun``, ``dpmsolver++`` and
    ``sde-dpmsolver++``) with ``alpha = 1``, ``sigma = sigma_i`` (``lambda = -log sigma``) and
    the data prediction ``x0 = c_skip x + c_out F`` (Karras et al. 2022, Table 1). Lu et al.
    (2022b), "DPM-Solver++", Algorithm 2; 1 NFE per step. ``timesteps`` are ``c_noise = log(sigma)/4``.
    """

    defaults = dict(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, sigma_schedule="karras",
                    num_train_timesteps=1000, prediction_type="epsilon", rho=7.0, solver_order=2,
                    thresholding=False, dynamic_thresholding_ratio=0.995, sample_max_value=1.0,
                    algorithm_type="dpmsolver++", solver_type="midpoint", lower_order_final=True,
                    euler_at_final=False, final_sigmas_type="zero")
    order = 1

    def __init__(self, **kwargs):
        Scheduler.__init__(self, **kwargs)  # not the VP tables of MultistepScheduler.__init__
        c = self.config
        _check_edm_config(c)
        fields = {}
        if c.algorithm_type == "deis":  # a DEIS config swapped in (from_config): diffusers' mapping
            fields["algorithm_type"] = "dpmsolver++"
        else:
            check_choice("algorithm_type", c.algorithm_type, ("dpmsolver++", "sde-dpmsolver++"))
        if c.solver_type in ("logrho", "bh1", "bh2"):
            fields["solver_type"] = "midpoint"
        else:
            check_choice("solver_type", c.solver_type, ("midpoint", "heun"))
        if c.solver_order not in (1, 2, 3) or isinstance(c.solver_order, bool):
            raise ValueError(f"solver_order must be 1, 2 or 3, got {c.solver_order!r}")
        if fields:
            self._replace_config(**fields)
        if self.config.algorithm_type == "sde-dpmsolver++" and c.solver_order == 3:
            raise ValueError("algorithm_type='sde-dpmsolver++' supports solver_order 1 or 2 (diffusers has no "
                             "third-order SDE update), got solver_order=3")
        self._training_grid()

    def _training_grid(self) -> None:
        """The grid of ``num_train_timesteps`` levels diffusers builds at construction."""
        sigmas = _edm_sigmas(self.config, torch.linspace(0, 1, self.config.num_train_timesteps))
        self.timesteps = self._noise_input(sigmas)
        self.sigmas = torch.cat([sigmas, torch.zeros(1)])
        self._grid(self.sigmas)
        self._reset()

    @staticmethod
    def _noise_input(sigmas: torch.Tensor) -> torch.Tensor:
        return _c_noise(sigmas)

    @property
    def init_noise_sigma(self) -> float:
        return (self.config.sigma_max ** 2 + 1) ** 0.5

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """Set ``sigmas`` (float32 [n + 1], ending with 0 or ``sigma_min``) and ``timesteps``
        (``c_noise``, float32 [n]) on a uniform float32 ramp, as diffusers does."""
        if not isinstance(num_inference_steps, int) or isinstance(num_inference_steps, bool) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an int >= 1, got {num_inference_steps!r}")
        self.num_inference_steps = num_inference_steps
        sigmas = _edm_sigmas(self.config, torch.linspace(0, 1, num_inference_steps)).to(torch.float32)
        self.timesteps = self._noise_input(sigmas).to(device)
        last = self.config.sigma_min if self.config.final_sigmas_type == "sigma_min" else 0.0
        self.sigmas = torch.cat([sigmas, torch.tensor([last], dtype=torch.float32)])
        self._step_index = None
        self._begin_index = None
        self._grid(self.sigmas)
        self._reset()

    def _grid(self, sigmas: torch.Tensor) -> None:
        """Per-index float64 ``alpha = 1``, ``sigma``, ``lambda = -log sigma`` of the float32 grid."""
        self._s = sigmas.double().tolist()
        self._plans = grid_plans(self, self._s)
        self._alpha = [1.0] * len(self._s)
        self._sigma = list(self._s)
        self._lam = [-math.log(s) if s > 0.0 else math.inf for s in self._s]

    def _x0_coefs(self, i: int):
        return _edm_x0(self.config, self._s[i])

    def scale_model_input(self, sample: torch.Tensor, timestep=None, *args, **kwargs) -> torch.Tensor:
        """The network input ``c_in(sigma) sample = sample / sqrt(sigma^2 + sigma_data^2)``."""
        return self.scaled_input(sample, timestep, lambda i: _c_in(self.config, self._s[i]))


class CosineDPMSolverMultistepScheduler(EDMDPMSolverMultistepScheduler):
    """SDE-DPM-Solver++ (orders 1-2) on an EDM grid with the "cosine" noise input, diffusers'
    ``CosineDPMSolverMultistepScheduler`` (Stable Audio Open).

    ``EDMDPMSolverMultistepScheduler``'s ``sde-dpmsolver++`` steps (the native
    ``dpm_multistep_coefficients``, ``variant="diffusers"``, ``eta = 1``: ``x' = (sigma'/sigma) e^{-h} x
    + (1 - e^{-2h}) D0 + [correction] + sigma' sqrt(1 - e^{-2h}) z``; Lu et al. 2022b, "DPM-Solver++",
    section 4) with ``timesteps = 2 atan(sigma) / pi`` and z the increments of one Brownian path over
    ``[sigma_min, sigma_max]`` (torchsde's Brownian tree seeded with ``generator.initial_seed()`` as
    diffusers seeds it: ``genflow.compat.k_diffusion.BrownianTreeNoiseSampler``). 1 NFE per step,
    one fused call (plus one materialising the converted output for the next step).
    """

    defaults = dict(sigma_min=0.3, sigma_max=500, sigma_data=1.0, sigma_schedule="exponential",
                    num_train_timesteps=1000, solver_order=2, prediction_type="v_prediction", rho=7.0,
                    solver_type="midpoint", lower_order_final=True, euler_at_final=False, final_sigmas_type="zero")

    def __init__(self, **kwargs):
        Scheduler.__init__(self, **kwargs)  # not the VP tables of MultistepScheduler.__init__
        c = self.config
        _check_edm_config(c)
        if c.solver_type in ("logrho", "bh1", "bh2"):
            self._replace_config(solver_type="midpoint")
        else:
            check_choice("solver_type", c.solver_type, ("midpoint", "heun"))
        if c.solver_order not in (1, 2) or isinstance(c.solver_order, bool):
            raise ValueError(f"solver_order must be 1 or 2 (diffusers has no third-order step here), got "
                             f"{c.solver_order!r}")
        self.noise_sampler = None
        self._training_grid()

    @staticmethod
    def _noise_input(sigmas: torch.Tensor) -> torch.Tensor:
        return sigmas.atan() / math.pi * 2

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """Set the grid as ``EDMDPMSolverMultistepScheduler`` does and forget the Brownian path."""
        super().set_timesteps(num_inference_steps, device)
        self.noise_sampler = None

    def _coefficients(self, i: int, order: int):
        lam = self._lam
        h_prev = [lam[i - j] - lam[i - j - 1] for j in range(order - 1)]
        coefs, scale = dpm_multistep_coefficients(
            lam[i + 1] - lam[i], h_prev, self._alpha[i], self._sigma[i], self._alpha[i + 1], self._sigma[i + 1],
            data_prediction=True, eta=1.0, solver_type=self.config.solver_type, variant="diffusers")
        return coefs[0], coefs[1:], scale

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        """One SDE-DPM-Solver++ step from ``timesteps[step_index]`` to the next grid point.

        Args:
            model_output (Tensor[B, *D]): the network output F on ``scale_model_input(sample)``.
            timestep (float or 0-dim Tensor): the current entry of ``timesteps``.
            sample (Tensor[B, *D]): x at ``timestep``.
            generator (torch.Generator or list, optional): its ``initial_seed()`` seeds the Brownian
                path on the first step (None: a seed drawn from torch's global RNG, as diffusers).
            return_dict (bool): SchedulerOutput if True, else ``(prev_sample,)``.
        """
        i = self._start_step(timestep)
        c = self.config
        order = self._order(i)
        x = sample if sample.dtype == model_output.dtype else sample.to(model_output.dtype)
        view = self._view(model_output, x, i, True, False)
        keep = c.solver_order > 1 and i + 1 < len(self.timesteps)
        if keep:
            view = (self._materialise(x, view, i), 0.0, 1.0)
        self.model_outputs = self.model_outputs[1:] + [view[0] if keep else None]
        if self.noise_sampler is None:
            seed = None
            if generator is not None:
                seed = [g.initial_seed() for g in generator] if isinstance(generator, list) else generator.initial_seed()
            self.noise_sampler = BrownianTreeNoiseSampler(model_output, c.sigma_min, c.sigma_max, seed=seed)
        noise = self.noise_sampler(self.sigmas[i], self.sigmas[i + 1]).to(model_output.device)
        history = [self.model_outputs[-1 - j] for j in range(1, order)]
        prev = self._update(("cosine", i, order), x, x, view, history, lambda: self._coefficients(i, order), noise)
        if self.lower_order_nums < c.solver_order:
            self.lower_order_nums += 1
        self._step_index += 1
        return self._output(prev, return_dict)
