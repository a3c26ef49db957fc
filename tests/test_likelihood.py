"""gf.log_likelihood and gf.bits_per_dim against closed-form Gaussian-mixture densities."""
import math

import pytest
import torch

import genflow as gf
from genflow.divergence import DivergenceDrift


def _mixture(dim, k, seed, std=0.4):
    g = torch.Generator().manual_seed(seed)
    means = torch.rand(k, dim, generator=g, dtype=torch.float64) * 1.6 - 0.8
    stds = 0.2 + std * torch.rand(k, generator=g, dtype=torch.float64)
    return gf.GaussianMixture(means, stds, torch.full((k,), 1.0 / k, dtype=torch.float64))


def _velocity_model(gm, process):
    """The mixture's exact PF-ODE drift as a flow-matching style prediction="velocity" model."""
    exact = gm.model(process)
    return gf.Model(lambda x, t: exact.velocity(x, t), process, prediction="velocity")


CASES = [("VP", 2), ("VP", 8), ("LinearPath", 2), ("LinearPath", 8)]


@pytest.mark.parametrize("name,dim", CASES)
def test_exact_divergence_matches_closed_form(name, dim):
    gm = _mixture(dim, 3 if dim == 2 else 4, seed=dim)
    if name == "VP":
        process, t_end = gf.VP(), None
        model = gm.model(process)
    else:
        process, t_end = gf.LinearPath(), 1e-3  # x0 -> velocity is singular at sigma(0) = 0
        model = _velocity_model(gm, process)
    x = gm.sample(12, generator=torch.Generator().manual_seed(1)).double()
    t0 = process.t_min if t_end is None else t_end
    logp, info = gf.log_likelihood(model, x, method="exact", rtol=1e-7, atol=1e-7, t_end=t_end, return_info=True)
    want = gm.log_prob_t(x, t0, process)
    assert logp.dtype == torch.float64 and logp.shape == (12,)
    assert (logp - want).abs().mean() < 0.01
    # with the exact q_T in place of the Gaussian prior, only the ODE solve's error remains
    solve = gm.log_prob_t(info["x_T"], process.T, process) + info["delta_logp"]
    assert (solve - want).abs().max() < 1e-4
    assert torch.equal(logp, info["prior_logp"] + info["delta_logp"])
    assert info["nfe"] > 6 and (info["steps"] > 0).all()


def test_hutchinson_is_unbiased_and_its_std_falls_like_one_over_sqrt_probes():
    gm = _mixture(8, 4, seed=3)
    process = gf.VP()
    model = gm.model(process)
    points = gm.sample(3, generator=torch.Generator().manual_seed(2)).double()
    reps = 48
    x = points.repeat_interleave(reps, 0)
    exact = gf.log_likelihood(model, points, method="exact", rtol=1e-6, atol=1e-6)
    stds = {}
    for p in (1, 4):
        seeds = torch.arange(reps * 3, dtype=torch.int64) + 1000 * p
        est = gf.log_likelihood(model, x, probes=p, generator=seeds).reshape(3, reps)
        err = est - exact[:, None]
        assert err.mean().abs() < 0.02 + 3 * err.std() / math.sqrt(err.numel())
        stds[p] = err.std(dim=1)
    ratio = (stds[1] / stds[4]).mean()
    assert 1.4 < ratio < 2.8, ratio
    # the estimate is not exact: one probe has a visible spread
    assert (stds[1] > 0.02).all()


def _mlp(dim, seed):
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(dim + 1, 16, generator=g, dtype=torch.float64) / math.sqrt(dim)
    w2 = torch.randn(16, dim, generator=g, dtype=torch.float64) / 4

    def net(x, t):
        return torch.tanh(torch.cat([x, t[:, None].to(x.dtype)], 1) @ w1.to(x.dtype)) @ w2.to(x.dtype)
    return gf.Model(net, gf.LinearPath(), prediction="velocity")


@pytest.mark.parametrize("mode", ["vjp", "jvp"])
def test_hutchinson_and_exact_divergence_agree_on_random_mlp(mode):
    dim, batch, n = 5, 4, 400
    model = _mlp(dim, 0)
    x = torch.randn(batch, dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t = torch.full((batch,), 0.3, dtype=torch.float64)
    eps = [gf.ops.hutchinson.probes((batch, dim), seed=9, offset=k, dtype=torch.float64) for k in range(n)]
    v_h, div_h = DivergenceDrift(model, "hutchinson", eps, mode)(x, t)
    v_e, div_e = DivergenceDrift(model, "exact", (), None)(x, t)
    jac = torch.stack([torch.autograd.functional.jacobian(lambda y: model.velocity(y[None], t[:1])[0], x[b])
                       for b in range(batch)])
    quad = torch.einsum("kbi,bij,kbj->b", torch.stack(eps), jac, torch.stack(eps)) / n
    torch.testing.assert_close(div_h, quad, rtol=1e-10, atol=1e-10)  # the estimator itself, exactly
    torch.testing.assert_close(div_e, jac.diagonal(dim1=1, dim2=2).sum(1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(v_h, v_e, rtol=1e-12, atol=1e-12)
    off = (jac.square().sum((1, 2)) - jac.diagonal(dim1=1, dim2=2).square().sum(1)).sqrt()
    assert ((div_h - div_e).abs() <= 4 * math.sqrt(2) * off / math.sqrt(n)).all()


def test_jvp_falls_back_to_vjp_when_not_forward_differentiable():
    class NoForward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return 2 * x

        @staticmethod
        def backward(ctx, g):
            return 2 * g

    model = gf.Model(lambda x, t: NoForward.apply(x), gf.LinearPath(), prediction="velocity")
    x = torch.randn(3, 4, dtype=torch.float64)
    logp, info = gf.log_likelihood(model, x, mode="jvp", rtol=1e-8, atol=1e-8, generator=0, return_info=True)
    assert info["mode"] == "vjp"
    # v = 2x: div = 2 D, x_T = e^2 x
    want = gf.LinearPath().prior_log_prob(math.exp(2.0) * x).double() + 2 * 4
    torch.testing.assert_close(logp, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("solver,steps", [("heun", (4, 16)), ("rk4", (2, 8))])
def test_fixed_step_solvers_converge_to_exact(solver, steps):
    gm = _mixture(2, 3, seed=5)
    process = gf.LinearPath()
    model = _velocity_model(gm, process)
    x = gm.sample(8, generator=torch.Generator().manual_seed(4)).double()
    ref = gf.log_likelihood(model, x, method="exact", rtol=1e-8, atol=1e-8, t_end=0.05)
    errs = []
    for n in steps:
        lp, info = gf.log_likelihood(model, x, method="exact", solver=solver, steps=n, t_end=0.05, return_info=True)
        assert info["nfe"] == n * (2 if solver == "heun" else 4)
        errs.append(float((lp - ref).abs().mean()))
    assert errs[1] < errs[0] / 4, errs
    assert errs[1] < 0.05


def test_per_sample_seeds_reproduce_each_sample():
    gm = _mixture(2, 3, seed=6)
    model = gm.model(gf.VP())
    x = gm.sample(3, generator=torch.Generator().manual_seed(0)).double()
    both = gf.log_likelihood(model, x, generator=[4, 5, 6], solver="rk4", steps=3)
    alone = gf.log_likelihood(model, x[1:2], generator=[5], solver="rk4", steps=3)
    torch.testing.assert_close(both[1:2], alone, rtol=1e-12, atol=1e-12)
    assert torch.equal(both, gf.log_likelihood(model, x, generator=[4, 5, 6], solver="rk4", steps=3))
    gauss = gf.log_likelihood(model, x, generator=[4, 5, 6], noise="gaussian", solver="rk4", steps=3)
    assert not torch.equal(both, gauss)


def test_bits_per_dim_matches_closed_form_64d():
    dim = 64
    gm = _mixture(dim, 3, seed=7, std=0.3)
    process = gf.VP()
    model = gm.model(process)
    y = gm.sample(3, generator=torch.Generator().manual_seed(3)).double()
    x = ((y + 1) * 128).floor().clamp(0, 255).to(torch.uint8)
    bpd, info = gf.bits_per_dim(model, x, generator=11, method="exact", dtype=torch.float64,
                                rtol=1e-6, atol=1e-6, return_info=True)
    u = info["y"] - ((x.double() / 256) * 2 - 1)  # the dequantisation noise it used, times 2/256
    assert ((u >= 0) & (u < 2 / 256)).all()
    want = -(gm.log_prob_t(info["y"], process.t_min, process) + dim * math.log(2 / 256)) / (dim * math.log(2))
    assert (bpd - want).abs().max() < 2e-3
    same = gf.bits_per_dim(model, x, dequantization=u * 128, method="exact", dtype=torch.float64, rtol=1e-6,
                           atol=1e-6)
    torch.testing.assert_close(same, bpd, rtol=1e-6, atol=1e-6)


def test_argument_errors():
    gm = _mixture(2, 2, seed=0)
    model = gm.model(gf.VP())
    x = torch.zeros(2, 2, dtype=torch.float64)
    with pytest.raises(TypeError, match="model"):
        gf.log_likelihood(lambda x, t: x, x)
    with pytest.raises(TypeError, match="x must be a floating"):
        gf.log_likelihood(model, torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="x must have shape"):
        gf.log_likelihood(model, torch.zeros(2))
    for kwargs, match in [({"method": "trace"}, "method"), ({"probes": 0}, "probes"), ({"noise": "normal"}, "noise"),
                          ({"mode": "fwd"}, "mode"), ({"rtol": -1.0}, "rtol"), ({"rtol": 0.0, "atol": 0.0}, "rtol"),
                          ({"solver": "euler"}, "solver"), ({"steps": 4}, "steps"),
                          ({"solver": "heun"}, "steps"), ({"t_end": 1.0}, "t_end"), ({"max_steps": 0}, "max_steps")]:
        with pytest.raises(ValueError, match=match):
            gf.log_likelihood(model, x, **kwargs)
    with pytest.raises(RuntimeError, match="max_steps"):
        gf.log_likelihood(model, x, max_steps=2, rtol=1e-8, atol=1e-8)
    with pytest.raises(ValueError, match="integer pixel values"):
        gf.bits_per_dim(model, x - 0.5)
    with pytest.raises(TypeError, match="x must be a real tensor"):
        gf.bits_per_dim(model, torch.zeros(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="dequantization"):
        gf.bits_per_dim(model, x, dequantization=torch.ones(2, 2))
    with pytest.raises(TypeError, match="dtype"):
        gf.bits_per_dim(model, x, dtype=torch.float16)


def test_rk45_is_the_engines_dopri5_on_the_augmented_state():
    """log_likelihood's rk45 is gf.solve's dopri5 on z = [x, delta] with dz/dt = [v, div v]:
    the same engine, so the same steps and the same numbers to rounding (float64)."""
    gm = _mixture(2, 3, seed=8)
    model = _velocity_model(gm, gf.LinearPath())
    x = gm.sample(6, generator=torch.Generator().manual_seed(5)).double()
    _, info = gf.log_likelihood(model, x, method="exact", rtol=1e-6, atol=1e-6, t_end=0.05, return_info=True)
    drift = DivergenceDrift(model, "exact", (), "loop")

    def augmented(t, z):
        v, div = drift(z[:, :2].contiguous(), t.expand(z.shape[0]))
        return torch.cat([v, div[:, None]], 1)

    z0 = torch.cat([x, torch.zeros(6, 1, dtype=torch.float64)], 1)
    z = gf.solve(gf.ODE(augmented), z0, 0.05, 1.0, solver="dopri5", rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(z[:, :2], info["x_T"], rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(z[:, 2], info["delta_logp"], rtol=1e-13, atol=1e-13)
    assert drift.nfe == info["nfe"]
