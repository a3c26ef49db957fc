"""The fast paths of ``gf.compat.k_diffusion`` behave as the full ones (no timings here).

A call with ``disable=True`` (no tqdm object) equals one with a progress bar; option checks that
are remembered for plain numbers still reject bad values on every call and treat an int, a float
and a NumPy number alike; and the peer's own result is met with the remembered checks in place.
"""
import numpy
import pytest
import torch

from genflow.compat import k_diffusion as C

from ..peers import k_diffusion_sampling


def _denoiser(x, sigma):
    return torch.tanh(x) / (1.0 + sigma[:, None] ** 2) ** 0.5


def _sigmas():
    return C.get_sigmas_karras(6, 0.03, 20.0, device="cpu").double()


def _x():
    return 5.0 * torch.randn(3, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.mark.parametrize("name", ["sample_euler", "sample_euler_ancestral", "sample_dpmpp_2m"])
def test_disabled_progress_bar_gives_the_same_sample(name):
    torch.manual_seed(3)
    quiet = getattr(C, name)(_denoiser, _x(), _sigmas(), disable=True)
    torch.manual_seed(3)
    shown = getattr(C, name)(_denoiser, _x(), _sigmas(), disable=False)
    assert torch.equal(quiet, shown)


@pytest.mark.parametrize("options, message", [
    (dict(s_churn=-1.0), "s_churn must be >= 0"),
    (dict(s_noise=float("nan")), "s_noise must be a finite number"),
    (dict(s_tmin=float("nan")), "s_tmin must be a finite number"),
])
def test_bad_churn_options_raise_on_every_call(options, message):
    for _ in range(2):  # the second call would hit a remembered check if a bad value were stored
        with pytest.raises(ValueError, match=message):
            C.sample_euler(_denoiser, _x(), _sigmas(), disable=True, **options)


def test_bad_noise_options_raise_on_every_call():
    for _ in range(2):
        with pytest.raises(ValueError, match="eta must be >= 0"):
            C.sample_euler_ancestral(_denoiser, _x(), _sigmas(), disable=True, eta=-0.5)
        with pytest.raises(TypeError, match="s_noise must be a real number"):
            C.sample_euler_ancestral(_denoiser, _x(), _sigmas(), disable=True, s_noise="1")


@pytest.mark.parametrize("s_churn", [1, 1.0, numpy.float64(1.0), torch.tensor(1.0)])
def test_option_number_types_give_the_same_sample(s_churn):
    torch.manual_seed(4)
    expected = C.sample_heun(_denoiser, _x(), _sigmas(), disable=True, s_churn=1.0, s_tmax=10.0)
    torch.manual_seed(4)
    got = C.sample_heun(_denoiser, _x(), _sigmas(), disable=True, s_churn=s_churn, s_tmax=10)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("name, options", [("sample_euler", dict(s_churn=2.0, s_tmin=0.1, s_tmax=10.0)),
                                           ("sample_euler_ancestral", dict(eta=0.7, s_noise=1.1))])
def test_repeated_calls_equal_k_diffusion(name, options):
    """The first call checks the options, later ones reuse the checks: every call equals the peer."""
    K = k_diffusion_sampling()
    if K is None:
        pytest.skip("k-diffusion is not installed")
    for _ in range(3):
        torch.manual_seed(5)
        ours = getattr(C, name)(_denoiser, _x(), _sigmas(), disable=True, **options)
        torch.manual_seed(5)
        theirs = getattr(K, name)(_denoiser, _x(), _sigmas(), disable=True, **options)
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
