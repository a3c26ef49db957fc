"""The general SDE/ODE engine: terms, the one time loop, the Butcher-tableau engine, SDE
schemes, step-size controllers and ``gf.solve`` (DESIGN.md §1)."""
from genflow.engine.solve import Solution, solve
from genflow.engine.tableau import TABLEAUX, ButcherTableau
from genflow.engine.terms import ODE, SDE

__all__ = ["ButcherTableau", "ODE", "SDE", "Solution", "TABLEAUX", "solve"]
