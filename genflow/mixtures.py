"""Exact Gaussian mixtures: densities, samples, noised marginals and their exact denoisers.

For data ``x_0 ~ sum_k w_k N(mu_k, C_k)`` and ``x_t = alpha x_0 + sigma eps`` the marginal is
again a mixture, ``q_t = sum_k w_k N(alpha mu_k, M_k)`` with ``M_k = alpha^2 C_k + sigma^2 I``,
and the posterior mean (the ideal ``x0`` prediction) is

    E[x_0 | x_t = x] = sum_k r_k(x) (mu_k + alpha C_k M_k^{-1} (x - alpha mu_k)),
    r_k(x) = softmax_k(log w_k + log N(x; alpha mu_k, M_k)).

Each covariance is kept as an eigendecomposition ``C_k = U_k diag(l_k) U_k^T`` (``U_k = I``
for isotropic and diagonal components), so ``M_k = U_k diag(alpha^2 l_k + sigma^2) U_k^T`` and
all of the above costs one rotation per component. Everything is computed in float64.
"""
import math
import numbers
from typing import Optional

import numpy as np
import torch

from genflow._checks import check_int, check_real

__all__ = ["GaussianMixture"]

_F64 = torch.float64
_LOG_2PI = math.log(2.0 * math.pi)


def _to_f64(name: str, value) -> torch.Tensor:
    """``value`` as a float64 CPU tensor, with a ``ValueError`` naming ``name`` if it is not
    numeric or not finite."""
    try:
        if isinstance(value, torch.Tensor):
            out = value.detach().to("cpu", _F64)
        else:
            out = torch.as_tensor(np.asarray(value, dtype=np.float64))
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{name} must be numeric: {err}") from None
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"{name} must be finite")
    return out.contiguous()


def _time_vector(t, batch: int, device) -> torch.Tensor:
    """``t`` (number, 0-d or [B] tensor) as a float64 [B] tensor."""
    if isinstance(t, torch.Tensor):
        t = t.detach().to(device=device, dtype=_F64)
    else:
        if isinstance(t, bool) or not isinstance(t, numbers.Real):
            raise ValueError(f"t must be a number or a tensor, got {type(t).__name__}")
        t = torch.tensor(float(t), dtype=_F64, device=device)
    if t.dim() == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"t must be a scalar or have shape [{batch}] (the batch), got {tuple(t.shape)}")
    if t.device.type == "cpu" and not bool(torch.isfinite(t).all()):
        raise ValueError(f"t must be finite, got {t[~torch.isfinite(t)][0].item()}")
    return t


class GaussianMixture:
    """A mixture of Gaussians ``sum_k w_k N(mu_k, C_k)`` in ``R^D`` with exact noised marginals.

    Args:
        means (Tensor[K, D] | array | list): component means.
        stds (float | Tensor[K] | Tensor[K, D], optional): standard deviations: one for all,
            one per (isotropic) component, or per component and coordinate (diagonal).
            Defaults to 1 when ``covs`` is not given.
        weights (Tensor[K], optional): non-negative mixture weights (normalised here);
            uniform by default.
        covs (Tensor[K, D, D], optional): full symmetric positive-definite covariances,
            instead of ``stds``.

    Parameters are stored as float64 on the CPU and moved to the input's device on use.
    """

    def __init__(self, means, stds=None, weights=None, *, covs=None):
        means = _to_f64("means", means)
        if means.dim() != 2 or means.shape[0] < 1 or means.shape[1] < 1:
            raise ValueError(f"means must have shape [K, D] with K, D >= 1, got {tuple(means.shape)}")
        k, d = means.shape
        if stds is not None and covs is not None:
            raise ValueError("pass either stds or covs, not both")
        if covs is None:
            stds = _to_f64("stds", 1.0 if stds is None else stds)
            if stds.dim() == 0 or stds.shape == (1,):
                stds = stds.reshape(()).expand(k, d)
            elif stds.shape == (k,):
                stds = stds[:, None].expand(k, d)
            elif stds.shape != (k, d):
                raise ValueError(f"stds must be a scalar or have shape [K]=[{k}] or [K, D]=[{k}, {d}], "
                                 f"got {tuple(stds.shape)}")
            if not bool((stds > 0).all()):
                raise ValueError("stds must be > 0")
            evals, evecs = (stds ** 2).contiguous(), None
        else:
            covs = _to_f64("covs", covs)
            if covs.shape != (k, d, d):
                raise ValueError(f"covs must have shape [K, D, D]=[{k}, {d}, {d}], got {tuple(covs.shape)}")
            scale = covs.abs().amax(dim=(1, 2), keepdim=True)
            if not bool(((covs - covs.transpose(1, 2)).abs() <= 1e-10 * scale).all()):
                raise ValueError("covs must be symmetric")
            evals, evecs = torch.linalg.eigh(0.5 * (covs + covs.transpose(1, 2)))
            if not bool((evals > 0).all()):
                raise ValueError("covs must be positive definite")
        if weights is None:
            weights = torch.full((k,), 1.0 / k, dtype=_F64)
        else:
            weights = _to_f64("weights", weights)
            if weights.shape != (k,):
                raise ValueError(f"weights must have shape [K]=[{k}], got {tuple(weights.shape)}")
            if not bool((weights >= 0).all()) or not float(weights.sum()) > 0:
                raise ValueError("weights must be >= 0 with a positive sum")
            weights = weights / weights.sum()
        self._set(means, evals, evecs, weights)

    def _set(self, means, evals, evecs, weights):
        self._means = means
        self._evals = evals          # [K, D] variances along the eigenvectors
        self._evecs = evecs          # [K, D, D] (columns are eigenvectors) or None (= I)
        self._weights = weights
        self._log_weights = torch.log(weights)
        self._cache = {}

    @classmethod
    def _from_parts(cls, means, evals, evecs, weights) -> "GaussianMixture":
        gm = cls.__new__(cls)
        gm._set(means, evals, evecs, weights)
        return gm

    # -- standard test mixtures --------------------------------------------------------------
    @classmethod
    def ring(cls, k: int = 8, radius: float = 4.0, std: float = 0.5) -> "GaussianMixture":
        """``k`` equally weighted isotropic Gaussians evenly spaced on a circle in 2-D."""
        k = check_int("k", k, low=1)
        angles = torch.arange(k, dtype=_F64) * (2.0 * math.pi / k)
        means = check_real("radius", radius) * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
        return cls(means, check_real("std", std, low=0.0, low_open=True))

    @classmethod
    def grid(cls, n: int = 5, spacing: float = 2.0, std: float = 0.2) -> "GaussianMixture":
        """``n x n`` equally weighted isotropic Gaussians on a square grid centred at 0 in 2-D."""
        n = check_int("n", n, low=1)
        axis = (torch.arange(n, dtype=_F64) - 0.5 * (n - 1)) * check_real("spacing", spacing)
        gx, gy = torch.meshgrid(axis, axis, indexing="ij")
        return cls(torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1), check_real("std", std, low=0.0, low_open=True))

    # -- properties --------------------------------------------------------------------------
    @property
    def num_components(self) -> int:
        """Number of components ``K``."""
        return self._means.shape[0]

    @property
    def dim(self) -> int:
        """Dimension ``D``."""
        return self._means.shape[1]

    @property
    def means(self) -> torch.Tensor:
        """Component means (Tensor[K, D], float64)."""
        return self._means.clone()

    @property
    def weights(self) -> torch.Tensor:
        """Normalised weights (Tensor[K], float64)."""
        return self._weights.clone()

    @property
    def covs(self) -> torch.Tensor:
        """Component covariances (Tensor[K, D, D], float64)."""
        if self._evecs is None:
            return torch.diag_embed(self._evals)
        u = self._evecs
        return (u * self._evals[:, None, :]) @ u.transpose(1, 2)

    def __repr__(self) -> str:
        kind = "full" if self._evecs is not None else (
            "isotropic" if bool((self._evals == self._evals[:, :1]).all()) else "diagonal")
        return f"GaussianMixture(num_components={self.num_components}, dim={self.dim}, covariance={kind!r})"

    # -- internals ---------------------------------------------------------------------------
    def _params(self, device):
        device = torch.device(device)
        hit = self._cache.get(device)
        if hit is None:
            evecs = None if self._evecs is None else self._evecs.to(device)
            hit = (self._means.to(device), self._evals.to(device), evecs, self._log_weights.to(device))
            self._cache[device] = hit
        return hit

    def _flatten(self, x: torch.Tensor, name: str = "x") -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() < 1:
            raise ValueError(f"{name} must be a tensor of shape [N, D]")
        if not (x.is_floating_point() or x.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{name} must be a real tensor, got dtype {x.dtype}")
        flat = x.reshape(x.shape[0], math.prod(x.shape[1:]))
        if flat.shape[1] != self.dim:
            raise ValueError(f"{name} must have shape [N, {self.dim}] (or [N, *S] with prod(S) = "
                             f"{self.dim}), got {tuple(x.shape)}")
        return flat.to(_F64)

    def _terms(self, x, alpha, sigma):
        """For x (float64 [B, D]) and alpha, sigma (float64 [B]):

        y (U^T (x - alpha mu_k), [B, K, D]), var (eigenvalues of M_k, [B, K, D]) and the joint
        log densities log w_k + log N(x; alpha mu_k, M_k) ([B, K]).
        """
        mu, lam, u, logw = self._params(x.device)
        a = alpha[:, None, None]
        diff = x[:, None, :] - a * mu[None]
        y = diff if u is None else torch.einsum("kde,bkd->bke", u, diff)
        var = a * a * lam[None] + (sigma * sigma)[:, None, None]
        log_n = -0.5 * ((y * y / var).sum(-1) + torch.log(var).sum(-1) + self.dim * _LOG_2PI)
        return y, var, logw[None] + log_n

    def _rotate_back(self, z, device):
        """``U_k z_k`` for z [B, K, D]."""
        u = self._params(device)[2]
        return z if u is None else torch.einsum("kde,bke->bkd", u, z)

    def _alpha_sigma(self, process, t, x):
        t64 = _time_vector(t, x.shape[0], x.device)
        return process.alpha(t64), process.sigma(t64)

    def _posterior_mean(self, x, alpha, sigma):
        """E[x_0 | x_t = x] for float64 x [B, D], alpha, sigma [B] (float64 [B, D])."""
        y, var, joint = self._terms(x, alpha, sigma)
        r = torch.softmax(joint, dim=1)
        lam = self._params(x.device)[1]
        z = alpha[:, None, None] * lam[None] / var * y      # C_k alpha M_k^{-1}, rotated
        mu = self._params(x.device)[0]
        cond = mu[None] + self._rotate_back(z, x.device)    # E[x0 | x, k], [B, K, D]
        return (r[..., None] * cond).sum(1)

    # -- public API --------------------------------------------------------------------------
    def sample(self, n: int, *, generator: Optional[torch.Generator] = None,
               dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        """Draw ``n`` samples (Tensor[n, D]); randomness from ``generator`` (drawn on its device)."""
        n = check_int("n", n, low=0)
        where = generator.device if generator is not None else torch.device(device or "cpu")
        mu, lam, u, _ = self._params(where)
        idx = torch.multinomial(self._weights.to(where), int(n), replacement=True, generator=generator) \
            if n > 0 else torch.zeros(0, dtype=torch.long, device=where)
        z = torch.randn(int(n), self.dim, generator=generator, dtype=_F64, device=where)
        z = z * lam[idx].sqrt()
        if u is not None:
            z = torch.einsum("nde,ne->nd", u[idx], z)
        out = mu[idx] + z
        return out.to(device=device if device is not None else where, dtype=dtype)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``log p(x)`` of x (Tensor[N, D]) as Tensor[N] in x's dtype (float64 math)."""
        flat = self._flatten(x)
        ones = torch.ones(flat.shape[0], dtype=_F64, device=flat.device)
        return torch.logsumexp(self._terms(flat, ones, 0.0 * ones)[2], dim=1).to(_dtype_of(x))

    def marginal(self, process, t) -> "GaussianMixture":
        """The law ``q_t`` of ``x_t = alpha(t) x_0 + sigma(t) eps`` for a scalar time ``t``."""
        if isinstance(t, torch.Tensor):
            if t.numel() != 1:
                raise ValueError(f"t must be a scalar, got shape {tuple(t.shape)}")
            t = float(t)
        alpha, sigma = float(process.alpha(t)), float(process.sigma(t))
        evals = alpha * alpha * self._evals + sigma * sigma
        if not bool((evals > 0).all()):
            raise ValueError(f"the marginal at t={t} is degenerate (alpha = sigma = 0)")
        evecs = None if self._evecs is None else self._evecs.clone()
        return GaussianMixture._from_parts(alpha * self._means, evals, evecs, self._weights.clone())

    def log_prob_t(self, x: torch.Tensor, t, process) -> torch.Tensor:
        """``log q_t(x)`` of x (Tensor[B, D]) at t (number or Tensor[B]) -> Tensor[B]."""
        flat = self._flatten(x)
        alpha, sigma = self._alpha_sigma(process, t, flat)
        return torch.logsumexp(self._terms(flat, alpha, sigma)[2], dim=1).to(_dtype_of(x))

    def score(self, x: torch.Tensor, t, process) -> torch.Tensor:
        """Exact score ``grad_x log q_t(x)`` (Tensor shaped like x), float64 math.

        ``grad log q_t(x) = -sum_k r_k(x) M_k^{-1} (x - alpha mu_k)``.
        """
        flat = self._flatten(x)
        alpha, sigma = self._alpha_sigma(process, t, flat)
        y, var, joint = self._terms(flat, alpha, sigma)
        r = torch.softmax(joint, dim=1)
        g = -self._rotate_back(y / var, flat.device)
        return (r[..., None] * g).sum(1).reshape(x.shape).to(_dtype_of(x))

    def posterior_mean(self, x: torch.Tensor, t, process) -> torch.Tensor:
        """Exact denoiser ``E[x_0 | x_t = x]`` (Tensor shaped like x), float64 math."""
        flat = self._flatten(x)
        alpha, sigma = self._alpha_sigma(process, t, flat)
        return self._posterior_mean(flat, alpha, sigma).reshape(x.shape).to(_dtype_of(x))

    def model(self, process):
        """An exact ``genflow.Model`` (``prediction="x0"``) for the noised marginals under
        ``process``: its network returns ``E[x_0 | x_t = x]``."""
        from genflow.models import Model
        return Model(_MixtureDenoiser(self, process), process, prediction="x0")


def _dtype_of(x: torch.Tensor) -> torch.dtype:
    return x.dtype if x.is_floating_point() else torch.float32


class _MixtureDenoiser:
    """Network ``net(x, t) = E[x_0 | x_t = x]`` of a GaussianMixture under a process."""

    def __init__(self, mixture: GaussianMixture, process):
        self.mixture = mixture
        self.process = process

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.mixture.posterior_mean(x, t, self.process)

    def __repr__(self) -> str:
        return f"ExactDenoiser({self.mixture!r}, {self.process!r})"
