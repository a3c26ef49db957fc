"""Discrete-time (DDPM-style) variance-preserving processes given by an ``alphas_cumprod`` table."""
import math
from typing import Optional

import numpy as np
import torch

from genflow._checks import check_int, check_real
from genflow.processes.base import F64, Process, check_times, coefficient, fmt, softplus

__all__ = ["DiscreteVP"]


class DiscreteVP(Process):
    """DDPM-style discrete variance-preserving process, read as a continuous one.

    Index ``i = 0..N-1`` of the table ``abar = alphas_cumprod`` sits at ``t_i = (i + 1)/N``
    (``T = 1``). ``lambda_i = (log abar_i - log(1 - abar_i))/2`` and ``log_snr(t)`` is the
    piecewise-linear interpolation of ``lambda_i`` in ``t``, constant outside ``[1/N, 1]``;
    ``alpha = sqrt(sigmoid(2 lambda))``, ``sigma = sqrt(sigmoid(-2 lambda))``, so
    ``alpha(t_i)^2 = abar_i`` exactly. ``f(t) = lambda'(t) sigmoid(-2 lambda(t))``,
    ``g2 = -2 f`` (at a knot the right-hand slope is used, at ``t = 1`` the left one).

    Reference: Ho et al. (2020), "Denoising Diffusion Probabilistic Models", eq. 4 (the
    tables); Lim, "An Introduction to Generative Modeling with Flows and Diffusion Models" sections 6.3.2.3-6.3.2.5 (the continuous-time reading via the SNR).
    DPM-Solver (Lu et al. 2022) interpolates ``log alpha`` instead; interpolating the
    log-SNR makes ``t_from_log_snr`` an exact piecewise-linear inverse.

    Args:
        alphas_cumprod (Tensor[N] | array | list): strictly decreasing values in ``(0, 1)``,
            as ``diffusers`` schedulers store them.
        t_min (float, optional): smallest sampling time, default ``1/N``.
    """

    def __init__(self, alphas_cumprod, *, t_min: Optional[float] = None):
        abar = _table("alphas_cumprod", alphas_cumprod)
        n = abar.shape[0]
        self._alphas_cumprod = abar
        self.num_train_timesteps = n
        self.T = 1.0
        self.t_min = 1.0 / n if t_min is None else check_real("t_min", t_min)
        check_times(self.T, self.t_min)
        self._lam = 0.5 * (torch.log(abar) - torch.log1p(-abar))
        if not bool((self._lam[1:] < self._lam[:-1]).all()):
            raise ValueError("alphas_cumprod must give a strictly decreasing log-SNR "
                             "(values too close to 0 or 1 to resolve in float64)")
        self._lam_cache = {}

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """The table (float64 [N]), a copy: the process itself cannot be changed through it."""
        return self._alphas_cumprod.clone()

    # -- table constructors ------------------------------------------------------------------
    @classmethod
    def linear(cls, num_train_timesteps: int = 1000, beta_start: float = 1e-4,
               beta_end: float = 0.02, *, dtype: torch.dtype = torch.float32,
               t_min: Optional[float] = None) -> "DiscreteVP":
        """DDPM's linear betas: ``betas = linspace(beta_start, beta_end, N)``,
        ``alphas_cumprod = cumprod(1 - betas)`` (computed in ``dtype``; float32 reproduces the
        tables of ``diffusers``' ``beta_schedule="linear"``). Ho et al. (2020), section 4."""
        n = _num_steps(num_train_timesteps)
        b0, b1 = check_real("beta_start", beta_start), check_real("beta_end", beta_end)
        _check_beta_range(b0, b1)
        betas = torch.linspace(b0, b1, n, dtype=dtype)
        return cls(torch.cumprod(1.0 - betas, dim=0), t_min=t_min)

    @classmethod
    def scaled_linear(cls, num_train_timesteps: int = 1000, beta_start: float = 0.00085,
                      beta_end: float = 0.012, *, dtype: torch.dtype = torch.float32,
                      t_min: Optional[float] = None) -> "DiscreteVP":
        """Latent-diffusion betas: ``betas = linspace(sqrt(beta_start), sqrt(beta_end), N)^2``,
        ``alphas_cumprod = cumprod(1 - betas)`` (``diffusers``' ``"scaled_linear"``)."""
        n = _num_steps(num_train_timesteps)
        b0, b1 = check_real("beta_start", beta_start), check_real("beta_end", beta_end)
        _check_beta_range(b0, b1)
        betas = torch.linspace(math.sqrt(b0), math.sqrt(b1), n, dtype=dtype) ** 2
        return cls(torch.cumprod(1.0 - betas, dim=0), t_min=t_min)

    @classmethod
    def cosine(cls, num_train_timesteps: int = 1000, *, s: float = 0.008,
               max_beta: float = 0.999, dtype: torch.dtype = torch.float32,
               t_min: Optional[float] = None) -> "DiscreteVP":
        """Nichol & Dhariwal (2021) eq. 17 as a table (``diffusers``' ``"squaredcos_cap_v2"``):
        ``beta_i = min(1 - abar(t_{i+1})/abar(t_i), max_beta)`` with
        ``abar(t) = cos(pi/2 (t + s)/(1 + s))^2``, ``t_i = i/N``, then
        ``alphas_cumprod = cumprod(1 - betas)``."""
        n = _num_steps(num_train_timesteps)
        s = check_real("s", s)
        max_beta = check_real("max_beta", max_beta)
        if s < 0.0:
            raise ValueError(f"s must be >= 0, got {s}")
        if not 0.0 < max_beta < 1.0:
            raise ValueError(f"max_beta must be in (0, 1), got {max_beta}")
        grid = np.arange(n + 1, dtype=np.float64) / n
        abar = np.cos((grid + s) / (1.0 + s) * (0.5 * math.pi)) ** 2
        betas = np.minimum(1.0 - abar[1:] / abar[:-1], max_beta)
        betas = torch.as_tensor(betas).to(dtype)
        return cls(torch.cumprod(1.0 - betas, dim=0), t_min=t_min)

    # -- index <-> time ----------------------------------------------------------------------
    def timestep(self, t):
        """The network's continuous timestep index ``i = t N - 1`` of time ``t``."""
        n = self.num_train_timesteps
        return coefficient(lambda u: u * n - 1.0, t)

    def t_from_timestep(self, i):
        """Time ``t = (i + 1)/N`` of (continuous) timestep index ``i``."""
        n = self.num_train_timesteps
        return coefficient(lambda u: (u + 1.0) / n, i)

    # -- primitives --------------------------------------------------------------------------
    def _table_on(self, device) -> torch.Tensor:
        lam = self._lam_cache.get(device)
        if lam is None:
            lam = self._lam.to(device)
            self._lam_cache[device] = lam
        return lam

    def _segment(self, t):
        """Index ``i0`` of the segment holding ``t``, the clamped fractional index ``u``, and
        whether ``t`` lies inside ``[1/N, 1]``."""
        n = self.num_train_timesteps
        u = t * n - 1.0
        inside = (u >= 0.0) & (u <= n - 1.0)
        u = u.clamp(0.0, n - 1.0)
        i0 = torch.floor(u.detach()).clamp(max=n - 2).long()
        return i0, u, inside

    def _log_snr(self, t):
        lam = self._table_on(t.device)
        i0, u, _ = self._segment(t)
        lo, hi = lam[i0], lam[i0 + 1]
        return lo + (u - i0.to(F64)) * (hi - lo)

    def _alpha(self, t):
        return torch.exp(-0.5 * softplus(-2.0 * self._log_snr(t)))

    def _sigma(self, t):
        return torch.exp(-0.5 * softplus(2.0 * self._log_snr(t)))

    def _t_from_log_snr(self, lam_in):
        lam = self._table_on(lam_in.device)
        n = self.num_train_timesteps
        neg = -lam  # increasing
        x = (-lam_in).clamp(float(neg[0]), float(neg[-1]))
        flat = x.detach().reshape(-1).contiguous()
        j = (torch.searchsorted(neg, flat, right=True) - 1).clamp(0, n - 2).reshape(x.shape)
        w = (x - neg[j]) / (neg[j + 1] - neg[j])
        return (j.to(F64) + w + 1.0) / n

    def _dlog_snr(self, t):
        lam = self._table_on(t.device)
        i0, _, inside = self._segment(t)
        slope = (lam[i0 + 1] - lam[i0]) * float(self.num_train_timesteps)
        return torch.where(inside, slope, torch.zeros_like(slope))

    def _f(self, t):
        return self._dlog_snr(t) * torch.sigmoid(-2.0 * self._log_snr(t))

    def _g2(self, t):
        return -2.0 * self._f(t)

    def _dsigma(self, t):
        # sigma^2 = sigmoid(-2 lam)  =>  sigma' = -lam' sigmoid(2 lam) sigma
        lam = self._log_snr(t)
        return -self._dlog_snr(t) * torch.sigmoid(2.0 * lam) * torch.exp(-0.5 * softplus(2.0 * lam))

    def _params(self):
        abar = self.alphas_cumprod
        return (f"num_train_timesteps={self.num_train_timesteps}, "
                f"alphas_cumprod=[{float(abar[0]):.6g}, ..., {float(abar[-1]):.6g}], "
                f"t_min={fmt(self.t_min)}")


def _table(name: str, value) -> torch.Tensor:
    try:
        if isinstance(value, torch.Tensor):
            arr = value.detach().to("cpu", F64)
        else:
            arr = torch.as_tensor(np.asarray(value, dtype=np.float64))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a 1-D sequence of numbers: {err}") from None
    if arr.dim() != 1 or arr.shape[0] < 2:
        raise ValueError(f"{name} must be 1-D with at least 2 entries, got shape {tuple(arr.shape)}")
    if not bool(torch.isfinite(arr).all()) or not bool(((arr > 0) & (arr < 1)).all()):
        raise ValueError(f"{name} must lie in the open interval (0, 1)")
    if not bool((arr[1:] < arr[:-1]).all()):
        raise ValueError(f"{name} must be strictly decreasing")
    return arr.contiguous()


def _num_steps(n) -> int:
    return check_int("num_train_timesteps", n, low=2)


def _check_beta_range(b0: float, b1: float) -> None:
    if not 0.0 < b0 < 1.0:
        raise ValueError(f"beta_start must be in (0, 1), got {b0}")
    if not b0 <= b1 < 1.0:
        raise ValueError(f"beta_end must satisfy beta_start <= beta_end < 1, got {b1}")
