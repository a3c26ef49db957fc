"""The shared machinery of ``gf.compat.diffusers``: configs, outputs, tables, noise and the step op.

A compat scheduler keeps diffusers' public surface (``config``, ``from_config``, ``timesteps``,
``set_timesteps``, ``step``, ``scale_model_input``, ``add_noise``, ``step_index``, ...) and the
same tensors diffusers exposes (``betas``, ``alphas_cumprod``, ``timesteps``, ``sigmas``, with
diffusers' dtypes), but computes every step's coefficients in float64 on the host and applies the
update with one call of genflow's fused kernel (:func:`fused`), so a step reads each input once
and writes its output once (DESIGN.md section 1). Nothing here imports ``diffusers``.

Tables are built exactly as diffusers builds them (float32 betas, float32 cumulative product), so
``alphas_cumprod`` holds the same numbers; :func:`alphas_cumprod_for` returns them as float64 for
the coefficient math.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Optional, Sequence, Union

import numpy as np
import torch

from genflow._cache import LRU
from genflow.ops.fused_update import check_coef, fused_update_packed, fused_update_unchecked, host_tensor, use_kernel

__all__ = [
    "SchedulerOutput", "Config", "Scheduler", "betas_for", "alphas_cumprod_for", "fused",
    "randn_like_diffusers", "check_prediction_type", "check_choice",
    "x0_eps_coefficients", "spaced_timesteps", "check_steps", "TIMESTEP_SPACINGS", "grid_plans", "pack",
    "fused_planned", "cached_schedule",
]

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


# ---------------------------------------------------------------- outputs and configs

class SchedulerOutput:
    """The result of ``step``: ``prev_sample`` (Tensor[B, *D]) and, where the scheduler forms
    one, ``pred_original_sample`` (Tensor[B, *D], the x0 prediction).

    Reads like diffusers' ``BaseOutput``: attributes, ``out[0]``/``out[1]`` and ``to_tuple()``
    index the fields that are not None, in order.
    """

    __slots__ = ("prev_sample", "pred_original_sample")

    def __init__(self, prev_sample: torch.Tensor, pred_original_sample: Optional[torch.Tensor] = None):
        self.prev_sample = prev_sample
        self.pred_original_sample = pred_original_sample

    def to_tuple(self) -> tuple:
        """The fields that are not None, in order."""
        return tuple(v for v in (self.prev_sample, self.pred_original_sample) if v is not None)

    def keys(self) -> list:
        return [k for k in self.__slots__ if getattr(self, k) is not None]

    def __getitem__(self, key):
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]

    def __iter__(self):
        return iter(self.to_tuple())

    def __len__(self) -> int:
        return len(self.to_tuple())

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}=Tensor{list(getattr(self, k).shape)}" for k in self.keys())
        return f"SchedulerOutput({fields})"


class Config(dict):
    """A read-only dict with attribute access: ``config.num_train_timesteps`` and
    ``config["num_train_timesteps"]``. Change a field with ``Cls.from_config(config, name=value)``."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no field {name!r}") from None

    def _read_only(self, *args, **kwargs):
        raise TypeError("a scheduler config is read-only; build a new scheduler with "
                        "Cls.from_config(config, field=value) instead")

    __setattr__ = __setitem__ = __delattr__ = __delitem__ = _read_only
    update = pop = popitem = setdefault = clear = _read_only
    __ior__ = _read_only

    def key(self) -> str:
        """A hashable text of the fields (computed once: the config is read-only)."""
        try:
            return self.__dict__["_key"]
        except KeyError:
            key = self.__dict__["_key"] = repr(sorted(self.items()))
            return key

    def __reduce__(self):
        return (Config, (dict(self),))

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return Config({k: copy.deepcopy(v, memo) for k, v in self.items()})

    def __dir__(self):
        return list(super().__dir__()) + list(self.keys())


# ---------------------------------------------------------------- the base class

class Scheduler:
    """Base of the compat schedulers: config handling, step-index bookkeeping and ``add_noise``.

    ``config`` holds every field (explicit or default) plus, like diffusers' configs,
    ``_use_default_values`` (the fields not given explicitly) when there are any.
    Subclasses declare ``defaults`` (every parameter of the diffusers class's ``__init__``, same
    names and defaults), call ``super().__init__(**kwargs)`` and then read ``self.config``.
    ``add_noise`` here is the variance-preserving one,
    ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``, read from ``self.alphas_cumprod``;
    sigma-parameterised schedulers override it.
    """

    defaults: dict = {}
    order: int = 1
    init_noise_sigma: float = 1.0

    def __init__(self, **kwargs):
        for name in kwargs:
            if name not in self.defaults:
                raise TypeError(f"{type(self).__name__} got an unexpected keyword argument {name!r}; "
                                f"expected one of {sorted(self.defaults)}")
        fields = {**self.defaults, **kwargs}
        used_defaults = [k for k in self.defaults if k not in kwargs]
        if used_defaults:  # diffusers' record of the fields left at their defaults (see from_config)
            fields["_use_default_values"] = used_defaults
        self.config = Config(fields)
        self.num_inference_steps = None
        self._step_index = None
        self._begin_index = None

    @classmethod
    def from_config(cls, config=None, **kwargs):
        """A scheduler from ``config`` (a dict, diffusers' ``FrozenDict``, a :class:`Config` or a
        scheduler, diffusers' or ours), keeping only this class's fields; ``kwargs`` override.

        Fields of other classes and bookkeeping keys (``_class_name``, ``_diffusers_version``)
        are dropped, so ``Cls.from_config(pipe.scheduler.config)`` swaps schedulers. As in
        diffusers, fields listed in ``_use_default_values`` (those the source scheduler left at its
        own defaults) are dropped too, so they take this class's defaults (DDPM's
        ``timestep_spacing="leading"`` does not carry over to Euler, whose default is ``"linspace"``).
        Our configs record ``_use_default_values`` the same way.
        """
        if config is None:
            config = {}
        elif not isinstance(config, Mapping):
            inner = getattr(config, "config", None)
            if not isinstance(inner, Mapping):
                raise TypeError(f"config must be a dict, a scheduler config or a scheduler, got "
                                f"{type(config).__name__}")
            config = inner
        used_defaults = set(config.get("_use_default_values", ()))
        fields = {k: v for k, v in config.items() if k in cls.defaults and k not in used_defaults}
        fields.update(kwargs)
        return cls(**fields)

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def __repr__(self) -> str:
        body = "".join(f"\n  {k}: {v!r}" for k, v in self.config.items())
        return f"{type(self).__name__}({body}\n)"

    def _set_tables(self) -> None:
        """``betas``, ``alphas``, ``alphas_cumprod`` as diffusers exposes them (float32), and
        ``_abar``, the same ``alphas_cumprod`` as Python floats for the coefficient math."""
        self.betas = _betas32(self.config)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self._abar = self.alphas_cumprod.double().tolist()

    # -- step-index bookkeeping (diffusers' semantics) ------------------------------------
    @property
    def step_index(self) -> Optional[int]:
        """The index of the next step in ``timesteps`` (None before the first ``step``)."""
        return self._step_index

    @property
    def begin_index(self) -> Optional[int]:
        """The first step's index, when a pipeline set it with ``set_begin_index``."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start at ``timesteps[begin_index]`` (pipelines call this before image-to-image runs)."""
        self._begin_index = begin_index

    def index_for_timestep(self, timestep, schedule_timesteps: Optional[torch.Tensor] = None) -> int:
        """The index of ``timestep`` in ``schedule_timesteps`` (default ``self.timesteps``).

        When the value occurs more than once the second match is returned (diffusers' rule, so
        that a schedule entered mid-way, as in image-to-image, does not skip a sigma).
        """
        if schedule_timesteps is None:
            schedule_timesteps = self.timesteps
        if isinstance(timestep, torch.Tensor):
            timestep = timestep.to(schedule_timesteps.device)
        indices = (schedule_timesteps == timestep).nonzero()
        if len(indices) == 0:
            raise ValueError(f"timestep must be one of the scheduler's timesteps, got {timestep!r}")
        return int(indices[1 if len(indices) > 1 else 0].item())

    def _init_step_index(self, timestep) -> None:
        """Set the step index from ``timestep`` (or from ``begin_index`` when one was set)."""
        if self._begin_index is None:
            self._step_index = self.index_for_timestep(timestep)
        else:
            self._step_index = self._begin_index

    # -- model input and forward noising ---------------------------------------------------
    def scale_model_input(self, sample: torch.Tensor, timestep=None, *args, **kwargs) -> torch.Tensor:
        """The network input for ``sample`` at ``timestep``: ``sample`` itself here."""
        return sample

    def scaled_input(self, sample: torch.Tensor, timestep, scale) -> torch.Tensor:
        """``scale(i) sample`` at the step index ``i`` of ``timestep`` (one fused pass, its plan kept
        per step): the ``scale_model_input`` of the schedulers whose network input is rescaled."""
        if self._step_index is None:
            self._init_step_index(timestep)
        self.is_scale_input_called = True
        key = ("scale", self._step_index)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = pack([scale(self._step_index)])
        return fused_planned(sample, [], plan)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor,
                  timesteps: Union[int, torch.Tensor]) -> torch.Tensor:
        """``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`` (Ho et al. 2020, eq. 4).

        Args:
            original_samples (Tensor[B, *D]): x0.
            noise (Tensor[B, *D]): eps.
            timesteps (int or Tensor[B] or Tensor[1]): training timesteps, one per sample.

        Returns:
            Tensor[B, *D]: x_t, in ``original_samples``' dtype.
        """
        abar = _at_timesteps(self.alphas_cumprod.to("cpu", torch.float64), timesteps, original_samples)
        return fused(original_samples, [noise], [abar.sqrt(), (1.0 - abar).sqrt()])

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor,
                     timesteps: Union[int, torch.Tensor]) -> torch.Tensor:
        """The v-prediction target ``v = sqrt(abar_t) noise - sqrt(1 - abar_t) x0`` (Salimans & Ho
        2022, section 4) for ``sample = x0`` (Tensor[B, *D]) and ``noise`` (Tensor[B, *D])."""
        abar = _at_timesteps(self.alphas_cumprod.to("cpu", torch.float64), timesteps, sample)
        return fused(noise, [sample], [abar.sqrt(), -(1.0 - abar).sqrt()])


def _timestep_indices(timesteps) -> torch.Tensor:
    """Integer training timesteps as an int64 CPU vector."""
    t = torch.as_tensor(timesteps).reshape(-1)
    if t.is_floating_point():
        t = t.round()
    return t.to("cpu", torch.long)


def _at_timesteps(table: torch.Tensor, timesteps, x: torch.Tensor):
    """``table[timesteps]`` as a float (one timestep) or a float64 [B] tensor (one per sample)."""
    values = table[_timestep_indices(timesteps)]
    if values.numel() == 1:
        return values.reshape(())
    batch = x.shape[0] if x.dim() > 0 else 1
    if values.numel() != batch:
        raise ValueError(f"timesteps must hold one value or one per sample (B = {batch}), got "
                         f"{values.numel()} values")
    return values


# ---------------------------------------------------------------- VP step helpers

def x0_eps_coefficients(prediction_type: str, alpha_t: float, sigma_t: float):
    """The data and noise predictions as linear maps of ``(x_t, model_output)``.

    With ``x_t = alpha_t x0 + sigma_t eps``: for ``"epsilon"`` ``x0 = (x_t - sigma_t out)/alpha_t``,
    for ``"sample"`` ``eps = (x_t - alpha_t out)/sigma_t``, for ``"v_prediction"``
    (``v = alpha_t eps - sigma_t x0``) ``x0 = alpha_t x_t - sigma_t out`` and
    ``eps = sigma_t x_t + alpha_t out`` (the last assumes ``alpha_t^2 + sigma_t^2 = 1``).

    Returns:
        ((a, b), (c, d)) with ``x0 = a x_t + b out`` and ``eps = c x_t + d out`` (floats).
    """
    if prediction_type == "epsilon":
        return (1.0 / alpha_t, -sigma_t / alpha_t), (0.0, 1.0)
    if prediction_type == "sample":
        return (0.0, 1.0), (1.0 / sigma_t, -alpha_t / sigma_t)
    if prediction_type == "v_prediction":
        return (alpha_t, -sigma_t), (sigma_t, alpha_t)
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")


def spaced_timesteps(config: Mapping, num_inference_steps: int) -> np.ndarray:
    """DDIM/DDPM-style integer timesteps (int64 [n], decreasing) by ``config.timestep_spacing``
    (Lin et al. 2024, Table 2): ``"linspace"`` rounds ``linspace(0, N - 1, n)``; ``"leading"``
    takes ``i * (N // n) + steps_offset``; ``"trailing"`` rounds ``N - i * N / n`` and subtracts 1.
    """
    n_train = config["num_train_timesteps"]
    check_steps(num_inference_steps, n_train)
    spacing = config["timestep_spacing"]
    if spacing == "linspace":
        t = np.linspace(0, n_train - 1, num_inference_steps).round()[::-1].astype(np.int64)
    elif spacing == "leading":
        ratio = n_train // num_inference_steps
        t = (np.arange(0, num_inference_steps) * ratio).round()[::-1].astype(np.int64)
        t += config["steps_offset"]
    elif spacing == "trailing":
        t = np.round(np.arange(n_train, 0, -n_train / num_inference_steps)).astype(np.int64) - 1
    else:
        raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {spacing!r}")
    return t.copy()


def check_steps(num_inference_steps, num_train_timesteps: int) -> None:
    """ValueError unless ``1 <= num_inference_steps <= num_train_timesteps``."""
    if not isinstance(num_inference_steps, (int, np.integer)) or isinstance(num_inference_steps, bool):
        raise TypeError(f"num_inference_steps must be an int, got {type(num_inference_steps).__name__}")
    if not 1 <= num_inference_steps <= num_train_timesteps:
        raise ValueError(f"num_inference_steps must be in [1, num_train_timesteps = {num_train_timesteps}], "
                         f"got {num_inference_steps}")


# ---------------------------------------------------------------- tables

def _betas_for_alpha_bar(n: int, alpha_bar, max_beta: float = 0.999) -> torch.Tensor:
    """``beta_i = min(1 - abar((i+1)/n) / abar(i/n), max_beta)`` in float64 Python math, stored as
    float32 (the discretisation diffusers uses for its cosine, exp and laplace tables)."""
    betas = [min(1.0 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return torch.tensor(betas, dtype=torch.float32)


def _cosine_alpha_bar(t: float) -> float:
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def _exp_alpha_bar(t: float) -> float:
    return math.exp(-12.0 * t)


def _laplace_alpha_bar(t: float) -> float:
    lam = -0.5 * math.copysign(1.0, 0.5 - t) * math.log(1.0 - 2.0 * abs(0.5 - t) + 1e-6)
    snr = math.exp(lam)
    return math.sqrt(snr / (1.0 + snr))


def _zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale ``sqrt(abar)`` so its last value is 0 and its first unchanged
    (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Alg. 1)."""
    root = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    abar = root ** 2
    return 1.0 - torch.cat([abar[:1], abar[1:] / abar[:-1]])


BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "exp", "laplace", "sigmoid")


def _betas32(config: Mapping) -> torch.Tensor:
    """The betas exactly as diffusers builds them (float32)."""
    n = config["num_train_timesteps"]
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"num_train_timesteps must be an int >= 1, got {n!r}")
    trained = config.get("trained_betas")
    if trained is not None:
        betas = torch.tensor(np.asarray(trained, dtype=np.float64).tolist() if not isinstance(trained, torch.Tensor)
                             else trained.tolist(), dtype=torch.float32)
        if betas.dim() != 1 or betas.numel() != n:
            raise ValueError(f"trained_betas must hold num_train_timesteps = {n} values, got shape "
                             f"{list(betas.shape)}")
    else:
        schedule = config.get("beta_schedule", "linear")
        b0, b1 = config.get("beta_start", 0.0001), config.get("beta_end", 0.02)
        if schedule == "linear":
            betas = torch.linspace(b0, b1, n, dtype=torch.float32)
        elif schedule == "scaled_linear":
            betas = torch.linspace(b0 ** 0.5, b1 ** 0.5, n, dtype=torch.float32) ** 2
        elif schedule == "squaredcos_cap_v2":
            betas = _betas_for_alpha_bar(n, _cosine_alpha_bar)
        elif schedule == "exp":
            betas = _betas_for_alpha_bar(n, _exp_alpha_bar)
        elif schedule == "laplace":
            betas = _betas_for_alpha_bar(n, _laplace_alpha_bar)
        elif schedule == "sigmoid":
            betas = torch.sigmoid(torch.linspace(-6, 6, n)) * (b1 - b0) + b0
        else:
            raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {schedule!r}")
    if config.get("rescale_betas_zero_snr", False):
        betas = _zero_terminal_snr(betas)
    return betas


def betas_for(config: Mapping) -> torch.Tensor:
    """The betas of ``config`` (Tensor[num_train_timesteps], float64).

    ``trained_betas`` when given, else ``beta_schedule``: ``"linear"``
    (``linspace(beta_start, beta_end)``), ``"scaled_linear"``
    (``linspace(sqrt(beta_start), sqrt(beta_end))^2``), ``"squaredcos_cap_v2"`` (Nichol &
    Dhariwal 2021, eq. 17, beta capped at 0.999), ``"exp"`` (``abar(t) = exp(-12 t)``),
    ``"laplace"`` or ``"sigmoid"``; then the zero-terminal-SNR rescaling when
    ``rescale_betas_zero_snr`` is set. The values are diffusers' float32 ones, widened.
    """
    return _betas32(config).double()


def alphas_cumprod_for(config: Mapping) -> torch.Tensor:
    """``alphas_cumprod = cumprod(1 - betas)`` of ``config`` (Tensor[num_train_timesteps],
    float64), with diffusers' float32 values exactly (the product is taken in float32 as
    diffusers does, then widened)."""
    return torch.cumprod(1.0 - _betas32(config), dim=0).double()


# ---------------------------------------------------------------- the fused step

def fused(x: torch.Tensor, terms: Sequence[torch.Tensor], coefs: Sequence, noise_scale=0.0, *,
          noise: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One scheduler update ``c0 x + sum_k c_k terms[k-1] + noise_scale noise`` in one fused pass.

    Args:
        x (Tensor[B, *D]): the sample; the result has its dtype and device.
        terms (sequence of <= 4 Tensor[B, *D]): cast to x's dtype and device when they differ
            (diffusers upcasts half-precision model outputs the same way).
        coefs (sequence of len(terms) + 1): float64 host numbers, or float64 Tensor[B] / 0-dim
            tensors (per-sample coefficients). Terms whose coefficient is the float 0.0 are not read.
        noise_scale (float or Tensor[B]): s; needs ``noise``.
        noise (Tensor[B, *D], optional): z.
        out (Tensor[B, *D], optional): written in place.

    Returns:
        Tensor[B, *D]: the update (see ``gf.ops.fused_update``).
    """
    if len(terms) != len(coefs) - 1:
        raise ValueError(f"coefs must have len(terms) + 1 = {len(terms) + 1} entries, got {len(coefs)}")
    kept, values = [], [coefs[0]]
    for term, c in zip(terms, coefs[1:]):
        if not (type(c) is float and c == 0.0):
            kept.append(_like(term, x, "terms"))
            values.append(c)
    if type(noise_scale) is float and noise_scale == 0.0:
        noise = None
    elif noise is None:
        raise ValueError("noise_scale is nonzero but no noise was given")
    else:
        noise = _like(noise, x, "noise")
    values.append(noise_scale)
    device = x.device
    kernel = _kernel_for(device)
    if all(type(v) is float for v in values) and not (
            torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in kept))):
        # the common step: host coefficients, no autograd: the out= op alone
        if out is None:
            out = torch.empty_like(x, memory_format=torch.contiguous_format)
        if noise is None:
            return fused_update_packed(x, kept, host_tensor(values, torch.float64, "d"), kernel=kernel, out=out)
    batch = x.shape[0] if x.dim() > 0 else 1
    for k, v in enumerate(values):
        if type(v) is not float:
            values[k] = check_coef(v, "coefs", batch, device)
    return fused_update_unchecked(x, kept, values, kernel=kernel, noise=noise, out=out)


_KERNEL = {}  # device -> use_kernel("auto", device)
_SCHEDULES = LRU(64)  # (scheduler class, config, set_timesteps arguments) -> the schedule's tensors and plans


def cached_schedule(scheduler: "Scheduler", arguments: tuple, build):
    """``build()`` (a tuple: the tensors and step plans ``set_timesteps`` sets) for ``scheduler``'s
    class and config and these ``set_timesteps`` arguments (hashable values), computed once: a
    pipeline that calls ``set_timesteps`` for every image rebuilds nothing. Tensors in the result
    are shared: callers store clones."""
    return _SCHEDULES.get_or_compute((type(scheduler), scheduler.config.key(), arguments), build)
_GRID_PLANS = {}  # (scheduler class, config, grid values) -> {step key: packed coefficients}


def grid_plans(scheduler: "Scheduler", grid: Sequence[float]) -> dict:
    """The step plans (``pack``ed coefficients by step key) of ``scheduler``'s class and config on
    ``grid`` (its sigmas): shared by every later ``set_timesteps`` that builds the same grid, so a
    pipeline that samples many images computes each step's coefficients once."""
    config = scheduler.config
    key = (type(scheduler), config.key(), tuple(grid))
    plans = _GRID_PLANS.get(key)
    if plans is None:
        if len(_GRID_PLANS) >= 64:
            _GRID_PLANS.clear()
        plans = _GRID_PLANS[key] = {}
    return plans


def pack(coefs: Sequence[float]):
    """``(kept, coef, c0)``: which terms of ``coefs = [c0, c1..cK]`` (floats) are nonzero, the float64
    coefficient tensor ``[c0, nonzero c_k.., 0]`` that ``fused_planned`` passes to the op, and ``c0``."""
    kept = tuple(c != 0.0 for c in coefs[1:])
    coef = host_tensor([coefs[0]] + [c for c in coefs[1:] if c != 0.0] + [0.0], torch.float64, "d")
    return kept, coef, float(coefs[0])


def fused_planned(x: torch.Tensor, terms: Sequence[torch.Tensor], plan) -> torch.Tensor:
    """``fused(x, terms, coefs)`` (a new tensor) with ``plan = pack(coefs)``: the op call alone, or
    for a plan without terms (``scale_model_input``'s ``c0 x``) one multiplication, which costs a
    third of the op call on small tensors and the same single pass on large ones."""
    kept, coef, c0 = plan
    if not any(kept):
        return x * c0
    live = [t if t.dtype is x.dtype and t.shape == x.shape else _like(t, x, "terms")
            for t, k in zip(terms, kept) if k]
    if torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in live)):
        return fused(x, live, coef[:-1].tolist())
    return fused_update_packed(x, live, coef, kernel=_kernel_for(x.device),
                               out=torch.empty_like(x, memory_format=torch.contiguous_format))


def _kernel_for(device: torch.device) -> bool:
    """``use_kernel("auto", device)``, remembered per device."""
    kernel = _KERNEL.get(device)
    if kernel is None:
        kernel = _KERNEL[device] = use_kernel("auto", device)
    return kernel


def _like(t: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
    """``t`` in x's dtype and on its device (diffusers upcasts half-precision outputs the same way)."""
    if t.shape != x.shape:
        raise ValueError(f"{name} must have the sample's shape {list(x.shape)}, got {list(t.shape)}")
    if t.dtype == x.dtype and t.device == x.device:
        return t
    return t.to(device=x.device, dtype=x.dtype)


# ---------------------------------------------------------------- randomness

def randn_like_diffusers(shape_or_tensor, generator=None, device=None, dtype=None) -> torch.Tensor:
    """Standard normal noise drawn as diffusers' ``randn_tensor`` draws it.

    The draw happens on the generator's device (a CPU generator for a GPU tensor draws on the
    CPU and moves the result) and a list of generators draws sample ``b`` with ``generator[b]``,
    so a stochastic compat scheduler consumes each generator exactly as diffusers does.

    Args:
        shape_or_tensor (sequence of ints or Tensor[B, *D]): the shape, or a tensor whose shape,
            device and dtype are the defaults.
        generator (torch.Generator or list of B of them, optional): None uses torch's global RNG.
        device, dtype: of the result.

    Returns:
        Tensor[B, *D].
    """
    if isinstance(shape_or_tensor, torch.Tensor):
        shape = tuple(shape_or_tensor.shape)
        device = shape_or_tensor.device if device is None else device
        dtype = shape_or_tensor.dtype if dtype is None else dtype
    else:
        shape = tuple(shape_or_tensor)
    device = torch.device("cpu") if device is None else torch.device(device)
    rand_device = device
    if isinstance(generator, (list, tuple)):
        if len(generator) == 0:
            raise ValueError("generator must be a torch.Generator or a non-empty list of them, got []")
        if len(generator) == 1:
            generator = generator[0]
    if generator is not None:
        gen_type = (generator[0] if isinstance(generator, (list, tuple)) else generator).device.type
        if gen_type != device.type:
            if gen_type != "cpu":
                raise ValueError(f"generator on {gen_type} cannot make a tensor on {device}; use a "
                                 f"CPU generator or one on {device.type}")
            rand_device = torch.device("cpu")
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"generator must be one generator or a list of B = {shape[0]} (one per "
                             f"sample), got a list of {len(generator)}")
        one = (1,) + shape[1:]
        draws = [torch.randn(one, generator=g, device=rand_device, dtype=dtype) for g in generator]
        return torch.cat(draws, dim=0).to(device)
    return torch.randn(shape, generator=generator, device=rand_device, dtype=dtype).to(device)


# ---------------------------------------------------------------- checks

def check_prediction_type(value, allowed: Sequence[str] = PREDICTION_TYPES) -> str:
    """``value`` if it is one of ``allowed``, else ValueError naming ``prediction_type``."""
    if value not in allowed:
        raise ValueError(f"prediction_type must be one of {tuple(allowed)}, got {value!r}")
    return value


def check_choice(name: str, value, allowed: Sequence) -> None:
    """ValueError naming the option ``name`` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")
