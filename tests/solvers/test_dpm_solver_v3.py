"""DPM-Solver-v3 (genflow/solvers/dpm_solver_v3.py): the reduction to DPM-Solver++ without
statistics, convergence with empirical model statistics (EMS) against DOP853, the few-step
gain of the EMS on the 8-Gaussian ring, the statistics themselves, and bad inputs."""
import math

import numpy as np
import pytest
import torch

import genflow as gf
from genflow.solvers.dpm_solver_v3 import ModelStatistics, StatisticsProfiles, model_statistics, v3_coefficients

from .references import fit_order, mixture, pf_ode_solution

PEERS = {1: ("ddim", {}), 2: ("dpmpp_2m", {"solver_type": "heun"}), 3: ("dpmpp_3m", {"solver_type": "heun"})}


def _t_at_ratio(process, ratio):
    return float(process.t_from_log_snr(torch.tensor(-math.log(ratio), dtype=torch.float64)))


@pytest.fixture(scope="module")
def ring_vp():
    """``(model, statistics)``: the exact 8-Gaussian-ring model under VP and its EMS on [1e-3, 1]."""
    ring, process = gf.GaussianMixture.ring(), gf.VP()
    model = ring.model(process)
    gen = torch.Generator().manual_seed(0)
    calib = ring.sample(1000, generator=gen, dtype=torch.float64)
    return model, model_statistics(model, calib, steps=100, t_start=1.0, t_end=1e-3, generator=gen)


@pytest.mark.parametrize("process", [gf.VP(), gf.EDM(sigma_max=20.0)], ids=["vp", "edm"])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("steps, lower_order_final", [(7, True), (16, False), (9, False)])
def test_without_statistics_is_dpm_solver_pp(process, order, steps, lower_order_final):
    """l = 1, s = b = 0: the same solve as DDIM / dpmpp_2m (heun) / dpmpp_3m (Taylor) to 1e-10."""
    mix = mixture()
    model = mix.model(process)
    t_start, t_end = _t_at_ratio(process, 20.0), _t_at_ratio(process, 0.01)
    x_T = mix.marginal(process, t_start).sample(5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    peer, options = PEERS[order]
    if order > 1:
        options = dict(options, lower_order_final=lower_order_final)
    common = dict(x_T=x_T, steps=steps, schedule="karras", t_start=t_start, t_end=t_end)
    expected = gf.sample(model, solver=peer, **common, **options)
    got = gf.sample(model, solver="dpm_solver_v3", solver_order=order, lower_order_final=lower_order_final,
                    corrector=False, **common)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
    # the same statistics given explicitly (splines and quadrature of constants) change nothing
    lam = torch.linspace(-math.log(25.0), -math.log(0.005), 11, dtype=torch.float64)
    ones, zeros = torch.ones_like(lam), torch.zeros_like(lam)
    stats = ModelStatistics(lam, ones, zeros, zeros, str(process.cache_key()))
    explicit = gf.sample(model, solver="dpm_solver_v3", solver_order=order, lower_order_final=lower_order_final,
                         corrector=False, statistics=stats, **common)
    torch.testing.assert_close(explicit, expected, rtol=0, atol=1e-10)


def _cumulative_trapezoid(values, lam):
    return np.concatenate([[0.0], np.cumsum(np.diff(lam) * (values[1:] + values[:-1]) / 2)])


@pytest.mark.parametrize("pseudo", [False, True])
@pytest.mark.parametrize("nodes", [[2300], [2300, 1800], [2300, 1800, 1500], [2300, 2900, 1800, 1500]])
def test_step_matches_the_papers_cumulative_form(nodes, pseudo):
    """One step against the reference code's cumulative form of the exact solution (§3.1) on a fine statistics grid:
    ``L, S, I = int e^{L+S}, B = int e^{-S} b, C = int e^{L+S} B`` by the trapezoid rule,
    ``g_j = e^{S_s - S_j} f_j - e^{S_s} (B_j - B_s)``, ``x_t = (alpha_t/alpha_s) e^{L_s - L_t} x_s
    - alpha_t e^{-L_t - S_s} (I_t - I_s) g_s - alpha_t e^{-L_t} (C_t - C_s - B_s (I_t - I_s))
    - alpha_t e^{L_s - L_t} sum_n c_n g^(n)``, for smooth non-trivial ``l, s, b`` (the last case
    is a corrector step: the end point is a node)."""
    lam = np.linspace(-3.0, 3.0, 6001)
    l, s_, b = 0.5 + 0.3 * np.tanh(lam), np.sin(lam), 0.2 * np.cos(2 * lam) + 0.1
    stats = ModelStatistics(*(torch.from_numpy(v) for v in (lam, l, s_, b)), "any")
    L, S = _cumulative_trapezoid(l, lam), _cumulative_trapezoid(s_, lam)
    I = _cumulative_trapezoid(np.exp(L + S), lam)
    B = _cumulative_trapezoid(np.exp(-S) * b, lam)
    C = _cumulative_trapezoid(np.exp(L + S) * B, lam)
    i_s, i_t = nodes[0], 2600 if len(nodes) < 4 else nodes[1]
    f = np.random.default_rng(0).normal(size=len(nodes))
    g = np.exp(S[i_s] - S[nodes]) * f - np.exp(S[i_s]) * (B[nodes] - B[i_s])
    d = lam[nodes] - lam[i_s]
    k = len(nodes)
    if pseudo:  # n! times the divided differences over the first n + 1 nodes
        table = [list(g)]
        for n in range(1, k):
            table.append([(table[-1][j + 1] - table[-1][j]) / (d[j + n] - d[j]) for j in range(k - n)])
        derivs = [math.factorial(n) * table[n][0] for n in range(1, k)]
    elif k > 1:  # the Taylor coefficients of the interpolating polynomial
        coef = np.linalg.solve(np.array([[dj ** n for n in range(1, k)] for dj in d[1:]]), g[1:] - g[0])
        derivs = [math.factorial(n) * coef[n - 1] for n in range(1, k)]
    else:
        derivs = []
    seg = slice(i_s, i_t + 1)
    weight = np.exp(L[seg] + S[seg] - L[i_s] - S[i_s])
    higher = sum(np.trapezoid(weight * (lam[seg] - lam[i_s]) ** n / math.factorial(n), lam[seg]) * derivs[n - 1]
                 for n in range(1, k))
    x_s = 0.7  # the state and alpha_t enter linearly; alpha_t/alpha_s = 1
    expected = (np.exp(L[i_s] - L[i_t]) * x_s - np.exp(-L[i_t] - S[i_s]) * (I[i_t] - I[i_s]) * g[0]
                - np.exp(-L[i_t]) * (C[i_t] - C[i_s] - B[i_s] * (I[i_t] - I[i_s])) - np.exp(L[i_s] - L[i_t]) * higher)
    E, F, const = v3_coefficients(StatisticsProfiles(stats), [lam[j] for j in nodes], lam[i_t], pseudo=pseudo)
    got = E * x_s - float(np.dot(F, f)) + const
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-8)


@pytest.mark.parametrize("order, corrector", [(1, False), (2, False), (3, False), (2, True), (3, True)])
def test_with_statistics_converges_at_its_order(ring_vp, order, corrector):
    """With the ring's EMS the solve converges to the exact flow (DOP853) at ``expected_order``:
    ``solver_order``, 2 for third order (its first step is first order) and with the corrector."""
    model, stats = ring_vp
    process = model.process
    t_start, t_end = _t_at_ratio(process, 2.0), _t_at_ratio(process, 0.03)
    x_T = gf.GaussianMixture.ring().marginal(process, t_start).sample(
        8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    reference = pf_ode_solution(model, x_T, t_start, t_end)
    steps = (20, 40, 80)
    errors = [(gf.sample(model, x_T=x_T, solver="dpm_solver_v3", steps=n, schedule="logsnr", t_start=t_start,
                         t_end=t_end, solver_order=order, corrector=corrector, lower_order_final=False,
                         statistics=stats)
               - reference).abs().max().item() for n in steps]
    expected = gf.solvers.get("dpm_solver_v3").expected_order(solver_order=order, corrector=corrector)
    last_slope = math.log(errors[-2] / errors[-1]) / math.log(2.0)
    assert abs(fit_order(steps, errors) - expected) <= 0.35, errors
    assert abs(last_slope - expected) <= 0.3, errors


@pytest.fixture(scope="module")
def ring_edm():
    """``(model, statistics)``: the exact ring model under EDM and its EMS on sigma in [0.002, 80]."""
    ring, process = gf.GaussianMixture.ring(), gf.EDM()
    model = ring.model(process)
    gen = torch.Generator().manual_seed(0)
    calib = ring.sample(1000, generator=gen, dtype=torch.float64)
    return model, model_statistics(model, calib, steps=100, t_start=80.0, t_end=0.002, generator=gen)


@pytest.mark.parametrize("case", ["vp", "edm"])
def test_statistics_help_at_few_steps(ring_vp, ring_edm, case):
    """Full solves of the ring at 5-10 NFE (VP t = 1 -> 1e-3, log-SNR grid; EDM sigma = 80 -> 0.002,
    Karras grid): with EMS the second-order predictor is at least as accurate as DPM-Solver++(2M)
    (the same solver without EMS), and the default (third order with corrector) at least as
    accurate as DPM-Solver++(2M) and (3M). Measured mean errors at 5/8/10 steps: VP 2M
    0.66/0.56/0.34, 3M 1.31/0.37/0.14, EMS order 2 0.49/0.28/0.15, EMS default 0.46/0.15/0.11;
    EDM 2M 1.36/0.95/0.61, 3M 1.68/0.83/0.51, EMS order 2 0.50/0.22/0.21, EMS default 0.23/0.20/0.15."""
    (model, stats), t_start, t_end, schedule = {"vp": (ring_vp, 1.0, 1e-3, "logsnr"),
                                                "edm": (ring_edm, 80.0, 0.002, "karras")}[case]
    scale = float(model.process.sigma(torch.tensor(t_start, dtype=torch.float64)))
    x_T = scale * torch.randn(256, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    reference = pf_ode_solution(model, x_T, t_start, t_end)
    for steps in (5, 8, 10):
        common = dict(x_T=x_T, steps=steps, schedule=schedule, t_start=t_start, t_end=t_end)
        solves = {"2m": gf.sample(model, solver="dpmpp_2m", solver_type="heun", **common),
                  "3m": gf.sample(model, solver="dpmpp_3m", solver_type="heun", **common),
                  "ems": gf.sample(model, solver="dpm_solver_v3", solver_order=2, corrector=False, statistics=stats,
                                   **common),
                  "default": gf.sample(model, solver="dpm_solver_v3", statistics=stats, **common)}
        err = {name: (x - reference).norm(dim=1).mean().item() for name, x in solves.items()}
        assert err["ems"] <= err["2m"], (steps, err)
        assert err["default"] <= min(err["2m"], err["3m"]), (steps, err)


def test_float32_state_and_odd_batch(ring_vp):
    """A float32 state (odd batch) gives the float64 solve to float32 accuracy."""
    model, stats = ring_vp
    x_T = torch.randn(7, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    common = dict(solver="dpm_solver_v3", steps=7, t_start=1.0, t_end=1e-3, statistics=stats)
    x32 = gf.sample(model, x_T=x_T.float(), **common)
    assert x32.dtype == torch.float32
    torch.testing.assert_close(x32.double(), gf.sample(model, x_T=x_T, **common), rtol=0, atol=5e-4)


def test_model_statistics_linear_model_exact_l(tmp_path):
    """For Gaussian data N(0, diag(c^2)) under VP, sigma eps = sigma^2 x_i/(alpha^2 c_i^2 + sigma^2)
    is linear, so l (the mean of its Jacobian's diagonal) is exact; save/load round-trips."""
    process = gf.VP()
    c2 = torch.tensor([4.0, 0.25], dtype=torch.float64)
    gauss = gf.GaussianMixture([[0.0, 0.0]], covs=[torch.diag(c2).tolist()])
    gen = torch.Generator().manual_seed(0)
    stats = model_statistics(gauss.model(process), gauss.sample(301, generator=gen, dtype=torch.float64), steps=9,
                             t_start=0.9, t_end=0.05, generator=gen)
    t = process.t_from_log_snr(stats.lam)
    alpha, sigma = process.alpha(t).double(), process.sigma(t).double()
    exact = (sigma[:, None] ** 2 / (alpha[:, None] ** 2 * c2 + sigma[:, None] ** 2)).mean(dim=1)
    torch.testing.assert_close(stats.l, exact, rtol=1e-6, atol=0)
    assert bool((stats.lam[1:] > stats.lam[:-1]).all())
    assert all(bool(torch.isfinite(v).all()) for v in (stats.s, stats.b))
    stats.save(tmp_path / "ems.pt")
    loaded = ModelStatistics.load(tmp_path / "ems.pt")
    assert loaded.process == stats.process
    for name in ("lam", "l", "s", "b"):
        torch.testing.assert_close(getattr(loaded, name), getattr(stats, name), rtol=0, atol=0)


def test_bad_inputs_name_the_argument(ring_vp):
    model, stats = ring_vp
    x_T = torch.randn(3, 2, dtype=torch.float64)
    solve = dict(x_T=x_T, solver="dpm_solver_v3", steps=5, t_start=1.0, t_end=1e-3)
    edm_model = gf.GaussianMixture.ring().model(gf.EDM())
    with pytest.raises(ValueError, match="statistics were computed for another process"):
        gf.sample(edm_model, statistics=stats, **dict(solve, t_start=10.0, t_end=0.01))
    short = stats._replace(l=stats.l[:-1])
    with pytest.raises(ValueError, match="statistics must hold lam, l, s, b of one length"):
        gf.sample(model, statistics=short, **solve)
    with pytest.raises(ValueError, match="statistics cover log-SNR"):
        gf.sample(model, statistics=stats, **dict(solve, t_end=1e-4))
    with pytest.raises(ValueError, match="statistics.lam must be strictly increasing"):
        gf.sample(model, statistics=stats._replace(lam=stats.lam.flip(0)), **solve)
    with pytest.raises(TypeError, match="statistics must be a ModelStatistics"):
        gf.sample(model, statistics={"l": stats.l}, **solve)
    with pytest.raises(ValueError, match="warmup must be 'multistep'"):
        gf.sample(model, warmup="singlestep", **solve)
    per_sample = torch.linspace(1.0, 1e-3, 6, dtype=torch.float64)[:, None].repeat(1, 3)
    with pytest.raises(ValueError, match="schedule: dpm_solver_v3 needs one time grid"):
        gf.sample(model, x_T=x_T, solver="dpm_solver_v3", schedule=per_sample)
    calib = torch.randn(10, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="steps must be an int >= 3"):
        model_statistics(model, calib, steps=2, t_start=1.0, t_end=1e-3)
    with pytest.raises(TypeError, match="x_calib must be a floating tensor"):
        model_statistics(model, calib[0], t_start=1.0, t_end=1e-3)
    with pytest.raises(ValueError, match="t_end must be a time of finite log-SNR"):
        model_statistics(model, calib, t_start=1.0, t_end=0.0)
