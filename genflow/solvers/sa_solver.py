"""SA-Solver: the stochastic Adams predictor-corrector solver of Xue et al. (2023)."""
import numpy as np
import torch

from genflow.solvers.base import Solver, exp, expm1, sqrt, where

__all__ = ["SASolver", "sa_coefficients"]

_NODES, _WEIGHTS = (torch.from_numpy(a) for a in np.polynomial.legendre.leggauss(32))


def sa_coefficients(lam, lam_next, nodes, tau):
    """``[b_j / alpha']``: ``int_lam^lam' (1 + tau^2) e^{-(1 + tau^2)(lam' - v)} L_j(v) dv`` for the
    Lagrange basis ``L_j`` of the log-SNR ``nodes`` (Xue et al. 2023, eqs. 15 and 18), by 32-point
    Gauss–Legendre (exact to rounding for these smooth integrands). Floats or [B] float64 tensors."""
    scalar = not any(isinstance(v, torch.Tensor) for v in (lam, lam_next, tau, *nodes))
    as64 = lambda v: torch.as_tensor(v, dtype=torch.float64).unsqueeze(-1)
    lo, hi, rate = as64(lam), as64(lam_next), 1 + as64(tau) ** 2
    v = (hi + lo) / 2 + (hi - lo) / 2 * _NODES
    kernel = (hi - lo) / 2 * _WEIGHTS * rate * torch.exp(-rate * (hi - v))
    nodes = [as64(n) for n in nodes]
    out = []
    for j, nj in enumerate(nodes):
        basis = torch.ones_like(v)
        for k, nk in enumerate(nodes):
            if k != j:
                basis = basis * (v - nk) / (nj - nk)
        b = (kernel * basis).sum(-1)
        out.append(b.item() if scalar else b)
    return out


class SASolver(Solver):
    """SA-Solver (Xue et al. 2023, "SA-Solver: Stochastic Adams Solver for Fast Sampling of Diffusion
    Models", Algorithm 1 in data prediction), as ComfyUI's ``sample_sa_solver`` (PEC mode).

    Predictor (SA-Predictor, eq. 15), with ``h = lambda' - lambda`` and ``tau = tau(t')``:
    ``x' = (sigma'/sigma) e^{-tau^2 h} x + sum_j b_j x0_{i-j} + sigma' sqrt(1 - e^{-2 tau^2 h}) z``,
    ``b_j = alpha' sa_coefficients(...)_j`` over the last ``predictor_order`` log-SNRs. Corrector
    (SA-Corrector, eq. 18): once the model is evaluated at ``x'`` (the next step's evaluation, so
    1 NFE per step), the step is redone with the nodes ``lambda_{i-c+2} .. lambda'`` (``c =
    corrector_order``, the new data prediction included) and the same noise, i.e.
    ``x' += sum_j (b^c_j - b^p_j) x0_j``. Orders grow while the history fills; the final step is not
    corrected, and a step to ``sigma' = 0`` returns ``alpha' x0`` (ComfyUI also lowers the orders of
    the last steps of a grid ending at ``sigma = 0``; genflow does not).

    Options: ``predictor_order`` 1..3 (default 3), ``corrector_order`` 0..4 (default 4; 0: no
    corrector), ``eta`` (the tau value, default 1) applied where ``tau_interval[0] T <= t' <=
    tau_interval[1] T`` (default ``(0.2, 0.8)``: ComfyUI's 20%..80% and diffusers' ``200 <= t <= 800``),
    else ``tau = 0`` (the ODE). With ``eta = 0`` the global order is ``min(p + 1, c, 3)``: the
    corrected first step bounds it (``expected_order``). Weak order 1 with noise.
    """

    name = "sa_solver"
    order = 3
    stochastic = True
    default_eta = 1.0
    order_test_options = ({"predictor_order": 1, "corrector_order": 0}, {"predictor_order": 2, "corrector_order": 0},
                          {"predictor_order": 1, "corrector_order": 2}, {"predictor_order": 2, "corrector_order": 3})
    # The default (3, 4) and (3, 3) are pre-asymptotic at the order test's 10..80 steps (local slopes
    # 3.7, 3.5, 3.2, then 3.06, 3.02 to 320 steps): tests/solvers/test_sa_solver.py checks that they
    # settle at 3 between 160 and 320 steps.

    @classmethod
    def expected_order(cls, *, predictor_order=3, corrector_order=4, **options) -> int:
        if corrector_order == 0:
            return min(predictor_order, 2)
        return min(predictor_order + 1, corrector_order, 3)

    def __init__(self, model, ts, *, predictor_order: int = 3, corrector_order: int = 4, tau_interval=(0.2, 0.8),
                 **kwargs):
        super().__init__(model, ts, **kwargs)
        for name, value, low, high in (("predictor_order", predictor_order, 1, 3), ("corrector_order", corrector_order, 0, 4)):
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"{name} must be an int in {low}..{high}, got {value!r}")
        if not (isinstance(tau_interval, (tuple, list)) and len(tau_interval) == 2
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in tau_interval)
                and 0.0 <= tau_interval[0] <= tau_interval[1] <= 1.0):
            raise ValueError(f"tau_interval must be a pair 0 <= lo <= hi <= 1, got {tau_interval!r}")
        if bool(torch.as_tensor(self.grid[0].alpha == 0).any()):
            raise ValueError("sa_solver needs alpha > 0 at the start (finite log-SNR); start at t_start < T")
        self.predictor_order, self.corrector_order = predictor_order, corrector_order
        self.tau_range = (tau_interval[0] * self.process.T, tau_interval[1] * self.process.T)
        self.history = []  # (lambda, x0) at the previous grid points, newest first
        self.pending = None  # the predictor coefficients of the last step, until the corrector redoes it
        # the predictor's and the corrector's coefficients of every step, on the host once per solve: a
        # step reads numbers (traceable by torch.compile)
        self.predictor_coefficients = [self._predictor(i) for i in range(len(self.grid) - 1)]
        self.corrector_coefficients = [self._corrector(i) for i in range(len(self.grid) - 1)]

    def _nodes(self, i, count):
        """The log-SNRs of grid points ``i, i - 1, ...`` the history holds at step ``i`` (at most ``count``)."""
        return [self.grid[j].lam for j in range(i, max(i - min(count, 4), -1), -1)]

    def _predictor(self, i):
        """``alpha' b_j`` of the SA-Predictor of step ``i`` (None for a step to sigma' = 0)."""
        p, q = self.grid[i], self.grid[i + 1]
        if not isinstance(q.sigma, torch.Tensor) and q.sigma == 0:
            return None
        nodes = self._nodes(i, self.predictor_order)
        return [q.alpha * bj for bj in sa_coefficients(p.lam, q.lam, nodes, self.tau(q.t))]

    def _corrector(self, i):
        """``alpha b^c_j`` of the SA-Corrector of the step ``i - 1 -> i``, run at step ``i``."""
        if i == 0 or self.corrector_order == 0:
            return None
        start, p = self.grid[i - 1], self.grid[i]
        return [p.alpha * bj for bj in sa_coefficients(start.lam, p.lam, self._nodes(i, self.corrector_order),
                                                       self.tau(p.t))]

    def tau(self, t):
        inside = (t >= self.tau_range[0]) & (t <= self.tau_range[1]) if isinstance(t, torch.Tensor) else \
            self.tau_range[0] <= t <= self.tau_range[1]
        return where(inside, self.eta, 0.0) if self.eta > 0 else 0.0

    def step(self, i, x):
        p, q = self.grid[i], self.grid[i + 1]
        term, a, b = self.x0_view(x, self.evaluate(x, p), p)
        identity = not isinstance(a, torch.Tensor) and (a, b) == (0.0, 1.0)
        x0 = term if identity else self.update(x, [term], [a, b])
        self.history = ([(p.lam, x0)] + self.history)[:4]  # predictor_order + 1 and corrector_order are <= 4
        if self.pending is not None and self.corrector_order > 0:  # SA-Corrector of the step i-1 -> i
            predicted = self.pending
            coefs = {j: cj for j, cj in enumerate(self.corrector_coefficients[i])}
            for j, bj in enumerate(predicted):  # the predictor's nodes are history[1:]
                coefs[j + 1] = coefs.get(j + 1, 0.0) - bj
            order = sorted(coefs)
            x = self.update(x, [self.history[j][1] for j in order], [1.0] + [coefs[j] for j in order], out=x)
        self.pending = None
        if not isinstance(q.sigma, torch.Tensor) and q.sigma == 0:
            return self.update(x, [x0], [0.0, q.alpha], out=x)
        tau = self.tau(q.t)
        h = q.lam - p.lam
        predicted = self.predictor_coefficients[i]
        k = len(predicted)
        noise = 0.0
        if self.eta > 0:  # drawn on every step, also where tau = 0, so per-sample grids stay batch-invariant
            noise = q.sigma * sqrt(-expm1(-2 * tau ** 2 * h))
            if not isinstance(noise, torch.Tensor):
                noise = torch.full((x.shape[0],), noise, dtype=torch.float64)
        self.pending = predicted
        return self.update(x, [x0 for _, x0 in self.history[:k]], [q.sigma / p.sigma * exp(-tau ** 2 * h)] + predicted,
                           noise, out=x, noise_at=(p.sigma, q.sigma))
