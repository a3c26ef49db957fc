"""Exact likelihoods of diffusion and flow models through the probability-flow ODE.

Along a solution ``x_t`` of the probability-flow ODE ``dx/dt = v(x, t)`` (``model.velocity``),
the marginal densities obey the instantaneous change of variables (Lim, "An Introduction to
Generative Modeling with Flows and Diffusion Models" §6.3.1.6; the lecture slides "Generative
Modeling"; Chen et al. 2018, "Neural Ordinary Differential Equations", Theorem 1; FFJORD:
Grathwohl et al., ICLR 2019)::

    d/dt log q_t(x_t) = -div v(x_t, t)

so, integrating the augmented state ``z = [x, delta]`` with ``d delta/dt = +div v(x_t, t)``
forward from ``x_{t_end} = x``, ``delta = 0`` at ``t = t_end`` to ``t = T``::

    log q_{t_end}(x) = log q_T(x_T) + int_{t_end}^T div v(x_t, t) dt = prior_log_prob(x_T) + delta(T)

The augmented ODE ``dz/dt = [v(x, t), div v(x, t)]`` is an ordinary ODE on ``[B, D + 1]``
(``AugmentedDrift``), integrated by genflow's one Runge–Kutta engine (``genflow.engine``:
``AdaptiveRK`` with DOPRI5 and per-sample steps, ``FixedRK`` with Heun or RK4 on a uniform
grid, both driven by ``genflow.engine.loop.run``). The divergence, exact or Hutchinson's
estimate with probes held fixed over the solve, is ``genflow.divergence.DivergenceDrift``;
the estimate of ``log q`` is then unbiased up to the solver error (that of ``q`` is not).
"""
from __future__ import annotations

import math
import numbers

import torch

from genflow._checks import check_choice
from genflow.divergence import DivergenceDrift, graphed
from genflow.engine.loop import run
from genflow.engine.ode import AdaptiveRK, FixedRK
from genflow.engine.tableau import TABLEAUX
from genflow.noise import generator_seed
from genflow.ops import hutchinson
from genflow.ops.fused_update import randn, use_kernel
from genflow.errors import diverged_rows

__all__ = ["AugmentedDrift", "bits_per_dim", "integrate_divergence", "log_likelihood"]

METHODS = ("hutchinson", "exact")
MODES = ("auto", "vjp", "jvp")
SOLVERS = {"rk45": "dopri5", "heun": "heun", "rk4": "rk4"}  # log_likelihood's names -> engine tableaux
ERROR_NORMS = ("sample", "batch")
DEQUANT_OFFSET = 1 << 62  # Philox offset of bits_per_dim's dequantisation noise (probes use 0..P-1)
ADVICE = "the model's velocity and its divergence at these times"


class AugmentedDrift:
    """The derivative of the augmented state ``z = [x.flatten(1), delta]`` (Tensor[B, D + 1] in
    x's dtype) for the engine::

        dz/dt = [v(x, t), div v(x, t)]

    ``drift(x, t) -> (v, div)`` is a ``DivergenceDrift`` (or its CUDA-graph replay); the engine's
    time (a float on a shared grid, a float64 [B] host tensor with per-sample steps) reaches it
    as float64 [B] on x's device. Under autograd (CNF training) the output keeps the graph."""

    def __init__(self, drift, shape):
        self.drift, self.shape = drift, tuple(shape)
        self.dim = math.prod(self.shape[1:])
        self._time = (None, None)  # the last shared time and its [B] tensor (a grid's stages repeat)

    def state(self, x: torch.Tensor) -> torch.Tensor:
        """``z = [x, 0]`` (differentiable in x)."""
        return torch.cat([x.reshape(x.shape[0], self.dim), x.new_zeros(x.shape[0], 1)], 1)

    def split(self, z: torch.Tensor):
        """``(x, delta)`` of ``z``: x a contiguous copy in its own shape, delta float64 [B]."""
        return self.x(z).contiguous(), z[:, self.dim].to(torch.float64)

    def x(self, z: torch.Tensor) -> torch.Tensor:
        """The x part of ``z`` as a Tensor[B, *D] view (no copy; its rows are D + 1 apart, each
        row contiguous, so ``view``/``reshape`` of a sample's dimensions still work)."""
        x = z.narrow(1, 0, self.dim)
        return x if len(self.shape) == 2 else x.view(self.shape)

    def __call__(self, z, t):
        batch = z.shape[0]
        if isinstance(t, torch.Tensor):  # per-sample stage times from the host: no stream sync
            t = t if t.device == z.device else t.pin_memory().to(z.device, non_blocking=True)
        elif self._time[0] == t:
            t = self._time[1]
        else:
            value, t = t, torch.full((batch,), t, dtype=torch.float64, device=z.device)
            self._time = (value, t)
        v, div = self.drift(self.x(z), t)
        if torch.is_grad_enabled() and (v.requires_grad or div.requires_grad):
            return torch.cat([v if v.dim() == 2 else v.reshape(batch, self.dim), div.to(z.dtype).unsqueeze(1)], 1)
        out = torch.empty_like(z)
        out.narrow(1, 0, self.dim).copy_(v if v.dim() == 2 else v.reshape(batch, self.dim))
        out.select(1, self.dim).copy_(div)
        return out


def integrate_divergence(drift, x: torch.Tensor, t0: float, t1: float, *, solver: str, steps=None,
                         rtol: float = 1e-5, atol: float = 1e-5, error_norm: str = "sample", max_steps: int = 10_000,
                         check_finite: bool = True, caller: str = "gf.log_likelihood"):
    """``(x(t1), delta, accepted, evaluations)``: the augmented ODE ``d[x, delta]/dt = [v, div v]`` from
    ``x(t0) = x``, ``delta(t0) = 0`` with the engine tableau ``solver`` (``TABLEAUX``), so that
    ``delta = int_{t0}^{t1} div v(x_t, t) dt`` (instantaneous change of variables, Chen et al.
    2018, Theorem 1).

    With ``steps`` a uniform grid of ``steps`` steps (``FixedRK``, ``nfe_per_step`` evaluations
    each; differentiable when the drift keeps its graph); without, the embedded pair with
    per-sample steps (``AdaptiveRK``: Hairer's error norm over the D + 1 components of each
    sample, pooled with ``error_norm="batch"``; DOPRI5: 6 evaluations per attempted step, FSAL,
    +2 for the start). ``accepted``: accepted steps per sample (int64 [B], adaptive only).
    ``check_finite``: ``gf.NonFiniteError`` (from ``caller``) at the first step leaving a NaN/Inf
    state or log-density, or when a sample's error estimate stays NaN/Inf down to the smallest
    step. ``delta`` is float64 [B] (accumulated in x's dtype, the state's), ``evaluations`` the
    drift calls."""
    aug = AugmentedDrift(drift, x.shape)
    z = aug.state(x)
    batch, kernel = x.shape[0], use_kernel("auto", x.device)
    tableau = TABLEAUX[solver]
    if steps is None:
        stepper = AdaptiveRK(tableau, aug, torch.full((batch,), float(t0), dtype=torch.float64),
                             torch.full((batch,), float(t1), dtype=torch.float64), kernel=kernel, rtol=rtol,
                             atol=atol, error_norm=error_norm, max_steps=max_steps, check_finite=check_finite,
                             caller=caller, advice=ADVICE)
        grid = None
    else:
        grid = torch.linspace(float(t0), float(t1), steps + 1, dtype=torch.float64)
        grid[-1] = float(t1)
        stepper = FixedRK(tableau, aug, grid, kernel=kernel)
    z, _ = run(stepper, z, ts=grid, solver=tableau.name, check_finite=check_finite, caller=caller, advice=ADVICE)
    x_end, delta = aug.split(z)
    accepted = None if grid is not None else stepper.accepted_steps.to(x.device)
    return x_end, delta, accepted, stepper.evaluations


def _check_differentiable(model, x, t: float, method: str) -> None:
    """Raise ``ValueError`` naming the model when its network's output does not depend on ``x``
    through autograd (a ``.detach()``, ``torch.no_grad`` or a non-torch computation inside): its
    divergence, exact or Hutchinson, would be a confident wrong number. One forward and one
    backward pass on the first sample."""
    with torch.enable_grad():
        xg = x[:1].detach().requires_grad_(True)
        out = model.raw(xg, t)
        grad = None
        if out.requires_grad:
            (grad,) = torch.autograd.grad(out.sum(), xg, allow_unused=True)
    if grad is None:
        raise ValueError(
            f"log_likelihood: the output of {model!r} does not depend on x through autograd (a .detach(), "
            f"torch.no_grad() or a non-torch computation inside the network), so the divergence of its drift "
            f"cannot be computed (method={method!r}); make the network differentiable in x")


def _check_tol(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (0 <= value < math.inf):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _check_int(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


def _check_options(model, x, method, probes, noise, mode, rtol, atol, solver, steps, max_steps, compile,
                   error_norm, cuda_graph):
    """log_likelihood's argument checks (TypeError/ValueError naming the argument)."""
    if not (hasattr(model, "velocity") and hasattr(model, "process")):
        raise TypeError(f"model must be a genflow.Model (with .velocity and .process), got {type(model).__name__}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating tensor, got {x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.dim() < 2 or math.prod(x.shape[1:]) == 0:
        raise ValueError(f"x must have shape [B, *D] with at least one data element per sample, got {list(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"x must be finite: {int(diverged_rows(x).sum())} of its {x.shape[0]} samples hold NaN or Inf")
    check_choice("method", method, METHODS)
    _check_int("probes", probes)
    check_choice("noise", noise, hutchinson.KINDS)
    check_choice("mode", mode, MODES)
    if _check_tol("rtol", rtol) + _check_tol("atol", atol) == 0:
        raise ValueError("rtol and atol must not both be 0")
    check_choice("solver", solver, tuple(SOLVERS))
    if solver == "rk45":
        if steps is not None:
            raise ValueError("steps is for the fixed-step solvers heun and rk4; rk45 chooses its own steps (set rtol/atol)")
    elif isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"steps must be an int >= 1 for solver={solver!r}, got {steps!r}")
    _check_int("max_steps", max_steps)
    if compile and (method != "exact" or cuda_graph):
        raise ValueError(f"compile=True is for method='exact' without cuda_graph, got method={method!r}, "
                         f"cuda_graph={cuda_graph!r}")
    check_choice("error_norm", error_norm, ERROR_NORMS)
    if cuda_graph and (x.device.type != "cuda" or not torch.cuda.is_available()):
        raise ValueError(f"cuda_graph=True needs x on a CUDA device, got x on {x.device}")


def log_likelihood(model, x: torch.Tensor, *, method: str = "hutchinson", probes: int = 1,
                   noise: str = "rademacher", mode: str = "auto", rtol: float = 1e-5, atol: float = 1e-5,
                   t_end=None, solver: str = "rk45", steps=None, generator=None, max_steps: int = 10_000,
                   cuda_graph: bool = False, compile: bool = False, error_norm: str = "sample",
                   check_finite: bool = True, return_info: bool = False):
    """Log density ``log q_{t_end}(x)`` (nats per sample) of a model through its probability-flow ODE.

    Integrates ``d[x, delta]/dt = [v(x, t), div v(x, t)]`` with ``v = model.velocity`` from
    ``t_end`` to ``T`` and returns ``log q_{t_end}(x) = prior_log_prob(x_T) + delta``, where
    ``delta = int_{t_end}^T div v(x_t, t) dt`` (instantaneous change of variables: Lim, "An
    Introduction to Generative Modeling with Flows and Diffusion Models" §6.3.1.6; FFJORD,
    Grathwohl et al. 2019), solved by the engine (``integrate_divergence``: DOPRI5 with per-sample
    steps, or Heun/RK4 on a uniform grid). Works for every process and prediction kind
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
        check_finite (bool): raise ``gf.NonFiniteError`` (naming the time, the step of a fixed
            grid and how many samples diverged) as soon as a step leaves a NaN/Inf state or
            log-density, and when rk45's error estimate of a sample stays NaN/Inf at every step
            size down to the smallest (rather than returning NaN or a step-size underflow).
        return_info (bool): also return a dict with ``nfe`` (drift evaluations, each one batch
            forward plus its divergence), ``prior_logp`` and ``delta_logp`` (float64 [B]),
            ``x_T`` (Tensor[B, *D]), ``steps`` (accepted steps per sample, int64 [B], rk45 only)
            and ``mode`` (the differentiation mode used, for hutchinson).

    Returns:
        float64 Tensor[B] (or ``(logp, info)``). Not differentiable (computed without a graph).
    """
    _check_options(model, x, method, probes, noise, mode, rtol, atol, solver, steps, max_steps, compile, error_norm,
                   cuda_graph)
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
    eps, used_mode = (), None
    if method == "hutchinson":
        seed = generator_seed(generator, batch)
        eps = [hutchinson.probes(y.shape, seed=seed, offset=k, kind=noise, dtype=dtype, device=device)
               for k in range(int(probes))]
        used_mode = "vjp" if mode == "auto" else mode
    divergence = DivergenceDrift(model, method, eps, "compile" if compile else used_mode)
    _check_differentiable(model, y, float(t_end), method)
    drift = graphed(divergence, y, torch.full((batch,), float(t_end), dtype=torch.float64, device=device)) \
        if cuda_graph else divergence
    with torch.no_grad():
        x_T, delta, accepted, nfe = integrate_divergence(
            drift, y, float(t_end), T, solver=SOLVERS[solver], steps=None if steps is None else int(steps),
            rtol=float(rtol), atol=float(atol), error_norm=error_norm, max_steps=int(max_steps),
            check_finite=bool(check_finite))
        prior = process.prior_log_prob(x_T.to(torch.float64))
    logp = prior + delta
    if not return_info:
        return logp
    info = {"nfe": nfe, "prior_logp": prior, "delta_logp": delta, "x_T": x_T}
    if accepted is not None:
        info["steps"] = accepted
    if method == "hutchinson":
        info["mode"] = divergence.mode
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
        z = randn(x.shape, seed=seed, offset=DEQUANT_OFFSET, dtype=torch.float64, device=x.device)
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
