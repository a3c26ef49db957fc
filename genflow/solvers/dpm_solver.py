"""DPM-Solver family: exponential integrators in log-SNR time (seed 001 §6.5.4)."""
from genflow.solvers.base import Solver, expm1, where


class DPMSolverPP2M(Solver):
    """DPM-Solver++(2M), the multistep second-order data-prediction solver.

    Lu et al. (2022b), Algorithm 2: with ``h = lambda' - lambda`` and ``r = h_prev / h``,
    ``x' = (sigma'/sigma) x - alpha' expm1(-h) [(1 + 1/(2r)) x0 - 1/(2r) x0_prev]``.
    The first step, and any step ending at ``sigma' = 0``, is first order (DDIM). Order 2,
    1 NFE per step.
    """

    name = "dpmpp_2m"
    order = 2

    def __init__(self, model, ts, **kwargs):
        super().__init__(model, ts, **kwargs)
        self.x0_prev = None
        self.h_prev = None

    def step(self, i, x):
        p, q = self.grid[i], self.grid[i + 1]
        h = q.lam - p.lam
        out = self.evaluate(x, p)
        out, a0, b0 = self.x0_view(x, out, p)
        c = -q.alpha * expm1(-h)
        cx = q.sigma / p.sigma
        last = i + 1 == len(self.grid) - 1
        x0 = None if last else (out if (a0, b0) == (0.0, 1.0) else self.update(x, [out], [a0, b0]))
        if self.x0_prev is None:
            x = self.update(x, [out], [cx + c * a0, c * b0], out=x)
        else:
            r = self.h_prev / h  # h = inf (sigma' = 0) gives r = 0: fall back to first order
            c1 = where(r > 0, c * (1 + 0.5 / where(r > 0, r, 1.0)), c)
            c2 = where(r > 0, -c * 0.5 / where(r > 0, r, 1.0), 0.0)
            x = self.update(x, [out, self.x0_prev], [cx + c1 * a0, c1 * b0, c2], out=x)
        self.x0_prev, self.h_prev = x0, h
        return x
