"""Fuzz genflow's public functions: processes, time grids, models and conversions, Gaussian
mixtures, gf.sample (every solver, checked against backend="torch"), likelihoods, kernel flows,
metrics and the training data loaders, with random valid and invalid arguments."""
import math

import torch
from hypothesis import given
from hypothesis import strategies as st

import genflow as gf
from genflow.train import data as gdata
from tests.fuzz.strategies import BAD_SCALARS, absmax, close, finite_floats, fuzz, invalid, valid

SOLVERS = [info.name for info in gf.solvers.available()]
PROCESSES = {
    "VP": lambda: gf.VP(), "SubVP": lambda: gf.SubVP(), "VE": lambda: gf.VE(), "CosineVP": lambda: gf.CosineVP(),
    "EDM": lambda: gf.EDM(), "LinearPath": lambda: gf.LinearPath(t_min=1e-3), "DiscreteVP": lambda: gf.DiscreteVP.linear(100),
}
PARAMS = {"VP": ("beta_min", "beta_max", "T", "t_min"), "SubVP": ("beta_min", "beta_max", "T", "t_min"),
          "VE": ("sigma_min", "sigma_max", "T", "t_min"), "CosineVP": ("s", "T", "t_min"),
          "EDM": ("sigma_min", "sigma_max", "sigma_data"), "LinearPath": ("sigma_min", "T", "t_min")}
process_names = st.sampled_from(sorted(PROCESSES))


@st.composite
def times(draw, process):
    """A time in [0, T]: endpoints, t_min, or uniform."""
    T = process.T
    return draw(st.one_of(st.sampled_from([0.0, T, process.t_min, 0.5 * T]), finite_floats(0.0, T)))


@fuzz(800)
@given(name=process_names, data=st.data())
def test_process_coefficients(name, data):
    p = PROCESSES[name]()
    t = data.draw(times(p))
    if name == "EDM" and t == 0.0:
        t = p.t_min
    a, s, lam = valid(p.alpha, t), valid(p.sigma, t), valid(p.log_snr, t)
    assert isinstance(a, float) and isinstance(s, float) and isinstance(lam, float)
    assert a >= 0 and s >= 0 and not math.isnan(lam)
    if a > 0 and s > 0:
        assert math.isclose(lam, math.log(a) - math.log(s), rel_tol=1e-9, abs_tol=1e-9)
    ts = torch.tensor([t, p.t_min, p.T], dtype=torch.float64)
    for fn in (p.f, p.g2, p.dalpha, p.dsigma):
        out = valid(fn, ts)
        assert out.shape == ts.shape and out.dtype == torch.float64
    back = valid(p.t_from_log_snr, lam)
    if math.isfinite(lam) and abs(lam) < 15 and name != "DiscreteVP":
        assert math.isclose(back, t, rel_tol=1e-6, abs_tol=1e-6), (name, t, lam, back)
    t32 = valid(p.alpha, torch.full((3, 2), t, dtype=torch.float32))
    assert t32.dtype == torch.float32 and t32.shape == (3, 2)


@fuzz(600)
@given(name=st.sampled_from(sorted(PARAMS)), bad=st.sampled_from(BAD_SCALARS + (-1.0,)), data=st.data())
def test_process_rejects_invalid(name, bad, data):
    param = data.draw(st.sampled_from(PARAMS[name]))
    if bad == -1.0 and param in ("beta_min",):
        bad = -0.5
    if bad == -1.0 and name == "VE" and param == "sigma_max":
        bad = 0.001
    invalid(param, getattr(gf, name), **{param: bad})
    invalid("t", PROCESSES[name]().alpha, "0.5")


@fuzz(600)
@given(name=process_names, steps=st.integers(1, 60), schedule=st.sampled_from(gf.schedules.SCHEDULES),
       data=st.data())
def test_time_grid(name, steps, schedule, data):
    p = PROCESSES[name]()
    lo = data.draw(finite_floats(p.t_min, p.T))
    hi = data.draw(finite_floats(p.t_min, p.T))
    if lo == hi:
        hi, lo = p.T, p.t_min
    t_start, t_end = max(lo, hi), min(lo, hi)
    rule = gf.schedules.get_schedule(schedule)
    options = {"rho": data.draw(finite_floats(0.5, 10.0))} if "rho" in rule.options else {}
    try:
        ts = valid(gf.time_grid, p, steps, schedule, t_start, t_end, **options)
    except ValueError as err:  # an interval float64 cannot split into `steps` distinct times, or a
        # table schedule whose knots in the interval collapse (README, Schedules)
        collapsed = "gives no strictly decreasing grid" in str(err)
        assert collapsed or ("t_start" in str(err) and t_start - t_end <= 4 * steps * math.ulp(t_start)), str(err)
        return
    # schedules whose clamped or rounded times can coincide drop the repeats (README, Schedules)
    # ComfyUI's ddim_uniform takes the knots 1 + k (N // steps): it may take more steps than asked
    # and start below t_start (README, Schedules)
    # and on a DiscreteVP the discrete schedules round every time, endpoints included, to its
    # training timesteps (half a timestep at most)
    rounded = rule.discrete_default and name == "DiscreteVP"
    tol = 0.5 * (p.T - p.t_min) / (p.num_train_timesteps - 1) + 1e-12 if rounded else 0.0
    if schedule == "ddim_uniform":
        assert float(ts[0]) <= t_start + tol
    else:
        assert ts.shape[0] <= steps + 1 if rule.repeats == "drop" else ts.shape == (steps + 1,)
        assert abs(float(ts[0]) - t_start) <= tol
    assert ts.dtype == torch.float64 and abs(float(ts[-1]) - t_end) <= tol
    assert bool(torch.isfinite(ts).all())
    assert bool((ts[1:] < ts[:-1]).all()), f"grid not strictly decreasing: {ts.tolist()}"


@fuzz(600)
@given(bad=st.integers(0, 8), name=process_names)
def test_time_grid_rejects_invalid(bad, name):
    p = PROCESSES[name]()
    g = gf.time_grid
    if bad == 0:
        invalid("steps", g, p, 0)
    elif bad == 1:
        invalid("steps", g, p, 2.5)
    elif bad == 2:
        err = invalid("schedule", g, p, 10, "karas")
        assert "did you mean" in str(err)
    elif bad == 3:
        invalid(("t_end", "t_start"), g, p, 10, "uniform", p.t_min, p.T)
    elif bad == 4:
        invalid(("t_end", "t_start"), g, p, 10, "uniform", float("nan"))
    elif bad == 5:
        invalid("rho", g, p, 10, "karras", rho=-1.0)
    elif bad == 6:
        invalid("times", g, p, 10, "uniform", p.T * 2)
    elif bad == 7:
        invalid("grid", gf.schedules.validate_grid, [p.t_min, p.T], p)
    else:
        invalid("steps", g, p, True)


@fuzz(800)
@given(src=st.sampled_from(gf.KINDS), dst=st.sampled_from(gf.KINDS), name=process_names, data=st.data())
def test_model_conversions_are_consistent(src, dst, name, data):
    p = PROCESSES[name]()
    t = data.draw(finite_floats(max(p.t_min, 0.05 * p.T), 0.95 * p.T))
    alpha, sigma, da, ds = p.alpha(t), p.sigma(t), p.dalpha(t), p.dsigma(t)
    a, b = valid(gf.conversion, src, dst, alpha, sigma, da, ds)
    a2, b2 = valid(gf.conversion, dst, src, alpha, sigma, da, ds)
    if abs(b) > 1e-12 and abs(b2) > 1e-12:  # round trip src -> dst -> src is the identity
        assert math.isclose(a2 + b2 * a, 0.0, abs_tol=1e-6 * (1 + abs(a2) + abs(b2 * a)))
        assert math.isclose(b2 * b, 1.0, rel_tol=1e-6)
    x0 = torch.randn(4, 3, dtype=torch.float64)
    eps = torch.randn(4, 3, dtype=torch.float64)
    xt = alpha * x0 + sigma * eps
    outs = {"eps": eps, "x0": x0, "score": -eps / sigma, "v": alpha * eps - sigma * x0, "velocity": da * x0 + ds * eps}
    m = gf.Model(lambda x, tt: outs[src], p, prediction=src)
    got = valid(m.predict, xt, t, dst)
    close(got, outs[dst], 1e-6, 1e-6 * float(outs[dst].abs().max() + xt.abs().max() / sigma), f"{src}->{dst}")


@fuzz(400)
@given(bad=st.integers(0, 5), kind=st.sampled_from(gf.KINDS))
def test_model_rejects_invalid(bad, kind):
    p = gf.VP()
    if bad == 0:
        err = invalid("prediction", gf.Model, lambda x, t: x, p, prediction=kind + "_")
        assert "did you mean" in str(err)
    elif bad == 1:
        invalid("net", gf.Model, None, p)
    elif bad == 2:
        invalid("time", gf.Model, lambda x, t: x, p, time="backwards")
    elif bad == 3:
        invalid("kind", gf.conversion, kind, "noise", 0.5, 0.5)
    elif bad == 4:
        invalid("net", gf.Model(lambda x, t: x[:1], p).eps, torch.zeros(3, 2), 0.5)
    else:
        invalid("t", gf.Model(lambda x, t: x, p).eps, torch.zeros(3, 2), torch.zeros(2))


@st.composite
def mixtures(draw, dim=None):
    k = draw(st.integers(1, 4))
    d = dim or draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(k, d, generator=g, dtype=torch.float64) * draw(st.sampled_from([0.1, 1.0, 5.0]))
    stds = torch.rand(k, generator=g, dtype=torch.float64) + draw(st.sampled_from([0.05, 0.5]))
    weights = torch.rand(k, generator=g, dtype=torch.float64) + 0.1
    return gf.GaussianMixture(means, stds, weights)


@fuzz(250)
@given(gm=mixtures(), n=st.sampled_from([0, 1, 3, 8]), name=process_names, data=st.data())
def test_mixture(gm, n, name, data):
    x = valid(gm.sample, n, generator=torch.Generator().manual_seed(n))
    assert x.shape == (n, gm.dim) and bool(torch.isfinite(x).all())
    lp = valid(gm.log_prob, x.double())
    assert lp.shape == (n,) and bool(torch.isfinite(lp).all())
    # the mixture density by its definition
    diff = x.double()[:, None, :] - gm.means[None]
    var = torch.diagonal(gm.covs, dim1=1, dim2=2)[None]
    comp = -0.5 * ((diff ** 2 / var) + torch.log(2 * math.pi * var)).sum(-1)
    close(lp, torch.logsumexp(comp + gm.weights.log(), 1), 1e-9, 1e-9, "log_prob")
    p = PROCESSES[name]()
    t = data.draw(finite_floats(p.t_min, p.T))
    for fn in (gm.score, gm.posterior_mean):
        out = valid(fn, x, t, p)
        assert out.shape == x.shape and bool(torch.isfinite(out).all())
    close(valid(gm.log_prob_t, x, t, p), valid(gm.marginal(p, t).log_prob, x), 1e-6, 1e-6, "log_prob_t")


@fuzz(500)
@given(bad=st.integers(0, 7), value=st.sampled_from(BAD_SCALARS[:3]))
def test_mixture_rejects_invalid(bad, value):
    G = gf.GaussianMixture
    if bad == 0:
        invalid("means", G, [[0.0, value]])
    elif bad == 1:
        invalid("stds", G, [[0.0]], [value])
    elif bad == 2:
        invalid("stds", G, [[0.0]], [-1.0])
    elif bad == 3:
        invalid("weights", G, [[0.0], [1.0]], 1.0, [1.0])
    elif bad == 4:
        invalid("means", G, "abc")
    elif bad == 5:
        invalid("n", G([[0.0]]).sample, -1)
    elif bad == 6:
        invalid("x", G([[0.0, 1.0]]).log_prob, torch.zeros(3, 3))
    else:
        invalid("t", G([[0.0]]).score, torch.zeros(3, 1), value, gf.VP())


@st.composite
def sample_case(draw):
    solver = draw(st.sampled_from(SOLVERS))
    name = draw(process_names)
    p = PROCESSES[name]()
    gm = draw(mixtures(dim=2))
    kw = {"solver": solver, "shape": (draw(st.sampled_from([0, 1, 3])), 2), "dtype": torch.float64}
    if solver in ("rk45", "sde_adaptive"):
        kw.update(rtol=1e-2, atol=1e-2)
    else:
        kw["steps"] = draw(st.integers(1, 6))
        kw["schedule"] = draw(st.sampled_from(gf.schedules.SCHEDULES))
    if draw(st.booleans()):
        kw["t_start"] = draw(finite_floats(0.5 * p.T, p.T))
        kw["t_end"] = draw(finite_floats(p.t_min, 0.4 * p.T))
    if draw(st.booleans()):
        kw["eta"] = draw(st.sampled_from([0.0, 0.5, 1.0]))
    gen = draw(st.sampled_from(["int", "per_sample", "generator", "none"]))
    b = kw["shape"][0]
    kw["generator"] = {"int": 7, "per_sample": list(range(b)), "generator": None, "none": None}[gen]
    return gm, p, kw, gen


def _sample(gm, p, kw, gen, backend):
    kw = dict(kw, backend=backend)
    if gen == "generator":
        kw["generator"] = torch.Generator().manual_seed(3)
    return valid(gf.sample, gm.model(p), **kw)


@fuzz(120)
@given(sample_case())
def test_sample_every_solver(case):
    gm, p, kw, gen = case
    try:
        x = _sample(gm, p, kw, gen, "auto")
    except ValueError as err:  # a solver may refuse an eta or a schedule: with a message naming it
        assert str(err).strip()
        return
    assert x.shape == kw["shape"] and x.dtype == torch.float64
    assert bool(torch.isfinite(x).all())
    # same seed: the compiled kernels agree with the pure-PyTorch path (not for sde_adaptive, whose
    # accept/reject decisions on a noisy error estimate amplify rounding differences)
    if gen != "none" and kw["solver"] != "sde_adaptive":
        ref = _sample(gm, p, kw, gen, "torch")
        close(x, ref, 1e-6, 1e-6 * absmax(ref), f"gf.sample {kw['solver']} auto vs torch")


@fuzz(300)
@given(bad=st.integers(0, 8), solver=st.sampled_from(SOLVERS))
def test_sample_rejects_invalid(bad, solver):
    m = gf.GaussianMixture([[0.0, 0.0]]).model(gf.VP())
    s = gf.sample
    if bad == 0:
        err = invalid("solver", s, m, (2, 2), solver=solver + "x")
        assert "did you mean" in str(err)
    elif bad == 1:
        invalid("steps", s, m, (2, 2), solver=solver, steps=0)
    elif bad == 2:
        invalid("shape", s, m, (-1, 2), solver=solver)
    elif bad == 3:
        invalid("model", s, lambda x, t: x, (2, 2), solver=solver)
    elif bad == 4:
        invalid("x_T", s, m, solver=solver, x_T=torch.full((2, 2), float("nan")))
    elif bad == 5:
        invalid("schedule", s, m, (2, 2), solver=solver, schedule="logsnrr")
    elif bad == 6:
        invalid("generator", s, m, (2, 2), solver=solver, generator=-3)
    elif bad == 7:
        invalid("backend", s, m, (2, 2), solver=solver, backend="tpu")
    else:
        invalid(("t_end", "t_start"), s, m, (2, 2), solver=solver, t_start=0.1, t_end=0.5)


@fuzz(4)
@given(gm=mixtures(dim=2), name=st.sampled_from(["VP", "LinearPath", "EDM"]), b=st.sampled_from([1, 3]))
def test_log_likelihood_exact_matches_mixture(gm, name, b):
    p = PROCESSES[name]()
    x = gm.marginal(p, p.t_min).sample(b, generator=torch.Generator().manual_seed(b), dtype=torch.float64)
    ll, info = valid(gf.log_likelihood, gm.model(p), x, method="exact", rtol=1e-6, atol=1e-6, return_info=True)
    # the solve ends at x_T under the process's prior; swap it for the exact marginal q_T
    exact_prior = gm.log_prob_t(info["x_T"].double(), p.T, p)
    close(ll - info["prior_logp"] + exact_prior, gm.log_prob_t(x, p.t_min, p), 0, 5e-3, "log_likelihood vs mixture")


@fuzz(150)
@given(bad=st.integers(0, 7))
def test_likelihood_rejects_invalid(bad):
    m = gf.GaussianMixture([[0.0, 0.0]]).model(gf.VP())
    x = torch.zeros(2, 2)
    ll = gf.log_likelihood
    if bad == 0:
        invalid("method", ll, m, x, method="exakt")
    elif bad == 1:
        invalid("probes", ll, m, x, probes=0)
    elif bad == 2:
        invalid("noise", ll, m, x, noise="gauss")
    elif bad == 3:
        invalid("x", ll, m, torch.full((2, 2), float("nan")))
    elif bad == 4:
        invalid("rtol", ll, m, x, rtol=-1.0)
    elif bad == 5:
        invalid("x", ll, m, torch.zeros(2, 3))
    elif bad == 6:
        invalid("levels", gf.bits_per_dim, m, torch.zeros(2, 2, dtype=torch.uint8), levels=1)
    else:
        invalid("model", ll, None, x)


@fuzz(40)
@given(n=st.sampled_from([1, 2, 5]), m=st.sampled_from([1, 3, 6]), d=st.sampled_from([1, 2]),
       steps=st.integers(1, 3), step_size=finite_floats(1e-3, 0.5), sigma=finite_floats(0.2, 3.0))
def test_kernel_flows(n, m, d, steps, step_size, sigma):
    g = torch.Generator().manual_seed(n * 7 + m)
    src, tgt = torch.randn(n, d, generator=g), torch.randn(m, d, generator=g) + 1.0
    for fn, kw in ((gf.sd_flow, {"sigma": sigma}), (gf.mmd_flow, {"sigma": sigma})):
        out = valid(fn, src, tgt, steps=steps, step_size=step_size, generator=0, **kw)
        assert out.shape == src.shape and bool(torch.isfinite(out).all())
    if n < 2:  # SVGD's median bandwidth needs two particles
        invalid("particles", gf.svgd, src, lambda y: -y, steps=steps, step_size=step_size)
        return
    out = valid(gf.svgd, src, lambda y: -y, steps=steps, step_size=step_size)
    assert out.shape == src.shape and bool(torch.isfinite(out).all())


@fuzz(300)
@given(bad=st.integers(0, 9), fn=st.sampled_from(["sd_flow", "mmd_flow"]))
def test_kernel_flows_reject_invalid(bad, fn):
    f = getattr(gf, fn)
    x = torch.randn(4, 2)
    kw = {"sigma": 1.0, "steps": 2, "step_size": 0.1}
    if bad == 0:
        invalid("sigma", f, x, x, **dict(kw, sigma=-1.0))
    elif bad == 1:
        invalid("steps", f, x, x, **dict(kw, steps=0))
    elif bad == 2:
        invalid("step_size", f, x, x, **dict(kw, step_size=float("nan")))
    elif bad == 3:
        invalid("target", f, x, torch.randn(4, 3), **kw)
    elif bad == 4:
        invalid("source", f, x.int(), x, **kw)
    elif bad == 5:
        invalid("source", f, torch.full((4, 2), float("inf")), x, **kw)
    elif bad == 6:
        invalid("steps", gf.svgd, x, lambda y: -y, steps=-1, step_size=0.1)
    elif bad == 7:
        invalid("bandwidth", gf.svgd, x, lambda y: -y, steps=1, step_size=0.1, bandwidth="mean")
    elif bad == 8:
        invalid("step_size", f, x, x, **dict(kw, step_size=[0.1]))
    else:
        invalid("target", f, x, torch.full((4, 2), float("nan")), **kw)


@fuzz(300)
@given(bad=st.integers(0, 6), value=st.sampled_from([float("nan"), float("inf"), -1.0]))
def test_noise_sources_reject_invalid(bad, value):
    from genflow.noise import BrownianTreeNoise, noise_source
    if bad == 0:
        err = invalid("noise", noise_source, 0, 2, noise="brownian_tre", sigma_max=1.0)
        assert "did you mean" in str(err)
    elif bad == 1:
        invalid("sigma_max", BrownianTreeNoise, 0, value)
    elif bad == 2:
        invalid("tol", BrownianTreeNoise, 0, 1.0, tol=value)
    elif bad == 3:
        invalid("generator", noise_source, [1.5, 2.0], 2)
    elif bad == 4:
        invalid("generator", noise_source, [1, -2], 2)
    elif bad == 5:
        invalid("generator", noise_source, "seed", 2)
    else:
        invalid("sigma", BrownianTreeNoise(0, 1.0).value, torch.zeros(2, 3), 2.0)


@fuzz(200)
@given(seed=st.integers(0, 2**63 - 1), batch=st.integers(1, 5), d=st.sampled_from([1, 3]),
       s=st.lists(finite_floats(0.0, 1.0), min_size=2, max_size=2))
def test_brownian_tree_increments_add_up(seed, batch, d, s):
    from genflow.noise import BrownianTreeNoise
    tree = BrownianTreeNoise(seed, 1.0, tol=1e-4)
    like = torch.zeros(batch, d, dtype=torch.float64)
    w0, w1 = valid(tree.value, like, s[0]), valid(tree.value, like, s[1])
    inc = valid(tree.increment, like, s[0], s[1])
    assert bool(torch.isfinite(inc).all())
    close(inc, w1 - w0, 1e-9, 1e-9, "W(s1) - W(s0)")


@fuzz(250)
@given(n=st.integers(2, 12), m=st.integers(2, 12), d=st.sampled_from([1, 2, 3]), seed=st.integers(0, 2**31 - 1))
def test_metrics(n, m, d, seed):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, d, generator=g), torch.randn(m, d, generator=g)
    v = valid(gf.metrics.mmd, x, y)
    assert math.isfinite(v) and math.isclose(v, valid(gf.metrics.mmd, y, x), rel_tol=1e-9, abs_tol=1e-12)
    assert valid(gf.metrics.sliced_wasserstein, x, x, projections=8, generator=seed) < 1e-7
    sw = valid(gf.metrics.sliced_wasserstein, x, y, projections=8, generator=seed)
    assert math.isfinite(sw) and sw >= 0
    if d == 2:
        assert abs(valid(gf.metrics.kl_kde_grid, x, x, grid=8)) < 1e-9
        assert valid(gf.metrics.kl_kde_grid, x, y, grid=8) >= -1e-9


@fuzz(400)
@given(bad=st.integers(0, 11), value=st.sampled_from([float("nan"), float("inf")]))
def test_metrics_reject_invalid(bad, value):
    x = torch.randn(5, 2)
    xn = x.clone()
    xn[1, 0] = value
    M = gf.metrics
    if bad == 0:
        invalid("x", M.mmd, xn, x)
    elif bad == 1:
        invalid("y", M.mmd, x, xn)
    elif bad == 2:
        invalid("bandwidths", M.mmd, x, x, bandwidths=(value,))
    elif bad == 3:
        invalid("x", M.sliced_wasserstein, xn, x)
    elif bad == 4:
        invalid("projections", M.sliced_wasserstein, x, x, projections=0)
    elif bad == 5:
        invalid("samples", M.kl_kde_grid, x, xn)
    elif bad == 6:
        invalid("bandwidth", M.kl_kde_grid, x, x, bandwidth=value)
    elif bad == 7:
        invalid("eps", M.kl_kde_grid, x, x, eps=value)
    elif bad == 8:
        invalid("x", M.mmd, x, torch.randn(5, 3))
    elif bad == 9:
        invalid("x", M.sliced_wasserstein, torch.randn(5), x)
    elif bad == 10:
        invalid("generator", M.sliced_wasserstein, x, x, generator="seed")
    else:
        invalid("x", M.kl_to_density, xn, lambda p: p.sum(1))


@fuzz(300)
@given(bad=st.integers(0, 6), name=st.sampled_from(gdata.available_datasets()))
def test_data_loaders_reject_invalid(bad, name):
    if bad == 0:
        err = invalid("data set", gdata.load_dataset, name + "z")
        assert "did you mean" in str(err)
    elif bad == 1:
        invalid("n", gdata.load_dataset, name, n=-1)
    elif bad == 2:
        invalid("seed", gdata.load_dataset, name, seed=True)
    elif bad == 3:
        invalid("n", gdata.toy_sample, "moons", -2)
    elif bad == 4:
        invalid("n", gdata.load_dataset, name, n=0)
    elif bad == 5:
        invalid("n", gdata.toy_sample, "moons", 2.5)
    else:
        invalid("data set", gdata.toy_sample, "moonz", 3)


@fuzz(100)
@given(name=st.sampled_from([n for n in gdata.available_datasets() if n != "digits"]), n=st.integers(0, 17))
def test_toy_samples(name, n):
    x, labels = valid(gdata.toy_sample, name, n, generator=torch.Generator().manual_seed(n))
    assert x.shape == (n, 2) and bool(torch.isfinite(x).all())
    assert labels is None or labels.shape == (n,)
