"""``gf.sample``: the one loop over time (progress bar, callback, trajectory)."""
from typing import Callable, Optional, Sequence

import torch
from tqdm.auto import tqdm

from genflow.models import Model
from genflow.noise import noise_source
from genflow.schedules import time_grid, validate_grid
from genflow.solvers import get as get_solver

__all__ = ["sample"]


def _check_x_T(x_T, shape):
    if not isinstance(x_T, torch.Tensor):
        raise TypeError(f"x_T must be a tensor, got {type(x_T).__name__}")
    if not x_T.dtype.is_floating_point:
        raise TypeError(f"x_T must be a floating-point tensor, got {x_T.dtype}")
    if x_T.dim() < 1 or x_T.shape[0] == 0:
        raise ValueError(f"x_T must have a non-empty batch dimension, got shape {tuple(x_T.shape)}")
    if shape is not None and tuple(shape) != tuple(x_T.shape):
        raise ValueError(f"shape {tuple(shape)} does not match x_T's shape {tuple(x_T.shape)}")
    if not torch.isfinite(x_T).all():
        raise ValueError("x_T contains NaN or Inf")


def _check_shape(shape):
    if shape is None:
        raise ValueError("shape is required when x_T is not given")
    if isinstance(shape, int):
        shape = (shape,)
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError as error:
        raise TypeError(f"shape must be a sequence of ints, got {shape!r}") from error
    if len(shape) < 1 or any(s < 1 for s in shape):
        raise ValueError(f"shape must be non-empty with positive sizes (batch first), got {shape}")
    return shape


def sample(model: Model, shape: Optional[Sequence[int]] = None, *, solver: str = "dpmpp_2m",
           steps: int = 20, schedule="logsnr", t_start=None, t_end=None, eta: Optional[float] = None,
           generator=None, x_T: Optional[torch.Tensor] = None, dtype: torch.dtype = torch.float32,
           device=None, backend: str = "auto", progress: bool = False,
           callback: Optional[Callable] = None, return_trajectory: bool = False,
           noise_sampler: Optional[Callable] = None, final_step: Optional[str] = None,
           **solver_options):
    """Draw samples by integrating ``model`` from ``t_start`` (noise) to ``t_end`` (data).

    Args:
        model: a ``genflow.Model``.
        shape: ``(B, *D)``; required when ``x_T`` is not given.
        solver: a name from ``gf.solvers.available()``.
        steps: number of solver steps (``>= 1``).
        schedule: a name from ``gf.schedules.SCHEDULES`` or an explicit decreasing grid
            (``[steps+1]`` or per-sample ``[steps+1, B]``; ``steps``, ``t_start``, ``t_end``
            are then ignored).
        t_start, t_end: integration limits (default ``process.T`` and ``process.t_min``);
            floats or length-B tensors (each sample starts or ends at its own time).
        eta: churn for solvers that take it (None: the solver's default).
        generator: None, an int seed, B per-sample seeds, or a ``torch.Generator``. Noise comes
            from the in-kernel Philox stream; with per-sample seeds a sample does not depend on
            its batch.
        x_T: the starting state (default ``sigma(t_start) * N(0, I)`` from the generator).
        dtype, device: of the sample when ``x_T`` is not given.
        backend: ``"auto"``, ``"torch"``, ``"cpu"`` or ``"cuda"`` for the fused update.
        progress: show a tqdm progress bar.
        callback: called after every step with a dict ``i, t, t_next, x, nfe``; ``x`` is the
            sampler's working buffer (updated in place by later steps: clone it to keep it).
        return_trajectory: also return the states at every grid time, ``[steps+1, B, *D]``.
        noise_sampler: ``fn(sigma, sigma_next) -> Tensor`` supplying the noise instead.
        final_step: ``"x0"`` replaces the final state by the model's data prediction at
            ``t_end`` (one more NFE; removes the residual noise ``sigma(t_end)``).
        **solver_options: passed to the solver (e.g. ``variance="large"`` for ``ddpm``).

    Returns:
        ``x`` (``[B, *D]``), or ``(x, trajectory)`` with ``return_trajectory=True``.
    """
    if not isinstance(model, Model):
        raise TypeError(f"model must be a genflow.Model, got {type(model).__name__}")
    if final_step not in (None, "x0"):
        raise ValueError(f"final_step must be None or 'x0', got {final_step!r}")
    solver_cls = get_solver(solver)
    if backend not in ("auto", "torch", "cpu", "cuda"):
        raise ValueError(f"backend must be 'auto', 'torch', 'cpu' or 'cuda', got {backend!r}")
    process = model.process
    if isinstance(schedule, str):
        ts = time_grid(process, steps, schedule, t_start, t_end)
    else:
        ts = validate_grid(schedule, process)
    if x_T is not None:
        _check_x_T(x_T, shape)
        batch = x_T.shape[0]
    else:
        shape = _check_shape(shape)
        batch = shape[0]
    if ts.dim() == 2 and ts.shape[1] != batch:
        raise ValueError(f"per-sample times must have length {batch} (the batch), got {ts.shape[1]}")
    noise = noise_source(generator, batch, noise_sampler)
    if x_T is None:
        sigma_start = process.sigma(ts[0]).reshape((-1,) + (1,) * (len(shape) - 1))
        x = noise.prior(shape, dtype, device) * sigma_start.to(dtype=dtype, device=device)
    else:
        x = x_T.clone(memory_format=torch.contiguous_format)
    stepper = solver_cls(model, ts, noise=noise, eta=eta, backend=backend, **solver_options)
    n_steps = ts.shape[0] - 1
    trajectory = [x.clone()] if return_trajectory else None
    for i in tqdm(range(n_steps), disable=not progress, desc=f"genflow {solver}", leave=False):
        x = stepper.step(i, x)
        if trajectory is not None:
            trajectory.append(x.clone())
        if callback is not None:
            callback({"i": i, "t": ts[i], "t_next": ts[i + 1], "x": x, "nfe": stepper.evaluations})
    if final_step == "x0":
        x = stepper.denoise(x, stepper.grid[-1])
        if trajectory is not None:
            trajectory[-1] = x.clone()
    if return_trajectory:
        return x, torch.stack(trajectory)
    return x
