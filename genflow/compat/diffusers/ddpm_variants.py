"""diffusers' DDPM-family schedulers of particular pipelines on genflow's fused update:
``UnCLIPScheduler`` (Karlo / unCLIP), ``DDPMWuerstchenScheduler`` (Würstchen, Stable Cascade) and
``RePaintScheduler`` (RePaint inpainting).

Both take the ancestral DDPM step (Ho et al. 2020, "Denoising Diffusion Probabilistic Models",
eqs. 6-7 and 11, Algorithm 2): the posterior mean of ``x_prev`` given ``x_t`` and the predicted
``x0`` (or noise), plus the posterior standard deviation times ``z``, in one fused pass.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from ._base import (Scheduler, SchedulerOutput, check_choice, check_prediction_type, fused, randn_like_diffusers,
                    x0_eps_coefficients)

__all__ = ["UnCLIPScheduler", "DDPMWuerstchenScheduler", "RePaintScheduler"]


class UnCLIPScheduler(Scheduler):
    """diffusers' ``UnCLIPScheduler``: ancestral DDPM on the cosine table with unCLIP's spacing.

    From ``t`` to ``s`` (``prev_timestep``, default ``t - 1``), ``a = abar``, ``beta = betas[t]`` when
    ``s = t - 1`` else ``1 - a_t/a_s`` (diffusers' rule, reproduced)::

        x0  = x0(x_t, out)   (clipped if clip_sample)
        x_s = sqrt(a_s) beta/(1 - a_t) x0 + sqrt(1 - beta) (1 - a_s)/(1 - a_t) x_t + std z     (z only for t > 0)

    ``std = sqrt(max((1 - a_s)/(1 - a_t) beta, 1e-20))`` (``"fixed_small_log"``) or, per element,
    ``exp(((1 + v)/2 log beta + (1 - v)/2 log(var))/2)`` from the model's second half ``v``
    (``"learned_range"``, Nichol & Dhariwal 2021, eq. 15). Timesteps ``round(i (N - 1)/(n - 1))``
    (both ends included). One NFE per step; two fused passes.
    """

    defaults = dict(num_train_timesteps=1000, variance_type="fixed_small_log", clip_sample=True,
                    clip_sample_range=1.0, prediction_type="epsilon", beta_schedule="squaredcos_cap_v2")
    order = 1

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        check_choice("beta_schedule", self.config.beta_schedule, ("squaredcos_cap_v2",))
        check_choice("variance_type", self.config.variance_type, ("fixed_small_log", "learned_range"))
        check_prediction_type(self.config.prediction_type, ("epsilon", "sample"))
        self._set_tables()
        self._beta = self.betas.double().tolist()
        self.one = torch.tensor(1.0)
        self.timesteps = torch.arange(self.config.num_train_timesteps - 1, -1, -1, dtype=torch.int64)
        self.variance_type = self.config.variance_type

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """Set ``timesteps`` (int64 [n], decreasing from ``N - 1`` to 0)."""
        if not isinstance(num_inference_steps, int) or isinstance(num_inference_steps, bool) or num_inference_steps < 2:
            raise ValueError(f"num_inference_steps must be an int >= 2 (both ends are timesteps), got "
                             f"{num_inference_steps!r}")
        self.num_inference_steps = num_inference_steps
        ratio = (self.config.num_train_timesteps - 1) / (num_inference_steps - 1)
        t = (np.arange(0, num_inference_steps) * ratio).round()[::-1].copy().astype(np.int64)
        self.timesteps = torch.from_numpy(t).to(device)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, prev_timestep: Optional[int] = None,
             generator=None, return_dict: bool = True):
        """One ancestral step from ``timestep`` to ``prev_timestep`` (see the class docstring).

        Args:
            model_output (Tensor[B, *D], or [B, 2C, ...] with ``"learned_range"``).
            timestep (int or 0-dim Tensor): the current training timestep.
            sample (Tensor[B, *D]): x_t.
            prev_timestep (int, optional): the next timestep (default ``timestep - 1``).
            generator (torch.Generator or list, optional): for z.
            return_dict (bool): a SchedulerOutput, else ``(prev_sample, pred_original_sample)``.
        """
        cfg = self.config
        t = int(timestep)
        s = t - 1 if prev_timestep is None else int(prev_timestep)
        predicted_variance = None
        if model_output.shape[1] == 2 * sample.shape[1] and self.variance_type == "learned_range":
            model_output, predicted_variance = torch.split(model_output, sample.shape[1], dim=1)
        a_t = self._abar[t]
        a_s = self._abar[s] if s >= 0 else 1.0
        beta = self._beta[t] if s == t - 1 else 1.0 - a_t / a_s
        (x0_x, x0_out), _ = x0_eps_coefficients(cfg.prediction_type, math.sqrt(a_t), math.sqrt(1.0 - a_t))
        x0 = fused(sample, [model_output], [x0_x, x0_out])
        if cfg.clip_sample:
            x0.clamp_(-cfg.clip_sample_range, cfg.clip_sample_range)
        c_x0 = math.sqrt(a_s) * beta / (1.0 - a_t)
        c_x = math.sqrt(1.0 - beta) * (1.0 - a_s) / (1.0 - a_t)
        if t <= 0:
            prev = fused(x0, [sample], [c_x0, c_x])
        else:
            z = randn_like_diffusers(model_output.shape, generator, model_output.device, model_output.dtype)
            small = (1.0 - a_s) / (1.0 - a_t) * beta
            if predicted_variance is None:
                prev = fused(x0, [sample], [c_x0, c_x], math.sqrt(max(small, 1e-20)), noise=z)
            else:
                frac = (predicted_variance + 1) / 2
                std = torch.exp(0.5 * (frac * math.log(beta) + (1 - frac) * math.log(small)))
                prev = fused(x0, [sample, std * z], [c_x0, c_x, 1.0])
        return SchedulerOutput(prev, x0) if return_dict else (prev, x0)


class DDPMWuerstchenScheduler(Scheduler):
    """diffusers' ``DDPMWuerstchenScheduler``: ancestral DDPM in continuous time on Würstchen's cosine
    schedule ``abar(t) = cos^2(pi/2 (t' + s)/(1 + s)) / cos^2(pi/2 s/(1 + s))`` clamped to
    [1e-4, 0.9999], ``t' = 1 - (1 - t)^scaler`` (scaler > 1) or ``t^scaler`` (< 1).

    Each sample steps from its own ``t`` (``timestep`` is Tensor[B]) to the next entry of
    ``timesteps`` (``linspace(1, 0, n + 1)``): with ``a = abar(t)/abar(t_prev)``::

        x' = (x - (1 - a)/sqrt(1 - abar(t)) out)/sqrt(a) + sqrt((1 - a)(1 - abar(t_prev))/(1 - abar(t))) z

    (no noise where ``t_prev = 0``). Ho et al. (2020), eq. 11; Pernias et al. (2024), "Würstchen".
    One fused pass with per-sample coefficients.
    """

    defaults = dict(scaler=1.0, s=0.008)
    order = 1

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.scaler = self.config.scaler
        self.s = torch.tensor([self.config.s])
        self._init_alpha_cumprod = torch.cos(self.s / (1 + self.s) * torch.pi * 0.5) ** 2
        self.timesteps = None

    def __len__(self) -> int:
        raise TypeError("DDPMWuerstchenScheduler has no num_train_timesteps (continuous time)")

    def _alpha_cumprod(self, t: torch.Tensor, device=None) -> torch.Tensor:
        """``abar(t)`` (float32, as diffusers computes it)."""
        if self.scaler > 1:
            t = 1 - (1 - t) ** self.scaler
        elif self.scaler < 1:
            t = t ** self.scaler
        abar = torch.cos((t + self.s.to(t.device)) / (1 + self.s.to(t.device)) * torch.pi * 0.5) ** 2
        return (abar / self._init_alpha_cumprod.to(t.device)).clamp(0.0001, 0.9999)

    def set_timesteps(self, num_inference_steps: Optional[int] = None, timesteps=None, device=None) -> None:
        """Set ``timesteps`` (float32 [n + 1], from 1 to 0) or use the given ones."""
        if timesteps is None:
            if num_inference_steps is None:
                raise ValueError("pass num_inference_steps or timesteps")
            timesteps = torch.linspace(1.0, 0.0, num_inference_steps + 1, device=device)
        if not isinstance(timesteps, torch.Tensor):
            timesteps = torch.Tensor(timesteps).to(device)
        self.timesteps = timesteps

    def previous_timestep(self, timestep: torch.Tensor) -> torch.Tensor:
        """The schedule entry after the one nearest ``timestep[0]``, for every sample."""
        index = int((self.timesteps - timestep[0]).abs().argmin())
        return self.timesteps[index + 1][None].expand(timestep.shape[0])

    def step(self, model_output: torch.Tensor, timestep: torch.Tensor, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        """One ancestral step of every sample from ``timestep`` (Tensor[B]) (see the class docstring).

        Returns:
            SchedulerOutput or ``(prev_sample,)`` (Tensor[B, *D], model_output's dtype).
        """
        if self.timesteps is None:
            raise ValueError("timesteps is None: call set_timesteps before step")
        prev_t = self.previous_timestep(timestep)
        abar = self._alpha_cumprod(timestep).double()
        abar_prev = self._alpha_cumprod(prev_t).double()
        a = abar / abar_prev
        z = randn_like_diffusers(model_output.shape, generator, model_output.device, model_output.dtype)
        std = ((1 - a) * (1 - abar_prev) / (1 - abar)).sqrt() * (prev_t != 0).double()
        prev = fused(sample, [model_output], [1 / a.sqrt(), -(1 - a) / ((1 - abar).sqrt() * a.sqrt())], std, noise=z)
        prev = prev.to(model_output.dtype)
        return SchedulerOutput(prev) if return_dict else (prev,)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``sqrt(abar(t)) x0 + sqrt(1 - abar(t)) noise`` per sample (``timesteps``: Tensor[B])."""
        abar = self._alpha_cumprod(timesteps).double()
        return fused(original_samples, [noise], [abar.sqrt(), (1 - abar).sqrt()])


class RePaintScheduler(Scheduler):
    """diffusers' ``RePaintScheduler``: DDIM/DDPM inpainting with resampling (Lugmayr et al. 2022,
    "RePaint: Inpainting using Denoising Diffusion Probabilistic Models", Algorithm 1).

    ``step`` (from ``t`` to ``s = t - N // n``, ``a = abar``, ``std = eta sqrt((1 - a_s)/(1 - a_t) (1 - a_t/a_s))``)::

        unknown = sqrt(a_s) x0(x_t, out) + sqrt(1 - a_s - std^2) out + std z       (x0 clipped if clip_sample)
        known   = sqrt(a_s) original_image + sqrt(1 - a_s) z
        x_s     = mask known + (1 - mask) unknown

    (Song et al. 2021, eq. 12, for the unknown part; one z serves both parts, as in diffusers).
    ``undo_step`` re-noises forward by ``N // n`` training steps, ``x <- sqrt(1 - beta) x + sqrt(beta) z``
    each. ``timesteps`` hold RePaint's jumps (``jump_length``, ``jump_n_sample``). Each part is one
    fused pass; the mask blend is a ``torch.lerp``.
    """

    defaults = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", eta=0.0,
                    trained_betas=None, clip_sample=True)
    order = 1

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        c = self.config
        if c.trained_betas is not None:  # diffusers keeps the array's own dtype here
            self.betas = torch.from_numpy(np.asarray(c.trained_betas))
            self.alphas = 1.0 - self.betas
            self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
            self._abar = self.alphas_cumprod.double().tolist()
        else:
            self._set_tables()
        self._beta = self.betas.double().tolist()
        self.one = torch.tensor(1.0)
        self.final_alpha_cumprod = torch.tensor(1.0)
        self.timesteps = torch.arange(c.num_train_timesteps - 1, -1, -1, dtype=torch.int64)
        self.eta = c.eta

    def set_timesteps(self, num_inference_steps: int, jump_length: int = 10, jump_n_sample: int = 10,
                      device=None) -> None:
        """Set ``timesteps``: the descent with ``jump_n_sample - 1`` returns of ``jump_length`` steps
        every ``jump_length`` steps (RePaint's resampling schedule), in training timesteps."""
        n = min(self.config.num_train_timesteps, num_inference_steps)
        self.num_inference_steps = n
        jumps = {j: jump_n_sample - 1 for j in range(0, n - jump_length, jump_length)}
        timesteps, t = [], n
        while t >= 1:
            t -= 1
            timesteps.append(t)
            if jumps.get(t, 0) > 0:
                jumps[t] -= 1
                for _ in range(jump_length):
                    t += 1
                    timesteps.append(t)
        self.timesteps = torch.from_numpy(np.array(timesteps) * (self.config.num_train_timesteps // n)).to(device)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, original_image: torch.Tensor,
             mask: torch.Tensor, generator=None, return_dict: bool = True):
        """One RePaint step (see the class docstring).

        Args:
            model_output (Tensor[B, *D]): the noise prediction at ``(sample, timestep)``.
            timestep (int or 0-dim Tensor): the current entry of ``timesteps``.
            sample (Tensor[B, *D]): x_t.
            original_image (Tensor[B, *D]): the known image.
            mask (Tensor broadcastable to [B, *D]): 1 where the image is known.
            generator (torch.Generator or list, optional): for z.
            return_dict (bool): a SchedulerOutput, else ``(prev_sample, pred_original_sample)``.
        """
        t = int(timestep)
        s = t - self.config.num_train_timesteps // self.num_inference_steps
        a_t, a_s = self._abar[t], (self._abar[s] if s >= 0 else 1.0)
        x0 = fused(sample, [model_output], [1.0 / math.sqrt(a_t), -math.sqrt(1.0 - a_t) / math.sqrt(a_t)])
        if self.config.clip_sample:
            x0.clamp_(-1, 1)
        noise = randn_like_diffusers(model_output.shape, generator, model_output.device, model_output.dtype)
        std = self.eta * math.sqrt((1.0 - a_s) / (1.0 - a_t) * (1.0 - a_t / a_s))
        unknown = fused(x0, [model_output, noise], [math.sqrt(a_s), math.sqrt(max(1.0 - a_s - std * std, 0.0)),
                                                    std if t > 0 and self.eta > 0 else 0.0])
        known = fused(original_image, [noise], [math.sqrt(a_s), math.sqrt(1.0 - a_s)])
        prev = torch.lerp(unknown, known, mask.to(unknown.dtype))
        return SchedulerOutput(prev, x0) if return_dict else (prev, x0)

    def undo_step(self, sample: torch.Tensor, timestep, generator=None) -> torch.Tensor:
        """Re-noise ``sample`` forward over the ``N // n`` training steps after ``timestep``."""
        t = int(timestep)
        for i in range(self.config.num_train_timesteps // self.num_inference_steps):
            beta = self._beta[t + i]
            noise = randn_like_diffusers(sample.shape, generator, sample.device, sample.dtype)
            sample = fused(sample, [noise], [math.sqrt(1.0 - beta), math.sqrt(beta)])
        return sample
