"""k-diffusion's noise-level schedules (``get_sigmas_*``), bitwise as k-diffusion 0.1.1.post1 builds them."""
import math

import torch

from genflow._checks import check_int, check_real
from genflow.schedules import karras_levels, polyexponential_log_levels

__all__ = ["get_sigmas_exponential", "get_sigmas_karras", "get_sigmas_polyexponential", "get_sigmas_vp"]


def _append_zero(sigmas):
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def get_sigmas_karras(n, sigma_min, sigma_max, rho=7., device='cpu'):
    """The noise schedule of Karras et al. (2022), eq. 5, with a final 0 appended.

    ``sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``,
    ``i = 0..n-1``, built in float32 on the CPU and moved to ``device``. Matches k-diffusion's
    ``get_sigmas_karras``. Returns Tensor[n + 1].
    """
    n = check_int("n", n, low=1)
    check_real("sigma_min", sigma_min, low=0.0)
    check_real("sigma_max", sigma_max, low=0.0, low_open=True)
    check_real("rho", rho, low=0.0, low_open=True)
    return _append_zero(karras_levels(torch.linspace(0, 1, n), sigma_min, sigma_max, rho)).to(device)


def get_sigmas_exponential(n, sigma_min, sigma_max, device='cpu'):
    """An exponential schedule, ``log sigma`` evenly spaced from ``log sigma_max`` to
    ``log sigma_min`` (n points, float32 on ``device``), with a final 0 appended.

    Matches k-diffusion's ``get_sigmas_exponential``. Returns Tensor[n + 1].
    """
    n = check_int("n", n, low=1)
    check_real("sigma_min", sigma_min, low=0.0, low_open=True)
    check_real("sigma_max", sigma_max, low=0.0, low_open=True)
    log_sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), n, device=device)
    return _append_zero(log_sigmas.exp())


def get_sigmas_polyexponential(n, sigma_min, sigma_max, rho=1., device='cpu'):
    """A schedule polynomial in ``log sigma``: ``log sigma_i = log sigma_min + (1 - i/(n-1))^rho
    (log sigma_max - log sigma_min)`` (float32 on ``device``), with a final 0 appended.

    ``rho = 1`` is ``get_sigmas_exponential``. Matches k-diffusion's
    ``get_sigmas_polyexponential``. Returns Tensor[n + 1].
    """
    n = check_int("n", n, low=1)
    check_real("sigma_min", sigma_min, low=0.0, low_open=True)
    check_real("sigma_max", sigma_max, low=0.0, low_open=True)
    check_real("rho", rho, low=0.0, low_open=True)
    ramp = torch.linspace(1, 0, n, device=device)
    return _append_zero(torch.exp(polyexponential_log_levels(ramp, math.log(sigma_min), math.log(sigma_max), rho)))


def get_sigmas_vp(n, beta_d=19.9, beta_min=0.1, eps_s=1e-3, device='cpu'):
    """The continuous VP schedule of Song et al. (2021) as EDM noise levels, with a final 0.

    ``sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)`` at ``n`` times evenly spaced from
    1 to ``eps_s`` (Karras et al. 2022, Table 1; float32 on ``device``). Matches k-diffusion's
    ``get_sigmas_vp``. Returns Tensor[n + 1].
    """
    n = check_int("n", n, low=1)
    check_real("beta_d", beta_d)
    check_real("beta_min", beta_min)
    check_real("eps_s", eps_s, low=0.0, low_open=True)
    t = torch.linspace(1, eps_s, n, device=device)
    return _append_zero(torch.sqrt(torch.exp(beta_d * t ** 2 / 2 + beta_min * t) - 1))

