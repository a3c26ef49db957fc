"""Time grids for samplers as first-class schedules: ``steps + 1`` times from ``t_start``
(noisier) down to ``t_end``, every one exact in float64.

A schedule is a ``Schedule`` subclass with a ``name`` (registered by declaration, like the
solvers), its formula and reference in the docstring and its options as constructor keywords:
``gf.schedules.get_schedule("karras", rho=5)(process, steps)`` or
``time_grid(process, steps, "karras", rho=5)``. With scalar endpoints a grid has shape
``[K]``; with per-sample endpoints (length-B tensors, e.g. SDEdit-style partial denoising)
``[K, B]``, one column per sample. ``K = steps + 1`` except where a schedule says otherwise
(``ddim_uniform``, and schedules whose clamped or rounded times repeat: repeats are dropped).

Two families: *noise-level* schedules set ``s = sigma/alpha = exp(-lambda)`` (the EDM noise
level; ``lambda`` the log-SNR) between ``s(t_start)`` and ``s(t_end)`` and map it to times with
``process.t_from_log_snr``; *time* schedules set a fraction ``f`` (1 -> 0) of the way from
``t_end`` to ``t_start``. For ``DiscreteVP`` times are that process's continuous reading
(fractional training timesteps, as diffusers and ComfyUI interpolate them); ``discrete=True``
(the default for ``simple``, ``ddim_uniform`` and ``beta``, which ComfyUI defines on the
training table) rounds every time to the nearest training timestep ``t_i = (i + 1)/N``.
"""
import abc
import math
from typing import Sequence, Union

import numpy as np
import torch

from genflow._cache import LRU
from genflow._checks import check_bool, check_choice, check_int, check_real, did_you_mean
from genflow.processes.discrete import DiscreteVP
from genflow.registry import lookup, named_subclasses

__all__ = ["SCHEDULES", "AYS_NOISE_LEVELS", "Schedule", "get_schedule", "karras_levels", "polyexponential_log_levels",
           "split_schedule_options", "time_grid", "validate_grid"]


def _finite_log_snr(process, t: torch.Tensor, toward: torch.Tensor) -> torch.Tensor:
    """log-SNR at t, moved a hair toward ``toward`` where it is infinite (e.g. LinearPath ends)."""
    lam = process.log_snr(t)
    if torch.isfinite(lam).all():
        return lam
    nudged = t + 1e-4 * (toward - t)
    return torch.where(torch.isfinite(lam), lam, process.log_snr(nudged))


def _ramp(steps: int, like: torch.Tensor) -> torch.Tensor:
    """``u = i / steps``, ``i = 0..steps`` (float64), shaped ``[steps + 1, 1]`` for per-sample ``like``."""
    u = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    return u[:, None] if like.dim() == 1 else u


def karras_levels(ramp, sigma_min, sigma_max, rho):
    """Karras et al. (2022), eq. 5: ``(sigma_max^(1/rho) + ramp (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``
    for ``ramp`` 0 -> 1 (a tensor or array; the ends numbers or tensors), in the ramp's dtype and
    operation order, so k-diffusion's and diffusers' float paths reproduce bitwise through it."""
    top, bottom = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (top + ramp * (bottom - top)) ** rho


def polyexponential_log_levels(ramp, log_sigma_min, log_sigma_max, rho):
    """k-diffusion's polyexponential schedule in ``log sigma``: ``ramp^rho (log s_max - log s_min) + log s_min``
    for ``ramp`` 1 -> 0 (``rho = 1`` is log-uniform), in the ramp's dtype and operation order."""
    return ramp ** rho * (log_sigma_max - log_sigma_min) + log_sigma_min


def _positive(name: str, value) -> float:
    return check_real(name, value, low=0.0, low_open=True)


class Schedule(abc.ABC):
    """Base class: a named rule for a decreasing grid of times; options are constructor keywords.

    Subclasses set ``name`` (registering them), ``defaults`` (option -> default) and implement
    ``levels``. Every schedule also takes ``discrete`` (None, True, False): ``True`` rounds the
    times to a ``DiscreteVP``'s training timesteps, ``None`` follows the schedule's source.
    """

    name = ""
    defaults: dict = {}
    discrete_default = False  # round to DiscreteVP training timesteps when discrete=None
    repeats = "drop"          # times that coincide: "drop" them, or fall back to "uniform" spacing

    def __init__(self, **options):
        allowed = {**self.defaults, "discrete": None}
        for key in options:
            if key not in allowed:
                raise TypeError(f"{key!r} is not an option of the {self.name!r} schedule, whose options are "
                                f"{sorted(allowed)}{did_you_mean(key, list(allowed))}")
        merged = {**allowed, **options}
        discrete = merged.pop("discrete")
        self.discrete = None if discrete is None else check_bool("discrete", discrete)
        self.options = self.check_options(merged)

    def check_options(self, options: dict) -> dict:
        """The options, checked and as plain Python values (subclasses with options override)."""
        return options

    def cache_key(self) -> tuple:
        return (self.name, tuple(sorted(self.options.items())), self.discrete)

    def __repr__(self) -> str:
        shown = [f"{k}={v!r}" for k, v in getattr(self, "options", {}).items()]  # also while __init__ raises
        if getattr(self, "discrete", None) is not None:
            shown.append(f"discrete={self.discrete}")
        return f"{type(self).__name__}({', '.join(shown)})"

    def __call__(self, process, steps: int, t_start=None, t_end=None) -> torch.Tensor:
        """The grid (float64) from ``t_start`` (default ``process.T``) to ``t_end`` (default
        ``process.t_min``); grids with scalar endpoints are cached and shared: clone to modify."""
        steps = check_int("steps", steps, low=1)
        t_start, t_end = _time_arg("t_start", t_start), _time_arg("t_end", t_end)
        scalar = not isinstance(t_start, torch.Tensor) and not isinstance(t_end, torch.Tensor)
        key = (process.cache_key(), steps, self.cache_key(), t_start, t_end) if scalar else None
        hit = _GRIDS.get(key) if scalar else None
        if hit is not None and hit[0]._version == hit[1]:
            return hit[0]
        t0, t1 = _endpoints(process, t_start, t_end)
        ts = self._finish(process, self.levels(process, steps, t0, t1), t0, t1)
        if scalar:
            _GRIDS.put(key, (ts, ts._version))
        return ts

    @abc.abstractmethod
    def levels(self, process, steps: int, t0: torch.Tensor, t1: torch.Tensor) -> torch.Tensor:
        """The raw times ``[K]`` or ``[K, B]`` (float64) before clamping, rounding and checks."""

    def _rounds(self, process) -> bool:
        discrete = self.discrete_default if self.discrete is None else self.discrete
        if discrete and not isinstance(process, DiscreteVP):
            if self.discrete:
                raise ValueError(f"discrete=True rounds to the training timesteps of a DiscreteVP, got {process!r}")
            return False
        return bool(discrete)

    def _finish(self, process, ts, t0, t1):
        """Clamp into ``[t_end, t_start]``, round (``discrete``), then make the grid strictly decreasing."""
        ts = torch.minimum(torch.maximum(ts, t1), t0)
        if self._rounds(process):
            ts = process.t_from_timestep(torch.round(process.timestep(ts)))
        if bool((ts[1:] < ts[:-1]).all()):
            return ts
        if self.repeats == "uniform":
            return _uniform_where_not_decreasing(ts, t0, t1)
        if ts.dim() == 1:
            ts = torch.unique_consecutive(ts)
        if ts.shape[0] < 2 or not bool((ts[1:] < ts[:-1]).all()):
            raise ValueError(f"the {self!r} schedule gives no strictly decreasing grid here (repeated or "
                             f"increasing times; per-sample grids cannot drop repeats), got {ts.tolist()}")
        return ts


class NoiseSchedule(Schedule):
    """A schedule of noise levels ``log s`` (``s = sigma/alpha = exp(-lambda)``), clamped into
    ``[log s(t_end), log s(t_start)]``; the first and last times are ``t_start`` and ``t_end`` exactly."""

    def levels(self, process, steps, t0, t1):
        lam0, lam1 = _finite_log_snr(process, t0, t1), _finite_log_snr(process, t1, t0)
        top, bottom = -lam0, -lam1
        ts = process.t_from_log_snr(-torch.minimum(torch.maximum(self.log_sigmas(steps, top, bottom), bottom), top))
        ts[0], ts[-1] = t0, t1
        return ts

    @abc.abstractmethod
    def log_sigmas(self, steps: int, top: torch.Tensor, bottom: torch.Tensor) -> torch.Tensor:
        """``log s`` of the grid from ``top = log s(t_start)`` down to ``bottom = log s(t_end)``."""


class TimeSchedule(Schedule):
    """A schedule of fractions ``f`` (1 at ``t_start``, 0 at ``t_end``): ``t = t_end + f (t_start - t_end)``,
    exactly ``t_start`` where ``f = 1`` and ``t_end`` where ``f = 0``."""

    def levels(self, process, steps, t0, t1):
        f = self.fractions(steps, _table_size(process, self.options.get("num_train_timesteps")))
        if t0.dim() == 1:
            f = f[:, None]
        return torch.where(f == 1, t0, torch.where(f == 0, t1, t1 + f * (t0 - t1)))

    @abc.abstractmethod
    def fractions(self, steps: int, table_size: int) -> torch.Tensor:
        """The fractions (float64, decreasing) for ``steps``; ``table_size`` knots for table schedules."""


def _table_size(process, num_train_timesteps) -> int:
    """Knots of a table schedule: the DiscreteVP's training timesteps, else ``num_train_timesteps`` (1000)."""
    if isinstance(process, DiscreteVP):
        if num_train_timesteps is not None and num_train_timesteps != process.num_train_timesteps:
            raise ValueError(f"num_train_timesteps={num_train_timesteps} conflicts with the DiscreteVP's "
                             f"{process.num_train_timesteps} training timesteps; leave it None")
        return process.num_train_timesteps
    return 1000 if num_train_timesteps is None else num_train_timesteps


def _uniform_where_not_decreasing(ts, t0, t1):
    """Rounding in the log-SNR round trip may repeat a time on tiny intervals: uniform spacing
    in the columns that are not strictly decreasing."""
    u = _ramp(ts.shape[0] - 1, t0)
    uniform = t0 + u * (t1 - t0)
    uniform[0], uniform[-1] = t0, t1
    bad = ~(ts[1:] < ts[:-1]).all(0)
    ts = torch.where(bad, uniform, ts)
    if not bool((ts[1:] < ts[:-1]).all()):
        raise ValueError(f"t_start - t_end is too small for {ts.shape[0] - 1} distinct steps in float64, got "
                         f"t_start={t0.tolist()}, t_end={t1.tolist()}")
    return ts


# ---------------------------------------------------------------- time schedules

class Uniform(TimeSchedule):
    """Uniform in time: ``f = 1 - i/steps``. Ho et al. (2020) / Song et al. (2021a) "linear" spacing."""

    name = "uniform"
    repeats = "uniform"

    def fractions(self, steps, table_size):
        return 1.0 - torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)


class SGMUniform(Uniform):
    """ComfyUI's ``sgm_uniform``: training timesteps ``linspace(t(sigma_max), t(sigma_min), steps + 1)``
    with the last replaced by sigma 0; ending at ``t_end`` instead of sigma 0 it is ``uniform``
    (for a ``DiscreteVP`` uniform in fractional timesteps, as Stability's sgm samplers space them)."""

    name = "sgm_uniform"
    repeats = "drop"


class Quadratic(TimeSchedule):
    """``f = (1 - i/steps)^2``: DDIM's quadratic spacing, dense near the data (Song et al. 2021a, appendix D.2)."""

    name = "quadratic"
    repeats = "uniform"

    def fractions(self, steps, table_size):
        return (1.0 - torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)) ** 2


class Beta(TimeSchedule):
    """``f_i = F^-1(1 - i/steps)`` with ``F^-1`` the Beta(``alpha``, ``beta``) quantile function
    (``scipy.stats.beta.ppf``): Lee et al. (2024), "Beta Sampling is All You Need", as ComfyUI's
    ``beta`` scheduler spaces training timesteps (rounded to the nearest one for a ``DiscreteVP``,
    repeats dropped). Options: ``alpha = beta = 0.6`` (the paper's choice)."""

    name = "beta"
    defaults = {"alpha": 0.6, "beta": 0.6}
    discrete_default = True

    def check_options(self, options):
        return {"alpha": _positive("alpha", options["alpha"]), "beta": _positive("beta", options["beta"])}

    def fractions(self, steps, table_size):
        from scipy.stats import beta as beta_distribution

        q = 1.0 - np.linspace(0.0, 1.0, steps + 1)
        return torch.from_numpy(beta_distribution.ppf(q, self.options["alpha"], self.options["beta"]))


class LinearQuadratic(TimeSchedule):
    """Mochi's linear-quadratic schedule (Genmo 2024; ComfyUI ``linear_quadratic``) in ``1 - f``:
    ``x_i = i c/L`` for ``i < L`` (``c`` = ``threshold_noise``, ``L`` = ``linear_steps``,
    default ``steps // 2``), then the quadratic ``x_i = a i^2 + b i + a L^2`` through ``(L, c)``
    and ``(steps, 1)`` with ``a = (L - c n)/(L (n - L)^2)``, ``b = c/L - 2 (L - c n)/(n - L)^2``;
    ``steps = 1`` is ``[1, 0]``. Defined for flow-matching time (``LinearPath``), applied in time
    to any process."""

    name = "linear_quadratic"
    defaults = {"threshold_noise": 0.025, "linear_steps": None}

    def check_options(self, options):
        linear = options["linear_steps"]
        return {"threshold_noise": check_real("threshold_noise", options["threshold_noise"], low=0.0, high=1.0,
                                              low_open=True),
                "linear_steps": None if linear is None else check_int("linear_steps", linear, low=1)}

    def fractions(self, steps, table_size):
        if steps == 1:
            return torch.tensor([1.0, 0.0], dtype=torch.float64)
        c, linear = self.options["threshold_noise"], self.options["linear_steps"]
        linear = steps // 2 if linear is None else linear
        if linear >= steps:
            raise ValueError(f"linear_steps must be < steps, got linear_steps={linear}, steps={steps}")
        quadratic_steps = steps - linear
        gap = linear - c * steps
        a = gap / (linear * quadratic_steps ** 2)
        b = c / linear - 2 * gap / quadratic_steps ** 2
        i = torch.arange(steps + 1, dtype=torch.float64)
        x = torch.where(i < linear, i * (c / linear), a * i ** 2 + b * i + a * linear ** 2)
        x[-1] = 1.0
        return 1.0 - x


class Simple(TimeSchedule):
    """ComfyUI's ``simple``: of the ``N`` training timesteps (knots ``k = 0..N-1`` from ``t_end`` to
    ``t_start``), ``k_x = N - 1 - int(x N/steps)`` for ``x = 0..steps-1``, then ``t_end``.
    ``N`` is a ``DiscreteVP``'s table size, else ``num_train_timesteps`` (default 1000)."""

    name = "simple"
    defaults = {"num_train_timesteps": None}
    discrete_default = True

    def check_options(self, options):
        n = options["num_train_timesteps"]
        return {"num_train_timesteps": None if n is None else check_int("num_train_timesteps", n, low=2)}

    def fractions(self, steps, table_size):
        stride = table_size / steps
        knots = [table_size - 1 - int(x * stride) for x in range(steps)] + [0]
        return torch.tensor(knots, dtype=torch.float64) / (table_size - 1)


class DDIMUniform(Simple):
    """ComfyUI's ``ddim_uniform`` (DDIM's "uniform" skip, Song et al. 2021a section 4.2): knots
    ``1, 1 + c, 1 + 2c, ... < N`` with ``c = max(N // steps, 1)``, from the top, then ``t_end``;
    it has ``ceil((N - 1)/c)`` steps, which is more than ``steps`` when ``N mod steps`` is large,
    and does not start at ``t_start`` (as DDIM's "leading" spacing)."""

    name = "ddim_uniform"

    def fractions(self, steps, table_size):
        stride = max(table_size // steps, 1)
        knots = list(range(1, table_size, stride))[::-1] + [0]
        return torch.tensor(knots, dtype=torch.float64) / (table_size - 1)


# ---------------------------------------------------------------- noise-level schedules

class LogSNR(NoiseSchedule):
    """Uniform in the log-SNR ``lambda = log(alpha/sigma)`` (DPM-Solver, Lu et al. 2022, section 3.3)."""

    name = "logsnr"
    repeats = "uniform"

    def log_sigmas(self, steps, top, bottom):
        return top + _ramp(steps, top) * (bottom - top)


class Exponential(LogSNR):
    """k-diffusion's ``get_sigmas_exponential``: ``log s`` evenly spaced from ``log s_max`` to
    ``log s_min``, the same grid as ``logsnr`` (``log s = -lambda``)."""

    name = "exponential"
    repeats = "drop"


class Polyexponential(NoiseSchedule):
    """k-diffusion's ``get_sigmas_polyexponential``: ``log s_i = log s_min + (1 - i/steps)^rho
    (log s_max - log s_min)``; ``rho = 1`` (default) is ``exponential``."""

    name = "polyexponential"
    defaults = {"rho": 1.0}

    def check_options(self, options):
        return {"rho": _positive("rho", options["rho"])}

    def log_sigmas(self, steps, top, bottom):
        return polyexponential_log_levels(1.0 - _ramp(steps, top), bottom, top, self.options["rho"])


class Karras(NoiseSchedule):
    """Karras et al. (2022), eq. 5: ``s_i = (s_max^(1/rho) + i/steps (s_min^(1/rho) - s_max^(1/rho)))^rho``,
    ``rho = 7`` (default), for any process (k-diffusion's ``get_sigmas_karras``)."""

    name = "karras"
    defaults = {"rho": 7.0}
    repeats = "uniform"

    def check_options(self, options):
        return {"rho": _positive("rho", options["rho"])}

    def log_sigmas(self, steps, top, bottom):
        return torch.log(karras_levels(_ramp(steps, top), torch.exp(bottom), torch.exp(top), self.options["rho"]))


class Cosine(NoiseSchedule):
    """The log-SNR spacing of the cosine schedule (Nichol & Dhariwal 2021, eq. 17), for any process:
    ``lambda = -2 log tan(pi w / 2)`` with ``w`` uniform."""

    name = "cosine"
    repeats = "uniform"

    def log_sigmas(self, steps, top, bottom):
        w0 = 2 / math.pi * torch.atan(torch.exp(top / 2))
        w1 = 2 / math.pi * torch.atan(torch.exp(bottom / 2))
        return 2 * torch.log(torch.tan(math.pi / 2 * (w0 + _ramp(steps, top) * (w1 - w0))))


class KLOptimal(NoiseSchedule):
    """The KL-optimal schedule of Sabour et al. (2024), "Align Your Steps", appendix (the optimum
    of the KL upper bound for a single Gaussian): ``s_i = tan((1 - i/steps) atan(s_max) + i/steps atan(s_min))``
    (ComfyUI's ``kl_optimal``)."""

    name = "kl_optimal"

    def log_sigmas(self, steps, top, bottom):
        u = _ramp(steps, top)
        return torch.log(torch.tan((1 - u) * torch.atan(torch.exp(top)) + u * torch.atan(torch.exp(bottom))))


class Laplace(NoiseSchedule):
    """Hang et al. (2024), "Improved Noise Schedule for Diffusion Training": ``log s`` at the
    Laplace(``mu``, ``beta``) quantiles, ``log s_i = mu - beta sgn(1/2 - x) log(1 - 2|1/2 - x| + 1e-5)``,
    ``x = i/steps``, clamped into ``[s_min, s_max]`` like every noise-level schedule (k-diffusion's
    ``get_sigmas_laplace``; repeats from the clamp dropped). Options: ``mu = 0``, ``beta = 0.5``."""

    name = "laplace"
    defaults = {"mu": 0.0, "beta": 0.5}

    def check_options(self, options):
        return {"mu": check_real("mu", options["mu"]), "beta": _positive("beta", options["beta"])}

    def log_sigmas(self, steps, top, bottom):
        x = _ramp(steps, top)
        mu, beta = self.options["mu"], self.options["beta"]
        return mu - beta * torch.sign(0.5 - x) * torch.log(1 - 2 * torch.abs(0.5 - x) + 1e-5)


AYS_NOISE_LEVELS = {  # Sabour et al. (2024), "Align Your Steps", the published 10-step noise levels
    "sd15": (14.6146412293, 6.4745760956, 3.8636745985, 2.6946151520, 1.8841921177, 1.3943805092,
             0.9642583904, 0.6523686016, 0.3977456272, 0.1515232662, 0.0291671582),
    "sdxl": (14.6146412293, 6.3184485287, 3.7681790315, 2.1811480769, 1.3405244945, 0.8620721141,
             0.5550693289, 0.3798540708, 0.2332364134, 0.1114188177, 0.0291671582),
    "svd": (700.00, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.002),
}


class AlignYourSteps(NoiseSchedule):
    """Align Your Steps (Sabour et al. 2024): the published 10-step noise levels of ``model_type``
    (``"sd15"``, ``"sdxl"``, ``"svd"``; ``AYS_NOISE_LEVELS``), log-linearly interpolated to
    ``steps + 1`` levels (``log s`` linear in ``i/steps`` between the table's ``j/10``, as the
    paper's how-to and ComfyUI do). The levels are clamped to the process's range (repeats
    dropped) and the ends are ``t_start`` and ``t_end`` (ComfyUI sets the last to sigma 0)."""

    name = "align_your_steps"
    defaults = {"model_type": "sd15"}

    def check_options(self, options):
        return {"model_type": check_choice("model_type", options["model_type"], tuple(AYS_NOISE_LEVELS))}

    def log_sigmas(self, steps, top, bottom):
        table = np.log(np.array(AYS_NOISE_LEVELS[self.options["model_type"]]))
        if steps + 1 == table.shape[0]:
            levels = table
        else:
            knots = np.linspace(0.0, 1.0, table.shape[0])
            levels = np.interp(np.linspace(0.0, 1.0, steps + 1), knots, table[::-1])[::-1]
        levels = torch.from_numpy(levels.copy())
        return levels[:, None].expand(-1, top.shape[0]).clone() if top.dim() == 1 else levels


# ---------------------------------------------------------------- registry and entry points

_REGISTRY = named_subclasses(Schedule, "schedule")
SCHEDULES = tuple(_REGISTRY)

_GRIDS = LRU(64)  # (process values, steps, schedule key, t_start, t_end) -> (grid, grid._version)


def get_schedule(schedule, **options) -> Schedule:
    """The ``Schedule`` for a name from ``SCHEDULES`` with ``options``, or ``schedule`` itself when
    it already is one (then without options); unknown names and options raise naming them."""
    if isinstance(schedule, Schedule):
        if options:
            raise TypeError(f"options {sorted(options)} go to the constructor of the schedule {schedule!r}, "
                            f"not next to it")
        return schedule
    return lookup(_REGISTRY, schedule, "schedule")(**options)


def split_schedule_options(schedule, options: dict):
    """``(schedule_options, rest)``: the entries of ``options`` that the named schedule declares
    (``gf.sample`` passes them to the schedule, the rest to the solver)."""
    cls = _REGISTRY.get(schedule) if isinstance(schedule, str) else None
    if cls is None:
        return {}, dict(options)
    names = set(cls.defaults) | {"discrete"}
    return ({k: v for k, v in options.items() if k in names}, {k: v for k, v in options.items() if k not in names})


def time_grid(process, steps: int, schedule="logsnr", t_start=None, t_end=None, **options) -> torch.Tensor:
    """A decreasing float64 grid of ``steps + 1`` times from ``t_start`` to ``t_end``.

    ``schedule`` is a name from ``SCHEDULES`` (its options, e.g. ``rho`` of ``karras``, as
    keywords) or a ``Schedule`` instance; each schedule's docstring gives its formula and
    reference. ``t_start`` defaults to ``process.T``, ``t_end`` to ``process.t_min``. ``steps``
    is a Python, NumPy or 0-d tensor integer; ``t_start``, ``t_end`` and the options real numbers
    of any of these types (the times also length-B per-sample tensors or sequences). Grids with
    scalar endpoints are cached by value (the process's parameters included) and shared between
    calls: clone before modifying.
    """
    return get_schedule(schedule, **options)(process, steps, t_start, t_end)


def _endpoints(process, t_start, t_end):
    t0 = torch.as_tensor(process.T if t_start is None else t_start, dtype=torch.float64)
    t1 = torch.as_tensor(process.t_min if t_end is None else t_end, dtype=torch.float64)
    if t0.dim() > 1 or t1.dim() > 1:
        raise ValueError("t_start and t_end must be scalars or 1-D per-sample tensors")
    if not torch.isfinite(t0).all() or not torch.isfinite(t1).all():
        raise ValueError("t_start and t_end must be finite")
    if not (t1 < t0).all():
        raise ValueError(f"t_end must be < t_start, got t_start={t0.tolist()}, t_end={t1.tolist()}")
    if (t1 < 0).any() or (t0 > process.T * (1 + 1e-12)).any():
        raise ValueError(f"times must lie in [0, T={process.T}], got t_start={t0.tolist()}, t_end={t1.tolist()}")
    return torch.broadcast_tensors(t0, t1)


def _time_arg(name: str, value):
    """``None``, a Python float (from a Python, NumPy or 0-d tensor number) or a float64 1-D
    per-sample tensor; anything else (strings included) a ``TypeError`` naming ``name``."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be a number or a 1-D tensor of per-sample times, got the string {value!r}")
    if isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim == 1:
        return torch.as_tensor(value).detach().to("cpu", torch.float64)
    if isinstance(value, (list, tuple)):
        try:
            return torch.tensor([check_real(f"{name}[{i}]", v) for i, v in enumerate(value)], dtype=torch.float64)
        except (TypeError, ValueError) as error:
            raise TypeError(f"{name} must be a number or a 1-D sequence of per-sample times: {error}") from None
    if isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim > 1:
        raise ValueError(f"{name} must be a scalar or a 1-D per-sample tensor, got shape {tuple(value.shape)}")
    return check_real(name, value)


def validate_grid(ts: Union[torch.Tensor, Sequence[float]], process) -> torch.Tensor:
    """Check a user-given grid (``[N+1]`` or ``[N+1, B]``: a tensor, array or sequence of
    numbers) is strictly decreasing within [0, T]; returns it as a float64 host tensor."""
    if isinstance(ts, (str, bytes)):
        raise TypeError(f"schedule must be a schedule name from {SCHEDULES} or a time grid, got the string {ts!r}")
    try:
        ts = torch.as_tensor(ts, dtype=torch.float64) if not isinstance(ts, torch.Tensor) else ts.detach().to(torch.float64)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"a time grid must be a tensor or a sequence of numbers, got {type(ts).__name__}: {error}") from None
    if ts.dim() not in (1, 2) or ts.shape[0] < 2:
        raise ValueError(f"a time grid must have shape [steps+1] or [steps+1, B] with steps >= 1, got {tuple(ts.shape)}")
    if not torch.isfinite(ts).all():
        raise ValueError("the time grid must be finite")
    if not (ts[1:] < ts[:-1]).all():
        raise ValueError("the time grid must be strictly decreasing (from noise toward data)")
    if (ts < 0).any() or (ts > process.T * (1 + 1e-12)).any():
        raise ValueError(f"the time grid must lie in [0, T={process.T}]")
    return ts
