"""``gf.solve``: integrate a user's ODE or SDE (``gf.ODE``, ``gf.SDE``) with the engine.

ODE solvers are Butcher tableaux (``genflow.engine.tableau.TABLEAUX``) run by the one
Runge–Kutta engine, on a fixed grid or with adaptive per-sample steps; SDE solvers are the
schemes of ``genflow.engine.sde.SDE_SOLVERS`` on the Brownian motion of
``genflow.engine.brownian.make_brownian``. Both run through the one time loop
(``genflow.engine.loop.run``: callback, progress bar, divergence check).
"""
import warnings
from typing import Callable, NamedTuple, Optional

import torch

from genflow._cache import LRU, tensor_key
from genflow._checks import check_bool, check_choice, check_int, check_real, state_dtype_for
from genflow.engine.adjoint import AdjointSolve
from genflow.engine.loop import NO_STEP, grid_steps, raise_diverged, run
from genflow.engine.ode import AdaptiveRK, FixedRK
from genflow.engine.tableau import TABLEAUX
from genflow.engine.terms import ODE, SDE
from genflow.ownership import FRESH_OUTPUT_ADVICE, OutputOwnership
from genflow.ops.fused_update import use_kernel

__all__ = ["Solution", "clear_graphs", "graphed_solve", "solve"]

BACKENDS = ("auto", "torch", "cpu", "cuda")
DRIFT_ADVICE = "the drift at these times (a NaN/Inf output, or a solution that blows up there)"
ERROR_NORMS = ("sample", "batch")
# the most drift outputs a Runge–Kutta step holds across later calls: its stages and dense-output stages
HELD_STAGES = max(t.stages + (len(t.dense_stages[0]) if t.dense_stages else 0) for t in TABLEAUX.values())


class Solution(NamedTuple):
    """What ``gf.solve`` returns with ``saveat`` or ``dense=True``.

    Attributes:
        y (Tensor[B, *D]): the state at ``t1``.
        ts (float64 Tensor[S] or [S, B]): the save times (None without ``saveat``).
        ys (Tensor[S, B, *D]): the states at ``ts`` (None without ``saveat``).
        stats (dict): ``nfe``, and for adaptive solves ``accepted_steps`` / ``rejected_steps``
            (int64 [B]).
        interpolation: the adaptive solver (``dense=True``); use ``evaluate``.
    """

    y: torch.Tensor
    ts: Optional[torch.Tensor]
    ys: Optional[torch.Tensor]
    stats: dict
    interpolation: Optional[object] = None

    def evaluate(self, t) -> torch.Tensor:
        """The dense solution at ``t`` (float or float64 [B]); needs ``dense=True``."""
        if self.interpolation is None:
            raise ValueError("Solution.evaluate needs gf.solve(..., dense=True) with an adaptive solver")
        return self.interpolation.evaluate(t).to(self.y.dtype)  # the state may be kept in a wider dtype


def _in_dtype(term, dtype: torch.dtype):
    """``term`` with its drift (and diffusion) called in ``dtype`` (``t`` and ``y`` cast to it) and
    their outputs cast back to the state's dtype: the user's functions run in ``y0``'s dtype while
    the state is kept wider."""
    def cast(fn):
        def in_dtype(t, y):
            out = fn(t.to(dtype) if isinstance(t, torch.Tensor) else t, y.to(dtype))
            return out.to(y.dtype) if isinstance(out, torch.Tensor) and out.dtype == dtype else out
        return in_dtype

    if isinstance(term, ODE):
        return ODE(cast(term.drift))
    return SDE(cast(term.drift), cast(term.diffusion), noise=term.noise, sde_type=term.sde_type,
               brownian_size=term.brownian_size)


def _cast(out, dtype: torch.dtype):
    """A solve's result (a tensor or a ``Solution``) in ``dtype`` (unchanged when it already is)."""
    if isinstance(out, torch.Tensor):
        return out.to(dtype)
    return out._replace(y=out.y.to(dtype), ys=None if out.ys is None else out.ys.to(dtype))


def _times(name: str, value, batch: int) -> torch.Tensor:
    """A float or a length-B tensor as float64 [B] on the host."""
    if isinstance(value, torch.Tensor) and value.dim() == 1 and value.numel() != 1:
        if value.shape[0] != batch:
            raise ValueError(f"{name} must be a float or a tensor of shape [B] = [{batch}], got shape {list(value.shape)}")
        value = value.detach().to("cpu", torch.float64)
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"{name} must be finite")
        return value
    return torch.full((batch,), check_real(name, value), dtype=torch.float64)


def _shared(t: torch.Tensor) -> bool:
    """Whether every sample has the same time (and there is at least one sample)."""
    return t.numel() > 0 and bool((t == t[0]).all())


def _grid(ts, steps, t0, t1, batch):
    """The fixed grid ``[N+1]`` (shared times) or ``[N+1, B]`` (per-sample) as host float64."""
    if ts is not None:
        if not isinstance(ts, torch.Tensor):
            ts = torch.as_tensor(ts, dtype=torch.float64)
        ts = ts.detach().to("cpu", torch.float64)
        if ts.dim() not in (1, 2) or ts.shape[0] < 2 or (ts.dim() == 2 and ts.shape[1] != batch):
            raise ValueError(f"ts must have shape [N+1] or [N+1, B] = [N+1, {batch}] with N >= 1, got {list(ts.shape)}")
        if not bool(torch.isfinite(ts).all()):
            raise ValueError("ts must be finite")
        diff = ts[1:] - ts[:-1]
        if not (bool((diff > 0).all()) or bool((diff < 0).all())):
            raise ValueError("ts must be strictly increasing or strictly decreasing")
        return ts
    steps = check_int("steps", steps, low=1)
    fractions = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    if _shared(t0) and _shared(t1):
        ts = t0[0] + (t1[0] - t0[0]) * fractions
    else:
        ts = t0[None, :] + (t1 - t0)[None, :] * fractions[:, None]
    ts[-1] = t1[0] if ts.dim() == 1 else t1
    return ts


def _drift(term, y0: torch.Tensor, shared: bool):
    """``f(y, t)`` for the engine: the user's ``drift(t, y)`` with ``t`` as a tensor of y's dtype
    and device (0-d for a shared time, [B] per sample); its first output is checked, and every
    output owned (``genflow.ownership``: a drift returning ``y``, one static buffer or a pool of
    them never corrupts the stages; one writing into ``y`` raises ``InputMutationError``)."""
    drift, checked = term.drift, []
    ownership = OutputOwnership(advice=FRESH_OUTPUT_ADVICE, recent=HELD_STAGES + 1)
    calls = [0, None]  # drift calls so far, the time of the last one

    def where():
        low, high = float(calls[1].min()), float(calls[1].max())
        at = f"{low:.4g}" if low == high else f"[{low:.4g}, {high:.4g}] (per sample)"
        return f"gf.solve: drift call {calls[0]} at t={at}"

    def f(y, t):
        if isinstance(t, torch.Tensor):
            t = t[0] if shared else t
            t = t.to(device=y.device, dtype=y.dtype)
        else:
            t = torch.scalar_tensor(t, dtype=y.dtype, device=y.device)
        calls[0], calls[1] = calls[0] + 1, t
        out = ownership.call(drift, y, t, y, where=where)
        if not checked:
            if not isinstance(out, torch.Tensor) or out.shape != y.shape or out.dtype != y.dtype:
                got = f"{out.dtype} {list(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
                raise ValueError(f"drift(t, y) must return a tensor like y ({y.dtype} {list(y.shape)}), got {got}")
            checked.append(True)
        return out if out.device == y.device else out.to(y.device)

    return f


def _saveat(saveat, batch):
    if saveat is None:
        return None
    saveat = torch.as_tensor(saveat, dtype=torch.float64).detach().cpu()
    if saveat.dim() == 0:
        saveat = saveat.reshape(1)
    if saveat.dim() not in (1, 2) or (saveat.dim() == 2 and saveat.shape[1] != batch) or saveat.shape[0] == 0:
        raise ValueError(f"saveat must have shape [S] or [S, B] = [S, {batch}] with S >= 1, got {list(saveat.shape)}")
    return saveat


def _grid_indices(saveat, ts):
    """The grid index of each save time (a fixed grid saves at its own nodes only)."""
    grid = ts if ts.dim() == 2 else ts[:, None]
    indices = []
    for s in saveat:
        hits = ((grid - s.reshape(1, -1)).abs() <= 1e-12 * (1 + grid.abs())).all(1).nonzero()
        if hits.numel() == 0:
            raise ValueError(f"saveat time {s.tolist()} is not a node of the fixed grid: with steps/ts, save at grid "
                             f"times (or use an adaptive solver, which interpolates)")
        indices.append(int(hits[0]))
    return indices


def solve(term, y0: torch.Tensor, t0, t1, *, solver: str, steps: Optional[int] = None, ts=None,
          rtol: Optional[float] = None, atol: Optional[float] = None, generator=None, brownian=None, saveat=None,
          dense: bool = False, callback: Optional[Callable] = None, progress: bool = False, check_finite: bool = True,
          backend: str = "auto", error_norm: str = "sample", h_init=None, max_steps: int = 10_000,
          cuda_graph: bool = False, adjoint: bool = False, adjoint_params=None, adjoint_rtol: Optional[float] = None,
          adjoint_atol: Optional[float] = None, state_dtype: Optional[torch.dtype] = None, **solver_options):
    """Integrate ``term`` (``gf.ODE`` or ``gf.SDE``) from ``y0`` at ``t0`` to ``t1``.

    Args:
        term: ``gf.ODE(drift)`` (ODE solvers: ``TABLEAUX``) or ``gf.SDE(drift, diffusion, ...)``
            (SDE solvers: ``genflow.engine.sde.SDE_SOLVERS``).
        y0 (Tensor[B, *D]): the start state (not modified).
        t0, t1: floats, or float Tensor[B] (each sample has its own interval; either direction).
        solver: a name from ``TABLEAUX`` (``euler``, ``midpoint``, ``heun``, ``ralston``, ``rk4``,
            ``rk4_38``, ``bosh3``, ``tsit5``, ``dopri5``, ``dop853``) or of the SDE solvers.
        steps: a uniform grid of ``steps`` steps; ``ts``: an explicit grid ``[N+1]`` or
            ``[N+1, B]`` (monotone; its ends replace t0/t1). Without either an embedded pair
            (bosh3, tsit5, dopri5, dop853) steps adaptively.
        rtol, atol: adaptive tolerances (default 1e-6 each; only for adaptive solves).
        generator, brownian: the SDE's noise (see ``genflow.engine.brownian.make_brownian``).
        saveat: times ``[S]`` or ``[S, B]`` at which to return the state (adaptive solves
            interpolate with the dense output; fixed grids save at their own nodes).
        dense: keep the adaptive solve's stages; ``Solution.evaluate(t)`` interpolates.
        callback: called after every step (or adaptive iteration) with a dict ``i, t, t_next,
            x, nfe`` (``x`` is the working buffer: clone it to keep it).
        progress: a tqdm progress bar.  check_finite: raise ``gf.NonFiniteError`` at the
            first step that makes the state NaN/Inf.
        backend: ``"auto"``, ``"torch"``, ``"cpu"`` or ``"cuda"`` for the fused updates.
        error_norm: ``"sample"`` (per-sample step sizes) or ``"batch"`` (one step size from the
            rms over the batch, as torchdiffeq).
        h_init: the first adaptive step (default: Hairer's automatic choice, 1 NFE).
        max_steps: bound on the adaptive iterations.
        cuda_graph: capture the fixed-grid ODE solve (drift calls included) as a CUDA graph on its
            first call and replay it on later calls with the same term, solver, grid, shape and
            dtype (``graphed_solve``); CUDA tensors, a shared grid, no saveat/callback/progress.
        adjoint: ODE terms only: differentiate by the continuous adjoint (Chen et al. 2018,
            Algorithm 1; ``genflow.engine.adjoint``) instead of backpropagation through the steps:
            the forward solve keeps no graph (memory O(1) in the steps) and the backward pass solves
            the augmented ``[y, a, dL/dtheta]`` ODE from ``t1`` back to ``t0`` with the same solver
            (a fixed grid reversed; adaptive steps with ``adjoint_rtol``/``adjoint_atol``, default
            ``rtol``/``atol``, on the batch as one system). Needs shared times (floats ``t0``,
            ``t1``, a grid ``[N+1]``); not with ``dense`` or ``cuda_graph``. There is no SDE adjoint:
            backpropagation through the steps is the exact gradient of the discretised SDE on its
            Brownian path, where an SDE adjoint would need the path again backward in time.
        adjoint_params: the tensors to differentiate besides ``y0`` (default: the drift's
            parameters if it is an ``nn.Module``); a drift using another tensor that requires grad
            raises ``ValueError`` in the backward pass rather than dropping its gradient.
        state_dtype: the dtype of the solver's state and stages (default: float32 for a float16 or
            bfloat16 ``y0``, ``y0``'s dtype otherwise; float64 on request). The drift and diffusion
            are called in ``y0``'s dtype and the result is returned in it.
        **solver_options: passed to an SDE solver.

    Returns:
        ``y(t1)`` (Tensor[B, *D]), or a ``Solution`` with ``saveat`` or ``dense=True``.
        Gradients flow to ``y0`` and to the drift's parameters (backpropagation through the steps,
        or the adjoint with ``adjoint=True``).
    """
    if not isinstance(term, (ODE, SDE)):
        raise TypeError(f"term must be a gf.ODE or gf.SDE, got {type(term).__name__}")
    if not isinstance(y0, torch.Tensor) or not y0.is_floating_point() or y0.dim() < 1:
        raise TypeError(f"y0 must be a floating tensor of shape [B, *D], got "
                        f"{y0.dtype if isinstance(y0, torch.Tensor) else type(y0).__name__}")
    if not bool(torch.isfinite(y0).all()):
        raise ValueError("y0 contains NaN or Inf")
    check_choice("backend", backend, BACKENDS)
    check_choice("error_norm", error_norm, ERROR_NORMS)
    check_finite, dense, progress = (check_bool("check_finite", check_finite), check_bool("dense", dense),
                                     check_bool("progress", progress))
    cuda_graph, adjoint = check_bool("cuda_graph", cuda_graph), check_bool("adjoint", adjoint)
    if not adjoint and (adjoint_params is not None or adjoint_rtol is not None or adjoint_atol is not None):
        raise ValueError("adjoint_params, adjoint_rtol and adjoint_atol need adjoint=True")
    out_dtype = y0.dtype
    dtype = state_dtype_for(state_dtype, out_dtype, cuda_graph, "y0")
    if dtype != out_dtype:  # the drift runs in y0's dtype, the state in state_dtype
        if adjoint:
            adjoint_params = _adjoint_params(term.drift, adjoint_params)  # the wrapper below hides a Module's
        term, y0 = _in_dtype(term, out_dtype), y0.to(dtype)
    max_steps = check_int("max_steps", max_steps, low=1)
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable, got {type(callback).__name__}")
    if steps is not None and ts is not None:
        raise ValueError("pass steps (a uniform grid) or ts (an explicit grid), not both")
    batch = y0.shape[0]
    t0, t1 = _times("t0", t0, batch), _times("t1", t1, batch)
    saveat = _saveat(saveat, batch)
    if isinstance(term, SDE):
        if adjoint:
            raise ValueError("adjoint=True is for ODE terms: genflow provides no SDE adjoint; backpropagation "
                             "through the steps (the default) is the exact gradient of the discretised SDE on its "
                             "Brownian path")
        return _cast(_solve_sde(term, y0, t0, t1, solver, steps, ts, rtol, atol, generator, brownian, saveat,
                                callback, progress, check_finite, backend, h_init, max_steps, solver_options), out_dtype)
    tableau = TABLEAUX[check_choice("solver", solver, tuple(TABLEAUX))]
    if solver_options:
        raise TypeError(f"unexpected options for ODE solver {solver!r}: {sorted(solver_options)}")
    kernel = use_kernel(backend, y0.device)
    adaptive = steps is None and ts is None
    if adaptive and not tableau.adaptive:
        raise ValueError(f"solver {solver!r} has no error estimate: pass steps= or ts= (adaptive solvers: "
                         f"{[n for n, t in TABLEAUX.items() if t.adaptive]})")
    if not adaptive and (rtol is not None or atol is not None or h_init is not None or dense):
        raise ValueError("rtol, atol, h_init and dense are for adaptive solves (without steps= or ts=)")
    if adaptive:
        rtol = 1e-6 if rtol is None else check_real("rtol", rtol, low=0.0)
        atol = 1e-6 if atol is None else check_real("atol", atol, low=0.0)
        if rtol + atol == 0:
            raise ValueError("rtol and atol must not both be 0")
        if h_init is not None:
            h_init = check_real("h_init", h_init, low=0.0, low_open=True)
        if adjoint:
            options = dict(rtol=rtol, atol=atol, error_norm=error_norm, h_init=h_init, max_steps=max_steps)
            return _cast(_solve_adjoint(term, tableau, y0, None, t0, t1, kernel, saveat, callback, progress,
                                        check_finite, (adjoint_params, adjoint_rtol, adjoint_atol, dense, cuda_graph),
                                        options), out_dtype)
        shared = error_norm == "batch" and _shared(t0) and _shared(t1)
        stepper = AdaptiveRK(tableau, _drift(term, y0, shared), t0, t1, kernel=kernel, rtol=rtol, atol=atol,
                             error_norm=error_norm, h_init=h_init, max_steps=max_steps, saveat=saveat, dense=dense,
                             check_finite=check_finite)
        grid = None
    else:
        grid = _grid(ts, steps, t0, t1, batch)
        if adjoint:
            return _cast(_solve_adjoint(term, tableau, y0, grid, t0, t1, kernel, saveat, callback, progress,
                                        check_finite, (adjoint_params, adjoint_rtol, adjoint_atol, dense, cuda_graph)),
                         out_dtype)
        if cuda_graph:
            _check_capturable(y0, grid, saveat, callback, progress)
            return graphed_solve(term, solver, y0, grid, kernel=kernel, check_finite=check_finite)
        stepper = FixedRK(tableau, _drift(term, y0, grid.dim() == 1), grid, kernel=kernel)
    if cuda_graph:
        raise ValueError("cuda_graph=True cannot capture this solve: the solver is adaptive (its step count "
                         "depends on the data); pass steps= or ts=")
    return _cast(_finish(stepper, y0, grid, solver, saveat, callback, progress, check_finite, dense), out_dtype)


_GRAPHS = LRU(8)  # (term, solver, grid, shape, dtype, device, kernel, check_finite) -> (replay, static y0, out, flag)


def clear_graphs() -> None:
    """Release every captured ``gf.solve`` graph and its static buffers."""
    _GRAPHS.clear()


def _check_capturable(y0, grid, saveat, callback, progress):
    reasons = [(grid.dim() != 1, "per-sample time grids; use shared t0/t1"),
               (saveat is not None, "saveat copies states during the solve"),
               (callback is not None, "callback runs Python per step"),
               (progress, "a progress bar runs Python per step"),
               (y0.requires_grad, "y0 requires grad (backpropagation needs the eager solve)"),
               (y0.device.type != "cuda" or not torch.cuda.is_available(),
                f"the solve must run on a CUDA device, got y0 on {y0.device}")]
    for failed, reason in reasons:
        if failed:
            raise ValueError(f"cuda_graph=True cannot capture this solve: {reason}")


def graphed_solve(term: ODE, solver: str, y0: torch.Tensor, grid: torch.Tensor, *, kernel: bool,
                  check_finite: bool) -> torch.Tensor:
    """The fixed-grid ODE solve of ``gf.solve`` as a replay of a CUDA graph captured on the first
    call for this term, solver, grid, shape, dtype and device (``genflow.cuda_graph.record``:
    warm-up on a side stream, then capture; at most 8 kept, ``clear_graphs()`` frees them). Each
    call copies ``y0`` into the graph's static input and replays it; a drift that cannot be
    captured (host syncs) runs eagerly with a warning. ``check_finite``: the fused updates flag
    the first step writing NaN/Inf inside the graph; the flag is read once after the replay."""
    from genflow import cuda_graph

    # the key holds the term itself (compared by identity while the entry keeps it alive, so a new
    # term can never meet a dead one's graph) and the grid by its values
    key = (term, solver, tensor_key(grid), tuple(y0.shape), str(y0.dtype), str(y0.device), kernel, check_finite)
    entry = _GRAPHS.get(key)
    if entry is None:
        static = y0.detach().clone()
        flag = torch.full((1,), NO_STEP, dtype=torch.int32, device=y0.device) if check_finite else None

        def body():
            stepper = FixedRK(TABLEAUX[solver], _drift(term, static, True), grid, kernel=kernel)
            stepper.nonfinite = flag
            y = static
            for y, _, _ in grid_steps(stepper, grid, static, solver, check_finite=False):
                pass
            return y

        try:
            replay, out = cuda_graph.record(body, y0.device)
        except RuntimeError as error:  # a host sync or an uncapturable op in the drift
            if y0.device.type == "cuda":
                torch.cuda.synchronize(y0.device)
            warnings.warn(f"cuda_graph=True: the solve could not be captured as a CUDA graph ({error}); running it "
                          "eagerly", RuntimeWarning, stacklevel=3)
            stepper = FixedRK(TABLEAUX[solver], _drift(term, y0, True), grid, kernel=kernel)
            return run(stepper, y0, ts=grid, solver=solver, check_finite=check_finite, caller="gf.solve",
                       advice=DRIFT_ADVICE)[0]
        entry = _GRAPHS.put(key, (replay, static, out, flag))
    replay, static, out, flag = entry
    static.copy_(y0)
    if flag is not None:
        flag.fill_(NO_STEP)
    replay()
    y = out.clone()
    if flag is not None:
        first = int(flag.item())
        if first != NO_STEP:
            raise_diverged(solver, first, grid, y, grid.shape[0] - 1, "gf.solve", DRIFT_ADVICE)
    return y


def _finish(stepper, y0, grid, solver, saveat, callback, progress, check_finite, dense):
    """Run the stepper through the loop and package the result (``y`` or a ``Solution``)."""
    adaptive = grid is None
    if y0.numel() == 0:
        ys = None if saveat is None else y0.new_zeros((saveat.shape[0],) + tuple(y0.shape))
        return y0.clone() if saveat is None and not dense else Solution(y0.clone(), saveat, ys, {"nfe": 0})
    saved, user_callback = {}, callback
    if saveat is not None and not adaptive:
        indices = _grid_indices(saveat, grid)
        if 0 in indices:
            saved[0] = y0.clone()

        def callback(info):
            if info["i"] + 1 in indices:
                saved[info["i"] + 1] = info["x"].clone()
            if user_callback is not None:
                user_callback(info)

    y, _ = run(stepper, y0, ts=grid, solver=solver, check_finite=check_finite, callback=callback, progress=progress,
               caller="gf.solve", advice=DRIFT_ADVICE)
    if saveat is None and not dense:
        return y
    stats = {"nfe": stepper.evaluations}
    if adaptive:
        stats.update(accepted_steps=stepper.accepted_steps, rejected_steps=stepper.rejected_steps)
        ys = stepper.saved
    else:
        ys = None if saveat is None else torch.stack([saved[i] for i in indices])
    return Solution(y, saveat, ys, stats, stepper if dense else None)


def _adjoint_params(drift, adjoint_params) -> tuple:
    """The tensors the adjoint differentiates besides y0 (those requiring grad)."""
    if adjoint_params is None:
        return tuple(p for p in drift.parameters() if p.requires_grad) if isinstance(drift, torch.nn.Module) else ()
    if isinstance(adjoint_params, torch.Tensor):
        adjoint_params = (adjoint_params,)
    try:
        params = tuple(adjoint_params)
    except TypeError:
        raise TypeError(f"adjoint_params must be an iterable of tensors, got {type(adjoint_params).__name__}") from None
    if not all(isinstance(p, torch.Tensor) for p in params):
        raise TypeError(f"adjoint_params must hold tensors, got {[type(p).__name__ for p in params]}")
    return tuple(p for p in params if p.requires_grad)


def _solve_adjoint(term, tableau, y0, grid, t0, t1, kernel, saveat, callback, progress, check_finite, adjoint_args,
                   forward_options=None):
    """``gf.solve(..., adjoint=True)``: the forward solve saves the states at the nodes ``t0``,
    the save times and ``t1`` (no graph); ``AdjointSolve`` solves the augmented ODE backward
    between consecutive nodes (the fixed grid's own nodes reversed, or adaptive steps with
    ``adjoint_rtol``/``adjoint_atol``). ``adjoint_args``: ``(adjoint_params, adjoint_rtol,
    adjoint_atol, dense, cuda_graph)``; ``forward_options``: the adaptive solve's (None: fixed grid)."""
    adjoint_params, adjoint_rtol, adjoint_atol, dense, cuda_graph = adjoint_args
    if dense or cuda_graph:
        raise ValueError("adjoint=True cannot be combined with dense=True or cuda_graph=True (the adjoint "
                         "differentiates y(t1) and the saveat states of an eager solve)")
    if grid is not None and (adjoint_rtol is not None or adjoint_atol is not None):
        raise ValueError("adjoint=True on a fixed grid reverses the grid: adjoint_rtol/adjoint_atol are for "
                         "adaptive solves")
    if grid is None:
        backward_tolerances = (
            forward_options["rtol"] if adjoint_rtol is None else check_real("adjoint_rtol", adjoint_rtol, low=0.0),
            forward_options["atol"] if adjoint_atol is None else check_real("adjoint_atol", adjoint_atol, low=0.0))
        if sum(backward_tolerances) == 0:
            raise ValueError("adjoint_rtol and adjoint_atol must not both be 0")
    if (grid is not None and grid.dim() != 1) or (grid is None and not (_shared(t0) and _shared(t1))) or \
            (saveat is not None and saveat.dim() != 1):
        raise ValueError("adjoint=True needs shared times (float t0 and t1, a grid [N+1], saveat [S]): the "
                         "augmented ODE solves the batch as one system")
    start, end = (float(grid[0]), float(grid[-1])) if grid is not None else (float(t0[0]), float(t1[0]))
    direction = 1.0 if end >= start else -1.0
    saves = [] if saveat is None else saveat.tolist()
    if any(not 0.0 <= (s - start) * direction <= (end - start) * direction for s in saves):
        raise ValueError(f"saveat must lie in [t0, t1] = [{start}, {end}], got {saves}")
    nodes = torch.tensor(sorted({start, end, *saves}, key=lambda t: direction * t), dtype=torch.float64)
    stats = {}

    def forward(y):
        if grid is None:
            stepper = AdaptiveRK(tableau, _drift(term, y, forward_options["error_norm"] == "batch"), t0, t1,
                                 kernel=kernel, saveat=nodes, check_finite=check_finite, **forward_options)
        else:
            stepper = FixedRK(tableau, _drift(term, y, True), grid, kernel=kernel)
        out = _finish(stepper, y, grid, tableau.name, nodes, callback, progress, check_finite, False)
        stats.update(out.stats)
        return out.ys

    indices = None if grid is None else _grid_indices(nodes, grid)

    def segment(aug, state, k):
        f = _drift(ODE(aug), state, True)
        if grid is None:
            rtol, atol = backward_tolerances
            stepper = AdaptiveRK(tableau, f, nodes[k:k + 1], nodes[k - 1:k], kernel=kernel, rtol=rtol, atol=atol,
                                 max_steps=forward_options["max_steps"], check_finite=check_finite)
            sub = None
        else:
            sub = grid[indices[k - 1]:indices[k] + 1].flip(0)
            stepper = FixedRK(tableau, f, sub, kernel=kernel)
        y, _ = run(stepper, state, ts=sub, solver=tableau.name, check_finite=check_finite,
                   caller="gf.solve (adjoint)", advice=DRIFT_ADVICE)
        return y

    states = AdjointSolve.apply(forward, segment, term.drift, y0, *_adjoint_params(term.drift, adjoint_params))
    if saveat is None:
        return states[-1]
    order = nodes.tolist()
    return Solution(states[-1], saveat, states[[order.index(s) for s in saves]], stats)


def _solve_sde(term, y0, t0, t1, solver, steps, ts, rtol, atol, generator, brownian, saveat, callback, progress,
               check_finite, backend, h_init, max_steps, options):
    """The SDE branch: a scheme of ``genflow.engine.sde.SDE_SOLVERS`` on the grid (or adaptive)."""
    from genflow.engine.brownian import make_brownian
    from genflow.engine.sde import SDE_SOLVERS

    cls = SDE_SOLVERS[check_choice("solver", solver, tuple(SDE_SOLVERS))]
    adaptive = getattr(cls, "adaptive", False)
    if adaptive:
        grid = torch.stack([t0[0], t1[0]]) if _shared(t0) and _shared(t1) else torch.stack([t0, t1])
        for name, value in (("rtol", rtol), ("atol", atol), ("h_init", h_init)):
            if value is not None:
                options[name] = value
        options["max_steps"] = max_steps
    else:
        if steps is None and ts is None:
            raise ValueError(f"SDE solver {solver!r} needs steps= or ts=")
        if rtol is not None or atol is not None or h_init is not None:
            raise ValueError("rtol, atol and h_init are for adaptive solvers")
        grid = _grid(ts, steps, t0, t1, y0.shape[0])
    source = make_brownian(generator, brownian, term, y0, grid[0], grid[-1])
    stepper = cls(term, grid, brownian=source, backend=backend, **options)
    if adaptive and saveat is not None:
        raise ValueError(f"saveat is not supported by the adaptive SDE solver {solver!r}")
    return _finish(stepper, y0, None if adaptive else grid, solver, saveat, callback, progress, check_finite, False)
