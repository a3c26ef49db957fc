"""Training data sets: toy sets, mixtures, digits and user data."""
import math

import numpy as np
import pytest
import torch

import genflow as gf
from genflow.train import Dataset, TOY_SETS, available_datasets, load_dataset, toy_sample

TOYS = sorted(TOY_SETS)


def _radius(x):
    return x.double().norm(dim=1)


# per set: a check of its shape in the plane, on 10000 points
CHECKS = {
    "8gaussians": lambda x, y: abs(_radius(x).mean() - 4 / math.sqrt(2)) < 0.1,
    "25gaussians": lambda x, y: ((x - x.round()).double().std() - 0.1).abs() < 0.01 and x.abs().max() < 2.6,
    "moons": lambda x, y: abs(x[y == 0, 1].mean() - x[y == 1, 1].mean()) > 1.0,
    "circles": lambda x, y: abs(_radius(x[y == 0]).mean() - 2) < 0.02 and abs(_radius(x[y == 1]).mean() - 1) < 0.02,
    "swissroll": lambda x, y: 0.7 < _radius(x).min() and _radius(x).max() < 3.3,
    "checkerboard": lambda x, y: bool((torch.floor((x + 4) / 2).sum(1) % 2 == 0).all()),
    "pinwheel": lambda x, y: abs(_radius(x).mean() - 2.0) < 0.15 and y.unique().numel() == 5,
    "spirals": lambda x, y: _radius(x).max() < math.pi + 0.5 and _radius(x).mean() > 1.5,
    "table2": lambda x, y: abs(_radius(x).mean() - 4 / math.sqrt(2)) < 0.1,
}


@pytest.mark.parametrize("name", TOYS)
def test_toy_sets(name):
    ds = load_dataset(name, n=10000 if name != "table2" else 2000, seed=1)
    assert isinstance(ds, Dataset) and ds.data.shape == (len(ds), 2) and ds.data_shape == (2,)
    assert ds.data.dtype == torch.float32 and torch.isfinite(ds.data).all()
    assert abs(ds.data.mean()) < 0.5 and 0.5 < ds.data.std() < 3  # roughly centred and scaled
    again, other = load_dataset(name, seed=1, n=len(ds)), load_dataset(name, seed=2, n=len(ds))
    assert torch.equal(again.data, ds.data) and not torch.equal(other.data, ds.data)
    x, y = toy_sample(name, 10000 if name != "table2" else 2000, generator=torch.Generator().manual_seed(0))
    assert CHECKS[name](x, y)
    if y is not None:
        assert y.shape == (x.shape[0],) and y.dtype == torch.int64


def test_table2_is_seed_003s_set():
    ds = load_dataset("table2", seed=0)
    assert ds.data.shape == (2000, 2) and torch.equal(torch.bincount(ds.labels), torch.full((8,), 250))
    for k in range(8):
        pts = ds.data[ds.labels == k].double()
        angle = torch.tensor(k * math.pi / 4, dtype=torch.float64)
        mean = torch.stack([torch.cos(angle), torch.sin(angle)]) * 4 / math.sqrt(2)
        assert (pts.mean(0) - mean).norm() < 0.06
        torch.testing.assert_close(torch.cov(pts.T), 0.1 * torch.eye(2, dtype=torch.float64), atol=0.035, rtol=0)
    assert ds.mixture is not None and ds.mixture.num_components == 8
    with pytest.raises(ValueError, match="multiple of 8"):
        load_dataset("table2", n=1001)


def test_infinite_sampling_and_fixed_draws():
    ds = load_dataset("moons", n=100, seed=0)
    g = torch.Generator().manual_seed(5)
    fresh = ds.sample(300, generator=g)
    assert fresh.shape == (300, 2) and not any(torch.equal(row, ds.data[0]) for row in fresh)
    x, y = ds.batch(50, generator=torch.Generator().manual_seed(5))  # resamples the fixed draw
    assert all(any(torch.equal(row, d) for d in ds.data) for row in x[:5]) and y.shape == (50,)
    inf = load_dataset("moons", n=100, seed=0, infinite=True)
    a, _ = inf.batch(50, generator=torch.Generator().manual_seed(5))
    b, _ = inf.batch(50, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and not any(torch.equal(row, d) for row in a[:5] for d in ds.data)


def test_gaussian_mixture_source():
    gm = gf.GaussianMixture([[0.0, 0.0, 0.0], [5.0, 5.0, 5.0]], 0.5)
    ds = load_dataset(gm, n=4000, seed=3)
    assert ds.data.shape == (4000, 3) and ds.mixture is gm
    assert torch.equal(ds.data, load_dataset(gm, n=4000, seed=3).data)
    assert abs(ds.data.mean() - 2.5) < 0.2
    assert ds.sample(7, generator=torch.Generator().manual_seed(0)).shape == (7, 3)


def test_digits():
    ds = load_dataset("digits")
    assert ds.data.shape == (1797, 1, 8, 8) and ds.data_shape == (1, 8, 8)
    assert ds.data.min() == -1 and ds.data.max() == 1 and ds.num_classes == 10
    assert ds.labels.shape == (1797,)
    sub = load_dataset("digits", n=100, seed=4)
    assert sub.data.shape == (100, 1, 8, 8) and torch.equal(sub.data, load_dataset("digits", n=100, seed=4).data)
    with pytest.raises(ValueError, match="infinite"):
        load_dataset("digits", infinite=True)


def test_user_data(tmp_path):
    arr = np.random.default_rng(0).normal(size=(50, 4))
    labels = np.arange(50) % 3
    from_np = load_dataset(arr, labels=labels)
    from_tensor = load_dataset(torch.from_numpy(arr))
    np.save(tmp_path / "points.npy", arr)
    np.savez(tmp_path / "points.npz", x=arr, labels=labels)
    from_npy, from_npz = load_dataset(tmp_path / "points.npy"), load_dataset(str(tmp_path / "points.npz"))
    for ds in (from_np, from_tensor, from_npy, from_npz):
        assert ds.data.shape == (50, 4) and ds.data.dtype == torch.float32
        assert torch.equal(ds.data, torch.from_numpy(arr).float())
    assert from_npy.name == "points" and torch.equal(from_npz.labels, torch.from_numpy(labels))
    assert from_np.num_classes == 3 and from_tensor.labels is None
    assert load_dataset(torch.arange(5.0)).data.shape == (5, 1)
    assert load_dataset(from_np) is from_np
    with pytest.raises(ValueError, match="labels"):
        load_dataset(arr, labels=np.arange(49))
    with pytest.raises(ValueError, match="n applies"):
        load_dataset(arr, n=10)
    with pytest.raises(ValueError, match="does not exist"):
        load_dataset(tmp_path / "missing.npy")
    with pytest.raises(TypeError, match="got dict"):
        load_dataset({"x": arr})


@pytest.mark.parametrize("typo, suggestion", [("moon", "moons"), ("8gausians", "8gaussians"), ("digit", "digits"),
                                              ("swiss_rol", "swissroll"), ("checker_board", None)])
def test_unknown_names_suggest(typo, suggestion):
    if suggestion is None:  # a spelling variant of a known name is accepted
        assert load_dataset(typo, n=8).name == "checkerboard"
        return
    with pytest.raises(ValueError, match=f"did you mean '{suggestion}'"):
        load_dataset(typo)
    assert suggestion in available_datasets()
