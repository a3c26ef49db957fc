"""DEIS, and the machinery it shares with UniPC: multistep exponential integrators in log-SNR.

``ExponentialMultistep`` holds what both need: the per-step order (warmup, ``lower_order_final``),
the history of model predictions, first-order steps through an infinite log-SNR step, and the
optional singlestep warmup (DPM-Solver-2/3-style steps that fill the history at full order).
"""
import torch

from genflow.solvers.base import Solver, exp, expm1, point

__all__ = ["DEIS", "ExponentialMultistep", "deis_coefficients", "solve"]

WARMUPS = ("multistep", "singlestep")


def _det(m):
    if len(m) == 1:
        return m[0][0]
    if len(m) == 2:
        return m[0][0] * m[1][1] - m[0][1] * m[1][0]
    return (m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1]) - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
            + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0]))


def solve(matrix, rhs):
    """``x`` with ``matrix @ x = rhs`` for up to 3x3 systems by Cramer's rule; entries are floats
    or per-sample [B] tensors (one system per sample)."""
    det = _det(matrix)
    return [_det([row[:j] + [b] + row[j + 1:] for row, b in zip(matrix, rhs)]) / det for j in range(len(rhs))]


class ExponentialMultistep(Solver):
    """Base of the multistep exponential integrators ``deis`` and ``unipc`` (not registered).

    Subclasses set ``data_prediction`` (the history holds data predictions ``x0`` if True,
    noise predictions ``eps`` otherwise) and write ``step`` with ``plan``, ``prediction``,
    ``remember`` and ``singlestep``.

    Options:
        solver_order: 1, 2 or 3 (default 2, as diffusers).
        lower_order_final: cap the order of the final steps (``final_order_cap``).
        warmup: how the first ``solver_order - 1`` steps, which lack history, are taken:
            ``"multistep"`` (default; multistep steps of orders 1, 2, ..., as diffusers and the
            papers) or ``"singlestep"`` (singlestep exponential-integrator steps of the full order
            from the current point alone, ``r = 1/2`` or ``r = (1/3, 2/3)``: DPM-Solver-2/3
            (Lu et al. 2022) in the solver's parameterisation; ``order - 1``
            extra model evaluations each). The usual warmup's first-order first step limits
            multistep order 3 to global order 2; the singlestep warmup keeps order 3.

    A step that starts at ``alpha = 0`` or ends at ``sigma = 0`` (an infinite log-SNR step) is
    first order, and history at infinite log-SNR is not used.
    """

    name = ""
    data_prediction = True

    def __init__(self, model, ts, *, solver_order: int = 2, lower_order_final: bool = True,
                 warmup: str = "multistep", **kwargs):
        super().__init__(model, ts, **kwargs)
        if isinstance(solver_order, bool) or solver_order not in (1, 2, 3):
            raise ValueError(f"solver_order must be 1, 2 or 3, got {solver_order!r}")
        if warmup not in WARMUPS:
            raise ValueError(f"warmup must be one of {WARMUPS}, got {warmup!r}")
        self.solver_order = int(solver_order)
        self.lower_order_final = bool(lower_order_final)
        self.warmup = warmup
        self.steps = len(self.grid) - 1
        self.finite = [bool(torch.isfinite(torch.as_tensor(p.lam)).all()) for p in self.grid]
        self.history = {}  # grid index -> materialised prediction (x0 or eps) there

    def final_order_cap(self, i: int) -> int:
        """The highest order ``lower_order_final`` allows at step ``i``: diffusers' DEIS and
        DPM-Solver rule, ``steps - i`` (last step first order, the one before second) when there
        are fewer than 15 steps."""
        return self.steps - i if self.lower_order_final and self.steps < 15 else self.solver_order

    def plan(self, i: int):
        """``(kind, order)`` of step ``i``: ``"multistep"``, ``"singlestep"`` (warmup) or
        ``"first"`` (first order through an infinite log-SNR step)."""
        if not (self.finite[i] and self.finite[i + 1]):
            return "first", 1
        target = min(self.solver_order, self.final_order_cap(i))
        available = 1
        while available < target and available <= i and self.finite[i - available]:
            available += 1
        if available >= target:
            return "multistep", target
        return ("singlestep", target) if self.warmup == "singlestep" else ("multistep", available)

    def needs_history(self, i: int) -> bool:
        """Whether a later step reads the prediction at grid point ``i``."""
        return self.solver_order > 1 and i + 1 < self.steps

    def remember(self, i: int, m: torch.Tensor) -> None:
        """Keep the prediction at grid point ``i``; forget what no later step reads."""
        self.history[i] = m
        for j in [j for j in self.history if j <= i - self.solver_order]:
            del self.history[j]

    def x0_eps_view(self, x, out, p):
        """``(term, (a0, b0), (a1, b1))`` with ``x0 = a0 x + b0 term`` and ``eps = a1 x + b1 term``."""
        term, a0, b0 = self.x0_view(x, out, p)
        if term is out:
            a1, b1 = self.coef("eps", p)
        else:  # thresholded x0 was materialised: eps = (x - alpha x0) / sigma
            a1, b1 = 1.0 / p.sigma, -p.alpha / p.sigma
        return term, (a0, b0), (a1, b1)

    def prediction(self, x, out, p, view=None) -> torch.Tensor:
        """The history quantity (x0 or eps) of the raw output ``out`` at ``(x, p)``, materialised."""
        term, x0_coefs, eps_coefs = view or self.x0_eps_view(x, out, p)
        a, b = x0_coefs if self.data_prediction else eps_coefs
        if not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor) and (a, b) == (0.0, 1.0):
            return term
        return self.update(x, [term], [a, b])

    def first_order(self, x, out, p, q, view=None, out_buffer=None):
        """``x' = alpha' x0 + sigma' eps`` from the raw output (DDIM; also through infinite h)."""
        term, (a0, b0), (a1, b1) = view or self.x0_eps_view(x, out, p)
        return self.update(x, [term], [q.alpha * a0 + q.sigma * a1, q.alpha * b0 + q.sigma * b1], out=out_buffer)

    def ratio_mult(self, p, s):
        """``(R, M)`` of ``x_s = R x_p - M (...)``: ``(sigma_s/sigma_p, alpha_s)`` for data
        prediction, ``(alpha_s/alpha_p, sigma_s)`` for noise prediction."""
        if self.data_prediction:
            return s.sigma / p.sigma, s.alpha
        return s.alpha / p.alpha, s.sigma

    def singlestep(self, x, m, p, q, order, out_buffer=None):
        """One singlestep exponential-integrator step of ``order`` (2 or 3) from ``p`` to ``q``
        given the prediction ``m`` at ``(x, p)``; ``hh = -h`` (data) or ``h`` (noise),
        ``phi(z) = expm1(z)/z - 1``, ``(R_s, M_s) = ratio_mult(p, s)``:

        * order 2, ``r1 = 1/2``: ``u = R_1 x - M_1 expm1(r1 hh) m``,
          ``x' = R x - M expm1(hh) [m + (m(u) - m)/(2 r1)]``;
        * order 3, ``r1, r2 = 1/3, 2/3``: ``u1`` as ``u``, ``D1 = m(u1) - m``,
          ``u2 = R_2 x - M_2 expm1(r2 hh) m - (r2/r1) M_2 phi(r2 hh) D1``,
          ``x' = R x - M expm1(hh) m - (M/r2) phi(hh) (m(u2) - m)``.

        DPM-Solver-2/3 (Lu et al. 2022a, noise prediction); DPM-Solver++(2S)/(3S) (Lu et al.
        2022b, data prediction). ``order - 1`` extra model evaluations.
        """
        h = q.lam - p.lam
        hh = -h if self.data_prediction else h
        ratio, mult = self.ratio_mult(p, q)
        rs = (0.5,) if order == 2 else (1.0 / 3.0, 2.0 / 3.0)
        mids = [point(self.process, self.process.t_from_log_snr(p.lam + r * h)) for r in rs]
        r1, (ratio1, mult1) = rs[0], self.ratio_mult(p, mids[0])
        u = self.update(x, [m], [ratio1, -mult1 * expm1(r1 * hh)])
        m1 = self.prediction(u, self.evaluate(u, mids[0]), mids[0])
        if order == 2:
            c = -mult * expm1(hh) * 0.5 / r1
            return self.update(x, [m, m1], [ratio, -mult * expm1(hh) - c, c], out=out_buffer)
        r2, (ratio2, mult2) = rs[1], self.ratio_mult(p, mids[1])
        c1 = -(r2 / r1) * mult2 * (expm1(r2 * hh) / (r2 * hh) - 1)
        u = self.update(x, [m, m1], [ratio2, -mult2 * expm1(r2 * hh) - c1, c1], out=u)
        m2 = self.prediction(u, self.evaluate(u, mids[1]), mids[1])
        c2 = -(mult / r2) * (expm1(hh) / hh - 1)
        return self.update(x, [m, m2], [ratio, -mult * expm1(hh) - c2, c2], out=out_buffer)


def _moments(h, k):
    """``I_n = int_0^{-h} v^n e^v dv`` for ``n < k`` (``I_n = (-h)^n e^{-h} - n I_{n-1}``)."""
    e = exp(-h)
    moments = [expm1(-h)]
    for n in range(1, k):
        moments.append((-h) ** n * e - n * moments[-1])
    return moments


def _lagrange_integrals(moments, d):
    """``c_j = int_0^{-h} L_j(v) e^v dv`` for the Lagrange basis on the nodes ``0, d_1, .., d_{k-1}``."""
    if not d:
        return [moments[0]]
    i0, i1 = moments[0], moments[1]
    if len(d) == 1:
        (d1,) = d
        return [i0 - i1 / d1, i1 / d1]
    i2 = moments[2]
    d1, d2 = d
    return [i0 - (d1 + d2) / (d1 * d2) * i1 + i2 / (d1 * d2),
            (i2 - d2 * i1) / (d1 * (d1 - d2)),
            (i2 - d1 * i1) / (d2 * (d2 - d1))]


def deis_coefficients(h, nodes):
    """``c_j = int_0^{-h} L_j(v) e^v dv`` (floats or per-sample tensors): the weights of DEIS's
    update ``x' = (alpha'/alpha) x + alpha' (sigma/alpha) sum_j c_j eps_j`` for the Lagrange basis
    in ``v = lambda - lambda(t)`` on the nodes ``0, nodes[0], ..`` (``nodes[j-1] = lambda - lambda_{-j}``,
    at most 2), ``h = lambda' - lambda``. Zhang & Chen (2023), §4, in log-rho time."""
    if len(nodes) > 2:
        raise ValueError(f"nodes must hold at most 2 past nodes (order <= 3), got {len(nodes)}")
    return _lagrange_integrals(_moments(h, len(nodes) + 1), list(nodes))


class DEIS(ExponentialMultistep):
    """DEIS, the multistep exponential integrator of Zhang & Chen (2023), in log-rho.

    With ``rho = sigma/alpha = e^{-lambda}`` the probability-flow ODE is
    ``d(x/alpha)/d rho = eps``. DEIS fits ``eps`` by the Lagrange polynomial in ``log rho``
    through the last ``k`` predictions and integrates it exactly:
    ``x' = (alpha'/alpha) x + alpha' rho sum_j c_j eps_j`` with
    ``c_j = int_0^{-h} L_j(v) e^v dv`` on the nodes ``v_j = lambda - lambda_j`` (``v_0 = 0``),
    ``h = lambda' - lambda``. Zhang & Chen (2023), "Fast Sampling of Diffusion Models with
    Exponential Integrator" (ICLR): the multistep (Adams-Bashforth) DEIS, with the log-rho time
    that diffusers' ``DEISMultistepScheduler(solver_type="logrho")`` uses; equal to it step for step.

    Order ``k = solver_order`` per step (1..3, default 2); 1 NFE per step. The usual warmup
    (orders 1, 2, ...) makes order 3 globally second order; ``warmup="singlestep"`` keeps it
    third order at ``k - 1`` extra NFE in each of the first ``k - 1`` steps.
    ``lower_order_final`` (default True): last step first order, the one before at most second,
    when there are fewer than 15 steps (as diffusers).
    """

    name = "deis"
    order = 2
    data_prediction = False
    order_test_options = tuple(dict(o, lower_order_final=False) for o in (
        {"solver_order": 1}, {"solver_order": 2}, {"solver_order": 3}, {"solver_order": 3, "warmup": "singlestep"}))

    @classmethod
    def expected_order(cls, solver_order=2, warmup="multistep", **options):
        """``solver_order``, but 2 for order 3 with the usual (first-order first step) warmup."""
        return solver_order if warmup == "singlestep" else min(solver_order, 2)

    def step(self, i, x):
        p, q = self.grid[i], self.grid[i + 1]
        kind, k = self.plan(i)
        out = self.evaluate(x, p)
        view = self.x0_eps_view(x, out, p)
        if kind == "first":
            return self.first_order(x, out, p, q, view, out_buffer=x)
        keep = self.needs_history(i)
        eps = self.prediction(x, out, p, view) if keep or kind == "singlestep" else None
        if kind == "singlestep":
            x = self.singlestep(x, eps, p, q, k, out_buffer=x)
        else:  # eps_0 is folded as a1 x + b1 term; the older eps_j are materialised
            c = deis_coefficients(q.lam - p.lam, [p.lam - self.grid[i - j].lam for j in range(1, k)])
            scale = q.alpha * p.sigma / p.alpha
            term, _, (a1, b1) = view
            past = [self.history[i - j] for j in range(1, k)]
            coefs = [q.alpha / p.alpha + scale * c[0] * a1, scale * c[0] * b1] + [scale * cj for cj in c[1:]]
            x = self.update(x, [term] + past, coefs, out=x)
        if keep:
            self.remember(i, eps)
        return x
