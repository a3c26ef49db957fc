"""``gf.sample(..., cuda_graph=True)``: a fixed-grid solve captured once as a CUDA graph and replayed.

A solve is host float64 coefficient math plus one fused kernel per step and the model's kernels;
at small batch the host work and launch latency dominate (DESIGN.md §6: a 20-step loop replayed
as a graph takes 0.40 ms on H100, the peers' loops 11-14 ms). The first call for a given model,
solver, grid, shape, dtype and options runs the solve once on a side stream (warm-up), then
captures it with ``torch.cuda.graph``; every call (the first included) then copies its starting
state and its Philox seeds into the graph's static inputs and replays it.

Noise stays correct under replay because the in-kernel Philox stream reads its seeds from a
device tensor that each call overwrites, while the per-draw offsets (1, 2, ... in solve order)
are the same in every solve: a replay gives exactly the eager solve's result for the same seed,
and fresh seeds (``generator=None`` draws one per call) give fresh noise.

What cannot be captured raises a ``ValueError`` before anything runs (adaptive solvers,
per-sample time grids, supplied or Brownian-tree noise, callbacks, progress bars, trajectories,
tensors not on a CUDA device); a model that synchronises with the host (``.item()``, printing a
tensor, data-dependent shapes) fails during capture, and the solve then runs eagerly with a
warning that says why. Captured graphs hold their memory until ``clear()``.
"""
import warnings
from typing import NamedTuple, Optional

import torch

from genflow._cache import LRU, tensor_key, value_key
from genflow.engine.loop import NO_STEP, grid_steps, raise_diverged
from genflow.noise import PhiloxNoise, generator_seed

__all__ = ["clear", "check_capturable", "graphed_solve", "record"]

_GRAPHS = LRU(8)          # solve key (see _key) -> _Captured
_UNCAPTURABLE = LRU(64)   # solve key -> True: solves that failed to capture run eagerly (warned once)


class _Captured(NamedTuple):
    replay: object         # the captured graph's replay
    x: torch.Tensor        # static start state
    seed: torch.Tensor     # static int64 [1] or [B] seeds on the device
    out: torch.Tensor      # static result
    nonfinite: Optional[torch.Tensor]  # static divergence flag (int32 [1]) when check_finite


def clear() -> None:
    """Release every captured solve (graphs and their static buffers) and forget failed captures."""
    _GRAPHS.clear()
    _UNCAPTURABLE.clear()


def check_capturable(*, solver_cls, ts: torch.Tensor, device, noise, noise_sampler, callback, progress,
                     return_trajectory) -> None:
    """Raise ``ValueError`` naming the first option that a captured solve cannot honour."""
    device = torch.device(device) if device is not None else None
    reasons = [
        (getattr(solver_cls, "adaptive", False), f"solver {solver_cls.name!r} is adaptive (its step count depends "
                                                 "on the data); use a fixed-grid solver"),
        (ts.dim() != 1, "per-sample time grids copy coefficients to the device every step; use a shared grid"),
        (noise_sampler is not None, "noise_sampler runs Python per step; use the in-kernel Philox noise"),
        (noise not in (None, "philox"), f"noise={noise!r} is drawn on the host; use noise='philox'"),
        (callback is not None, "callback runs Python per step"),
        (progress, "a progress bar runs Python per step"),
        (return_trajectory, "return_trajectory copies the state every step"),
        (device is None or device.type != "cuda", f"the solve must run on a CUDA device (device='cuda' or a "
                                                  f"CUDA x_T), got {device}"),
        (device is not None and device.type == "cuda" and not torch.cuda.is_available(), "CUDA is not available"),
    ]
    for failed, reason in reasons:
        if failed:
            raise ValueError(f"cuda_graph=True cannot capture this solve: {reason}")


class _Same:
    """A key part equal only to itself: holds ``obj``, compared by identity (a captured graph
    replays the kernels of that very network and reads that very tensor's memory)."""

    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj

    def __eq__(self, other):
        return isinstance(other, _Same) and other.obj is self.obj

    def __hash__(self):
        return object.__hash__(self.obj)


def _model_key(model) -> tuple:
    """What a capture bakes in of ``model``: the model and its network (by identity), its
    process's parameter values (the host coefficients), its prediction kind and time map, and
    its conditioning tensors (by identity: the graph reads their memory)."""
    cond = getattr(model, "cond", None) or {}
    return (_Same(model), _Same(getattr(model, "net", None)), value_key(getattr(model, "process", None)),
            getattr(model, "prediction", None), value_key(getattr(model, "time", None)),
            tuple(sorted((name, _Same(value)) for name, value in cond.items())))


def _key(model, solver_cls, ts, shape, dtype, device, seed_shape, eta, backend, final_step, options, check_finite):
    """The values (and, for the model, the objects) a captured solve depends on."""
    return (_model_key(model), solver_cls, tensor_key(ts), tuple(shape), str(dtype), str(device), seed_shape,
            eta, backend, final_step, value_key(options), check_finite)


def _solve(model, solver_cls, ts, x, seed, eta, backend, final_step, options, nonfinite=None):
    """The eager fixed-grid solve (as ``gf.sample`` runs it), from ``x`` with device seeds ``seed``;
    ``nonfinite``: the int32 [1] flag its fused updates lower to the first step writing NaN/Inf."""
    stepper = solver_cls(model, ts, noise=PhiloxNoise(seed), eta=eta, backend=backend, **options)
    stepper.nonfinite = nonfinite  # lowered by the fused updates, read after the replay (no sync inside)
    for x, _, _ in grid_steps(stepper, ts, x, solver_cls.name, check_finite=False):
        pass
    if final_step == "x0":
        x = stepper.denoise(x, stepper.grid[-1])
    return x


def _record(body, device):
    """Run ``body()`` once on a side stream (warm-up: lazy initialisation off the graph), then
    capture it; returns ``(replay, out)`` with ``out`` the captured call's result buffer."""
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        body()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = body()
    return graph.replay, out


def record(body, device):
    """Warm ``body()`` up on a side stream, then capture it as a CUDA graph: ``(replay, out)``.
    The entry point for the other front ends (``gf.solve``); the same capture as ``gf.sample``'s."""
    return _record(body, device)


def _capture(model, solver_cls, ts, x0, seed, eta, backend, final_step, options, check_finite) -> _Captured:
    static_x, static_seed = x0.clone(), seed.clone()
    flag = torch.full((1,), NO_STEP, dtype=torch.int32, device=x0.device) if check_finite else None

    def body():  # reads only the static inputs; the clone keeps static_x intact across replays
        return _solve(model, solver_cls, ts, static_x.clone(), static_seed, eta, backend, final_step, options, flag)

    replay, out = _record(body, x0.device)
    return _Captured(replay, static_x, static_seed, out, flag)


def _checked(solver_cls, ts, x, flag):
    """x, after raising ``NonFiniteError`` if ``flag`` recorded a step that wrote NaN/Inf (a sync)."""
    if flag is not None:
        first = int(flag.item())
        if first != NO_STEP:
            raise_diverged(solver_cls.name, first, ts, x, ts.shape[0] - 1)
    return x


def graphed_solve(model, solver_cls, ts: torch.Tensor, *, shape, x_T: Optional[torch.Tensor], dtype, device,
                  generator, eta, backend, final_step, options, check_finite: bool = False) -> torch.Tensor:
    """The solve ``gf.sample`` would run, as a replay of a captured CUDA graph (see the module doc).

    ``ts`` is the host float64 grid ``[steps+1]``; returns a fresh tensor (the graph's output
    buffer is overwritten by the next replay). ``check_finite``: the fused updates flag the first
    step that writes NaN/Inf (captured with the graph); the flag is read once after the replay
    and ``NonFiniteError`` raised as ``gf.sample`` does.
    """
    batch = shape[0] if x_T is None else x_T.shape[0]
    device = torch.device(device) if x_T is None else x_T.device
    seed_value = generator_seed(generator, batch)
    seed = (seed_value if isinstance(seed_value, torch.Tensor) else torch.tensor([seed_value], dtype=torch.int64))
    seed = seed.to(device)
    if x_T is None:
        sigma_start = model.process.sigma(ts[0]).item()
        x0 = PhiloxNoise(seed).prior(tuple(shape), dtype, device) * sigma_start
    else:
        x0 = x_T.contiguous()
    key = _key(model, solver_cls, ts, x0.shape, x0.dtype, device, tuple(seed.shape), eta, backend, final_step, options,
               check_finite)
    flag = torch.full((1,), NO_STEP, dtype=torch.int32, device=device) if check_finite else None
    if _UNCAPTURABLE.get(key):
        x = _solve(model, solver_cls, ts, x0.clone(), seed, eta, backend, final_step, options, flag)
        return _checked(solver_cls, ts, x, flag)
    captured = _GRAPHS.get(key)
    if captured is None:
        try:
            captured = _capture(model, solver_cls, ts, x0, seed, eta, backend, final_step, options, check_finite)
        except RuntimeError as error:  # a host sync or an uncapturable op in the model or solver
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            _UNCAPTURABLE.put(key, True)
            warnings.warn(f"cuda_graph=True: the solve could not be captured as a CUDA graph ({error}); "
                          "running it eagerly (and this solve from now on)", RuntimeWarning, stacklevel=3)
            x = _solve(model, solver_cls, ts, x0.clone(), seed, eta, backend, final_step, options, flag)
            return _checked(solver_cls, ts, x, flag)
        _GRAPHS.put(key, captured)
    captured.x.copy_(x0)
    captured.seed.copy_(seed)
    if captured.nonfinite is not None:
        captured.nonfinite.fill_(NO_STEP)
    captured.replay()
    return _checked(solver_cls, ts, captured.out.clone(), captured.nonfinite)
