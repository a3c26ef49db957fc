"""``gf.compat.k_diffusion`` against the installed k-diffusion (0.1.1.post1) on identical inputs.

Same denoiser (the exact Gaussian-mixture denoiser of ``gf.GaussianMixture.ring`` under
``gf.EDM``, or a nonlinear toy net for other shapes), same sigmas (``get_sigmas_karras``), same
noise (an explicit ``noise_sampler`` handing out a fixed list, and the default path under the
same ``torch.manual_seed``): float64 to 1e-12 relative (the scale is the largest entry of the
reference), float32 to 1e-4. Also the signatures, the schedules (bitwise), callback contents,
``extra_args``, the RNG state after a call, the Brownian-tree noise sampler and the errors.
"""
import inspect

import pytest
import torch

import genflow as gf
from genflow.compat import k_diffusion as C

from ..peers import k_diffusion_sampling

F64_RTOL, F32_RTOL = 1e-12, 1e-4

# k-diffusion's torchsde Brownian tree warns when exp(log(sigma)) rounds just outside its interval
pytestmark = pytest.mark.filterwarnings("ignore:Should have:UserWarning")
SAMPLERS = ["sample_euler", "sample_euler_ancestral", "sample_heun", "sample_dpm_2", "sample_dpm_2_ancestral",
            "sample_lms", "sample_dpm_fast", "sample_dpm_adaptive", "sample_dpmpp_2s_ancestral", "sample_dpmpp_sde",
            "sample_dpmpp_2m", "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde"]
SCHEDULES = ["get_sigmas_karras", "get_sigmas_exponential", "get_sigmas_polyexponential", "get_sigmas_vp"]
DETERMINISTIC = {"sample_euler", "sample_heun", "sample_dpm_2", "sample_lms", "sample_dpmpp_2m"}

_MIXTURE = gf.GaussianMixture.ring().model(gf.EDM())


def mixture_denoiser(x, sigma):
    """The exact denoiser E[x0 | x] of an 8-component ring mixture (x: [B, 2])."""
    return _MIXTURE.x0(x, sigma)


def toy_denoiser(x, sigma, shift=0.0):
    """A smooth nonlinear denoiser for any shape [B, ...], with an optional ``extra_args`` input."""
    s = sigma.reshape((-1,) + (1,) * (x.dim() - 1))
    return 0.8 * torch.tanh(x / (1 + s ** 2) ** 0.5) + 0.1 * torch.sin(x.roll(1, -1)) + shift


NETS = {"mixture": (mixture_denoiser, (16, 2)), "toy": (toy_denoiser, (2, 3, 5, 7)), "toy_small": (toy_denoiser, (3, 2))}


def _assert_rel(actual, expected, rtol):
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=0.0, atol=rtol * scale)


def _noise_sampler(shape, dtype, seed=11, count=64):
    """A k-diffusion style ``noise_sampler`` handing out a fixed list; equal seeds, equal streams."""
    g = torch.Generator().manual_seed(seed)
    draws = iter([torch.randn(shape, generator=g, dtype=dtype) for _ in range(count)])
    return lambda sigma, sigma_next: next(draws)


def _x(shape, dtype, scale=80.0):
    return scale * torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=dtype)


def _sigmas(steps=8, dtype=torch.float64):
    return k_diffusion_sampling().get_sigmas_karras(steps, 0.03, 80.0).to(dtype)


def _run_both(name, net, x, sigmas, options, *, explicit_noise, seed=7):
    """(k-diffusion's result, ours) and the state of torch's RNG after each."""
    K = k_diffusion_sampling()
    results = []
    for module in (K, C):
        kwargs = dict(options)
        if explicit_noise:
            kwargs["noise_sampler"] = _noise_sampler(x.shape, x.dtype)
        torch.manual_seed(seed)
        out = getattr(module, name)(net, x, sigmas, disable=True, **kwargs)
        results.append((out, torch.randn(4)))
    (k_out, k_after), (g_out, g_after) = results
    return k_out, g_out, k_after, g_after


# ------------------------------------------------------------------ signatures and schedules


@pytest.mark.parametrize("name", SAMPLERS + SCHEDULES)
def test_signature_and_docstring(name):
    K = k_diffusion_sampling()
    assert inspect.signature(getattr(C, name)) == inspect.signature(getattr(K, name))
    assert f"k-diffusion's ``{name}``" in " ".join(getattr(C, name).__doc__.split())
    assert name in C.__all__


@pytest.mark.parametrize("name, args", [
    ("get_sigmas_karras", (10, 0.002, 80.0)), ("get_sigmas_karras", (7, 0.03, 14.6, 3.0)),
    ("get_sigmas_karras", (1, 0.1, 10.0)), ("get_sigmas_exponential", (10, 0.002, 80.0)),
    ("get_sigmas_polyexponential", (10, 0.002, 80.0)), ("get_sigmas_polyexponential", (9, 0.1, 20.0, 2.5)),
    ("get_sigmas_vp", (10,)), ("get_sigmas_vp", (6, 18.0, 0.2, 1e-2)),
])
def test_schedules_bitwise(name, args):
    K = k_diffusion_sampling()
    expected = getattr(K, name)(*args, device="cpu")
    actual = getattr(C, name)(*args, device=torch.device("cpu"))
    assert actual.dtype == expected.dtype and actual.device == expected.device
    assert torch.equal(actual, expected)
    assert torch.equal(getattr(C, name)(*args), getattr(K, name)(*args))


# ------------------------------------------------------------------ samplers on a sigma schedule

CASES = [  # sampler, options
    ("sample_euler", {}), ("sample_euler", {"s_churn": 1.0, "s_tmin": 0.1, "s_tmax": 10.0, "s_noise": 1.007}),
    ("sample_heun", {}), ("sample_heun", {"s_churn": 2.0}),
    ("sample_dpm_2", {}), ("sample_dpm_2", {"s_churn": 0.5, "s_tmax": 30.0}),
    ("sample_lms", {}), ("sample_lms", {"order": 2}), ("sample_lms", {"order": 3}),
    ("sample_euler_ancestral", {}), ("sample_euler_ancestral", {"eta": 0.5, "s_noise": 0.9}),
    ("sample_euler_ancestral", {"eta": 1.5}),
    ("sample_dpm_2_ancestral", {}), ("sample_dpm_2_ancestral", {"eta": 0.0}), ("sample_dpm_2_ancestral", {"eta": 3.0}),
    ("sample_dpmpp_2s_ancestral", {}), ("sample_dpmpp_2s_ancestral", {"eta": 0.3}),
    ("sample_dpmpp_sde", {}), ("sample_dpmpp_sde", {"eta": 0.0}), ("sample_dpmpp_sde", {"eta": 0.6, "r": 0.3}),
    ("sample_dpmpp_2m", {}),
    ("sample_dpmpp_2m_sde", {}), ("sample_dpmpp_2m_sde", {"eta": 0.5, "solver_type": "heun"}),
    ("sample_dpmpp_2m_sde", {"eta": 0.0}),
    ("sample_dpmpp_3m_sde", {}), ("sample_dpmpp_3m_sde", {"eta": 0.4, "s_noise": 1.1}),
]


def _case_id(case):
    name, options = case
    return name[len("sample_"):] + "".join(f"-{k}={v}" for k, v in options.items())


NOISE_CASES = [(name, options, explicit) for name, options in CASES for explicit in (True, False)
               if not (explicit and name in DETERMINISTIC)]


@pytest.mark.parametrize("net_name", list(NETS))
@pytest.mark.parametrize("name, options, explicit_noise", NOISE_CASES,
                         ids=[_case_id(c[:2]) + ("-noise_sampler" if c[2] else "-default_noise") for c in NOISE_CASES])
def test_float64_equals_k_diffusion(name, options, explicit_noise, net_name):
    net, shape = NETS[net_name]
    x = _x(shape, torch.float64)
    k_out, g_out, k_after, g_after = _run_both(name, net, x, _sigmas(), options, explicit_noise=explicit_noise)
    assert g_out.dtype == torch.float64 and g_out.shape == x.shape
    _assert_rel(g_out, k_out, F64_RTOL)
    assert torch.equal(g_after, k_after), "torch's global RNG must advance as in k-diffusion"


@pytest.mark.parametrize("name, options", CASES[::2], ids=[_case_id(c) for c in CASES[::2]])
def test_float32_sigmas_float64_state(name, options):
    """float32 sigmas (as get_sigmas_karras returns them) with a float64 state: k-diffusion rounds
    its step scalars to float32, genflow's native solvers compute them in float64 from the same
    float32 sigmas, so the two agree to float32 coefficient rounding (measured <= 3e-7)."""
    net, shape = NETS["toy"]
    x = _x(shape, torch.float64)
    k_out, g_out, _, _ = _run_both(name, net, x, _sigmas(dtype=torch.float32), options, explicit_noise=False)
    _assert_rel(g_out, k_out, 1e-6)


@pytest.mark.parametrize("net_name", ["mixture", "toy"])
@pytest.mark.parametrize("name, options", CASES, ids=[_case_id(c) for c in CASES])
def test_float32_equals_k_diffusion(name, options, net_name):
    net, shape = NETS[net_name]
    x = _x(shape, torch.float32)
    k_out, g_out, _, _ = _run_both(name, net, x, _sigmas(dtype=torch.float32), options,
                                   explicit_noise=name not in DETERMINISTIC)
    assert g_out.dtype == torch.float32
    _assert_rel(g_out, k_out, F32_RTOL)


# ------------------------------------------------------------------ DPM-Solver fast and adaptive

DPM_CASES = [
    ("sample_dpm_fast", {"n": 10}), ("sample_dpm_fast", {"n": 9, "eta": 0.5}), ("sample_dpm_fast", {"n": 7, "eta": 1.0}),
    ("sample_dpm_fast", {"n": 2}),
    ("sample_dpm_adaptive", {}), ("sample_dpm_adaptive", {"order": 2, "rtol": 0.01}),
    ("sample_dpm_adaptive", {"eta": 0.7, "s_noise": 0.9}),
    ("sample_dpm_adaptive", {"pcoeff": 0.2, "icoeff": 0.6, "dcoeff": 0.1, "h_init": 0.1}),
]


def _run_dpm(module, name, net, x, options, explicit_noise, callback=None):
    """k-diffusion builds these samplers' time grid in torch's default dtype. ``sample_dpm_fast``
    (genflow's native solvers, float64 step scalars) runs with float64 as the default for a float64
    state; ``sample_dpm_adaptive`` (k-diffusion's own scalar arithmetic) on float32 grids."""
    kwargs = dict(options)
    if explicit_noise:
        kwargs["noise_sampler"] = _noise_sampler(x.shape, x.dtype, count=400)
    default = torch.get_default_dtype()
    wide = x.dtype == torch.float64 and name == "sample_dpm_fast"
    torch.set_default_dtype(torch.float64 if wide else torch.float32)
    try:
        torch.manual_seed(5)
        out = getattr(module, name)(net, x, 0.03, 80.0, disable=True, callback=callback, **kwargs)
        return out, torch.randn(4)
    finally:
        torch.set_default_dtype(default)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("net_name", ["mixture", "toy"])
@pytest.mark.parametrize("explicit_noise", [True, False], ids=["noise_sampler", "default_noise"])
@pytest.mark.parametrize("name, options", DPM_CASES, ids=[_case_id(c) for c in DPM_CASES])
def test_dpm_fast_adaptive_equal_k_diffusion(name, options, explicit_noise, net_name, dtype):
    rtol = F64_RTOL if dtype == torch.float64 else F32_RTOL
    step_rtol = (1e-13 if name == "sample_dpm_fast" else 0.0) if dtype == torch.float64 else F32_RTOL  # callbacks' t
    if dtype == torch.float64 and options.get("eta") == 1.0:
        rtol = 2e-11  # ancestral jumps with expm1(h) ~ 1e3 amplify the coefficients' rounding
    if dtype == torch.float32 and ((net_name == "mixture" and name == "sample_dpm_adaptive") or options.get("eta") == 1.0):
        # float32 rounding alone moves these solves by 1.5-2e-4 from the float64 result, in
        # k-diffusion too (the mixture's error-controlled steps, whose sizes then drift by up to
        # 2% under the PID controller; ancestral jumps with expm1(h) ~ 1e3)
        rtol, step_rtol = 1e-3, 5e-2
    K = k_diffusion_sampling()
    net, shape = NETS[net_name]
    x = _x(shape, dtype)
    k_calls, g_calls = [], []
    k_out, k_after = _run_dpm(K, name, net, x, options, explicit_noise, k_calls.append)
    g_out, g_after = _run_dpm(C, name, net, x, options, explicit_noise, g_calls.append)
    _assert_rel(g_out, k_out, rtol)
    assert torch.equal(g_after, k_after)
    assert len(g_calls) == len(k_calls) > 0
    tol = {"rel": step_rtol, "abs": step_rtol}
    for k_info, g_info in zip(k_calls, g_calls):
        assert list(g_info) == list(k_info)
        assert g_info["i"] == k_info["i"]
        for key in ("sigma", "sigma_hat", "t", "t_up"):  # float32: the error estimate rounds differently
            assert float(g_info[key]) == pytest.approx(float(k_info[key]), **tol)


def test_dpm_adaptive_return_info():
    K = k_diffusion_sampling()
    net, shape = NETS["toy"]
    x = _x(shape, torch.float64)
    k_out, k_info = K.sample_dpm_adaptive(net, x, 0.03, 80.0, disable=True, return_info=True)
    g_out, g_info = C.sample_dpm_adaptive(net, x, 0.03, 80.0, disable=True, return_info=True)
    assert g_info == k_info and g_info["n_accept"] > 0
    _assert_rel(g_out, k_out, F64_RTOL)


# ------------------------------------------------------------------ callback, extra_args, input, progress bar


@pytest.mark.parametrize("name, options", [c for c in CASES if c[1] in ({}, {"s_churn": 2.0})],
                         ids=[_case_id(c) for c in CASES if c[1] in ({}, {"s_churn": 2.0})])
def test_callback_contents(name, options):
    K = k_diffusion_sampling()
    net, shape = NETS["toy_small"]
    x = _x(shape, torch.float64)
    calls = {}
    for module in (K, C):
        torch.manual_seed(3)
        seen = calls[module] = []
        getattr(module, name)(net, x, _sigmas(), disable=True, callback=seen.append, **options)
    assert len(calls[C]) == len(calls[K]) == 8
    for k_info, g_info in zip(calls[K], calls[C]):
        assert list(g_info) == list(k_info) == ["x", "i", "sigma", "sigma_hat", "denoised"]
        assert g_info["i"] == k_info["i"]
        assert isinstance(g_info["sigma"], torch.Tensor) and g_info["sigma"].dim() == 0
        assert isinstance(g_info["sigma_hat"], torch.Tensor) and g_info["sigma_hat"].dim() == 0
        assert float(g_info["sigma"]) == float(k_info["sigma"])
        assert float(g_info["sigma_hat"]) == pytest.approx(float(k_info["sigma_hat"]), rel=1e-15)
        for key in ("x", "denoised"):
            _assert_rel(g_info[key], k_info[key], F64_RTOL)


@pytest.mark.parametrize("name", ["sample_euler_ancestral", "sample_dpmpp_2m", "sample_dpmpp_3m_sde", "sample_heun"])
def test_extra_args_pass_through(name):
    K = k_diffusion_sampling()
    x = _x((3, 2), torch.float64)
    outs = []
    for module in (K, C):
        torch.manual_seed(2)
        outs.append(getattr(module, name)(toy_denoiser, x, _sigmas(), extra_args={"shift": 0.25}, disable=True))
    _assert_rel(outs[1], outs[0], F64_RTOL)
    torch.manual_seed(2)
    plain = getattr(C, name)(toy_denoiser, x, _sigmas(), disable=True)
    assert (plain - outs[1]).abs().max() > 0.1


def test_input_untouched_and_dtype_kept():
    x = _x((4, 2), torch.float64)
    before = x.clone()
    out = C.sample_euler_ancestral(mixture_denoiser, x, _sigmas(), disable=True)
    assert torch.equal(x, before) and out is not x


def test_progress_bar_disable(capsys):
    x = _x((2, 2), torch.float64)
    C.sample_dpmpp_2m(mixture_denoiser, x, _sigmas(), disable=True)
    assert capsys.readouterr().err == ""
    C.sample_dpmpp_2m(mixture_denoiser, x, _sigmas(), disable=False)
    assert "8/8" in capsys.readouterr().err


# ------------------------------------------------------------------ the Brownian-tree noise sampler


@pytest.mark.parametrize("seed", [1234, [5, 6, 7]], ids=["one_seed", "per_sample_seeds"])
def test_brownian_tree_noise_sampler_equals_k_diffusion(seed):
    pytest.importorskip("torchsde")
    K = k_diffusion_sampling()
    x = _x((3, 4), torch.float64)
    sigmas = _sigmas(10)
    ours = C.BrownianTreeNoiseSampler(x, sigmas[-2], sigmas[0], seed=seed)
    theirs = K.BrownianTreeNoiseSampler(x, sigmas[-2], sigmas[0], seed=seed)
    for i in range(len(sigmas) - 2):
        torch.testing.assert_close(ours(sigmas[i], sigmas[i + 1]), theirs(sigmas[i], sigmas[i + 1]), rtol=0, atol=0)


def test_brownian_tree_fallback_without_torchsde(monkeypatch):
    """Without torchsde the default SDE noise is genflow's Philox Brownian tree: standard normal
    increments of one path, reproducible under the same torch seed."""
    from genflow import peers

    real = peers.optional
    monkeypatch.setattr(peers, "optional", lambda name: None if name == "torchsde" else real(name))
    x = torch.zeros(4096, 2, dtype=torch.float64)
    sampler = C.BrownianTreeNoiseSampler(x, 0.03, 80.0, seed=3)
    assert sampler.tree is not None
    z = sampler(torch.tensor(10.0), torch.tensor(5.0))
    assert abs(z.mean().item()) < 0.05 and abs(z.std().item() - 1) < 0.05
    w1 = sampler(torch.tensor(10.0), torch.tensor(7.0)) * 3 ** 0.5
    w2 = sampler(torch.tensor(7.0), torch.tensor(5.0)) * 2 ** 0.5
    torch.testing.assert_close(w1 + w2, z * 5 ** 0.5)  # increments of one path add up
    runs = []
    for _ in range(2):
        torch.manual_seed(9)
        runs.append(C.sample_dpmpp_2m_sde(mixture_denoiser, _x((8, 2), torch.float64), _sigmas(), disable=True))
    assert torch.equal(runs[0], runs[1]) and torch.isfinite(runs[0]).all()


# ------------------------------------------------------------------ errors


def test_errors_name_the_argument():
    x = _x((3, 2), torch.float64)
    sigmas = _sigmas()
    with pytest.raises(ValueError, match="sigmas must be 1-D"):
        C.sample_euler(toy_denoiser, x, sigmas[None])
    with pytest.raises(TypeError, match="sigmas must be a 1-D floating tensor"):
        C.sample_euler(toy_denoiser, x, sigmas.tolist())
    with pytest.raises(ValueError, match="sigmas must be strictly decreasing for sample_euler_ancestral"):
        C.sample_euler_ancestral(toy_denoiser, x, sigmas.flip(0)[1:])
    with pytest.raises(ValueError, match="sigmas must be positive"):
        C.sample_heun(toy_denoiser, x, torch.tensor([2.0, 0.0, 1.0]))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        C.sample_dpmpp_2m(toy_denoiser, x.numpy(), sigmas)
    with pytest.raises(ValueError, match="eta must be >= 0"):
        C.sample_dpmpp_2m_sde(toy_denoiser, x, sigmas, eta=-0.5)
    with pytest.raises(ValueError, match=r"solver_type must be one of \('heun', 'midpoint'\)"):
        C.sample_dpmpp_2m_sde(toy_denoiser, x, sigmas, solver_type="euler")
    with pytest.raises(ValueError, match="s_churn must be >= 0"):
        C.sample_euler(toy_denoiser, x, sigmas, s_churn=-1.0)
    with pytest.raises(ValueError, match="order must be 2 or 3"):
        C.sample_dpm_adaptive(toy_denoiser, x, 0.03, 80.0, order=4)
    with pytest.raises(ValueError, match="sigma_min and sigma_max must be > 0"):
        C.sample_dpm_fast(toy_denoiser, x, 0.0, 80.0, 10)
    with pytest.raises(ValueError, match="order must be >= 1"):
        C.sample_lms(toy_denoiser, x, sigmas, order=0)
    with pytest.raises(ValueError, match="order must be <= 4"):  # the native lms keeps up to 4 nodes
        C.sample_lms(toy_denoiser, x, sigmas, order=6)
    with pytest.raises(ValueError, match="model must return a tensor of x's shape"):
        C.sample_euler(lambda x, s: x[:1], x, sigmas)
    with pytest.raises(TypeError, match="extra_args must be None or a dict"):
        C.sample_euler(toy_denoiser, x, sigmas, extra_args=[1])
    with pytest.raises(ValueError, match="n must be >= 1"):
        C.get_sigmas_karras(0, 0.1, 10.0)


# ------------------------------------------------------------------ the engine's PID controller

@pytest.mark.parametrize("coefficients, order", [((0.0, 1.0, 0.0), 3), ((0.2, 0.6, 0.1), 2), ((0.3, 0.5, 0.2), 1.5)])
def test_pid_controller_equals_k_diffusion(coefficients, order):
    """genflow.engine.adaptive.PIDController (sample_dpm_adaptive's step sizes) takes k-diffusion's
    accept decisions and step sizes bit for bit, per sample, on a run of errors around 1."""
    from genflow.engine.adaptive import PIDController

    errors = torch.rand(40, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 2.5
    ours = PIDController(*coefficients, order, accept_safety=0.81)
    h = torch.full((5,), 0.05, dtype=torch.float64)
    theirs = [k_diffusion_sampling().PIDStepSizeController(0.05, *coefficients, order=order, accept_safety=0.81)
              for _ in range(5)]
    for err in errors:
        accept, h = ours(err, h)
        for b, controller in enumerate(theirs):
            assert bool(accept[b]) == controller.propose_step(err[b])
            assert float(h[b]) == controller.h
