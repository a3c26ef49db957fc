"""``gf.compat.diffusers.HeliosDMDScheduler`` against the installed diffusers 0.42.1.

Each case builds diffusers' scheduler and ours from its config (``from_config``), requires
bitwise-equal ``timesteps`` and ``sigmas`` (values and dtype) and stage tables, and runs the Helios
pyramid pipeline's distilled loop (``step`` with ``cur_sampling_step``, ``dmd_noisy_tensor``,
``dmd_sigmas``, ``dmd_timesteps``, ``all_timesteps``) on the same deterministic toy network and
5-D video latents, with every ``prev_sample`` equal to 1e-4 relative (float32).
"""
import math

import pytest
import torch

import genflow as gf

from ..peers import diffusers

RTOL = 1e-4
SHAPE = (2, 3, 3, 5, 7)  # batch, channels, frames, height, width


def _net(x, t):
    """A deterministic smooth toy 'network' of (x, t) with O(1) outputs."""
    t = float(t)
    return torch.tanh(0.7 * x * math.cos(0.003 * t) + 0.2 * x.roll(1, dims=-1)) + 0.05 * math.sin(0.01 * t)


def _pair(**config):
    ref = diffusers().HeliosDMDScheduler(**config)
    return ref, gf.compat.diffusers.HeliosDMDScheduler.from_config(ref.config)


def _assert_same(ours, ref, what):
    assert ours.dtype == ref.dtype, what
    assert torch.equal(ours, ref), what


def _loop(scheduler, steps, set_kwargs, net=_net):
    """The pipeline's distilled loop over one stage; every step's new sample."""
    scheduler.set_timesteps(steps, **set_kwargs)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    x, samples = noise.clone(), []
    timesteps = scheduler.timesteps
    for i, t in enumerate(timesteps):
        extra = dict(cur_sampling_step=i, dmd_noisy_tensor=noise, dmd_sigmas=scheduler.sigmas,
                     dmd_timesteps=scheduler.timesteps, all_timesteps=timesteps)
        x = scheduler.step(net(x, t), t, x, return_dict=False, **extra)[0]
        samples.append(x.clone())
    return samples


CASES = [
    ({}, 3, dict(stage_index=0)),
    ({}, 3, dict(stage_index=1)),
    ({}, 2, dict(stage_index=2, is_amplify_first_chunk=True)),
    (dict(gamma=0.5, stage_range=[0, 0.2, 0.5, 1]), 4, dict(stage_index=1)),
    (dict(stages=2, stage_range=[0, 0.5, 1], shift=3.0), 5, dict(stage_index=1)),
    (dict(use_dynamic_shifting=True), 3, dict(stage_index=1, mu=0.8)),
    (dict(stages=1, stage_range=[0, 1]), 4, {}),
    (dict(stages=1, stage_range=[0, 1], shift=5.0), 7, {}),
    (dict(stages=1, stage_range=[0, 1], use_dynamic_shifting=True, time_shift_type="exponential"), 3,
     dict(mu=1.1)),
]


@pytest.mark.parametrize("config, steps, set_kwargs", CASES)
def test_grid_and_loop_equal_diffusers(config, steps, set_kwargs):
    ref, ours = _pair(**config)
    fields = {k: v for k, v in ref.config.items() if not k.startswith("_")}
    assert {k: v for k, v in ours.config.items() if not k.startswith("_")} == fields
    assert (ours.sigma_min, ours.sigma_max) == (ref.sigma_min, ref.sigma_max)
    for table in ("timestep_ratios", "start_sigmas", "end_sigmas", "ori_start_sigmas"):
        assert getattr(ours, table) == getattr(ref, table), table
    for table in ("timesteps_per_stage", "sigmas_per_stage"):
        for k, value in getattr(ref, table).items():
            _assert_same(getattr(ours, table)[k], value, f"{table}[{k}]")
    expected = _loop(ref, steps, set_kwargs)
    actual = _loop(ours, steps, set_kwargs)
    _assert_same(ours.timesteps, ref.timesteps, "timesteps")
    _assert_same(ours.sigmas, ref.sigmas, "sigmas")
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        scale = e.abs().max().item()
        assert a.dtype == e.dtype
        torch.testing.assert_close(a, e, rtol=RTOL, atol=RTOL * scale, msg=lambda m: f"step {i}: {m}")


def test_model_reusing_one_output_buffer_gives_the_same_samples():
    """A model writing every output into one buffer (owned by the model) gives bitwise the same samples."""
    buffer = torch.empty(SHAPE)

    def reusing(x, t):
        return buffer.copy_(_net(x, t))

    ours = gf.compat.diffusers.HeliosDMDScheduler()
    pure = _loop(ours, 4, dict(stage_index=1))
    shared = _loop(ours, 4, dict(stage_index=1), net=reusing)
    for a, b in zip(pure, shared):
        assert torch.equal(a, b)


def test_step_leaves_its_inputs_unchanged():
    ours = gf.compat.diffusers.HeliosDMDScheduler()
    ours.set_timesteps(3, stage_index=0)
    x, out, noise = (torch.randn(SHAPE, generator=torch.Generator().manual_seed(s)) for s in (1, 2, 3))
    copies = [x.clone(), out.clone(), noise.clone()]
    t = ours.timesteps
    ours.step(out, t[0], x, cur_sampling_step=0, dmd_noisy_tensor=noise, dmd_sigmas=ours.sigmas,
              dmd_timesteps=t, all_timesteps=t)
    for a, b in zip((x, out, noise), copies):
        assert torch.equal(a, b)


def test_bad_input_raises():
    lib = gf.compat.diffusers.HeliosDMDScheduler
    with pytest.raises(ValueError, match="stage_range"):
        lib(stages=2)
    with pytest.raises(ValueError, match="time_shift_type"):
        lib(time_shift_type="cubic")
    s = lib()
    with pytest.raises(ValueError, match="stage_index"):
        s.set_timesteps(3)
    with pytest.raises(ValueError, match="num_inference_steps"):
        s.set_timesteps(0, stage_index=0)
    with pytest.raises(ValueError, match="mu"):
        lib(use_dynamic_shifting=True).set_timesteps(3, stage_index=0)
    s.set_timesteps(3, stage_index=0)
    x = torch.zeros(SHAPE)
    with pytest.raises(TypeError, match="dmd_sigmas"):
        s.step(x, s.timesteps[0], x)
    with pytest.raises(TypeError, match="dmd_noisy_tensor"):
        s.step(x, s.timesteps[0], x, dmd_sigmas=s.sigmas, dmd_timesteps=s.timesteps, all_timesteps=s.timesteps)
