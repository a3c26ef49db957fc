"""diffusers' sigma grids (Karras, exponential, beta), the sigma-to-timestep interpolation and the
base of the k-diffusion style "discrete" schedulers (Euler, Euler ancestral, Heun, LMS).

The grids are computed as diffusers computes them (NumPy float64, then float32), so ``sigmas``
and ``timesteps`` are bitwise diffusers'.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from genflow.schedules import karras_levels

from ._base import TIMESTEP_SPACINGS, Scheduler, cached_schedule, check_steps, fused, grid_plans

__all__ = ["sigma_to_t", "karras_sigmas", "exponential_sigmas", "beta_sigmas", "SigmaScheduler", "SIGMA_GRIDS"]


# ---------------------------------------------------------------- sigma grids (k-diffusion style)

def sigma_to_t(sigma, log_sigmas) -> np.ndarray:
    """Fractional training timesteps of ``sigma``: the index into the training table found by
    linear interpolation of ``log sigma`` (clipped to the table's range), as diffusers does.

    Args:
        sigma (array [N]): noise levels (``sigma = sqrt((1 - abar) / abar)``).
        log_sigmas (array [num_train_timesteps]): ``log`` of the training table's sigmas (increasing).

    Returns:
        np.ndarray[N], in NumPy's promotion of the two inputs' dtypes (as diffusers computes it).
    """
    sigma = np.asarray(sigma)
    log_sigmas = np.asarray(log_sigmas)
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    above = (log_sigma - log_sigmas[:, None]) >= 0
    low = np.cumsum(above, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = np.clip((lo - log_sigma) / (lo - hi), 0.0, 1.0)
    return ((1.0 - w) * low + w * (low + 1)).reshape(sigma.shape)


def _sigma_range(in_sigmas, sigma_min, sigma_max):
    lo = float(in_sigmas[-1]) if sigma_min is None else float(sigma_min)
    hi = float(in_sigmas[0]) if sigma_max is None else float(sigma_max)
    return lo, hi


def karras_sigmas(in_sigmas, num_inference_steps: int, *, sigma_min=None, sigma_max=None,
                  rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) eq. 5: ``sigma_i = (smax^(1/rho) + i/(n-1) (smin^(1/rho) - smax^(1/rho)))^rho``,
    with ``smin``/``smax`` the ends of ``in_sigmas`` (decreasing) unless given. float64 [n]."""
    lo, hi = _sigma_range(in_sigmas, sigma_min, sigma_max)
    return karras_levels(np.linspace(0, 1, num_inference_steps), lo, hi, rho)


def exponential_sigmas(in_sigmas, num_inference_steps: int, *, sigma_min=None, sigma_max=None) -> np.ndarray:
    """Log-uniform sigmas from ``smax`` down to ``smin`` (float64 [n])."""
    lo, hi = _sigma_range(in_sigmas, sigma_min, sigma_max)
    return np.exp(np.linspace(math.log(hi), math.log(lo), num_inference_steps))


def beta_sigmas(in_sigmas, num_inference_steps: int, *, sigma_min=None, sigma_max=None,
                alpha: float = 0.6, beta: float = 0.6) -> np.ndarray:
    """``sigma_i = smin + ppf(1 - i/(n-1)) (smax - smin)`` with the Beta(alpha, beta) quantile
    function (Lee et al. 2024, "Beta Sampling is All You Need"). float64 [n]; needs scipy."""
    from scipy.stats import beta as beta_dist

    lo, hi = _sigma_range(in_sigmas, sigma_min, sigma_max)
    ppf = beta_dist.ppf(1 - np.linspace(0, 1, num_inference_steps), alpha, beta)
    return np.array([lo + p * (hi - lo) for p in ppf])


# ---------------------------------------------------------------- the k-diffusion style family

SIGMA_GRIDS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")


class SigmaScheduler(Scheduler):
    """Base of diffusers' "discrete" k-diffusion style schedulers (Euler, Euler ancestral, Heun, LMS).

    They integrate in the variance-exploding variables ``y = x / alpha``, ``sigma = sqrt((1 - abar)
    / abar)`` (Karras et al. 2022, section 2 and Table 1, the "VP as VE" reading), with the model
    fed ``scale_model_input(x) = x / sqrt(sigma^2 + 1)``. ``sigmas`` (float32 [n + 1], ending with
    0, on the CPU) and ``timesteps`` (float32 [n], fractional training timesteps) are diffusers'.
    ``init_noise_sigma`` is ``max sigma`` (``"linspace"``/``"trailing"`` spacing) or
    ``sqrt(max sigma^2 + 1)`` (``"leading"``), a 0-dim tensor as in diffusers;
    ``add_noise`` is ``x0 + sigma noise``.
    """

    def _train_sigmas(self) -> np.ndarray:
        """``sqrt((1 - abar)/abar)`` of the training table (float32 [N], increasing), computed
        in float32 as diffusers computes it."""
        return (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).numpy()

    def _spaced_timesteps(self, num_inference_steps: int, num_train_timesteps: Optional[int] = None) -> np.ndarray:
        """Fractional timesteps (float32 [n], decreasing) by ``timestep_spacing``: ``"linspace"``
        ``linspace(0, N - 1, n)``, ``"leading"`` ``i (N // n) + steps_offset``, ``"trailing"``
        ``round(N - i N / n) - 1``."""
        n_train = num_train_timesteps or self.config.num_train_timesteps
        check_steps(num_inference_steps, n_train)
        spacing = self.config.timestep_spacing
        if spacing == "linspace":
            return np.linspace(0, n_train - 1, num_inference_steps, dtype=np.float32)[::-1].copy()
        if spacing == "leading":
            ratio = n_train // num_inference_steps
            t = (np.arange(0, num_inference_steps) * ratio).round()[::-1].copy().astype(np.float32)
            return t + np.float32(self.config.steps_offset)
        if spacing == "trailing":
            t = np.arange(n_train, 0, -n_train / num_inference_steps).round().astype(np.float32)
            return t - np.float32(1)
        raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {spacing!r}")

    def _check_sigma_grid_flags(self) -> None:
        if sum(bool(self.config.get(flag, False)) for flag in SIGMA_GRIDS) > 1:
            raise ValueError(f"at most one of {SIGMA_GRIDS} may be True, got "
                             f"{ {f: self.config.get(f) for f in SIGMA_GRIDS} }")

    def _regrid(self, sigmas: np.ndarray, log_sigmas: np.ndarray, num_inference_steps: int):
        """Replace ``sigmas`` by the Karras / exponential / beta grid when configured; returns
        ``(sigmas, timesteps)`` (timesteps None when unchanged)."""
        bounds = dict(sigma_min=self.config.get("sigma_min"), sigma_max=self.config.get("sigma_max"))
        if self.config.get("use_karras_sigmas", False):
            sigmas = karras_sigmas(sigmas, num_inference_steps, **bounds)
        elif self.config.get("use_exponential_sigmas", False):
            sigmas = exponential_sigmas(sigmas, num_inference_steps, **bounds)
        elif self.config.get("use_beta_sigmas", False):
            sigmas = beta_sigmas(sigmas, num_inference_steps, **bounds)
        else:
            return sigmas, None
        return sigmas, np.array([sigma_to_t(s, log_sigmas) for s in sigmas])

    def _set_sigmas(self, sigmas: torch.Tensor) -> None:
        """Store ``sigmas`` (float32, on the CPU as diffusers keeps them) and their float64 values."""
        self.sigmas = sigmas.to("cpu")
        self._sig = self.sigmas.double().tolist()
        self._plans = grid_plans(self, self._sig)

    def _set_schedule(self, arguments: tuple, build) -> None:
        """Set ``timesteps`` and ``sigmas`` from ``build() -> (timesteps, sigmas)``, built once per
        config and ``set_timesteps`` ``arguments`` (``_base.cached_schedule``; the stored tensors
        are copies of the shared ones)."""
        def schedule():
            timesteps, sigmas = build()
            sigmas = sigmas.to("cpu")
            sig = sigmas.double().tolist()
            return timesteps, sigmas, sig, grid_plans(self, sig)
        timesteps, sigmas, self._sig, self._plans = cached_schedule(self, arguments, schedule)
        self.timesteps, self.sigmas = timesteps.clone(), sigmas.clone()

    @property
    def init_noise_sigma(self) -> torch.Tensor:
        sigma_max = self.sigmas.max()
        if self.config.timestep_spacing in ("linspace", "trailing"):
            return sigma_max
        return (sigma_max ** 2 + 1) ** 0.5

    def _check_float_timestep(self, timestep) -> None:
        if isinstance(timestep, int) or (isinstance(timestep, torch.Tensor) and not timestep.is_floating_point()):
            raise ValueError(f"timestep must be one of {type(self).__name__}.timesteps (a float), got the integer "
                             f"{timestep!r}; pass the schedule's values, not indices from enumerate(timesteps)")

    def scale_model_input(self, sample: torch.Tensor, timestep=None, *args, **kwargs) -> torch.Tensor:
        """The network input ``sample / sqrt(sigma^2 + 1)`` (Tensor[B, *D]) at ``timestep``."""
        return self.scaled_input(sample, timestep, lambda i: 1.0 / math.sqrt(self._sig[i] * self._sig[i] + 1.0))

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """``x = x0 + sigma noise`` with sigma at ``timesteps`` (Tensor[B], values of
        ``self.timesteps``; at ``begin_index`` or the current step once those are set)."""
        sigma = torch.tensor([self._sig[i] for i in self._noise_indices(timesteps)], dtype=torch.float64)
        return fused(original_samples, [noise], [1.0, sigma if sigma.numel() > 1 else float(sigma[0])])

    def _noise_indices(self, timesteps) -> list:
        """Schedule indices for ``add_noise``: looked up per timestep, or diffusers' shortcut to the
        current / begin index once a pipeline set ``begin_index``."""
        timesteps = torch.as_tensor(timesteps).reshape(-1)
        if self._begin_index is None:
            return [self.index_for_timestep(t) for t in timesteps]
        index = self._step_index if self._step_index is not None else self._begin_index
        return [index] * timesteps.shape[0]
