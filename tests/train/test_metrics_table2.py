"""The Table-2 metric (kl_kde_grid), sliced Wasserstein, and the table2 runner."""
import math

import numpy as np
import pytest
import torch

from genflow.cli import main
from genflow.metrics import kl_kde_grid, sliced_wasserstein
from genflow.train.data import load_dataset
from genflow.train.table2 import PUBLISHED, format_table2, run_table2


@pytest.fixture(scope="module")
def draws():
    return load_dataset("table2", seed=0).data, load_dataset("table2", seed=1).data


def test_kl_kde_grid_identical_sets_score_zero(draws):
    assert kl_kde_grid(draws[0], draws[0]) == pytest.approx(0.0, abs=1e-12)


def test_kl_kde_grid_two_draws_of_the_table2_set_score_about_0_004(draws):
    kl = kl_kde_grid(*draws)
    assert 0.001 < kl < 0.01
    # SciPy's relative reading of "bandwidth 0.4" (0.4 x the data's std, about 0.8 here) is much smoother
    assert kl_kde_grid(*draws, bandwidth=0.8) < kl / 3


def test_kl_kde_grid_shifted_or_collapsed_sets_score_much_larger(draws):
    data, other = draws
    assert kl_kde_grid(data, other + torch.tensor([0.7, 0.0])) > 0.3
    one_mode = data[:250]   # the balanced draw is ordered by component
    assert kl_kde_grid(data, one_mode) > 1.0


def test_kl_kde_grid_matches_sklearn_kernel_density():
    from sklearn.neighbors import KernelDensity

    g = torch.Generator().manual_seed(0)
    p, q = torch.randn(300, 2, generator=g, dtype=torch.float64), 1.3 * torch.randn(200, 2, generator=g, dtype=torch.float64)
    axes = [np.linspace(float(p[:, k].min()), float(p[:, k].max()), 30) for k in range(2)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 2)
    dens = [np.exp(KernelDensity(bandwidth=0.4).fit(s.numpy()).score_samples(grid)) for s in (p, q)]
    dens = [d / d.sum() for d in dens]
    expected = float(np.sum(dens[0] * np.log((dens[0] + 1e-10) / (dens[1] + 1e-10))))
    assert kl_kde_grid(p, q, grid=30) == pytest.approx(expected, rel=1e-9)


def test_kl_kde_grid_rejects_bad_arguments(draws):
    with pytest.raises(ValueError, match="samples"):
        kl_kde_grid(draws[0], torch.zeros(10, 3))
    with pytest.raises(ValueError, match="bandwidth"):
        kl_kde_grid(*draws, bandwidth=0.0)
    with pytest.raises(ValueError, match="grid"):
        kl_kde_grid(*draws, grid=1)
    with pytest.raises(ValueError, match="finite"):
        kl_kde_grid(draws[0], torch.full((5, 2), math.nan))


def test_sliced_wasserstein_is_the_exact_w2_in_1d():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(500, 1, generator=g), 2 + 0.5 * torch.randn(500, 1, generator=g)
    exact = (x.double().sort(0).values - y.double().sort(0).values).square().mean().sqrt()
    assert sliced_wasserstein(x, y, projections=3, generator=0) == pytest.approx(float(exact), rel=1e-12)


def test_sliced_wasserstein_unequal_counts_match_an_exact_transport_plan():
    from scipy.optimize import linprog

    x = np.array([0.0, 1.0, 3.0, 3.5, 7.0])
    y = np.array([0.5, 2.0, 6.0])
    n, m = len(x), len(y)
    cost = (x[:, None] - y[None]) ** 2
    rows = np.kron(np.eye(n), np.ones(m))    # sum_j P_ij = 1/n
    cols = np.kron(np.ones(n), np.eye(m))    # sum_i P_ij = 1/m
    plan = linprog(cost.ravel(), A_eq=np.vstack([rows, cols]),
                   b_eq=np.concatenate([np.full(n, 1 / n), np.full(m, 1 / m)]), bounds=(0, None))
    w2 = math.sqrt(plan.fun)
    got = sliced_wasserstein(torch.tensor(x)[:, None], torch.tensor(y)[:, None], projections=2, generator=1)
    assert got == pytest.approx(w2, rel=1e-9)


def test_sliced_wasserstein_of_a_shift_in_2d(draws):
    data = draws[0]
    shift = torch.tensor([0.6, -0.8])   # |c| = 1: SW_2 = sqrt(E (theta . c)^2) = |c| / sqrt(2)
    assert sliced_wasserstein(data, data + shift, projections=4000, generator=0) == pytest.approx(
        1 / math.sqrt(2), rel=0.03)
    assert sliced_wasserstein(data, data, generator=0) == 0.0
    assert sliced_wasserstein(*draws, generator=0) < 0.15
    with pytest.raises(ValueError, match="dimension"):
        sliced_wasserstein(data, torch.zeros(4, 3))


def test_run_table2_reduced_configuration(tmp_path):
    result = run_table2(quick=True, seeds=(0,), families=("gmm", "gan"), steps=30, out_dir=str(tmp_path),
                        progress=False)
    assert set(result["families"]) == {"gmm", "gan"}
    gmm = result["families"]["gmm"]
    assert gmm["published"] == PUBLISHED["gmm"]
    assert gmm["mean"] < PUBLISHED["gmm"]           # EM on the ring: near the data-vs-data floor
    assert 0.001 < result["floor"]["mean"] < 0.01
    assert math.isfinite(result["families"]["gan"]["mean"])
    assert (tmp_path / "table2.json").exists()
    assert torch.load(tmp_path / "samples.pt", weights_only=True)["gan"].shape == (1, 2000, 2)
    text = format_table2(result)
    assert "GMM" in text and "GAN" in text and "0.0099" in text and "data vs data" in text
    with pytest.raises(ValueError, match="families"):
        run_table2(families=("gmn",))


def test_table2_command_runs_a_subset(tmp_path, capsys):
    args = ["table2", "--quick", "--seeds", "0", "--families", "gmm", "--out", str(tmp_path), "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "GMM" in printed and "VAE" not in printed and (tmp_path / "table2.json").exists()


# Measured (seed 0, KL / published): GMM 0.54, VAE 0.88, RealNVP 2.76, GAN 0.46, diffusion 1.27, flow
# matching 2.33; about 45 s of CPU for the six families.
QUICK_FACTOR = 4.0


def test_quick_preset_is_within_a_factor_of_the_published_table():
    """The CI preset (``genflow table2 --quick``) on one seed: every family's KL < 4x its published figure."""
    result = run_table2(quick=True, seeds=(0,), progress=False)
    assert list(result["families"]) == list(PUBLISHED)
    ratios = {name: run["kl"][0] / run["published"] for name, run in result["families"].items()}
    assert all(ratio < QUICK_FACTOR for ratio in ratios.values()), format_table2(result)
