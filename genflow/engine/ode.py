"""ODE solvers of ``gf.solve``: any Butcher tableau on a fixed grid (``FixedRK``) or with
adaptive per-sample steps (``AdaptiveRK``), both run by the one Runge–Kutta engine
(``genflow.engine.rk``) and driven by the one time loop (``genflow.engine.loop``)."""
from typing import Callable, Optional

import torch

from genflow.engine.adaptive import StepController, diverged_error, initial_step, iterate, pooled, rms
from genflow.engine.rk import RungeKutta
from genflow.engine.tableau import ButcherTableau

__all__ = ["FixedRK", "AdaptiveRK"]


def _step_row(ts: torch.Tensor, i: int):
    """``(t_i, h_i)`` of a grid ``[N+1]`` (floats) or ``[N+1, B]`` (float64 [B] host tensors)."""
    if ts.dim() == 1:
        t, t_next = float(ts[i]), float(ts[i + 1])
        return t, t_next - t
    return ts[i], ts[i + 1] - ts[i]


class FixedRK:
    """An explicit Runge–Kutta method stepped over a time grid (the ``Solver`` step protocol:
    ``step(i, y)``, ``evaluations``, ``nonfinite``, ``step_index``).

    ``ts`` is the float64 host grid ``[N+1]`` or per-sample ``[N+1, B]``; ``f(y, t)`` the
    derivative (``t`` a float or float64 [B] host tensor). FSAL methods reuse the last stage of
    a step as the next step's first. NFE: ``tableau.nfe_per_step`` per step (+1 for FSAL).
    """

    adaptive = False

    def __init__(self, tableau: ButcherTableau, f: Callable, ts: torch.Tensor, *, kernel: bool,
                 view: Optional[Callable] = None):
        self.name, self.tableau, self.ts = tableau.name, tableau, ts
        self.engine = RungeKutta(tableau, f, view=view, kernel=kernel)
        self._carry = None

    evaluations = property(lambda self: self.engine.evaluations)
    nonfinite = property(lambda self: self.engine.nonfinite,
                         lambda self, flag: setattr(self.engine, "nonfinite", flag))
    step_index = property(lambda self: self.engine.step_index,
                          lambda self, i: setattr(self.engine, "step_index", i))

    def step(self, i: int, y: torch.Tensor) -> torch.Tensor:
        t, h = _step_row(self.ts, i)
        y = self.engine.step(y, t, h, first=self._carry if i > 0 else None)
        self._carry = self.engine.terms[-1] if self.tableau.fsal else None
        return y


class AdaptiveRK:
    """An embedded Runge–Kutta pair with per-sample adaptive steps (``solve(y)`` generator,
    the protocol of ``genflow.solvers.adaptive.AdaptiveSolver``).

    Error norm per sample: ``||err|| = sqrt(mean((err / (atol + rtol max(|y|, |y'|)))^2))`` (or
    DOP853's combined 5th/3rd-order norm), pooled over the batch with ``error_norm="batch"``;
    a step is accepted where ``||err|| <= 1``; the next step from ``StepController`` (``beta =
    0``: scipy's and torchdiffeq's controller); the first step by Hairer's rule (1 NFE) unless
    ``h_init``. ``saveat`` (float64 [S] or [S, B] host times, inside the interval) are filled
    from the step that covers them with the dense output (``RungeKutta.dense``): ``saved``
    (Tensor[S, B, *D]) after the solve. ``dense=True`` keeps every step's stages (``steps``) so
    that ``evaluate(t)`` interpolates anywhere in the interval afterwards. ``caller`` and
    ``advice`` name the front end and what to check in a ``NonFiniteError`` (gf.solve's by default).
    """

    adaptive = True

    def __init__(self, tableau: ButcherTableau, f: Callable, t0: torch.Tensor, t1: torch.Tensor, *, kernel: bool,
                 rtol: float, atol: float, error_norm: str = "sample", h_init=None, max_steps: int = 10_000,
                 saveat: Optional[torch.Tensor] = None, dense: bool = False, check_finite: bool = True,
                 caller: str = "gf.solve", advice: str = "the drift at these times"):
        if not (tableau.adaptive and tableau.fsal):
            raise ValueError(f"solver {tableau.name!r} has no embedded error estimate: pass steps= or ts= "
                             f"(adaptive solvers: dopri5, tsit5, bosh3, dop853)")
        self.name, self.tableau = tableau.name, tableau
        self.engine = RungeKutta(tableau, f, kernel=kernel)
        self._error_buffer = None
        self.t0, self.t1 = t0, t1
        self.direction = torch.where(t1 >= t0, 1.0, -1.0).to(torch.float64)
        self.rtol, self.atol, self.error_norm = rtol, atol, error_norm
        self.h_init, self.max_steps, self.check_finite = h_init, max_steps, check_finite
        self.caller, self.advice = caller, advice  # who reports a divergence, and what to check
        self.controller = StepController(tableau.error_order)
        self.saveat, self.saved = saveat, None
        self.steps = [] if dense else None  # (t, signed h, accepted, engine record) of every iteration
        self.accepted_steps = self.rejected_steps = None
        self.nonfinite, self.step_index = None, 0

    @property
    def evaluations(self) -> int:
        return self.engine.evaluations

    def solve(self, y: torch.Tensor):
        """Integrate ``y`` from ``t0`` to ``t1``; yields ``(y, info, progress)`` per iteration."""
        if self.saveat is not None:
            self.saved = y.new_zeros((self.saveat.shape[0],) + tuple(y.shape))
            self._save(y, self.t0, torch.zeros_like(self.t0), torch.ones(y.shape[0], dtype=torch.bool), at_start=True)
        return iterate(self, y, self.t0, self.t1, max_steps=self.max_steps, check_finite=self.check_finite,
                       h_init=self.h_init)

    def _start(self, y, t, span):
        self.controller.reset(y.shape[0])
        self._first = self.engine.evaluate(y, t)
        if self.h_init is not None:
            return span
        f0 = self._first

        def euler(h0):
            return y + (self.direction * h0).to(y.dtype).to(y.device).reshape((-1,) + (1,) * (y.dim() - 1)) * f0

        with torch.no_grad():  # the step-size choice is not differentiated
            return initial_step(y, f0, euler, lambda y1, h0: self.engine.evaluate(y1, t + self.direction * h0),
                                span, rtol=self.rtol, atol=self.atol, error_order=self.tableau.error_order,
                                error_norm=self.error_norm)

    def _attempt(self, y, t, h):
        self._t, self._h = t, h
        self._y_new = self.engine.step(y, t, self.direction * h, first=self._first)
        with torch.no_grad():  # the step-size decision is not differentiated
            scale = torch.maximum(y.abs(), self._y_new.abs()).mul_(self.rtol).add_(self.atol)
            if self._error_buffer is None:
                self._error_buffer = torch.empty_like(y, memory_format=torch.contiguous_format)
            err = self.engine.combine("error", out=self._error_buffer)
            if self.tableau.error3 is None:
                return pooled(rms(err.div_(scale)), self.error_norm)
            err5 = rms(err.div_(scale)).square()
            err3 = rms(self.engine.combine("error3", out=self._error_buffer).div_(scale)).square()
            norm = err5 / (err5 + 0.01 * err3).sqrt()
            return pooled(torch.where(err5 + err3 == 0, 0.0, norm), self.error_norm)

    def _control(self, err, h, accept):
        return self.controller(err, h, accept)

    def _commit(self, y, accept, done):
        if self.saveat is not None:
            self._save(y, self._t, self._h, accept)
        if self.steps is not None and bool(accept.any()):
            states, terms, alpha, beta = self.engine.record()
            self.steps.append((self._t, self.direction * self._h, accept,
                               ([states[0].clone()], [k.clone() for k in terms], alpha, beta)))
        last = self.engine.terms[-1]
        if bool((accept | done).all()):
            self._first = last
            return self._y_new if bool(accept.any()) else y
        mask = accept.to(y.device).reshape((-1,) + (1,) * (y.dim() - 1))
        self._first = torch.where(mask, last, self._first)
        return torch.where(mask, self._y_new, y)

    def _save(self, y, t, h, accept, at_start=False):
        """Fill the save times in ``(t, t + direction h]`` of the accepted samples (at the start:
        those equal to ``t0``) from the step's dense output."""
        for j in range(self.saveat.shape[0]):
            ts = self.saveat[j]
            offset = (ts - t) * self.direction
            inside = accept & ((offset == 0) if at_start else ((offset > 0) & (offset <= h)))
            if not bool(inside.any()):
                continue
            if at_start:
                value = y
            else:
                theta = torch.where(inside, offset / h.clamp_min(1e-300), 0.0).clamp(0.0, 1.0)
                value = self.engine.dense(theta, self.direction * h)
            mask = inside.to(y.device).reshape((-1,) + (1,) * (y.dim() - 1))
            self.saved[j] = torch.where(mask, value, self.saved[j])

    def evaluate(self, t) -> torch.Tensor:
        """The dense solution at ``t`` (a float or float64 [B], inside every sample's interval)
        after a solve with ``dense=True``: the interpolant of the accepted step covering it."""
        if self.steps is None:
            raise ValueError("evaluate needs a solve with dense=True")
        t = torch.as_tensor(t, dtype=torch.float64).expand_as(self.t0)
        offset = (t - self.t0) * self.direction
        span = (self.t1 - self.t0) * self.direction
        if bool(((offset < 0) | (offset > span)).any()):
            raise ValueError(f"t must lie in each sample's interval [t0, t1], got {t[:4].tolist()}")
        out, found = None, offset == 0
        for t_step, h, accept, step in self.steps:
            inside = accept & ((t - t_step) * self.direction >= 0) & ((t - t_step) * self.direction <= h.abs())
            if not bool(inside.any()):
                continue
            theta = torch.where(inside, (t - t_step) / torch.where(h == 0, 1.0, h), 0.0).clamp(0.0, 1.0)
            value = self.engine.dense(theta, h, step=step)
            out = value if out is None else torch.where(inside.to(value.device).reshape(
                (-1,) + (1,) * (value.dim() - 1)), value, out)
            found = found | inside
        if out is None or not bool(found.all()):
            raise ValueError("t is outside the solved interval of some sample")
        return out

    def _diverged(self, rows, t, h, what):
        raise diverged_error(self.caller, self.name, rows, t, h, what, self.advice)
