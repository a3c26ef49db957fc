"""diffusers' ``RFD4ProteinaScheduler`` on genflow's fused update."""
from __future__ import annotations

import math
from typing import Optional

import torch

from ._base import Scheduler, SchedulerOutput, check_choice, fused, randn_like_diffusers

__all__ = ["RFD4ProteinaScheduler"]

REQUIRED = ("schedule_mode", "noise_mode", "tsr_k", "tsr_sigma")


def rfd4_times(mode: str, steps: int, start: float, tail_steps: int = 0, tail_multiplier: int = 1) -> torch.Tensor:
    """``steps + 1`` float32 times from ``start`` to 1, ``"log"`` or ``"power"`` spaced; the last
    ``tail_steps`` intervals ``tail_multiplier`` times finer (picked from a finer grid)."""
    if tail_steps:
        if type(tail_multiplier) is not int or tail_multiplier < 2:
            raise ValueError(f"tail_step_multiplier must be an integer >= 2, got {tail_multiplier!r}")
        coarse = steps - (tail_multiplier - 1) * tail_steps
        if coarse < tail_steps:
            raise ValueError(f"num_inference_steps must be >= tail_steps * tail_step_multiplier = "
                             f"{tail_steps * tail_multiplier}, got {steps}")
        fine = rfd4_times(mode, coarse * tail_multiplier, start)
        split = (coarse - tail_steps) * tail_multiplier
        picks = list(range(0, split, tail_multiplier)) + list(range(split, len(fine)))
        return fine[torch.tensor(picks)]
    if mode == "power":
        return torch.linspace(start ** 0.5, 1, steps + 1) ** 2
    grid = 1 - torch.logspace(-2, start, steps + 1).flip(0)
    grid = grid - (grid.min() - start)
    return grid / grid.max()


def rfd4_noise(times: torch.Tensor, mode: str) -> torch.Tensor:
    """The stochastic window's noise level g(t): ``1 / (t + 0.01)`` or the ``"tan"`` shape."""
    t = times.clamp(0, 1 - 1e-5)
    if mode == "tan":
        angle = (1 - t) * torch.pi / 2
        level = (torch.pi / 2) * torch.sin(angle) / (torch.cos(angle) + 1e-2)
    else:
        level = 1 / (t + 1e-2)
    return level.clamp(min=0)


def tsr_ratio(times, k: float, sigma: float):
    """Temporal score rescaling ``(snr sigma^2 + 1) / (snr sigma^2 / k + 1)``, ``snr = t^2 / (1 - t)^2``."""
    snr = times ** 2 / (1 - times) ** 2
    return (snr * sigma ** 2 + 1) / (snr * sigma ** 2 / k + 1)


def float32(value: float) -> float:
    """``value`` rounded to float32."""
    return float(torch.tensor(value, dtype=torch.float32))


class RFD4ProteinaScheduler(Scheduler):
    """diffusers' ``RFD4ProteinaScheduler``: flow sampling with temporal score rescaling (one modality
    of RFD4-Proteína; Geffner et al. 2025, "Proteina", with the rescaling of Xu et al. 2025,
    "Temporal Score Rescaling"). Order 1.

    Times run from noise (``t = 1e-3``) to data (1) on ``x_t = (1 - t) noise + t x0``. With the
    velocity ``v``, score ``s = (t v - x) / (1 - t)`` and ratio ``r = tsr_ratio(t)``, one step of
    length ``dt`` is (per token, times ``emit_mask``)::

        ODE  (t > t_lim_ode or t < t_lim_ode_below):
             x' = (1 + dt (1 - r) / t) x + r dt v
        SDE: x' = (1 + dt (1 - r) / t - dt g r / (1 - t)) x + r dt (1 + g t / (1 - t)) v + sqrt(2 g dt) z

    (Euler-Maruyama on the rescaled velocity plus ``g r s``, with ``g`` the noise schedule divided
    by ``r^2``), one fused pass; the mask multiplies the result. ``step`` takes ``emit_mask``
    (Bool[B, N]) and per-row generators (one per row, distinct), as diffusers' does.
    """

    defaults = dict(schedule_mode=None, noise_mode=None, tsr_k=None, tsr_sigma=None, tail_steps=10,
                    tail_step_multiplier=2, t_lim_ode=0.95, t_lim_ode_below=0.02)
    order = 1

    def __init__(self, **kwargs):
        missing = [name for name in REQUIRED if name not in kwargs]
        if missing:
            raise TypeError(f"RFD4ProteinaScheduler needs the arguments {missing}")
        super().__init__(**kwargs)
        check_choice("schedule_mode", self.config.schedule_mode, ("log", "power"))
        check_choice("noise_mode", self.config.noise_mode, ("1/t", "tan"))
        self.timesteps = None
        self._times = self._noise = None

    def __len__(self) -> int:
        raise TypeError("RFD4ProteinaScheduler has no num_train_timesteps")

    def set_timesteps(self, num_inference_steps: int, device=None, start_time: Optional[float] = None) -> None:
        """``timesteps`` (float32, on ``device``): the first ``num_inference_steps`` times; with
        ``start_time`` (in [0, 1)) the last intervals of a longer grid that starts near it."""
        if type(num_inference_steps) is not int or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
        if start_time is not None and not 0 <= float(start_time) < 1:
            raise ValueError(f"start_time must be in [0, 1), got {start_time!r}")
        c = self.config

        def grid(steps):
            return rfd4_times(c.schedule_mode, steps, 1e-3, c.tail_steps, c.tail_step_multiplier)

        if start_time is None:
            full = times = grid(num_inference_steps)
        else:
            dense = max(num_inference_steps * 100, 1000)
            reached = grid(dense) >= float(start_time) - 1e-6
            first = int(reached.nonzero()[0, 0]) if bool(reached.any()) else dense
            full = grid(round(num_inference_steps * dense / max(dense - first, 1)))
            times = full[-(num_inference_steps + 1):]
        noise = rfd4_noise(full[:-1], c.noise_mode) / tsr_ratio(full[:-1], c.tsr_k, c.tsr_sigma) ** 2
        self._times = times.tolist()
        self._noise = noise[-num_inference_steps:].tolist()
        self.timesteps = times[:-1].to(device)
        self.num_inference_steps = num_inference_steps
        self._step_index = 0

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """``(1 - t) noise + t original_samples`` (``timesteps``: a float or Tensor[B] in [0, 1))."""
        batch = original_samples.shape[0]
        t = torch.as_tensor(timesteps, dtype=torch.float64, device=original_samples.device)
        t = t.expand(batch) if t.ndim == 0 else t
        if t.shape != (batch,) or bool(((t < 0) | (t >= 1)).any()):
            raise ValueError(f"timesteps must be a float or shape ({batch},) with values in [0, 1), got {timesteps!r}")
        return fused(original_samples, [noise], [t, 1 - t])

    def _generators(self, generator, batch: int):
        if generator is None:
            return None
        generators = [generator] if isinstance(generator, torch.Generator) else list(generator)
        if len(generators) != batch or not all(isinstance(g, torch.Generator) for g in generators):
            raise ValueError(f"generator must be one torch.Generator per batch row ({batch}), got {generator!r}")
        if len({id(g) for g in generators}) != batch:
            raise ValueError("generator must hold a distinct torch.Generator for each batch row")
        return generators

    def step(self, model_output: torch.Tensor, timestep: torch.Tensor, sample: torch.Tensor,
             emit_mask: torch.Tensor, generator=None, return_dict: bool = True):
        """One step from ``timestep`` (the next of ``timesteps``; see the class docstring).

        Args:
            model_output (Tensor[B, N, D]): the velocity.
            timestep (0-dim Tensor): ``timesteps[step_index]``.
            sample (Tensor[B, N, D]): the state.
            emit_mask (Bool[B, N]): the tokens updated; the others are zeroed.
            generator (torch.Generator or list of B distinct ones, optional): for z.
            return_dict (bool): a SchedulerOutput (``prev_sample`` only), else ``(prev_sample,)``.
        """
        if self._step_index is None:
            raise ValueError("call set_timesteps before step")
        i = self._step_index
        if i >= len(self.timesteps):
            raise ValueError("the trajectory is complete; call set_timesteps to start another")
        if not isinstance(timestep, torch.Tensor) or not torch.equal(timestep, self.timesteps[i]):
            raise ValueError(f"timestep must be the next element of timesteps ({self.timesteps[i]}), got {timestep!r}")
        generators = self._generators(generator, sample.shape[0])
        mask = emit_mask[..., None]
        t = self._times[i]
        if t == 0:  # the score is undefined at t = 0: the state is held
            prev = sample * mask
        else:
            dtype = torch.promote_types(torch.promote_types(sample.dtype, model_output.dtype), self.timesteps.dtype)
            x = sample.to(dtype)
            dt, g = self._times[i + 1] - t, self._noise[i]
            c = self.config
            r = tsr_ratio(t, c.tsr_k, c.tsr_sigma)
            if t > float32(c.t_lim_ode) or t < float32(c.t_lim_ode_below):  # compared in float32, as diffusers does
                prev = fused(x, [model_output], [1 + dt * (1 - r) / t, r * dt])
            else:
                z = randn_like_diffusers(x, generators)
                prev = fused(x, [model_output], [1 + dt * (1 - r) / t - dt * g * r / (1 - t),
                                                 r * dt * (1 + g * t / (1 - t))], math.sqrt(2 * g * dt), noise=z)
            prev.mul_(mask)
        self._step_index += 1
        return SchedulerOutput(prev) if return_dict else (prev,)
