"""The shared base of diffusers' multistep exponential-integrator schedulers (DPM-Solver
multistep and singlestep, UniPC, DEIS): tables, grids, model-output views and the fused update.

They read a DDPM table (``alphas_cumprod``) through VE sigmas ``s = sqrt((1 - abar)/abar)``, with
``alpha = 1/sqrt(1 + s^2)``, ``sigma = s alpha`` (``alpha = 1 - s``, ``sigma = s`` with
``use_flow_sigmas``) and ``lambda = log alpha - log sigma``. A step's coefficients come from the
native solvers' coefficient functions (``genflow.solvers.dpm_solver``, ``unipc``, ``deis``) in
float64 on the host; the update ``x' = c0 x + c1 m0 + c2 m1 + c3 m2 (+ s z)`` is one fused kernel
call, where ``m_j`` are the converted model outputs of the current and the previous steps. The
current one is folded into the coefficients as ``m0 = a x + b model_output`` and materialised (one
more fused call) only when a later step reads it, or when thresholding needs it.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from genflow.ownership import OutputOwnership
from genflow.solvers.base import dynamic_threshold

from ._base import (Config, Scheduler, SchedulerOutput, alphas_cumprod_for, betas_for, check_choice,
                    check_prediction_type, fused, fused_planned, grid_plans, pack, x0_eps_coefficients)
from ._sigmas import beta_sigmas, exponential_sigmas, karras_sigmas, sigma_to_t

__all__ = ["MultistepScheduler", "multistep_timesteps", "flow_sigmas"]

SPACINGS = ("linspace", "leading", "trailing")
FINAL_SIGMAS = ("zero", "sigma_min")
PREDICTIONS = ("epsilon", "sample", "v_prediction", "flow_prediction")


def _log(v: float) -> float:
    return math.log(v) if v > 0.0 else -math.inf


def multistep_timesteps(spacing: str, steps: int, num_train: int, steps_offset: int, last: Optional[int] = None):
    """Integer timesteps (np.int64 [steps], decreasing) for diffusers' ``timestep_spacing``
    (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Table 2):
    ``"linspace"`` rounds ``linspace(0, last - 1, steps + 1)`` and drops 0, ``"leading"`` takes
    multiples of ``last // (steps + 1)`` plus ``steps_offset``, ``"trailing"`` counts down from
    ``last`` by ``num_train / steps`` and subtracts 1. ``last`` (default ``num_train``) is one past
    the largest timestep."""
    check_choice("timestep_spacing", spacing, SPACINGS)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"num_inference_steps must be an int >= 1, got {steps!r}")
    last = num_train if last is None else last
    if spacing == "linspace":
        return np.linspace(0, last - 1, steps + 1).round()[::-1][:-1].copy().astype(np.int64)
    if spacing == "leading":
        ratio = last // (steps + 1)
        return (np.arange(0, steps + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64) + steps_offset
    ratio = num_train / steps
    return np.arange(last, 0, -ratio).round().copy().astype(np.int64) - 1


def flow_sigmas(steps: int, num_train: int, shift: float) -> np.ndarray:
    """Shifted flow-matching sigmas ``shift s / (1 + (shift - 1) s)`` of ``s`` uniform in
    ``[1/N, 1]`` (float64 [steps], decreasing), as the DPM-Solver and DEIS schedulers build them."""
    s = 1.0 - np.linspace(1, 1 / num_train, steps + 1)
    return np.flip(shift * s / (1 + (shift - 1) * s))[:-1].copy()


class MultistepScheduler(Scheduler):
    """Shared part of the DPM-Solver, UniPC and DEIS schedulers.

    Holds diffusers' tables (``betas``, ``alphas``, ``alphas_cumprod``, ``alpha_t``, ``sigma_t``,
    ``lambda_t``, ``sigmas``, ``timesteps``; float32 as diffusers), the per-step float64 ``alpha``,
    ``sigma`` and ``lambda`` of the inference grid, the model-output conversions and the
    sigma-based ``add_noise``.
    """

    prediction_types = PREDICTIONS

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        c = self.config
        check_prediction_type(c.prediction_type, self.prediction_types)
        if c.solver_order not in (1, 2, 3) or isinstance(c.solver_order, bool):
            raise ValueError(f"solver_order must be 1, 2 or 3, got {c.solver_order!r}")
        chosen = [k for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas") if c.get(k)]
        if len(chosen) > 1:
            raise ValueError(f"use_karras_sigmas, use_exponential_sigmas and use_beta_sigmas are exclusive, got "
                             f"{' and '.join(chosen)} set")
        if "timestep_spacing" in c:
            check_choice("timestep_spacing", c.timestep_spacing, SPACINGS)
        if "final_sigmas_type" in c:
            check_choice("final_sigmas_type", c.final_sigmas_type, FINAL_SIGMAS)
        self.betas = betas_for(c).float()
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = alphas_cumprod_for(c).float()
        if c.get("rescale_betas_zero_snr"):
            self.alphas_cumprod[-1] = 2.0 ** -24  # as diffusers: the first sigma stays finite
        self.alpha_t = torch.sqrt(self.alphas_cumprod)
        self.sigma_t = torch.sqrt(1 - self.alphas_cumprod)
        self.lambda_t = torch.log(self.alpha_t) - torch.log(self.sigma_t)
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        n = c.num_train_timesteps
        self.timesteps = torch.from_numpy(np.linspace(0, n - 1, n, dtype=np.float32)[::-1].copy())
        self.init_noise_sigma = 1.0
        self._grid(self.sigmas)
        self._reset()

    def _replace_config(self, **fields) -> None:
        """diffusers' ``register_to_config`` for the fields a scheduler changes itself."""
        self.config = Config({**self.config, **fields})

    def _reset(self) -> None:
        """Forget the solver state (history, counters); subclasses extend it."""
        self.model_outputs = [None] * self.config.solver_order
        self.lower_order_nums = 0
        self.ownership = OutputOwnership()  # the history never holds memory the model reuses

    # -- grids ------------------------------------------------------------------------------
    def _train_sigmas(self) -> np.ndarray:
        """The training table's VE sigmas (float32 [N], increasing), as diffusers takes them."""
        return (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).numpy()

    def _sigma_min_train(self) -> float:
        """The table's smallest sigma ``sqrt((1 - abar_0)/abar_0)`` (diffusers' ``"sigma_min"``)."""
        return float(((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0]) ** 0.5)

    def _converted(self, kind: str, steps: int, *, sigma_min=None, sigma_max=None, table=None):
        """``(sigmas, fractional timesteps)`` of the ``kind`` ("karras", "exponential", "beta")
        grid between the ends of ``table`` (increasing sigmas, default the training table's) or
        ``sigma_min``/``sigma_max``; the timesteps interpolate ``log table``."""
        table = self._train_sigmas() if table is None else table
        convert = {"karras": karras_sigmas, "exponential": exponential_sigmas, "beta": beta_sigmas}[kind]
        sigmas = convert(np.flip(table).copy(), steps, sigma_min=sigma_min, sigma_max=sigma_max)
        return sigmas, sigma_to_t(sigmas, np.log(table))

    def _finish(self, timesteps, sigmas, device) -> None:
        """Store ``timesteps`` (int64 on ``device``) and ``sigmas`` (float32 CPU, last entry
        the final sigma), reset the step state and tabulate the step coefficients' inputs."""
        self.sigmas = torch.from_numpy(np.asarray(sigmas).astype(np.float32))
        self.timesteps = torch.from_numpy(np.asarray(timesteps)).to(device=device, dtype=torch.int64)
        self.num_inference_steps = len(self.timesteps)
        self._step_index = None
        self._begin_index = None
        self._grid(self.sigmas)
        self._reset()

    def _grid(self, sigmas: torch.Tensor) -> None:
        """Per-index float64 ``alpha``, ``sigma``, ``lambda`` of the float32 ``sigmas`` table."""
        self._s = sigmas.double().tolist()
        self._plans = grid_plans(self, self._s)
        flow = self.config.get("use_flow_sigmas", False)
        self._alpha, self._sigma, self._lam = [], [], []
        for s in self._s:
            if flow:
                alpha, sigma = 1.0 - s, s
            else:
                alpha = 1.0 / math.sqrt(s * s + 1.0)
                sigma = s * alpha
            self._alpha.append(alpha)
            self._sigma.append(sigma)
            self._lam.append(_log(alpha) - _log(sigma))

    def _mu_shift(self, mu) -> None:
        """``set_timesteps(mu=...)``: ``flow_shift = exp(mu)`` (kept in the config, as diffusers)."""
        if mu is None:
            return
        if not self.config.use_dynamic_shifting or self.config.time_shift_type != "exponential":
            raise ValueError("mu needs use_dynamic_shifting=True and time_shift_type='exponential', got "
                             f"use_dynamic_shifting={self.config.use_dynamic_shifting!r} and "
                             f"time_shift_type={self.config.time_shift_type!r}")
        self._replace_config(flow_shift=float(np.exp(mu)))

    # -- model outputs ----------------------------------------------------------------------
    def _x0_coefs(self, i: int):
        """``(a, b)`` with ``x0 = a x + b model_output`` at grid index ``i``."""
        if self.config.prediction_type == "flow_prediction":
            return 1.0, -self._s[i]  # x0 = x - s v, with the table's sigma
        return x0_eps_coefficients(self.config.prediction_type, self._alpha[i], self._sigma[i])[0]

    def _eps_coefs(self, i: int):
        """``(a, b)`` with ``eps = a x + b model_output`` at grid index ``i``."""
        return x0_eps_coefficients(self.config.prediction_type, self._alpha[i], self._sigma[i])[1]

    def _mean_output(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """The noise prediction of a model that also predicts its variance (``variance_type``
        "learned"/"learned_range"): the first ``C`` channels of ``[B, 2C, ...]``."""
        c = self.config
        if c.get("variance_type") in ("learned", "learned_range") and c.prediction_type == "epsilon":
            return model_output[:, : sample.shape[1]]
        return model_output

    def _view(self, model_output, sample, i, data: bool, threshold: bool):
        """``(term, a, b)`` with the prediction ``x0`` (``data``) or ``eps`` equal to
        ``a sample + b term``; ``threshold`` applies dynamic thresholding to ``x0`` first (then
        ``term`` is the thresholded ``x0``, materialised). The view is for this step's updates;
        what the history keeps is ``_materialise``d (and so owned)."""
        if threshold:
            a0, b0 = self._x0_coefs(i)
            x0 = model_output if (a0, b0) == (0.0, 1.0) else fused(sample, [model_output], [a0, b0])
            x0 = dynamic_threshold(x0, self.config.dynamic_thresholding_ratio, self.config.sample_max_value)
            if data:
                return x0, 0.0, 1.0
            return x0, 1.0 / self._sigma[i], -self._alpha[i] / self._sigma[i]
        a, b = self._x0_coefs(i) if data else self._eps_coefs(i)
        return model_output, a, b

    def _materialise(self, sample, view, i: int) -> torch.Tensor:
        """The prediction ``a sample + b term`` of ``view = (term, a, b)`` at grid index ``i`` as a tensor
        the scheduler owns, for its history: a new tensor, or ``term`` itself when it is the
        prediction, owned (``genflow.ownership``: copied when it is memory the model reuses)."""
        term, a, b = view
        if (a, b) == (0.0, 1.0):
            return self.ownership.own(term, sample, lambda: f"{type(self).__name__}.step")
        plan = self._plans.get(("m", i, a, b))
        if plan is None:
            plan = self._plans[("m", i, a, b)] = pack([a, b])
        return fused_planned(sample, [term], plan)

    def _update(self, key, x, sample, view, history, coefficients, noise=None) -> torch.Tensor:
        """One fused call ``x' = cx x + cm[0] m0 + sum_j cm[j] history[j-1] + noise_scale z`` with
        ``m0 = a sample + b term`` for ``view = (term, a, b)`` and ``(cx, cm, noise_scale) =
        coefficients()``; ``sample`` is folded into ``cx`` when it is ``x``. Noise-free coefficients
        depend on the grid and ``key`` alone: they are computed and packed once per grid."""
        term, a, b = view
        terms = [term, sample, *history]
        key = (key, sample is x, a, b)
        plan = self._plans.get(key)
        if plan is None:
            cx, cm, noise_scale = coefficients()
            coefs = [cx, cm[0] * b, cm[0] * a, *cm[1:]]
            if sample is x:
                coefs[0], coefs[2] = coefs[0] + coefs[2], 0.0
            if noise_scale != 0.0:
                return fused(x, terms, coefs, noise_scale, noise=noise)
            plan = self._plans[key] = pack(coefs)
        return fused_planned(x, terms, plan)

    # -- bookkeeping and forward noising -------------------------------------------------------
    def index_for_timestep(self, timestep, schedule_timesteps: Optional[torch.Tensor] = None) -> int:
        """The index of ``timestep`` in ``schedule_timesteps`` (default ``self.timesteps``): the
        second match when it occurs twice, the last index when it does not occur (diffusers'
        rule for these schedulers)."""
        if schedule_timesteps is None:
            schedule_timesteps = self.timesteps
        if isinstance(timestep, torch.Tensor):
            timestep = timestep.to(schedule_timesteps.device)
        indices = (schedule_timesteps == timestep).nonzero()
        if len(indices) == 0:
            return len(self.timesteps) - 1
        return int(indices[1 if len(indices) > 1 else 0].item())

    def _start_step(self, timestep) -> int:
        if self.num_inference_steps is None:
            raise ValueError("num_inference_steps is None: call set_timesteps before step")
        if self._step_index is None:
            self._init_step_index(timestep)
        return self._step_index

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """``x_t = alpha_t x0 + sigma_t noise`` at the inference grid's sigma for each timestep.

        The index is looked up in ``timesteps`` (image-to-image before the first step uses
        ``begin_index``, inpainting after it the current ``step_index``), as diffusers does.

        Args:
            original_samples (Tensor[B, *D]): x0.
            noise (Tensor[B, *D]): eps.
            timesteps (int or Tensor[B] or Tensor[1]): entries of ``self.timesteps``.

        Returns:
            Tensor[B, *D]: x_t.
        """
        t = torch.as_tensor(timesteps).reshape(-1)
        if self._begin_index is None:
            schedule = self.timesteps.to(t.device)
            indices = [self.index_for_timestep(v, schedule) for v in t]
        else:
            indices = [self._step_index if self._step_index is not None else self._begin_index] * t.shape[0]
        alphas = [self._alpha[i] for i in indices]
        sigmas = [self._sigma[i] for i in indices]
        if len(indices) == 1:
            return fused(original_samples, [noise], [alphas[0], sigmas[0]])
        batch = original_samples.shape[0]
        if len(indices) != batch:
            raise ValueError(f"timesteps must hold one value or one per sample (B = {batch}), got {len(indices)}")
        coefs = [torch.tensor(v, dtype=torch.float64) for v in (alphas, sigmas)]
        return fused(original_samples, [noise], coefs)

    @staticmethod
    def _output(prev_sample, return_dict):
        return SchedulerOutput(prev_sample) if return_dict else (prev_sample,)
