"""Training objectives (genflow/train/objectives.py) against closed forms and brute force."""
import itertools
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import genflow as gf
from genflow.train import objectives as obj
from genflow.train.families import make_family

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    """Small tensors run fastest (and least disturbed by a busy machine) on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


class _Affine(torch.nn.Module):
    """A fixed, non-trivial network ``tanh(x W + t c)`` for formula checks."""

    def __init__(self, dim=2, dtype=F64):
        super().__init__()
        g = _gen(7)
        self.w = torch.nn.Parameter(torch.randn(dim, dim, generator=g, dtype=dtype))
        self.c = torch.nn.Parameter(torch.randn(dim, generator=g, dtype=dtype))

    def forward(self, x, t, **cond):
        return torch.tanh(x @ self.w + t.to(x.dtype)[:, None] * self.c)


def _fixed_inputs(n=5, dim=2):
    g = _gen(3)
    x0 = torch.randn(n, dim, generator=g, dtype=F64)
    eps = torch.randn(n, dim, generator=g, dtype=F64)
    t = torch.rand(n, generator=g, dtype=F64) * 0.9 + 0.05
    return x0, eps, t


# ---------------------------------------------------------------- DSM

@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_dsm_loss_matches_hand_formula(prediction):
    process = gf.VP()
    net = _Affine()
    x0, eps, t = _fixed_inputs()
    a, s = process.alpha(t)[:, None], process.sigma(t)[:, None]
    x_t = a * x0 + s * eps
    target = {"eps": eps, "x0": x0, "v": a * eps - s * x0}[prediction]
    expected = (net(x_t, t) - target).square().mean(1)
    got = obj.dsm_loss(gf.Model(net, process, prediction), x0, t, eps)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # min-SNR (Hang et al. 2023): weights min(SNR, 5)/SNR (eps), min(SNR, 5) (x0), min(SNR, 5)/(SNR + 1) (v)
    snr = (a / s).square()[:, 0]
    weight = {"eps": snr.clamp(max=5) / snr, "x0": snr.clamp(max=5), "v": snr.clamp(max=5) / (snr + 1)}[prediction]
    got = obj.dsm_loss(gf.Model(net, process, prediction), x0, t, eps, weighting="min_snr")
    torch.testing.assert_close(got, weight * expected, rtol=1e-10, atol=1e-12)


def test_weightings_closed_forms():
    t = torch.tensor([0.01, 0.2, 0.5, 0.9], dtype=F64)
    vp = gf.VP()
    snr = (vp.alpha(t) / vp.sigma(t)) ** 2
    beta = 0.1 + t * (20.0 - 0.1)  # VP: g^2 = beta(t)
    cases = {
        ("snr", "eps"): torch.ones_like(t), ("snr", "x0"): snr, ("snr", "v"): snr / (snr + 1),
        ("likelihood", "score"): beta, ("likelihood", "eps"): beta / vp.sigma(t) ** 2,
        ("likelihood", "x0"): beta * vp.alpha(t) ** 2 / vp.sigma(t) ** 4,
        ("uniform", "v"): torch.ones_like(t),
    }
    for (weighting, kind), expected in cases.items():
        torch.testing.assert_close(obj.dsm_weight(vp, t, kind, weighting), expected, rtol=1e-10, atol=0)
    edm = gf.EDM()
    sig = torch.tensor([0.002, 0.5, 3.0, 80.0], dtype=F64)
    torch.testing.assert_close(obj.dsm_weight(edm, sig, "x0", "edm", sigma_data=0.5),
                               (sig ** 2 + 0.25) / (sig * 0.5) ** 2, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="weighting"):
        obj.dsm_weight(vp, t, "eps", "snr_min")


@pytest.mark.parametrize("prediction", ["x0", "eps", "v"])
def test_dsm_exact_mixture_model_is_minimal(prediction):
    process = gf.VP()
    gm = gf.GaussianMixture.ring(k=8, radius=4.0, std=0.5)
    exact = gm.model(process)

    def net(x, t):
        return exact.predict(x, t.to(F64), prediction)

    n = 4000
    x0 = gm.sample(n, generator=_gen(0), dtype=F64)
    seeds = torch.arange(n, dtype=torch.int64)
    eps = obj.draw_normal(x0.shape, seeds, 0, dtype=F64)
    t = obj.uniform_times(obj.draw_uniform(seeds, 1), 1e-3, 1.0)
    best = obj.dsm_loss(gf.Model(net, process, prediction), x0, t, eps, weighting="snr").mean()
    for perturb in (lambda o: o * 1.2, lambda o: o + 0.2):
        worse = obj.dsm_loss(gf.Model(lambda x, tt: perturb(net(x, tt)), process, prediction), x0, t, eps,
                             weighting="snr").mean()
        assert worse > best * 1.01, (float(worse), float(best))


def test_importance_sampled_likelihood_loss_same_mean_smaller_variance():
    process = gf.VP()
    gm = gf.GaussianMixture.ring(k=8, radius=4.0, std=0.5)
    exact = gm.model(process)
    model = gf.Model(lambda x, t: exact.eps(x, t.to(F64)) * 1.2 + 0.1, process, "eps")  # an imperfect model
    n = 20000
    x0 = gm.sample(n, generator=_gen(1), dtype=F64)
    seeds = torch.arange(n, dtype=torch.int64) + 10 ** 6
    eps = obj.draw_normal(x0.shape, seeds, 0, dtype=F64)
    u = obj.draw_uniform(seeds, 1)
    t_lo = 1e-3
    plain = obj.dsm_loss(model, x0, obj.uniform_times(u, t_lo, 1.0), eps, weighting="likelihood")
    sampler = obj.ImportanceSampler(lambda t: obj.dsm_weight(process, t, "eps", "likelihood"), t_lo, 1.0)
    t_is, factor = sampler(u)
    weighted = obj.dsm_loss(model, x0, t_is, eps, weighting="likelihood") * factor
    se = math.sqrt(plain.var() / n + weighted.var() / n)
    assert abs(float(plain.mean() - weighted.mean())) < 4 * se, (float(plain.mean()), float(weighted.mean()), se)
    assert weighted.var() < 0.5 * plain.var(), (float(weighted.var()), float(plain.var()))
    # the factor is the exact inverse density: its mean over a fine uniform quadrature of u is 1
    grid = (torch.arange(200000, dtype=F64) + 0.5) / 200000
    assert abs(float(sampler(grid)[1].mean()) - 1.0) < 1e-3
    assert bool(((t_is >= t_lo) & (t_is <= 1.0)).all())


def test_per_sample_draws_depend_on_own_seed_only():
    seeds = torch.tensor([5, 9, 11, 2], dtype=torch.int64)
    full = obj.draw_normal((4, 3), seeds, 2)
    torch.testing.assert_close(full[1:3], obj.draw_normal((2, 3), seeds[1:3], 2), rtol=0, atol=0)
    u = obj.draw_uniform(seeds, 1)
    assert bool(((u > 0) & (u < 1)).all())
    torch.testing.assert_close(u[2:], obj.draw_uniform(seeds[2:], 1), rtol=0, atol=0)
    assert not torch.equal(obj.draw_normal((4, 3), seeds, 3), full)


# ---------------------------------------------------------------- EDM

def test_edm_coefficients_table1():
    sd = 0.5
    for sigma in (0.002, 0.3, 1.0, 80.0):
        c_skip, c_out, c_in, c_noise = obj.edm_coefficients(torch.tensor([sigma], dtype=F64), sd)
        assert float(c_skip) == pytest.approx(sd ** 2 / (sigma ** 2 + sd ** 2), rel=1e-14)
        assert float(c_out) == pytest.approx(sigma * sd / math.sqrt(sd ** 2 + sigma ** 2), rel=1e-14)
        assert float(c_in) == pytest.approx(1 / math.sqrt(sigma ** 2 + sd ** 2), rel=1e-14)
        assert float(c_noise) == pytest.approx(math.log(sigma) / 4, rel=1e-14, abs=1e-15)


def test_edm_precond_and_loss_match_karras():
    process = gf.EDM()
    raw = _Affine()
    x0, n, _ = _fixed_inputs()
    sigma = torch.tensor([0.01, 0.2, 1.0, 5.0, 60.0], dtype=F64)
    y = x0 + sigma[:, None] * n
    sd = 0.5
    c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
    c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
    c_in = 1 / (sigma ** 2 + sd ** 2).sqrt()
    denoised = c_skip[:, None] * y + c_out[:, None] * raw(c_in[:, None] * y, sigma.log() / 4)
    precond = obj.EDMPrecond(raw, process, sd)
    torch.testing.assert_close(precond(y, sigma), denoised, rtol=1e-12, atol=1e-12)
    lam = (sigma ** 2 + sd ** 2) / (sigma * sd) ** 2
    expected = lam * (denoised - x0).square().mean(1)
    got = obj.dsm_loss(gf.Model(precond, process, "x0"), x0, sigma, n, weighting="edm", sigma_data=sd)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_edm_sigmas_lognormal():
    u = obj.draw_uniform(torch.arange(20000, dtype=torch.int64), 1)
    log_sigma = obj.edm_sigmas(u, P_mean=-1.2, P_std=1.2).log()
    assert abs(float(log_sigma.mean()) + 1.2) < 0.05
    assert abs(float(log_sigma.std()) - 1.2) < 0.05


# ---------------------------------------------------------------- sliced score matching

def test_sliced_sm_true_score_beats_perturbed():
    g = _gen(4)
    cov = torch.tensor([[2.0, 0.6], [0.6, 0.5]], dtype=F64)
    mu = torch.tensor([1.0, -1.0], dtype=F64)
    prec = torch.linalg.inv(cov)
    n = 3000
    x = mu + torch.randn(n, 2, generator=g, dtype=F64) @ torch.linalg.cholesky(cov).T
    v = torch.randn(4, n, 2, generator=g, dtype=F64)

    def true_score(z):
        return -(z - mu) @ prec  # prec is symmetric

    for vr in (True, False):
        best = obj.sliced_score_loss(true_score, x, v, variance_reduction=vr).mean()
        for wrong in (lambda z: 1.3 * true_score(z), lambda z: true_score(z) + 0.3):
            worse = obj.sliced_score_loss(wrong, x, v, variance_reduction=vr).mean()
            assert worse > best + 0.01, (vr, float(worse), float(best))


@pytest.mark.parametrize("variance_reduction", [True, False])
def test_sliced_sm_matches_dense_jacobian(variance_reduction):
    net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()
    g = _gen(5)
    x = torch.randn(6, 3, generator=g, dtype=F64)
    v = torch.randn(2, 6, 3, generator=g, dtype=F64)
    got = obj.sliced_score_loss(net, x, v, variance_reduction=variance_reduction)
    expected = torch.zeros(6, dtype=F64)
    for b in range(6):
        s = net(x[b:b + 1])[0]
        jac = torch.autograd.functional.jacobian(lambda z: net(z[None])[0], x[b])  # [out, in]
        for k in range(2):
            first = 0.5 * s.square().sum() if variance_reduction else 0.5 * (v[k, b] @ s) ** 2
            expected[b] += (first + v[k, b] @ jac @ v[k, b]) / (2 * 3)
    torch.testing.assert_close(got.detach(), expected.detach(), rtol=1e-10, atol=1e-12)
    got.sum().backward()  # differentiable in the parameters
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


# ---------------------------------------------------------------- flow matching

def test_cfm_path_and_loss_formulas():
    x0, noise, t = _fixed_inputs()
    sigma_min = 0.1
    x_t, u_t = obj.cfm_path(x0, noise, t, sigma_min)
    tc = t[:, None]
    torch.testing.assert_close(x_t, (1 - tc) * x0 + (sigma_min + (1 - sigma_min) * tc) * noise, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(u_t, (1 - sigma_min) * noise - x0, rtol=1e-14, atol=1e-14)
    path = gf.LinearPath(sigma_min=sigma_min)  # the same path as the genflow process, and u = dx_t/dt
    torch.testing.assert_close(x_t, path.alpha(t)[:, None] * x0 + path.sigma(t)[:, None] * noise)
    torch.testing.assert_close(u_t, path.dalpha(t)[:, None] * x0 + path.dsigma(t)[:, None] * noise)
    net = _Affine()
    expected = (net(x_t, t) - u_t).square().mean(1)
    torch.testing.assert_close(obj.cfm_loss(net, x0, noise, t, sigma_min=sigma_min), expected, rtol=1e-12, atol=1e-12)


def _cost(x, y, perm):
    return float((x - y[perm]).square().sum())


def test_exact_ot_is_the_brute_force_optimum():
    g = _gen(6)
    for _ in range(3):
        x, y = torch.randn(6, 2, generator=g), torch.randn(6, 2, generator=g)
        perm = obj.exact_ot_coupling(x, y)
        assert sorted(perm.tolist()) == list(range(6))
        best = min(_cost(x, y, list(p)) for p in itertools.permutations(range(6)))
        assert _cost(x, y, perm) == pytest.approx(best, rel=1e-6)


def test_sinkhorn_marginals_and_small_eps_limit():
    g = _gen(8)
    x, y = torch.randn(32, 2, generator=g, dtype=F64), torch.randn(32, 2, generator=g, dtype=F64)
    for eps in (0.5, 0.2):
        f, gpot = obj.sinkhorn_potentials(x, y, eps=eps, tol=1e-6)
        plan = torch.exp((f[:, None] + gpot[None, :] - torch.cdist(x, y).square()) / eps) / 32 ** 2
        torch.testing.assert_close(plan.sum(1), torch.full((32,), 1 / 32, dtype=F64), rtol=1e-4, atol=0)
        torch.testing.assert_close(plan.sum(0), torch.full((32,), 1 / 32, dtype=F64), rtol=1e-4, atol=0)
    for _ in range(3):  # y a jittered shuffle of x: a unique optimum with a clear gap
        x = torch.randn(6, 2, generator=g, dtype=F64)
        y = x[torch.randperm(6, generator=g)] + 0.05 * torch.randn(6, 2, generator=g, dtype=F64)
        exact = obj.exact_ot_coupling(x, y)
        for u in (torch.rand(6, generator=g, dtype=F64) for _ in range(3)):
            assert torch.equal(obj.sinkhorn_coupling(x, y, u, eps=0.01), exact)
    # a large eps gives a nearly independent coupling: rows draw different partners for different u
    drawn = {tuple(obj.sinkhorn_coupling(x, y, torch.rand(6, generator=g, dtype=F64), eps=100.0).tolist())
             for _ in range(5)}
    assert len(drawn) > 1


def _ddp_worker(rank, world, init, out_dir, x, seeds):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        rows = slice(rank * x.shape[0] // world, (rank + 1) * x.shape[0] // world)
        result = {}
        for coupling in ("ot", "sinkhorn"):
            family = make_family("flow-matching", data_shape=(2,), coupling=coupling, net=torch.nn.Linear(2, 2))
            result[coupling] = family.pair(x[rows], seeds[rows])[1]
        torch.save(result, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_global_batch_coupling_under_two_gloo_processes(tmp_path):
    """Each rank couples the all-gathered global batch and keeps its rows: equal to one process."""
    x = torch.randn(10, 2, generator=_gen(9))
    seeds = torch.arange(10, dtype=torch.int64)
    init = f"file://{tmp_path}/rendezvous"
    mp.spawn(_ddp_worker, args=(2, init, str(tmp_path), x, seeds), nprocs=2, join=True)
    parts = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    independent = obj.draw_normal(x.shape, seeds, 0)
    for coupling in ("ot", "sinkhorn"):
        family = make_family("flow-matching", data_shape=(2,), coupling=coupling, net=torch.nn.Linear(2, 2))
        expected = family.pair(x, seeds)[1]
        torch.testing.assert_close(torch.cat([p[coupling] for p in parts]), expected, rtol=0, atol=0)
        assert not torch.equal(expected, independent)  # the coupling did re-pair the noise
