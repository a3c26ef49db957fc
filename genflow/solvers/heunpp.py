"""Heun++ (ComfyUI's ``sample_heunpp2``, from Carzit's sd-webui-samplers-scheduler)."""
from genflow.solvers.base import Solver

__all__ = ["HeunPP2"]


class HeunPP2(Solver):
    """Heun++ "test2": Euler predictors to the next two grid levels and a level-weighted average
    of the three slopes, on the probability-flow ODE ``dx/dt = d(x, t)`` (``d`` the velocity; in
    EDM's time, k-diffusion's ``(x - D)/sigma``).

    With ``h = t_{i+1} - t_i``, ``x_2 = x + h d``, ``d_2 = d(x_2, t_{i+1})``,
    ``x_3 = x_2 + (t_{i+2} - t_{i+1}) d_2``, ``d_3 = d(x_3, t_{i+2})``:
    ``x' = x + h (w_1 d + w_2 d_2 + w_3 d_3)`` with ``w_2 = s_{i+1}/(3 s_0)``, ``w_3 = s_{i+2}/(3 s_0)``,
    ``w_1 = 1 - w_2 - w_3`` (``s = sigma/alpha`` the noise level, ``s_0`` the first level of the
    grid). The second-to-last step uses ``d`` and ``d_2`` only, with ``w_2 = s_{i+1}/(2 s_0)``; the
    last step is Euler. The weights do not shrink with the step, so the method is first order
    (consistent, ``sum w = 1``); 3 NFE per step (2 and 1 on the last two).
    """

    name = "heunpp2"
    nfe_per_step = 3
    # Its early steps are nearly Heun (w ~ 1/2 where s ~ s_0), so over 10-80 steps the fitted order is
    # 0.5-0.85 and reaches 1 only beyond 160 steps; tests/solvers/test_zoo.py checks it there instead
    # of the registry's 10-80-step order test.
    order_test_options = ()

    @classmethod
    def nfe(cls, steps: int) -> int:
        return 1 if steps == 1 else 3 * steps - 3

    def weight(self, j):
        """``s_j / s_0`` at grid point ``j`` (per sample for per-sample grids)."""
        first, p = self.grid[0], self.grid[j]
        return p.sigma * first.alpha / (p.alpha * first.sigma)

    def slope(self, x, p):
        """``(term, a, b)`` with the velocity ``a x + b term`` at ``p`` (one NFE)."""
        out, [(a, b)] = self.views(x, self.evaluate(x, p), p, "velocity")
        return out, a, b

    def euler(self, x, slope, h, out=None):
        term, a, b = slope
        return self.update(x, [term], [1 + h * a, h * b], out=out)

    def step(self, i, x):
        last = len(self.grid) - 1
        p, q = self.grid[i], self.grid[i + 1]
        h = q.t - p.t
        first = self.slope(x, p)
        if i + 1 == last:
            return self.euler(x, first, h, out=x)
        x_2 = self.euler(x, first, h)
        term2, a2, b2 = self.slope(x_2, q)
        # the Euler predictors carry the earlier slopes: h d = x_2 - x, (t_{i+2} - t_{i+1}) d_2 = x_3 - x_2
        if i + 2 == last:
            w2 = self.weight(i + 1) / 2
            w1 = 1 - w2
            return self.update(x, [x_2, term2], [1 - w1, w1 + h * w2 * a2, h * w2 * b2], out=x)
        r = self.grid[i + 2]
        h2 = r.t - q.t
        x_3 = self.update(x_2, [term2], [1 + h2 * a2, h2 * b2])
        term3, a3, b3 = self.slope(x_3, r)
        w2, w3 = self.weight(i + 1) / 3, self.weight(i + 2) / 3
        w1 = 1 - w2 - w3
        c2 = h * w2 / h2
        return self.update(x, [x_2, x_3, term3], [1 - w1, w1 - c2, c2 + h * w3 * a3, h * w3 * b3], out=x)
