"""The classic generative families of Bogensperger, "Introduction to Generative Modeling" (Table 2): GMM by EM, VAE, RealNVP and GAN.

Each is a ``genflow.train.families.Family``: the Trainer drives the gradient-trained ones (VAE
and RealNVP in one phase ``"main"``, the GAN in ``("discriminator", "generator")``), with all
randomness of sample ``b`` drawn from ``seeds[b]``. The GMM is fitted by expectation-maximisation
(``GMMFamily.fit``) and has no phases: the Trainer has nothing to do for it.

Each registers itself under its ``name`` when defined (``Family.__init_subclass__``);
``CLASSIC_FAMILIES = {name: class}`` groups the four for Table 2.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from genflow.noise import generator_seed
from genflow.ops import randn
from genflow.train import objectives as obj
from genflow._checks import check_choice, check_int, check_real
from genflow.train.families import Family

__all__ = ["CLASSIC_FAMILIES", "GANFamily", "GMMFamily", "RealNVPFamily", "VAEFamily", "kmeans_plus_plus"]

_LOG_2PI = math.log(2 * math.pi)
# Philox stream offsets of the per-sample draws
_LATENT, _MIX, _NOISE = 0, 1, 2


def _mlp(d_in: int, d_out: int, hidden: int, layers: int, activation=nn.SiLU) -> nn.Sequential:
    """``layers`` hidden layers of width ``hidden`` with ``activation``, then a linear output."""
    mods, width = [], d_in
    for _ in range(layers):
        mods += [nn.Linear(width, hidden), activation()]
        width = hidden
    mods.append(nn.Linear(width, d_out))
    return nn.Sequential(*mods)


def _flat_dim(data_shape) -> int:
    return int(math.prod(data_shape))


def _check_unconditional(name: str, num_classes) -> None:
    if num_classes is not None:
        raise ValueError(f"the {name} family is unconditional: num_classes must be None, got {num_classes!r}")


def _check_points(name: str, x, dim: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != dim or not x.is_floating_point():
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a floating Tensor[N, {dim}], got {got}")
    return x


def _uniform(n: int, seed, offset: int, device) -> torch.Tensor:
    """Uniforms on (0, 1) (float64 [n]) as ``Phi(z)`` of Philox normals ``(seed, offset)``."""
    z = randn((n,), seed=seed, offset=offset, dtype=torch.float64, device=device)
    return torch.special.ndtr(z).clamp(1e-12, 1 - 1e-12)


# ---------------------------------------------------------------------------- GMM

def kmeans_plus_plus(x: torch.Tensor, k: int, *, generator: torch.Generator) -> torch.Tensor:
    """``k`` initial centres (Tensor[k, D]) by greedy k-means++ seeding (Arthur & Vassilvitskii 2007, Sec. 2.2).

    The first centre is a uniform draw from ``x [N, D]``; for each next one, ``2 + floor(log k)``
    candidates are drawn with probability ``D(x_i)^2 / sum_j D(x_j)^2`` (``D`` the distance to
    the nearest chosen centre) and the one giving the smallest potential ``sum_i D(x_i)^2`` is kept
    (the greedy variant the paper's experiments use).
    """
    n = x.shape[0]
    trials = 2 + int(math.log(k))
    first = int(torch.randint(n, (), generator=generator))
    centres = [x[first]]
    d2 = (x - x[first]).square().sum(1)
    for _ in range(1, k):
        total = d2.sum()
        probs = d2 / total if total > 0 else torch.full_like(d2, 1.0 / n)
        candidates = torch.multinomial(probs, trials, replacement=True, generator=generator)
        d2_new = torch.minimum(d2[None], torch.cdist(x[candidates], x).square())      # [trials, N]
        best = int(d2_new.sum(1).argmin())
        centres.append(x[candidates[best]])
        d2 = d2_new[best]
    return torch.stack(centres)


class _GMMParameters(nn.Module):
    """The mixture's weights [K], means [K, D] and covariances [K, D, D] as float64 buffers."""

    def __init__(self, k: int, d: int):
        super().__init__()
        self.register_buffer("weights", torch.full((k,), 1.0 / k, dtype=torch.float64))
        self.register_buffer("means", torch.zeros(k, d, dtype=torch.float64))
        self.register_buffer("covariances", torch.eye(d, dtype=torch.float64).repeat(k, 1, 1))


class GMMFamily(Family):
    """Gaussian mixture with full covariances, fitted by EM (Bogensperger, "Introduction to Generative Modeling", Sec. 2; Bishop 2006, Sec. 9.2.2).

        p(x) = sum_k w_k N(x; mu_k, Sigma_k)

    E-step: responsibilities ``r_ik = w_k N(x_i; mu_k, Sigma_k) / p(x_i)``. M-step:
    ``N_k = sum_i r_ik``, ``w_k = N_k / N``, ``mu_k = sum_i r_ik x_i / N_k``,
    ``Sigma_k = sum_i r_ik (x_i - mu_k)(x_i - mu_k)^T / N_k + reg_covar I``. Stops when the mean
    log-likelihood changes by less than ``tol`` (scikit-learn's ``GaussianMixture`` convention,
    whose fixed point it reproduces from the same start). Not gradient-trained: ``phases = ()``,
    call :meth:`fit` instead of the Trainer.

    Options: components (8), init (``"kmeans"``: k-means++ seeding then Lloyd iterations, or
    ``"kmeans++"``: the seeding alone; hard assignments give the initial parameters), reg_covar
    (1e-6), kmeans_iter (100).
    """

    name = "gmm"
    phases = ()

    def __init__(self, *, data_shape, num_classes=None, components=8, init="kmeans", reg_covar=1e-6, kmeans_iter=100):
        _check_unconditional("gmm", num_classes)
        self.components = check_int("components", components, low=1)
        self.init = check_choice("init", init, ("kmeans", "kmeans++"))
        self.reg_covar = check_real("reg_covar", reg_covar, low=0.0)
        self.kmeans_iter = check_int("kmeans_iter", kmeans_iter, low=0)
        self.dim = _flat_dim(data_shape)
        super().__init__({"gmm": _GMMParameters(self.components, self.dim)}, data_shape, None)
        self.fitted = False

    @property
    def weights(self) -> torch.Tensor:
        return self.modules["gmm"].weights

    @property
    def means(self) -> torch.Tensor:
        return self.modules["gmm"].means

    @property
    def covariances(self) -> torch.Tensor:
        return self.modules["gmm"].covariances

    def parameters(self, phase: str) -> list:
        """No phase exists: the GMM is fitted by :meth:`fit`."""
        raise ValueError(f"the gmm family has no training phases (it is fitted by EM with .fit()), got phase {phase!r}")

    def loss(self, phase: str, batch: torch.Tensor, *, labels=None, seeds: torch.Tensor) -> torch.Tensor:
        """No phase exists: the GMM is fitted by :meth:`fit`."""
        raise ValueError(f"the gmm family has no training phases (it is fitted by EM with .fit()), got phase {phase!r}")

    def _set(self, weights, means, covariances) -> None:
        params = self.modules["gmm"]
        params.weights.copy_(weights)
        params.means.copy_(means)
        params.covariances.copy_(covariances)

    def _log_joint(self, x: torch.Tensor) -> torch.Tensor:
        """``log w_k + log N(x_i; mu_k, Sigma_k)`` (float64 [N, K]) via Cholesky factors."""
        chol = torch.linalg.cholesky(self.covariances)                      # [K, D, D]
        diff = (x[None] - self.means[:, None]).transpose(1, 2)              # [K, D, N]
        z = torch.linalg.solve_triangular(chol, diff, upper=False)          # [K, D, N]
        log_det = 2 * torch.log(torch.diagonal(chol, dim1=1, dim2=2)).sum(1)
        log_norm = -0.5 * (z.square().sum(1) + log_det[:, None] + self.dim * _LOG_2PI)  # [K, N]
        return log_norm.T + torch.log(self.weights)[None]

    def _m_step(self, x: torch.Tensor, resp: torch.Tensor):
        nk = resp.sum(0) + 10 * torch.finfo(torch.float64).eps
        means = resp.T @ x / nk[:, None]
        diff = x[None] - means[:, None]                                     # [K, N, D]
        cov = torch.einsum("kn,kni,knj->kij", resp.T, diff, diff) / nk[:, None, None]
        cov = cov + self.reg_covar * torch.eye(self.dim, dtype=x.dtype)
        return nk / x.shape[0], means, cov

    def _initial_responsibilities(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        centres = kmeans_plus_plus(x, self.components, generator=generator)
        labels = torch.cdist(x, centres).argmin(1)
        if self.init == "kmeans":
            for _ in range(self.kmeans_iter):
                counts = torch.bincount(labels, minlength=self.components).to(x.dtype)
                sums = torch.zeros_like(centres).index_add_(0, labels, x)
                centres = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centres)
                new = torch.cdist(x, centres).argmin(1)
                if torch.equal(new, labels):
                    break
                labels = new
        return F.one_hot(labels, self.components).to(x.dtype)

    def fit(self, data, *, max_iter: int = 100, tol: float = 1e-3, seed: int = 0) -> dict:
        """Fit by EM from the configured initialisation; returns ``{"iterations", "converged", "log_likelihood"}``.

        ``data``: Tensor[N, *D] or a ``genflow.train.Dataset``. ``log_likelihood`` is the final
        mean log-likelihood in nats per sample (after the last M-step). ``seed`` seeds the
        k-means++ draws.
        """
        x = getattr(data, "data", data)
        if not isinstance(x, torch.Tensor) or tuple(x.shape[1:]) != self.data_shape:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"data must have shape [N, *{self.data_shape}], got {got}")
        max_iter, tol = check_int("max_iter", max_iter, low=1), check_real("tol", tol, low=0.0)
        x = x.detach().reshape(x.shape[0], -1).to("cpu", torch.float64)
        if x.shape[0] < self.components:
            raise ValueError(f"data needs at least components = {self.components} points, got {x.shape[0]}")
        generator = torch.Generator().manual_seed(check_int("seed", seed, low=0))
        self._set(*self._m_step(x, self._initial_responsibilities(x, generator)))
        previous, converged, iterations = -math.inf, False, 0
        for iterations in range(1, max_iter + 1):
            log_joint = self._log_joint(x)
            log_px = torch.logsumexp(log_joint, 1)
            self._set(*self._m_step(x, torch.exp(log_joint - log_px[:, None])))
            current = float(log_px.mean())
            if abs(current - previous) < tol:
                converged = True
                break
            previous = current
        self.fitted = True
        return {"iterations": iterations, "converged": converged, "log_likelihood": float(self.log_likelihood(x).mean())}

    def log_likelihood(self, x: torch.Tensor) -> torch.Tensor:
        """``log p(x)`` in nats per sample (float64 [B]) for ``x [B, *D]``."""
        flat = x.detach().reshape(x.shape[0], -1).to("cpu", torch.float64)
        _check_points("x (flattened)", flat, self.dim)
        return torch.logsumexp(self._log_joint(flat), 1)

    def sample(self, n: int, *, generator=None, labels=None, **kwargs) -> torch.Tensor:
        """``n`` draws: component ``k ~ w`` then ``mu_k + L_k z`` with ``L_k L_k^T = Sigma_k``, ``z ~ N(0, I)``."""
        check_int("n", n, low=1)
        if labels is not None or kwargs:
            raise ValueError(f"the gmm family takes no labels or sampling options, got {sorted(kwargs) or 'labels'}")
        seed = generator_seed(generator, n)
        u = _uniform(n, seed, _MIX, "cpu")
        k = torch.searchsorted(torch.cumsum(self.weights, 0), u * float(self.weights.sum())).clamp_max(self.components - 1)
        z = randn((n, self.dim), seed=seed, offset=_LATENT, dtype=torch.float64)
        x = self.means[k] + (torch.linalg.cholesky(self.covariances)[k] @ z[:, :, None])[:, :, 0]
        return x.to(torch.get_default_dtype()).reshape((n,) + self.data_shape)

    def state_dict(self) -> dict:
        return {**self.modules.state_dict(), "fitted": torch.tensor(self.fitted)}

    def load_state_dict(self, sd: dict):
        sd = dict(sd)
        self.fitted = bool(sd.pop("fitted", torch.tensor(True)))
        return self.modules.load_state_dict(sd)


# ---------------------------------------------------------------------------- VAE

class VAEFamily(Family):
    """Variational autoencoder trained on the negative ELBO (Bogensperger, "Introduction to Generative Modeling", Sec. 3; Kingma & Welling 2014).

        ELBO(x) = E_{z ~ q(z|x)}[log p(x|z)] - KL(q(z|x) || N(0, I)),
        q(z|x) = N(mu_phi(x), diag sigma_phi(x)^2),  p(x|z) = N(D_theta(z), s^2 I),

    one reparameterised draw ``z = mu + sigma eps`` per sample (``eps`` from its seed), the KL in
    closed form ``1/2 sum(mu^2 + sigma^2 - 1 - log sigma^2)``. Loss: ``-mean ELBO`` (nats per
    sample). MLP encoder and decoder on the flattened sample (vectors and small images alike,
    e.g. 8x8 digits).

    Options: latent (2), hidden (128), layers (2), decoder_std (``"learned"``: one learned
    ``log s`` per data coordinate, or a positive float: fixed ``s``), sample_mean (False:
    ``sample`` draws ``x ~ p(x|z)``; True: returns the decoder means ``D(z)``).
    """

    name = "vae"

    def __init__(self, *, data_shape, num_classes=None, latent=2, hidden=128, layers=2, decoder_std="learned",
                 sample_mean=False):
        _check_unconditional("vae", num_classes)
        self.latent = check_int("latent", latent, low=1)
        self.dim = _flat_dim(data_shape)
        hidden, layers = check_int("hidden", hidden, low=1), check_int("layers", layers, low=1)
        modules = {"encoder": _mlp(self.dim, 2 * self.latent, hidden, layers),
                   "decoder": _mlp(self.latent, self.dim, hidden, layers)}
        if decoder_std == "learned":
            self.fixed_log_std = None
            modules["log_std"] = nn.ParameterDict({"value": nn.Parameter(torch.zeros(self.dim))})
        else:
            self.fixed_log_std = math.log(check_real("decoder_std", decoder_std, low=0.0, low_open=True))
        self.sample_mean = bool(sample_mean)
        super().__init__(modules, data_shape, None)

    def decoder_log_std(self, dtype=torch.float32) -> torch.Tensor:
        """``log s`` per data coordinate (Tensor[D])."""
        if self.fixed_log_std is None:
            return self.modules["log_std"]["value"].to(dtype)
        return torch.full((self.dim,), self.fixed_log_std, dtype=dtype, device=self.device)

    def encode(self, x: torch.Tensor):
        """``(mu, log sigma)`` of ``q(z|x)`` (two Tensor[B, latent])."""
        h = self.modules["encoder"](x.reshape(x.shape[0], -1))
        return h[:, :self.latent], h[:, self.latent:]

    def elbo(self, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Per-sample ELBO (Tensor[B], nats) of ``x [B, *D]`` with the latent noise ``eps [B, latent]``."""
        flat = x.reshape(x.shape[0], -1)
        mu, log_sigma = self.encode(flat)
        z = mu + torch.exp(log_sigma) * eps
        log_s = self.decoder_log_std(flat.dtype)
        recon = self.modules["decoder"](z)
        log_px_z = -0.5 * (((flat - recon) * torch.exp(-log_s)).square() + 2 * log_s + _LOG_2PI).sum(1)
        kl = 0.5 * (mu.square() + torch.exp(2 * log_sigma) - 1 - 2 * log_sigma).sum(1)
        return log_px_z - kl

    def loss(self, phase: str, batch: torch.Tensor, *, labels=None, seeds: torch.Tensor) -> torch.Tensor:
        """``-mean ELBO`` of the batch, ``eps`` of sample ``b`` from ``seeds[b]``."""
        seeds = self._check(phase, batch, seeds)
        if labels is not None:
            raise ValueError("the vae family is unconditional: labels must be None")
        eps = obj.draw_normal((batch.shape[0], self.latent), seeds, _LATENT, dtype=batch.dtype, device=batch.device)
        return -self.elbo(batch, eps).mean()

    def sample(self, n: int, *, generator=None, labels=None, **kwargs) -> torch.Tensor:
        """``z ~ N(0, I)``, then ``x ~ N(D(z), s^2 I)`` (or ``D(z)`` with ``sample_mean``)."""
        check_int("n", n, low=1)
        if labels is not None or kwargs:
            raise ValueError(f"the vae family takes no labels or sampling options, got {sorted(kwargs) or 'labels'}")
        seed = generator_seed(generator, n)
        z = randn((n, self.latent), seed=seed, offset=_LATENT, device=self.device)
        with torch.no_grad():
            x = self.modules["decoder"](z)
            if not self.sample_mean:
                noise = randn((n, self.dim), seed=seed, offset=_NOISE, device=self.device)
                x = x + torch.exp(self.decoder_log_std(x.dtype)) * noise
        return x.reshape((n,) + self.data_shape)


# ---------------------------------------------------------------------------- RealNVP

def _random_rotation(d: int) -> torch.Tensor:
    """A Haar-random orthogonal matrix (float64 Tensor[d, d]) from the global RNG: QR of a Gaussian, signs fixed."""
    q, r = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


class _Coupling(nn.Module):
    """Affine coupling ``y = m u + (1 - m)(u exp(s(m u)) + t(m u))``, ``s = scale tanh(.)``, of ``u = Q x``.

    ``Q`` is a fixed orthogonal matrix (``rotation``, kept in float64 and cast to the input's
    dtype; the identity when None): ``log|det Q| = 0``.
    """

    def __init__(self, mask: torch.Tensor, hidden: int, layers: int, rotation=None):
        super().__init__()
        self.register_buffer("mask", mask)
        self.register_buffer("rotation", rotation)
        d = mask.numel()
        self.net = _mlp(d, 2 * d, hidden, layers)
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)
        self.scale = nn.Parameter(torch.ones(d))

    def _st(self, x_masked: torch.Tensor):
        s, t = self.net(x_masked).chunk(2, dim=1)
        keep = 1 - self.mask
        return self.scale * torch.tanh(s) * keep, t * keep

    def forward(self, x: torch.Tensor):
        if self.rotation is not None:
            x = x @ self.rotation.to(x.dtype).T
        s, t = self._st(x * self.mask)
        return x * torch.exp(s) + t, s.sum(1)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        s, t = self._st(y * self.mask)
        x = (y - t) * torch.exp(-s)
        return x if self.rotation is None else x @ self.rotation.to(x.dtype)


class RealNVPFamily(Family):
    """RealNVP normalizing flow trained by maximum likelihood (Bogensperger, "Introduction to Generative Modeling", Sec. 4.1; Dinh et al. 2017).

    ``z = f_L o ... o f_1 (x)`` with affine couplings on alternating masks (coordinate parity,
    flipped each layer): ``f(x) = m x + (1 - m)(x exp(s(m x)) + t(m x))``, whose Jacobian is
    triangular, so

        log p(x) = log N(z; 0, I) + sum_l sum_i (1 - m_l)_i s_l(m_l x_{l-1})_i.

    With ``rotations``, each coupling first applies its own fixed Haar-random orthogonal matrix
    ``Q_l`` (drawn from the global RNG at construction, ``log|det Q_l| = 0``), so the couplings
    split the space along varied directions instead of the coordinate axes only (a fixed version
    of Glow's invertible 1x1 convolution, Kingma & Dhariwal 2018, Sec. 3.2); the likelihood stays exact.

    Loss: ``-mean log p(x)``. Sampling inverts the layers from ``z ~ N(0, I)`` (``x = (y - t)
    exp(-s)`` per layer, then ``Q_l^T``). Works on the flattened sample (needs at least 2 coordinates).

    Options: layers (8 couplings), hidden (128), depth (2 hidden layers per coupling network),
    rotations (False).
    """

    name = "realnvp"

    def __init__(self, *, data_shape, num_classes=None, layers=8, hidden=128, depth=2, rotations=False):
        _check_unconditional("realnvp", num_classes)
        self.dim = _flat_dim(data_shape)
        if self.dim < 2:
            raise ValueError(f"realnvp needs at least 2 coordinates per sample, got data_shape {tuple(data_shape)}")
        layers, hidden = check_int("layers", layers, low=1), check_int("hidden", hidden, low=1)
        depth = check_int("depth", depth, low=1)
        if not isinstance(rotations, bool):
            raise TypeError(f"rotations must be a bool, got {type(rotations).__name__}")
        self.rotations = rotations
        parity = torch.arange(self.dim) % 2
        couplings = [_Coupling(((parity + k) % 2).float(), hidden, depth,
                               _random_rotation(self.dim) if self.rotations else None) for k in range(layers)]
        super().__init__({"couplings": nn.ModuleList(couplings)}, data_shape, None)

    def forward(self, x: torch.Tensor):
        """``(z, log|det dz/dx|)``: Tensor[B, D] and Tensor[B] for ``x [B, *D]``."""
        z = x.reshape(x.shape[0], -1)
        log_det = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
        for coupling in self.modules["couplings"]:
            z, ld = coupling(z)
            log_det = log_det + ld
        return z, log_det

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        """``x = f^{-1}(z)`` (Tensor[B, *D]) for ``z [B, D]``."""
        x = z
        for coupling in reversed(self.modules["couplings"]):
            x = coupling.inverse(x)
        return x.reshape((z.shape[0],) + self.data_shape)

    def _log_prob(self, x: torch.Tensor) -> torch.Tensor:
        z, log_det = self.forward(x)
        return -0.5 * (z.square().sum(1) + self.dim * _LOG_2PI) + log_det

    def log_likelihood(self, x: torch.Tensor) -> torch.Tensor:
        """Exact ``log p(x)`` in nats per sample (Tensor[B])."""
        with torch.no_grad():
            return self._log_prob(x.to(self.device))

    def loss(self, phase: str, batch: torch.Tensor, *, labels=None, seeds: torch.Tensor) -> torch.Tensor:
        """``-mean log p(x)`` of the batch (deterministic: ``seeds`` are checked, not used)."""
        self._check(phase, batch, seeds)
        if labels is not None:
            raise ValueError("the realnvp family is unconditional: labels must be None")
        return -self._log_prob(batch).mean()

    def sample(self, n: int, *, generator=None, labels=None, **kwargs) -> torch.Tensor:
        """``x = f^{-1}(z)``, ``z ~ N(0, I)``."""
        check_int("n", n, low=1)
        if labels is not None or kwargs:
            raise ValueError(f"the realnvp family takes no labels or sampling options, got {sorted(kwargs) or 'labels'}")
        z = randn((n, self.dim), seed=generator_seed(generator, n), offset=_LATENT, device=self.device)
        with torch.no_grad():
            return self.inverse(z)


# ---------------------------------------------------------------------------- GAN

class GANFamily(Family):
    """Generative adversarial network with the non-saturating loss (Bogensperger, "Introduction to Generative Modeling", Sec. 5; Goodfellow et al. 2014).

    Discriminator phase (logits ``D``, generator ``G``, ``z ~ N(0, I)``):

        L_D = E softplus(-D(x)) + E softplus(D(G(z))) + penalty,

    with ``penalty`` none, ``"r1"``: ``gamma/2 E |grad_x D(x)|^2`` on real data (Mescheder et
    al. 2018, eq. 9), or ``"gp"``: ``gamma E (|grad D(x_hat)| - 1)^2`` at ``x_hat = u x + (1-u) G(z)``
    (the WGAN-GP penalty, Gulrajani et al. 2017, Algorithm 1). Generator phase, non-saturating:
    ``L_G = E softplus(-D(G(z)))``. ``z`` and ``u`` of sample ``b`` come from ``seeds[b]``.

    Options: latent (2), hidden (128), layers (3), penalty (``"r1"`` | ``"gp"`` | None),
    gamma (0.1 for r1; use ~10 for gp).
    """

    name = "gan"
    phases = ("discriminator", "generator")

    def __init__(self, *, data_shape, num_classes=None, latent=2, hidden=128, layers=3, penalty="r1", gamma=0.1):
        _check_unconditional("gan", num_classes)
        self.latent = check_int("latent", latent, low=1)
        self.dim = _flat_dim(data_shape)
        hidden, layers = check_int("hidden", hidden, low=1), check_int("layers", layers, low=1)
        self.penalty = check_choice("penalty", penalty, ("r1", "gp", None))
        self.gamma = check_real("gamma", gamma, low=0.0)
        super().__init__({"generator": _mlp(self.latent, self.dim, hidden, layers),
                          "discriminator": _mlp(self.dim, 1, hidden, layers, nn.LeakyReLU)}, data_shape, None)

    def parameters(self, phase: str) -> list:
        """The discriminator's parameters in phase ``"discriminator"``, the generator's in ``"generator"``."""
        check_choice("phase", phase, self.phases)
        return list(self.modules[phase].parameters())

    def discriminate(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``D(x)`` (Tensor[B])."""
        return self.modules["discriminator"](x.reshape(x.shape[0], -1))[:, 0]

    def generate(self, z: torch.Tensor) -> torch.Tensor:
        """``G(z)`` (Tensor[B, *D]) for ``z [B, latent]``."""
        return self.modules["generator"](z).reshape((z.shape[0],) + self.data_shape)

    def _penalty(self, real: torch.Tensor, fake: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        if self.penalty is None or self.gamma == 0:
            return real.new_zeros(())
        if self.penalty == "r1":
            point = real.detach().requires_grad_(True)
        else:
            u = obj.draw_uniform(seeds, _MIX, device=real.device).to(real.dtype)
            u = u.reshape((-1,) + (1,) * (real.dim() - 1))
            point = (u * real.detach() + (1 - u) * fake.detach()).requires_grad_(True)
        grad, = torch.autograd.grad(self.discriminate(point).sum(), point, create_graph=True)
        norm2 = grad.reshape(grad.shape[0], -1).square().sum(1)
        if self.penalty == "r1":
            return 0.5 * self.gamma * norm2.mean()
        return self.gamma * (torch.sqrt(norm2 + 1e-12) - 1).square().mean()

    def loss(self, phase: str, batch: torch.Tensor, *, labels=None, seeds: torch.Tensor) -> torch.Tensor:
        """``L_D`` (phase ``"discriminator"``) or the non-saturating ``L_G`` (phase ``"generator"``)."""
        seeds = self._check(phase, batch, seeds)
        if labels is not None:
            raise ValueError("the gan family is unconditional: labels must be None")
        z = obj.draw_normal((batch.shape[0], self.latent), seeds, _LATENT, dtype=batch.dtype, device=batch.device)
        if phase == "generator":
            return F.softplus(-self.discriminate(self.generate(z))).mean()
        fake = self.generate(z).detach()
        loss = F.softplus(-self.discriminate(batch)).mean() + F.softplus(self.discriminate(fake)).mean()
        return loss + self._penalty(batch, fake, seeds)

    def sample(self, n: int, *, generator=None, labels=None, **kwargs) -> torch.Tensor:
        """``G(z)``, ``z ~ N(0, I)``."""
        check_int("n", n, low=1)
        if labels is not None or kwargs:
            raise ValueError(f"the gan family takes no labels or sampling options, got {sorted(kwargs) or 'labels'}")
        z = randn((n, self.latent), seed=generator_seed(generator, n), offset=_LATENT, device=self.device)
        with torch.no_grad():
            return self.generate(z)


CLASSIC_FAMILIES = {cls.name: cls for cls in (GMMFamily, VAEFamily, RealNVPFamily, GANFamily)}  # Table 2's classics
