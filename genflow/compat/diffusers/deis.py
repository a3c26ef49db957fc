"""diffusers' ``DEISMultistepScheduler`` on genflow's fused update."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from genflow.solvers.deis import deis_coefficients

from ._base import check_choice
from ._multistep import MultistepScheduler, flow_sigmas, multistep_timesteps

__all__ = ["DEISMultistepScheduler"]


class DEISMultistepScheduler(MultistepScheduler):
    """diffusers' ``DEISMultistepScheduler``: multistep DEIS in log-rho (``solver_type="logrho"``).

    Zhang & Chen (2023), "Fast Sampling of Diffusion Models with Exponential Integrator" (ICLR),
    §4 (the Adams-Bashforth-type multistep DEIS): with ``rho = sigma/alpha`` the probability-flow
    ODE is ``d(x/alpha)/d rho = eps``; fitting ``eps`` by the Lagrange polynomial in ``log rho``
    through the last k noise predictions and integrating it exactly over ``[rho, rho']`` gives
    ``x' = alpha' (x/alpha + sum_j c_j eps_{-j})``, ``c_j = int_rho^rho' L_j(log r) dr``
    (k = 1: ``x' = (alpha'/alpha) x - sigma' (e^h - 1) eps``, DDIM). Orders rise 1, 2, 3 while the
    history fills; ``lower_order_final`` lowers the last two steps on grids of fewer than 15
    steps. The model output is converted to ``x0`` (thresholded with ``thresholding``) and then to
    ``eps``. 1 NFE per step; one fused call per step (plus one that materialises ``eps`` for the
    later steps).

    Config fields, defaults and ``set_timesteps`` arguments are diffusers 0.42's.
    """

    defaults = dict(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
        solver_order=2, prediction_type="epsilon", thresholding=False, dynamic_thresholding_ratio=0.995,
        sample_max_value=1.0, algorithm_type="deis", solver_type="logrho", lower_order_final=True,
        use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False, use_flow_sigmas=False,
        flow_shift=1.0, timestep_spacing="linspace", steps_offset=0, use_dynamic_shifting=False,
        time_shift_type="exponential",
    )

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        c = self.config
        if c.algorithm_type in ("dpmsolver", "dpmsolver++"):  # a DPM-Solver config swapped in
            self._replace_config(algorithm_type="deis")
        if c.solver_type in ("midpoint", "heun", "bh1", "bh2"):  # a DPM-Solver or UniPC config swapped in
            self._replace_config(solver_type="logrho")
        check_choice("algorithm_type", self.config.algorithm_type, ("deis",))
        check_choice("solver_type", self.config.solver_type, ("logrho",))

    def set_timesteps(self, num_inference_steps: int, device=None, mu: Optional[float] = None) -> None:
        """Build the inference grid: ``num_inference_steps`` spaced by ``timestep_spacing`` (final
        sigma: the table's smallest) or the Karras / exponential / beta / flow sigmas of the config
        (final sigma: their last one, repeated, so the last step has zero length). ``mu`` sets
        ``flow_shift = exp(mu)`` (``use_dynamic_shifting``)."""
        self._mu_shift(mu)
        c = self.config
        timesteps = multistep_timesteps(c.timestep_spacing, num_inference_steps, c.num_train_timesteps, c.steps_offset)
        kind = next((k for k, f in (("karras", "use_karras_sigmas"), ("exponential", "use_exponential_sigmas"),
                                    ("beta", "use_beta_sigmas")) if c[f]), None)
        if kind is not None:
            sigmas, fractional = self._converted(kind, num_inference_steps)
            timesteps = fractional.round() if kind == "karras" else fractional
            last = sigmas[-1]
        elif c.use_flow_sigmas:
            sigmas = flow_sigmas(num_inference_steps, c.num_train_timesteps, c.flow_shift)
            timesteps = sigmas * c.num_train_timesteps
            last = sigmas[-1]
        else:
            table = self._train_sigmas()
            sigmas = np.interp(timesteps, np.arange(0, len(table)), table)
            last = self._sigma_min_train()
        self._finish(timesteps, np.concatenate([sigmas, [last]]), device)

    def _coefficients(self, i: int, order: int):
        """``(c_x, [c_eps0, c_eps(-1), ..])`` of the order-``order`` DEIS step from grid index ``i``
        (genflow's ``deis_coefficients``; a zero-length step is the identity)."""
        lam, alpha = self._lam, self._alpha
        c = deis_coefficients(lam[i + 1] - lam[i], [lam[i] - lam[i - j] for j in range(1, order)])
        scale = alpha[i + 1] * self._sigma[i] / alpha[i]
        return alpha[i + 1] / alpha[i], [scale * cj for cj in c]

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        """One multistep DEIS step from ``timesteps[step_index]`` to the next grid point.

        Args:
            model_output (Tensor[B, *D]): the network output at ``(sample, timestep)``.
            timestep (int or Tensor): the current entry of ``timesteps``.
            sample (Tensor[B, *D]): x at ``timestep``.
            return_dict (bool): SchedulerOutput if True, else ``(prev_sample,)``.

        Returns:
            SchedulerOutput or tuple: ``prev_sample`` (Tensor[B, *D]).
        """
        i = self._start_step(timestep)
        c, n = self.config, len(self.timesteps)
        term, a, b = self._view(model_output, sample, i, True, c.thresholding)
        s_i, al_i = self._sigma[i], self._alpha[i]  # eps = (x - alpha x0)/sigma
        view = (term, (1.0 - al_i * a) / s_i, -al_i * b / s_i)
        keep = c.solver_order > 1 and i + 1 < n
        if keep:
            view = (self._materialise(sample, view, i), 0.0, 1.0)
        self.model_outputs = self.model_outputs[1:] + [view[0] if keep else None]
        final = i == n - 1 and c.lower_order_final and n < 15
        second = i == n - 2 and c.lower_order_final and n < 15
        if c.solver_order == 1 or self.lower_order_nums < 1 or final:
            order = 1
        elif c.solver_order == 2 or self.lower_order_nums < 2 or second:
            order = 2
        else:
            order = 3
        history = [self.model_outputs[-1 - j] for j in range(1, order)]
        prev = self._update(("deis", i, order), sample, sample, view, history,
                            lambda: (*self._coefficients(i, order), 0.0))
        if self.lower_order_nums < c.solver_order:
            self.lower_order_nums += 1
        self._step_index += 1
        return self._output(prev, return_dict)
