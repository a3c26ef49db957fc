"""The sdflow family: its loss is the SD-flow regression of genflow.train_sd_generator (dense
float64 check of the moved targets), it is independent of how a batch is split, and a short
Trainer run brings its samples much closer to the data."""
import pytest
import torch

import genflow as gf
from genflow.train import TrainConfig, load_dataset, make_family, train
from genflow.train.objectives import draw_normal


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _dense_mean(z, x, sigma):
    w = torch.softmax(-torch.cdist(z, x).square() / (2 * sigma ** 2), dim=1)
    return w @ x


@pytest.mark.parametrize("denoiser_q", ["kernel", "identity"])
def test_loss_is_the_sd_flow_regression(denoiser_q):
    torch.manual_seed(0)
    fam = make_family("sdflow", data_shape=(2,), sigma=0.7, inner_steps=2, step_size=0.3, denoiser_q=denoiser_q,
                      hidden=16, depth=2)
    fam.modules.double()
    batch = torch.randn(40, 2, dtype=torch.float64) * 2
    seeds = torch.arange(40, dtype=torch.int64) + 100
    got = fam.loss("main", batch, seeds=seeds)
    eps = draw_normal((40, 2), seeds, 0, dtype=torch.float64)
    fake = fam.modules["generator"](eps)
    y = fake.detach()
    for k in range(2):
        z = y + 0.7 * draw_normal((40, 2), seeds, 1 + k, dtype=torch.float64)
        d_q = y if denoiser_q == "identity" else _dense_mean(z, y, 0.7)
        y = y + (0.3 / 0.49) * (_dense_mean(z, batch, 0.7) - d_q)
    torch.testing.assert_close(got, (fake - y).square().sum(1).mean(), rtol=1e-10, atol=1e-12)
    got.backward()
    assert all(p.grad is not None for p in fam.modules.parameters())


def test_training_brings_samples_to_the_data():
    data = load_dataset("8gaussians", n=2048, seed=0)
    torch.manual_seed(0)
    fam = make_family("sdflow", data_shape=(2,), sigma=0.5, hidden=64)
    truth = data.data[:500]
    before = gf.metrics.mmd(fam.sample(500, generator=1), truth)
    train(fam, data, TrainConfig(steps=150, batch_size=256, lr=3e-3, ema=None, seed=0), progress=False)
    after = gf.metrics.mmd(fam.sample(500, generator=1), truth)
    assert after < 0.2 * before, (before, after)


@pytest.mark.parametrize("options, message", [
    ({"data_shape": (1, 8, 8)}, "generates vectors"),
    ({"data_shape": (2,), "sigma": 0.0}, "sigma"),
    ({"data_shape": (2,), "denoiser_q": "kernal"}, "kernel"),
    ({"data_shape": (2,), "num_classes": 3}, "unconditional"),
])
def test_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        make_family("sdflow", **options)
