"""Gradient estimation (``gradient_estimation``): against a float64 transcription of ComfyUI's
``sample_gradient_estimation`` (ComfyUI is not installed), its order at the default ``gamma = 2``,
its special cases (``gamma = 1``: DDIM; ``3/2``: iPNDM of order 2), and bad arguments."""
import math

import pytest
import torch

import genflow as gf

from .references import mixture
from .test_order import SCHEDULE, order_problem


def _comfy_gradient_estimation(denoise, x, ts, sigmas, gamma):
    """ComfyUI's sample_gradient_estimation (EDM sigmas, k-diffusion convention), float64."""
    old_d = None
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, ts[i])
        d = (x - denoised) / sigmas[i]
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = denoised
        elif old_d is None:
            x = x + d * dt
        else:
            x = x + (gamma * d + (1 - gamma) * old_d) * dt
        old_d = d
    return x


@pytest.mark.parametrize("gamma", [2.0, 1.3])
@pytest.mark.parametrize("steps", [1, 2, 9])
def test_gradient_estimation_equals_comfyui_transcription_on_edm(gamma, steps):
    process = gf.EDM(sigma_max=20.0)
    model = mixture().model(process)
    x_T = 20.0 * torch.randn(5, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ts = gf.schedules.time_grid(process, steps, "karras", process.T, process.t_min).to(torch.float64)
    ours = gf.sample(model, x_T=x_T, solver="gradient_estimation", schedule=ts, gamma=gamma)
    reference = _comfy_gradient_estimation(lambda x, t: model.predict(x, float(t), "x0"), x_T.clone(), ts.tolist(),
                                           process.sigma(ts).tolist(), gamma)
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-10)


def test_default_settles_at_first_order():
    model, x_T, t_start, t_end, reference = order_problem("vp")
    errors = [(gf.sample(model, x_T=x_T, solver="gradient_estimation", steps=n, schedule=SCHEDULE["vp"],
                         t_start=t_start, t_end=t_end) - reference).abs().max().item() for n in (160, 320)]
    assert abs(math.log2(errors[0] / errors[1]) - 1) <= 0.1, errors


@pytest.mark.parametrize("process", [gf.VP(), gf.LinearPath()], ids=repr)
def test_special_cases(process):
    model = mixture().model(process)
    kwargs = dict(steps=8, generator=2, dtype=torch.float64)
    ddim = gf.sample(model, (6, 2), solver="ddim", **kwargs)
    torch.testing.assert_close(gf.sample(model, (6, 2), solver="gradient_estimation", gamma=1.0, **kwargs), ddim,
                               rtol=1e-10, atol=1e-10)
    if process.sigma(process.t_min) == 0:  # the last step is then DDIM (alpha' x0), not ipndm's AB2
        return
    ipndm = gf.sample(model, (6, 2), solver="ipndm", max_order=2, **kwargs)
    torch.testing.assert_close(gf.sample(model, (6, 2), solver="gradient_estimation", gamma=1.5, **kwargs), ipndm,
                               rtol=1e-10, atol=1e-10)


def test_bad_arguments():
    model = mixture().model(gf.VP())
    for bad in ("2", float("nan"), None):
        with pytest.raises((TypeError, ValueError), match="gamma"):
            gf.sample(model, (2, 2), solver="gradient_estimation", steps=4, gamma=bad)
    with pytest.raises(ValueError, match="eta"):
        gf.sample(model, (2, 2), solver="gradient_estimation", steps=4, eta=0.5)
