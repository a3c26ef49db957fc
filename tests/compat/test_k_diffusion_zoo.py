"""``gf.compat.k_diffusion.zoo``: k-diffusion-style entry points of the native samplers k-diffusion
lacks. Each equals ``gf.sample`` with the native solver on the same sigmas (as an EDM time grid),
the same denoiser (as an x0 model) and the same supplied noise; the callback gets k-diffusion's
keys once per step; ``extra_args`` reach the model; a ComfyUI-style call (``KSAMPLER``: extra_args
with ``model_options`` and ``seed``, a model taking ``**kwargs``) runs and seeds the default noise
as ComfyUI's ``default_noise_sampler``; the default noise otherwise follows torch's global RNG as
k-diffusion's ``randn_like``; ``dpmpp_2m_sde_heun`` equals k-diffusion's ``sample_dpmpp_2m_sde``
with ``solver_type='heun'``."""
import pytest
import torch

import genflow as gf
from genflow.compat import k_diffusion as C
from genflow.compat.k_diffusion import zoo

from ..peers import k_diffusion_sampling

pytestmark = pytest.mark.filterwarnings("ignore:Should have:UserWarning")
PROCESS = gf.EDM()
MIXTURE = gf.GaussianMixture.ring().model(PROCESS)
NATIVE = [name for name in sorted(zoo.ENTRY_POINTS) if name != "dpmpp_2m_sde_heun"]
BATCH = 5


def denoiser(x, sigma, **extra_args):
    return MIXTURE.x0(x, sigma)


def _sigmas(name, steps=7):
    sigmas = C.get_sigmas_karras(steps, 0.03, 14.6, device="cpu").to(torch.float64)
    return sigmas[:-1] if name == "ald" else sigmas  # ald needs a last level > 0


def _x():
    return 14.6 * torch.randn(BATCH, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _noise(seed=11, count=96):
    g = torch.Generator().manual_seed(seed)
    draws = iter([torch.randn(BATCH, 2, generator=g, dtype=torch.float64) for _ in range(count)])
    return lambda sigma, sigma_next: next(draws)


def _stochastic(name):
    return gf.solvers.get(zoo.ENTRY_POINTS[name][0]).stochastic


@pytest.mark.parametrize("name", NATIVE)
def test_entry_point_equals_native_sample(name):
    solver, fixed = zoo.ENTRY_POINTS[name]
    sigmas, x = _sigmas(name), _x()
    noise = {"noise_sampler": _noise()} if _stochastic(name) else {}
    ours = getattr(zoo, f"sample_{name}")(denoiser, x, sigmas, disable=True, **noise)
    native_noise = {"noise_sampler": _noise()} if _stochastic(name) else {"generator": 0}
    native = gf.sample(gf.Model(lambda y, t: MIXTURE.x0(y, t), PROCESS, "x0"), x_T=x, solver=solver, schedule=sigmas,
                       **fixed, **native_noise)
    torch.testing.assert_close(ours, native, rtol=1e-12, atol=1e-12)
    assert torch.isfinite(ours).all()


@pytest.mark.parametrize("name", NATIVE)
def test_callback_keys_and_extra_args(name):
    sigmas, seen, conds = _sigmas(name, steps=5), [], []

    def model(x, sigma, cond=None):
        conds.append(cond)
        return MIXTURE.x0(x, sigma)

    getattr(zoo, f"sample_{name}")(model, _x(), sigmas, extra_args={"cond": "c"}, callback=seen.append, disable=True)
    assert [info["i"] for info in seen] == list(range(len(sigmas) - 1))
    assert all(set(info) == {"x", "i", "sigma", "sigma_hat", "denoised"} for info in seen)
    assert all(float(info["sigma"]) == float(sigmas[info["i"]]) for info in seen)
    assert conds and set(conds) == {"c"}


def test_options_reach_the_solver():
    sigmas, x = _sigmas("ipndm"), _x()
    assert not torch.equal(zoo.sample_ipndm(denoiser, x, sigmas, max_order=2), zoo.sample_ipndm(denoiser, x, sigmas))
    native = gf.sample(MIXTURE, x_T=x, solver="tcd", schedule=sigmas, gamma=0.7, noise_sampler=_noise())
    torch.testing.assert_close(zoo.sample_tcd(denoiser, x, sigmas, gamma=0.7, noise_sampler=_noise()), native,
                               rtol=1e-12, atol=1e-12)
    scaled = zoo.sample_seeds_1(denoiser, x, sigmas, noise_sampler=_noise(), s_noise=0.5)
    halved = _noise()
    native = gf.sample(MIXTURE, x_T=x, solver="seeds_1", schedule=sigmas, noise_sampler=lambda a, b: 0.5 * halved(a, b))
    torch.testing.assert_close(scaled, native, rtol=1e-12, atol=1e-12)
    with pytest.raises(TypeError, match="unexpected keyword"):
        zoo.sample_ipndm(denoiser, x, sigmas, gamma=0.7)


def test_comfyui_style_call_seeds_the_default_noise():
    """KSAMPLER calls ``fn(model_k, noise, sigmas, extra_args=..., callback=..., disable=...)`` with a
    model taking ``**kwargs`` and ``extra_args['seed']``; the default noise is then ComfyUI's
    ``default_noise_sampler(x, seed)``: a CPU generator seeded with ``seed + 1``."""
    sigmas, x = _sigmas("lcm"), _x()
    received = []

    def model_k(x, sigma, **kwargs):
        received.append(sorted(kwargs))
        return MIXTURE.x0(x, sigma)

    extra = {"model_options": {"transformer_options": {}}, "seed": 41}
    ours = zoo.sample_lcm(model_k, x, sigmas, extra_args=extra, callback=lambda info: None, disable=True)
    g = torch.Generator().manual_seed(42)
    expect = gf.sample(MIXTURE, x_T=x, solver="lcm", schedule=sigmas,
                       noise_sampler=lambda a, b: torch.randn(x.shape, dtype=x.dtype, generator=g))
    torch.testing.assert_close(ours, expect, rtol=1e-12, atol=1e-12)
    assert received and all(keys == ["model_options", "seed"] for keys in received)


def test_default_noise_follows_the_global_rng_like_k_diffusion():
    sigmas, x = _sigmas("seeds_2"), _x()
    torch.manual_seed(3)
    ours = zoo.sample_seeds_2(denoiser, x, sigmas)
    torch.manual_seed(3)
    expect = gf.sample(MIXTURE, x_T=x, solver="seeds_2", schedule=sigmas,
                       noise_sampler=lambda a, b: torch.randn_like(x))
    torch.testing.assert_close(ours, expect, rtol=1e-12, atol=1e-12)


def test_dpmpp_2m_sde_heun_equals_k_diffusion_heun_solver_type():
    sampling = k_diffusion_sampling()
    sigmas, x = _sigmas("dpmpp_2m_sde_heun"), _x()
    ours = C.sample_dpmpp_2m_sde_heun(denoiser, x, sigmas, noise_sampler=_noise(), disable=True)
    ref = sampling.sample_dpmpp_2m_sde(denoiser, x, sigmas, noise_sampler=_noise(), disable=True, solver_type="heun")
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    midpoint = C.sample_dpmpp_2m_sde(denoiser, x, sigmas, noise_sampler=_noise(), disable=True)
    assert not torch.allclose(ours, midpoint)


def test_exported_from_the_package():
    for name in zoo.ENTRY_POINTS:
        assert getattr(C, f"sample_{name}") is getattr(zoo, f"sample_{name}")


@pytest.mark.parametrize("call, error, match", [
    (lambda: zoo.sample_ipndm("not a model", _x(), _sigmas("ipndm")), TypeError, "model must be a callable"),
    (lambda: zoo.sample_ipndm(denoiser, [1.0], _sigmas("ipndm")), TypeError, "x must be a torch.Tensor"),
    (lambda: zoo.sample_lcm(denoiser, _x(), torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64)), ValueError,
     "strictly decreasing"),
    (lambda: zoo.sample_lcm(denoiser, _x(), _sigmas("lcm"), noise_sampler=3), TypeError, "noise_sampler"),
    (lambda: zoo.sample_ald(denoiser, _x(), _sigmas("lcm")), ValueError, "sigma\\(t_end\\) > 0"),
])
def test_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_every_native_fixed_grid_sampler_has_an_entry_point():
    """k-diffusion's own samplers (``sample_euler``, ...) are drop-ins; every other fixed-grid native
    sampler, present or future, has its zoo entry point."""
    for name, cls in gf.solvers.SOLVERS.items():
        if not getattr(cls, "adaptive", False):
            assert callable(getattr(C, f"sample_{name}", None)), f"no k-diffusion-style entry point for {name!r}"
