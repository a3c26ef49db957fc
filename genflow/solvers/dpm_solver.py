"""DPM-Solver family: exponential integrators in log-SNR time (Lim, "An Introduction to Generative Modeling with Flows and Diffusion Models" §6.5.4).

With ``lambda = log(alpha/sigma)`` and ``h = lambda' - lambda`` the probability-flow ODE has the
exact solutions (Lu et al. 2022, eq. 3.4; Lu et al. 2022b, §3)

    x' = (alpha'/alpha) x - alpha' int e^{-l} eps(l) dl            (noise prediction)
    x' = (sigma'/sigma) x + sigma' int e^{l}  x0(l)  dl            (data prediction)

and every solver here Taylor-expands ``eps`` or ``x0`` in ``lambda``. Singlestep solvers
(``dpm_solver_1|2|3``, ``dpmpp_2s``) evaluate the model at intermediate log-SNRs
``lambda + r h`` inside each step; their times ``t_from_log_snr(lambda + r h)`` are tabulated
once per grid at construction. Multistep solvers (``dpmpp_2m``, ``dpmpp_3m``, ``dpmpp_2m_sde``,
``dpmpp_3m_sde``) reuse the data predictions of earlier steps.

A step that ends at ``sigma' = 0`` or starts at ``alpha = 0`` (``h = inf``) is always the
first-order step ``x' = (sigma'/sigma) x + alpha' (1 - e^{-h}) x0`` (DDIM), as in k-diffusion
and diffusers (``final_sigmas_type="zero"``); it needs no intermediate evaluation.
"""
import math

import torch

from genflow._cache import LRU, tensor_key, value_key
from genflow.solvers.base import Solver, exp, expm1, sqrt, table, where
from genflow.solvers.dpm_coefficients import DPM_VARIANTS, dpm_multistep_coefficients, dpm_weights

__all__ = ["DPMSolver1", "DPMSolver2", "DPMSolver3", "DPMSolverPP2S", "DPMSolverPP2M", "DPMSolverPP3M",
           "DPMSolverPP2MSDE", "DPMSolverPP3MSDE", "DPM_VARIANTS", "dpm_weights", "dpm_multistep_coefficients"]


_PLANS = LRU(4096)  # (grid serial, solver class, options, step) -> the step's coefficients and packed form


def _finite(v):
    # not math.isfinite: under torch.compile a grid float may be traced symbolically
    return torch.isfinite(v) if isinstance(v, torch.Tensor) else (v == v and abs(v) != math.inf)


def _all(cond) -> bool:
    return bool(cond.all()) if isinstance(cond, torch.Tensor) else bool(cond)


def _any(cond) -> bool:
    return bool(cond.any()) if isinstance(cond, torch.Tensor) else bool(cond)


def _and(a, b):
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return torch.as_tensor(a) & torch.as_tensor(b)
    return a and b


def _is_identity(a, b) -> bool:
    """Whether a view ``a x + b term`` is exactly ``term`` (so ``term`` can be kept as is)."""
    return not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor) and a == 0.0 and b == 1.0


def _safe(v, ok, fill=1.0):
    """``v`` where ``ok``, else ``fill`` (keeps coefficient math finite on masked samples)."""
    if not isinstance(ok, torch.Tensor):
        return v if ok else fill
    if not isinstance(v, torch.Tensor) and v == fill:
        return v
    return where(ok, v, fill)


_STAGE_TABLES = LRU(64)  # (process, grid values, ratios) -> the stage tables


def _stage_tables(solver, ratios):
    """Per-step ``Point``s at ``lambda_i + r h_i`` for each ratio ``r`` (one vectorised pass,
    cached by the process, the grid's values and the ratios: repeated solves on a grid reuse it).

    Steps with an infinite ``h`` (an end with ``sigma = 0`` or ``alpha = 0``) get the step's
    start point instead; their intermediate stages are never used for the update.
    """
    key = (value_key(solver.process), tensor_key(solver.ts), str(solver.ts.device), tuple(ratios))
    return _STAGE_TABLES.get_or_compute(key, lambda: _compute_stage_tables(solver, ratios))


def _compute_stage_tables(solver, ratios):
    ts = solver.ts.to(torch.float64)
    with torch.no_grad():
        lam = solver.process.log_snr(ts).to(torch.float64)
    h = lam[1:] - lam[:-1]
    ok = torch.isfinite(h)
    tables = []
    for r in ratios:
        lam_r = torch.where(ok, lam[:-1] + r * torch.where(ok, h, 0.0), 0.0)
        with torch.no_grad():
            t_r = solver.process.t_from_log_snr(lam_r).to(torch.float64)
        tables.append(table(solver.process, torch.where(ok, t_r, ts[:-1])))
    return tables


def _blend(mask, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample ``a if mask else b`` for a [B] mask."""
    return torch.where(mask.to(a.device).reshape((-1,) + (1,) * (a.dim() - 1)), a, b)


def _combine(cx, views, c):
    """Terms and coefficients of ``cx x + sum_k c_k v_k`` for views ``v_k = a_k state_k + b_k term_k``
    (``state_k`` is None for the step's own state ``x``); exactly-zero ``c_k`` are dropped."""
    terms, coefs = [], [cx]
    for (term, a, b, state), ck in zip(views, c):
        if not isinstance(ck, torch.Tensor) and ck == 0.0:
            continue
        terms.append(term)
        coefs.append(ck * b)
        if state is None:
            coefs[0] = coefs[0] + ck * a
        else:
            terms.append(state)
            coefs.append(ck * a)
    return terms, coefs


class _Singlestep(Solver):
    """Shared machinery of the singlestep solvers: the intermediate-time tables and the
    first-order fallback for steps with an infinite ``h``."""

    ratios = ()

    def __init__(self, model, ts, **kwargs):
        super().__init__(model, ts, **kwargs)
        self.stages = _stage_tables(self, self.ratios)

    def first_order(self, x, out, p, q):
        """DDIM / DPM-Solver(++)-1 in data-prediction form, valid for ``h = inf``."""
        term, a0, b0 = self.x0_view(x, out, p)
        c = -q.alpha * expm1(p.lam - q.lam)
        return self.update(x, [term], [q.sigma / p.sigma + c * a0, c * b0], out=x)


class _NoiseSinglestep(_Singlestep):
    """Singlestep DPM-Solver-k with noise prediction (Lu et al. 2022, Algorithms 1 and 2).

    With ``h_r = lambda_r - lambda`` the stages are
    ``u1 = (alpha_1/alpha) x - sigma_1 expm1(h_1) eps``,
    ``u2 = (alpha_2/alpha) x - sigma_2 expm1(h_2) eps - sigma_2 (r2/r1) (expm1(h_2)/h_2 - 1) (eps_1 - eps)``
    and the updates
    ``x' = (alpha'/alpha) x - sigma' expm1(h) eps``                                  (k = 1),
    ``x' = (alpha'/alpha) x - sigma' expm1(h) eps - sigma'/(2 r1) expm1(h) (eps_1 - eps)`` (k = 2),
    ``x' = (alpha'/alpha) x - sigma' expm1(h) eps - sigma'/r2 (expm1(h)/h - 1) (eps_2 - eps)`` (k = 3).
    """

    def step(self, i, x):
        p, q = self.grid[i], self.grid[i + 1]
        h = q.lam - p.lam
        ok = _finite(h)
        out = self.evaluate(x, p)
        if not _any(ok):
            return self.first_order(x, out, p, q)
        fallback = None
        if not _all(ok):  # per-sample grids where only some samples reach sigma' = 0 / start at alpha = 0
            fallback = self.first_order(x.clone(), out, p, q)
        hs, ap = _safe(h, ok), _safe(p.alpha, ok)
        e0, a0, b0 = self.eps_view(x, out, p)
        eps = [(e0, a0, b0, None)]  # (term, a, b, state the view is linear in; None = x)
        for k, stage in enumerate(self.stages):
            s = stage[i]
            hk = _safe(s.lam - p.lam, ok, 0.0)
            cx = _safe(s.alpha / ap, ok)
            c = [-s.sigma * expm1(hk)]  # coefficients of eps_0, eps_1, ... in u_k
            if k == 1:
                r1, r2 = self.ratios
                c1 = -s.sigma * (r2 / r1) * (expm1(hk) / _safe(hk, ok) - 1)
                c = [c[0] - c1, c1]
            c = [_safe(ci, ok, 0.0) for ci in c]
            u = self.update(x, *_combine(cx, eps, c))
            out_k = self.evaluate(u, s)
            ek, ak, bk = self.eps_view(u, out_k, s)
            eps.append((ek, ak, bk, u))
        C = -q.sigma * expm1(hs)
        if len(self.ratios) == 0:
            c = [C]
        elif len(self.ratios) == 1:
            c1 = C / (2 * self.ratios[0])
            c = [C - c1, c1]
        else:
            r2 = self.ratios[1]
            c2 = -q.sigma * (expm1(hs) / hs - 1) / r2
            c = [C - c2, 0.0, c2]
        c = [_safe(ci, ok, 0.0) for ci in c]
        x_new = self.update(x, *_combine(_safe(q.alpha / ap, ok, 0.0), eps, c), out=None if fallback is not None else x)
        return x_new if fallback is None else _blend(ok, x_new, fallback)


class DPMSolver1(_NoiseSinglestep):
    """DPM-Solver-1 (Lu et al. 2022, eq. 3.7): ``x' = (alpha'/alpha) x - sigma' expm1(h) eps``.

    The first-order exponential integrator in noise-prediction form; it equals DDIM (``eta=0``).
    Order 1, 1 NFE per step.
    """

    name = "dpm_solver_1"


class DPMSolver2(_NoiseSinglestep):
    """DPM-Solver-2 (Lu et al. 2022, Algorithm 1 with ``r1 = 1/2``).

    ``u = (alpha_s/alpha) x - sigma_s expm1(h/2) eps(x, t)`` at ``lambda_s = lambda + h/2``,
    then ``x' = (alpha'/alpha) x - sigma' expm1(h) eps(u, s)``. Order 2, 2 NFE per step.
    """

    name = "dpm_solver_2"
    order = 2
    nfe_per_step = 2
    ratios = (0.5,)


class DPMSolver3(_NoiseSinglestep):
    """DPM-Solver-3 (Lu et al. 2022, Algorithm 2 with ``r1 = 1/3``, ``r2 = 2/3``).

    Stages at ``lambda + h/3`` and ``lambda + 2h/3``;
    ``x' = (alpha'/alpha) x - sigma' expm1(h) eps - (sigma'/r2) (expm1(h)/h - 1) (eps_2 - eps)``.
    Order 3, 3 NFE per step.
    """

    name = "dpm_solver_3"
    order = 3
    nfe_per_step = 3
    ratios = (1 / 3, 2 / 3)


def _pp_singlestep(solver, x, out, p, q, stages, keep_x0=False):
    """One singlestep DPM-Solver++ step of order ``len(stages) + 1`` (2S or 3S).

    ``u1 = (sigma_1/sigma) x - alpha_1 expm1(-h_1) x0``,
    ``u2 = (sigma_2/sigma) x - alpha_2 expm1(-h_2) x0 + alpha_2 (r2/r1) (expm1(-h_2)/h_2 + 1) (x0_1 - x0)``;
    2S: ``x' = (sigma'/sigma) x - alpha' expm1(-h) [(1 - 1/(2r)) x0 + 1/(2r) x0_1]``;
    3S: ``x' = (sigma'/sigma) x - alpha' expm1(-h) x0 + (alpha'/r2) (expm1(-h)/h + 1) (x0_2 - x0)``.
    Steps with ``h = inf`` reduce to first order. Returns ``(x', x0)`` (``x0`` materialised
    only with ``keep_x0``).
    """
    h = q.lam - p.lam
    ok = _finite(h)
    term0, a0, b0 = solver.x0_view(x, out, p)
    x0 = None
    if keep_x0:
        x0 = term0 if _is_identity(a0, b0) else solver.update(x, [term0], [a0, b0])
        term0, a0, b0 = x0, 0.0, 1.0
    if not _any(ok) or not stages:
        c = -q.alpha * expm1(-h)
        return solver.update(x, [term0], [q.sigma / p.sigma + c * a0, c * b0], out=x), x0
    ratios = [r for r, _ in stages]
    views = [(term0, a0, b0, None)]  # x0_k = a_k state_k + b_k term_k
    for k, (r, s) in enumerate(stages):
        hk = _safe(s.lam - p.lam, ok, 0.0)
        c = [-s.alpha * expm1(-hk)]
        if k == 1:
            c1 = s.alpha * (ratios[1] / ratios[0]) * (expm1(-hk) / _safe(hk, ok) + 1)
            c = [c[0] - c1, c1]
        c = [_safe(ci, ok, 0.0) for ci in c]
        u = solver.update(x, *_combine(s.sigma / p.sigma, views, c))
        out_k = solver.evaluate(u, s)
        tk, ak, bk = solver.x0_view(u, out_k, s)
        views.append((tk, ak, bk, u))
    C = -q.alpha * expm1(-h)
    hs = _safe(h, ok)
    if len(stages) == 1:
        c1 = _safe(C / (2 * ratios[0]), ok, 0.0)
        c = [C - c1, c1]
    else:
        c2 = _safe(q.alpha * (expm1(-hs) / hs + 1) / ratios[1], ok, 0.0)
        c = [C - c2, 0.0, c2]
    return solver.update(x, *_combine(q.sigma / p.sigma, views, c), out=x), x0


class DPMSolverPP2S(_Singlestep):
    """DPM-Solver++(2S), the singlestep second-order data-prediction solver.

    Lu et al. (2022b), Algorithm 1 with ``r = 1/2``: ``u = (sigma_s/sigma) x - alpha_s expm1(-h/2) x0(x, t)``
    at ``lambda_s = lambda + h/2``, then ``x' = (sigma'/sigma) x - alpha' expm1(-h) x0(u, s)``
    (k-diffusion's ``sample_dpmpp_2s_ancestral`` with ``eta=0``). Order 2, 2 NFE per step.
    """

    name = "dpmpp_2s"
    order = 2
    nfe_per_step = 2
    ratios = (0.5,)

    def step(self, i, x):
        p, q = self.grid[i], self.grid[i + 1]
        out = self.evaluate(x, p)
        return _pp_singlestep(self, x, out, p, q, [(r, t[i]) for r, t in zip(self.ratios, self.stages)])[0]


class _MultistepPP(Solver):
    """Multistep DPM-Solver++ (ODE and SDE) of order ``order`` in data prediction.

    With churn ``eta`` (0 for the ODE solvers), ``H = (1 + eta) h``, ``E = 1 - e^{-H}``,
    ``phi_2 = 1 - E/H``, ``phi_3 = phi_2/H - 1/2``, ``r_j = h_{-j-1}/h`` (earlier steps' ``h``),
    ``D1_0 = (x0 - x0_{-1})/r_0``, ``D1_1 = (x0_{-1} - x0_{-2})/r_1``:

    ``x' = (sigma'/sigma) e^{-eta h} x + alpha' E x0 + alpha' [correction] + sigma' sqrt(1 - e^{-2 eta h}) z``

    second order: ``E/2 D1_0`` (``solver_type="midpoint"``) or ``phi_2 D1_0`` (``"heun"``);
    third order: ``phi_2 D1 - w phi_3 D2`` with ``D1 = D1_0 + r_0/(r_0+r_1) (D1_0 - D1_1)``,
    ``D2 = (D1_0 - D1_1)/(r_0 + r_1)``.

    Options (keyword-only): ``lower_order_final`` (default True): on solves of fewer than 15
    steps the last step is first order and the one before it at most second order (diffusers'
    rule); a step ending at ``sigma' = 0`` is first order whatever the option. ``solver_type``:
    ``"midpoint"`` or ``"heun"`` second-order correction. ``warmup`` (ODE solvers):
    ``"lower_order"`` (default; orders 1, 2, ... while the history fills) or ``"singlestep"``
    (DPM-Solver++(2S)/(3S) steps of the full order until it is full; genflow only).
    ``variant`` (third order): ``"taylor"`` (``w = 2``) or ``"reference"`` (``w = 1``).
    """

    order = 2
    default_solver_type = "midpoint"
    warmups = ("lower_order",)

    def __init__(self, model, ts, *, lower_order_final: bool = True, solver_type=None, warmup: str = "lower_order",
                 variant: str = "taylor", **kwargs):
        super().__init__(model, ts, **kwargs)
        solver_type = self.default_solver_type if solver_type is None else solver_type
        if solver_type not in ("midpoint", "heun"):
            raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
        if warmup not in self.warmups:
            raise ValueError(f"warmup must be one of {self.warmups} for {self.name!r}, got {warmup!r}")
        if variant not in ("taylor", "reference"):
            raise ValueError(f"variant must be 'taylor' or 'reference', got {variant!r}")
        if variant != "taylor" and self.order < 3:
            raise ValueError(f"variant applies to the third-order solvers only, got variant={variant!r} for {self.name!r}")
        self.solver_type, self.warmup, self.lower_order_final = solver_type, warmup, bool(lower_order_final)
        self.d2_weight = 2.0 if variant == "taylor" else 1.0
        self.history = []  # (x0 tensor, h) of the previous steps, most recent last
        if warmup == "singlestep":
            ratios = (0.5,) if self.order == 2 else (1 / 3, 2 / 3)
            self.stages = list(zip(ratios, _stage_tables(self, ratios)))

    @classmethod
    def expected_order(cls, *, warmup="lower_order", variant="taylor", lower_order_final=True, **options) -> int:
        """The global order: ``order``, but 2 for third order with the usual (first-order first
        step) warmup or the reference variant (order-test solves use ``lower_order_final=False``)."""
        if cls.order >= 3 and (warmup != "singlestep" or variant == "reference"):
            return 2
        return cls.order

    def step_order(self, i: int) -> int:
        """The order of step ``i`` before the per-sample ``h = inf`` fallbacks.

        ``lower_order_final`` (diffusers' rule): on a solve of fewer than 15 steps the last step
        is first order and the one before it at most second order.
        """
        n = len(self.grid) - 1
        k = self.order
        if self.lower_order_final and n < 15:
            k = 1 if i == n - 1 else (min(k, 2) if i == n - 2 else k)
        return k

    def step(self, i, x):
        p, q = self.grid[i], self.grid[i + 1]
        key = None
        if self.threshold is None and type(p.t) is float and not torch.compiler.is_compiling():
            # a grid-determined step: reuse its plan (grid serials stand for the process's and the times' values)
            key = (self.grid.serial, type(self), self.model.prediction, self.eta, self.solver_type,
                   self.d2_weight, self.warmup, self.lower_order_final, i)
            hit = _PLANS.get(key)
            if hit is not None:
                return self._planned_step(x, p, q, hit)
        h = q.lam - p.lam
        last = i + 1 == len(self.grid) - 1
        ok = _finite(h)
        k = self.step_order(i) if _any(ok) else 1
        usable = 0  # trailing history entries whose spacing is finite for every sample
        for _, h_prev in reversed(self.history):
            if not _all(_finite(h_prev)):
                break
            usable += 1
        out = self.evaluate(x, p)
        if self.warmup == "singlestep" and k > 1 and usable < k - 1:
            stages = [(r, t[i]) for r, t in self.stages[: k - 1]]
            x, x0 = _pp_singlestep(self, x, out, p, q, stages, keep_x0=not last)
            self._remember(x0, h)
            return x
        k = min(k, usable + 1)
        term, a0, b0 = self.x0_view(x, out, p)
        coefs, noise_scale = self._coefficients(p, q, h, ok, k, a0, b0)
        if key is not None:
            _PLANS.put(key, (h, last, a0, b0, coefs, noise_scale, self.pack(coefs, noise_scale)))
        x0 = None if last else (term if _is_identity(a0, b0) else self.update(x, [term], [a0, b0]))
        prev = [x0_prev for x0_prev, _ in reversed(self.history)][: len(coefs) - 2]
        x = self.update(x, [term] + prev, coefs, noise_scale, out=x, noise_at=(p.sigma, q.sigma))
        self._remember(x0, h)
        return x

    def _planned_step(self, x, p, q, plan):
        """A step of a scalar grid whose coefficients an earlier solve on the same grid computed."""
        h, last, a0, b0, coefs, noise_scale, packed = plan
        out = self.evaluate(x, p)
        x0 = None if last else (out if _is_identity(a0, b0) else self.update(x, [out], [a0, b0]))
        terms = [out] + [x0_prev for x0_prev, _ in reversed(self.history)][: len(coefs) - 2]
        if packed is not None:
            x = self.update_packed(x, terms, packed, out=x)
        else:
            x = self.update(x, terms, coefs, noise_scale, out=x, noise_at=(p.sigma, q.sigma))
        self._remember(x0, h)
        return x

    def _coefficients(self, p, q, h, ok, k, a0, b0):
        """``([c_x, c_term, c_{x0,-1}, ...], noise_scale)`` of a step of order ``k``; they depend
        only on the grid and the options, so scalar-grid solves cache them (``_PLANS``)."""
        eta = self.eta or 0.0
        eta_h = eta * h if eta > 0 else 0.0
        H = (1 + eta) * h
        E = -expm1(-H)
        cx = q.sigma / p.sigma * (exp(-eta_h) if eta > 0 else 1.0)
        c = [q.alpha * E]  # coefficients of x0, x0_{-1}, x0_{-2}
        if k >= 2:
            hs, Hs, Es = _safe(h, ok), _safe(H, ok), _safe(E, ok)
            phi2 = 1 - Es / Hs
            ok2 = _and(ok, _finite(self.history[-1][1]))
            r0 = _safe(self.history[-1][1], ok2) / hs
            g = q.alpha * (Es / 2 if self.solver_type == "midpoint" else phi2)
            corr = [g / r0, -g / r0, 0.0]  # second order: g D1_0
            if k == 3:
                ok3 = _and(ok2, _finite(self.history[-2][1]))
                r1 = _safe(self.history[-2][1], ok3) / hs
                A, B = q.alpha * phi2, -self.d2_weight * q.alpha * (phi2 / Hs - 0.5)
                g0 = A * (1 + r0 / (r0 + r1)) + B / (r0 + r1)  # coefficient of D1_0
                g1 = -A * r0 / (r0 + r1) - B / (r0 + r1)        # coefficient of D1_1
                third = [g0 / r0, -g0 / r0 + g1 / r1, -g1 / r1]
                corr = [where(ok3, a, b) for a, b in zip(third, corr)]  # else second order
            corr = [where(ok2, cj, 0.0) for cj in corr[:k]]          # else first order
            c = [c[0] + corr[0]] + corr[1:]
        noise_scale = q.sigma * sqrt(-expm1(-2 * eta_h)) if eta > 0 else 0.0
        return [cx + c[0] * a0, c[0] * b0] + c[1:], noise_scale

    def _remember(self, x0, h):
        self.history = (self.history + [(x0, h)])[-(self.order - 1):]


class DPMSolverPP2M(_MultistepPP):
    """DPM-Solver++(2M), the multistep second-order data-prediction solver.

    Lu et al. (2022b), Algorithm 2: with ``h = lambda' - lambda`` and ``r = h_prev / h``,
    ``x' = (sigma'/sigma) x - alpha' expm1(-h) [(1 + 1/(2r)) x0 - 1/(2r) x0_prev]``
    (``solver_type="midpoint"``, default; ``"heun"`` weights the difference by
    ``alpha' (1 - (1 - e^{-h})/h)/r``). The first step is first order (``warmup="lower_order"``)
    or DPM-Solver++(2S) (``warmup="singlestep"``, 2 NFE); any step ending at ``sigma' = 0`` is
    first order; ``lower_order_final`` (default True) also makes the last step first order on
    solves of fewer than 15 steps (diffusers' rule). With ``lower_order_final=False`` this is
    k-diffusion's ``sample_dpmpp_2m``. Order 2, 1 NFE per step.
    """

    name = "dpmpp_2m"
    order = 2
    warmups = ("lower_order", "singlestep")
    order_test_options = ({"lower_order_final": False}, {"solver_type": "heun", "lower_order_final": False},
                          {"warmup": "singlestep", "lower_order_final": False})


class DPMSolverPP3M(_MultistepPP):
    """DPM-Solver++(3M), the multistep third-order data-prediction solver.

    The third-order multistep update of Lu et al.'s reference code (2022b), as in diffusers'
    ``multistep_dpm_solver_third_order_update``:
    ``x' = (sigma'/sigma) x - alpha' expm1(-h) x0 + alpha' phi_2 D1 - w alpha' phi_3 D2``
    (notation of the base class, ``eta = 0``). ``D2`` estimates ``h^2 x0''/2``, so the Taylor
    coefficient is ``w = 2`` (``variant="taylor"``, default, global order 3); Lu et al.'s
    reference code, diffusers and k-diffusion use ``w = 1`` (``variant="reference"``), which
    leaves an O(h^3) local error and global order 2. The first two steps are first and second
    order (``warmup="lower_order"``, 1 NFE each) or DPM-Solver++(3S) steps (``"singlestep"``,
    3 NFE each); ``lower_order_final`` as in ``dpmpp_2m`` (the last two steps on solves of fewer
    than 15 steps are first and at most second order). ``solver_type`` picks the second-order
    step (default ``"midpoint"``, as diffusers). Order 3, 1 NFE per step.
    """

    name = "dpmpp_3m"
    order = 3
    warmups = ("lower_order", "singlestep")
    order_test_options = ({"lower_order_final": False}, {"warmup": "singlestep", "lower_order_final": False})


class DPMSolverPP2MSDE(_MultistepPP):
    """DPM-Solver++(2M) SDE, the multistep second-order stochastic data-prediction solver.

    The SDE-DPM-Solver++ of Lu et al. (2022b) as k-diffusion (``sample_dpmpp_2m_sde``) and
    diffusers (``sde-dpmsolver++``) implement it, with k-diffusion's churn ``eta`` (default 1):
    ``x' = (sigma'/sigma) e^{-eta h} x + alpha' E x0 + alpha' c D1_0 + sigma' sqrt(1 - e^{-2 eta h}) z``
    with ``E = 1 - e^{-(1+eta) h}`` and ``c = E/2`` (``solver_type="midpoint"``, default) or
    ``1 - E/((1+eta) h)`` (``"heun"``). ``eta`` here is DESIGN §2's churn squared: the solver
    integrates ``dx = [f x - (1 + eta)/2 g2 score] dt + sqrt(eta) g dW``; ``eta = 1`` is the reverse
    SDE and ``eta = 0`` gives ``dpmpp_2m``. With ``lower_order_final=False`` this is
    k-diffusion's ``sample_dpmpp_2m_sde``; diffusers' ``sde-dpmsolver++`` is ``eta = 1``.
    Weak order 1 (order 2 at ``eta = 0``), 1 NFE per step.
    """

    name = "dpmpp_2m_sde"
    order = 2
    stochastic = True
    default_eta = 1.0
    order_test_options = ({"lower_order_final": False}, {"solver_type": "heun", "lower_order_final": False})


class DPMSolverPP3MSDE(_MultistepPP):
    """DPM-Solver++(3M) SDE, the multistep third-order stochastic data-prediction solver.

    ``dpmpp_3m``'s update with churn (notation of the base class):
    ``x' = (sigma'/sigma) e^{-eta h} x + alpha' E x0 + alpha' (phi_2 D1 - w phi_3 D2)
    + sigma' sqrt(1 - e^{-2 eta h}) z``, all ``phi`` taken at ``H = (1 + eta) h``; ``eta`` and
    ``variant`` as in ``dpmpp_2m_sde`` and ``dpmpp_3m``. The second step uses
    ``solver_type="heun"`` by default, as k-diffusion's ``sample_dpmpp_3m_sde`` does (which this
    equals with ``variant="reference"`` and ``lower_order_final=False``). Weak order 1 (order 3
    at ``eta = 0``), 1 NFE per step.
    """

    name = "dpmpp_3m_sde"
    order = 3
    stochastic = True
    default_eta = 1.0
    default_solver_type = "heun"
    order_test_options = ({"lower_order_final": False},)
