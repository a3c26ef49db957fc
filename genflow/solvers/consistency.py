"""Multistep consistency sampling: LCM (Luo et al. 2023) and TCD (Zheng et al. 2024).

For a consistency-distilled model the data prediction ``x0(x, t)`` is the consistency function;
for any other model these samplers act on its ``x0`` prediction the same way.
"""

from genflow._checks import check_real
from genflow.solvers.base import Solver, sqrt, table, where

__all__ = ["LCM", "TCD"]


class TCD(Solver):
    """Trajectory Consistency Distillation's strategic stochastic sampling (Zheng et al. 2024,
    "Trajectory Consistency Distillation", §4.3, eq. 15) with the stochasticity ``gamma``.

    From ``x`` at ``t`` to ``t'``: the model's ``x0`` and ``eps = (x - alpha x0)/sigma`` give the
    DDIM state at the intermediate time ``s = (1 - gamma) t'``, ``x_s = alpha_s x0 + sigma_s eps``,
    which the forward process carries to ``t'``:
    ``x' = (alpha'/alpha_s) x_s + alpha' sqrt(r'^2 - r_s^2) z`` (``r = sigma/alpha``; for VP
    ``sqrt(1 - abar'/abar_s) z``). ``gamma = 0`` is DDIM (deterministic), ``gamma = 1`` is LCM's
    multistep sampling. Default ``gamma = 0.3`` (the paper's recommended setting, diffusers'
    ``TCDScheduler`` ``eta``). Order 1, 1 NFE per step; a step to ``sigma' = 0`` returns
    ``alpha' x0`` when ``s = 0``.
    """

    name = "tcd"
    stochastic = True
    default_gamma = 0.3

    def __init__(self, model, ts, *, gamma=None, **kwargs):
        super().__init__(model, ts, **kwargs)
        self.gamma = self.default_gamma if gamma is None else check_real("gamma", gamma, low=0.0, high=1.0)
        # the intermediate points s = (1 - gamma) t' of every step, in one table
        self.intermediate = self.grid[1:] if self.gamma == 0 else table(self.process, (1 - self.gamma) * ts[1:])

    def step(self, i, x):
        p, q, s = self.grid[i], self.grid[i + 1], self.intermediate[i]
        r_s = s.sigma / s.alpha
        # x' = (alpha'/alpha_s)(alpha_s x0 + sigma_s (x - alpha x0)/sigma) + noise
        cx = q.alpha * r_s / p.sigma
        c0 = q.alpha * (1 - r_s * p.alpha / p.sigma)
        spread = (q.sigma / q.alpha) ** 2 - r_s ** 2
        noise = q.alpha * sqrt(where(spread > 0, spread, 0.0))
        term, a0, b0 = self.x0_view(x, self.evaluate(x, p), p)
        return self.update(x, [term], [cx + c0 * a0, c0 * b0], noise, out=x, noise_at=(p.sigma, q.sigma))


class LCM(TCD):
    """Latent Consistency Models' multistep sampling (Luo et al. 2023, "Latent Consistency
    Models", Algorithm 1; Song et al. 2023, "Consistency Models", Algorithm 1).

    ``x' = alpha' x0(x, t) + sigma' z``: the data prediction, re-noised to the next level with fresh
    noise (``tcd`` with ``gamma = 1``). 1 NFE per step; the last step (``sigma' = 0``) returns
    ``alpha' x0``.
    """

    name = "lcm"
    default_gamma = 1.0

    def __init__(self, model, ts, **kwargs):
        if "gamma" in kwargs:
            raise ValueError(f"lcm takes no gamma (it is tcd with gamma=1), got gamma={kwargs['gamma']!r}")
        super().__init__(model, ts, **kwargs)

    def step(self, i, x):
        p, q = self.grid[i], self.grid[i + 1]
        term, a0, b0 = self.x0_view(x, self.evaluate(x, p), p)
        return self.update(x, [term], [q.alpha * a0, q.alpha * b0], q.sigma, out=x, noise_at=(p.sigma, q.sigma))
