"""ER-SDE-Solver (``er_sde``): against a float64 transcription of ComfyUI's ``sample_er_sde``
(ComfyUI is not installed) with the same supplied noise, its integrals against scipy's ``quad``,
the mixture reproduced by the default SDE, and bad arguments."""
import math

import pytest
import torch
from scipy.integrate import quad

import genflow as gf
from genflow.metrics import mmd
from genflow.solvers.er_sde import NOISE_SCALERS, er_sde_integrals

from .references import data_mmd_spread, mixture


def _comfy_er_sde(denoise, x, ts, sigmas, noise, phi, max_stage, points=200):
    """ComfyUI's sample_er_sde on EDM (alpha = 1, er_lambda = sigma), float64."""
    old, old_d = None, None
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, ts[i])
        stage = min(max_stage, i + 1)
        s, s_next = sigmas[i], sigmas[i + 1]
        r = phi(s_next) / phi(s)
        x = r * x + (1 - r) * denoised
        if stage >= 2:
            dt = s_next - s
            step = -dt / points
            pos = [s_next + k * step for k in range(points)]
            S = sum(1 / phi(v) for v in pos) * step
            d = (denoised - old) / (s - sigmas[i - 1])
            x = x + (dt + S * phi(s_next)) * d
            if stage >= 3:
                S_u = sum((v - s) / phi(v) for v in pos) * step
                u = (d - old_d) / ((s - sigmas[i - 2]) / 2)
                x = x + (dt ** 2 / 2 + S_u * phi(s_next)) * u
            old_d = d
        x = x + noise[i] * math.sqrt(max(s_next ** 2 - s ** 2 * r ** 2, 0.0))
        old = denoised
    return x


def _scalar(phi):
    return lambda v: float(phi(torch.tensor(v, dtype=torch.float64)))


@pytest.mark.parametrize("max_stage", [1, 2, 3])
@pytest.mark.parametrize("scaler, eta", [("er_sde", 1.0), ("er_sde", 0.5), ("reverse_sde", 1.0), ("ode", 1.0)])
def test_er_sde_equals_comfyui_transcription_on_edm(max_stage, scaler, eta):
    process = gf.EDM(sigma_max=20.0)
    model = mixture().model(process)
    x_T = 20.0 * torch.randn(5, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ts = gf.schedules.time_grid(process, 9, "karras", process.T, process.t_min).to(torch.float64)
    sigmas = process.sigma(ts).tolist()
    g = torch.Generator().manual_seed(8)
    noise = [torch.randn(5, 2, generator=g, dtype=torch.float64) for _ in range(9)]
    supply = iter(noise)
    ours = gf.sample(model, x_T=x_T, solver="er_sde", schedule=ts, max_stage=max_stage, noise_scaler=scaler, eta=eta,
                     integration_points=200, noise_sampler=lambda sigma, sigma_next: next(supply))
    phi = _scalar(NOISE_SCALERS[scaler](eta))
    if scaler == "ode":
        noise = [torch.zeros(5, 2, dtype=torch.float64)] * 9
    reference = _comfy_er_sde(lambda x, t: model.predict(x, float(t), "x0"), x_T.clone(), ts.tolist(), sigmas, noise,
                              phi, max_stage)
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("scaler", sorted(NOISE_SCALERS))
@pytest.mark.parametrize("s, s_next", [(80.0, 40.0), (1.0, 0.5), (0.05, 0.002)])
def test_integrals_equal_quad(scaler, s, s_next):
    phi = NOISE_SCALERS[scaler](1.0)
    f = _scalar(phi)
    S, S_u = er_sde_integrals(s, s_next, phi)
    assert S == pytest.approx(quad(lambda v: 1 / f(v), s_next, s, epsabs=0, epsrel=1e-13)[0], rel=1e-11)
    assert S_u == pytest.approx(quad(lambda v: (v - s) / f(v), s_next, s, epsabs=0, epsrel=1e-13)[0], rel=1e-11)
    # per-sample tensors give the same values
    S_t, _ = er_sde_integrals(torch.tensor([s, s], dtype=torch.float64), torch.tensor([s_next, s_next],
                                                                                       dtype=torch.float64), phi)
    assert torch.allclose(S_t, torch.tensor(S, dtype=torch.float64), rtol=1e-14, atol=0)


@pytest.mark.parametrize("process", [gf.VP(), gf.EDM(sigma_max=20.0)], ids=repr)
def test_er_sde_reproduces_the_mixture(process):
    mix, n = mixture(), 1000
    x = gf.sample(mix.model(process), (n, 2), solver="er_sde", steps=100, generator=5, dtype=torch.float64)
    data = mix.sample(n, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    assert mmd(x, data) <= data_mmd_spread(mix, n)


def test_eta_zero_is_the_ode_scaler():
    model = mixture().model(gf.VP())
    a = gf.sample(model, (16, 2), solver="er_sde", eta=0.0, steps=10, generator=3, dtype=torch.float64)
    b = gf.sample(model, (16, 2), solver="er_sde", noise_scaler="ode", steps=10, generator=3, dtype=torch.float64)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_bad_arguments():
    model = mixture().model(gf.VP())
    for name, value in [("max_stage", 4), ("max_stage", True), ("noise_scaler", "sde"), ("integration_points", 0),
                        ("integration_points", 2.5), ("eta", 2.0), ("eta", -0.1)]:
        with pytest.raises(ValueError, match=name):
            gf.sample(model, (2, 2), solver="er_sde", steps=4, generator=0, **{name: value})
    with pytest.raises(ValueError, match="alpha > 0"):
        gf.sample(mixture().model(gf.LinearPath()), (2, 2), solver="er_sde", steps=4, generator=0)


def test_per_sample_start_times_equal_separate_solves():
    model = mixture().model(gf.VP())
    t_start = torch.tensor([1.0, 0.6, 0.3, 0.15])
    x_T = torch.randn(4, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    seeds = [3, 5, 7, 9]
    batch = gf.sample(model, x_T=x_T, solver="er_sde", steps=12, t_start=t_start, generator=seeds)
    for b in range(4):
        alone = gf.sample(model, x_T=x_T[b:b + 1], solver="er_sde", steps=12, t_start=float(t_start[b]),
                          generator=[seeds[b]])
        torch.testing.assert_close(batch[b:b + 1], alone, rtol=1e-12, atol=1e-12)
