"""diffusers' DPM-Solver schedulers on genflow's fused update: ``DPMSolverMultistepScheduler`` and
``DPMSolverSinglestepScheduler``.

The exponential-integrator weights are the native ones (``genflow.solvers.dpm_solver``'s
``dpm_weights`` and ``dpm_multistep_coefficients``, with ``variant="diffusers"``); this module keeps
diffusers' API, config, grids and the stateful step glue (see ``_multistep.py``).
"""
from __future__ import annotations

import warnings
from typing import Optional

import numpy as np
import torch

from genflow.solvers.dpm_solver import dpm_multistep_coefficients, dpm_weights

from ._base import check_choice, randn_like_diffusers
from ._multistep import MultistepScheduler, flow_sigmas, multistep_timesteps
from ._sigmas import sigma_to_t

__all__ = ["DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler"]

ALGORITHMS = ("dpmsolver", "dpmsolver++", "sde-dpmsolver", "sde-dpmsolver++")
SOLVER_TYPES = ("midpoint", "heun")


def _kind(algorithm: str):
    """``(data_prediction, eta)`` of a diffusers ``algorithm_type``."""
    return algorithm.endswith("++"), 1.0 if algorithm.startswith("sde") else 0.0


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
            timesteps = multistep_timesteps(c.timestep_spacing, steps, c.num_train_timesteps, c.steps_offset, last)
        else:
            timesteps = multistep_timesteps("linspace", steps, c.num_train_timesteps, 0, last)
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

class DPMSolverMultistepScheduler(MultistepScheduler):
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
            view = (self._materialise(x, view, i), 0.0, 1.0)
        self.model_outputs = self.model_outputs[1:] + [view[0] if keep else None]
        noise = None
        if algorithm.startswith("sde"):
            noise = variance_noise if variance_noise is not None else randn_like_diffusers(
                model_output.shape, generator, model_output.device, torch.float32)
        history = [self.model_outputs[-1 - j] for j in range(1, order)]
        prev = self._update(("dpm", i, order), x, x, view, history, lambda: self._coefficients(i, order), noise)
        if self.lower_order_nums < c.solver_order:
            self.lower_order_nums += 1
        self._step_index += 1
        return self._output(prev, return_dict)

    def _coefficients(self, i: int, order: int):
        """``(c_x, [c_m0, c_m1, c_m2][:order], noise_scale)`` of the order-``order`` step from grid index ``i``."""
        lam, (data, eta) = self._lam, _kind(self.config.algorithm_type)
        h_prev = [lam[i - j] - lam[i - j - 1] for j in range(order - 1)]
        coefs, scale = dpm_multistep_coefficients(
            lam[i + 1] - lam[i], h_prev, self._alpha[i], self._sigma[i], self._alpha[i + 1], self._sigma[i + 1],
            data_prediction=data, eta=eta, solver_type=self.config.solver_type, variant="diffusers")
        return coefs[0], coefs[1:], scale


# ---------------------------------------------------------------- singlestep

class DPMSolverSinglestepScheduler(MultistepScheduler):
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
            view = (self._materialise(sample, view, i), 0.0, 1.0)
        self.model_outputs = self.model_outputs[1:] + [view[0] if keep else None]
        noise = None
        if c.algorithm_type == "sde-dpmsolver++":
            noise = randn_like_diffusers(model_output.shape, generator, model_output.device, model_output.dtype)
        order = self.order_list[i]
        while order > 1 and self.model_outputs[-order] is None:
            order -= 1
        if order == 1:
            self.sample = sample
        history = [self.model_outputs[-1 - j] for j in range(1, order)]
        prev = self._update(("dpm", i, order), self.sample, sample, view, history,
                            lambda: self._coefficients(i, order), noise)
        self._step_index += 1
        return self._output(prev, return_dict)

    def _coefficients(self, i: int, order: int):
        """``(c_x, [c_m0, c_m(-1), ..], noise_scale)``: the step from the chunk start ``s = i - order + 1``
        to grid index ``i + 1``; ``m0`` is the output at ``i``, ``m(-j)`` the one at ``i - j``."""
        lam, s = self._lam, i - order + 1
        h = lam[i + 1] - lam[s]
        if h == 0.0:
            return 1.0, [0.0] * order, 0.0
        data, eta = _kind(self.config.algorithm_type)
        cx, w0, w1_mid, w1, w2, scale = dpm_weights(h, self._alpha[s], self._sigma[s], self._alpha[i + 1],
                                                    self._sigma[i + 1], data_prediction=data, eta=eta,
                                                    variant="diffusers")
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
