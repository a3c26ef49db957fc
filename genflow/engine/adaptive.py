"""Adaptive step sizes: the per-sample accept/reject loop, the step-size controller, the error
norm and the initial step.

Every sample has its own time, step size and error norm (the fused update takes per-sample
coefficient vectors), so a batch takes as many iterations as its hardest sample and each sample
follows the step sequence it would follow alone; ``error_norm="batch"`` pools the norms into one
(one step size for the batch, as torchdiffeq and ``scipy.integrate.solve_ivp`` on the flattened
batch). Step sizes ``h`` are magnitudes; each sample integrates from ``t_start`` toward
``t_end`` in its own direction. The controller and bookkeeping run on the host in float64 (one
device-to-host copy of the error norms per iteration).
"""
import math
from typing import Optional

import numpy as np
import torch

from genflow.errors import NonFiniteError, diverged_rows

__all__ = ["PIDController", "StepController", "diverged_error", "iterate", "rms", "initial_step", "pooled", "power"]


def rms(v: torch.Tensor) -> torch.Tensor:
    """Per-sample root mean square of v (Tensor[B, *D]) as float64 [B] on the host."""
    return v.reshape(v.shape[0], -1).double().square().mean(1).sqrt().cpu()


def pooled(norms: torch.Tensor, error_norm: str) -> torch.Tensor:
    """The per-sample norms, or (``error_norm="batch"``) their rms over the batch for every sample."""
    if error_norm == "batch":
        return norms.square().mean().sqrt().expand_as(norms).clone()
    return norms


def power(base, exponent: float) -> torch.Tensor:
    """``base ** exponent`` for a float64 host tensor (or array), each value's bits independent of its batch.

    torch's CPU ``pow`` runs whole SIMD vectors through SLEEF and the remainder through
    ``std::pow``; the two round differently (1 ulp in about 2% of values), so a step-size factor
    would depend on a sample's position and batch size, and on a Brownian path accept/reject
    amplifies that to the solver's error. NumPy's loop takes one routine for every element.
    """
    return torch.from_numpy(_power(_host(base), exponent))


def _host(v) -> np.ndarray:
    """A float64/bool host tensor or array as a NumPy array (no copy for a CPU tensor)."""
    if not isinstance(v, torch.Tensor):
        return np.asarray(v)
    return v.numpy() if v.device.type == "cpu" and not v.requires_grad else v.detach().cpu().numpy()


def _power(base: np.ndarray, exponent: float) -> np.ndarray:
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        return np.power(base, exponent)


class StepController:
    """The step-size controller of DOPRI5 (Hairer, Nørsett & Wanner, *Solving ODEs I*, §II.4 and
    the code's PI control, §IV.2 of volume II):

        fac = clip(err^(1/(q+1) - 0.75 beta) / err_prev^beta / safety, 1/fac_max, 1/fac_min),  h' = h / fac

    with ``q`` the embedded solution's order, no growth right after a rejection, and after a
    rejection ``h' = h / min(err^(1/(q+1) - 0.75 beta) / safety, 1/fac_min)``. ``beta = 0`` is the
    plain controller of scipy and torchdiffeq, ``h (safety / err)^(1/(q+1))``; DOPRI5 uses
    ``beta = 0.04`` (Lund stabilisation). Float64 [B] host tensors in and out, computed in NumPy
    (a few dozen elementwise operations on the host cost less as NumPy calls than as torch ops).
    """

    def __init__(self, error_order: int, *, beta: float = 0.0, safety: float = 0.9, fac_min: float = 0.2,
                 fac_max: float = 10.0):
        self.exponent, self.beta = 1.0 / (error_order + 1), beta
        self.safety, self.fac_min, self.fac_max = safety, fac_min, fac_max
        self.err_prev = self.rejected = None

    def reset(self, batch: int) -> None:
        self.err_prev = np.full(batch, 1e-4)
        self.rejected = np.zeros(batch, dtype=bool)

    def __call__(self, err, h, accept) -> torch.Tensor:
        err, h, accept = _host(err), _host(h), _host(accept)
        fac11 = _power(err, self.exponent - 0.75 * self.beta)
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):  # IEEE results, as torch's
            fac = fac11 / self.safety
            if self.beta:
                fac = fac / _power(self.err_prev, self.beta)
            fac = np.clip(fac, 1 / self.fac_max, 1 / self.fac_min)
            h_accept = np.where(self.rejected, np.minimum(h / fac, h), h / fac)
            h_reject = h / np.minimum(fac11 / self.safety, 1 / self.fac_min)
        self.err_prev = np.where(accept, np.maximum(err, 1e-4), self.err_prev)
        self.rejected = ~accept & (h > 0)
        return torch.from_numpy(np.where(accept, h_accept, h_reject))


class PIDController:
    """PID step-size control (Söderlind 2003, "Digital filters in adaptive time-stepping", ACM TOMS
    29, §4) with the limiter ``1 + atan(f - 1)`` (Söderlind & Wang 2006, "Adaptive time-stepping and
    computational stability", J. Comput. Appl. Math. 185, §3), as in DPM-Solver's adaptive solver
    (Lu et al. 2022, Appendix C) and k-diffusion's ``sample_dpm_adaptive``. On inverse errors
    ``e = 1/(err + eps)``::

        f = e_n^b1 e_(n-1)^b2 e_(n-2)^b3,  b1 = (kP + kI + kD)/k,  b2 = -(kP + 2 kD)/k,  b3 = kD/k,
        f <- 1 + atan(f - 1)

    with ``e_(n-1)``, ``e_(n-2)`` the last two accepted steps' (all three the first error at the
    start) and ``k`` the order of the error estimate; ``kI = 1`` alone is the I controller
    ``h (1/err)^(1/k)``. A step is accepted where ``f >= accept_safety`` and ``h <- f h`` either
    way. Unlike ``StepController`` the controller itself decides acceptance. Per-sample (float64
    [B] host tensors in and out), in Python floats per sample (C's ``pow`` and ``atan``), so that
    it takes k-diffusion's decisions bit for bit on every platform; DPM-Solver's adaptive sampler
    runs it on one batch-wide error, where that costs nothing.
    """

    def __init__(self, pcoeff: float, icoeff: float, dcoeff: float, order: float, *, accept_safety: float = 0.81,
                 eps: float = 1e-8):
        self.b = ((pcoeff + icoeff + dcoeff) / order, -(pcoeff + 2 * dcoeff) / order, dcoeff / order)
        self.accept_safety, self.eps = accept_safety, eps
        self.inv_errors = None  # per sample: [current, previous accepted, the one before]

    def __call__(self, err: torch.Tensor, h: torch.Tensor):
        """``(accept, h_next)`` (bool [B], float64 [B]) for the error norms ``err`` of steps ``h``."""
        inv = [1 / (e + self.eps) for e in err.tolist()]
        if self.inv_errors is None:
            self.inv_errors = [[v, v, v] for v in inv]
        b1, b2, b3 = self.b
        factors, accepts = [], []
        for e, v in zip(self.inv_errors, inv):
            e[0] = v
            factor = 1 + math.atan(e[0] ** b1 * e[1] ** b2 * e[2] ** b3 - 1)
            accept = factor >= self.accept_safety
            if accept:
                e[1], e[2] = e[0], e[1]
            factors.append(factor)
            accepts.append(accept)
        return torch.tensor(accepts), h * torch.tensor(factors, dtype=torch.float64)


def initial_step(y, f0, step_to, derivative, span, *, rtol: float, atol: float, error_order: int,
                 error_norm: str = "sample") -> torch.Tensor:
    """Hairer's automatic first step (Hairer, Nørsett & Wanner I, §II.4, "Starting step size"),
    per sample: ``h0 = 0.01 |y|/|f0|``, one explicit Euler step ``y1 = step_to(h0)`` and
    ``f1 = derivative(y1, h0)``, ``h1 = (0.01 / max(|f0|, |f1 - f0| / h0))^(1/(q+1))``,
    ``h = min(100 h0, h1, span)`` (norms scaled by ``atol + rtol |y|``; 1 NFE)."""
    scale = y.abs().mul(rtol).add_(atol)
    d0 = pooled(rms(y / scale), error_norm)
    d1 = pooled(rms(f0 / scale), error_norm)
    h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), 1e-6, 0.01 * d0 / d1.clamp_min(1e-300))
    h0 = torch.minimum(h0, span)
    f1 = derivative(step_to(h0), h0)
    d2 = pooled(rms((f1 - f0) / scale), error_norm) / h0
    dmax = torch.maximum(d1, d2)
    h1 = torch.where(dmax <= 1e-15, torch.clamp_min(h0 * 1e-3, 1e-6),
                     (0.01 / dmax.clamp_min(1e-300)) ** (1.0 / (error_order + 1)))
    h = torch.minimum(torch.minimum(100 * h0, h1), span)
    return torch.where(torch.isfinite(h), h, span)


def iterate(stepper, x: torch.Tensor, t_start: torch.Tensor, t_end: torch.Tensor, *, max_steps: int,
            check_finite: bool, h_init: Optional[float] = None):
    """The per-sample adaptive loop (a generator) over the hooks of ``stepper``:

    ``_start(x, t, span) -> h`` (first step sizes), ``_attempt(x, t, h) -> err`` (float64 [B]
    error norms of a step of size ``h`` from ``t`` toward ``t_end``; accepted where ``<= 1``),
    ``_control(err, h, accept) -> h_next``, ``_commit(x, accept, done) -> x`` (take the attempt
    where accepted), and ``_diverged(rows, t, h, what)`` (raise ``NonFiniteError``).

    After every iteration it yields ``(x, info, progress)``: ``info`` holds ``i``, ``t``,
    ``t_next`` (float64 [B]; ``t_next = t`` where rejected), ``h``, ``accepted`` (bool [B]),
    ``error`` and ``accepted_steps`` (int64 [B], cumulative); ``progress`` is the smallest
    fraction of its interval any sample has done. Sets ``stepper.accepted_steps`` and
    ``rejected_steps``. A sample that has reached ``t_end`` rides along with ``h = 0``.
    The per-sample bookkeeping runs in NumPy float64 on the host (the hooks see its arrays as
    host tensors, without copies); the error norms are the one device-to-host copy per iteration.
    """
    t_start, t_end = _host(t_start).astype(np.float64), _host(t_end).astype(np.float64)
    batch = x.shape[0]
    direction = np.where(t_end >= t_start, 1.0, -1.0)
    span = np.abs(t_end - t_start)
    t = t_start.copy()
    accepted_steps, rejected_steps = np.zeros(batch, dtype=np.int64), np.zeros(batch, dtype=np.int64)
    stepper.accepted_steps = torch.from_numpy(accepted_steps)  # views: updated in place below
    stepper.rejected_steps = torch.from_numpy(rejected_steps)
    done = span == 0
    as_t = torch.from_numpy
    h = _host(stepper._start(x, as_t(t), as_t(span)))
    if h_init is not None:
        h = np.minimum(np.full_like(t, float(h_init)), span)
    nonfinite_err = np.zeros(batch, dtype=bool)
    nonfinite_seen = nonfinite_err.copy()  # samples whose error norm has been NaN/Inf at some attempt
    i = 0
    while not done.all():
        if i >= max_steps:
            raise RuntimeError(f"{stepper.name!r} reached max_steps={max_steps} with {int((~done).sum())} samples "
                               f"short of t_end (at t={t[~done][:4].tolist()}...); raise max_steps or loosen rtol/atol")
        remaining = (t_end - t) * direction
        last = (1.01 * h >= remaining) & ~done  # land on t_end exactly rather than just short of it
        h = np.where(done, 0.0, np.where(last, remaining, h))
        tiny = ~done & (h <= 1e-13 * np.maximum(np.abs(t), span))
        if check_finite and (tiny & nonfinite_err).any():  # name every sample that has met a NaN/Inf
            stepper._diverged(as_t(nonfinite_seen), as_t(t), as_t(h), "its error norm is NaN/Inf at every step size down to")
        if tiny.any():
            raise RuntimeError(f"{stepper.name!r}: step size underflow (h={h[tiny][:4].tolist()} at "
                               f"t={t[tiny][:4].tolist()}); the derivative may be non-finite or the "
                               f"tolerances too tight for {x.dtype}")
        err = _host(stepper._attempt(x, as_t(t), as_t(h)))
        nonfinite_err = ~done & ~np.isfinite(err)  # retried with smaller h: raises at underflow
        nonfinite_seen |= nonfinite_err
        err = np.where(done, 0.0, np.where(np.isnan(err), math.inf, err))
        accept = (err <= 1.0) & ~done
        accept_t, done_t = as_t(accept), as_t(done)
        h_next = _host(stepper._control(as_t(err), as_t(h), accept_t))
        x = stepper._commit(x, accept_t, done_t)
        if check_finite:
            bad = diverged_rows(x)
            if bool(bad.any()):
                stepper._diverged(bad, as_t(t), as_t(h), "an accepted step made the state NaN/Inf; step")
        t_next = np.where(accept, np.where(last, t_end, t + direction * h), t)
        done = done | (accept & last)
        accepted_steps += accept
        rejected_steps += ~accept & ~done
        progress = float((np.abs(t_next - t_start) / np.maximum(span, 1e-300)).min())
        info = {"i": i, "t": as_t(t), "t_next": as_t(t_next), "h": as_t(h), "accepted": accept_t, "error": as_t(err),
                "accepted_steps": as_t(accepted_steps.copy())}
        yield x, info, progress
        t, h, i = t_next, h_next, i + 1


def diverged_error(caller: str, solver: str, rows: torch.Tensor, t: torch.Tensor, h: torch.Tensor, what: str,
                   advice: str) -> NonFiniteError:
    """The ``NonFiniteError`` of an adaptive solve for the samples ``rows`` (bool [B]) at times
    ``t`` with steps ``h``: what went non-finite (``what``) and what to check (``advice``)."""
    rows = rows.cpu()
    return NonFiniteError(
        f"{caller}: solver {solver!r} diverged at t={t[rows][:4].tolist()}: {what} h={h[rows][:4].tolist()}; "
        f"{int(rows.sum())} of {rows.shape[0]} samples diverged; check {advice} "
        f"(pass check_finite=False to skip this check)")
