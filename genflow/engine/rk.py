"""The one explicit Runge–Kutta engine: any ``ButcherTableau``, its stage combinations fused.

The engine integrates ``dy/dt = alpha(t) y + beta(t) T(t, y)`` where ``T`` is what a call of the
derivative returns (a user's drift, or a network's raw output) and ``alpha``, ``beta`` are
per-time scalars (``0`` and ``1`` for a plain ODE; for a diffusion model's probability-flow ODE
the linear map from the raw output to the velocity, DESIGN.md §2). With stage states ``Y_j``
and stage outputs ``T_j`` a stage is::

    Y_i = y + h sum_{j<i} a_ij k_j = y + sum_{j<i} (h a_ij alpha_j) Y_j + sum_{j<i} (h a_ij beta_j) T_j

so the conversion is folded into the coefficients and each combination (stage states, the new
state, the error estimate, dense output) is one ``fused_update`` pass per four terms
(``MAX_TERMS``), never a materialised ``k_j``. A step's coefficients for all its combinations are
one matrix product on the host, ``base + M_T (h beta) + M_Y (h alpha)`` over the stage times
(``[rows]`` for a shared step, ``[rows, B]`` for per-sample steps, sent to the device once).
Stage states live in buffers allocated once per solve. When gradients are needed (an input or
a stage output requires grad) the same combinations run through the functional, differentiable
form of the op.
"""
from typing import Callable, Optional

import numpy as np
import torch

from genflow.engine.tableau import ButcherTableau, hermite_dense
from genflow.ops.fused_update import MAX_TERMS, fused_update_packed, fused_update_unchecked

__all__ = ["RungeKutta"]


class _Combination:
    """The chunks of one linear combination ``c0 y + sum_j w_j k_j`` in a packed coefficient
    matrix: ``chunks`` is a list of ``(refs, row)`` with ``refs`` the terms (``("T", j)`` or
    ``("Y", j)``, at most ``MAX_TERMS``) and ``row`` the first of its ``len(refs) + 2`` rows."""

    def __init__(self, weights, c0: float, linear: bool, first_row: int, stages: int):
        slots = [("T", j, w) for j, w in enumerate(weights) if w != 0.0]
        if linear:
            slots += [("Y", j, w) for j, w in enumerate(weights) if w != 0.0 and j > 0]
        self.chunks, base, m_t, m_y = [], [], [], []
        row = first_row
        for s in range(0, max(len(slots), 1), MAX_TERMS):
            part = slots[s:s + MAX_TERMS]
            self.chunks.append((tuple((kind, j) for kind, j, _ in part), row))
            c0_row = np.zeros(stages)
            y_row = np.zeros(stages)
            if s == 0 and linear and weights[0] != 0.0:
                y_row[0] = weights[0]  # y is Y_0: its alpha term joins c0
            base.append(c0 if s == 0 else 1.0)
            m_t.append(c0_row)
            m_y.append(y_row)
            for kind, j, w in part:
                t_row, y_row = np.zeros(stages), np.zeros(stages)
                (t_row if kind == "T" else y_row)[j] = w
                base.append(0.0)
                m_t.append(t_row)
                m_y.append(y_row)
            base.append(0.0)  # the noise scale
            m_t.append(np.zeros(stages))
            m_y.append(np.zeros(stages))
            row += len(part) + 2
        self.rows = row - first_row
        self.base, self.m_t, self.m_y = np.array(base), np.array(m_t), np.array(m_y)


class _Plan:
    """Every static combination of a tableau (stages 1..s-1, the new state unless FSAL, the
    error estimates) stacked into one coefficient matrix."""

    def __init__(self, tableau: ButcherTableau, linear: bool):
        s = tableau.stages
        self.combos, row = {}, 0
        named = [(i, tableau.a[i], 1.0) for i in range(1, s)]
        if not tableau.fsal:
            named.append(("new", tableau.b, 1.0))
        if tableau.error is not None:
            named.append(("error", tableau.error, 0.0))
        if tableau.error3 is not None:
            named.append(("error3", tableau.error3, 0.0))
        for name, weights, c0 in named:
            combo = _Combination(weights, c0, linear, row, s)
            self.combos[name] = combo
            row += combo.rows
        parts = list(self.combos.values())
        self.base = np.concatenate([c.base for c in parts])
        self.m_t = np.concatenate([c.m_t for c in parts])
        self.m_y = np.concatenate([c.m_y for c in parts])
        self.slope = self.m_t.sum(1)  # beta = 1, alpha = 0: pack = base + slope h


def _as_host(values, like_h):
    """Stage coefficients as float64 numpy [s] (shared step) or a host tensor [s, B]."""
    if isinstance(like_h, torch.Tensor):
        return torch.as_tensor(values, dtype=torch.float64)
    return np.asarray(values, dtype=np.float64)


class RungeKutta:
    """One explicit Runge–Kutta step of ``tableau`` on ``dy/dt = alpha(t) y + beta(t) f(y, t)``.

    Args:
        tableau: the method.
        f: ``f(y, t) -> Tensor`` like ``y`` (one evaluation); ``t`` is a float or a float64 [B]
            host tensor.
        view: ``view(times) -> (alpha, beta)`` vectorised over stage times (float64 numpy [s]
            or a host tensor [s, B]), or None for ``dy/dt = f(y, t)``.
        kernel: ``use_kernel(backend, device)``.

    After ``step`` the stage outputs ``terms`` and states ``states`` stay available for
    ``combine("error")`` and ``dense(theta)``; ``evaluations`` counts calls of ``f``;
    ``nonfinite`` / ``step_index``: the divergence flag the fused updates lower (see ``genflow.sample``).
    """

    def __init__(self, tableau: ButcherTableau, f: Callable, *, view: Optional[Callable] = None, kernel: bool):
        self.tableau, self.f, self.view, self.kernel = tableau, f, view, kernel
        self.plan = _Plan(tableau, view is not None)
        self.c = np.array(tableau.c)
        self.evaluations = 0
        self.nonfinite: Optional[torch.Tensor] = None
        self.step_index = 0
        self._pool = []
        self.terms = self.states = self.pack = None
        self.alpha = self.beta = self.h_alpha = self.h_beta = None
        self._dense = None

    def times(self, t, h):
        """Stage times ``t + c_i h``: numpy [s] for a shared step, a host tensor [s, B] per sample."""
        if isinstance(h, torch.Tensor):
            return t[None, :] + torch.from_numpy(self.c)[:, None] * h[None, :]
        return t + self.c * h

    def _buffer(self, like, busy):
        for buf in self._pool:
            if buf.shape == like.shape and buf.dtype == like.dtype and buf.device == like.device and \
                    all(buf is not b for b in busy):
                return buf
        buf = torch.empty_like(like, memory_format=torch.contiguous_format)
        self._pool.append(buf)
        return buf

    def _coefficients(self, plan_base, m_t, m_y, slope, h, device):
        """``base + M_T (h beta) + M_Y (h alpha)`` (rows x B), on the device when per-sample."""
        per_sample = isinstance(h, torch.Tensor)
        if self.view is None:
            if per_sample:
                pack = torch.from_numpy(plan_base)[:, None] + torch.from_numpy(slope)[:, None] * h[None, :]
            else:
                pack = plan_base + slope * h
        elif per_sample:
            pack = (torch.from_numpy(plan_base)[:, None] + torch.from_numpy(m_t) @ self.h_beta
                    + torch.from_numpy(m_y) @ self.h_alpha)
        else:
            pack = plan_base + m_t @ self.h_beta + m_y @ self.h_alpha
        if not per_sample:
            return torch.from_numpy(np.ascontiguousarray(pack))
        if device.type != "cpu":
            return pack.pin_memory().to(device, non_blocking=True)
        return pack.contiguous()

    def step(self, y: torch.Tensor, t, h, *, first: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``y(t + h)`` (a new tensor or an engine buffer; ``y`` is not modified). ``t``, ``h``:
        floats, or float64 [B] host tensors (per-sample steps). ``first``: the stage output
        ``f(y, t)`` when already known (an FSAL method's last stage of the previous step)."""
        tab = self.tableau
        times = self.times(t, h)
        if self.view is not None:
            alpha, beta = self.view(times)
            self.alpha, self.beta = _as_host(alpha, h), _as_host(beta, h)
            self.h_alpha, self.h_beta = self.alpha * h, self.beta * h
        plan = self.plan
        self.pack = self._coefficients(plan.base, plan.m_t, plan.m_y, plan.slope, h, y.device)
        if not isinstance(h, torch.Tensor):
            times = times.tolist()
        self.states = [y]
        self.terms = [first if first is not None else self.evaluate(y, times[0])]
        for i in range(1, tab.stages):
            state = self.combine(i, out=self._buffer(y, self.states))
            self.states.append(state)
            self.terms.append(self.evaluate(state, times[i]))
        if tab.fsal:
            return self.states[-1]
        return self.combine("new", out=self._buffer(y, self.states))

    def evaluate(self, y, t):
        self.evaluations += 1
        return self.f(y, t)

    def record(self) -> tuple:
        """What ``dense`` needs of the last step, to interpolate in it later: ``(states, terms,
        alpha, beta)`` (the caller clones the tensors if the engine's buffers move on)."""
        return self.states, self.terms, self.alpha, self.beta

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
                values = coef.tolist() if coef.dim() == 1 else list(coef.unbind(0))
                result = fused_update_unchecked(base, terms, values, kernel=self.kernel, nonfinite=self.nonfinite,
                                                step=self.step_index)
            else:
                if out is None:
                    out = torch.empty_like(y, memory_format=torch.contiguous_format)
                result = fused_update_packed(base, terms, coef, kernel=self.kernel, out=out,
                                             nonfinite=self.nonfinite, step=self.step_index)
        return result

    def dense(self, theta, h, *, out: Optional[torch.Tensor] = None, step: Optional[tuple] = None) -> torch.Tensor:
        """``y(t + theta h)`` inside the last step (or ``step``, a ``record()``; ``theta`` a float
        or float64 [B] host tensor in [0, 1]) from the method's continuous extension or the
        Hermite interpolant (Hairer et al. I, §II.6)."""
        step = self.record() if step is None else step
        if self._dense is None:
            weights = hermite_dense(self.tableau)
            used = [1.0 if any(w != 0.0 for w in row) else 0.0 for row in weights]
            self._dense = (np.array(weights), _Combination(used, 1.0, self.view is not None, 0, self.tableau.stages))
        poly, combo = self._dense
        per_sample = isinstance(h, torch.Tensor)
        powers = np.arange(1, poly.shape[1] + 1)
        if per_sample:
            theta = torch.as_tensor(theta, dtype=torch.float64).expand_as(h)
            w = torch.from_numpy(poly) @ (theta[None, :] ** torch.from_numpy(powers)[:, None].double())
            w = w * h[None, :]
        else:
            w = poly @ (float(theta) ** powers) * h
        h_beta = step[3] if self.view is not None else 1.0
        h_alpha = step[2] if self.view is not None else 0.0
        if per_sample:
            beta_w = w * h_beta
            pack = torch.from_numpy(combo.base)[:, None] + torch.from_numpy(combo.m_t) @ beta_w
            if self.view is not None:
                pack = pack + torch.from_numpy(combo.m_y) @ (w * h_alpha)
            pack = pack.to(step[0][0].device).contiguous()
        else:
            pack = combo.base + combo.m_t @ (w * h_beta)
            if self.view is not None:
                pack = pack + combo.m_y @ (w * h_alpha)
            pack = torch.from_numpy(np.ascontiguousarray(pack))
        return self.combine(None, out=out, combo=combo, pack=pack, step=step)
