"""Adaptive solvers: rk45 meets its tolerance against DOP853 with fewer NFE than a fixed-step
solver at equal error, adapts per sample; sde_adaptive reproduces the data distribution."""
import math

import pytest
import torch

import genflow as gf
from genflow.metrics import mmd
from genflow.solvers import SOLVERS
from genflow.solvers.adaptive import RK45

from .references import ORDER_PROCESSES, T_END, data_mmd_spread, mixture, reference_solve

PROCESSES = ORDER_PROCESSES
SCHEDULE = {"vp": "logsnr", "edm": "karras", "linear": "logsnr"}
FIXED = "rk4" if "rk4" in SOLVERS else "heun"  # the fixed-step solver rk45 is compared with



def _solve(model, x_T, t_end, **options):
    seen = []
    x = gf.sample(model, x_T=x_T, solver="rk45", t_end=t_end, callback=seen.append, **options)
    return x, seen[-1]["nfe"], seen


@pytest.mark.parametrize("tol", [1e-5, 1e-7])
@pytest.mark.parametrize("process_name", sorted(PROCESSES))
def test_rk45_meets_its_tolerance(process_name, tol):
    model, x_T, reference = reference_solve(process_name)
    x, nfe, _ = _solve(model, x_T, T_END[process_name], rtol=tol, atol=tol)
    error = (x - reference).abs().max().item()
    assert error <= 10 * tol, f"error {error:.2e} at rtol = atol = {tol} ({nfe} NFE)"


@pytest.mark.parametrize("process_name", sorted(PROCESSES))
def test_rk45_needs_fewer_nfe_than_a_fixed_step_solver_at_equal_error(process_name):
    """At rtol = atol = 1e-6 the fixed-step solver (rk4 when registered, else heun) on its
    process's usual schedule needs more NFE to be as accurate (measured: 2-6x for rk4)."""
    model, x_T, reference = reference_solve(process_name)
    x, nfe, _ = _solve(model, x_T, T_END[process_name], rtol=1e-6, atol=1e-6)
    error = (x - reference).abs().max().item()
    steps = max(1, nfe // SOLVERS[FIXED].nfe_per_step)  # start at equal NFE and refine until as accurate
    while True:
        fixed = gf.sample(model, x_T=x_T, solver=FIXED, steps=steps, schedule=SCHEDULE[process_name],
                          t_end=T_END[process_name])
        if (fixed - reference).abs().max().item() <= error:
            break
        steps = math.ceil(steps * 1.25)
    fixed_nfe = SOLVERS[FIXED].nfe(steps)
    assert fixed_nfe > 1.2 * nfe, f"{FIXED} matches rk45's error {error:.1e} with {fixed_nfe} NFE, rk45 used {nfe}"


def test_rk45_steps_each_sample_on_its_own():
    """One mixture component is narrow: samples that end there need more steps. Each sample
    follows the steps it takes alone, and the batch costs the NFE of its hardest sample."""
    process = gf.VP()
    model = gf.GaussianMixture([[-2.0, 0.0], [2.0, 0.0]], [1.0, 0.01], [0.5, 0.5]).model(process)
    x_T = process.prior_sample((8, 2), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x, nfe, seen = _solve(model, x_T, None, rtol=1e-6, atol=1e-6)
    steps = seen[-1]["accepted_steps"]
    narrow = (x[:, 0] > 0).nonzero().flatten()
    wide = (x[:, 0] < 0).nonzero().flatten()
    assert len(narrow) and len(wide)
    assert steps[wide].max() < steps[narrow].min(), steps  # easy samples take fewer steps
    solo_nfe = []
    for b in range(8):
        alone, n, _ = _solve(model, x_T[b:b + 1], None, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(alone, x[b:b + 1], rtol=1e-12, atol=1e-12)
        solo_nfe.append(n)
    assert nfe == max(solo_nfe)
    # the counts are also on the solver, and every sample ends exactly at t_end
    solver = RK45(model, torch.tensor([process.T, process.t_min], dtype=torch.float64), rtol=1e-6, atol=1e-6)
    *_, (_, info, progress) = solver.solve(x_T.clone())
    assert torch.equal(solver.accepted_steps, steps) and progress == 1.0
    assert torch.equal(info["t_next"], torch.full((8,), process.t_min, dtype=torch.float64))
    assert solver.rejected_steps.sum() == sum(int((~s["accepted"] & (s["h"] > 0)).sum()) for s in seen)  # h = 0: done


def test_rk45_with_a_velocity_network_and_per_sample_times():
    """Flow-matching networks (prediction="velocity") integrate to t = 0 and give the same
    solution as the x0 network; per-sample start times work as for fixed-grid solvers."""
    model, x_T, _ = reference_solve("linear")
    velocity_net = gf.Model(lambda x, t: model.velocity(x, t), model.process, prediction="velocity")
    a, nfe_a, _ = _solve(model, x_T, 1e-3)
    b, nfe_b, _ = _solve(velocity_net, x_T, 1e-3)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    assert nfe_a == nfe_b
    # a Gaussian N(mu, s^2) under x_t = (1 - t) x0 + t eps: u = E[eps - x0 | x_t] is smooth at t = 0
    mu, s2 = torch.tensor([1.0, -0.5], dtype=torch.float64), 0.25

    def gaussian_velocity(x, t):
        t = t[:, None]
        return -mu + (t - (1 - t) * s2) / ((1 - t) ** 2 * s2 + t ** 2) * (x - (1 - t) * mu)

    flow = gf.Model(gaussian_velocity, gf.LinearPath(), prediction="velocity")
    x0, _, _ = _solve(flow, x_T, 0.0, rtol=1e-8, atol=1e-8)
    # the flow maps N(0, I) at t = 1 to N(mu, s^2 I) at t = 0 linearly: x0 = mu + sqrt(s2) x_T
    torch.testing.assert_close(x0, mu + math.sqrt(s2) * x_T, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="t_end > 0"):
        _solve(model, x_T, 0.0)  # an x0 network's velocity is undefined at sigma = 0
    t_start = torch.linspace(1.0, 0.3, 8)
    batch, _, _ = _solve(model, x_T, 1e-3, t_start=t_start)
    alone, _, _ = _solve(model, x_T[5:6], 1e-3, t_start=float(t_start[5]))
    torch.testing.assert_close(batch[5:6], alone, rtol=1e-12, atol=1e-12)


def test_adaptive_solvers_through_gf_sample(capsys):
    model, x_T, _ = reference_solve("vp")
    x, traj = gf.sample(model, x_T=x_T, solver="rk45", return_trajectory=True, progress=True, final_step="x0")
    assert traj.shape[1:] == (8, 2) and traj.shape[0] > 2
    assert torch.equal(traj[0], x_T) and torch.equal(traj[-1], x)
    assert "genflow rk45" in capsys.readouterr().err
    _, nfe_auto, _ = _solve(model, x_T, 1e-3)
    _, nfe_given, _ = _solve(model, x_T, 1e-3, h_init=1e-2)
    assert nfe_given % 6 == 1 and nfe_auto % 6 == 2  # the automatic first step costs one NFE
    info = {s.name: s for s in gf.solvers.available(steps=10)}
    assert info["rk45"].nfe is None and info["rk45"].order == 5 and info["sde_adaptive"].stochastic
    with pytest.raises(RuntimeError, match="max_steps"):
        _solve(model, x_T, 1e-3, max_steps=3)
    with pytest.raises(ValueError, match="rtol"):
        _solve(model, x_T, 1e-3, rtol=-1.0)
    with pytest.raises(ValueError, match="eta"):
        _solve(model, x_T, 1e-3, eta=0.5)
    with pytest.raises(TypeError, match="solve"):
        RK45(model, torch.tensor([1.0, 1e-3], dtype=torch.float64)).step(0, x_T)


@pytest.mark.parametrize("process", [gf.VP(), gf.EDM(sigma_max=20.0)], ids=repr)
def test_sde_adaptive_reproduces_the_mixture(process):
    mix, n = mixture(), 1000
    seen = []
    x = gf.sample(mix.model(process), (n, 2), solver="sde_adaptive", generator=5, dtype=torch.float64,
                  callback=seen.append)
    data = mix.sample(n, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    assert mmd(x, data) <= data_mmd_spread(mix, n)
    steps = seen[-1]["accepted_steps"]
    assert steps.min() < steps.max()  # per-sample step sizes
    assert seen[-1]["nfe"] == 2 * len(seen)


def test_sde_adaptive_samples_follow_their_brownian_paths():
    """Per-sample seeds: a sample does not depend on its batch. With the Brownian tree (the
    default) tighter tolerances refine the same path, so the samples stay close."""
    model = mixture().model(gf.VP())
    x_T = torch.randn(6, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    seeds = [11, 12, 13, 14, 15, 16]
    batch = gf.sample(model, x_T=x_T, solver="sde_adaptive", generator=seeds)
    for b in (0, 4):
        alone = gf.sample(model, x_T=x_T[b:b + 1], solver="sde_adaptive", generator=seeds[b:b + 1])
        torch.testing.assert_close(batch[b:b + 1], alone, rtol=1e-12, atol=1e-12)
    dist = {}
    for noise in ("philox", "brownian_tree"):
        a, b = (gf.sample(model, (64, 2), solver="sde_adaptive", generator=2, noise=noise, dtype=torch.float64,
                          rtol=rtol, atol=rtol / 5) for rtol in (0.05, 0.01))
        dist[noise] = (a - b).norm(dim=1).mean().item()
    assert dist["brownian_tree"] < dist["philox"] / 5, dist


def test_sde_adaptive_without_churn_solves_the_ode():
    model, x_T, reference = reference_solve("vp")
    errors = []
    for tol in (1e-3, 1e-5):
        x = gf.sample(model, x_T=x_T, solver="sde_adaptive", eta=0.0, t_end=1e-3, rtol=tol, atol=tol)
        errors.append((x - reference).abs().max().item())
    assert errors[1] < 1e-3 and errors[1] < errors[0] / 10, errors
    with pytest.raises(ValueError, match="singular"):
        gf.sample(mixture().model(gf.LinearPath()), (4, 2), solver="sde_adaptive")  # g2 is infinite at T = 1
