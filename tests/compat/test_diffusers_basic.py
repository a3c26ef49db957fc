"""``gf.compat.diffusers`` part 1 against the installed diffusers: DDIM, DDPM, Euler, Euler
ancestral, Heun, LMS and flow-match Euler.

Each case builds diffusers' scheduler and ours from the same config, runs diffusers' standard loop
(``set_timesteps``, ``init_noise_sigma``, ``scale_model_input``, ``step`` with the same seeded
generator) on the same deterministic toy network and latents, and requires equal ``timesteps``
(values and dtype), ``sigmas``, ``init_noise_sigma``, model inputs, ``prev_sample`` and
``pred_original_sample`` at every step to 1e-4 relative (float32).
"""
import math
import pickle

import pytest
import torch

import genflow as gf

from ..peers import diffusers

RTOL = 1e-4
SHAPE = (2, 3, 6, 6)
STEPS = 8


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


def _pair(name, **config):
    D = diffusers()
    ref = getattr(D, name)(**config)
    ours = getattr(gf.compat.diffusers, name).from_config(ref.config)
    return ref, ours


def _loop(scheduler, steps, *, stochastic, seed=1, set_kwargs=None, **step_kwargs):
    """diffusers' standard loop; returns the model inputs, outputs of every step, and the final sample."""
    scheduler.set_timesteps(steps, **(set_kwargs or {})) if steps is not None else scheduler.set_timesteps(
        **set_kwargs)
    x = _latents() * getattr(scheduler, "init_noise_sigma", 1.0)  # flow matching has none
    if stochastic:
        step_kwargs["generator"] = torch.Generator().manual_seed(seed)
    inputs, prevs, x0s = [], [], []
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        out = scheduler.step(_net(inp, t), t, x, **step_kwargs)
        x = out.prev_sample
        inputs.append(inp)
        prevs.append(x)
        x0s.append(getattr(out, "pred_original_sample", None))
    return inputs, prevs, x0s


def _compare(ref, ours, steps, *, stochastic=False, set_kwargs=None, **step_kwargs):
    r = _loop(ref, steps, stochastic=stochastic, set_kwargs=set_kwargs, **step_kwargs)
    o = _loop(ours, steps, stochastic=stochastic, set_kwargs=set_kwargs, **step_kwargs)
    assert ref.timesteps.dtype == ours.timesteps.dtype
    torch.testing.assert_close(ours.timesteps, ref.timesteps, rtol=0, atol=0)
    if hasattr(ref, "sigmas"):
        torch.testing.assert_close(ours.sigmas, ref.sigmas, rtol=0, atol=0)
    if hasattr(ref, "init_noise_sigma"):
        torch.testing.assert_close(torch.as_tensor(ours.init_noise_sigma), torch.as_tensor(ref.init_noise_sigma))
    for i, (ri, rp, rx, oi, op, ox) in enumerate(zip(*r, *o)):
        _assert_rel(oi, ri, what=f"model input {i}")
        _assert_rel(op, rp, what=f"prev_sample {i}")
        if rx is not None:
            _assert_rel(ox, rx, what=f"pred_original_sample {i}")
        else:
            assert ox is None
    assert len(r[1]) == len(o[1])
    return o[1][-1]


PREDICTIONS = ["epsilon", "sample", "v_prediction"]


# ------------------------------------------------------------------ DDIM


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_matches(prediction_type, eta):
    ref, ours = _pair("DDIMScheduler", prediction_type=prediction_type)
    _compare(ref, ours, STEPS, stochastic=eta > 0, eta=eta)


@pytest.mark.parametrize("config,step_kwargs", [
    (dict(timestep_spacing="trailing", set_alpha_to_one=False, clip_sample=False), {}),
    (dict(timestep_spacing="linspace", beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012), {}),
    (dict(steps_offset=1, clip_sample_range=0.5), dict(use_clipped_model_output=True, eta=0.5)),
    (dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5), dict(eta=0.3)),
    (dict(beta_schedule="squaredcos_cap_v2", rescale_betas_zero_snr=True, timestep_spacing="trailing",
          prediction_type="v_prediction"), {}),
])
def test_ddim_options_match(config, step_kwargs):
    ref, ours = _pair("DDIMScheduler", **config)
    _compare(ref, ours, STEPS, stochastic=step_kwargs.get("eta", 0) > 0, **step_kwargs)


def test_ddim_variance_noise_and_tuple():
    ref, ours = _pair("DDIMScheduler")
    for s in (ref, ours):
        s.set_timesteps(10)
    x, z = _latents(0), _latents(5)
    t = ref.timesteps[3]
    a = ref.step(_net(x, t), t, x, eta=0.7, variance_noise=z, return_dict=False)
    b = ours.step(_net(x, t), t, x, eta=0.7, variance_noise=z, return_dict=False)
    assert isinstance(b, tuple) and len(b) == 2
    _assert_rel(b[0], a[0])
    _assert_rel(b[1], a[1])
    with pytest.raises(ValueError, match="generator"):
        ours.step(_net(x, t), t, x, eta=0.7, variance_noise=z, generator=torch.Generator())


# ------------------------------------------------------------------ DDPM


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_ddpm_matches(prediction_type, variance_type):
    ref, ours = _pair("DDPMScheduler", prediction_type=prediction_type, variance_type=variance_type)
    _compare(ref, ours, STEPS, stochastic=True)


@pytest.mark.parametrize("config", [
    dict(timestep_spacing="trailing", clip_sample=False, beta_schedule="squaredcos_cap_v2"),
    dict(timestep_spacing="linspace", variance_type="fixed_small_log", thresholding=True),
    dict(beta_schedule="sigmoid", steps_offset=1),
])
def test_ddpm_options_match(config):
    ref, ours = _pair("DDPMScheduler", **config)
    _compare(ref, ours, STEPS, stochastic=True)


def test_ddpm_custom_timesteps_and_generator_list():
    ref, ours = _pair("DDPMScheduler")
    custom = dict(timesteps=[900, 700, 420, 100, 3, 0])
    for s in (ref, ours):
        s.set_timesteps(**custom)
    torch.testing.assert_close(ours.timesteps, ref.timesteps, rtol=0, atol=0)
    x = _latents()
    results = []
    for s in (ref, ours):
        gens = [torch.Generator().manual_seed(10 + b) for b in range(SHAPE[0])]
        y = x
        for t in s.timesteps:
            y = s.step(_net(y, t), t, y, generator=gens).prev_sample
        results.append(y)
    _assert_rel(results[1], results[0])


@pytest.mark.parametrize("variance_type", ["learned", "learned_range"])
def test_ddpm_learned_variance_matches(variance_type):
    ref, ours = _pair("DDPMScheduler", variance_type=variance_type)
    results = []
    for s in (ref, ours):
        s.set_timesteps(6)
        g = torch.Generator().manual_seed(3)
        x = _latents()
        for t in s.timesteps:
            out = torch.cat([_net(x, t), torch.tanh(x).abs() * 0.5 + 0.01 if variance_type == "learned"
                             else torch.tanh(x)], dim=1)
            x = s.step(out, t, x, generator=g).prev_sample
        results.append(x)
    _assert_rel(results[1], results[0])


# ------------------------------------------------------------------ Euler and Euler ancestral


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_euler_matches(prediction_type):
    ref, ours = _pair("EulerDiscreteScheduler", prediction_type=prediction_type)
    _compare(ref, ours, STEPS)


@pytest.mark.parametrize("config,step_kwargs", [
    (dict(use_karras_sigmas=True, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012), {}),
    (dict(use_exponential_sigmas=True, timestep_spacing="leading", steps_offset=1), {}),
    (dict(use_beta_sigmas=True, final_sigmas_type="sigma_min"), {}),
    (dict(timestep_spacing="trailing", interpolation_type="log_linear"), {}),
    (dict(timestep_type="continuous", prediction_type="v_prediction", rescale_betas_zero_snr=True), {}),
    (dict(), dict(s_churn=1.0, s_tmin=0.5, s_tmax=50.0, s_noise=1.003)),
])
def test_euler_options_match(config, step_kwargs):
    ref, ours = _pair("EulerDiscreteScheduler", **config)
    _compare(ref, ours, STEPS, stochastic=bool(step_kwargs), **step_kwargs)


def test_euler_custom_sigmas_and_timesteps():
    ref, ours = _pair("EulerDiscreteScheduler")
    _compare(ref, ours, None, set_kwargs=dict(sigmas=[14.0, 7.0, 3.1, 1.2, 0.5, 0.1, 0.0]))
    _compare(ref, ours, None, set_kwargs=dict(timesteps=[999, 800, 611.5, 300, 20]))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("timestep_spacing", ["linspace", "leading"])
def test_euler_ancestral_matches(prediction_type, timestep_spacing):
    ref, ours = _pair("EulerAncestralDiscreteScheduler", prediction_type=prediction_type,
                      timestep_spacing=timestep_spacing)
    _compare(ref, ours, STEPS, stochastic=True)


def test_euler_ancestral_zero_snr_trailing():
    ref, ours = _pair("EulerAncestralDiscreteScheduler", rescale_betas_zero_snr=True, timestep_spacing="trailing",
                      prediction_type="v_prediction")
    _compare(ref, ours, STEPS, stochastic=True)


# ------------------------------------------------------------------ Heun and LMS


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_heun_matches(prediction_type):
    ref, ours = _pair("HeunDiscreteScheduler", prediction_type=prediction_type)
    assert ours.order == 2
    _compare(ref, ours, STEPS)


@pytest.mark.parametrize("config", [
    dict(use_karras_sigmas=True, beta_schedule="scaled_linear"),
    dict(clip_sample=True, clip_sample_range=2.0, timestep_spacing="trailing"),
    dict(beta_schedule="exp", timestep_spacing="leading", steps_offset=1),
])
def test_heun_options_match(config):
    ref, ours = _pair("HeunDiscreteScheduler", **config)
    _compare(ref, ours, STEPS)


def test_heun_custom_timesteps():
    ref, ours = _pair("HeunDiscreteScheduler")
    _compare(ref, ours, None, set_kwargs=dict(timesteps=[999, 700, 400.5, 100, 10]))


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("order", [1, 2, 4])
def test_lms_matches(prediction_type, order):
    ref, ours = _pair("LMSDiscreteScheduler", prediction_type=prediction_type)
    _compare(ref, ours, STEPS, order=order)


@pytest.mark.parametrize("config", [
    dict(use_karras_sigmas=True, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(use_exponential_sigmas=True, timestep_spacing="trailing"),
])
def test_lms_options_match(config):
    ref, ours = _pair("LMSDiscreteScheduler", **config)
    _compare(ref, ours, STEPS)


# ------------------------------------------------------------------ flow matching


@pytest.mark.parametrize("config,set_kwargs", [
    (dict(), {}),
    (dict(shift=3.0), {}),
    (dict(use_dynamic_shifting=True, time_shift_type="exponential"), dict(mu=0.8)),
    (dict(use_dynamic_shifting=True, time_shift_type="linear", shift_terminal=0.1), dict(mu=1.3)),
    (dict(shift=2.0, use_karras_sigmas=True), {}),
    (dict(invert_sigmas=True), {}),
])
def test_flow_match_matches(config, set_kwargs):
    ref, ours = _pair("FlowMatchEulerDiscreteScheduler", **config)
    torch.testing.assert_close(ours.timesteps, ref.timesteps, rtol=0, atol=0)
    _compare(ref, ours, STEPS, set_kwargs=set_kwargs)


def test_flow_match_stochastic_custom_sigmas_and_scale_noise():
    ref, ours = _pair("FlowMatchEulerDiscreteScheduler", shift=3.0, stochastic_sampling=True)
    _compare(ref, ours, None, stochastic=True, set_kwargs=dict(sigmas=[1.0, 0.8, 0.5, 0.3, 0.1]))
    x, z = _latents(0), _latents(1)
    for s in (ref, ours):
        s.set_timesteps(10)
    t = ref.timesteps[[2, 5]]
    _assert_rel(ours.scale_noise(x, t, z), ref.scale_noise(x, t, z))
    _assert_rel(ours.add_noise(x, z, t), ref.scale_noise(x, t, z))
    assert ours.step(z, ref.timesteps[0], x, return_dict=False)[0].shape == x.shape


def test_flow_match_per_token_timesteps():
    ref, ours = _pair("FlowMatchEulerDiscreteScheduler", shift=3.0)
    x = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(0))
    v = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(1))
    for s in (ref, ours):
        s.set_timesteps(6)
    per_token = ref.timesteps[1] * torch.linspace(0.5, 1.0, 5).expand(2, 5)
    a = ref.step(v, ref.timesteps[1], x, per_token_timesteps=per_token).prev_sample
    b = ours.step(v, ours.timesteps[1], x, per_token_timesteps=per_token).prev_sample
    _assert_rel(b, a)


# ------------------------------------------------------------------ add_noise, scale_model_input, tables


@pytest.mark.parametrize("name", ["DDIMScheduler", "DDPMScheduler", "EulerDiscreteScheduler",
                                  "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "LMSDiscreteScheduler"])
def test_tables_add_noise_and_scale_model_input(name):
    ref, ours = _pair(name, beta_schedule="scaled_linear")
    for attr in ("betas", "alphas", "alphas_cumprod"):
        torch.testing.assert_close(getattr(ours, attr), getattr(ref, attr), rtol=0, atol=0)
    torch.testing.assert_close(ours.timesteps, ref.timesteps, rtol=0, atol=0)
    assert len(ours) == len(ref) and ours.order == ref.order
    for s in (ref, ours):
        s.set_timesteps(12)
    x, z = _latents(0), _latents(1)
    t = ref.timesteps[[0, 7]]
    _assert_rel(ours.add_noise(x, z, t), ref.add_noise(x, z, t), what="add_noise per sample")
    _assert_rel(ours.add_noise(x, z, t[1:]), ref.add_noise(x, z, t[1:]), what="add_noise one timestep")
    if hasattr(ref, "get_velocity") and name.startswith("DD"):
        _assert_rel(ours.get_velocity(x, z, t), ref.get_velocity(x, z, t), what="get_velocity")
    _assert_rel(ours.scale_model_input(x, ref.timesteps[4]), ref.scale_model_input(x, ref.timesteps[4]))
    torch.testing.assert_close(torch.as_tensor(ours.init_noise_sigma), torch.as_tensor(ref.init_noise_sigma))


def test_add_noise_with_begin_index():
    ref, ours = _pair("EulerDiscreteScheduler")
    x, z = _latents(0), _latents(1)
    for s in (ref, ours):
        s.set_timesteps(10)
        s.set_begin_index(3)
    t = ref.timesteps[3:4].repeat(2)
    _assert_rel(ours.add_noise(x, z, t), ref.add_noise(x, z, t))
    assert ours.begin_index == 3 and ours.step_index is None


# ------------------------------------------------------------------ config and interface


def test_config_from_config_and_swap():
    D = diffusers()
    ddim = D.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
    euler = gf.compat.diffusers.EulerDiscreteScheduler.from_config(ddim.config)
    assert euler.config.beta_schedule == "scaled_linear" and euler.config["beta_end"] == 0.012
    assert "clip_sample" not in euler.config and "_class_name" not in euler.config
    assert set(euler.config) - {"_use_default_values"} == set(gf.compat.diffusers.EulerDiscreteScheduler.defaults)
    # fields the source left at its defaults take the target's defaults (diffusers' rule)
    D = diffusers()
    ddpm = D.DDPMScheduler(beta_end=0.03)
    for config in (ddpm.config, gf.compat.diffusers.DDPMScheduler.from_config(ddpm.config).config):
        ours = gf.compat.diffusers.EulerDiscreteScheduler.from_config(config)
        theirs = D.EulerDiscreteScheduler.from_config(config)
        assert ours.config.timestep_spacing == theirs.config.timestep_spacing == "linspace"
        assert ours.config.beta_end == theirs.config.beta_end == 0.03
        assert D.EulerDiscreteScheduler.from_config(ours.config).config.timestep_spacing == "linspace"
    again = gf.compat.diffusers.DDIMScheduler.from_config(euler, timestep_spacing="trailing")
    assert again.config.timestep_spacing == "trailing" and again.config.beta_schedule == "scaled_linear"
    assert gf.compat.diffusers.DDIMScheduler.from_config(dict(again.config)).config == again.config
    with pytest.raises(TypeError, match="read-only"):
        euler.config.beta_end = 0.1
    with pytest.raises(TypeError, match="read-only"):
        euler.config["beta_end"] = 0.1
    assert pickle.loads(pickle.dumps(euler.config)) == euler.config


@pytest.mark.parametrize("name", ["DDIMScheduler", "DDPMScheduler", "EulerDiscreteScheduler",
                                  "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "LMSDiscreteScheduler",
                                  "FlowMatchEulerDiscreteScheduler"])
def test_defaults_are_diffusers_parameters(name):
    import inspect
    D = diffusers()
    params = inspect.signature(getattr(D, name).__init__).parameters
    expected = {k: p.default for k, p in params.items() if k != "self"}
    assert getattr(gf.compat.diffusers, name).defaults == expected


def test_output_indexing():
    ref, ours = _pair("DDIMScheduler")
    ours.set_timesteps(5)
    x = _latents()
    t = ours.timesteps[0]
    out = ours.step(_net(x, t), t, x)
    assert out[0] is out.prev_sample and out[1] is out.pred_original_sample
    assert out.to_tuple() == (out.prev_sample, out.pred_original_sample)


def test_error_messages():
    C = gf.compat.diffusers
    with pytest.raises(TypeError, match="'beta_strat'"):
        C.DDIMScheduler(beta_strat=0.1)
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        C.DDPMScheduler(prediction_type="noise")
    with pytest.raises(ValueError, match="beta_schedule must be one of"):
        C.EulerDiscreteScheduler(beta_schedule="quadratic")
    with pytest.raises(ValueError, match="timestep_spacing must be one of"):
        C.DDIMScheduler(timestep_spacing="uniform")
    with pytest.raises(ValueError, match=r"num_inference_steps must be in \[1, num_train_timesteps = 1000\]"):
        C.DDIMScheduler().set_timesteps(1001)
    with pytest.raises(ValueError, match="call set_timesteps"):
        C.DDIMScheduler().step(torch.zeros(1, 2), 10, torch.zeros(1, 2))
    euler = C.EulerDiscreteScheduler()
    euler.set_timesteps(4)
    with pytest.raises(ValueError, match="not indices from enumerate"):
        euler.step(torch.zeros(1, 2), 3, torch.zeros(1, 2))
    with pytest.raises(ValueError, match="exactly one of"):
        euler.set_timesteps(4, sigmas=[1.0, 0.0])
    with pytest.raises(ValueError, match="at most one of"):
        C.LMSDiscreteScheduler(use_karras_sigmas=True, use_beta_sigmas=True)
    with pytest.raises(ValueError, match="mu must be given"):
        C.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).set_timesteps(4)
    with pytest.raises(ValueError, match="variance_type"):
        C.DDPMScheduler(variance_type="fixed_large_log")


def test_import_without_diffusers_dependency():
    import ast
    import pathlib

    root = pathlib.Path(gf.compat.diffusers.__file__).parent
    for name in ("_base", "ddim", "ddpm", "euler", "heun", "lms", "flow_match"):
        tree = ast.parse((root / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert all(not a.name.startswith("diffusers") for a in node.names), name
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith("diffusers"), name
