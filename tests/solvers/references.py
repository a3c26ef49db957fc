"""Shared references for solver tests: an exact mixture model, a high-precision ODE solution,
the data-vs-data MMD spread."""
import functools

import numpy as np
import torch
from scipy.integrate import solve_ivp

import genflow as gf
from genflow.metrics import mmd


def mixture():
    """A 2-D three-component mixture with unequal weights and scales (float64 ground truth)."""
    return gf.GaussianMixture([[-2.0, 0.0], [1.5, 1.5], [1.0, -2.0]], [0.6, 0.4, 0.8], [0.5, 0.3, 0.2])


def pf_ode_solution(model, x_T, t_start, t_end):
    """``x(t_end)`` of the probability-flow ODE ``dx/dt = velocity(x, t)`` from ``x(t_start) = x_T``,
    by scipy's DOP853 at rtol = atol = 1e-10 (float64)."""
    shape = x_T.shape

    def rhs(t, y):
        x = torch.from_numpy(y).reshape(shape)
        return model.velocity(x, float(t)).reshape(-1).numpy()

    sol = solve_ivp(rhs, (t_start, t_end), x_T.double().reshape(-1).numpy(), method="DOP853",
                    rtol=1e-10, atol=1e-10)
    assert sol.success, sol.message
    return torch.from_numpy(sol.y[:, -1].copy()).reshape(shape)


def fit_order(steps, errors):
    """Slope of -log(error) against log(steps)."""
    return float(-np.polyfit(np.log(steps), np.log(errors), 1)[0])



ORDER_PROCESSES = {"vp": gf.VP(), "edm": gf.EDM(sigma_max=20.0), "linear": gf.LinearPath()}
T_END = {"vp": 1e-3, "edm": 2e-3, "linear": 1e-3}  # the x0 -> velocity map is singular at sigma = 0


@functools.lru_cache(maxsize=None)
def reference_solve(process_name):
    """``(model, x_T, x(t_end))`` for 8 prior samples under ``ORDER_PROCESSES[process_name]``."""
    process = ORDER_PROCESSES[process_name]
    model = mixture().model(process)
    x_T = process.prior_sample((8, 2), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    return model, x_T, pf_ode_solution(model, x_T, process.T, T_END[process_name])


def data_mmd_spread(mix, n, repeats=8):
    """The largest MMD^2 between two independent n-sample data sets over ``repeats`` pairs."""
    values = []
    for r in range(repeats):
        a = mix.sample(n, generator=torch.Generator().manual_seed(100 + 2 * r), dtype=torch.float64)
        b = mix.sample(n, generator=torch.Generator().manual_seed(101 + 2 * r), dtype=torch.float64)
        values.append(mmd(a, b))
    return max(values)
