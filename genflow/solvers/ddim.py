"""DDIM and DDPM (ancestral) updates, written for any ``x_t = alpha x0 + sigma eps`` process."""
from genflow.solvers.base import Solver, expm1, sqrt


class DDIM(Solver):
    """DDIM (Song et al. 2021a, eq. 12; seed 001 §6.5.4) with churn ``eta``.

    ``x' = alpha' x0 + sqrt(sigma'^2 - c^2) eps + c z`` with
    ``c = eta sigma' sqrt(1 - exp(-2h))``, ``h = lambda' - lambda`` (which equals DDIM's
    ``sigma_t(eta)`` for VP processes). ``eta = 0`` (default) is deterministic and equals the
    first-order exponential integrator of the probability-flow ODE; ``eta = 1`` equals DDPM.
    Order 1, 1 NFE per step.
    """

    name = "ddim"
    default_eta = 0.0

    def step(self, i, x):
        p, q = self.grid[i], self.grid[i + 1]
        a0, b0 = self.coef("x0", p)
        a1, b1 = self.coef("eps", p)
        c = self.eta * q.sigma * sqrt(-expm1(-2 * (q.lam - p.lam)))
        k = sqrt(q.sigma ** 2 - c ** 2)
        out = self.evaluate(x, p)
        return self.update(x, [out], [q.alpha * a0 + k * a1, q.alpha * b0 + k * b1], c, out=x,
                           noise_at=(p.sigma, q.sigma))


class DDPM(Solver):
    """Ancestral sampling from the DDPM posterior ``q(x_t' | x_t, x0)`` (Ho et al. 2020, eqs. 6–7).

    With ``h = lambda' - lambda``: mean ``(alpha/alpha')(sigma'/sigma)^2 x_t +
    alpha' (1 - e^{-2h}) x0``; standard deviation ``sigma' sqrt(1 - e^{-2h})``
    (``variance="small"``, Ho's beta-tilde) or ``sigma sqrt(1 - e^{-2h})`` (``"large"``, beta;
    no noise on a step ending at ``sigma' = 0``). Seed 001 §6.3.2.3. 1 NFE per step.
    """

    name = "ddpm"
    stochastic = True

    def __init__(self, model, ts, *, variance="small", **kwargs):
        super().__init__(model, ts, **kwargs)
        if variance not in ("small", "large"):
            raise ValueError(f"variance must be 'small' or 'large', got {variance!r}")
        self.variance = variance

    def step(self, i, x):
        p, q = self.grid[i], self.grid[i + 1]
        a0, b0 = self.coef("x0", p)
        one_minus = -expm1(-2 * (q.lam - p.lam))
        cx = (p.alpha / q.alpha) * (q.sigma / p.sigma) ** 2
        c0 = q.alpha * one_minus
        std = sqrt(one_minus) * (q.sigma if self.variance == "small" else p.sigma * (q.sigma > 0))
        out = self.evaluate(x, p)
        return self.update(x, [out], [cx + c0 * a0, c0 * b0], std, out=x, noise_at=(p.sigma, q.sigma))
