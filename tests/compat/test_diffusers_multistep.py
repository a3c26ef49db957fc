"""``gf.compat.diffusers`` part 2 against the installed diffusers: DPMSolverMultistepScheduler,
DPMSolverSinglestepScheduler, UniPCMultistepScheduler and DEISMultistepScheduler.

Each case builds diffusers' scheduler and ours from the same config and runs diffusers' standard
loop on the same latents, the same model (a nonlinear toy noise predictor, or the exact
Gaussian-mixture model) and the same seeded generator; ``timesteps`` (values and dtype) and
``sigmas`` must be equal and every step's ``prev_sample`` equal to 1e-4 relative (float32). The
model's output is the configured prediction type of one underlying noise prediction, so all
prediction types describe the same model. Where diffusers returns NaN or inf, the deviation is
pinned.
"""
import itertools
import math
import warnings

import numpy as np
import pytest
import torch

import genflow as gf
from genflow.compat import diffusers as compat

from ..peers import diffusers

RTOL = 1e-4
SHAPE = (3, 3, 4, 4)
MIXTURE = gf.GaussianMixture([[-2.0, 0.0], [1.5, 1.5], [1.0, -2.0]], [0.6, 0.4, 0.8], [0.5, 0.3, 0.2])
EXACT = MIXTURE.model(gf.EDM(sigma_min=1e-5, sigma_max=1e6))  # eps at VE sigma s of y = x / alpha


def _alpha_sigma(scheduler, i):
    s = float(scheduler.sigmas[i])
    if scheduler.config.get("use_flow_sigmas"):
        return 1.0 - s, s
    alpha = 1.0 / math.sqrt(1.0 + s * s)
    return alpha, s * alpha


def _toy_eps(x, t, alpha, sigma):
    """A smooth nonlinear noise predictor of (x, t) with O(1) outputs."""
    t = float(t)
    return torch.tanh(0.9 * x * math.cos(0.002 * t) + 0.3 * x.roll(1, dims=-1)) + 0.05 * math.sin(0.01 * t)


def _mixture_eps(x, t, alpha, sigma):
    """The exact noise prediction of ``MIXTURE`` at ``x = alpha x0 + sigma eps``."""
    return EXACT.eps((x / alpha).double(), sigma / alpha).to(x.dtype)


def _output(scheduler, eps, x, i):
    """The model output of the configured prediction type for the noise prediction ``eps``."""
    alpha, sigma = _alpha_sigma(scheduler, i)
    x0 = (x - sigma * eps) / alpha
    kind = scheduler.config.prediction_type
    return {"epsilon": eps, "sample": x0, "v_prediction": alpha * eps - sigma * x0, "flow_prediction": eps - x0}[kind]


def _loop(scheduler, steps, eps_fn, x_T, *, seed=7, set_kwargs=None, steps_kwargs=None):
    """diffusers' loop; the list of ``prev_sample`` after every step."""
    if steps is None:
        scheduler.set_timesteps(**set_kwargs)
    else:
        scheduler.set_timesteps(steps, **(set_kwargs or {}))
    x = x_T * scheduler.init_noise_sigma
    kwargs = dict(steps_kwargs or {})
    if "generator" in scheduler.step.__code__.co_varnames:
        kwargs["generator"] = torch.Generator().manual_seed(seed)
    states = []
    for j, t in enumerate(scheduler.timesteps):
        i = scheduler.step_index if scheduler.step_index is not None else j
        alpha, sigma = _alpha_sigma(scheduler, i)
        inp = scheduler.scale_model_input(x, t)
        x = scheduler.step(_output(scheduler, eps_fn(inp, t, alpha, sigma), x, i), t, x, **kwargs).prev_sample
        states.append(x)
    return states


def _fields(config):
    """A config as a plain dict: bookkeeping keys dropped except ``_use_default_values`` (as a set)."""
    fields = {k: v for k, v in config.items() if not k.startswith("_")}
    fields["_use_default_values"] = set(config.get("_use_default_values", ()))
    return fields


def _pair(name, **config):
    D = diffusers()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = getattr(D, name)(**config)
    return ref, getattr(compat, name).from_config(ref.config)


def _compare(name, config, steps, *, model="toy", set_kwargs=None, rtol=RTOL):
    ref, ours = _pair(name, **config)
    eps_fn, shape = (_toy_eps, SHAPE) if model == "toy" else (_mixture_eps, (16, 2))
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = _loop(ref, steps, eps_fn, x_T, set_kwargs=set_kwargs)
        actual = _loop(ours, steps, eps_fn, x_T, set_kwargs=set_kwargs)
    assert ours.timesteps.dtype == ref.timesteps.dtype
    torch.testing.assert_close(ours.timesteps, ref.timesteps, rtol=0, atol=0)
    torch.testing.assert_close(ours.sigmas, ref.sigmas, rtol=1e-6, atol=0)
    assert len(actual) == len(expected)
    scale = max(e.abs().max().item() for e in expected)
    for j, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a, e, rtol=rtol, atol=rtol * scale, msg=lambda m: f"step {j}: {m}")
    return actual, expected


# ---------------------------------------------------------------- DPMSolverMultistepScheduler

DPM_GRID = [(alg, order, st, pred) for alg, order, st, pred in itertools.product(
    ["dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver"], [1, 2, 3], ["midpoint", "heun"],
    ["epsilon", "sample", "v_prediction"]) if not (alg == "sde-dpmsolver" and order == 3)]


@pytest.mark.parametrize("steps", [8, 16])
@pytest.mark.parametrize("algorithm, order, solver_type, prediction", DPM_GRID)
def test_dpm_multistep_equals_diffusers(algorithm, order, solver_type, prediction, steps):
    """Every algorithm x order x solver_type x prediction type; 8 steps (lower_order_final acts)
    and 16 (it does not)."""
    config = dict(algorithm_type=algorithm, solver_order=order, solver_type=solver_type, prediction_type=prediction)
    if algorithm in ("dpmsolver", "sde-dpmsolver"):
        config["final_sigmas_type"] = "sigma_min"
    _compare("DPMSolverMultistepScheduler", config, steps)


DPM_OPTIONS = [
    dict(use_karras_sigmas=True, solver_order=3), dict(use_karras_sigmas=True, final_sigmas_type="sigma_min"),
    dict(lower_order_final=False, solver_order=3), dict(lower_order_final=False, final_sigmas_type="sigma_min"),
    dict(euler_at_final=True, final_sigmas_type="sigma_min"), dict(final_sigmas_type="sigma_min", solver_order=3),
    dict(timestep_spacing="leading", steps_offset=1), dict(timestep_spacing="trailing", solver_order=3),
    dict(thresholding=True, sample_max_value=1.2, prediction_type="sample"),
    dict(thresholding=True, algorithm_type="dpmsolver", final_sigmas_type="sigma_min"),
    dict(use_lu_lambdas=True), dict(use_exponential_sigmas=True), dict(use_beta_sigmas=True, solver_order=3),
    dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0),
    dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1),
    dict(beta_schedule="scaled_linear", rescale_betas_zero_snr=True, timestep_spacing="trailing",
         prediction_type="v_prediction"),
    dict(algorithm_type="sde-dpmsolver++", use_karras_sigmas=True, solver_order=3),
]


@pytest.mark.parametrize("steps", [7, 20])
@pytest.mark.parametrize("config", DPM_OPTIONS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_dpm_multistep_options_equal_diffusers(config, steps):
    _compare("DPMSolverMultistepScheduler", config, steps)


@pytest.mark.parametrize("config", [dict(), dict(solver_order=3), dict(algorithm_type="sde-dpmsolver++"),
                                    dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min", solver_order=3),
                                    dict(use_karras_sigmas=True, solver_type="heun")])
def test_dpm_multistep_exact_mixture_model(config):
    _compare("DPMSolverMultistepScheduler", config, 12, model="mixture")


def test_dpm_multistep_custom_timesteps_and_learned_variance():
    _compare("DPMSolverMultistepScheduler", dict(solver_order=3), None,
             set_kwargs=dict(timesteps=[999, 900, 700, 500, 300, 120, 40, 10]))
    ref, ours = _pair("DPMSolverMultistepScheduler", variance_type="learned_range")
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    for s in (ref, ours):
        s.set_timesteps(5)
        y = x
        for t in s.timesteps:  # a [B, 2C, ...] output: noise prediction and variance channels
            y = s.step(torch.cat([torch.tanh(y), torch.ones_like(y)], dim=1), t, y).prev_sample
        s.result = y
    torch.testing.assert_close(ours.result, ref.result, rtol=RTOL, atol=RTOL)


def test_dpm_multistep_sde_noise_sources():
    """``variance_noise`` is used as given; a list of generators draws one per sample."""
    ref, ours = _pair("DPMSolverMultistepScheduler", algorithm_type="sde-dpmsolver++")
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    for kwargs in ({"variance_noise": torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))},
                   {"generator": [torch.Generator().manual_seed(b) for b in range(SHAPE[0])]}):
        results = []
        for s in (ref, ours):
            s.set_timesteps(4)
            if "generator" in kwargs:
                kwargs["generator"] = [torch.Generator().manual_seed(b) for b in range(SHAPE[0])]
            y = x
            for t in s.timesteps:
                y = s.step(torch.tanh(y), t, y, **kwargs).prev_sample
            results.append(y)
        torch.testing.assert_close(results[1], results[0], rtol=RTOL, atol=RTOL)


@pytest.mark.parametrize("config", [dict(solver_type="heun"), dict(solver_order=3)])
def test_dpm_multistep_zero_length_last_step_is_identity(config):
    """Pinned deviation: Karras sigmas end at the table's sigma_min, and ``"sigma_min"`` appends it
    again, so the last step has h = 0; diffusers' Heun and third-order weights (``(e^{-h} - 1)/h + 1``,
    ...) are then 0/0 (NaN) on grids of 15 or more steps. genflow takes the limit: the step
    returns its input."""
    ref, ours = _pair("DPMSolverMultistepScheduler", use_karras_sigmas=True, final_sigmas_type="sigma_min", **config)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    expected = _loop(ref, 16, _toy_eps, x_T)
    actual = _loop(ours, 16, _toy_eps, x_T)
    assert torch.isnan(expected[-1]).all()
    torch.testing.assert_close(actual[-2], expected[-2], rtol=RTOL, atol=RTOL)
    torch.testing.assert_close(actual[-1], actual[-2], rtol=0, atol=0)


# ---------------------------------------------------------------- DPMSolverSinglestepScheduler

SINGLE_GRID = list(itertools.product(["dpmsolver++", "sde-dpmsolver++", "dpmsolver"], [1, 2, 3],
                                     ["midpoint", "heun"], ["epsilon", "v_prediction"]))


@pytest.mark.parametrize("steps", [9, 12])
@pytest.mark.parametrize("algorithm, order, solver_type, prediction", SINGLE_GRID)
def test_dpm_singlestep_equals_diffusers(algorithm, order, solver_type, prediction, steps):
    config = dict(algorithm_type=algorithm, solver_order=order, solver_type=solver_type, prediction_type=prediction)
    if algorithm == "dpmsolver":
        config["final_sigmas_type"] = "sigma_min"
    _compare("DPMSolverSinglestepScheduler", config, steps)


@pytest.mark.parametrize("config", [
    dict(use_karras_sigmas=True, solver_order=3), dict(lower_order_final=False, final_sigmas_type="sigma_min"),
    dict(lower_order_final=True, solver_order=3, final_sigmas_type="sigma_min"), dict(thresholding=True),
    dict(prediction_type="sample", solver_order=3, solver_type="heun"), dict(use_exponential_sigmas=True),
], ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_dpm_singlestep_options_equal_diffusers(config):
    for steps in (8, 11):
        _compare("DPMSolverSinglestepScheduler", config, steps)
    if not config.get("thresholding"):  # diffusers' thresholding needs [B, C, ...] samples
        _compare("DPMSolverSinglestepScheduler", config, 10, model="mixture")


def test_dpm_singlestep_order_list_and_config_fix():
    """Orders repeat ``1..k`` per chunk; an uneven number of steps (or a final sigma of 0) switches
    lower_order_final on in the config, as diffusers does."""
    ref, ours = _pair("DPMSolverSinglestepScheduler", solver_order=3, final_sigmas_type="sigma_min")
    for steps in (6, 7, 8, 9):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref.set_timesteps(steps)
            ours.set_timesteps(steps)
        assert ours.order_list == ref.order_list
        assert ours.config.lower_order_final == ref.config.lower_order_final


# ---------------------------------------------------------------- UniPCMultistepScheduler

UNIPC_GRID = list(itertools.product([1, 2, 3], ["bh1", "bh2"], [True, False], ["epsilon", "sample", "v_prediction"]))


@pytest.mark.parametrize("steps", [6, 16])
@pytest.mark.parametrize("order, variant, predict_x0, prediction", UNIPC_GRID)
def test_unipc_equals_diffusers(order, variant, predict_x0, prediction, steps):
    """diffusers' last step to sigma = 0 is NaN for bh1 and for predict_x0=False (see the pinned
    test below), so those run with final_sigmas_type='sigma_min'."""
    config = dict(solver_order=order, solver_type=variant, predict_x0=predict_x0, prediction_type=prediction)
    if variant == "bh1" or not predict_x0:
        config["final_sigmas_type"] = "sigma_min"
    _compare("UniPCMultistepScheduler", config, steps)


@pytest.mark.parametrize("config", [
    dict(use_karras_sigmas=True), dict(use_karras_sigmas=True, final_sigmas_type="sigma_min", solver_order=3),
    dict(lower_order_final=False, solver_order=3, final_sigmas_type="sigma_min"),
    dict(timestep_spacing="leading", steps_offset=1), dict(timestep_spacing="trailing", solver_order=3),
    dict(thresholding=True, sample_max_value=1.2, prediction_type="sample"), dict(disable_corrector=[0, 1, 4]),
    dict(solver_order=3, disable_corrector=[2]), dict(use_exponential_sigmas=True), dict(use_beta_sigmas=True),
    dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0),
    dict(use_flow_sigmas=True, prediction_type="flow_prediction", use_karras_sigmas=True),
    dict(beta_schedule="scaled_linear", rescale_betas_zero_snr=True, timestep_spacing="trailing",
         prediction_type="v_prediction"),
], ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_unipc_options_equal_diffusers(config):
    for steps in (7, 20):
        _compare("UniPCMultistepScheduler", config, steps)


@pytest.mark.parametrize("config", [dict(), dict(solver_order=3), dict(predict_x0=False, final_sigmas_type="sigma_min"),
                                    dict(solver_type="bh1", final_sigmas_type="sigma_min")])
def test_unipc_exact_mixture_model(config):
    _compare("UniPCMultistepScheduler", config, 10, model="mixture")


def test_unipc_flow_sigmas_argument_and_dynamic_shift():
    config = dict(use_flow_sigmas=True, prediction_type="flow_prediction", use_dynamic_shifting=True)
    sigmas = np.array([1.0, 0.8, 0.6, 0.45, 0.3, 0.15])
    _compare("UniPCMultistepScheduler", config, None, set_kwargs=dict(sigmas=sigmas, mu=0.7))


def test_unipc_with_solver_p():
    """UniC on top of another scheduler's predictor (``solver_p``)."""
    D = diffusers()
    ref = D.UniPCMultistepScheduler(solver_p=D.DPMSolverMultistepScheduler(solver_order=1))
    ours = compat.UniPCMultistepScheduler(solver_p=compat.DPMSolverMultistepScheduler(solver_order=1))
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    expected, actual = _loop(ref, 8, _toy_eps, x_T), _loop(ours, 8, _toy_eps, x_T)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=RTOL, atol=RTOL)


@pytest.mark.parametrize("config", [dict(predict_x0=False), dict(solver_type="bh1"),
                                    dict(lower_order_final=False, solver_order=3)])
def test_unipc_step_to_zero_is_finite(config):
    """Pinned deviation: on a last step to sigma = 0 diffusers returns NaN (noise prediction:
    ``sigma' (e^h - 1)`` is ``0 inf``; ``bh1``: ``B(h) = -inf`` times a zero correction) or raises
    (a third-order last step: a singular system). genflow takes the first-order limit there
    (DDIM, ``x' = alpha' x0``); all steps before it equal diffusers'."""
    ref, ours = _pair("UniPCMultistepScheduler", **config)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    actual = _loop(ours, 8, _toy_eps, x_T)
    expected = []
    ref.set_timesteps(8)
    x = x_T
    try:
        for j, t in enumerate(ref.timesteps):
            x = ref.step(_toy_eps(x, t, *_alpha_sigma(ref, j)), t, x).prev_sample
            expected.append(x)
        assert not torch.isfinite(expected[-1]).all()
    except torch.linalg.LinAlgError:
        assert len(expected) == 7
    scale = expected[6].abs().max().item()
    torch.testing.assert_close(actual[6], expected[6], rtol=RTOL, atol=RTOL * scale)
    assert torch.isfinite(actual[-1]).all()
    assert actual[-1].abs().max() < 10 * scale


# ---------------------------------------------------------------- DEISMultistepScheduler

@pytest.mark.parametrize("steps", [6, 16])
@pytest.mark.parametrize("order, prediction", list(itertools.product([1, 2, 3], ["epsilon", "sample", "v_prediction"])))
def test_deis_equals_diffusers(order, prediction, steps):
    _compare("DEISMultistepScheduler", dict(solver_order=order, prediction_type=prediction), steps)


@pytest.mark.parametrize("config", [
    dict(use_karras_sigmas=True), dict(lower_order_final=False, solver_order=3),
    dict(timestep_spacing="leading", steps_offset=1), dict(timestep_spacing="trailing", solver_order=3),
    dict(thresholding=True, sample_max_value=1.2, prediction_type="sample"), dict(use_exponential_sigmas=True),
    dict(use_beta_sigmas=True), dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0),
], ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_deis_options_equal_diffusers(config):
    for steps in (7, 20):
        _compare("DEISMultistepScheduler", config, steps)


@pytest.mark.parametrize("order", [2, 3])
def test_deis_exact_mixture_model(order):
    """DEIS-3's log-rho coefficients cancel badly in diffusers' float32 (about 5e-4 at 100 steps);
    at 12 steps both agree to 1e-4."""
    _compare("DEISMultistepScheduler", dict(solver_order=order), 12, model="mixture")


# ---------------------------------------------------------------- interface

NAMES = ["DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "UniPCMultistepScheduler",
         "DEISMultistepScheduler"]


@pytest.mark.parametrize("name", NAMES)
def test_config_defaults_are_diffusers(name):
    ref = getattr(diffusers(), name)()
    ours = getattr(compat, name)()
    assert _fields(ours.config) == _fields(ref.config)
    assert ours.order == ref.order and ours.init_noise_sigma == ref.init_noise_sigma
    assert len(ours) == len(ref)
    assert ours.timesteps.dtype == ref.timesteps.dtype
    torch.testing.assert_close(ours.timesteps, ref.timesteps, rtol=0, atol=0)
    torch.testing.assert_close(ours.alphas_cumprod, ref.alphas_cumprod, rtol=0, atol=0)


def test_from_config_swaps_between_schedulers():
    """A UniPC config gives a DPM-Solver with solver_type 'midpoint', a DPM-Solver config a DEIS
    with algorithm 'deis', as diffusers maps them."""
    D = diffusers()
    base = D.UniPCMultistepScheduler(beta_schedule="scaled_linear", solver_order=3)
    for name in NAMES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = getattr(D, name).from_config(base.config)
        ours = getattr(compat, name).from_config(base.config)
        assert _fields(ours.config) == _fields(ref.config)
    ours = compat.DEISMultistepScheduler.from_config(compat.DPMSolverMultistepScheduler(solver_type="heun"))
    assert (ours.config.algorithm_type, ours.config.solver_type) == ("deis", "logrho")


@pytest.mark.filterwarnings("ignore:final_sigmas_type")
@pytest.mark.parametrize("name", NAMES)
def test_add_noise_equals_diffusers(name):
    ref, ours = _pair(name, **({} if name == "DEISMultistepScheduler" else {"use_karras_sigmas": True}))
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    for s in (ref, ours):
        s.set_timesteps(10)
    ts = ref.timesteps[[0, 4, 7]]
    torch.testing.assert_close(ours.add_noise(x0, noise, ts), ref.add_noise(x0, noise, ts), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.add_noise(x0, noise, ts[1:2]), ref.add_noise(x0, noise, ts[1:2]),
                               rtol=1e-5, atol=1e-5)
    for s in (ref, ours):  # image-to-image: the pipeline sets begin_index first
        s.set_begin_index(3)
    torch.testing.assert_close(ours.add_noise(x0, noise, ts), ref.add_noise(x0, noise, ts), rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:final_sigmas_type")
@pytest.mark.parametrize("name", NAMES)
def test_two_step_loop_with_tuples(name):
    """A pipeline-free two-step loop with ``return_dict=False`` and a begin index."""
    ref, ours = _pair(name, solver_order=2)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    results = []
    for s in (ref, ours):
        s.set_timesteps(6)
        s.set_begin_index(4)
        y = x
        for t in s.timesteps[4:]:
            out = s.step(torch.tanh(y), t, y, return_dict=False)
            assert isinstance(out, tuple) and len(out) == 1
            y = out[0]
        assert s.step_index == 6
        results.append(y)
    torch.testing.assert_close(results[1], results[0], rtol=RTOL, atol=RTOL)


def test_each_step_is_one_fused_call(monkeypatch):
    """DPM-Solver++(3M): one fused update per step, plus one that keeps x0 for the later steps."""
    from genflow.compat.diffusers import _multistep

    calls = []
    real = _multistep.fused_planned  # (x, terms, (kept, coef)): count the terms the op reads
    monkeypatch.setattr(_multistep, "fused_planned", lambda *a: calls.append(sum(a[2][0])) or real(*a))
    s = compat.DPMSolverMultistepScheduler(solver_order=3)
    s.set_timesteps(6)
    x = torch.randn(SHAPE)
    for t in s.timesteps:
        x = s.step(torch.tanh(x), t, x).prev_sample
    assert calls == [1, 1, 1, 2, 1, 3, 1, 3, 1, 2, 1]  # materialise x0, update (orders 1 2 3 3 2 1)
    calls.clear()
    s.set_timesteps(20)
    for t in s.timesteps[:4]:
        x = s.step(torch.tanh(x), t, x).prev_sample
    assert calls == [1, 1, 1, 2, 1, 3, 1, 3]  # the update reads x0 and the history: orders 1, 2, 3, 3


@pytest.mark.parametrize("name, kwargs, error, match", [
    ("DPMSolverMultistepScheduler", dict(solver_orders=2), TypeError, "solver_orders"),
    ("DPMSolverMultistepScheduler", dict(solver_order=4), ValueError, "solver_order"),
    ("DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver"), ValueError, "final_sigmas_type"),
    ("DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver", solver_order=3,
                                         final_sigmas_type="sigma_min"), ValueError, "solver_order"),
    ("DPMSolverMultistepScheduler", dict(algorithm_type="ddim"), ValueError, "algorithm_type"),
    ("DPMSolverSinglestepScheduler", dict(algorithm_type="sde-dpmsolver"), ValueError, "algorithm_type"),
    ("UniPCMultistepScheduler", dict(solver_type="bh3"), ValueError, "solver_type"),
    ("UniPCMultistepScheduler", dict(prediction_type="noise"), ValueError, "prediction_type"),
    ("DEISMultistepScheduler", dict(use_karras_sigmas=True, use_beta_sigmas=True), ValueError, "exclusive"),
    ("DEISMultistepScheduler", dict(timestep_spacing="uniform"), ValueError, "timestep_spacing"),
])
def test_bad_configs_raise(name, kwargs, error, match):
    with pytest.raises(error, match=match):
        getattr(compat, name)(**kwargs)


def test_bad_calls_raise():
    s = compat.DPMSolverMultistepScheduler(use_karras_sigmas=True)
    x = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="set_timesteps"):
        s.step(x, 999, x)
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        s.set_timesteps(timesteps=[999, 500, 10])
    with pytest.raises(ValueError, match="exactly one"):
        s.set_timesteps()
    with pytest.raises(ValueError, match="use_flow_sigmas"):
        compat.UniPCMultistepScheduler().set_timesteps(sigmas=[0.9, 0.5])
    with pytest.raises(ValueError, match="mu"):
        compat.UniPCMultistepScheduler(use_flow_sigmas=True, use_dynamic_shifting=True).set_timesteps(5)


# ---------------------------------------------------------------- the native coefficient functions

def test_dpm_weights_variants_pin_diffusers_sign():
    """``variant="diffusers"`` differs from the paper's (``"reference"``) only with churn, by
    ``-alpha'`` in the ``D2`` weight (diffusers' sde-dpmsolver++ third order); ``"taylor"``
    doubles the reference ``D2`` weight."""
    from genflow.solvers.dpm_solver import dpm_weights

    args = (0.37, 0.8, 0.6, 0.9, 0.45)
    ref = dpm_weights(*args, eta=1.0, variant="reference")
    ours = dpm_weights(*args, eta=1.0, variant="diffusers")
    assert ours[:4] == ref[:4] and ours[5] == ref[5]
    assert ours[4] == pytest.approx(ref[4] - args[3], rel=1e-12)
    assert dpm_weights(*args, variant="diffusers") == dpm_weights(*args, variant="reference")
    assert dpm_weights(*args, variant="taylor")[4] == pytest.approx(2 * dpm_weights(*args, variant="reference")[4])
    with pytest.raises(ValueError, match="variant"):
        dpm_weights(*args, variant="paper")
    with pytest.raises(ValueError, match="eta"):
        dpm_weights(*args, data_prediction=False, eta=0.5)


@pytest.mark.parametrize("order, eta, solver_type", [(1, 0.0, "midpoint"), (2, 0.0, "heun"), (2, 1.0, "midpoint"),
                                                     (3, 0.0, "midpoint"), (3, 1.0, "heun")])
def test_dpm_multistep_coefficients_match_closed_forms(order, eta, solver_type):
    """Against diffusers' formulas written out for data prediction (Lu et al. 2022b), variant reference."""
    from genflow.solvers.dpm_solver import dpm_multistep_coefficients

    h, h0, h1 = 0.31, 0.27, 0.22
    a0, s0, a1, s1 = 0.8, 0.6, 0.9, 0.9 * 0.6 / 0.8 * math.exp(-h)
    coefs, scale = dpm_multistep_coefficients(h, [h0, h1][:order - 1], a0, s0, a1, s1, eta=eta,
                                              solver_type=solver_type, variant="reference")
    H = (1 + eta) * h
    E = -math.expm1(-H)
    assert coefs[0] == pytest.approx(s1 / s0 * math.exp(-eta * h), rel=1e-12)
    assert scale == pytest.approx(s1 * math.sqrt(-math.expm1(-2 * eta * h)), rel=1e-12)
    phi2 = 1 - E / H
    w1 = a1 * (E / 2 if solver_type == "midpoint" and order == 2 else phi2)
    w2 = -a1 * (phi2 / H - 0.5)
    if order == 1:
        expected = [a1 * E]
    elif order == 2:
        r0 = h0 / h
        expected = [a1 * E + w1 / r0, -w1 / r0]
    else:
        r0, r1 = h0 / h, h1 / h
        d10, d11 = np.array([1 / r0, -1 / r0, 0]), np.array([0, 1 / r1, -1 / r1])
        expected = a1 * E * np.eye(3)[0] + w1 * (d10 + r0 / (r0 + r1) * (d10 - d11)) + w2 * (d10 - d11) / (r0 + r1)
    np.testing.assert_allclose(coefs[1:], expected, rtol=1e-12)


def test_unipc_and_deis_coefficient_functions_are_the_natives():
    """The compat schedulers and the native solvers share one formula each."""
    from genflow.compat.diffusers import deis as compat_deis, unipc as compat_unipc
    from genflow.solvers import deis, unipc

    assert compat_unipc.unipc_coefficients is unipc.unipc_coefficients
    assert compat_deis.deis_coefficients is deis.deis_coefficients
    c = deis.deis_coefficients(0.0, [0.3, 0.5])  # a zero-length step is the identity
    assert c == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="nodes"):
        deis.deis_coefficients(0.1, [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="variant"):
        unipc.unipc_coefficients(0.1, [], 1.0, 1.0, corrector=False, variant="bh3")


def test_dpm_weights_per_sample_tensors_equal_floats():
    """Per-sample [B] tensors (genflow's per-sample grids) give each sample's float weights."""
    from genflow.solvers.dpm_solver import dpm_weights

    hs, a0, s0, a1, s1 = [0.2, 0.5], [0.8, 0.7], [0.6, 0.71], [0.9, 0.85], [0.43, 0.5]
    for eta, variant in [(0.0, "taylor"), (1.0, "diffusers")]:
        as_tensor = [torch.tensor(v, dtype=torch.float64) for v in (hs, a0, s0, a1, s1)]
        batched = dpm_weights(*as_tensor, eta=eta, variant=variant)
        for b in range(2):
            single = dpm_weights(hs[b], a0[b], s0[b], a1[b], s1[b], eta=eta, variant=variant)
            for w_batch, w in zip(batched, single):
                w_batch = torch.as_tensor(w_batch, dtype=torch.float64).expand(2)  # s = 0.0 stays a float
                assert float(w_batch[b]) == pytest.approx(w, rel=1e-12, abs=1e-15)
