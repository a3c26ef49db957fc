"""Dense output of the Runge–Kutta engine: the solution inside an accepted step.

A method's continuous extension (Hairer, Nørsett & Wanner, *Solving ODEs I*, §II.6, eq. 6.1)
writes ``y(t + theta h) = y + h sum_i w_i(theta) k_i`` over the step's stages ``k_i`` (and the
extra stages some methods evaluate for it, ``ButcherTableau.dense_stages``), with polynomial
weights ``w_i(theta) = sum_m P_im theta^(m+1)`` (``ButcherTableau.dense``): bosh3's cubic (order
3), dopri5's quartic (Shampine 1986; order 4), tsit5's free quartic (Tsitouras 2011; order 4),
dop853's degree-7 polynomial with three extra stages (Hairer's DOP853; order 7). This module
evaluates the weights; ``genflow.engine.rk.RungeKutta.dense`` applies them as one fused
combination of the stored stages.
"""
from typing import Sequence

import torch

from genflow.engine.tableau import ButcherTableau

__all__ = ["dense_polynomial", "stage_weights"]


def dense_polynomial(tableau: ButcherTableau) -> Sequence[Sequence[float]]:
    """``P`` of ``tableau``'s continuous extension (rows: stages, then extra stages)."""
    if tableau.dense is None:
        raise ValueError(f"solver {tableau.name!r} has no dense output (dense output and saveat inside steps "
                         f"need bosh3, dopri5, tsit5 or dop853)")
    return tableau.dense


def stage_weights(poly: Sequence[Sequence[float]], theta, h):
    """``h w_i(theta)`` for every row of ``poly``: a list of floats for a float ``theta`` and
    ``h``, a float64 host tensor [rows, B] for per-sample ``h`` (float64 [B]; ``theta`` a float or
    float64 [B])."""
    degree = len(poly[0])
    if isinstance(h, torch.Tensor):
        theta = torch.as_tensor(theta, dtype=torch.float64).expand_as(h)
        powers = torch.stack([theta ** (m + 1) for m in range(degree)])
        return (torch.tensor(poly, dtype=torch.float64) @ powers) * h[None, :]
    theta = float(theta)
    powers = [theta ** (m + 1) for m in range(degree)]
    return [h * sum(p * x for p, x in zip(row, powers)) for row in poly]
