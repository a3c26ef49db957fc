"""Training networks: shapes, per-sample independence, class conditioning."""
import pytest
import torch

from genflow.train import MLP, UNet, time_embedding


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _independent(net, x, t, labels=None):
    """Changing rows 1.. of the input leaves row 0 of the output unchanged (and changes the rest).

    In float64, so that batch-size-dependent rounding of the convolutions stays far below the tolerance."""
    net, x, t = net.double(), x.double(), t.double()
    out = net(x, t, labels)
    x2 = x.clone()
    x2[1:] = torch.randn_like(x2[1:]) * 3
    t2 = t.clone()
    t2[1:] = torch.rand_like(t2[1:])
    out2 = net(x2, t2, labels)
    torch.testing.assert_close(out2[:1], out[:1], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(out2[1:], out[1:])
    single = net(x[:1], t[:1], None if labels is None else labels[:1])
    torch.testing.assert_close(single, out[:1], rtol=1e-12, atol=1e-12)


def test_time_embedding():
    t = torch.tensor([0.0, 0.5, 1.0])
    emb = time_embedding(t, 8)
    assert emb.shape == (3, 8)
    torch.testing.assert_close(emb[0], torch.tensor([0.0] * 4 + [1.0] * 4))
    torch.testing.assert_close(emb[2, 0], torch.sin(torch.tensor(1000.0)))   # w_0 = 1, s = 1000 t
    torch.testing.assert_close(time_embedding(torch.tensor([2.0]), 8, time="log")[0, 0],
                               torch.sin(250 * torch.log(torch.tensor(2.0))))
    with pytest.raises(ValueError, match="time"):
        time_embedding(t, 8, time="exp")


@pytest.mark.parametrize("num_classes", [None, 4])
def test_mlp(num_classes):
    torch.manual_seed(0)
    net = MLP(3, hidden=32, layers=2, time_dim=16, num_classes=num_classes)
    x, t = torch.randn(6, 3), torch.rand(6)
    labels = None if num_classes is None else torch.tensor([0, 1, 2, 3, -1, -1])
    assert net(x, t, labels).shape == (6, 3)
    assert net(x, 0.5, labels).shape == (6, 3)  # a scalar time is broadcast
    _independent(net, x, t, labels)


def test_class_conditioning_and_null_label():
    torch.manual_seed(0)
    net = MLP(2, hidden=32, layers=2, time_dim=16, num_classes=3)
    x, t = torch.randn(4, 2).repeat(2, 1), torch.rand(4).repeat(2)
    out = net(x, t, torch.tensor([0, 1, 2, -1, 1, 1, 1, 1]))
    assert not torch.allclose(out[0], out[4]) and not torch.allclose(out[3], out[7])  # the label matters
    torch.testing.assert_close(net(x, t), net(x, t, torch.full((8,), -1)))  # no labels = the null label
    assert net.cond.label_emb.weight.shape == (4, 32)  # 3 classes + the learned null embedding
    with pytest.raises(ValueError, match="labels must be in"):
        net(x, t, torch.full((8,), 3))
    with pytest.raises(ValueError, match="num_classes=None"):
        MLP(2, hidden=8)(x, t, torch.zeros(8, dtype=torch.long))


@pytest.mark.parametrize("size, mults, channels", [(8, (1, 2), 1), (16, (1, 2, 2), 1), (32, (1, 2, 2), 3)])
def test_unet_sizes(size, mults, channels):
    torch.manual_seed(0)
    net = UNet(channels=channels, image_size=size, base=8, mults=mults, num_classes=10, attention=(size == 16))
    x, t = torch.randn(3, channels, size, size), torch.rand(3)
    labels = torch.tensor([1, -1, 9])
    out = net(x, t, labels)
    assert out.shape == x.shape and torch.isfinite(out).all()
    _independent(net, x, t, labels)


def test_unet_gradients_and_errors():
    torch.manual_seed(0)
    net = UNet(channels=1, image_size=8, base=8, blocks=2)
    x = torch.randn(2, 1, 8, 8)
    net(x, torch.rand(2)).pow(2).mean().backward()
    assert all(p.grad is not None for p in net.parameters())
    with pytest.raises(ValueError, match="divisible"):
        UNet(image_size=10, mults=(1, 2, 2))
    with pytest.raises(ValueError, match="shape"):
        net(torch.randn(2, 3, 8, 8), torch.rand(2))
    with pytest.raises(ValueError, match="base"):
        UNet(base=0)
