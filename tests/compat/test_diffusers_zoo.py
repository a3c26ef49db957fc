"""``gf.compat.diffusers``, the rest of the zoo, against the installed diffusers 0.42.1: KDPM2,
KDPM2 ancestral, ...

Each case builds diffusers' scheduler, ours from its config (``from_config``), runs diffusers'
standard loop (``set_timesteps``, ``init_noise_sigma``, ``scale_model_input``, ``step``, with the same
seeded generator for the stochastic ones) on the same deterministic toy network and latents, and
requires bitwise-equal ``timesteps`` (values and dtype) and grid tables (``sigmas`` and the class's
other tables), and model inputs, ``prev_sample`` and ``pred_original_sample`` equal at every step to
1e-4 relative (float32).
"""
import copy
import math

import pytest
import torch

import genflow as gf

from ..peers import diffusers

RTOL = 1e-4
SHAPE = (2, 3, 5, 7)


def _assert_rel(actual, expected, rtol=RTOL, what=""):
    """``|a - e| <= rtol (|e| + max|e|)``: relative, with the scale of the batch."""
    assert actual.shape == expected.shape, what
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual.to(expected.dtype), expected, rtol=rtol, atol=rtol * max(scale, 1e-12),
                               msg=lambda m: f"{what}: {m}")


def _net(x, t):
    """A deterministic smooth toy 'network' of (x, t) with O(1) outputs."""
    t = float(t)
    return torch.tanh(0.7 * x * math.cos(0.003 * t) + 0.2 * x.roll(1, dims=-1)) + 0.05 * math.sin(0.01 * t)


def _latents(seed=0):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


_BUILT = {}  # (name, config text) -> (diffusers', ours): some build a 1000-step grid (slow), so once


def _pair(name, **config):
    """diffusers' ``name`` on ``config`` and ours from its config (fresh copies)."""
    key = (name, repr(sorted(config.items())))
    if key not in _BUILT:
        ref = getattr(diffusers(), name)(**config)
        _BUILT[key] = ref, getattr(gf.compat.diffusers, name).from_config(ref.config)
    return copy.deepcopy(_BUILT[key])


def _loop(scheduler, steps, *, stochastic, set_kwargs=None, **step_kwargs):
    """diffusers' standard loop; the model inputs, new samples and x0 predictions of every step."""
    if steps is None:
        scheduler.set_timesteps(**set_kwargs)
    else:
        scheduler.set_timesteps(steps, **(set_kwargs or {}))
    x = _latents() * getattr(scheduler, "init_noise_sigma", 1.0)  # flow matching has none
    if stochastic:
        step_kwargs["generator"] = torch.Generator().manual_seed(1)
    inputs, prevs, x0s = [], [], []
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        out = scheduler.step(_net(inp, t), t, x, **step_kwargs)
        x = out.prev_sample
        inputs.append(inp)
        prevs.append(x)
        x0s.append(getattr(out, "pred_original_sample", None))
    return inputs, prevs, x0s


def _compare(name, config, steps, *, stochastic=False, tables=("sigmas",), set_kwargs=None, **step_kwargs):
    """The loop of diffusers' ``name`` and ours on ``config``; returns our final sample."""
    ref, ours = _pair(name, **config)
    r = _loop(ref, steps, stochastic=stochastic, set_kwargs=set_kwargs, **step_kwargs)
    o = _loop(ours, steps, stochastic=stochastic, set_kwargs=set_kwargs, **step_kwargs)
    assert ours.timesteps.dtype == ref.timesteps.dtype
    torch.testing.assert_close(ours.timesteps, ref.timesteps, rtol=0, atol=0, equal_nan=True)
    for table in tables:
        torch.testing.assert_close(getattr(ours, table), getattr(ref, table), rtol=0, atol=0, equal_nan=True,
                                   msg=table)
    if hasattr(ref, "init_noise_sigma"):
        torch.testing.assert_close(torch.as_tensor(ours.init_noise_sigma), torch.as_tensor(ref.init_noise_sigma),
                                   rtol=0, atol=0)
    assert len(r[1]) == len(o[1])
    for i, (ri, rp, rx, oi, op, ox) in enumerate(zip(*r, *o)):
        _assert_rel(oi, ri, what=f"model input {i}")
        _assert_rel(op, rp, what=f"prev_sample {i}")
        if rx is not None:
            _assert_rel(ox, rx, what=f"pred_original_sample {i}")
    return o[1][-1]


# ------------------------------------------------------------------ KDPM2, KDPM2 ancestral

KDPM2_CONFIGS = [  # diffusers builds a 1000-level grid in Python at construction (seconds): few configs
    {"prediction_type": "v_prediction", "timestep_spacing": "trailing"},
    {"use_karras_sigmas": True, "beta_schedule": "scaled_linear"},
    {"use_exponential_sigmas": True, "timestep_spacing": "leading", "steps_offset": 1},
    {"use_beta_sigmas": True, "prediction_type": "v_prediction"},
]


@pytest.mark.parametrize("config", KDPM2_CONFIGS + [{"beta_schedule": "squaredcos_cap_v2"}, {}])
def test_kdpm2_equals_diffusers(config):
    for steps in (1, 2, 7):
        _compare("KDPM2DiscreteScheduler", config, steps, tables=("sigmas", "sigmas_interpol"))


@pytest.mark.parametrize("config", KDPM2_CONFIGS)  # squaredcos_cap_v2: diffusers' own loop gives NaN
def test_kdpm2_ancestral_equals_diffusers(config):
    for steps in (1, 2, 7):
        _compare("KDPM2AncestralDiscreteScheduler", config, steps, stochastic=True,
                 tables=("sigmas", "sigmas_interpol", "sigmas_up", "sigmas_down"))


@pytest.mark.parametrize("name", ["KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler"])
def test_kdpm2_config_round_trip_and_errors(name):
    ref, ours = _pair(name, **KDPM2_CONFIGS[1])
    assert {k: v for k, v in ours.config.items() if not k.startswith("_")} == {
        k: v for k, v in ref.config.items() if not k.startswith("_")}
    again = type(ours).from_config(ours.config)
    assert again.config == ours.config
    cls = getattr(gf.compat.diffusers, name)
    with pytest.raises(ValueError, match="prediction_type"):
        cls(prediction_type="sample")
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        cls(use_karras_sigmas=True, use_beta_sigmas=True)
    with pytest.raises(ValueError, match="beta_schedule"):
        cls(beta_schedule="laplace")


# ------------------------------------------------------------------ EDM Euler, EDM DPM-Solver++

EDM_CONFIGS = [
    {},
    {"prediction_type": "v_prediction", "sigma_data": 1.0},
    {"sigma_schedule": "exponential"},
    {"final_sigmas_type": "sigma_min", "rho": 5.0, "sigma_max": 14.6},
]


@pytest.mark.parametrize("config", EDM_CONFIGS)
@pytest.mark.parametrize("steps", [1, 5, 12])
def test_edm_euler_equals_diffusers(config, steps):
    _compare("EDMEulerScheduler", config, steps)


def test_edm_euler_churn_and_custom_ramp():
    _compare("EDMEulerScheduler", {}, 9, stochastic=True, s_churn=2.0, s_tmin=0.05, s_tmax=50.0)
    ramp = [0.0, 0.2, 0.45, 0.7, 1.0]
    ref, ours = _pair("EDMEulerScheduler", sigma_schedule="karras")
    ref.set_timesteps(sigmas=torch.tensor(ramp))
    ours.set_timesteps(sigmas=ramp)
    torch.testing.assert_close(ours.sigmas, ref.sigmas, rtol=0, atol=0)
    torch.testing.assert_close(ours.timesteps, ref.timesteps, rtol=0, atol=0)


EDM_DPM_CONFIGS = [
    {},
    {"solver_order": 3},
    {"solver_order": 3, "lower_order_final": False, "prediction_type": "v_prediction"},
    {"solver_type": "heun", "sigma_schedule": "exponential"},
    {"solver_order": 1, "final_sigmas_type": "sigma_min"},
    {"euler_at_final": True, "final_sigmas_type": "sigma_min", "solver_order": 3},
    {"thresholding": True, "sample_max_value": 2.0},
]


@pytest.mark.parametrize("config", EDM_DPM_CONFIGS)
@pytest.mark.parametrize("steps", [1, 6, 17])
def test_edm_dpm_solver_equals_diffusers(config, steps):
    _compare("EDMDPMSolverMultistepScheduler", config, steps)


@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
def test_edm_dpm_solver_sde_equals_diffusers(solver_type):
    _compare("EDMDPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_type": solver_type},
             9, stochastic=True)


def test_edm_add_noise_config_and_errors():
    for name in ("EDMEulerScheduler", "EDMDPMSolverMultistepScheduler"):
        ref, ours = _pair(name, sigma_max=20.0)
        ref.set_timesteps(6)
        ours.set_timesteps(6)
        x0, noise = _latents(3), _latents(4)
        t = ref.timesteps[[2, 4]]
        torch.testing.assert_close(ours.add_noise(x0[:2], noise[:2], t), ref.add_noise(x0[:2], noise[:2], t))
        assert type(ours).from_config(ours.config).config == ours.config
    with pytest.raises(ValueError, match="sigma_schedule"):
        gf.compat.diffusers.EDMEulerScheduler(sigma_schedule="linear")
    with pytest.raises(ValueError, match="solver_order=3"):
        gf.compat.diffusers.EDMDPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=3)
    with pytest.raises(ValueError, match="prediction_type"):
        gf.compat.diffusers.EDMDPMSolverMultistepScheduler(prediction_type="sample")
    with pytest.raises(ValueError, match="integer"):
        s = gf.compat.diffusers.EDMEulerScheduler()
        s.set_timesteps(4)
        s.step(torch.zeros(SHAPE), 3, torch.zeros(SHAPE))


# ------------------------------------------------------------------ inversion: DDIM, DPM-Solver multistep

@pytest.mark.parametrize("config", [
    {},
    {"prediction_type": "v_prediction", "clip_sample": False, "timestep_spacing": "trailing"},
    {"prediction_type": "sample", "set_alpha_to_one": False, "steps_offset": 1},
    {"beta_schedule": "scaled_linear", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing",
     "prediction_type": "v_prediction"},
])
@pytest.mark.parametrize("steps", [1, 7, 50])
def test_ddim_inverse_equals_diffusers(config, steps):
    _compare("DDIMInverseScheduler", config, steps, tables=())


DPM_INVERSE_CONFIGS = [
    {},
    {"solver_order": 3, "prediction_type": "v_prediction"},
    {"algorithm_type": "dpmsolver", "solver_type": "heun", "prediction_type": "sample"},
    {"use_karras_sigmas": True, "solver_order": 3},
    {"use_exponential_sigmas": True, "solver_type": "heun"},
    {"lower_order_final": False, "solver_order": 3},
    {"use_beta_sigmas": True, "timestep_spacing": "leading", "steps_offset": 1},
    {"use_flow_sigmas": True, "flow_shift": 3.0, "prediction_type": "flow_prediction"},
    {"timestep_spacing": "trailing", "lambda_min_clipped": -5.1, "euler_at_final": True},
    {"thresholding": True, "prediction_type": "sample", "sample_max_value": 1.5},
]


@pytest.mark.parametrize("config", DPM_INVERSE_CONFIGS)
def test_dpm_multistep_inverse_equals_diffusers(config):
    for steps in (1, 6, 14):
        _compare("DPMSolverMultistepInverseScheduler", config, steps)


def test_dpm_multistep_inverse_zero_length_last_step_is_identity():
    """Pinned deviation: a Karras grid repeats its last sigma, so the last step has h = 0; diffusers'
    third-order step divides by h there (NaN), ours is the identity (the exact solution)."""
    ref, ours = _pair("DPMSolverMultistepInverseScheduler", use_karras_sigmas=True, solver_order=3)
    r, o = _loop(ref, 19, stochastic=False)[1], _loop(ours, 19, stochastic=False)[1]
    assert ref.sigmas[-1] == ref.sigmas[-2] and torch.isnan(r[-1]).all()
    for i in range(len(r) - 1):
        _assert_rel(o[i], r[i], what=f"prev_sample {i}")
    torch.testing.assert_close(o[-1], o[-2], rtol=0, atol=0)


@pytest.mark.parametrize("algorithm", ["sde-dpmsolver++", "sde-dpmsolver"])
def test_dpm_multistep_inverse_sde_raises_where_diffusers_gives_nan(algorithm):
    """Pinned deviation: toward noise (h < 0) the SDE noise scale is imaginary; diffusers' loop gives
    NaN from its first step, ours raises at set_timesteps naming algorithm_type."""
    ref, ours = _pair("DPMSolverMultistepInverseScheduler", algorithm_type=algorithm)
    assert torch.isnan(_loop(ref, 4, stochastic=True)[1][0]).all()
    with pytest.raises(ValueError, match="algorithm_type"):
        ours.set_timesteps(4)


def test_inverse_config_round_trip_and_errors():
    for name in ("DDIMInverseScheduler", "DPMSolverMultistepInverseScheduler"):
        ref, ours = _pair(name, beta_schedule="scaled_linear")
        assert {k: v for k, v in ours.config.items() if not k.startswith("_")} == {
            k: v for k, v in ref.config.items() if not k.startswith("_")}
        assert type(ours).from_config(ours.config).config == ours.config
    ref, ours = _pair("DPMSolverMultistepInverseScheduler")
    ref.set_timesteps(6)
    ours.set_timesteps(6)
    x0, noise = _latents(3)[:2], _latents(4)[:2]
    t = ref.timesteps[[1, 4]]
    _assert_rel(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t))
    with pytest.raises(ValueError, match="timestep_spacing"):
        gf.compat.diffusers.DDIMInverseScheduler(timestep_spacing="linspace")
    with pytest.raises(ValueError, match="algorithm_type"):
        gf.compat.diffusers.DPMSolverMultistepInverseScheduler(algorithm_type="unipc")


# ------------------------------------------------------------------ flow-match Heun

@pytest.mark.parametrize("config", [{}, {"shift": 3.0}, {"shift": 0.7, "num_train_timesteps": 500}])
@pytest.mark.parametrize("steps", [1, 2, 9])
def test_flow_match_heun_equals_diffusers(config, steps):
    _compare("FlowMatchHeunDiscreteScheduler", config, steps)


def test_flow_match_heun_churn_scale_noise_and_errors():
    _compare("FlowMatchHeunDiscreteScheduler", {"shift": 2.0}, 7, stochastic=True, s_churn=1.5, s_tmin=0.2)
    ref, ours = _pair("FlowMatchHeunDiscreteScheduler", shift=2.0)
    ref.set_timesteps(5)
    ours.set_timesteps(5)
    t = ref.timesteps[3]
    _assert_rel(ours.scale_noise(_latents(3), t, _latents(4)), ref.scale_noise(_latents(3), t, _latents(4)))
    with pytest.raises(ValueError, match="integer"):
        ours.step(_latents(), 3, _latents())
    assert type(ours).from_config(ref.config).config == ours.config


# ------------------------------------------------------------------ PNDM, iPNDM

@pytest.mark.parametrize("config", [
    {},
    {"skip_prk_steps": True},
    {"prediction_type": "v_prediction", "set_alpha_to_one": True, "timestep_spacing": "trailing"},
    {"skip_prk_steps": True, "prediction_type": "v_prediction", "timestep_spacing": "linspace",
     "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    {"steps_offset": 1, "beta_schedule": "squaredcos_cap_v2"},
])
@pytest.mark.parametrize("steps", [4, 11, 50])
def test_pndm_equals_diffusers(config, steps):
    _compare("PNDMScheduler", config, steps, tables=())


def test_pndm_errors_and_config():
    ref, ours = _pair("PNDMScheduler", skip_prk_steps=True)
    assert type(ours).from_config(ours.config).config == ours.config
    ours = gf.compat.diffusers.PNDMScheduler()
    ours.set_timesteps(10)
    with pytest.raises(ValueError, match="Runge-Kutta"):
        ours.step_plms(_latents(), ours.timesteps[0], _latents())
    with pytest.raises(ValueError, match="prediction_type"):
        gf.compat.diffusers.PNDMScheduler(prediction_type="sample")


@pytest.mark.parametrize("steps", [1, 2, 5, 23])
def test_ipndm_equals_diffusers(steps):
    _compare("IPNDMScheduler", {}, steps, tables=("betas", "alphas"))


def test_ipndm_trained_betas():
    n = 6
    betas = torch.linspace(0.99, 0.0, n + 1).tolist()
    _compare("IPNDMScheduler", {"trained_betas": betas}, n, tables=("betas", "alphas"))


# ------------------------------------------------------------------ cosine DPM-Solver (SDE, Brownian tree)

@pytest.mark.parametrize("config", [
    {},
    {"solver_type": "heun", "sigma_schedule": "karras"},
    {"solver_order": 1, "prediction_type": "epsilon", "sigma_data": 0.5},
    {"euler_at_final": True, "lower_order_final": False, "sigma_max": 80.0},
])  # final_sigmas_type="sigma_min": diffusers' last noise query is [0.3, 0.3], which torchsde cannot split
@pytest.mark.parametrize("steps", [1, 6, 16])
def test_cosine_dpm_solver_equals_diffusers(config, steps):
    """The same Brownian path (torchsde's tree, seeded by the generator's initial seed) on both sides."""
    _compare("CosineDPMSolverMultistepScheduler", config, steps, stochastic=True)


def test_cosine_dpm_solver_config_and_errors():
    ref, ours = _pair("CosineDPMSolverMultistepScheduler")
    assert {k: v for k, v in ours.config.items() if not k.startswith("_")} == {
        k: v for k, v in ref.config.items() if not k.startswith("_")}
    with pytest.raises(ValueError, match="solver_order"):
        gf.compat.diffusers.CosineDPMSolverMultistepScheduler(solver_order=3)


# ------------------------------------------------------------------ LCM, TCD

def _consistency_loop(scheduler, steps, set_kwargs=None, **step_kwargs):
    scheduler.set_timesteps(steps, **(set_kwargs or {})) if steps else scheduler.set_timesteps(**set_kwargs)
    x, gen, outs = _latents(), torch.Generator().manual_seed(5), []
    for t in scheduler.timesteps:
        out = scheduler.step(_net(x, t), t, x, generator=gen, **step_kwargs)
        x = out.prev_sample
        outs.append(out.to_tuple())
    return outs


CONSISTENCY_CONFIGS = [
    {},
    {"prediction_type": "v_prediction", "beta_schedule": "linear", "set_alpha_to_one": False},
    {"prediction_type": "sample", "clip_sample": True, "clip_sample_range": 0.8},
    {"thresholding": True, "sample_max_value": 1.2, "timestep_scaling": 4.0},
    {"rescale_betas_zero_snr": True, "original_inference_steps": 100, "prediction_type": "v_prediction"},
]


@pytest.mark.parametrize("name", ["LCMScheduler", "TCDScheduler"])
@pytest.mark.parametrize("config", CONSISTENCY_CONFIGS)
def test_consistency_schedulers_equal_diffusers(name, config):
    cases = [(1, None), (4, None), (7, None), (4, {"strength": 0.6}), (3, {"original_inference_steps": 20}),
             (None, {"timesteps": [999, 759, 499, 259]}), (None, {"timesteps": [899, 699, 400, 99], "strength": 0.5})]
    step_kwargs = [{}] if name == "LCMScheduler" else [{}, {"eta": 0.0}, {"eta": 1.0}]
    for steps, set_kwargs in cases:
        for kwargs in step_kwargs:
            ref, ours = _pair(name, **config)
            r = _consistency_loop(ref, steps, set_kwargs, **kwargs)
            o = _consistency_loop(ours, steps, set_kwargs, **kwargs)
            torch.testing.assert_close(ours.timesteps, ref.timesteps, rtol=0, atol=0)
            assert len(r) == len(o)
            for i, (rt, ot) in enumerate(zip(r, o)):
                for k, (a, b) in enumerate(zip(ot, rt)):
                    _assert_rel(a, b, what=f"{steps} {set_kwargs} {kwargs} step {i} field {k}")


def test_consistency_outputs_and_errors():
    ref, ours = _pair("LCMScheduler")
    ours.set_timesteps(4)
    out = ours.step(_latents(), ours.timesteps[0], _latents(1), generator=torch.Generator().manual_seed(0))
    assert out.keys() == ["prev_sample", "denoised"] and out[1] is out.denoised and len(out) == 2
    _, tcd = _pair("TCDScheduler")
    tcd.set_timesteps(4)
    out = tcd.step(_latents(), tcd.timesteps[0], _latents(1), generator=torch.Generator().manual_seed(0))
    assert out.keys() == ["prev_sample", "pred_noised_sample"] and out["pred_noised_sample"] is out[1]
    with pytest.raises(ValueError, match="eta"):
        tcd.step(_latents(), tcd.timesteps[1], _latents(1), eta=1.5)
    with pytest.raises(ValueError, match="num_inference_steps"):
        ours.set_timesteps(60)
    with pytest.raises(ValueError, match="decreasing"):
        ours.set_timesteps(timesteps=[10, 500])


# ------------------------------------------------------------------ DPM-Solver SDE (Brownian tree)

@pytest.mark.parametrize("config", [
    {"noise_sampler_seed": 3},
    {"noise_sampler_seed": 3, "prediction_type": "v_prediction", "use_karras_sigmas": True},
    {"noise_sampler_seed": 11, "use_exponential_sigmas": True, "beta_schedule": "scaled_linear"},
    {"noise_sampler_seed": 5, "timestep_spacing": "leading", "steps_offset": 1},
    {"noise_sampler_seed": 5, "timestep_spacing": "trailing", "use_beta_sigmas": True},
])
def test_dpm_solver_sde_equals_diffusers(config):
    """The same torchsde Brownian path (noise_sampler_seed) on both sides: equal to float32 rounding."""
    for steps in (1, 2, 7):
        _compare("DPMSolverSDEScheduler", config, steps)


def test_dpm_solver_sde_global_seed_and_s_noise():
    """noise_sampler_seed=None draws the path's seed from torch's global RNG, as diffusers."""
    ref, ours = _pair("DPMSolverSDEScheduler")
    torch.manual_seed(0)
    r = _loop(ref, 5, stochastic=False, s_noise=0.7)[1]
    torch.manual_seed(0)
    o = _loop(ours, 5, stochastic=False, s_noise=0.7)[1]
    for i, (a, b) in enumerate(zip(o, r)):
        _assert_rel(a, b, what=f"prev_sample {i}")


# ------------------------------------------------------------------ DDIM / DDPM parallel

PARALLEL_CONFIGS = [
    {},
    {"prediction_type": "v_prediction", "clip_sample": False, "timestep_spacing": "trailing"},
    {"prediction_type": "sample", "thresholding": True, "sample_max_value": 1.5},
    {"beta_schedule": "scaled_linear", "rescale_betas_zero_snr": True, "prediction_type": "v_prediction",
     "timestep_spacing": "linspace"},
]


@pytest.mark.parametrize("name", ["DDIMParallelScheduler", "DDPMParallelScheduler"])
@pytest.mark.parametrize("config", PARALLEL_CONFIGS)
def test_parallel_schedulers_equal_diffusers(name, config):
    stochastic = name == "DDPMParallelScheduler"
    for steps in (1, 9):
        _compare(name, config, steps, stochastic=stochastic, tables=())
    ref, ours = _pair(name, **config)
    ref.set_timesteps(10)
    ours.set_timesteps(10)
    x, t = _latents(), ref.timesteps[[0, 3]]
    out = _net(x, 500)
    kwargs = [{}, {"use_clipped_model_output": True}] if name == "DDIMParallelScheduler" else [{}]
    for kw in kwargs:
        _assert_rel(ours.batch_step_no_noise(out, t, x, **kw), ref.batch_step_no_noise(out, t, x, **kw), what=str(kw))
    ref_last, ours_last = ref.timesteps[[9, 8]], ours.timesteps[[9, 8]]  # the last step: abar_prev = 1
    _assert_rel(ours.batch_step_no_noise(out, ours_last, x), ref.batch_step_no_noise(out, ref_last, x))


def test_parallel_errors():
    s = gf.compat.diffusers.DDIMParallelScheduler()
    with pytest.raises(ValueError, match="set_timesteps"):
        s.batch_step_no_noise(_latents(), torch.tensor([10, 20]), _latents())
    s.set_timesteps(5)
    with pytest.raises(ValueError, match="eta"):
        s.batch_step_no_noise(_latents(), s.timesteps[:2], _latents(), eta=0.5)
    with pytest.raises(ValueError, match="one timestep per sample"):
        s.batch_step_no_noise(_latents(), s.timesteps[:3], _latents())


# ------------------------------------------------------------------ SA-Solver

SA_CONFIGS = [
    {},
    {"predictor_order": 3, "corrector_order": 4, "prediction_type": "v_prediction"},
    {"predictor_order": 1, "corrector_order": 1, "use_karras_sigmas": True},
    {"predictor_order": 2, "corrector_order": 3, "lower_order_final": False, "timestep_spacing": "trailing"},
    {"use_flow_sigmas": True, "flow_shift": 3.0, "prediction_type": "flow_prediction"},
    {"thresholding": True, "prediction_type": "sample", "use_exponential_sigmas": True},
]


@pytest.mark.parametrize("config", SA_CONFIGS)
def test_sa_solver_equals_diffusers(config):
    for steps in (1, 5, 12):
        _compare("SASolverScheduler", config, steps, stochastic=True)


def test_sa_solver_second_order_shift_is_pinned_and_tau_func():
    """diffusers' order-2 shift (not in Xue et al.): needed to match diffusers, and O(h^2)."""
    shift = gf.compat.diffusers.sa_solver.diffusers_second_order_shift
    for predictor in (True, False):
        small, smaller = (abs(shift(h, 1.0, 0.9, predictor, h)) for h in (1e-2, 5e-3))
        assert math.isclose(small / smaller, 4.0, rel_tol=0.05)
        assert math.isclose(shift(1e-3, 1.0, 0.9, predictor, 1e-3), 4 * 0.9 * 1e-6 / 6, rel_tol=0.01)
    ref, ours = _pair("SASolverScheduler")
    r = _loop(ref, 6, stochastic=True)[1]
    original = gf.compat.diffusers.sa_solver.diffusers_second_order_shift
    gf.compat.diffusers.sa_solver.diffusers_second_order_shift = lambda *args: 0.0
    try:
        o = _loop(ours, 6, stochastic=True)[1]
    finally:
        gf.compat.diffusers.sa_solver.diffusers_second_order_shift = original
    assert (o[-1] - r[-1]).abs().max() > 1e-3  # without the shift: Xue et al.'s weights, not diffusers'
    tau = lambda t: 0.5 if t > 300 else 0.0  # noqa: E731
    _compare("SASolverScheduler", {"tau_func": tau, "predictor_order": 3}, 7, stochastic=True)
    with pytest.raises(ValueError, match="algorithm_type"):
        gf.compat.diffusers.SASolverScheduler(algorithm_type="noise_prediction")


# ------------------------------------------------------------------ flow-match LCM

@pytest.mark.parametrize("config, set_kwargs", [
    ({}, None),
    ({"shift": 3.0, "use_karras_sigmas": True}, None),
    ({"use_dynamic_shifting": True}, {"mu": 0.8}),
    ({"invert_sigmas": True}, None),
])
def test_flow_match_lcm_equals_diffusers(config, set_kwargs):
    for steps in (1, 4, 9):
        _compare("FlowMatchLCMScheduler", config, steps, stochastic=True, set_kwargs=set_kwargs)


def test_flow_match_lcm_scale_factors():
    outs = []
    for lib in (diffusers(), gf.compat.diffusers):
        s = lib.FlowMatchLCMScheduler(scale_factors=[1.0, 1.5, 2.0], upscale_mode="bilinear")
        s.set_timesteps(4)
        x, gen = torch.randn(1, 2, 4, 6, generator=torch.Generator().manual_seed(0)), torch.Generator().manual_seed(1)
        for t in s.timesteps:
            x = s.step(torch.tanh(x), t, x, generator=gen).prev_sample
        outs.append(x)
    assert outs[0].shape == (1, 2, 8, 12)
    _assert_rel(outs[1], outs[0])
    with pytest.raises(ValueError, match="scale_factors"):
        s = gf.compat.diffusers.FlowMatchLCMScheduler(scale_factors=[1.0])
        s.set_timesteps(4)
        s.step(_latents(), s.timesteps[0], _latents())


# ------------------------------------------------------------------ consistency models (CM stochastic iterative)

@pytest.mark.parametrize("config", [{}, {"clip_denoised": False, "s_noise": 0.8, "sigma_data": 0.7},
                                    {"num_train_timesteps": 151, "rho": 5.0, "clip_denoised": False}])
def test_cm_stochastic_iterative_equals_diffusers(config):
    for steps in (1, 2, 7):
        _compare("CMStochasticIterativeScheduler", config, steps, stochastic=True)
    _compare("CMStochasticIterativeScheduler", config, None, stochastic=True, set_kwargs={"timesteps": [22, 9, 0]})


# ------------------------------------------------------------------ unCLIP, Würstchen (their pipelines' loops)

@pytest.mark.parametrize("config", [{}, {"prediction_type": "sample", "clip_sample_range": 0.7},
                                    {"variance_type": "learned_range", "clip_sample": False}])
def test_unclip_equals_diffusers(config):
    """The unCLIP pipeline's loop: prev_timestep is the next entry of timesteps (None on the last step)."""
    for steps in (2, 9):
        results = []
        for s in _pair("UnCLIPScheduler", **config):
            s.set_timesteps(steps)
            x, gen, outs = _latents(), torch.Generator().manual_seed(2), []
            for i, t in enumerate(s.timesteps):
                out = _net(x, t)
                if config.get("variance_type") == "learned_range":
                    out = torch.cat([out, torch.tanh(x)], dim=1)
                prev_t = s.timesteps[i + 1] if i + 1 < len(s.timesteps) else None
                x = s.step(out, t, x, prev_timestep=prev_t, generator=gen).prev_sample
                outs.append(x)
            results.append((s.timesteps, outs))
        torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=0)
        for i, (o, r) in enumerate(zip(results[1][1], results[0][1])):
            _assert_rel(o, r, what=f"step {i}")


@pytest.mark.parametrize("config", [{}, {"scaler": 2.0}, {"scaler": 0.5, "s": 0.01}])
def test_wuerstchen_equals_diffusers(config):
    """The Würstchen pipeline's loop: every sample's timestep is the schedule entry (a Tensor[B])."""
    results = []
    for s in _pair("DDPMWuerstchenScheduler", **config):
        s.set_timesteps(6)
        x, gen, outs = _latents(), torch.Generator().manual_seed(2), []
        for t in s.timesteps[:-1]:
            x = s.step(_net(x, t * 1000), t.expand(x.shape[0]), x, generator=gen).prev_sample
            outs.append(x)
        outs.append(s.add_noise(_latents(3), _latents(4), torch.tensor([0.3, 0.8])))
        results.append(outs)
    for i, (o, r) in enumerate(zip(*results[::-1])):
        _assert_rel(o, r, what=f"step {i}")


# ------------------------------------------------------------------ score SDE (VE), predictor-corrector

@pytest.mark.parametrize("config", [{}, {"snr": 0.3, "sigma_max": 50.0, "num_train_timesteps": 100}])
def test_score_sde_ve_equals_diffusers(config):
    """The score-SDE pipeline's loop: correct_steps Langevin corrections, then the predictor."""
    results = []
    for s in _pair("ScoreSdeVeScheduler", **config):
        s.set_timesteps(7)
        s.set_sigmas(7)
        x, gen, outs = _latents() * s.init_noise_sigma, torch.Generator().manual_seed(2), []
        for i, t in enumerate(s.timesteps):
            score = -x / (1.0 + float(s.sigmas[i]) ** 2)
            for _ in range(s.config.correct_steps):
                x = s.step_correct(score, x, generator=gen).prev_sample
            out = s.step_pred(-x / (1.0 + float(s.sigmas[i]) ** 2), t, x, generator=gen)
            x = out.prev_sample
            outs += [x, out.prev_sample_mean]
        outs.append(s.add_noise(_latents(3), _latents(4), torch.tensor([1, 5])))
        results.append(outs)
    for i, (o, r) in enumerate(zip(*results[::-1])):
        _assert_rel(o, r, what=f"output {i}")


# ------------------------------------------------------------------ CogVideoX DDIM / DPM (their pipelines' loops)

COGVIDEOX_CONFIGS = [
    {},
    {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"},
    {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "set_alpha_to_one": False,
     "snr_shift_scale": 1.5, "prediction_type": "sample"},
]


@pytest.mark.parametrize("config", COGVIDEOX_CONFIGS)
def test_cogvideox_ddim_equals_diffusers(config):
    for steps in (1, 8):
        _compare("CogVideoXDDIMScheduler", config, steps, tables=("alphas_cumprod",))


@pytest.mark.parametrize("config", COGVIDEOX_CONFIGS)
def test_cogvideox_dpm_equals_diffusers(config):
    """The CogVideoX pipeline's loop: the previous x0 and timestep go back into step."""
    for steps in (1, 2, 8):
        results = []
        for s in _pair("CogVideoXDPMScheduler", **config):
            s.set_timesteps(steps)
            x, gen, old, outs = _latents(), torch.Generator().manual_seed(2), None, []
            for i, t in enumerate(s.timesteps):
                back = s.timesteps[i - 1] if i > 0 else None
                x, old = s.step(_net(x, t), old, t, back, x, generator=gen, return_dict=False)
                outs += [x, old]
            results.append(outs)
        for i, (o, r) in enumerate(zip(*results[::-1])):
            _assert_rel(o, r, what=f"{steps} steps: output {i}")


@pytest.mark.parametrize("steps, set_kwargs", [(2, None), (4, {"intermediate_timesteps": None}),
                                               (3, {"timesteps": [1.5, 1.0, 0.4, 0.0], "max_timesteps": None,
                                                    "intermediate_timesteps": None})])
def test_scm_equals_diffusers(steps, set_kwargs):
    """The Sana-Sprint loop: one step per entry of timesteps but the last (t = 0)."""
    results = []
    for s in _pair("SCMScheduler", sigma_data=0.7):
        s.set_timesteps(steps, **(set_kwargs or {}))
        x, gen, outs = _latents(), torch.Generator().manual_seed(2), []
        for t in s.timesteps[:-1]:
            out = s.step(_net(x, t * 600), t, x, generator=gen)
            x = out.prev_sample
            outs += [x, out.pred_original_sample]
        results.append((s.timesteps, outs))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=0)
    for i, (o, r) in enumerate(zip(results[1][1], results[0][1])):
        _assert_rel(o, r, what=f"output {i}")


@pytest.mark.parametrize("config, set_kwargs", [({}, None), ({"eta": 0.5, "s_noise": 0.8}, None), ({"eta": 0.0}, None),
                                                ({}, {"sigmas": [1.0, 0.8, 0.55, 0.3, 0.1, 0.0]})])
def test_ltx_euler_ancestral_rf_equals_diffusers(config, set_kwargs):
    steps = 6 if set_kwargs is None else None
    _compare("LTXEulerAncestralRFScheduler", config, steps, stochastic=True, set_kwargs=set_kwargs)


@pytest.mark.parametrize("config, jumps", [({}, (3, 2)), ({"eta": 1.0, "clip_sample": False}, (2, 3)),
                                           ({"eta": 0.5, "num_train_timesteps": 250}, (10, 1))])
def test_repaint_equals_diffusers(config, jumps):
    """The RePaint pipeline's loop: a step when the timestep decreases, else undo_step."""
    mask = (torch.rand(SHAPE[0], 1, *SHAPE[2:], generator=torch.Generator().manual_seed(7)) > 0.5).float()
    original = torch.tanh(_latents(9))
    results = []
    for s in _pair("RePaintScheduler", **config):
        s.set_timesteps(12, jump_length=jumps[0], jump_n_sample=jumps[1])
        x, gen, outs, t_last = _latents(), torch.Generator().manual_seed(2), [], s.timesteps[0] + 1
        for t in s.timesteps:
            if t < t_last:
                out = s.step(_net(x, t), t, x, original, mask, generator=gen)
                x = out.prev_sample
                outs.append(out.pred_original_sample)
            else:
                x = s.undo_step(x, t_last, gen)
            t_last = t
            outs.append(x)
        results.append((s.timesteps, outs))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=0)
    for i, (o, r) in enumerate(zip(results[1][1], results[0][1])):
        _assert_rel(o, r, what=f"output {i}")


# ------------------------------------------------------------------ a swap into a real diffusers pipeline

@pytest.mark.parametrize("name", ["DDPMParallelScheduler", "TCDScheduler", "KDPM2AncestralDiscreteScheduler",
                                  "SASolverScheduler"])
def test_swap_into_ddpm_pipeline(name):
    """``pipe.scheduler = X.from_config(pipe.scheduler.config)`` in diffusers' DDPMPipeline (a tiny
    random UNet): the image equals the one made with diffusers' own X, same generator."""
    D = diffusers()
    torch.manual_seed(0)
    unet = D.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                         down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                         norm_num_groups=4).eval()
    pipe = D.DDPMPipeline(unet=unet, scheduler=D.DDPMScheduler(num_train_timesteps=1000))
    pipe.set_progress_bar_config(disable=True)
    images = []
    for lib in (D, gf.compat.diffusers):
        pipe.scheduler = getattr(lib, name).from_config(pipe.scheduler.config)
        with torch.no_grad():
            images.append(pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=4,
                               output_type="pt").images)
    assert type(pipe.scheduler).__module__.startswith("genflow.compat.diffusers")
    assert torch.isfinite(images[0]).all()
    torch.testing.assert_close(images[1], images[0], rtol=RTOL, atol=RTOL)


# ------------------------------------------------------------------ ownership in the non-standard loops

class _OneBuffer:
    """A 'model' that writes every output into one static buffer (as CUDA-graph or compiled models do)."""

    def __init__(self, fn):
        self.fn, self.buffer = fn, None

    def __call__(self, *args):
        out = self.fn(*args)
        if self.buffer is None or self.buffer.shape != out.shape:
            self.buffer = torch.empty_like(out)
        return self.buffer.copy_(out)


def _wuerstchen(s, net):
    s.set_timesteps(5)
    x, gen = _latents(), torch.Generator().manual_seed(2)
    for t in s.timesteps[:-1]:
        x = s.step(net(x, t * 1000), t.expand(x.shape[0]), x, generator=gen).prev_sample
    return x


def _repaint(s, net):
    s.set_timesteps(8, jump_length=2, jump_n_sample=2)
    x, gen, t_last, original = _latents(), torch.Generator().manual_seed(2), s.timesteps[0] + 1, _latents(9)
    mask = (original > 0).float()
    for t in s.timesteps:
        x = s.step(net(x, t), t, x, original, mask, generator=gen).prev_sample if t < t_last else \
            s.undo_step(x, t_last, gen)
        t_last = t
    return x


def _score_sde(s, net):
    s.set_timesteps(5)
    s.set_sigmas(5)
    x, gen = _latents() * s.init_noise_sigma, torch.Generator().manual_seed(2)
    for t in s.timesteps:
        x = s.step_correct(net(x, t), x, generator=gen).prev_sample
        x = s.step_pred(net(x, t), t, x, generator=gen).prev_sample
    return x


def _cogvideox_dpm(s, net):
    s.set_timesteps(6)
    x, gen, old = _latents(), torch.Generator().manual_seed(2), None
    for i, t in enumerate(s.timesteps):
        x, old = s.step(net(x, t), old, t, s.timesteps[i - 1] if i > 0 else None, x, generator=gen)
    return x


@pytest.mark.parametrize("name, loop", [("DDPMWuerstchenScheduler", _wuerstchen), ("RePaintScheduler", _repaint),
                                        ("ScoreSdeVeScheduler", _score_sde), ("CogVideoXDPMScheduler", _cogvideox_dpm)])
def test_static_output_buffer_in_pipeline_loops(name, loop):
    """A model reusing one output buffer gives bitwise the same samples: no step keeps a model output
    (their pipelines' loops; the generic loop of tests/test_ownership.py does not fit these steps)."""
    cls = getattr(gf.compat.diffusers, name)
    assert torch.equal(loop(cls(), _OneBuffer(_net)), loop(cls(), _net))


# ------------------------------------------------------------------ MiniMax-H3, flow-map Euler

@pytest.mark.parametrize("config, steps, set_kwargs", [({}, 2, None), ({"shift": 3.0}, 9, None),
                                                       ({}, None, {"sigmas": [1.0, 0.7, 0.2, 0.0]})])
def test_minimax_h3_equals_diffusers(config, steps, set_kwargs):
    _compare("MiniMaxH3Scheduler", config, steps, set_kwargs=set_kwargs)
    ref, ours = _pair("MiniMaxH3Scheduler", **config)
    t = torch.tensor([0.3, 0.9])
    _assert_rel(ours.scale_noise(_latents(3), t[:1], _latents(4)), ref.scale_noise(_latents(3), t[:1], _latents(4)))


@pytest.mark.parametrize("config, steps, set_kwargs", [({}, 1, None), ({"shift": 3.0}, 7, None),
                                                       ({}, None, {"timesteps": [1000.0, 600.0, 250.0]})])
def test_flow_map_euler_equals_diffusers(config, steps, set_kwargs):
    _compare("FlowMapEulerDiscreteScheduler", config, steps, set_kwargs=set_kwargs)
    ref, ours = _pair("FlowMapEulerDiscreteScheduler", **config)
    ref.set_timesteps(4)
    ours.set_timesteps(4)
    x, out = _latents(), _latents(1)
    for r_t in (ref.timesteps[2], torch.tensor(123.0)):  # any-step maps: on and off the grid
        _assert_rel(ours.step(out, ours.timesteps[0], x, r_timestep=r_t).prev_sample,
                    ref.step(out, ref.timesteps[0], x, r_timestep=r_t).prev_sample)


def test_ddim_inverse_sample_prediction_from_alpha_one_is_refused_by_name():
    """Inversion from alpha_cumprod = 1 with a predicted sample implies eps = 0/0: a ValueError naming
    the option (diffusers divides by zero at the first step); with set_alpha_to_one=False it runs."""
    with pytest.raises(ValueError, match="prediction_type='sample'.*set_alpha_to_one"):
        gf.compat.diffusers.DDIMInverseScheduler(prediction_type="sample")
    ours = gf.compat.diffusers.DDIMInverseScheduler(prediction_type="sample", set_alpha_to_one=False)
    theirs = diffusers().DDIMInverseScheduler(prediction_type="sample", set_alpha_to_one=False)
    a = b = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for s in (ours, theirs):
        s.set_timesteps(5)
    for t in ours.timesteps:
        a = ours.step(0.9 * a, t, a).prev_sample
    for t in theirs.timesteps:
        b = theirs.step(0.9 * b, t, b).prev_sample
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
