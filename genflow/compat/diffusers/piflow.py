"""diffusers' ``PiflowScheduler`` on genflow's fused update."""
from __future__ import annotations

from typing import Optional

import torch

from ._base import Scheduler, SchedulerOutput, fused

__all__ = ["PiflowScheduler"]


def shifted(raw, shift: float):
    """Flow-matching time shift ``shift t / (1 + (shift - 1) t)``."""
    return shift * raw / (1 + (shift - 1) * raw)


def unshifted(sigma, shift: float):
    """The inverse of ``shifted``: ``sigma / (shift + (1 - shift) sigma)``."""
    return sigma / (shift + (1 - shift) * sigma)


class PiflowScheduler(Scheduler):
    """diffusers' ``PiflowScheduler``: few-step PiFlow sampling of distilled Kandinsky 6 models
    (Chen et al. 2025, "pi-Flow: Policy-Based Few-Step Generation via Imitation Distillation").

    The model's widened output holds ``n_grid`` velocities ``D_k`` (last axis ``n_grid * C``). From
    ``(x_s, sigma_s)`` the step builds the x0 grid ``X_k = x_s - sigma_s D_k`` over its raw-time segment
    and integrates the network-free DX policy ``v = (x - x0(t)) / sigma`` (``x0(t)`` linear between
    grid points) with ``round(128 segment)`` Euler substeps in raw time (``num_policy_substeps``)::

        x' = (sigma' / sigma) x + (1 - sigma' / sigma) (a X_k + b X_{k+1})

    one fused pass per substep. Raw times are ``1 - i / (n - 1 + final_step_size_scale)`` (the last
    segment ends at ``eps``), ``sigma = shift raw / (1 + (shift - 1) raw)``, ``timesteps = 1000 sigma``.
    """

    defaults = dict(num_train_timesteps=1000, shift=5.0, n_grid=10, eps=1e-6, final_step_size_scale=0.5,
                    num_policy_substeps=128)
    order = 1

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        c = self.config
        if c.n_grid < 2:
            raise ValueError(f"n_grid must be >= 2, got {c.n_grid}")
        if not c.eps > 0:
            raise ValueError(f"eps must be > 0, got {c.eps}")
        if not 0 < c.final_step_size_scale <= 1:
            raise ValueError(f"final_step_size_scale must be in (0, 1], got {c.final_step_size_scale}")
        if c.num_policy_substeps < 1:
            raise ValueError(f"num_policy_substeps must be >= 1, got {c.num_policy_substeps}")
        self.n_grid = int(c.n_grid)
        self.timesteps = torch.empty(0)
        self.sigmas = torch.empty(0)
        self._raw = torch.empty(0)

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None, sigmas=None, mu=None,
                      timesteps=None) -> None:
        """The distilled schedule (custom ``sigmas`` / ``mu`` / ``timesteps`` are refused, as in diffusers)."""
        if sigmas is not None or mu is not None or timesteps is not None:
            raise ValueError("PiflowScheduler takes only num_inference_steps (no sigmas, mu or timesteps)")
        if num_inference_steps is None or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be positive, got {num_inference_steps}")
        c = self.config
        segment = 1.0 / (num_inference_steps - (1.0 - float(c.final_step_size_scale)))
        raw = 1.0 - torch.arange(num_inference_steps, dtype=torch.float32, device=device) * segment
        grid = shifted(raw, float(c.shift))
        self.num_inference_steps = int(num_inference_steps)
        self._raw = raw.cpu()
        self.timesteps = grid * c.num_train_timesteps
        self.sigmas = torch.cat([grid, grid.new_zeros(1)])
        self._step_index = None
        self._begin_index = None

    def _index_for(self, timestep) -> int:
        if self._step_index is None:
            if self._begin_index is not None:
                self._step_index = self._begin_index
            else:
                value = torch.as_tensor(timestep, device=self.timesteps.device, dtype=self.timesteps.dtype)
                hits = torch.nonzero(self.timesteps == value).flatten()
                if not hits.numel():
                    raise ValueError(f"timestep must be one of PiflowScheduler.timesteps, got {timestep!r}")
                self._step_index = int(hits[1 if hits.numel() > 1 else 0])
        if self._step_index >= self.num_inference_steps:
            raise RuntimeError("PiflowScheduler.step called after the schedule was exhausted")
        return self._step_index

    def _x0_grid(self, model_output: torch.Tensor, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """``X_k = x - sigma D_k`` as Tensor[B, n_grid, ..., C]."""
        if model_output.ndim != x.ndim or model_output.shape[:-1] != x.shape[:-1] or \
                model_output.shape[-1] != x.shape[-1] * self.n_grid:
            raise ValueError(f"model_output must have the sample's shape {list(x.shape)} with n_grid * "
                             f"{x.shape[-1]} = {x.shape[-1] * self.n_grid} last-axis channels, got "
                             f"{list(model_output.shape)}")
        grid = model_output.reshape(*model_output.shape[:-1], self.n_grid, x.shape[-1]).movedim(-2, 1)
        return x.unsqueeze(1) - sigma * grid

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        """One PiFlow step from ``timestep`` (see the class docstring); float32 internally."""
        if isinstance(timestep, int) or (isinstance(timestep, torch.Tensor) and not timestep.is_floating_point()):
            raise ValueError(f"timestep must be one of PiflowScheduler.timesteps (a float), got the integer "
                             f"{timestep!r}")
        i = self._index_for(timestep)
        c = self.config
        shift, eps = float(c.shift), float(c.eps)
        raw_src = self._raw[i]
        raw_dst = self._raw[i + 1] if i + 1 < len(self._raw) else self._raw.new_full((), eps)
        sigma = self.sigmas[i].cpu()
        x = sample.to(torch.float32)
        grid = self._x0_grid(model_output, x, sigma.item())
        # the policy's segment (in the raw time of its own sigma) and the rollout's substeps, in float32
        policy_src = unshifted(sigma, shift)
        policy_dst = (policy_src - (raw_src - raw_dst)).clamp(min=0)
        policy_len = (policy_src - policy_dst).clamp(min=eps)
        span = raw_src - raw_dst
        substeps = max(int((span * c.num_policy_substeps).round()), 1)
        size, raw = span / substeps, raw_src
        last = self.n_grid - 1
        for _ in range(substeps):
            where = ((unshifted(sigma, shift) - policy_dst) / policy_len).clamp(0, 1) * last
            k = min(max(int(where.floor()), 0), last - 1)
            a, b = (k + 1 - where).item(), (where - k).item()
            raw = (raw - size).clamp(min=0)
            sigma_next = shifted(raw, shift)
            ratio = ((sigma_next - sigma) / sigma.clamp(min=eps)).item()
            x = fused(x, [grid[:, k], grid[:, k + 1]], [1.0 + ratio, -ratio * a, -ratio * b])
            sigma = sigma_next
        prev = x.to(sample.dtype)
        self._step_index += 1
        return SchedulerOutput(prev) if return_dict else (prev,)
