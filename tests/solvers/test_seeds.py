"""SEEDS-2/3 (``seeds_2``, ``seeds_3``): against a float64 transcription of ComfyUI's
``sample_seeds_2`` / ``sample_seeds_3`` (ComfyUI is not installed) with the same supplied noise,
their deterministic twins (DPM-Solver++(2S)), the mixture reproduced, and bad arguments."""
import math

import pytest
import torch

import genflow as gf
from genflow.metrics import mmd

from .references import data_mmd_spread, mixture


def _phi1(z):
    return math.expm1(z)


def _phi2(z):
    return (math.expm1(z) - z) / z


def _comfy_seeds(denoise, x, sigmas, noise, eta, stages, r=0.5, solver_type="phi_1", r_1=1 / 3, r_2=2 / 3):
    """ComfyUI's sample_seeds_2 / sample_seeds_3 on EDM (alpha = 1, lambda = -log sigma), float64;
    ``denoise(x, sigma)``, ``noise()`` the next supplied draw."""
    for i in range(len(sigmas) - 1):
        s, t = sigmas[i], sigmas[i + 1]
        d = denoise(x, s)
        lam_s, lam_t = -math.log(s), -math.log(t)
        h = lam_t - lam_s
        H = h * (eta + 1)
        if stages == 2:
            s1 = math.exp(-(lam_s + r * h))
            x2 = s1 / s * math.exp(-r * h * eta) * x - _phi1(-r * H) * d
            n = math.sqrt(-math.expm1(-2 * r * h * eta)) * noise()
            x2 = x2 + n * s1
            d2 = denoise(x2, s1)
            if solver_type == "phi_1":
                fac = 1 / (2 * r)
                x = t / s * math.exp(-h * eta) * x - _phi1(-H) * ((1 - fac) * d + fac * d2)
            else:
                b2 = _phi2(-H) / r
                x = t / s * math.exp(-h * eta) * x - ((_phi1(-H) - b2) * d + b2 * d2)
            seg = (r - 1) * h * eta
            n = n * math.exp(seg) + math.sqrt(-math.expm1(2 * seg)) * noise()
            x = x + n * t
        else:
            s1, s2 = math.exp(-(lam_s + r_1 * h)), math.exp(-(lam_s + r_2 * h))
            x2 = s1 / s * math.exp(-r_1 * h * eta) * x - _phi1(-r_1 * H) * d
            n = math.sqrt(-math.expm1(-2 * r_1 * h * eta)) * noise()
            x2 = x2 + n * s1
            d2 = denoise(x2, s1)
            a32 = r_2 / r_1 * _phi2(-r_2 * H)
            x3 = s2 / s * math.exp(-r_2 * h * eta) * x - ((_phi1(-r_2 * H) - a32) * d + a32 * d2)
            seg = (r_1 - r_2) * h * eta
            n = n * math.exp(seg) + math.sqrt(-math.expm1(2 * seg)) * noise()
            x3 = x3 + n * s2
            d3 = denoise(x3, s2)
            b3 = _phi2(-H) / r_2
            x = t / s * math.exp(-h * eta) * x - ((_phi1(-H) - b3) * d + b3 * d3)
            seg = (r_2 - 1) * h * eta
            n = n * math.exp(seg) + math.sqrt(-math.expm1(2 * seg)) * noise()
            x = x + n * t
    return x


@pytest.mark.parametrize("solver, options", [("seeds_2", {}), ("seeds_2", {"solver_type": "phi_2"}),
                                             ("seeds_2", {"r": 0.3}), ("seeds_3", {}),
                                             ("seeds_3", {"r_1": 0.25, "r_2": 0.6})])
@pytest.mark.parametrize("eta", [1.0, 0.5, 0.0])
def test_seeds_equal_comfyui_transcription_on_edm(solver, options, eta):
    process = gf.EDM(sigma_max=20.0)
    model = mixture().model(process)
    x_T = 20.0 * torch.randn(5, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ts = gf.schedules.time_grid(process, 6, "karras", process.T, process.t_min).to(torch.float64)
    g = torch.Generator().manual_seed(8)
    draws = [torch.randn(5, 2, generator=g, dtype=torch.float64) for _ in range(18)]
    ours_supply, ref_supply = iter(draws), iter(draws)
    ours = gf.sample(model, x_T=x_T, solver=solver, schedule=ts, eta=eta, **options,
                     noise_sampler=lambda sigma, sigma_next: next(ours_supply))
    to_t = lambda sigma: float(process.t_from_log_snr(torch.tensor(-math.log(sigma), dtype=torch.float64)))
    reference = _comfy_seeds(lambda x, sigma: model.predict(x, to_t(sigma), "x0"), x_T.clone(),
                             process.sigma(ts).tolist(), lambda: next(ref_supply) if eta > 0 else 0.0, eta,
                             int(solver[-1]), **options)
    torch.testing.assert_close(ours, reference, rtol=1e-9, atol=1e-9)


def test_seeds_2_without_churn_is_dpmpp_2s():
    model = mixture().model(gf.VP())
    a = gf.sample(model, (8, 2), solver="seeds_2", eta=0.0, steps=7, generator=3, dtype=torch.float64)
    b = gf.sample(model, (8, 2), solver="dpmpp_2s", steps=7, generator=3, dtype=torch.float64)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("solver", ["seeds_2", "seeds_3"])
@pytest.mark.parametrize("process", [gf.VP(), gf.EDM(sigma_max=20.0)], ids=repr)
def test_seeds_reproduce_the_mixture(solver, process):
    mix, n = mixture(), 1000
    x = gf.sample(mix.model(process), (n, 2), solver=solver, steps=60, generator=5, dtype=torch.float64)
    data = mix.sample(n, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    assert mmd(x, data) <= data_mmd_spread(mix, n)


@pytest.mark.parametrize("solver", ["seeds_2", "seeds_3"])
def test_per_sample_start_times_equal_separate_solves(solver):
    model = mixture().model(gf.VP())
    t_start = torch.tensor([1.0, 0.6, 0.3, 0.15])
    x_T = torch.randn(4, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    seeds = [3, 5, 7, 9]
    batch = gf.sample(model, x_T=x_T, solver=solver, steps=6, t_start=t_start, generator=seeds)
    for b in range(4):
        alone = gf.sample(model, x_T=x_T[b:b + 1], solver=solver, steps=6, t_start=float(t_start[b]),
                          generator=[seeds[b]])
        torch.testing.assert_close(batch[b:b + 1], alone, rtol=1e-12, atol=1e-12)


def test_bad_arguments():
    model = mixture().model(gf.VP())
    for solver, name, value in [("seeds_2", "r", 0.0), ("seeds_2", "r", True), ("seeds_2", "solver_type", "phi_3"),
                                ("seeds_3", "r_1", 1.0), ("seeds_3", "r_1", 0.7), ("seeds_3", "r_2", "0.5"),
                                ("seeds_2", "eta", 2.0)]:
        with pytest.raises(ValueError, match=name):
            gf.sample(model, (2, 2), solver=solver, steps=4, generator=0, **{name: value})
    with pytest.raises(ValueError, match="alpha > 0"):
        gf.sample(mixture().model(gf.LinearPath()), (2, 2), solver="seeds_2", steps=4, generator=0)
