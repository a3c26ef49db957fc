"""The process base class and the float64 coefficient plumbing shared by every process family.

Conventions (DESIGN.md section 2) are in ``genflow.processes``; ``coefficient`` runs a float64
tensor primitive on a number or a tensor, and ``Process`` freezes a process after construction
and keys caches on its parameter values (``cache_key``).
"""
import abc
import math
import numbers
from typing import Optional

import torch

from genflow._cache import value_key

__all__ = ["Process", "coefficient", "check_times", "fmt", "out_dtype", "softplus", "F64", "TINY"]

F64 = torch.float64
LOG_2PI = math.log(2.0 * math.pi)
TINY = 1e-300


def check_times(T: float, t_min: float, *, T_max: float = math.inf) -> None:
    """A ``ValueError`` unless ``0 < T <= T_max`` and ``0 <= t_min < T``."""
    if not 0.0 < T <= T_max:
        bound = "" if math.isinf(T_max) else f" and <= {T_max}"
        raise ValueError(f"T must be > 0{bound}, got {T}")
    if not 0.0 <= t_min < T:
        raise ValueError(f"t_min must satisfy 0 <= t_min < T = {T}, got {t_min}")


def out_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of a coefficient tensor for an input of ``dtype``: float64 stays, else float32."""
    return F64 if dtype == F64 else torch.float32


def coefficient(fn, t):
    """Run the float64 tensor function ``fn`` on a number or a tensor, matching its kind.

    Python numbers give Python floats; tensors give tensors of the same shape and device,
    float64 for float64 input and float32 otherwise (gradients flow through the cast).
    """
    if isinstance(t, torch.Tensor):
        if t.is_complex():
            raise TypeError("process coefficients are real; got a complex tensor")
        return fn(t.to(F64)).to(out_dtype(t.dtype))
    if isinstance(t, numbers.Real) and not isinstance(t, bool):
        return float(fn(torch.tensor(float(t), dtype=F64)))
    raise TypeError(f"t must be a real number or a torch.Tensor, got {type(t).__name__}")


def softplus(x: torch.Tensor) -> torch.Tensor:
    """``log(1 + exp(x))`` without torch's threshold approximation (exact in float64)."""
    return torch.logaddexp(x, torch.zeros_like(x))


def fmt(v: float) -> str:
    """A parameter value as ``repr`` shows it."""
    return repr(float(v))


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
        return coefficient(self._alpha, t)

    def sigma(self, t):
        """Noise scale ``sigma(t)`` (Tensor[*S] or float, like ``t``)."""
        return coefficient(self._sigma, t)

    def log_snr(self, t):
        """Half log signal-to-noise ratio ``lambda(t) = log(alpha(t) / sigma(t))``."""
        return coefficient(self._log_snr, t)

    def t_from_log_snr(self, lam):
        """The time ``t`` with ``log_snr(t) = lam`` (the exact inverse of :meth:`log_snr`)."""
        return coefficient(self._t_from_log_snr, lam)

    def f(self, t):
        """Drift coefficient of the forward SDE, ``f(t) = d log alpha / dt``."""
        return coefficient(self._f, t)

    def g2(self, t):
        """Squared diffusion coefficient ``g(t)^2 = d sigma^2/dt - 2 f(t) sigma(t)^2``."""
        return coefficient(self._g2, t)

    def dalpha(self, t):
        """Time derivative ``d alpha / dt = f(t) alpha(t)``."""
        return coefficient(self._dalpha, t)

    def dsigma(self, t):
        """Time derivative ``d sigma / dt``."""
        return coefficient(self._dsigma, t)

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
        x64 = x.to(F64).reshape(x.shape[0], -1)
        lp = -0.5 * (x64 / s) ** 2 - math.log(s) - 0.5 * LOG_2PI
        return lp.sum(dim=1).to(out_dtype(x.dtype))

    def _params(self) -> str:
        return f"T={fmt(self.T)}, t_min={fmt(self.t_min)}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._params()})"
