"""Midpoint, RK4, LMS and k-diffusion's ancestral / DPM-2 samplers (genflow/solvers/runge_kutta.py,
ancestral.py): orders beyond test_order's window, the sigma = 0 and alpha = 0 ends, the sampled
distribution of the stochastic ones, identities between solvers, and per-sample times."""

import pytest
import torch
from scipy import integrate

import genflow as gf
from genflow.metrics import mmd
from genflow.solvers.runge_kutta import _lms_table

from .references import ORDER_PROCESSES, T_END, data_mmd_spread, fit_order, mixture, reference_solve

NEW = ["midpoint", "rk4", "lms", "euler_ancestral", "dpm_2", "dpm_2_ancestral"]
PROCESSES = ORDER_PROCESSES



def _errors(process_name, solver, steps, schedule, **options):
    model, x_T, reference = reference_solve(process_name)
    return [(gf.sample(model, x_T=x_T, solver=solver, steps=n, schedule=schedule,
                       t_end=T_END[process_name], **options) - reference).abs().max().item() for n in steps]


def _measured_order(process_name, solver, steps, schedule, **options):
    errors = _errors(process_name, solver, steps, schedule, **options)
    return fit_order(steps, errors), errors


# ------------------------------------------------------------------ orders


@pytest.mark.parametrize("solver, order", [("midpoint", 2), ("rk4", 4)])
def test_runge_kutta_orders_on_linear_path_with_a_uniform_grid(solver, order):
    """On LinearPath, test_order's log-SNR grid puts steps of dt ~ 0.4 mid-path at 10 steps, so
    10..80 steps are pre-asymptotic there (fitted 1.6 and 3.5); in t on a uniform grid the
    declared orders show at once."""
    measured, errors = _measured_order("linear", solver, (10, 20, 40, 80), "uniform")
    assert order - 0.3 <= measured <= order + 0.7, f"{solver}: measured {measured:.2f}, errors {errors}"


@pytest.mark.parametrize("process_name, schedule", [("vp", "logsnr"), ("edm", "karras"), ("linear", "logsnr")])
@pytest.mark.parametrize("lms_order", [2, 4])
def test_lms_global_order_is_at_least_two(lms_order, process_name, schedule):
    """The Euler / AB2 / AB3 start bounds the global order by 2 (expected_order); with order=4
    the start-up error constant is small, so 40..320 steps still show more than 2."""
    measured, errors = _measured_order(process_name, "lms", (40, 80, 160, 320), schedule, order=lms_order)
    assert gf.solvers.get("lms").expected_order(order=lms_order) == 2
    assert measured >= 1.7, f"lms order={lms_order} on {process_name}: measured {measured:.2f}, errors {errors}"
    if lms_order == 4:
        assert errors[1] < _errors(process_name, "lms", (80,), schedule, order=2)[0]  # beats order 2 at 80 steps


@pytest.mark.parametrize("solver, order", [("rk4", 4), ("midpoint", 2), ("dpm_2", 2), ("lms", 2)])
@pytest.mark.parametrize("process_name", ["edm", "linear"])
def test_orders_hold_on_grids_ending_at_sigma_zero(solver, order, process_name):
    """A last step to sigma = 0 (velocity undefined there): rk4 switches to Ralston's third-order
    stage, dpm_2 to Euler; the self-convergence |x_N - x_2N| keeps the declared order."""
    process = PROCESSES[process_name]
    model, x_T, _ = reference_solve(process_name)
    steps = (10, 20, 40, 80, 160)
    if process_name == "edm":  # Karras sigmas with k-diffusion's appended zero
        grids = [torch.cat([gf.time_grid(process, n - 1, "karras", t_end=1e-3), torch.zeros(1, dtype=torch.float64)])
                 for n in steps]
    else:  # t_end = 0: sigma = 0 (and alpha = 0 at the start, t = 1)
        grids = [gf.time_grid(process, n, "uniform", t_end=0.0) for n in steps]
    xs = [gf.sample(model, x_T=x_T, solver=solver, schedule=g) for g in grids]
    assert all(torch.isfinite(x).all() for x in xs)
    gaps = [(xs[k] - xs[k + 1]).abs().max().item() for k in range(len(xs) - 1)]
    measured = fit_order(steps[:-1], gaps)
    assert order - 0.3 <= measured <= order + 1.0, f"{solver} on {process_name}: {measured:.2f}, gaps {gaps}"


def test_nfe_counts():
    model, x_T, _ = reference_solve("vp")
    for solver, per_step in [("midpoint", 2), ("rk4", 4), ("lms", 1), ("euler_ancestral", 1), ("dpm_2", 2),
                             ("dpm_2_ancestral", 2)]:
        seen = []
        gf.sample(model, x_T=x_T, solver=solver, steps=7, generator=0, callback=lambda info: seen.append(info["nfe"]))
        assert seen[-1] == 7 * per_step == gf.solvers.get(solver).nfe(7), solver


# ------------------------------------------------------------------ LMS coefficients


def _quad_coefficient(order, s, i, j):
    """k-diffusion's ``linear_multistep_coeff`` (scipy quad of the Lagrange basis polynomial)."""
    def basis(tau):
        prod = 1.0
        for k in range(order):
            if k != j:
                prod *= (tau - s[i - k]) / (s[i - j] - s[i - k])
        return prod
    return integrate.quad(basis, s[i], s[i + 1], epsrel=1e-12, epsabs=0)[0]


def test_lms_table_equals_quadrature_and_drops_a_node_at_infinity():
    sigmas = gf.time_grid(gf.EDM(), 12, "karras").tolist() + [0.0]
    table = _lms_table(torch.tensor(sigmas, dtype=torch.float64), 4)
    for i, row in enumerate(table):
        for j, c in enumerate(row):
            expected = _quad_coefficient(min(i + 1, 4), sigmas, i, j)
            assert abs(float(c) - expected) <= 1e-12 * max(1.0, abs(expected)), (i, j)
    # s_0 = inf (alpha = 0): the node drops out, i.e. its coefficient is 0 and the others are
    # those of the table without it (the first step, from s = inf, is an Euler step in LMS)
    with_inf = _lms_table(torch.tensor([float("inf")] + sigmas, dtype=torch.float64), 3)
    without = _lms_table(torch.tensor(sigmas, dtype=torch.float64), 3)
    for i in range(1, len(with_inf)):
        row, ref = [float(c) for c in with_inf[i]], [float(c) for c in without[i - 1]]
        assert row[:len(ref)] == pytest.approx(ref, rel=1e-12) and all(c == 0.0 for c in row[len(ref):])


def test_lms_rejects_bad_order():
    model, x_T, _ = reference_solve("vp")
    for order in (0, 5, 2.0, True):
        with pytest.raises(ValueError, match="order"):
            gf.sample(model, x_T=x_T, solver="lms", steps=4, order=order)


# ------------------------------------------------------------------ identities


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("process_name", sorted(PROCESSES))
def test_euler_ancestral_equals_ddim_with_the_same_eta(eta, process_name):
    """Euler in (x/alpha, sigma/alpha) with k-diffusion's ancestral split is DDIM (eq. 12)."""
    model = mixture().model(PROCESSES[process_name])
    a = gf.sample(model, (64, 2), solver="euler_ancestral", eta=eta, steps=25, generator=4, dtype=torch.float64)
    b = gf.sample(model, (64, 2), solver="ddim", eta=eta, steps=25, generator=4, dtype=torch.float64)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("process_name", sorted(PROCESSES))
def test_dpm_2_ancestral_without_churn_is_dpm_2(process_name):
    model = mixture().model(PROCESSES[process_name])
    a = gf.sample(model, (64, 2), solver="dpm_2_ancestral", eta=0.0, steps=15, generator=4, dtype=torch.float64)
    b = gf.sample(model, (64, 2), solver="dpm_2", steps=15, generator=4, dtype=torch.float64)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_lms_order_one_is_euler_in_scaled_variables():
    model = mixture().model(gf.VP())
    a = gf.sample(model, (32, 2), solver="lms", order=1, steps=20, generator=2, dtype=torch.float64)
    b = gf.sample(model, (32, 2), solver="ddim", steps=20, generator=2, dtype=torch.float64)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("solver", NEW)
def test_network_kind_and_thresholding_paths_agree(solver):
    """eps / v / velocity networks give the x0 network's samples, and dynamic thresholding that
    clips nothing (|x0| <= 1 throughout) gives the same samples through the x0 route."""
    small = gf.GaussianMixture([[-0.3, 0.2], [0.3, -0.1]], [0.05, 0.08], [0.5, 0.5])
    options = {"eta": 0.0} if "ancestral" in solver else {}
    for process in (gf.VP(), gf.EDM(sigma_max=20.0)):
        model = small.model(process)
        base = gf.sample(model, (16, 2), solver=solver, steps=9, generator=1, dtype=torch.float64, **options)
        clipped = gf.sample(model, (16, 2), solver=solver, steps=9, generator=1, dtype=torch.float64,
                            thresholding=True, **options)
        torch.testing.assert_close(clipped, base, rtol=1e-9, atol=1e-9)
        for kind in ("eps", "v", "velocity"):
            other = gf.Model(lambda x, t, m=model, k=kind: m.predict(x, t, k), process, prediction=kind)
            out = gf.sample(other, (16, 2), solver=solver, steps=9, generator=1, dtype=torch.float64, **options)
            torch.testing.assert_close(out, base, rtol=1e-8, atol=1e-8)
    # and thresholding is wired in: with data beyond [-1, 1] it changes the samples
    model = mixture().model(gf.VP())
    plain = gf.sample(model, (16, 2), solver=solver, steps=9, generator=1, dtype=torch.float64, **options)
    clipped = gf.sample(model, (16, 2), solver=solver, steps=9, generator=1, dtype=torch.float64, thresholding=True,
                        **options)
    assert not torch.allclose(plain, clipped)


# ------------------------------------------------------------------ distributions



@pytest.mark.parametrize("solver", ["euler_ancestral", "dpm_2_ancestral"])
@pytest.mark.parametrize("process", [gf.VP(), gf.EDM(sigma_max=20.0)], ids=repr)
def test_ancestral_solvers_reproduce_the_mixture(solver, process):
    mix, n = mixture(), 1000
    x = gf.sample(mix.model(process), (n, 2), solver=solver, steps=250, generator=5, dtype=torch.float64)
    data = mix.sample(n, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    assert mmd(x, data) <= data_mmd_spread(mix, n)


@pytest.mark.parametrize("solver", ["euler_ancestral", "dpm_2_ancestral"])
def test_partial_churn_also_reproduces_the_mixture(solver):
    mix, n = mixture(), 1000
    x = gf.sample(mix.model(gf.VP()), (n, 2), solver=solver, eta=0.5, steps=200, generator=8, dtype=torch.float64)
    data = mix.sample(n, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    assert mmd(x, data) <= data_mmd_spread(mix, n)


# ------------------------------------------------------------------ per-sample times


@pytest.mark.parametrize("solver", NEW)
def test_per_sample_start_times_equal_separate_solves(solver):
    """Each sample starts at its own noise level (SDEdit-style); with per-sample seeds the batch
    solve equals solving every sample alone."""
    model = mixture().model(gf.VP())
    t_start = torch.tensor([1.0, 0.6, 0.3, 0.15])
    x_T = torch.randn(4, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    seeds = [3, 5, 7, 9]
    batch = gf.sample(model, x_T=x_T, solver=solver, steps=12, t_start=t_start, generator=seeds)
    for b in range(4):
        alone = gf.sample(model, x_T=x_T[b:b + 1], solver=solver, steps=12, t_start=float(t_start[b]),
                          generator=[seeds[b]])
        torch.testing.assert_close(batch[b:b + 1], alone, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("solver", NEW)
@pytest.mark.parametrize("process_name", ["edm", "linear"])
def test_per_sample_grids_mixing_special_steps_equal_separate_solves(solver, process_name):
    """Per-sample grids where some samples end at sigma = 0 (EDM) or start at alpha = 0
    (LinearPath, t = 1) and others do not: the special-cased steps (Ralston, Euler, dropped
    LMS nodes) are selected per sample."""
    process = PROCESSES[process_name]
    model = mixture().model(process)
    if process_name == "edm":  # columns 0 and 2 end at sigma = 0, columns 1 and 3 do not
        last = torch.tensor([2e-3, 4e-3, 2e-3, 0.1], dtype=torch.float64)
        ends = torch.tensor([0.0, 2e-3, 0.0, 0.05], dtype=torch.float64)
        grid = torch.cat([gf.time_grid(process, 9, "karras", t_end=last), ends[None]], dim=0)
    else:
        starts = torch.tensor([1.0, 0.7, 1.0, 0.4], dtype=torch.float64)
        grid = gf.time_grid(process, 10, "uniform", t_start=starts, t_end=torch.full((4,), 1e-3, dtype=torch.float64))
    x_T = process.prior_sample((4, 2), generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    seeds = [11, 12, 13, 14]
    batch = gf.sample(model, x_T=x_T, solver=solver, schedule=grid, generator=seeds)
    assert torch.isfinite(batch).all()
    for b in range(4):
        alone = gf.sample(model, x_T=x_T[b:b + 1], solver=solver, schedule=grid[:, b], generator=[seeds[b]])
        torch.testing.assert_close(batch[b:b + 1], alone, rtol=1e-10, atol=1e-10)
