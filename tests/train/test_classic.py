"""The classic families of Bogensperger, "Introduction to Generative Modeling", Table 2: GMM (EM), VAE, RealNVP, GAN."""
import math

import numpy as np
import pytest
import torch

from genflow.train.classic import CLASSIC_FAMILIES, GANFamily, GMMFamily, RealNVPFamily, VAEFamily, kmeans_plus_plus
from genflow.train.data import load_dataset
from genflow.train.trainer import TrainConfig, train


def _seeds(n, start=0):
    return torch.arange(start, start + n, dtype=torch.int64)


@pytest.fixture(scope="module")
def table2():
    return load_dataset("table2", n=800, seed=0)


# ---------------------------------------------------------------------------- GMM

@pytest.mark.parametrize("init", ["kmeans", "kmeans++"])
def test_gmm_em_matches_sklearn_from_the_same_start(table2, init):
    from sklearn.mixture import GaussianMixture

    x = table2.data.double()
    gmm = GMMFamily(data_shape=(2,), components=8, init=init)
    start = GMMFamily(data_shape=(2,), components=8, init=init)
    start._set(*start._m_step(x, start._initial_responsibilities(x, torch.Generator().manual_seed(3))))
    info = gmm.fit(table2, max_iter=1000, tol=1e-12, seed=3)
    ref = GaussianMixture(8, covariance_type="full", tol=1e-12, max_iter=1000, reg_covar=1e-6,
                          weights_init=start.weights.numpy(), means_init=start.means.numpy(),
                          precisions_init=np.linalg.inv(start.covariances.numpy())).fit(x.numpy())
    assert info["converged"]
    ll_ref = ref.score(x.numpy())
    assert info["log_likelihood"] == pytest.approx(ll_ref, rel=1e-6)
    assert float(gmm.log_likelihood(x).mean()) == pytest.approx(ll_ref, rel=1e-6)
    # the same components, up to a permutation
    match = torch.cdist(gmm.means, torch.from_numpy(ref.means_)).argmin(1)
    assert sorted(match.tolist()) == list(range(8))
    torch.testing.assert_close(gmm.means, torch.from_numpy(ref.means_)[match], atol=1e-5, rtol=0)
    torch.testing.assert_close(gmm.weights, torch.from_numpy(ref.weights_)[match], atol=1e-6, rtol=0)
    torch.testing.assert_close(gmm.covariances, torch.from_numpy(ref.covariances_)[match], atol=1e-5, rtol=0)


def test_gmm_recovers_the_ring_and_samples_it(table2):
    gmm = GMMFamily(data_shape=(2,))
    gmm.fit(table2, seed=0)
    radius = gmm.means.norm(dim=1)
    torch.testing.assert_close(radius, torch.full((8,), 4 / math.sqrt(2), dtype=torch.float64), atol=0.1, rtol=0)
    torch.testing.assert_close(gmm.covariances, 0.1 * torch.eye(2, dtype=torch.float64).expand(8, 2, 2),
                               atol=0.04, rtol=0)
    x = gmm.sample(4000, generator=5)
    assert x.shape == (4000, 2)
    torch.testing.assert_close(x, gmm.sample(4000, generator=5))
    # the samples' average log-likelihood matches the model's entropy estimate from the data
    assert float(gmm.log_likelihood(x).mean()) == pytest.approx(float(gmm.log_likelihood(table2.data).mean()), abs=0.08)


def test_gmm_kmeans_plus_plus_picks_distinct_clusters(table2):
    centres = kmeans_plus_plus(table2.data.double(), 8, generator=torch.Generator().manual_seed(0))
    assert torch.pdist(centres).min() > 0.5


def test_gmm_has_no_phases_and_round_trips(table2):
    gmm = GMMFamily(data_shape=(2,))
    assert gmm.phases == ()
    with pytest.raises(ValueError, match="phases"):
        train(gmm, table2, TrainConfig(steps=1, batch_size=8))
    gmm.fit(table2, seed=1)
    other = GMMFamily(data_shape=(2,))
    other.load_state_dict(gmm.state_dict())
    assert other.fitted
    torch.testing.assert_close(other.log_likelihood(table2.data), gmm.log_likelihood(table2.data))


def test_gmm_rejects_bad_arguments(table2):
    with pytest.raises(ValueError, match="init"):
        GMMFamily(data_shape=(2,), init="random")
    with pytest.raises(ValueError, match="data"):
        GMMFamily(data_shape=(3,)).fit(table2)
    with pytest.raises(ValueError, match="components"):
        GMMFamily(data_shape=(2,), components=20).fit(table2.data[:10])


# ---------------------------------------------------------------------------- VAE

def test_vae_elbo_matches_hand_computation():
    torch.manual_seed(0)
    vae = VAEFamily(data_shape=(3,), latent=2, hidden=8, layers=1)
    with torch.no_grad():
        vae.modules["log_std"]["value"].copy_(torch.tensor([-0.5, 0.0, 0.3]))
    x, eps = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    vae.modules.double()
    h = vae.modules["encoder"](x)
    mu, sigma = h[:, :2], h[:, 2:].exp()
    recon = vae.modules["decoder"](mu + sigma * eps)
    s = torch.tensor([-0.5, 0.0, 0.3], dtype=torch.float64).exp()
    log_px_z = torch.distributions.Normal(recon, s).log_prob(x).sum(1)
    kl = torch.distributions.kl_divergence(torch.distributions.Normal(mu, sigma),
                                           torch.distributions.Normal(torch.zeros(2, dtype=torch.float64), 1.0)).sum(1)
    torch.testing.assert_close(vae.elbo(x, eps), log_px_z - kl)
    # the loss is -mean ELBO with eps drawn from the per-sample seeds
    from genflow.train import objectives as obj
    seeds = _seeds(5)
    eps_seeded = obj.draw_normal((5, 2), seeds, 0, dtype=torch.float64)
    torch.testing.assert_close(vae.loss("main", x, seeds=seeds), -vae.elbo(x, eps_seeded).mean())


def test_vae_elbo_improves_in_short_training(table2):
    torch.manual_seed(0)
    vae = VAEFamily(data_shape=(2,), hidden=32)
    x, seeds = table2.data[:512], _seeds(512, 10**6)
    with torch.no_grad():
        before = float(vae.loss("main", x, seeds=seeds))
    train(vae, table2, TrainConfig(steps=150, batch_size=128, ema=None), progress=False)
    with torch.no_grad():
        after = float(vae.loss("main", x, seeds=seeds))
    assert after < before - 0.5


def test_vae_images_fixed_std_and_sampling():
    vae = VAEFamily(data_shape=(1, 8, 8), latent=4, hidden=16, decoder_std=0.2)
    batch = torch.randn(6, 1, 8, 8)
    loss = vae.loss("main", batch, seeds=_seeds(6))
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert "log_std" not in vae.modules
    x = vae.sample(7, generator=1)
    assert x.shape == (7, 1, 8, 8)
    torch.testing.assert_close(x, vae.sample(7, generator=1))
    mean = VAEFamily(data_shape=(2,), sample_mean=True)
    assert mean.sample(3, generator=0).shape == (3, 2)
    with pytest.raises(ValueError, match="decoder_std"):
        VAEFamily(data_shape=(2,), decoder_std=-1.0)


# ---------------------------------------------------------------------------- RealNVP

def _random_realnvp(dim=2, layers=4, rotations=False):
    torch.manual_seed(1)
    flow = RealNVPFamily(data_shape=(dim,), layers=layers, hidden=16, rotations=rotations)
    with torch.no_grad():
        for p in flow.modules.parameters():
            p.add_(0.3 * torch.randn_like(p))
    flow.modules.double()
    return flow


@pytest.mark.parametrize("rotations", [False, True])
def test_realnvp_inverse_of_forward_is_identity(rotations):
    flow = _random_realnvp(dim=4, rotations=rotations)
    x = 2 * torch.randn(64, 4, dtype=torch.float64)
    z, _ = flow.forward(x)
    assert (z - x).abs().max() > 0.1
    torch.testing.assert_close(flow.inverse(z), x, atol=1e-5, rtol=0)
    x32 = torch.randn(64, 4)
    flow.modules.float()
    torch.testing.assert_close(flow.inverse(flow.forward(x32)[0]), x32, atol=1e-5, rtol=0)


@pytest.mark.parametrize("rotations", [False, True])
def test_realnvp_log_det_matches_jacrev(rotations):
    flow = _random_realnvp(dim=3, layers=5, rotations=rotations)
    x = torch.randn(6, 3, dtype=torch.float64)
    _, log_det = flow.forward(x)
    jac = torch.stack([torch.func.jacrev(lambda v: flow.forward(v[None])[0][0])(xi) for xi in x])
    torch.testing.assert_close(log_det, torch.linalg.slogdet(jac).logabsdet)


@pytest.mark.parametrize("rotations", [False, True])
def test_realnvp_density_integrates_to_one(rotations):
    flow = _random_realnvp(dim=2, rotations=rotations)
    axis = torch.linspace(-9, 9, 301, dtype=torch.float64)
    grid = torch.cartesian_prod(axis, axis)
    mass = flow.log_likelihood(grid).exp().sum() * (axis[1] - axis[0]) ** 2
    assert float(mass) == pytest.approx(1.0, abs=0.01)


def test_realnvp_trains_and_samples(table2):
    torch.manual_seed(0)
    flow = RealNVPFamily(data_shape=(2,), layers=4, hidden=32)
    before = float(-flow.log_likelihood(table2.data).mean())
    train(flow, table2, TrainConfig(steps=100, batch_size=128, ema=None), progress=False)
    assert float(-flow.log_likelihood(table2.data).mean()) < before - 0.3
    assert flow.sample(10, generator=0).shape == (10, 2)
    with pytest.raises(ValueError, match="coordinates"):
        RealNVPFamily(data_shape=(1,))
    with pytest.raises(TypeError, match="rotations"):
        RealNVPFamily(data_shape=(2,), rotations=1)


# ---------------------------------------------------------------------------- GAN

@pytest.mark.parametrize("penalty,gamma", [("r1", 0.1), ("gp", 10.0), (None, 0.0)])
def test_gan_phases_losses_and_penalties(table2, penalty, gamma):
    torch.manual_seed(0)
    gan = GANFamily(data_shape=(2,), hidden=16, penalty=penalty, gamma=gamma)
    assert gan.phases == ("discriminator", "generator")
    d_ids = {id(p) for p in gan.parameters("discriminator")}
    g_ids = {id(p) for p in gan.parameters("generator")}
    assert d_ids and g_ids and not d_ids & g_ids
    assert d_ids | g_ids == {id(p) for p in gan.modules.parameters()}
    x, seeds = table2.data[:32], _seeds(32)
    for phase in gan.phases:
        loss = gan.loss(phase, x, seeds=seeds)
        assert loss.dim() == 0 and torch.isfinite(loss)
    # the generator loss does not reach the discriminator's gradients
    gan.modules.zero_grad()
    gan.loss("generator", x, seeds=seeds).backward()
    assert all(p.grad is not None for p in gan.parameters("generator"))
    gan.modules.zero_grad(set_to_none=True)
    gan.loss("discriminator", x, seeds=seeds).backward()
    assert all(p.grad is None for p in gan.parameters("generator"))


def test_gan_penalty_values(table2):
    gan = GANFamily(data_shape=(2,), hidden=16, penalty=None)
    x, seeds = table2.data[:16], _seeds(16)
    base = gan.loss("discriminator", x, seeds=seeds)
    r1 = GANFamily(data_shape=(2,), hidden=16, penalty="r1", gamma=2.0)
    r1.modules.load_state_dict(gan.modules.state_dict())
    point = x.clone().requires_grad_(True)
    grad, = torch.autograd.grad(gan.discriminate(point).sum(), point)
    expected = base + grad.square().sum(1).mean()
    torch.testing.assert_close(r1.loss("discriminator", x, seeds=seeds), expected)


def test_gan_trains_a_few_steps(table2):
    torch.manual_seed(0)
    gan = GANFamily(data_shape=(2,), hidden=32)
    result = train(gan, table2, TrainConfig(steps=20, batch_size=64, betas=(0.5, 0.9)), progress=False)
    assert set(result.losses) == {"discriminator", "generator"}
    assert all(bool(torch.isfinite(v).all()) for v in result.losses.values())
    x = gan.sample(50, generator=3)
    assert x.shape == (50, 2) and bool(torch.isfinite(x).all())
    torch.testing.assert_close(x, gan.sample(50, generator=3))
    with pytest.raises(ValueError, match="phase"):
        gan.loss("main", table2.data[:4], seeds=_seeds(4))


def test_classic_registry_and_unconditional():
    assert set(CLASSIC_FAMILIES) == {"gmm", "vae", "realnvp", "gan"}
    for name, cls in CLASSIC_FAMILIES.items():
        assert cls.name == name
        with pytest.raises(ValueError, match="num_classes"):
            cls(data_shape=(2,), num_classes=3)
