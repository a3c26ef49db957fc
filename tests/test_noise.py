"""Noise sources: the Brownian tree is a Brownian motion (Gaussian, independent increments,
covariance min(s, t)), consistent under refinement, per-sample reproducible, and makes
samples at different step counts close."""
import math

import pytest
import torch
from scipy import stats

import genflow as gf
from genflow.noise import BrownianTreeNoise, PhiloxNoise, noise_source

from .solvers.references import mixture

N = 200_000  # elements per statistical check: standard errors ~ 0.002


@pytest.fixture(scope="module")
def like():
    return torch.zeros(4, N // 4, dtype=torch.float64)


def test_increments_are_normal_with_variance_dt(like):
    tree = BrownianTreeNoise(11, 1.0)
    for a, b in [(0.1, 0.3), (0.5, 0.5002), (0.0, 1.0), (0.9, 0.25)]:
        inc = tree.increment(like, a, b).flatten()
        dt = abs(b - a)
        assert abs(inc.mean().item()) < 5 * math.sqrt(dt / N)
        assert abs(inc.var().item() / dt - 1) < 5 * math.sqrt(2 / N)
        z = tree.draw(like, a, b)["noise"].flatten()  # the normalised draw the solvers use
        assert stats.kstest(z[:20_000].numpy(), "norm").pvalue > 1e-3


def test_disjoint_increments_are_independent_and_overlaps_have_brownian_covariance(like):
    tree = BrownianTreeNoise([3, 4, 5, 6], 2.0)

    def corr(u, v):
        u, v = u.flatten(), v.flatten()
        return (((u - u.mean()) * (v - v.mean())).mean() / (u.std() * v.std())).item()

    bound = 5 / math.sqrt(N)
    assert abs(corr(tree.increment(like, 0.1, 0.3), tree.increment(like, 0.3, 0.6))) < bound  # adjacent
    assert abs(corr(tree.increment(like, 0.2, 0.21), tree.increment(like, 1.5, 1.9))) < bound
    # Cov(W(0.5) - W(0.1), W(0.7) - W(0.3)) = 0.2, so the correlation is 0.2 / 0.4
    assert abs(corr(tree.increment(like, 0.1, 0.5), tree.increment(like, 0.3, 0.7)) - 0.5) < bound
    w_s, w_t = tree.value(like, 0.4), tree.value(like, 1.6)  # Cov(W(s), W(t)) = min(s, t)
    assert abs((w_s * w_t).mean().item() - 0.4) < 5 * math.sqrt(0.4 * 1.6 / N) + 0.01


def test_the_path_is_consistent_under_refinement():
    like = torch.zeros(3, 1000, dtype=torch.float64)
    fresh = BrownianTreeNoise(7, 1.0).value(like, 0.37)
    tree = BrownianTreeNoise(7, 1.0)
    for s in torch.rand(50, dtype=torch.float64).tolist():
        tree.value(like, s)
    torch.testing.assert_close(tree.value(like, 0.37), fresh, rtol=0, atol=0)  # no state, no drift
    grid = torch.linspace(0.05, 0.37, 33, dtype=torch.float64).tolist()
    fine = sum(tree.increment(like, a, b) for a, b in zip(grid[:-1], grid[1:]))
    torch.testing.assert_close(fine, tree.increment(like, 0.05, 0.37), rtol=0, atol=1e-12)
    torch.testing.assert_close(tree.increment(like, 0.05, 0.37), fresh - tree.value(like, 0.05), rtol=0, atol=1e-12)
    assert torch.equal(tree.value(like, 0.0), torch.zeros_like(like))  # W(sigma_min) = 0
    # per-sample query times give each sample the value it gets from a scalar query
    per_sample = tree.value(like, torch.full((3,), 0.37, dtype=torch.float64))
    torch.testing.assert_close(per_sample, fresh, rtol=0, atol=1e-14)


def test_per_sample_seeds_and_times_do_not_depend_on_the_batch():
    like = torch.zeros(4, 3, 5)
    seeds = torch.tensor([5, 6, 7, 8])
    s0 = torch.tensor([0.1, 0.2, 0.5, 0.9], dtype=torch.float64)
    batch = BrownianTreeNoise(seeds, 1.0).draw(like, s0, 0.7 * s0)["noise"]
    for b in range(4):
        alone = BrownianTreeNoise(seeds[b:b + 1], 1.0).draw(like[:1], s0[b:b + 1], 0.7 * s0[b:b + 1])["noise"]
        torch.testing.assert_close(batch[b:b + 1], alone, rtol=0, atol=0)
    assert batch.dtype == torch.float32
    one_seed = BrownianTreeNoise(5, 1.0).draw(like, 0.5, 0.4)["noise"]
    assert not torch.allclose(one_seed[0], one_seed[1])  # an int seed still gives every sample its own path


def test_draw_edge_cases_and_bad_input():
    tree = BrownianTreeNoise(1, 1.0)
    like = torch.zeros(2, 8)
    assert torch.equal(tree.draw(like, 0.3, 0.3)["noise"], torch.zeros_like(like))
    z = tree.draw(like, torch.tensor([0.3, 0.5], dtype=torch.float64),
                  torch.tensor([0.3, 0.4], dtype=torch.float64))["noise"]
    assert torch.equal(z[0], torch.zeros(8)) and z[1].abs().sum() > 0
    with pytest.raises(ValueError, match="sigma in"):
        tree.draw(like, 0.5, 1.5)
    with pytest.raises(ValueError, match="sigma_from and sigma_to"):
        tree.draw(like)
    with pytest.raises(ValueError, match="tol"):
        BrownianTreeNoise(1, 1.0, tol=0.0)
    with pytest.raises(ValueError, match="tree levels"):
        BrownianTreeNoise(1, 1e6, tol=1e-15)


def test_brownian_tree_prior_is_philox_prior_and_source_options():
    tree = noise_source(3, 4, noise="brownian_tree", sigma_max=1.0)
    assert isinstance(tree, BrownianTreeNoise)
    assert torch.equal(tree.prior((4, 2), torch.float32, None), PhiloxNoise(3).prior((4, 2), torch.float32, None))
    assert isinstance(noise_source(3, 4), PhiloxNoise) and isinstance(noise_source(3, 4, noise="philox"), PhiloxNoise)
    custom = BrownianTreeNoise(3, 1.0, tol=1e-4)
    assert noise_source(None, 4, noise=custom) is custom
    model = mixture().model(gf.VP())
    with pytest.raises(ValueError, match="noise must be one of"):
        gf.sample(model, (4, 2), noise="sobol")
    with pytest.raises(ValueError, match="noise_sampler"):
        gf.sample(model, (4, 2), solver="euler_maruyama", noise="brownian_tree",
                  noise_sampler=lambda s, t: torch.zeros(4, 2))


@pytest.mark.parametrize("process", [gf.VP(), gf.EDM(sigma_max=20.0)], ids=repr)
def test_brownian_tree_samples_barely_move_with_the_step_count(process):
    """Euler–Maruyama at 200 and 400 steps: with the tree both solve the SDE driven by one
    Brownian path (strong convergence), with independent draws they are unrelated samples."""
    model = mixture().model(process)
    dist = {}
    for noise in ("philox", "brownian_tree"):
        a, b = (gf.sample(model, (128, 2), solver="euler_maruyama", steps=steps, noise=noise, generator=0,
                          dtype=torch.float64) for steps in (200, 400))
        dist[noise] = (a - b).norm(dim=1).mean().item()
    assert dist["brownian_tree"] < 0.1 and dist["brownian_tree"] < dist["philox"] / 20, dist
