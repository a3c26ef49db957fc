"""The solver base class: grid tables, model evaluation and the fused update call.

A solver step is scalar coefficient math (float64 on the host, precomputed per grid point)
plus one call of the fused op ``out = c0 x + sum_k c_k term_k + s noise`` (DESIGN.md §1).
Coefficients are Python floats for a shared time grid, or float64 [B] tensors when every
sample has its own times; the helpers below work on both.
"""
import abc
import itertools
import math
from typing import NamedTuple, Optional

import torch

from genflow._cache import LRU, tensor_key
from genflow._checks import check_bool, check_real
from genflow.ownership import OutputOwnership, check_input_unchanged
from genflow.models import conversion
from genflow.ops.fused_update import host_tensor, fused_update_packed, fused_update_unchecked, seed_tensor, use_kernel

__all__ = ["Solver", "Grid", "Point", "dynamic_threshold", "point", "sqrt", "exp", "expm1", "step_values", "table",
           "where"]


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


class Grid(list):
    """The ``Point``s of a time grid, with ``serial``: a number no other grid ever gets (a
    counter, never reused), which the step-plan cache is keyed on. Grids are only made by
    ``table``, which returns the same grid for equal values (the process's parameters and the
    times) while it is cached, so equal values share step plans and a recomputed grid starts
    afresh."""

    serial: int = -1


_SERIALS = itertools.count()


_TABLES = LRU(64)  # (process values, grid values, device) -> Grid


def table(process, ts: torch.Tensor) -> Grid:
    """Per-grid-point ``Point``s computed in one vectorised pass over the grid (cached by the
    process's parameters and the grid's values, so a changed process or grid never hits)."""
    key = (process.cache_key(), tensor_key(ts), str(ts.device))
    points = _TABLES.get(key)
    if points is None:
        points = _TABLES.put(key, _compute_table(process, ts))
    return points




def step_values(col: torch.Tensor) -> list:
    """Per-step values of a ``[N]`` (floats/bools) or ``[N, B]`` (``[B]`` tensors) table."""
    return col.tolist() if col.dim() == 1 else list(col.unbind(0))


def _compute_table(process, ts: torch.Tensor) -> Grid:
    with torch.no_grad():
        cols = [ts, process.alpha(ts), process.sigma(ts), process.log_snr(ts), process.f(ts),
                process.g2(ts), process.dalpha(ts), process.dsigma(ts)]
    cols = [c.to(torch.float64) for c in cols]
    if ts.dim() == 1:
        rows = zip(*(c.tolist() for c in cols))
    else:
        rows = zip(*(c.unbind(0) for c in cols))
    grid = Grid(Point(*row) for row in rows)
    grid.serial = next(_SERIALS)
    return grid


def point(process, t) -> Point:
    """``Point`` at an arbitrary (off-grid) time."""
    return table(process, torch.as_tensor(t, dtype=torch.float64).unsqueeze(0))[0]


def dynamic_threshold(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Imagen's dynamic thresholding (Saharia et al. 2022, §2.3): per sample,
    ``s = clamp(quantile(|x0|, ratio), 1, max_value)`` and ``x0 <- clamp(x0, -s, s) / s``."""
    flat = x0.reshape(x0.shape[0], -1).abs().float()
    s = torch.quantile(flat, ratio, dim=1).clamp(min=1.0, max=max_value)
    s = s.to(x0.dtype).reshape((-1,) + (1,) * (x0.dim() - 1))
    return torch.maximum(torch.minimum(x0, s), -s) / s


def _is_zero(c):
    return not isinstance(c, torch.Tensor) and c == 0.0


_STEP_PLANS = LRU(4096)  # (grid serial, solver class, prediction, options, step) -> packed coefficients


_NO_PLAN = object()


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
                 sample_max_value: float = 1.0, model_reuses_buffers: bool = False,
                 model_dtype: Optional[torch.dtype] = None):
        if eta is not None and self.default_eta is None:
            raise ValueError(f"solver {self.name!r} is deterministic and takes no eta, got eta={eta}")
        self.eta = self.default_eta if eta is None else check_real("eta", eta, low=0.0, high=1.0)
        self.model = model
        self.process = model.process
        self.ts = ts
        self.grid = table(model.process, ts)
        # the solver owns its state and history: outputs that share memory are copied (genflow/ownership.py)
        self.ownership = OutputOwnership(check_bool("model_reuses_buffers", model_reuses_buffers))
        if model_dtype is not None and not (isinstance(model_dtype, torch.dtype) and model_dtype.is_floating_point):
            raise TypeError(f"model_dtype must be None or a floating torch.dtype, got {model_dtype!r}")
        self.model_dtype = model_dtype  # the dtype the model runs in when the state is kept in another
        self.noise = noise
        self.backend = backend
        self.evaluations = 0
        self._kernel = None  # use_kernel(backend, device), decided at the first update
        self._seed = None
        # Divergence check (gf.sample's check_finite): an int32 [1] flag on the state's device that
        # every fused update lowers to step_index when it writes a NaN/Inf; None: no check.
        self.nonfinite: Optional[torch.Tensor] = None
        self.step_index = 0
        ratio = check_real("dynamic_thresholding_ratio", dynamic_thresholding_ratio, low=0.0, high=1.0, low_open=True)
        max_value = check_real("sample_max_value", sample_max_value, low=1.0)
        self.threshold = (ratio, max_value) if check_bool("thresholding", thresholding) else None

    @classmethod
    def expected_order(cls, **options) -> int:
        """The global convergence order with these options (what the order test checks)."""
        return cls.order

    @classmethod
    def nfe(cls, steps: int) -> int:
        """Model evaluations of a solve with ``steps`` steps."""
        return cls.nfe_per_step * steps

    def evaluate(self, x: torch.Tensor, p: Point) -> torch.Tensor:
        """One model evaluation: the network's raw output at ``(x, p.t)``, owned by the solver.

        The model runs in ``model_dtype`` when one is set (the state is cast to it and the
        output back to the state's dtype). An output sharing memory with the state or with an
        output the solver may still hold is copied, and a model that writes into its input
        raises ``InputMutationError`` (``genflow.ownership``)."""
        self.evaluations += 1
        if torch.compiler.is_compiling():  # a traced step: functionalised, and versions are not observable
            return self.model.call(x, self.model.prepare_time(p.t, x))
        if self.model_dtype is not None and x.dtype != self.model_dtype:
            arg = x.to(self.model_dtype)
            out = self.model.call(arg, self.model.prepare_time(p.t, arg))
            check_input_unchanged(arg, 0, self.where(p))
            if out.dtype != x.dtype:
                return out.to(x.dtype)  # a new tensor, owned by the solver
            return self.ownership.own(out, arg, self.where)  # already the state's dtype: the model's memory
        model, version = self.model, x._version
        out = model.call(x, model.prepare_time(p.t, x))
        if x._version != version:
            check_input_unchanged(x, version, self.where(p))
        return self.ownership.own(out, x, self.where)

    def where(self, p: Optional[Point] = None) -> str:
        """Names the current model call in error messages: solver, step and evaluation."""
        at = "" if p is None or isinstance(p.t, torch.Tensor) else f", t={p.t:.4g}"
        return f"solver {self.name!r}, step {self.step_index + 1}{at} (model call {self.evaluations})"

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
            if isinstance(c, _Tensor) or c != 0.0:  # not _is_zero(c), inlined: this runs on every step
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
        """``(kept, coef)`` for ``update_packed``: which terms have a nonzero coefficient (None:
        all of them, so the step passes its terms as they are) and the float64 coefficient tensor the op takes, or None when ``update`` must run (per-sample
        coefficients, or noise). Solvers that reuse a step's coefficients across solves pack once."""
        if not _is_zero(noise_scale) or not all(type(c) is float for c in coefs):
            return None
        kept = tuple(c != 0.0 for c in coefs[1:])
        values = [coefs[0]] + [c for c in coefs[1:] if c != 0.0] + [0.0]
        return (None if all(kept) else kept), host_tensor(values, torch.float64, "d")

    def step_plan(self, i: int, options, coefficients):
        """The packed noise-free coefficients of step ``i`` (see ``pack``), computed once by
        ``coefficients() -> (coefs, noise_scale)`` per scalar grid, solver, prediction kind and
        ``options`` (everything else the coefficients depend on) and reused by later solves on
        the same grid; None when they cannot be reused (per-sample grid, thresholding, noise)."""
        if self.threshold is not None or type(self.grid[i].t) is not float or torch.compiler.is_compiling():
            return None  # (a traced step computes its coefficients: the cache's lock is not traceable)
        key = (self.grid.serial, type(self), self.model.prediction, options, i)
        packed = _STEP_PLANS.get(key, _NO_PLAN)
        if packed is _NO_PLAN:
            packed = _STEP_PLANS.put(key, self.pack(*coefficients()))
        return packed

    def update_packed(self, x, terms, packed, *, out):
        """``update`` (noise-free) with coefficients packed by ``pack`` (``terms``: one per
        coefficient after ``c0``, as given to ``pack``): the op call alone."""
        kept, coef = packed
        if self._kernel is None:
            self._kernel = use_kernel(self.backend, x.device)
        if kept is not None:  # drop the terms whose coefficient is 0.0
            terms = [t for t, k in zip(terms, kept) if k]
        return fused_update_packed(x, terms, coef, kernel=self._kernel, out=out, nonfinite=self.nonfinite,
                                   step=self.step_index)

    @abc.abstractmethod
    def step(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Advance ``x`` from ``grid[i]`` to ``grid[i+1]``; may update ``x`` in place."""
