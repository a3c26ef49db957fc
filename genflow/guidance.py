"""Guidance as an operator on models: a guided ``Model`` that every solver (ODE or SDE) runs as is.

A guidance operator combines two models of the same process, a strong one (``cond``: the
conditional model, or the good model of AutoGuidance) and a weak one (``uncond``: the
unconditional model, or the bad model), into one ``genflow.Model`` of ``cond``'s prediction
kind. Solvers call it like any model, so guidance needs no per-sampler code:

    cfg          u + w (c - u)                                  Ho & Salimans 2022
                 (``guided``: one network, two conditionings)
    rescaled     phi g std(c)/std(g) + (1 - phi) g, g = cfg       Lin et al. 2024, eqs. 15-16
    apg          c + (w - 1)(d_perp + eta d_par), d = c - u      Sadat et al. 2024
                 (momentum, norm threshold, projection onto c)
    cfg_zero_star  s u + w (c - s u), s = <c, u>/||u||^2;       Fan et al. 2025
                 zero velocity for the first noise levels
    autoguidance D_weak + w (D_good - D_weak)                    Karras et al. 2024
    cfg_pp       CFG++ via its per-step scale (see ``cfg_pp``)   Chung et al. 2024

Every operator takes ``interval=(sigma_lo, sigma_hi)`` (Kynkaenniemi et al. 2024): guidance only
where ``sigma(t)`` is in the interval, the conditional model alone (one NFE) elsewhere.

Stateful operators (APG's momentum, CFG-Zero*'s zero-init) keep their state per solve in a
``NoiseLevels`` tracker: the state advances once per distinct noise level, in decreasing time.
A later evaluation at a level already visited (a multi-stage solver's stage that ends where the
next step starts, Langevin corrector steps) recomputes that level from the state before it, so
every level counts once whatever the number of stages; an evaluation above the previous time
starts a new solve and resets the state, which every call of ``gf.sample`` does (its solves
start at their highest time). Adaptive solvers that retry a rejected step at a higher time, and
samplers that raise the noise level within a solve, reset the state there.
"""
import math
from typing import Optional

import torch

from genflow._checks import check_int, check_real
from genflow.models import KINDS, Model, conversion

__all__ = ["GuidedModel", "NoiseLevels", "apg", "autoguidance", "cfg", "cfg_pp", "cfg_zero_star", "guided",
           "rescaled_cfg"]


def _column(coef, x: torch.Tensor):
    """A float or [B] float64 coefficient shaped to broadcast against x, in x's dtype."""
    if not isinstance(coef, torch.Tensor):
        return coef
    return coef.to(x.dtype).reshape((-1,) + (1,) * (x.dim() - 1))


def _rows(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A bool [B] mask shaped to select whole samples of x."""
    return mask.reshape((-1,) + (1,) * (x.dim() - 1))


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample inner product over all but the batch dimension, shaped [B, 1, ...]."""
    return (a * b).reshape(a.shape[0], -1).sum(1).reshape((-1,) + (1,) * (a.dim() - 1))


def _check_model(name: str, model) -> Model:
    if not isinstance(model, Model):
        raise TypeError(f"{name} must be a genflow.Model, got {type(model).__name__}")
    return model


def _check_kind(name: str, kind, allow_none: bool = True):
    if kind is None and allow_none:
        return None
    if kind not in KINDS:
        raise ValueError(f"{name} must be one of {KINDS}{' or None' if allow_none else ''}, got {kind!r}")
    return kind


def _check_interval(interval):
    if interval is None:
        return None
    try:
        lo, hi = (float(v) for v in interval)
    except (TypeError, ValueError):
        raise TypeError(f"interval must be None or a pair (sigma_lo, sigma_hi), got {interval!r}") from None
    if not (0.0 <= lo <= hi) or math.isnan(hi):
        raise ValueError(f"interval must satisfy 0 <= sigma_lo <= sigma_hi, got {interval!r}")
    return lo, hi


class NoiseLevels:
    """Per-solve state over the distinct noise levels a solver visits (see the module docstring).

    ``visit(t)`` (float64 [B] process times) returns, per sample, the 0-based index of ``t``'s
    level in the current solve: the previous index for a repeat of the previous time, the next
    one for a lower time, 0 for a higher time (a new solve). ``previous(like)`` is the value
    committed before the current level (zeros where a solve starts) and ``commit(value,
    previous)`` stores the current level's value."""

    def __init__(self):
        self.last_t = self.index = self.restart = self.repeat = None
        self.value = self.before = None

    def visit(self, t: torch.Tensor) -> torch.Tensor:
        if self.last_t is None or self.last_t.shape != t.shape or self.last_t.device != t.device:
            self.last_t, self.index = torch.full_like(t, math.inf), torch.full_like(t, -1, dtype=torch.long)
            self.value = self.before = None
        self.restart, self.repeat = t > self.last_t, t == self.last_t
        self.index = torch.where(self.restart, 0, torch.where(self.repeat, self.index, self.index + 1))
        self.last_t = t.clone()
        return self.index

    def previous(self, like: torch.Tensor) -> torch.Tensor:
        if self.value is None or self.value.shape != like.shape:
            return torch.zeros_like(like)
        prev = torch.where(_rows(self.repeat, like), self.before, self.value)
        return torch.where(_rows(self.restart, like), 0.0, prev)

    def commit(self, value: torch.Tensor, previous: torch.Tensor):
        self.before, self.value = previous, value


class GuidedModel(Model):
    """A ``Model`` whose prediction combines ``cond``'s and ``uncond``'s by ``rule``.

    ``rule(c, u, x, t) -> guided`` gets both predictions in the rule's working ``kind`` (the
    model's own kind when None) at float64 [B] process times ``t``; the result is converted back
    to ``cond``'s kind. Outside ``interval`` (on ``sigma``) only ``cond`` is evaluated."""

    def __init__(self, cond: Model, uncond: Model, rule, kind: Optional[str], interval):
        _check_model("cond", cond)
        _check_model("uncond", uncond)
        if uncond.process is not cond.process and uncond.process.cache_key() != cond.process.cache_key():
            raise ValueError(f"uncond must use cond's process {cond.process!r}, got {uncond.process!r}")
        super().__init__(self._combine, cond.process, cond.prediction)
        self.branches = (cond, uncond)
        self.rule = rule
        self.kind = cond.prediction if kind is None else kind
        self.interval = _check_interval(interval)

    def __repr__(self):
        return f"GuidedModel({self.rule!r}, cond={self.branches[0]!r}, uncond={self.branches[1]!r})"

    def net_time(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def prepare_time(self, t, x: torch.Tensor) -> torch.Tensor:
        """The process time as float64 [B] (each branch maps it to its own network's time)."""
        t = torch.as_tensor(t, dtype=torch.float64, device=x.device)
        return t.expand(x.shape[0]) if t.dim() == 0 else t

    def _predict(self, model: Model, x, t, kind: str, cond: dict) -> torch.Tensor:
        out = model.call(x, model.prepare_time(t, x), **cond)
        if kind == model.prediction:
            return out
        a, b = model.coefficients(kind, t)
        return _column(a, x) * x + _column(b, x) * out

    def _combine(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        strong, weak = self.branches
        if self.interval is not None:
            sigma = self.process.sigma(t)
            inside = (sigma >= self.interval[0]) & (sigma <= self.interval[1])
            if not bool(inside.any()):
                return self._predict(strong, x, t, self.prediction, cond)
        c = self._predict(strong, x, t, self.kind, cond)
        u = self._predict(weak, x, t, self.kind, cond)
        guided = self.rule(c, u, x, t)
        if self.kind != self.prediction:
            p = self.process
            a, b = conversion(self.kind, self.prediction, p.alpha(t), p.sigma(t), p.dalpha(t), p.dsigma(t))
            guided = _column(a, x) * x + _column(b, x) * guided
            if self.interval is not None:
                c = _column(a, x) * x + _column(b, x) * c
        if self.interval is not None and not bool(inside.all()):
            guided = torch.where(_rows(inside, x), guided, c)
        return guided


def _scale(scale) -> float:
    return check_real("scale", scale)


class _CFG:
    def __init__(self, scale):
        self.scale = _scale(scale)

    def __repr__(self):
        return f"cfg(scale={self.scale})"

    def __call__(self, c, u, x, t):
        return torch.lerp(u, c, self.scale)


def cfg(cond: Model, uncond: Model, scale: float, *, interval=None) -> GuidedModel:
    """Classifier-free guidance (Ho & Salimans 2022, "Classifier-Free Diffusion Guidance"): ``u + w (c - u)``.

    Linear at fixed ``x_t``, hence the same guidance in every prediction kind; 2 NFE per model
    call (1 outside ``interval``). ``scale = 1`` is ``cond``, ``scale = 0`` is ``uncond``."""
    return GuidedModel(cond, uncond, _CFG(scale), None, interval)


def guided(model: Model, *, cond: Optional[dict] = None, uncond: Optional[dict] = None, scale: float = 1.0) -> Model:
    """Classifier-free guidance of one network under two conditionings (``gf.guided``): ``cfg``
    of ``model`` with the keyword arguments ``cond`` and with ``uncond`` for ``net`` (over the
    model's own defaults), ``u + scale (c - u)`` in the model's own kind (Ho & Salimans 2022).
    ``scale = 1`` returns the conditional model and ``scale = 0`` the unconditional one (1 NFE);
    otherwise 2 NFE per call."""
    _check_model("model", model)
    scale = _scale(scale)
    branches = []
    for extra in (cond, uncond):
        branch = Model(model.net, model.process, model.prediction, time=model.time)
        branch.cond = {**model.cond, **dict(extra or {})}
        branches.append(branch)
    if scale in (0.0, 1.0):
        return branches[0] if scale == 1.0 else branches[1]
    return cfg(branches[0], branches[1], scale)


def autoguidance(good: Model, weak: Model, scale: float, *, interval=None) -> GuidedModel:
    """AutoGuidance (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of
    Itself"): ``D = D_weak + w (D_good - D_weak)`` with a weaker model (smaller or less
    trained, same conditioning) in place of the unconditional one. 2 NFE per call."""
    return GuidedModel(good, weak, _CFG(scale), None, interval)


class _Rescaled:
    def __init__(self, scale, phi):
        self.scale = _scale(scale)
        self.phi = check_real("phi", phi, low=0.0, high=1.0)

    def __repr__(self):
        return f"rescaled_cfg(scale={self.scale}, phi={self.phi})"

    def __call__(self, c, u, x, t):
        g = torch.lerp(u, c, self.scale)
        flat_c, flat_g = c.reshape(c.shape[0], -1), g.reshape(g.shape[0], -1)
        ratio = flat_c.std(dim=1, correction=0) / flat_g.std(dim=1, correction=0)
        rescaled = g * ratio.reshape((-1,) + (1,) * (g.dim() - 1))
        return self.phi * rescaled + (1 - self.phi) * g


def rescaled_cfg(cond: Model, uncond: Model, scale: float, *, phi: float = 0.7, kind: Optional[str] = None,
                 interval=None) -> GuidedModel:
    """Rescaled CFG (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are
    Flawed", eqs. 15-16): with ``g = u + w (c - u)`` in prediction ``kind`` (default the
    model's own, as diffusers' ``rescale_noise_cfg``; ``"x0"`` or ``"v"`` as in the paper),
    ``g_r = g std(c)/std(g)`` per sample and the result ``phi g_r + (1 - phi) g``. 2 NFE."""
    return GuidedModel(cond, uncond, _Rescaled(scale, phi), _check_kind("kind", kind), interval)


class _APG:
    def __init__(self, scale, eta, norm_threshold, momentum):
        self.scale = _scale(scale)
        self.eta = check_real("eta", eta)
        self.norm_threshold = None if norm_threshold is None else check_real(
            "norm_threshold", norm_threshold, low=0.0, low_open=True)
        self.momentum = check_real("momentum", momentum)
        self.levels = NoiseLevels()

    def __repr__(self):
        return f"apg(scale={self.scale}, eta={self.eta}, norm_threshold={self.norm_threshold}, momentum={self.momentum})"

    def __call__(self, c, u, x, t):
        diff = c - u
        if self.momentum != 0.0:
            self.levels.visit(t)
            previous = self.levels.previous(diff)
            diff = diff + self.momentum * previous
            self.levels.commit(diff, previous)
        if self.norm_threshold is not None:
            norm = _dot(diff, diff).sqrt()
            diff = diff * torch.clamp(self.norm_threshold / norm, max=1.0)
        parallel = _dot(diff, c) / _dot(c, c) * c
        return c + (self.scale - 1) * (diff - parallel + self.eta * parallel)


def apg(cond: Model, uncond: Model, scale: float, *, eta: float = 0.0, norm_threshold: Optional[float] = None,
        momentum: float = 0.0, kind: str = "x0", interval=None) -> GuidedModel:
    """Adaptive projected guidance (Sadat et al. 2024, "Eliminating Oversaturation and
    Artifacts of High Guidance Scales in Diffusion Models"), on the ``x0``
    prediction by default (the paper's choice):

        d = c - u;  d <- d + beta d_prev (momentum, per noise level);  d <- d min(1, r/||d||);
        d_par = <d, c>/<c, c> c;  result = c + (w - 1)(d - d_par + eta d_par)

    ``eta`` weights the component parallel to ``c`` (0: the paper's recommendation), ``r`` is
    ``norm_threshold`` (None: off), ``beta`` is ``momentum`` (the paper uses negative values;
    0: stateless). The momentum state is per solve (``NoiseLevels``). 2 NFE per call."""
    return GuidedModel(cond, uncond, _APG(scale, eta, norm_threshold, momentum), _check_kind("kind", kind, False),
                       interval)


class _ZeroStar:
    def __init__(self, scale, zero_init_steps):
        self.scale = _scale(scale)
        self.zero_init_steps = check_int("zero_init_steps", zero_init_steps, low=0)
        self.levels = NoiseLevels()

    def __repr__(self):
        return f"cfg_zero_star(scale={self.scale}, zero_init_steps={self.zero_init_steps})"

    def __call__(self, c, u, x, t):
        s = _dot(c, u) / (_dot(u, u) + 1e-8)
        guided = s * u + self.scale * (c - s * u)
        if self.zero_init_steps > 0:
            first = self.levels.visit(t) < self.zero_init_steps
            guided = torch.where(_rows(first, x), 0.0, guided)
        return guided


def cfg_zero_star(cond: Model, uncond: Model, scale: float, *, zero_init_steps: int = 1,
                  interval=None) -> GuidedModel:
    """CFG-Zero* (Fan et al. 2025, "CFG-Zero*: Improved Classifier-Free Guidance for Flow
    Matching Models"), on the velocity prediction: ``s* = <v_c, v_u>/||v_u||^2``
    per sample and ``v = s* v_u + w (v_c - s* v_u)``; zero-init: velocity 0 (the state does
    not move) at the first ``zero_init_steps`` noise levels of every solve (``NoiseLevels``).
    2 NFE per call."""
    return GuidedModel(cond, uncond, _ZeroStar(scale, zero_init_steps), "velocity", interval)


class _CFGPlusPlus:
    def __init__(self, scale, process, grid, eta):
        self.scale = check_real("scale", scale, low=0.0)
        self.eta = check_real("eta", eta, low=0.0, high=1.0)
        if not isinstance(grid, torch.Tensor) or grid.dim() != 1 or grid.shape[0] < 2:
            raise ValueError(f"grid must be the sampling grid, a 1-D tensor of >= 2 times (gf.time_grid), got "
                             f"{grid if not isinstance(grid, torch.Tensor) else tuple(grid.shape)}")
        grid = grid.detach().to("cpu", torch.float64)
        if not bool((grid[1:] < grid[:-1]).all()):
            raise ValueError("grid must be strictly decreasing (noise to data)")
        h = process.log_snr(grid[1:]) - process.log_snr(grid[:-1])
        r = torch.sqrt(1 - self.eta ** 2 * -torch.expm1(-2 * h))
        self.grid = grid
        self.weights = self.scale / (1 - torch.exp(-h) * r)  # per step; 1 / (1 - 0) = 1 into sigma = 0

    def __repr__(self):
        return f"cfg_pp(scale={self.scale}, steps={self.grid.shape[0] - 1}, eta={self.eta})"

    def __call__(self, c, u, x, t):
        lo, hi = float(self.grid[-1]), float(self.grid[0])
        outside = (t < lo - 1e-9 * abs(lo)) | (t > hi + 1e-9 * abs(hi))
        if bool(outside.any()):
            raise ValueError(f"cfg_pp was built for the grid from t={hi:.6g} to t={lo:.6g} but the model was "
                             f"evaluated at t={float(t[outside][0]):.6g}: pass the same grid to gf.sample as schedule=")
        step = torch.searchsorted(-self.grid[:-1].to(t.device), -t, right=True) - 1
        w = self.weights.to(t.device)[step.clamp(0, self.weights.shape[0] - 1)]
        return u + _column(w, x) * (c - u)


def cfg_pp(cond: Model, uncond: Model, scale: float, grid: torch.Tensor, *, eta: float = 0.0,
           interval=None) -> GuidedModel:
    """CFG++ (Chung et al. 2024, "CFG++: Manifold-constrained Classifier Free Guidance")
    as an operator for the sampling ``grid`` (the times ``gf.sample`` steps
    through: pass the same grid as ``schedule=grid``).

    CFG++ takes a DDIM step with ``x0`` from the guided prediction ``eps_u + lambda (eps_c -
    eps_u)`` and the renoising ``eps`` from the unconditional one:
    ``x' = alpha' x0_lambda + sigma' r eps_u + c z`` (``r``, ``c``: DDIM's churn split for
    ``eta``). Writing ``eps_u`` through the guided prediction, this is exactly DDIM with plain
    CFG at the per-step scale ``w_i = lambda / (1 - e^{-h_i} r_i)``, ``h_i = lambda_{i+1} -
    lambda_i`` (log-SNR). So CFG++ is CFG with that scale on the step ``t_i -> t_{i+1}``:
    equal to the paper's update for ``ddim`` (and ``euler_ancestral``, which is DDIM) with the
    same ``eta``, to ComfyUI's ``euler_cfg_pp`` for ``euler`` on EDM/VE processes (where Euler
    is DDIM), and the definition of CFG++ for every other solver, ODE or SDE. Evaluations at
    a time in ``(t_{i+1}, t_i]`` use step ``i``'s scale. ``scale`` is ``lambda`` (the paper
    uses 0 to 1). 2 NFE per call."""
    rule = _CFGPlusPlus(scale, _check_model("cond", cond).process, grid, eta)
    return GuidedModel(cond, uncond, rule, None, interval)
