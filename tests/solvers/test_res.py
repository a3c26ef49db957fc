"""RES multistep (``res_2m``, ``res_3m``): against float64 transcriptions of ComfyUI's
``res_multistep`` (eta = 0; ComfyUI is not installed) and of the paper's order conditions
(Zhang et al. 2023, §4), on EDM and VP; they are DPM-Solver++'s heun/taylor multistep updates
without ``lower_order_final``; bad arguments."""
import math

import numpy as np
import pytest
import torch

import genflow as gf

from .references import mixture


def _phis(z):
    """phi_1, phi_2, phi_3 of the exponential integrator at z."""
    phi1 = math.expm1(z) / z
    phi2 = (phi1 - 1.0) / z
    return phi1, phi2, (phi2 - 0.5) / z


def _res_reference(model, x, ts, max_order):
    """The refined multistep of order ``max_order`` (lower orders while the history fills) in float64:
    ``x' = (sigma'/sigma) x + alpha' h sum_j b_j x0_{i-j}`` with ``b`` from the order conditions."""
    process = model.process
    lam = process.log_snr(ts).tolist()
    alpha, sigma = process.alpha(ts).tolist(), process.sigma(ts).tolist()
    history = []
    for i in range(len(ts) - 1):
        x0 = model.predict(x, float(ts[i]), "x0")
        h = lam[i + 1] - lam[i]
        history = [x0] + history[: max_order - 1]
        k = len(history)
        phis = _phis(-h)
        if k == 1:  # Euler = DDIM: h b_1 = 1 - e^{-h}
            b = [phis[0]]
        else:
            c = [(lam[i - j] - lam[i]) / h for j in range(k)]
            rhs = [math.factorial(n) * phis[n] for n in range(k)]
            b = np.linalg.solve(np.array([[cj ** n for cj in c] for n in range(k)]), rhs)
        x = sigma[i + 1] / sigma[i] * x + alpha[i + 1] * h * sum(bj * xj for bj, xj in zip(b, history))
    return x


def _comfy_res_multistep(denoise, x, sigmas):
    """ComfyUI's res_multistep with eta = 0 (EDM sigmas, k-diffusion convention)."""
    old = None
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i])
        if old is None or sigmas[i + 1] == 0:
            x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
        else:
            t, t_next, t_prev = -math.log(sigmas[i]), -math.log(sigmas[i + 1]), -math.log(sigmas[i - 1])
            h = t_next - t
            c2 = (t_prev - t) / h
            phi1, phi2, _ = _phis(-h)
            b1, b2 = phi1 - phi2 / c2, phi2 / c2
            x = math.exp(-h) * x + h * (b1 * denoised + b2 * old)
        old = denoised
    return x


def test_res_2m_equals_comfyui_res_multistep_on_edm():
    process = gf.EDM(sigma_max=20.0)
    model = mixture().model(process)
    x_T = 20.0 * torch.randn(5, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ts = gf.schedules.time_grid(process, 9, "karras", process.T, process.t_min).to(torch.float64)
    sigmas = process.sigma(ts).tolist()
    to_t = {s: float(t) for s, t in zip(sigmas, ts)}
    ours = gf.sample(model, x_T=x_T, solver="res_2m", schedule=ts)
    reference = _comfy_res_multistep(lambda x, s: model.predict(x, to_t[s], "x0"), x_T.clone(), sigmas)
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("solver, order", [("res_2m", 2), ("res_3m", 3)])
@pytest.mark.parametrize("process", [gf.VP(), gf.EDM(sigma_max=20.0)], ids=repr)
@pytest.mark.parametrize("steps", [4, 12])
def test_res_equals_the_order_conditions(solver, order, process, steps):
    model = mixture().model(process)
    x_T = process.prior_sample((6, 2), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ts = gf.schedules.time_grid(process, steps, "logsnr", process.T, process.t_min).to(torch.float64)
    ours = gf.sample(model, x_T=x_T, solver=solver, schedule=ts)
    torch.testing.assert_close(ours, _res_reference(model, x_T.clone(), ts, order), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("solver, twin", [("res_2m", "dpmpp_2m"), ("res_3m", "dpmpp_3m")])
def test_res_is_dpmpp_heun_without_lower_order_final(solver, twin):
    model = mixture().model(gf.VP())
    a = gf.sample(model, (8, 2), solver=solver, steps=7, generator=3, dtype=torch.float64)
    b = gf.sample(model, (8, 2), solver=twin, steps=7, generator=3, dtype=torch.float64, solver_type="heun",
                  lower_order_final=False)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    c = gf.sample(model, (8, 2), solver=twin, steps=7, generator=3, dtype=torch.float64)
    assert not torch.allclose(a, c)  # the defaults differ from DPM-Solver++'s


@pytest.mark.parametrize("solver", ["res_2m", "res_3m"])
def test_bad_arguments(solver):
    model = mixture().model(gf.VP())
    with pytest.raises(ValueError, match="solver_type"):
        gf.sample(model, (2, 2), solver=solver, steps=4, solver_type="rk")
    with pytest.raises(ValueError, match="eta"):
        gf.sample(model, (2, 2), solver=solver, steps=4, eta=0.5)
    with pytest.raises(ValueError, match="warmup"):
        gf.sample(model, (2, 2), solver=solver, steps=4, warmup="none")
