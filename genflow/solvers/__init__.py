"""The solver registry ``SOLVERS = {name: class}``.

Every module of this package is imported and every ``Solver`` subclass with a ``name`` is
registered, so adding a solver is writing its class; registration alone enrols it in the
order, determinism and device tests.
"""
import importlib
import pkgutil
from typing import NamedTuple

from genflow._checks import did_you_mean
from genflow.solvers.base import Solver

__all__ = ["SOLVERS", "Solver", "SolverInfo", "available", "get"]


def _discover() -> dict:
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    found, stack = {}, list(Solver.__subclasses__())
    while stack:
        cls = stack.pop(0)
        stack.extend(cls.__subclasses__())
        if cls.name:
            if cls.name in found and found[cls.name] is not cls:
                raise RuntimeError(f"two solvers are named {cls.name!r}: {found[cls.name]} and {cls}")
            found[cls.name] = cls
    return dict(sorted(found.items()))


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
    if not isinstance(name, str):
        raise TypeError(f"solver must be a name (str) from {sorted(SOLVERS)}, got {type(name).__name__}")
    if name not in SOLVERS:
        hint = did_you_mean(str(name), list(SOLVERS), n=3)
        raise ValueError(f"solver must be one of {sorted(SOLVERS)}, got {name!r}{hint}")
    return SOLVERS[name]
