"""Stochastic solvers: they reproduce the data distribution, and equal their closed-form twins."""
import pytest
import torch

import genflow as gf
from genflow.metrics import mmd

from .references import data_mmd_spread, mixture



@pytest.mark.parametrize("solver", ["euler_maruyama", "ddpm"])
@pytest.mark.parametrize("process", [gf.VP(), gf.EDM(sigma_max=20.0)], ids=repr)
def test_sde_solvers_reproduce_the_mixture(solver, process):
    mix, n = mixture(), 1000
    x = gf.sample(mix.model(process), (n, 2), solver=solver, steps=500, generator=5, dtype=torch.float64)
    data = mix.sample(n, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    assert mmd(x, data) <= data_mmd_spread(mix, n)


def test_ddpm_equals_ddim_with_full_churn():
    model = mixture().model(gf.VP())
    a = gf.sample(model, (64, 2), solver="ddpm", steps=30, generator=11, dtype=torch.float64)
    b = gf.sample(model, (64, 2), solver="ddim", eta=1.0, steps=30, generator=11, dtype=torch.float64)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_euler_maruyama_without_churn_is_euler():
    model = mixture().model(gf.VP())
    a = gf.sample(model, (64, 2), solver="euler_maruyama", eta=0.0, steps=30, generator=11, dtype=torch.float64)
    b = gf.sample(model, (64, 2), solver="euler", steps=30, generator=11, dtype=torch.float64)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("solver", ["euler", "euler_maruyama", "heun", "ddim", "ddpm", "dpmpp_2m"])
def test_per_sample_start_times_equal_separate_solves(solver):
    """Each sample starts at its own noise level (SDEdit-style); with per-sample seeds the batch
    solve equals solving every sample alone."""
    model = mixture().model(gf.VP())
    t_start = torch.tensor([1.0, 0.6, 0.3, 0.15])
    x_T = torch.randn(4, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    seeds = [3, 5, 7, 9]
    batch = gf.sample(model, x_T=x_T, solver=solver, steps=12, t_start=t_start, generator=seeds)
    for b in range(4):
        alone = gf.sample(model, x_T=x_T[b:b + 1], solver=solver, steps=12, t_start=float(t_start[b]),
                          generator=[seeds[b]])
        torch.testing.assert_close(batch[b:b + 1], alone, rtol=1e-10, atol=1e-10)


def test_ddpm_large_variance_differs_but_still_samples():
    model, mix = mixture().model(gf.VP()), mixture()
    small = gf.sample(model, (500, 2), solver="ddpm", steps=200, generator=1, dtype=torch.float64)
    large = gf.sample(model, (500, 2), solver="ddpm", steps=200, generator=1, dtype=torch.float64, variance="large")
    assert not torch.allclose(small, large)
    data = mix.sample(500, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    assert mmd(large, data) <= 3 * data_mmd_spread(mix, 500)
    with pytest.raises(ValueError, match="variance"):
        gf.sample(model, (4, 2), solver="ddpm", variance="medium")
