"""ER-SDE-Solver: the extended reverse-time SDE solver of Cui et al. (2023)."""
import numpy as np
import torch

from genflow.solvers.base import Solver, sqrt, where

__all__ = ["ERSDE", "er_sde_integrals", "NOISE_SCALERS"]

_GAUSS_NODES, _GAUSS_WEIGHTS = (torch.from_numpy(a) for a in np.polynomial.legendre.leggauss(32))


def _er_sde_scaler(eta):
    return lambda s: s * (torch.exp(s ** 0.3) + 10.0) ** eta


NOISE_SCALERS = {
    "er_sde": _er_sde_scaler,                          # Cui et al. (2023), eq. 19 ("ER SDE 5"), ComfyUI's default
    "reverse_sde": lambda eta: lambda s: s ** (eta + 1),  # eta = 1: the reverse-time SDE
    "ode": lambda eta: lambda s: s,                      # the probability-flow ODE
}


def er_sde_integrals(s, s_next, phi, points=None):
    """``(S, S_u)``: ``int_{s'}^{s} dv / phi(v)`` and ``int_{s'}^{s} (v - s) / phi(v) dv`` (floats or
    [B] float64 tensors, ``0 < s' < s``). ``points=None``: 32-point Gauss–Legendre in ``log v``
    (exact to rounding for the scalers here); an int ``N``: the left Riemann sum of ComfyUI's
    ``sample_er_sde`` with ``N`` points from ``s'``."""
    scalar = not isinstance(s, torch.Tensor)
    s_t, n_t = torch.as_tensor(s, dtype=torch.float64), torch.as_tensor(s_next, dtype=torch.float64)
    if points is None:
        lo, hi = torch.log(n_t).unsqueeze(-1), torch.log(s_t).unsqueeze(-1)
        v = torch.exp((hi + lo) / 2 + (hi - lo) / 2 * _GAUSS_NODES)
        w = (hi - lo) / 2 * _GAUSS_WEIGHTS * v  # dv = v du
    else:
        step = ((s_t - n_t) / points).unsqueeze(-1)
        v = n_t.unsqueeze(-1) + torch.arange(points, dtype=torch.float64) * step
        w = step.expand_as(v)
    inv = w / phi(v)
    S, S_u = inv.sum(-1), (inv * (v - s_t.unsqueeze(-1))).sum(-1)
    return (S.item(), S_u.item()) if scalar else (S, S_u)


class ERSDE(Solver):
    """ER-SDE-Solver-1/2/3 (Cui et al. 2023, "Elucidating the Solution Space of Extended Reverse-Time
    SDE for Diffusion Models", Algorithms 1-3 in the VP form), as ComfyUI's ``sample_er_sde``.

    In ``s = sigma/alpha`` with the noise scaler ``phi`` (``r = phi(s')/phi(s)``, ``D = x0`` and
    ``Delta = s' - s``) the step is
    ``x' = (alpha'/alpha) r x + alpha' (1 - r) D + alpha' (Delta + S phi(s')) D1
    + alpha' (Delta^2/2 + S_u phi(s')) Du + alpha' sqrt(s'^2 - s^2 r^2) z``,
    ``D1 = (D - D_{-1})/(s - s_{-1})`` (stage 2), ``Du = (D1 - D1_{-1})/((s - s_{-2})/2)`` (stage 3),
    ``S, S_u`` the integrals of ``er_sde_integrals``. ``noise_scaler``: ``"er_sde"`` (default,
    ``phi(s) = s (e^{s^0.3} + 10)^eta``, the paper's recommended ER SDE 5), ``"reverse_sde"``
    (``s^(eta+1)``) or ``"ode"`` (``s``: noise-free); ``eta`` (0..1, default 1, ComfyUI's node) scales
    the stochasticity, ``eta = 0`` is the ODE. ``max_stage`` 1..3 (default 3), stages grow while the
    history fills. ``integration_points``: None (exact quadrature, default) or ComfyUI's
    200-point Riemann sum. A step to ``sigma' = 0`` returns ``alpha' D``. 1 NFE per step.

    Order: with ``eta = 0`` the stages are the exponential integrator in ``s`` of the Newton
    interpolant without its ``D2 (v - s)(s - s_{-1})`` term, and the Euler first step bounds the
    global order by 2: 1 for ``max_stage=1``, 2 otherwise (``expected_order``). Weak order 1 with noise.
    """

    name = "er_sde"
    order = 2
    stochastic = True
    default_eta = 1.0
    order_test_options = ({"max_stage": 1}, {"max_stage": 2}, {"max_stage": 3})

    @classmethod
    def expected_order(cls, *, max_stage=3, **options) -> int:
        return 1 if max_stage == 1 else 2

    def __init__(self, model, ts, *, max_stage: int = 3, noise_scaler: str = "er_sde", integration_points=None,
                 **kwargs):
        super().__init__(model, ts, **kwargs)
        if isinstance(max_stage, bool) or max_stage not in (1, 2, 3):
            raise ValueError(f"max_stage must be 1, 2 or 3, got {max_stage!r}")
        if noise_scaler not in NOISE_SCALERS:
            raise ValueError(f"noise_scaler must be one of {sorted(NOISE_SCALERS)}, got {noise_scaler!r}")
        if integration_points is not None and (isinstance(integration_points, bool) or not isinstance(
                integration_points, int) or integration_points < 1):
            raise ValueError(f"integration_points must be None or an int >= 1, got {integration_points!r}")
        if bool(torch.as_tensor(self.grid[0].alpha == 0).any()):
            raise ValueError("er_sde needs alpha > 0 at the start (sigma/alpha finite); start at t_start < T")
        self.max_stage = max_stage
        self.phi = NOISE_SCALERS[noise_scaler](self.eta)
        self.noise_free = noise_scaler == "ode" or self.eta == 0
        self.points = integration_points
        self.history = []  # (s, D, D1) of earlier grid points, newest first
        # s = sigma/alpha and phi(s) at every grid point, and the integrals (S, S_u) of every step that
        # runs stage 2 or 3 (step i >= 1, sigma' > 0), on the host once per solve: a step reads numbers
        # (traceable by torch.compile)
        self.s = [g.sigma / g.alpha for g in self.grid]
        self.phis = [self.scaler(v) for v in self.s]
        self.integrals = [er_sde_integrals(self.s[i], self.s[i + 1], self.phi, self.points)
                          if i >= 1 and max_stage >= 2 and not (not isinstance(q.sigma, torch.Tensor) and q.sigma == 0)
                          else None for i, q in enumerate(self.grid[1:])]

    def scaler(self, s):
        """``phi(s)`` as a float, or a [B] tensor for per-sample ``s``."""
        value = self.phi(torch.as_tensor(s, dtype=torch.float64))
        return value.item() if value.dim() == 0 else value

    def step(self, i, x):
        p, q = self.grid[i], self.grid[i + 1]
        term, a, b = self.x0_view(x, self.evaluate(x, p), p)
        if not isinstance(q.sigma, torch.Tensor) and q.sigma == 0:
            return self.update(x, [term], [q.alpha * a, q.alpha * b], out=x)
        identity = not isinstance(a, torch.Tensor) and (a, b) == (0.0, 1.0)
        D = term if identity else self.update(x, [term], [a, b])
        s, s_next = self.s[i], self.s[i + 1]
        phi_next = self.phis[i + 1]
        r = phi_next / self.phis[i]
        noise = 0.0 if self.noise_free else q.alpha * sqrt(where(s_next ** 2 > (s * r) ** 2,
                                                                 s_next ** 2 - (s * r) ** 2, 0.0))
        terms, coefs = [D], [(q.alpha / p.alpha) * r, q.alpha * (1 - r)]
        stage = min(self.max_stage, len(self.history) + 1)
        D1 = None
        if stage >= 2:  # D1 = (D - D_old)/dp and Du = 2 (D1 - D1_old)/(s - s_{-2}), folded into the terms
            S, S_u = self.integrals[i]
            s_old, D_old, D1_old = self.history[0]
            dp = s - s_old
            c1 = q.alpha * (s_next - s + S * phi_next)
            k = 2 * q.alpha * ((s_next - s) ** 2 / 2 + S_u * phi_next) / (s - self.history[1][0]) if stage >= 3 else 0.0
            terms.append(D_old)
            coefs[1] = coefs[1] + (c1 + k) / dp
            coefs.append(-(c1 + k) / dp)
            if stage >= 3:
                terms.append(D1_old)
                coefs.append(-k)
            if self.max_stage >= 3:
                D1 = self.update(D, [D_old], [1 / dp, -1 / dp])
        out = self.update(x, terms, coefs, noise, out=x, noise_at=(p.sigma, q.sigma))
        self.history = [(s, D, D1)] + self.history[:1]
        return out
