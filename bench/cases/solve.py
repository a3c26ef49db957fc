"""``solve``: ``gf.solve`` on user-defined ODEs and SDEs vs torchdiffeq, torchsde, torchode and
diffrax (JAX CPU backend)."""
from typing import Iterator

import numpy as np
import torch

from bench.cases.common import cached, size_str
from bench.cases.solve_peers import ConvDrift, Diffrax, Drift, Increments, TorchsdeSDE, diffrax_available, diffusion
from genflow import peers
from genflow.bench import Baseline, Case, Context, agree, group

T0, T1, TOL = 0.0, 1.0, 1e-5


def _shapes(ctx):
    if ctx.tiny:
        return [(1, 2), (64, 2)]
    return [(1, 2), (8192 if ctx.quick else 65536, 2)]


def _conv_shape(ctx):
    return None if ctx.tiny else (2, 3, 32, 32) if ctx.quick else (16, 3, 64, 64)


def _checked(ours, theirs, tol, *, reference=None, count=None):
    """An ``Agreement`` builder: ``ours()`` vs ``theirs()`` (equal to ``tol``), or with a float64
    ``reference`` each within its error of it (adaptive methods of different step sequences)."""
    def check():
        a, b = ours(), theirs()
        extra = count() if count is not None else {}
        if reference is None:
            return agree(a, b, tol, **extra)
        ref = reference()
        e_a, e_b = (a.double() - ref).abs().max().item(), (b.double() - ref).abs().max().item()
        result = agree(a, b, tol, err_genflow=e_a, err_peer=e_b, **extra)
        result.tol = (e_a + e_b) / result.scale + tol
        result.how = "max |genflow - peer| <= their errors vs a float64 reference + tol, relative to max |peer|"
        return result
    return check


def _reference(gf, drift, y0):
    """The float64 solution at rtol = atol = 1e-10 (dop853)."""
    return cached(lambda: gf.solve(gf.ODE(drift), y0.double(), T0, T1, solver="dop853", rtol=1e-10, atol=1e-10))


def _ode_cases(ctx, gf, label, drift, y0, conv=False) -> Iterator[Case]:
    size, steps = size_str(y0.shape), 10 if ctx.tiny else 20
    tde, tode = peers.optional("torchdiffeq"), peers.optional("torchode")
    grid = torch.linspace(T0, T1, steps + 1, dtype=y0.dtype)
    ours = lambda: gf.solve(gf.ODE(drift), y0, T0, T1, solver="rk4_38", steps=steps)  # noqa: E731
    baselines = [Baseline("torchdiffeq rk4 (3/8 rule)", (lambda: tde.odeint(drift, y0, grid, method="rk4")[-1])
                          if tde else None, status="ok" if tde else "skipped: torchdiffeq not installed")]
    if tde:
        baselines[0].check = _checked(ours, baselines[0].fn, 1e-5)
    yield Case(f"rk4 {steps} steps, {label}", size, ours, baselines)
    if conv:
        return
    reference = _reference(gf, drift, y0)
    for method in ("dopri5", "tsit5"):
        ours = lambda method=method: gf.solve(gf.ODE(drift), y0, T0, T1, solver=method, rtol=TOL, atol=TOL)  # noqa: E731
        rows = []
        if method == "dopri5":
            span = torch.tensor([T0, T1], dtype=y0.dtype)
            fn = (lambda: tde.odeint(drift, y0, span, method="dopri5", rtol=TOL, atol=TOL)[-1]) if tde else None
            rows.append(Baseline("torchdiffeq dopri5 (batch norm)", fn, _checked(ours, fn, 1e-4, reference=reference)
                                 if fn else None, status="ok" if fn else "skipped: torchdiffeq not installed"))
        fn = _torchode(tode, drift, y0, method) if tode else None
        rows.append(Baseline(f"torchode {method} (per sample)", fn, _checked(ours, fn, 1e-4, reference=reference)
                             if fn else None, status="ok" if fn else "skipped: torchode not installed"))
        rows.append(_diffrax_ode(drift, y0, method, ours, reference))
        yield Case(f"{method} rtol {TOL:g}, {label}", size, ours, rows)


def _torchode(tode, drift, y0, method):
    term = tode.ODETerm(lambda t, y: drift(t, y))
    step = {"dopri5": tode.Dopri5, "tsit5": tode.Tsit5}[method](term=term)
    solver = tode.AutoDiffAdjoint(step, tode.IntegralController(atol=TOL, rtol=TOL, term=term))
    batch = y0.shape[0]
    t_eval = torch.tensor([[T0, T1]], dtype=y0.dtype).expand(batch, 2)
    problem = tode.InitialValueProblem(y0=y0, t_eval=t_eval)
    return lambda: solver.solve(problem).ys[:, -1]


def _diffrax_ode(drift, y0, method, ours, reference):
    name = f"diffrax {method.capitalize()} (JAX CPU)"
    if not diffrax_available():
        return Baseline(name, None, status="skipped: diffrax/jax not installed")
    dx = Diffrax(drift)
    run = dx.block(dx.ode(y0.numpy(), T0, T1, method.capitalize(), TOL, TOL))
    fn = lambda: run()[0]  # noqa: E731
    return Baseline(name, fn, _checked(ours, lambda: torch.from_numpy(np.asarray(fn())), 1e-4, reference=reference))


def _sde_cases(ctx, gf, label, drift, y0) -> Iterator[Case]:
    size, steps = size_str(y0.shape), 10 if ctx.tiny else 50
    tsde = peers.optional("torchsde")
    h = (T1 - T0) / steps
    dws = torch.randn(steps, *y0.shape, generator=torch.Generator().manual_seed(3), dtype=y0.dtype) * h ** 0.5
    term = gf.SDE(drift, diffusion, noise="diagonal")
    strat = gf.SDE(drift, diffusion, noise="diagonal", sde_type="stratonovich")
    grid = torch.linspace(T0, T1, steps + 1, dtype=y0.dtype)
    for ours_name, peer_name, sde_term in (("euler_maruyama", "euler", term), ("milstein", "milstein", term),
                                           ("sri", "srk", term), ("stochastic_heun", "heun", strat)):
        ours = lambda s=ours_name, t=sde_term: gf.solve(t, y0, T0, T1, solver=s, steps=steps, generator=0)  # noqa: E731
        on_path = lambda s=ours_name, t=sde_term: gf.solve(t, y0, T0, T1, solver=s, steps=steps,  # noqa: E731
                                                           brownian=_interval(tsde, y0, s, 7))
        rows = []
        if tsde is None:
            rows.append(Baseline(f"torchsde {peer_name}", None, status="skipped: torchsde not installed"))
        else:
            sde = TorchsdeSDE(drift)
            sde.sde_type = sde_term.sde_type

            def peer(p=peer_name, sde=sde, s=ours_name, seed=None):
                bm = _interval(tsde, y0, s, seed)
                return tsde.sdeint(sde, y0, grid, method=p, dt=h, bm=bm)[-1]

            rows.append(Baseline(f"torchsde {peer_name}", peer, _checked(on_path, lambda peer=peer: peer(seed=7), 1e-5)))
        if ours_name in ("euler_maruyama", "stochastic_heun"):
            rows.append(_diffrax_sde(gf, drift, y0, dws, h, ours_name, sde_term, steps))
        yield Case(f"{ours_name} {steps} steps, {label}", size, ours, rows)


def _interval(tsde, y0, solver, seed):
    """A torchsde ``BrownianInterval`` on [T0, T1] (space-time Lévy area for the SRK schemes)."""
    levy = "space-time" if solver in ("sri", "srk") else "none"
    return tsde.BrownianInterval(t0=T0, t1=T1, size=y0.shape, dtype=y0.dtype, levy_area_approximation=levy,
                                 entropy=seed)


def _diffrax_sde(gf, drift, y0, dws, h, solver, term, steps):
    name = f"diffrax {'Euler' if solver == 'euler_maruyama' else 'Heun'} (JAX CPU)"
    if not diffrax_available():
        return Baseline(name, None, status="skipped: diffrax/jax not installed")
    dx = Diffrax(drift)
    run = dx.block(dx.sde(y0.numpy(), dws.numpy(), T0, h, "Euler" if solver == "euler_maruyama" else "Heun"))
    ours = lambda: gf.solve(term, y0, T0, T1, solver=solver, steps=steps, brownian=Increments(dws, T0, h))  # noqa: E731
    return Baseline(name, run, _checked(ours, lambda: torch.from_numpy(np.asarray(run())), 1e-5))


@group("solve", "gf.solve on user ODEs/SDEs vs torchdiffeq, torchsde, torchode and diffrax (JAX CPU)")
def _solve(ctx: Context) -> Iterator[Case]:
    """A 2-D MLP drift ``f(t, y) = MLP(y, t) - y`` (64 wide) at batch 1 and 65,536 (8,192 with
    --quick), and a conv drift at 16x3x64x64 (rk4 only). ODEs from t = 0 to 1: fixed-grid RK4 (the
    3/8 rule on both sides: torchdiffeq's ``rk4`` is that variant) and adaptive dopri5/tsit5 at
    rtol = atol = 1e-5 (genflow and torchode control the step per sample, torchdiffeq and diffrax
    per batch; agreement is checked against a float64 dop853 solution). SDEs with diagonal noise
    ``g = 0.3 (1 + 0.2 tanh y)`` on 50 steps: checked on the same torchsde ``BrownianInterval``
    (diffrax: the same increments), timed with each library's own noise (genflow: in-kernel
    Philox; torchsde: a fresh ``BrownianInterval`` per solve)."""
    import genflow as gf

    for y0_shape in _shapes(ctx):
        y0 = ctx.randn(*y0_shape, seed=5)
        drift = Drift(y0_shape[1])
        yield from _ode_cases(ctx, gf, "mlp", drift, y0)
        yield from _sde_cases(ctx, gf, "mlp", drift, y0)
    conv = _conv_shape(ctx)
    if conv is not None:
        yield from _ode_cases(ctx, gf, "conv", ConvDrift(conv[1]), ctx.randn(*conv, seed=6), conv=True)

