"""Exact likelihoods of diffusion and flow models through the probability-flow ODE.

Along a solution ``x_t`` of the probability-flow ODE ``dx/dt = v(x, t)`` (``model.velocity``),
the marginal densities obey the instantaneous change of variables (Lim, "An Introduction to Generative Modeling with Flows and Diffusion Models" §6.3.1.6; the lecture slides "Generative Modeling";
Chen et al. 2018, FFJORD: Grathwohl et al., ICLR 2019)::

    d/dt log q_t(x_t) = -div v(x_t, t)

so, integrating the augmented state ``[x, delta]`` with ``d delta/dt = +div v(x_t, t)`` forward
from ``x_{t_end} = x``, ``delta = 0`` at ``t = t_end`` to ``t = T``::

    log q_{t_end}(x) = log q_T(x_T) + int_{t_end}^T div v(x_t, t) dt = prior_log_prob(x_T) + delta(T)

The divergence is the trace of the Jacobian ``dv/dx``: computed exactly (``method="exact"``,
one backward pass per dimension, in a loop or batched over dimensions, or ``torch.compile``d)
or by Hutchinson's estimator (Hutchinson 1989) ``div v = E[eps^T (dv/dx) eps]`` with
``E[eps eps^T] = I`` and the probes ``eps`` held fixed over the whole solve (FFJORD), which keeps
the ODE smooth for the adaptive solver and makes ``log_likelihood`` an unbiased estimate of
``log q_{t_end}(x)`` up to the solver error (the estimate of ``log q`` is unbiased, not that of
``q``).
"""
from __future__ import annotations

import math
import numbers
import time
import warnings
from collections import OrderedDict

import numpy as np
import torch

from genflow._checks import check_choice
from genflow.noise import generator_seed
from genflow.ops import hutchinson as _hutch
from genflow.ops.fused_update import fused_update_packed, randn, use_kernel
from genflow.engine.tableau import DOPRI5
from genflow.errors import NonFiniteError, diverged_rows

__all__ = ["bits_per_dim", "log_likelihood"]

METHODS = ("hutchinson", "exact")
MODES = ("auto", "vjp", "jvp")
SOLVERS = ("rk45", "heun", "rk4")
ERROR_NORMS = ("sample", "batch")
# Butcher tableaux (c, a, b) of the fixed-step solvers: Heun's (explicit trapezoidal) and classic RK4
_FIXED = {
    "heun": ((0.0, 1.0), ((), (1.0,)), (0.5, 0.5)),
    "rk4": ((0.0, 0.5, 0.5, 1.0), ((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)), (1 / 6, 1 / 3, 1 / 3, 1 / 6)),
}
_EXACT_CHUNK = 1 << 22  # elements per batched exact-divergence pass: dims * B * D
_DEQUANT_OFFSET = 1 << 62  # Philox offset of bits_per_dim's dequantisation noise (probes use 0..P-1)


class _Drift:
    """The augmented drift ``(x, t) -> (v(x, t), div v(x, t))``: v in the state dtype, the
    divergence float64 [B]; counts evaluations in ``nfe`` (one per batch-wide drift call).
    ``mode``: for hutchinson "vjp" or "jvp"; for exact None (measured), "loop", "batched" or
    "compile" (``_compiled_exact``)."""

    def __init__(self, model, method, eps, mode):
        self.model, self.method, self.eps, self.mode = model, method, eps, mode
        self.nfe = 0

    def __call__(self, x, t):
        self.nfe += 1
        return self.evaluate(x, t)

    def check_differentiable(self, x, t: float) -> None:
        """Raise ``ValueError`` naming the model when its network's output does not depend on
        ``x`` through autograd (a ``.detach()``, ``torch.no_grad`` or a non-torch computation
        inside): its divergence, exact or Hutchinson, would be a confident wrong number. One
        forward and one backward pass on the first sample."""
        with torch.enable_grad():
            xg = x[:1].detach().requires_grad_(True)
            out = self.model.raw(xg, t)
            grad = None
            if out.requires_grad:
                (grad,) = torch.autograd.grad(out.sum(), xg, allow_unused=True)
        if grad is None:
            raise ValueError(
                f"log_likelihood: the output of {self.model!r} does not depend on x through autograd (a .detach(), "
                f"torch.no_grad() or a non-torch computation inside the network), so the divergence of its drift "
                f"cannot be computed (method={self.method!r}); make the network differentiable in x")

    def evaluate(self, x, t):
        """``(v, div)`` without counting (the body a CUDA graph captures)."""
        if self.method == "exact":
            return self._exact(x, t)
        if self.mode == "jvp":
            try:
                return self._jvp(x, t)
            except (RuntimeError, NotImplementedError):  # not forward-mode differentiable
                self.mode = "vjp"
        return self._vjp(x, t)

    def _velocity(self, x, t):
        return self.model.velocity(x, t)

    def _vjp(self, x, t):
        scale = 1.0 / len(self.eps)
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            v = self._velocity(xg, t)
            div = None
            for k, eps in enumerate(self.eps):
                (g,) = torch.autograd.grad(v, xg, eps, retain_graph=k + 1 < len(self.eps))
                div = _hutch.probe_dot(eps, g, scale=scale, accumulate=div)
        return v.detach(), div

    def _jvp(self, x, t):
        scale = 1.0 / len(self.eps)
        div = None
        for eps in self.eps:
            v, jv = torch.func.jvp(lambda y: self._velocity(y, t), (x,), (eps,))
            div = _hutch.probe_dot(eps, jv, scale=scale, accumulate=div)
        return v, div

    def _exact(self, x, t):
        """tr(dv/dx) by ``_exact_loop`` (one forward, one backward per dimension: the least
        arithmetic; always on CPU, where each pass is compute-bound) or ``_exact_batched`` (the
        dimensions batched into one forward and one backward: the fewest kernel launches). On
        other devices the faster of the two is timed on the first evaluations and remembered per
        model, shape, dtype and device (``_EXACT_CHOICE``)."""
        if self.mode == "compile":
            fn = _compiled_exact(self.model, x)
            return self._exact_loop(x, t) if fn is None else fn(x, t)
        if self.mode == "batched":
            return self._exact_batched(x, t)
        if self.mode == "loop" or x[0].numel() == 1 or not _times_schemes(x.device):
            return self._exact_loop(x, t)
        key = (id(self.model), tuple(x.shape), x.dtype, str(x.device))
        entry = _EXACT_CHOICE.get(key)
        if entry is not None and entry[0] is self.model and entry[1] is not None:
            return entry[1](self, x, t)
        if entry is None or entry[0] is not self.model:
            entry = _EXACT_CHOICE[key] = [self.model, None, []]
            while len(_EXACT_CHOICE) > 16:
                _EXACT_CHOICE.popitem(last=False)
        timings = entry[2]
        scheme = _EXACT_SCHEMES[len(timings) % 2]  # alternate the two
        _sync(x)
        start = time.perf_counter()
        out = scheme(self, x, t)
        _sync(x)
        timings.append(time.perf_counter() - start)
        if len(timings) == 2 * _EXACT_ROUNDS:  # the best time of each, past the warm-up round
            entry[1] = min(_EXACT_SCHEMES, key=lambda f: min(timings[2 + _EXACT_SCHEMES.index(f)::2]))
        return out

    def _exact_loop(self, x, t):
        """One forward pass, then one backward pass per dimension i (output gradient ``e_i``
        summed over the batch, row i of every sample's Jacobian; samples must not interact)."""
        batch = x.shape[0]
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            v = self._velocity(xg, t)
            vf = v.reshape(batch, -1)
            dim = vf.shape[1]
            div = torch.zeros(batch, dtype=torch.float64, device=x.device)
            for i in range(dim):
                (g,) = torch.autograd.grad(vf[:, i].sum(), xg, retain_graph=i + 1 < dim)
                div += g.reshape(batch, -1)[:, i]
        return v.detach(), div

    def _exact_batched(self, x, t):
        """The batch replicated over a chunk of c dimensions, one backward pass per chunk with
        the one-hot rows ``e_i`` as output gradients (replica i gives row i of the Jacobian)."""
        batch, dim = x.shape[0], x[0].numel()
        div = None
        v = None
        for start, basis in self._bases(x):
            c = basis.shape[0] // batch
            with torch.enable_grad():
                xr = x.detach().repeat((c,) + (1,) * (x.dim() - 1)).requires_grad_(True)
                vr = self._velocity(xr, t.repeat(c))
                (g,) = torch.autograd.grad(vr, xr, basis)
            part = (g * basis).reshape(c, batch, dim).sum((0, 2), dtype=torch.float64)
            div = part if div is None else div + part
            if v is None:
                v = vr[:batch].detach()
        return v, div

    def _bases(self, x):
        """``[(start, e)]`` per chunk of dimensions: e (Tensor[c B, *D]) holds in replica i the
        unit vector of dimension start + i; cached for the solve (x's shape is fixed)."""
        key = (x.shape, x.dtype, x.device)
        if getattr(self, "_basis_key", None) != key:
            batch, dim = x.shape[0], x[0].numel()
            chunk = max(1, min(dim, _EXACT_CHUNK // max(1, batch * dim)))
            self._basis_list = []
            for start in range(0, dim, chunk):
                c = min(dim, start + chunk) - start
                e = torch.zeros(c, batch, dim, dtype=x.dtype, device=x.device)
                e[torch.arange(c, device=x.device), :, torch.arange(start, start + c, device=x.device)] = 1
                self._basis_list.append((start, e.reshape((c * batch,) + tuple(x.shape[1:]))))
            self._basis_key = key
        return self._basis_list


class _GraphedDrift:
    """The drift replayed from a CUDA graph (``log_likelihood(..., cuda_graph=True)``).

    One evaluation (the forward pass, the VJP/JVP or exact-trace backward passes and
    ``probe_dot``) is a few dozen small kernels, so at moderate batch its cost is launch latency
    (DESIGN.md §6: torch.func VJP 8x a forward on H100). Captured once per model, method, mode,
    shape and dtype (``genflow.cuda_graph._record``: warm-up on a side stream, then capture), each
    evaluation copies x, t (and, per solve, the probes) into the graph's static inputs and
    replays it. A model that cannot be captured (host syncs, data-dependent shapes) is evaluated
    eagerly with a warning."""

    def __init__(self, drift, x, t):
        self.drift, self.nfe = drift, 0
        key = (id(drift.model), drift.method, drift.mode, tuple(x.shape), x.dtype, str(x.device), len(drift.eps))
        entry = _DRIFT_GRAPHS.get(key)
        if entry is None or entry[0] is not drift.model:
            entry = self._capture(drift, x, t, key)
        _DRIFT_GRAPHS.move_to_end(key)
        self.replay, self.x, self.t, self.eps, self.out = entry[1:]
        for static, eps in zip(self.eps, drift.eps):
            static.copy_(eps)

    @staticmethod
    def _capture(drift, x, t, key):
        from genflow import cuda_graph

        static_x, static_t = x.detach().clone(), t.clone()
        static_eps = [e.clone() for e in drift.eps]
        mode = "batched" if drift.method == "exact" else drift.mode  # no timing inside a capture
        body_drift = _Drift(drift.model, drift.method, static_eps, mode)
        replay, out = cuda_graph._record(lambda: body_drift.evaluate(static_x, static_t), x.device)
        entry = (drift.model, replay, static_x, static_t, static_eps, out)
        _DRIFT_GRAPHS[key] = entry
        while len(_DRIFT_GRAPHS) > 8:
            _DRIFT_GRAPHS.popitem(last=False)
        return entry

    def __call__(self, x, t):
        self.nfe += 1
        self.x.copy_(x)
        self.t.copy_(t)
        self.replay()
        return self.out[0].clone(), self.out[1].clone()


_DRIFT_GRAPHS = OrderedDict()  # key -> (model, replay, static x, t, probes, (v, div))


_EXACT_SCHEMES = (_Drift._exact_batched, _Drift._exact_loop)
_EXACT_ROUNDS = 4  # timed evaluations of each exact scheme (real drift calls) before choosing
_EXACT_CHOICE = OrderedDict()  # (id(model), shape, dtype, device) -> [model, scheme or None, timings]


_COMPILED = OrderedDict()  # (id(model), shape, dtype, device) -> (model, drift function or None)


def _compiled_exact(model, x):
    """The exact drift ``(x, t) -> (v, tr dv/dx)`` of ``model`` as one ``torch.compile``d function
    (``torch.func.vjp``, its pullback vmapped over the D unit vectors: the forward once, the D
    backward rows as one batched pass, fused by inductor), kept per model, shape, dtype and
    device. None on the first call for a key (evaluate eagerly with plain autograd then, so state
    a model builds lazily is made outside any trace or transform); compiled on the second, which
    keeps the eager ``torch.func`` function, with a warning, where compiling fails."""
    key = (id(model), tuple(x.shape), x.dtype, str(x.device))
    entry = _COMPILED.get(key)
    if entry is None or entry[0] is not model:
        _COMPILED[key] = (model, None)
        while len(_COMPILED) > 8:
            _COMPILED.popitem(last=False)
        return None
    _COMPILED.move_to_end(key)
    if entry[1] is not None:
        return entry[1]
    batch, dim = x.shape[0], x[0].numel()

    def drift(x, t):
        v, pullback = torch.func.vjp(lambda y: model.velocity(y, t), x)
        basis = torch.eye(dim, dtype=x.dtype, device=x.device).reshape((dim, 1) + tuple(x.shape[1:]))
        (rows,) = torch.func.vmap(pullback)(basis.expand((dim,) + tuple(x.shape)))
        div = rows.reshape(dim, batch, dim).diagonal(dim1=0, dim2=2).sum(1, dtype=torch.float64)
        return v, div

    compiled = torch.compile(drift, dynamic=False)

    def first(x, t):
        try:
            out = compiled(x, t)
            fn = compiled
        except Exception as error:  # noqa: BLE001 - any compiler failure: fall back to eager
            warnings.warn(f"log_likelihood(compile=True): torch.compile failed on the drift ({type(error).__name__}: "
                          f"{str(error).splitlines()[0][:200] if str(error) else ''}); evaluating it eagerly",
                          RuntimeWarning, stacklevel=4)
            out, fn = drift(x, t), drift
        _COMPILED[key] = (model, fn)
        return out

    return first


def _times_schemes(device):
    """Whether the exact schemes are timed on ``device`` (not on CPU: there the loop is faster)."""
    return device.type != "cpu"


def _sync(x):
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)


def _graphed(drift, x, t):
    """``_GraphedDrift`` of ``drift``, or ``drift`` itself (with a warning) if capture fails."""
    try:
        return _GraphedDrift(drift, x, t)
    except RuntimeError as error:  # a host sync or an op that cannot be captured
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        warnings.warn(f"cuda_graph=True: the likelihood drift could not be captured as a CUDA graph ({error}); "
                      "evaluating it eagerly", RuntimeWarning, stacklevel=3)
        return drift


def _rms(v: torch.Tensor) -> torch.Tensor:
    """Per-sample root mean square of v (Tensor[B, *D]) as float64 [B]."""
    return v.reshape(v.shape[0], -1).to(torch.float64).square().mean(1).sqrt()


def _rows(h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return h.to(x.dtype).reshape((-1,) + (1,) * (x.dim() - 1))


def _stage(y, d, h, ks, a, *, base=True):
    """``(y + h sum_j a_j v_j, d + h sum_j a_j div_j)`` over the stages ks = [(v_j, div_j)]
    (``base=False``: the sums alone, for the error estimate).

    The state part is one fused pass per four stages (``genflow.ops.fused_update`` with the
    per-sample coefficients ``a_j h``); the log-density part is a float64 matrix-vector product
    over the stages' divergences (B numbers each, no pass over the data)."""
    idx = [j for j, aj in enumerate(a) if aj != 0.0]
    ah = torch.tensor([a[j] for j in idx], dtype=torch.float64, device=h.device)
    kernel = use_kernel("auto", y.device)
    ys = y
    for s in range(0, len(idx), 4):  # coef rows: c0, the chunk's a_j h, noise scale 0
        chunk = idx[s:s + 4]
        coef = torch.zeros(len(chunk) + 2, y.shape[0], dtype=torch.float64, device=h.device)
        coef[0] = 1.0 if (base or s > 0) else 0.0
        torch.outer(ah[s:s + 4], h, out=coef[1:-1])
        ys = fused_update_packed(ys, [ks[j][0] for j in chunk], coef, kernel=kernel,
                                 out=torch.empty_like(y) if s == 0 else ys)
    ds = torch.stack([ks[j][1] for j in idx], 1) @ ah * h
    return ys, (d + ds if base else ds)


def _stage_differentiable(y, d, h, ks, a):
    """``_stage`` in plain differentiable torch ops (CNF training backpropagates through it)."""
    hx = _rows(h, y)
    ys, ds = y, d
    for aj, (vj, dj) in zip(a, ks):
        if aj != 0.0:
            ys = ys + (aj * hx) * vj
            ds = ds + (aj * h) * dj
    return ys, ds


def _fixed(drift, y, t0, t1, steps, tableau, stage=_stage, check_finite=False):
    """Explicit Runge–Kutta on a uniform grid of ``steps`` steps from t0 to t1 (float64 [B]);
    ``check_finite``: raise ``NonFiniteError`` after the first step that leaves a NaN/Inf."""
    c, a, b = tableau
    d = torch.zeros_like(t0)
    h = (t1 - t0) / steps
    for i in range(steps):
        t = t0 + i * h if i + 1 < steps else t1 - h
        ks = [drift(y, t)]
        for j in range(1, len(c)):
            ks.append(drift(stage(y, d, h, ks, a[j])[0], t + c[j] * h))
        y, d = stage(y, d, h, ks, b)
        if check_finite:
            bad = diverged_rows(y.detach()) | ~torch.isfinite(d.detach())
            if bool(bad.any()):
                _diverged("step", i + 1, (t + h).detach().cpu().numpy(), bad.cpu().numpy(), True)
    return y, d, None


def _rk45_plan():
    """The DOPRI5 stage combinations as fused-update chunks: for stage i = 1..6 (its state), for
    the new state (``"new"``) and for the error estimate (``"err"``), a list of ``(terms, row)``
    with at most four stage indices each; rows index a packed coefficient matrix whose row block
    is ``[c0, a_j h ..., 0]`` (``c0`` = 1, or 0 for the error's first chunk). The matrix is
    ``base + outer(slope, h)``: one host computation per step for all stages."""
    base, slope, chunks = [], [], {}

    def add(name, weights, first_c0):
        idx = [j for j, w in enumerate(weights) if w != 0.0]
        out = []
        for s in range(0, len(idx), 4):
            part = idx[s:s + 4]
            out.append((part, len(base)))
            base.extend([first_c0 if s == 0 else 1.0] + [0.0] * len(part) + [0.0])
            slope.extend([0.0] + [weights[j] for j in part] + [0.0])
        chunks[name] = out

    for i in range(1, 7):
        add(i, DOPRI5.a[i], 1.0)
    add("new", DOPRI5.a[6], 1.0)
    add("err", DOPRI5.error, 0.0)
    return np.array(base), np.array(slope), chunks


def _combine(y, ks, pack, chunks, kernel):
    """``c0 y + sum_j (a_j h) ks[j]`` in one fused pass per chunk of four stages."""
    out = None
    for terms, row in chunks:
        coef = pack[row:row + len(terms) + 2]
        out = fused_update_packed(y if out is None else out, [ks[j] for j in terms], coef, kernel=kernel,
                                  out=torch.empty_like(y) if out is None else out)
    return out


def _diverged(where, step, t, bad, check_finite):
    """Raise ``NonFiniteError`` when ``check_finite`` and some sample is flagged in ``bad``
    (bool numpy [B]): names the step, the samples' time range and how many diverged."""
    if check_finite and bad.any():
        times = t[bad]
        raise NonFiniteError(
            f"the likelihood solve diverged at {where} {step} (t in [{times.min():.6g}, {times.max():.6g}]): "
            f"{int(bad.sum())} of {bad.size} samples have a NaN/Inf state, log-density or error estimate; "
            "check the model near these times (or pass check_finite=False)")


def _rk45(drift, y, t0, t1, rtol, atol, max_steps, check_finite=True, error_norm="sample"):
    """Dormand–Prince RK5(4) with FSAL and per-sample step sizes on the augmented state.

    The tableau is that of ``genflow.solvers.adaptive.RK45`` (DOPRI5, Hairer et al., "Solving
    ODEs I", §II.4–II.5); the step size control is the plain ``h (0.9 / err)^(1/5)`` (within
    [0.2 h, 10 h]) of scipy and torchdiffeq, without DOPRI5's Lund stabilisation (whose damped
    start grows the first steps 4x instead of 8x: one more step on short solves). The error
    norm of a sample is the root mean square of its D + 1 scaled components
    ``err_i / (atol + rtol max(|y_i|, |y_i'|))`` over ``y = [x, delta]`` (Hairer's norm, per
    sample), as in the initial step selection (§II.4). Samples that have reached ``t1`` ride
    along with ``h = 0``. ``error_norm="batch"`` pools the norms into one rms over the batch
    (one step size for all, as ``scipy.integrate.solve_ivp`` on the flattened batch).
    ``check_finite``: a NaN/Inf state, divergence or error norm raises ``NonFiniteError``
    instead of shrinking the step.

    The state x stays on its device and every stage combination is fused passes over it
    (``_combine``); the per-sample times, step sizes, log-density ``delta`` and the controller are
    float64 numpy arrays on the host (B numbers each; one device-to-host copy of the error
    norms and stage divergences per step).
    """
    safety, fac_min, fac_max = 0.9, 0.2, 10.0
    dev = y.device
    batch = y.shape[0]
    dim = y[0].numel()
    kernel = use_kernel("auto", dev)
    base, slope, chunks = _RK45_PLAN

    def dev64(a):
        return torch.from_numpy(a).to(dev, non_blocking=False)

    def host(v):
        if v.device.type != "cpu" or v.dtype != torch.float64:
            v = v.to("cpu", torch.float64)
        return v.numpy()

    def norm(rms_x, e_d, s_d):
        """Per-sample rms over [x, delta] from the x part's rms and the delta part's error and scale."""
        return np.sqrt((dim * np.square(rms_x) + np.square(e_d / s_d)) / (dim + 1))

    def pool(norms):
        """The norms as used by the controller: pooled into one rms for ``error_norm="batch"``."""
        return np.full(batch, np.sqrt(np.mean(np.square(norms)))) if error_norm == "batch" else norms

    t_end = host(t1)
    t = host(t0).copy()
    span = t_end - t
    d = np.zeros(batch)
    accepted = np.zeros(batch, dtype=np.int64)
    done = np.zeros(batch, dtype=bool)
    k0, k0_div = drift(y, t0)
    k0_div = host(k0_div)
    # Hairer et al., §II.4, "Starting step size"
    scale = atol + rtol * y.abs()
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        d0 = norm(host(_rms(y / scale)), 0.0, atol)
        d1 = norm(host(_rms(k0 / scale)), k0_div, atol)
        _diverged("the start, step", 0, t, ~(np.isfinite(d0) & np.isfinite(d1)), check_finite)
        d0, d1 = pool(d0), pool(d1)
        h0 = np.where((d0 < 1e-5) | (d1 < 1e-5), 1e-6, 0.01 * d0 / np.maximum(d1, 1e-300))
        h0 = np.minimum(h0, span)
        f1, f1_div = drift(y + _rows(dev64(h0), y) * k0, dev64(t + h0))
        d2 = pool(norm(host(_rms((f1 - k0) / scale)), host(f1_div) - k0_div, atol)) / h0
        dmax = np.maximum(d1, d2)
        h1 = np.where(dmax <= 1e-15, np.maximum(h0 * 1e-3, 1e-6), (0.01 / np.maximum(dmax, 1e-300)) ** 0.2)
    h = np.minimum(np.minimum(100 * h0, h1), span)
    h = np.where(np.isfinite(h), h, span)
    rejected = np.zeros(batch, dtype=bool)
    b_weights, e_weights = np.array(DOPRI5.a[6] + (0.0,)), np.array(DOPRI5.error)
    times_c = np.array(DOPRI5.c)
    for step in range(max_steps):
        if done.all():
            return y, torch.from_numpy(d).to(dev), torch.from_numpy(accepted).to(dev)
        remaining = t_end - t
        last = (1.01 * h >= remaining) & ~done
        h = np.where(done, 0.0, np.where(last, remaining, h))
        pack = dev64(base[:, None] + np.outer(slope, h))
        times = dev64(t + np.outer(times_c, h))
        ks, divs = [k0], [None]
        for i in range(1, 7):
            v, div = drift(_combine(y, ks, pack, chunks[i], kernel), times[i])
            ks.append(v)
            divs.append(div)
        divs = torch.stack(divs[1:], 1)
        y_new = _combine(y, ks, pack, chunks["new"], kernel)
        ex = _combine(y, ks, pack, chunks["err"], kernel)
        sx = torch.maximum(y.abs(), y_new.abs()).mul_(rtol).add_(atol)
        err_x = _rms(ex.div_(sx))
        packed = host(torch.cat([err_x[:, None], divs.to(torch.float64)], 1))
        err_x, divs = packed[:, 0], np.concatenate([k0_div[:, None], packed[:, 1:]], 1)
        with np.errstate(invalid="ignore", over="ignore"):
            d_new = d + h * (divs @ b_weights)
            ed = h * (divs @ e_weights)
            sd = np.maximum(np.abs(d), np.abs(d_new)) * rtol + atol
            err = norm(err_x, ed, sd)
        finite = np.isfinite(err)
        _diverged("step", step + 1, t, ~finite & ~done, check_finite)
        err = np.where(done, 0.0, pool(np.where(finite, err, math.inf)))
        accept = (err <= 1.0) & ~done
        # h (safety / err)^(1/5) within [fac_min, fac_max] h, no growth right after a rejection
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            fac = np.clip(err ** 0.2 / safety, 1 / fac_max, 1 / fac_min)
            h_acc = np.where(rejected, np.minimum(h / fac, h), h / fac)
            h_rej = h / fac
        rejected = ~accept & (h > 0)
        if accept.all():
            y, k0 = y_new, ks[6]
        elif accept.any():
            mask = _rows(dev64(accept.astype(np.float64)), y).bool()
            y, k0 = torch.where(mask, y_new, y), torch.where(mask, ks[6], k0)
        d = np.where(accept, d_new, d)
        k0_div = np.where(accept, divs[:, 6], k0_div)
        t = np.where(accept, np.where(last, t_end, t + h), t)
        done = done | (accept & last)
        accepted += accept
        h = np.where(accept, h_acc, h_rej)
        tiny = ~done & (h <= 1e-13 * np.maximum(np.abs(t), span))
        if tiny.any():
            raise RuntimeError("log_likelihood: the rk45 step size underflowed (the velocity is not finite "
                               "or too stiff near some sample's time); raise t_end or loosen rtol/atol")
    if done.all():
        return y, torch.from_numpy(d).to(dev), torch.from_numpy(accepted).to(dev)
    raise RuntimeError(f"log_likelihood: rk45 did not reach T within max_steps={max_steps} attempted steps")


_RK45_PLAN = _rk45_plan()


def _check_tol(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (0 <= value < math.inf):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def log_likelihood(model, x: torch.Tensor, *, method: str = "hutchinson", probes: int = 1,
                   noise: str = "rademacher", mode: str = "auto", rtol: float = 1e-5, atol: float = 1e-5,
                   t_end=None, solver: str = "rk45", steps=None, generator=None, max_steps: int = 10_000,
                   cuda_graph: bool = False, compile: bool = False, error_norm: str = "sample",
                   check_finite: bool = True, return_info: bool = False):
    """Log density ``log q_{t_end}(x)`` (nats per sample) of a model through its probability-flow ODE.

    Integrates ``d[x, delta]/dt = [v(x, t), div v(x, t)]`` with ``v = model.velocity`` from
    ``t_end`` to ``T`` and returns ``log q_{t_end}(x) = prior_log_prob(x_T) + delta``, where
    ``delta = int_{t_end}^T div v(x_t, t) dt`` (instantaneous change of variables, Lim, "An Introduction to Generative Modeling with Flows and Diffusion Models"
    §6.3.1.6; FFJORD, Grathwohl et al. 2019). Works for every process and prediction kind
    (flow-matching velocity models included); the network must treat samples independently.

    Args:
        model (genflow.Model): the model; ``model.velocity`` is the ODE drift, ``model.process``
            gives ``T``, ``t_min`` and the prior.
        x (Tensor[B, *D]): points at time ``t_end``; computed in float64 for float64 x, else float32.
        method: ``"hutchinson"`` (unbiased stochastic trace, cost ``probes`` VJPs/JVPs per
            evaluation) or ``"exact"`` (the full Jacobian trace, ``D`` backward rows per
            evaluation batched over dimensions; for D up to a few hundred).
        probes (int >= 1): Hutchinson probes per sample, fixed over the solve and averaged.
        noise: ``"rademacher"`` or ``"gaussian"`` probes (``genflow.ops.hutchinson.probes``;
            probe k is the stream at offset k).
        mode: ``"vjp"`` (reverse mode: one forward, ``probes`` backward passes), ``"jvp"``
            (``torch.func.jvp``, falling back to VJP when the model is not forward-mode
            differentiable) or ``"auto"`` (VJP: measured faster, DESIGN.md §6).
        rtol, atol: rk45 tolerances on the augmented state (ignored by heun and rk4).
        t_end (float, optional): the time of ``x``; default ``model.process.t_min``.
        solver: ``"rk45"`` (adaptive, per-sample steps), ``"heun"`` or ``"rk4"`` (uniform grid).
        steps (int): number of steps of heun/rk4 (required there; must be None for rk45).
        generator: probe seed: None (fresh), an int, B per-sample ints (sample b's probes are
            its own stream) or a torch.Generator.
        max_steps (int): bound on rk45's attempted steps.
        cuda_graph (bool): evaluate the drift (forward, divergence passes, ``probe_dot``) by
            replaying a CUDA graph captured once per model, method, mode and shape (x on a CUDA
            device); a model that cannot be captured runs eagerly with a warning.
        compile (bool): for ``method="exact"``: evaluate the drift (velocity and exact trace) with
            one ``torch.compile``d function, compiled during the first call (seconds to a
            minute) and kept per model and shape, so later calls with the same model are faster
            (a model that cannot be compiled runs eagerly with a warning). Without it the exact
            trace is one backward pass per dimension on CPU; on other devices the faster of that
            and one pass batched over the dimensions, timed on the first evaluations and
            remembered per model and shape.
        error_norm: rk45's error control: ``"sample"`` (per-sample steps, each sample's local error
            rms over its [x, delta] components <= 1) or ``"batch"`` (one step size for the batch
            from the rms over all samples, as ``scipy.integrate.solve_ivp`` on the flattened
            batch: fewer steps, but a sample's own error may exceed the tolerance).
        check_finite (bool): raise ``gf.NonFiniteError`` (naming the step, the time and how many
            samples diverged) as soon as a state, log-density or rk45 error estimate is NaN/Inf,
            instead of rk45 shrinking its step until it underflows (or NaN being returned).
        return_info (bool): also return a dict with ``nfe`` (drift evaluations, each one batch
            forward plus its divergence), ``prior_logp`` and ``delta_logp`` (float64 [B]),
            ``x_T`` (Tensor[B, *D]), ``steps`` (accepted steps per sample, int64 [B], rk45 only)
            and ``mode`` (the differentiation mode used, for hutchinson).

    Returns:
        float64 Tensor[B] (or ``(logp, info)``). Not differentiable (computed without a graph).
    """
    if not (hasattr(model, "velocity") and hasattr(model, "process")):
        raise TypeError(f"model must be a genflow.Model (with .velocity and .process), got {type(model).__name__}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating tensor, got {x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.dim() < 2 or math.prod(x.shape[1:]) == 0:
        raise ValueError(f"x must have shape [B, *D] with at least one data element per sample, got {list(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"x must be finite: {int(diverged_rows(x).sum())} of its {x.shape[0]} samples hold NaN or Inf")
    check_choice("method", method, METHODS)
    if isinstance(probes, bool) or not isinstance(probes, numbers.Integral) or probes < 1:
        raise ValueError(f"probes must be an int >= 1, got {probes!r}")
    check_choice("noise", noise, _hutch.KINDS)
    check_choice("mode", mode, MODES)
    rtol, atol = _check_tol("rtol", rtol), _check_tol("atol", atol)
    if rtol + atol == 0:
        raise ValueError("rtol and atol must not both be 0")
    check_choice("solver", solver, SOLVERS)
    if solver == "rk45":
        if steps is not None:
            raise ValueError("steps is for the fixed-step solvers heun and rk4; rk45 chooses its own steps (set rtol/atol)")
    elif isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"steps must be an int >= 1 for solver={solver!r}, got {steps!r}")
    if isinstance(max_steps, bool) or not isinstance(max_steps, numbers.Integral) or max_steps < 1:
        raise ValueError(f"max_steps must be an int >= 1, got {max_steps!r}")
    if compile and (method != "exact" or cuda_graph):
        raise ValueError(f"compile=True is for method='exact' without cuda_graph, got method={method!r}, "
                         f"cuda_graph={cuda_graph!r}")
    check_choice("error_norm", error_norm, ERROR_NORMS)
    if cuda_graph and (x.device.type != "cuda" or not torch.cuda.is_available()):
        raise ValueError(f"cuda_graph=True needs x on a CUDA device, got x on {x.device}")
    process = model.process
    T = float(process.T)
    t_end = float(process.t_min) if t_end is None else t_end
    if isinstance(t_end, bool) or not isinstance(t_end, numbers.Real) or not 0.0 <= t_end < T:
        raise ValueError(f"t_end must be a number in [0, T) = [0, {T}), got {t_end!r}")

    batch, device = x.shape[0], x.device
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.detach().to(dtype)
    if batch == 0:  # an empty batch: an empty result, no model call
        empty = torch.zeros(0, dtype=torch.float64, device=device)
        info = {"nfe": 0, "prior_logp": empty, "delta_logp": empty, "x_T": y}
        return (empty, info) if return_info else empty
    eps = ()
    used_mode = None
    if method == "hutchinson":
        seed = generator_seed(generator, batch)
        eps = [_hutch.probes(y.shape, seed=seed, offset=k, kind=noise, dtype=dtype, device=device)
               for k in range(int(probes))]
        used_mode = "vjp" if mode == "auto" else mode
    drift = _Drift(model, method, eps, "compile" if compile else used_mode)
    drift.check_differentiable(y, float(t_end))
    t0 = torch.full((batch,), float(t_end), dtype=torch.float64, device=device)
    if cuda_graph:
        drift = _graphed(drift, y, t0)
    t1 = torch.full((batch,), T, dtype=torch.float64, device=device)
    with torch.no_grad():
        if solver == "rk45":
            x_T, delta, accepted = _rk45(drift, y, t0, t1, rtol, atol, int(max_steps), bool(check_finite), error_norm)
        else:
            x_T, delta, accepted = _fixed(drift, y, t0, t1, int(steps), _FIXED[solver], check_finite=bool(check_finite))
        prior = process.prior_log_prob(x_T.to(torch.float64))
    logp = prior + delta
    if not return_info:
        return logp
    info = {"nfe": drift.nfe, "prior_logp": prior, "delta_logp": delta, "x_T": x_T}
    if accepted is not None:
        info["steps"] = accepted
    if method == "hutchinson":
        info["mode"] = drift.mode
    return logp, info


def bits_per_dim(model, x: torch.Tensor, *, generator=None, dequantization=None,
                 dtype: torch.dtype = torch.float32, levels: int = 256, **kwargs):
    """Bits per dimension of quantised data (``levels`` values) under a model of data scaled to [-1, 1].

    ``x`` holds integer values in {0, ..., levels - 1} (pixels: uint8 and ``levels = 256``, the
    default; scikit-learn's 8x8 digits: ``levels = 17``), in any integer or floating dtype with
    integral values. With uniform dequantisation ``u ~ U[0, 1)^D`` (Theis et al. 2016; Ho et al.
    2020 use the same scaling) the model sees ``y = (x + u) / levels * 2 - 1``, so by the change
    of variables ``log p_x(x + u) = log p_y(y) + D log(2 / levels)`` and::

        bpd = -(log p_y(y) + D log(2/levels)) / (D log 2)     (= -log p_y(y) / (D log 2) + 7 for 256)

    with ``log p_y = gf.log_likelihood(model, y, **kwargs)`` (its ``t_end`` defaults to
    ``t_min``). This is a stochastic upper bound on the discrete model's bits per dimension
    (Jensen's inequality over u).

    Args:
        model (genflow.Model): the model of y in [-1, 1].
        x (Tensor[B, *D]): integer values in [0, levels - 1].
        generator: seed for the dequantisation noise and the probes, as in ``log_likelihood``.
        dequantization (Tensor[B, *D], optional): u in [0, 1) to use instead of drawing it;
            drawn otherwise as ``Phi(z)`` of the Philox stream ``z = N(seed, 2^62)`` (float64).
        dtype: float32 or float64, the dtype of y (and of the solve).
        levels (int): number of quantisation levels, >= 2 (256 for 8-bit data).
        **kwargs: passed to ``log_likelihood`` (method, probes, rtol, atol, solver, ...).

    Returns:
        float64 Tensor[B] (or ``(bpd, info)`` with ``return_info=True``; info["y"] is the
        dequantised input).
    """
    if not isinstance(x, torch.Tensor) or x.dtype == torch.bool or x.is_complex():
        raise TypeError(f"x must be a real tensor of pixel values, got "
                        f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.dim() < 2 or math.prod(x.shape[1:]) == 0:
        raise ValueError(f"x must have shape [B, *D] with at least one data element per sample, got {list(x.shape)}")
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    if isinstance(levels, bool) or not isinstance(levels, numbers.Integral) or levels < 2:
        raise ValueError(f"levels must be an int >= 2, got {levels!r}")
    levels = int(levels)
    x64 = x.to(torch.float64)
    if not bool(((x64 >= 0) & (x64 <= levels - 1) & (x64 == x64.round())).all()):
        raise ValueError(f"x must hold integer pixel values in [0, {levels - 1}] (levels={levels}; "
                         f"not data scaled to [-1, 1])")
    batch = x.shape[0]
    seed = generator_seed(generator, batch)
    if dequantization is None:
        z = randn(x.shape, seed=seed, offset=_DEQUANT_OFFSET, dtype=torch.float64, device=x.device)
        u = (0.5 * torch.erfc(-z / math.sqrt(2.0))).clamp(0.0, 1.0 - 2.0 ** -53)
    else:
        u = dequantization
        if not isinstance(u, torch.Tensor) or u.shape != x.shape:
            raise ValueError(f"dequantization must be a tensor of x's shape {list(x.shape)}")
        if not bool(((u >= 0) & (u < 1)).all()):
            raise ValueError("dequantization must lie in [0, 1)")
        u = u.to(device=x.device, dtype=torch.float64)
    dim = math.prod(x.shape[1:])
    y = (x64 + u) / levels * 2.0 - 1.0
    y = y.to(dtype)
    out = log_likelihood(model, y, generator=seed, **kwargs)
    logp, info = out if isinstance(out, tuple) else (out, None)
    bpd = -(logp + dim * math.log(2.0 / levels)) / (dim * math.log(2.0))
    if info is None:
        return bpd
    info["y"] = y
    return bpd, info
