"""DPM-Solver-v3: the multistep exponential integrator with empirical model statistics (EMS).

Zheng, Lu, Chen, Zhu (2023), "DPM-Solver-v3: Improved Diffusion ODE Solver with Empirical Model
Statistics", NeurIPS 2023. With the noise prediction ``eps``, ``lambda = log(alpha/sigma)`` and
scalar statistics ``l, s, b`` on a log-SNR grid (§3.1), the probability-flow ODE is
solved exactly by (§3.1, in the cumulative form of their reference code)

    f = (sigma eps - l x)/alpha,   g(lam) = e^{-(S_lam - S_s)} f - int_s^lam e^{-(S_u - S_s)} b_u du
    x_t = (alpha_t/alpha_s) e^{-(L_t - L_s)} x_s - alpha_t e^{-(L_t - L_s)} int_s^t e^{(L+S)_r - (L+S)_s} g(r) dr
          - alpha_t int_s^t e^{(L_r - L_t) + (S_r - S_s)} int_s^r e^{-(S_u - S_s)} b_u du dr

with ``L, S`` the antiderivatives of ``l, s``. The solver Taylor-expands ``g`` at ``lambda_s``
(its derivatives from the interpolating polynomial through the last ``k`` steps' ``g``, §3.2).
``l = 1, s = b = 0`` (the default when no statistics are given) gives ``f = -x0`` and is exactly
DPM-Solver++ (Lu et al. 2022b) in its Taylor form.
"""
import math
from typing import NamedTuple, Optional

import numpy as np
import torch
from scipy.interpolate import CubicSpline

from genflow._cache import LRU, value_key
from genflow._checks import check_bool
from genflow.ops.fused_update import MAX_TERMS
from genflow.solvers.base import point
from genflow.solvers.deis import ExponentialMultistep

__all__ = ["DPMSolverV3", "ModelStatistics", "StatisticsProfiles", "StepPlan", "model_statistics", "v3_coefficients"]

_NODES, _WEIGHTS = np.polynomial.legendre.leggauss(24)  # Gauss-Legendre on [-1, 1]
_COEFFICIENTS = LRU(4096)  # (statistics, node log-SNRs, end log-SNR, pseudo) -> v3_coefficients


class ModelStatistics(NamedTuple):
    """The empirical model statistics of DPM-Solver-v3 on an increasing log-SNR grid.

    ``lam``, ``l``, ``s``, ``b``: float64 ``[K+1]`` tensors (Zheng et al. 2023, §3.1; scalar,
    i.e. pooled over the data dimensions). ``process``: the ``cache_key`` (as text) of the process
    they were computed for. ``save``/``load`` keep them in one ``torch.save`` file."""

    lam: torch.Tensor
    l: torch.Tensor
    s: torch.Tensor
    b: torch.Tensor
    process: str

    def save(self, path) -> None:
        torch.save({name: getattr(self, name) for name in self._fields}, path)

    @classmethod
    def load(cls, path) -> "ModelStatistics":
        return cls(**torch.load(path, weights_only=True))

    def check(self, process, lams) -> None:
        """A ``ValueError`` naming ``statistics`` unless they fit ``process`` and cover ``lams``."""
        if self.process != str(process.cache_key()):
            raise ValueError(f"statistics were computed for another process ({self.process}), not {process!r}")
        n = self.lam.numel()
        if self.lam.dim() != 1 or n < 4 or any(v.shape != (n,) for v in (self.l, self.s, self.b)):
            raise ValueError(f"statistics must hold lam, l, s, b of one length >= 4, got shapes "
                             f"{[tuple(v.shape) for v in (self.lam, self.l, self.s, self.b)]}")
        if not bool((self.lam[1:] > self.lam[:-1]).all()):
            raise ValueError("statistics.lam must be strictly increasing")
        low, high = float(self.lam[0]), float(self.lam[-1])
        tol = 1e-9 * (1.0 + high - low)
        outside = [v for v in lams if math.isfinite(v) and not low - tol <= v <= high + tol]
        if outside:
            raise ValueError(f"statistics cover log-SNR [{low:.4g}, {high:.4g}] but the time grid reaches "
                             f"{outside[0]:.4g}")


class StatisticsProfiles:
    """``l, s, b`` as smooth functions of log-SNR (cubic splines; constants 1, 0, 0 without
    statistics) and the antiderivatives ``L, S``."""

    def __init__(self, statistics: Optional[ModelStatistics]):
        if statistics is None:
            self.l = np.ones_like
            self.L, self.S, self.b = (lambda v: np.asarray(v, float)), np.zeros_like, np.zeros_like
            return
        lam = statistics.lam.double().numpy()
        self.l = CubicSpline(lam, statistics.l.double().numpy())
        self.L = self.l.antiderivative()
        self.S = CubicSpline(lam, statistics.s.double().numpy()).antiderivative()
        self.b = CubicSpline(lam, statistics.b.double().numpy())

    def decay_integral(self, lam_s, lam_r):
        """``int_{lam_s}^{lam_r} e^{-(S_u - S_s)} b_u du`` for an array of ends ``lam_r``."""
        lam_r = np.asarray(lam_r, float)
        u = lam_s + (lam_r[..., None] - lam_s) * (_NODES + 1) / 2
        vals = np.exp(-(self.S(u) - self.S(lam_s))) * self.b(u)
        return (lam_r - lam_s) / 2 * (vals @ _WEIGHTS)


def v3_coefficients(profiles: StatisticsProfiles, lams, lam_t: float, *, pseudo: bool = False):
    """Coefficients of one DPM-Solver-v3 step from ``lam_s = lams[0]`` to ``lam_t`` of order ``k = len(lams)``.

    ``lams``: log-SNRs of the expansion point ``s`` and the other interpolation nodes (the
    predictor: the previous ``k - 1`` points, most recent first; the corrector: ``t``, then the
    previous points). With ``E = e^{-(L_t - L_s)}``,
    ``c_n = int e^{(L+S)_r - (L+S)_s} (r - lam_s)^n/n! dr`` and ``g^(n) = sum_j D_nj g_j``
    (the derivatives at ``lam_s`` of the polynomial through ``(lam_j, g_j)``, or with ``pseudo``
    ``n!`` times the divided difference over the first ``n + 1`` nodes: the pseudo-order solver,
    Zheng et al. 2023, §3.3), ``x_t = (alpha_t/alpha_s) E x_s - alpha_t E sum_j w_j (e_j f_j - beta_j)
    - alpha_t bias``, ``w = c D``, ``e_j = e^{-(S_j - S_s)}``, ``beta_j = int_s^j e^{-(S_u - S_s)} b_u du``.

    Returns:
        ``(E, [E w_j e_j], E sum_j w_j beta_j - bias)``: ``x_t = (alpha_t/alpha_s) E x_s
        - alpha_t sum_j F_j f_j + alpha_t const``.
    """
    P, lam_s, k = profiles, lams[0], len(lams)
    h = lam_t - lam_s
    r = lam_s + h * (_NODES + 1) / 2
    LS = (P.L(r) - P.L(lam_s)) + (P.S(r) - P.S(lam_s))
    c = [h / 2 * ((np.exp(LS) * (r - lam_s) ** n / math.factorial(n)) @ _WEIGHTS) for n in range(k)]
    D = np.eye(k)
    if pseudo:
        for n in range(1, k):
            for j in range(n + 1):
                D[n, j] = math.factorial(n) / math.prod(lams[j] - lams[m] for m in range(n + 1) if m != j)
    elif k > 1:
        V = np.array([[(lj - lam_s) ** n for n in range(1, k)] for lj in lams[1:]])
        inv = np.linalg.inv(V)  # a_n = sum_j inv[n-1, j-1] (g_j - g_0), g^(n) = n! a_n
        for n in range(1, k):
            D[n, 1:] = math.factorial(n) * inv[n - 1]
            D[n, 0] = -D[n, 1:].sum()
    w = np.asarray(c) @ D
    E = math.exp(-(float(P.L(lam_t)) - float(P.L(lam_s))))
    e = np.exp(-(P.S(np.asarray(lams)) - P.S(lam_s)))
    beta = np.concatenate([[0.0], P.decay_integral(lam_s, lams[1:])]) if k > 1 else np.zeros(1)
    inner = P.decay_integral(lam_s, r)
    bias = h / 2 * ((np.exp(P.L(r) - P.L(lam_t) + P.S(r) - P.S(lam_s)) * inner) @ _WEIGHTS)
    return E, [float(E * wj * ej) for wj, ej in zip(w, e)], float(E * (w @ beta) - bias)


class StepPlan(NamedTuple):
    """What step ``i`` of ``DPMSolverV3`` does, fixed by the grid: ``kind`` (``plan``), whether it
    keeps ``f`` (``keep``) and the next step corrects it (``corrects_next``), ``l`` at its start, and
    its moves as ``(nodes, v3_coefficients)``: the correction of step ``i - 1`` (or None) and the
    prediction (None for a first-order step)."""

    kind: str
    keep: bool
    corrects_next: bool
    l: float
    correction: Optional[tuple]
    prediction: Optional[tuple]


class DPMSolverV3(ExponentialMultistep):
    """DPM-Solver-v3, the multistep predictor(-corrector) with empirical model statistics.

    Zheng et al. (2023), "DPM-Solver-v3", the exact solution of §3.1 with the multistep predictor of §3.2
    and optionally the pseudo-order corrector of §3.3: see the module docstring. Each step
    evaluates the model once, forms ``f = (sigma eps - l x)/alpha`` and takes
    ``x_t = (alpha_t/alpha_s) E x_s - alpha_t sum_j F_j f_j + alpha_t const`` (``v3_coefficients``;
    the statistics' cubic splines integrated by 24-point Gauss-Legendre quadrature).

    Options: ``statistics`` (``model_statistics``; default ``l = 1, s = b = 0``, which is
    DPM-Solver++: ``ddim``, ``dpmpp_2m`` with ``solver_type="heun"``, ``dpmpp_3m``);
    ``solver_order`` 1..3 (default 3, as the paper) and ``lower_order_final`` as ``deis`` (the
    warmup is multistep, so third order is globally second order); ``pseudo`` (pseudo-order
    predictor: divided-difference derivatives, default False); ``corrector`` (default True):
    once the model has been evaluated at the predicted ``x_t``, redo the step with ``t`` as an
    extra node (order ``k + 1``, pseudo-order derivatives, ``f_t`` kept), as the reference code's
    ``use_corrector=True, c_pseudo=True``; the final step is not corrected. The defaults are the
    authors' recommended ``order=3, p_pseudo=False, use_corrector=True, c_pseudo=True``. Order
    ``solver_order`` without corrector (2 for third order), 2 with the (pseudo-order)
    corrector; 1 NFE per step.
    """

    name = "dpm_solver_v3"
    order = 3
    # the default third order with corrector is pre-asymptotic at 10..80 steps on LinearPath (fitted
    # 2.30, last slope 2.06); it is checked with EMS in tests/solvers/test_dpm_solver_v3.py
    order_test_options = tuple(dict(o, lower_order_final=False) for o in (
        {"solver_order": 1, "corrector": False}, {"solver_order": 2, "corrector": False},
        {"solver_order": 3, "corrector": False}, {"solver_order": 2}, {"pseudo": True}))

    def __init__(self, model, ts, *, statistics: Optional[ModelStatistics] = None, solver_order: int = 3,
                 pseudo: bool = False, corrector: bool = True, **kwargs):
        super().__init__(model, ts, solver_order=solver_order, **kwargs)
        if self.warmup != "multistep":
            raise ValueError(f"warmup must be 'multistep' for dpm_solver_v3, got {self.warmup!r}")
        if any(isinstance(p.lam, torch.Tensor) for p in self.grid):
            raise ValueError("schedule: dpm_solver_v3 needs one time grid shared by the batch ([N+1]), "
                             "not per-sample times")
        if statistics is not None:
            if not isinstance(statistics, ModelStatistics):
                raise TypeError(f"statistics must be a ModelStatistics or None, got {type(statistics).__name__}")
            statistics.check(self.process, [p.lam for p in self.grid])
        self.statistics = statistics
        self.profiles = StatisticsProfiles(statistics)
        self.statistics_key = value_key(statistics)
        self.pseudo = check_bool("pseudo", pseudo)
        self.corrector = check_bool("corrector", corrector)
        self.pending = None  # the start x of the previous step, awaiting correction
        self.ones = None  # the constant term of the bias, made at the first step that needs it
        # every step's host numbers (l, the quadratures' coefficients), once per solve: a step reads
        # Python floats (traceable by torch.compile)
        self.plans = self._step_plans()

    @classmethod
    def expected_order(cls, *, solver_order=3, corrector=True, **options) -> int:
        """``solver_order``, but 2 for third order (its first step is first order) and 2 with the
        corrector (its pseudo-order derivatives are first-order accurate)."""
        return 2 if solver_order == 3 or corrector else solver_order

    def needs_history(self, i: int) -> bool:
        return (self.solver_order > 1 or self.corrector) and i + 1 < self.steps

    def remember(self, i: int, m: torch.Tensor) -> None:
        """Keep ``f`` at grid point ``i``; the corrector reads one point further back."""
        self.history[i] = m
        for j in [j for j in self.history if j <= i - self.solver_order - self.corrector]:
            del self.history[j]

    def _coefficients(self, nodes, q, pseudo):
        """``v3_coefficients`` of a move to grid point ``q`` through the grid points ``nodes`` (cached)."""
        lams, lam_t = tuple(self.grid[j].lam for j in nodes), self.grid[q].lam
        return _COEFFICIENTS.get_or_compute((self.statistics_key, lams, lam_t, pseudo), lambda: v3_coefficients(
            self.profiles, lams, lam_t, pseudo=pseudo))

    def _step_plans(self):
        """Every step's ``StepPlan``, walking the steps in order: a step corrects the previous one when
        that one was multistep, kept its ``f`` and ends at a finite log-SNR."""
        plans, corrects, previous_order = [], False, 0
        for i in range(self.steps):
            kind, k = self.plan(i)
            keep = self.needs_history(i) and self.finite[i]
            correction = None
            if corrects:
                nodes = (i - 1, i) + tuple(i - 1 - j for j in range(1, previous_order))
                correction = (nodes, self._coefficients(nodes, i, True))
            prediction = None
            if kind != "first":
                nodes = tuple(i - j for j in range(k))
                prediction = (nodes, self._coefficients(nodes, i + 1, self.pseudo))
            corrects = self.corrector and kind == "multistep" and keep and self.finite[i + 1]
            plans.append(StepPlan(kind, keep, corrects, float(self.profiles.l(self.grid[i].lam)), correction,
                                  prediction))
            previous_order = k
        return plans

    def _move(self, x_s, f_s, p, q, move, *, out, fold=(0.0, 0.0), term=None):
        """``x`` at ``q`` from ``x_s`` at ``p`` by ``move = (nodes, v3_coefficients)`` (``nodes``: grid
        indices, the index of ``p`` first; ``f_s`` is ``f`` there, or None when it is folded into
        ``x_s`` and ``term`` as ``f_s = fold[0] x_s + fold[1] term``)."""
        nodes, (E, F, const) = move
        c_f = [-q.alpha * Fj for Fj in F]
        coefs = [q.alpha / p.alpha * E + c_f[0] * fold[0]]
        terms = [f_s if f_s is not None else term]
        coefs.append(c_f[0] if f_s is not None else c_f[0] * fold[1])
        terms += [self.history[j] for j in nodes[1:]]
        coefs += c_f[1:]
        if const != 0.0:
            if self.ones is None:
                self.ones = torch.ones_like(x_s)
            terms.append(self.ones)
            coefs.append(q.alpha * const)
        if len(terms) <= MAX_TERMS:
            return self.update(x_s, terms, coefs, out=out)
        x_t = self.update(x_s, terms[:MAX_TERMS], coefs[:MAX_TERMS + 1], out=out)  # the op's term limit
        return self.update(x_t, terms[MAX_TERMS:], [1.0] + coefs[MAX_TERMS + 1:], out=x_t)

    def step(self, i, x):
        p, q = self.grid[i], self.grid[i + 1]
        out = self.evaluate(x, p)
        term, a0, b0 = self.x0_view(x, out, p)
        plan = self.plans[i]
        # f = ((1 - l)/alpha) x - x0 = cf x + ct term
        cf, ct = ((1.0 - plan.l) / p.alpha - a0, -b0) if self.finite[i] else (0.0, 0.0)
        pending, self.pending = self.pending, None
        f = self.update(x, [term], [cf, ct]) if plan.keep or pending is not None else None
        if pending is not None:  # correct the step i-1 -> i with i as a node; f there is kept
            self.history[i] = f
            x = self._move(pending, self.history[i - 1], self.grid[i - 1], p, plan.correction, out=x)
        buffer = None if plan.corrects_next else x  # the corrector reads the step's start
        if plan.kind == "first" and pending is None:
            x_next = self.first_order(x, out, p, q, out_buffer=buffer)
        elif plan.kind == "first":  # x' = alpha' x0 + sigma' eps with x0 = ((1 - l)/alpha) x - f
            a_x = q.sigma / p.sigma + (q.alpha - q.sigma * p.alpha / p.sigma) * (1.0 - plan.l) / p.alpha
            x_next = self.update(x, [f], [a_x, -(q.alpha - q.sigma * p.alpha / p.sigma)], out=buffer)
        elif pending is not None:
            x_next = self._move(x, f, p, q, plan.prediction, out=buffer)
        else:
            x_next = self._move(x, None, p, q, plan.prediction, out=buffer, fold=(cf, ct), term=term)
        if plan.keep:
            self.remember(i, f)
        if plan.corrects_next:
            self.pending = x
        return x_next

def model_statistics(model, x_calib: torch.Tensor, *, steps: int = 100, t_start: Optional[float] = None,
                     t_end: Optional[float] = None, delta: float = 1e-3,
                     generator: Optional[torch.Generator] = None) -> ModelStatistics:
    """DPM-Solver-v3's empirical model statistics of ``model`` on ``steps + 1`` log-SNRs.

    Zheng et al. (2023), §3.1, pooled over the data dimensions: at each ``lambda`` of a
    uniform log-SNR grid from ``t_start`` (default ``process.T``) to ``t_end`` (default
    ``process.t_min``), with ``x = alpha x0 + sigma z`` (``x0`` the calibration data, one fixed
    ``z`` and Rademacher probe ``v`` for all ``lambda``) and ``P = sigma eps(x)``:

    * ``l = E[tr(dP/dx)]/d`` (Hutchinson's estimate, central differences of step ``delta sigma``);
    * ``f = (P - l x)/alpha`` and its derivative along the ODE ``dx/dlambda = kappa x - P``
      (``kappa = dlog(alpha)/dlambda``), ``f' = (dP/dlambda - l' x - l dx/dlambda)/alpha - kappa f``
      (``dP/dlambda`` by central differences of step ``delta`` in ``lambda``);
    * ``s, b``: the least-squares fit ``f' ~ s f + b``.

    5 model evaluations of the calibration batch per grid point.
    """
    process = model.process
    if not isinstance(x_calib, torch.Tensor) or x_calib.dim() < 2 or not x_calib.is_floating_point():
        raise TypeError("x_calib must be a floating tensor of data samples [N, ...], got "
                        f"{type(x_calib).__name__} {getattr(x_calib, 'shape', '')}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 3:
        raise ValueError(f"steps must be an int >= 3, got {steps!r}")
    if not delta > 0:
        raise ValueError(f"delta must be > 0, got {delta}")
    ends = {"t_start": process.T if t_start is None else t_start, "t_end": process.t_min if t_end is None else t_end}
    lam_ends = {}
    for name, t in ends.items():
        lam_ends[name] = float(process.log_snr(torch.tensor(float(t), dtype=torch.float64)))
        if not math.isfinite(lam_ends[name]):
            raise ValueError(f"{name} must be a time of finite log-SNR, got {t}")
    lam = np.sort(np.linspace(lam_ends["t_start"], lam_ends["t_end"], steps + 1))
    z = torch.randn(x_calib.shape, generator=generator, dtype=x_calib.dtype).to(x_calib.device)
    v = torch.randint(0, 2, x_calib.shape, generator=generator).to(x_calib) * 2 - 1

    def at(lam_k):
        pt = point(process, float(process.t_from_log_snr(torch.tensor(lam_k, dtype=torch.float64))))
        return pt, (pt.dalpha / pt.alpha) / (pt.dalpha / pt.alpha - pt.dsigma / pt.sigma)

    def P(x, pt):
        return x - pt.alpha * model.predict(x, pt.t, "x0")

    with torch.no_grad():
        l = []
        for lam_k in lam:
            pt, _ = at(lam_k)
            x = pt.alpha * x_calib + pt.sigma * z
            eps = delta * pt.sigma
            l.append(float(((P(x + eps * v, pt) - P(x - eps * v, pt)) * v).sum()) / (2 * eps * x.numel()))
        dl = np.gradient(np.asarray(l), lam, edge_order=2)
        s, b = [], []
        for lam_k, l_k, dl_k in zip(lam, l, dl):
            pt, kappa = at(lam_k)
            x = pt.alpha * x_calib + pt.sigma * z
            p0 = P(x, pt)
            dx = kappa * x - p0
            plus, minus = at(lam_k + delta)[0], at(lam_k - delta)[0]
            dP = (P(x + delta * dx, plus) - P(x - delta * dx, minus)) / (2 * delta)
            f = (p0 - l_k * x) / pt.alpha
            df = (dP - dl_k * x - l_k * dx) / pt.alpha - kappa * f
            fc, dfc = f - f.mean(), df - df.mean()
            s.append(float((fc * dfc).sum() / (fc * fc).sum()))
            b.append(float(df.mean() - s[-1] * f.mean()))
    lam, l, s, b = (torch.as_tensor(np.asarray(a, dtype=np.float64)) for a in (lam, l, s, b))
    return ModelStatistics(lam, l, s, b, str(process.cache_key()))
