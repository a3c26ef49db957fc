"""Brownian motion for ``gf.SDE`` solves: the increments ``dW`` (and, for the stochastic
Runge–Kutta schemes, the time integral ``I_(1,0)``) that the SDE schemes step with.

Three sources, built by ``make_brownian`` from ``gf.solve``'s ``generator=`` and ``brownian=``:

- ``PhiloxBrownian`` (``brownian=None``): independent Philox draws, ``dW = sqrt(|dt|) z`` with
  ``z = N(seed, offset)`` (genflow's counter-based stream, ``genflow.ops.randn``), a fresh
  offset per draw and optionally one seed per sample (a sample's path never depends on its
  batch). The fixed-grid schemes ask once per step, so this is exact Brownian motion on the
  grid; with ``kernel_noise`` a scheme hands ``(seed, offset)`` to the fused update and the
  noise is made inside the kernel (no noise tensor).
- ``TreeBrownian`` (``brownian="brownian_tree"``): one Brownian path ``W(t)`` on
  ``[min(t0, t1), max(t0, t1)]`` per sample, queried at any times: the Philox Brownian tree
  of ``genflow.noise.BrownianTreeNoise`` (Li et al. 2020, §4) over ``t``, with exact Brownian
  bridge refinement, so refining a grid leaves the coarse increments unchanged and a rejected
  adaptive step is retried on the same path.
- ``UserBrownian`` (a callable ``W(ta, tb) -> W(tb) - W(ta)``, ``ta <= tb``): e.g. torchsde's
  ``BrownianInterval``/``BrownianPath``, so genflow and torchsde integrate the same path. With
  ``levy_area_approximation="space-time"`` it also answers ``W(ta, tb, return_U=True)``, which
  gives the SRA/SRI schemes their ``I_(1,0)`` as torchsde's ``srk`` uses it.

Time runs either way: for ``t_to < t_from`` the increment is ``W(t_to) - W(t_from)`` (a
time-reversed Brownian motion is again one), with variance ``|t_to - t_from|``.

Shapes follow ``gf.SDE.brownian_shape(y)``: ``[B, *D]`` (diagonal, additive), ``[B]``
(scalar), ``[B, m]`` (general). Times are Python floats (a shared grid) or float64 ``[B]``
tensors (per-sample times; Philox and the tree only).
"""
import math
from typing import Callable

import torch

from genflow._checks import did_you_mean
from genflow.engine.terms import SDE
from genflow.noise import BrownianTreeNoise, generator_seed
from genflow.ops.fused_update import randn, seed_tensor

__all__ = ["BROWNIAN_KINDS", "PhiloxBrownian", "TreeBrownian", "UserBrownian", "make_brownian", "rows"]

BROWNIAN_KINDS = ("philox", "brownian_tree")


def rows(v, like: torch.Tensor):
    """A float as is, or a per-sample ``[B]`` tensor viewed ``[B, 1, ...]`` on ``like``'s dtype and
    device, so that it scales the rows of ``like``."""
    if not isinstance(v, torch.Tensor):
        return v
    return v.to(dtype=like.dtype, device=like.device).reshape((-1,) + (1,) * (like.dim() - 1))


def span(t_from, t_to):
    """``(dt, sqrt(|dt|))`` for floats or float64 [B] tensors."""
    dt = t_to - t_from
    return dt, (torch.sqrt(dt.abs()) if isinstance(dt, torch.Tensor) else math.sqrt(abs(dt)))


class PhiloxBrownian:
    """Independent increments ``dW = sqrt(|dt|) N(seed, offset)``, a fresh offset per draw.

    ``I_(1,0) = int_{t}^{t'} (W_s - W_t) ds`` is drawn jointly with ``dW``: with the space-time
    Levy area ``H ~ N(0, |dt|/12)`` independent of ``dW``, ``I_(1,0) = dt (dW/2 + H)`` (Foster,
    Lyons & Oberhauser 2020, "An optimal polynomial approximation of Brownian motion";
    torchsde's ``U``). Every call draws new variables: ask once per step.

    Args:
        seed: an int (one stream over the batch) or an int64 [B] tensor (one stream per sample).
        shape_of: ``fn(y) -> shape of dW`` (``gf.SDE.brownian_shape``).
    """

    in_kernel = True
    has_area = True

    def __init__(self, seed, shape_of: Callable):
        self.seed, self.shape_of = seed, shape_of
        self.offset = 0
        self._seed = None

    def __repr__(self):
        return f"PhiloxBrownian(offset={self.offset})"

    def _next(self, like):
        """The seed tensor and the next stream offset."""
        if self._seed is None:
            self._seed = seed_tensor(self.seed, like.shape[0], like.device)
        self.offset += 1
        return self._seed, self.offset

    def kernel_noise(self, t_from, t_to, like: torch.Tensor):
        """``(seed, offset, scale)`` with ``dW = scale * N(seed, offset)`` (shaped like ``like``), for
        a fused update that draws the noise in the kernel; ``scale`` a float or float64 [B]."""
        return (*self._next(like), span(t_from, t_to)[1])

    def _normal(self, like, scale):
        seed, offset = self._next(like)
        z = randn(self.shape_of(like), seed=seed, offset=offset, dtype=like.dtype, device=like.device)
        return z.mul_(rows(scale, z))

    def increment(self, t_from, t_to, like: torch.Tensor) -> torch.Tensor:
        """``dW`` over ``[t_from, t_to]`` for the state ``like``."""
        return self._normal(like, span(t_from, t_to)[1])

    def increment_and_area(self, t_from, t_to, like: torch.Tensor):
        """``(dW, I_(1,0))`` over ``[t_from, t_to]``, jointly Gaussian."""
        dt, root = span(t_from, t_to)
        dw = self._normal(like, root)
        area = self._normal(like, root * math.sqrt(1 / 12))
        return dw, area.add_(dw, alpha=0.5).mul_(rows(dt, dw))


class TreeBrownian:
    """One Brownian path ``W(t)`` per sample on ``[t_min, t_max]``, ``W(t_min) = 0``: the Philox
    Brownian tree of ``genflow.noise.BrownianTreeNoise`` (Li et al. 2020, "Scalable Gradients for
    SDEs", §4; exact Brownian bridge refinement) indexed by ``t``.

    The leaves are ``tol * (t_max - t_min)`` wide (default ``2^-30``, 30 levels); increments
    over shorter intervals are not Brownian. Per-sample seeds give batch-invariant paths. The
    tree holds ``W`` alone, not the Levy area, so the SRA/SRI schemes cannot run on it.
    """

    in_kernel = False
    has_area = False

    def __init__(self, seed, t_min: float, t_max: float, shape_of: Callable, *, tol: float = 2.0 ** -30):
        self.tree = BrownianTreeNoise(seed, t_max, sigma_min=t_min, tol=tol * (t_max - t_min))
        self.shape_of = shape_of

    def __repr__(self):
        return f"TreeBrownian(t_min={self.tree.sigma_min}, t_max={self.tree.sigma_max})"

    def value(self, t, like: torch.Tensor) -> torch.Tensor:
        """``W(t)`` (``t`` a float or per-sample float64 [B])."""
        return self.tree.value(like.new_empty(self.shape_of(like)), t)

    def increment(self, t_from, t_to, like: torch.Tensor) -> torch.Tensor:
        """``W(t_to) - W(t_from)`` for the state ``like``."""
        return self.tree.increment(like.new_empty(self.shape_of(like)), t_from, t_to)


class UserBrownian:
    """A user's Brownian motion ``bm(ta, tb) -> W(tb) - W(ta)`` for floats ``ta <= tb`` (torchsde's
    ``BrownianInterval`` convention); ``bm(ta, tb, return_U=True) -> (dW, U)`` with
    ``U = int_ta^tb (W_s - W_ta) ds`` where the SRA/SRI schemes need it (torchsde:
    ``levy_area_approximation="space-time"``). Shared (float) times only.

    Reversed intervals use ``W(b) - W(a) = -(W(a) - W(b))`` and
    ``int_b^a (W_s - W_b) ds = (a - b) W_ab - U_ab`` (oriented, ``a < b``).
    """

    in_kernel = False
    has_area = True

    def __init__(self, bm: Callable, shape_of: Callable):
        self.bm, self.shape_of = bm, shape_of

    def __repr__(self):
        return f"UserBrownian({type(self.bm).__name__})"

    def _times(self, t_from, t_to):
        if isinstance(t_from, torch.Tensor) or isinstance(t_to, torch.Tensor):
            raise ValueError("brownian: a user-supplied Brownian motion takes one time per query; per-sample "
                             "times (t0, t1 or ts per sample) need brownian=None or 'brownian_tree'")
        return float(t_from), float(t_to)

    def _check(self, value, like, what):
        shape = tuple(self.shape_of(like))
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"brownian must return a tensor {what}, got {type(value).__name__}")
        if tuple(value.shape) != shape:
            if value.numel() != math.prod(shape) or len(shape) != 1:  # scalar noise: [B, 1] as torchsde
                raise ValueError(f"brownian must return {what} of shape {list(shape)} (SDE.brownian_shape of "
                                 f"y {list(like.shape)}), got {list(value.shape)}")
            value = value.reshape(shape)
        return value.to(dtype=like.dtype, device=like.device)

    def increment(self, t_from, t_to, like: torch.Tensor) -> torch.Tensor:
        """``W(t_to) - W(t_from)``."""
        a, b = self._times(t_from, t_to)
        if a <= b:
            return self._check(self.bm(a, b), like, "dW")
        return -self._check(self.bm(b, a), like, "dW")

    def increment_and_area(self, t_from, t_to, like: torch.Tensor):
        """``(dW, I_(1,0))`` over ``[t_from, t_to]``."""
        a, b = self._times(t_from, t_to)
        lo, hi = min(a, b), max(a, b)
        try:
            dw, area = self.bm(lo, hi, return_U=True)
        except (TypeError, ValueError, RuntimeError) as error:
            raise ValueError("brownian must answer bm(ta, tb, return_U=True) -> (dW, U) for this solver (torchsde: "
                             f"BrownianInterval(..., levy_area_approximation='space-time')): {error}") from error
        dw, area = self._check(dw, like, "dW"), self._check(area, like, "U")
        if a <= b:
            return dw, area
        return -dw, (hi - lo) * dw - area


def _interval(t0, t1):
    """``(lo, hi)`` floats covering every sample's ``[t0, t1]``."""
    ends = [float(v.min()) if isinstance(v, torch.Tensor) else float(v) for v in (t0, t1)]
    ends += [float(v.max()) if isinstance(v, torch.Tensor) else float(v) for v in (t0, t1)]
    return min(ends), max(ends)


def make_brownian(generator, brownian, term: SDE, y0: torch.Tensor, t0, t1):
    """The Brownian source of a ``gf.solve`` of ``term`` from ``y0`` over ``[t0, t1]``.

    Args:
        generator: None, an int seed, B per-sample seeds or a ``torch.Generator``
            (``genflow.noise.generator_seed``); ignored for a user-supplied ``brownian``.
        brownian: None or ``"philox"`` (independent in-kernel draws), ``"brownian_tree"`` (one
            path per sample, queried at any time) or a callable ``bm(ta, tb) -> dW`` (torchsde's
            ``BrownianInterval``).
        term: the ``gf.SDE`` (its ``brownian_shape``).
        y0: the initial state [B, *D].  t0, t1: floats or per-sample [B] tensors.
    """
    if not isinstance(term, SDE):
        raise TypeError(f"term must be a gf.SDE to draw Brownian motion for, got {type(term).__name__}")
    batch = y0.shape[0]
    if brownian is None or (isinstance(brownian, str) and brownian == "philox"):
        return PhiloxBrownian(generator_seed(generator, batch), term.brownian_shape)
    if isinstance(brownian, str):
        if brownian != "brownian_tree":
            raise ValueError(f"brownian must be None, one of {BROWNIAN_KINDS} or a callable bm(ta, tb) -> dW, "
                             f"got {brownian!r}{did_you_mean(brownian, BROWNIAN_KINDS)}")
        lo, hi = _interval(t0, t1)
        if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
            raise ValueError(f"brownian='brownian_tree' needs finite t0 != t1, got [{lo}, {hi}]")
        return TreeBrownian(generator_seed(generator, batch), lo, hi, term.brownian_shape)
    if callable(brownian):
        return UserBrownian(brownian, term.brownian_shape)
    raise TypeError(f"brownian must be None, one of {BROWNIAN_KINDS} or a callable bm(ta, tb) -> dW, "
                    f"got {type(brownian).__name__}")
