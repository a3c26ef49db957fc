"""The one time loop: every solve (``gf.sample``'s diffusion solvers, ``gf.solve``'s tableaux and
SDE schemes) runs through ``run``, which owns the progress bar, the callback, the trajectory and
the divergence check.

A stepper is either fixed-grid (the ``genflow.solvers.base.Solver`` protocol: ``step(i, x) ->
x`` from grid point ``i`` to ``i + 1``, ``evaluations``, and the ``nonfinite`` flag and
``step_index`` the loop sets) or adaptive (``adaptive = True`` and a ``solve(x)`` generator
yielding ``(x, info, progress)`` per iteration, see ``genflow.engine.adaptive.iterate``).
"""
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from genflow.errors import NonFiniteError, diverged_rows

__all__ = ["NO_STEP", "grid_steps", "raise_diverged", "run"]

NO_STEP = 2**31 - 1  # the divergence flag's value while no step has written a NaN/Inf


def _fmt_t(t) -> str:
    if isinstance(t, torch.Tensor) and t.numel() > 1:
        return f"{float(t.min()):.4g}..{float(t.max()):.4g}"
    return f"{float(t):.4g}"


def raise_diverged(solver: str, step: int, ts: torch.Tensor, x: torch.Tensor, done: int, caller: str = "gf.sample",
                   advice: str = "the model's output at these times (a NaN/Inf prediction, or a prediction kind "
                                 "that is singular there)") -> None:
    """Raise ``NonFiniteError`` for a NaN/Inf first recorded at step index ``step``, or return
    when ``x`` (the state after ``done`` steps) is finite (only an intermediate stage was not)."""
    bad = int(diverged_rows(x).sum())
    if bad == 0:
        return
    steps = ts.shape[0] - 1
    after = "" if done == step + 1 else f" (counted after step {done})"
    raise NonFiniteError(
        f"{caller}: solver {solver!r} produced NaN/Inf at step {step + 1} of {steps} (t {_fmt_t(ts[step])} -> "
        f"{_fmt_t(ts[step + 1])}): {bad} of {x.shape[0]} samples diverged{after}; check {advice} and the step "
        f"count (pass check_finite=False to skip this check)")


def grid_steps(stepper, ts: torch.Tensor, x: torch.Tensor, solver: str, check_finite: bool, caller: str = "gf.sample",
               advice: Optional[str] = None):
    """The fixed-grid loop: ``(x, None, steps done)`` after every step. With ``check_finite``
    the fused updates record the first step that writes a NaN/Inf in a one-element flag, read
    after every step on the CPU (a host int) and every 8 steps and at the end on a GPU (a sync)."""
    steps = ts.shape[0] - 1
    flag = None
    if check_finite:
        flag = torch.full((1,), NO_STEP, dtype=torch.int32, device=x.device)
        stepper.nonfinite = flag
        host = flag.numpy() if x.device.type == "cpu" else None
        every = 1 if host is not None else 8
    extra = {} if advice is None else {"advice": advice}
    for i in range(steps):
        stepper.step_index = i
        x = stepper.step(i, x)
        if flag is not None and ((i + 1) % every == 0 or i + 1 == steps):
            first = int(host[0]) if host is not None else int(flag.item())
            if first != NO_STEP:
                raise_diverged(solver, first, ts, x, i + 1, caller, **extra)
                flag.fill_(NO_STEP)
        yield x, None, i + 1


def run(stepper, x: torch.Tensor, *, ts: Optional[torch.Tensor], solver: str, check_finite: bool,
        callback: Optional[Callable] = None, progress: bool = False, trajectory: bool = False,
        caller: str = "gf.sample", advice: Optional[str] = None):
    """Drive ``stepper`` from ``x`` to the end: over the grid ``ts`` (``[N+1]`` or ``[N+1, B]``)
    for a fixed-grid stepper, through ``stepper.solve(x)`` for an adaptive one.

    ``callback(info)`` after every step with ``i``, ``t``, ``t_next``, ``x`` (the working
    buffer) and ``nfe`` (plus the adaptive iteration's fields); ``progress``: a tqdm bar (steps,
    or the fraction of the interval for adaptive solves); ``trajectory``: also return the
    states at the grid times (for adaptive solves after every iteration in which some sample
    took a step). Returns ``(x, states)`` with ``states`` a list of clones or None.
    """
    adaptive = getattr(stepper, "adaptive", False)
    if adaptive:
        stepper.check_finite = check_finite
        loop, total, bar_format = stepper.solve(x), 1.0, "{desc}: {percentage:3.0f}%|{bar}| [{elapsed}]"
    else:
        loop = grid_steps(stepper, ts, x, solver, check_finite, caller, advice)
        total, bar_format = ts.shape[0] - 1, None
    states = [x.clone()] if trajectory else None
    bar = tqdm(total=total, bar_format=bar_format, desc=f"genflow {solver}", leave=False) if progress else None
    try:
        for x, info, done in loop:
            if states is not None and (not adaptive or bool(info["accepted"].any())):
                states.append(x.clone())
            if callback is not None:
                if info is None:
                    info = {"i": done - 1, "t": ts[done - 1], "t_next": ts[done]}
                callback({**info, "x": x, "nfe": stepper.evaluations})
            if bar is not None:
                bar.update(done - bar.n)
    finally:
        if bar is not None:
            bar.close()
    return x, states
