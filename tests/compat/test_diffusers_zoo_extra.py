"""``gf.compat.diffusers.RFD4ProteinaScheduler`` against the installed diffusers 0.42.1.

diffusers' scheduler and ours (``from_config``) run diffusers' loop on the same deterministic toy
velocity model, latents, mask and per-row seeded generators: ``timesteps`` bitwise equal, every
``prev_sample`` equal to 1e-4 relative (float32).
"""
import copy
import math

import pytest
import torch

import genflow as gf

from ..peers import diffusers

RTOL = 1e-4
SHAPE = (3, 7, 5)  # (batch, tokens, width)

CONFIGS = [
    dict(schedule_mode="log", noise_mode="1/t", tsr_k=2.0, tsr_sigma=1.0),
    dict(schedule_mode="power", noise_mode="tan", tsr_k=5.0, tsr_sigma=0.5, tail_steps=3, tail_step_multiplier=3),
    dict(schedule_mode="log", noise_mode="tan", tsr_k=1.0, tsr_sigma=2.0, tail_steps=0, t_lim_ode=0.8,
         t_lim_ode_below=0.1),
]


def _assert_rel(actual, expected, what=""):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=RTOL * max(scale, 1e-12),
                               msg=lambda m: f"{what}: {m}")


def _velocity(x, t):
    """A deterministic smooth toy velocity model of (x, t)."""
    t = float(t)
    return torch.tanh(0.7 * x * math.cos(2.0 * t) + 0.2 * x.roll(1, dims=-1)) + 0.05 * math.sin(3.0 * t)


def _pair(**config):
    ref = diffusers().RFD4ProteinaScheduler(**config)
    return ref, gf.compat.diffusers.RFD4ProteinaScheduler.from_config(ref.config)


def _mask():
    mask = torch.ones(SHAPE[:2], dtype=torch.bool)
    mask[0, -2:] = False
    mask[2, 0] = False
    return mask


def _loop(scheduler, steps, *, velocity=_velocity, seed=0, **set_kwargs):
    scheduler.set_timesteps(steps, **set_kwargs)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    gens = [torch.Generator().manual_seed(seed + b) for b in range(SHAPE[0])]
    mask, outs = _mask(), []
    for t in scheduler.timesteps:
        x = scheduler.step(velocity(x, t), t, x, mask, generator=gens).prev_sample
        outs.append(x)
    return outs


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("steps,set_kwargs", [(40, {}), (31, {}), (25, {"start_time": 0.6})])
def test_rfd4proteina_matches_diffusers(config, steps, set_kwargs):
    ref, ours = _pair(**config)
    assert dict(ours.config) == {k: v for k, v in ref.config.items() if not k.startswith("_")} | (
        {"_use_default_values": ours.config["_use_default_values"]} if "_use_default_values" in ours.config else {})
    expected = _loop(ref, steps, **set_kwargs)
    actual = _loop(ours, steps, **set_kwargs)
    assert ours.timesteps.dtype == ref.timesteps.dtype and torch.equal(ours.timesteps, ref.timesteps)
    assert ours.step_index == ref.step_index == steps
    for i, (a, e) in enumerate(zip(actual, expected)):
        _assert_rel(a, e, f"step {i}")


def test_rfd4proteina_add_noise_and_errors():
    ref, ours = _pair(**CONFIGS[0])
    x0, z = torch.randn(SHAPE), torch.randn(SHAPE)
    for t in (0.3, torch.tensor([0.1, 0.5, 0.9])):
        _assert_rel(ours.add_noise(x0, z, t), ref.add_noise(x0, z, t), "add_noise")
    with pytest.raises(ValueError, match="timesteps"):
        ours.add_noise(x0, z, 1.0)
    with pytest.raises(TypeError, match="tsr_k"):
        gf.compat.diffusers.RFD4ProteinaScheduler(schedule_mode="log", noise_mode="1/t", tsr_sigma=1.0)
    with pytest.raises(ValueError, match="schedule_mode"):
        gf.compat.diffusers.RFD4ProteinaScheduler(schedule_mode="cos", noise_mode="1/t", tsr_k=1.0, tsr_sigma=1.0)
    with pytest.raises(ValueError, match="num_inference_steps"):
        ours.set_timesteps(5)  # fewer than tail_steps * tail_step_multiplier
    ours.set_timesteps(30)
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="next element"):
        ours.step(x, ours.timesteps[1], x, _mask())
    with pytest.raises(ValueError, match="distinct"):
        g = torch.Generator()
        ours.step(x, ours.timesteps[0], x, _mask(), generator=[g, g, g])


def test_rfd4proteina_owns_its_output():
    """A model writing every velocity into one reused buffer gives bitwise the same samples."""
    buffer = torch.empty(SHAPE)

    def reusing(x, t):
        buffer.copy_(_velocity(x, t))
        return buffer

    _, ours = _pair(**CONFIGS[0])
    fresh = _loop(copy.deepcopy(ours), 30)
    reused = _loop(ours, 30, velocity=reusing)
    assert all(torch.equal(a, b) for a, b in zip(fresh, reused))


# ---------------------------------------------------------------- PiflowScheduler

def _widened(x, t, n_grid):
    """A deterministic toy model of (x, t) with ``n_grid`` velocities per channel (last axis)."""
    t = float(t) / 1000
    return torch.cat([torch.tanh((0.5 + 0.1 * k) * x + 0.3 * t * x.roll(1, dims=-1)) - 0.2 * k * t
                      for k in range(n_grid)], dim=-1)


def _piflow_loop(scheduler, steps, n_grid, dtype=torch.float32):
    scheduler.set_timesteps(steps)
    x = torch.randn(2, 3, 5, 4, generator=torch.Generator().manual_seed(2)).to(dtype)
    outs = []
    for t in scheduler.timesteps:
        x = scheduler.step(_widened(x, t, n_grid).to(dtype), t, x).prev_sample
        outs.append(x)
    return outs


@pytest.mark.parametrize("config", [{}, dict(shift=3.0, n_grid=4, final_step_size_scale=1.0, num_policy_substeps=37)])
@pytest.mark.parametrize("steps", [1, 4, 7])
def test_piflow_matches_diffusers(config, steps):
    ref = diffusers().PiflowScheduler(**config)
    ours = gf.compat.diffusers.PiflowScheduler.from_config(ref.config)
    n_grid = ref.config.n_grid
    expected = _piflow_loop(ref, steps, n_grid)
    actual = _piflow_loop(ours, steps, n_grid)
    for name in ("timesteps", "sigmas"):
        mine, theirs = getattr(ours, name), getattr(ref, name)
        assert mine.dtype == theirs.dtype and torch.equal(mine, theirs), name
    for i, (a, e) in enumerate(zip(actual, expected)):
        _assert_rel(a, e, f"step {i}")


def test_piflow_errors_and_ownership():
    ours = gf.compat.diffusers.PiflowScheduler(n_grid=3)
    with pytest.raises(ValueError, match="n_grid"):
        gf.compat.diffusers.PiflowScheduler(n_grid=1)
    with pytest.raises(ValueError, match="mu"):
        ours.set_timesteps(4, mu=1.0)
    ours.set_timesteps(4)
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="model_output"):
        ours.step(torch.randn(2, 3, 8), ours.timesteps[0], x)
    with pytest.raises(ValueError, match="integer"):
        ours.step(torch.randn(2, 3, 12), 1000, x)
    buffer = torch.empty(2, 3, 5, 12)

    def run(reuse):
        ours.set_timesteps(4)
        x = torch.randn(2, 3, 5, 4, generator=torch.Generator().manual_seed(3))
        for t in ours.timesteps:
            out = _widened(x, t, 3)
            x = ours.step(buffer.copy_(out) if reuse else out, t, x).prev_sample
        return x

    assert torch.equal(run(False), run(True))
