"""Every registered ODE solver converges at its theoretical order to a DOP853 reference solution
of the probability-flow ODE, for VP, EDM and LinearPath (and eps, x0, v network kinds).

The fitted order over 10, 20, 40 and 80 steps is within 0.3 of ``expected_order`` (Euler/DDIM/
DPM-Solver-1: 1; Heun/midpoint/DPM-Solver-2/2S/2M: 2; DPM-Solver-3: 3; RK4: 4; multistep
third-order methods 2 with the usual first-order start and 3 with ``warmup="singlestep"``),
and the last local slope (40 -> 80 steps) is too. The solves run from mid-noise
(sigma/alpha = 2) to sigma/alpha = 0.03: from pure noise the first steps are nearly linear and
cost multistep methods nothing, so their starting error (what limits 3M to order 2) only shows
far beyond 80 steps, and near sigma = 0 the x0 -> velocity map is singular. Multistep methods
run with ``lower_order_final=False`` (their ``order_test_options``), since diffusers' rule
lowers the last orders below 15 steps only, which bends the fit.
"""
import math

import numpy as np
import pytest
import torch

import genflow as gf
from genflow.solvers import SOLVERS

from .references import ORDER_PROCESSES, fit_order, mixture, pf_ode_solution

STEPS = (10, 20, 40, 80)
SCHEDULE = {"vp": "logsnr", "edm": "karras", "linear": "cosine"}
START_RATIO, END_RATIO = 2.0, 0.03  # sigma/alpha at the ends of the solve
ODE_CASES = [(name, options) for name, cls in SOLVERS.items() if cls.default_eta is not None or not cls.stochastic
             for options in cls.order_test_options]
# Third-order singlestep warmups (3 NFE per warmup step) are still pre-asymptotic at 10 steps on
# some problems: fitted 3.35 (dpmpp_3m and UniP-3, the same update, on EDM) and 2.67 (deis on
# LinearPath), with local slopes 3.70 3.31 3.06 and 2.68 2.53 2.84 — converging to 3 (the last
# slope is held to 0.3 below).
WIDER = {("dpmpp_3m", "edm"): 0.4, ("unipc", "edm"): 0.4, ("deis", "linear"): 0.4}


def _t_at_ratio(process, ratio):
    return float(process.t_from_log_snr(torch.tensor(-math.log(ratio), dtype=torch.float64)))


_SOLUTIONS = {}


def order_problem(process_name):
    """``(model, x_T, t_start, t_end, x(t_end))``: 8 samples of q_{t_start} and their exact flow."""
    if process_name not in _SOLUTIONS:
        process = ORDER_PROCESSES[process_name]
        mix = mixture()
        t_start, t_end = _t_at_ratio(process, START_RATIO), _t_at_ratio(process, END_RATIO)
        x_T = mix.marginal(process, t_start).sample(8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        model = mix.model(process)
        _SOLUTIONS[process_name] = (model, x_T, t_start, t_end, pf_ode_solution(model, x_T, t_start, t_end))
    return _SOLUTIONS[process_name]


def _as_kind(model, kind):
    """The exact model re-expressed as a network that predicts ``kind``."""
    return gf.Model(lambda x, t: model.predict(x, t, kind), model.process, prediction=kind)


@pytest.mark.parametrize("process_name", sorted(ORDER_PROCESSES))
@pytest.mark.parametrize("solver, options", ODE_CASES, ids=[f"{n}{o or ''}" for n, o in ODE_CASES])
def test_solver_converges_at_its_theoretical_order(solver, options, process_name):
    model, x_T, t_start, t_end, reference = order_problem(process_name)
    kwargs = {"eta": 0.0} if SOLVERS[solver].default_eta is not None else {}
    kwargs.update(options)
    errors = []
    for steps in STEPS:
        x = gf.sample(model, x_T=x_T, solver=solver, steps=steps, schedule=SCHEDULE[process_name],
                      t_start=t_start, t_end=t_end, **kwargs)
        errors.append((x - reference).abs().max().item())
    order = fit_order(STEPS, errors)
    last_slope = float(np.log(errors[-2] / errors[-1]) / np.log(STEPS[-1] / STEPS[-2]))
    expected = SOLVERS[solver].expected_order(**options)
    band = WIDER.get((solver, process_name), 0.3) if options.get("warmup") == "singlestep" else 0.3
    message = f"{solver}{options} on {process_name}: fitted order {order:.2f}, last slope {last_slope:.2f}, " \
              f"expected {expected}, errors {errors}"
    assert abs(order - expected) <= band, message
    assert abs(last_slope - expected) <= 0.3, message


@pytest.mark.parametrize("kind", ["eps", "v", "velocity", "score"])
@pytest.mark.parametrize("solver", ["ddim", "heun", "dpmpp_2m"])
def test_network_kind_does_not_change_the_solution(solver, kind):
    model, x_T, t_start, t_end, _ = order_problem("vp")
    base = gf.sample(model, x_T=x_T, solver=solver, steps=15, t_start=t_start, t_end=t_end)
    other = gf.sample(_as_kind(model, kind), x_T=x_T, solver=solver, steps=15, t_start=t_start, t_end=t_end)
    torch.testing.assert_close(other, base, rtol=1e-9, atol=1e-9)
