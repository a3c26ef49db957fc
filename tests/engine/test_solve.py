"""gf.solve on ODEs: per-sample times, saveat, callback and progress, divergence, backends and
dtypes, gradients through the solve, and bad arguments (errors name the argument)."""
import math

import pytest
import torch

import genflow as gf

from .test_ode import Y0, exact, rhs


def linear(t, y):
    return -0.5 * y + torch.sin(t).reshape(-1, *([1] * (y.dim() - 1))) * y if t.dim() else -0.5 * y + torch.sin(t) * y


def linear_exact(y0, t0, t1):
    """y' = (-1/2 + sin t) y: y(t1) = y0 exp(-(t1 - t0)/2 + cos t0 - cos t1)."""
    t0, t1 = torch.as_tensor(t0, dtype=torch.float64), torch.as_tensor(t1, dtype=torch.float64)
    g = torch.exp(-(t1 - t0) / 2 + torch.cos(t0) - torch.cos(t1))
    return y0 * g.reshape(-1, *([1] * (y0.dim() - 1)))


@pytest.mark.parametrize("solver, options", [("rk4", {"steps": 17}), ("dopri5", {"rtol": 1e-9, "atol": 1e-9}),
                                             ("tsit5", {"rtol": 1e-9, "atol": 1e-9})])
def test_per_sample_times_equal_solving_each_sample_alone(solver, options):
    y0 = torch.randn(5, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t0 = torch.tensor([0.0, 0.5, 1.0, 2.0, 0.3], dtype=torch.float64)
    t1 = torch.tensor([1.0, 0.1, 3.0, 2.5, -1.0], dtype=torch.float64)  # both directions
    together = gf.solve(gf.ODE(linear), y0, t0, t1, solver=solver, **options)
    for b in range(5):
        alone = gf.solve(gf.ODE(linear), y0[b:b + 1], float(t0[b]), float(t1[b]), solver=solver, **options)
        assert (together[b] - alone[0]).abs().max().item() <= 1e-12
    assert (together - linear_exact(y0, t0, t1)).abs().max().item() <= 1e-5


def test_per_sample_steps_follow_each_sample_and_batch_norm_shares_them():
    y0 = torch.tensor([[1e-3, 0.0, 0.1], [3.0, -2.0, 2.0]], dtype=torch.float64)
    out = gf.solve(gf.ODE(rhs), y0, 0.0, 2.0, solver="dopri5", rtol=1e-8, atol=1e-10, saveat=[2.0])
    steps = out.stats["accepted_steps"]
    assert steps[0] != steps[1]
    batch = gf.solve(gf.ODE(rhs), y0, 0.0, 2.0, solver="dopri5", rtol=1e-8, atol=1e-10, saveat=[2.0],
                     error_norm="batch")
    assert batch.stats["accepted_steps"][0] == batch.stats["accepted_steps"][1]
    for result in (out, batch):
        assert (result.y - exact(y0, 2.0)).abs().max().item() <= 1e-6


def test_fixed_grid_saveat_returns_the_grid_states_and_refuses_other_times():
    ts = torch.linspace(0.0, 2.0, 9, dtype=torch.float64)
    states = []
    out = gf.solve(gf.ODE(rhs), Y0, 0.0, 2.0, solver="rk4", ts=ts, saveat=ts[[0, 3, 8]],
                   callback=lambda info: states.append(info["x"].clone()))
    assert torch.equal(out.ys[0], Y0) and torch.equal(out.ys[1], states[2]) and torch.equal(out.ys[2], out.y)
    assert out.stats["nfe"] == 8 * 4 and len(states) == 8
    with pytest.raises(ValueError, match="saveat time .* is not a node"):
        gf.solve(gf.ODE(rhs), Y0, 0.0, 2.0, solver="rk4", ts=ts, saveat=[0.3])


def test_callback_progress_and_nfe(capsys):
    infos = []
    gf.solve(gf.ODE(rhs), Y0, 0.0, 1.0, solver="dopri5", steps=5, progress=True, callback=infos.append)
    assert [info["i"] for info in infos] == list(range(5))
    assert infos[-1]["nfe"] == 5 * 6 + 1 and float(infos[-1]["t_next"]) == 1.0  # FSAL: 6 per step + the first
    infos.clear()
    gf.solve(gf.ODE(rhs), Y0, 0.0, 1.0, solver="tsit5", callback=infos.append)
    assert set(infos[0]) >= {"i", "t", "t_next", "h", "accepted", "error", "x", "nfe"}
    assert bool((infos[-1]["t_next"] == 1.0).all())


def test_divergence_raises_naming_the_step():
    def blows_up(t, y):
        return y * y * 50.0

    with pytest.raises(gf.NonFiniteError, match="gf.solve: solver 'rk4' produced NaN/Inf at step"):
        gf.solve(gf.ODE(blows_up), torch.ones(2, 2, dtype=torch.float64), 0.0, 1.0, solver="rk4", steps=10)
    with pytest.raises(gf.NonFiniteError, match="dopri5"):
        gf.solve(gf.ODE(lambda t, y: y * float("nan")), torch.ones(2, 2), 0.0, 1.0, solver="dopri5")
    y = gf.solve(gf.ODE(blows_up), torch.ones(2, 2, dtype=torch.float64), 0.0, 1.0, solver="rk4", steps=10,
                 check_finite=False)
    assert not bool(torch.isfinite(y).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backends_agree_and_y0_is_not_modified(dtype):
    y0 = Y0.to(dtype)
    keep = y0.clone()
    fused = gf.solve(gf.ODE(rhs), y0, 0.0, 2.0, solver="tsit5", steps=13, backend="auto")
    torch_ = gf.solve(gf.ODE(rhs), y0, 0.0, 2.0, solver="tsit5", steps=13, backend="torch")
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert fused.dtype == dtype and (fused - torch_).abs().max().item() <= tol
    assert torch.equal(y0, keep)


def test_empty_batch_and_time_argument():
    seen = []

    def f(t, y):
        seen.append((t.dim(), t.dtype))
        return -y

    assert gf.solve(gf.ODE(f), torch.zeros(0, 3), 0.0, 1.0, solver="rk4", steps=4).shape == (0, 3)
    gf.solve(gf.ODE(f), torch.ones(3, 2), 0.0, 1.0, solver="rk4", steps=2)
    gf.solve(gf.ODE(f), torch.ones(3, 2), torch.zeros(3), torch.tensor([1.0, 2.0, 3.0]), solver="rk4", steps=2)
    assert seen[0] == (0, torch.float32) and seen[-1] == (1, torch.float32)


def test_gradients_through_fixed_grid_solves_match_autograd_of_the_plain_formula():
    """gradcheck of the solve wrt y0 and a drift parameter, and equality with the gradient of
    the same RK4 written in plain torch."""
    theta = torch.tensor([0.7, -0.3], dtype=torch.float64, requires_grad=True)
    y0 = torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)

    def drift(t, y):
        return torch.tanh(y * theta) - 0.1 * t * y

    def ours(y0, theta_):
        return gf.solve(gf.ODE(lambda t, y: torch.tanh(y * theta_) - 0.1 * t * y), y0, 0.0, 1.0, solver="rk4",
                        steps=4)

    assert torch.autograd.gradcheck(ours, (y0, theta))
    loss = ours(y0, theta).square().sum()
    g_ours = torch.autograd.grad(loss, (y0, theta))
    ts = torch.linspace(0.0, 1.0, 5, dtype=torch.float64)
    y = y0
    for t, t_next in zip(ts[:-1], ts[1:]):
        h = t_next - t
        k1 = drift(t, y)
        k2 = drift(t + h / 2, y + h / 2 * k1)
        k3 = drift(t + h / 2, y + h / 2 * k2)
        k4 = drift(t + h, y + h * k3)
        y = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    g_plain = torch.autograd.grad(y.square().sum(), (y0, theta))
    for a, b in zip(g_ours, g_plain):
        assert (a - b).abs().max().item() <= 1e-12


def test_gradients_through_an_adaptive_solve():
    y0 = torch.tensor([[1.0, 2.0], [0.5, -1.0]], dtype=torch.float64, requires_grad=True)
    y1 = gf.solve(gf.ODE(linear), y0, 0.0, 2.0, solver="dopri5", rtol=1e-10, atol=1e-10)
    (grad,) = torch.autograd.grad(y1.sum(), y0)
    expected = math.exp(-1.0 + 1.0 - math.cos(2.0))  # dy(t1)/dy0 of the linear ODE
    assert (grad - expected).abs().max().item() <= 1e-8


@pytest.mark.parametrize("kwargs, error, match", [
    ({"term": lambda t, y: y}, TypeError, "term must be a gf.ODE or gf.SDE"),
    ({"y0": [1.0, 2.0]}, TypeError, "y0 must be a floating tensor"),
    ({"y0": torch.tensor([[float("nan")]])}, ValueError, "y0 contains NaN"),
    ({"solver": "rk45"}, ValueError, "solver must be one of .*did you mean"),
    ({"solver": "rk4"}, ValueError, "solver 'rk4' has no error estimate"),
    ({"steps": 0}, ValueError, "steps must be >= 1"),
    ({"steps": 2.5}, TypeError, "steps must be an integer"),
    ({"steps": 4, "ts": [0.0, 1.0]}, ValueError, "not both"),
    ({"ts": [0.0, 0.5, 0.4]}, ValueError, "ts must be strictly increasing or strictly decreasing"),
    ({"ts": torch.zeros(3, 5)}, ValueError, r"ts must have shape \[N\+1\] or \[N\+1, B\]"),
    ({"t0": torch.zeros(5)}, ValueError, r"t0 must be a float or a tensor of shape \[B\] = \[2\]"),
    ({"t1": float("inf")}, ValueError, "t1 must be a finite number"),
    ({"t1": "one"}, TypeError, "t1 must be a real number"),
    ({"rtol": -1.0}, ValueError, "rtol must be >= 0"),
    ({"rtol": 0.0, "atol": 0.0}, ValueError, "rtol and atol must not both be 0"),
    ({"steps": 3, "rtol": 1e-3}, ValueError, "rtol, atol, h_init and dense are for adaptive solves"),
    ({"h_init": 0.0}, ValueError, "h_init must be > 0"),
    ({"max_steps": 0}, ValueError, "max_steps must be >= 1"),
    ({"max_steps": 2}, RuntimeError, "reached max_steps=2"),
    ({"error_norm": "global"}, ValueError, "error_norm must be one of"),
    ({"backend": "gpu"}, ValueError, "backend must be one of"),
    ({"check_finite": 1}, TypeError, "check_finite must be a bool"),
    ({"saveat": torch.zeros(2, 3)}, ValueError, r"saveat must have shape \[S\] or \[S, B\]"),
    ({"callback": 3}, TypeError, "callback must be callable"),
    ({"term": gf.ODE(lambda t, y: y[:, :1])}, ValueError, r"drift\(t, y\) must return a tensor like y"),
    ({"eta": 0.5}, TypeError, "unexpected options for ODE solver"),
])
def test_bad_arguments_raise_naming_the_argument(kwargs, error, match):
    args = {"term": gf.ODE(lambda t, y: -y), "y0": torch.ones(2, 2), "t0": 0.0, "t1": 1.0, "solver": "dopri5"}
    args.update(kwargs)
    term, y0, t0, t1 = args.pop("term"), args.pop("y0"), args.pop("t0"), args.pop("t1")
    with pytest.raises(error, match=match):
        gf.solve(term, y0, t0, t1, **args)


def test_dense_output_needs_an_adaptive_solve():
    out = gf.solve(gf.ODE(rhs), Y0, 0.0, 1.0, solver="rk4", steps=4, saveat=[1.0])
    with pytest.raises(ValueError, match="needs gf.solve"):
        out.evaluate(0.5)
    dense = gf.solve(gf.ODE(rhs), Y0, 0.0, 1.0, solver="dopri5", dense=True)
    with pytest.raises(ValueError, match="t must lie in each sample's interval"):
        dense.evaluate(1.5)


@pytest.mark.parametrize("kwargs, match", [
    ({}, "must run on a CUDA device"),
    ({"rtol": 1e-3, "steps": None}, "the solver is adaptive"),
    ({"t0": torch.tensor([0.0, 0.5])}, "per-sample time grids"),
    ({"saveat": [1.0]}, "saveat"),
    ({"callback": print}, "callback"),
    ({"progress": True}, "progress bar"),
])
def test_uncapturable_solves_are_refused_up_front(kwargs, match):
    args = {"t0": 0.0, "steps": 4}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        gf.solve(gf.ODE(lambda t, y: -y), torch.ones(2, 2), args.pop("t0"), 1.0, solver="dopri5", cuda_graph=True,
                 **args)


def test_graphed_solve_plumbing_replays_the_captured_body(monkeypatch):
    """On the CPU with a recorder whose 'replay' re-runs the captured body: the first call
    captures, later calls with the same term reuse it with their own y0, and equal the eager solve."""
    import importlib

    from genflow import cuda_graph
    from genflow.ops.fused_update import use_kernel

    solve_module = importlib.import_module("genflow.engine.solve")  # the module (gf.engine.solve is the function)

    captures = []

    def rerun(body, device):
        captures.append(device)
        out = body()
        return (lambda: out.copy_(body())), out

    monkeypatch.setattr(cuda_graph, "_record", rerun)
    solve_module.clear_graphs()
    term = gf.ODE(rhs)
    grid = torch.linspace(0.0, 2.0, 7, dtype=torch.float64)
    for seed in (0, 1):
        y0 = torch.rand(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) + 0.5
        graphed = solve_module.graphed_solve(term, "rk4", y0, grid, kernel=use_kernel("auto", y0.device),
                                             check_finite=True)
        assert torch.equal(graphed, gf.solve(term, y0, 0.0, 2.0, solver="rk4", ts=grid))
    assert len(captures) == 1
    with pytest.raises(gf.NonFiniteError, match="gf.solve: solver 'rk4' produced NaN/Inf"):
        solve_module.graphed_solve(gf.ODE(lambda t, y: y * y * 1e3), "rk4", torch.ones(2, 2, dtype=torch.float64),
                                   grid, kernel=use_kernel("auto", torch.device("cpu")), check_finite=True)
    solve_module.clear_graphs()


def test_graph_cache_keys_hold_the_term_and_the_grid_values(monkeypatch):
    """The gf.solve graph cache (genflow._cache.LRU) holds the term in its key, so a new term is a
    miss even where an old one's address could be reused, and keys the grid by its values: an
    equal grid in a new tensor hits, a grid changed in place misses."""
    import gc
    import importlib
    import weakref

    from genflow import cuda_graph
    from genflow.ops.fused_update import use_kernel

    solve_module = importlib.import_module("genflow.engine.solve")
    captures = []

    def rerun(body, device):
        captures.append(device)
        out = body()
        return (lambda: out.copy_(body())), out

    monkeypatch.setattr(cuda_graph, "_record", rerun)
    solve_module.clear_graphs()
    kernel = use_kernel("auto", torch.device("cpu"))
    y0 = torch.rand(2, 3, dtype=torch.float64) + 0.5
    grid = torch.linspace(0.0, 1.0, 5, dtype=torch.float64)
    term = gf.ODE(rhs)
    alive = weakref.ref(term)
    solve_module.graphed_solve(term, "rk4", y0, grid, kernel=kernel, check_finite=True)
    solve_module.graphed_solve(term, "rk4", y0, grid.clone(), kernel=kernel, check_finite=True)
    assert len(captures) == 1
    del term
    gc.collect()
    assert alive() is not None  # the cache entry holds its term
    solve_module.graphed_solve(gf.ODE(rhs), "rk4", y0, grid, kernel=kernel, check_finite=True)
    assert len(captures) == 2
    grid[2] += 0.01
    out = solve_module.graphed_solve(alive(), "rk4", y0, grid, kernel=kernel, check_finite=True)
    assert len(captures) == 3
    assert torch.equal(out, gf.solve(alive(), y0, 0.0, 1.0, solver="rk4", ts=grid))
    solve_module.clear_graphs()
    gc.collect()
    assert alive() is None


def _rounding(fn, dtype):
    """``fn`` called on ``t`` and ``y`` rounded to ``dtype``, its output rounded to it and cast back."""
    return lambda t, y: fn(t.to(dtype), y.to(dtype)).to(dtype).to(y.dtype)


def _half_drift(t, y):
    return torch.sin(3 * y) - 0.5 * y * t.reshape(-1, 1)


def _half_diffusion(t, y):
    return 0.3 * (1 + 0.2 * torch.tanh(y))


@pytest.mark.parametrize("dtype, state", [(torch.float16, None), (torch.bfloat16, None),
                                          (torch.float16, torch.float64), (torch.float32, torch.float64)])
@pytest.mark.parametrize("solver, options", [("rk4", {"steps": 7}), ("dopri5", {"rtol": 1e-4, "atol": 1e-4}),
                                             ("euler_maruyama", {"steps": 9, "generator": [3, 4, 5]})])
def test_state_dtype_is_the_wide_solve_of_a_rounding_drift(dtype, state, solver, options):
    """A half (or float32) y0 with a wider state equals, bit for bit, the wide solve of a drift
    (and diffusion) that rounds its input and output to y0's dtype, returned in y0's dtype."""
    wide = torch.float32 if state is None else state
    y0 = torch.randn(3, 5, generator=torch.Generator().manual_seed(1)).to(dtype)
    sde = solver == "euler_maruyama"

    def term(cast):
        drift = _rounding(_half_drift, dtype) if cast else _half_drift
        if not sde:
            return gf.ODE(drift)
        return gf.SDE(drift, _rounding(_half_diffusion, dtype) if cast else _half_diffusion)

    seen = []
    out = gf.solve(term(False), y0, 0.0, 1.5, solver=solver, state_dtype=state,
                   callback=lambda info: seen.append(info["x"].dtype), **options)
    want = gf.solve(term(True), y0.to(wide), 0.0, 1.5, solver=solver, **options)
    assert out.dtype == dtype and set(seen) == {wide}
    assert torch.equal(out, want.to(dtype))


def test_state_dtype_calls_the_drift_in_y0s_dtype_and_casts_every_result():
    seen = []

    def drift(t, y):
        seen.append((t.dtype, y.dtype))
        return -y

    y0 = torch.ones(2, 3, dtype=torch.float16)
    sol = gf.solve(gf.ODE(drift), y0, 0.0, 1.0, solver="dopri5", saveat=[0.5, 1.0], dense=True)
    assert set(seen) == {(torch.float16, torch.float16)}
    assert sol.y.dtype == sol.ys.dtype == sol.evaluate(0.25).dtype == torch.float16
    torch.testing.assert_close(sol.evaluate(0.25).float(), torch.full((2, 3), math.exp(-0.25)), rtol=0, atol=1e-3)
    half = gf.solve(gf.ODE(drift), y0, 0.0, 1.0, solver="rk4", steps=4, state_dtype=torch.float16,
                    callback=lambda info: seen.append(info["x"].dtype))
    assert half.dtype == torch.float16 and seen[-1] == torch.float16


def test_state_dtype_keeps_gradients_and_the_adjoints_parameters():
    net = torch.nn.Linear(3, 3).half()
    y0 = torch.randn(4, 3).half().requires_grad_(True)
    for adjoint in (False, True):
        net.zero_grad()
        y0.grad = None
        out = gf.solve(gf.ODE(lambda t, y: net(y)), y0, 0.0, 1.0, solver="rk4", steps=3, adjoint=adjoint,
                       adjoint_params=tuple(net.parameters()) if adjoint else None)
        out.float().square().sum().backward()
        assert out.dtype == y0.grad.dtype == net.weight.grad.dtype == torch.float16
        assert bool(torch.isfinite(y0.grad).all()) and bool(net.weight.grad.abs().sum() > 0)


@pytest.mark.parametrize("state_dtype, error, match", [
    (torch.int32, TypeError, "state_dtype must be a floating-point torch.dtype"),
    ("float32", TypeError, "state_dtype must be a floating-point torch.dtype"),
])
def test_bad_state_dtype(state_dtype, error, match):
    with pytest.raises(error, match=match):
        gf.solve(gf.ODE(linear), Y0, 0.0, 1.0, solver="rk4", steps=2, state_dtype=state_dtype)
    with pytest.raises(ValueError, match="cuda_graph=True keeps the state in y0's dtype"):
        gf.solve(gf.ODE(linear), Y0, 0.0, 1.0, solver="rk4", steps=2, state_dtype=torch.float32, cuda_graph=True)
