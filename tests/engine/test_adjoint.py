"""gf.solve(adjoint=True): the continuous adjoint (Chen et al. 2018, Algorithm 1) against the
closed-form gradient of a linear ODE, backpropagation through the steps, torchdiffeq's
odeint_adjoint on identical inputs; memory O(1) in the steps; the options it refuses."""
import math

import pytest
import torch

import genflow as gf

torchdiffeq = pytest.importorskip("torchdiffeq")


class Field(torch.nn.Module):
    """A small MLP drift with a time factor; ``t`` is 0-d (shared) or [B] (per-sample steps)."""

    def __init__(self, dim=3, dtype=torch.float64, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(torch.nn.Linear(dim, 11), torch.nn.Tanh(), torch.nn.Linear(11, dim)).to(dtype)

    def forward(self, t, y):
        flat = y.reshape(y.shape[0], -1)
        return (self.net(flat) * (1 + 0.5 * torch.sin(t)).reshape(-1, 1)).reshape(y.shape)


def _gradients(drift, y0, weights, adjoint, **kwargs):
    y0 = y0.detach().requires_grad_(True)
    out = gf.solve(gf.ODE(drift), y0, 0.0, 1.3, adjoint=adjoint, **kwargs)
    y = out if isinstance(out, torch.Tensor) else out.y
    loss = (y * weights).sum() + (0 if isinstance(out, torch.Tensor) else (out.ys ** 2).sum())
    return torch.autograd.grad(loss, [y0, *drift.parameters()])


def _close(ours, reference, rtol):
    for a, b in zip(ours, reference):
        scale = b.abs().max().item()
        assert (a - b).abs().max().item() <= rtol * scale, ((a - b).abs().max().item(), scale)


def _inputs(shape=(5, 3), dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return torch.randn(shape, dtype=dtype, generator=g), torch.randn(shape, dtype=dtype, generator=g)


def test_linear_ode_gradients_equal_the_closed_form():
    """y' = k y: y(T) = y0 e^{kT}, dL/dy0 = w e^{kT}, dL/dk = T sum(w y0) e^{kT} (k via adjoint_params)."""
    y0, w = _inputs((4, 2, 3))
    k = torch.tensor(-0.7, dtype=torch.float64, requires_grad=True)
    for options in ({"steps": 100}, {"rtol": 1e-11, "atol": 1e-11}):
        y0_ = y0.clone().requires_grad_(True)
        y = gf.solve(gf.ODE(lambda t, y: k * y), y0_, 0.0, 2.0, solver="dopri5", adjoint=True, adjoint_params=[k],
                     **options)
        g_y0, g_k = torch.autograd.grad((y * w).sum(), [y0_, k])
        growth = math.exp(-0.7 * 2.0)
        assert (g_y0 - w * growth).abs().max().item() <= 1e-9
        assert abs(g_k.item() - 2.0 * float((w * y0).sum()) * growth) <= 1e-8


@pytest.mark.parametrize("solver, options, rtol", [
    ("rk4", {"steps": 120}, 1e-9),
    ("dopri5", {"ts": torch.linspace(0.0, 1.3, 41, dtype=torch.float64) ** 1.5 / 1.3 ** 0.5}, 1e-9),
    ("dopri5", {"rtol": 1e-10, "atol": 1e-10}, 1e-7),
    ("tsit5", {"rtol": 1e-10, "atol": 1e-10, "error_norm": "batch"}, 1e-7),
    ("dop853", {"rtol": 1e-10, "atol": 1e-10, "adjoint_rtol": 1e-11, "adjoint_atol": 1e-11}, 1e-7),
])
def test_gradients_match_backpropagation_through_the_steps(solver, options, rtol):
    drift, (y0, w) = Field(), _inputs()
    adjoint = _gradients(drift, y0, w, True, solver=solver, **options)
    options.pop("adjoint_rtol", None), options.pop("adjoint_atol", None)
    backprop = _gradients(drift, y0, w, False, solver=solver, **options)
    _close(adjoint, backprop, rtol)


@pytest.mark.parametrize("solver, options, rtol", [
    ("rk4", {"ts": torch.linspace(0.0, 1.3, 27, dtype=torch.float64)}, 1e-7),  # O(h^4) apart
    ("dopri5", {"rtol": 1e-10, "atol": 1e-10}, 1e-6),  # the save times come from the dense output
])
def test_saveat_gradients_match_backpropagation(solver, options, rtol):
    drift, (y0, w) = Field(dim=2, seed=3), _inputs((3, 2))
    saveat = [0.5, 1.3, 0.0] if solver == "rk4" else [0.45, 1.3, 0.0, 0.9]
    adjoint = _gradients(drift, y0, w, True, solver=solver, saveat=saveat, **options)
    backprop = _gradients(drift, y0, w, False, solver=solver, saveat=saveat, **options)
    _close(adjoint, backprop, rtol)


@pytest.mark.parametrize("solver, peer, options", [("rk4_38", "rk4", {"steps": 64}),
                                                   ("midpoint", "midpoint", {"steps": 64}),
                                                   ("dopri5", "dopri5", {"rtol": 1e-10, "atol": 1e-10})])
def test_equals_torchdiffeq_odeint_adjoint(solver, peer, options):
    """Same drift, y0, loss: fixed grids give the same backward solve (the grid reversed); the
    adaptive solves both approach the exact gradient."""
    drift, (y0, w) = Field(dim=4, seed=5), _inputs((3, 4))
    ours = _gradients(drift, y0, w, True, solver=solver, error_norm="batch", **options) if "rtol" in options else \
        _gradients(drift, y0, w, True, solver=solver, **options)
    y0_ = y0.clone().requires_grad_(True)
    kwargs = {"rtol": 1e-10, "atol": 1e-10} if "rtol" in options else \
        {"options": {"step_size": 1.3 / 64}, "adjoint_options": {"step_size": 1.3 / 64}}
    y = torchdiffeq.odeint_adjoint(drift, y0_, torch.tensor([0.0, 1.3], dtype=torch.float64), method=peer,
                                   **kwargs)[-1]
    theirs = torch.autograd.grad((y * w).sum(), [y0_, *drift.parameters()])
    _close(ours, theirs, 1e-10 if "steps" in options else 1e-7)


def test_float32_and_reversed_time():
    drift, (y0, w) = Field(dtype=torch.float32, seed=2), _inputs((6, 3), torch.float32)
    ours = _gradients(drift, y0, w, True, solver="rk4", ts=torch.linspace(1.3, 0.0, 33, dtype=torch.float64))
    reference = _gradients(drift, y0, w, False, solver="rk4", ts=torch.linspace(1.3, 0.0, 33, dtype=torch.float64))
    assert all(a.dtype == torch.float32 for a in ours)
    _close(ours, reference, 1e-4)


def _saved_bytes(adjoint, steps):
    """The bytes autograd keeps for the backward pass of a solve (saved tensors)."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    drift = Field(dim=8, seed=4)
    y0 = torch.randn(16, 8, dtype=torch.float64, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        gf.solve(gf.ODE(drift), y0, 0.0, 1.0, solver="rk4", steps=steps, adjoint=adjoint)
    return total[0]


def test_memory_is_constant_in_the_number_of_steps():
    # a few states and the 195 parameters, whatever the number of steps
    assert _saved_bytes(True, 10) == _saved_bytes(True, 80) <= (4 * 16 * 8 + 195) * 8
    assert _saved_bytes(False, 80) > 6 * _saved_bytes(False, 10)


def test_drift_tensors_outside_adjoint_params_raise_rather_than_lose_their_gradient():
    scale = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    y0 = torch.ones(2, 3, dtype=torch.float64, requires_grad=True)
    y = gf.solve(gf.ODE(lambda t, y: -scale * y), y0, 0.0, 1.0, solver="rk4", steps=4, adjoint=True)
    with pytest.raises(ValueError, match="not in adjoint_params"):
        y.sum().backward()
    derived = scale * 2  # a non-leaf parameter: the gradient reaches scale through it
    y = gf.solve(gf.ODE(lambda t, y: -derived * y), y0, 0.0, 1.0, solver="rk4", steps=200, adjoint=True,
                 adjoint_params=derived)
    y.sum().backward()
    assert abs(scale.grad.item() - float(-2 * 6 * math.exp(-1.0))) <= 1e-8


@pytest.mark.parametrize("kwargs, error, match", [
    ({"dense": True}, ValueError, "adjoint=True cannot be combined with dense"),
    ({"steps": 4, "cuda_graph": True}, ValueError, "adjoint=True cannot be combined with dense=True or cuda_graph"),
    ({"steps": 4, "adjoint_rtol": 1e-6}, ValueError, "adjoint_rtol/adjoint_atol are for adaptive solves"),
    ({"t0": torch.tensor([0.0, 0.5])}, ValueError, "adjoint=True needs shared times"),
    ({"steps": 4, "saveat": [[0.0, 0.0]]}, ValueError, "adjoint=True needs shared times"),
    ({"saveat": [1.5]}, ValueError, "saveat must lie in"),
    ({"adjoint": False, "adjoint_params": ()}, ValueError, "need adjoint=True"),
    ({"adjoint_params": 3.0}, TypeError, "adjoint_params must be an iterable of tensors"),
    ({"adjoint_params": [3.0]}, TypeError, "adjoint_params must hold tensors"),
    ({"adjoint_rtol": 0.0, "adjoint_atol": 0.0}, ValueError, "must not both be 0"),
])
def test_options_that_cannot_combine_raise(kwargs, error, match):
    args = {"t0": 0.0, "adjoint": True}
    args.update(kwargs)
    y0 = torch.ones(2, 2, requires_grad=True)
    with pytest.raises(error, match=match):
        y = gf.solve(gf.ODE(lambda t, y: -y), y0, args.pop("t0"), 1.0, solver="dopri5", **args)
        y.sum().backward()


def test_sde_terms_are_refused():
    term = gf.SDE(lambda t, y: -y, lambda t, y: torch.ones_like(y))
    with pytest.raises(ValueError, match="genflow provides no SDE adjoint"):
        gf.solve(term, torch.ones(2, 2), 0.0, 1.0, solver="euler_maruyama", steps=4, adjoint=True)
