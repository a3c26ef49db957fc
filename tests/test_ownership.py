"""The solver owns its state and history (issue 16, item 1): models that share memory with it.

For every registered solver, every k-diffusion sampler and diffusers scheduler of the compat
layers and every ``gf.solve`` tableau and SDE solver, three kinds of network that real code
produces are run against a pure one (the exact denoiser of the 8-Gaussian ring, fresh output
every call, input untouched), on identical inputs and per-sample seeds:

* a net that returns its input (here as an ``x0`` prediction, ``x0 = x``);
* a net that writes every result into one static buffer (CUDA-graph captured models,
  ``torch.compile(mode="reduce-overhead")``, TensorRT-style engines), and a pool of two;
* a net that modifies its input in place (``x.mul_(1.001)``).

Results must equal the pure net's bitwise, or a clear error is raised (``InputMutationError``
naming the solver and step; ``OutputAliasError`` for buffer pools, which
``model_reuses_buffers=True`` makes correct).
"""
import inspect

import pytest
import torch

import genflow as gf
from genflow.compat import diffusers, k_diffusion
from genflow.engine.sde import SDE_SOLVERS
from genflow.engine.tableau import TABLEAUX
from genflow.ownership import (InputMutationError, OutputAliasError, OutputOwnership, check_input_unchanged,
                               own_output, shares_storage)
from genflow.solvers import SOLVERS

MIXTURE = gf.GaussianMixture.ring()
PROCESS = gf.VP()
EXACT = MIXTURE.model(PROCESS).net
BATCH, STEPS = 7, 6
SEEDS = list(range(100, 100 + BATCH))
ADAPTIVE_OPTIONS = {"rk45": {"rtol": 1e-3, "atol": 1e-3}, "sde_adaptive": {"rtol": 1e-2, "atol": 1e-2}}


class StaticBuffers:
    """A net that writes its result into one of ``count`` preallocated buffers, in turn."""

    def __init__(self, net, count=1):
        self.net, self.count, self.buffers, self.calls = net, count, None, 0

    def __call__(self, x, t):
        out = self.net(x, t)
        if self.buffers is None:
            self.buffers = [torch.empty_like(out) for _ in range(self.count)]
        buffer = self.buffers[self.calls % self.count]
        self.calls += 1
        return buffer.copy_(out)


def _solve(net, name, **options):
    x_T = torch.randn(BATCH, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    model = gf.Model(net, PROCESS, "x0")
    return gf.sample(model, x_T=x_T, solver=name, steps=STEPS, generator=SEEDS,
                     **ADAPTIVE_OPTIONS.get(name, {}), **options)


@pytest.mark.parametrize("name", list(SOLVERS))
def test_net_returning_its_input_equals_a_copying_net(name):
    expected = _solve(lambda x, t: x.clone(), name)
    assert torch.equal(_solve(lambda x, t: x, name), expected)
    assert torch.equal(_solve(lambda x, t: x.view(x.shape), name), expected)  # a view of the input


@pytest.mark.parametrize("name", list(SOLVERS))
def test_static_output_buffer_equals_a_pure_net(name):
    expected = _solve(EXACT, name)
    assert torch.equal(_solve(StaticBuffers(EXACT), name), expected)
    assert torch.equal(_solve(StaticBuffers(EXACT), name, model_reuses_buffers=True), expected)


@pytest.mark.parametrize("name", list(SOLVERS))
def test_half_precision_input_with_a_float32_static_buffer_equals_a_pure_net(name):
    """With a half-precision input the model runs on a cast of the state; a model answering in
    the state's dtype (float32) from one static buffer is owned like any other output."""
    x_T = torch.randn(BATCH, 2, generator=torch.Generator().manual_seed(3)).half()

    def solve(net):
        return gf.sample(gf.Model(net, PROCESS, "x0"), x_T=x_T, solver=name, steps=STEPS, generator=SEEDS,
                         **ADAPTIVE_OPTIONS.get(name, {}))

    def pure(x, t):
        return EXACT(x.float(), t)

    assert torch.equal(solve(StaticBuffers(pure)), solve(pure))


@pytest.mark.parametrize("name", list(SOLVERS))
def test_buffer_pool_equals_a_pure_net_or_raises(name):
    expected = _solve(EXACT, name)
    try:
        result = _solve(StaticBuffers(EXACT, count=2), name)
    except OutputAliasError as error:
        assert "model_reuses_buffers=True" in str(error) and repr(name) in str(error)
    else:
        assert torch.equal(result, expected)
    assert torch.equal(_solve(StaticBuffers(EXACT, count=3), name, model_reuses_buffers=True), expected)


@pytest.mark.parametrize("name", list(SOLVERS))
def test_net_mutating_its_input_raises_naming_solver_and_step(name):
    def mutating(x, t):
        x.mul_(1.001)
        return EXACT(x, t)

    with pytest.raises(InputMutationError, match=rf"solver '{name}', step \d+.*modified its input"):
        _solve(mutating, name)


def test_pure_net_outputs_are_not_copied_after_the_first():
    outputs, seen = [], []

    def net(x, t):
        outputs.append(EXACT(x, t))
        return outputs[-1]

    solver = SOLVERS["euler"](gf.Model(net, PROCESS, "x0"), gf.time_grid(PROCESS, 4))
    x = torch.randn(5, 2)
    for i in range(3):
        seen.append(solver.evaluate(x, solver.grid[i]))
    assert not shares_storage(seen[0], outputs[0])  # the first output is copied
    assert all(s is o for s, o in zip(seen[1:], outputs[1:]))  # later ones are used as they are
    assert not solver.ownership.copy_all


def test_ownership_helpers():
    x = torch.randn(4, 3)
    assert own_output(x[1:], [x]) is not x and not shares_storage(own_output(x[1:], [x]), x)
    y = torch.randn(4, 3)
    assert own_output(y, [x, None]) is y
    check_input_unchanged(x, x._version, "here")
    version = x._version
    x.add_(1)
    with pytest.raises(InputMutationError, match="here: the model modified its input"):
        check_input_unchanged(x, version, "here")
    guard = OutputOwnership()
    static = torch.zeros(3)
    first = guard.own(static, x, lambda: "call")
    assert first is not static and guard.own(static, x, lambda: "call") is not static and guard.copy_all


def test_model_reuses_buffers_is_checked():
    with pytest.raises(TypeError, match="model_reuses_buffers"):
        _solve(EXACT, "euler", model_reuses_buffers="yes")


# ------------------------------------------------------------------ compat layers

# every k-diffusion sampler on a sigma grid (dpm_fast and dpm_adaptive take sigma_min/sigma_max instead)
KD_SAMPLERS = sorted(n for n in dir(k_diffusion) if n.startswith("sample_")
                     and "sigmas" in inspect.signature(getattr(k_diffusion, n)).parameters)
_EDM_MODEL = MIXTURE.model(gf.EDM())


def _denoiser(x, sigma):
    return _EDM_MODEL.x0(x, sigma)


def _k_run(name, model):
    sigmas = k_diffusion.get_sigmas_karras(6, 0.03, 80.0, device="cpu").double()
    if name == "sample_ald":  # annealed Langevin ends at its last noise level, not at 0
        sigmas = sigmas[:-1]
    x = 80.0 * torch.randn(BATCH, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    draws = iter([torch.randn(BATCH, 2, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
                  for k in range(64)])
    sampler = getattr(k_diffusion, name)
    if "noise_sampler" in inspect.signature(sampler).parameters:
        return sampler(model, x, sigmas, disable=True, noise_sampler=lambda s, s_next: next(draws))
    return sampler(model, x, sigmas, disable=True)


@pytest.mark.parametrize("name", KD_SAMPLERS)
def test_k_diffusion_samplers_with_aliasing_models(name):
    expected = _k_run(name, _denoiser)
    assert torch.equal(_k_run(name, lambda x, s: x), _k_run(name, lambda x, s: x.clone()))
    try:
        assert torch.equal(_k_run(name, StaticBuffers(_denoiser)), expected)
    except (OutputAliasError, InputMutationError):
        pass

    def mutating(x, sigma):
        x.mul_(1.001)
        return _denoiser(x, sigma)

    try:
        result = _k_run(name, mutating)
    except InputMutationError:
        return
    assert torch.equal(result, _k_run(name, lambda x, s: _denoiser(x * 1.001, s)))


# Their pipelines call ``step`` in their own way (diffusers' classes fail the generic loop too);
# tests/compat/test_diffusers_zoo.py::test_static_output_buffer_in_pipeline_loops, test_diffusers_zoo_extra.py
# and test_diffusers_helios_dmd.py cover them.
OWN_LOOP_SCHEDULERS = {"DDPMWuerstchenScheduler", "RePaintScheduler", "ScoreSdeVeScheduler", "CogVideoXDPMScheduler",
                       "RFD4ProteinaScheduler", "HeliosDMDScheduler", "PiflowScheduler"}


def _scheduler_cases():
    """``(scheduler, prediction_type)`` for every diffusers scheduler and each of ``epsilon`` and
    ``sample`` it takes (None: one without the option, e.g. the flow-matching schedulers)."""
    cases = []
    for name in (n for n in diffusers.__all__ if n.endswith("Scheduler") and n != "Scheduler"
                 and n not in OWN_LOOP_SCHEDULERS):
        for prediction_type in ("epsilon", "sample"):
            try:
                getattr(diffusers, name)(prediction_type=prediction_type)
            except TypeError:  # no prediction_type option
                cases.append((name, None))
                break
            except ValueError:  # a prediction type it does not take
                continue
            if (name, prediction_type) != ("DDIMInverseScheduler", "sample"):  # inverts from t = 0: x0 is undefined
                cases.append((name, prediction_type))
    return cases


def _diffusers_run(name, eps_net, prediction_type="epsilon"):
    """diffusers' pipeline loop; the model output handed to ``step`` comes from ``eps_net``."""
    options = {} if prediction_type is None else {"prediction_type": prediction_type}
    if "noise_sampler_seed" in getattr(diffusers, name)().config:  # a Brownian tree seeded per run
        options["noise_sampler_seed"] = 0
    scheduler = getattr(diffusers, name)(**options)
    scheduler.set_timesteps(6)
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(2)) * scheduler.init_noise_sigma
    generator = torch.Generator().manual_seed(5)
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(x, t)
        kwargs = {"generator": generator} if "generator" in scheduler.step.__code__.co_varnames else {}
        x = scheduler.step(eps_net(inp, t), t, x, **kwargs).prev_sample
    return x


def _toy(x, t):
    return torch.tanh(0.9 * x + 0.3 * x.roll(1, dims=-1)) + 0.001 * float(t)


_CASES = _scheduler_cases()


@pytest.mark.parametrize("name, prediction_type", _CASES)
def test_diffusers_schedulers_with_a_static_output_buffer(name, prediction_type):
    """The pipeline, not the scheduler, calls the model: ``step`` must not keep references to
    a model output that the next call overwrites."""
    expected = _diffusers_run(name, _toy, prediction_type)
    assert torch.equal(_diffusers_run(name, StaticBuffers(_toy), prediction_type), expected)


@pytest.mark.parametrize("name, prediction_type", _CASES)
def test_diffusers_schedulers_with_the_sample_as_model_output(name, prediction_type):
    """``step(sample, t, sample)``: the model output is the sample tensor itself."""
    assert torch.equal(_diffusers_run(name, lambda x, t: x, prediction_type),
                       _diffusers_run(name, lambda x, t: x.clone(), prediction_type))


# -- gf.solve: the engine's ODE tableaux and SDE solvers own their stages the same way --

W = torch.tensor([[0.4, -0.3], [0.2, 0.5]], dtype=torch.float64)
Y0 = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


def _drift(t, y):
    return torch.tanh(y @ W) - 0.1 * y


def _diffusion(t, y):
    return 0.3 * torch.cos(y)


def _buffered(fn, count=1):
    """``fn(t, y)`` answering from ``count`` static buffers in turn."""
    buffers = StaticBuffers(lambda y, t: fn(t, y), count)
    return lambda t, y: buffers(y, t)


def _ode_solve(drift, name):
    options = {"rtol": 1e-6, "atol": 1e-6} if TABLEAUX[name].adaptive else {"steps": 6}
    return gf.solve(gf.ODE(drift), Y0, 0.0, 1.0, solver=name, **options)


@pytest.mark.parametrize("name", sorted(TABLEAUX))
def test_gf_solve_ode_with_aliasing_drifts(name):
    expected = _ode_solve(_drift, name)
    assert torch.equal(_ode_solve(_buffered(_drift), name), expected)
    assert torch.equal(_ode_solve(lambda t, y: y, name), _ode_solve(lambda t, y: y.clone(), name))
    try:
        assert torch.equal(_ode_solve(_buffered(_drift, count=3), name), expected)
    except OutputAliasError as error:
        assert "gf.solve: drift call" in str(error) and "return a new tensor" in str(error)

    def mutating(t, y):
        y.mul_(1.001)
        return _drift(t, y)

    with pytest.raises(InputMutationError, match=r"gf.solve: drift call 1 at t=0: .*modified its input"):
        _ode_solve(mutating, name)


def _sde_solve(drift, diffusion, name):
    cls = SDE_SOLVERS[name]
    noise = "diagonal" if "diagonal" in cls.noise_types else "additive"
    term = gf.SDE(drift, diffusion, noise=noise, sde_type=cls.sde_types[0])
    options = {"rtol": 1e-2, "atol": 1e-2, "brownian": "brownian_tree"} if cls.adaptive else {"steps": 6}
    return gf.solve(term, Y0, 0.0, 1.0, solver=name, generator=list(range(5)), **options)


@pytest.mark.parametrize("name", sorted(SDE_SOLVERS))
def test_gf_solve_sde_with_aliasing_drift_and_diffusion(name):
    additive = SDE_SOLVERS[name].noise_types == ("additive",)
    diffusion = (lambda t, y: torch.full_like(y, 0.3)) if additive else _diffusion
    expected = _sde_solve(_drift, diffusion, name)
    assert torch.equal(_sde_solve(_buffered(_drift), _buffered(diffusion), name), expected)
    assert torch.equal(_sde_solve(lambda t, y: y, diffusion, name), _sde_solve(lambda t, y: y.clone(), diffusion, name))

    def mutating(t, y):
        y.mul_(1.001)
        return diffusion(t, y)

    # milstein differentiates the diffusion at a leaf y that requires grad: torch refuses the write itself
    message = "in-place operation" if name == "milstein" else rf"solver '{name}', step \d+, diffusion call"
    with pytest.raises(RuntimeError, match=message):
        _sde_solve(_drift, mutating, name)
