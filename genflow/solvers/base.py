"""The solver base class: grid tables, model evaluation and the fused update call.

A solver step is scalar coefficient math (float64 on the host, precomputed per grid point)
plus one call of the fused op ``out = c0 x + sum_k c_k term_k + s noise`` (DESIGN.md §1).
Coefficients are Python floats for a shared time grid, or float64 [B] tensors when every
sample has its own times; the helpers below work on both.
"""
import abc
import math
from typing import NamedTuple, Optional

import torch

from genflow.models import conversion
from genflow.ops.fused_update import _host_tensor, fused_update_packed, fused_update_unchecked, seed_tensor, use_kernel

__all__ = ["NonFiniteError", "Solver", "Point", "diverged_rows", "dynamic_threshold", "point", "sqrt", "exp",
           "expm1", "where"]


class NonFiniteError(RuntimeError, FloatingPointError):
    """A solve or particle flow diverged: a step wrote NaN or Inf into the state
    (``check_finite=True``; exported as ``gf.NonFiniteError``). Also a ``FloatingPointError``,
    which the particle flows raised before."""


def diverged_rows(x: torch.Tensor) -> torch.Tensor:
    """bool [B]: the samples (rows) of ``x`` holding a NaN or Inf."""
    return ~torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1)


class Point(NamedTuple):
    """Process quantities at one time: floats, or [B] float64 tensors for per-sample times."""

    t: object
    alpha: object
    sigma: object
    lam: object
    f: object
    g2: object
    dalpha: object
    dsigma: object


_Tensor = torch.Tensor


def sqrt(v):
    return torch.sqrt(v) if isinstance(v, _Tensor) else math.sqrt(v)


def exp(v):
    return torch.exp(v) if isinstance(v, _Tensor) else math.exp(v)


def expm1(v):
    return torch.expm1(v) if isinstance(v, _Tensor) else math.expm1(v)


def where(cond, a, b):
    """Elementwise ``a if cond else b`` for floats or per-sample tensors."""
    if isinstance(cond, _Tensor) or isinstance(a, _Tensor) or isinstance(b, _Tensor):
        cond = torch.as_tensor(cond)
        return torch.where(cond, torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64))
    return a if cond else b


_TABLES = {}  # (id(process), id(ts)) -> (process, ts, ts._version, points): grids are reused


def _table(process, ts: torch.Tensor) -> list:
    """Per-grid-point ``Point``s computed in one vectorised pass over the grid (cached for a
    grid tensor seen before and not modified since, as the cached ``time_grid`` returns)."""
    key = (id(process), id(ts))
    hit = _TABLES.get(key)
    if hit is not None and hit[0] is process and hit[1] is ts and hit[2] == ts._version:
        return hit[3]
    points = _compute_table(process, ts)
    if len(_TABLES) >= 64:
        _TABLES.clear()
    _TABLES[key] = (process, ts, ts._version, points)
    return points


def _compute_table(process, ts: torch.Tensor) -> list:
    with torch.no_grad():
        cols = [ts, process.alpha(ts), process.sigma(ts), process.log_snr(ts), process.f(ts),
                process.g2(ts), process.dalpha(ts), process.dsigma(ts)]
    cols = [c.to(torch.float64) for c in cols]
    if ts.dim() == 1:
        rows = zip(*(c.tolist() for c in cols))
    else:
        rows = zip(*(c.unbind(0) for c in cols))
    return [Point(*row) for row in rows]


def point(process, t) -> Point:
    """``Point`` at an arbitrary (off-grid) time."""
    return _table(process, torch.as_tensor(t, dtype=torch.float64).unsqueeze(0))[0]


def dynamic_threshold(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Imagen's dynamic thresholding (Saharia et al. 2022, §2.3): per sample,
    ``s = clamp(quantile(|x0|, ratio), 1, max_value)`` and ``x0 <- clamp(x0, -s, s) / s``."""
    flat = x0.reshape(x0.shape[0], -1).abs().float()
    s = torch.quantile(flat, ratio, dim=1).clamp(min=1.0, max=max_value)
    s = s.to(x0.dtype).reshape((-1,) + (1,) * (x0.dim() - 1))
    return torch.maximum(torch.minimum(x0, s), -s) / s


def _is_zero(c):
    return not isinstance(c, torch.Tensor) and c == 0.0


_STEP_PLANS = {}  # (id(grid), solver class, prediction, options, step) -> (grid, packed coefficients)


class Solver(abc.ABC):
    """Base class of fixed-grid solvers. Subclasses set the class attributes and ``step``.

    Attributes:
        name: registry name.  order: convergence order (strong order for ODEs).
        stochastic: whether the default configuration injects noise.
        nfe_per_step: model evaluations per step.  default_eta: churn when ``eta=None``.
        order_test_options: the option sets the convergence-order test runs (see
            ``expected_order``).

    Options every solver takes: ``thresholding`` (dynamic thresholding of the data prediction,
    with diffusers' parameter names ``dynamic_thresholding_ratio`` and ``sample_max_value``).
    Solvers read the model through ``x0_view``/``eps_view`` so that thresholding applies to all.
    """

    name = ""
    order = 1
    stochastic = False
    nfe_per_step = 1
    default_eta: Optional[float] = None  # None: the solver takes no eta
    order_test_options = ({},)

    def __init__(self, model, ts: torch.Tensor, *, noise=None, eta=None, backend="auto",
                 thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995,
                 sample_max_value: float = 1.0):
        if eta is not None and self.default_eta is None:
            raise ValueError(f"solver {self.name!r} is deterministic and takes no eta, got eta={eta}")
        self.eta = self.default_eta if eta is None else float(eta)
        if self.eta is not None and not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {eta}")
        self.model = model
        self.process = model.process
        self.ts = ts
        self.grid = _table(model.process, ts)
        self.noise = noise
        self.backend = backend
        self.evaluations = 0
        self._kernel = None  # use_kernel(backend, device), decided at the first update
        self._seed = None
        # Divergence check (gf.sample's check_finite): an int32 [1] flag on the state's device that
        # every fused update lowers to step_index when it writes a NaN/Inf; None: no check.
        self.nonfinite: Optional[torch.Tensor] = None
        self.step_index = 0
        if not 0.0 < dynamic_thresholding_ratio <= 1.0:
            raise ValueError(f"dynamic_thresholding_ratio must be in (0, 1], got {dynamic_thresholding_ratio}")
        if not sample_max_value >= 1.0:
            raise ValueError(f"sample_max_value must be >= 1, got {sample_max_value}")
        self.threshold = (dynamic_thresholding_ratio, sample_max_value) if thresholding else None

    @classmethod
    def expected_order(cls, **options) -> int:
        """The global convergence order with these options (what the order test checks)."""
        return cls.order

    @classmethod
    def nfe(cls, steps: int) -> int:
        """Model evaluations of a solve with ``steps`` steps."""
        return cls.nfe_per_step * steps

    def evaluate(self, x: torch.Tensor, p: Point) -> torch.Tensor:
        """One model evaluation: the network's raw output at ``(x, p.t)``."""
        self.evaluations += 1
        return self.model.call(x, self.model.prepare_time(p.t, x))

    def coef(self, kind: str, p: Point):
        """``(a, b)`` with ``kind = a x + b raw_output`` at ``p``."""
        return conversion(self.model.prediction, kind, p.alpha, p.sigma, p.dalpha, p.dsigma)

    def x0_view(self, x, out, p: Point):
        """``(term, a, b)`` with the data prediction ``x0 = a x + b term``.

        Without thresholding ``term`` is the raw output and the conversion is folded into the
        caller's coefficients; with it, ``x0`` is materialised, thresholded and ``(a, b) = (0, 1)``.
        """
        a, b = self.coef("x0", p)
        if self.threshold is None:
            return out, a, b
        return dynamic_threshold(self.update(x, [out], [a, b]), *self.threshold), 0.0, 1.0

    def eps_view(self, x, out, p: Point):
        """``(term, a, b)`` with the noise prediction ``eps = a x + b term`` (thresholded via x0)."""
        if self.threshold is None:
            a, b = self.coef("eps", p)
            return out, a, b
        x0, _, _ = self.x0_view(x, out, p)
        return x0, 1.0 / p.sigma, -p.alpha / p.sigma

    def views(self, x, out, p: Point, *kinds):
        """``(term, [(a, b) for each kind])`` with ``kind = a x + b term``: the raw output with
        folded conversions, or with thresholding the thresholded ``x0`` converted from."""
        if self.threshold is None:
            return out, [self.coef(kind, p) for kind in kinds]
        x0, _, _ = self.x0_view(x, out, p)
        return x0, [conversion("x0", kind, p.alpha, p.sigma, p.dalpha, p.dsigma) for kind in kinds]

    def denoise(self, x, p: Point) -> torch.Tensor:
        """Replace ``x`` (in place) by the model's data prediction at ``p`` (one NFE)."""
        out = self.evaluate(x, p)
        term, a, b = self.x0_view(x, out, p)
        return self.update(x, [term], [a, b], out=x)

    def update(self, x, terms, coefs, noise_scale=0.0, *, out=None, noise_at=(None, None)):
        """``out = coefs[0] x + sum_k coefs[k] terms[k-1] + noise_scale * noise`` (one fused pass).

        Terms whose coefficient is exactly 0.0 are skipped; noise is drawn from the solver's
        noise source only when ``noise_scale`` is nonzero.
        """
        kept_terms, values = [], [coefs[0]]
        for term, c in zip(terms, coefs[1:]):
            if not _is_zero(c):
                kept_terms.append(term)
                values.append(c)
        if self._kernel is None:
            self._kernel = use_kernel(self.backend, x.device)
        noise = seed = None
        offset = 0
        if _is_zero(noise_scale):
            values.append(0.0)
        else:
            if self.noise is None:
                raise ValueError(f"solver {self.name!r} needs noise but no noise source was given")
            values.append(noise_scale)
            drawn = self.noise.draw(x, *noise_at)
            noise = drawn.get("noise")
            if "seed" in drawn:
                if self._seed is None:
                    self._seed = seed_tensor(drawn["seed"], x.shape[0], x.device)
                seed, offset = self._seed, drawn["offset"]
        return fused_update_unchecked(x, kept_terms, values, kernel=self._kernel, noise=noise,
                                      seed=seed, offset=offset, out=out, nonfinite=self.nonfinite,
                                      step=self.step_index)

    @staticmethod
    def pack(coefs, noise_scale=0.0):
        """``(kept, coef)`` for ``update_packed``: which terms have a nonzero coefficient and the
        float64 coefficient tensor the op takes, or None when ``update`` must run (per-sample
        coefficients, or noise). Solvers that reuse a step's coefficients across solves pack once."""
        if not _is_zero(noise_scale) or not all(type(c) is float for c in coefs):
            return None
        kept = tuple(c != 0.0 for c in coefs[1:])
        values = [coefs[0]] + [c for c in coefs[1:] if c != 0.0] + [0.0]
        return kept, _host_tensor(values, torch.float64, "d")

    def step_plan(self, i: int, options, coefficients):
        """The packed noise-free coefficients of step ``i`` (see ``pack``), computed once by
        ``coefficients() -> (coefs, noise_scale)`` per scalar grid, solver, prediction kind and
        ``options`` (everything else the coefficients depend on) and reused by later solves on
        the same grid; None when they cannot be reused (per-sample grid, thresholding, noise)."""
        if self.threshold is not None or type(self.grid[i].t) is not float:
            return None
        key = (id(self.grid), type(self), self.model.prediction, options, i)
        hit = _STEP_PLANS.get(key)
        if hit is not None and hit[0] is self.grid:
            return hit[1]
        packed = self.pack(*coefficients())
        if len(_STEP_PLANS) >= 4096:
            _STEP_PLANS.clear()
        _STEP_PLANS[key] = (self.grid, packed)
        return packed

    def update_packed(self, x, terms, packed, *, out):
        """``update`` (noise-free) with coefficients packed by ``pack``: the op call alone."""
        kept, coef = packed
        if self._kernel is None:
            self._kernel = use_kernel(self.backend, x.device)
        terms = [t for t, k in zip(terms, kept) if k]
        return fused_update_packed(x, terms, coef, kernel=self._kernel, out=out, nonfinite=self.nonfinite,
                                   step=self.step_index)

    @abc.abstractmethod
    def step(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Advance ``x`` from ``grid[i]`` to ``grid[i+1]``; may update ``x`` in place."""
