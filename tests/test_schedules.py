"""Time grids: endpoints, monotonicity, their defining spacing against independent float64
references of the published formulas and tables (k-diffusion's get_sigmas_* where they exist),
DiscreteVP rounding, per-sample grids, gf.sample, bad input."""
import math

import numpy as np
import pytest
import scipy.stats
import torch

import genflow as gf
from genflow.schedules import AYS_NOISE_LEVELS, SCHEDULES, Schedule, get_schedule, time_grid, validate_grid
from tests.peers import k_diffusion_sampling

PROCESSES = [gf.VP(), gf.SubVP(), gf.VE(), gf.CosineVP(), gf.EDM(), gf.LinearPath(), gf.DiscreteVP.linear()]


@pytest.mark.parametrize("process", PROCESSES, ids=repr)
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_grids_are_decreasing_with_exact_endpoints(process, schedule):
    ts = time_grid(process, 17, schedule)
    assert ts.dim() == 1 and ts.dtype == torch.float64
    assert ts[-1].item() == process.t_min and (ts[1:] < ts[:-1]).all()
    if schedule == "ddim_uniform":  # DDIM's uniform skip starts at the knot 1 + k (N // steps) below T
        assert ts.shape == (19,) and ts[0].item() < process.T
    else:
        assert ts[0].item() == process.T
    if schedule not in ("ddim_uniform", "align_your_steps", "laplace"):  # the last two drop clamped repeats
        assert ts.shape == (18,)


@pytest.mark.parametrize("process", PROCESSES, ids=repr)
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_one_step_grids(process, schedule):
    ts = time_grid(process, 1, schedule)
    assert ts.shape == (2,) and ts[-1].item() == process.t_min and ts[0] > ts[1]
    if schedule != "ddim_uniform":  # its one step starts at the knot 1 (DDIM's "leading" spacing)
        assert ts[0].item() == process.T


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


# ---------------------------------------------------------------- the new schedules against references

def _noise_levels(process, ts):
    """``s = sigma/alpha`` at the times ``ts`` (float64)."""
    return process.sigma(ts) / process.alpha(ts)


EDM, SD = gf.EDM(), gf.DiscreteVP.scaled_linear(dtype=torch.float64)


@pytest.mark.parametrize("process", [EDM, SD], ids=["EDM", "SD"])
@pytest.mark.parametrize("steps", [1, 2, 7, 20])
@pytest.mark.parametrize("name, options, peer", [
    ("karras", {}, "get_sigmas_karras"), ("karras", {"rho": 3.5}, "get_sigmas_karras"),
    ("exponential", {}, "get_sigmas_exponential"), ("polyexponential", {}, "get_sigmas_polyexponential"),
    ("polyexponential", {"rho": 2.0}, "get_sigmas_polyexponential")])
def test_noise_schedules_equal_k_diffusion_in_float64(process, steps, name, options, peer):
    k_sampling = k_diffusion_sampling()
    s = _noise_levels(process, time_grid(process, steps, name, **options))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # k-diffusion builds its ramp in the default dtype
    try:
        expected = getattr(k_sampling, peer)(steps + 1, float(s[-1]), float(s[0]), **options)[:-1]
    finally:
        torch.set_default_dtype(previous)
    torch.testing.assert_close(s, expected, rtol=1e-12, atol=0)


def test_exponential_is_logsnr_and_sgm_uniform_is_uniform():
    for process in (EDM, SD, gf.VP()):
        assert torch.equal(time_grid(process, 9, "exponential"), time_grid(process, 9, "logsnr"))
        assert torch.equal(time_grid(process, 9, "sgm_uniform"), time_grid(process, 9, "uniform"))


@pytest.mark.parametrize("steps", [1, 6, 13])
def test_kl_optimal_is_linear_in_arctan_sigma(steps):
    s = _noise_levels(EDM, time_grid(EDM, steps, "kl_optimal")).numpy()
    u = np.arange(steps + 1) / steps
    expected = np.tan((1 - u) * np.arctan(80.0) + u * np.arctan(0.002))
    np.testing.assert_allclose(s, expected, rtol=1e-12)


@pytest.mark.parametrize("mu, beta", [(0.0, 0.5), (-0.4, 1.0)])
def test_laplace_follows_hang_et_al_quantiles(mu, beta):
    steps = 15
    s = _noise_levels(EDM, time_grid(EDM, steps, "laplace", mu=mu, beta=beta)).numpy()
    x = np.linspace(0.0, 1.0, steps + 1)
    expected = np.exp(mu - beta * np.sign(0.5 - x) * np.log(1 - 2 * np.abs(0.5 - x) + 1e-5))
    expected = np.clip(expected, 0.002, 80.0)
    expected = expected[np.concatenate([[True], np.diff(expected) != 0])]  # clamped repeats dropped
    expected[0], expected[-1] = 80.0, 0.002
    np.testing.assert_allclose(s, expected, rtol=1e-12)


@pytest.mark.parametrize("model", ["sd15", "sdxl"])
def test_align_your_steps_is_the_published_table_at_10_steps_and_log_linear_between(model):
    table = np.array(AYS_NOISE_LEVELS[model])
    s = _noise_levels(SD, time_grid(SD, 10, "align_your_steps", model_type=model)).numpy()
    np.testing.assert_allclose(s[1:-1], table[1:-1], rtol=1e-12)
    np.testing.assert_allclose(s[[0, -1]], table[[0, -1]], rtol=1e-6)  # the ends are SD's own range
    s20 = _noise_levels(SD, time_grid(SD, 20, "align_your_steps", model_type=model)).numpy()
    np.testing.assert_allclose(s20[2:-2:2], table[1:-1], rtol=1e-12)
    np.testing.assert_allclose(s20[1:-1:2], np.sqrt(table[:-1] * table[1:]), rtol=1e-12)  # log-linear midpoints
    s5 = _noise_levels(SD, time_grid(SD, 5, "align_your_steps", model_type=model)).numpy()
    np.testing.assert_allclose(s5[1:-1], table[2:-2:2], rtol=1e-12)


def test_align_your_steps_svd_is_clamped_to_the_process():
    s = _noise_levels(EDM, time_grid(EDM, 10, "align_your_steps", model_type="svd")).numpy()
    np.testing.assert_allclose(s, [80.0, *AYS_NOISE_LEVELS["svd"][1:]], rtol=1e-12)


def test_beta_is_the_beta_quantile_in_time_and_rounds_on_a_discrete_vp():
    steps, a, b = 9, 0.5, 0.7
    ts = time_grid(EDM, steps, "beta", alpha=a, beta=b)
    ppf = scipy.stats.beta.ppf(1 - np.arange(steps + 1) / steps, a, b)
    np.testing.assert_allclose(ts.numpy(), 0.002 + ppf * (80.0 - 0.002), rtol=1e-13)
    # ComfyUI on the 1000-entry table: index rint(ppf (N - 1)) for i < steps, then (in place of its
    # sigma 0) the bottom entry t_end; repeats dropped
    for steps in (30, 300):
        index = list(np.rint(scipy.stats.beta.ppf(1 - np.arange(steps) / steps, 0.6, 0.6) * 999)) + [0]
        index = [int(i) for k, i in enumerate(index) if k == 0 or i != index[k - 1]]
        expected = (np.array(index) + 1) / 1000
        np.testing.assert_array_equal(time_grid(SD, steps, "beta").numpy(), expected)
    assert len(expected) < steps + 1  # at 300 steps the table's rounding merged steps, as in ComfyUI
    continuous = time_grid(SD, steps, "beta", discrete=False)
    assert continuous.shape == (steps + 1,) and not torch.equal(continuous, torch.from_numpy(expected))


@pytest.mark.parametrize("steps", [1, 3, 7, 20, 999])
def test_simple_and_ddim_uniform_pick_comfyui_table_entries(steps):
    n = 1000
    simple = [n - 1 - int(x * (n / steps)) for x in range(steps)] + [0]
    np.testing.assert_array_equal(time_grid(SD, steps, "simple").numpy(), (np.array(simple) + 1) / n)
    stride = max(n // steps, 1)
    ddim = list(range(1, n, stride))[::-1] + [0]
    np.testing.assert_array_equal(time_grid(SD, steps, "ddim_uniform").numpy(), (np.array(ddim) + 1) / n)
    # on a continuous process: the same knots, evenly spread from t_end to t_start
    knots = 0.002 + np.array(simple, dtype=np.float64) / (n - 1) * (80.0 - 0.002)
    np.testing.assert_allclose(time_grid(EDM, steps, "simple").numpy(), knots, rtol=1e-14)


def _mochi(steps, threshold, linear):
    """Genmo's linear-quadratic sigma schedule as the paper's code writes it (lists, float64)."""
    linear_part = [i * threshold / linear for i in range(linear)]
    diff = linear - threshold * steps
    quadratic_steps = steps - linear
    a = diff / (linear * quadratic_steps ** 2)
    b = threshold / linear - 2 * diff / (quadratic_steps ** 2)
    quadratic = [a * i ** 2 + b * i + a * linear ** 2 for i in range(linear, steps)]
    return [1.0 - x for x in linear_part + quadratic + [1.0]]


@pytest.mark.parametrize("steps, options, linear", [(1, {}, None), (2, {}, 1), (9, {}, 4), (30, {}, 15),
                                                    (12, {"threshold_noise": 0.1, "linear_steps": 8}, 8)])
def test_linear_quadratic_follows_mochi(steps, options, linear):
    ts = time_grid(gf.LinearPath(), steps, "linear_quadratic", **options)
    expected = [1.0, 0.0] if steps == 1 else _mochi(steps, options.get("threshold_noise", 0.025), linear)
    np.testing.assert_allclose(ts.numpy(), expected, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("name", ["karras", "kl_optimal", "laplace", "polyexponential"])
def test_discrete_true_rounds_to_training_timesteps(name):
    ts = time_grid(SD, 12, name, discrete=True)
    index = ts * 1000 - 1
    assert torch.equal(index, torch.round(index)) and (ts[1:] < ts[:-1]).all()
    continuous = time_grid(SD, 12, name)
    expected = torch.unique_consecutive((torch.round(continuous * 1000 - 1) + 1) / 1000)
    assert torch.equal(ts, expected)


@pytest.mark.parametrize("name", ["kl_optimal", "beta", "linear_quadratic", "polyexponential", "simple"])
def test_per_sample_endpoints_give_one_column_per_sample_for_new_schedules(name):
    t_start = torch.tensor([80.0, 20.0, 3.0])
    ts = time_grid(EDM, 10, name, t_start=t_start)
    assert ts.shape[1] == 3
    for b in range(3):
        torch.testing.assert_close(ts[:, b], time_grid(EDM, 10, name, t_start=float(t_start[b])), rtol=1e-14, atol=0)


def test_per_sample_grids_whose_clamped_levels_repeat_raise():
    with pytest.raises(ValueError, match="per-sample grids cannot drop repeats"):
        time_grid(EDM, 10, "align_your_steps", t_start=torch.tensor([80.0, 3.0]))


def test_gf_sample_reaches_schedules_by_name_options_and_instance():
    model = gf.GaussianMixture.ring().model(gf.VP())
    x_T = torch.randn(4, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grid = time_grid(model.process, 8, "beta", alpha=0.4, beta=0.9)
    by_grid = gf.sample(model, x_T=x_T, solver="euler", schedule=grid.clone())
    by_name = gf.sample(model, x_T=x_T, solver="euler", steps=8, schedule="beta", alpha=0.4, beta=0.9)
    by_instance = gf.sample(model, x_T=x_T, solver="euler", steps=8, schedule=get_schedule("beta", alpha=0.4, beta=0.9))
    assert torch.equal(by_name, by_grid) and torch.equal(by_instance, by_grid)
    assert not torch.equal(gf.sample(model, x_T=x_T, solver="euler", steps=8, schedule="beta"), by_grid)
    with pytest.raises(TypeError, match="rho"):
        gf.sample(model, x_T=x_T, solver="euler", steps=8, schedule="logsnr", rho=3.0)


def test_registry_and_bad_options_are_named():
    assert set(SCHEDULES) >= {"karras", "exponential", "polyexponential", "beta", "laplace", "align_your_steps",
                              "kl_optimal", "linear_quadratic", "sgm_uniform", "simple", "ddim_uniform",
                              "uniform", "quadratic", "logsnr", "cosine"}
    assert all(isinstance(get_schedule(name), Schedule) and get_schedule(name).name == name for name in SCHEDULES)
    process = gf.VP()
    with pytest.raises(ValueError, match="did you mean 'kl_optimal'"):
        time_grid(process, 5, "kl_optimel")
    with pytest.raises(TypeError, match="'rh' is not an option of the 'karras' schedule.*did you mean 'rho'"):
        time_grid(process, 5, "karras", rh=5)
    with pytest.raises(ValueError, match="rho"):
        time_grid(process, 5, "polyexponential", rho=0.0)
    with pytest.raises(TypeError, match="alpha"):
        time_grid(process, 5, "beta", alpha="0.5")
    with pytest.raises(ValueError, match="beta"):
        time_grid(process, 5, "laplace", beta=-1.0)
    with pytest.raises(ValueError, match="model_type.*did you mean 'sdxl'"):
        time_grid(process, 5, "align_your_steps", model_type="sdx")
    with pytest.raises(ValueError, match="linear_steps must be < steps"):
        time_grid(process, 5, "linear_quadratic", linear_steps=5)
    with pytest.raises(ValueError, match="threshold_noise"):
        time_grid(process, 5, "linear_quadratic", threshold_noise=1.5)
    with pytest.raises(ValueError, match="num_train_timesteps=500 conflicts"):
        time_grid(SD, 5, "simple", num_train_timesteps=500)
    with pytest.raises(ValueError, match="discrete=True"):
        time_grid(process, 5, "karras", discrete=True)
    with pytest.raises(TypeError, match="discrete"):
        time_grid(process, 5, "karras", discrete="yes")
    with pytest.raises(TypeError, match="constructor"):
        time_grid(process, 5, get_schedule("karras"), rho=3.0)
