"""The solver registry: ``SOLVERS = {name: class}``; registration alone enrols a solver in the
order, determinism and device tests."""
from typing import NamedTuple

from genflow.solvers.base import Solver
from genflow.solvers.ddim import DDIM, DDPM
from genflow.solvers.dpm_solver import DPMSolverPP2M
from genflow.solvers.euler import Euler, EulerMaruyama, Heun

__all__ = ["SOLVERS", "Solver", "SolverInfo", "available", "get"]

SOLVERS = {cls.name: cls for cls in (Euler, EulerMaruyama, Heun, DDIM, DDPM, DPMSolverPP2M)}


class SolverInfo(NamedTuple):
    """One registered solver: its name, order, whether it injects noise by default, and its NFE."""

    name: str
    order: int
    stochastic: bool
    nfe: int


def available(steps: int = 20) -> list:
    """Every registered solver with its order, stochasticity and NFE for ``steps`` steps."""
    return [SolverInfo(name, cls.order, cls.stochastic, cls.nfe(steps)) for name, cls in SOLVERS.items()]


def get(name: str) -> type:
    """The solver class registered as ``name``; unknown names list the closest matches."""
    if name not in SOLVERS:
        import difflib

        close = difflib.get_close_matches(str(name), list(SOLVERS), n=3)
        hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
        raise ValueError(f"solver must be one of {sorted(SOLVERS)}, got {name!r}{hint}")
    return SOLVERS[name]
