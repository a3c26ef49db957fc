"""diffusers' ``LMSDiscreteScheduler`` on genflow's fused update."""
from __future__ import annotations

import numpy as np
import torch

from ._base import SchedulerOutput, TIMESTEP_SPACINGS, check_choice, check_prediction_type, fused_planned, pack
from ._sigmas import SigmaScheduler

__all__ = ["LMSDiscreteScheduler"]

MAX_ORDER = 4


class LMSDiscreteScheduler(SigmaScheduler):
    """Linear multistep (Adams-Bashforth in sigma) on the probability-flow ODE, diffusers' ``LMSDiscreteScheduler``.

    With the drifts ``d_j = (y_j - x0(y_j, out_j)) / sigma_j`` of the last ``q = min(i + 1, order)``
    steps::

        y_{i+1} = y_i + sum_{k<q} c_k d_{i-k},   c_k = int_{sigma_i}^{sigma_{i+1}} l_k(s) ds

    where ``l_k`` is the Lagrange basis polynomial through ``sigma_i, ..., sigma_{i-q+1}`` that is 1
    at ``sigma_{i-k}``. The integrals are exact (polynomial antiderivatives; diffusers uses numerical
    quadrature of the same polynomials). Order ``q`` (``step(..., order=4)``), one model evaluation
    per step; three fused passes (x0, the new drift, and the update over up to four drifts).
    Karras et al. (2022) / k-diffusion ``sample_lms`` (Crowson); Adams-Bashforth: Hairer, Norsett
    & Wanner, "Solving Ordinary Differential Equations I", section III.1.
    """

    defaults = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                    trained_betas=None, use_karras_sigmas=False, use_exponential_sigmas=False,
                    use_beta_sigmas=False, prediction_type="epsilon", timestep_spacing="linspace", steps_offset=0)
    order = 1

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        check_prediction_type(self.config.prediction_type)
        check_choice("timestep_spacing", self.config.timestep_spacing, TIMESTEP_SPACINGS)
        self._check_sigma_grid_flags()
        self._set_tables()
        self.use_karras_sigmas = self.config.use_karras_sigmas
        self.set_timesteps(self.config.num_train_timesteps)
        self.is_scale_input_called = False

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """Set ``timesteps`` by ``timestep_spacing`` and ``sigmas`` (interpolated, optionally
        re-gridded, then 0), and clear the stored drifts."""
        timesteps = self._spaced_timesteps(num_inference_steps)
        self.num_inference_steps = num_inference_steps
        train = self._train_sigmas()
        log_sigmas = np.log(train)
        sigmas = np.interp(timesteps, np.arange(0, len(train)), train)
        sigmas, regridded = self._regrid(sigmas, log_sigmas, num_inference_steps)
        if regridded is not None:
            timesteps = regridded
        sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        self.timesteps = torch.from_numpy(timesteps).to(device=device, dtype=torch.float32)
        self._set_sigmas(torch.from_numpy(sigmas))
        self._step_index = None
        self._begin_index = None
        self.derivatives = []

    def get_lms_coefficient(self, order: int, t: int, current_order: int) -> float:
        """``int_{sigma_t}^{sigma_{t+1}} l(s) ds`` for the Lagrange basis polynomial ``l`` through
        ``sigma_t, ..., sigma_{t-order+1}`` that is 1 at ``sigma_{t-current_order}`` (exact)."""
        s = self._sig
        node = s[t - current_order]
        poly = np.poly1d([1.0])
        for k in range(order):
            if k != current_order:
                poly *= np.poly1d([1.0, -s[t - k]]) / (node - s[t - k])
        antiderivative = poly.integ()
        return float(antiderivative(s[t + 1]) - antiderivative(s[t]))

    def _step_plans(self, i: int, q: int):
        """Packed coefficients of step ``i`` of order ``q``: ``x0 = a y + b out``, the drift
        ``d = (y - x0)/sigma = ((1 - a) y - b out)/sigma`` and ``y' = y + sum_k c_k d_{-k}``."""
        sigma = self._sig[i]
        kind = self.config.prediction_type
        if kind == "epsilon":
            a, b = 1.0, -sigma
        elif kind == "v_prediction":
            a, b = 1.0 / (sigma * sigma + 1.0), -sigma / (sigma * sigma + 1.0) ** 0.5
        else:
            a, b = 0.0, 1.0
        coefs = [self.get_lms_coefficient(q, i, k) for k in range(q)]
        return pack([a, b]), pack([(1.0 - a) / sigma, -b / sigma]), pack([1.0] + coefs)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, order: int = 4,
             return_dict: bool = True):
        """One linear multistep step from ``timestep`` (see the class docstring).

        Args:
            model_output (Tensor[B, *D]): the network output on ``scale_model_input(sample)``.
            timestep (float or 0-dim Tensor): a value of ``timesteps``.
            sample (Tensor[B, *D]): y at the current sigma.
            order (int): the multistep order, 1..4.
            return_dict (bool): a SchedulerOutput, else (prev_sample, pred_original_sample).
        """
        if not isinstance(order, int) or isinstance(order, bool) or not 1 <= order <= MAX_ORDER:
            raise ValueError(f"order must be an int in [1, {MAX_ORDER}], got {order!r}")
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        q = min(i + 1, order)
        plans = self._plans.get(("lms", i, q))
        if plans is None:
            plans = self._plans[("lms", i, q)] = self._step_plans(i, q)
        x0 = fused_planned(sample, [model_output], plans[0])
        self.derivatives.append(fused_planned(sample, [model_output], plans[1]))
        if len(self.derivatives) > order:
            self.derivatives.pop(0)
        prev = fused_planned(sample, list(reversed(self.derivatives))[:q], plans[2])
        self._step_index += 1
        if not return_dict:
            return prev, x0
        return SchedulerOutput(prev, x0)
