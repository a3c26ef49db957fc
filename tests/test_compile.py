"""torch.compile(fullgraph=True) traces a whole solver step of every fixed-grid solver without a
graph break (the fused ops' fake registrations, host-float coefficient math), and the compiled
step equals the eager one (issue: CUDA engine, torch.compile-clean ops; CPU here)."""
import pytest
import torch

import genflow as gf
from genflow.noise import noise_source
from genflow.schedules import time_grid
from genflow.solvers import SOLVERS

FIXED_GRID = sorted(name for name, cls in SOLVERS.items() if not getattr(cls, "adaptive", False))
STEPS = 3  # compiled steps per solver (first-order start, then the multistep updates)


def _net(x, t):
    return torch.tanh(x) * (1 + t[:, None]) - 0.3 * x


def _run(name, step_fn_factory, seed):
    process = gf.VP()
    model = gf.Model(_net, process, "eps")
    ts = time_grid(process, 8, "logsnr").clone()
    solver = SOLVERS[name](model, ts, noise=noise_source(seed, 4, None, noise="philox"))
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(1))
    step = step_fn_factory(solver)
    with torch.no_grad():
        for i in range(STEPS):
            x = step(x, i).clone()
    return x


@pytest.mark.parametrize("name", FIXED_GRID)
def test_solver_step_compiles_without_graph_breaks(name):
    torch._dynamo.reset()
    eager = _run(name, lambda solver: (lambda x, i: solver.step(i, x)), seed=7)
    compiled = _run(name, lambda solver: torch.compile(lambda x, i: solver.step(i, x), fullgraph=True,
                                                       backend="aot_eager"), seed=7)
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)
