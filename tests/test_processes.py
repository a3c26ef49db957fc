"""Tests of genflow.processes: coefficients, derivatives, inverses, priors and the forward SDE."""
import math

import numpy as np
import pytest
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from genflow.processes import EDM, VE, VP, CosineVP, DiscreteVP, LinearPath, Process, SubVP

F64 = torch.float64

PROCESSES = {
    "vp": lambda: VP(),
    "subvp": lambda: SubVP(),
    "ve": lambda: VE(),
    "cosine": lambda: CosineVP(),
    "edm": lambda: EDM(),
    "linear_path": lambda: LinearPath(),
    "linear_path_smin": lambda: LinearPath(sigma_min=0.05),
    "discrete_linear": lambda: DiscreteVP.linear(),
    "discrete_cosine": lambda: DiscreteVP.cosine(),
}


@pytest.fixture(params=sorted(PROCESSES), scope="module")
def process(request):
    return PROCESSES[request.param]()


def interior_grid(p: Process, n: int = 41) -> torch.Tensor:
    """Times strictly inside [t_min, T] (float64); for DiscreteVP, away from the knots."""
    lo = max(p.t_min, 1e-4 * p.T)
    t = lo + (p.T - lo) * torch.linspace(0.01, 0.99, n, dtype=F64)
    if isinstance(p, DiscreteVP):
        n_knots = p.num_train_timesteps
        t = (torch.floor(t * n_knots) + 0.37) / n_knots
    return t


def _grad(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    if not y.requires_grad:  # a constant (alpha of VE/EDM)
        return torch.zeros_like(t)
    (g,) = torch.autograd.grad(y.sum(), t, allow_unused=True)
    return torch.zeros_like(t) if g is None else g


# --------------------------------------------------------------------------------------------
# derivatives


def test_f_g2_match_autograd(process):
    t = interior_grid(process).requires_grad_(True)
    alpha, sigma = process.alpha(t), process.sigma(t)
    dalpha, dsigma2 = _grad(alpha, t), _grad(sigma ** 2, t)
    t = t.detach()
    alpha, sigma = alpha.detach(), sigma.detach()
    f = process.f(t)
    torch.testing.assert_close(f, dalpha / alpha, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(process.g2(t), dsigma2 - 2 * f * sigma ** 2, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(process.dalpha(t), dalpha, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(2 * sigma * process.dsigma(t), dsigma2, rtol=1e-8, atol=1e-12)
    assert bool((process.g2(t) > 0).all())


def test_f_g2_match_finite_differences(process):
    t = interior_grid(process)
    h = 1e-6 * process.T
    if isinstance(process, DiscreteVP):
        h = 0.1 / process.num_train_timesteps  # stays inside one segment (t sits at +0.37)
    a_p, a_m = process.alpha(t + h), process.alpha(t - h)
    s_p, s_m = process.sigma(t + h), process.sigma(t - h)
    f_fd = (torch.log(a_p) - torch.log(a_m)) / (2 * h)
    ds2_fd = (s_p ** 2 - s_m ** 2) / (2 * h)
    f = process.f(t)
    g2_fd = ds2_fd - 2 * f * process.sigma(t) ** 2
    scale = process.g2(t).abs().max()
    # central differences: O(h^2) truncation, O(eps/h) rounding
    torch.testing.assert_close(f, f_fd, rtol=1e-5, atol=1e-6 * (1 + f.abs().max()))
    torch.testing.assert_close(process.g2(t), g2_fd, rtol=1e-5, atol=1e-6 * scale)


def test_log_snr_definition_and_monotonicity(process):
    t = interior_grid(process, 200)
    alpha, sigma, lam = process.alpha(t), process.sigma(t), process.log_snr(t)
    torch.testing.assert_close(lam, torch.log(alpha / sigma), rtol=1e-12, atol=1e-12)
    assert bool((torch.diff(lam) < 0).all())
    assert bool((torch.diff(sigma) > 0).all())
    if isinstance(process, (VE, EDM)):
        assert bool((alpha == 1).all())
    else:
        assert bool((torch.diff(alpha) < 0).all())
    if isinstance(process, (VP, CosineVP, DiscreteVP)):
        torch.testing.assert_close(alpha ** 2 + sigma ** 2, torch.ones_like(t), rtol=0, atol=1e-14)


@pytest.mark.parametrize("where", ["interior", "ends"])
def test_t_from_log_snr_inverts_log_snr(process, where):
    if where == "interior":
        t = interior_grid(process, 101)
    else:
        t = torch.tensor([process.t_min, process.T], dtype=F64)
        t = t[torch.isfinite(process.log_snr(t))]
        if isinstance(process, CosineVP):  # also very small times (cancellation-prone)
            t = torch.cat([t, torch.tensor([1e-9, 1e-6], dtype=F64)])
    lam = process.log_snr(t)
    atol = 0.0 if where == "interior" else 1e-15 * process.T  # t_min may be 0
    torch.testing.assert_close(process.t_from_log_snr(lam), t, rtol=1e-9, atol=atol)
    # and the other way round
    torch.testing.assert_close(process.log_snr(process.t_from_log_snr(lam)), lam, rtol=1e-9, atol=1e-12)


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from(["vp", "subvp", "ve", "cosine", "linear_path"]),
       a=st.floats(0.0, 1.0), b=st.floats(0.0, 1.0), u=st.floats(1e-6, 1.0 - 1e-6))
def test_t_from_log_snr_inverts_for_random_parameters(kind, a, b, u):
    if kind in ("vp", "subvp"):
        beta_min = 5.0 * a
        p = (VP if kind == "vp" else SubVP)(beta_min=beta_min, beta_max=beta_min + 0.1 + 40.0 * b)
    elif kind == "ve":
        p = VE(sigma_min=10 ** (-3 + 2 * a), sigma_max=10 ** (-0.9 + 3 * b), T=1.0 + b)
    elif kind == "cosine":
        p = CosineVP(s=0.1 * a, T=0.5 + 0.49 * b)
    else:
        p = LinearPath(sigma_min=0.9 * a)
    t = u * p.T
    lam = p.log_snr(t)
    assert math.isfinite(lam)
    assert p.t_from_log_snr(lam) == pytest.approx(t, rel=1e-9, abs=0)


def test_infinite_log_snr_of_linear_path():
    p = LinearPath()
    assert p.log_snr(0.0) == math.inf and p.log_snr(1.0) == -math.inf
    assert p.t_from_log_snr(math.inf) == 0.0 and p.t_from_log_snr(-math.inf) == 1.0
    assert p.t_from_log_snr(0.0) == 0.5
    p = VP()
    assert p.log_snr(0.0) == math.inf and p.t_from_log_snr(math.inf) == 0.0


def test_closed_forms():
    t = torch.linspace(0.05, 0.95, 7, dtype=F64)
    vp, subvp = VP(beta_min=0.3, beta_max=12.0), SubVP(beta_min=0.3, beta_max=12.0)
    beta = 0.3 + t * 11.7
    alpha = torch.exp(-(t ** 2) * 11.7 / 4 - t * 0.3 / 2)
    torch.testing.assert_close(vp.alpha(t), alpha, rtol=1e-13, atol=0)
    torch.testing.assert_close(vp.sigma(t), torch.sqrt(1 - alpha ** 2), rtol=1e-12, atol=0)
    torch.testing.assert_close(vp.f(t), -beta / 2, rtol=1e-13, atol=0)
    torch.testing.assert_close(vp.g2(t), beta, rtol=1e-13, atol=0)
    torch.testing.assert_close(subvp.sigma(t), 1 - alpha ** 2, rtol=1e-12, atol=0)
    torch.testing.assert_close(subvp.g2(t), beta * (1 - alpha ** 4), rtol=1e-12, atol=0)
    ve = VE(sigma_min=0.02, sigma_max=30.0)
    torch.testing.assert_close(ve.sigma(t), 0.02 * (30.0 / 0.02) ** t, rtol=1e-12, atol=0)
    cos = CosineVP()
    ref = np.cos(np.pi / 2 * (t.numpy() + 0.008) / 1.008) / np.cos(np.pi / 2 * 0.008 / 1.008)
    np.testing.assert_allclose(cos.alpha(t).numpy(), ref, rtol=1e-13)
    edm = EDM()
    assert (edm.T, edm.t_min, edm.sigma_data) == (80.0, 0.002, 0.5)
    assert edm.sigma(3.5) == 3.5 and edm.alpha(3.5) == 1.0 and edm.g2(3.5) == 7.0
    lp = LinearPath(sigma_min=0.1)
    assert lp.alpha(0.25) == 0.75 and lp.sigma(0.25) == pytest.approx(0.1 + 0.9 * 0.25, rel=1e-15)
    assert lp.dalpha(0.25) == -1.0 and lp.dsigma(0.25) == pytest.approx(0.9, rel=1e-15)


# --------------------------------------------------------------------------------------------
# DiscreteVP specifics


def test_discrete_vp_hits_the_table_at_the_knots():
    p = DiscreteVP.linear()
    abar = p.alphas_cumprod
    n = p.num_train_timesteps
    t = (torch.arange(n, dtype=F64) + 1) / n
    torch.testing.assert_close(p.alpha(t) ** 2, abar, rtol=1e-12, atol=0)
    torch.testing.assert_close(p.sigma(t) ** 2, 1 - abar, rtol=1e-12, atol=0)
    # constant outside [1/N, 1]
    assert p.log_snr(0.0) == p.log_snr(1.0 / n) and p.f(0.0) == 0.0 and p.g2(0.0) == 0.0
    assert (p.T, p.t_min) == (1.0, 1.0 / n)
    assert p.timestep(0.5) == pytest.approx(499.0) and p.t_from_timestep(499.0) == pytest.approx(0.5)
    i = torch.tensor([0.0, 10.5, 999.0], dtype=F64)
    torch.testing.assert_close(p.timestep(p.t_from_timestep(i)), i, rtol=1e-14, atol=1e-12)


def test_discrete_tables_match_their_definitions():
    lin = DiscreteVP.linear(1000, 1e-4, 0.02, dtype=F64)
    betas = np.linspace(1e-4, 0.02, 1000)
    np.testing.assert_allclose(lin.alphas_cumprod.numpy(), np.cumprod(1 - betas), rtol=1e-12)
    sl = DiscreteVP.scaled_linear(1000, dtype=F64)
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    np.testing.assert_allclose(sl.alphas_cumprod.numpy(), np.cumprod(1 - betas), rtol=1e-12)
    cos = DiscreteVP.cosine(1000, dtype=F64)
    abar = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
    i = np.arange(1000)
    betas = np.minimum(1 - abar((i + 1) / 1000) / abar(i / 1000), 0.999)
    np.testing.assert_allclose(cos.alphas_cumprod.numpy(), np.cumprod(1 - betas), rtol=1e-12)
    assert betas[-1] == 0.999
    # the default float32 tables differ from the float64 ones by float32 rounding only
    np.testing.assert_allclose(DiscreteVP.linear().alphas_cumprod.numpy(),
                               lin.alphas_cumprod.numpy(), rtol=2e-4)
    # the discrete cosine table follows the continuous cosine schedule
    t = (torch.arange(1000, dtype=F64) + 1) / 1000
    np.testing.assert_allclose(cos.alpha(t[:990]).numpy(), CosineVP(T=1.0).alpha(t[:990]).numpy(),
                               rtol=1e-9)


def test_discrete_vp_accepts_lists_and_arrays():
    abar = [0.99, 0.9, 0.5, 0.1, 0.01]
    p = DiscreteVP(abar)
    q = DiscreteVP(np.array(abar, dtype=np.float32))
    assert p.num_train_timesteps == 5 and p.t_min == 0.2
    assert p.alpha(0.6) ** 2 == pytest.approx(0.5, rel=1e-14)
    assert q.alpha(0.6) ** 2 == pytest.approx(float(np.float32(0.5)), rel=1e-7)
    # the interpolation is linear in log-SNR between knots
    lam = lambda a: 0.5 * math.log(a / (1 - a))  # noqa: E731
    assert p.log_snr(0.5) == pytest.approx(0.5 * (lam(0.9) + lam(0.5)), rel=1e-14)


# --------------------------------------------------------------------------------------------
# types, shapes and dtypes


def test_number_in_number_out(process):
    t = 0.5 * (process.t_min + process.T) if process.t_min > 0 else 0.3 * process.T
    for method in ("alpha", "sigma", "log_snr", "f", "g2", "dalpha", "dsigma"):
        out = getattr(process, method)(t)
        assert type(out) is float and math.isfinite(out), method
        assert out == float(getattr(process, method)(torch.tensor(t, dtype=F64))), method
    assert type(process.t_from_log_snr(process.log_snr(t))) is float
    assert type(process.alpha(int(0))) is float
    assert type(process.sigma(np.float64(t))) is float


@pytest.mark.parametrize("dtype,expected", [(torch.float64, torch.float64), (torch.float32, torch.float32),
                                            (torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                                            (torch.int64, torch.float32)])
def test_tensor_in_tensor_out(process, dtype, expected):
    t64 = interior_grid(process, 6).reshape(2, 3)
    t = t64.round().to(dtype) if dtype == torch.int64 else t64.to(dtype)
    for method in ("alpha", "sigma", "log_snr", "f", "g2", "dalpha", "dsigma"):
        out = getattr(process, method)(t)
        assert isinstance(out, torch.Tensor) and out.shape == (2, 3) and out.dtype == expected, method
        # the math is done in float64: float32 results are the rounded float64 values
        ref = getattr(process, method)(t.to(F64))
        torch.testing.assert_close(out, ref.to(expected), rtol=0, atol=0, equal_nan=True)
    scalar = process.sigma(torch.tensor(float(t64[0, 0]), dtype=dtype))
    assert scalar.shape == () and scalar.dtype == expected


def test_autograd_through_float32():
    t = torch.tensor([0.3, 0.6], requires_grad=True)
    VP().sigma(t).sum().backward()
    assert t.grad is not None and t.grad.dtype == torch.float32 and bool((t.grad > 0).all())


def test_bad_time_type():
    with pytest.raises(TypeError):
        VP().alpha("0.5")


# --------------------------------------------------------------------------------------------
# prior


def test_prior_sample_and_log_prob(process):
    g = torch.Generator().manual_seed(0)
    x = process.prior_sample((4000, 3), generator=g)
    assert x.shape == (4000, 3) and x.dtype == torch.float32
    s_T = process.sigma(process.T)
    z = x.double() / s_T
    assert abs(float(z.mean())) < 5 / math.sqrt(z.numel())
    assert abs(float(z.std()) - 1) < 5 / math.sqrt(2 * z.numel())
    # reproducible with the same generator; dtype honoured
    x2 = process.prior_sample((4000, 3), generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)
    assert process.prior_sample((2,), dtype=F64).dtype == F64

    xs = torch.randn(5, 2, 3, dtype=F64, generator=g) * s_T
    lp = process.prior_log_prob(xs)
    ref = scipy.stats.norm.logpdf(xs.numpy(), scale=s_T).reshape(5, -1).sum(1)
    assert lp.shape == (5,) and lp.dtype == F64
    np.testing.assert_allclose(lp.numpy(), ref, rtol=1e-12)
    assert process.prior_log_prob(xs.float()).dtype == torch.float32


# --------------------------------------------------------------------------------------------
# forward SDE


SDE_CASES = ["vp", "subvp", "ve", "cosine", "edm", "linear_path", "discrete_linear", "discrete_cosine"]


@pytest.mark.parametrize("name", SDE_CASES)
def test_forward_sde_reproduces_marginals(name):
    """Euler-Maruyama on dx = f x dt + sqrt(g2) dW from the exact marginal at t_0 (a point
    mass x_0 = 4 pushed to t_0) gives mean alpha(t) x_0 and std sigma(t) later on.

    The time grid is uniform in log-SNR (so |f| dt stays small where the schedule is steep,
    e.g. the clipped last betas of the discrete cosine table); coefficients at midpoints."""
    p = PROCESSES[name]()
    steps, n, x0 = 2000, 50000, 4.0
    t_start = max(p.t_min, 1e-4)
    t_end = 0.999 if isinstance(p, LinearPath) else p.T  # log-SNR is -inf at t = 1
    lam = torch.linspace(p.log_snr(t_start), p.log_snr(t_end), steps + 1, dtype=F64)
    grid = p.t_from_log_snr(lam)
    grid[0], grid[-1] = t_start, t_end
    mid = 0.5 * (grid[1:] + grid[:-1])
    dt = torch.diff(grid)
    # x <- x + f x dt + sqrt(g2 dt) z, as x <- (1 + f dt) x + sqrt(g2 dt) z
    decay = (1.0 + p.f(mid) * dt).tolist()
    scale = torch.sqrt(p.g2(mid) * dt).tolist()
    gen = torch.Generator().manual_seed(1234)
    x = p.alpha(t_start) * x0 + p.sigma(t_start) * torch.randn(n, dtype=F64, generator=gen)
    z = torch.empty(n, dtype=F64)
    checks = {steps // 4, steps // 2, steps}
    for i in range(steps):
        x.mul_(decay[i]).add_(torch.randn(n, dtype=F64, generator=gen, out=z), alpha=scale[i])
        if i + 1 in checks:
            t = float(grid[i + 1])
            mean, std = p.alpha(t) * x0, p.sigma(t)
            se_mean, se_std = std / math.sqrt(n), std / math.sqrt(2 * n)
            # 4 standard errors plus 0.3% of sigma for the O(dt) Euler-Maruyama bias (whose
            # size on this grid, from the exact moment recursion of the scheme, is < 0.27%)
            assert abs(float(x.mean()) - mean) < 4 * se_mean + 3e-3 * std, (t, float(x.mean()), mean)
            assert abs(float(x.std()) - std) < 4 * se_std + 3e-3 * std, (t, float(x.std()), std)


# --------------------------------------------------------------------------------------------
# construction


@pytest.mark.parametrize("make,arg", [
    (lambda: VP(beta_min=-0.1), "beta_min"),
    (lambda: VP(beta_max=0.05), "beta_max"),
    (lambda: VP(T=0.0), "T"),
    (lambda: VP(t_min=1.0), "t_min"),
    (lambda: VP(beta_min=float("nan")), "beta_min"),
    (lambda: SubVP(beta_max=0.1), "beta_max"),
    (lambda: SubVP(t_min=-1e-3), "t_min"),
    (lambda: VE(sigma_min=0.0), "sigma_min"),
    (lambda: VE(sigma_max=0.001), "sigma_max"),
    (lambda: VE(T=-1.0), "T"),
    (lambda: CosineVP(s=-0.1), "s"),
    (lambda: CosineVP(T=1.5), "T"),
    (lambda: CosineVP(t_min=0.9946), "t_min"),
    (lambda: EDM(sigma_min=-1.0), "sigma_min"),
    (lambda: EDM(sigma_max=0.001), "sigma_max"),
    (lambda: EDM(sigma_data=0.0), "sigma_data"),
    (lambda: EDM(sigma_max="80"), "sigma_max"),
    (lambda: LinearPath(sigma_min=1.0), "sigma_min"),
    (lambda: LinearPath(T=2.0), "T"),
    (lambda: DiscreteVP([0.9, 0.95, 0.5]), "alphas_cumprod"),
    (lambda: DiscreteVP([0.9, 0.5, 0.0]), "alphas_cumprod"),
    (lambda: DiscreteVP([1.0, 0.5, 0.1]), "alphas_cumprod"),
    (lambda: DiscreteVP([[0.9, 0.5]]), "alphas_cumprod"),
    (lambda: DiscreteVP([0.9]), "alphas_cumprod"),
    (lambda: DiscreteVP(["a", "b"]), "alphas_cumprod"),
    (lambda: DiscreteVP([0.9, 0.5], t_min=1.0), "t_min"),
    (lambda: DiscreteVP.linear(1), "num_train_timesteps"),
    (lambda: DiscreteVP.linear(beta_start=0.0), "beta_start"),
    (lambda: DiscreteVP.linear(beta_end=1e-5), "beta_end"),
    (lambda: DiscreteVP.scaled_linear(beta_end=1.0), "beta_end"),
    (lambda: DiscreteVP.cosine(max_beta=1.0), "max_beta"),
])
def test_bad_arguments_raise(make, arg):
    with pytest.raises((ValueError, TypeError), match=arg):  # TypeError for non-numbers (EDM(sigma_max="80"))
        make()


def test_keyword_only_and_repr():
    with pytest.raises(TypeError):
        VP(0.1, 20.0)  # noqa
    assert repr(VP()) == "VP(beta_min=0.1, beta_max=20.0, T=1.0, t_min=0.001)"
    assert repr(EDM()) == "EDM(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5)"
    for name, make in PROCESSES.items():
        proc = make()
        r = repr(proc)
        assert r.startswith(type(proc).__name__ + "(") and r.endswith(")") and "=" in r, name
    assert "num_train_timesteps=1000" in repr(DiscreteVP.linear())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(process):
    t = interior_grid(process, 33)
    lam = process.log_snr(t)
    for dtype in (torch.float64, torch.float32):
        tc = t.to("cuda", dtype)
        for method in ("alpha", "sigma", "log_snr", "f", "g2", "dalpha", "dsigma"):
            out = getattr(process, method)(tc)
            assert out.device.type == "cuda" and out.shape == t.shape, method
            ref = getattr(process, method)(t.to(dtype).double()).to(out.dtype)
            tol = 1e-12 if dtype == torch.float64 else 1e-6  # CUDA libm may differ by an ulp
            torch.testing.assert_close(out.cpu(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(process.t_from_log_snr(lam.cuda()).cpu(), process.t_from_log_snr(lam),
                               rtol=1e-12, atol=1e-12)
    x = process.prior_sample((8, 3), device="cuda")
    assert x.device.type == "cuda" and process.prior_log_prob(x).device.type == "cuda"
