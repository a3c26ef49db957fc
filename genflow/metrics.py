"""Sample-quality metrics."""
import math
import numbers
from typing import Callable, Sequence

import torch

__all__ = ["MMD", "kl_kde_grid", "kl_to_density", "mmd", "sliced_wasserstein"]


def _check_samples(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"{name} must be [N, D], got {tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 samples, got {x.shape[0]}")
    _check_finite(name, x)


def _check_finite(name: str, x: torch.Tensor) -> None:
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} must be finite, got {int((~torch.isfinite(x)).sum())} NaN/Inf values")


class MMD:
    """Unbiased squared MMD to a fixed reference sample ``y [M, D]``: ``MMD(y)(x) == mmd(x, y)``.

    ``E k(y, y')`` is computed once, so scoring many samples against one reference (a table of
    solvers) costs two kernel sums per call instead of three.
    """

    def __init__(self, y: torch.Tensor, *, bandwidths: Sequence[float] = (0.2, 0.5, 1.0, 2.0, 5.0)):
        _check_samples("y", y)
        if isinstance(bandwidths, (str, bytes)) or not isinstance(bandwidths, Sequence) or not bandwidths or any(
                isinstance(s, bool) or not isinstance(s, numbers.Real) or not (math.isfinite(s) and s > 0)
                for s in bandwidths):
            raise ValueError(f"bandwidths must be a non-empty sequence of finite numbers > 0, got {bandwidths!r}")
        self.y = y.detach().double()
        self.scales = torch.tensor([-0.5 / (s * s) for s in bandwidths], dtype=torch.float64, device=y.device)
        self.yy = self._same(self.y)

    def _kernel_sum(self, d2: torch.Tensor) -> torch.Tensor:
        return sum(torch.exp(d2 * c).sum() for c in self.scales)

    def _same(self, a: torch.Tensor) -> torch.Tensor:
        """Mean of ``k(a_i, a_j)`` over pairs ``i != j`` (each unordered pair once: ``pdist``)."""
        n = a.shape[0]
        return self._kernel_sum(torch.pdist(a).square()) * 2 / (n * (n - 1))

    def __call__(self, x: torch.Tensor) -> float:
        _check_samples("x", x)
        if x.shape[1] != self.y.shape[1]:
            raise ValueError(f"x and y must be [N, D] and [M, D], got {tuple(x.shape)} and {tuple(self.y.shape)}")
        x = x.detach().to(self.y.device, torch.float64)
        xy = self._kernel_sum(torch.cdist(x, self.y).square()) / (x.shape[0] * self.y.shape[0])
        return float(self._same(x) + self.yy - 2 * xy)


def mmd(x: torch.Tensor, y: torch.Tensor, *, bandwidths: Sequence[float] = (0.2, 0.5, 1.0, 2.0, 5.0)) -> float:
    """Unbiased squared maximum mean discrepancy between samples ``x [N, D]`` and ``y [M, D]``.

    ``MMD^2 = E k(x, x') + E k(y, y') - 2 E k(x, y)`` with the sum of Gaussian kernels
    ``k(a, b) = sum_s exp(-|a - b|^2 / (2 s^2))`` over ``bandwidths`` (Gretton et al. 2012,
    eq. 3; diagonal terms excluded). Computed in float64. To score many samples against one
    ``y``, use ``MMD(y)``.
    """
    return MMD(y, bandwidths=bandwidths)(x)


def kl_to_density(x: torch.Tensor, log_prob: Callable[[torch.Tensor], torch.Tensor], *, k: int = 3) -> float:
    """Estimate ``KL(q || p)`` in nats from samples ``x [N, D] ~ q`` and the exact ``log p``.

    ``KL(q || p) = -H(q) - E_q[log p(x)]``: the cross-entropy term is the sample mean of
    ``log_prob(x)``; the entropy is the Kozachenko–Leonenko k-nearest-neighbour estimate

        H(q) ~= psi(N) - psi(k) + log V_D + (D / N) sum_i log r_i,

    with ``r_i`` the distance from ``x_i`` to its ``k``-th nearest other sample and
    ``V_D = pi^(D/2) / Gamma(D/2 + 1)`` the volume of the unit ball (Kozachenko & Leonenko 1987;
    Kraskov, Stögbauer & Grassberger 2004, eq. 20). The estimate is consistent and needs no
    bandwidth; at finite N it is biased slightly upward where ``q`` curves within a k-ball
    (samples of the 8-Gaussian ring itself give about 0.02 nats at N = 2000, k = 3: compare
    against the value for a fresh sample of ``p``). Samples off the support of ``p`` raise it
    sharply (``log p`` is very negative there); dropping a fraction ``m`` of equally weighted
    modes costs about ``-log(1 - m)``.
    Repeated points (``r_i = 0``) are floored at ``r_i = 1e-12``, so a collapsed sample
    scores a very large, finite KL. Computed in float64 (SciPy k-d tree).
    """
    from scipy.spatial import cKDTree
    from scipy.special import digamma

    if x.dim() != 2:
        raise ValueError(f"x must be [N, D], got {tuple(x.shape)}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    n, d = x.shape
    if n <= k:
        raise ValueError(f"x needs more than k = {k} samples, got {n}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x must be finite")
    points = x.detach().to("cpu", torch.float64)
    r = cKDTree(points.numpy()).query(points.numpy(), k=k + 1)[0][:, k]
    log_r = torch.from_numpy(r).clamp_min(1e-12).log()
    log_ball = 0.5 * d * math.log(math.pi) - math.lgamma(0.5 * d + 1)
    entropy = float(digamma(n) - digamma(k)) + log_ball + d * float(log_r.mean())
    cross_entropy = -float(log_prob(points).to(torch.float64).mean())
    return cross_entropy - entropy


def _kde_grid_log_density(points: torch.Tensor, grid: torch.Tensor, bandwidth: float, chunk: int) -> torch.Tensor:
    """``log sum_j exp(-|g - x_j|^2 / (2 h^2))`` at each grid point ``g`` (float64 [G]); chunked over the grid."""
    scale = -0.5 / (bandwidth * bandwidth)
    return torch.cat([torch.logsumexp(torch.cdist(grid[i:i + chunk], points).square() * scale, dim=1)
                      for i in range(0, grid.shape[0], chunk)])


def kl_kde_grid(data: torch.Tensor, samples: torch.Tensor, *, bandwidth: float = 0.4, grid: int = 100,
                eps: float = 1e-10) -> float:
    """KL(data || model) between Gaussian KDEs of two 2D point sets on a grid: the metric of Bogensperger, "Introduction to Generative Modeling", Table 2.

    Both sets get an isotropic Gaussian KDE with ABSOLUTE bandwidth ``h`` (the kernel
    ``N(0, h^2 I)``, as scikit-learn's ``KernelDensity(bandwidth=h)``; not SciPy's
    ``gaussian_kde(bw_method=h)``, which scales the data covariance). Each is evaluated on the
    ``grid x grid`` lattice spanning ``[min, max]`` of the DATA in each coordinate and normalised
    to sum to one, ``p`` for ``data [N, 2]`` and ``q`` for ``samples [M, 2]``; then

        KL = sum_g p_g log((p_g + eps) / (q_g + eps)).

    Calibration on the Table-2 toy set (8 Gaussians of covariance 0.1 I at radius 4/sqrt(2),
    250 points each): two independent draws score about 0.005 (0.0035-0.008 over seeds) with
    ``h = 0.4`` absolute, against about 0.0006 with SciPy's relative ``bw_method=0.4``; the
    published figures (0.0099 for a GMM) match the absolute reading. Computed in float64
    (chunked log-sum-exp over the 10,000 x N kernel matrix; samples outside the grid count only
    through their kernel tails).
    """
    for name, x in (("data", data), ("samples", samples)):
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != 2 or x.shape[0] < 1:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a Tensor[N, 2] with N >= 1, got {got}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} must be finite")
    if not (isinstance(bandwidth, (int, float)) and not isinstance(bandwidth, bool) and 0 < bandwidth < math.inf):
        raise ValueError(f"bandwidth must be a finite number > 0, got {bandwidth!r}")
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 2:
        raise ValueError(f"grid must be an int >= 2, got {grid!r}")
    if not (isinstance(eps, (int, float)) and not isinstance(eps, bool) and 0 <= eps < math.inf):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    p_points = data.detach().to("cpu", torch.float64)
    q_points = samples.detach().to("cpu", torch.float64)
    lo, hi = p_points.min(0).values, p_points.max(0).values
    axes = [torch.linspace(float(lo[k]), float(hi[k]), grid, dtype=torch.float64) for k in range(2)]
    lattice = torch.cartesian_prod(axes[0], axes[1])
    log_p = _kde_grid_log_density(p_points, lattice, float(bandwidth), 2048)
    log_q = _kde_grid_log_density(q_points, lattice, float(bandwidth), 2048)
    p = torch.softmax(log_p, 0)
    q = torch.softmax(log_q, 0)
    return float((p * torch.log((p + eps) / (q + eps))).sum())


def _w2_squared_1d(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Exact squared W2 between 1D empirical measures, per column: ``int_0^1 (Q_x(u) - Q_y(u))^2 du``.

    ``x [N, P]``, ``y [M, P]``; the quantile functions are steps at ``i/N`` and ``j/M``, so the
    integral is a sum over the merged breakpoints (equal counts: the mean squared difference of
    the sorted columns).
    """
    n, m = x.shape[0], y.shape[0]
    xs, ys = x.sort(0).values, y.sort(0).values
    if n == m:
        return (xs - ys).square().mean(0)
    levels = torch.cat([torch.arange(1, n + 1, dtype=torch.float64) / n,
                        torch.arange(1, m + 1, dtype=torch.float64) / m]).unique()
    widths = torch.diff(levels, prepend=levels.new_zeros(1))
    mid = levels - 0.5 * widths
    ix = (mid * n).floor().long().clamp_max(n - 1)
    iy = (mid * m).floor().long().clamp_max(m - 1)
    return (widths[:, None] * (xs[ix] - ys[iy]).square()).sum(0)


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, *, projections: int = 256, generator=None) -> float:
    """Sliced 2-Wasserstein distance between samples ``x [N, D]`` and ``y [M, D]``.

        SW_2(x, y) = ( E_theta W_2^2(theta . x, theta . y) )^(1/2),  theta uniform on the sphere,

    estimated with ``projections`` random directions (Rabin et al. 2011; Bonneel et al. 2015,
    eq. 3). Each 1D W2 is exact: sorted projections for ``N == M``, the integral of the squared
    difference of the two step quantile functions otherwise. For ``D = 1`` the only directions
    are +-1, so the result is the exact W2. ``generator``: None, an int seed or a
    ``torch.Generator`` (for the directions). Computed in float64.
    """
    for name, a in (("x", x), ("y", y)):
        if not isinstance(a, torch.Tensor) or a.dim() != 2 or a.shape[0] < 1:
            got = tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__
            raise ValueError(f"{name} must be a Tensor[N, D] with N >= 1, got {got}")
        _check_finite(name, a)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same dimension D, got {tuple(x.shape)} and {tuple(y.shape)}")
    if isinstance(projections, bool) or not isinstance(projections, int) or projections < 1:
        raise ValueError(f"projections must be an int >= 1, got {projections!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        if isinstance(generator, bool) or not isinstance(generator, int):
            raise TypeError(f"generator must be None, an int seed or a torch.Generator, got {type(generator).__name__}")
        generator = torch.Generator().manual_seed(generator)
    x = x.detach().to("cpu", torch.float64)
    y = y.detach().to("cpu", torch.float64)
    theta = torch.randn(projections, x.shape[1], dtype=torch.float64, generator=generator)
    theta = theta / theta.norm(dim=1, keepdim=True)
    return float(_w2_squared_1d(x @ theta.T, y @ theta.T).mean().sqrt())
