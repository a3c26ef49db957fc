"""Tests of genflow.mixtures.GaussianMixture: densities, samples, marginals, exact denoisers."""
import math

import numpy as np
import pytest
import scipy.special
import scipy.stats
import torch

from genflow.mixtures import GaussianMixture
from genflow.processes import EDM, VE, VP, CosineVP, DiscreteVP, LinearPath, SubVP

F64 = torch.float64
KINDS = ["isotropic", "diagonal", "full"]
DIMS = [1, 2, 8]


def make(kind: str, d: int, k: int = 3, seed: int = 0) -> GaussianMixture:
    g = torch.Generator().manual_seed(seed)
    means = 3.0 * torch.randn(k, d, dtype=F64, generator=g)
    weights = 0.2 + torch.rand(k, dtype=F64, generator=g)
    if kind == "isotropic":
        return GaussianMixture(means, 0.3 + torch.rand(k, dtype=F64, generator=g), weights)
    if kind == "diagonal":
        return GaussianMixture(means, 0.2 + torch.rand(k, d, dtype=F64, generator=g), weights)
    a = torch.randn(k, d, d, dtype=F64, generator=g) / math.sqrt(d)
    covs = a @ a.transpose(1, 2) + 0.05 * torch.eye(d, dtype=F64)
    return GaussianMixture(means, weights=weights, covs=covs)


def moments(gm: GaussianMixture):
    """Mean [D] and covariance [D, D] of the mixture."""
    w, mu, c = gm.weights, gm.means, gm.covs
    mean = w @ mu
    second = (w[:, None, None] * (c + mu[:, :, None] * mu[:, None, :])).sum(0)
    return mean, second - torch.outer(mean, mean)


def scipy_log_prob(means, covs, weights, x) -> np.ndarray:
    comps = [np.log(w) + scipy.stats.multivariate_normal(m, c).logpdf(x).reshape(-1)
             for m, c, w in zip(means.numpy(), covs.numpy(), weights.numpy())]
    return scipy.special.logsumexp(np.stack(comps, 1), axis=1)


def assert_moments(x: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor, n_se: float = 5.0):
    """Sample mean and covariance of x [N, D] within n_se standard errors of (mean, cov)."""
    n = x.shape[0]
    x = x.double()
    se_mean = torch.sqrt(torch.diagonal(cov) / n)
    assert bool(((x.mean(0) - mean).abs() < n_se * se_mean).all()), (x.mean(0), mean)
    c = x - mean
    prods = c[:, :, None] * c[:, None, :]
    se_cov = prods.std(0) / math.sqrt(n)
    assert bool(((prods.mean(0) - cov).abs() < n_se * se_cov).all()), (prods.mean(0), cov)


PROCESSES = {
    "vp": (VP(), 0.4),
    "subvp": (SubVP(), 0.3),
    "ve": (VE(), 0.6),
    "cosine": (CosineVP(), 0.5),
    "edm": (EDM(), 1.7),
    "linear_path": (LinearPath(), 0.35),
    "discrete": (DiscreteVP.linear(), 0.45),
}


# --------------------------------------------------------------------------------------------
# densities and samples


@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("kind", KINDS)
def test_log_prob_matches_scipy(kind, d):
    gm = make(kind, d)
    x = gm.sample(50, generator=torch.Generator().manual_seed(1), dtype=F64)
    x = torch.cat([x, 2.0 * torch.randn(10, d, dtype=F64, generator=torch.Generator().manual_seed(2))])
    lp = gm.log_prob(x)
    assert lp.shape == (60,) and lp.dtype == F64
    np.testing.assert_allclose(lp.numpy(), scipy_log_prob(gm.means, gm.covs, gm.weights, x.numpy()),
                               rtol=1e-10, atol=1e-10)
    lp32 = gm.log_prob(x.float())
    assert lp32.dtype == torch.float32
    torch.testing.assert_close(lp32, lp.float(), rtol=1e-5, atol=1e-4)


def test_parameters_round_trip():
    means = [[0.0, 1.0], [2.0, -1.0]]
    gm = GaussianMixture(means, [0.5, 2.0], [1.0, 3.0])
    torch.testing.assert_close(gm.weights, torch.tensor([0.25, 0.75], dtype=F64))
    torch.testing.assert_close(gm.covs, torch.stack([0.25 * torch.eye(2), 4.0 * torch.eye(2)]).double())
    torch.testing.assert_close(gm.means, torch.tensor(means, dtype=F64))
    assert (gm.num_components, gm.dim) == (2, 2)
    assert "isotropic" in repr(gm)
    covs = torch.tensor([[[2.0, 0.5], [0.5, 1.0]]], dtype=F64)
    full = GaussianMixture([[1.0, 1.0]], covs=covs)
    torch.testing.assert_close(full.covs, covs, rtol=1e-13, atol=1e-14)
    assert "full" in repr(full)
    assert "diagonal" in repr(GaussianMixture(np.zeros((1, 2)), np.array([[1.0, 2.0]])))
    default = GaussianMixture(torch.zeros(4, 3))
    torch.testing.assert_close(default.covs, torch.eye(3, dtype=F64).expand(4, 3, 3))


@pytest.mark.parametrize("d", [2, 8])
@pytest.mark.parametrize("kind", KINDS)
def test_sample_moments(kind, d):
    gm = make(kind, d, seed=3)
    x = gm.sample(100_000, generator=torch.Generator().manual_seed(4))
    assert x.shape == (100_000, d) and x.dtype == torch.float32
    assert_moments(x, *moments(gm))


def test_sample_component_frequencies_and_reproducibility():
    gm = GaussianMixture([[-50.0], [0.0], [50.0]], 1.0, [0.2, 0.5, 0.3])
    x = gm.sample(40_000, generator=torch.Generator().manual_seed(5), dtype=F64)
    counts = torch.stack([(x < -25).sum(), ((x > -25) & (x < 25)).sum(), (x > 25).sum()]).double()
    p = gm.weights
    se = torch.sqrt(40_000 * p * (1 - p))
    assert bool(((counts - 40_000 * p).abs() < 5 * se).all()), counts
    again = gm.sample(40_000, generator=torch.Generator().manual_seed(5), dtype=F64)
    assert torch.equal(x, again)
    assert gm.sample(0).shape == (0, 1)


# --------------------------------------------------------------------------------------------
# noised marginals


@pytest.mark.parametrize("name", sorted(PROCESSES))
@pytest.mark.parametrize("kind", KINDS)
def test_marginal_is_the_law_of_x_t(kind, name):
    process, t = PROCESSES[name]
    gm = make(kind, 2, seed=6)
    qt = gm.marginal(process, t)
    alpha, sigma = process.alpha(t), process.sigma(t)
    # parameters
    torch.testing.assert_close(qt.means, alpha * gm.means)
    torch.testing.assert_close(qt.covs, alpha ** 2 * gm.covs + sigma ** 2 * torch.eye(2, dtype=F64))
    torch.testing.assert_close(qt.weights, gm.weights)
    # density: against scipy and against log_prob_t
    x = qt.sample(200, generator=torch.Generator().manual_seed(7), dtype=F64)
    ref = scipy_log_prob(alpha * gm.means, alpha ** 2 * gm.covs + sigma ** 2 * torch.eye(2, dtype=F64),
                         gm.weights, x.numpy())
    np.testing.assert_allclose(qt.log_prob(x).numpy(), ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gm.log_prob_t(x, t, process), qt.log_prob(x), rtol=1e-12, atol=1e-12)
    # Monte Carlo: x_t = alpha x_0 + sigma eps
    gen = torch.Generator().manual_seed(8)
    x0 = gm.sample(100_000, generator=gen, dtype=F64)
    xt = alpha * x0 + sigma * torch.randn(x0.shape, dtype=F64, generator=gen)
    assert_moments(xt, *moments(qt))


def test_marginal_accepts_tensor_time_and_rejects_vectors():
    gm = make("full", 2)
    a = gm.marginal(VP(), torch.tensor(0.3))
    b = gm.marginal(VP(), 0.3)
    torch.testing.assert_close(a.covs, b.covs, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="t"):
        gm.marginal(VP(), torch.tensor([0.3, 0.4]))


# --------------------------------------------------------------------------------------------
# exact denoiser and score


@pytest.mark.parametrize("name", sorted(PROCESSES))
@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("kind", KINDS)
def test_tweedie_and_autograd_score(kind, d, name):
    """score == grad log q_t (autograd) == (alpha E[x0|x] - x) / sigma^2, per-sample times."""
    process, t_mid = PROCESSES[name]
    gm = make(kind, d, seed=9)
    gen = torch.Generator().manual_seed(10)
    b = 16
    t = t_mid * (0.5 + torch.rand(b, dtype=F64, generator=gen))
    alpha, sigma = process.alpha(t), process.sigma(t)
    x0 = gm.sample(b, generator=gen, dtype=F64)
    x = alpha[:, None] * x0 + sigma[:, None] * torch.randn(b, d, dtype=F64, generator=gen)

    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(gm.log_prob_t(xg, t, process).sum(), xg)
    score = gm.score(x, t, process)
    mean = gm.posterior_mean(x, t, process)
    assert score.shape == mean.shape == (b, d) and score.dtype == mean.dtype == F64
    scale = 1.0 + score.abs().max()
    torch.testing.assert_close(score, grad, rtol=1e-9, atol=1e-10 * scale)
    tweedie = (alpha[:, None] * mean - x) / sigma[:, None] ** 2
    torch.testing.assert_close(score, tweedie, rtol=1e-8, atol=1e-9 * scale)
    # per-sample times agree with one call per sample
    for i in (0, b - 1):
        torch.testing.assert_close(gm.posterior_mean(x[i:i + 1], float(t[i]), process), mean[i:i + 1],
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["vp", "edm", "linear_path", "discrete"])
def test_posterior_mean_by_quadrature_1d(name):
    """E[x0 | x_t] = int x0 p(x0) N(x_t; alpha x0, sigma^2) dx0 / (same without x0), 1-D."""
    process, t = PROCESSES[name]
    gm = GaussianMixture([[-2.0], [0.5], [3.0]], [0.4, 0.8, 0.3], [0.3, 0.5, 0.2])
    alpha, sigma = process.alpha(t), process.sigma(t)
    grid = np.linspace(-8, 8, 200_001)
    log_prior = gm.log_prob(torch.from_numpy(grid)[:, None]).numpy()
    xs = np.array([-3.0, -0.7, 0.0, 1.2, 4.0]) * max(alpha, sigma)
    expected = []
    for xt in xs:
        logw = log_prior - 0.5 * ((xt - alpha * grid) / sigma) ** 2
        w = np.exp(logw - logw.max())
        expected.append(np.trapezoid(w * grid, grid) / np.trapezoid(w, grid))
    got = gm.posterior_mean(torch.from_numpy(xs)[:, None], t, process)[:, 0].numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-8, atol=1e-9)


def test_posterior_mean_single_gaussian_full_covariance():
    """K = 1: E[x0|x] = mu + alpha C (alpha^2 C + sigma^2 I)^{-1} (x - alpha mu), via solve."""
    gm = make("full", 5, k=1, seed=11)
    process = VP()
    mu, c = gm.means[0], gm.covs[0]
    x = torch.randn(7, 5, dtype=F64, generator=torch.Generator().manual_seed(12))
    for t in (0.01, 0.3, 0.9):
        a, s = process.alpha(t), process.sigma(t)
        m = a * a * c + s * s * torch.eye(5, dtype=F64)
        ref = mu + (a * c @ torch.linalg.solve(m, (x - a * mu).T)).T
        torch.testing.assert_close(gm.posterior_mean(x, t, process), ref, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("kind", KINDS)
def test_zero_noise_and_pure_noise_limits(kind):
    gm = make(kind, 3, seed=13)
    x = torch.randn(6, 3, dtype=F64, generator=torch.Generator().manual_seed(14))
    lp = LinearPath()
    # sigma = 0 at t = 0: the denoiser is the identity (alpha = 1)
    torch.testing.assert_close(gm.posterior_mean(x, 0.0, lp), x, rtol=1e-12, atol=1e-12)
    # alpha = 0 at t = 1: the denoiser is the data mean
    mean = (gm.weights @ gm.means).expand(6, 3)
    torch.testing.assert_close(gm.posterior_mean(x, 1.0, lp), mean, rtol=1e-12, atol=1e-12)
    # VE at t = 0 has sigma = sigma_min > 0, still finite; VP at t = 0 has sigma = 0
    assert bool(torch.isfinite(gm.posterior_mean(x, 0.0, VE())).all())
    torch.testing.assert_close(gm.posterior_mean(x, 0.0, VP()), x, rtol=1e-12, atol=1e-12)
    # mixed per-sample times, including sigma = 0 and alpha = 0 in one batch
    t = torch.tensor([0.0, 1.0, 0.5, 0.0, 1.0, 0.25], dtype=F64)
    out = gm.posterior_mean(x, t, lp)
    torch.testing.assert_close(out[[0, 3]], x[[0, 3]], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out[[1, 4]], mean[[1, 4]], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out[2], gm.posterior_mean(x[2:3], 0.5, lp)[0], rtol=1e-12, atol=1e-12)


def test_far_away_points_are_finite():
    gm = GaussianMixture.grid()
    x = torch.tensor([[1e3, -1e3], [0.0, 1e4], [3.0, 3.0]], dtype=F64)
    for process, t in [(VP(), 1e-3), (EDM(), 0.002), (LinearPath(), 0.0)]:
        for out in (gm.posterior_mean(x, t, process), gm.score(x, t, process), gm.log_prob_t(x, t, process)):
            assert bool(torch.isfinite(out).all())
    assert bool(torch.isfinite(gm.log_prob(x)).all())


def test_dtypes_and_shapes():
    gm = make("diagonal", 6, seed=15)
    x = torch.randn(4, 2, 3)
    t = torch.full((4,), 0.2)
    out = gm.posterior_mean(x, t, VP())
    assert out.shape == (4, 2, 3) and out.dtype == torch.float32
    ref = gm.posterior_mean(x.double().reshape(4, 6), t.double(), VP()).reshape(4, 2, 3)
    torch.testing.assert_close(out, ref.float())
    assert gm.score(x.double(), 0.2, VP()).dtype == F64
    assert gm.log_prob_t(x, 0.2, VP()).shape == (4,)
    with pytest.raises(ValueError, match="x"):
        gm.log_prob(torch.zeros(4, 5))
    with pytest.raises(ValueError, match="t"):
        gm.score(x, torch.zeros(3), VP())


# --------------------------------------------------------------------------------------------
# genflow.models.Model integration


@pytest.mark.parametrize("name", sorted(PROCESSES))
def test_model_is_exact(name):
    pytest.importorskip("genflow.models")
    process, t_mid = PROCESSES[name]
    gm = make("full", 2, seed=16)
    m = gm.model(process)
    assert m.prediction == "x0" and m.process is process
    gen = torch.Generator().manual_seed(17)
    t = t_mid * (0.5 + torch.rand(8, dtype=F64, generator=gen))
    x = 2.0 * torch.randn(8, 2, dtype=F64, generator=gen)
    torch.testing.assert_close(m.x0(x, t), gm.posterior_mean(x, t, process), rtol=1e-12, atol=1e-12)
    score = gm.score(x, t, process)
    torch.testing.assert_close(m.score(x, t), score, rtol=1e-8, atol=1e-9 * (1 + score.abs().max()))
    sigma = process.sigma(t)[:, None]
    torch.testing.assert_close(m.eps(x, t), -sigma * score, rtol=1e-8, atol=1e-9)
    x32 = m.x0(x.float(), t.float())
    assert x32.dtype == torch.float32
    torch.testing.assert_close(x32, m.x0(x, t).float(), rtol=1e-4, atol=1e-4)


def test_model_at_zero_noise_returns_x():
    pytest.importorskip("genflow.models")
    gm = GaussianMixture.ring()
    x = torch.randn(5, 2)
    torch.testing.assert_close(gm.model(LinearPath()).x0(x, 0.0), x, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------
# standard mixtures and validation


def test_ring_and_grid():
    ring = GaussianMixture.ring(k=6, radius=2.0, std=0.1)
    assert (ring.num_components, ring.dim) == (6, 2)
    torch.testing.assert_close(ring.means.norm(dim=1), torch.full((6,), 2.0, dtype=F64))
    torch.testing.assert_close(ring.means[1], torch.tensor([1.0, math.sqrt(3.0)], dtype=F64))
    torch.testing.assert_close(ring.covs, 0.01 * torch.eye(2, dtype=F64).expand(6, 2, 2))
    grid = GaussianMixture.grid(n=3, spacing=1.5, std=0.2)
    assert grid.num_components == 9
    assert sorted(set(grid.means[:, 0].tolist())) == [-1.5, 0.0, 1.5]
    torch.testing.assert_close(grid.weights @ grid.means, torch.zeros(2, dtype=F64))
    assert GaussianMixture.ring().num_components == 8 and GaussianMixture.grid().num_components == 25


@pytest.mark.parametrize("make_bad,arg", [
    (lambda: GaussianMixture([0.0, 1.0]), "means"),
    (lambda: GaussianMixture(np.zeros((2, 0))), "means"),
    (lambda: GaussianMixture([[0.0], [float("nan")]]), "means"),
    (lambda: GaussianMixture([["a"], ["b"]]), "means"),
    (lambda: GaussianMixture([[0.0], [1.0]], -1.0), "stds"),
    (lambda: GaussianMixture([[0.0], [1.0]], [1.0, 0.0]), "stds"),
    (lambda: GaussianMixture([[0.0], [1.0]], [1.0, 1.0, 1.0]), "stds"),
    (lambda: GaussianMixture([[0.0, 0.0]], [[1.0, 1.0, 1.0]]), "stds"),
    (lambda: GaussianMixture([[0.0], [1.0]], 1.0, [1.0]), "weights"),
    (lambda: GaussianMixture([[0.0], [1.0]], 1.0, [1.0, -0.5]), "weights"),
    (lambda: GaussianMixture([[0.0], [1.0]], 1.0, [0.0, 0.0]), "weights"),
    (lambda: GaussianMixture([[0.0, 0.0]], covs=np.eye(2)), "covs"),
    (lambda: GaussianMixture([[0.0, 0.0]], covs=[[[1.0, 0.5], [0.0, 1.0]]]), "covs"),
    (lambda: GaussianMixture([[0.0, 0.0]], covs=[[[1.0, 2.0], [2.0, 1.0]]]), "covs"),
    (lambda: GaussianMixture([[0.0, 0.0]], 1.0, covs=[np.eye(2)]), "stds or covs"),
    (lambda: GaussianMixture.ring(k=0), "k"),
    (lambda: GaussianMixture.grid(n=0), "n"),
    (lambda: GaussianMixture.ring().sample(-1), "n"),
])
def test_bad_inputs_raise(make_bad, arg):
    with pytest.raises(ValueError, match=arg):
        make_bad()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_matches_cpu(kind):
    gm = make(kind, 3, seed=18)
    process = DiscreteVP.linear()
    x = torch.randn(10, 3, dtype=F64, generator=torch.Generator().manual_seed(19))
    t = torch.linspace(0.05, 0.95, 10, dtype=F64)
    for fn in (gm.posterior_mean, gm.score, gm.log_prob_t):
        out = fn(x.cuda(), t.cuda(), process)
        assert out.device.type == "cuda"
        torch.testing.assert_close(out.cpu(), fn(x, t, process), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gm.log_prob(x.cuda()).cpu(), gm.log_prob(x), rtol=1e-10, atol=1e-10)
    gen = torch.Generator("cuda").manual_seed(20)
    s = gm.sample(50_000, generator=gen)
    assert s.device.type == "cuda"
    assert_moments(s.cpu(), *moments(gm))
    assert gm.sample(5, device="cuda").device.type == "cuda"
