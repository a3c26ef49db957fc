"""Langevin-type samplers: predictor-corrector (Song et al. 2021) and annealed Langevin dynamics
(Song & Ermon 2019); Lim, "An Introduction to Generative Modeling with Flows and Diffusion Models" §6.3.3.

Both read the model as a score, ``score = a x + b out`` (through ``x0_view`` when dynamic
thresholding is on), and run every Langevin step as one fused op.
"""
import numbers

import torch

from genflow._checks import check_int, check_real
from genflow.ops import langevin_update
from genflow.solvers.base import Solver, exp, expm1, sqrt, where

__all__ = ["PredictorCorrector", "AnnealedLangevin"]

# Song et al.'s VP corrector uses alpha_i = 1 - beta_i of their N = 1000 discretisation.
_REFERENCE_SCALES = 1000


def _scalar_zero(v) -> bool:
    return not isinstance(v, torch.Tensor) and v == 0.0


def _count(value, name: str, minimum: int) -> int:
    """A Python, NumPy or 0-d tensor integer ``>= minimum``; a ``TypeError`` for non-numbers."""
    try:
        return check_int(name, value, low=minimum)
    except (TypeError, ValueError) as error:
        if isinstance(error, TypeError) and not isinstance(value, numbers.Real):
            raise
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}") from None


def _positive(value, name: str) -> float:
    """A Python, NumPy or 0-d tensor real number in ``(0, inf)``; a ``TypeError`` for non-numbers."""
    try:
        return check_real(name, value, low=0.0, low_open=True)
    except ValueError:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}") from None


class _ScoreSolver(Solver):
    """Shared pieces: the score view of the model output and one Langevin step."""

    stochastic = True

    def score_view(self, x, out, p):
        """``(term, a, b)`` with ``score = a x + b term`` at ``p``, i.e. ``(alpha x0 - x) / sigma^2``."""
        if self.threshold is None:
            a, b = self.coef("score", p)
            return out, a, b
        term, a0, b0 = self.x0_view(x, out, p)
        s2 = p.sigma ** 2
        return term, (p.alpha * a0 - 1.0) / s2, p.alpha * b0 / s2

    def masked_score(self, x, p):
        """One NFE: ``(term, a, b)`` at ``p``, with ``a = b = 0`` for samples whose sigma is 0
        (the score is undefined there; such samples are left unchanged by a Langevin step)."""
        out = self.evaluate(x, p)
        term, a, b = self.score_view(x, out, p)
        if isinstance(p.sigma, torch.Tensor):
            live = p.sigma > 0
            a, b = where(live, a, 0.0), where(live, b, 0.0)
        return term, a, b


class PredictorCorrector(_ScoreSolver):
    """Predictor-corrector sampling (Song et al. 2021, Algorithm 1; Algorithms 2-5).

    Each step runs the predictor from ``t`` to ``t'``, then ``n_corrector`` Langevin corrector
    steps at ``t'`` (the paper's order). With ``h = lambda' - lambda``:

    * ``predictor="reverse_diffusion"`` (eq. 46/47, Algorithms 2/3): the reverse of the
      forward transition ``x_t = r x_t' + G z``, ``r = alpha/alpha'``,
      ``G^2 = sigma^2 (1 - e^{-2h})``: ``x' = (2 - r) x + G^2 score(x, t) + G z``. For VE this
      is SMLD's ``G^2 = sigma^2 - sigma'^2``, for VP DDPM's ``beta_i``.
    * ``"euler_maruyama"``: ``x' = x + h [f x - g2 score] + sqrt(g2 |h|) z`` (eq. 6).
    * ``"ancestral"`` (Appendix F): the posterior ``q(x_t' | x_t, x0)`` at the denoised
      ``x0``: mean ``(alpha/alpha')(sigma'/sigma)^2 x + alpha' (1 - e^{-2h}) x0``, standard
      deviation ``sigma' sqrt(1 - e^{-2h})``. For VE this is SMLD's ancestral step exactly; for
      VP it is DDPM with the posterior variance (Song's code uses ``beta_i``).

    Corrector (``corrector="langevin"``, Algorithms 4/5): with fresh ``z`` per step,
    ``eps = 2 alpha_i (snr ||z|| / ||score||)^2`` per sample (norms over the non-batch
    dimensions) and ``x <- x + eps score + sqrt(2 eps) z``; ``alpha_i = exp(2 f(t') T / 1000)``,
    Song et al.'s ``1 - beta_i`` at their N = 1000 for VP/sub-VP (to O(N^-2)) and 1 for VE/EDM.
    ``snr`` defaults to 0.16 (Song et al.'s CIFAR-10 setting). The corrector is skipped where
    ``sigma(t') = 0``. ``norm="sample"`` (default, the paper's algorithms) takes each sample's
    own norms, so a sample never depends on its batch (the per-sample seed promise); in low
    dimensions it samples ``p(x) |score(x)|^2`` instead of ``p`` (pinned in
    tests/solvers/test_langevin.py). ``norm="batch"`` (Song et al.'s code) uses the batch-mean
    norms: better in low dimensions, but every sample then depends on the rest of its batch.

    Weak order 1; ``1 + n_corrector`` NFE per step. Options: ``predictor``, ``corrector``
    (``"langevin"`` | ``"none"``), ``snr`` (> 0), ``n_corrector`` (>= 1), ``norm``.
    """

    name = "pc"
    nfe_per_step = 2
    PREDICTORS = ("reverse_diffusion", "euler_maruyama", "ancestral")
    CORRECTORS = ("langevin", "none")

    def __init__(self, model, ts, *, predictor="reverse_diffusion", corrector="langevin", snr=0.16,
                 n_corrector=1, norm="sample", **kwargs):
        if predictor not in self.PREDICTORS:
            raise ValueError(f"predictor must be one of {self.PREDICTORS}, got {predictor!r}")
        if corrector not in self.CORRECTORS:
            raise ValueError(f"corrector must be one of {self.CORRECTORS}, got {corrector!r}")
        self.snr = _positive(snr, "snr")
        if norm not in ("sample", "batch"):
            raise ValueError(f"norm must be 'sample' or 'batch', got {norm!r}")
        self.norm = norm
        self.n_corrector = _count(n_corrector, "n_corrector", 1) if corrector == "langevin" else 0
        super().__init__(model, ts, **kwargs)
        self.predictor = predictor
        if predictor == "euler_maruyama":
            g2 = self.process.g2(ts[:-1])
            if not torch.isfinite(g2).all():
                raise ValueError(f"the reverse SDE of {self.process!r} is singular on this grid (g2 is infinite "
                                 f"at t={ts[:-1][~torch.isfinite(g2)].unique().tolist()}); start at t_start < T "
                                 "or use predictor='reverse_diffusion' or 'ancestral'")

    @classmethod
    def nfe(cls, steps: int, *, corrector="langevin", n_corrector=1, **options) -> int:
        return steps * (1 + (n_corrector if corrector == "langevin" else 0))

    def predict(self, i, x):
        """The predictor step from ``grid[i]`` to ``grid[i+1]`` (1 NFE, in place)."""
        p, q = self.grid[i], self.grid[i + 1]
        out = self.evaluate(x, p)
        noise_at = (p.sigma, q.sigma)
        if self.predictor == "ancestral":
            one_minus = -expm1(-2 * (q.lam - p.lam))
            cx = (p.alpha / q.alpha) * (q.sigma / p.sigma) ** 2
            c0 = q.alpha * one_minus
            term, a0, b0 = self.x0_view(x, out, p)
            return self.update(x, [term], [cx + c0 * a0, c0 * b0], q.sigma * sqrt(one_minus),
                               out=x, noise_at=noise_at)
        term, a, b = self.score_view(x, out, p)
        if self.predictor == "reverse_diffusion":
            r = p.alpha / q.alpha
            G2 = -(p.sigma ** 2) * expm1(-2 * (q.lam - p.lam))
            return self.update(x, [term], [2 - r + G2 * a, G2 * b], sqrt(G2), out=x, noise_at=noise_at)
        h = q.t - p.t  # euler_maruyama on dx = [f x - g2 score] dt + g dW
        return self.update(x, [term], [1 + h * (p.f - p.g2 * a), -h * p.g2 * b], sqrt(-h * p.g2),
                           out=x, noise_at=noise_at)

    def correct(self, x, q):
        """One Langevin corrector step at ``q`` (1 NFE, in place)."""
        term, a, b = self.masked_score(x, q)
        alpha_i = exp(2 * q.f * (self.process.T / _REFERENCE_SCALES))
        noise = self.noise.draw(x, q.sigma, q.sigma) if self.noise is not None else {}
        if not noise:
            raise ValueError(f"solver {self.name!r} needs noise but no noise source was given")
        differentiable = torch.is_grad_enabled() and (x.requires_grad or term.requires_grad)
        return langevin_update(x, term, (a, b), snr=self.snr, alpha_i=alpha_i, norm=self.norm,
                               out=None if differentiable else x, backend=self.backend, **noise)

    def step(self, i, x):
        x = self.predict(i, x)
        q = self.grid[i + 1]
        if _scalar_zero(q.sigma):
            return x
        for _ in range(self.n_corrector):
            x = self.correct(x, q)
        return x


class AnnealedLangevin(_ScoreSolver):
    """Annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1).

    Step ``i`` runs ``n_steps_each`` Langevin steps targeting ``q_t`` at ``t = grid[i+1]``
    (the levels after the starting one, ending at ``t_end``). Levels are the effective noise
    ``s = sigma/alpha`` (``x/alpha = x0 + s eps`` is a VE process), and Algorithm 1's step
    ``a_i = step_lr (s_i / s_L)^2`` on ``x/alpha`` is, on ``x``,
    ``x <- x + (eta/2) score(x, t) + sqrt(eta) z`` with ``eta = alpha^2 a_i = step_lr sigma^2 / s_L^2``
    (``s_L`` the level at ``t_end``, which must be > 0). For VE this is Algorithm 1 itself.
    ``step_lr`` defaults to ``0.2 s_L^2`` (Song & Ermon's 2e-5 at their ``s_L = 0.01``: the
    same ratio at any final level). An MCMC scheme rather than an SDE discretisation (order 1
    is nominal: it is exact only as the levels and the steps per level grow); ``n_steps_each``
    NFE per step. Options: ``n_steps_each`` (>= 1), ``step_lr`` (> 0).

    ``n_steps_each`` defaults to 5, Song & Ermon's own setting in "Improved Techniques for Training
    Score-Based Generative Models" (2020, Technique 4 and its configurations: T = 5 Langevin steps
    per level); their 2019 paper's T = 100 is for 10 levels. One step per level does not mix: on the
    8-Gaussian ring (100 levels, 2,000 samples) it gives a KL of 1.9 (VE), 2.5 (VP) and 7.3 (EDM)
    nats where five give 0.05, 0.14 and 0.08.
    """

    name = "ald"
    nfe_per_step = 5

    def __init__(self, model, ts, *, n_steps_each=5, step_lr=None, **kwargs):
        self.n_steps_each = _count(n_steps_each, "n_steps_each", 1)
        if step_lr is not None:
            step_lr = _positive(step_lr, "step_lr")
        super().__init__(model, ts, **kwargs)
        last = self.grid[-1]
        sigma_end = last.sigma if isinstance(last.sigma, torch.Tensor) else torch.tensor(last.sigma)
        if not bool((sigma_end > 0).all()):
            raise ValueError("ald needs sigma(t_end) > 0 (its step sizes are relative to the last noise level); "
                             "end at t_end > 0")
        s_L2 = (last.sigma / last.alpha) ** 2
        self.step_ratio = 0.2 if step_lr is None else step_lr / s_L2  # eta = step_ratio * sigma^2

    @classmethod
    def nfe(cls, steps: int, *, n_steps_each=5, **options) -> int:
        return steps * n_steps_each

    def step(self, i, x):
        q = self.grid[i + 1]
        eta = self.step_ratio * q.sigma ** 2
        for _ in range(self.n_steps_each):
            term, a, b = self.masked_score(x, q)
            x = self.update(x, [term], [1 + eta / 2 * a, eta / 2 * b], sqrt(eta), out=x,
                            noise_at=(q.sigma, q.sigma))
        return x
