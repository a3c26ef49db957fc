"""Sample-quality metrics."""
from typing import Sequence

import torch

__all__ = ["mmd"]


def mmd(x: torch.Tensor, y: torch.Tensor, *, bandwidths: Sequence[float] = (0.2, 0.5, 1.0, 2.0, 5.0)) -> float:
    """Unbiased squared maximum mean discrepancy between samples ``x [N, D]`` and ``y [M, D]``.

    ``MMD^2 = E k(x, x') + E k(y, y') - 2 E k(x, y)`` with the sum of Gaussian kernels
    ``k(a, b) = sum_s exp(-|a - b|^2 / (2 s^2))`` over ``bandwidths`` (Gretton et al. 2012,
    eq. 3; diagonal terms excluded). Computed in float64.
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must be [N, D] and [M, D], got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] < 2 or y.shape[0] < 2:
        raise ValueError("x and y need at least 2 samples each")
    if not bandwidths or any(s <= 0 for s in bandwidths):
        raise ValueError(f"bandwidths must be positive, got {bandwidths}")
    x, y = x.double(), y.double()

    def kernel_mean(a, b, same):
        d2 = torch.cdist(a, b).square()
        k = sum(torch.exp(-d2 / (2 * s * s)) for s in bandwidths)
        if same:
            n = a.shape[0]
            return (k.sum() - k.diagonal().sum()) / (n * (n - 1))
        return k.mean()

    return float(kernel_mean(x, x, True) + kernel_mean(y, y, True) - 2 * kernel_mean(x, y, False))
