"""The solver registry ``SOLVERS = {name: class}``.

Every module of this package is imported and every ``Solver`` subclass with a ``name`` is
registered, so adding a solver is writing its class; registration alone enrols it in the
order, determinism and device tests.
"""
import importlib
import pkgutil
from typing import NamedTuple

from genflow.registry import lookup, named_subclasses
from genflow.solvers.base import Solver

__all__ = ["SOLVERS", "Solver", "SolverInfo", "available", "get"]


def _discover() -> dict:
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    return named_subclasses(Solver, "solver")


SOLVERS = _discover()


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
    return lookup(SOLVERS, name)
