"""Euler-type solvers of the probability-flow ODE and the reverse SDE (Lim, "An Introduction to Generative Modeling with Flows and Diffusion Models" §6.2.4, §6.3.1)."""
import torch

from genflow.solvers.base import Solver, sqrt, where


class Euler(Solver):
    """Euler's method on the probability-flow ODE ``dx/dt = velocity(x, t)``.

    ``x' = x + h velocity(x, t)`` with ``h = t' - t < 0`` (Lim, "An Introduction to Generative Modeling with Flows and Diffusion Models" §6.3.1.6). Order 1, 1 NFE
    per step. For EDM this is Karras et al. (2022) Algorithm 1 without churn.
    """

    name = "euler"

    def step(self, i, x):
        p, q = self.grid[i], self.grid[i + 1]
        h = q.t - p.t
        def coefficients():
            a, b = self.coef("velocity", p)
            return [1 + h * a, h * b], 0.0

        packed = self.step_plan(i, (), coefficients)
        if packed is not None:
            return self.update_packed(x, [self.evaluate(x, p)], packed, out=x)
        out, [(a, b)] = self.views(x, self.evaluate(x, p), p, "velocity")
        return self.update(x, [out], [1 + h * a, h * b], out=x)


class EulerMaruyama(Solver):
    """Euler–Maruyama on the reverse SDE with churn ``eta`` (DESIGN.md §2).

    ``dx = [f x - (1 + eta^2)/2 g2 score] dt + eta sqrt(g2) dW``, discretised as
    ``x' = x + h [velocity(x, t) - eta^2/2 g2 score(x, t)] + eta sqrt(g2 |h|) z`` (Lim, "An Introduction to Generative Modeling with Flows and Diffusion Models"
    §6.2.4, Song et al. 2021 eq. 6; ``velocity = f x - g2/2 score``). ``eta = 1`` (default) is the reverse SDE, ``eta = 0`` the
    probability-flow ODE. Weak order 1, 1 NFE per step.
    """

    name = "euler_maruyama"
    stochastic = True
    default_eta = 1.0

    def __init__(self, model, ts, **kwargs):
        super().__init__(model, ts, **kwargs)
        if self.eta > 0:
            g2 = self.process.g2(ts[:-1])
            if not torch.isfinite(g2).all():
                raise ValueError(f"the reverse SDE of {self.process!r} is singular on this grid (g2 is infinite "
                                 f"at t={ts[:-1][~torch.isfinite(g2)].unique().tolist()}); start at t_start < T or use eta=0")

    def step(self, i, x):
        p, q = self.grid[i], self.grid[i + 1]
        h = q.t - p.t
        # drift = velocity - eta^2/2 g2 score
        out, [(a, b), (a_s, b_s)] = self.views(x, self.evaluate(x, p), p, "velocity", "score")
        if self.eta > 0:
            churn = self.eta ** 2 / 2 * p.g2
            a, b = a - churn * a_s, b - churn * b_s
        noise_scale = self.eta * sqrt(p.g2 * -h) if self.eta > 0 else 0.0
        return self.update(x, [out], [1 + h * a, h * b], noise_scale, out=x, noise_at=(p.sigma, q.sigma))


class Heun(Solver):
    """Heun's method (explicit trapezoid) on the probability-flow ODE.

    ``x~ = x + h d(x, t)``, ``x' = x + h/2 [d(x, t) + d(x~, t')]`` with ``d`` the velocity
    (Karras et al. 2022, Algorithm 1). Order 2, 2 NFE per step; a step that ends where
    ``sigma = 0`` falls back to Euler (1 NFE), since the velocity is undefined there.
    """

    name = "heun"
    order = 2
    nfe_per_step = 2

    def _predictor(self, p, q):
        (a, b), h = self.coef("velocity", p), q.t - p.t
        return [1 + h * a, h * b], 0.0

    def _corrector(self, p, q):
        (a, b), (a2, b2), h = self.coef("velocity", p), self.coef("velocity", q), q.t - p.t
        return [1 + h * a / 2, h * b / 2, h * a2 / 2, h * b2 / 2], 0.0

    def step(self, i, x):
        p, q = self.grid[i], self.grid[i + 1]
        predictor = self.step_plan(i, ("predictor",), lambda: self._predictor(p, q))
        if predictor is not None:  # a scalar grid: both stages' packed coefficients are reused
            out = self.evaluate(x, p)
            if q.sigma == 0:
                return self.update_packed(x, [out], predictor, out=x)
            x_euler = self.update_packed(x, [out], predictor, out=torch.empty_like(x))
            out2 = self.evaluate(x_euler, q)
            corrector = self.step_plan(i, ("corrector",), lambda: self._corrector(p, q))
            return self.update_packed(x, [out, x_euler, out2], corrector, out=x)
        h = q.t - p.t
        out, [(a, b)] = self.views(x, self.evaluate(x, p), p, "velocity")
        at_zero = q.sigma == 0
        if not isinstance(at_zero, torch.Tensor) and at_zero:
            return self.update(x, [out], [1 + h * a, h * b], out=x)
        x_euler = self.update(x, [out], [1 + h * a, h * b])
        out2, [(a2, b2)] = self.views(x_euler, self.evaluate(x_euler, q), q, "velocity")
        if isinstance(at_zero, torch.Tensor) and at_zero.any():  # per-sample: Euler where sigma' = 0
            full = ~at_zero
            coefs = [where(full, 1 + h * a / 2, 1 + h * a), where(full, h * b / 2, h * b),
                     where(full, h * a2 / 2, 0.0), where(full, h * b2 / 2, 0.0)]
        else:
            coefs = [1 + h * a / 2, h * b / 2, h * a2 / 2, h * b2 / 2]
        return self.update(x, [out, x_euler, out2], coefs, out=x)
