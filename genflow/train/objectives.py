"""Training objectives: denoising / sliced score matching, EDM, flow matching and its couplings.

Every function here is pure: randomness enters only as explicit tensors (``eps``, ``t``, probes)
or through per-sample seeds (``draw_normal``/``draw_uniform``: sample ``b`` of a batch draws from
its own Philox stream ``seeds[b]``, so a loss does not depend on how its batch is sharded).
Per-sample losses are returned as Tensor[B] (the mean over data dimensions of a squared error);
the families in ``genflow.train.families`` average them over the batch.

Conventions (DESIGN.md §2): ``x_t = alpha(t) x0 + sigma(t) eps`` with data at ``t = 0``; the
flow-matching path is ``genflow.LinearPath``: ``x_t = (1 - t) x0 + (sigma_min + (1 - sigma_min) t) eps``.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from genflow._checks import check_int
from genflow.models import KINDS, Model, basis
from genflow.ops import kernel_weighted_mean, randn

__all__ = [
    "WEIGHTINGS", "EDMPrecond", "ImportanceSampler", "cfm_loss", "cfm_path", "draw_normal", "draw_uniform",
    "dsm_loss", "dsm_weight", "edm_coefficients", "edm_sigmas", "exact_ot_coupling", "gather_coupled",
    "sinkhorn_coupling", "sinkhorn_potentials", "sliced_score_loss", "uniform_times",
]

WEIGHTINGS = ("uniform", "snr", "min_snr", "likelihood", "edm")


# ---------------------------------------------------------------- per-sample randomness

def draw_normal(shape, seeds: torch.Tensor, offset: int, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """Standard normals of ``shape = [B, *D]``: row ``b`` is Philox stream ``(seeds[b], offset)``.

    ``genflow.ops.randn`` with per-sample seeds, so row ``b`` depends on ``seeds[b]`` only.
    """
    return randn(tuple(shape), seed=seeds, offset=offset, dtype=dtype, device=device)


def draw_uniform(seeds: torch.Tensor, offset: int, *, device=None) -> torch.Tensor:
    """One uniform on (0, 1) per seed (float64 [B]): ``u_b = Phi(z_b)``, ``z_b = N(seeds[b], offset)``.

    ``Phi`` is the standard normal CDF (``torch.special.ndtr``); clamped to ``[1e-7, 1 - 1e-7]``.
    """
    z = randn((seeds.shape[0],), seed=seeds, offset=offset, dtype=torch.float64, device=device)
    return torch.special.ndtr(z).clamp(1e-7, 1.0 - 1e-7)


# ---------------------------------------------------------------- time sampling

def uniform_times(u: torch.Tensor, t_min: float, t_max: float) -> torch.Tensor:
    """``t = t_min + u (t_max - t_min)``: uniform times from uniforms ``u`` (float64 [B])."""
    return t_min + u.to(torch.float64) * (t_max - t_min)


class ImportanceSampler:
    """Times ``t ~ p(t) ∝ density(t)`` on ``[t_min, t_max]`` by inverse CDF on a fine grid.

    The density is tabulated at ``grid + 1`` uniform points and the CDF is its trapezoidal
    integral; ``t = CDF^{-1}(u)`` interpolates linearly, so the sampled law has the exactly known
    piecewise-constant density ``p_hat`` (the table's cell masses over cell widths). ``__call__``
    returns ``(t, factor)`` with ``factor = 1 / (p_hat(t) (t_max - t_min))``: then
    ``E_{t ~ p_hat}[factor * l(t)] = E_{t ~ U[t_min, t_max]}[l(t)]`` for any ``l``, exactly, so an
    importance-sampled loss has the same expectation as the uniform-time loss. With
    ``density = g^2 / sigma^2`` (the likelihood weighting in eps space) this is the variance
    reduction of Song et al. (2021), "Maximum Likelihood Training of Score-Based Diffusion
    Models", §5 (sample ``t ∝ lambda(t) / sigma^2`` with ``lambda = g^2``).

    Args:
        density: callable float64 Tensor[K] -> non-negative Tensor[K] (unnormalised).
        t_min, t_max (float): the time interval. grid (int): number of cells.
    """

    def __init__(self, density: Callable, t_min: float, t_max: float, *, grid: int = 4096):
        if not t_max > t_min:
            raise ValueError(f"t_max must be > t_min = {t_min}, got {t_max}")
        grid = check_int("grid", grid, low=1)
        self.t_min, self.t_max = float(t_min), float(t_max)
        self.ts = torch.linspace(self.t_min, self.t_max, int(grid) + 1, dtype=torch.float64)
        dens = density(self.ts).to(torch.float64)
        if not bool(torch.isfinite(dens).all()) or bool((dens < 0).any()) or not float(dens.sum()) > 0:
            raise ValueError("density must be finite, non-negative and not identically zero on [t_min, t_max]")
        mass = 0.5 * (dens[1:] + dens[:-1]) * (self.ts[1:] - self.ts[:-1])
        self.cdf = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(mass, 0)])
        self.cdf = self.cdf / self.cdf[-1]
        self.pdf = (self.cdf[1:] - self.cdf[:-1]) / (self.ts[1:] - self.ts[:-1])  # p_hat on each cell

    def __call__(self, u: torch.Tensor):
        """``(t, factor)``, float64 [B], for uniforms ``u`` (float64 [B])."""
        cdf, ts, pdf = (a.to(u.device) for a in (self.cdf, self.ts, self.pdf))
        u = u.to(torch.float64)
        k = torch.searchsorted(cdf, u, right=True).clamp(1, cdf.shape[0] - 1) - 1
        frac = (u - cdf[k]) / (cdf[k + 1] - cdf[k])
        t = ts[k] + frac * (ts[k + 1] - ts[k])
        return t, 1.0 / (pdf[k] * (self.t_max - self.t_min))


def edm_sigmas(u: torch.Tensor, *, P_mean: float = -1.2, P_std: float = 1.2) -> torch.Tensor:
    """EDM's log-normal noise levels ``ln sigma ~ N(P_mean, P_std^2)`` from uniforms ``u`` (float64 [B]).

    ``sigma = exp(P_mean + P_std Phi^{-1}(u))`` (Karras et al. 2022, Table 1, "Training").
    """
    return torch.exp(P_mean + P_std * torch.special.ndtri(u.to(torch.float64)))


# ---------------------------------------------------------------- denoising score matching

def per_sample_coefficient(c, x: torch.Tensor):
    """A float64 [B] coefficient shaped to broadcast against x, in x's dtype."""
    return c.to(x.dtype).reshape((-1,) + (1,) * (x.dim() - 1))


def dsm_weight(process, t: torch.Tensor, prediction: str, weighting: str, *, gamma: float = 5.0,
               sigma_data: float = 0.5) -> torch.Tensor:
    """Per-sample weight ``w(t)`` (float64 [B]) of the squared error of a ``prediction`` network.

    Weightings are defined in x0 space (the loss is ``w_x0(t) |x0_hat - x0|^2``) and converted
    to the network's own kind exactly: with ``kind = p x0 + q eps`` (``genflow.models``) the
    error of ``kind`` is ``c_kind`` times the eps error, ``c_kind = (alpha q - sigma p) / alpha``,
    so ``w = w_x0 (sigma/alpha)^2 / c_kind^2``. With ``SNR = alpha^2 / sigma^2``:

    * ``uniform``: ``w = 1``, the plain MSE of the network's output (Ho et al. 2020's L_simple
      for eps).
    * ``snr``: ``w_x0 = SNR``, i.e. the eps-space MSE for any prediction kind (Kingma et al.
      2021, eq. 17 with ``w = 1``).
    * ``min_snr``: ``w_x0 = min(SNR, gamma)`` (Hang et al. 2023, "Efficient Diffusion Training
      via Min-SNR Weighting Strategy", eq. 8; gamma = 5): ``min(SNR, gamma)/SNR`` for eps,
      ``min(SNR, gamma)/(SNR + 1)`` for v under VP.
    * ``likelihood``: the score-space weight ``g^2(t)``, i.e. ``w_x0 = g^2 alpha^2 / sigma^4``:
      ``int g^2 |s_theta - grad log q_t|^2 dt`` is the negative ELBO up to a theta-independent
      term (Lim, "An Introduction to Generative Modeling with Flows and Diffusion Models", Corollary 6.3; Song et al. 2021).
    * ``edm``: ``w_x0 = (s^2 + sigma_data^2) / (s sigma_data)^2`` with ``s = sigma/alpha``
      (Karras et al. 2022, Table 1, ``lambda(sigma)``).
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if prediction not in KINDS:
        raise ValueError(f"prediction must be one of {KINDS}, got {prediction!r}")
    t = t.to(torch.float64)
    if weighting == "uniform":
        return torch.ones_like(t)
    alpha, sigma = process.alpha(t), process.sigma(t)
    snr = (alpha / sigma) ** 2
    if weighting == "snr":
        w_x0 = snr
    elif weighting == "min_snr":
        w_x0 = snr.clamp(max=gamma)
    elif weighting == "likelihood":
        w_x0 = process.g2(t) * alpha ** 2 / sigma ** 4
    else:
        s = sigma / alpha
        w_x0 = (s ** 2 + sigma_data ** 2) / (s * sigma_data) ** 2
    dalpha, dsigma = (process.dalpha(t), process.dsigma(t)) if prediction == "velocity" else (0.0, 0.0)
    p, q = basis(prediction, alpha, sigma, dalpha, dsigma)
    c_kind = (alpha * q - sigma * p) / alpha
    return w_x0 / snr / c_kind ** 2


def dsm_loss(model: Model, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, *, weighting: str = "uniform",
             gamma: float = 5.0, sigma_data: float = 0.5, **cond) -> torch.Tensor:
    """Denoising score matching loss per sample, in the network's own prediction kind.

    ``x_t = alpha(t) x0 + sigma(t) eps`` and, for a network predicting ``kind = p x0 + q eps``
    (eps, x0, v = alpha eps - sigma x0, score = -eps/sigma, velocity = alpha' x0 + sigma' eps)::

        loss_b = w(t_b) * mean_d (net(x_t, t_b)_d - (p x0 + q eps)_d)^2

    with ``w = dsm_weight(process, t, kind, weighting)``. Minimised by the exact denoiser
    ``E[x0 | x_t]`` for every weighting (Lim, "An Introduction to Generative Modeling with Flows and Diffusion Models" §5.2.4, eq. 5.8; Vincent 2011).

    Args:
        model (genflow.Model): the network, its process and its prediction kind.
        x0 (Tensor[B, *D]): data. t (Tensor[B]): times (float64 recommended).
        eps (Tensor[B, *D]): the standard normal noise. **cond: passed to the network.

    Returns:
        Tensor[B]: per-sample losses (float32 for float32 data).
    """
    if eps.shape != x0.shape:
        raise ValueError(f"eps must have x0's shape {tuple(x0.shape)}, got {tuple(eps.shape)}")
    process, kind = model.process, model.prediction
    t = t.to(device=x0.device, dtype=torch.float64)
    alpha, sigma = process.alpha(t), process.sigma(t)
    x_t = per_sample_coefficient(alpha, x0) * x0 + per_sample_coefficient(sigma, x0) * eps
    dalpha, dsigma = (process.dalpha(t), process.dsigma(t)) if kind == "velocity" else (0.0, 0.0)
    p, q = basis(kind, alpha, sigma, dalpha, dsigma)
    p = p if isinstance(p, torch.Tensor) else torch.full_like(t, p)
    q = q if isinstance(q, torch.Tensor) else torch.full_like(t, q)
    target = per_sample_coefficient(p, x0) * x0 + per_sample_coefficient(q, x0) * eps
    out = model.raw(x_t, t, **cond)
    err = (out - target).square().reshape(x0.shape[0], -1).mean(1)
    weight = dsm_weight(process, t, kind, weighting, gamma=gamma, sigma_data=sigma_data)
    return weight.to(err.dtype) * err


# ---------------------------------------------------------------- EDM preconditioning

def edm_coefficients(sigma: torch.Tensor, sigma_data: float = 0.5):
    """``(c_skip, c_out, c_in, c_noise)`` of Karras et al. (2022), Table 1 ("EDM" column).

    ``c_skip = sd^2 / (sigma^2 + sd^2)``, ``c_out = sigma sd / sqrt(sigma^2 + sd^2)``,
    ``c_in = 1 / sqrt(sigma^2 + sd^2)``, ``c_noise = ln(sigma) / 4`` with ``sd = sigma_data``.
    """
    total = sigma ** 2 + sigma_data ** 2
    return sigma_data ** 2 / total, sigma * sigma_data / total.sqrt(), 1.0 / total.sqrt(), sigma.log() / 4


class EDMPrecond(torch.nn.Module):
    """EDM-preconditioned denoiser ``D(x, t) = c_skip x~ + c_out F(c_in x~, c_noise)``, an x0 predictor.

    For any process, ``x~ = x_t / alpha(t) = x0 + s eps`` is the variance-exploding form with
    noise level ``s = sigma(t) / alpha(t)`` (Karras et al. 2022, eq. 7 with ``s(t) = alpha``);
    the coefficients are ``edm_coefficients(s, sigma_data)`` (Table 1). For the EDM process
    ``alpha = 1`` and ``s = t``. Wrap as ``genflow.Model(EDMPrecond(net, process), process, "x0")``.

    Args:
        net (nn.Module): the raw network ``F(x, c_noise, **cond)``.
        process: the genflow process. sigma_data (float): data standard deviation.
    """

    def __init__(self, net: torch.nn.Module, process, sigma_data: float = 0.5):
        super().__init__()
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
        self.net, self.process, self.sigma_data = net, process, float(sigma_data)

    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        t64 = t.to(torch.float64)
        alpha = self.process.alpha(t64)
        s = self.process.sigma(t64) / alpha
        c_skip, c_out, c_in, c_noise = edm_coefficients(s, self.sigma_data)
        x_vp = x / per_sample_coefficient(alpha, x)
        out = self.net(per_sample_coefficient(c_in, x) * x_vp, c_noise.to(x.dtype), **cond)
        return per_sample_coefficient(c_skip, x) * x_vp + per_sample_coefficient(c_out, x) * out


# ---------------------------------------------------------------- sliced score matching

def sliced_score_loss(score_fn: Callable, x: torch.Tensor, v: torch.Tensor, *,
                      variance_reduction: bool = True) -> torch.Tensor:
    """Sliced score matching loss per sample, averaged over the projections ``v``.

    With projections ``v_k`` (E[v v^T] = I; Gaussian or Rademacher, Tensor[K, B, *D])::

        SSM:     0.5 (v^T s(x))^2 + v^T grad_x (v^T s(x))
        SSM-VR:  0.5 |s(x)|^2      + v^T grad_x (v^T s(x))

    divided by the data dimension D (Lim, "An Introduction to Generative Modeling with Flows and Diffusion Models" §5.2.3, eq. 5.5; Song et al. 2020, "Sliced Score
    Matching", eqs. 7-8; SSM-VR replaces the first term by its exact expectation over Gaussian
    ``v``). ``v^T grad (v^T s)`` is one vector-Jacobian product per projection, built with
    ``create_graph=True`` so the loss is differentiable in the network's parameters. Samples
    must not interact in ``score_fn`` (no batch norm).

    Args:
        score_fn: ``x -> s(x)``, Tensor[B, *D] -> Tensor[B, *D].
        x (Tensor[B, *D]): points. v (Tensor[K, B, *D]): projections.

    Returns:
        Tensor[B]: per-sample losses.
    """
    if v.dim() != x.dim() + 1 or v.shape[1:] != x.shape:
        raise ValueError(f"v must have shape [K, *x.shape] = [K, {', '.join(map(str, x.shape))}], got {tuple(v.shape)}")
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        s = score_fn(x)
        batch = x.shape[0]
        dims = s[0].numel()
        total = 0.0
        for k in range(v.shape[0]):
            vs = (v[k] * s).reshape(batch, -1).sum(1)
            (g,) = torch.autograd.grad(vs.sum(), x, create_graph=True)
            hvp = (g * v[k]).reshape(batch, -1).sum(1)
            first = 0.5 * s.square().reshape(batch, -1).sum(1) if variance_reduction else 0.5 * vs.square()
            total = total + first + hvp
    return total / (v.shape[0] * dims)


# ---------------------------------------------------------------- flow matching

def cfm_path(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, sigma_min: float = 0.0):
    """Conditional-OT path and its target velocity, data at ``t = 0``, noise at ``t = 1``.

    ``x_t = (1 - t) x0 + (sigma_min + (1 - sigma_min) t) noise`` and
    ``u_t = d x_t / dt = (1 - sigma_min) noise - x0`` (Bogensperger, "Introduction to Generative Modeling" §7: ``mu_t = t x1``,
    ``sigma_t = 1 - (1 - sigma_min) t`` of Lipman et al. 2023, eqs. 20-23, with ``t -> 1 - t``
    so that data sits at ``t = 0`` as in ``genflow.LinearPath(sigma_min)``). Returns ``(x_t, u_t)``.
    """
    tc = per_sample_coefficient(t, x0)
    x_t = (1.0 - tc) * x0 + (sigma_min + (1.0 - sigma_min) * tc) * noise
    return x_t, (1.0 - sigma_min) * noise - x0


def cfm_loss(net: Callable, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, *, sigma_min: float = 0.0,
             **cond) -> torch.Tensor:
    """Conditional flow matching loss per sample: ``mean_d (v_theta(x_t, t) - u_t)^2``.

    ``(x_t, u_t) = cfm_path(x0, noise, t, sigma_min)`` (Bogensperger, "Introduction to Generative Modeling" §7, eq. 16; Lipman et al.
    2023). With ``noise`` independent of ``x0`` and ``sigma_min = 0`` this is the 1-rectified
    flow loss (Liu et al. 2023, eq. 1); with ``noise`` coupled to ``x0`` by minibatch optimal
    transport it is OT-CFM (Tong et al. 2024, Algorithm 1). ``net(x_t, t, **cond)`` receives t
    in x's dtype.

    Returns:
        Tensor[B]: per-sample losses.
    """
    if noise.shape != x0.shape:
        raise ValueError(f"noise must have x0's shape {tuple(x0.shape)}, got {tuple(noise.shape)}")
    x_t, u_t = cfm_path(x0, noise, t, sigma_min)
    out = net(x_t, t.to(x0.dtype), **cond)
    return (out - u_t).square().reshape(x0.shape[0], -1).mean(1)


# ---------------------------------------------------------------- minibatch couplings

def exact_ot_coupling(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The permutation ``perm`` minimising ``sum_i |x_i - y_perm[i]|^2`` (exact minibatch OT).

    Solved by ``scipy.optimize.linear_sum_assignment`` on the squared-distance cost (float64,
    on the CPU; Tong et al. 2024, "Improving and generalizing flow-based generative models with
    minibatch optimal transport", §3.2). x, y: Tensor[N, *D]. Returns int64 Tensor[N] on x's device.
    """
    from scipy.optimize import linear_sum_assignment

    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    xf = x.detach().reshape(x.shape[0], -1).to("cpu", torch.float64)
    yf = y.detach().reshape(y.shape[0], -1).to("cpu", torch.float64)
    cost = torch.cdist(xf, yf).square().numpy()
    rows, cols = linear_sum_assignment(cost)
    perm = np.empty_like(cols)
    perm[rows] = cols
    return torch.from_numpy(perm).to(device=x.device, dtype=torch.int64)


def sinkhorn_potentials(x: torch.Tensor, y: torch.Tensor, *, eps: float, iters: int = 1000, tol: float = 1e-6,
                        backend: str = "auto"):
    """Entropic-OT dual potentials ``(f, g)`` between uniform point clouds, by log-domain Sinkhorn.

    With ``C_ij = |x_i - y_j|^2``, ``a = 1/N``, ``b = 1/M`` and the plan
    ``P_ij = a_i b_j exp((f_i + g_j - C_ij)/eps)``, the iterations (Cuturi 2013; Peyré & Cuturi
    2019, "Computational Optimal Transport", Remark 4.23) are::

        f_i = -eps logsumexp_j((g_j - C_ij)/eps + log b_j)
        g_j = -eps logsumexp_i((f_i - C_ij)/eps + log a_i)

    Each logsumexp is the ``lse`` of ``genflow.ops.kernel_weighted_mean(x, y, sigma=sqrt(eps/2),
    log_weights=g/eps + log b, return_lse=True)`` (``exp(-C/(2 sigma^2)) = exp(-C/eps)``), so no
    N x M matrix is formed and the work runs on x's device with the compiled engine. The
    regularisation is annealed (eps-scaling: ``eps_k = max(eps, C_bound 2^-k)`` with ``C_bound``
    a bound on the cost, warm-starting the potentials; Schmitzer 2019, §3.2), then iterated at
    ``eps`` until every row marginal ``sum_j P_ij`` is within ``tol`` of ``a_i`` (relative:
    after a ``g`` update the columns are exact and row ``i``'s marginal is ``a_i exp((f_i -
    f_i')/eps)`` with ``f'`` the next ``f``), or for at most ``iters`` iterations.

    Returns:
        (f (Tensor[N]), g (Tensor[M])), float64 for float64 input else float32.
    """
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    xf, yf = x.detach().reshape(x.shape[0], -1), y.detach().reshape(y.shape[0], -1)
    if xf.shape[1] != yf.shape[1]:
        raise ValueError(f"x and y must have the same data dimensions, got {tuple(x.shape)} and {tuple(y.shape)}")
    log_a, log_b = -math.log(xf.shape[0]), -math.log(yf.shape[0])
    g = torch.zeros(yf.shape[0], dtype=xf.dtype, device=xf.device)

    def lse(q, k, pot, log_w, e):
        return kernel_weighted_mean(q, k, k[:, :1], sigma=math.sqrt(e / 2), log_weights=pot / e + log_w,
                                    return_lse=True, backend=backend)[1]

    bound = float(xf.norm(dim=1).max() + yf.norm(dim=1).max()) ** 2
    level = max(eps, bound)
    f = -level * lse(xf, yf, g, log_b, level)
    for _ in range(iters):
        g = -level * lse(yf, xf, f, log_a, level)
        f_next = -level * lse(xf, yf, g, log_b, level)
        converged = level == eps and float((f - f_next).abs().max()) / eps < tol
        f, level = f_next, max(eps, level / 2)
        if converged:
            break
    return f, g


def sinkhorn_coupling(x: torch.Tensor, y: torch.Tensor, u: torch.Tensor, *, eps: float, iters: int = 1000,
                      tol: float = 1e-6, chunk: int = 1024, backend: str = "auto") -> torch.Tensor:
    """Draw, for each ``x_i``, a partner index ``j`` from the entropic-OT plan's row ``i``.

    ``P(j | i) ∝ b_j exp((g_j - C_ij)/eps)`` with the potentials of ``sinkhorn_potentials``;
    ``j`` is the inverse CDF of that row at the uniform ``u_i`` (so the draw of row ``i`` depends
    only on ``u_i``). Rows are processed ``chunk`` at a time (a chunk x M block at once). As
    ``eps -> 0`` the plan tends to the exact OT permutation (Peyré & Cuturi 2019, Prop. 4.1).

    Args:
        x (Tensor[N, *D]), y (Tensor[M, *D]): the point clouds. u (Tensor[N]): uniforms in (0, 1).

    Returns:
        int64 Tensor[N] of indices into y.
    """
    _, g = sinkhorn_potentials(x, y, eps=eps, iters=iters, tol=tol, backend=backend)
    xf, yf = x.detach().reshape(x.shape[0], -1), y.detach().reshape(y.shape[0], -1)
    out = torch.empty(xf.shape[0], dtype=torch.int64, device=xf.device)
    for start in range(0, xf.shape[0], chunk):
        rows = slice(start, start + chunk)
        logits = (g[None, :] - torch.cdist(xf[rows], yf).square()) / eps
        prob = torch.softmax(logits.to(torch.float64), dim=1)
        cdf = torch.cumsum(prob, dim=1)
        target = u[rows].to(device=cdf.device, dtype=torch.float64)[:, None] * cdf[:, -1:]
        out[rows] = torch.searchsorted(cdf, target).clamp(max=yf.shape[0] - 1)[:, 0]
    return out


def gather_coupled(x_local: torch.Tensor, y_local: torch.Tensor, u_local: torch.Tensor,
                   couple: Callable) -> torch.Tensor:
    """Couple the GLOBAL batch under data parallelism and return this rank's partners.

    ``couple(x, y, u) -> index (int64 Tensor[N])`` pairs row ``i`` of ``x`` with ``y[index[i]]``
    (``u``: one uniform per row of x, for random couplings). When ``torch.distributed`` is
    initialised, the local ``x``, ``y`` and ``u`` of every rank are all-gathered in rank order
    (the global batch as one process sees it), the coupling is computed identically on every
    rank, and this rank keeps ``y_global[index]`` for its own rows: the result equals the
    one-process coupling of the global batch. Ranks may hold different batch sizes. Without
    ``torch.distributed`` this is ``y_local[couple(x_local, y_local, u_local)]``.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return y_local[couple(x_local, y_local, u_local)]
    world, rank = dist.get_world_size(), dist.get_rank()
    size = torch.tensor([x_local.shape[0]], dtype=torch.int64, device=x_local.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    largest = max(sizes)

    def gather(a):
        padded = a.new_zeros((largest,) + tuple(a.shape[1:]))
        padded[: a.shape[0]] = a.detach()
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    x_all, y_all, u_all = gather(x_local), gather(y_local), gather(u_local)
    index = couple(x_all, y_all, u_all)
    start = sum(sizes[:rank])
    return y_all[index[start:start + x_local.shape[0]]]
