"""``gf.sample``: the one loop over time (progress bar, callback, trajectory).

Fixed-grid solvers are stepped over the time grid; adaptive solvers (class attribute
``adaptive = True``) choose their own steps, and their ``solve(x)`` generator replaces the grid
(its iterations feed the same progress bar, callback and trajectory).
"""
from typing import Callable, Optional, Sequence

import torch
from tqdm.auto import tqdm

from genflow._checks import did_you_mean
from genflow.models import Model
from genflow.noise import NOISE_KINDS, noise_source
from genflow.schedules import time_grid, validate_grid
from genflow.solvers import get as get_solver
from genflow.solvers.base import NonFiniteError, diverged_rows

__all__ = ["NonFiniteError", "sample"]

_NO_STEP = 2**31 - 1  # the divergence flag's value while no step has written a NaN/Inf


def _fmt_t(t) -> str:
    if isinstance(t, torch.Tensor) and t.numel() > 1:
        return f"{float(t.min()):.4g}..{float(t.max()):.4g}"
    return f"{float(t):.4g}"


def _raise_diverged(solver: str, step: int, ts: torch.Tensor, x: torch.Tensor, done: int) -> None:
    """Raise ``NonFiniteError`` for a NaN/Inf first recorded at step index ``step``, or return
    when ``x`` (the state after ``done`` steps) is finite (only an intermediate stage was not)."""
    bad = int(diverged_rows(x).sum())
    if bad == 0:
        return
    steps = ts.shape[0] - 1
    after = "" if done == step + 1 else f" (counted after step {done})"
    raise NonFiniteError(
        f"gf.sample: solver {solver!r} produced NaN/Inf at step {step + 1} of {steps} (t {_fmt_t(ts[step])} -> "
        f"{_fmt_t(ts[step + 1])}): {bad} of {x.shape[0]} samples diverged{after}; check the model's output at "
        f"these times (a NaN/Inf prediction, or a prediction kind that is singular there) and the step count "
        f"(pass check_finite=False to skip this check)")


def _check_x_T(x_T, shape):
    if not isinstance(x_T, torch.Tensor):
        raise TypeError(f"x_T must be a tensor, got {type(x_T).__name__}")
    if not x_T.dtype.is_floating_point:
        raise TypeError(f"x_T must be a floating-point tensor, got {x_T.dtype}")
    if x_T.dim() < 1:
        raise ValueError(f"x_T must have a batch dimension (shape [B, *D]), got shape {tuple(x_T.shape)}")
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
    if len(shape) < 1 or any(s < 0 for s in shape):
        raise ValueError(f"shape must be non-empty with sizes >= 0 (batch first), got {shape}")
    return shape


def _grid_steps(stepper, ts, x, solver, check_finite):
    """The fixed-grid loop: ``(x, None, steps done)`` after every step (the callback's info is
    built only when there is a callback). With ``check_finite`` the fused updates record the
    first step that writes a NaN/Inf in a one-element flag, read after every step on the CPU
    (a host int) and every 8 steps and at the end on a GPU (a sync)."""
    steps = ts.shape[0] - 1
    flag = None
    if check_finite:
        flag = torch.full((1,), _NO_STEP, dtype=torch.int32, device=x.device)
        stepper.nonfinite = flag
        host = flag.numpy() if x.device.type == "cpu" else None
        every = 1 if host is not None else 8
    for i in range(steps):
        stepper.step_index = i
        x = stepper.step(i, x)
        if flag is not None and ((i + 1) % every == 0 or i + 1 == steps):
            first = int(host[0]) if host is not None else int(flag.item())
            if first != _NO_STEP:
                _raise_diverged(solver, first, ts, x, i + 1)
                flag.fill_(_NO_STEP)
        yield x, None, i + 1


def sample(model: Model, shape: Optional[Sequence[int]] = None, *, solver: str = "dpmpp_2m",
           steps: int = 20, schedule="logsnr", t_start=None, t_end=None, eta: Optional[float] = None,
           generator=None, x_T: Optional[torch.Tensor] = None, dtype: torch.dtype = torch.float32,
           device=None, backend: str = "auto", progress: bool = False,
           callback: Optional[Callable] = None, return_trajectory: bool = False,
           noise_sampler: Optional[Callable] = None, noise=None, final_step: Optional[str] = None,
           cuda_graph: bool = False, check_finite: bool = True, **solver_options):
    """Draw samples by integrating ``model`` from ``t_start`` (noise) to ``t_end`` (data).

    Args:
        model: a ``genflow.Model``.
        shape: ``(B, *D)``; required when ``x_T`` is not given.
        solver: a name from ``gf.solvers.available()``. Adaptive solvers (``rk45``,
            ``sde_adaptive``) pick their own steps between ``t_start`` and ``t_end``: ``steps``
            and ``schedule`` then only fix those endpoints; pass ``rtol``/``atol`` instead.
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
            For adaptive solvers, after every attempted step, with per-sample float64 [B]
            ``t``, ``t_next`` (equal where the step was rejected), ``h``, ``error``, ``accepted``
            (bool) and ``accepted_steps`` (cumulative counts) as well.
        return_trajectory: also return the states at every grid time, ``[steps+1, B, *D]``;
            for adaptive solvers the state after every iteration in which some sample took a
            step, ``[N+1, B, *D]`` (each sample's own times are the callback's ``t_next``;
            a sample whose step was rejected, or that has finished, repeats its state).
        noise_sampler: ``fn(sigma, sigma_next) -> Tensor`` supplying the noise instead.
        noise: ``"philox"`` (independent in-kernel draws), ``"brownian_tree"`` (every draw an
            increment of one Brownian path ``W(sigma)`` on ``[0, sigma(T)]`` keyed by the
            generator: samples change little with the step count or the step sizes;
            ``genflow.noise.BrownianTreeNoise``), or a noise source object. None (default):
            the solver's ``default_noise``, ``"philox"`` unless it says otherwise
            (``sde_adaptive`` takes ``"brownian_tree"``: a rejected step must be retried on
            the same path, or the accepted noise is biased).
        final_step: ``"x0"`` replaces the final state by the model's data prediction at
            ``t_end`` (one more NFE; removes the residual noise ``sigma(t_end)``).
        cuda_graph: capture the whole fixed-grid solve (model calls included) as a CUDA graph
            on its first call and replay it on later calls with the same model, solver, grid,
            shape and options (``genflow.cuda_graph``); equal to the eager solve for the same
            seed. CUDA tensors, shared grids, in-kernel noise, no callback/progress/trajectory.
        check_finite: stop at the first step that writes NaN/Inf into the state and raise
            ``gf.NonFiniteError`` naming the step, its times, the solver and how many samples
            diverged. The fused kernels flag it as they write (no extra pass); the flag is read
            every step on the CPU and every 8 steps on a GPU (so a GPU solve stops up to 7 steps
            late, still naming the first bad step). Adaptive solvers check the state and the
            error norms they already compute; CUDA graphs check once after the replay.
        **solver_options: passed to the solver (e.g. ``variance="large"`` for ``ddpm``).

    Returns:
        ``x`` (``[B, *D]``), or ``(x, trajectory)`` with ``return_trajectory=True``.
    """
    if not isinstance(model, Model):
        raise TypeError(f"model must be a genflow.Model, got {type(model).__name__}")
    if not isinstance(check_finite, bool):
        raise TypeError(f"check_finite must be a bool, got {type(check_finite).__name__}")
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
    if ts.device.type != "cpu":  # the grid is host data: step coefficients are host float64 math
        ts = ts.cpu()
    if x_T is not None:
        _check_x_T(x_T, shape)
        batch = x_T.shape[0]
    else:
        shape = _check_shape(shape)
        batch = shape[0]
    if ts.dim() == 2 and ts.shape[1] != batch:
        raise ValueError(f"per-sample times must have length {batch} (the batch), got {ts.shape[1]}")
    if cuda_graph:
        from genflow import cuda_graph as graphs

        graphs.check_capturable(solver_cls=solver_cls, ts=ts, device=x_T.device if x_T is not None else device,
                                noise=noise, noise_sampler=noise_sampler, callback=callback, progress=progress,
                                return_trajectory=return_trajectory)
        return graphs.graphed_solve(model, solver_cls, ts, shape=shape, x_T=x_T, dtype=dtype, device=device,
                                    generator=generator, eta=eta, backend=backend, final_step=final_step,
                                    options=solver_options, check_finite=check_finite)
    if isinstance(noise, str) and noise not in NOISE_KINDS:
        hint = did_you_mean(noise, NOISE_KINDS)
        raise ValueError(f"noise must be one of {NOISE_KINDS} or a noise source, got {noise!r}{hint}")
    if noise is None and noise_sampler is None:
        noise = getattr(solver_cls, "default_noise", "philox")
    sigma_max = process.sigma(process.T) if noise == "brownian_tree" else None
    noise = noise_source(generator, batch, noise_sampler, noise=noise, sigma_max=sigma_max)
    if x_T is None:
        sigma_start = process.sigma(ts[0]).reshape((-1,) + (1,) * (len(shape) - 1))
        x = noise.prior(shape, dtype, device) * sigma_start.to(dtype=dtype, device=device)
    else:
        x = x_T.clone(memory_format=torch.contiguous_format)
    stepper = solver_cls(model, ts, noise=noise, eta=eta, backend=backend, **solver_options)
    adaptive = getattr(solver_cls, "adaptive", False)
    if x.numel() == 0:  # an empty batch (or zero-size sample): nothing to integrate
        if return_trajectory:
            return x, x.unsqueeze(0).expand(1 if adaptive else ts.shape[0], *x.shape).clone()
        return x
    if adaptive:  # the solver picks its steps; progress is the fraction of the interval done
        stepper.check_finite = check_finite
        loop, total, bar_format = stepper.solve(x), 1.0, "{desc}: {percentage:3.0f}%|{bar}| [{elapsed}]"
    else:
        loop, total, bar_format = _grid_steps(stepper, ts, x, solver, check_finite), ts.shape[0] - 1, None
    trajectory = [x.clone()] if return_trajectory else None
    bar = tqdm(total=total, bar_format=bar_format, desc=f"genflow {solver}", leave=False) if progress else None
    try:
        for x, info, done in loop:
            if trajectory is not None and (not adaptive or bool(info["accepted"].any())):
                trajectory.append(x.clone())
            if callback is not None:
                if info is None:
                    info = {"i": done - 1, "t": ts[done - 1], "t_next": ts[done]}
                callback({**info, "x": x, "nfe": stepper.evaluations})
            if bar is not None:
                bar.update(done - bar.n)
    finally:
        if bar is not None:
            bar.close()
    if final_step == "x0":
        x = stepper.denoise(x, stepper.grid[-1])
        if check_finite and bool(diverged_rows(x).any()):
            raise NonFiniteError(f"gf.sample: final_step='x0' (the model's data prediction at t_end) is NaN/Inf "
                                 f"for {int(diverged_rows(x).sum())} of {x.shape[0]} samples; check the model's "
                                 f"output at t_end (pass check_finite=False to skip this check)")
        if trajectory is not None:
            trajectory[-1] = x.clone()
    if return_trajectory:
        return x, torch.stack(trajectory)
    return x
