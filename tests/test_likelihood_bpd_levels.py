"""gf.bits_per_dim(levels=...) for data quantised to other than 256 levels, against closed forms."""
import math

import pytest
import torch

import genflow as gf


def _mixture(dim, k, seed, std=0.3):
    g = torch.Generator().manual_seed(seed)
    means = torch.rand(k, dim, generator=g, dtype=torch.float64) * 1.6 - 0.8
    stds = 0.2 + std * torch.rand(k, generator=g, dtype=torch.float64)
    return gf.GaussianMixture(means, stds, torch.full((k,), 1.0 / k, dtype=torch.float64))


@pytest.mark.parametrize("levels", [17, 2])
def test_bits_per_dim_levels_matches_closed_form(levels):
    dim = 16
    gm = _mixture(dim, 3, seed=5)
    process = gf.VP()
    model = gm.model(process)
    y = gm.sample(4, generator=torch.Generator().manual_seed(2)).double()
    x = ((y + 1) / 2 * levels).floor().clamp(0, levels - 1).to(torch.int64)
    bpd, info = gf.bits_per_dim(model, x, generator=3, method="exact", dtype=torch.float64, levels=levels,
                                rtol=1e-6, atol=1e-6, return_info=True)
    u = (info["y"] + 1) / 2 * levels - x.double()  # the dequantisation noise it used
    assert ((u >= 0) & (u < 1)).all()
    want = -(gm.log_prob_t(info["y"], process.t_min, process) + dim * math.log(2 / levels)) / (dim * math.log(2))
    assert (bpd - want).abs().max() < 2e-3
    # the 256-level formula on the same y would be off by log2(256 / levels) bits per dimension
    assert (bpd - want - math.log2(256 / levels)).abs().min() > 0.5


def test_levels_256_is_the_default():
    gm = _mixture(4, 2, seed=1)
    model = gm.model(gf.VP())
    x = torch.tensor([[0, 17, 128, 255], [3, 200, 64, 90]], dtype=torch.uint8)
    u = torch.rand(2, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    default = gf.bits_per_dim(model, x, dequantization=u, method="exact", dtype=torch.float64)
    explicit = gf.bits_per_dim(model, x, dequantization=u, method="exact", dtype=torch.float64, levels=256)
    torch.testing.assert_close(default, explicit, rtol=0, atol=0)


def test_levels_argument_errors():
    model = _mixture(2, 2, seed=0).model(gf.VP())
    with pytest.raises(ValueError, match=r"integer pixel values in \[0, 16\]"):
        gf.bits_per_dim(model, torch.tensor([[0, 17]]), levels=17)
    for bad in (1, 2.5, True, "17"):
        with pytest.raises(ValueError, match="levels must be an int >= 2"):
            gf.bits_per_dim(model, torch.tensor([[0, 1]]), levels=bad)
