"""SDEs with known solutions for the SDE-scheme tests, and the driver that integrates them through
``gf.solve`` (the one time loop) on a given grid and Brownian motion."""
import torch

import genflow as gf
from genflow.engine import SDE

MU = torch.tensor([0.3, -0.4], dtype=torch.float64)
SIGMA = torch.tensor([0.6, 0.4], dtype=torch.float64)


def integrate(term, y0, ts, solver, *, brownian=None, generator=None, **options):
    """``gf.solve`` of ``term`` from ``y0`` on the grid ``ts`` ([N+1] or [N+1, B])."""
    return gf.solve(term, y0, ts[0] if ts.dim() == 2 else float(ts[0]), ts[-1] if ts.dim() == 2 else float(ts[-1]),
                    ts=ts, solver=solver, brownian=brownian, generator=generator, **options)


def gbm(sde_type="ito"):
    """2-D geometric Brownian motion with diagonal noise, ``dy_i = mu_i y_i dt + sigma_i y_i dW_i``:
    ``y(T) = y0 exp((mu - sigma^2/2) T + sigma W(T))`` (Itô; Stratonovich without ``- sigma^2/2``)."""
    term = SDE(lambda t, y: MU * y, lambda t, y: SIGMA * y, noise="diagonal", sde_type=sde_type)

    def exact(y0, t, w):
        shift = MU - (SIGMA ** 2 / 2 if sde_type == "ito" else 0.0)
        return y0 * torch.exp(shift * t + SIGMA * w)

    return term, exact


def fitted_order(hs, errors) -> float:
    """Least-squares slope of log(error) against log(h)."""
    x = torch.log(torch.tensor(hs, dtype=torch.float64))
    y = torch.log(torch.tensor(errors, dtype=torch.float64))
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / (x * x).sum())


def grid(steps: int, t1: float = 1.0) -> torch.Tensor:
    return torch.linspace(0.0, t1, steps + 1, dtype=torch.float64)


class DyadicBrownian:
    """A Brownian path on ``[0, 1]`` at the resolution ``2^-levels``, queried like torchsde's
    ``BrownianInterval`` (``bm(ta, tb)``, ``bm(ta, tb, return_U=True)``) at dyadic times: the
    increments ``dW_k ~ N(0, h)`` and space-time Levy areas ``H_k ~ N(0, h/12)`` of the finest
    intervals are drawn once, ``U_k = h (dW_k/2 + H_k) = int (W_s - W_{s_k}) ds``, and every
    coarser query is their exact aggregate (vectorised cumulative sums: fast, unlike a tree)."""

    def __init__(self, size, levels: int, seed: int):
        gen = torch.Generator().manual_seed(seed)
        self.n, h = 2 ** levels, 2.0 ** -levels
        dw = torch.randn((self.n, *size), dtype=torch.float64, generator=gen) * h ** 0.5
        u = h * (dw / 2 + torch.randn((self.n, *size), dtype=torch.float64, generator=gen) * (h / 12) ** 0.5)
        zero = torch.zeros((1, *size), dtype=torch.float64)
        self.w = torch.cat([zero, dw.cumsum(0)])                 # W(s_k), k = 0..n
        self.u = torch.cat([zero, u.cumsum(0)])                  # sum_{k' < k} U_k'
        self.s = torch.cat([zero, self.w[:-1].cumsum(0)])        # sum_{k' < k} W(s_k')
        self.h = h

    def _index(self, t: float) -> int:
        k = t * self.n
        if k != round(k) or not 0 <= k <= self.n:
            raise ValueError(f"DyadicBrownian is queried at multiples of 1/{self.n} in [0, 1], got {t}")
        return round(k)

    def __call__(self, ta: float, tb: float, return_U: bool = False):
        i, j = self._index(ta), self._index(tb)
        dw = self.w[j] - self.w[i]
        if not return_U:
            return dw
        return dw, self.u[j] - self.u[i] + self.h * (self.s[j] - self.s[i] - (j - i) * self.w[i])


def brownian_interval(size, seed: int, t1: float = 1.0):
    import torchsde

    return torchsde.BrownianInterval(0.0, t1, size=size, dtype=torch.float64, entropy=seed,
                                     levy_area_approximation="space-time")


__all__ = ["DyadicBrownian", "gbm", "integrate", "fitted_order", "grid", "brownian_interval", "MU", "SIGMA"]
