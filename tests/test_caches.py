"""Caches that cannot go stale (issue 16, item 2): processes are immutable, and the grid,
table and step-plan caches are keyed on values (``genflow._cache``), so changing what a cached
result depends on can never return the old result."""
import numpy as np
import pytest
import torch

import genflow as gf
from genflow._cache import LRU, tensor_key, value_key
from genflow.solvers.base import table

MIXTURE = gf.GaussianMixture.ring()

PROCESSES = {
    "VP": (gf.VP, {"beta_min": 0.1, "beta_max": 20.0, "T": 1.0, "t_min": 1e-3},
           {"beta_min": 0.2, "beta_max": 10.0, "T": 0.9, "t_min": 2e-3}),
    "SubVP": (gf.SubVP, {"beta_min": 0.1, "beta_max": 20.0}, {"beta_min": 0.3, "beta_max": 12.0}),
    "VE": (gf.VE, {"sigma_min": 0.01, "sigma_max": 50.0}, {"sigma_min": 0.02, "sigma_max": 30.0}),
    "CosineVP": (gf.CosineVP, {"s": 0.008}, {"s": 0.02}),
    "EDM": (gf.EDM, {"sigma_min": 0.002, "sigma_max": 80.0}, {"sigma_min": 0.005, "sigma_max": 40.0}),
    "LinearPath": (gf.LinearPath, {"sigma_min": 0.0, "t_min": 1e-3}, {"sigma_min": 0.01, "t_min": 2e-3}),
}


def _solve(process, solver="dpmpp_2m", **options):
    x_T = torch.randn(6, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    if "schedule" not in options:
        options["steps"] = 8
    return gf.sample(MIXTURE.model(process), x_T=x_T, solver=solver, generator=list(range(6)), **options)


@pytest.mark.parametrize("name", list(PROCESSES))
def test_assigning_a_parameter_is_refused_and_the_next_solve_equals_a_fresh_process(name):
    cls, base, changed = PROCESSES[name]
    process = cls(**base)
    first = _solve(process)
    for param, value in changed.items():
        with pytest.raises(AttributeError, match=rf"cannot set '{param}'.*build a new process"):
            setattr(process, param, value)
        with pytest.raises(AttributeError, match=param):
            delattr(process, param)
    assert torch.equal(_solve(process), first)
    assert torch.equal(_solve(process), _solve(cls(**base)))


@pytest.mark.parametrize("name", list(PROCESSES))
@pytest.mark.parametrize("solver", ["dpmpp_2m", "euler", "ddim", "unipc", "heun"])
def test_replacing_each_parameter_equals_a_fresh_process(name, solver):
    """A new process with one parameter changed never hits a cache entry of the old one."""
    cls, base, changed = PROCESSES[name]
    reference = _solve(cls(**base), solver)
    for param, value in changed.items():
        options = {**base, param: value}
        if name == "LinearPath" and param == "sigma_min" and "t_min" not in options:
            options["t_min"] = 1e-3
        result = _solve(cls(**options), solver)
        gf.solvers.base._TABLES.clear()
        gf.schedules._GRIDS.clear()
        gf.solvers.base._STEP_PLANS.clear()
        fresh = _solve(cls(**options), solver)
        assert torch.equal(result, fresh), param
        assert not torch.equal(result, reference), param


def test_discrete_vp_table_cannot_be_changed_through_its_attribute():
    process = gf.DiscreteVP.linear(100, dtype=torch.float64)
    first = _solve(process)
    table_view = process.alphas_cumprod
    table_view.mul_(0.5)  # a copy: the process is unchanged
    assert torch.equal(_solve(process), first)
    assert torch.equal(_solve(process), _solve(gf.DiscreteVP.linear(100, dtype=torch.float64)))
    other = gf.DiscreteVP.linear(100, beta_end=0.03, dtype=torch.float64)
    assert not torch.equal(_solve(other), first)


def test_equal_processes_share_cache_entries_and_keys():
    a, b = gf.VP(beta_max=15.0), gf.VP(beta_max=np.float64(15.0))
    assert a.cache_key() == b.cache_key() and a.cache_key() != gf.VP().cache_key()
    assert gf.VE().cache_key() != gf.EDM().cache_key()
    ts = gf.time_grid(a, 5)
    assert table(a, ts) is table(b, ts.clone())  # keyed by values, not by object identity
    assert gf.time_grid(a, 5) is gf.time_grid(b, 5)


def test_modified_grids_are_never_served_stale():
    process = gf.VP()
    ts = gf.time_grid(process, 6)
    expected = ts.clone()
    ts.mul_(0.5)  # the shared cached grid is modified in place
    assert torch.equal(gf.time_grid(process, 6), expected)
    grid = expected.clone()
    first = _solve(process, schedule=grid)
    grid[1:-1] *= 0.9  # an explicit grid modified after a solve
    assert torch.equal(_solve(process, schedule=grid), _solve(process, schedule=grid.clone()))
    assert not torch.equal(_solve(process, schedule=grid), first)


def test_lru_evicts_the_least_recently_used():
    cache = LRU(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # "b" is now the least recently used
    cache.put("c", 3)
    assert cache.get("b") is None and cache.get("a") == 1 and cache.get("c") == 3 and len(cache) == 2
    assert cache.get_or_compute("d", lambda: 4) == 4 and cache.get_or_compute("d", lambda: 5) == 4
    cache.clear()
    assert len(cache) == 0
    with pytest.raises(ValueError, match="maxsize"):
        LRU(0)


def test_value_keys():
    t = torch.arange(3.0)
    assert tensor_key(t) == tensor_key(t.clone()) != tensor_key(t.double())
    assert value_key([1.0, np.float32(2.0), torch.tensor(3.0)])[1:3] == (1.0, 2.0)
    assert value_key({"b": 1, "a": (2, "x")}) == value_key({"a": (2, "x"), "b": 1})
    with pytest.raises(TypeError, match="cache_key"):
        value_key(object())


@pytest.mark.parametrize("solver, options", [("lms", {}), ("lms", {"order": 2}), ("dpmpp_2m", {}),
                                             ("dpmpp_3m", {"lower_order_final": False}),
                                             ("dpmpp_2m_sde", {"eta": 0.5})])
def test_step_plans_follow_the_grid_and_the_process_not_the_objects(solver, options):
    """The LMS coefficient rows and the DPM-Solver++ step plans are keyed by the grid's values
    (through its serial): a grid modified in place after a solve, or a model whose process is
    replaced, solves as fresh objects do."""
    process = gf.VP()
    grid = gf.time_grid(process, 9, "logsnr").clone()
    model = MIXTURE.model(process)
    x_T = torch.randn(5, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def solve(m, g):
        return gf.sample(m, x_T=x_T, solver=solver, schedule=g, generator=list(range(5)), **options)

    first = solve(model, grid)
    grid[1:-1] = grid[1:-1] * 0.95  # the same tensor, other times
    changed = solve(model, grid)
    assert torch.equal(changed, solve(MIXTURE.model(gf.VP()), grid.clone()))
    assert not torch.equal(changed, first)
    other = gf.VP(beta_max=10.0)
    model.process = other  # the same Model object, another process
    replaced = solve(model, grid)
    assert torch.equal(replaced, solve(gf.Model(model.net, gf.VP(beta_max=10.0), prediction="x0"), grid.clone()))
    assert not torch.equal(replaced, changed)


def test_cuda_graph_captures_follow_the_model_and_its_process(monkeypatch):
    """A captured solve is keyed by the model object and its network (identity: the graph replays
    their kernels) and by its process's values: replacing the process or the network of the same
    Model object after a solve captures anew and equals a fresh model's eager solve (replay
    emulated on the CPU by re-running the captured body, as in tests/test_cuda_graph.py)."""
    from genflow import cuda_graph
    from genflow.solvers import get

    captures = []

    def rerun(body, device):
        captures.append(1)
        out = body()
        return (lambda: out.copy_(body())), out

    monkeypatch.setattr(cuda_graph, "_record", rerun)
    cuda_graph.clear()
    model = MIXTURE.model(gf.VP())
    ts = gf.time_grid(gf.VP(), 8, "logsnr")

    def graphed(m):
        return cuda_graph.graphed_solve(m, get("dpmpp_2m"), ts, shape=(6, 2), x_T=None, dtype=torch.float64,
                                        device="cpu", generator=3, eta=None, backend="auto", final_step=None,
                                        options={})

    def eager(m):
        return gf.sample(m, (6, 2), solver="dpmpp_2m", schedule=ts, generator=3, dtype=torch.float64)

    assert torch.equal(graphed(model), eager(model)) and torch.equal(graphed(model), eager(model))
    assert len(captures) == 1
    model.process = gf.VP(beta_max=10.0)
    assert torch.equal(graphed(model), eager(gf.Model(model.net, gf.VP(beta_max=10.0), prediction="x0")))
    model.net = MIXTURE.model(gf.VP(beta_max=10.0)).net
    assert torch.equal(graphed(model), eager(MIXTURE.model(gf.VP(beta_max=10.0))))
    assert len(captures) == 3
    cuda_graph.clear()
