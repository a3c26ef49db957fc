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
    ``("Y", j)``, at most ``MAX_TERMS``) and ``row`` the first of its ``len(refs) + 2`` rows.
    ``weights`` holds one weight vector per variant (tableaux sharing the slots); ``m_t``,
    ``m_y`` are ``[variants, rows, stages]``."""

    def __init__(self, weights, c0: float, linear: bool, first_row: int, stages: int):
        weights = np.asarray(weights, dtype=np.float64).reshape(-1, stages)
        used = (weights != 0.0).any(0)
        slots = [("T", j) for j in range(stages) if used[j]]
        if linear:
            slots += [("Y", j) for j in range(1, stages) if used[j]]
        self.chunks, base, m_t, m_y = [], [], [], []
        zero = np.zeros_like(weights)
        row = first_row
        for s in range(0, max(len(slots), 1), MAX_TERMS):
            part = slots[s:s + MAX_TERMS]
            self.chunks.append((tuple(part), row))
            base.append(c0 if s == 0 else 1.0)
            m_t.append(zero)
            y_row = zero.copy()
            if s == 0 and linear:
                y_row[:, 0] = weights[:, 0]  # y is Y_0: its alpha term joins c0
            m_y.append(y_row)
            for kind, j in part:
                row_w = zero.copy()
                row_w[:, j] = weights[:, j]
                base.append(0.0)
                m_t.append(row_w if kind == "T" else zero)
                m_y.append(row_w if kind == "Y" else zero)
            base.append(0.0)  # the noise scale
            m_t.append(zero)
            m_y.append(zero)
            row += len(part) + 2
        self.rows = row - first_row
        self.base, self.m_t, self.m_y = np.array(base), np.stack(m_t, 1), np.stack(m_y, 1)


class _Plan:
    """Every static combination of a tableau (stages 1..s-1, the new state unless FSAL, the
    error estimates) stacked into one coefficient matrix; ``variants`` are tableaux with the
    same stage count and FSAL flag whose weights a step may pick per sample."""

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
        self.base = np.concatenate([c.base for c in parts])
        self.m_t = np.concatenate([c.m_t for c in parts], 1)
        self.m_y = np.concatenate([c.m_y for c in parts], 1)
        self.slope = self.m_t.sum(2)  # beta = 1, alpha = 0: pack = base + slope h
        self.c = np.array([v.c for v in variants])
        # every row holds at most one stage coefficient: pack = base + weight * [h beta; h alpha][source]
        stacked = np.concatenate([self.m_t, self.m_y], 2)  # [variants, rows, 2 s]
        self.source = np.abs(stacked).sum(0).argmax(1)
        self.weight = np.take_along_axis(stacked, self.source[None, :, None], 2)[..., 0]
        self.source_t = torch.from_numpy(self.source)


def _as_host(values, times):
    """Stage coefficients as float64 numpy [s] (shared step) or a host tensor [s, B], the shape
    of the stage ``times`` (a float broadcasts)."""
    if isinstance(times, torch.Tensor):
        return torch.as_tensor(values, dtype=torch.float64).expand(times.shape)
    return np.broadcast_to(np.asarray(values, dtype=np.float64), np.shape(times))


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
    ``nonfinite`` / ``step_index``: the divergence flag the fused updates lower (see ``genflow.sample``).
    """

    def __init__(self, tableau: ButcherTableau, f: Callable, *, view: Optional[Callable] = None,
                 linear: Optional[bool] = None, kernel: bool, alternative: Optional[ButcherTableau] = None):
        self.tableau, self.f, self.view, self.kernel = tableau, f, view, kernel
        self.linear = view is not None if linear is None else linear
        self.plan = _Plan([tableau] if alternative is None else [tableau, alternative], self.linear)
        self.evaluations = 0
        self.nonfinite: Optional[torch.Tensor] = None
        self.step_index = 0
        self.pool = []
        self._pack = None  # the per-sample coefficient buffer (CPU float64 [rows, B])
        self.terms = self.states = self.pack = None
        self.alpha = self.beta = self.h_alpha = self.h_beta = None
        self._dense = None

    def times(self, t, h, use_alternative=False):
        """Stage times ``t + c_i h``: numpy [s] for a shared step, a host tensor [s, B] per sample
        (``use_alternative``: False, True, or a bool [B] host mask of the samples on the alternative)."""
        c = self.plan.c
        if isinstance(use_alternative, torch.Tensor):
            c = torch.where(use_alternative[None, :], torch.from_numpy(c[-1])[:, None], torch.from_numpy(c[0])[:, None])
            return t[None, :] + c * h[None, :]
        c = c[-1] if use_alternative else c[0]
        if isinstance(h, torch.Tensor):
            return t[None, :] + torch.from_numpy(c)[:, None] * h[None, :]
        return t + c * h

    def _buffer(self, like, busy):
        for buf in self.pool:
            if buf.shape == like.shape and buf.dtype == like.dtype and buf.device == like.device and \
                    all(buf is not b for b in busy):
                return buf
        buf = torch.empty_like(like, memory_format=torch.contiguous_format)
        self.pool.append(buf)
        return buf

    def _coefficients(self, plan, h, device, use_alternative=False):
        """``base + M_T (h beta) + M_Y (h alpha)`` (rows x B), on the device when per-sample
        (the variant picked by ``use_alternative``); each row has one stage coefficient, so this
        is a gather: ``base + weight * [h beta; h alpha][source]``."""
        if isinstance(use_alternative, torch.Tensor):
            first = self._coefficients(plan, h, torch.device("cpu"), False).clone()  # the buffer is reused
            second = self._coefficients(plan, h, torch.device("cpu"), True)
            pack = torch.where(use_alternative[None, :], second, first)
            return pack.pin_memory().to(device, non_blocking=True) if device.type != "cpu" else pack
        v = -1 if use_alternative else 0
        if not isinstance(h, torch.Tensor):
            if self.linear:
                pack = plan.base + plan.weight[v] * np.concatenate([self.h_beta, self.h_alpha])[plan.source]
            else:
                pack = plan.base + plan.slope[v] * h
            return torch.from_numpy(np.ascontiguousarray(pack))
        # per sample: [rows, B] float64, written into a buffer kept for the solve (a fresh one per
        # step costs page faults that outweigh the arithmetic at large B)
        rows, batch = plan.base.shape[0], h.shape[0]
        if self._pack is None or self._pack.shape != (rows, batch):
            self._pack = torch.empty(rows, batch, dtype=torch.float64)
        pack = self._pack
        if self.linear:
            torch.index_select(torch.cat([self.h_beta, self.h_alpha]), 0, plan.source_t, out=pack)
            pack.mul_(torch.from_numpy(plan.weight[v])[:, None])
        else:
            torch.mul(torch.from_numpy(plan.slope[v])[:, None], h[None, :], out=pack)
        pack.add_(torch.from_numpy(plan.base)[:, None])
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
        times = self.times(t, h, use_alternative)
        if self.linear:
            if alpha is None:
                alpha, beta = self.view(times)
            self.alpha, self.beta = _as_host(alpha, times), _as_host(beta, times)
            self.h_alpha, self.h_beta = self.alpha * h, self.beta * h
        plan = self.plan
        self.pack = self._coefficients(plan, h, y.device, use_alternative)
        if not isinstance(h, torch.Tensor):
            times = times.tolist()
        self.states = [y]
        self.terms = [first if first is not None else self.evaluate(y, times[0])]
        for i in range(1, tab.stages):
            last = tab.fsal and i == tab.stages - 1 and out is not None
            state = self.combine(i, out=out if last else self._buffer(y, self.states + [out]))
            self.states.append(state)
            self.terms.append(self.evaluate(state, times[i]))
        if tab.fsal:
            return self.states[-1]
        return self.combine("new", out=out if out is not None else self._buffer(y, self.states))

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
                values = coef.tolist() if coef.dim() == 1 else list(coef.clone().unbind(0))  # autograd keeps them
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
            self._dense = (np.array(weights), _Combination(used, 1.0, self.linear, 0, self.tableau.stages))
        poly, combo = self._dense
        per_sample = isinstance(h, torch.Tensor)
        powers = np.arange(1, poly.shape[1] + 1)
        if per_sample:
            theta = torch.as_tensor(theta, dtype=torch.float64).expand_as(h)
            w = torch.from_numpy(poly) @ (theta[None, :] ** torch.from_numpy(powers)[:, None].double())
            w = w * h[None, :]
        else:
            w = poly @ (float(theta) ** powers) * h
        h_beta = step[3] if self.linear else 1.0
        h_alpha = step[2] if self.linear else 0.0
        if per_sample:
            beta_w = w * h_beta
            pack = torch.from_numpy(combo.base)[:, None] + torch.from_numpy(combo.m_t[0]) @ beta_w
            if self.linear:
                pack = pack + torch.from_numpy(combo.m_y[0]) @ (w * h_alpha)
            pack = pack.to(step[0][0].device).contiguous()
        else:
            pack = combo.base + combo.m_t[0] @ (w * h_beta)
            if self.linear:
                pack = pack + combo.m_y[0] @ (w * h_alpha)
            pack = torch.from_numpy(np.ascontiguousarray(pack))
        return self.combine(None, out=out, combo=combo, pack=pack, step=step)
