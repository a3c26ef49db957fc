"""Time grids: endpoints, monotonicity, their defining spacing, per-sample grids, bad input."""
import math

import pytest
import torch

import genflow as gf
from genflow.schedules import SCHEDULES, time_grid, validate_grid

PROCESSES = [gf.VP(), gf.SubVP(), gf.VE(), gf.CosineVP(), gf.EDM(), gf.LinearPath(), gf.DiscreteVP.linear()]


@pytest.mark.parametrize("process", PROCESSES, ids=repr)
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_grids_are_decreasing_with_exact_endpoints(process, schedule):
    ts = time_grid(process, 17, schedule)
    assert ts.shape == (18,) and ts.dtype == torch.float64
    assert ts[0].item() == process.T and ts[-1].item() == process.t_min
    assert (ts[1:] < ts[:-1]).all()


def test_logsnr_grid_is_uniform_in_log_snr():
    process = gf.VP()
    lam = process.log_snr(time_grid(process, 10, "logsnr"))
    torch.testing.assert_close(lam.diff(), torch.full((10,), (lam[-1] - lam[0]).item() / 10, dtype=torch.float64), rtol=1e-9, atol=1e-9)


def test_karras_grid_matches_the_edm_formula():
    process, rho, n = gf.EDM(), 7.0, 12
    ramp = torch.linspace(0, 1, n + 1, dtype=torch.float64)
    smax, smin = 80.0 ** (1 / rho), 0.002 ** (1 / rho)
    expected = (smax + ramp * (smin - smax)) ** rho
    torch.testing.assert_close(time_grid(process, n, "karras"), expected, rtol=1e-12, atol=1e-12)


def test_quadratic_and_uniform_spacing():
    process = gf.VP()
    ts = time_grid(process, 4, "uniform", t_start=1.0, t_end=0.2)
    torch.testing.assert_close(ts, torch.tensor([1.0, 0.8, 0.6, 0.4, 0.2], dtype=torch.float64))
    ts = time_grid(process, 2, "quadratic", t_start=1.0, t_end=0.0)
    torch.testing.assert_close(ts, torch.tensor([1.0, 0.25, 0.0], dtype=torch.float64))


def test_cosine_grid_follows_the_cosine_schedule_log_snr():
    process = gf.VP()
    ts = time_grid(process, 8, "cosine")
    lam = process.log_snr(ts)
    w = 2 / math.pi * torch.atan(torch.exp(-lam / 2))
    torch.testing.assert_close(w.diff(), torch.full((8,), (w[-1] - w[0]).item() / 8, dtype=torch.float64), rtol=1e-9, atol=1e-9)


def test_per_sample_endpoints_give_one_column_per_sample():
    process = gf.VP()
    t_start = torch.tensor([1.0, 0.5, 0.3])
    ts = time_grid(process, 5, "logsnr", t_start=t_start)
    assert ts.shape == (6, 3)
    for b in range(3):
        torch.testing.assert_close(ts[:, b], time_grid(process, 5, "logsnr", t_start=float(t_start[b])))


def test_bad_grids_raise():
    process = gf.VP()
    with pytest.raises(ValueError, match="steps"):
        time_grid(process, 0)
    with pytest.raises(TypeError, match="steps"):
        time_grid(process, 2.5)
    with pytest.raises(ValueError, match="did you mean 'karras'"):
        time_grid(process, 5, "karas")
    with pytest.raises(ValueError, match="t_end must be < t_start"):
        time_grid(process, 5, t_start=0.5, t_end=0.5)
    with pytest.raises(ValueError, match="T="):
        time_grid(process, 5, t_start=2.0)
    with pytest.raises(ValueError, match="strictly decreasing"):
        validate_grid([1.0, 0.5, 0.7], process)
