"""diffusers' small flow-matching Euler schedulers on genflow's fused update: ``MiniMaxH3Scheduler``
and ``FlowMapEulerDiscreteScheduler``. Both take Euler's step on the linear path
``x_sigma = (1 - sigma) x0 + sigma noise`` (Lipman et al. 2023, "Flow Matching for Generative
Modeling"; the native ``euler`` step in sigma): one fused pass per step."""
from __future__ import annotations

from typing import Optional

import torch

from ._base import Scheduler, SchedulerOutput, fused

__all__ = ["MiniMaxH3Scheduler", "FlowMapEulerDiscreteScheduler"]


def _check_float_timestep(name: str, timestep) -> None:
    if isinstance(timestep, int) or (isinstance(timestep, torch.Tensor) and not timestep.is_floating_point()):
        raise ValueError(f"timestep must be one of {name}.timesteps (a float), got the integer {timestep!r}")


class MiniMaxH3Scheduler(Scheduler):
    """diffusers' ``MiniMaxH3Scheduler``: rectified-flow Euler (eta = 0) with an exponential-type shift.

    ``sigmas`` are ``shift s / (1 + (shift - 1) s)`` of ``s = linspace(1, 0, n)`` (repeats dropped) or
    custom (strictly decreasing to 0); ``timesteps = 1 - sigma`` (data at 1). With the model's
    ``out = x0 - noise`` (``denoised = x + sigma out``): ``x' = x + (sigma - sigma') out``.
    """

    defaults = dict(shift=12.0)
    order = 1

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if not self.config.shift > 0:
            raise ValueError(f"shift must be positive, got {self.config.shift}")
        self._shift = float(self.config.shift)
        self.sigmas = self.timesteps = None

    @property
    def shift(self) -> float:
        return self._shift

    def set_shift(self, shift: float) -> None:
        """Use ``shift`` from the next ``set_timesteps`` on."""
        if not shift > 0:
            raise ValueError(f"shift must be positive, got {shift}")
        self._shift = float(shift)

    def __len__(self) -> int:
        raise TypeError("MiniMaxH3Scheduler has no num_train_timesteps")

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None, sigmas=None) -> None:
        """Set ``sigmas`` (float32, ending with 0) and ``timesteps = 1 - sigma`` (all but the last)."""
        if sigmas is None:
            if num_inference_steps is None or num_inference_steps < 2:
                raise ValueError(f"num_inference_steps must be >= 2 (or pass sigmas), got {num_inference_steps}")
            base = torch.linspace(1.0, 0.0, int(num_inference_steps), dtype=torch.float32)
            sigmas = torch.unique_consecutive(self._shift * base / (1 + (self._shift - 1) * base))
        else:
            sigmas = torch.as_tensor(sigmas, dtype=torch.float32).flatten().cpu()
            if sigmas.numel() < 2 or not bool((sigmas[1:] < sigmas[:-1]).all()) or sigmas[-1].item() != 0.0:
                raise ValueError("sigmas must hold at least two strictly decreasing values ending at 0.0")
        self.sigmas = sigmas.to(device=device)
        self.timesteps = (1.0 - sigmas[:-1]).to(device=device)
        self._sig = sigmas.double().tolist()
        self.num_inference_steps = int(self.timesteps.numel())
        self._step_index = None
        self._begin_index = None

    def index_for_timestep(self, timestep, schedule_timesteps=None) -> int:
        """The first index of ``timestep`` in ``timesteps`` (ValueError when absent)."""
        schedule = self.timesteps if schedule_timesteps is None else schedule_timesteps
        indices = (schedule == torch.as_tensor(timestep).to(schedule.device)).nonzero()
        if len(indices) == 0:
            raise ValueError(f"timestep must be one of the scheduler's timesteps, got {timestep!r}")
        return int(indices[0].item())

    def scale_noise(self, sample: torch.Tensor, timestep, noise: torch.Tensor) -> torch.Tensor:
        """``t sample + (1 - t) noise`` (``timestep``: a float or Tensor[B])."""
        t = torch.as_tensor(timestep, dtype=torch.float64).reshape(-1)
        t = float(t[0]) if t.numel() == 1 else t
        return fused(sample, [noise], [t, 1.0 - t])

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        """One Euler step from ``timestep`` (see the class docstring)."""
        _check_float_timestep("MiniMaxH3Scheduler", timestep)
        if self._step_index is None:
            self._step_index = self.index_for_timestep(timestep) if self._begin_index is None else self._begin_index
        sigma_now = 1.0 - float(torch.as_tensor(timestep, dtype=sample.dtype))  # diffusers reads it off timestep
        sigma, sigma_next = self._sig[self._step_index], self._sig[self._step_index + 1]
        prev = fused(sample, [model_output], [1.0, (1.0 - sigma_next / sigma) * sigma_now])
        self._step_index += 1
        return SchedulerOutput(prev) if return_dict else (prev,)


class FlowMapEulerDiscreteScheduler(Scheduler):
    """diffusers' ``FlowMapEulerDiscreteScheduler``: the any-step Euler map of flow-map-distilled models.

    ``sigmas`` (float64) are ``linspace(1, 0, n + 1)[:-1]`` (or custom ``sigmas`` / ``timesteps / N``),
    shifted by ``shift s / (1 + (shift - 1) s)``, then 0; ``timesteps = sigma N``. From ``t`` to ``r``
    (default the next grid point, or ``r_timestep``; off-grid times read as ``t / N``)::

        x' = x - (sigma_t - sigma_r) out
    """

    defaults = dict(num_train_timesteps=1000, shift=1.0)
    order = 1

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.set_timesteps(self.config.num_train_timesteps, device="cpu")

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None, sigmas=None,
                      timesteps=None) -> None:
        """Set ``sigmas`` (float64 [n + 1]) and ``timesteps`` (float64 [n]) (see the class docstring)."""
        c = self.config
        if sigmas is not None and timesteps is not None and len(sigmas) != len(timesteps):
            raise ValueError(f"sigmas and timesteps must have the same length, got {len(sigmas)} and {len(timesteps)}")
        if num_inference_steps is not None:
            for name, v in (("sigmas", sigmas), ("timesteps", timesteps)):
                if v is not None and len(v) != num_inference_steps:
                    raise ValueError(f"{name} must have num_inference_steps = {num_inference_steps} values, got {len(v)}")
        elif sigmas is None and timesteps is None:
            raise ValueError("pass num_inference_steps, sigmas or timesteps")
        else:
            num_inference_steps = len(sigmas) if sigmas is not None else len(timesteps)
        if sigmas is not None:
            working = torch.tensor(sigmas, dtype=torch.float64)
        elif timesteps is not None:
            working = torch.tensor(timesteps, dtype=torch.float64) / c.num_train_timesteps
        else:
            working = torch.linspace(1.0, 0.0, num_inference_steps + 1, dtype=torch.float64)[:-1]
        if c.shift != 1.0:
            working = c.shift * working / (1 + (c.shift - 1) * working)
        self.num_inference_steps = num_inference_steps
        self.sigmas = torch.cat([working, working.new_zeros(1)]).to(device=device)
        self.timesteps = (self.sigmas[:-1] * c.num_train_timesteps).to(device=device)
        self._step_index = None
        self._begin_index = None

    def index_for_timestep(self, timestep, schedule_timesteps=None) -> Optional[int]:
        """The grid index within 1e-3 of ``timestep``, or None when it is off the grid."""
        if self.timesteps is None:
            return None
        value = float(torch.as_tensor(timestep).flatten()[0])
        diffs = (self.timesteps.float() - value).abs()
        index = int(diffs.argmin())
        return None if float(diffs[index]) > 1e-3 else index

    def _init_step_index(self, timestep) -> None:
        index = self.index_for_timestep(timestep) if self._begin_index is None else self._begin_index
        self._step_index = 0 if index is None else index

    def _sigma_at(self, timestep) -> float:
        index = self.index_for_timestep(timestep)
        if index is not None:
            return float(self.sigmas[index])
        return float(torch.as_tensor(timestep, dtype=torch.float64)) / self.config.num_train_timesteps

    def scale_noise(self, sample: torch.Tensor, timestep, noise: torch.Tensor) -> torch.Tensor:
        """``(t/N) noise + (1 - t/N) sample`` (``timestep``: a float or Tensor[B])."""
        t = torch.as_tensor(timestep, dtype=torch.float64).reshape(-1) / self.config.num_train_timesteps
        t = float(t[0]) if t.numel() == 1 else t
        return fused(sample, [noise], [1.0 - t, t])

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, r_timestep=None,
             return_dict: bool = True):
        """One flow-map Euler step from ``timestep`` to ``r_timestep`` (default: the next grid point)."""
        if self._step_index is None:
            self._init_step_index(timestep)
        index = self.index_for_timestep(timestep)
        sigma_t = self._sigma_at(timestep)
        if r_timestep is None:
            if index is None:
                raise ValueError("r_timestep is needed for a timestep off the schedule (the step's end is unknown)")
            sigma_r = float(self.sigmas[index + 1])
        else:
            sigma_r = self._sigma_at(r_timestep)
        prev = fused(sample, [model_output], [1.0, -(sigma_t - sigma_r)]).to(model_output.dtype)
        self._step_index += 1
        return SchedulerOutput(prev) if return_dict else (prev,)
