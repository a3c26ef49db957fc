"""Guidance operators (genflow.guidance): each equals its formula on exact Gaussian-mixture models
(conditional = one component, unconditional = the whole mixture), composes with every registered
solver, and keeps its per-solve state right."""
import math

import pytest
import torch

import genflow as gf
from genflow import guidance as G

F64 = torch.float64
MEANS = torch.tensor([[2.0, 0.0], [-2.0, 1.0], [0.0, -2.5]])
MIX = gf.GaussianMixture(MEANS, 0.5, weights=[0.5, 0.3, 0.2])
COMP = gf.GaussianMixture(MEANS[:1], 0.5)
WEAK = gf.GaussianMixture(MEANS[:1], 0.9)  # a "bad version" of COMP: too wide


class EpsNet:
    """The mixture's exact denoiser re-expressed as an eps-prediction network (a second kind)."""

    def __init__(self, mixture, process):
        self.mixture, self.process = mixture, process

    def __call__(self, x, t):
        t64 = t.to(F64)
        alpha, sigma = self.process.alpha(t64)[:, None], self.process.sigma(t64)[:, None]
        return ((x.to(F64) - alpha * self.mixture.posterior_mean(x, t64, self.process).to(F64)) / sigma).to(x.dtype)


def branches(process):
    """(cond x0-model, uncond eps-model) and their float64 x0 predictions as a function of (x, t)."""
    cond = COMP.model(process)
    uncond = gf.Model(EpsNet(MIX, process), process, "eps")
    return cond, uncond, lambda x, t: (COMP.posterior_mean(x, t, process), MIX.posterior_mean(x, t, process))


def as_kind(process, x0, x, t, kind):
    """A float64 x0 prediction converted to ``kind`` at (x, t)."""
    a, b = gf.conversion("x0", kind, process.alpha(t), process.sigma(t), process.dalpha(t), process.dsigma(t))
    col = lambda v: torch.as_tensor(v, dtype=F64).reshape(-1, 1)
    return col(a) * x + col(b) * x0


def points(process, n=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = process.t_min + (process.T - process.t_min) * (0.05 + 0.9 * torch.rand(n, generator=g, dtype=F64))
    x = 3 * torch.randn(n, 2, generator=g, dtype=F64)
    return x, t


PROCESSES = [gf.VP(), gf.EDM()]


def per_sample(a, b):
    return (a * b).sum(1, keepdim=True)


@pytest.mark.parametrize("process", PROCESSES, ids=repr)
def test_cfg_and_autoguidance_formula(process):
    cond, uncond, truth = branches(process)
    x, t = points(process)
    c0, u0 = truth(x, t)
    for w in (0.0, 1.0, 3.5):
        got = G.cfg(cond, uncond, w).x0(x, t)
        torch.testing.assert_close(got, u0 + w * (c0 - u0), rtol=1e-10, atol=1e-10)
        # linear: the same guidance in eps
        eps = G.cfg(cond, uncond, w).eps(x, t)
        ce, ue = as_kind(process, c0, x, t, "eps"), as_kind(process, u0, x, t, "eps")
        torch.testing.assert_close(eps, ue + w * (ce - ue), rtol=1e-9, atol=1e-9)
    weak = WEAK.model(process)
    got = G.autoguidance(cond, weak, 2.0).x0(x, t)
    d_good, d_weak = c0, WEAK.posterior_mean(x, t, process)
    torch.testing.assert_close(got, d_weak + 2.0 * (d_good - d_weak), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", [None, "x0", "v", "eps"])
def test_rescaled_cfg_formula(kind):
    process = gf.VP()
    cond, uncond, truth = branches(process)
    x, t = points(process, seed=1)
    c0, u0 = truth(x, t)
    work = kind or "x0"  # cond is an x0 model
    c, u = as_kind(process, c0, x, t, work), as_kind(process, u0, x, t, work)
    w, phi = 5.0, 0.7
    g = u + w * (c - u)
    rescaled = g * c.std(1, keepdim=True, correction=0) / g.std(1, keepdim=True, correction=0)
    want = as_kind(process, phi * rescaled + (1 - phi) * g, x, t, "x0") if work == "x0" else None
    got = G.rescaled_cfg(cond, uncond, w, phi=phi, kind=kind)
    if work == "x0":
        torch.testing.assert_close(got.x0(x, t), want, rtol=1e-10, atol=1e-10)
    else:
        torch.testing.assert_close(got.predict(x, t, work), phi * rescaled + (1 - phi) * g, rtol=1e-9, atol=1e-9)


def apg_formula(c, u, w, eta, r, prev=None, beta=0.0):
    d = c - u
    if prev is not None:
        d = d + beta * prev
    running = d
    if r is not None:
        d = d * torch.clamp(r / d.norm(dim=1, keepdim=True), max=1.0)
    par = per_sample(d, c) / per_sample(c, c) * c
    return c + (w - 1) * (d - par + eta * par), running


@pytest.mark.parametrize("process", PROCESSES, ids=repr)
def test_apg_formula(process):
    cond, uncond, truth = branches(process)
    x, t = points(process, seed=2)
    c0, u0 = truth(x, t)
    for eta, r in ((0.0, None), (0.3, 0.5)):
        got = G.apg(cond, uncond, 4.0, eta=eta, norm_threshold=r).x0(x, t)
        torch.testing.assert_close(got, apg_formula(c0, u0, 4.0, eta, r)[0], rtol=1e-10, atol=1e-10)


def test_apg_momentum_per_level_and_reset():
    """Momentum over the levels t0 > t1 > t2; a repeat of t1 (a stage ending where the next step
    starts) recomputes level 1 from level 0's state; a rise in t resets (a new solve)."""
    process = gf.VP()
    cond, uncond, truth = branches(process)
    model = G.apg(cond, uncond, 3.0, momentum=-0.5, norm_threshold=2.0)
    x, _ = points(process, n=5, seed=3)
    times = [0.8, 0.5, 0.5, 0.2, 0.9]
    prev = None
    running_before = {}
    for k, tv in enumerate(times):
        t = torch.full((5,), tv, dtype=F64)
        xk = x + 0.1 * k
        c0, u0 = truth(xk, t)
        if k == 2:
            base = running_before[1]
        elif k == 4:
            base = None
        else:
            base = prev
        want, running = apg_formula(c0, u0, 3.0, 0.0, 2.0, base, -0.5)
        running_before[k] = base
        prev = running
        torch.testing.assert_close(model.x0(xk, t), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("solver", ["ddim", "heun"])
def test_apg_momentum_in_a_solve(solver):
    """APG with momentum in gf.sample equals a hand-written loop that carries the running
    average once per noise level: DDIM (one level per step) and Heun (its corrector stage at
    t_{i+1} and the next step's evaluation there are one level: the later one counts)."""
    process = gf.VP()
    cond, uncond, truth = branches(process)
    ts = gf.time_grid(process, 5, "logsnr")
    x_T = 2 * torch.randn(4, 2, generator=torch.Generator().manual_seed(12), dtype=F64)
    state = {"prev": None, "before": None, "t": None}

    def x0_apg(x, t):
        c0, u0 = truth(x, t)
        base = state["before"] if state["t"] == float(t[0]) else state["prev"]
        out, running = apg_formula(c0, u0, 3.0, 0.1, 1.5, base, -0.5)
        state.update(before=base, prev=running, t=float(t[0]))
        return out

    def velocity(x, t):
        return as_kind(process, x0_apg(x, t), x, t, "velocity")

    x = x_T.clone()
    for t, t2 in zip(ts[:-1].tolist(), ts[1:].tolist()):
        tb, tb2 = (torch.full((4,), v, dtype=F64) for v in (t, t2))
        if solver == "ddim":
            h = float(process.log_snr(t2) - process.log_snr(t))
            x = float(process.sigma(t2) / process.sigma(t)) * x \
                - float(process.alpha(t2)) * math.expm1(-h) * x0_apg(x, tb)
        else:
            d = velocity(x, tb)
            d2 = velocity(x + (t2 - t) * d, tb2)
            x = x + (t2 - t) / 2 * (d + d2)
    model = G.apg(cond, uncond, 3.0, eta=0.1, norm_threshold=1.5, momentum=-0.5)
    got = gf.sample(model, x_T=x_T, solver=solver, schedule=ts)
    torch.testing.assert_close(got, x, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(gf.sample(model, x_T=x_T, solver=solver, schedule=ts), x, rtol=1e-9, atol=1e-9)


def test_noise_levels_indices():
    levels = G.NoiseLevels()
    seq = [1.0, 0.7, 0.7, 0.4, 0.4, 0.4, 0.1, 1.0, 0.5]
    got = [int(levels.visit(torch.tensor([v], dtype=F64))[0]) for v in seq]
    assert got == [0, 1, 1, 2, 2, 2, 3, 0, 1]


@pytest.mark.parametrize("process", PROCESSES, ids=repr)
def test_cfg_zero_star_formula(process):
    cond, uncond, truth = branches(process)
    x, t = points(process, seed=4)
    c0, u0 = truth(x, t)
    vc, vu = as_kind(process, c0, x, t, "velocity"), as_kind(process, u0, x, t, "velocity")
    s = per_sample(vc, vu) / (per_sample(vu, vu) + 1e-8)
    model = G.cfg_zero_star(cond, uncond, 3.0, zero_init_steps=0)
    torch.testing.assert_close(model.velocity(x, t), s * vu + 3.0 * (vc - s * vu), rtol=1e-9, atol=1e-9)


def test_cfg_zero_star_zero_init_keeps_the_state():
    """Zero velocity at the first level: one Euler step does not move the state; the next does."""
    process = gf.LinearPath()
    cond, uncond, _ = branches(process)
    model = G.cfg_zero_star(cond, uncond, 3.0, zero_init_steps=1)
    x_T = torch.randn(6, 2, generator=torch.Generator().manual_seed(5), dtype=F64)
    one = gf.sample(model, x_T=x_T, solver="euler", steps=1, schedule="uniform")
    torch.testing.assert_close(one, x_T, rtol=0, atol=0)
    two = gf.sample(model, x_T=x_T, solver="euler", steps=3, schedule="uniform")
    assert (two - x_T).abs().max() > 0.1


def test_interval_guides_only_inside():
    process = gf.EDM()
    cond, uncond, truth = branches(process)
    t = torch.tensor([0.05, 0.3, 1.0, 5.0, 40.0], dtype=F64)  # EDM: sigma = t
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(6), dtype=F64)
    c0, u0 = truth(x, t)
    got = G.cfg(cond, uncond, 4.0, interval=(0.28, 5.8)).x0(x, t)
    inside = ((t >= 0.28) & (t <= 5.8))[:, None]
    torch.testing.assert_close(got, torch.where(inside, u0 + 4.0 * (c0 - u0), c0), rtol=1e-10, atol=1e-10)
    # wholly outside: the conditional model alone (one evaluation)
    calls = []
    counted = gf.Model(lambda x, t: calls.append(1) or MIX.posterior_mean(x, t, process), process, "x0")
    out = G.apg(cond, counted, 4.0, interval=(0.28, 5.8)).x0(x[:1], t[:1])
    torch.testing.assert_close(out, c0[:1], rtol=1e-10, atol=1e-10)
    assert calls == []


def ddim_loop(process, ts, x, x0_of, eps_of, eta=0.0, noises=()):
    """The CFG++ DDIM update x' = alpha' x0_g + sigma' r eps_u + c z, by hand in float64."""
    noises = iter(noises)
    for t, t2 in zip(ts[:-1], ts[1:]):
        tb = torch.full((x.shape[0],), float(t), dtype=F64)
        a2, s2 = float(process.alpha(t2)), float(process.sigma(t2))
        h = float(process.log_snr(t2) - process.log_snr(t))
        c = eta * s2 * math.sqrt(-math.expm1(-2 * h))
        r = math.sqrt(1 - eta ** 2 * -math.expm1(-2 * h))
        x = a2 * x0_of(x, tb) + s2 * r * eps_of(x, tb) + (c * next(noises) if eta > 0 else 0.0)
    return x


@pytest.mark.parametrize("process, solver, eta", [(gf.VP(), "ddim", 0.0), (gf.VP(), "ddim", 1.0),
                                                  (gf.VP(), "euler_ancestral", 0.5), (gf.EDM(), "euler", 0.0)],
                         ids=["ddim", "ddim-eta1", "euler_ancestral", "euler-EDM"])
def test_cfg_pp_equals_paper_ddim(process, solver, eta):
    """CFG++ equals Chung et al.'s CFG++ DDIM update (x0 from the guided eps, renoising with the
    unconditional eps) on ddim with eta = 0 and eta = 1 (the SDE case), on euler_ancestral (DDIM
    with churn), and on euler under EDM (ComfyUI's euler_cfg_pp: x' = x0_g + sigma' eps_u)."""
    lam = 0.6
    cond, uncond, truth = branches(process)
    ts = gf.time_grid(process, 6, "logsnr")
    x_T = 2 * torch.randn(5, 2, generator=torch.Generator().manual_seed(7), dtype=F64)
    draws = [torch.randn(5, 2, generator=torch.Generator().manual_seed(10 + k), dtype=F64) for k in range(6)]
    it = iter(draws)
    model = G.cfg_pp(cond, uncond, lam, ts, eta=eta)
    options = {"eta": eta} if solver != "euler" else {}
    got = gf.sample(model, x_T=x_T, solver=solver, schedule=ts, noise_sampler=lambda s, s2: next(it), **options)

    def eps(x, t, which):
        return as_kind(process, truth(x, t)[which], x, t, "eps")

    def x0_guided(x, t):
        e = eps(x, t, 1) + lam * (eps(x, t, 0) - eps(x, t, 1))
        return (x - process.sigma(t)[:, None] * e) / process.alpha(t)[:, None]

    want = ddim_loop(process, ts, x_T.clone(), x0_guided, lambda x, t: eps(x, t, 1), eta, draws)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_cfg_pp_with_sde_samplers():
    process = gf.VP()
    cond, uncond, _ = branches(process)
    ts = gf.time_grid(process, 10, "logsnr")
    model = G.cfg_pp(cond, uncond, 0.8, ts, eta=1.0)
    for solver in ("euler_maruyama", "dpmpp_2m_sde", "ddpm"):
        x = gf.sample(model, (64, 2), solver=solver, schedule=ts, generator=3, dtype=F64)
        assert torch.isfinite(x).all()
        # guidance pulls towards the conditional component's mean (2, 0)
        assert (x.mean(0) - MEANS[0].to(F64)).norm() < (x.mean(0) - MIX.means.T.matmul(MIX.weights)).norm()


def operators(process):
    cond, uncond, _ = branches(process)
    ts = gf.time_grid(process, 4, "logsnr")
    return {
        "rescaled": G.rescaled_cfg(cond, uncond, 3.0),
        "apg": G.apg(cond, uncond, 3.0, eta=0.2, norm_threshold=3.0, momentum=-0.5, interval=(0.1, 50.0)),
        "zero_star": G.cfg_zero_star(cond, uncond, 3.0),
        "autoguidance": G.autoguidance(cond, WEAK.model(process), 2.0),
        "cfg_pp": G.cfg_pp(cond, uncond, 0.7, ts),
    }, ts


@pytest.mark.parametrize("solver", sorted(gf.solvers.SOLVERS))
def test_every_solver(solver):
    """CFG with scale 1 is the conditional model exactly, and every operator samples finitely."""
    process = gf.VP()
    cond, uncond, _ = branches(process)
    adaptive = getattr(gf.solvers.SOLVERS[solver], "adaptive", False)
    opts = {"rtol": 0.1, "atol": 0.1} if adaptive else {}
    ts = gf.time_grid(process, 4, "logsnr")
    kw = dict(shape=(5, 2), solver=solver, schedule=ts, generator=1, dtype=F64, **opts)
    torch.testing.assert_close(gf.sample(G.cfg(cond, uncond, 1.0), **kw), gf.sample(cond, **kw), rtol=0, atol=0)
    for name, model in operators(process)[0].items():
        x = gf.sample(model, **kw)
        assert x.shape == (5, 2) and torch.isfinite(x).all(), name
        if name == "apg" and not adaptive:  # per-solve state: a second call repeats the first
            torch.testing.assert_close(gf.sample(model, **kw), x, rtol=0, atol=0)


def test_guided_is_cfg_of_two_conditionings():
    """gf.guided (one network, two keyword conditionings) equals guidance.cfg of the two models."""
    process = gf.VP()

    def net(x, t, label):
        return (COMP if label == 0 else MIX).posterior_mean(x, t, process)

    x, t = points(process, seed=9)
    shorthand = gf.guided(gf.Model(net, process, "x0"), cond={"label": 0}, uncond={"label": 1}, scale=3.0)
    operator = G.cfg(gf.Model(net, process, "x0", label=0), gf.Model(net, process, "x0", label=1), 3.0)
    torch.testing.assert_close(operator.x0(x, t), shorthand.x0(x, t), rtol=1e-12, atol=1e-12)


def test_per_sample_times():
    """Per-sample start times: each sample's own noise levels (CFG at scale 1 is cond exactly;
    APG's momentum and the interval act per sample)."""
    process = gf.VP()
    cond, uncond, _ = branches(process)
    x_T = torch.randn(4, 2, generator=torch.Generator().manual_seed(11), dtype=F64)
    kw = dict(x_T=x_T, t_start=torch.tensor([1.0, 0.8, 0.6, 0.4], dtype=F64), solver="heun", steps=5)
    torch.testing.assert_close(gf.sample(G.cfg(cond, uncond, 1.0), **kw), gf.sample(cond, **kw), rtol=0, atol=0)
    model = G.apg(cond, uncond, 3.0, momentum=-0.5, interval=(0.5, 10.0))
    first = gf.sample(model, **kw)
    assert torch.isfinite(first).all()
    torch.testing.assert_close(gf.sample(model, **kw), first, rtol=0, atol=0)


def test_float32_and_odd_shapes():
    process = gf.EDM()
    cond, uncond, truth = branches(process)
    x, t = points(process, n=3, seed=8)
    c0, u0 = truth(x, t)
    got = G.cfg(cond, uncond, 2.5).x0(x.float(), t)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.to(F64), u0 + 2.5 * (c0 - u0), rtol=1e-5, atol=1e-5)
    mix3 = gf.GaussianMixture(torch.zeros(2, 6), 1.0)
    m = G.apg(mix3.model(process), gf.GaussianMixture(torch.ones(1, 6), 1.0).model(process), 2.0)
    assert gf.sample(m, (3, 2, 3), solver="heun", steps=3, generator=0).shape == (3, 2, 3)


def test_bad_arguments_name_the_argument():
    process = gf.VP()
    cond, uncond, _ = branches(process)
    ts = gf.time_grid(process, 4, "logsnr")
    cases = [
        (TypeError, "uncond", lambda: G.cfg(cond, "net", 2.0)),
        (TypeError, "cond", lambda: G.cfg(None, uncond, 2.0)),
        (ValueError, "scale", lambda: G.cfg(cond, uncond, float("nan"))),
        (ValueError, "uncond must use", lambda: G.cfg(cond, COMP.model(gf.EDM()), 2.0)),
        (ValueError, "phi", lambda: G.rescaled_cfg(cond, uncond, 2.0, phi=1.5)),
        (ValueError, "kind", lambda: G.rescaled_cfg(cond, uncond, 2.0, kind="noise")),
        (ValueError, "norm_threshold", lambda: G.apg(cond, uncond, 2.0, norm_threshold=0.0)),
        (ValueError, "momentum", lambda: G.apg(cond, uncond, 2.0, momentum=math.inf)),
        (ValueError, "zero_init_steps", lambda: G.cfg_zero_star(cond, uncond, 2.0, zero_init_steps=-1)),
        (ValueError, "interval", lambda: G.cfg(cond, uncond, 2.0, interval=(3.0, 1.0))),
        (TypeError, "interval", lambda: G.cfg(cond, uncond, 2.0, interval=3.0)),
        (ValueError, "grid", lambda: G.cfg_pp(cond, uncond, 0.5, ts.flip(0))),
        (ValueError, "grid", lambda: G.cfg_pp(cond, uncond, 0.5, [1.0, 0.5])),
        (ValueError, "scale", lambda: G.cfg_pp(cond, uncond, -0.5, ts)),
        (ValueError, "eta", lambda: G.cfg_pp(cond, uncond, 0.5, ts, eta=2.0)),
    ]
    mismatched = G.cfg_pp(cond, uncond, 0.5, gf.time_grid(process, 4, "logsnr", t_start=0.5))
    cases.append((ValueError, "grid", lambda: gf.sample(mismatched, (2, 2), schedule=ts)))
    for error, name, build in cases:
        with pytest.raises(error, match=name):
            build()
