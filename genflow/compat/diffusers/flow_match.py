"""diffusers' ``FlowMatchEulerDiscreteScheduler`` on genflow's fused update."""
from __future__ import annotations

import math

import numpy as np
import torch

from genflow._cache import value_key

from ._base import (Scheduler, SchedulerOutput, cached_schedule, check_choice, fused, fused_planned, grid_plans, pack,
                    randn_like_diffusers)
from ._sigmas import beta_sigmas, exponential_sigmas, karras_sigmas

__all__ = ["FlowMatchEulerDiscreteScheduler"]


class FlowMatchEulerDiscreteScheduler(Scheduler):
    """Euler's method for rectified-flow / flow-matching models, diffusers' ``FlowMatchEulerDiscreteScheduler``.

    The path is ``x_sigma = (1 - sigma) x0 + sigma noise`` (data at sigma = 0) and the model predicts
    the velocity ``out = noise - x0``. From sigma_i to sigma_{i+1}::

        x_{i+1} = x_i + (sigma_{i+1} - sigma_i) out                               (deterministic)
        x_{i+1} = (1 - sigma_{i+1}) (x_i - sigma_i out) + sigma_{i+1} z           (stochastic_sampling)

    One model evaluation, one fused pass per step. Sigmas are shifted as
    ``shift sigma / (1 + (shift - 1) sigma)`` or, with ``use_dynamic_shifting``, by
    ``time_shift(mu, 1, sigma)``. Lipman et al. (2023), "Flow Matching for Generative Modeling";
    Esser et al. (2024), "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis",
    section 5.3.2 (the shift).

    Beyond diffusers' class: ``add_noise`` (the forward path above, equal to ``scale_noise`` with
    the arguments reordered), ``init_noise_sigma = 1`` and an identity ``scale_model_input``, so
    generic loops run unchanged.
    """

    defaults = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_shift=0.5, max_shift=1.15,
                    base_image_seq_len=256, max_image_seq_len=4096, invert_sigmas=False, shift_terminal=None,
                    use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
                    time_shift_type="exponential", stochastic_sampling=False)
    order = 1

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        cfg = self.config
        flags = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
        if sum(bool(cfg[f]) for f in flags) > 1:
            raise ValueError(f"at most one of {flags} may be True, got { {f: cfg[f] for f in flags} }")
        check_choice("time_shift_type", cfg.time_shift_type, ("exponential", "linear"))
        self._stochastic = bool(cfg.stochastic_sampling)
        n = cfg.num_train_timesteps
        sigmas = torch.from_numpy(np.linspace(1, n, n, dtype=np.float32)[::-1].copy()) / n
        if not cfg.use_dynamic_shifting:
            sigmas = cfg.shift * sigmas / (1 + (cfg.shift - 1) * sigmas)
        self.timesteps = sigmas * n
        self._shift = cfg.shift
        self._set_sigmas(sigmas)
        self.sigma_min = self.sigmas[-1].item()
        self.sigma_max = self.sigmas[0].item()

    def _set_sigmas(self, sigmas: torch.Tensor) -> None:
        self.sigmas = sigmas
        self._sig = sigmas.double().tolist()
        self._plans = grid_plans(self, self._sig)

    @property
    def shift(self) -> float:
        """The static shift used by the next ``set_timesteps``."""
        return self._shift

    def set_shift(self, shift: float) -> None:
        """Use ``shift`` from the next ``set_timesteps`` on."""
        self._shift = shift

    def _sigma_to_t(self, sigma):
        return sigma * self.config.num_train_timesteps

    def time_shift(self, mu: float, sigma: float, t):
        """Resolution-dependent shift of ``t`` in (0, 1]: ``e^mu / (e^mu + (1/t - 1)^sigma)``
        (``"exponential"``) or ``mu / (mu + (1/t - 1)^sigma)`` (``"linear"``)."""
        m = math.exp(mu) if self.config.time_shift_type == "exponential" else mu
        return m / (m + (1 / t - 1) ** sigma)

    def stretch_shift_to_terminal(self, t):
        """Rescale ``1 - t`` so the schedule ends at ``shift_terminal`` (LTX-Video)."""
        one_minus = 1 - t
        return 1 - one_minus / (one_minus[-1] / (1 - self.config.shift_terminal))

    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None, timesteps=None) -> None:
        """Set ``sigmas`` (float32 [n + 1], ending with 0, or 1 with ``invert_sigmas``) and
        ``timesteps`` (float32 [n], ``sigma N`` unless given): evenly spaced from ``sigma_max`` to
        ``sigma_min``, or from custom ``sigmas`` / ``timesteps``, then shifted (``mu`` for dynamic
        shifting), stretched to ``shift_terminal`` and re-gridded as configured."""
        cfg = self.config
        if cfg.use_dynamic_shifting and mu is None:
            raise ValueError("mu must be given when use_dynamic_shifting=True")
        if sigmas is not None and timesteps is not None and len(sigmas) != len(timesteps):
            raise ValueError(f"sigmas and timesteps must have the same length, got {len(sigmas)} and {len(timesteps)}")
        if num_inference_steps is not None:
            for name, v in (("sigmas", sigmas), ("timesteps", timesteps)):
                if v is not None and len(v) != num_inference_steps:
                    raise ValueError(f"{name} must have num_inference_steps = {num_inference_steps} values, "
                                     f"got {len(v)}")
        elif sigmas is None and timesteps is None:
            raise ValueError("pass num_inference_steps, sigmas or timesteps")
        else:
            num_inference_steps = len(sigmas) if sigmas is not None else len(timesteps)
        self.num_inference_steps = num_inference_steps
        if sigmas is None and timesteps is None:  # the common call: its schedule is built once
            arguments = (num_inference_steps, str(device), self._shift, value_key(mu))
            schedule = cached_schedule(self, arguments, lambda: self._schedule(num_inference_steps, device, None, mu,
                                                                               None, with_plans=True))
            timesteps, sigmas, sig, plans = schedule
            self.timesteps, self.sigmas, self._sig, self._plans = timesteps.clone(), sigmas.clone(), sig, plans
        else:
            self.timesteps, sigmas = self._schedule(num_inference_steps, device, sigmas, mu, timesteps)
            self._set_sigmas(sigmas)
        self._step_index = None
        self._begin_index = None

    def _schedule(self, num_inference_steps, device, sigmas, mu, timesteps, with_plans=False) -> tuple:
        """``(timesteps, sigmas)`` of ``set_timesteps`` (and, ``with_plans``, the sigmas as floats and
        the grid's step plans)."""
        cfg = self.config
        given_timesteps = timesteps is not None
        if given_timesteps:
            timesteps = np.array(timesteps).astype(np.float32)
        if sigmas is None:
            if timesteps is None:
                timesteps = np.linspace(self._sigma_to_t(self.sigma_max), self._sigma_to_t(self.sigma_min),
                                        num_inference_steps)
            sigmas = timesteps / cfg.num_train_timesteps
        else:
            sigmas = np.array(sigmas).astype(np.float32)
            num_inference_steps = len(sigmas)
        if cfg.use_dynamic_shifting:
            sigmas = self.time_shift(mu, 1.0, sigmas)
        else:
            sigmas = self.shift * sigmas / (1 + (self.shift - 1) * sigmas)
        if cfg.shift_terminal:
            sigmas = self.stretch_shift_to_terminal(sigmas)
        if cfg.use_karras_sigmas:
            sigmas = karras_sigmas(sigmas, num_inference_steps)
        elif cfg.use_exponential_sigmas:
            sigmas = exponential_sigmas(sigmas, num_inference_steps)
        elif cfg.use_beta_sigmas:
            sigmas = beta_sigmas(sigmas, num_inference_steps)
        sigmas = torch.from_numpy(sigmas).to(dtype=torch.float32, device=device)
        if given_timesteps:
            timesteps = torch.from_numpy(timesteps).to(dtype=torch.float32, device=device)
        else:
            timesteps = sigmas * cfg.num_train_timesteps
        if cfg.invert_sigmas:
            sigmas = 1.0 - sigmas
            timesteps = sigmas * cfg.num_train_timesteps
            sigmas = torch.cat([sigmas, torch.ones(1, device=sigmas.device)])
        else:
            sigmas = torch.cat([sigmas, torch.zeros(1, device=sigmas.device)])
        if not with_plans:
            return timesteps, sigmas
        sig = sigmas.double().tolist()
        return timesteps, sigmas, sig, grid_plans(self, sig)

    def _indices(self, timestep) -> list:
        timestep = torch.as_tensor(timestep).reshape(-1)
        if self._begin_index is None:
            return [self.index_for_timestep(t) for t in timestep]
        index = self._step_index if self._step_index is not None else self._begin_index
        return [index] * timestep.shape[0]

    def scale_noise(self, sample: torch.Tensor, timestep, noise: torch.Tensor) -> torch.Tensor:
        """The forward path ``x = sigma noise + (1 - sigma) sample`` at ``timestep`` (Tensor[B] of
        values of ``timesteps``; the current or begin index once a pipeline set ``begin_index``)."""
        sigma = torch.tensor([self._sig[i] for i in self._indices(timestep)], dtype=torch.float64)
        if sigma.numel() == 1:
            sigma = float(sigma[0])
        return fused(sample, [noise], [1.0 - sigma, sigma])

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """``scale_noise(original_samples, timesteps, noise)``: ``(1 - sigma) x0 + sigma noise``."""
        return self.scale_noise(original_samples, timesteps, noise)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, s_churn: float = 0.0,
             s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0, generator=None,
             per_token_timesteps=None, return_dict: bool = True):
        """One Euler step from ``timestep`` (see the class docstring).

        Args:
            model_output (Tensor[B, *D]): the velocity prediction.
            timestep (float or 0-dim float Tensor): a value of ``timesteps``.
            sample (Tensor[B, *D]): x at the current sigma.
            s_churn, s_tmin, s_tmax, s_noise: accepted for diffusers' signature; unused there too.
            generator (torch.Generator or list, optional): for z with ``stochastic_sampling``.
            per_token_timesteps (Tensor[B, L], optional): one timestep per token (sample
                Tensor[B, L, C]); each token steps to the next lower sigma of the schedule. This
                per-element case runs in plain PyTorch (its coefficients are not per sample).
            return_dict (bool): a SchedulerOutput (``prev_sample`` only), else ``(prev_sample,)``.
        """
        if isinstance(timestep, int) or (isinstance(timestep, torch.Tensor) and not timestep.is_floating_point()):
            raise ValueError(f"timestep must be one of FlowMatchEulerDiscreteScheduler.timesteps (a float), got the "
                             f"integer {timestep!r}; pass the schedule's values, not indices from enumerate(timesteps)")
        if self._step_index is None:
            self._init_step_index(timestep)
        x = sample if sample.dtype in (torch.float32, torch.float64) else sample.float()
        i = self._step_index
        if per_token_timesteps is not None:
            prev = self._per_token_step(model_output, x, per_token_timesteps, generator)
        elif self._stochastic:
            sigma, sigma_next = self._sig[i], self._sig[i + 1]
            noise = randn_like_diffusers(x, generator)
            prev = fused(x, [model_output], [1.0 - sigma_next, -(1.0 - sigma_next) * sigma], sigma_next, noise=noise)
        else:
            plan = self._plans.get(i)
            if plan is None:
                plan = self._plans[i] = pack([1.0, self._sig[i + 1] - self._sig[i]])
            prev = fused_planned(x, [model_output], plan)
        if per_token_timesteps is None and prev.dtype != model_output.dtype:
            prev = prev.to(model_output.dtype)
        self._step_index += 1
        if not return_dict:
            return (prev,)
        return SchedulerOutput(prev)

    def _per_token_step(self, model_output, x, per_token_timesteps, generator):
        current = per_token_timesteps / self.config.num_train_timesteps
        schedule = self.sigmas[:, None, None]
        lower = (schedule * (schedule < current[None] - 1e-6)).max(dim=0).values
        current, nxt = current[..., None], lower[..., None]
        if self.config.stochastic_sampling:
            noise = randn_like_diffusers(x, generator)
            return (1.0 - nxt) * (x - current * model_output) + nxt * noise
        return x + (current - nxt) * model_output
