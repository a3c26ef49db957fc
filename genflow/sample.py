"""``gf.sample``: the diffusion front end of the engine's one time loop (``genflow.engine.loop.run``:
progress bar, callback, trajectory, divergence check).

Fixed-grid solvers are stepped over the time grid; adaptive solvers (class attribute
``adaptive = True``) choose their own steps, and their ``solve(x)`` generator replaces the grid
(its iterations feed the same progress bar, callback and trajectory).
"""
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from genflow._checks import check_float_dtype, check_int, did_you_mean, state_dtype_for
from genflow._extension import check_device
from genflow.engine.loop import run
from genflow.models import Model
from genflow.noise import NOISE_KINDS, noise_source
from genflow.schedules import Schedule, split_schedule_options, time_grid, validate_grid
from genflow.solvers import get as get_solver
from genflow.errors import NonFiniteError, diverged_rows

__all__ = ["NonFiniteError", "sample"]

def _check_x_T(x_T, shape):
    if not isinstance(x_T, torch.Tensor):
        raise TypeError(f"x_T must be a tensor, got {type(x_T).__name__}")
    if not x_T.dtype.is_floating_point:
        raise TypeError(f"x_T must be a floating-point tensor, got {x_T.dtype}")
    if x_T.dim() < 1:
        raise ValueError(f"x_T must have a batch dimension (shape [B, *D]), got shape {tuple(x_T.shape)}")
    if shape is not None and tuple(shape) != tuple(x_T.shape):
        raise ValueError(f"shape {tuple(shape)} does not match x_T's shape {tuple(x_T.shape)}")
    if not _all_finite(x_T):
        raise ValueError("x_T contains NaN or Inf")


_NUMPY_DTYPES = (torch.float32, torch.float64, torch.float16)


def _all_finite(x: torch.Tensor) -> bool:
    """Whether ``x`` holds no NaN/Inf: NumPy's check on CPU tensors (2-20x faster than
    ``torch.isfinite(x).all()``, which is per-solve overhead at small batches), torch's elsewhere."""
    if (x.device.type == "cpu" and x.dtype in _NUMPY_DTYPES and x.layout == torch.strided
            and not torch.compiler.is_compiling()):
        return bool(np.isfinite(x.detach().numpy()).all())
    return bool(torch.isfinite(x).all())


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


def _grid(process, steps, schedule, t_start, t_end, rho, options) -> torch.Tensor:
    """The time grid: ``time_grid`` for a schedule name or ``Schedule`` (``steps`` default 20,
    ``rho`` and the schedule's ``options`` passed through), or an explicit grid, which ``steps``
    (when given) must agree with."""
    if isinstance(schedule, (str, Schedule)):
        options = options if rho is None else {**options, "rho": rho}
        return time_grid(process, 20 if steps is None else steps, schedule, t_start, t_end, **options)
    ts = validate_grid(schedule, process)
    if steps is not None and check_int("steps", steps, low=1) != ts.shape[0] - 1:
        raise ValueError(f"steps={steps} conflicts with the explicit grid given as schedule, which has "
                         f"{ts.shape[0] - 1} steps; pass one or the other")
    if rho is not None:
        raise ValueError(f"rho={rho} applies to the 'karras' schedule, not to an explicit grid")
    return ts


def _plain_number(value):
    """A NumPy scalar or 0-d tensor as the Python number it holds (int, float or bool), so every
    solver option accepts them; anything else unchanged."""
    if isinstance(value, np.generic) or (isinstance(value, torch.Tensor) and value.dim() == 0
                                         and not value.requires_grad and not value.is_complex()):
        return value.item()
    return value


def sample(model: Model, shape: Optional[Sequence[int]] = None, *, solver: str = "dpmpp_2m",
           steps: Optional[int] = None, schedule="logsnr", t_start=None, t_end=None, rho: Optional[float] = None,
           eta: Optional[float] = None, generator=None, x_T: Optional[torch.Tensor] = None,
           dtype: torch.dtype = torch.float32, state_dtype: Optional[torch.dtype] = None,
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
        steps: number of solver steps (``>= 1``, default 20; a Python, NumPy or 0-d tensor int).
        schedule: a name from ``gf.schedules.SCHEDULES`` (its options, e.g. ``alpha``/``beta``
            of ``"beta"``, as keywords here), a ``gf.schedules.Schedule``, or an explicit decreasing grid
            (``[N+1]`` or per-sample ``[N+1, B]``; ``t_start``, ``t_end`` are then ignored, and
            ``steps``, when given, must equal ``N``).
        t_start, t_end: integration limits (default ``process.T`` and ``process.t_min``);
            numbers or length-B tensors (each sample starts or ends at its own time).
        rho: the ``karras`` (default 7) or ``polyexponential`` (default 1) schedule's exponent.
        eta: churn for solvers that take it (None: the solver's default).
        generator: None, an int seed, B per-sample seeds, or a ``torch.Generator``. Noise comes
            from the in-kernel Philox stream; with per-sample seeds a sample does not depend on
            its batch.
        x_T: the starting state (default ``sigma(t_start) * N(0, I)`` from the generator).
        dtype, device: of the sample when ``x_T`` is not given.
        state_dtype: the dtype of the solver's state and history (default: float32 for float16
            and bfloat16 inputs, the input's dtype otherwise; float64 on request). The model
            runs in the input's dtype (``x_T``'s or ``dtype``) and the sample is returned in it.
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
        **solver_options: passed to the solver (e.g. ``variance="large"`` for ``ddpm``). Every
            solver takes ``model_reuses_buffers=True`` for a model that returns memory it
            reuses (a static output buffer: CUDA graphs, ``torch.compile(mode="reduce-overhead")``):
            every output is then copied. Without it one static buffer is detected and copied
            after the first call, a pool of buffers raises ``OutputAliasError``, an output that
            is the model's input is copied, and a model that modifies its input in place raises
            ``InputMutationError`` naming the solver and step (``genflow.ownership``).

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
    schedule_options, solver_options = split_schedule_options(schedule, solver_options)
    solver_options = {name: _plain_number(value) for name, value in solver_options.items()}
    if backend not in ("auto", "torch", "cpu", "cuda"):
        raise ValueError(f"backend must be 'auto', 'torch', 'cpu' or 'cuda', got {backend!r}")
    device = check_device("device", device)
    process = model.process
    ts = _grid(process, steps, schedule, t_start, t_end, rho, schedule_options)
    if ts.device.type != "cpu":  # the grid is host data: step coefficients are host float64 math
        ts = ts.cpu()
    if x_T is not None:
        _check_x_T(x_T, shape)
        batch = x_T.shape[0]
    else:
        shape = _check_shape(shape)
        batch = shape[0]
    input_dtype = x_T.dtype if x_T is not None else check_float_dtype("dtype", dtype)
    state_dtype = state_dtype_for(state_dtype, input_dtype, cuda_graph, "the input")
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
        x = noise.prior(shape, state_dtype, device) * sigma_start.to(dtype=state_dtype, device=device)
    else:
        x = x_T.to(state_dtype, memory_format=torch.contiguous_format, copy=True)
    if state_dtype != input_dtype:  # the model runs in the input's dtype, the state in state_dtype
        solver_options["model_dtype"] = input_dtype
    stepper = solver_cls(model, ts, noise=noise, eta=eta, backend=backend, **solver_options)
    adaptive = getattr(solver_cls, "adaptive", False)
    if x.numel() == 0:  # an empty batch (or zero-size sample): nothing to integrate
        if return_trajectory:
            return x, x.unsqueeze(0).expand(1 if adaptive else ts.shape[0], *x.shape).clone()
        return x
    x, trajectory = run(stepper, x, ts=None if adaptive else ts, solver=solver, check_finite=check_finite,
                        callback=callback, progress=progress, trajectory=return_trajectory)
    if final_step == "x0":
        x = stepper.denoise(x, stepper.grid[-1])
        if check_finite and bool(diverged_rows(x).any()):
            raise NonFiniteError(f"gf.sample: final_step='x0' (the model's data prediction at t_end) is NaN/Inf "
                                 f"for {int(diverged_rows(x).sum())} of {x.shape[0]} samples; check the model's "
                                 f"output at t_end (pass check_finite=False to skip this check)")
        if trajectory is not None:
            trajectory[-1] = x.clone()
    if return_trajectory:
        return x.to(input_dtype), torch.stack(trajectory).to(input_dtype)
    return x.to(input_dtype)
