"""SA-Solver (``sa_solver``): against a float64 transcription of ComfyUI's ``sample_sa_solver``
(PEC mode; ComfyUI is not installed) whose coefficients come from the closed-form exponential
integrals and a Vandermonde solve, with the same supplied noise; its order with the default
orders; the mixture reproduced; bad arguments."""
import math

import numpy as np
import pytest
import torch

import genflow as gf
from genflow.metrics import mmd

from .references import data_mmd_spread, mixture
from .test_order import SCHEDULE, order_problem


def _closed_form_b(alpha_next, nodes, lam, lam_next, tau):
    """ComfyUI's compute_stochastic_adams_b_coeffs: E_p = P_p - (p/mu) E_{p-1} by parts, then
    sum_j b_j lambda_j^p = E_p."""
    mu, h = 1 + tau ** 2, lam_next - lam
    E = []
    for p in range(len(nodes)):
        P = lam_next ** p - lam ** p * math.exp(-mu * h)
        E.append(P - (p / mu) * E[-1] if p else P)
    vander = np.array([[n ** p for n in nodes] for p in range(len(nodes))])
    return alpha_next * np.linalg.solve(vander, np.array(E))


def _comfy_sa_solver(denoise, x, ts, sigmas, noise, tau_fn, predictor_order, corrector_order):
    """ComfyUI's sample_sa_solver (use_pece=False, simple_order_2=False) on EDM (alpha = 1), float64."""
    lams = [-math.log(s) for s in sigmas]
    preds, x_pred, tau, h, last_noise = [], x, 0.0, 0.0, 0.0
    for i in range(len(sigmas) - 1):
        denoised = denoise(x_pred, ts[i])
        preds = (preds + [denoised])[-4:]
        p_used = min(predictor_order, len(preds))
        c_used = 0 if i == 0 else min(corrector_order, len(preds))
        if c_used == 0:
            x = x_pred
        else:
            b = _closed_form_b(1.0, lams[i - c_used + 1:i + 1], lams[i - 1], lams[i], tau)
            x = sigmas[i] / sigmas[i - 1] * math.exp(-tau ** 2 * h) * x + sum(
                bj * d for bj, d in zip(b, preds[-c_used:])) + last_noise
        tau = tau_fn(ts[i + 1])
        b = _closed_form_b(1.0, lams[i - p_used + 1:i + 1], lams[i], lams[i + 1], tau)
        h = lams[i + 1] - lams[i]
        last_noise = noise[i] * sigmas[i + 1] * math.sqrt(-math.expm1(-2 * tau ** 2 * h))
        x_pred = sigmas[i + 1] / sigmas[i] * math.exp(-tau ** 2 * h) * x + sum(
            bj * d for bj, d in zip(b, preds[-p_used:])) + last_noise
    return x_pred


@pytest.mark.parametrize("orders", [(3, 4), (2, 3), (1, 0), (3, 2), (1, 4)])
@pytest.mark.parametrize("eta", [1.0, 0.0])
def test_sa_solver_equals_comfyui_transcription_on_edm(orders, eta):
    process = gf.EDM(sigma_max=20.0)
    model = mixture().model(process)
    x_T = 20.0 * torch.randn(5, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ts = gf.schedules.time_grid(process, 10, "karras", process.T, process.t_min).to(torch.float64)
    g = torch.Generator().manual_seed(8)
    noise = [torch.randn(5, 2, generator=g, dtype=torch.float64) for _ in range(10)]
    supply = iter(noise)
    ours = gf.sample(model, x_T=x_T, solver="sa_solver", schedule=ts, predictor_order=orders[0],
                     corrector_order=orders[1], eta=eta, noise_sampler=lambda sigma, sigma_next: next(supply))
    T = process.T
    tau_fn = lambda t: eta if 0.2 * T <= t <= 0.8 * T else 0.0
    reference = _comfy_sa_solver(lambda x, t: model.predict(x, float(t), "x0"), x_T.clone(), ts.tolist(),
                                 process.sigma(ts).tolist(), noise, tau_fn, *orders)
    torch.testing.assert_close(ours, reference, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("options", [{}, {"predictor_order": 3, "corrector_order": 3}])
def test_defaults_settle_at_third_order(options):
    model, x_T, t_start, t_end, reference = order_problem("vp")
    errors = [(gf.sample(model, x_T=x_T, solver="sa_solver", eta=0.0, steps=n, schedule=SCHEDULE["vp"],
                         t_start=t_start, t_end=t_end, **options) - reference).abs().max().item() for n in (160, 320)]
    assert abs(math.log2(errors[0] / errors[1]) - 3) <= 0.15, errors


@pytest.mark.parametrize("process", [gf.VP(), gf.EDM(sigma_max=20.0)], ids=repr)
def test_sa_solver_reproduces_the_mixture(process):
    mix, n = mixture(), 1000
    x = gf.sample(mix.model(process), (n, 2), solver="sa_solver", steps=100, generator=5, dtype=torch.float64)
    data = mix.sample(n, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    assert mmd(x, data) <= data_mmd_spread(mix, n)


def test_per_sample_start_times_equal_separate_solves():
    model = mixture().model(gf.VP())
    t_start = torch.tensor([1.0, 0.6, 0.3, 0.15])
    x_T = torch.randn(4, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    seeds = [3, 5, 7, 9]
    batch = gf.sample(model, x_T=x_T, solver="sa_solver", steps=12, t_start=t_start, generator=seeds)
    for b in range(4):
        alone = gf.sample(model, x_T=x_T[b:b + 1], solver="sa_solver", steps=12, t_start=float(t_start[b]),
                          generator=[seeds[b]])
        torch.testing.assert_close(batch[b:b + 1], alone, rtol=1e-12, atol=1e-12)


def test_bad_arguments():
    model = mixture().model(gf.VP())
    for name, value in [("predictor_order", 0), ("predictor_order", 4), ("predictor_order", True),
                        ("corrector_order", -1), ("corrector_order", 5), ("corrector_order", 2.0), ("tau_interval", (0.8, 0.2)),
                        ("tau_interval", 0.5), ("tau_interval", (0.0, 1.5)), ("eta", 1.5)]:
        with pytest.raises(ValueError, match=name):
            gf.sample(model, (2, 2), solver="sa_solver", steps=4, generator=0, **{name: value})
    with pytest.raises(ValueError, match="alpha > 0"):
        gf.sample(mixture().model(gf.LinearPath()), (2, 2), solver="sa_solver", steps=4, generator=0)
