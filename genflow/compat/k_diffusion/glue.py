"""The glue between k-diffusion's calling convention and genflow's native solvers.

A k-diffusion denoiser ``model(x, sigma, **extra_args) -> D(x, sigma)`` is a ``gf.Model``
predicting ``x0`` under ``gf.EDM`` (time = noise level), and its ``sigmas`` are an explicit time
grid. ``Plan`` holds what a sampler needs of one ``sigmas`` tensor and option set: the native
grid (with k-diffusion's ancestral targets ``sigma_down`` or churned levels ``sigma_hat``
interleaved where its samplers step to them), the native step index of each k-diffusion step
and the host scalars of the noise it adds after or before the step. Plans are cached by the
values of ``sigmas`` and the options, so a repeated call reuses the same grid tensor and with it
the solvers' packed step coefficients. ``run`` steps a native solver over a plan.
"""
from collections.abc import Mapping
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from genflow._cache import LRU, tensor_key
from genflow._checks import check_real
from genflow.engine.loop import grid_steps
from genflow.models import Model
from genflow.processes import EDM

__all__ = ["Denoiser", "KStep", "Plan", "StepNoise", "cached_plan", "check_callables", "check_sigmas", "check_x",
           "default_noise", "plan", "run"]

STATE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def check_x(x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape [B, ...], got {type(x).__name__}")
    if x.dtype not in STATE_DTYPES:
        raise TypeError(f"x must be float32, float64, float16 or bfloat16, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError("x must have a batch dimension (shape [B, ...]), got a 0-dim tensor")


def check_sigmas(sigmas, sampler, *, decreasing):
    """A detached CPU copy of ``sigmas`` after checking it: a finite 1-D floating tensor,
    positive except for a final 0, strictly decreasing for the samplers that need it."""
    host = host_sigmas(sigmas)
    check_sigma_values(host, sampler, decreasing)
    return host


def host_sigmas(sigmas):
    """``sigmas`` (checked to be a 1-D floating tensor of two or more entries) on the CPU."""
    if not isinstance(sigmas, torch.Tensor) or not sigmas.is_floating_point():
        got = sigmas.dtype if isinstance(sigmas, torch.Tensor) else type(sigmas).__name__
        raise TypeError(f"sigmas must be a 1-D floating tensor (e.g. from get_sigmas_karras), got {got}")
    if sigmas.dim() != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas must be 1-D with at least two entries, got shape {list(sigmas.shape)}")
    return sigmas.detach().cpu()


def check_sigma_values(host, sampler, decreasing):
    if not bool(torch.isfinite(host).all()):
        raise ValueError(f"sigmas must be finite, got {host.tolist()}")
    if bool((host[:-1] <= 0).any()) or bool(host[-1] < 0):
        raise ValueError(f"sigmas must be positive (only the last may be 0), got {host.tolist()}")
    if decreasing and bool((host[1:] >= host[:-1]).any()):
        raise ValueError(f"sigmas must be strictly decreasing for {sampler}, got {host.tolist()}")


def check_callables(model, extra_args, callback, noise_sampler=None):
    if not callable(model):
        raise TypeError(f"model must be a callable denoiser model(x, sigma, **extra_args), got {type(model).__name__}")
    if extra_args is not None and not isinstance(extra_args, Mapping):
        raise TypeError(f"extra_args must be None or a dict of keyword arguments for model, got {type(extra_args).__name__}")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be None or callable, got {type(callback).__name__}")
    if noise_sampler is not None and not callable(noise_sampler):
        raise TypeError(f"noise_sampler must be None or callable(sigma, sigma_next), got {type(noise_sampler).__name__}")


def as_state(t, like, what):
    """``t`` checked against (and cast to) the state ``like``'s shape, dtype and device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what} must return a tensor, got {type(t).__name__}")
    if t.shape != like.shape:
        raise ValueError(f"{what} must return a tensor of x's shape {list(like.shape)}, got {list(t.shape)}")
    if t.dtype != like.dtype or t.device != like.device:
        t = t.to(device=like.device, dtype=like.dtype)
    return t


class Denoiser:
    """k-diffusion's ``model(x, sigma * s_in, **extra_args)`` as a genflow network ``net(x, t)``
    under ``gf.EDM`` (``t = sigma``, prediction ``x0``). Before a step the driver sets ``pending``
    to k-diffusion's callback dict; the step's first evaluation completes it with ``denoised``
    and hands it to the callback."""

    def __init__(self, model, extra_args, callback):
        self.model = model
        self.extra = {} if extra_args is None else extra_args
        self.callback = callback
        self.pending = None

    def __call__(self, x, t):
        if t.dtype != x.dtype:
            t = t.to(x.dtype)  # k-diffusion's sigma * s_in has x's dtype
        den = as_state(self.model(x, t, **self.extra), x, "model")
        if self.pending is not None:
            info, self.pending = self.pending, None
            info["denoised"] = den
            self.callback(info)
        return den


_EDM = EDM(sigma_min=1e-300, sigma_max=1e300)  # sigma(t) = t, alpha = 1: k-diffusion's variables


def model_of(denoiser: Denoiser) -> Model:
    return Model(denoiser, _EDM, "x0")


class Plan(NamedTuple):
    """A sampler's grid and per-step host data (lists indexed by the k-diffusion step ``k``).

    ts: the native float64 grid.  grid: the sigmas (float64 CPU), the loop's grid.
    index: native step index of step ``k``.
    sigma_hat: the levels (tensors) the steps evaluate at, for the callback; None: ``sigmas[k]``.
    pre: churn scale ``sqrt(sigma_hat^2 - sigma^2)`` added before the step (0: none).
    post: ancestral noise scale ``sigma_up`` added after the step.
    draw: whether step ``k`` consumes a noise draw after the step (k-diffusion draws some
        it multiplies by 0, which the global RNG must see).
    """

    ts: torch.Tensor
    grid: torch.Tensor  # the sigmas in float64 on the CPU
    index: list
    sigma_hat: list
    pre: list
    post: list
    draw: list


_PLANS = LRU(256)


def plan(kind, sampler, sigmas, *options, decreasing=True) -> Plan:
    """The cached ``Plan`` of ``kind`` (``"grid"``, ``"churn"`` or ``"ancestral"``) for these
    sigmas (checked for ``sampler`` when first seen) and options."""
    host = host_sigmas(sigmas)
    key = (kind, decreasing, str(sigmas.device), tensor_key(host)) + options

    def build():
        check_sigma_values(host, sampler, decreasing)
        return _PLAN_KINDS[kind](sigmas, host, *options)
    return _PLANS.get_or_compute(key, build)


def cached_plan(key, build) -> Plan:
    """The plan stored under ``key`` (hashable values), built by ``build()`` when first seen."""
    return _PLANS.get_or_compute(key, build)


def _plain(sigmas, host, draw_rule=None):
    n = host.shape[0] - 1
    draw = [False] * n if draw_rule is None else [bool(host[k + 1] > 0) for k in range(n)]
    grid = host.to(torch.float64, copy=True)
    return Plan(grid, grid, list(range(n)), None, [0.0] * n, [0.0] * n, draw)


def _interleave(first, second):
    """``[first_0, second_0, first_1, second_1, ...]`` (steps go from ``first_k`` to ``second_k``)."""
    return torch.stack([first, second], dim=1).reshape(-1).to(torch.float64)


def _churn_plan(sigmas, host, s_churn, s_tmin, s_tmax):
    """Karras et al. (2022), Algorithm 2's churn: ``gamma = min(s_churn/N, sqrt 2 - 1)`` where
    ``s_tmin <= sigma <= s_tmax``, ``sigma_hat = (1 + gamma) sigma``; step ``k`` goes from
    ``sigma_hat_k`` to ``sigma_{k+1}`` after adding ``sqrt(sigma_hat^2 - sigma^2) z``."""
    n = host.shape[0] - 1
    gamma = min(s_churn / n, 2 ** 0.5 - 1)
    churned = [gamma > 0 and s_tmin <= float(host[k]) <= s_tmax for k in range(n)]
    if not any(churned):
        return _plain(sigmas, host)
    hats = [sigmas[k] * (gamma + 1) if churned[k] else sigmas[k] for k in range(n)]
    hat_host = torch.stack([h.detach().cpu() for h in hats])
    pre = [float((hat_host[k] ** 2 - host[k] ** 2) ** 0.5) if churned[k] else 0.0 for k in range(n)]
    return Plan(_interleave(hat_host, host[1:]), host.to(torch.float64, copy=True), [2 * k for k in range(n)], hats, pre, [0.0] * n, [False] * n)


def _ancestral_plan(sigmas, host, eta, draw_rule):
    """k-diffusion's ancestral split (``get_ancestral_step``): ``sigma_up = min(sigma',
    eta sqrt(sigma'^2 (sigma^2 - sigma'^2)/sigma^2))``, ``sigma_down = sqrt(sigma'^2 - sigma_up^2)``;
    step ``k`` goes from ``sigma_k`` to ``sigma_down_k``, then adds ``sigma_up z``. ``draw_rule``:
    ``"next"`` draws where ``sigma_{k+1} > 0``, ``"down"`` where ``sigma_down > 0``."""
    if not eta:
        return _plain(sigmas, host, draw_rule)
    s, s1 = host[:-1], host[1:]
    up = torch.minimum(s1, eta * (s1 ** 2 * (s ** 2 - s1 ** 2) / s ** 2) ** 0.5)
    down = (s1 ** 2 - up ** 2) ** 0.5
    n = s.shape[0]
    draw = (s1 > 0) if draw_rule == "next" else (down > 0)
    return Plan(_interleave(s, down), host.to(torch.float64, copy=True), [2 * k for k in range(n)], None, [0.0] * n, up.tolist(),
                draw.tolist())


_PLAN_KINDS = {"grid": _plain, "churn": _churn_plan, "ancestral": _ancestral_plan}


class StepNoise:
    """A native noise source drawing k-diffusion's noise: ``noise_sampler(sigmas[k], sigmas[k+1])
    * s_noise`` for the step starting at ``sigmas[k]``."""

    def __init__(self, noise_sampler, sigmas, host, s_noise):
        self.noise_sampler, self.sigmas, self.s_noise = noise_sampler, sigmas, s_noise
        self.step_of = {float(v): k for k, v in enumerate(host[:-1].tolist())}

    def draw(self, like, sigma_from=None, sigma_to=None) -> dict:
        k = self.step_of[float(sigma_from)]
        z = as_state(self.noise_sampler(self.sigmas[k], self.sigmas[k + 1]), like, "noise_sampler")
        return {"noise": z if self.s_noise == 1.0 else z * self.s_noise}


def default_noise(x):
    """k-diffusion's ``default_noise_sampler(x)``: ``torch.randn_like(x)`` on every call."""
    return lambda sigma, sigma_next: torch.randn_like(x)


class KStep:
    """One k-diffusion step as a fixed-grid stepper for the engine's time loop: with
    ``churn_noise`` a ``randn_like`` draw (every step, as k-diffusion's Algorithm 2 samplers
    draw it) added with scale ``s_noise pre[k]``; the callback dict; the native solver's step
    ``index[k]``; then, where ``draw[k]``, ``noise_sampler(sigmas[k], sigmas[k+1])`` added with
    scale ``s_noise post[k]``."""

    def __init__(self, solver, plan_: Plan, sigmas, denoiser: Denoiser, noise_sampler, s_noise, churn_noise,
                 info=None):
        self.solver, self.plan, self.sigmas, self.denoiser = solver, plan_, sigmas, denoiser
        self.noise_sampler, self.s_noise, self.churn_noise = noise_sampler, s_noise, churn_noise
        self.info = self.sigma_info if info is None else info
        self.nonfinite, self.step_index = None, 0

    def sigma_info(self, k, x):
        """The callback dict of the sigma-schedule samplers (``denoised`` is added at the call)."""
        hat = self.sigmas[k] if self.plan.sigma_hat is None else self.plan.sigma_hat[k]
        return {"x": x.clone(), "i": k, "sigma": self.sigmas[k], "sigma_hat": hat}

    @property
    def evaluations(self):
        return self.solver.evaluations

    def step(self, k, x):
        plan_, sigmas = self.plan, self.sigmas
        if self.churn_noise:
            z = torch.randn_like(x)
            if plan_.pre[k]:
                x.add_(z, alpha=self.s_noise * plan_.pre[k])
        if self.denoiser.callback is not None:
            self.denoiser.pending = self.info(k, x)
        x = self.solver.step(plan_.index[k], x)
        if plan_.draw[k]:
            z = as_state(self.noise_sampler(sigmas[k], sigmas[k + 1]), x, "noise_sampler")
            if plan_.post[k]:
                x.add_(z, alpha=self.s_noise * plan_.post[k])
        return x


def run(name, solver, x, plan_: Plan, sigmas, denoiser: Denoiser, disable, *, noise_sampler=None, s_noise=1.0,
        churn_noise=False, info=None):
    """Step ``solver`` (built on ``plan_.ts``) over k-diffusion's steps (``KStep``; ``info(k, x)``
    builds the callback dict) from a copy of ``x``, through the engine's time loop, with
    k-diffusion's progress bar (``disable``)."""
    x = x.clone(memory_format=torch.contiguous_format)
    stepper = KStep(solver, plan_, sigmas, denoiser, noise_sampler, s_noise, churn_noise, info)
    steps = grid_steps(stepper, plan_.grid, x, name, check_finite=False, caller=f"gf.compat.k_diffusion.{name}")
    if not disable:  # (a disabled tqdm bar still registers itself: ~15 us a call, skipped)
        steps = tqdm(steps, total=len(plan_.index))
    for x, _, _ in steps:
        pass
    return x


_CHECKED = LRU(256)


def checked_options(check, *values):
    """``check(*values)``, remembered for values that are all Python floats and ints (equal
    values pass or fail the same checks), so repeated calls skip the per-option validation."""
    if not all(type(v) is float or type(v) is int for v in values):
        return check(*values)
    return _CHECKED.get_or_compute((check, values), lambda: check(*values))


def _noise_options(eta, s_noise):
    return check_real("eta", eta, low=0.0), check_real("s_noise", s_noise)


def _churn_options(s_churn, s_tmin, s_tmax, s_noise):
    return (check_real("s_churn", s_churn, low=0.0), check_real("s_tmin", s_tmin, allow_inf=True),
            check_real("s_tmax", s_tmax, allow_inf=True), check_real("s_noise", s_noise))


def check_noise_options(eta, s_noise):
    """``(eta, s_noise)`` as floats: ``eta >= 0``, both finite."""
    return checked_options(_noise_options, eta, s_noise)


def check_churn(s_churn, s_tmin, s_tmax, s_noise):
    """``(s_churn, s_tmin, s_tmax, s_noise)`` as floats: ``s_churn >= 0``, the bounds may be infinite."""
    return checked_options(_churn_options, s_churn, s_tmin, s_tmax, s_noise)
