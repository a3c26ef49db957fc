"""Restart sampling (Xu et al. 2023, "Restart Sampling for Improving Generative Processes")."""
import math

import torch

from genflow._checks import check_int, check_real
from genflow.noise import BrownianTreeNoise
from genflow.schedules import time_grid
from genflow.solvers.base import sqrt, table
from genflow.solvers.euler import Heun

__all__ = ["Restart", "check_restart_intervals"]

# Xu et al. (2023): the example restart_info of the authors' EDM code (with its default of 18 main Heun
# steps), {"0": [3, 2, 0.06, 0.30]}: N_restart = 3 steps, K = 2 restarts on [0.06, 0.30]
EDM_RESTART_INTERVALS = ((3, 2, 0.06, 0.30),)


def check_restart_intervals(intervals) -> tuple:
    """``intervals`` as a tuple of ``(n_restart, K, t_min, t_max)`` (ints >= 1, ``0 < t_min < t_max``)."""
    if isinstance(intervals, (str, bytes)) or not hasattr(intervals, "__iter__"):
        raise TypeError(f"restart_intervals must be a sequence of (n_restart, K, t_min, t_max), got {intervals!r}")
    checked = []
    for entry in intervals:
        if isinstance(entry, (str, bytes)) or not hasattr(entry, "__len__") or len(entry) != 4:
            raise ValueError(f"each restart interval must be (n_restart, K, t_min, t_max), got {entry!r}")
        n, k = check_int("n_restart", entry[0], low=1), check_int("K", entry[1], low=1)
        t_min = check_real("t_min", entry[2], low=0.0, low_open=True)
        t_max = check_real("t_max", entry[3], low=0.0, low_open=True)
        if not t_min < t_max:
            raise ValueError(f"restart intervals need t_min < t_max, got t_min={t_min}, t_max={t_max}")
        checked.append((n, k, t_min, t_max))
    return tuple(checked)


class Restart(Heun):
    """Restart sampling (Xu et al. 2023, Algorithm 1) on Heun's probability-flow ODE steps.

    The main backward process is Heun (EDM's Algorithm 1 without churn). For each restart interval
    ``(N_restart, K, t_min, t_max)`` (noise levels ``s = sigma/alpha``, EDM's time), the step that
    ends at the main-grid level nearest ``t_min`` is followed ``K`` times by a forward jump to
    ``t_max`` and ``N_restart`` Heun steps back on a Karras (``rho = 7``) grid from ``t_max`` to that
    level (never a level 0). The jump is the forward process's exact transition,
    ``x <- (alpha_max/alpha_min) x + alpha_max sqrt(s_max^2 - s_min^2) z`` (``x + sqrt(t_max^2 -
    t_min^2) z`` under EDM, Algorithm 1's restart forward step). Default ``restart_intervals``: the
    authors' EDM example ``[(3, 2, 0.06, 0.30)]`` (for 18 main steps; their Tables 3 and 5 list
    more). Intervals outside the solve (``t_max`` above the starting level or ``t_min`` below the
    final one) are not applied. Order 2 between the
    restarts; ``2 steps + sum_i 2 K_i N_restart,i`` NFE (at most). One time grid for the batch.
    """

    name = "restart"
    stochastic = True

    def __init__(self, model, ts, *, restart_intervals=EDM_RESTART_INTERVALS, **kwargs):
        intervals = check_restart_intervals(restart_intervals)
        super().__init__(model, ts, **kwargs)
        if ts.dim() != 1:
            raise ValueError("restart needs one time grid shared by the batch, got per-sample times")
        if isinstance(self.noise, BrownianTreeNoise):
            raise ValueError("restart needs independent noise for each restart (its K jumps cover the same "
                             "interval); use noise='philox' or a noise_sampler")
        self.restarts = {}  # main step index -> [(K, jump coefficients, restart grid)]
        levels = [p.sigma / p.alpha if p.alpha > 0 else math.inf for p in self.grid]
        for n, k, t_min, t_max in intervals:
            if not (levels[-1] <= t_min and t_max <= levels[0]):
                continue
            end = min((j for j in range(1, len(levels)) if levels[j] > 0), key=lambda j: abs(levels[j] - t_min))
            if not levels[end] < t_max:
                continue
            t_top = float(self.process.t_from_log_snr(torch.tensor(-math.log(t_max), dtype=torch.float64)))
            sub = table(self.process, time_grid(self.process, n, "karras", t_top, float(ts[end]))).copy()
            low, top = self.grid[end], sub[0]
            sub[-1] = low  # the level reached by the main step, exactly
            spread = (top.sigma / top.alpha) ** 2 - (low.sigma / low.alpha) ** 2
            jump = (top.alpha / low.alpha, top.alpha * sqrt(spread))
            self.restarts.setdefault(end - 1, []).append((k, jump, sub))

    @classmethod
    def nfe(cls, steps: int, *, restart_intervals=EDM_RESTART_INTERVALS, **options) -> int:
        return 2 * steps + sum(2 * k * n for n, k, _, _ in check_restart_intervals(restart_intervals))

    def heun(self, x, p, q):
        """One Heun step from ``p`` to ``q`` (points off the main grid; ``q.sigma > 0``), in place."""
        h = q.t - p.t
        out, [(a, b)] = self.views(x, self.evaluate(x, p), p, "velocity")
        x_euler = self.update(x, [out], [1 + h * a, h * b])
        out2, [(a2, b2)] = self.views(x_euler, self.evaluate(x_euler, q), q, "velocity")
        return self.update(x, [out, x_euler, out2], [1 + h * a / 2, h * b / 2, h * a2 / 2, h * b2 / 2], out=x)

    def step(self, i, x):
        x = super().step(i, x)
        for k, (scale, noise_scale), sub in self.restarts.get(i, ()):
            for _ in range(k):
                x = self.update(x, [], [scale], noise_scale, out=x, noise_at=(sub[-1].sigma, sub[0].sigma))
                for j in range(len(sub) - 1):
                    x = self.heun(x, sub[j], sub[j + 1])
        return x
