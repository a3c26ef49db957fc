"""The one explicit Runge–Kutta engine: any ``ButcherTableau``, its stage combinations fused.

The engine integrates ``dy/dt = alpha(t) y + beta(t) T(t, y)`` where ``T`` is what a call of the
derivative returns (a user's drift, or a network's raw output) and ``alpha``, ``beta`` are
per-time scalars (``0`` and ``1`` for a plain ODE; for a diffusion model's probability-flow ODE
the linear map from the raw output to the velocity, DESIGN.md §2). With stage states ``Y_j``
and stage outputs ``T_j`` a stage is::

    Y_i = y + h sum_{j<i} a_ij k_j = y + sum_{j<i} (h a_ij alpha_j) Y_j + sum_{j<i} (h a_ij beta_j) T_j

so the conversion is folded into the coefficients and each combination (stage states, the new
state, the error estimate, dense output) is one ``fused_update`` pass per four terms
(``MAX_TERMS``), never a materialised ``k_j``. Every coefficient row holds at most one stage
term, so a step's coefficients for all its combinations are one gather on the host, ``base +
weight * [h beta; h alpha][source]`` over the stage times (``[rows]`` for a shared step, plain
Python numbers while torch.compile traces; ``[rows, B]`` for per-sample steps, sent to the device
once). Dense output (``genflow.engine.dense``) is one more such combination.
Stage states live in buffers allocated once per solve. When gradients are needed (an input or
a stage output requires grad) the same combinations run through the functional, differentiable
form of the op.
"""
from typing import Callable, Optional

import numpy as np
import torch

from genflow._cache import LRU
from genflow.engine.dense import dense_polynomial, stage_weights
from genflow.engine.tableau import ButcherTableau
from genflow.ops.fused_update import (MAX_TERMS, fused_update_packed, fused_update_unchecked, host_tensor,
                                      record_nonfinite)

__all__ = ["RungeKutta"]


class _Combination:
    """The chunks of one linear combination ``c0 y + sum_j w_j k_j`` in a packed coefficient
    vector: ``chunks`` is a list of ``(refs, row)`` with ``refs`` the terms (``("T", j)`` or
    ``("Y", j)``, at most ``MAX_TERMS``) and ``row`` the first of its ``len(refs) + 2`` rows.
    ``weights`` holds one weight vector per variant (tableaux sharing the slots). Every row holds
    at most one stage coefficient, so a row's value is ``base + weight * src[source]`` with
    ``src = [h beta_0 .. h beta_{s-1}, h alpha_0 .. h alpha_{s-1}]``: ``base`` and ``source``
    per row, ``weight`` per variant and row (plain Python numbers: traceable by torch.compile)."""

    def __init__(self, weights, c0: float, linear: bool, first_row: int, stages: int):
        weights = [tuple(float(x) for x in w) for w in weights]
        used = [any(w[j] != 0.0 for w in weights) for j in range(stages)]
        slots = [("T", j) for j in range(stages) if used[j]]
        if linear:
            slots += [("Y", j) for j in range(1, stages) if used[j]]
        none = tuple(0.0 for _ in weights)
        self.chunks, self.base, self.source, rows = [], [], [], []
        row = first_row
        for s in range(0, max(len(slots), 1), MAX_TERMS):
            part = slots[s:s + MAX_TERMS]
            self.chunks.append((tuple(part), row))
            self.base.append(c0 if s == 0 else 1.0)
            y_term = s == 0 and linear  # y is Y_0: its alpha term joins c0
            self.source.append(stages if y_term else 0)
            rows.append(tuple(w[0] for w in weights) if y_term else none)
            for kind, j in part:
                self.base.append(0.0)
                self.source.append(j if kind == "T" else stages + j)
                rows.append(tuple(w[j] for w in weights))
            self.base.append(0.0)  # the noise scale
            self.source.append(0)
            rows.append(none)
            row += len(part) + 2
        self.rows = row - first_row
        self.weight = [tuple(r[v] for r in rows) for v in range(len(weights))]


class _Plan:
    """Every static combination of a tableau (stages 1..s-1, the new state unless FSAL, the
    error estimates) stacked into one coefficient vector; ``variants`` are tableaux with the
    same stage count and FSAL flag whose weights a step may pick per sample. ``slope``: the
    weights of a plain ODE's rows (``alpha = 0``, ``beta = 1``: ``pack = base + slope h``);
    ``*_t``: the same as host tensors for per-sample steps."""

    def __init__(self, variants, linear: bool):
        first = variants[0]
        s = first.stages
        if any(v.stages != s or v.fsal != first.fsal for v in variants):
            raise ValueError("tableau variants must have the same number of stages and FSAL flag")
        self.combos, row = {}, 0
        named = [(i, [v.a[i] + (0.0,) * (s - i) for v in variants], 1.0) for i in range(1, s)]
        if not first.fsal:
            named.append(("new", [v.b for v in variants], 1.0))
        if first.error is not None:
            named.append(("error", [v.error for v in variants], 0.0))
        if first.error3 is not None:
            named.append(("error3", [v.error3 for v in variants], 0.0))
        for name, weights, c0 in named:
            combo = _Combination(weights, c0, linear, row, s)
            self.combos[name] = combo
            row += combo.rows
        parts = list(self.combos.values())
        self.base = [b for c in parts for b in c.base]
        self.source = [j for c in parts for j in c.source]
        self.weight = [tuple(w for c in parts for w in c.weight[v]) for v in range(len(variants))]
        self.slope = [tuple(w if j < s else 0.0 for w, j in zip(weights, self.source)) for weights in self.weight]
        self.c = [tuple(v.c) for v in variants]
        self.base_t = torch.tensor(self.base, dtype=torch.float64)[:, None]
        self.source_t = torch.tensor(self.source, dtype=torch.int64)
        self.weight_t = torch.tensor(self.weight, dtype=torch.float64)[:, :, None]
        self.slope_t = torch.tensor(self.slope, dtype=torch.float64)[:, :, None]
        self.c_t = torch.tensor(self.c, dtype=torch.float64)[:, :, None]
        self.base_np, self.source_np = np.array(self.base), np.array(self.source)
        self.weight_np, self.slope_np = np.array(self.weight), np.array(self.slope)


_PLANS = LRU(64)  # (tableau variants, linear) -> _Plan: read-only once built, shared by every solve


def _as_host(values, times):
    """Stage coefficients as a list of floats (shared step: ``times`` a list) or a host tensor
    [s, B] (per sample: ``times`` a tensor); a number broadcasts."""
    if isinstance(times, torch.Tensor):
        return torch.as_tensor(values, dtype=torch.float64).expand(times.shape)
    if isinstance(values, (int, float)):
        return [float(values)] * len(times)
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    return [float(v) for v in values]


class RungeKutta:
    """One explicit Runge–Kutta step of ``tableau`` on ``dy/dt = alpha(t) y + beta(t) f(y, t)``.

    Args:
        tableau: the method.
        f: ``f(y, t) -> Tensor`` like ``y`` (one evaluation); ``t`` is a float or a float64 [B]
            host tensor.
        view: ``view(times) -> (alpha, beta)`` vectorised over stage times (float64 numpy [s]
            or a host tensor [s, B]), or None for ``dy/dt = f(y, t)``.
        linear: the derivative is a linear view (default: when ``view`` is given); without a
            ``view`` each ``step`` is then given the stage coefficients ``alpha``, ``beta``.
        kernel: ``use_kernel(backend, device)``.
        alternative: a second tableau with the same stages and FSAL flag that a step may use
            for some samples (``step(..., use_alternative=mask)``).

    After ``step`` the stage outputs ``terms`` and states ``states`` stay available for
    ``combine("error")`` and ``dense(theta)``; ``evaluations`` counts calls of ``f``; ``pool``
    holds the stage-state buffers (allocated on demand, reused by later steps);
    ``nonfinite`` / ``step_index``: the divergence flag (see ``genflow.sample``), lowered by the
    kernel as it writes each combination; where a combination runs without it (the differentiable
    form, the PyTorch reference) the step's result is checked once instead (``record_nonfinite``).
    """

    def __init__(self, tableau: ButcherTableau, f: Callable, *, view: Optional[Callable] = None,
                 linear: Optional[bool] = None, kernel: bool, alternative: Optional[ButcherTableau] = None):
        self.tableau, self.f, self.view, self.kernel = tableau, f, view, kernel
        self.linear = view is not None if linear is None else linear
        variants = (tableau,) if alternative is None else (tableau, alternative)
        if torch.compiler.is_compiling():  # built in the trace (the cache's lock cannot be traced)
            self.plan = _Plan(list(variants), self.linear)
        else:
            self.plan = _PLANS.get_or_compute((variants, self.linear), lambda: _Plan(list(variants), self.linear))
        self.evaluations = 0
        self.nonfinite: Optional[torch.Tensor] = None
        self.step_index = 0
        self.pool = []
        self._pack = None  # the per-sample coefficient buffer (CPU float64 [rows, B])
        self.terms = self.states = self.pack = None
        self.alpha = self.beta = self.h_alpha = self.h_beta = None
        self._dense = None
        self._t = self._h = self._extended = None  # the last step's time and size, its extra dense stages
        self._unflagged = False  # a combination of this step ran without the kernel's divergence flag

    def times(self, t, h, use_alternative=False):
        """Stage times ``t + c_i h``: a list of s floats for a shared step, a host tensor [s, B]
        per sample (``use_alternative``: False, True, or a bool [B] host mask of the samples on
        the alternative)."""
        c = self.plan.c_t
        if isinstance(use_alternative, torch.Tensor):
            c = torch.where(use_alternative[None, :], c[-1], c[0])
            return t[None, :] + c * h[None, :]
        v = -1 if use_alternative else 0
        if isinstance(h, torch.Tensor):
            return t[None, :] + c[v] * h[None, :]
        return [t + ci * h for ci in self.plan.c[v]]

    def _buffer(self, like, busy):
        for buf in self.pool:
            if buf.shape == like.shape and buf.dtype == like.dtype and buf.device == like.device and \
                    all(buf is not b for b in busy):
                return buf
        buf = torch.empty_like(like, memory_format=torch.contiguous_format)
        self.pool.append(buf)
        return buf

    def _coefficients(self, plan, h, device, use_alternative=False):
        """The packed coefficients of every combination of the step, ``base + weight * [h beta;
        h alpha][source]`` (``_Combination``): a float64 CPU [rows] for a shared step (Python
        arithmetic: traceable), [rows, B] per sample (on the device; the variant picked by
        ``use_alternative``)."""
        if isinstance(use_alternative, torch.Tensor):
            first = self._coefficients(plan, h, torch.device("cpu"), False).clone()  # the buffer is reused
            second = self._coefficients(plan, h, torch.device("cpu"), True)
            pack = torch.where(use_alternative[None, :], second, first)
            return pack.pin_memory().to(device, non_blocking=True) if device.type != "cpu" else pack
        v = -1 if use_alternative else 0
        if not isinstance(h, torch.Tensor):
            if torch.compiler.is_compiling():  # Python numbers: constants of the traced step
                if self.linear:
                    src = self.h_beta + self.h_alpha
                    pack = [b + w * src[j] for b, w, j in zip(plan.base, plan.weight[v], plan.source)]
                else:
                    pack = [b + w * h for b, w in zip(plan.base, plan.slope[v])]
                return host_tensor(pack, torch.float64, "d")
            if self.linear:  # the same in NumPy, three times faster eagerly
                pack = plan.base_np + plan.weight_np[v] * np.array(self.h_beta + self.h_alpha)[plan.source_np]
            else:
                pack = plan.base_np + plan.slope_np[v] * h
            return torch.from_numpy(pack)
        # per sample: [rows, B] float64, written into a buffer kept for the solve (a fresh one per
        # step costs page faults that outweigh the arithmetic at large B)
        rows, batch = len(plan.base), h.shape[0]
        if self._pack is None or self._pack.shape != (rows, batch):
            self._pack = torch.empty(rows, batch, dtype=torch.float64)
        pack = self._pack
        if self.linear:
            torch.index_select(torch.cat([self.h_beta, self.h_alpha]), 0, plan.source_t, out=pack)
            pack.mul_(plan.weight_t[v])
        else:
            torch.mul(plan.slope_t[v], h[None, :], out=pack)
        pack.add_(plan.base_t)
        if device.type != "cpu":
            return pack.pin_memory().to(device, non_blocking=True)
        return pack

    def step(self, y: torch.Tensor, t, h, *, first: Optional[torch.Tensor] = None, alpha=None, beta=None,
             out: Optional[torch.Tensor] = None, use_alternative=False) -> torch.Tensor:
        """``y(t + h)`` (written to ``out``, else an engine buffer; ``y`` is not modified). ``t``,
        ``h``: floats, or float64 [B] host tensors (per-sample steps). ``first``: the stage output
        ``f(y, t)`` when already known (an FSAL method's last stage of the previous step).
        ``alpha``, ``beta``: the linear view's stage coefficients ([s] or [s, B]) when the
        engine has no ``view`` to compute them. ``use_alternative``: run the alternative
        tableau (True) or, per sample, where a bool [B] host mask is True."""
        tab = self.tableau
        self._t, self._h, self._extended = t, h, None
        times = self.times(t, h, use_alternative)
        if self.linear:
            if alpha is None:
                alpha, beta = self.view(times)
            self.alpha, self.beta = _as_host(alpha, times), _as_host(beta, times)
            if isinstance(h, torch.Tensor):
                self.h_alpha, self.h_beta = self.alpha * h, self.beta * h
            else:
                self.h_alpha, self.h_beta = [a * h for a in self.alpha], [b * h for b in self.beta]
        self.pack = self._coefficients(self.plan, h, y.device, use_alternative)
        self._unflagged = False
        self.states = [y]
        self.terms = [first if first is not None else self.evaluate(y, times[0])]
        for i in range(1, tab.stages):
            last = tab.fsal and i == tab.stages - 1 and out is not None
            state = self.combine(i, out=out if last else self._buffer(y, self.states + [out]))
            self.states.append(state)
            self.terms.append(self.evaluate(state, times[i]))
        result = self.states[-1] if tab.fsal else self.combine(
            "new", out=out if out is not None else self._buffer(y, self.states))
        if self.nonfinite is not None and self._unflagged:
            record_nonfinite(result, self.nonfinite, self.step_index)
        return result

    def evaluate(self, y, t):
        self.evaluations += 1
        return self.f(y, t)

    def record(self) -> tuple:
        """What ``dense`` needs of the last step, to interpolate in it later: ``(states, terms,
        alpha, beta)`` with the extra dense-output stages evaluated (the caller clones the tensors
        if the engine's buffers move on)."""
        return self._extend()

    def combine(self, name, *, out: Optional[torch.Tensor] = None, combo=None, pack=None,
                step: Optional[tuple] = None) -> torch.Tensor:
        """The combination ``name`` (a stage index, ``"new"``, ``"error"``, ``"error3"``) of the
        last step (or of ``step``, a ``record()``), written to ``out`` (allocated when None or
        when gradients flow)."""
        combo = self.plan.combos[name] if combo is None else combo
        pack = self.pack if pack is None else pack
        states, stage_terms = (self.states, self.terms) if step is None else step[:2]
        y = states[0]
        result = None
        for refs, row in combo.chunks:
            terms = [stage_terms[j] if kind == "T" else states[j] for kind, j in refs]
            coef = pack[row:row + len(refs) + 2]
            base = y if result is None else result
            if torch.is_grad_enabled() and any(v.requires_grad for v in (base, *terms)):
                values = coef.tolist() if coef.dim() == 1 else list(coef.clone().unbind(0))  # autograd keeps them
                result = fused_update_unchecked(base, terms, values, kernel=self.kernel)
                self._unflagged = True
            else:
                if out is None:
                    out = torch.empty_like(y, memory_format=torch.contiguous_format)
                flag = self.nonfinite if self.kernel else None  # the kernel flags as it writes, for free
                result = fused_update_packed(base, terms, coef, kernel=self.kernel, out=out, nonfinite=flag,
                                             step=self.step_index)
                self._unflagged |= not self.kernel
        return result

    def _gather(self, combo: _Combination, src_t, src_y, device):
        """The pack ``base + weight * [src_t; src_y][source]`` of one combination: ``src_t``,
        ``src_y`` the per-stage multipliers of the stage outputs and states (lists of floats, or
        float64 host tensors [n, B] per sample, then moved to ``device``)."""
        if isinstance(src_t, torch.Tensor):
            src = torch.cat([src_t, src_y])
            pack = torch.tensor(combo.base, dtype=torch.float64)[:, None] + torch.tensor(
                combo.weight[0], dtype=torch.float64)[:, None] * src[torch.tensor(combo.source)]
            return pack.to(device).contiguous()
        src = list(src_t) + list(src_y)
        return host_tensor([b + w * src[j] for b, w, j in zip(combo.base, combo.weight[0], combo.source)],
                           torch.float64, "d")

    def _multipliers(self, w, alpha, beta):
        """``(w beta, w alpha)`` per stage (``beta = 1``, ``alpha = 0`` without a linear view)."""
        if isinstance(w, torch.Tensor):
            if not self.linear:
                return w, torch.zeros_like(w)
            return w * beta, w * alpha
        if not self.linear:
            return w, [0.0] * len(w)
        return [x * b for x, b in zip(w, beta)], [x * a for x, a in zip(w, alpha)]

    def _extend(self) -> tuple:
        """The last step's stages with the tableau's extra dense-output stages appended
        (``Y_e = y + h sum_j a_ej k_j``, ``T_e = f(Y_e, t + c_e h)``, evaluated once per step):
        ``(states, terms, alpha, beta)``; ``terms[-1]`` of the engine stays the step's last stage."""
        extra = self.tableau.dense_stages
        if extra is None:
            return self.states, self.terms, self.alpha, self.beta
        if self._extended is not None:
            return self._extended
        if self.linear:
            raise ValueError(f"the dense output of {self.tableau.name!r} evaluates extra stages, which the engine "
                             f"runs for plain ODEs only (not through a linear view)")
        t, h, y = self._t, self._h, self.states[0]
        states, terms = list(self.states), list(self.terms)
        for c, row in zip(*extra):
            n = len(row)
            combo = _Combination([row], 1.0, False, 0, n)
            steps = h[None, :].expand(n, -1) if isinstance(h, torch.Tensor) else [h] * n  # a_ej is in the combo
            pack = self._gather(combo, *self._multipliers(steps, None, None), y.device)
            state = self.combine(None, combo=combo, pack=pack, step=(states, terms))
            states.append(state)
            terms.append(self.evaluate(state, t + c * h))
        self._extended = (states, terms, None, None)
        return self._extended

    def dense(self, theta, h, *, out: Optional[torch.Tensor] = None, step: Optional[tuple] = None) -> torch.Tensor:
        """``y(t + theta h)`` inside the last step (or ``step``, a ``record()``; ``theta`` a float
        or float64 [B] host tensor in [0, 1]) from the method's continuous extension
        (``genflow.engine.dense``; the extra stages it needs are evaluated once per step)."""
        step = self._extend() if step is None else step
        states, terms, alpha, beta = step
        if self._dense is None:
            poly = dense_polynomial(self.tableau)
            used = [1.0 if any(w != 0.0 for w in row) else 0.0 for row in poly]
            self._dense = (poly, _Combination([used], 1.0, self.linear, 0, len(poly)))
        poly, combo = self._dense
        w = stage_weights(poly, theta, h)
        pack = self._gather(combo, *self._multipliers(w, alpha, beta), states[0].device)
        return self.combine(None, out=out, combo=combo, pack=pack, step=step)
