"""genflow.cnf: differentiable CNF likelihoods and maximum-likelihood training (FFJORD)."""
import math

import pytest
import torch
from torch import nn

import genflow as gf


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: intra-op threads only add synchronisation (and the machine is shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class ScaleField(nn.Module):
    """``v(x, t) = (1 - s) / (s + (1 - s) t) x``: the flow ``x_t = (s + (1 - s) t) / s x_0`` maps
    N(0, s^2 I) at t = 0 to N(0, I) at t = 1, so ``log p(x) = log N(x; 0, s^2 I)``."""

    def __init__(self, s):
        super().__init__()
        self.s = nn.Parameter(torch.tensor(s, dtype=torch.float64))

    def forward(self, x, t):
        return ((1 - self.s) / (self.s + (1 - self.s) * t))[:, None] * x


def _net(dim, hidden=16, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return gf.CNFNet(dim, hidden=hidden, depth=2).to(dtype)


@pytest.mark.parametrize("method", ["exact", "hutchinson"])
def test_linear_field_gives_the_gaussian_density_and_its_gradient(method):
    # div v = D (1 - s) / sigma_t integrates to D log(1/s); x_1 = x / s:
    # log p = log N(x / s; 0, I) - D log s = -|x|^2 / (2 s^2) - D log s - D/2 log 2 pi,
    # d log p / ds = |x|^2 / s^3 - D / s. (Rademacher probes are exact for v = c(t) x.)
    s, dim = 0.5, 3
    field = ScaleField(s)
    x = torch.randn(16, dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    logp = gf.cnf_log_likelihood(field, x, steps=40, method=method, generator=1)
    sq = x.square().sum(1)
    want = -sq / (2 * s * s) - dim * math.log(s) - 0.5 * dim * math.log(2 * math.pi)
    assert logp.dtype == torch.float64 and logp.shape == (16,)
    torch.testing.assert_close(logp, want, rtol=0, atol=1e-4)
    (grad,) = torch.autograd.grad(logp.sum(), field.s)
    torch.testing.assert_close(grad, (sq / s ** 3 - dim / s).sum(), rtol=1e-4, atol=1e-4)


def test_solvers_converge_at_their_order():
    field, s, dim = ScaleField(0.5), 0.5, 2
    x = torch.randn(8, dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    want = -x.square().sum(1) / (2 * s * s) - dim * math.log(s) - 0.5 * dim * math.log(2 * math.pi)
    with torch.no_grad():
        for solver, order in (("euler", 1), ("heun", 2), ("rk4", 4)):
            errs = [(gf.cnf_log_likelihood(field, x, steps=n, method="exact", solver=solver) - want).abs().max()
                    for n in (8, 16)]
            assert 0.7 * order < math.log2(errs[0] / errs[1]) < 1.3 * order + 0.5, (solver, errs)


def test_hutchinson_is_unbiased():
    net = _net(3)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    reps = 400
    with torch.no_grad():
        exact = gf.cnf_log_likelihood(net, x, steps=4, method="exact")
        for noise in ("rademacher", "gaussian"):
            est = gf.cnf_log_likelihood(net, x.repeat(reps, 1), steps=4, noise=noise, generator=5).reshape(reps, 4)
            se = est.std(0) / math.sqrt(reps)
            assert bool((est.std(0) > 0).all())  # the estimate is stochastic ...
            assert bool(((est.mean(0) - exact).abs() < 3 * se + 1e-12).all()), (noise, est.mean(0), exact, se)


@pytest.mark.parametrize("method", ["exact", "hutchinson"])
def test_gradient_matches_finite_differences(method):
    net = _net(2, hidden=6)
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def loss():
        return -gf.cnf_log_likelihood(net, x, steps=3, method=method, probes=2, generator=7).mean()

    loss().backward()
    h = 1e-6
    for p in (net.layers[0].weight, net.layers[1].bias, net.layers[-1].weight):
        assert p.grad is not None and float(p.grad.abs().max()) > 1e-6
        for idx in ((0, 0), (1, 2)) if p.dim() == 2 else ((0,), (3,)):
            with torch.no_grad():
                p[idx] += h
                up = loss()
                p[idx] -= 2 * h
                down = loss()
                p[idx] += h
            fd = (up - down) / (2 * h)
            assert abs(float(p.grad[idx]) - float(fd)) < 1e-6 * max(1.0, abs(float(fd))), (p.shape, idx)


def test_no_grad_keeps_no_graph_and_float32_works():
    net = _net(2, dtype=torch.float32)
    x = torch.randn(6, 2)
    with torch.no_grad():
        lp = gf.cnf_log_likelihood(net, x, steps=2, generator=0)
    assert not lp.requires_grad and lp.dtype == torch.float64
    assert gf.cnf_log_likelihood(net, x, steps=2, generator=0).requires_grad


def test_matches_gf_log_likelihood():
    # the same network through genflow's evaluation API (LinearPath, prediction="velocity")
    net = _net(2)
    x = torch.randn(10, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    model = gf.Model(net, gf.LinearPath(), prediction="velocity")
    with torch.no_grad():
        mine = gf.cnf_log_likelihood(net, x, steps=6, generator=9)
        theirs = gf.log_likelihood(model, x, solver="rk4", steps=6, generator=9)
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-10)  # same probes, same integrator
        exact = gf.cnf_log_likelihood(net, x, steps=200, method="exact")
        adaptive = gf.log_likelihood(model, x, method="exact", rtol=1e-8, atol=1e-8)
        torch.testing.assert_close(exact, adaptive, rtol=0, atol=1e-6)


def _kl_gap(net, mixture, x):
    """``mean log p_data(x) - log p_net(x)`` over data samples: a Monte Carlo KL(data || net)."""
    with torch.no_grad():
        lp = gf.cnf_log_likelihood(net, x, steps=8, method="exact")
    return -float(lp.mean()), float((mixture.log_prob(x).double() - lp).mean())


def test_training_on_a_2d_mixture_lowers_nll_and_agrees_with_log_likelihood():
    mixture = gf.GaussianMixture.ring(k=8, radius=1.5, std=0.3)
    held_out = mixture.sample(512, generator=torch.Generator().manual_seed(1))
    net = _net(2, hidden=32, dtype=torch.float32)
    nll0, gap0 = _kl_gap(net, mixture, held_out)
    history = gf.train_cnf(net, mixture.sample, steps=100, batch=128, lr=1e-2, solve_steps=4,
                           generator=0, progress=False)
    nll1, gap1 = _kl_gap(net, mixture, held_out)
    print(f"2-D ring: held-out NLL {nll0:.3f} -> {nll1:.3f} nats, KL gap {gap0:.3f} -> {gap1:.3f}")
    assert len(history) == 100 and all(math.isfinite(v) for v in history)
    assert nll1 < nll0 - 0.3 and gap1 < 0.5 * gap0
    # the trained flow through gf.log_likelihood (exact trace, adaptive rk45) in float64
    net = net.double()
    x = held_out[:16].double()
    with torch.no_grad():
        mine = gf.cnf_log_likelihood(net, x, steps=100, method="exact")
    theirs = gf.log_likelihood(gf.Model(net, gf.LinearPath(), prediction="velocity"), x, method="exact",
                               rtol=1e-7, atol=1e-7)
    assert float((mine - theirs).abs().max()) < 1e-3


def test_training_on_iris_improves_nll():
    datasets = pytest.importorskip("sklearn.datasets")
    x = torch.as_tensor(datasets.load_iris().data, dtype=torch.float32)
    x = (x - x.mean(0)) / x.std(0)
    net = _net(4, hidden=32, dtype=torch.float32)

    def nll():
        with torch.no_grad():
            return -float(gf.cnf_log_likelihood(net, x, steps=4, method="exact").mean())

    before = nll()
    gf.train_cnf(net, x, steps=40, batch=64, lr=1e-2, solve_steps=4, generator=0, progress=False)
    after = nll()
    print(f"iris (4-D, standardised): NLL {before:.3f} -> {after:.3f} nats")
    assert after < before - 0.3


class _Interrupt(Exception):
    pass


def test_checkpoint_resume_equals_an_uninterrupted_run(tmp_path):
    data = gf.GaussianMixture.ring(k=4, radius=1.0, std=0.3).sample(200, generator=torch.Generator().manual_seed(0))
    options = dict(batch=32, lr=5e-3, solve_steps=2, generator=11, progress=False)
    reference = _net(2, hidden=8, dtype=torch.float32)
    full = gf.train_cnf(reference, data, steps=60, **options)

    path = tmp_path / "cnf.pt"
    net = _net(2, hidden=8, dtype=torch.float32)
    first = gf.train_cnf(net, data, steps=30, checkpoint=path, checkpoint_every=10, **options)
    assert first == full[:30] and torch.load(path, weights_only=True)["step"] == 30
    resumed = gf.train_cnf(_net(2, hidden=8, seed=99, dtype=torch.float32), data, steps=60,
                           checkpoint=path, checkpoint_every=10, **options)
    assert resumed == full
    state = torch.load(path, weights_only=True)
    assert state["step"] == 60 and state["history"] == full
    for a, b in zip(state["net"].values(), reference.state_dict().values()):
        assert torch.equal(a, b)
    # a finished run is not redone
    assert gf.train_cnf(net, data, steps=60, checkpoint=path, **options) == full

    # a crash mid-run (at step 45) loses at most the steps since the last checkpoint (40)
    path2 = tmp_path / "crash.pt"
    calls = []

    def crashing(n, generator):
        calls.append(n)
        if len(calls) == 46:
            raise _Interrupt
        return data[torch.randint(data.shape[0], (n,), generator=generator)]

    def clean(n, generator):
        return data[torch.randint(data.shape[0], (n,), generator=generator)]

    with pytest.raises(_Interrupt):
        gf.train_cnf(_net(2, hidden=8, dtype=torch.float32), crashing, steps=60, checkpoint=path2,
                     checkpoint_every=10, **options)
    assert torch.load(path2, weights_only=True)["step"] == 40
    again = gf.train_cnf(_net(2, hidden=8, dtype=torch.float32), clean, steps=60, checkpoint=path2,
                         checkpoint_every=10, **options)
    assert again == full


def test_argument_errors():
    net = _net(2)
    x = torch.randn(4, 2, dtype=torch.float64)
    for kwargs, name in ((dict(steps=0), "steps"), (dict(method="trace"), "method"), (dict(probes=0), "probes"),
                         (dict(noise="uniform"), "noise"), (dict(solver="rk45"), "solver")):
        with pytest.raises(ValueError, match=name):
            gf.cnf_log_likelihood(net, x, **kwargs)
    with pytest.raises(ValueError, match="x must"):
        gf.cnf_log_likelihood(net, torch.randn(4))
    with pytest.raises(ValueError, match="net must"):
        gf.cnf_log_likelihood(lambda x, t: x[:, :1], x)
    for kwargs, name in ((dict(steps=0), "steps"), (dict(batch=0), "batch"), (dict(lr=0.0), "lr"),
                         (dict(solve_steps=0), "solve_steps"), (dict(checkpoint_every=0), "checkpoint_every"),
                         (dict(generator="seed"), "generator"), (dict(method="trace"), "method")):
        with pytest.raises(ValueError, match=name):
            gf.train_cnf(net, x, **{"steps": 1, **kwargs})
    with pytest.raises(ValueError, match="data must"):
        gf.train_cnf(net, [1.0, 2.0], steps=1)
    with pytest.raises(ValueError, match="hidden"):
        gf.CNFNet(2, hidden=0)
