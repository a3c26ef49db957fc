"""Models: a network plus the prediction kind it was trained for, convertible to any other kind.

Every kind is linear in ``(x0, eps)`` given ``x_t = alpha x0 + sigma eps`` (Lim, "An Introduction to Generative Modeling with Flows and Diffusion Models", Table 6.1):

    eps      = 0 * x0 + 1 * eps
    x0       = 1 * x0 + 0 * eps
    score    = -eps / sigma
    v        = alpha * eps - sigma * x0                  (Salimans & Ho 2022)
    velocity = alpha'(t) * x0 + sigma'(t) * eps          (the probability-flow ODE drift)

so converting a network output ``out`` of kind ``src`` to kind ``dst`` is ``a * x_t + b * out``
with scalars ``(a, b) = conversion(src, dst, ...)``. Solvers fold these scalars into their
step coefficients instead of materialising converted tensors.
"""
from typing import Callable, Union

import torch
from genflow._checks import did_you_mean

__all__ = ["KINDS", "Model", "basis", "conversion"]

KINDS = ("eps", "x0", "score", "v", "velocity")


def _kind_error(name: str, value) -> ValueError:
    """``ValueError`` for an unknown prediction kind, with a did-you-mean hint."""
    hint = did_you_mean(str(value), KINDS)
    return ValueError(f"{name} must be one of {KINDS}, got {value!r}{hint}")


def basis(kind, alpha, sigma, dalpha, dsigma):
    """``(p, q)`` with the prediction ``kind = p x0 + q eps`` at ``x_t = alpha x0 + sigma eps`` (every
    conversion goes through this basis; Lim, "An Introduction to Generative Modeling with Flows and
    Diffusion Models", Table 6.1, plus v and velocity)."""
    if kind == "eps":
        return 0.0, 1.0
    if kind == "x0":
        return 1.0, 0.0
    if kind == "score":
        return 0.0, -1.0 / sigma
    if kind == "v":
        return -sigma, alpha
    if kind == "velocity":
        return dalpha, dsigma
    raise _kind_error("prediction kind", kind)


def conversion(src, dst, alpha, sigma, dalpha=0.0, dsigma=0.0):
    """Coefficients ``(a, b)`` with ``dst = a * x_t + b * src_output``.

    Solves ``x_t = alpha x0 + sigma eps`` and ``out = p x0 + q eps`` for ``(x0, eps)``:
    with ``D = alpha q - sigma p``, ``x0 = (q x_t - sigma out) / D`` and
    ``eps = (alpha out - p x_t) / D``. Arguments may be floats or per-sample tensors.
    ``dalpha``/``dsigma`` (time derivatives) are needed only when ``velocity`` is involved.
    """
    if src == dst:
        basis(src, alpha, sigma, dalpha, dsigma)  # validates the name
        return 0.0, 1.0
    p, q = basis(src, alpha, sigma, dalpha, dsigma)
    p2, q2 = basis(dst, alpha, sigma, dalpha, dsigma)
    det = alpha * q - sigma * p
    return (p2 * q - q2 * p) / det, (q2 * alpha - p2 * sigma) / det


def _time_vector(t, x: torch.Tensor) -> torch.Tensor:
    """``t`` (float, 0-d or [B] tensor) as a float64 [B] tensor on x's device."""
    batch = x.shape[0]
    t = torch.as_tensor(t, dtype=torch.float64, device=x.device)
    if t.dim() == 0:
        return t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"t must be a scalar or have shape [{batch}] (the batch), got {tuple(t.shape)}")
    return t


def _per_sample(coef, x: torch.Tensor):
    """A float or [B] coefficient shaped to broadcast against x, in x's dtype."""
    if isinstance(coef, torch.Tensor):
        return coef.to(x.dtype).reshape((-1,) + (1,) * (x.dim() - 1))
    return coef


class Model:
    """A network ``net(x, t, **cond)`` trained to predict one kind, converted to any other.

    Args:
        net: callable ``net(x (Tensor[B, *D]), t (Tensor[B]), **cond) -> Tensor[B, *D]``.
            ``t`` is float64 when ``x`` is float64, else float32.
        process: the noising process (``genflow.processes``) the network was trained under.
        prediction: what ``net`` outputs: one of ``eps``, ``x0``, ``score``, ``v``, ``velocity``.
        time: how the network reads time: ``"native"`` (the process's ``t``), ``"reversed"``
            (``T - t``: flow-matching networks trained with data at ``t = 1``), or a callable
            mapping the process time tensor to the network's (e.g. ``DiscreteVP.timestep``).
        **cond: default conditioning keyword arguments passed to ``net`` on every call.
    """

    def __init__(self, net: Callable, process, prediction: str = "eps", *,
                 time: Union[str, Callable] = "native", **cond):
        if not callable(net):
            raise TypeError(f"net must be callable, got {type(net).__name__}")
        if prediction not in KINDS:
            raise _kind_error("prediction", prediction)
        if not (time in ("native", "reversed") or callable(time)):
            raise ValueError(f"time must be 'native', 'reversed' or a callable, got {time!r}")
        self.net = net
        self.process = process
        self.prediction = prediction
        self.time = time
        self.cond = cond

    def __repr__(self):
        return f"Model(net={self.net!r}, process={self.process!r}, prediction={self.prediction!r})"

    def net_time(self, t: torch.Tensor) -> torch.Tensor:
        """Map process time (float64 [B]) to the time the network expects."""
        if self.time == "native":
            return t
        if self.time == "reversed":
            return self.process.T - t
        return self.time(t)

    def prepare_time(self, t, x: torch.Tensor) -> torch.Tensor:
        """The time tensor ``net`` receives for process time ``t`` and batch ``x``: [B], mapped
        by ``time``, float64 when x is float64 else float32."""
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        if type(t) is float and self.time in ("native", "reversed"):  # the common, fast case
            value = t if self.time == "native" else self.process.T - t
            return torch.full((x.shape[0],), value, dtype=dtype, device=x.device)
        t = _time_vector(t, x)
        return self.net_time(t).to(dtype)

    def raw(self, x: torch.Tensor, t, **cond) -> torch.Tensor:
        """The network's own output (kind ``self.prediction``) at ``(x, t)``."""
        return self.call(x, self.prepare_time(t, x), **cond)

    def call(self, x: torch.Tensor, t_net: torch.Tensor, **cond) -> torch.Tensor:
        """``net(x, t_net, **cond)`` with ``t_net`` from ``prepare_time``, output checked."""
        out = self.net(x, t_net, **{**self.cond, **cond}) if cond else self.net(x, t_net, **self.cond)
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"net must return a tensor shaped like x {tuple(x.shape)}, got {got}")
        return out

    def coefficients(self, dst: str, t):
        """``(a, b)`` with ``dst = a * x_t + b * raw(x_t, t)``; floats for float t, else [B]."""
        p = self.process
        if dst == "velocity" or self.prediction == "velocity":
            return conversion(self.prediction, dst, p.alpha(t), p.sigma(t), p.dalpha(t), p.dsigma(t))
        return conversion(self.prediction, dst, p.alpha(t), p.sigma(t))

    def predict(self, x: torch.Tensor, t, kind: str, **cond) -> torch.Tensor:
        """The model's prediction of ``kind`` at ``(x, t)``."""
        out = self.raw(x, t, **cond)
        if kind == self.prediction:
            return out
        t64 = _time_vector(t, x)
        a, b = self.coefficients(kind, t64)
        return _per_sample(a, x) * x + _per_sample(b, x) * out

    def eps(self, x, t, **cond):
        """Predicted noise ``eps``."""
        return self.predict(x, t, "eps", **cond)

    def x0(self, x, t, **cond):
        """Predicted clean data ``x0`` (the denoiser ``E[x0 | x_t]``)."""
        return self.predict(x, t, "x0", **cond)

    def score(self, x, t, **cond):
        """Predicted score ``grad log q_t(x) = -eps / sigma``."""
        return self.predict(x, t, "score", **cond)

    def v(self, x, t, **cond):
        """Predicted ``v = alpha eps - sigma x0``."""
        return self.predict(x, t, "v", **cond)

    def velocity(self, x, t, **cond):
        """Predicted probability-flow velocity ``alpha' x0 + sigma' eps``."""
        return self.predict(x, t, "velocity", **cond)
