"""Classical ODE methods for the probability-flow ODE: explicit midpoint, RK4, linear multistep.

``midpoint`` and ``rk4`` integrate ``dx/dt = velocity(x, t)`` in the process time ``t`` (like
``euler`` and ``heun``). ``lms`` integrates k-diffusion's form of the same ODE,
``dy/ds = eps(x, t)`` in the scaled variables ``y = x / alpha`` and ``s = sigma / alpha =
exp(-lambda)`` (Karras et al. 2022, eq. 4 with ``s(t) = alpha``; for ``gf.EDM`` ``y = x`` and
``s = t``), where ``eps`` is piecewise smooth in ``s`` and the peers' coefficient tables live.
Stage points and coefficient tables are computed once per solve, in float64.
"""
import torch

from genflow.solvers.base import Solver, _table, where

__all__ = ["Midpoint", "RK4", "LMS"]


def _rows(col: torch.Tensor) -> list:
    """Per-step values of a ``[N]`` (floats/bools) or ``[N, B]`` (``[B]`` tensors) table."""
    return col.tolist() if col.dim() == 1 else list(col.unbind(0))


class _VelocitySolver(Solver):
    """Shared: the probability-flow velocity of a model output, through ``x0_view``."""

    def velocity_view(self, x, out, p):
        """``(term, a, b)`` with ``velocity(x, p.t) = a x + b term`` (thresholding applied to x0)."""
        if self.threshold is None:
            a, b = self.coef("velocity", p)
            return out, a, b
        term, a0, b0 = self.x0_view(x, out, p)
        # velocity = alpha' x0 + sigma' eps = (sigma'/sigma) x + (alpha' - sigma' alpha/sigma) x0
        ax, a_x0 = p.dsigma / p.sigma, p.dalpha - p.dsigma * p.alpha / p.sigma
        return term, ax + a_x0 * a0, a_x0 * b0

    def stage(self, x, p):
        """One model evaluation at ``(x, p)`` as a velocity view."""
        return self.velocity_view(x, self.evaluate(x, p), p)


class Midpoint(_VelocitySolver):
    """The explicit midpoint method on the probability-flow ODE ``dx/dt = velocity(x, t)``.

    ``x_m = x + h/2 velocity(x, t)``, ``x' = x + h velocity(x_m, t + h/2)`` with ``h = t' - t``
    (Hairer, Nørsett & Wanner, *Solving ODEs I*, §II.1, eq. 1.7). Order 2, 2 NFE per step;
    the model is never evaluated at ``t'``, so a last step to ``sigma = 0`` needs no special case.
    """

    name = "midpoint"
    order = 2
    nfe_per_step = 2

    def __init__(self, model, ts, **kwargs):
        super().__init__(model, ts, **kwargs)
        self.mid = _table(self.process, ts[:-1] + 0.5 * (ts[1:] - ts[:-1]))

    def step(self, i, x):
        p, m = self.grid[i], self.mid[i]
        h = self.grid[i + 1].t - p.t
        out, a, b = self.stage(x, p)
        x_mid = self.update(x, [out], [1 + h / 2 * a, h / 2 * b])
        out, a, b = self.stage(x_mid, m)
        return self.update(x, [x_mid, out], [1.0, h * a, h * b], out=x)


class RK4(_VelocitySolver):
    """The classic fourth-order Runge–Kutta method on ``dx/dt = velocity(x, t)``.

    ``k1 = v(x, t)``, ``k2 = v(x + h/2 k1, t + h/2)``, ``k3 = v(x + h/2 k2, t + h/2)``,
    ``k4 = v(x + h k3, t')``, ``x' = x + h/6 (k1 + 2 k2 + 2 k3 + k4)`` (Kutta 1901; Hairer,
    Nørsett & Wanner, *Solving ODEs I*, Table II.1.2). Written in the stage states
    ``x2, x3, x4`` (``h k1 = 2 (x2 - x)`` ...) so the final combination is one fused update.
    Order 4, 4 NFE per step. A step ending where ``sigma = 0`` (velocity undefined there)
    replaces the last stage by Ralston's third-order stage ``k3' = v(x + 3h/4 k2, t + 3h/4)``,
    ``x' = x + h (2 k1 + 3 k2 + 4 k3') / 9`` (Ralston 1962), which keeps the global order 4.
    """

    name = "rk4"
    order = 4
    nfe_per_step = 4

    def __init__(self, model, ts, **kwargs):
        super().__init__(model, ts, **kwargs)
        h = ts[1:] - ts[:-1]
        zero = self.process.sigma(ts[1:]) == 0
        self.mid = _table(self.process, ts[:-1] + 0.5 * h)
        self.last = _table(self.process, torch.where(zero, ts[:-1] + 0.75 * h, ts[1:]))
        self.full = _rows(~zero)  # True: classic RK4; False: Ralston's third stage

    def step(self, i, x):
        p, m, r, full = self.grid[i], self.mid[i], self.last[i], self.full[i]
        h = self.grid[i + 1].t - p.t
        out, a, b = self.stage(x, p)
        x2 = self.update(x, [out], [1 + h / 2 * a, h / 2 * b])
        out, a, b = self.stage(x2, m)
        x3 = self.update(x, [x2, out], [1.0, h / 2 * a, h / 2 * b])
        out, a, b = self.stage(x3, m)
        # x4 = x + h k3 (RK4), or x + 3h/4 k2 = x + 3/2 (x3 - x) (Ralston)
        w, hk = where(full, 0.0, 1.5), where(full, h, 0.0)
        x4 = self.update(x, [x3, out], [1 - w, w + hk * a, hk * b])
        out, a, b = self.stage(x4, r)
        coefs = [where(full, -1 / 3, -1 / 9), where(full, 1 / 3, 4 / 9), 2 / 3,
                 where(full, 1 / 3 + h / 6 * a, 4 / 9 * h * a), where(full, h / 6 * b, 4 / 9 * h * b)]
        return self.update(x, [x2, x3, x4, out], coefs, out=x)


_LMS_COEFS = {}  # (id(process), id(ts), ts._version, order) -> (process, ts, coefficient rows)


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
        key = (id(self.process), id(ts), ts._version, order)
        hit = _LMS_COEFS.get(key)
        if hit is not None and hit[0] is self.process and hit[1] is ts:
            self.coefs = hit[2]
        else:
            self.coefs = self._coefficients(ts, order)
            if len(_LMS_COEFS) >= 64:
                _LMS_COEFS.clear()
            _LMS_COEFS[key] = (self.process, ts, self.coefs)
        self.history = []  # eps of earlier steps, newest first

    def _coefficients(self, ts, order):
        """Per-step ``[c_x, c_x0, c_eps_-1, ...]`` rows (cached per grid tensor and order: the
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
            coefs.append(_rows(torch.stack(row)))
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
