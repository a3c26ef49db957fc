"""Continuous-time process families: VP, sub-VP, VE, cosine VP, EDM and the straight-line path.

Each class states ``alpha(t)``, ``sigma(t)``, ``f`` and ``g2`` with its reference; the public
coefficient methods come from ``genflow.processes.base.Process``.
"""
import math

import torch

from genflow._checks import check_real
from genflow.processes.base import TINY, Process, check_times, fmt, softplus

__all__ = ["VP", "SubVP", "VE", "CosineVP", "EDM", "LinearPath"]


class _VPFamily(Process):
    """Variance-preserving processes given by ``m(t) = log alpha(t)``: ``sigma^2 = 1 - alpha^2``.

    Subclasses implement ``_log_alpha``, ``_dlog_alpha`` and ``_t_from_log_alpha``.
    """

    def _alpha(self, t):
        return torch.exp(self._log_alpha(t))

    def _sigma(self, t):
        return torch.sqrt(-torch.expm1(2.0 * self._log_alpha(t)))

    def _log_snr(self, t):
        m = self._log_alpha(t)
        return m - 0.5 * torch.log(-torch.expm1(2.0 * m))

    def _t_from_log_snr(self, lam):
        # alpha^2 = sigmoid(2 lam)  =>  log alpha = -softplus(-2 lam) / 2
        return self._t_from_log_alpha(-0.5 * softplus(-2.0 * lam))

    def _f(self, t):
        return self._dlog_alpha(t)

    def _g2(self, t):
        return -2.0 * self._dlog_alpha(t)

    def _dsigma(self, t):
        # sigma sigma' = -alpha alpha' = -f alpha^2
        m = self._log_alpha(t)
        return -self._dlog_alpha(t) * torch.exp(2.0 * m) / torch.sqrt(-torch.expm1(2.0 * m))


def _check_betas(beta_min, beta_max, T, t_min):
    beta_min = check_real("beta_min", beta_min)
    beta_max = check_real("beta_max", beta_max)
    T = check_real("T", T)
    t_min = check_real("t_min", t_min)
    if beta_min < 0.0:
        raise ValueError(f"beta_min must be >= 0, got {beta_min}")
    if not beta_max > beta_min:
        raise ValueError(f"beta_max must be > beta_min = {beta_min}, got {beta_max}")
    check_times(T, t_min)
    return beta_min, beta_max, T, t_min


class _LinearBeta:
    """Shared math of ``beta(t) = beta_min + t (beta_max - beta_min)``."""

    beta_min: float
    beta_max: float

    def __init__(self, *, beta_min: float = 0.1, beta_max: float = 20.0, T: float = 1.0,
                 t_min: float = 1e-3):
        self.beta_min, self.beta_max, self.T, self.t_min = _check_betas(beta_min, beta_max, T, t_min)

    def _log_alpha(self, t):
        # -int_0^t beta / 2 = -(t beta_min / 2 + t^2 (beta_max - beta_min) / 4)
        return -t * (0.5 * self.beta_min + 0.25 * (self.beta_max - self.beta_min) * t)

    def _beta(self, t):
        return self.beta_min + (self.beta_max - self.beta_min) * t

    def _t_from_log_alpha(self, m):
        # solve a t^2 + b t - c = 0 with c = -m >= 0; the root 2c / (b + sqrt(b^2 + 4ac))
        # has no cancellation (b >= 0, a > 0).
        a = 0.25 * (self.beta_max - self.beta_min)
        b = 0.5 * self.beta_min
        c = -m
        den = b + torch.sqrt(b * b + 4.0 * a * c)
        return 2.0 * c / den.clamp_min(TINY)

    def _params(self):
        return (f"beta_min={fmt(self.beta_min)}, beta_max={fmt(self.beta_max)}, "
                f"T={fmt(self.T)}, t_min={fmt(self.t_min)}")


class VP(_LinearBeta, _VPFamily):
    """Variance-preserving SDE with a linear noise rate ``beta(t)``.

    ``beta(t) = beta_min + t (beta_max - beta_min)``,
    ``log alpha(t) = -t^2 (beta_max - beta_min)/4 - t beta_min/2``,
    ``sigma(t) = sqrt(1 - alpha(t)^2)``; ``f = -beta(t)/2``, ``g2 = beta(t)``.

    Reference: Song et al. (2021), "Score-Based Generative Modeling through Stochastic
    Differential Equations", eq. 11 (VP SDE); Lim, "An Introduction to Generative Modeling with Flows and Diffusion Models" section 6.3.

    Args:
        beta_min (float): rate at ``t = 0``, ``>= 0``.
        beta_max (float): rate at ``t = 1``, ``> beta_min``.
        T (float): noise end.
        t_min (float): smallest sampling time, ``0 <= t_min < T``.
    """

    def _dlog_alpha(self, t):
        return -0.5 * self._beta(t)


class SubVP(_LinearBeta, Process):
    """Sub-variance-preserving SDE: VP's ``alpha`` with ``sigma = 1 - alpha^2``.

    ``log alpha(t) = -t^2 (beta_max - beta_min)/4 - t beta_min/2``,
    ``sigma(t) = 1 - alpha(t)^2``; ``f = -beta(t)/2``, ``g2 = beta(t) (1 - alpha(t)^4)``.

    Reference: Song et al. (2021), "Score-Based Generative Modeling through Stochastic
    Differential Equations", eq. 17 (sub-VP SDE); Lim, "An Introduction to Generative Modeling with Flows and Diffusion Models" section 6.3.

    Args:
        beta_min (float): rate at ``t = 0``, ``>= 0``.
        beta_max (float): rate at ``t = 1``, ``> beta_min``.
        T (float): noise end.
        t_min (float): smallest sampling time, ``0 <= t_min < T``.
    """

    def _alpha(self, t):
        return torch.exp(self._log_alpha(t))

    def _sigma(self, t):
        return -torch.expm1(2.0 * self._log_alpha(t))

    def _log_snr(self, t):
        m = self._log_alpha(t)
        return m - torch.log(-torch.expm1(2.0 * m))

    def _t_from_log_snr(self, lam):
        # alpha / (1 - alpha^2) = e^lam  =>  alpha = 2 / (e^-lam + sqrt(e^-2lam + 4)).
        # With v = e^-|lam| in (0, 1] both branches below are finite and cancellation-free.
        v = torch.exp(-lam.abs())
        root = torch.sqrt(v * v + 4.0)
        m_pos = -torch.log1p(0.5 * v + 0.5 * v * v / (root + 2.0))            # lam >= 0
        m_neg = math.log(2.0) + lam - torch.log1p(torch.sqrt(1.0 + 4.0 * v * v))  # lam < 0
        return self._t_from_log_alpha(torch.where(lam >= 0, m_pos, m_neg))

    def _f(self, t):
        return -0.5 * self._beta(t)

    def _g2(self, t):
        return -self._beta(t) * torch.expm1(4.0 * self._log_alpha(t))

    def _dsigma(self, t):
        # d(1 - alpha^2)/dt = -2 f alpha^2 = beta alpha^2
        return self._beta(t) * torch.exp(2.0 * self._log_alpha(t))


class VE(Process):
    """Variance-exploding SDE with a geometric noise scale.

    ``alpha(t) = 1``, ``sigma(t) = sigma_min (sigma_max / sigma_min)^(t / T)``;
    ``f = 0``, ``g2 = 2 sigma(t)^2 log(sigma_max / sigma_min) / T``.
    Note ``sigma(0) = sigma_min > 0``.

    Reference: Song et al. (2021), "Score-Based Generative Modeling through Stochastic
    Differential Equations", eq. 9 (VE SDE); Song & Ermon (2019); Lim, "An Introduction to Generative Modeling with Flows and Diffusion Models" section 6.3.3.

    Args:
        sigma_min (float): noise scale at ``t = 0``, ``> 0``.
        sigma_max (float): noise scale at ``t = T``, ``> sigma_min``.
        T (float): noise end.
        t_min (float): smallest sampling time, ``0 <= t_min < T``.
    """

    def __init__(self, *, sigma_min: float = 0.01, sigma_max: float = 50.0, T: float = 1.0,
                 t_min: float = 0.0):
        self.sigma_min = check_real("sigma_min", sigma_min)
        self.sigma_max = check_real("sigma_max", sigma_max)
        self.T = check_real("T", T)
        self.t_min = check_real("t_min", t_min)
        if not self.sigma_min > 0.0:
            raise ValueError(f"sigma_min must be > 0, got {self.sigma_min}")
        if not self.sigma_max > self.sigma_min:
            raise ValueError(f"sigma_max must be > sigma_min = {self.sigma_min}, got {self.sigma_max}")
        check_times(self.T, self.t_min)
        self._log_ratio = math.log(self.sigma_max) - math.log(self.sigma_min)

    def _log_sigma(self, t):
        return math.log(self.sigma_min) + (self._log_ratio / self.T) * t

    def _alpha(self, t):
        return torch.ones_like(t)

    def _sigma(self, t):
        return torch.exp(self._log_sigma(t))

    def _log_snr(self, t):
        return -self._log_sigma(t)

    def _t_from_log_snr(self, lam):
        return (-lam - math.log(self.sigma_min)) * (self.T / self._log_ratio)

    def _f(self, t):
        return torch.zeros_like(t)

    def _g2(self, t):
        return (2.0 * self._log_ratio / self.T) * torch.exp(2.0 * self._log_sigma(t))

    def _dalpha(self, t):
        return torch.zeros_like(t)

    def _dsigma(self, t):
        return (self._log_ratio / self.T) * torch.exp(self._log_sigma(t))

    def _params(self):
        return (f"sigma_min={fmt(self.sigma_min)}, sigma_max={fmt(self.sigma_max)}, "
                f"T={fmt(self.T)}, t_min={fmt(self.t_min)}")


class CosineVP(_VPFamily):
    """Variance-preserving process with the cosine schedule.

    ``alpha(t) = cos(pi/2 (t + s)/(1 + s)) / cos(pi/2 s/(1 + s))``, ``sigma = sqrt(1 - alpha^2)``;
    ``f = -pi/(2 (1 + s)) tan(pi/2 (t + s)/(1 + s))``, ``g2 = -2 f``. The default ``T = 0.9946``
    keeps ``log_snr(T)`` finite, as in DPM-Solver (Lu et al. 2022).

    Reference: Nichol & Dhariwal (2021), "Improved Denoising Diffusion Probabilistic Models",
    eq. 17.

    Args:
        s (float): offset, ``>= 0``.
        T (float): noise end, ``0 < T <= 1``.
        t_min (float): smallest sampling time, ``0 <= t_min < T``.
    """

    def __init__(self, *, s: float = 0.008, T: float = 0.9946, t_min: float = 1e-3):
        self.s = check_real("s", s)
        self.T = check_real("T", T)
        self.t_min = check_real("t_min", t_min)
        if self.s < 0.0:
            raise ValueError(f"s must be >= 0, got {self.s}")
        check_times(self.T, self.t_min, T_max=1.0)
        self._scale = 0.5 * math.pi / (1.0 + self.s)
        self._log_cos0 = math.log1p(-2.0 * math.sin(0.5 * self._scale * self.s) ** 2)
        self._tan0 = math.tan(self._scale * self.s)

    def _phi(self, t):
        return self._scale * (t + self.s)

    def _log_alpha(self, t):
        # log(cos(phi0 + d) / cos(phi0)) with d = scale t. For small t use
        # cos(phi0 + d)/cos(phi0) = 1 - 2 sin^2(d/2) - tan(phi0) sin(d) (no cancellation);
        # near t = 1 use cos(phi) = sin(scale (1 - t)), which keeps the small value accurate.
        d = self._scale * t
        half = torch.sin(0.5 * d)
        near0 = torch.log1p(-2.0 * half * half - self._tan0 * torch.sin(d))
        near1 = torch.log(torch.sin(self._scale * (1.0 - t))) - self._log_cos0
        return torch.where(t < 0.5, near0, near1)

    def _dlog_alpha(self, t):
        return -self._scale * torch.tan(self._phi(t))

    def _t_from_log_alpha(self, m):
        # Solve cos(phi0 + d) = A cos(phi0), A = e^m, for d = scale t without cancellation:
        # with cos(phi) = A c0 and sin(phi) = sqrt(1 - A^2 c0^2),
        # sin(d) = c0 (1 - A^2) / (sin(phi) + A s0) and cos(d) = A c0^2 + sin(phi) s0.
        c0, s0 = math.cos(self._scale * self.s), math.sin(self._scale * self.s)
        a = torch.exp(m)
        sin_phi = torch.sqrt(-torch.expm1(2.0 * (self._log_cos0 + m)))
        sin_d = c0 * -torch.expm1(2.0 * m) / (sin_phi + a * s0)
        cos_d = a * c0 * c0 + sin_phi * s0
        return torch.atan2(sin_d, cos_d) / self._scale

    def _params(self):
        return f"s={fmt(self.s)}, T={fmt(self.T)}, t_min={fmt(self.t_min)}"


class EDM(Process):
    """The EDM process, whose time is the noise level: ``alpha(t) = 1``, ``sigma(t) = t``.

    ``f = 0``, ``g2 = 2 t``; ``T = sigma_max`` and ``t_min = sigma_min``. ``sigma_data`` is
    kept for the network preconditioning.

    Reference: Karras et al. (2022), "Elucidating the Design Space of Diffusion-Based
    Generative Models", Table 1 (sigma(t) = t, s(t) = 1).

    Args:
        sigma_min (float): smallest noise level, ``> 0``.
        sigma_max (float): largest noise level, ``> sigma_min``.
        sigma_data (float): standard deviation of the data, ``> 0``.
    """

    def __init__(self, *, sigma_min: float = 0.002, sigma_max: float = 80.0,
                 sigma_data: float = 0.5):
        self.sigma_min = check_real("sigma_min", sigma_min)
        self.sigma_max = check_real("sigma_max", sigma_max)
        self.sigma_data = check_real("sigma_data", sigma_data)
        if not self.sigma_min > 0.0:
            raise ValueError(f"sigma_min must be > 0, got {self.sigma_min}")
        if not self.sigma_max > self.sigma_min:
            raise ValueError(f"sigma_max must be > sigma_min = {self.sigma_min}, got {self.sigma_max}")
        if not self.sigma_data > 0.0:
            raise ValueError(f"sigma_data must be > 0, got {self.sigma_data}")
        self.T = self.sigma_max
        self.t_min = self.sigma_min

    def _alpha(self, t):
        return torch.ones_like(t)

    def _sigma(self, t):
        return t.clone()

    def _log_snr(self, t):
        return -torch.log(t)

    def _t_from_log_snr(self, lam):
        return torch.exp(-lam)

    def _f(self, t):
        return torch.zeros_like(t)

    def _g2(self, t):
        return 2.0 * t

    def _dalpha(self, t):
        return torch.zeros_like(t)

    def _dsigma(self, t):
        return torch.ones_like(t)

    def _params(self):
        return (f"sigma_min={fmt(self.sigma_min)}, sigma_max={fmt(self.sigma_max)}, "
                f"sigma_data={fmt(self.sigma_data)}")


class LinearPath(Process):
    """Straight-line (flow-matching / rectified-flow) path between data and noise.

    ``alpha(t) = 1 - t``, ``sigma(t) = sigma_min + (1 - sigma_min) t``;
    ``f = -1/(1 - t)``, ``g2 = 2 (1 - sigma_min) sigma + 2 sigma^2/(1 - t)``.
    ``log_snr`` is ``+inf`` at ``t = 0`` when ``sigma_min = 0`` and ``-inf`` at ``t = 1``.

    Reference: Lipman et al. (2023), "Flow Matching for Generative Modeling", eq. 20 (OT path,
    in the data-at-0 direction); Liu et al. (2023), "Flow Straight and Fast" (rectified flow).

    Args:
        sigma_min (float): noise scale at ``t = 0``, ``0 <= sigma_min < 1``.
        T (float): noise end, ``0 < T <= 1``.
        t_min (float): smallest sampling time, ``0 <= t_min < T``.
    """

    def __init__(self, *, sigma_min: float = 0.0, T: float = 1.0, t_min: float = 0.0):
        self.sigma_min = check_real("sigma_min", sigma_min)
        self.T = check_real("T", T)
        self.t_min = check_real("t_min", t_min)
        if not 0.0 <= self.sigma_min < 1.0:
            raise ValueError(f"sigma_min must satisfy 0 <= sigma_min < 1, got {self.sigma_min}")
        check_times(self.T, self.t_min, T_max=1.0)

    def _alpha(self, t):
        return 1.0 - t

    def _sigma(self, t):
        return self.sigma_min + (1.0 - self.sigma_min) * t

    def _log_snr(self, t):
        return torch.log1p(-t) - torch.log(self._sigma(t))

    def _t_from_log_snr(self, lam):
        # (1 - t) = e^lam (s0 + (1 - s0) t); written with u = e^-|lam| so nothing overflows.
        s0 = self.sigma_min
        u = torch.exp(-lam.abs())
        t_pos = (u - s0) / (u + 1.0 - s0)                  # lam >= 0 (u = e^-lam)
        t_neg = (1.0 - s0 * u) / (1.0 + (1.0 - s0) * u)    # lam < 0  (u = e^lam)
        return torch.where(lam >= 0, t_pos, t_neg)

    def _f(self, t):
        return -1.0 / (1.0 - t)

    def _g2(self, t):
        sig = self._sigma(t)
        return 2.0 * (1.0 - self.sigma_min) * sig + 2.0 * sig * sig / (1.0 - t)

    def _dalpha(self, t):
        return torch.full_like(t, -1.0)

    def _dsigma(self, t):
        return torch.full_like(t, 1.0 - self.sigma_min)

    def _params(self):
        return f"sigma_min={fmt(self.sigma_min)}, T={fmt(self.T)}, t_min={fmt(self.t_min)}"
