"""Adaptive step-size solvers: Dormand–Prince RK5(4) on the probability-flow ODE, and the
Euler–Maruyama / improved-Euler pair of Jolicoeur-Martineau et al. (2021) on the reverse SDE.

Every sample has its own time, step size and error norm: a step is accepted or rejected per
sample (the fused update takes per-sample coefficient vectors), so a batch takes as many
iterations as its hardest sample and each sample follows the step sequence it would follow
alone. An iteration evaluates the model on the whole batch; samples that have reached ``t_end``
ride along with ``h = 0``. The step controller runs on the host in float64 (one device sync per
iteration, for the error norms).

These solvers set ``adaptive = True`` and are driven by ``gf.sample`` through ``solve(x)``
instead of the fixed-grid ``step`` loop. Of ``gf.sample``'s grid arguments only the endpoints
are used (``t_start``, ``t_end``, or the first and last row of an explicit grid); ``steps`` and
``schedule`` do not change the solve.
"""
import abc
import math

import torch

from genflow._checks import check_real
from genflow.engine.adaptive import StepController, diverged_error, initial_step, iterate, rms
from genflow.engine.rk import RungeKutta
from genflow.engine.sde_adaptive import AdaptivePair
from genflow.engine.tableau import DOPRI5
from genflow.models import conversion
from genflow.ops.fused_update import fused_update_unchecked, seed_tensor, use_kernel
from genflow.solvers.base import Point, Solver

__all__ = ["AdaptiveSolver", "RK45", "SDEAdaptive"]


def _rows(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return mask.to(x.device).reshape((-1,) + (1,) * (x.dim() - 1))


class AdaptiveSolver(Solver):
    """Base of the adaptive solvers: per-sample time bookkeeping and the iteration loop.

    Subclasses implement ``_start(x, t, span) -> h`` (first step size), ``_attempt(x, t, h) ->
    err`` (try a step of size ``h`` per sample; float64 [B] error norms, accept where ``<= 1``),
    ``_control(err, h, accept) -> h_next`` and ``_commit(x, accept, done) -> x`` (take the
    attempted step where ``accept``; ``done`` samples have finished and attempted ``h = 0``).

    After a solve, ``accepted_steps`` and ``rejected_steps`` (int64 [B]) count each sample's steps.
    """

    adaptive = True
    order_test_options = ()  # no step count: the fixed-grid order test does not apply

    def __init__(self, model, ts, *, rtol: float, atol: float, h_init=None, max_steps: int = 10_000, **kwargs):
        super().__init__(model, ts, **kwargs)
        rtol, atol = check_real("rtol", rtol, low=0.0), check_real("atol", atol, low=0.0)
        if not rtol + atol > 0:
            raise ValueError(f"rtol and atol must be finite, >= 0 and not both 0, got rtol={rtol}, atol={atol}")
        if h_init is not None and not (h_init > 0 and math.isfinite(h_init)):
            raise ValueError(f"h_init must be a positive finite step (in t), got {h_init}")
        if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
            raise ValueError(f"max_steps must be an int >= 1, got {max_steps!r}")
        self.rtol, self.atol, self.h_init, self.max_steps = float(rtol), float(atol), h_init, max_steps
        self.accepted_steps = self.rejected_steps = None
        self.check_finite = True  # raise NonFiniteError on a NaN/Inf state or error norm (see solve)
        self.ends = [self.at(ts[0].to(torch.float64).reshape(-1)), self.at(ts[-1].to(torch.float64).reshape(-1))]

    @classmethod
    def nfe(cls, steps: int):
        """None: an adaptive solve's NFE is known only afterwards (``solver.evaluations``)."""
        return None

    def step(self, i, x):
        raise TypeError(f"{self.name!r} is adaptive: drive it with solve(x) (as gf.sample does), not step(i, x)")

    def at(self, t: torch.Tensor) -> Point:
        """``Point`` at per-sample times ``t`` (float64 [B] on the host)."""
        pr = self.process
        with torch.no_grad():
            return Point(t, pr.alpha(t), pr.sigma(t), pr.log_snr(t), pr.f(t), pr.g2(t), pr.dalpha(t), pr.dsigma(t))

    def view(self, x, out, p: Point, kinds):
        """``(term, [(a, b), ...])`` with ``kind = a x + b term`` for each of ``kinds`` (the raw
        output folded in, or the thresholded data prediction when thresholding is on)."""
        if self.threshold is None:
            return out, [self.coef(kind, p) for kind in kinds]
        term, a0, b0 = self.x0_view(x, out, p)
        pairs = [conversion("x0", kind, p.alpha, p.sigma, p.dalpha, p.dsigma) for kind in kinds]
        return term, [(a + b * a0, b * b0) for a, b in pairs]

    def combine(self, x, c0, terms, coefs, *, out):
        """``out = c0 x + sum_k coefs[k] terms[k]`` in ``ceil(K / 4)`` fused passes."""
        for s in range(0, len(terms), 4):
            self.update(x if s == 0 else out, terms[s:s + 4], [c0 if s == 0 else 1.0] + coefs[s:s + 4], out=out)
        return out

    def _diverged(self, rows, t, h, what):
        """Raise ``NonFiniteError`` for the samples ``rows`` (bool [B]) at times ``t``, steps ``h``."""
        raise diverged_error("gf.sample", self.name, rows, t, h, what, "the model's output at these times")

    def _check_finite(self, kinds, what):
        for p in self.ends:
            for a, b in (self.coef(kind, p) for kind in kinds):
                if torch.isfinite(torch.as_tensor(a)).all() and torch.isfinite(torch.as_tensor(b)).all():
                    continue
                raise ValueError(f"{self.name!r} evaluates the model's {what} at t_start and t_end, but it is undefined "
                                 f"at t={p.t.tolist()} (sigma={p.sigma.tolist()}) for a {self.model.prediction!r} "
                                 f"model; integrate to t_end > 0 (e.g. 1e-3), optionally with final_step='x0'")

    def solve(self, x: torch.Tensor):
        """Integrate ``x`` (Tensor[B, *D], updated in place or swapped with internal buffers) from
        ``t_start`` to ``t_end``. A generator: after every iteration (one attempted step for each
        unfinished sample) it yields ``(x, info, progress)``, ``info`` holding ``i``, ``t`` and
        ``t_next`` (float64 [B]; ``t_next = t`` where the step was rejected), ``h`` (the attempted
        steps), ``accepted`` (bool [B]), ``error`` (the error norms) and ``accepted_steps`` (int64
        [B], cumulative); ``progress`` is the smallest fraction of its interval any sample has done.
        With ``check_finite`` a NaN/Inf state after a step, or a NaN/Inf error norm that persists
        down to step size underflow, raises ``NonFiniteError``.
        """
        batch = x.shape[0]
        t_start = self.ts[0].to(torch.float64).expand(batch).clone()
        t_end = self.ts[-1].to(torch.float64).expand(batch).clone()
        return iterate(self, x, t_start, t_end, max_steps=self.max_steps, check_finite=self.check_finite)

    @abc.abstractmethod
    def _start(self, x, t, span):
        """Prepare the first attempt; return the first step sizes h (float64 [B])."""

    @abc.abstractmethod
    def _attempt(self, x, t, h):
        """Attempt a step of size h from (x, t); return the error norms (float64 [B])."""

    @abc.abstractmethod
    def _control(self, err, h, accept):
        """The next step sizes from the error norms."""

    @abc.abstractmethod
    def _commit(self, x, accept, done):
        """Keep the attempted state where accepted; return the state."""


class RK45(AdaptiveSolver):
    """Dormand–Prince RK5(4) with FSAL on the probability-flow ODE ``dx/dt = velocity(x, t)``.

    Dormand & Prince (1980); Hairer et al., "Solving ODEs I", §II.4–II.5 (DOPRI5): the
    ``dopri5`` tableau of ``genflow.engine.tableau`` run by the engine's Runge–Kutta step
    (``genflow.engine.rk``), the velocity a linear view ``alpha x + beta out`` of the network
    output folded into the stage coefficients (the four process quantities ``alpha, sigma,
    alpha', sigma'`` at the seven stage times per attempt). The 5th-order solution is
    propagated, the embedded 4th-order one gives ``err = h sum_i e_i k_i`` and
    ``||err|| = sqrt(mean((err / (atol + rtol max(|y|, |y'|)))^2))`` per sample; a step is
    accepted where ``||err|| <= 1``. Step sizes follow DOPRI5's PI controller
    (``genflow.engine.adaptive.StepController``: Lund stabilisation ``beta = 0.04``, safety 0.9,
    factor in [0.2, 10], no growth right after a rejection); the first step is Hairer's automatic
    choice (§II.4, 1 extra NFE) unless ``h_init`` is given. 6 NFE per attempted step (plus 1 to
    start).

    Options: ``rtol``, ``atol`` (default 1e-5 each, as Song et al. 2021's RK45 sampler),
    ``h_init`` (first step in ``t``), ``max_steps`` (attempted steps; exceeding it raises).
    Integrates from ``t_start`` to ``t_end``; ``steps`` and ``schedule`` are ignored. The model
    is evaluated at ``t_end``, so its velocity must be finite there (``t_end > 0`` for x0 or
    score networks on processes with ``sigma(0) = 0``).
    """

    name = "rk45"
    order = 5
    nfe_per_step = 6

    def __init__(self, model, ts, *, rtol: float = 1e-5, atol: float = 1e-5, **kwargs):
        super().__init__(model, ts, rtol=rtol, atol=atol, **kwargs)
        self._check_finite(["velocity"], "velocity")
        self.controller = StepController(DOPRI5.error_order, beta=0.04)
        self.engine = None

    def velocity_view(self, t):
        """``(alpha, beta)`` with ``velocity(x, t) = alpha x + beta term`` at the times ``t``."""
        pr = self.process
        with torch.no_grad():
            alpha, sigma, dalpha, dsigma = pr.alpha(t), pr.sigma(t), pr.dalpha(t), pr.dsigma(t)
        if self.threshold is None:
            return conversion(self.model.prediction, "velocity", alpha, sigma, dalpha, dsigma)
        # velocity = alpha' x0 + sigma' eps = (sigma'/sigma) x + (alpha' - sigma' alpha/sigma) x0
        return dsigma / sigma, dalpha - dsigma * alpha / sigma

    def term(self, x, t):
        """One model evaluation at per-sample times ``t``: the raw output (or thresholded x0)."""
        p = self.at(t) if self.threshold is not None else Point(t, *([None] * 7))
        out = self.evaluate(x, p)
        if self.threshold is None:
            return out
        term, _, _ = self.x0_view(x, out, p)
        return term

    def velocity(self, x, t, term):
        """``alpha x + beta term`` materialised (one fused pass), for the starting step size."""
        a, b = self.velocity_view(t)
        return self.update(x, [term], [a, b])

    def _start(self, y, t, span):
        self.engine = RungeKutta(DOPRI5, self.term, view=self.velocity_view, kernel=use_kernel(self.backend, y.device))
        self._buffers = [torch.empty_like(y) for _ in range(9)]  # [0..6]: stage states, [7]: error, [8]: y'
        self.engine.pool = self._buffers[:7]
        self.controller.reset(y.shape[0])
        self._first = self.engine.evaluate(y, t)
        if self.h_init is not None:
            return torch.minimum(torch.full_like(t, float(self.h_init)), span)
        f0 = self.velocity(y, t, self._first)

        def euler(h0):
            return self.update(y, [f0], [1.0, -h0])

        return initial_step(y, f0, euler, lambda y1, h0: self.velocity(y1, t - h0, self.engine.evaluate(y1, t - h0)),
                            span, rtol=self.rtol, atol=self.atol, error_order=DOPRI5.error_order)

    def _attempt(self, y, t, h):
        engine = self.engine
        engine.nonfinite, engine.step_index = self.nonfinite, self.step_index
        y_new = engine.step(y, t, -h, first=self._first, out=self._buffers[8])
        scale = torch.maximum(y.abs(), y_new.abs()).mul_(self.rtol).add_(self.atol)
        err = engine.combine("error", out=self._buffers[7])
        return rms(err.div_(scale))

    def _control(self, err, h, accept):
        return self.controller(err, h, accept)

    def _commit(self, y, accept, done):
        y_new, last = self._buffers[8], self.engine.terms[-1]
        if bool((accept | done).all()):  # the common case: swap buffers instead of copying
            self._buffers[8] = y
            self._first = last
            return y_new
        mask = _rows(accept, y)
        y.copy_(torch.where(mask, y_new, y))
        self._first = torch.where(mask, last, self._first)
        return y


class SDEAdaptive(AdaptivePair, AdaptiveSolver):
    """Adaptive reverse-SDE solver: Jolicoeur-Martineau et al. (2021), "Gotta Go Fast When
    Generating Data with Score-Based Models", Algorithm 1, for any process and churn ``eta``.

    With the drift ``d = velocity - eta^2/2 g2 score`` (DESIGN.md §2), step ``h`` (``t' = t - h``)
    and ONE Brownian increment ``z`` for both stages::

        x'  = x + (-h) d(x, t)   + eta sqrt(g2(t) h) z                  (Euler–Maruyama)
        x~  = x + (-h) d(x', t') + eta sqrt(g2(t') h) z
        x'' = (x' + x~) / 2                                              (improved Euler)

    each stage one fused update (the drift a linear view ``a x + b out`` of the network output,
    the noise drawn in the kernel or handed to it). Error norm, acceptance and step sizes are the
    general engine's (``genflow.engine.sde_adaptive.AdaptivePair``, shared with ``gf.solve``'s
    ``sde_adaptive``): ``E = sqrt(mean(((x' - x'') / max(atol, rtol max(|x'|, |x'_prev|)))^2))``
    per sample (``error_norm="batch"``: one norm for the batch), accepted where ``E <= 1``
    (``x <- x''`` with ``extrapolate=True``, the paper's extrapolation, else ``x'``), and
    ``h <- safety h E^(-exponent)`` either way. 2 NFE per attempted step. Defaults are the
    paper's: ``atol = 0.0078`` (``eps_abs``, for data in [-1, 1]), ``rtol = 0.05``
    (``eps_rel``), ``safety = 0.9`` (theta), ``exponent = 0.9`` (r), ``h_init`` = 1% of the
    interval (their 0.01 on [0, 1]); ``max_steps`` bounds the attempted steps.
    The paper's final denoising step is ``gf.sample(..., final_step="x0")``.

    The two stages use the same ``z`` (one ``noise.draw`` per attempt, handed to both fused
    updates). Noise defaults to the Brownian tree (``default_noise``; a path in sigma): a
    rejected step is retried on the same Brownian path, with the increment over the shorter
    step. The paper's fresh draw after each rejection (``noise="philox"``) favours the draws
    that pass the error test and biases the samples: on the 3-component test mixture under VP
    (1000 samples, default tolerances) MMD^2 to the data is 0.032 with fresh draws and 0.0017
    with the tree, against a data-vs-data spread of 0.0065. ``eta = 0`` makes it an adaptive
    Heun solver of the probability-flow ODE.

    With per-sample seeds a sample's solve does not depend on its batch. A seed gives the same
    samples on the same backend and device. Elsewhere float rounding differs, and since a
    Brownian path is rough (a time shift ``d`` moves ``W`` by ``~sqrt(d)``) such differences grow
    until some accept/reject decision flips: the sample is then another discretisation of the
    same path, different by about the solver's error.
    """

    name = "sde_adaptive"
    order = 1
    stochastic = True
    nfe_per_step = 2
    default_eta = 1.0
    default_noise = "brownian_tree"  # gf.sample's noise=None resolves to this

    def __init__(self, model, ts, *, rtol: float = 0.05, atol: float = 0.0078, safety: float = 0.9,
                 exponent: float = 0.9, extrapolate: bool = True, error_norm: str = "sample", **kwargs):
        super().__init__(model, ts, rtol=rtol, atol=atol, **kwargs)
        self.configure_pair(safety=safety, exponent=exponent, extrapolate=extrapolate, error_norm=error_norm)
        self._kinds = ["velocity", "score"] if self.eta > 0 else ["velocity"]
        if self.eta > 0 and not all(torch.isfinite(p.g2).all() for p in self.ends):
            raise ValueError(f"the reverse SDE of {self.process!r} is singular at t_start or t_end (g2 is infinite); "
                             f"start at t_start < T or use eta=0")
        self._check_finite(self._kinds, "drift")

    def drift(self, x, out, p: Point):
        """``(term, a, b)`` with ``d = a x + b term`` (the reverse-SDE drift with churn eta)."""
        term, pairs = self.view(x, out, p, self._kinds)
        (a, b) = pairs[0]
        if self.eta > 0:
            churn = self.eta ** 2 / 2 * p.g2
            a, b = a - churn * pairs[1][0], b - churn * pairs[1][1]
        return term, a, b

    def _noisy(self, x, terms, coefs, scale, drawn, out):
        """One fused update with the attempt's noise ``drawn`` (the same z for both stages)."""
        if drawn is None:
            return self.update(x, terms, coefs, out=out)
        if self._kernel is None:
            self._kernel = use_kernel(self.backend, x.device)
        noise, seed, offset = drawn.get("noise"), None, 0
        if "seed" in drawn:
            if self._seed is None:
                self._seed = seed_tensor(drawn["seed"], x.shape[0], x.device)
            seed, offset = self._seed, drawn["offset"]
        return fused_update_unchecked(x, list(terms), list(coefs) + [scale], kernel=self._kernel, noise=noise,
                                      seed=seed, offset=offset, out=out)

    def pair(self, x, t, h, out):
        dt = -h
        p, q = self.at(t), self.at(t + dt)
        drawn = None
        if self.eta > 0:
            if self.noise is None:
                raise ValueError(f"solver {self.name!r} needs noise but no noise source was given")
            drawn = self.noise.draw(x, p.sigma, q.sigma)
        term, a, b = self.drift(x, self.evaluate(x, p), p)
        x1 = self._noisy(x, [term], [1 + dt * a, dt * b], self.eta * torch.sqrt(p.g2 * h), drawn, out=out[0])
        term2, a2, b2 = self.drift(x1, self.evaluate(x1, q), q)
        return x1, self._noisy(x, [x1, term2], [0.5, 0.5 + dt * a2 / 2, dt * b2 / 2],
                               self.eta / 2 * torch.sqrt(q.g2 * h), drawn, out=out[1])
