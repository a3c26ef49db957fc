"""``likelihood``: PF-ODE log-likelihoods vs score_sde-style scipy RK45 and flow_matching."""
import math
from typing import Iterator

import torch

from genflow.bench import Baseline, Case, Context, Counted, agree, group
from bench.cases.common import MLP, size_str, equal_work, cached


def _std_normal_logp(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) per sample (the prior of LinearPath at T = 1), in z's dtype."""
    flat = z.flatten(1)
    return -0.5 * flat.square().sum(1) - 0.5 * flat.shape[1] * math.log(2 * math.pi)


def _score_sde_likelihood(model, x, *, rtol, atol, method="RK45", dtype=torch.float32):
    """score_sde's ``likelihood.py`` approach, re-implemented from its description: the batch's
    ``[x, delta]`` flattened into one float64 numpy vector and integrated from ``t_min`` to ``T``
    by ``scipy.integrate.solve_ivp`` (one step size for the whole batch), every right-hand side
    converting numpy -> torch (``dtype``, the model's device), evaluating the drift and its
    divergence and converting back. The divergence is the exact trace (one backward pass per
    dimension) in place of score_sde's Hutchinson estimate, so both sides do equal work."""
    import numpy as np
    from scipy import integrate

    shape, device = tuple(x.shape), x.device
    batch, dim = shape[0], int(x[0].numel())
    process = model.process

    def rhs(t, y):
        with torch.enable_grad():
            xs = torch.from_numpy(y[:-batch]).reshape(shape).to(device=device, dtype=dtype).requires_grad_(True)
            v = model.velocity(xs, torch.full((batch,), float(t), dtype=dtype, device=device))
            flat = v.reshape(batch, dim)
            div = 0.0
            for i in range(dim):
                (g,) = torch.autograd.grad(flat[:, i].sum(), xs, retain_graph=i + 1 < dim)
                div = div + g.reshape(batch, dim)[:, i]
        return np.concatenate([v.detach().reshape(-1).cpu().double().numpy(), div.detach().cpu().double().numpy()])

    init = np.concatenate([x.detach().reshape(-1).cpu().double().numpy(), np.zeros(batch)])
    sol = integrate.solve_ivp(rhs, (float(process.t_min), float(process.T)), init, method=method, rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"solve_ivp failed: {sol.message}")
    y_T = torch.from_numpy(sol.y[:, -1])
    z = y_T[:-batch].reshape(shape)
    return process.prior_log_prob(z) + y_T[-batch:]


def _likelihood_shape(ctx):
    return (64, 2) if ctx.tiny else (1024, 2)


def _divergence_batch(ctx):
    return 64 if ctx.tiny else (1024 if ctx.quick else 4096)


@group("likelihood", "PF-ODE log-likelihoods vs score_sde-style scipy RK45 and flow_matching 1.0.10; "
                     "one Hutchinson divergence estimate vs a forward pass")
def _likelihood(ctx: Context) -> Iterator[Case]:
    """(1) ``gf.log_likelihood(method="exact", rtol = atol = 1e-5)`` (eager; and with
    ``compile=True`` unless --no-compile) of 1024 2D points (64 with
    --tiny) under a flow-matching velocity MLP (``LinearPath``, prediction "velocity", the fixed
    random ``MLP``): against score_sde's approach (``_score_sde_likelihood``: scipy ``solve_ivp``
    RK45 over the whole batch with numpy round trips) and against flow_matching's
    ``ODESolver.compute_likelihood(method="dopri5", exact_divergence=True)`` (torchdiffeq; its
    data is at t = 1, so it sees ``u(x, s) = -v(x, 1 - s)`` and integrates s from 1 to 0). All
    three use the exact divergence and the same tolerances, float32 model evaluations. Agreement:
    the log-likelihoods agree to within the sum of their errors against a float64 reference
    (scipy DOP853 at rtol = atol = 1e-10) plus 1e-4 relative.

    (2) One Hutchinson divergence estimate ``eps^T (dv/dx) eps`` (Rademacher probe fixed) through
    a 3-layer MLP (``MLP(hidden=512)``: 3 -> 512 -> 512 -> 2), batch 4096 (1024 with --quick):
    genflow's estimator step (``log_likelihood``'s drift: one forward, one VJP, ``probe_dot``)
    against ``torch.func.vjp`` doing the same estimate the plain way (a peer, same probe) and
    against one forward pass (a bound: ratio = forward ms / estimate ms, so 1/ratio is the
    estimate's cost in forward passes; the issue's GPU target is <= 2.5 forwards, ratio >= 0.4)."""
    import genflow as gf
    from genflow import peers
    from genflow.divergence import DivergenceDrift
    from genflow.ops import hutchinson

    fm = peers.optional("flow_matching")
    if fm is not None:
        from flow_matching.solver import ODESolver
    tol = 1e-5
    shape = _likelihood_shape(ctx)
    size = size_str(shape)
    case = f"pf-ode logp, mlp, tol {tol:g}"
    process = gf.LinearPath()
    net = MLP(seed=11)
    x = ctx.randn(*shape, seed=12)

    def make_gf(net, **options):
        model = gf.Model(net, process, "velocity")
        return lambda: gf.log_likelihood(model, x, method="exact", rtol=tol, atol=tol, **options)

    def make_gf_compiled(net):  # a Counted net stays outside the compiled drift (its counter would recompile it)
        model = gf.Model(net.net if isinstance(net, Counted) else net, process, "velocity")

        def run():
            logp, info = gf.log_likelihood(model, x, method="exact", rtol=tol, atol=tol, compile=True, return_info=True)
            if isinstance(net, Counted):
                net.calls += info["nfe"]  # one network call per drift evaluation
            return logp
        return run

    def make_score_sde(net):
        model = gf.Model(net, process, "velocity")
        return lambda: _score_sde_likelihood(model, x, rtol=tol, atol=tol)

    def make_fm(net):
        model = gf.Model(net, process, "velocity")
        batch = x.shape[0]

        def velocity(x, t):  # flow_matching's time s = 1 - t (data at s = 1), velocity d/ds = -v
            return -model.velocity(x, (1.0 - t).to(x.dtype).expand(batch))

        solver = ODESolver(velocity_model=velocity)
        grid = torch.tensor([1.0, 0.0], dtype=x.dtype, device=x.device)
        return lambda: solver.compute_likelihood(x_1=x, log_p0=_std_normal_logp, step_size=None, method="dopri5",
                                                 atol=tol, rtol=tol, time_grid=grid, exact_divergence=True)[1]

    def reference():
        model = gf.Model(net, process, "velocity")
        return _score_sde_likelihood(model, x.double(), rtol=1e-10, atol=1e-10, method="DOP853", dtype=torch.float64)

    reference = cached(reference)
    how = ("max |genflow - peer| logp (nats) <= (their errors vs a float64 scipy DOP853 solve at rtol = atol = 1e-10) "
           "+ 1e-4, relative to max |peer|; each error < 5% of it")

    def baselines(ours):
        out = [Baseline("score_sde-style scipy RK45", make_score_sde(net),
                        equal_work(ours, make_score_sde, net, 1e-4, reference=reference, how=how),
                        note="solve_ivp over the flattened batch, numpy round trip per rhs")]
        if fm is None:
            out.append(Baseline("flow_matching compute_likelihood", None, status="skipped: flow_matching not installed"))
        else:
            out.append(Baseline("flow_matching compute_likelihood", make_fm(net),
                                equal_work(ours, make_fm, net, 1e-4, reference=reference, how=how),
                                note="ODESolver dopri5 (torchdiffeq), exact_divergence=True"))
        return out

    yield Case(case, size, make_gf(net), baselines(make_gf),
               note="exact divergence on all sides; LinearPath velocity MLP; per-sample steps")
    if ctx.compile:
        yield Case(case + ", compile=True", size, make_gf_compiled(net), baselines(make_gf_compiled),
                   note="genflow's drift torch.compiled (compiled in the warm-up call, kept per model)")

    # (2) one Hutchinson divergence estimate
    batch = _divergence_batch(ctx)
    big = MLP(hidden=512, seed=13)
    model = gf.Model(big, process, "velocity")
    xb = ctx.randn(batch, 2, seed=14)
    tb = torch.full((batch,), 0.5, dtype=ctx.dtype, device=ctx.device)
    eps = hutchinson.probes(xb.shape, seed=15, offset=0, kind="rademacher", dtype=xb.dtype, device=xb.device)
    drift = DivergenceDrift(model, "hutchinson", [eps], "vjp")

    def estimate():
        return drift(xb, tb)[1]

    def forward():
        with torch.no_grad():
            return model.velocity(xb, tb)

    def plain():
        _, vjp_fn = torch.func.vjp(lambda y: model.velocity(y, tb), xb)
        (g,) = vjp_fn(eps)
        return (g * eps).sum(1)

    def check_plain():
        a = agree(estimate(), plain(), 1e-5)
        a.how = "same Rademacher probe; " + a.how
        return a

    yield Case("hutchinson div estimate, mlp512", f"({batch},2)", estimate, [
        Baseline("torch.func vjp", plain, check_plain),
        Baseline("one forward pass", forward, kind="bound",
                 note="bound: ratio = forward / estimate, the estimate costs 1/ratio forwards (target <= 2.5: ratio >= 0.4)"),
    ], note="3 -> 512 -> 512 -> 2 SiLU MLP, one Rademacher probe")
    if xb.device.type == "cuda":  # the same estimate replayed from a CUDA graph (log_likelihood(cuda_graph=True))
        from genflow.divergence import GraphedDrift

        graphed = GraphedDrift(drift, xb, tb)
        yield Case("hutchinson div estimate, mlp512, cuda graph", f"({batch},2)", lambda: graphed(xb, tb)[1], [
            Baseline("torch.func vjp", plain, lambda: agree(graphed(xb, tb)[1], plain(), 1e-5)),
            Baseline("one forward pass", forward, kind="bound",
                     note="bound: the estimate costs 1/ratio forwards (target <= 2.5: ratio >= 0.4)"),
        ], note="log_likelihood(cuda_graph=True)'s drift: forward + VJP + probe_dot as one graph replay")
