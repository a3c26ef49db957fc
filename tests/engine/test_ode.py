"""The ODE tableaux of the engine: every registered tableau at its order (registry-driven, as
tests/solvers/test_order.py), equality with torchdiffeq's fixed-grid methods, dopri5 adaptive
against torchdiffeq's dopri5 (accuracy and NFE), DOP853 against scipy, the tableaux' own
consistency conditions, and dense output accuracy."""
import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

import genflow as gf
from genflow.engine.dense import dense_polynomial
from genflow.engine.tableau import TABLEAUX

torchdiffeq = pytest.importorskip("torchdiffeq")

T_END = 2.0
# step counts (b, 2b, 4b) per order: past the pre-asymptotic range, above float64 roundoff
BASE_STEPS = {1: 32, 2: 32, 3: 32, 4: 32, 5: 64, 8: 4}


def rhs(t, y):
    """A rotation at angular speed ``1 + t`` and ``y3' = -2 t y3^2``: closed form in ``exact``."""
    w = 1 + t
    return torch.stack([-w * y[:, 1], w * y[:, 0], -2 * t * y[:, 2] ** 2], 1)


def exact(y0, t):
    angle = t + t * t / 2
    c, s = math.cos(angle), math.sin(angle)
    return torch.stack([c * y0[:, 0] - s * y0[:, 1], s * y0[:, 0] + c * y0[:, 1], 1 / (t * t + 1 / y0[:, 2])], 1)


Y0 = torch.tensor([[1.0, 0.0, 1.0], [0.3, -0.8, 2.0], [-0.5, 0.4, 0.5]], dtype=torch.float64)


def counting(fn):
    calls = []

    def f(t, y):
        calls.append(1)
        return fn(t, y)

    return f, calls


@pytest.mark.parametrize("name", sorted(TABLEAUX))
def test_tableau_converges_at_its_order(name):
    tab = TABLEAUX[name]
    base = BASE_STEPS[tab.order]
    steps = [base, 2 * base, 4 * base]
    reference = exact(Y0, T_END)
    errors = [(gf.solve(gf.ODE(rhs), Y0, 0.0, T_END, solver=name, steps=n) - reference).abs().max().item()
              for n in steps]
    order = float(-np.polyfit(np.log(steps), np.log(errors), 1)[0])
    last = math.log(errors[-2] / errors[-1]) / math.log(2)
    message = f"{name}: fitted order {order:.2f}, last slope {last:.2f}, expected {tab.order}, errors {errors}"
    assert abs(order - tab.order) <= 0.3, message
    assert abs(last - tab.order) <= 0.3, message


@pytest.mark.parametrize("name", sorted(TABLEAUX))
def test_tableau_is_consistent(name):
    """Row sums equal c, weights sum to 1, error weights to 0; FSAL's last row is b; the dense
    output reproduces y' at theta = 1 and has slope k_1 at theta = 0."""
    tab = TABLEAUX[name]
    assert len(tab.a) == tab.stages and all(len(row) == i for i, row in enumerate(tab.a))
    for i, row in enumerate(tab.a):
        assert sum(row) == pytest.approx(tab.c[i], abs=1e-14)
    assert sum(tab.b) == pytest.approx(1.0, abs=1e-14)
    if tab.error is not None:
        assert sum(tab.error) == pytest.approx(0.0, abs=1e-14)
        assert tab.fsal
        dense = np.array(dense_polynomial(tab))
        extra = 0 if tab.dense_stages is None else len(tab.dense_stages[0])
        assert dense.shape[0] == tab.stages + extra
        np.testing.assert_allclose(dense.sum(1), tab.b + (0.0,) * extra, atol=1e-12)  # w(1) = b
        np.testing.assert_allclose(dense[:, 0], np.eye(tab.stages + extra)[0], atol=1e-12)  # w'(0) = e_1
    if tab.fsal:
        assert tab.c[-1] == 1.0 and tab.b[-1] == 0.0
        np.testing.assert_allclose(tab.a[-1], tab.b[:-1], rtol=0, atol=0)


def _classic_rk4(f, y, ts):
    for t, t_next in zip(ts[:-1].tolist(), ts[1:].tolist()):
        h = t_next - t
        k1 = f(t, y)
        k2 = f(t + h / 2, y + h / 2 * k1)
        k3 = f(t + h / 2, y + h / 2 * k2)
        k4 = f(t + h, y + h * k3)
        y = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return y


@pytest.mark.parametrize("name, peer", [("euler", "euler"), ("midpoint", "midpoint"), ("rk4_38", "rk4"),
                                        ("heun", "heun2")])
def test_fixed_grid_equals_torchdiffeq(name, peer):
    ts = torch.tensor([0.0, 0.1, 0.35, 0.6, 1.0, 1.3, 2.0], dtype=torch.float64)
    ours = gf.solve(gf.ODE(rhs), Y0, 0.0, 2.0, solver=name, ts=ts)
    theirs = torchdiffeq.odeint(lambda t, y: rhs(float(t), y), Y0, ts, method=peer)[-1]
    assert (ours - theirs).abs().max().item() <= 1e-10


def test_rk4_equals_the_classic_formula():
    ts = torch.linspace(0.0, 2.0, 9, dtype=torch.float64)
    ours = gf.solve(gf.ODE(rhs), Y0, 0.0, 2.0, solver="rk4", ts=ts)
    assert (ours - _classic_rk4(rhs, Y0, ts)).abs().max().item() <= 1e-12


@pytest.mark.parametrize("tol", [1e-5, 1e-8])
def test_dopri5_meets_torchdiffeq_accuracy_at_no_more_nfe(tol):
    reference = exact(Y0, T_END)
    f, calls = counting(lambda t, y: rhs(float(t), y))
    theirs = torchdiffeq.odeint(f, Y0, torch.tensor([0.0, T_END], dtype=torch.float64), method="dopri5",
                                rtol=tol, atol=tol)[-1]
    their_nfe, their_error = len(calls), (theirs - reference).abs().max().item()
    out = gf.solve(gf.ODE(rhs), Y0, 0.0, T_END, solver="dopri5", rtol=tol, atol=tol, error_norm="batch",
                   saveat=[T_END])
    our_error = (out.y - reference).abs().max().item()
    assert out.stats["nfe"] <= their_nfe, (out.stats["nfe"], their_nfe)
    assert our_error <= 1.5 * their_error, (our_error, their_error)


@pytest.mark.parametrize("name", ["bosh3", "tsit5", "dopri5", "dop853"])
def test_adaptive_solvers_meet_their_tolerance(name):
    reference = exact(Y0, T_END)
    for tol in ((1e-5, 1e-7) if name == "bosh3" else (1e-6, 1e-9)):  # bosh3: third order, many steps
        y = gf.solve(gf.ODE(rhs), Y0, 0.0, T_END, solver=name, rtol=tol, atol=tol)
        assert (y - reference).abs().max().item() <= 200 * tol, (name, tol)


def test_dop853_adaptive_agrees_with_scipy():
    """Same pair, same error norm (5th/3rd-order), same plain controller: the step counts
    of gf.solve (per-sample norms) and scipy's DOP853 on each sample alone agree closely."""
    def scipy_rhs(t, y):
        return rhs(t, torch.from_numpy(y)[None])[0].numpy()

    for y0 in Y0:
        sol = solve_ivp(scipy_rhs, (0.0, T_END), y0.numpy(), method="DOP853", rtol=1e-8, atol=1e-8)
        out = gf.solve(gf.ODE(rhs), y0[None], 0.0, T_END, solver="dop853", rtol=1e-8, atol=1e-8, saveat=[T_END])
        assert abs(int(out.stats["accepted_steps"][0]) - (sol.t.size - 1)) <= 2
        assert np.abs(out.y[0].numpy() - sol.y[:, -1]).max() <= 1e-7


@pytest.mark.parametrize("name", ["bosh3", "dopri5", "tsit5", "dop853"])
def test_dense_output_and_saveat_are_accurate(name):
    times = torch.linspace(0.0, T_END, 23, dtype=torch.float64)
    # each method's own continuous extension: order 3 (bosh3), 4 (dopri5, tsit5), 7 (dop853)
    tol, bound = {"dopri5": (1e-7, 1e-5), "bosh3": (1e-6, 1e-4), "tsit5": (1e-7, 1e-5), "dop853": (1e-7, 1e-5)}[name]
    out = gf.solve(gf.ODE(rhs), Y0, 0.0, T_END, solver=name, rtol=tol, atol=tol, saveat=times, dense=True)
    for j, t in enumerate(times.tolist()):
        truth = exact(Y0, t)
        assert (out.ys[j] - truth).abs().max().item() <= bound, (name, t)
        assert torch.equal(out.evaluate(t), out.ys[j]) or (out.evaluate(t) - out.ys[j]).abs().max() <= 1e-12
    assert torch.equal(out.ys[0], Y0)
    assert (out.ys[-1] - out.y).abs().max().item() <= 1e-12


@pytest.mark.parametrize("name, order, steps", [("bosh3", 3, (0.2, 0.1, 0.05, 0.025)),
                                                ("dopri5", 4, (0.1, 0.05, 0.025, 0.0125)),
                                                ("tsit5", 4, (0.1, 0.05, 0.025, 0.0125)),
                                                ("dop853", 7, (0.8, 0.4, 0.2, 0.1))])
def test_interpolant_error_inside_one_step_falls_at_its_order(name, order, steps):
    """One accepted step of size h from the exact state at t0 = 0.3 (tolerances that accept it):
    the dense output's error at theta = 0.3, 0.5, 0.7 against the closed form is O(h^(order+1))
    (bosh3's cubic, dopri5's and tsit5's quartic extensions, dop853's seventh-order one)."""
    errors = []
    for h in steps:
        thetas = (0.3, 0.5, 0.7)
        out = gf.solve(gf.ODE(rhs), exact(Y0, 0.3), 0.3, 0.3 + h, solver=name, rtol=1e3, atol=1e3, h_init=h,
                       saveat=[0.3 + x * h for x in thetas])
        assert out.stats["accepted_steps"].tolist() == [1, 1, 1]
        errors.append(max((out.ys[j] - exact(Y0, 0.3 + x * h)).abs().max().item() for j, x in enumerate(thetas)))
    slope = np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert abs(slope - (order + 1)) <= 0.5, (name, slope, errors)


@pytest.mark.parametrize("name, peer", [("dopri5", "RK45"), ("dop853", "DOP853")])
def test_dense_output_equals_scipy_inside_the_same_step(name, peer):
    """The same first step (h_init = scipy's first_step, both accept it): gf.solve's dense output
    at save times inside it equals scipy's step interpolant (RK45: Shampine's quartic; DOP853:
    Hairer's seventh-order output with its three extra stages)."""
    from scipy.integrate import DOP853, RK45

    def scipy_rhs(t, y):
        return rhs(t, torch.from_numpy(y)[None])[0].numpy()

    for y0 in Y0:
        stepper = {"RK45": RK45, "DOP853": DOP853}[peer](scipy_rhs, 0.0, y0.numpy(), T_END, rtol=1e-3, atol=1e-3,
                                                        first_step=0.3)
        stepper.step()
        interpolant, h = stepper.dense_output(), stepper.t
        times = [h * x for x in (0.1, 0.35, 0.5, 0.9, 1.0)]
        out = gf.solve(gf.ODE(rhs), y0[None], 0.0, h, solver=name, rtol=1e-3, atol=1e-3, h_init=h, saveat=times)
        assert out.stats["accepted_steps"].tolist() == [1]
        for j, t in enumerate(times):
            assert np.abs(out.ys[j, 0].numpy() - interpolant(t)).max() <= 1e-12


def test_tsit5_dense_output_equals_diffrax_inside_the_same_step():
    """Tsitouras' free interpolant: gf.solve's tsit5 dense output in one step of size 0.3 equals
    diffrax's Tsit5 dense output (the same interpolant) in the same step, float64."""
    jax = pytest.importorskip("jax")
    diffrax = pytest.importorskip("diffrax")

    def jax_rhs(t, y, args):
        w = 1 + t
        return jax.numpy.stack([-w * y[1], w * y[0], -2 * t * y[2] ** 2])

    h, times = 0.3, [0.03, 0.105, 0.15, 0.27]
    with jax.enable_x64(True):
        for y0 in Y0:
            sol = diffrax.diffeqsolve(diffrax.ODETerm(jax_rhs), diffrax.Tsit5(), 0.0, h, h,
                                      jax.numpy.asarray(y0.numpy()), saveat=diffrax.SaveAt(dense=True))
            theirs = np.stack([np.asarray(sol.evaluate(t)) for t in times])
            out = gf.solve(gf.ODE(rhs), y0[None], 0.0, h, solver="tsit5", rtol=1e3, atol=1e3, h_init=h, saveat=times)
            assert np.abs(out.ys[:, 0].numpy() - theirs).max() <= 1e-13


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("grad", [False, True])
def test_the_divergence_check_names_the_same_step_with_and_without_gradients(backend, grad):
    """The kernel flags each combination as it writes; the differentiable form and the PyTorch
    reference check the step's result once: every path names the same step and count."""
    def nan_late(t, y):  # NaN for the first three samples from t = 0.55 (step 6's middle stages)
        bad = (t >= 0.55) & (torch.arange(y.shape[0]) < 3)
        return torch.where(bad[:, None], float("nan"), -y)

    y0 = torch.ones(5, 2, dtype=torch.float64, requires_grad=grad)
    with pytest.raises(gf.NonFiniteError, match=r"at step 6 of 10 \(t 0\.5 -> 0\.6\): 3 of 5 samples diverged;"):
        gf.solve(gf.ODE(nan_late), y0, 0.0, 1.0, solver="rk4", steps=10, backend=backend)
