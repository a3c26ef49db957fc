"""DDIM and DDPM (ancestral) updates, written for any ``x_t = alpha x0 + sigma eps`` process."""
from genflow.solvers.base import Solver, exp, expm1, sqrt

__all__ = ["DDIM", "DDPM", "ddim_noise_split"]


def ddim_noise_split(h, sigma_next, eta):
    """``(c, r)``: DDIM's noise scale ``c = eta sigma' sqrt(1 - e^{-2h})`` and the factor
    ``r = sqrt(1 - eta^2 (1 - e^{-2h}))`` with ``sqrt(sigma'^2 - c^2) = sigma' r``, the weight of
    the noise prediction in ``x' = alpha' x0 + sigma' r eps + c z`` (Song et al. 2021a, eq. 12,
    ``h = lambda' - lambda``; for VP processes ``c`` is DDIM's ``sigma_t(eta)``). Floats or [B] tensors."""
    one_minus = -expm1(-2 * h)
    return eta * sigma_next * sqrt(one_minus), sqrt(1 - eta ** 2 * one_minus)


class DDIM(Solver):
    """DDIM (Song et al. 2021a, eq. 12; Lim, "An Introduction to Generative Modeling with Flows and Diffusion Models" §6.5.4) with churn ``eta``.

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
        h = q.lam - p.lam
        c, r = ddim_noise_split(h, q.sigma, self.eta)
        # x' = alpha' x0 + sigma' r eps with eps = (x - alpha x0) / sigma
        #    = (sigma'/sigma) r x + alpha' (1 - e^{-h} r) x0
        cx = (q.sigma / p.sigma) * r
        c0 = q.alpha * (-expm1(-h) + exp(-h) * (1 - r))

        def coefficients():
            a0, b0 = self.coef("x0", p)
            return [cx + c0 * a0, c0 * b0], c

        packed = self.step_plan(i, (self.eta,), coefficients)
        if packed is not None:
            return self.update_packed(x, [self.evaluate(x, p)], packed, out=x)
        out = self.evaluate(x, p)
        term, a0, b0 = self.x0_view(x, out, p)
        return self.update(x, [term], [cx + c0 * a0, c0 * b0], c, out=x, noise_at=(p.sigma, q.sigma))


class DDPM(Solver):
    """Ancestral sampling from the DDPM posterior ``q(x_t' | x_t, x0)`` (Ho et al. 2020, eqs. 6–7).

    With ``h = lambda' - lambda``: mean ``(alpha/alpha')(sigma'/sigma)^2 x_t +
    alpha' (1 - e^{-2h}) x0``; standard deviation ``sigma' sqrt(1 - e^{-2h})``
    (``variance="small"``, Ho's beta-tilde) or ``sigma sqrt(1 - e^{-2h})`` (``"large"``, beta;
    no noise on a step ending at ``sigma' = 0``). Lim, "An Introduction to Generative Modeling with Flows and Diffusion Models" §6.3.2.3. 1 NFE per step.
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
        one_minus = -expm1(-2 * (q.lam - p.lam))
        cx = (p.alpha / q.alpha) * (q.sigma / p.sigma) ** 2
        c0 = q.alpha * one_minus
        std = sqrt(one_minus) * (q.sigma if self.variance == "small" else p.sigma * (q.sigma > 0))
        out = self.evaluate(x, p)
        term, a0, b0 = self.x0_view(x, out, p)
        return self.update(x, [term], [cx + c0 * a0, c0 * b0], std, out=x, noise_at=(p.sigma, q.sigma))
