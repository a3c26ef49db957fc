"""k-diffusion's ancestral and DPM-2 samplers (Crowson's k-diffusion, ``sampling.py``), for any process.

k-diffusion works in EDM variables (``alpha = 1``, noise level ``sigma``). For a general process
these solvers use the scaled state ``y = x / alpha`` and the EDM noise level
``s = sigma / alpha = exp(-lambda)``: ``y = x0 + s eps`` is an EDM process, its denoiser is the
model's ``x0`` and its ODE derivative ``(y - x0) / s`` is ``eps``. Every update below is that
k-diffusion update in ``(y, s)``, multiplied out into ``x = alpha y`` (so, on ``gf.EDM``, it
is k-diffusion's own arithmetic up to rounding; on ``DiscreteVP`` it is what the diffusers
``*DiscreteScheduler`` classes do with their ``sigmas``).

Ancestral steps (``get_ancestral_step``): from ``s`` to ``s'`` with churn ``eta``,
``s_up = eta s' sqrt(1 - r^2)``, ``s_down = s' sqrt(1 - eta^2 (1 - r^2))``, ``r = s'/s =
exp(-(lambda' - lambda))``: a deterministic step to ``s_down``, then noise ``s_up z`` in ``y``
(``alpha' s_up z = eta sigma' sqrt(1 - r^2) z`` in ``x``).
"""
import torch

from genflow._cache import LRU, tensor_key, value_key
from genflow.solvers.base import Solver, exp, expm1, sqrt, step_values, table, where

__all__ = ["EulerAncestral", "DPM2", "DPM2Ancestral"]

_MIDPOINTS = LRU(64)  # (process, grid values, eta) -> DPM-2's midpoint table and Euler-step flags


def _ancestral(p, q, eta):
    """``(r, rho, one_minus_r_rho, up)``: ``r = s'/s``, ``s_down = rho s'``, ``1 - s_down/s``
    (cancellation-free) and the noise scale in ``x``, ``eta sigma' sqrt(1 - r^2)``."""
    h = q.lam - p.lam
    r, one_minus_r2 = exp(-h), -expm1(-2 * h)
    rho = sqrt(1 - eta ** 2 * one_minus_r2)
    one_minus = -expm1(-h) + r * eta ** 2 * one_minus_r2 / (1 + rho)
    return r, rho, one_minus, eta * q.sigma * sqrt(one_minus_r2)


class EulerAncestral(Solver):
    """Ancestral sampling with Euler steps (k-diffusion ``sample_euler_ancestral``), any process.

    In ``(y, s)``: ``y' = y + (s_down - s)(y - x0)/s + s_up z``. In ``x``:
    ``x' = rho (sigma'/sigma) x + alpha' (1 - rho s'/s) x0 + eta sigma' sqrt(1 - (s'/s)^2) z``.
    This equals DDIM with the same ``eta`` (Song et al. 2021a, eq. 12): ``eta = 1`` (default)
    is ancestral DDPM sampling, ``eta = 0`` Euler in ``(y, s)``, i.e. deterministic DDIM.
    Order 1 (weak order 1 with noise), 1 NFE per step; on a step to ``sigma' = 0`` no noise.
    """

    name = "euler_ancestral"
    stochastic = True
    default_eta = 1.0

    def step(self, i, x):
        p, q = self.grid[i], self.grid[i + 1]
        r, rho, one_minus, up = _ancestral(p, q, self.eta)
        cx, c0 = rho * q.sigma / p.sigma, q.alpha * one_minus
        out = self.evaluate(x, p)
        term, a0, b0 = self.x0_view(x, out, p)
        return self.update(x, [term], [cx + c0 * a0, c0 * b0], up, out=x, noise_at=(p.sigma, q.sigma))


class DPM2(Solver):
    """k-diffusion's DPM-2 (``sample_dpm_2``): a midpoint step in ``log s``, any process.

    With ``d = (y - x0)/s = eps``: ``s_m = sqrt(s s')``, ``y_m = y + (s_m - s) d``,
    ``y' = y + (s' - s) eps(y_m, s_m)``. In ``x``: ``x_m = (sigma_m/sigma) x +
    alpha_m (1 - s_m/s) x0`` (a DDIM step to the log-SNR midpoint) and
    ``x' = (alpha'/alpha) x - (alpha'/alpha) sigma (1 - s'/s) eps(x_m, t_m)``: DPM-Solver-2 with
    ``r1 = 1/2`` (Lu et al. 2022a, Algorithm 1), inspired by Karras et al. (2022), Algorithm 2.
    Order 2, 2 NFE per step. A step ending at ``sigma' = 0`` (``s_m = 0``), or starting at
    ``alpha = 0`` (``s = inf``, e.g. ``LinearPath`` at ``t = 1``), is an Euler step in ``(y, s)``
    (= DDIM, 1 NFE), as in k-diffusion; one first-order step keeps the global order 2.
    """

    name = "dpm_2"
    order = 2
    nfe_per_step = 2

    def __init__(self, model, ts, **kwargs):
        super().__init__(model, ts, **kwargs)
        key = (value_key(self.process), tensor_key(ts), self.eta or 0.0)
        self.mid, self.euler = _MIDPOINTS.get_or_compute(key, lambda: self._midpoints(ts))

    def _midpoints(self, ts):
        """``(table, euler)``: the midpoint ``Point`` of every step and whether it is an Euler step
        (cached by process, grid values and eta: repeated solves on a grid reuse them)."""
        eta = self.eta or 0.0
        with torch.no_grad():
            lam = self.process.log_snr(ts).to(torch.float64)
        h = lam[1:] - lam[:-1]
        r, one_minus_r2 = torch.exp(-h), -torch.expm1(-2 * h)
        rho = torch.sqrt(1 - eta ** 2 * one_minus_r2)
        euler = r * rho == 0  # s_down = 0 or s = inf
        # log-SNR midpoint of s and s_down = rho s': lambda_m = (lambda + lambda' - log rho) / 2
        lam_m = torch.where(euler, 0.0, 0.5 * (lam[:-1] + lam[1:] - torch.log(rho)))
        t_mid = torch.where(euler, ts[:-1], self.process.t_from_log_snr(lam_m).to(torch.float64))
        return table(self.process, t_mid), step_values(euler)

    def _plan(self, i, stage):
        """``(coefs, 0.0)`` of step ``i``'s noise-free ``stage`` on a scalar grid: ``"euler"``
        (``x' = (sigma'/sigma) x + alpha' (1 - s'/s) x0``), ``"mid"`` (``x_m``) or ``"final"``
        (``x' = (alpha'/alpha) x - (alpha'/alpha) sigma (1 - s'/s) eps_m``)."""
        p, m, q = self.grid[i], self.mid[i], self.grid[i + 1]
        _, _, one_minus, _ = _ancestral(p, q, 0.0)
        a0, b0 = self.coef("x0", p)
        if stage == "euler":
            c0 = q.alpha * one_minus
            return [q.sigma / p.sigma + c0 * a0, c0 * b0], 0.0
        if stage == "mid":
            c0 = m.alpha * -expm1(-(m.lam - p.lam))
            return [m.sigma / p.sigma + c0 * a0, c0 * b0], 0.0
        a_m, b_m = self.coef("eps", m)
        ratio = q.alpha / p.alpha
        c_m = -ratio * p.sigma * one_minus
        return [ratio, 0.0, c_m * a_m, c_m * b_m], 0.0

    def _planned_step(self, i, x):
        """A noise-free step of a scalar grid with packed coefficients reused across solves; None
        when the step cannot be planned (noise, thresholding, per-sample times)."""
        euler = self.euler[i]
        first = self.step_plan(i, ("euler" if euler else "mid",), lambda: self._plan(i, "euler" if euler else "mid"))
        if first is None:
            return None
        out = self.evaluate(x, self.grid[i])
        if euler:
            return self.update_packed(x, [out], first, out=x)
        x_m = self.update_packed(x, [out], first, out=torch.empty_like(x))
        out_m = self.evaluate(x_m, self.mid[i])
        final = self.step_plan(i, ("final",), lambda: self._plan(i, "final"))
        return self.update_packed(x, [out, x_m, out_m], final, out=x)

    def step(self, i, x):
        if not self.eta and not isinstance(self.euler[i], torch.Tensor):
            planned = self._planned_step(i, x)
            if planned is not None:
                return planned
        p, m, q, euler = self.grid[i], self.mid[i], self.grid[i + 1], self.euler[i]
        r, rho, one_minus, up = _ancestral(p, q, self.eta or 0.0)
        out = self.evaluate(x, p)
        term, a0, b0 = self.x0_view(x, out, p)
        # Euler in (y, s) to s_down (the ancestral Euler update)
        cx_e, c0_e = rho * q.sigma / p.sigma, q.alpha * one_minus
        if not isinstance(euler, torch.Tensor) and euler:
            return self.update(x, [term], [cx_e + c0_e * a0, c0_e * b0], up, out=x, noise_at=(p.sigma, q.sigma))
        # x_m = (sigma_m/sigma) x + alpha_m (1 - s_m/s) x0, with s_m/s = exp(-(lambda_m - lambda))
        c0_m = where(euler, 0.0, m.alpha * -expm1(-(m.lam - p.lam)))  # Euler samples: m = p, x_m = x
        x_m = self.update(x, [term], [m.sigma / p.sigma + c0_m * a0, c0_m * b0])
        term_m, a_m, b_m = self.eps_view(x_m, self.evaluate(x_m, m), m)
        # x' = (alpha'/alpha) x + alpha'(s_down - s) eps_m, alpha'(s_down - s) = -(alpha'/alpha) sigma (1 - s_down/s)
        ratio = where(euler, 0.0, q.alpha / where(euler, 1.0, p.alpha))
        c_m = -ratio * p.sigma * one_minus
        cx = where(euler, cx_e, ratio)
        c0 = where(euler, c0_e, 0.0)
        return self.update(x, [term, x_m, term_m], [cx + c0 * a0, c0 * b0, c_m * a_m, c_m * b_m], up,
                           out=x, noise_at=(p.sigma, q.sigma))


class DPM2Ancestral(DPM2):
    """Ancestral sampling with DPM-2 steps (k-diffusion ``sample_dpm_2_ancestral``), any process.

    The DPM-2 step of ``dpm_2`` from ``s`` to ``s_down`` (midpoint ``sqrt(s s_down)``), then
    noise ``s_up z`` in ``y``, i.e. ``eta sigma' sqrt(1 - (s'/s)^2) z`` in ``x``. ``eta = 1``
    (default) is k-diffusion's sampler; ``eta = 0`` is ``dpm_2`` (order 2 as an ODE solver).
    With noise it is a weak first-order sampler of the reverse SDE. 2 NFE per step (1 on an
    Euler step, where ``s_down = 0`` or ``s = inf``).
    """

    name = "dpm_2_ancestral"
    stochastic = True
    default_eta = 1.0
