"""Fuzz the "safe by construction" guarantees: models that alias the solver's memory, processes
changed after a solve, numbers of every numeric type, and half-precision state, each against
the plain answer for random solvers, processes, step counts and batches."""
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
NUMBER_TYPES = {"python": lambda v: v, "numpy": lambda v: np.asarray(v)[()],  # 0-d tensors in float64 (a float32
                "tensor": lambda v: torch.tensor(v, dtype=torch.float64 if isinstance(v, float) else torch.int64)}  # rounds)


def _solve(process, net, solver, steps, batch, **options):
    model = gf.Model(net, process, "x0")
    x_T = 2.0 * torch.randn(batch, 2, generator=torch.Generator().manual_seed(batch), dtype=torch.float64)
    return gf.sample(model, x_T=x_T * process.sigma(process.T), solver=solver, steps=steps,
                     generator=list(range(batch)), **options)


class _Static:
    """A model returning one preallocated output buffer on every call (CUDA-graph style)."""

    def __init__(self, net):
        self.net, self.buffer = net, None

    def __call__(self, x, t):
        out = self.net(x, t)
        if self.buffer is None or self.buffer.shape != out.shape:
            self.buffer = torch.empty_like(out)
        return self.buffer.copy_(out)


@fuzz(60)
@given(solver=st.sampled_from(FIXED), process=st.sampled_from(sorted(PROCESSES)), steps=st.integers(2, 6),
       batch=st.integers(1, 5), alias=st.sampled_from(["input", "static", "mutate"]))
def test_aliasing_models_equal_a_pure_model_or_raise(solver, process, steps, batch, alias):
    proc = PROCESSES[process]()
    exact = MIXTURE.model(proc)

    def pure(x, t):
        return exact.x0(x, t)

    expected = _solve(proc, pure, solver, steps, batch)
    if alias == "input":  # a net that returns its input tensor: the same as returning a copy of it
        expected = _solve(proc, lambda x, t: x.clone(), solver, steps, batch)
        got = valid(_solve, proc, lambda x, t: x, solver, steps, batch)
    elif alias == "static":
        try:
            got = valid(_solve, proc, _Static(pure), solver, steps, batch)
        except OutputAliasError:
            return
    else:
        def net(x, t):
            x.mul_(1.0)  # bumps the version counter: a write into the solver's state
            return pure(x, t)
        with pytest.raises(InputMutationError, match=solver):
            _solve(proc, net, solver, steps, batch)
        return
    assert torch.equal(got, expected), (solver, process, alias)


@fuzz(40)
@given(solver=st.sampled_from(["euler", "ddim", "dpmpp_2m", "heun", "unipc"]), steps=st.integers(2, 8),
       beta_max=st.floats(5.0, 30.0))
def test_a_process_cannot_change_under_a_cached_solve(solver, steps, beta_max):
    net = MIXTURE.model(gf.VP()).x0
    expected = _solve(gf.VP(beta_max=beta_max), net, solver, steps, 3)  # before any other VP was cached
    first = gf.VP(beta_max=20.0)
    valid(_solve, first, net, solver, steps, 3)
    with pytest.raises(AttributeError, match="beta_max"):
        first.beta_max = beta_max
    assert first.beta_max == 20.0
    del first  # a new process may reuse its id(): value-keyed caches must not return its tables
    assert torch.equal(_solve(gf.VP(beta_max=beta_max), net, solver, steps, 3), expected)


@fuzz(60)
@given(kind=st.sampled_from(sorted(NUMBER_TYPES)), steps=st.integers(1, 6), eta=st.floats(0.0, 1.0),
       solver=st.sampled_from(["ddim", "euler_ancestral", "dpmpp_2m_sde"]))
def test_numbers_of_every_type_give_the_same_solve(kind, steps, eta, solver):
    convert = NUMBER_TYPES[kind]
    proc = gf.VP()
    net = MIXTURE.model(proc).x0
    expected = _solve(proc, net, solver, steps, 2, eta=eta)
    got = valid(_solve, proc, net, solver, convert(steps), 2, eta=convert(eta))
    assert torch.equal(got, expected)
    invalid("steps", _solve, proc, net, solver, str(steps), 2)


@fuzz(30)
@given(solver=st.sampled_from([s for s in FIXED if s not in ("pc",)]), dtype=st.sampled_from([torch.float16,
       torch.bfloat16]), steps=st.integers(3, 8))
def test_half_precision_inputs_stay_near_float32(solver, dtype, steps):
    proc = gf.EDM()
    exact = MIXTURE.model(proc)
    model = gf.Model(lambda x, t: exact.x0(x.float(), t).to(x.dtype), proc, "x0")
    x_T = 80.0 * torch.randn(16, 2, generator=torch.Generator().manual_seed(3))
    reference = gf.sample(model, x_T=x_T, solver=solver, steps=steps, generator=list(range(16)))
    half = valid(gf.sample, model, x_T=x_T.to(dtype), solver=solver, steps=steps, generator=list(range(16)))
    assert half.dtype == dtype
    error = (half.float() - reference).abs().median().item()
    assert error < (0.06 if dtype == torch.float16 else 0.3) * max(1.0, reference.abs().max().item()), (solver, error)
