"""Classical ODE methods for the probability-flow ODE: explicit midpoint, RK4, linear multistep.

``midpoint`` and ``rk4`` integrate ``dx/dt = velocity(x, t)`` in the process time ``t`` (like
``euler`` and ``heun``). ``lms`` integrates k-diffusion's form of the same ODE,
``dy/ds = eps(x, t)`` in the scaled variables ``y = x / alpha`` and ``s = sigma / alpha =
exp(-lambda)`` (Karras et al. 2022, eq. 4 with ``s(t) = alpha``; for ``gf.EDM`` ``y = x`` and
``s = t``), where ``eps`` is piecewise smooth in ``s`` and the peers' coefficient tables live.
Stage points and coefficient tables are computed once per solve, in float64.
"""
import torch

from genflow._cache import LRU
from genflow.engine.rk import RungeKutta
from genflow.engine.tableau import MIDPOINT, ButcherTableau
from genflow.engine.tableau import RK4 as RK4_TABLEAU
from genflow.models import conversion
from genflow.ops.fused_update import use_kernel
from genflow.solvers.base import Point, Solver, point, step_values

__all__ = ["Midpoint", "RK4", "RK4_RALSTON_END", "LMS"]


# RK4 with its last stage moved off t' (where sigma = 0 and the velocity is undefined): Ralston's
# third-order stage k4 = v(x + 3h/4 k2, t + 3h/4), x' = x + h (2 k1 + 3 k2 + 4 k4) / 9 (Ralston 1962);
# RK4's third stage is still evaluated (weight 0) so that every step costs 4 NFE.
RK4_RALSTON_END = ButcherTableau("rk4_ralston_end", 3, (0.0, 0.5, 0.5, 0.75),
                                 ((), (0.5,), (0.0, 0.5), (0.0, 0.75, 0.0)), (2 / 9, 1 / 3, 0.0, 4 / 9),
                                 reference="Ralston 1962, Runge-Kutta methods with minimum error bounds")


class _TableauSolver(Solver):
    """A Butcher tableau on the probability-flow ODE ``dx/dt = velocity(x, t)``, run by the
    engine (``genflow.engine.rk``) with the velocity as a linear view ``alpha x + beta out`` of
    the network output ``out`` (the conversion folded into the stage coefficients; with
    thresholding ``out`` is the thresholded data prediction). A step runs ``tableau``, or for
    the samples ``use_alternative`` marks, ``alternative``; the views' coefficients at every
    stage time are computed once per solve."""

    tableau: ButcherTableau
    alternative = None

    def __init__(self, model, ts, **kwargs):
        super().__init__(model, ts, **kwargs)
        self.switch = self.use_alternative(ts)
        h = ts[1:] - ts[:-1]
        self.coefficients = []
        c = torch.tensor(self.tableau.c, dtype=torch.float64)
        c_alt = c if self.alternative is None else torch.tensor(self.alternative.c, dtype=torch.float64)
        with torch.no_grad():
            for i, switch in enumerate(self.switch):
                if ts.dim() == 1:
                    times = ts[i] + (c_alt if switch else c) * h[i]
                else:
                    mask = torch.as_tensor(switch).expand(ts.shape[1])
                    stage_c = torch.where(mask[None, :], c_alt[:, None], c[:, None])
                    times = ts[i][None, :] + stage_c * h[i][None, :]
                alpha, beta = self.velocity_view(times.to(torch.float64))
                self.coefficients.append((alpha.tolist(), beta.tolist()) if ts.dim() == 1 else (alpha, beta))
        self._engine = None

    def use_alternative(self, ts):
        """Per step: False, True or a bool [B] mask of the samples that run ``alternative``."""
        return [False] * (ts.shape[0] - 1)

    def velocity_view(self, t):
        """``(alpha, beta)`` with ``velocity(x, t) = alpha x + beta term`` (float64, t's shape)."""
        pr = self.process
        alpha, sigma, dalpha, dsigma = (v.to(torch.float64) for v in (pr.alpha(t), pr.sigma(t), pr.dalpha(t),
                                                                      pr.dsigma(t)))
        if self.threshold is None:
            a, b = conversion(self.model.prediction, "velocity", alpha, sigma, dalpha, dsigma)
            return torch.as_tensor(a, dtype=torch.float64).expand(t.shape), torch.as_tensor(
                b, dtype=torch.float64).expand(t.shape)
        # velocity = alpha' x0 + sigma' eps = (sigma'/sigma) x + (alpha' - sigma' alpha/sigma) x0
        return dsigma / sigma, dalpha - dsigma * alpha / sigma

    def term(self, x, t):
        """One model evaluation at ``(x, t)``: the raw output, or the thresholded data prediction."""
        p = point(self.process, t) if self.threshold is not None else Point(t, *([None] * 7))
        out = self.evaluate(x, p)
        if self.threshold is None:
            return out
        term, _, _ = self.x0_view(x, out, p)
        return term

    def step(self, i, x):
        if self._engine is None:
            self._engine = RungeKutta(self.tableau, self.term, linear=True, kernel=use_kernel(self.backend, x.device),
                                      alternative=self.alternative)
        engine = self._engine
        engine.nonfinite, engine.step_index = self.nonfinite, self.step_index
        t, t_next = self.grid[i].t, self.grid[i + 1].t
        alpha, beta = self.coefficients[i]
        return engine.step(x, t, t_next - t, alpha=alpha, beta=beta, out=x, use_alternative=self.switch[i])


class Midpoint(_TableauSolver):
    """The explicit midpoint method on the probability-flow ODE ``dx/dt = velocity(x, t)``.

    ``x_m = x + h/2 velocity(x, t)``, ``x' = x + h velocity(x_m, t + h/2)`` with ``h = t' - t``
    (Hairer, Nørsett & Wanner, *Solving ODEs I*, §II.1, eq. 1.7; the ``midpoint`` tableau of
    ``genflow.engine.tableau``). Order 2, 2 NFE per step; the model is never evaluated at ``t'``,
    so a last step to ``sigma = 0`` needs no special case.
    """

    name = "midpoint"
    order = 2
    nfe_per_step = 2
    tableau = MIDPOINT


class RK4(_TableauSolver):
    """The classic fourth-order Runge–Kutta method on ``dx/dt = velocity(x, t)``.

    ``k1 = v(x, t)``, ``k2 = v(x + h/2 k1, t + h/2)``, ``k3 = v(x + h/2 k2, t + h/2)``,
    ``k4 = v(x + h k3, t')``, ``x' = x + h/6 (k1 + 2 k2 + 2 k3 + k4)`` (Kutta 1901; Hairer,
    Nørsett & Wanner, *Solving ODEs I*, Table II.1.2; the ``rk4`` tableau of
    ``genflow.engine.tableau``). Order 4, 4 NFE per step. A step ending where ``sigma = 0``
    (velocity undefined there) runs ``RK4_RALSTON_END``, whose last stage is Ralston's
    third-order stage ``k4 = v(x + 3h/4 k2, t + 3h/4)``, ``x' = x + h (2 k1 + 3 k2 + 4 k4) / 9``
    (Ralston 1962), which keeps the global order 4.
    """

    name = "rk4"
    order = 4
    nfe_per_step = 4
    tableau = RK4_TABLEAU
    alternative = RK4_RALSTON_END

    def use_alternative(self, ts):
        zero = self.process.sigma(ts[1:]) == 0
        if ts.dim() == 1:
            return zero.tolist()
        return [bool(z.all()) if bool(z.all()) or not bool(z.any()) else z for z in zero]


_LMS_COEFS = LRU(64)  # (grid serial, order) -> coefficient rows


def _lms_table(s: torch.Tensor, order: int) -> list:
    """Adams–Bashforth coefficients on the grid ``s`` (``[N+1]`` or ``[N+1, B]``, decreasing).

    Entry ``[i][j]`` is ``int_{s_i}^{s_{i+1}} l_j(u) du`` with ``l_j`` the Lagrange basis
    polynomial of the nodes ``s_i, s_{i-1}, ..., s_{i-K+1}`` (``K = min(order, i + 1)``) that is
    1 at ``s_{i-j}`` — k-diffusion's ``linear_multistep_coeff``, integrated exactly (in the
    shifted variable ``u - s_i``) instead of by quadrature. A node at ``s = inf`` (``alpha = 0``)
    drops out, which is the limit of the interpolant as the node goes to infinity.
    """
    table = []
    for i in range(s.shape[0] - 1):
        K = min(order, i + 1)
        valid = [torch.isfinite(s[i - k]) for k in range(K)]
        d = [torch.where(valid[k], s[i - k] - s[i], 0.0) if k else torch.zeros_like(s[i]) for k in range(K)]
        H = s[i + 1] - s[i]
        row = []
        for j in range(K):
            poly = [torch.ones_like(H)]  # coefficients of u^0, u^1, ...
            for k in range(K):
                if k == j:
                    continue
                den = d[j] - d[k]
                slope = torch.where(valid[k], 1.0 / den, 0.0)
                shift = torch.where(valid[k], -d[k] / den, 1.0)  # a node at infinity: factor 1
                poly = _times_linear(poly, slope, shift)
            integral = sum(c * H ** (m + 1) / (m + 1) for m, c in enumerate(poly))
            row.append(torch.where(valid[j], integral, 0.0))
        table.append(row)
    return table


def _times_linear(poly, slope, shift):
    """Coefficients of ``poly(u) * (slope u + shift)``."""
    out = [shift * c for c in poly] + [torch.zeros_like(poly[0])]
    for m, c in enumerate(poly):
        out[m + 1] = out[m + 1] + slope * c
    return out


class LMS(Solver):
    """k-diffusion's linear multistep sampler (``sample_lms``), for any process.

    In the scaled variables ``y = x / alpha``, ``s = sigma / alpha`` the probability-flow ODE is
    ``dy/ds = eps``; the Adams–Bashforth step is ``y' = y + sum_j c_j eps_{i-j}`` with ``c_j``
    the integral over ``[s, s']`` of the Lagrange basis of the last ``K = min(order, i + 1)``
    nodes (see ``_lms_table``; k-diffusion integrates the same polynomials with
    ``scipy.integrate.quad``). In ``x``: ``x' = (alpha'/alpha) x + alpha' sum_j c_j eps_{i-j}``.
    A step whose only usable node is the current one is Euler in ``(y, s)``, written as DDIM,
    ``x' = (sigma'/sigma) x + alpha' (1 - s'/s) x0``, which stays finite at ``alpha = 0``
    (``s = inf``, e.g. ``LinearPath`` at ``t = 1``, a node that then drops out of later steps).
    On ``gf.EDM`` this is k-diffusion's ``sample_lms`` on the same sigmas; on ``DiscreteVP``
    with integer timesteps it is ``diffusers.LMSDiscreteScheduler`` (whose last step, to
    ``s = 0``, lies outside ``DiscreteVP``). ``order`` (1..4, default 4) is the number of
    nodes; 1 NFE per step. The method starts with lower orders (Euler, then AB2, ...), and that
    start bounds the global order: 1 for ``order=1``, 2 for ``order >= 2`` (see
    ``expected_order``).
    """

    name = "lms"
    order = 2  # the global order with the default order=4 start-up (see expected_order)
    order_test_options = ({"order": 1}, {"order": 2}, {"order": 3}, {"order": 4})

    @classmethod
    def expected_order(cls, *, order=4, **options) -> int:
        return 1 if order == 1 else 2

    def __init__(self, model, ts, *, order: int = 4, **kwargs):
        if isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= 4:
            raise ValueError(f"order must be an int in 1..4, got {order!r}")
        super().__init__(model, ts, **kwargs)
        self.max_order = order
        # the grid's serial stands for the process's parameters and the times' values (solvers.base.table)
        self.coefs = _LMS_COEFS.get_or_compute((self.grid.serial, order), lambda: self._coefficients(ts, order))
        self.history = []  # eps of earlier steps, newest first

    def _coefficients(self, ts, order):
        """Per-step ``[c_x, c_x0, c_eps_-1, ...]`` rows (cached per grid values and order: the
        exact Lagrange integrals cost milliseconds)."""
        with torch.no_grad():
            alpha = self.process.alpha(ts).to(torch.float64)
            sigma = self.process.sigma(ts).to(torch.float64)
        s = sigma / alpha  # inf where alpha = 0
        table = _lms_table(s, order)
        coefs = []
        for i, c in enumerate(table):
            a, sg, a1, sg1 = alpha[i], sigma[i], alpha[i + 1], sigma[i + 1]
            nodes = sum(torch.isfinite(s[i - k]).to(torch.int64) for k in range(len(c)))
            euler = nodes <= 1
            # Euler (DDIM form): x' = (sigma'/sigma) x + alpha' (1 - s'/s) x0
            cx_e, c0_e = sg1 / sg, a1 * (1 - s[i + 1] / s[i])
            # multistep: x' = (alpha'/alpha + alpha' c_0/sigma) x - alpha' c_0 (alpha/sigma) x0 + ...
            cx_m, c0_m = a1 / a + a1 * c[0] / sg, -a1 * c[0] * a / sg
            row = [torch.where(euler, cx_e, cx_m), torch.where(euler, c0_e, c0_m)]
            row += [torch.where(euler, 0.0, a1 * cj) for cj in c[1:]]
            coefs.append(step_values(torch.stack(row)))
        return coefs

    def step(self, i, x):
        p = self.grid[i]
        cx, c0, *past = self.coefs[i]
        out = self.evaluate(x, p)
        term, a0, b0 = self.x0_view(x, out, p)
        new = None
        if self.max_order > 1 and i + 1 < len(self.grid) - 1:
            # eps = (x - alpha x0) / sigma, kept for the next steps
            k = p.alpha / p.sigma
            new = self.update(x, [term], [1 / p.sigma - k * a0, -k * b0])
        x = self.update(x, [term] + self.history[:len(past)], [cx + c0 * a0, c0 * b0] + past, out=x)
        if new is not None:
            self.history = [new] + self.history[:self.max_order - 2]
        return x
