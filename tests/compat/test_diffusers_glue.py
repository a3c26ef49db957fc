"""``gf.compat.diffusers``' step glue: results are new tensors, inputs are never written, the
per-grid step plans give the same results on every loop and every scheduler instance, gradients
flow through a step, and the native DDIM noise split equals diffusers' formula."""
import math
import warnings

import pytest
import torch

from genflow.compat import diffusers as compat
from genflow.solvers.ddim import ddim_noise_split

from ..peers import diffusers

NAMES = ["DDIMScheduler", "DDPMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
         "HeunDiscreteScheduler", "LMSDiscreteScheduler", "FlowMatchEulerDiscreteScheduler",
         "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "UniPCMultistepScheduler",
         "DEISMultistepScheduler"]
SHAPE = (2, 3, 5, 4)


def _loop(scheduler, x_T, steps=7, seed=0):
    """diffusers' loop with a toy model; returns the final sample and every step's inputs and outputs."""
    scheduler.set_timesteps(steps)
    kwargs = {}
    if "generator" in scheduler.step.__code__.co_varnames:
        kwargs["generator"] = torch.Generator().manual_seed(seed)
    x = x_T * getattr(scheduler, "init_noise_sigma", 1.0)
    seen = []
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(x, t)
        out = torch.tanh(inp)
        before = (x.clone(), out.clone())
        result = scheduler.step(out, t, x, return_dict=False, **kwargs)
        seen.append((x, out, before, result))
        x = result[0]
    return x, seen


@pytest.mark.parametrize("name", NAMES)
def test_steps_return_new_tensors_and_never_write_inputs(name):
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, seen = _loop(getattr(compat, name)(), x_T)
    for x, out, (x_before, out_before), result in seen:
        assert torch.equal(x, x_before) and torch.equal(out, out_before)
        for r in result:
            assert r.data_ptr() not in (x.data_ptr(), out.data_ptr())


@pytest.mark.parametrize("name", NAMES)
def test_step_plans_are_reused_bitwise(name):
    """A second loop on the same grid (plans cached) and a fresh instance (the cache is shared per
    class, config and grid) give bitwise the first loop's result; another grid differs."""
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = getattr(compat, name)()
        first = _loop(s, x_T)[0]
        assert torch.equal(_loop(s, x_T)[0], first)
        assert torch.equal(_loop(getattr(compat, name)(), x_T)[0], first)
        assert not torch.equal(_loop(s, x_T, steps=6)[0], first)


@pytest.mark.parametrize("name", ["FlowMatchEulerDiscreteScheduler", "EulerDiscreteScheduler",
                                  "DPMSolverMultistepScheduler", "UniPCMultistepScheduler"])
def test_gradients_flow_through_a_step(name):
    """The gradient of a step with respect to the model output equals diffusers'."""
    grads = []
    for lib in (compat, diffusers()):
        s = getattr(lib, name)()
        s.set_timesteps(5)
        t = s.timesteps[0]
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
        out = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4)).requires_grad_()
        s.step(out, t, x, return_dict=False)[0].square().sum().backward()
        grads.append(out.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["FlowMatchEulerDiscreteScheduler", "EulerDiscreteScheduler", "HeunDiscreteScheduler"])
def test_half_precision_model_output(name):
    """A float16 model output on a float32 sample: diffusers' upcast and result dtype."""
    results = []
    for lib in (compat, diffusers()):
        s = getattr(lib, name)()
        s.set_timesteps(4)
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
        out = torch.randn(SHAPE, generator=torch.Generator().manual_seed(6)).half()
        results.append(s.step(out, s.timesteps[0], x, return_dict=False)[0])
    assert results[0].dtype == results[1].dtype
    torch.testing.assert_close(results[0].float(), results[1].float(), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
def test_ddim_noise_split_is_diffusers_formula(eta):
    """``c = eta sigma' sqrt(1 - e^{-2h})`` and ``sigma' r = sqrt(1 - abar_s - c^2)`` equal DDIM's
    ``std = eta sqrt((1 - abar_s)/(1 - abar_t) (1 - abar_t/abar_s))`` (Song et al. 2021a, eq. 16)."""
    for a_t, a_s in [(0.3, 0.5), (0.01, 0.02), (0.9, 0.999)]:
        h = 0.5 * math.log(a_s / (1 - a_s)) - 0.5 * math.log(a_t / (1 - a_t))
        c, r = ddim_noise_split(h, math.sqrt(1 - a_s), eta)
        std = eta * math.sqrt((1 - a_s) / (1 - a_t) * (1 - a_t / a_s))
        assert c == pytest.approx(std, rel=1e-12, abs=1e-15)
        assert math.sqrt(1 - a_s) * r == pytest.approx(math.sqrt(1 - a_s - std ** 2), rel=1e-12)


@pytest.mark.parametrize("name", ["FlowMatchEulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
                                  "HeunDiscreteScheduler"])
def test_cached_schedules_are_diffusers_and_private(name):
    """``set_timesteps`` builds a schedule once per config and arguments: a repeated call and another
    instance get bitwise diffusers' ``timesteps``/``sigmas``, as tensors of their own (writing
    into one scheduler's does not reach the cache or another scheduler); another config misses."""
    peer = getattr(diffusers(), name)()
    peer.set_timesteps(9)
    first, second = getattr(compat, name)(), getattr(compat, name)()
    for s in (first, first, second):
        s.set_timesteps(9)
        assert torch.equal(s.timesteps, peer.timesteps) and torch.equal(s.sigmas, peer.sigmas)
    first.timesteps.add_(1.0)
    first.sigmas.mul_(2.0)
    second.set_timesteps(9)
    assert torch.equal(second.timesteps, peer.timesteps) and torch.equal(second.sigmas, peer.sigmas)
    assert second.timesteps.data_ptr() != first.timesteps.data_ptr()
    other = getattr(compat, name)(num_train_timesteps=500)
    other.set_timesteps(9)
    assert not torch.equal(other.sigmas, peer.sigmas)


@pytest.mark.parametrize("name", ["DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
                                  "UniPCMultistepScheduler", "DEISMultistepScheduler"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])
def test_multistep_history_survives_a_rewritten_output_buffer(name, prediction_type):
    """The model writes every output into one buffer (and scribbles over it after each step): the
    schedulers keep only what they own, so the loop equals one with fresh outputs."""
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))

    def run(static):
        s = getattr(compat, name)(prediction_type=prediction_type)
        s.set_timesteps(6)
        buffer, x = torch.empty(SHAPE), x_T
        for t in s.timesteps:
            out = torch.tanh(s.scale_model_input(x, t))
            if static:
                out = buffer.copy_(out)
            x = s.step(out, t, x, return_dict=False)[0]
            buffer.fill_(float("nan"))
        return x

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(run(static=True), run(static=False))
