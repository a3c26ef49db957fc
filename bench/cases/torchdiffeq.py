"""``torchdiffeq``: probability-flow ODE solves vs torchdiffeq odeint."""
from typing import Iterator

import torch

from genflow.bench import Baseline, Case, Context, group
from bench.cases.common import solve_shapes, MODELS, make_net, size_str, missing, equal_work, cached


def velocity_fn(model, batch, device, dtype):
    """torchdiffeq's ``func(t, y)``: the probability-flow velocity with one network call and the
    conversion coefficients as Python floats (what a careful user writes)."""
    def func(t, y):
        tf = float(t)
        a, b = model.coefficients("velocity", tf)
        return a * y + b * model.net(y, torch.full((batch,), tf, dtype=dtype, device=device))
    return func


@group("torchdiffeq", "probability-flow ODE solves vs torchdiffeq 0.2.5 odeint (NFE and error too)")
def _torchdiffeq(ctx: Context) -> Iterator[Case]:
    """VP process, x0 network, the probability-flow ODE from T = 1 to t_min. Fixed steps: genflow
    ``rk4`` vs odeint ``rk4`` on genflow's log-SNR grid (torchdiffeq's RK4 is the 3/8-rule variant,
    genflow's the classic one: equal order and NFE, so the outputs agree to the discretisation
    error, not to rounding). Adaptive: genflow ``rk45`` vs odeint ``dopri5`` at rtol = atol = 1e-5
    (genflow controls the step per sample, torchdiffeq per batch). The large batch is 8192 with
    --quick. Errors are against a float64
    dopri5 solution at rtol = atol = 1e-9. dopri5 gets ``step_t`` = the end points: without it,
    torchdiffeq steps past t_min and interpolates back, evaluating the model at t < 0."""
    import genflow as gf
    from genflow import peers

    tde = peers.optional("torchdiffeq")
    steps = 10 if ctx.tiny else 20
    tol = 1e-5
    for model_name in MODELS:
        for shape in solve_shapes(ctx, model_name, adaptive=True):
            size = size_str(shape)
            for method in ("rk4", "dopri5"):
                solver = "rk4" if method == "rk4" else "rk45"
                case = f"rk4 {steps} steps, {model_name}" if method == "rk4" else f"rk45 tol {tol:g}, {model_name}"
                if tde is None:
                    yield missing("torchdiffeq", case, size, f"torchdiffeq {method}")
                    continue
                process = gf.VP()
                net = make_net(model_name)
                ts = gf.time_grid(process, steps, "logsnr")
                span = torch.tensor([process.T, process.t_min], dtype=torch.float64, device=ctx.device)
                x_T = ctx.randn(*shape, seed=4)

                def make_gf(net, solver=solver, ts=ts, x_T=x_T, process=process):
                    model = gf.Model(net, process, "x0")
                    if solver == "rk4":
                        return lambda: gf.sample(model, x_T=x_T, solver="rk4", schedule=ts)
                    return lambda: gf.sample(model, x_T=x_T, solver="rk45", rtol=tol, atol=tol)

                def make_peer(net, method=method, ts=ts, x_T=x_T, process=process, span=span):
                    func = velocity_fn(gf.Model(net, process, "x0"), x_T.shape[0], x_T.device, x_T.dtype)
                    if method == "rk4":
                        grid = ts.to(dtype=x_T.dtype, device=x_T.device)
                        return lambda: tde.odeint(func, x_T, grid, method="rk4")[-1]
                    grid = span.to(x_T.dtype)
                    return lambda: tde.odeint(func, x_T, grid, method="dopri5", rtol=tol, atol=tol,
                                             options={"step_t": grid})[-1]

                def reference(net=net, x_T=x_T, process=process, span=span):
                    x64 = x_T.double()
                    func = velocity_fn(gf.Model(net, process, "x0"), x64.shape[0], x64.device, x64.dtype)
                    return tde.odeint(func, x64, span, method="dopri5", rtol=1e-9, atol=1e-9,
                                      options={"step_t": span})[-1]

                yield Case(case, size, make_gf(net), [
                    Baseline(f"torchdiffeq {method}", make_peer(net),
                             equal_work(make_gf, make_peer, net, 1e-4, reference=cached(reference)))])
