"""The sampler zoo's newer members against independent float64 transcriptions of their published
formulas (SEEDS-1, exponential Heun, Heun++, Restart, LCM, TCD; ComfyUI is not installed, so its
``sample_heunpp2``/``sample_exp_heun_2_x0``/``sample_lcm`` are transcribed from their equations) with
the same supplied noise, their deterministic twins, the mixture reproduced, ``ald``'s default, and
bad arguments."""
import math

import numpy as np
import pytest
import torch

import genflow as gf
from genflow.metrics import kl_to_density, mmd
from genflow.solvers import get

from .references import data_mmd_spread, fit_order, mixture
from .test_order import SCHEDULE, order_problem

EDM = gf.EDM(sigma_max=20.0)


def _edm_problem(steps, batch=5, seed=4):
    model = mixture().model(EDM)
    x_T = 20.0 * torch.randn(batch, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    ts = gf.schedules.time_grid(EDM, steps, "karras", EDM.T, EDM.t_min).to(torch.float64)
    return model, x_T, ts, lambda x, s: model.predict(x, torch.full((x.shape[0],), s, dtype=torch.float64), "x0")


def _draws(n, batch=5):
    g = torch.Generator().manual_seed(8)
    return [torch.randn(batch, 2, generator=g, dtype=torch.float64) for _ in range(n)]


def _supplied(draws):
    supply = iter(draws)
    return lambda sigma, sigma_next: next(supply)


# ---------------------------------------------------------------- SEEDS-1 and exponential Heun

def _seeds_1_reference(denoise, x, sigmas, noise, eta):
    """SEEDS-1 on EDM (alpha = 1, lambda = -log sigma), float64."""
    for s, t in zip(sigmas[:-1], sigmas[1:]):
        d = denoise(x, s)
        if t == 0:
            return d
        h = math.log(s / t)
        x = t / s * math.exp(-eta * h) * x - math.expm1(-(1 + eta) * h) * d
        if eta > 0:
            x = x + t * math.sqrt(-math.expm1(-2 * eta * h)) * noise()
    return x


@pytest.mark.parametrize("eta", [1.0, 0.5, 0.0])
def test_seeds_1_equals_its_formula(eta):
    model, x_T, ts, denoise = _edm_problem(6)
    draws = _draws(6)
    ours = gf.sample(model, x_T=x_T, solver="seeds_1", schedule=ts, eta=eta, noise_sampler=_supplied(draws))
    supply = iter(draws)
    ref = _seeds_1_reference(denoise, x_T.clone(), ts.tolist(), lambda: next(supply), eta)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


def test_seeds_1_twins_are_ddim_and_ddpm():
    model = mixture().model(gf.VP())
    run = lambda solver, **o: gf.sample(model, (32, 2), solver=solver, steps=12, generator=3, dtype=torch.float64, **o)
    torch.testing.assert_close(run("seeds_1", eta=0.0), run("ddim"), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(run("seeds_1"), run("ddpm"), rtol=1e-10, atol=1e-10)


def _exp_heun_reference(denoise, x, sigmas, solver_type):
    """ComfyUI's sample_exp_heun_2_x0 (SEEDS-2 at eta = 0, r = 1) on EDM, float64."""
    for s, t in zip(sigmas[:-1], sigmas[1:]):
        d = denoise(x, s)
        if t == 0:
            return d
        h = math.log(s / t)
        x_2 = t / s * x - math.expm1(-h) * d
        d_2 = denoise(x_2, t)
        b = math.expm1(-h) / 2 if solver_type == "phi_1" else (math.expm1(-h) + h) / -h
        x = t / s * x - ((math.expm1(-h) - b) * d + b * d_2)
    return x


@pytest.mark.parametrize("solver_type", ["phi_2", "phi_1"])
def test_exp_heun_2_x0_equals_its_formula(solver_type):
    model, x_T, ts, denoise = _edm_problem(7)
    ours = gf.sample(model, x_T=x_T, solver="exp_heun_2_x0", schedule=ts, solver_type=solver_type)
    ref = _exp_heun_reference(denoise, x_T.clone(), ts.tolist(), solver_type)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    assert get("exp_heun_2_x0").default_eta is None and not get("exp_heun_2_x0").stochastic


# ---------------------------------------------------------------- Heun++

def _heunpp2_reference(denoise, x, sigmas):
    """ComfyUI's sample_heunpp2 without churn on EDM, float64 (d = (x - D)/sigma)."""
    d_of = lambda y, s: (y - denoise(y, s)) / s
    end = sigmas[-1]
    for i in range(len(sigmas) - 1):
        d = d_of(x, sigmas[i])
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == end:
            x = x + d * dt
            continue
        x_2 = x + d * dt
        d_2 = d_of(x_2, sigmas[i + 1])
        if sigmas[i + 2] == end:
            w2 = sigmas[i + 1] / (2 * sigmas[0])
            x = x + ((1 - w2) * d + w2 * d_2) * dt
            continue
        x_3 = x_2 + d_2 * (sigmas[i + 2] - sigmas[i + 1])
        d_3 = d_of(x_3, sigmas[i + 2])
        w2, w3 = sigmas[i + 1] / (3 * sigmas[0]), sigmas[i + 2] / (3 * sigmas[0])
        x = x + ((1 - w2 - w3) * d + w2 * d_2 + w3 * d_3) * dt
    return x


@pytest.mark.parametrize("steps", [1, 2, 3, 8])
def test_heunpp2_equals_comfyui_transcription(steps):
    model, x_T, ts, denoise = _edm_problem(steps)
    seen = []
    ours = gf.sample(model, x_T=x_T, solver="heunpp2", schedule=ts, callback=lambda info: seen.append(info["nfe"]))
    torch.testing.assert_close(ours, _heunpp2_reference(denoise, x_T.clone(), ts.tolist()), rtol=1e-10, atol=1e-10)
    assert seen[-1] == get("heunpp2").nfe(steps)


@pytest.mark.parametrize("process_name", ["edm", "vp", "linear"])
def test_heunpp2_is_first_order_on_fine_grids(process_name):
    """Heun++'s weights do not shrink with the step: order 1, reached beyond ~100 steps (the registry's
    10-80-step order test skips it; its early steps are nearly Heun)."""
    model, x_T, t_start, t_end, reference = order_problem(process_name)
    steps = (80, 160, 320)
    errors = [(gf.sample(model, x_T=x_T, solver="heunpp2", steps=n, schedule=SCHEDULE[process_name],
                         t_start=t_start, t_end=t_end) - reference).abs().max().item() for n in steps]
    last_slope = float(np.log(errors[-2] / errors[-1]) / np.log(2))
    assert abs(last_slope - 1) <= 0.15, (errors, last_slope)
    assert abs(fit_order(steps, errors) - 1) <= 0.2, errors


# ---------------------------------------------------------------- Restart

def _karras(n, low, high, rho=7.0):
    return [(high ** (1 / rho) + j / n * (low ** (1 / rho) - high ** (1 / rho))) ** rho for j in range(n + 1)]


def _restart_reference(denoise, x, sigmas, noise, intervals):
    """Xu et al. (2023), Algorithm 1, on EDM with Heun steps, float64."""
    def heun(x, a, b):
        d = (x - denoise(x, a)) / a
        x_2 = x + (b - a) * d
        if b == 0:
            return x_2
        return x + (b - a) * (d + (x_2 - denoise(x_2, b)) / b) / 2

    at = {}
    for n, k, t_min, t_max in intervals:
        end = min(range(1, len(sigmas)), key=lambda j: abs(sigmas[j] - t_min))
        at.setdefault(end, []).append((n, k, t_max))
    for i in range(len(sigmas) - 1):
        x = heun(x, sigmas[i], sigmas[i + 1])
        for n, k, t_max in at.get(i + 1, ()):
            low = sigmas[i + 1]
            for _ in range(k):
                x = x + math.sqrt(t_max ** 2 - low ** 2) * noise()
                sub = _karras(n, low, t_max)
                for a, b in zip(sub[:-1], sub[1:]):
                    x = heun(x, a, b)
    return x


@pytest.mark.parametrize("intervals", [None, [(2, 3, 0.5, 2.0)], [(3, 1, 0.06, 0.3), (2, 2, 1.0, 5.0)]])
def test_restart_equals_algorithm_1(intervals):
    model, x_T, ts, denoise = _edm_problem(18)
    draws = _draws(12)
    options = {} if intervals is None else {"restart_intervals": intervals}
    seen = []
    ours = gf.sample(model, x_T=x_T, solver="restart", schedule=ts, noise_sampler=_supplied(draws),
                     callback=lambda info: seen.append(info["nfe"]), **options)
    supply = iter(draws)
    ref = _restart_reference(denoise, x_T.clone(), ts.tolist(), lambda: next(supply),
                             [(3, 2, 0.06, 0.30)] if intervals is None else intervals)
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)
    assert seen[-1] == get("restart").nfe(18, **options)


def test_restart_skips_intervals_outside_the_solve_and_is_heun_without_them():
    model, x_T, ts, _ = _edm_problem(10)
    heun = gf.sample(model, x_T=x_T, solver="heun", schedule=ts)
    assert torch.equal(gf.sample(model, x_T=x_T, solver="restart", schedule=ts, restart_intervals=[]), heun)
    outside = gf.sample(model, x_T=x_T, solver="restart", schedule=ts,
                        restart_intervals=[(2, 2, 1e-4, 0.3), (2, 1, 5.0, 50.0)])
    assert torch.equal(outside, heun)


# ---------------------------------------------------------------- LCM and TCD

def test_lcm_equals_comfyui_transcription():
    model, x_T, ts, denoise = _edm_problem(5)
    draws = _draws(5)
    ours = gf.sample(model, x_T=x_T, solver="lcm", schedule=ts, noise_sampler=_supplied(draws))
    supply, x = iter(draws), x_T.clone()
    sigmas = ts.tolist()
    for s, t in zip(sigmas[:-1], sigmas[1:]):
        x = denoise(x, s)
        if t > 0:
            x = x + t * next(supply)
    torch.testing.assert_close(ours, x, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("gamma", [0.3, 0.7])
def test_tcd_equals_its_formula_on_vp(gamma):
    """Zheng et al. (2024), eq. 15, in VP's alpha-bar form with s = (1 - gamma) t'."""
    process = gf.VP()
    model = mixture().model(process)
    x_T = torch.randn(5, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ts = gf.schedules.time_grid(process, 6, "uniform").to(torch.float64)
    draws = _draws(6)
    ours = gf.sample(model, x_T=x_T, solver="tcd", schedule=ts, gamma=gamma, noise_sampler=_supplied(draws))
    abar = lambda t: float(process.alpha(torch.tensor(t, dtype=torch.float64))) ** 2
    supply, x = iter(draws), x_T.clone()
    times = ts.tolist()
    for t, t_next in zip(times[:-1], times[1:]):
        x0 = model.predict(x, torch.full((5,), t, dtype=torch.float64), "x0")
        eps = (x - abar(t) ** 0.5 * x0) / (1 - abar(t)) ** 0.5
        s = (1 - gamma) * t_next
        x_s = abar(s) ** 0.5 * x0 + (1 - abar(s)) ** 0.5 * eps
        x = (abar(t_next) / abar(s)) ** 0.5 * x_s + (1 - abar(t_next) / abar(s)) ** 0.5 * next(supply)
    torch.testing.assert_close(ours, x, rtol=1e-9, atol=1e-9)


def test_tcd_twins_are_ddim_and_lcm():
    model = mixture().model(gf.VP())
    run = lambda solver, **o: gf.sample(model, (32, 2), solver=solver, steps=9, generator=3, dtype=torch.float64, **o)
    torch.testing.assert_close(run("tcd", gamma=0.0), run("ddim"), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(run("tcd", gamma=1.0), run("lcm"), rtol=1e-12, atol=1e-12)


def _consistency_model(process):
    """The exact consistency function of the mixture: x0(x, t) = the probability-flow ODE solution
    at t_min from (x, t) (dpmpp_3m, 40 steps), as a network predicting x0."""
    base = mixture().model(process)

    def net(x, t):
        return gf.sample(base, x_T=x, solver="dpmpp_3m", steps=40, t_start=float(t[0]))
    return gf.Model(net, process, "x0")


def test_lcm_with_a_consistency_function_reproduces_the_mixture():
    mix, n = mixture(), 1000
    x = gf.sample(_consistency_model(EDM), (n, 2), solver="lcm", steps=4, generator=5, dtype=torch.float64)
    data = mix.sample(n, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    assert mmd(x, data) <= data_mmd_spread(mix, n)


@pytest.mark.parametrize("solver, options, steps", [("tcd", {}, 200), ("restart", {}, 18), ("seeds_1", {}, 300)])
@pytest.mark.parametrize("process", [gf.VP(), EDM], ids=repr)
def test_stochastic_zoo_reproduces_the_mixture(solver, options, steps, process):
    mix, n = mixture(), 1000
    x = gf.sample(mix.model(process), (n, 2), solver=solver, steps=steps, generator=5, dtype=torch.float64, **options)
    data = mix.sample(n, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    assert mmd(x, data) <= data_mmd_spread(mix, n)


# ---------------------------------------------------------------- ald's default

def test_ald_default_mixes_on_the_ring():
    """Five Langevin steps per level (the default, Song & Ermon 2020) sample the ring; one does not."""
    ring = gf.GaussianMixture.ring()
    run = lambda **o: gf.sample(ring.model(gf.VE()), (1000, 2), solver="ald", steps=100, generator=0,
                                dtype=torch.float64, **o)
    assert kl_to_density(run(), ring.log_prob) < 0.3
    assert kl_to_density(run(n_steps_each=1), ring.log_prob) > 1.0
    assert get("ald").nfe(100) == 500


# ---------------------------------------------------------------- bad arguments

@pytest.mark.parametrize("solver, options, error, match", [
    ("tcd", {"gamma": 1.5}, ValueError, "gamma"),
    ("tcd", {"gamma": "a"}, TypeError, "gamma"),
    ("lcm", {"gamma": 0.5}, ValueError, "lcm takes no gamma"),
    ("exp_heun_2_x0", {"solver_type": "heun"}, ValueError, "solver_type"),
    ("exp_heun_2_x0", {"eta": 0.5}, ValueError, "takes no eta"),
    ("restart", {"restart_intervals": [(3, 2, 0.3, 0.06)]}, ValueError, "t_min < t_max"),
    ("restart", {"restart_intervals": [(0, 2, 0.06, 0.3)]}, ValueError, "n_restart"),
    ("restart", {"restart_intervals": [(3, 2, 0.06)]}, ValueError, "n_restart, K, t_min, t_max"),
    ("restart", {"restart_intervals": 3}, TypeError, "restart_intervals"),
    ("restart", {"noise": "brownian_tree"}, ValueError, "independent noise"),
    ("restart", {"t_start": torch.tensor([1.0, 0.5])}, ValueError, "one time grid"),
])
def test_bad_arguments(solver, options, error, match):
    with pytest.raises(error, match=match):
        gf.sample(mixture().model(gf.VP()), (2, 2), solver=solver, steps=5, generator=0, **options)


@pytest.mark.parametrize("solver", ["seeds_1", "exp_heun_2_x0", "heunpp2", "lcm", "tcd"])
def test_per_sample_start_times_equal_separate_solves(solver):
    model = mixture().model(gf.VP())
    t_start = torch.tensor([1.0, 0.6, 0.3, 0.15])
    x_T = torch.randn(4, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    seeds = [3, 5, 7, 9]
    batch = gf.sample(model, x_T=x_T, solver=solver, steps=9, t_start=t_start, generator=seeds)
    for b in range(4):
        alone = gf.sample(model, x_T=x_T[b:b + 1], solver=solver, steps=9, t_start=float(t_start[b]),
                          generator=[seeds[b]])
        torch.testing.assert_close(batch[b:b + 1], alone, rtol=1e-10, atol=1e-10)
