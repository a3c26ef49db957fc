"""Kernel particle baselines of the SD flow on the same engine: MMD gradient flow and SVGD.

Both need kernel sums and their gradients, which the engine ``genflow.ops.kernel_weighted_mean``
gives in closed form from its weighted mean ``D`` and log-sum ``lse``: with
``K(z, x) = exp(-|z - x|^2 / (2 sigma^2))``, ``S_x(z) = sum_j K(z, x_j) = exp(lse)`` and
``D_x(z) = sum_j K(z, x_j) x_j / S_x(z)``::

    grad_z sum_j K(z, x_j) = -(S_x(z) / sigma^2) (z - D_x(z)).

No N x M matrix is formed. Both are compared against the SD flow in Weber, "The Score-Difference Flow for Implicit Generative Modeling" (Weber 2023).
"""
import math
from typing import Callable, Sequence, Union

import torch

from genflow.ops.kernel_mean import kernel_weighted_mean
from genflow._checks import check_bool, check_int, check_points, check_real, make_generator, per_step
from genflow.sdflow import particle_flow
from genflow.errors import NonFiniteError

__all__ = ["median_bandwidth", "mmd_flow", "mmd_velocity", "score_from_log_prob", "svgd", "svgd_direction"]


# -------------------------------------------------------------------------- MMD gradient flow


def mmd_velocity(z: torch.Tensor, particles: torch.Tensor, target: torch.Tensor, *, sigma: float,
                 precision: str = "highest", backend: str = "auto") -> torch.Tensor:
    """Minus the gradient of the MMD witness of ``particles`` vs ``target``, evaluated at ``z``.

    With the witness ``f(z) = (1/N) sum_i K(z, y_i) - (1/M) sum_j K(z, x_j)``::

        v(z) = -grad f(z) = [(S_x(z) / M) (D_x(z) - z) - (S_y(z) / N) (D_y(z) - z)] / sigma^2,

    two engine calls with ``return_lse=True``. At ``z = y`` this is ``-(N / 2) grad_y MMD^2``, the
    particle velocity of the MMD gradient flow (Arbel et al. 2019, "Maximum Mean Discrepancy
    Gradient Flow").

    Args:
        z (Tensor[B, d]): evaluation points. particles (Tensor[N, d]): ``y_i``.
        target (Tensor[M, d]): ``x_j``. sigma (float > 0): kernel bandwidth.

    Returns:
        Tensor[B, d].
    """
    d_x, lse_x = kernel_weighted_mean(z, target, sigma=sigma, return_lse=True, precision=precision, backend=backend)
    d_y, lse_y = kernel_weighted_mean(z, particles, sigma=sigma, return_lse=True, precision=precision,
                                      backend=backend)
    w_x = torch.exp(lse_x - math.log(target.shape[0]))[:, None]
    w_y = torch.exp(lse_y - math.log(particles.shape[0]))[:, None]
    return (w_x * (d_x - z) - w_y * (d_y - z)) / (sigma * sigma)


def mmd_flow(source: torch.Tensor, target: torch.Tensor, *, sigma: float, steps: int,
             step_size: Union[float, Sequence[float]], noise_level: Union[float, Sequence[float]] = 0.0,
             generator=None, return_trajectory: bool = False, progress: bool = False,
             precision: str = "highest", backend: str = "auto", check_finite: bool = True) -> torch.Tensor:
    """Move particles toward target samples along the (noisy) MMD gradient flow.

    Implements the discretised flow with noise injection of Arbel et al. (2019), "Maximum Mean
    Discrepancy Gradient Flow" (the Gaussian kernel ``K`` of bandwidth ``sigma``)::

        y_{n+1} = y_n + gamma_n v(y_n + beta_n u_n),   u_n ~ N(0, I),

    with ``v = -grad f`` the witness gradient of ``mmd_velocity`` (the witness built from the
    current particles ``y_n``); ``beta_n = 0`` is the plain flow. Two kernel means per step.

    Args:
        source (Tensor[N, d]), target (Tensor[M, d]): particles and target samples (same dtype
            and device). sigma (float > 0). steps (int >= 1).
        step_size (float > 0 or ``steps`` floats): ``gamma_n``.
        noise_level (float >= 0 or ``steps`` floats): ``beta_n``.
        generator: None, an int seed or a torch.Generator on the source's device; ``u_n`` is drawn
            only on steps with ``beta_n > 0``.
        return_trajectory, progress, precision, backend, check_finite: as in ``genflow.sdflow.sd_flow``.

    Returns:
        Tensor[N, d], or ``(y, trajectory [steps + 1, N, d])`` with ``return_trajectory``.

    Raises:
        NonFiniteError: naming the step, when the particles become NaN/Inf.
    """
    check_points("source", source)
    check_points("target", target, dim=source.shape[1], like=source)
    sigma = check_real("sigma", sigma, low=0.0, low_open=True)
    steps = check_int("steps", steps, low=1)
    check_finite = check_bool("check_finite", check_finite)
    sizes = per_step("step_size", step_size, steps)
    betas = per_step("noise_level", noise_level, steps, allow_zero=True)
    rng = make_generator(generator, source.device)

    target = target.detach()

    def velocity(k, y):
        z = y
        if betas[k] > 0:
            z = y + betas[k] * torch.randn(y.shape, generator=rng, dtype=y.dtype, device=y.device)
        return mmd_velocity(z, y, target, sigma=sigma, precision=precision, backend=backend)

    return particle_flow(velocity, source, sizes, method="mmd_flow", check_finite=check_finite, progress=progress,
                         return_trajectory=return_trajectory, hint=lambda k: f"step_size = {sizes[k]:g}; lower step_size")


# -------------------------------------------------------------------------- SVGD


def median_bandwidth(particles: torch.Tensor, *, max_pairs: int = 10_000, generator=None) -> float:
    """Liu & Wang's median heuristic ``h = med^2 / log(n)`` for the kernel ``exp(-|a - b|^2 / h)``.

    ``med^2`` is the median (the lower one for an even count, as ``torch.median``) of the squared
    distances ``|y_i - y_j|^2`` over the unordered pairs ``i < j``, or over ``max_pairs`` random
    pairs ``i != j`` (drawn with ``generator``) when there are more pairs than that. The engine's
    bandwidth for this kernel is ``sigma = sqrt(h / 2)``. (Liu & Wang 2016, "Stein Variational
    Gradient Descent", experiments.)

    Args:
        particles (Tensor[n, d]): n >= 2. max_pairs (int >= 1).
        generator: None, an int seed or a torch.Generator on the particles' device.

    Returns:
        float ``h > 0``.
    """
    check_points("particles", particles, min_rows=2)
    max_pairs = check_int("max_pairs", max_pairs, low=1)
    n = particles.shape[0]
    y = particles.detach()
    if n * (n - 1) // 2 <= max_pairs:
        d2 = torch.pdist(y).square()
    else:
        rng = make_generator(generator, y.device)
        i = torch.randint(0, n, (max_pairs,), generator=rng, device=y.device)
        j = (i + torch.randint(1, n, (max_pairs,), generator=rng, device=y.device)) % n
        d2 = (y[i] - y[j]).square().sum(1)
    med2 = float(d2.median())
    if not med2 > 0:
        raise ValueError("the median pairwise distance of the particles is 0 (they coincide); "
                         "pass a float bandwidth")
    return med2 / math.log(n)


def svgd_direction(particles: torch.Tensor, score: torch.Tensor, *, bandwidth: float,
                   precision: str = "highest", backend: str = "auto") -> torch.Tensor:
    """The SVGD direction ``phi`` at each particle, one engine call.

    With ``k(a, b) = exp(-|a - b|^2 / h)`` (engine bandwidth ``sigma^2 = h / 2``),
    ``S_i = sum_j k(y_j, y_i)``, ``A_i = sum_j k(y_j, y_i) s_j / S_i`` and ``D_i = sum_j k(y_j, y_i) y_j / S_i``::

        phi(y_i) = (1/n) sum_j [k(y_j, y_i) s_j + grad_{y_j} k(y_j, y_i)]
                 = (S_i / n) [A_i + (y_i - D_i) / sigma^2]

    (Liu & Wang 2016, "Stein Variational Gradient Descent", Algorithm 1); ``A`` and ``D`` come from one
    kernel mean with values ``[s, y]``.

    Args:
        particles (Tensor[n, d]): ``y``. score (Tensor[n, d]): ``s_j = grad log p(y_j)``.
        bandwidth (float > 0): ``h``.

    Returns:
        Tensor[n, d].
    """
    h = check_real("bandwidth", bandwidth, low=0.0, low_open=True)
    sigma = math.sqrt(h / 2)
    d = particles.shape[1]
    mean, lse = kernel_weighted_mean(particles, particles, torch.cat([score, particles], 1), sigma=sigma,
                                     return_lse=True, precision=precision, backend=backend)
    weight = torch.exp(lse - math.log(particles.shape[0]))[:, None]
    return weight * (mean[:, :d] + (particles - mean[:, d:]) / (sigma * sigma))


def score_from_log_prob(log_prob: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> grad_x log_prob(x)`` by autograd, for a ``log_prob`` mapping Tensor[n, d] to
    Tensor[n] (e.g. ``GaussianMixture.log_prob``): a ``score`` for ``svgd``."""

    def score(x: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            return torch.autograd.grad(log_prob(x).sum(), x)[0]

    return score


def svgd(particles: torch.Tensor, score: Callable[[torch.Tensor], torch.Tensor], *, steps: int,
         step_size: Union[float, Sequence[float]], bandwidth: Union[str, float] = "median",
         max_pairs: int = 10_000, generator=None, return_trajectory: bool = False, progress: bool = False,
         precision: str = "highest", backend: str = "auto", check_finite: bool = True) -> torch.Tensor:
    """Stein variational gradient descent toward the density whose score is ``score``.

    ``y <- y + eps_k phi(y)`` with ``phi`` of ``svgd_direction`` (Liu & Wang 2016, "Stein
    Variational Gradient Descent", Algorithm 1, plain steps), the bandwidth ``h`` recomputed by
    the median heuristic (``median_bandwidth``) every step unless a float is given. One score
    evaluation and one kernel mean per step.

    Args:
        particles (Tensor[n, d]): initial particles (n >= 2 for the median heuristic).
        score (callable): ``y [n, d] -> grad log p(y) [n, d]`` (see ``score_from_log_prob``).
        steps (int >= 1). step_size (float > 0 or ``steps`` floats): ``eps_k``.
        bandwidth: ``"median"`` or a float ``h > 0`` for ``k(a, b) = exp(-|a - b|^2 / h)``.
        max_pairs, generator: for the median over random pairs (large n).
        return_trajectory, progress, precision, backend, check_finite: as in ``genflow.sdflow.sd_flow``.

    Returns:
        Tensor[n, d], or ``(y, trajectory [steps + 1, n, d])`` with ``return_trajectory``.

    Raises:
        NonFiniteError: naming the step, when the particles become NaN/Inf.
    """
    check_points("particles", particles)
    if not callable(score):
        raise TypeError(f"score must be a callable y -> grad log p(y), got {type(score).__name__}")
    steps = check_int("steps", steps, low=1)
    check_finite = check_bool("check_finite", check_finite)
    sizes = per_step("step_size", step_size, steps)
    if isinstance(bandwidth, str):
        if bandwidth != "median":
            raise ValueError(f"bandwidth must be 'median' or a float > 0, got {bandwidth!r}")
        check_points("particles", particles, min_rows=2)
    else:
        bandwidth = check_real("bandwidth", bandwidth, low=0.0, low_open=True)
    rng = make_generator(generator, particles.device)

    def direction(k, y):
        h = median_bandwidth(y, max_pairs=max_pairs, generator=rng) if bandwidth == "median" else bandwidth
        if not math.isfinite(h):
            raise NonFiniteError(f"svgd diverged at step {k} (of {steps}): the median bandwidth is {h} (the "
                                 f"particles overflowed or are NaN); lower step_size")
        s = score(y)
        if not isinstance(s, torch.Tensor) or s.shape != y.shape:
            raise ValueError(f"score must return a tensor of the particles' shape {list(y.shape)}, "
                             f"got {list(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__}")
        return svgd_direction(y, s.detach().to(y.dtype), bandwidth=h, precision=precision, backend=backend)

    return particle_flow(direction, particles, sizes, method="svgd", check_finite=check_finite, progress=progress,
                         return_trajectory=return_trajectory, hint=lambda k: f"step_size = {sizes[k]:g}; lower step_size")
