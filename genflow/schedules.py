"""Time grids for samplers: ``steps + 1`` times from ``t_start`` (noisier) down to ``t_end``.

Every grid is returned in float64. With scalar endpoints it has shape ``[steps + 1]``; with
per-sample endpoints (length-B tensors, e.g. SDEdit-style partial denoising) it has shape
``[steps + 1, B]``, one column per sample.
"""
import math
from typing import Sequence, Union

import numpy as np
import torch

from genflow._cache import LRU
from genflow._checks import check_choice, check_int, check_real

__all__ = ["SCHEDULES", "time_grid", "validate_grid"]

SCHEDULES = ("uniform", "quadratic", "logsnr", "karras", "cosine")


def _finite_log_snr(process, t: torch.Tensor, toward: torch.Tensor) -> torch.Tensor:
    """log-SNR at t, moved a hair toward ``toward`` where it is infinite (e.g. LinearPath ends)."""
    lam = process.log_snr(t)
    if torch.isfinite(lam).all():
        return lam
    nudged = t + 1e-4 * (toward - t)
    return torch.where(torch.isfinite(lam), lam, process.log_snr(nudged))


_GRIDS = LRU(64)  # (process values, steps, schedule, t_start, t_end, rho) -> (grid, grid._version)


def time_grid(process, steps: int, schedule: str = "logsnr", t_start=None, t_end=None, *,
              rho: float = 7.0) -> torch.Tensor:
    """A decreasing grid of ``steps + 1`` times from ``t_start`` to ``t_end``.

    Schedules (``u = i / steps`` runs 0 -> 1):
      * ``uniform``:   ``t = t_start + u (t_end - t_start)``.
      * ``quadratic``: ``t = t_end + (t_start - t_end)(1 - u)^2`` (DDIM's quadratic spacing,
        Song et al. 2021a, dense near the data).
      * ``logsnr``:    uniform in ``lambda = log(alpha/sigma)`` (DPM-Solver, Lu et al. 2022).
      * ``karras``:    uniform in ``s^(1/rho)`` with ``s = sigma/alpha = exp(-lambda)``
        (Karras et al. 2022, eq. 5), for any process.
      * ``cosine``:    the log-SNR spacing of the cosine schedule (Nichol & Dhariwal 2021),
        ``lambda = -2 log tan(pi w / 2)`` uniform in ``w``, for any process.
    The endpoints are exact. ``t_start`` defaults to ``process.T``, ``t_end`` to ``process.t_min``.
    ``steps`` is a Python, NumPy or 0-d tensor integer; ``t_start``, ``t_end`` and ``rho`` real
    numbers of any of these types (the times also length-B per-sample tensors or sequences).
    Grids with scalar endpoints are cached by value (the process's parameters included) and
    shared between calls: clone before modifying.
    """
    steps = check_int("steps", steps, low=1)
    rho = check_real("rho", rho, low=0.0, low_open=True)
    check_choice("schedule", schedule, SCHEDULES)
    t_start, t_end = _time_arg("t_start", t_start), _time_arg("t_end", t_end)
    scalar = not isinstance(t_start, torch.Tensor) and not isinstance(t_end, torch.Tensor)
    key = (process.cache_key(), steps, schedule, t_start, t_end, rho) if scalar else None
    hit = _GRIDS.get(key) if scalar else None
    if hit is not None and hit[0]._version == hit[1]:
        return hit[0]
    ts = _time_grid(process, steps, schedule, t_start, t_end, rho)
    if scalar:
        _GRIDS.put(key, (ts, ts._version))
    return ts


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


def _time_grid(process, steps, schedule, t_start, t_end, rho):
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
    per_sample = t0.dim() == 1 or t1.dim() == 1
    t0, t1 = torch.broadcast_tensors(t0, t1)
    u = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    if per_sample:
        u = u[:, None]
    if schedule == "uniform":
        ts = t0 + u * (t1 - t0)
    elif schedule == "quadratic":
        ts = t1 + (t0 - t1) * (1 - u) ** 2
    else:
        lam0 = _finite_log_snr(process, t0, t1)
        lam1 = _finite_log_snr(process, t1, t0)
        if schedule == "logsnr":
            lam = lam0 + u * (lam1 - lam0)
        elif schedule == "karras":
            s0, s1 = torch.exp(-lam0) ** (1 / rho), torch.exp(-lam1) ** (1 / rho)
            lam = -rho * torch.log(s0 + u * (s1 - s0))
        else:  # cosine: lambda(w) = -2 log tan(pi w / 2), w in (0, 1)
            w0 = 2 / math.pi * torch.atan(torch.exp(-lam0 / 2))
            w1 = 2 / math.pi * torch.atan(torch.exp(-lam1 / 2))
            lam = -2 * torch.log(torch.tan(math.pi / 2 * (w0 + u * (w1 - w0))))
        ts = process.t_from_log_snr(lam)
    # rounding in the log-SNR round trip may step outside [t_end, t_start] or repeat a time on
    # tiny intervals: keep the grid inside them, and fall back to uniform spacing where it is
    # not strictly decreasing
    ts = torch.minimum(torch.maximum(ts, t1), t0)
    ts[0], ts[-1] = t0, t1
    if not bool((ts[1:] < ts[:-1]).all()):
        uniform = t0 + u * (t1 - t0)
        uniform[0], uniform[-1] = t0, t1
        bad = ~(ts[1:] < ts[:-1]).all(0)
        ts = torch.where(bad, uniform, ts)
        if not bool((ts[1:] < ts[:-1]).all()):
            raise ValueError(f"t_start - t_end is too small for {steps} distinct steps in float64, got "
                             f"t_start={t0.tolist()}, t_end={t1.tolist()}")
    return ts


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
