"""The PNDM family (``ipndm``, ``ipndm_v``, ``plms``, ``pndm``): against diffusers'
``PNDMScheduler`` (PLMS and PNDM) and a float64 transcription of ComfyUI's ``sample_ipndm`` /
``sample_ipndm_v`` (ComfyUI is not installed), the asymptotic order of the defaults, the weights,
and bad arguments."""
import math

import numpy as np
import pytest
import torch

import genflow as gf
from genflow.solvers import SOLVERS
from genflow.solvers.pndm import adams_bashforth_weights, variable_step_weights

from .references import mixture
from .test_order import SCHEDULE, order_problem

N_TRAIN = 1000


def _discrete_model():
    process = gf.DiscreteVP.linear(N_TRAIN)
    return mixture().model(process), process


def _diffusers_loop(steps, skip_prk_steps, x):
    """diffusers' standard loop with the exact mixture's noise prediction at index k (t = (k+1)/N)."""
    from diffusers import PNDMScheduler

    model, process = _discrete_model()
    scheduler = PNDMScheduler(num_train_timesteps=N_TRAIN, beta_schedule="linear", skip_prk_steps=skip_prk_steps,
                              set_alpha_to_one=False)
    # the scheduler's coefficients in float64 (it stores float32 tables) for a 1e-10 comparison
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
    scheduler.final_alpha_cumprod = scheduler.final_alpha_cumprod.double()
    scheduler.set_timesteps(steps)
    for k in scheduler.timesteps:
        eps = model.predict(x, (int(k) + 1) / N_TRAIN, "eps")
        x = scheduler.step(eps, k, x).prev_sample
    return x


@pytest.mark.parametrize("solver, skip_prk_steps", [("plms", True), ("pndm", False)])
@pytest.mark.parametrize("steps", [5, 10, 25])
def test_plms_and_pndm_equal_diffusers_pndm_scheduler(solver, skip_prk_steps, steps):
    """The grid is diffusers' "leading" timesteps; its last step (from index 0 to
    ``final_alpha_cumprod = alphas_cumprod[0]``) moves nothing, so genflow stops at index 0."""
    model, process = _discrete_model()
    x_T = torch.randn(7, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ratio = N_TRAIN // steps
    ts = torch.tensor([(k * ratio + 1) / N_TRAIN for k in reversed(range(steps))], dtype=torch.float64)
    ours = gf.sample(model, x_T=x_T, solver=solver, schedule=ts)
    reference = _diffusers_loop(steps, skip_prk_steps, x_T.clone())
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-10)


def _paper_pndm(model, x, ts):
    """Liu et al. (2022) eqs. 9-11 in float64: the pseudo Runge-Kutta step with the transfer phi of eq. 11
    in alpha-bar form and the midpoint (t + t')/2 (the steps after the third would be PLMS)."""
    abar = lambda t: float(model.process.alpha(torch.tensor(t, dtype=torch.float64))) ** 2

    def phi(x, e, t, t_next):
        a, a_next = abar(t), abar(t_next)
        return math.sqrt(a_next / a) * x - (a_next - a) / (
            math.sqrt(a) * (math.sqrt((1 - a_next) * a) + math.sqrt((1 - a) * a_next))) * e

    for t, t_next in zip(ts[:-1], ts[1:]):
        m = (t + t_next) / 2
        e1 = model.predict(x, t, "eps")
        e2 = model.predict(phi(x, e1, t, m), m, "eps")
        e3 = model.predict(phi(x, e2, t, m), m, "eps")
        e4 = model.predict(phi(x, e3, t, t_next), t_next, "eps")
        x = phi(x, (e1 + 2 * e2 + 2 * e3 + e4) / 6, t, t_next)
    return x


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_pndm_warmup_equals_paper_and_blows_up_at_few_steps(steps):
    """The league's pndm outliers under VP at 1-2 steps (KL ~1e7) are the method: a float64 transcription
    of the paper's pseudo Runge-Kutta step gives the same |x| ~ 5e3. The third stage's transfer from
    t = 1 (s = sigma/alpha ~ 152) with e3 evaluated off the data lands at |x| ~ 6e3, where eps at
    sigma' = 0.0105 is ~270."""
    model = gf.GaussianMixture.ring().model(gf.VP())
    ts = gf.schedules.time_grid(model.process, steps, "logsnr").to(torch.float64)
    x_T = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours = gf.sample(model, x_T=x_T, solver="pndm", schedule=ts)
    reference = _paper_pndm(model, x_T.clone(), ts.tolist())
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-10)
    assert (reference.norm(dim=1).max() > 1e3) == (steps < 3)


def _comfy_ipndm(denoise, x, sigmas, max_order, variable):
    """ComfyUI's sample_ipndm / sample_ipndm_v (k-diffusion convention, EDM sigmas), in float64."""
    history = []
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        d = (x - denoise(x, sigma)) / sigma
        order = min(max_order, i + 1)
        if variable:
            h = [sigmas[i + 1 - j] - sigmas[i - j] for j in range(order)]
            weights = variable_step_weights(h)
        else:
            weights = {1: [1], 2: [3 / 2, -1 / 2], 3: [23 / 12, -16 / 12, 5 / 12],
                       4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}[order]
        x = x + (sigma_next - sigma) * sum(w * e for w, e in zip(weights, [d] + history))
        history = ([d] + history)[: max_order - 1]
    return x


@pytest.mark.parametrize("solver", ["ipndm", "ipndm_v"])
@pytest.mark.parametrize("max_order", [1, 2, 3, 4])
def test_ipndm_equals_comfyui_transcription_on_edm(solver, max_order):
    process = gf.EDM(sigma_max=20.0)
    model = mixture().model(process)
    x_T = 20.0 * torch.randn(5, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ts = gf.schedules.time_grid(process, 9, "karras", process.T, process.t_min).to(torch.float64)
    sigmas = process.sigma(ts).tolist()
    ours = gf.sample(model, x_T=x_T, solver=solver, schedule=ts, max_order=max_order)
    denoise = lambda x, sigma: model.predict(x, float(process.t_from_log_snr(torch.tensor(-math.log(sigma),
                                                                                          dtype=torch.float64))), "x0")
    reference = _comfy_ipndm(denoise, x_T.clone(), sigmas, max_order, solver == "ipndm_v")
    torch.testing.assert_close(ours, reference, rtol=1e-9, atol=1e-9)


def _exact_ab(nodes, a, b):
    """Integrals over [a, b] of the Lagrange basis at ``nodes`` (numpy polynomials)."""
    out = []
    for j, nj in enumerate(nodes):
        poly = np.poly1d([1.0])
        for k, nk in enumerate(nodes):
            if k != j:
                poly *= np.poly1d([1.0, -nk]) / (nj - nk)
        integral = poly.integ()
        out.append(integral(b) - integral(a))
    return np.array(out)


def test_weights():
    # the variable-step weights reduce to the uniform ones on a uniform grid up to order 3; ComfyUI's
    # (and Zhou et al.'s) order-4 closed form gives other weights, exact for quadratics only
    for k in (1, 2, 3):
        np.testing.assert_allclose(variable_step_weights([-0.3] * k), adams_bashforth_weights(k), rtol=1e-13)
    np.testing.assert_allclose(variable_step_weights([-0.3] * 4), np.array([57, -65, 43, -11]) / 24, rtol=1e-13)
    # order 2 is the exact variable-step Adams-Bashforth 2
    s = [5.0, 3.5, 2.0]  # s_{i-1}, s_i, s_{i+1}
    h = [s[2] - s[1], s[1] - s[0]]
    exact = _exact_ab([s[1], s[0]], s[1], s[2]) / h[0]
    np.testing.assert_allclose(variable_step_weights(h), exact, rtol=1e-13)
    # per-sample tensors work elementwise
    w = variable_step_weights([torch.tensor(h, dtype=torch.float64) for h in ([-0.3, -0.2], [-0.3, -0.4], [-0.3, -0.5])])
    np.testing.assert_allclose([float(c[0]) for c in w], adams_bashforth_weights(3), rtol=1e-13)
    with pytest.raises(ValueError, match="order"):
        adams_bashforth_weights(5)


@pytest.mark.parametrize("solver, options", [("ipndm", {}), ("ipndm_v", {}), ("plms", {}), ("plms", {"max_order": 2}),
                                             ("pndm", {}), ("pndm", {"max_order": 1}), ("pndm", {"max_order": 2})])
def test_defaults_settle_at_their_order(solver, options):
    """Beyond the registry order test's 10..80 steps (where the uniform-grid weights of order 4 are
    pre-asymptotic): the local slope from 160 to 320 steps is within 0.15 of ``expected_order``."""
    model, x_T, t_start, t_end, reference = order_problem("vp")
    errors = [(gf.sample(model, x_T=x_T, solver=solver, steps=n, schedule=SCHEDULE["vp"], t_start=t_start,
                         t_end=t_end, **options) - reference).abs().max().item() for n in (160, 320)]
    slope = math.log2(errors[0] / errors[1])
    assert abs(slope - SOLVERS[solver].expected_order(**options)) <= 0.15, (solver, options, errors, slope)


def test_nfe_and_start_at_alpha_zero():
    calls = []
    model = mixture().model(gf.LinearPath())
    counted = gf.Model(lambda x, t: calls.append(1) or model.net(x, t), model.process, model.prediction)
    for solver in ("ipndm", "ipndm_v", "plms", "pndm"):
        calls.clear()
        x = gf.sample(counted, (6, 2), solver=solver, steps=8, generator=0, dtype=torch.float64)
        assert len(calls) == SOLVERS[solver].nfe(8), solver
        assert torch.isfinite(x).all(), solver  # LinearPath starts at alpha = 0


@pytest.mark.parametrize("solver", ["ipndm", "ipndm_v", "plms", "pndm"])
def test_bad_arguments(solver):
    model = mixture().model(gf.VP())
    for bad in (0, 5, 2.0, True):
        with pytest.raises(ValueError, match="max_order"):
            gf.sample(model, (2, 2), solver=solver, steps=4, max_order=bad)
    with pytest.raises(ValueError, match="eta"):
        gf.sample(model, (2, 2), solver=solver, steps=4, eta=0.5)


@pytest.mark.parametrize("solver", ["ipndm", "ipndm_v", "plms", "pndm", "gradient_estimation"])
def test_per_sample_start_times_equal_separate_solves(solver):
    model = mixture().model(gf.VP())
    t_start = torch.tensor([1.0, 0.6, 0.3, 0.15])
    x_T = torch.randn(4, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    batch = gf.sample(model, x_T=x_T, solver=solver, steps=12, t_start=t_start)
    for b in range(4):
        alone = gf.sample(model, x_T=x_T[b:b + 1], solver=solver, steps=12, t_start=float(t_start[b]))
        torch.testing.assert_close(batch[b:b + 1], alone, rtol=1e-12, atol=1e-12)
