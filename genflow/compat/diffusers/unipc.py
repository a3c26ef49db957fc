"""diffusers' ``UniPCMultistepScheduler`` on genflow's fused update."""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from genflow.solvers.unipc import VARIANTS, unipc_coefficients

from ._base import check_choice
from ._multistep import MultistepScheduler, multistep_timesteps

__all__ = ["UniPCMultistepScheduler"]


class UniPCMultistepScheduler(MultistepScheduler):
    """diffusers' ``UniPCMultistepScheduler``: the UniP-p predictor with the UniC-p corrector.

    Zhao et al. (2023), "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
    Diffusion Models", Algorithms 1-3 (B(h) form). With ``h = lambda' - lambda``, ``hh = -h`` and
    ``m = x0`` (``predict_x0=True``) or ``hh = h`` and ``m = eps``, ``r_j = (lambda_{-j} - lambda)/h``,
    ``D_j = (m_{-j} - m0)/r_j``, the predictor is
    ``x' = R x - M (e^{hh} - 1) m0 - M B(h) sum_j rho_j D_j`` with ``R, M = sigma'/sigma, alpha'``
    (data) or ``alpha'/alpha, sigma'`` (noise), ``B(h) = hh`` (``bh1``) or ``e^{hh} - 1`` (``bh2``)
    and ``rho`` solving ``sum_j rho_j r_j^(k-1) = phi_{k+1}(hh) k! / B(h)`` (``rho = 1/2`` for
    order 2). At the next ``step`` the corrector redoes that step from its start with the model
    output at its end as one more node (``r = 1``, full system; ``rho = 1/2`` for order 1) unless
    the step index is in ``disable_corrector``; the last step is not corrected. The order of step
    ``i`` is ``min(solver_order, i + 1)`` and, with ``lower_order_final``, at most
    ``len(timesteps) - i``. 1 NFE per step; predictor and corrector are one fused call each (plus
    one that materialises ``m0`` for the later steps).

    ``solver_p``: another scheduler whose ``step`` replaces the predictor (UniC on top of it).
    Config fields, defaults and ``set_timesteps`` arguments are diffusers 0.42's.
    """

    defaults = dict(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
        solver_order=2, prediction_type="epsilon", thresholding=False, dynamic_thresholding_ratio=0.995,
        sample_max_value=1.0, predict_x0=True, solver_type="bh2", lower_order_final=True, disable_corrector=[],
        solver_p=None, use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
        use_flow_sigmas=False, flow_shift=1.0, timestep_spacing="linspace", steps_offset=0,
        final_sigmas_type="zero", rescale_betas_zero_snr=False, use_dynamic_shifting=False,
        time_shift_type="exponential", sigma_min=None, sigma_max=None, shift_terminal=None,
    )

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        c = self.config
        if c.solver_type in ("midpoint", "heun", "logrho"):  # a DPM-Solver or DEIS config swapped in
            self._replace_config(solver_type="bh2")
        check_choice("solver_type", self.config.solver_type, VARIANTS)
        check_choice("time_shift_type", c.time_shift_type, ("exponential", "linear"))
        if c.shift_terminal is not None and not c.use_flow_sigmas:
            raise ValueError("shift_terminal needs use_flow_sigmas=True")
        if not c.predict_x0 and c.prediction_type == "flow_prediction":
            raise ValueError("prediction_type='flow_prediction' needs predict_x0=True")
        self.predict_x0 = c.predict_x0
        self.disable_corrector = list(c.disable_corrector)
        self.solver_p = c.solver_p

    def _reset(self) -> None:
        super()._reset()
        self.timestep_list = [None] * self.config.solver_order
        self.last_sample = None
        self.this_order = None

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None, sigmas=None,
                      mu: Optional[float] = None) -> None:
        """Build the inference grid: ``num_inference_steps`` spaced by ``timestep_spacing`` or the
        Karras / exponential / beta / flow sigmas of the config; ``sigmas`` (flow sigmas only)
        gives the flow grid itself; ``mu`` is the dynamic shift (``use_dynamic_shifting``)."""
        c = self.config
        if c.use_dynamic_shifting and mu is None:
            raise ValueError("mu must be passed when use_dynamic_shifting=True")
        if sigmas is not None:
            if not c.use_flow_sigmas:
                raise ValueError("sigmas can be passed only with use_flow_sigmas=True")
            sigmas = np.asarray(sigmas, dtype=np.float64)
            num_inference_steps = len(sigmas)
        timesteps = multistep_timesteps(c.timestep_spacing, num_inference_steps, c.num_train_timesteps, c.steps_offset)
        kind = next((k for k, f in (("karras", "use_karras_sigmas"), ("exponential", "use_exponential_sigmas"),
                                    ("beta", "use_beta_sigmas")) if c[f]), None)
        if kind is not None:
            table = self._train_sigmas() if sigmas is None else sigmas
            sigmas, fractional = self._converted(kind, num_inference_steps, sigma_min=c.sigma_min,
                                                 sigma_max=c.sigma_max, table=table)
            if kind == "karras" and c.use_flow_sigmas:
                sigmas = sigmas / (sigmas + 1)
                timesteps = sigmas * c.num_train_timesteps
            else:
                timesteps = fractional.round() if kind == "karras" else fractional
            last = sigmas[-1]
        elif c.use_flow_sigmas:
            if sigmas is None:
                sigmas = np.linspace(1, 1 / c.num_train_timesteps, num_inference_steps + 1)[:-1]
            if c.use_dynamic_shifting:
                e = math.exp(mu) if c.time_shift_type == "exponential" else mu
                sigmas = e / (e + (1 / sigmas - 1))
            else:
                sigmas = c.flow_shift * sigmas / (1 + (c.flow_shift - 1) * sigmas)
            if c.shift_terminal:
                one_minus = 1 - sigmas
                sigmas = 1 - one_minus / (one_minus[-1] / (1 - c.shift_terminal))
            if abs(sigmas[0] - 1) < 1e-6:  # keep lambda finite at the first point
                sigmas[0] -= 1e-6
            timesteps = sigmas * c.num_train_timesteps
            last = sigmas[-1]
        else:
            table = self._train_sigmas() if sigmas is None else sigmas
            sigmas = np.interp(timesteps, np.arange(0, len(table)), table)
            last = self._sigma_min_train()
        last = last if c.final_sigmas_type == "sigma_min" else 0.0
        self._finish(timesteps, np.concatenate([sigmas, [last]]), device)
        if self.solver_p is not None:
            self.solver_p.set_timesteps(self.num_inference_steps, device=device)

    def _coefficients(self, p: int, order: int, corrector: bool):
        """Coefficients ``[c_x, c_m0, c_m(-1), .., c_m(-(order-1))]`` (then ``c_mt`` with
        ``corrector``) of the UniP/UniC step of ``order`` from grid index ``p`` to ``p + 1``.

        A step to sigma = 0 in noise prediction (``h = inf``) is the DDIM step
        ``x' = (alpha'/alpha) x + (sigma' - alpha' sigma/alpha) m0`` (diffusers gives NaN there), and
        in data prediction it is first order (diffusers' higher-order step gives inf there).
        """
        lam = self._lam
        h = lam[p + 1] - lam[p]
        a_t, s_t = self._alpha[p + 1], self._sigma[p + 1]
        if self.predict_x0:
            ratio, mult = s_t / self._sigma[p], a_t
        else:
            ratio, mult = a_t / self._alpha[p], s_t
        if h == 0.0:
            return [1.0] + [0.0] * (order + corrector)
        if math.isinf(h):
            c_m0 = a_t if self.predict_x0 else s_t - a_t * self._sigma[p] / self._alpha[p]
            return [ratio, c_m0] + [0.0] * (order - 1 + corrector)
        return unipc_coefficients(h, [(lam[p - j] - lam[p]) / h for j in range(1, order)], ratio, mult,
                                  corrector=corrector, variant=self.config.solver_type,
                                  data_prediction=self.predict_x0)

    @staticmethod
    def _split(coefs):
        """``(c_x, [c_m0, ..], 0.0)`` from ``[c_x, c_m0, ..]`` (``_update``'s form; UniPC adds no noise)."""
        return coefs[0], coefs[1:], 0.0

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        """Correct the previous step with ``model_output`` (UniC), then predict the next point (UniP).

        Args:
            model_output (Tensor[B, *D]): the network output at ``(sample, timestep)``.
            timestep (int or Tensor): the current entry of ``timesteps``.
            sample (Tensor[B, *D]): x at ``timestep`` (the previous step's prediction).
            return_dict (bool): SchedulerOutput if True, else ``(prev_sample,)``.

        Returns:
            SchedulerOutput or tuple: ``prev_sample`` (Tensor[B, *D]).
        """
        i = self._start_step(timestep)
        c = self.config
        use_corrector = i > 0 and (i - 1) not in self.disable_corrector and self.last_sample is not None
        view = self._view(model_output, sample, i, self.predict_x0, c.thresholding and self.predict_x0)
        keep = i + 1 < len(self.timesteps)
        if keep or use_corrector:
            view = (self._materialise(sample, view, i), 0.0, 1.0)
        if use_corrector:  # UniC for the step i - 1 -> i, from its start last_sample
            k = self.this_order
            terms = self.model_outputs[::-1][:k] + [view[0]]
            sample = self._update(("unic", i - 1, k), self.last_sample, sample, (terms[0], 0.0, 1.0), terms[1:],
                                  lambda: self._split(self._coefficients(i - 1, k, corrector=True)))
        self.model_outputs = self.model_outputs[1:] + [view[0] if keep else None]
        self.timestep_list = self.timestep_list[1:] + [timestep]
        order = min(c.solver_order, len(self.timesteps) - i) if c.lower_order_final else c.solver_order
        self.this_order = min(order, self.lower_order_nums + 1)
        self.last_sample = sample
        if self.solver_p is not None:
            prev = self.solver_p.step(model_output, self.timestep_list[-1], sample).prev_sample
        else:
            k = self.this_order
            history = [self.model_outputs[-1 - j] for j in range(1, k)]
            prev = self._update(("unip", i, k), sample, sample, view, history,
                                lambda: self._split(self._coefficients(i, k, corrector=False)))
        if self.lower_order_nums < c.solver_order:
            self.lower_order_nums += 1
        self._step_index += 1
        return self._output(prev, return_dict)
