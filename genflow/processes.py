"""Diffusion and flow processes: the marginal law ``x_t = alpha(t) x_0 + sigma(t) eps``.

Conventions (DESIGN.md section 2): ``t = 0`` is data, ``t = T`` is noise.

    log_snr(t) = lambda(t) = log(alpha(t) / sigma(t))
    f(t)       = d log alpha / dt
    g2(t)      = d sigma^2 / dt - 2 f(t) sigma(t)^2

so the forward SDE is ``dx = f(t) x dt + sqrt(g2(t)) dW`` and, for ``s < t``,
``x_t | x_s ~ N(alpha_t/alpha_s x_s, (sigma_t^2 - (alpha_t/alpha_s)^2 sigma_s^2) I)``
(Lim, "An Introduction to Generative Modeling with Flows and Diffusion Models", section 6.3.2.5, eqs. 6.51-6.54; Kingma et al. 2021).

Every coefficient method accepts a Python number (returns a Python float, computed in float64)
or a Tensor of any shape (returns a Tensor of that shape on the same device). Tensor results
are float64 for float64 input and float32 otherwise; the arithmetic itself is always done in
float64, so float32 results are correctly rounded float64 values.
"""
import abc
import math
import numbers
from typing import Optional

import numpy as np
import torch

from genflow._cache import value_key
from genflow._checks import check_int, check_real

__all__ = ["Process", "VP", "SubVP", "VE", "CosineVP", "EDM", "LinearPath", "DiscreteVP"]

_F64 = torch.float64
_LOG_2PI = math.log(2.0 * math.pi)
_TINY = 1e-300


# --------------------------------------------------------------------------------------------
# helpers


def _real(name: str, value) -> float:
    """``value`` (a Python, NumPy or 0-d tensor real number) as a finite Python float; a
    ``TypeError``/``ValueError`` naming ``name`` otherwise."""
    return check_real(name, value)


def _check_times(T: float, t_min: float, *, T_max: float = math.inf) -> None:
    if not 0.0 < T <= T_max:
        bound = "" if math.isinf(T_max) else f" and <= {T_max}"
        raise ValueError(f"T must be > 0{bound}, got {T}")
    if not 0.0 <= t_min < T:
        raise ValueError(f"t_min must satisfy 0 <= t_min < T = {T}, got {t_min}")


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    return _F64 if dtype == _F64 else torch.float32


def _apply(fn, t):
    """Run the float64 tensor function ``fn`` on a number or a tensor, matching its kind.

    Python numbers give Python floats; tensors give tensors of the same shape and device,
    float64 for float64 input and float32 otherwise (gradients flow through the cast).
    """
    if isinstance(t, torch.Tensor):
        if t.is_complex():
            raise TypeError("process coefficients are real; got a complex tensor")
        return fn(t.to(_F64)).to(_out_dtype(t.dtype))
    if isinstance(t, numbers.Real) and not isinstance(t, bool):
        return float(fn(torch.tensor(float(t), dtype=_F64)))
    raise TypeError(f"t must be a real number or a torch.Tensor, got {type(t).__name__}")


def _softplus(x: torch.Tensor) -> torch.Tensor:
    """``log(1 + exp(x))`` without torch's threshold approximation (exact in float64)."""
    return torch.logaddexp(x, torch.zeros_like(x))


def _fmt(v: float) -> str:
    return repr(float(v))


# --------------------------------------------------------------------------------------------
# base class


class _Frozen(abc.ABCMeta):
    """Freezes every process once its ``__init__`` has run (see ``Process.__setattr__``)."""

    def __call__(cls, *args, **kwargs):
        process = super().__call__(*args, **kwargs)
        object.__setattr__(process, "_frozen", True)
        return process


class Process(abc.ABC, metaclass=_Frozen):
    """Base class of processes with marginal ``x_t = alpha(t) x_0 + sigma(t) eps``.

    Processes are immutable: their parameters are fixed at construction (assigning one raises
    ``AttributeError``; build a new process instead), and caches of grids and step plans are
    keyed on their values (``cache_key``), so a result computed for one process is never
    returned for another.

    Subclasses implement the float64 tensor primitives ``_alpha``, ``_sigma``, ``_log_snr``,
    ``_t_from_log_snr``, ``_f``, ``_g2`` and ``_dsigma`` (and ``_dalpha`` when ``f * alpha``
    is not safe to evaluate); the public methods wrap them for numbers and tensors.

    Attributes:
        T (float): the noise end of the time interval (samplers start here).
        t_min (float): the smallest time a sampler integrates to.
    """

    T: float = 1.0
    t_min: float = 0.0

    def __setattr__(self, name, value):
        if self.__dict__.get("_frozen", False):
            raise AttributeError(f"{type(self).__name__} is immutable: cannot set {name!r} after construction; "
                                 f"build a new process instead (e.g. {type(self).__name__}({name}=...))")
        object.__setattr__(self, name, value)

    def __delattr__(self, name):
        raise AttributeError(f"{type(self).__name__} is immutable: cannot delete {name!r}")

    def cache_key(self) -> tuple:
        """The process's type and parameter values: equal keys mean equal processes (the key
        of every cache that depends on a process, ``genflow._cache``). Computed once: the
        process is immutable."""
        key = self.__dict__.get("_cache_key")
        if key is None:
            params = tuple((name, value_key(value)) for name, value in sorted(vars(self).items())
                           if name not in ("_frozen", "_cache_key") and not isinstance(value, dict))
            key = (type(self),) + params
            object.__setattr__(self, "_cache_key", key)
        return key

    # -- primitives (float64 tensor in, float64 tensor out) ----------------------------------
    @abc.abstractmethod
    def _alpha(self, t):
        """alpha(t)."""

    @abc.abstractmethod
    def _sigma(self, t):
        """sigma(t)."""

    def _log_snr(self, t):
        return torch.log(self._alpha(t)) - torch.log(self._sigma(t))

    @abc.abstractmethod
    def _t_from_log_snr(self, lam):
        """the time with log_snr(t) = lam."""

    @abc.abstractmethod
    def _f(self, t):
        """f(t) = d log alpha / dt."""

    @abc.abstractmethod
    def _g2(self, t):
        """g2(t) = d sigma^2/dt - 2 f sigma^2."""

    def _dalpha(self, t):
        return self._f(t) * self._alpha(t)

    def _dsigma(self, t):
        raise NotImplementedError

    # -- public API --------------------------------------------------------------------------
    def alpha(self, t):
        """Signal scale ``alpha(t)`` (Tensor[*S] or float, like ``t``)."""
        return _apply(self._alpha, t)

    def sigma(self, t):
        """Noise scale ``sigma(t)`` (Tensor[*S] or float, like ``t``)."""
        return _apply(self._sigma, t)

    def log_snr(self, t):
        """Half log signal-to-noise ratio ``lambda(t) = log(alpha(t) / sigma(t))``."""
        return _apply(self._log_snr, t)

    def t_from_log_snr(self, lam):
        """The time ``t`` with ``log_snr(t) = lam`` (the exact inverse of :meth:`log_snr`)."""
        return _apply(self._t_from_log_snr, lam)

    def f(self, t):
        """Drift coefficient of the forward SDE, ``f(t) = d log alpha / dt``."""
        return _apply(self._f, t)

    def g2(self, t):
        """Squared diffusion coefficient ``g(t)^2 = d sigma^2/dt - 2 f(t) sigma(t)^2``."""
        return _apply(self._g2, t)

    def dalpha(self, t):
        """Time derivative ``d alpha / dt = f(t) alpha(t)``."""
        return _apply(self._dalpha, t)

    def dsigma(self, t):
        """Time derivative ``d sigma / dt``."""
        return _apply(self._dsigma, t)

    def prior_sample(self, shape, *, generator: Optional[torch.Generator] = None,
                     dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        """Draw ``x_T ~ N(0, sigma(T)^2 I)`` of the given ``shape`` (Tensor[*shape])."""
        z = torch.randn(shape, generator=generator, dtype=dtype, device=device)
        return z * self.sigma(self.T)

    def prior_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``log N(x; 0, sigma(T)^2 I)`` of ``x (Tensor[B, *D])`` summed over ``*D`` (Tensor[B])."""
        if not isinstance(x, torch.Tensor) or x.dim() < 1:
            raise ValueError("x must be a tensor with a batch dimension")
        s = self.sigma(self.T)
        x64 = x.to(_F64).reshape(x.shape[0], -1)
        lp = -0.5 * (x64 / s) ** 2 - math.log(s) - 0.5 * _LOG_2PI
        return lp.sum(dim=1).to(_out_dtype(x.dtype))

    def _params(self) -> str:
        return f"T={_fmt(self.T)}, t_min={_fmt(self.t_min)}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._params()})"


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
        return self._t_from_log_alpha(-0.5 * _softplus(-2.0 * lam))

    def _f(self, t):
        return self._dlog_alpha(t)

    def _g2(self, t):
        return -2.0 * self._dlog_alpha(t)

    def _dsigma(self, t):
        # sigma sigma' = -alpha alpha' = -f alpha^2
        m = self._log_alpha(t)
        return -self._dlog_alpha(t) * torch.exp(2.0 * m) / torch.sqrt(-torch.expm1(2.0 * m))


def _check_betas(beta_min, beta_max, T, t_min):
    beta_min = _real("beta_min", beta_min)
    beta_max = _real("beta_max", beta_max)
    T = _real("T", T)
    t_min = _real("t_min", t_min)
    if beta_min < 0.0:
        raise ValueError(f"beta_min must be >= 0, got {beta_min}")
    if not beta_max > beta_min:
        raise ValueError(f"beta_max must be > beta_min = {beta_min}, got {beta_max}")
    _check_times(T, t_min)
    return beta_min, beta_max, T, t_min


class _LinearBeta:
    """Shared math of ``beta(t) = beta_min + t (beta_max - beta_min)``."""

    beta_min: float
    beta_max: float

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
        return 2.0 * c / den.clamp_min(_TINY)

    def _params(self):
        return (f"beta_min={_fmt(self.beta_min)}, beta_max={_fmt(self.beta_max)}, "
                f"T={_fmt(self.T)}, t_min={_fmt(self.t_min)}")


# --------------------------------------------------------------------------------------------
# continuous-time processes


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

    def __init__(self, *, beta_min: float = 0.1, beta_max: float = 20.0, T: float = 1.0,
                 t_min: float = 1e-3):
        self.beta_min, self.beta_max, self.T, self.t_min = _check_betas(beta_min, beta_max, T, t_min)

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

    def __init__(self, *, beta_min: float = 0.1, beta_max: float = 20.0, T: float = 1.0,
                 t_min: float = 1e-3):
        self.beta_min, self.beta_max, self.T, self.t_min = _check_betas(beta_min, beta_max, T, t_min)

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
        self.sigma_min = _real("sigma_min", sigma_min)
        self.sigma_max = _real("sigma_max", sigma_max)
        self.T = _real("T", T)
        self.t_min = _real("t_min", t_min)
        if not self.sigma_min > 0.0:
            raise ValueError(f"sigma_min must be > 0, got {self.sigma_min}")
        if not self.sigma_max > self.sigma_min:
            raise ValueError(f"sigma_max must be > sigma_min = {self.sigma_min}, got {self.sigma_max}")
        _check_times(self.T, self.t_min)
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
        return (f"sigma_min={_fmt(self.sigma_min)}, sigma_max={_fmt(self.sigma_max)}, "
                f"T={_fmt(self.T)}, t_min={_fmt(self.t_min)}")


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
        self.s = _real("s", s)
        self.T = _real("T", T)
        self.t_min = _real("t_min", t_min)
        if self.s < 0.0:
            raise ValueError(f"s must be >= 0, got {self.s}")
        _check_times(self.T, self.t_min, T_max=1.0)
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
        return f"s={_fmt(self.s)}, T={_fmt(self.T)}, t_min={_fmt(self.t_min)}"


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
        self.sigma_min = _real("sigma_min", sigma_min)
        self.sigma_max = _real("sigma_max", sigma_max)
        self.sigma_data = _real("sigma_data", sigma_data)
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
        return (f"sigma_min={_fmt(self.sigma_min)}, sigma_max={_fmt(self.sigma_max)}, "
                f"sigma_data={_fmt(self.sigma_data)}")


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
        self.sigma_min = _real("sigma_min", sigma_min)
        self.T = _real("T", T)
        self.t_min = _real("t_min", t_min)
        if not 0.0 <= self.sigma_min < 1.0:
            raise ValueError(f"sigma_min must satisfy 0 <= sigma_min < 1, got {self.sigma_min}")
        _check_times(self.T, self.t_min, T_max=1.0)

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
        return f"sigma_min={_fmt(self.sigma_min)}, T={_fmt(self.T)}, t_min={_fmt(self.t_min)}"


# --------------------------------------------------------------------------------------------
# discrete-time tables


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
        self.t_min = 1.0 / n if t_min is None else _real("t_min", t_min)
        _check_times(self.T, self.t_min)
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
        b0, b1 = _real("beta_start", beta_start), _real("beta_end", beta_end)
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
        b0, b1 = _real("beta_start", beta_start), _real("beta_end", beta_end)
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
        s = _real("s", s)
        max_beta = _real("max_beta", max_beta)
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
        return _apply(lambda u: u * n - 1.0, t)

    def t_from_timestep(self, i):
        """Time ``t = (i + 1)/N`` of (continuous) timestep index ``i``."""
        n = self.num_train_timesteps
        return _apply(lambda u: (u + 1.0) / n, i)

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
        return lo + (u - i0.to(_F64)) * (hi - lo)

    def _alpha(self, t):
        return torch.exp(-0.5 * _softplus(-2.0 * self._log_snr(t)))

    def _sigma(self, t):
        return torch.exp(-0.5 * _softplus(2.0 * self._log_snr(t)))

    def _t_from_log_snr(self, lam_in):
        lam = self._table_on(lam_in.device)
        n = self.num_train_timesteps
        neg = -lam  # increasing
        x = (-lam_in).clamp(float(neg[0]), float(neg[-1]))
        flat = x.detach().reshape(-1).contiguous()
        j = (torch.searchsorted(neg, flat, right=True) - 1).clamp(0, n - 2).reshape(x.shape)
        w = (x - neg[j]) / (neg[j + 1] - neg[j])
        return (j.to(_F64) + w + 1.0) / n

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
        return -self._dlog_snr(t) * torch.sigmoid(2.0 * lam) * torch.exp(-0.5 * _softplus(2.0 * lam))

    def _params(self):
        abar = self.alphas_cumprod
        return (f"num_train_timesteps={self.num_train_timesteps}, "
                f"alphas_cumprod=[{float(abar[0]):.6g}, ..., {float(abar[-1]):.6g}], "
                f"t_min={_fmt(self.t_min)}")


def _table(name: str, value) -> torch.Tensor:
    try:
        if isinstance(value, torch.Tensor):
            arr = value.detach().to("cpu", _F64)
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
