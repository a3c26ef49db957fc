"""Shared references for solver tests: an exact mixture model and a high-precision ODE solution."""
import numpy as np
import torch
from scipy.integrate import solve_ivp

import genflow as gf


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

