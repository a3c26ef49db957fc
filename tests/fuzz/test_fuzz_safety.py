"""Fuzz the "safe by construction" guarantees (issue 16): models that alias the solver's memory
(return their input or a view of it, write into one static output buffer or a pool of them,
modify their input in place), processes changed after a solve, numbers of every numeric type,
and half-precision state, each against the plain answer for random solvers, processes, step
counts and batches."""
import gc

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import genflow as gf
from genflow.ownership import InputMutationError, OutputAliasError
from tests.fuzz.strategies import fuzz, invalid, valid

MIXTURE = gf.GaussianMixture.ring(4, radius=2.0, std=0.3)
FIXED = sorted(i.name for i in gf.solvers.available() if not getattr(gf.solvers.SOLVERS[i.name], "adaptive", False))
PROCESSES = {"VP": gf.VP, "VE": gf.VE, "EDM": gf.EDM, "CosineVP": gf.CosineVP}
# each process's parameters with a range of valid values (a changed value keeps the others valid)
PARAMETERS = {"VP": {"beta_min": (0.05, 0.5), "beta_max": (5.0, 30.0)}, "SubVP": {"beta_max": (5.0, 30.0)},
              "VE": {"sigma_min": (0.005, 0.05), "sigma_max": (10.0, 80.0)}, "CosineVP": {"s": (0.001, 0.05)},
              "EDM": {"sigma_min": (0.001, 0.01), "sigma_max": (20.0, 100.0)}}
PROCESS_CLASSES = {"SubVP": gf.SubVP, **PROCESSES}
NUMBER_TYPES = {"python": lambda v: v, "numpy": lambda v: np.asarray(v)[()],  # 0-d tensors in float64 (a float32
                "tensor": lambda v: torch.tensor(v, dtype=torch.float64 if isinstance(v, float) else torch.int64)}  # rounds)
ALIASES = ["input", "input_view", "static", "static_declared", "pool", "pool_declared", "mutate"]


def _solve(process, net, solver, steps, batch, dtype=torch.float64, x_T_dtype=None, **options):
    """A solve of ``batch`` samples from a fixed ``x_T`` in ``dtype`` (rounded to ``x_T_dtype`` first)."""
    model = gf.Model(net, process, "x0")
    x_T = 2.0 * torch.randn(batch, 2, generator=torch.Generator().manual_seed(batch), dtype=torch.float64)
    x_T = (x_T * process.sigma(process.T)).to(x_T_dtype or dtype).to(dtype)
    return gf.sample(model, x_T=x_T, solver=solver, steps=steps, generator=list(range(batch)), **options)


class _Reused:
    """A model writing its outputs into ``buffers`` preallocated buffers in turn: one is a
    CUDA-graph style static output, two or more a pool (TensorRT-style engines)."""

    def __init__(self, net, buffers):
        self.net, self.count, self.pool, self.calls = net, buffers, None, 0

    def __call__(self, x, t):
        out = self.net(x, t)
        if self.pool is None or self.pool[0].shape != out.shape:
            self.pool = [torch.empty_like(out) for _ in range(self.count)]
        self.calls += 1
        return self.pool[self.calls % self.count].copy_(out)


@fuzz(80)
@given(solver=st.sampled_from(FIXED), process=st.sampled_from(sorted(PROCESSES)), steps=st.integers(2, 6),
       batch=st.integers(1, 5), alias=st.sampled_from(ALIASES))
def test_aliasing_models_equal_a_pure_model_or_raise(solver, process, steps, batch, alias):
    proc = PROCESSES[process]()
    exact = MIXTURE.model(proc)

    def pure(x, t):
        return exact.x0(x, t)

    expected = _solve(proc, pure, solver, steps, batch)
    if alias in ("input", "input_view"):  # a net returning its input (or a view): the same as returning a copy
        expected = _solve(proc, lambda x, t: x.clone(), solver, steps, batch)
        net = (lambda x, t: x) if alias == "input" else (lambda x, t: x.view(x.shape[0], -1).view_as(x))
        got = valid(_solve, proc, net, solver, steps, batch)
    elif alias in ("static", "pool"):  # detected: a static buffer is copied, a pool raises (or never repeats)
        try:
            got = valid(_solve, proc, _Reused(pure, 1 if alias == "static" else 3), solver, steps, batch)
        except OutputAliasError as error:
            assert alias == "pool" and "model_reuses_buffers=True" in str(error), (solver, alias)
            return
    elif alias in ("static_declared", "pool_declared"):
        buffers = 1 if alias == "static_declared" else 3
        got = valid(_solve, proc, _Reused(pure, buffers), solver, steps, batch, model_reuses_buffers=True)
    else:
        def net(x, t):
            x.mul_(1.0)  # bumps the version counter: a write into the solver's state
            return pure(x, t)
        with pytest.raises(InputMutationError, match=solver):
            _solve(proc, net, solver, steps, batch)
        return
    assert torch.equal(got, expected), (solver, process, alias)


@fuzz(40)
@given(solver=st.sampled_from(["euler", "ddim", "dpmpp_2m", "heun", "unipc", "lms", "dpmpp_3m"]),
       process=st.sampled_from(sorted(PARAMETERS)), data=st.data(), steps=st.integers(2, 8))
def test_a_process_cannot_change_under_a_cached_solve(solver, process, data, steps):
    """Mutating any parameter of any process is refused naming it; a new process with that
    value (which may reuse the old one's id) solves as it did before the old one was cached."""
    cls = PROCESS_CLASSES[process]
    name = data.draw(st.sampled_from(sorted(PARAMETERS[process])), label="parameter")
    value = data.draw(st.floats(*PARAMETERS[process][name]), label="value")
    net = MIXTURE.model(gf.VP()).x0
    expected = _solve(cls(**{name: value}), net, solver, steps, 3)
    first = cls()
    before = valid(_solve, first, net, solver, steps, 3)
    with pytest.raises(AttributeError, match=name):
        setattr(first, name, value)
    assert torch.equal(_solve(first, net, solver, steps, 3), before)
    del first
    gc.collect()  # a new process may reuse the old one's id(): value-keyed caches must not return its tables
    assert torch.equal(_solve(cls(**{name: value}), net, solver, steps, 3), expected)


@fuzz(60)
@given(kind=st.sampled_from(sorted(NUMBER_TYPES)), steps=st.integers(1, 6), eta=st.floats(0.0, 1.0),
       rho=st.floats(2.0, 9.0), t_end=st.floats(1e-3, 0.1), beta_max=st.floats(5.0, 30.0),
       solver=st.sampled_from(["ddim", "euler_ancestral", "dpmpp_2m_sde"]))
def test_numbers_of_every_type_give_the_same_solve(kind, steps, eta, rho, t_end, beta_max, solver):
    convert = NUMBER_TYPES[kind]
    net = MIXTURE.model(gf.VP()).x0
    options = {"schedule": "karras", "t_end": t_end}
    expected = _solve(gf.VP(beta_max=beta_max), net, solver, steps, 2, eta=eta, rho=rho, **options)
    got = valid(_solve, gf.VP(beta_max=convert(beta_max)), net, solver, convert(steps), 2, eta=convert(eta),
                rho=convert(rho), schedule="karras", t_end=convert(t_end))
    assert torch.equal(got, expected)
    invalid("steps", _solve, gf.VP(), net, solver, str(steps), 2)
    invalid("rho", _solve, gf.VP(), net, solver, steps, 2, schedule="karras", rho=str(rho))
    invalid("t_end", _solve, gf.VP(), net, solver, steps, 2, t_end=str(t_end))
    invalid("beta_max", gf.VP, beta_max=str(beta_max))


@fuzz(40)
@given(solver=st.sampled_from(FIXED), process=st.sampled_from(sorted(PROCESSES)),
       dtype=st.sampled_from([torch.float16, torch.bfloat16]), steps=st.integers(2, 8), batch=st.integers(1, 6))
def test_half_precision_solves_are_the_float32_solve_of_the_rounding_model(solver, process, dtype, steps, batch):
    """A float16/bfloat16 input keeps the state and history in float32: the solve equals, bit
    for bit, the float32 solve of a model that rounds its input and output to the half dtype
    (the stated distance to float32 itself is tests/test_precision.py's)."""
    proc = PROCESSES[process]()
    exact = MIXTURE.model(proc)
    half = valid(_solve, proc, lambda x, t: exact.x0(x.float(), t).to(x.dtype), solver, steps, batch, dtype=dtype)
    rounding = _solve(proc, lambda x, t: exact.x0(x.to(dtype).float(), t).to(dtype).float(), solver, steps, batch,
                      dtype=torch.float32, x_T_dtype=dtype)
    assert half.dtype == dtype
    assert torch.equal(half, rounding.to(dtype)), (solver, process)
