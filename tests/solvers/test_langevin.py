"""Langevin-type samplers ``pc`` and ``ald``: they reproduce the mixture, their weak error falls with
the step count, the corrector alone samples q_t, they reduce to their predictor-only twins, and
they run for every process, per-sample grid and option, rejecting bad options."""
import pytest
import torch

import genflow as gf
from genflow.metrics import mmd
from genflow.noise import PhiloxNoise
from genflow.solvers import get
from genflow.solvers.base import point

from .references import data_mmd_spread, mixture

PREDICTORS = ["reverse_diffusion", "euler_maruyama", "ancestral"]
PROCESSES = [gf.VP(), gf.EDM(sigma_max=20.0)]



def _moments(mix):
    w, m, c = mix.weights, mix.means, mix.covs
    mean = (w[:, None] * m).sum(0)
    second = (w[:, None, None] * (c + m[:, :, None] * m[:, None, :])).sum(0)
    return mean, second


def _weak_error(x, mix):
    """max |E f(x) - E_data f| over the first and second moments."""
    mean, second = _moments(mix)
    return max((x.mean(0) - mean).abs().max().item(), (x.T @ x / x.shape[0] - second).abs().max().item())


# ---------------------------------------------------------------- distribution tests

@pytest.mark.parametrize("process", PROCESSES, ids=repr)
@pytest.mark.parametrize("corrector", ["langevin", "none"])
@pytest.mark.parametrize("predictor", PREDICTORS)
def test_pc_reproduces_the_mixture(predictor, corrector, process):
    """2-D data: the corrector uses the batch-mean norms (see test_per_sample_norms_in_2d)."""
    mix, n = mixture(), 1000
    x = gf.sample(mix.model(process), (n, 2), solver="pc", steps=200, generator=5, dtype=torch.float64,
                  predictor=predictor, corrector=corrector, norm="batch")
    data = mix.sample(n, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    assert mmd(x, data) <= data_mmd_spread(mix, n)


@pytest.mark.parametrize("process", PROCESSES + [gf.VE(sigma_max=20.0)], ids=repr)
def test_ald_reproduces_the_mixture(process):
    mix, n = mixture(), 1000
    x = gf.sample(mix.model(process), (n, 2), solver="ald", steps=200, n_steps_each=5, generator=5,
                  dtype=torch.float64)
    data = mix.sample(n, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    assert mmd(x, data) <= data_mmd_spread(mix, n)


@pytest.mark.parametrize("solver, options", [
    ("pc", dict(predictor="reverse_diffusion", norm="batch")),
    ("pc", dict(predictor="euler_maruyama", norm="batch")),
    ("pc", dict(predictor="ancestral", norm="batch")),
    ("pc", dict(predictor="reverse_diffusion", corrector="none")),
    ("ald", dict(n_steps_each=2)),
], ids=lambda v: v if isinstance(v, str) else "-".join(map(str, v.values())))
def test_weak_error_decreases_with_steps(solver, options):
    mix = mixture()
    errors = []
    for steps in (5, 20, 80):
        x = gf.sample(mix.model(gf.VP()), (20000, 2), solver=solver, steps=steps, generator=1, dtype=torch.float64,
                      **options)
        errors.append(_weak_error(x, mix))
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < errors[0] / 2, errors


def _langevin_chain(process, t, x, *, steps, norm, seed=0, snr=0.16):
    """``steps`` corrector steps at the fixed time t (the pc solver's corrector alone)."""
    model = mixture().model(process)
    ts = torch.tensor([process.T, t], dtype=torch.float64)
    solver = get("pc")(model, ts, noise=PhiloxNoise(seed), snr=snr, norm=norm)
    q = point(process, t)
    for _ in range(steps):
        x = solver.correct(x, q)
    assert solver.evaluations == steps
    return x


@pytest.mark.parametrize("process, t", [(gf.VP(), 0.05), (gf.EDM(), 0.3)], ids=["vp", "edm"])
def test_corrector_alone_samples_the_marginal(process, t):
    """Many Langevin steps at a fixed small-noise level move a start spread 2.5x too wide around
    each mode (with the right mode weights) to q_t."""
    mix, n = mixture(), 1000
    q_t = mix.marginal(process, t)
    x = q_t.sample(n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    nearest = q_t.means[torch.cdist(x, q_t.means).argmin(1)]
    start = nearest + 2.5 * (x - nearest)
    target = q_t.sample(n, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    spread = data_mmd_spread(q_t, n)
    assert mmd(start, target) > 5 * spread  # the test can fail
    x = _langevin_chain(process, t, start.clone(), steps=400, norm="batch")
    assert mmd(x, target) <= spread


def test_per_sample_norms_in_high_dimension():
    """norm='sample' (each sample its own step; batch-independent) targets q_t when the norms
    concentrate: a 256-D Gaussian reaches its marginal variance within a few percent."""
    d, n, t = 256, 200, 0.2
    process = gf.VP()
    gauss = gf.GaussianMixture(torch.zeros(1, d, dtype=torch.float64), [0.5])
    model = gauss.model(process)
    var = process.alpha(t) ** 2 * 0.25 + process.sigma(t) ** 2
    x = 3.0 * torch.randn(n, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ts = torch.tensor([1.0, t], dtype=torch.float64)
    solver = get("pc")(model, ts, noise=PhiloxNoise(torch.arange(n)), norm="sample")
    q = point(process, t)
    for _ in range(300):
        x = solver.correct(x, q)
    assert abs(x.var().item() / var - 1) < 0.05
    assert x.mean(1).abs().max().item() < 4 * (var / d) ** 0.5 + 0.05


def test_per_sample_norms_in_2d():
    """Pins why norm='batch' exists: in 2-D the per-sample ||score|| fluctuates so much that the
    state-dependent step inflates the stationary spread (p(x) ||score(x)||^2 in the limit)."""
    process, t, n = gf.VP(), 0.05, 1000
    q_t = mixture().marginal(process, t)
    start = q_t.sample(n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    target = q_t.sample(n, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    x = _langevin_chain(process, t, start.clone(), steps=200, norm="sample")
    assert mmd(x, target) > 3 * data_mmd_spread(q_t, n)


# ---------------------------------------------------------------- exact reductions and NFE

def test_pc_without_corrector_equals_its_predictor_solver():
    model = mixture().model(gf.VP())
    kwargs = dict(steps=30, generator=11, dtype=torch.float64)
    a = gf.sample(model, (64, 2), solver="pc", predictor="ancestral", corrector="none", **kwargs)
    torch.testing.assert_close(a, gf.sample(model, (64, 2), solver="ddpm", **kwargs), rtol=1e-12, atol=1e-12)
    b = gf.sample(model, (64, 2), solver="pc", predictor="euler_maruyama", corrector="none", **kwargs)
    torch.testing.assert_close(b, gf.sample(model, (64, 2), solver="euler_maruyama", **kwargs), rtol=1e-12,
                               atol=1e-12)


def test_reverse_diffusion_is_smld_and_ddpm_discretisation():
    """VE: x' = x + (sigma^2 - sigma'^2) score + sqrt(sigma^2 - sigma'^2) z (Song et al. eq. 47)."""
    process = gf.VE(sigma_max=20.0)
    model = mixture().model(process)
    ts = torch.tensor([1.0, 0.7], dtype=torch.float64)
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    z = torch.randn(16, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = gf.sample(model, x_T=x, schedule=ts, solver="pc", corrector="none", noise_sampler=lambda s, s2: z)
    s, s2 = process.sigma(1.0), process.sigma(0.7)
    expect = x + (s ** 2 - s2 ** 2) * model.score(x, 1.0) + (s ** 2 - s2 ** 2) ** 0.5 * z
    torch.testing.assert_close(got, expect, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("solver, options, per_step", [
    ("pc", {}, 2), ("pc", dict(n_corrector=3), 4), ("pc", dict(corrector="none"), 1),
    ("ald", {}, 5), ("ald", dict(n_steps_each=3), 3),
])
def test_nfe(solver, options, per_step):
    seen = []
    gf.sample(mixture().model(gf.VP()), (8, 2), solver=solver, steps=7, generator=0,
              callback=lambda info: seen.append(info["nfe"]), **options)
    assert seen[-1] == 7 * per_step == get(solver).nfe(7, **options)


@pytest.mark.parametrize("solver, options", [("pc", {"norm": "sample"}), ("pc", dict(predictor="ancestral", norm="sample")), ("ald", {})])
def test_per_sample_start_times_equal_separate_solves(solver, options):
    """Per-sample grids, and (norm='sample') a sample never depends on its batch."""
    model = mixture().model(gf.VP())
    t_start = torch.tensor([1.0, 0.6, 0.3, 0.15])
    x_T = torch.randn(4, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    seeds = [3, 5, 7, 9]
    batch = gf.sample(model, x_T=x_T, solver=solver, steps=12, t_start=t_start, generator=seeds, **options)
    assert torch.isfinite(batch).all()
    for b in range(4):
        alone = gf.sample(model, x_T=x_T[b:b + 1], solver=solver, steps=12, t_start=float(t_start[b]),
                          generator=[seeds[b]], **options)
        torch.testing.assert_close(batch[b:b + 1], alone, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- every process, options, errors

ALL_PROCESSES = [gf.VP(), gf.SubVP(), gf.VE(), gf.CosineVP(), gf.EDM(), gf.LinearPath(),
                 gf.DiscreteVP.linear(1000)]


@pytest.mark.parametrize("process", ALL_PROCESSES, ids=lambda p: type(p).__name__)
@pytest.mark.parametrize("solver, options", [("pc", dict(predictor=p)) for p in PREDICTORS] + [("ald", {})])
def test_every_process(process, solver, options):
    model = mixture().model(process)
    if isinstance(process, gf.LinearPath) and options.get("predictor") == "euler_maruyama":
        with pytest.raises(ValueError, match="singular"):  # f and g2 are infinite at t = T = 1
            gf.sample(model, (16, 2), solver=solver, steps=10, generator=0, **options)
        options = dict(options, t_start=0.999)
    if isinstance(process, gf.LinearPath) and solver == "ald":  # sigma(0) = 0: ald needs a last level > 0
        options = dict(options, t_end=1e-3)
    x = gf.sample(model, (16, 2), solver=solver, steps=10, generator=0, dtype=torch.float64, **options)
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("per_sample", [False, True])
def test_pc_ending_at_sigma_zero_skips_the_corrector(per_sample):
    model = mixture().model(gf.LinearPath())
    t_end = torch.tensor([0.0, 0.0, 0.01, 0.0]) if per_sample else 0.0
    x = gf.sample(model, (4, 2), solver="pc", steps=10, t_end=t_end, generator=[1, 2, 3, 4], dtype=torch.float64)
    assert torch.isfinite(x).all()
    with pytest.raises(ValueError, match="sigma\\(t_end\\) > 0"):
        gf.sample(model, (4, 2), solver="ald", steps=10, t_end=t_end, generator=0)


def test_thresholding_applies():
    model = mixture().model(gf.VP())
    kwargs = dict(steps=10, generator=0, dtype=torch.float64)
    plain = gf.sample(model, (32, 2), solver="pc", **kwargs)
    clipped = gf.sample(model, (32, 2), solver="pc", thresholding=True, sample_max_value=1.0, **kwargs)
    assert torch.isfinite(clipped).all() and not torch.allclose(plain, clipped)


def test_listed_as_stochastic():
    info = {s.name: s for s in gf.solvers.available(steps=10)}
    assert info["pc"].stochastic and info["pc"].nfe == 20
    assert info["ald"].stochastic and info["ald"].nfe == 50
    assert get("pc").default_eta is None and get("ald").default_eta is None


@pytest.mark.parametrize("solver, options, match", [
    ("pc", dict(predictor="heun"), "predictor must be one of"),
    ("pc", dict(corrector="hmc"), "corrector must be one of"),
    ("pc", dict(snr=0.0), "snr must be a positive"),
    ("pc", dict(snr=float("nan")), "snr must be a positive"),
    ("pc", dict(n_corrector=0), "n_corrector must be an integer >= 1"),
    ("pc", dict(n_corrector=1.5), "n_corrector must be an integer"),
    ("pc", dict(norm="global"), "norm must be 'sample' or 'batch'"),
    ("pc", dict(eta=0.5), "takes no eta"),
    ("ald", dict(n_steps_each=0), "n_steps_each must be an integer >= 1"),
    ("ald", dict(step_lr=-1e-5), "step_lr must be a positive"),
    ("ald", dict(eta=1.0), "takes no eta"),
])
def test_bad_options_raise(solver, options, match):
    with pytest.raises(ValueError, match=match):
        gf.sample(mixture().model(gf.VP()), (4, 2), solver=solver, steps=5, generator=0, **options)
