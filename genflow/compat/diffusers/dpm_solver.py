"""diffusers' DPM-Solver schedulers on genflow's fused update: ``DPMSolverMultistepScheduler`` and
``DPMSolverSinglestepScheduler``.

Both read a DDPM table (``alphas_cumprod``) through VE sigmas ``s = sqrt((1 - abar)/abar)``, with
``alpha = 1/sqrt(1 + s^2)``, ``sigma = s alpha`` (``alpha = 1 - s``, ``sigma = s`` with
``use_flow_sigmas``) and ``lambda = log alpha - log sigma``. A step computes its coefficients in
float64 on the host from the float32 ``sigmas`` table and applies
``x' = c0 x + c1 m0 + c2 m1 + c3 m2 (+ s z)`` with one fused kernel call, where ``m_j`` are the
converted model outputs (data predictions ``x0`` for ``dpmsolver++``, noise predictions ``eps``
for ``dpmsolver``) of the current and the previous steps. The current one is folded into the
coefficients as ``m0 = a x + b model_output``; it is materialised (one more fused call) only when
a later step reads it, or when thresholding needs it.

The private base ``_SigmaScheduler`` here is shared with ``unipc.py`` and ``deis.py``.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional

import numpy as np
import torch

from ._base import (Config, Scheduler, SchedulerOutput, alphas_cumprod_for, beta_sigmas, betas_for, check_choice,
                    check_prediction_type, dynamic_threshold, exponential_sigmas, fused, karras_sigmas,
                    randn_like_diffusers, sigma_to_t)

__all__ = ["DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler"]

SPACINGS = ("linspace", "leading", "trailing")
FINAL_SIGMAS = ("zero", "sigma_min")
PREDICTIONS = ("epsilon", "sample", "v_prediction", "flow_prediction")


def _log(v: float) -> float:
    return math.log(v) if v > 0.0 else -math.inf


def spaced_timesteps(spacing: str, steps: int, num_train: int, steps_offset: int, last: Optional[int] = None):
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


class _SigmaScheduler(Scheduler):
    """Shared part of the DPM-Solver, UniPC and DEIS schedulers (not public).

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
        kind, alpha, sigma = self.config.prediction_type, self._alpha[i], self._sigma[i]
        if kind == "epsilon":
            return 1.0 / alpha, -sigma / alpha
        if kind == "sample":
            return 0.0, 1.0
        if kind == "v_prediction":
            return alpha, -sigma
        return 1.0, -self._s[i]  # flow_prediction: x0 = x - s v, with the table's sigma

    def _eps_coefs(self, i: int):
        """``(a, b)`` with ``eps = a x + b model_output`` at grid index ``i``."""
        kind, alpha, sigma = self.config.prediction_type, self._alpha[i], self._sigma[i]
        if kind == "epsilon":
            return 0.0, 1.0
        if kind == "sample":
            return 1.0 / sigma, -alpha / sigma
        return sigma, alpha  # v_prediction

    def _mean_output(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """The noise prediction of a model that also predicts its variance (``variance_type``
        "learned"/"learned_range"): the first ``C`` channels of ``[B, 2C, ...]``."""
        c = self.config
        if c.get("variance_type") in ("learned", "learned_range") and c.prediction_type == "epsilon":
            return model_output[:, : sample.shape[1]]
        return model_output

    def _threshold(self, x0: torch.Tensor) -> torch.Tensor:
        return dynamic_threshold(x0, ratio=self.config.dynamic_thresholding_ratio,
                                 max_value=self.config.sample_max_value)

    def _view(self, model_output, sample, i, data: bool, threshold: bool):
        """``(term, a, b)`` with the prediction ``x0`` (``data``) or ``eps`` equal to
        ``a sample + b term``; ``threshold`` applies dynamic thresholding to ``x0`` first (then
        ``term`` is the thresholded ``x0``, materialised)."""
        if threshold:
            a0, b0 = self._x0_coefs(i)
            x0 = model_output if (a0, b0) == (0.0, 1.0) else fused(sample, [model_output], [a0, b0])
            x0 = self._threshold(x0)
            if data:
                return x0, 0.0, 1.0
            return x0, 1.0 / self._sigma[i], -self._alpha[i] / self._sigma[i]
        a, b = self._x0_coefs(i) if data else self._eps_coefs(i)
        return model_output, a, b

    @staticmethod
    def _materialise(sample, view) -> torch.Tensor:
        term, a, b = view
        if (a, b) == (0.0, 1.0):
            return term
        return fused(sample, [term], [a, b])

    @staticmethod
    def _update(x, cx, sample, view, history=(), cm=(0.0,), noise_scale=0.0, noise=None) -> torch.Tensor:
        """One fused call ``x' = cx x + cm[0] m0 + sum_j cm[j] history[j-1] + noise_scale z`` with
        ``m0 = a sample + b term`` for ``view = (term, a, b)``; zero coefficients are dropped and
        ``sample`` is folded into ``cx`` when it is ``x``."""
        term, a, b = view
        terms, coefs = [], [cx]

        def add(t, c):
            if c == 0.0:
                return
            if t is x:
                coefs[0] += c
            else:
                terms.append(t)
                coefs.append(c)

        add(term, cm[0] * b)
        if a != 0.0:
            add(sample, cm[0] * a)
        for t, c in zip(history, cm[1:]):
            add(t, c)
        if noise_scale == 0.0:
            return fused(x, terms, coefs)
        return fused(x, terms, coefs, noise_scale, noise=noise)

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


# ---------------------------------------------------------------- DPM-Solver coefficients

ALGORITHMS = ("dpmsolver", "dpmsolver++", "sde-dpmsolver", "sde-dpmsolver++")
SOLVER_TYPES = ("midpoint", "heun")


def _dpm_weights(algorithm, h, alpha_t, sigma_t, alpha_s, sigma_s):
    """``(c_x, w0, w1_mid, w1, w2, noise_scale)`` of a DPM-Solver step of log-SNR length ``h`` from
    ``(alpha_s, sigma_s)`` to ``(alpha_t, sigma_t)``: ``x' = c_x x + w0 D0 + w1 D1 (+ w2 D2) + s z``
    with ``w1_mid`` the midpoint weight of the second-order difference, ``w1`` the Heun/third-order
    one, ``w2`` that of the second difference (diffusers' coefficients, including its
    ``sde-dpmsolver++`` third-order sign: ``(1 - e^{-2h} - 2h)/(2h)^2 - 1/2``). For ``h = inf`` (a step
    to sigma = 0, always first order) the weights of the differences are NaN and unused."""
    if algorithm == "dpmsolver++":  # E = e^{-h} - 1
        E = math.expm1(-h)
        return (sigma_t / sigma_s, -alpha_t * E, -0.5 * alpha_t * E, alpha_t * (E / h + 1.0),
                -alpha_t * ((E + h) / (h * h) - 0.5), 0.0)
    if algorithm == "dpmsolver":  # P = e^{h} - 1
        P = math.expm1(h)
        return (alpha_t / alpha_s, -sigma_t * P, -0.5 * sigma_t * P, -sigma_t * (P / h - 1.0),
                -sigma_t * ((P - h) / (h * h) - 0.5), 0.0)
    if algorithm == "sde-dpmsolver++":  # Q = 1 - e^{-2h}
        Q = -math.expm1(-2.0 * h)
        return (sigma_t / sigma_s * math.exp(-h), alpha_t * Q, 0.5 * alpha_t * Q, alpha_t * (Q / (-2.0 * h) + 1.0),
                alpha_t * ((Q - 2.0 * h) / (4.0 * h * h) - 0.5), sigma_t * math.sqrt(Q))
    P = math.expm1(h)  # sde-dpmsolver
    return (alpha_t / alpha_s, -2.0 * sigma_t * P, -sigma_t * P, -2.0 * sigma_t * (P / h - 1.0), None,
            sigma_t * math.sqrt(math.expm1(2.0 * h)))


def _check_dpm_config(config, singlestep: bool):
    """Validate and normalise a DPM-Solver config; returns the fields to replace."""
    fields = {}
    algorithm, solver_type = config.algorithm_type, config.solver_type
    algorithms = ("dpmsolver", "dpmsolver++", "sde-dpmsolver++") if singlestep else ALGORITHMS
    if algorithm == "deis":  # a DEIS config swapped in (from_config): diffusers' mapping
        algorithm = fields["algorithm_type"] = "dpmsolver++"
    check_choice("algorithm_type", algorithm, algorithms)
    if solver_type in ("logrho", "bh1", "bh2"):  # a DEIS or UniPC config swapped in
        fields["solver_type"] = "midpoint"
    else:
        check_choice("solver_type", solver_type, SOLVER_TYPES)
    if algorithm in ("dpmsolver", "sde-dpmsolver") and config.final_sigmas_type == "zero":
        raise ValueError(f"final_sigmas_type='zero' needs algorithm_type 'dpmsolver++' or 'sde-dpmsolver++' (a "
                         f"noise-prediction step to sigma = 0 is undefined), got algorithm_type={algorithm!r}; "
                         "use final_sigmas_type='sigma_min'")
    if algorithm in ("dpmsolver", "sde-dpmsolver") and config.prediction_type == "flow_prediction":
        raise ValueError(f"prediction_type='flow_prediction' needs algorithm_type 'dpmsolver++' or "
                         f"'sde-dpmsolver++', got algorithm_type={algorithm!r}")
    if algorithm == "sde-dpmsolver" and config.solver_order == 3:
        raise ValueError("algorithm_type='sde-dpmsolver' supports solver_order 1 or 2 (diffusers has no "
                         "third-order sde-dpmsolver update), got solver_order=3")
    check_choice("variance_type", config.variance_type, (None, "learned", "learned_range"))
    return fields


def _dpm_set_timesteps(self, num_inference_steps, device, timesteps, *, spacing: bool):
    """The timestep and sigma grids of the DPM-Solver schedulers (``spacing``: the multistep
    scheduler's ``timestep_spacing`` and ``use_lu_lambdas``; the singlestep one spaces linearly)."""
    c = self.config
    if (num_inference_steps is None) == (timesteps is None):
        raise ValueError("pass exactly one of num_inference_steps or timesteps, got "
                         f"num_inference_steps={num_inference_steps!r} and timesteps={timesteps!r}")
    if timesteps is not None:
        for name in ("use_karras_sigmas", "use_lu_lambdas", "use_exponential_sigmas", "use_beta_sigmas"):
            if c.get(name):
                raise ValueError(f"timesteps cannot be combined with {name}=True")
        timesteps = np.array(timesteps).astype(np.int64)
        steps = len(timesteps)
    else:
        steps = num_inference_steps
        clipped = int(torch.searchsorted(torch.flip(self.lambda_t, [0]), c.lambda_min_clipped))
        last = c.num_train_timesteps - clipped
        if spacing:
            timesteps = spaced_timesteps(c.timestep_spacing, steps, c.num_train_timesteps, c.steps_offset, last)
        else:
            timesteps = spaced_timesteps("linspace", steps, c.num_train_timesteps, 0, last)
    table = self._train_sigmas()
    keep_fraction = spacing and c.beta_schedule == "squaredcos_cap_v2"  # diffusers does not round there
    if c.use_karras_sigmas:
        sigmas, timesteps = self._converted("karras", steps)
        timesteps = timesteps if keep_fraction else timesteps.round()
    elif spacing and c.use_lu_lambdas:
        lam = np.flip(np.log(table)).copy()  # log-sigma, decreasing; uniform steps between its ends
        sigmas = np.exp(lam[0] + np.linspace(0, 1, steps) * (lam[-1] - lam[0]))
        timesteps = sigma_to_t(sigmas, np.log(table))
        timesteps = timesteps if keep_fraction else timesteps.round()
    elif c.use_exponential_sigmas:
        sigmas, timesteps = self._converted("exponential", steps)
    elif c.use_beta_sigmas:
        sigmas, timesteps = self._converted("beta", steps)
    elif c.use_flow_sigmas:
        sigmas = flow_sigmas(steps, c.num_train_timesteps, c.flow_shift)
        timesteps = sigmas * c.num_train_timesteps
    else:
        sigmas = np.interp(timesteps, np.arange(0, len(table)), table)
    last_sigma = self._sigma_min_train() if c.final_sigmas_type == "sigma_min" else 0.0
    self._finish(timesteps, np.concatenate([sigmas, [last_sigma]]), device)


# ---------------------------------------------------------------- multistep

class DPMSolverMultistepScheduler(_SigmaScheduler):
    """diffusers' ``DPMSolverMultistepScheduler``: multistep DPM-Solver / DPM-Solver++ on a DDPM table.

    With ``h = lambda' - lambda``, ``r_0 = h_{-1}/h``, ``r_1 = h_{-2}/h`` (earlier steps' log-SNR
    lengths), ``D0 = m0``, ``D1_0 = (m0 - m1)/r_0``, ``D1_1 = (m1 - m2)/r_1``, the step of order k is

    * ``dpmsolver++`` (data prediction ``m = x0``, Lu et al. 2022b, "DPM-Solver++", eqs. 8-9 and
      Algorithm 2): ``x' = (sigma'/sigma) x - alpha' (e^{-h} - 1) D0 + [correction]``;
    * ``dpmsolver`` (noise prediction, Lu et al. 2022a, "DPM-Solver", §3.3 and Algorithm 3):
      ``x' = (alpha'/alpha) x - sigma' (e^h - 1) D0 + [correction]``;
    * ``sde-dpmsolver++`` (Lu et al. 2022b, §4 / eq. 18 with noise): ``x' = (sigma'/sigma) e^{-h} x
      + alpha' (1 - e^{-2h}) D0 + [correction] + sigma' sqrt(1 - e^{-2h}) z``;
    * ``sde-dpmsolver``: ``x' = (alpha'/alpha) x - 2 sigma' (e^h - 1) D0 + [correction]
      + sigma' sqrt(e^{2h} - 1) z`` (orders 1 and 2);

    where the second-order correction is the ``midpoint`` (``-alpha' (e^{-h} - 1)/2 D1_0`` for
    ``dpmsolver++``) or ``heun`` (``alpha' ((e^{-h} - 1)/h + 1) D1_0``) one and the third order adds
    ``D1 = D1_0 + r_0/(r_0 + r_1) (D1_0 - D1_1)`` and ``D2 = (D1_0 - D1_1)/(r_0 + r_1)`` with
    diffusers' weights (``D2`` weighted by ``phi_3``, the reference implementation's choice; see
    genflow's ``dpmpp_3m(variant="reference")``). Orders rise 1, 2, 3 while the history fills;
    ``lower_order_final`` makes the last step first order and the one before at most second order
    on grids of fewer than 15 steps; a last step to sigma = 0 (``final_sigmas_type="zero"``) or with
    ``euler_at_final`` is first order. 1 NFE per step; each step is one fused call (plus one that
    materialises ``m0`` when a later step reads it).

    Config fields, defaults and ``set_timesteps`` / ``step`` arguments are diffusers 0.42's.
    """

    defaults = dict(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
        solver_order=2, prediction_type="epsilon", thresholding=False, dynamic_thresholding_ratio=0.995,
        sample_max_value=1.0, algorithm_type="dpmsolver++", solver_type="midpoint", lower_order_final=True,
        euler_at_final=False, use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
        use_lu_lambdas=False, use_flow_sigmas=False, flow_shift=1.0, final_sigmas_type="zero",
        lambda_min_clipped=-float("inf"), variance_type=None, timestep_spacing="linspace", steps_offset=0,
        rescale_betas_zero_snr=False, use_dynamic_shifting=False, time_shift_type="exponential",
    )

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        fields = _check_dpm_config(self.config, singlestep=False)
        if fields:
            self._replace_config(**fields)

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None, mu: Optional[float] = None,
                      timesteps=None) -> None:
        """Build the inference grid: ``num_inference_steps`` spaced by ``timestep_spacing`` (or the
        Karras / Lu / exponential / beta / flow sigmas of the config) or explicit integer
        ``timesteps``; ``sigmas`` gets the final sigma (0 or the table's smallest) appended.
        ``mu`` sets ``flow_shift = exp(mu)`` (``use_dynamic_shifting``)."""
        self._mu_shift(mu)
        _dpm_set_timesteps(self, num_inference_steps, device, timesteps, spacing=True)

    def _order(self, i: int) -> int:
        c, n = self.config, len(self.timesteps)
        final = i == n - 1 and (c.euler_at_final or (c.lower_order_final and n < 15) or c.final_sigmas_type == "zero")
        second = i == n - 2 and c.lower_order_final and n < 15
        if c.solver_order == 1 or self.lower_order_nums < 1 or final:
            return 1
        if c.solver_order == 2 or self.lower_order_nums < 2 or second:
            return 2
        return 3

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             variance_noise: Optional[torch.Tensor] = None, return_dict: bool = True):
        """One multistep DPM-Solver step from ``timesteps[step_index]`` to the next grid point.

        Args:
            model_output (Tensor[B, *D]): the network output at ``(sample, timestep)``.
            timestep (int or Tensor): the current entry of ``timesteps``.
            sample (Tensor[B, *D]): x at ``timestep``.
            generator (torch.Generator or list, optional): for the SDE variants' noise.
            variance_noise (Tensor[B, *D], optional): the SDE variants' noise z itself.
            return_dict (bool): SchedulerOutput if True, else ``(prev_sample,)``.

        Returns:
            SchedulerOutput or tuple: ``prev_sample`` (Tensor[B, *D], model_output's dtype).
        """
        i = self._start_step(timestep)
        c = self.config
        algorithm = c.algorithm_type
        order = self._order(i)
        x = sample if sample.dtype == model_output.dtype else sample.to(model_output.dtype)
        out = self._mean_output(model_output, x)
        view = self._view(out, x, i, algorithm.endswith("++"), c.thresholding)
        keep = c.solver_order > 1 and i + 1 < len(self.timesteps)
        if keep:
            view = (self._materialise(x, view), 0.0, 1.0)
        self.model_outputs = self.model_outputs[1:] + [view[0] if keep else None]
        noise = None
        if algorithm.startswith("sde"):
            noise = variance_noise if variance_noise is not None else randn_like_diffusers(
                model_output.shape, generator, model_output.device, torch.float32)
        cx, cm, scale = self._coefficients(i, order)
        history = [self.model_outputs[-1 - j] for j in range(1, order)]
        prev = self._update(x, cx, x, view, history, cm, scale, noise)
        if self.lower_order_nums < c.solver_order:
            self.lower_order_nums += 1
        self._step_index += 1
        return self._output(prev, return_dict)

    def _coefficients(self, i: int, order: int):
        """``(c_x, [c_m0, c_m1, c_m2][:order], noise_scale)`` of the order-``order`` step from grid index ``i``."""
        lam = self._lam
        h = lam[i + 1] - lam[i]
        if h == 0.0:  # a zero-length step (e.g. Karras grid ending at the table's sigma_min): x' = x
            return 1.0, [0.0] * order, 0.0
        cx, w0, w1_mid, w1, w2, scale = _dpm_weights(self.config.algorithm_type, h, self._alpha[i + 1],
                                                     self._sigma[i + 1], self._alpha[i], self._sigma[i])
        if order == 1:
            return cx, [w0], scale
        r0 = (lam[i] - lam[i - 1]) / h
        if order == 2:
            w = w1_mid if self.config.solver_type == "midpoint" else w1
            return cx, [w0 + w / r0, -w / r0], scale
        r1 = (lam[i - 1] - lam[i - 2]) / h
        d10 = [1.0 / r0, -1.0 / r0, 0.0]
        d11 = [0.0, 1.0 / r1, -1.0 / r1]
        diff = [a - b for a, b in zip(d10, d11)]
        d1 = [a + r0 / (r0 + r1) * d for a, d in zip(d10, diff)]
        d2 = [d / (r0 + r1) for d in diff]
        return cx, [w0 * (j == 0) + w1 * a + w2 * b for j, (a, b) in enumerate(zip(d1, d2))], scale


# ---------------------------------------------------------------- singlestep

class DPMSolverSinglestepScheduler(_SigmaScheduler):
    """diffusers' ``DPMSolverSinglestepScheduler``: singlestep DPM-Solver / DPM-Solver++ whose
    intermediate evaluations are grid points.

    The grid is cut into chunks by ``order_list`` (e.g. ``[1, 2, 1, 2, ...]`` for order 2): a chunk
    of order k starts at ``x_s`` (grid index ``s``) and its j-th step goes from ``x_s`` straight to
    grid point ``s + j`` with order j, using the model outputs at ``s .. s + j - 1``
    (Lu et al. 2022a, Algorithms 1-2; Lu et al. 2022b, Algorithm 1, with the intermediate times on
    the grid). With ``h = lambda' - lambda_s`` and ``r_k = (lambda_{s+k} - lambda_s)/h``:
    order 2: ``D0 = m_s``, ``D1 = (m_{s+1} - m_s)/r_1``; order 3: ``D0 = m_s``,
    ``D1_1 = (m_{s+2} - m_s)/r_2`` (``midpoint``) or ``D1 = (r_2 D1_0 - r_1 D1_1)/(r_2 - r_1)``,
    ``D2 = 2 (D1_1 - D1_0)/(r_2 - r_1)`` with ``D1_0 = (m_{s+1} - m_s)/r_1`` (``heun``), and the
    same exponential-integrator weights as ``DPMSolverMultistepScheduler`` (``dpmsolver``,
    ``dpmsolver++``, ``sde-dpmsolver++``). 1 NFE per step, one fused call per step (plus one that
    materialises the converted output for the chunk's later steps).
    """

    defaults = dict(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
        solver_order=2, prediction_type="epsilon", thresholding=False, dynamic_thresholding_ratio=0.995,
        sample_max_value=1.0, algorithm_type="dpmsolver++", solver_type="midpoint", lower_order_final=False,
        use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False, use_flow_sigmas=False,
        flow_shift=1.0, final_sigmas_type="zero", lambda_min_clipped=-float("inf"), variance_type=None,
        use_dynamic_shifting=False, time_shift_type="exponential",
    )

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        fields = _check_dpm_config(self.config, singlestep=True)
        if fields:
            self._replace_config(**fields)
        self.order_list = self.get_order_list(self.config.num_train_timesteps)

    def _reset(self) -> None:
        super()._reset()
        self.sample = None

    def get_order_list(self, num_inference_steps: int) -> list:
        """The order of each step: repeated chunks ``1, 2, .., solver_order``; with
        ``lower_order_final`` the tail is a shorter chunk (``[.., 1, 1]`` for order 2 on an even
        number of steps); a last step to sigma = 0 is first order."""
        steps, order = num_inference_steps, self.config.solver_order
        if self.config.lower_order_final:
            if order == 3:
                tail = {0: [1, 2, 1], 1: [1], 2: [1, 2]}[steps % 3]
                orders = [1, 2, 3] * (steps // 3 - (steps % 3 == 0)) + tail
            elif order == 2:
                orders = [1, 2] * (steps // 2 - 1) + [1, 1] if steps % 2 == 0 else [1, 2] * (steps // 2) + [1]
            else:
                orders = [1] * steps
        else:
            orders = [k for _ in range(steps // order) for k in range(1, order + 1)]
        if self.config.final_sigmas_type == "zero" and orders:
            orders[-1] = 1
        return orders

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None, mu: Optional[float] = None,
                      timesteps=None) -> None:
        """Build the inference grid (linear spacing, or the Karras / exponential / beta / flow sigmas
        of the config, or explicit ``timesteps``) and the ``order_list``. As diffusers, a number
        of steps that the order does not divide, or a final sigma of 0, switches
        ``lower_order_final`` on in the config (with a warning)."""
        self._mu_shift(mu)
        _dpm_set_timesteps(self, num_inference_steps, device, timesteps, spacing=False)
        steps = len(self.timesteps)
        if not self.config.lower_order_final and steps % self.config.solver_order != 0:
            warnings.warn(f"{steps} steps are not a multiple of solver_order={self.config.solver_order}: setting "
                          "lower_order_final=True", stacklevel=2)
            self._replace_config(lower_order_final=True)
        if not self.config.lower_order_final and self.config.final_sigmas_type == "zero":
            warnings.warn("final_sigmas_type='zero' needs lower_order_final=True: setting it", stacklevel=2)
            self._replace_config(lower_order_final=True)
        self.order_list = self.get_order_list(steps)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        """One singlestep DPM-Solver step to the next grid point (from the start of the chunk).

        Args:
            model_output (Tensor[B, *D]): the network output at ``(sample, timestep)``.
            timestep (int or Tensor): the current entry of ``timesteps``.
            sample (Tensor[B, *D]): x at ``timestep``.
            generator (torch.Generator or list, optional): for ``sde-dpmsolver++``'s noise.
            return_dict (bool): SchedulerOutput if True, else ``(prev_sample,)``.

        Returns:
            SchedulerOutput or tuple: ``prev_sample`` (Tensor[B, *D]).
        """
        i = self._start_step(timestep)
        c = self.config
        out = self._mean_output(model_output, sample)
        view = self._view(out, sample, i, c.algorithm_type.endswith("++"), c.thresholding)
        keep = c.solver_order > 1 and i + 1 < len(self.timesteps)
        if keep:
            view = (self._materialise(sample, view), 0.0, 1.0)
        self.model_outputs = self.model_outputs[1:] + [view[0] if keep else None]
        noise = None
        if c.algorithm_type == "sde-dpmsolver++":
            noise = randn_like_diffusers(model_output.shape, generator, model_output.device, model_output.dtype)
        order = self.order_list[i]
        while order > 1 and self.model_outputs[-order] is None:
            order -= 1
        if order == 1:
            self.sample = sample
        cx, cm, scale = self._coefficients(i, order)
        history = [self.model_outputs[-1 - j] for j in range(1, order)]
        prev = self._update(self.sample, cx, sample, view, history, cm, scale, noise)
        self._step_index += 1
        return self._output(prev, return_dict)

    def _coefficients(self, i: int, order: int):
        """``(c_x, [c_m0, c_m(-1), ..], noise_scale)``: the step from the chunk start ``s = i - order + 1``
        to grid index ``i + 1``; ``m0`` is the output at ``i``, ``m(-j)`` the one at ``i - j``."""
        lam, s = self._lam, i - order + 1
        h = lam[i + 1] - lam[s]
        if h == 0.0:
            return 1.0, [0.0] * order, 0.0
        cx, w0, w1_mid, w1, w2, scale = _dpm_weights(self.config.algorithm_type, h, self._alpha[i + 1],
                                                     self._sigma[i + 1], self._alpha[s], self._sigma[s])
        if order == 1:
            return cx, [w0], scale
        if order == 2:  # D0 = m_s = m(-1), D1 = (m0 - m(-1))/r
            r = (lam[i] - lam[s]) / h
            w = w1_mid if self.config.solver_type == "midpoint" else w1
            return cx, [w / r, w0 - w / r], scale
        r_near, r_far = (lam[i - 1] - lam[s]) / h, (lam[i] - lam[s]) / h  # r_1, r_2
        d10 = [-1.0 / r_near, 1.0 / r_near, 0.0]  # over [m_s, m_{s+1}, m_{s+2}]
        d11 = [-1.0 / r_far, 0.0, 1.0 / r_far]
        if self.config.solver_type == "midpoint":
            c = [w0 + w1 * d11[0], 0.0, w1 * d11[2]]
        else:
            d1 = [(r_far * a - r_near * b) / (r_far - r_near) for a, b in zip(d10, d11)]
            d2 = [2.0 * (b - a) / (r_far - r_near) for a, b in zip(d10, d11)]
            c = [w0 * (j == 0) + w1 * a + w2 * b for j, (a, b) in enumerate(zip(d1, d2))]
        return cx, [c[2], c[1], c[0]], scale
