"""SEEDS: stochastic explicit exponential derivative-free solvers (Gonzalez et al. 2023)."""
import torch

from genflow.solvers.base import Solver, exp, expm1, point, sqrt

__all__ = ["ExpHeun2X0", "SEEDS1", "SEEDS2", "SEEDS3"]


class _Seeds(Solver):
    """Shared machinery: stage points at ``lambda + r h``, the data-prediction stages and the noise
    chained across the stages (each stage's noise is the previous one's, decayed, plus a fresh draw).

    With churn ``eta`` (``H = (1 + eta) h``), a stage from ``(x, t)`` to log-SNR ``lambda + r h`` is
    ``x_r = (sigma_r/sigma) e^{-eta r h} x - alpha_r [combination of x0's] + sigma_r n_r`` with
    ``n_r = e^{-eta (r - r_prev) h} n_{r_prev} + sqrt(1 - e^{-2 eta (r - r_prev) h}) z`` (``n_0 = 0``).
    The previous stage's noise is read back from its state (``sigma_r n_r`` is the state minus its
    deterministic part), so every stage is one fused update with one fresh draw.
    """

    stochastic = True
    default_eta = 1.0

    def __init__(self, model, ts, **kwargs):
        super().__init__(model, ts, **kwargs)
        if bool(torch.as_tensor(self.grid[0].alpha == 0).any()):
            raise ValueError(f"{self.name} needs alpha > 0 at the start (finite log-SNR); start at t_start < T")

    def off_grid_points(self, fractions):
        """The ``Point`` at ``lambda + r h`` of every step for each stage fraction ``r < 1`` (dicts
        ``{r: Point}``, None for a step to ``sigma' = 0``), on the host once per solve: a step reads
        them (traceable by torch.compile)."""
        points = []
        for p, q in zip(self.grid[:-1], self.grid[1:]):
            h = q.lam - p.lam
            points.append(None if not isinstance(q.sigma, torch.Tensor) and q.sigma == 0 else {
                r: point(self.process, self.process.t_from_log_snr(torch.as_tensor(p.lam + r * h, dtype=torch.float64)))
                for r in fractions})
        return points

    def data_prediction(self, x, p):
        term, a, b = self.x0_view(x, self.evaluate(x, p), p)
        return term if not isinstance(a, torch.Tensor) and (a, b) == (0.0, 1.0) else self.update(x, [term], [a, b])

    def stage(self, x, p, q, h, r, weights, x0s, previous):
        """The state at ``lambda + r h`` (its ``Point`` ``q``) and ``q``, from ``x`` at ``p``.

        ``weights`` multiply ``-alpha_r`` times the ``x0s``; ``previous`` is None or
        ``(state, r_prev, point_prev, [(coefficient, term)] of its deterministic part)``."""
        eta = self.eta
        cx = q.sigma / p.sigma * exp(-eta * r * h)
        terms, coefs = list(x0s), [-q.alpha * w for w in weights]
        r_prev = 0.0 if previous is None else previous[1]
        decay = exp(-eta * (r - r_prev) * h)
        if previous is not None and eta > 0:  # sigma_r e^{..} n_prev = (sigma_r/sigma_prev) e^{..} (state - det)
            state, _, p_prev, det = previous
            k = q.sigma / p_prev.sigma * decay
            terms.append(state)
            coefs.append(k)
            cx = cx - k * det[0]
            for j, c in enumerate(det[1:]):
                coefs[j] = coefs[j] - k * c
        noise = q.sigma * sqrt(-expm1(-2 * eta * (r - r_prev) * h)) if eta > 0 else 0.0
        out = self.update(x, terms, [cx] + coefs, noise, noise_at=(p.sigma, q.sigma))
        return out, q, [q.sigma / p.sigma * exp(-eta * r * h)] + [-q.alpha * w for w in weights]

    def step(self, i, x):
        p, q = self.grid[i], self.grid[i + 1]
        x0 = self.data_prediction(x, p)
        if not isinstance(q.sigma, torch.Tensor) and q.sigma == 0:
            return self.update(x, [x0], [0.0, q.alpha], out=x)
        h = q.lam - p.lam
        H = (1 + self.eta) * h
        x0s, previous = [x0], None
        stages = self.tableau(h, H)
        for k, (r, weights) in enumerate(stages):
            end = q if r >= 1 else self.stage_points[i][r]
            state, s, det = self.stage(x, p, end, h, r, weights, x0s, previous)
            if k == len(stages) - 1:  # in place, unless autograd still needs x
                return state if torch.is_grad_enabled() and state.requires_grad else x.copy_(state)
            x0s.append(self.data_prediction(state, s))
            previous = (state, r, s, det + [0.0] * (len(x0s) - len(det)))


def _phi1(z):
    """``expm1(z)`` (the exponential integrator's ``h phi_1``)."""
    return expm1(z)


def _phi2(z):
    """``(expm1(z) - z)/z`` (``h phi_2``)."""
    return (expm1(z) - z) / z


class SEEDS1(_Seeds):
    """SEEDS-1 (Gonzalez et al. 2023, "SEEDS: Exponential SDE Solvers for Fast High-Quality Sampling
    from Diffusion Models", the first-order data-prediction solver).

    With ``H = (1 + eta) h``: ``x' = (sigma'/sigma) e^{-eta h} x - alpha' expm1(-H) x0 +
    sigma' sqrt(1 - e^{-2 eta h}) z``. ``eta = 1`` (default) is the exact exponential integrator of the
    reverse SDE with ``x0`` frozen over the step (SDE-DPM-Solver++(1), DDPM's posterior step);
    ``eta = 0`` is DDIM. Weak order 1 (order 1 at ``eta = 0``), 1 NFE per step; a step to
    ``sigma' = 0`` returns ``alpha' x0``.
    """

    name = "seeds_1"

    def tableau(self, h, H):
        return [(1, [_phi1(-H)])]


class SEEDS2(_Seeds):
    """SEEDS-2 (Gonzalez et al. 2023, "SEEDS: Exponential SDE Solvers for Fast High-Quality Sampling
    from Diffusion Models", data-prediction stage 2), as ComfyUI's ``sample_seeds_2``.

    With ``H = (1 + eta) h``: ``x_1 = (sigma_1/sigma) e^{-eta r h} x - alpha_1 expm1(-r H) x0 +
    sigma_1 n_1`` at ``lambda + r h`` (``r = 1/2``), then
    ``x' = (sigma'/sigma) e^{-eta h} x - alpha' expm1(-H) [(1 - 1/(2r)) x0 + x0_1/(2r)] + sigma' n'``
    (``solver_type="phi_1"``, default) or ``- alpha' [(expm1(-H) - b) x0 + b x0_1]``,
    ``b = (expm1(-H) + H)/(-H r)`` (``"phi_2"``); the noise chained as ``_Seeds`` says. ``eta = 0``
    is DPM-Solver++(2S) (``"phi_1"``). Order 2 at ``eta = 0``, 2 NFE per step; a step to
    ``sigma' = 0`` returns ``alpha' x0`` (1 NFE).
    """

    name = "seeds_2"
    order = 2
    nfe_per_step = 2
    order_test_options = ({}, {"solver_type": "phi_2"})

    def __init__(self, model, ts, *, r: float = 0.5, solver_type: str = "phi_1", **kwargs):
        super().__init__(model, ts, **kwargs)
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 < r < 1.0:
            raise ValueError(f"r must be a number in (0, 1), got {r!r}")
        if solver_type not in ("phi_1", "phi_2"):
            raise ValueError(f"solver_type must be 'phi_1' or 'phi_2', got {solver_type!r}")
        self.r, self.solver_type = float(r), solver_type
        self.stage_points = self.off_grid_points((self.r,))

    def tableau(self, h, H):
        r = self.r
        if self.solver_type == "phi_1":
            fac = 1 / (2 * r)
            last = [_phi1(-H) * (1 - fac), _phi1(-H) * fac]
        else:
            b2 = _phi2(-H) / r
            last = [_phi1(-H) - b2, b2]
        return [(r, [_phi1(-r * H)]), (1, last)]


class SEEDS3(_Seeds):
    """SEEDS-3 (Gonzalez et al. 2023, data-prediction stage 3), as ComfyUI's ``sample_seeds_3``.

    Stages at ``lambda + r_1 h`` and ``lambda + r_2 h`` (``r_1, r_2 = 1/3, 2/3``), ``H = (1 + eta) h``:
    ``x_1 = (sigma_1/sigma) e^{-eta r_1 h} x - alpha_1 expm1(-r_1 H) x0 + sigma_1 n_1``,
    ``x_2 = (sigma_2/sigma) e^{-eta r_2 h} x - alpha_2 [(expm1(-r_2 H) - a) x0 + a x0_1] + sigma_2 n_2``,
    ``a = (r_2/r_1) phi_2(-r_2 H)``, ``x' = (sigma'/sigma) e^{-eta h} x - alpha' [(expm1(-H) - b) x0 +
    b x0_2] + sigma' n'``, ``b = phi_2(-H)/r_2`` (``phi_2(z) = (expm1(z) - z)/z``), the noise
    chained as ``_Seeds`` says. ``eta = 0`` is DPM-Solver++(3S). Order 3 at ``eta = 0``, 3 NFE per
    step; a step to ``sigma' = 0`` returns ``alpha' x0`` (1 NFE).
    """

    name = "seeds_3"
    order = 3
    nfe_per_step = 3

    def __init__(self, model, ts, *, r_1: float = 1 / 3, r_2: float = 2 / 3, **kwargs):
        super().__init__(model, ts, **kwargs)
        for name, value in (("r_1", r_1), ("r_2", r_2)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
                raise ValueError(f"{name} must be a number in (0, 1), got {value!r}")
        if not r_1 < r_2:
            raise ValueError(f"r_1 must be < r_2, got r_1={r_1}, r_2={r_2}")
        self.r_1, self.r_2 = float(r_1), float(r_2)
        self.stage_points = self.off_grid_points((self.r_1, self.r_2))

    def tableau(self, h, H):
        r1, r2 = self.r_1, self.r_2
        a = r2 / r1 * _phi2(-r2 * H)
        b = _phi2(-H) / r2
        return [(r1, [_phi1(-r1 * H)]), (r2, [_phi1(-r2 * H) - a, a]), (1, [_phi1(-H) - b, 0.0, b])]


class ExpHeun2X0(_Seeds):
    """Exponential Heun in data prediction and log-SNR time (ComfyUI's ``sample_exp_heun_2_x0``):
    SEEDS-2 (Gonzalez et al. 2023) at ``eta = 0`` with its stage at the end of the step (``r = 1``).

    ``x~ = (sigma'/sigma) x - alpha' expm1(-h) x0`` (DPM-Solver++(1) to ``t'``), then
    ``x' = (sigma'/sigma) x - alpha' [(expm1(-h) - b) x0 + b x0(x~, t')]`` with
    ``b = phi_2(-h) = (expm1(-h) + h)/(-h)`` (``solver_type="phi_2"``, default) or
    ``b = expm1(-h)/2`` (``"phi_1"``, the trapezoid). Order 2, 2 NFE per step; a step to
    ``sigma' = 0`` returns ``alpha' x0`` (1 NFE).
    """

    name = "exp_heun_2_x0"
    order = 2
    nfe_per_step = 2
    stochastic = False
    default_eta = None
    order_test_options = ({}, {"solver_type": "phi_1"})

    def __init__(self, model, ts, *, solver_type: str = "phi_2", **kwargs):
        super().__init__(model, ts, **kwargs)
        if solver_type not in ("phi_1", "phi_2"):
            raise ValueError(f"solver_type must be 'phi_1' or 'phi_2', got {solver_type!r}")
        self.solver_type = solver_type
        self.eta = 0.0  # the deterministic member of the SEEDS family

    def tableau(self, h, H):
        b = _phi1(-H) / 2 if self.solver_type == "phi_1" else _phi2(-H)
        return [(1, [_phi1(-H)]), (1, [_phi1(-H) - b, b])]
