"""Drop-in replacements for k-diffusion's samplers (``k_diffusion.sampling``), on genflow's fused engine.

Every ``sample_*`` function has the name, signature and defaults of k-diffusion 0.1.1.post1's
function of the same name and returns the same result for the same denoiser, sigmas and noise:
``model(x, sigma * s_in, **extra_args)`` is a k-diffusion denoiser returning the data
prediction, ``sigmas`` a decreasing noise-level schedule (``get_sigmas_*``, usually ending in 0),
``callback`` receives the dicts k-diffusion passes, and ``disable`` switches the tqdm bar off.
Each state update is one ``fused_update`` pass (``out = c0 x + sum_k c_k term_k + s z``); the
step scalars are computed on the host with k-diffusion's own scalar arithmetic (0-dim CPU
tensors in the dtype of ``sigmas``, or of the time grid for ``sample_dpm_fast`` and
``sample_dpm_adaptive``), so that float32 schedules give float32 step sizes as they do there,
and are passed to the kernel in float64.

Default noise consumes torch's global RNG exactly as k-diffusion does (the same draws, in the
same order, including the ones k-diffusion draws and discards), so ``torch.manual_seed(s)``
before either call gives the same sample. The SDE samplers whose default is k-diffusion's
``BrownianTreeNoiseSampler`` use ``BrownianTreeNoiseSampler`` below: torchsde's
``BrownianInterval`` with k-diffusion's construction when torchsde is installed (identical
noise), else genflow's Philox Brownian tree (``genflow.noise.BrownianTreeNoise``; a valid
Brownian path, but not torchsde's numbers).
"""
import math
import numbers
import warnings
from collections.abc import Mapping

import torch
from tqdm.auto import tqdm, trange

from genflow import _peers
from genflow.noise import BrownianTreeNoise
from genflow.ops.fused_update import MAX_TERMS, fused_update_unchecked, use_kernel
from genflow.solvers.runge_kutta import _lms_table

__all__ = [
    "BrownianTreeNoiseSampler", "get_sigmas_exponential", "get_sigmas_karras", "get_sigmas_polyexponential",
    "get_sigmas_vp", "sample_dpm_2", "sample_dpm_2_ancestral", "sample_dpm_adaptive", "sample_dpm_fast",
    "sample_dpmpp_2m", "sample_dpmpp_2m_sde", "sample_dpmpp_2s_ancestral", "sample_dpmpp_3m_sde",
    "sample_dpmpp_sde", "sample_euler", "sample_euler_ancestral", "sample_heun", "sample_lms",
]

_STATE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


# ---------------------------------------------------------------- schedules

def _check_count(n):
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    return int(n)


def _check_real(value, name, *, low=None, strict=False, finite=True):
    """A real number (float, int or 0-dim tensor) with an optional lower bound."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.dtype.is_complex:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if math.isnan(value) or (finite and math.isinf(value)):
        raise ValueError(f"{name} must be {'finite' if finite else 'a number'}, got {value}")
    if low is not None and (value <= low if strict else value < low):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {low}, got {value}")
    return value


def _append_zero(sigmas):
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def get_sigmas_karras(n, sigma_min, sigma_max, rho=7., device='cpu'):
    """The noise schedule of Karras et al. (2022), eq. 5, with a final 0 appended.

    ``sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``,
    ``i = 0..n-1``, built in float32 on the CPU and moved to ``device``. Matches k-diffusion's
    ``get_sigmas_karras``. Returns Tensor[n + 1].
    """
    n = _check_count(n)
    _check_real(sigma_min, "sigma_min", low=0.0)
    _check_real(sigma_max, "sigma_max", low=0.0, strict=True)
    _check_real(rho, "rho", low=0.0, strict=True)
    ramp = torch.linspace(0, 1, n)
    top, bottom = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return _append_zero((top + ramp * (bottom - top)) ** rho).to(device)


def get_sigmas_exponential(n, sigma_min, sigma_max, device='cpu'):
    """An exponential schedule, ``log sigma`` evenly spaced from ``log sigma_max`` to
    ``log sigma_min`` (n points, float32 on ``device``), with a final 0 appended.

    Matches k-diffusion's ``get_sigmas_exponential``. Returns Tensor[n + 1].
    """
    n = _check_count(n)
    _check_real(sigma_min, "sigma_min", low=0.0, strict=True)
    _check_real(sigma_max, "sigma_max", low=0.0, strict=True)
    log_sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), n, device=device)
    return _append_zero(log_sigmas.exp())


def get_sigmas_polyexponential(n, sigma_min, sigma_max, rho=1., device='cpu'):
    """A schedule polynomial in ``log sigma``: ``log sigma_i = log sigma_min + (1 - i/(n-1))^rho
    (log sigma_max - log sigma_min)`` (float32 on ``device``), with a final 0 appended.

    ``rho = 1`` is ``get_sigmas_exponential``. Matches k-diffusion's
    ``get_sigmas_polyexponential``. Returns Tensor[n + 1].
    """
    n = _check_count(n)
    _check_real(sigma_min, "sigma_min", low=0.0, strict=True)
    _check_real(sigma_max, "sigma_max", low=0.0, strict=True)
    _check_real(rho, "rho", low=0.0, strict=True)
    ramp = torch.linspace(1, 0, n, device=device) ** rho
    log_min = math.log(sigma_min)
    return _append_zero(torch.exp(ramp * (math.log(sigma_max) - log_min) + log_min))


def get_sigmas_vp(n, beta_d=19.9, beta_min=0.1, eps_s=1e-3, device='cpu'):
    """The continuous VP schedule of Song et al. (2021) as EDM noise levels, with a final 0.

    ``sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)`` at ``n`` times evenly spaced from
    1 to ``eps_s`` (Karras et al. 2022, Table 1; float32 on ``device``). Matches k-diffusion's
    ``get_sigmas_vp``. Returns Tensor[n + 1].
    """
    n = _check_count(n)
    _check_real(beta_d, "beta_d")
    _check_real(beta_min, "beta_min")
    _check_real(eps_s, "eps_s", low=0.0, strict=True)
    t = torch.linspace(1, eps_s, n, device=device)
    return _append_zero(torch.sqrt(torch.exp(beta_d * t ** 2 / 2 + beta_min * t) - 1))


# ---------------------------------------------------------------- argument checks

def _check_x(x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape [B, ...], got {type(x).__name__}")
    if x.dtype not in _STATE_DTYPES:
        raise TypeError(f"x must be float32, float64, float16 or bfloat16, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError("x must have a batch dimension (shape [B, ...]), got a 0-dim tensor")


def _check_sigmas(sigmas, sampler, *, decreasing):
    """Validate ``sigmas`` and return a detached CPU copy (the host side of every step).

    Every sampler needs a finite 1-D floating tensor, positive except for a final 0; the
    stochastic and log-sigma samplers also need it strictly decreasing.
    """
    if not isinstance(sigmas, torch.Tensor) or not sigmas.is_floating_point():
        got = sigmas.dtype if isinstance(sigmas, torch.Tensor) else type(sigmas).__name__
        raise TypeError(f"sigmas must be a 1-D floating tensor (e.g. from get_sigmas_karras), got {got}")
    if sigmas.dim() != 1 or sigmas.numel() < 1:
        raise ValueError(f"sigmas must be 1-D with at least one entry, got shape {list(sigmas.shape)}")
    host = sigmas.detach().cpu()
    if not bool(torch.isfinite(host).all()):
        raise ValueError(f"sigmas must be finite, got {host.tolist()}")
    if bool((host[:-1] <= 0).any()) or bool(host[-1] < 0):
        raise ValueError(f"sigmas must be positive (only the last may be 0), got {host.tolist()}")
    if decreasing and bool((host[1:] >= host[:-1]).any()):
        raise ValueError(f"sigmas must be strictly decreasing for {sampler}, got {host.tolist()}")
    return host


def _check_callables(model, extra_args, callback, noise_sampler=None):
    if not callable(model):
        raise TypeError(f"model must be a callable denoiser model(x, sigma, **extra_args), got {type(model).__name__}")
    if extra_args is not None and not isinstance(extra_args, Mapping):
        raise TypeError(f"extra_args must be None or a dict of keyword arguments for model, got {type(extra_args).__name__}")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be None or callable, got {type(callback).__name__}")
    if noise_sampler is not None and not callable(noise_sampler):
        raise TypeError(f"noise_sampler must be None or callable(sigma, sigma_next), got {type(noise_sampler).__name__}")


def _check_churn(s_churn, s_tmin, s_tmax, s_noise):
    return (_check_real(s_churn, "s_churn", low=0.0), _check_real(s_tmin, "s_tmin", finite=False),
            _check_real(s_tmax, "s_tmax", finite=False), _check_real(s_noise, "s_noise"))


# ---------------------------------------------------------------- the engine side

class _Run:
    """One sampler call: denoiser evaluations, noise draws and fused updates on the state."""

    def __init__(self, model, x, extra_args, callback):
        self.model = model
        self.extra = {} if extra_args is None else extra_args
        self.callback = callback
        self.like = x  # the template of every randn_like draw (k-diffusion's default_noise_sampler(x))
        self.kernel = use_kernel("auto", x.device)

    def _as_state(self, t, what):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what} must return a tensor, got {type(t).__name__}")
        if t.shape != self.like.shape:
            raise ValueError(f"{what} must return a tensor of x's shape {list(self.like.shape)}, got {list(t.shape)}")
        if t.dtype != self.like.dtype or t.device != self.like.device:
            t = t.to(device=self.like.device, dtype=self.like.dtype)
        return t

    def denoise(self, x, sigma):
        """``model(x, sigma * s_in, **extra_args)``; ``sigma`` a float or 0-dim host tensor."""
        s = torch.full((x.shape[0],), float(sigma), dtype=x.dtype, device=x.device)
        return self._as_state(self.model(x, s, **self.extra), "model")

    def randn(self):
        return torch.randn_like(self.like)

    def draw(self, noise_sampler, sigma, sigma_next):
        return self._as_state(noise_sampler(sigma, sigma_next), "noise_sampler")

    def emit(self, info):
        if self.callback is not None:
            self.callback(info)

    def combine(self, parts, noise=None, scale=0.0):
        """``sum_k c_k v_k + scale * noise`` for ``parts = [(c_k, v_k)]`` in one fused pass.

        Coefficients (floats or 0-dim tensors) are summed per distinct tensor and exact zeros are
        dropped; more than ``MAX_TERMS + 1`` tensors (``sample_lms`` with ``order > 4``) take
        further passes.
        """
        coefs, terms = [], []
        for c, v in parts:
            c = float(c)
            for k, t in enumerate(terms):
                if t is v:
                    coefs[k] += c
                    break
            else:
                terms.append(v)
                coefs.append(c)
        kept = [(c, t) for c, t in zip(coefs, terms) if c != 0.0] or [(0.0, terms[0])]
        scale = float(scale)
        if noise is None or scale == 0.0:
            noise, scale = None, 0.0
        (c0, x), rest = kept[0], kept[1:]
        while True:
            chunk, rest = rest[:MAX_TERMS], rest[MAX_TERMS:]
            last = not rest
            x = fused_update_unchecked(x, [t for _, t in chunk], [c0] + [c for c, _ in chunk] + [scale if last else 0.0],
                                       kernel=self.kernel, noise=noise if last else None)
            if last:
                return x
            c0 = 1.0


def _default_noise_sampler(run):
    return lambda sigma, sigma_next: run.randn()


def _ancestral_step(sigma_from, sigma_to, eta):
    """``(sigma_down, sigma_up)`` of an ancestral step, as k-diffusion's ``get_ancestral_step``:
    ``sigma_up = min(sigma_to, eta sigma_to sqrt(1 - sigma_to^2/sigma_from^2))``,
    ``sigma_down = sqrt(sigma_to^2 - sigma_up^2)``; ``(sigma_to, 0)`` when ``eta = 0``."""
    if not eta:
        return sigma_to, 0.
    up = min(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
    return (sigma_to ** 2 - up ** 2) ** 0.5, up


def _sigma_of(t):
    return t.neg().exp()


def _t_of(sigma):
    return sigma.log().neg()


def _euler(x, den, sigma, sigma_next):
    """Parts of ``x + (sigma' - sigma) (x - den)/sigma`` (Euler on ``dx/dsigma = (x - D)/sigma``)."""
    c = float(sigma_next - sigma) / float(sigma)
    return [(1.0 + c, x), (-c, den)]


class BrownianTreeNoiseSampler:
    """Noise from one Brownian path ``W(t)``: ``(W(t') - W(t)) / sqrt|t' - t|`` with
    ``t = transform(sigma)``, so the noise of every step is an increment of the same path.

    Matches k-diffusion's ``BrownianTreeNoiseSampler`` (same arguments and seeding: ``seed=None``
    draws ``torch.randint(0, 2**63 - 1, [])`` from the global RNG; a list of B seeds gives one
    path per sample). With torchsde installed each path is a torchsde ``BrownianInterval``
    built as ``torchsde.BrownianTree`` builds it (``tol=1e-6``, ``pool_size=24``, halfway tree),
    which reproduces k-diffusion's numbers; without torchsde it is genflow's Philox Brownian
    tree (``genflow.noise.BrownianTreeNoise``), a Brownian path with other numbers. Queries
    outside ``[sigma_min, sigma_max]`` (e.g. ``exp(log sigma)`` rounded) are clamped to it,
    silently (torchsde clamps with a warning).

    Args:
        x (Tensor[B, *D]): shape, dtype and device of the noise.
        sigma_min, sigma_max (float or 0-dim Tensor): the interval of the path.
        seed (int or list of B ints, optional): the path's entropy.
        transform (callable, optional): maps sigma (a 0-dim tensor) to the path's time
            (default: the identity).
    """

    def __init__(self, x, sigma_min, sigma_max, seed=None, transform=None):
        _check_x(x)
        self.transform = (lambda v: v) if transform is None else transform
        a = self.transform(torch.as_tensor(sigma_min))
        b = self.transform(torch.as_tensor(sigma_max))
        self.sign = 1 if a < b else -1
        self.lo, self.hi = (float(a), float(b)) if a < b else (float(b), float(a))
        if seed is None:
            seed = torch.randint(0, 2 ** 63 - 1, []).item()
        self.batched = isinstance(seed, (list, tuple)) or (isinstance(seed, torch.Tensor) and seed.dim() == 1)
        if self.batched and len(seed) != x.shape[0]:
            raise ValueError(f"seed must be an int or a list of B = {x.shape[0]} ints, got {len(seed)} seeds")
        torchsde = _peers.optional("torchsde")
        if torchsde is not None:
            shape = x.shape[1:] if self.batched else x.shape
            seeds = [int(s) for s in seed] if self.batched else [int(seed)]
            self.paths = [torchsde.BrownianInterval(t0=self.lo, t1=self.hi, size=shape, dtype=x.dtype, device=x.device,
                                                    entropy=s, tol=1e-6, pool_size=24, halfway_tree=True)
                          for s in seeds]
            self.tree = None
        else:
            tree_seed = torch.as_tensor([int(s) for s in seed], dtype=torch.int64) if self.batched else int(seed)
            self.tree = BrownianTreeNoise(tree_seed, self.hi, sigma_min=self.lo)
            self.like = x

    def __call__(self, sigma, sigma_next):
        t0 = self.transform(torch.as_tensor(sigma))
        t1 = self.transform(torch.as_tensor(sigma_next))
        if self.tree is not None:
            a, b = (min(max(float(t), self.lo), self.hi) for t in (t0, t1))
            return self.tree.draw(self.like, a, b)["noise"] * self.sign
        lo, hi, sign = (t0, t1, 1) if t0 < t1 else (t1, t0, -1)
        with warnings.catch_warnings():  # torchsde warns when it clamps a query rounded just outside
            warnings.filterwarnings("ignore", message="Should have", category=UserWarning)
            w = torch.stack([path(lo, hi) for path in self.paths]) * (self.sign * sign)
        return (w if self.batched else w[0]) / (t1 - t0).abs().sqrt()


def _sde_noise_sampler(x, host, noise_sampler):
    """k-diffusion's default for the SDE samplers: a Brownian tree over the positive sigmas."""
    if noise_sampler is not None:
        return noise_sampler
    return BrownianTreeNoiseSampler(x, host[host > 0].min(), host.max())


# ---------------------------------------------------------------- Karras et al. (2022), Algorithm 2

def _churn(run, x, host, i, s_churn, s_tmin, s_tmax, s_noise):
    """Algorithm 2's churn: ``gamma = min(s_churn/N, sqrt 2 - 1)`` inside ``[s_tmin, s_tmax]``,
    ``sigma_hat = (1 + gamma) sigma``, ``x_hat = x + s_noise sqrt(sigma_hat^2 - sigma^2) z``.
    Draws ``z`` on every step, as k-diffusion does (so the global RNG advances the same)."""
    sigma = host[i]
    gamma = min(s_churn / (len(host) - 1), 2 ** 0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.
    z = run.randn()
    sigma_hat = sigma * (gamma + 1)
    if gamma > 0:
        x = run.combine([(1.0, x)], z, s_noise * float((sigma_hat ** 2 - sigma ** 2) ** 0.5))
    return x, sigma_hat


def _karras_loop(name, second_stage, model, x, sigmas, extra_args, callback, disable, s_churn, s_tmin, s_tmax, s_noise):
    _check_x(x)
    _check_callables(model, extra_args, callback)
    host = _check_sigmas(sigmas, name, decreasing=False)
    s_churn, s_tmin, s_tmax, s_noise = _check_churn(s_churn, s_tmin, s_tmax, s_noise)
    run = _Run(model, x, extra_args, callback)
    for i in trange(len(sigmas) - 1, disable=disable):
        x, sigma_hat = _churn(run, x, host, i, s_churn, s_tmin, s_tmax, s_noise)
        den = run.denoise(x, sigma_hat)
        if callback is not None:
            callback({'x': x, 'i': i, 'sigma': sigmas[i], 'sigma_hat': sigma_hat.to(sigmas.device), 'denoised': den})
        if second_stage is None or host[i + 1] == 0:
            x = run.combine(_euler(x, den, sigma_hat, host[i + 1]))
        else:
            x = second_stage(run, x, den, sigma_hat, host[i + 1])
    return x


def _heun_stage(run, x, den, sigma, sigma_next):
    # x2 = x + dt d;  x' = x + dt (d + d2)/2 with d = (x - D)/sigma, d2 = (x2 - D2)/sigma'
    x2 = run.combine(_euler(x, den, sigma, sigma_next))
    den2 = run.denoise(x2, sigma_next)
    dt = float(sigma_next - sigma)
    a, b = dt / (2 * float(sigma)), dt / (2 * float(sigma_next))
    return run.combine([(1.0 + a, x), (-a, den), (b, x2), (-b, den2)])


def _dpm_2_stage(run, x, den, sigma, sigma_next):
    # sigma_m = sqrt(sigma sigma'): x2 = x + (sigma_m - sigma) d;  x' = x + (sigma' - sigma) (x2 - D2)/sigma_m
    sigma_mid = sigma.log().lerp(sigma_next.log(), 0.5).exp()
    x2 = run.combine(_euler(x, den, sigma, sigma_mid))
    den2 = run.denoise(x2, sigma_mid)
    c = float(sigma_next - sigma) / float(sigma_mid)
    return run.combine([(1.0, x), (c, x2), (-c, den2)])


@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0., s_tmax=float('inf'), s_noise=1.):
    """Euler steps with churn: Algorithm 2 of Karras et al. (2022) without the Heun correction.

    ``x' = x_hat + (sigma_{i+1} - sigma_hat) (x_hat - D(x_hat, sigma_hat)) / sigma_hat`` after the
    churn ``x_hat = x + s_noise sqrt(sigma_hat^2 - sigma_i^2) z``, ``sigma_hat = (1 + gamma) sigma_i``.
    Order 1, 1 NFE per step. Matches k-diffusion's ``sample_euler``.
    """
    return _karras_loop("sample_euler", None, model, x, sigmas, extra_args, callback, disable,
                        s_churn, s_tmin, s_tmax, s_noise)


@torch.no_grad()
def sample_heun(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0., s_tmax=float('inf'), s_noise=1.):
    """Heun steps with churn: Algorithm 2 of Karras et al. (2022).

    ``x~ = x_hat + h d``, ``x' = x_hat + h (d + d~)/2`` with ``h = sigma_{i+1} - sigma_hat``,
    ``d = (x_hat - D(x_hat, sigma_hat))/sigma_hat``, ``d~ = (x~ - D(x~, sigma_{i+1}))/sigma_{i+1}``;
    a step to ``sigma = 0`` is Euler. Order 2, 2 NFE per step. Matches k-diffusion's ``sample_heun``.
    """
    return _karras_loop("sample_heun", _heun_stage, model, x, sigmas, extra_args, callback, disable,
                        s_churn, s_tmin, s_tmax, s_noise)


@torch.no_grad()
def sample_dpm_2(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0., s_tmax=float('inf'), s_noise=1.):
    """k-diffusion's DPM-2: Algorithm 2 of Karras et al. (2022) with a midpoint in log sigma
    (inspired by DPM-Solver-2, Lu et al. 2022).

    ``sigma_m = sqrt(sigma_hat sigma_{i+1})``, ``x_m = x_hat + (sigma_m - sigma_hat) d``,
    ``x' = x_hat + (sigma_{i+1} - sigma_hat) (x_m - D(x_m, sigma_m))/sigma_m``; a step to
    ``sigma = 0`` is Euler. Order 2, 2 NFE per step. Matches k-diffusion's ``sample_dpm_2``.
    """
    return _karras_loop("sample_dpm_2", _dpm_2_stage, model, x, sigmas, extra_args, callback, disable,
                        s_churn, s_tmin, s_tmax, s_noise)


# ---------------------------------------------------------------- ancestral samplers

def _ancestral_setup(name, model, x, sigmas, extra_args, callback, eta, s_noise, noise_sampler):
    _check_x(x)
    _check_callables(model, extra_args, callback, noise_sampler)
    host = _check_sigmas(sigmas, name, decreasing=True)
    eta, s_noise = _check_real(eta, "eta", low=0.0), _check_real(s_noise, "s_noise")
    run = _Run(model, x, extra_args, callback)
    noise_sampler = _default_noise_sampler(run) if noise_sampler is None else noise_sampler
    return run, host, eta, s_noise, noise_sampler


def _step_info(x, i, sigmas, den):
    return {'x': x, 'i': i, 'sigma': sigmas[i], 'sigma_hat': sigmas[i], 'denoised': den}


@torch.no_grad()
def sample_euler_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1., noise_sampler=None):
    """Ancestral sampling with Euler steps.

    ``x' = x + (sigma_down - sigma) (x - D(x, sigma))/sigma + s_noise sigma_up z`` with
    ``sigma_up = min(sigma', eta sigma' sqrt(1 - sigma'^2/sigma^2))``,
    ``sigma_down = sqrt(sigma'^2 - sigma_up^2)``; ``eta = 1`` is ancestral DDPM sampling
    (Ho et al. 2020) in EDM variables. 1 NFE per step. Matches k-diffusion's
    ``sample_euler_ancestral``.
    """
    run, host, eta, s_noise, noise_sampler = _ancestral_setup("sample_euler_ancestral", model, x, sigmas, extra_args,
                                                              callback, eta, s_noise, noise_sampler)
    for i in trange(len(sigmas) - 1, disable=disable):
        den = run.denoise(x, host[i])
        sigma_down, sigma_up = _ancestral_step(host[i], host[i + 1], eta)
        run.emit(_step_info(x, i, sigmas, den))
        noise = run.draw(noise_sampler, sigmas[i], sigmas[i + 1]) if host[i + 1] > 0 else None
        x = run.combine(_euler(x, den, host[i], sigma_down), noise, s_noise * float(sigma_up))
    return x


@torch.no_grad()
def sample_dpm_2_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1., noise_sampler=None):
    """Ancestral sampling with k-diffusion's DPM-2 steps.

    The ``sample_dpm_2`` step from ``sigma`` to ``sigma_down`` (midpoint ``sqrt(sigma sigma_down)``),
    then ``+ s_noise sigma_up z`` (``sigma_up``, ``sigma_down`` as in ``sample_euler_ancestral``);
    a step with ``sigma_down = 0`` is Euler and adds no noise, as in k-diffusion. 2 NFE per step.
    Matches k-diffusion's ``sample_dpm_2_ancestral``.
    """
    run, host, eta, s_noise, noise_sampler = _ancestral_setup("sample_dpm_2_ancestral", model, x, sigmas, extra_args,
                                                              callback, eta, s_noise, noise_sampler)
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma = host[i]
        den = run.denoise(x, sigma)
        sigma_down, sigma_up = _ancestral_step(sigma, host[i + 1], eta)
        run.emit(_step_info(x, i, sigmas, den))
        if sigma_down == 0:
            x = run.combine(_euler(x, den, sigma, sigma_down))
            continue
        sigma_mid = sigma.log().lerp(sigma_down.log(), 0.5).exp()
        x2 = run.combine(_euler(x, den, sigma, sigma_mid))
        den2 = run.denoise(x2, sigma_mid)
        noise = run.draw(noise_sampler, sigmas[i], sigmas[i + 1])
        c = float(sigma_down - sigma) / float(sigma_mid)
        x = run.combine([(1.0, x), (c, x2), (-c, den2)], noise, s_noise * float(sigma_up))
    return x


@torch.no_grad()
def sample_dpmpp_2s_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1., noise_sampler=None):
    """Ancestral sampling with DPM-Solver++(2S) steps (Lu et al. 2022b, Algorithm 1, r = 1/2).

    With ``t = -log sigma``, ``t' = -log sigma_down``, ``h = t' - t``, ``s = t + h/2``:
    ``u = (sigma_s/sigma) x - expm1(-h/2) D(x, sigma)``,
    ``x' = (sigma_down/sigma) x - expm1(-h) D(u, sigma_s) + s_noise sigma_up z``; a step with
    ``sigma_down = 0`` is Euler. 2 NFE per step. Matches k-diffusion's ``sample_dpmpp_2s_ancestral``.
    """
    run, host, eta, s_noise, noise_sampler = _ancestral_setup("sample_dpmpp_2s_ancestral", model, x, sigmas,
                                                              extra_args, callback, eta, s_noise, noise_sampler)
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma = host[i]
        den = run.denoise(x, sigma)
        sigma_down, sigma_up = _ancestral_step(sigma, host[i + 1], eta)
        run.emit(_step_info(x, i, sigmas, den))
        if sigma_down == 0:
            parts = _euler(x, den, sigma, sigma_down)
        else:
            t, t_next = _t_of(sigma), _t_of(sigma_down)
            h = t_next - t
            s = t + 0.5 * h
            u = run.combine([(_sigma_of(s) / _sigma_of(t), x), (-(-h * 0.5).expm1(), den)])
            den2 = run.denoise(u, _sigma_of(s))
            parts = [(_sigma_of(t_next) / _sigma_of(t), x), (-(-h).expm1(), den2)]
        noise = run.draw(noise_sampler, sigmas[i], sigmas[i + 1]) if host[i + 1] > 0 else None
        x = run.combine(parts, noise, s_noise * float(sigma_up))
    return x


# ---------------------------------------------------------------- linear multistep

@torch.no_grad()
def sample_lms(model, x, sigmas, extra_args=None, callback=None, disable=None, order=4):
    """Linear multistep (Adams–Bashforth in sigma) on ``dx/dsigma = (x - D(x, sigma))/sigma``.

    ``x' = x + sum_j c_j d_{i-j}`` over the last ``K = min(order, i + 1)`` derivatives, with
    ``c_j = int_{sigma_i}^{sigma_{i+1}} l_j`` the integral of the Lagrange basis polynomial of the
    nodes ``sigma_i..sigma_{i-K+1}`` that is 1 at ``sigma_{i-j}`` (genflow's exact integrals;
    k-diffusion integrates the same polynomials with ``scipy.integrate.quad``). 1 NFE per step.
    Matches k-diffusion's ``sample_lms``.
    """
    _check_x(x)
    _check_callables(model, extra_args, callback)
    if isinstance(order, bool) or not isinstance(order, numbers.Integral) or order < 1:
        raise ValueError(f"order must be an integer >= 1, got {order!r}")
    host = _check_sigmas(sigmas, "sample_lms", decreasing=False)
    table = [[float(c) for c in row] for row in _lms_table(host.to(torch.float64), int(order))]
    run = _Run(model, x, extra_args, callback)
    ds = []  # earlier derivatives, newest first
    steps = len(sigmas) - 1
    for i in trange(steps, disable=disable):
        den = run.denoise(x, host[i])
        run.emit(_step_info(x, i, sigmas, den))
        coefs = table[i]
        a = coefs[0] / float(host[i])
        parts = [(1.0 + a, x), (-a, den)] + list(zip(coefs[1:], ds))
        if order > 1 and i + 1 < steps:
            inv = 1.0 / float(host[i])
            ds = [run.combine([(inv, x), (-inv, den)])] + ds[:order - 2]
        x = run.combine(parts)
    return x


# ---------------------------------------------------------------- DPM-Solver (Lu et al. 2022)

class _PIDController:
    """PID step-size control (Söderlind 2003) with k-diffusion's limiter ``1 + atan(f - 1)``.

    ``f = e_n^{b1} e_{n-1}^{b2} e_{n-2}^{b3}`` on inverse errors ``e = 1/(err + eps)``, with
    ``b1 = (kP + kI + kD)/k``, ``b2 = -(kP + 2 kD)/k``, ``b3 = kD/k``; a step is accepted when the
    limited factor is ``>= accept_safety``; ``h`` is multiplied by it either way.
    """

    def __init__(self, h, pcoeff, icoeff, dcoeff, order, accept_safety, eps=1e-8):
        self.h = h
        self.b = ((pcoeff + icoeff + dcoeff) / order, -(pcoeff + 2 * dcoeff) / order, dcoeff / order)
        self.accept_safety, self.eps = accept_safety, eps
        self.inv_errors = None  # [current, previous accepted, the one before]

    def propose_step(self, error):
        inv = 1 / (float(error) + self.eps)
        if self.inv_errors is None:
            self.inv_errors = [inv, inv, inv]
        e = self.inv_errors
        e[0] = inv
        factor = e[0] ** self.b[0] * e[1] ** self.b[1] * e[2] ** self.b[2]
        factor = 1 + math.atan(factor - 1)
        accept = factor >= self.accept_safety
        if accept:
            e[1], e[2] = e[0], e[1]
        self.h *= factor
        return accept


class _DPMSolver:
    """DPM-Solver-1/2/3 steps in ``t = -log sigma`` with noise prediction
    ``eps = (x - D(x, sigma))/sigma`` (Lu et al. 2022, eq. 3.7 and Algorithms 1, 2).

    An ``eps`` is kept as ``(state, D, sigma)`` and folded into the fused update's coefficients.
    Scalars are 0-dim host tensors in the time grid's dtype, as in k-diffusion's ``DPMSolver``.
    """

    def __init__(self, run, pbar):
        self.run, self.pbar = run, pbar

    def eps(self, cache, key, x, t):
        if key not in cache:
            sigma = _sigma_of(t)
            den = self.run.denoise(x, sigma)
            self.pbar.update()
            cache[key] = (x, den, float(sigma))
        return cache[key]

    @staticmethod
    def parts(x, cx, eps_terms):
        """Parts of ``cx x + sum_k c_k eps_k`` for ``eps_terms = [(c_k, eps_k)]``."""
        parts = [(cx, x)]
        for c, (state, den, sigma) in eps_terms:
            c = float(c) / sigma
            parts += [(c, state), (-c, den)]
        return parts

    def step_1(self, x, t, t_next, cache):
        """Parts of ``x - sigma' expm1(h) eps``."""
        h = t_next - t
        e = self.eps(cache, 'eps', x, t)
        return self.parts(x, 1.0, [(-(_sigma_of(t_next) * h.expm1()), e)])

    def step_2(self, x, t, t_next, cache, r1=1 / 2):
        """Parts of ``x - sigma' expm1(h) eps - sigma'/(2 r1) expm1(h) (eps_1 - eps)``."""
        h = t_next - t
        e = self.eps(cache, 'eps', x, t)
        s1 = t + r1 * h
        u1 = self.run.combine(self.parts(x, 1.0, [(-(_sigma_of(s1) * (r1 * h).expm1()), e)]))
        e1 = self.eps(cache, 'eps_r1', u1, s1)
        a = float(_sigma_of(t_next) * h.expm1())
        b = float(_sigma_of(t_next) / (2 * r1) * h.expm1())
        return self.parts(x, 1.0, [(b - a, e), (-b, e1)])

    def step_3(self, x, t, t_next, cache, r1=1 / 3, r2=2 / 3):
        """Parts of ``x - sigma' expm1(h) eps - sigma'/r2 (expm1(h)/h - 1) (eps_2 - eps)``."""
        h = t_next - t
        e = self.eps(cache, 'eps', x, t)
        s1, s2 = t + r1 * h, t + r2 * h
        u1 = self.run.combine(self.parts(x, 1.0, [(-(_sigma_of(s1) * (r1 * h).expm1()), e)]))
        e1 = self.eps(cache, 'eps_r1', u1, s1)
        a = float(_sigma_of(s2) * (r2 * h).expm1())
        b = float(_sigma_of(s2) * (r2 / r1) * ((r2 * h).expm1() / (r2 * h) - 1))
        u2 = self.run.combine(self.parts(x, 1.0, [(b - a, e), (-b, e1)]))
        e2 = self.eps(cache, 'eps_r2', u2, s2)
        a = float(_sigma_of(t_next) * h.expm1())
        b = float(_sigma_of(t_next) / r2 * (h.expm1() / h - 1))
        return self.parts(x, 1.0, [(b - a, e), (-b, e2)])

    def noisy_target(self, s, t, t_end, eta):
        """``(t_down, sigma_up)``: the ancestral step from ``sigma(s)`` to ``sigma(t)`` in t-space,
        ``t_down`` capped at ``t_end``, and the noise that restores ``sigma(t)``."""
        if not eta:
            return t, 0.
        sigma_down, _ = _ancestral_step(_sigma_of(s), _sigma_of(t), eta)
        t_down = torch.minimum(t_end, _t_of(sigma_down))
        return t_down, (_sigma_of(t) ** 2 - _sigma_of(t_down) ** 2) ** 0.5


def _dpm_setup(name, model, x, sigma_min, sigma_max, extra_args, callback, eta, s_noise, noise_sampler):
    _check_x(x)
    _check_callables(model, extra_args, callback, noise_sampler)
    smin = _check_real(sigma_min, "sigma_min")
    smax = _check_real(sigma_max, "sigma_max")
    if smin <= 0 or smax <= 0:
        raise ValueError(f"sigma_min and sigma_max must be > 0 for {name}, got sigma_min={smin}, sigma_max={smax}")
    eta, s_noise = _check_real(eta, "eta", low=0.0), _check_real(s_noise, "s_noise")
    # k-diffusion's time grid: t = -log(torch.tensor(sigma)), in torch's default dtype for floats
    t_start = _t_of(torch.as_tensor(sigma_max).detach().cpu())
    t_end = _t_of(torch.as_tensor(sigma_min).detach().cpu())
    if not t_end > t_start and eta:
        raise ValueError(f"eta must be 0 for reverse sampling (sigma_min > sigma_max), got eta={eta}")
    run = _Run(model, x, extra_args, None)
    noise_sampler = _default_noise_sampler(run) if noise_sampler is None else noise_sampler
    return run, t_start, t_end, eta, s_noise, noise_sampler


def _emit_dpm(callback, info):
    if callback is not None:
        callback({'sigma': _sigma_of(info['t']), 'sigma_hat': _sigma_of(info['t_up']), **info})


@torch.no_grad()
def sample_dpm_fast(model, x, sigma_min, sigma_max, n, extra_args=None, callback=None, disable=None, eta=0., s_noise=1., noise_sampler=None):
    """DPM-Solver-Fast (Lu et al. 2022, §3.4): fixed steps in ``t = -log sigma`` with orders chosen
    to spend exactly ``n`` model evaluations.

    ``m = floor(n/3) + 1`` uniform steps from ``-log sigma_max`` to ``-log sigma_min``, of orders
    ``[3]*(m-2) + [2, 1]`` when ``3 | n``, else ``[3]*(m-1) + [n mod 3]``; each a DPM-Solver-k
    step (``x' = x - sigma' expm1(h) eps + ...``), with ``eta > 0`` an ancestral one. Matches
    k-diffusion's ``sample_dpm_fast`` (including its float32 time grid).
    """
    run, t_start, t_end, eta, s_noise, noise_sampler = _dpm_setup("sample_dpm_fast", model, x, sigma_min, sigma_max,
                                                                  extra_args, callback, eta, s_noise, noise_sampler)
    n = _check_count(n)
    m = n // 3 + 1
    ts = torch.linspace(t_start, t_end, m + 1)
    orders = [3] * (m - 2) + [2, 1] if n % 3 == 0 else [3] * (m - 1) + [n % 3]
    with tqdm(total=n, disable=disable) as pbar:
        solver = _DPMSolver(run, pbar)
        for i, order in enumerate(orders):
            cache = {}
            t, t_next = ts[i], ts[i + 1]
            t_down, sigma_up = solver.noisy_target(t, t_next, t_end, eta)
            e = solver.eps(cache, 'eps', x, t)
            _emit_dpm(callback, {'x': x, 'i': i, 't': t, 't_up': t, 'denoised': e[1]})
            step = (solver.step_1, solver.step_2, solver.step_3)[order - 1]
            parts = step(x, t, t_down, cache)
            noise = run.draw(noise_sampler, _sigma_of(t), _sigma_of(t_next))
            x = run.combine(parts, noise, float(sigma_up * s_noise))
    return x


@torch.no_grad()
def sample_dpm_adaptive(model, x, sigma_min, sigma_max, extra_args=None, callback=None, disable=None, order=3, rtol=0.05, atol=0.0078, h_init=0.05, pcoeff=0., icoeff=1., dcoeff=0., accept_safety=0.81, eta=0., s_noise=1., noise_sampler=None, return_info=False):
    """DPM-Solver-12 / DPM-Solver-23 with adaptive steps (Lu et al. 2022, §3.4 and Appendix C).

    Each attempt from ``s`` to ``t = s + h`` computes a low (DPM-Solver-1, or -2 with
    ``r1 = 1/3``) and a high (DPM-Solver-2, or -3) order solution sharing evaluations; the error
    ``||(x_low - x_high) / max(atol, rtol max(|x_low|, |x_prev|))||_2 / sqrt(numel)`` drives a PID
    controller (``pcoeff``, ``icoeff``, ``dcoeff``, ``accept_safety``). ``order`` NFE per attempt.
    Matches k-diffusion's ``sample_dpm_adaptive`` (including its float32 time grid); with
    ``return_info`` also returns ``{'steps', 'nfe', 'n_accept', 'n_reject'}``.
    """
    run, t_start, t_end, eta, s_noise, noise_sampler = _dpm_setup("sample_dpm_adaptive", model, x, sigma_min,
                                                                  sigma_max, extra_args, callback, eta, s_noise,
                                                                  noise_sampler)
    if order not in {2, 3}:
        raise ValueError(f"order must be 2 or 3, got {order!r}")
    rtol_f = _check_real(rtol, "rtol", low=0.0)
    atol_f = _check_real(atol, "atol", low=0.0)
    h_init = _check_real(h_init, "h_init")
    if h_init == 0:
        raise ValueError("h_init must be nonzero, got 0.0")
    accept_safety = _check_real(accept_safety, "accept_safety")
    forward = bool(t_end > t_start)
    h_init = abs(h_init) * (1 if forward else -1)
    atol_t, rtol_t = torch.tensor(atol_f), torch.tensor(rtol_f)
    pid = _PIDController(h_init, _check_real(pcoeff, "pcoeff"), _check_real(icoeff, "icoeff"),
                         _check_real(dcoeff, "dcoeff"), 1.5 if eta else order, accept_safety)
    info = {'steps': 0, 'nfe': 0, 'n_accept': 0, 'n_reject': 0}
    s, x_prev = t_start, x
    with tqdm(disable=disable) as pbar:
        solver = _DPMSolver(run, pbar)
        while s < t_end - 1e-5 if forward else s > t_end + 1e-5:
            cache = {}
            t = torch.minimum(t_end, s + pid.h) if forward else torch.maximum(t_end, s + pid.h)
            t_down, sigma_up = solver.noisy_target(s, t, t_end, eta)
            den = solver.eps(cache, 'eps', x, s)[1]
            if order == 2:
                x_low = run.combine(solver.step_1(x, s, t_down, cache))
                x_high = run.combine(solver.step_2(x, s, t_down, cache))
            else:
                x_low = run.combine(solver.step_2(x, s, t_down, cache, r1=1 / 3))
                x_high = run.combine(solver.step_3(x, s, t_down, cache))
            scale = torch.maximum(atol_t, rtol_t * torch.maximum(x_low.abs(), x_prev.abs()))
            error = torch.linalg.norm((x_low - x_high) / scale) / x.numel() ** 0.5
            if pid.propose_step(error):
                x_prev = x_low
                noise = run.draw(noise_sampler, _sigma_of(s), _sigma_of(t))
                x = run.combine([(1.0, x_high)], noise, float(sigma_up * s_noise))
                s = t
                info['n_accept'] += 1
            else:
                info['n_reject'] += 1
            info['nfe'] += order
            info['steps'] += 1
            _emit_dpm(callback, {'x': x, 'i': info['steps'] - 1, 't': s, 't_up': s, 'denoised': den,
                                 'error': error, 'h': pid.h, **info})
    return (x, info) if return_info else x


# ---------------------------------------------------------------- DPM-Solver++ (Lu et al. 2022b)

@torch.no_grad()
def sample_dpmpp_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1., noise_sampler=None, r=1 / 2):
    """k-diffusion's DPM-Solver++ (stochastic): a two-stage DPM-Solver++ step with ancestral noise
    after each stage (Lu et al. 2022b; Karras et al. 2022 ancestral splitting).

    With ``t = -log sigma``, ``h = t' - t``, ``s = t + r h`` and ancestral targets ``s_``, ``t'_``
    (``sigma_down`` of ``sigma(t) -> sigma(s)`` and ``sigma(t) -> sigma(t')``):
    ``u = (sigma(s_)/sigma) x - expm1(t - s_) D + s_noise su_1 z_1``,
    ``x' = (sigma(t'_)/sigma) x - expm1(t - t'_) [(1 - 1/(2r)) D + 1/(2r) D(u, sigma(s))] + s_noise su_2 z_2``.
    The default noise is a Brownian tree over the sigmas (``BrownianTreeNoiseSampler``); a step to
    ``sigma = 0`` is Euler. 2 NFE per step. Matches k-diffusion's ``sample_dpmpp_sde``.
    """
    _check_x(x)
    _check_callables(model, extra_args, callback, noise_sampler)
    host = _check_sigmas(sigmas, "sample_dpmpp_sde", decreasing=True)
    eta, s_noise = _check_real(eta, "eta", low=0.0), _check_real(s_noise, "s_noise")
    r = _check_real(r, "r", low=0.0, strict=True)
    noise_sampler = _sde_noise_sampler(x, host, noise_sampler)
    run = _Run(model, x, extra_args, callback)
    for i in trange(len(sigmas) - 1, disable=disable):
        den = run.denoise(x, host[i])
        run.emit(_step_info(x, i, sigmas, den))
        if host[i + 1] == 0:
            x = run.combine(_euler(x, den, host[i], host[i + 1]))
            continue
        t, t_next = _t_of(host[i]), _t_of(host[i + 1])
        h = t_next - t
        s = t + h * r
        fac = 1 / (2 * r)
        sd, su = _ancestral_step(_sigma_of(t), _sigma_of(s), eta)
        s_ = _t_of(sd)
        noise = run.draw(noise_sampler, _sigma_of(t), _sigma_of(s))
        u = run.combine([(_sigma_of(s_) / _sigma_of(t), x), (-(t - s_).expm1(), den)], noise, s_noise * float(su))
        den2 = run.denoise(u, _sigma_of(s))
        sd, su = _ancestral_step(_sigma_of(t), _sigma_of(t_next), eta)
        t_next_ = _t_of(sd)
        c = -float((t - t_next_).expm1())
        noise = run.draw(noise_sampler, _sigma_of(t), _sigma_of(t_next))
        x = run.combine([(_sigma_of(t_next_) / _sigma_of(t), x), (c * (1 - fac), den), (c * fac, den2)],
                        noise, s_noise * float(su))
    return x


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2).

    With ``t = -log sigma``, ``h = t' - t``, ``r = h_prev/h``:
    ``x' = (sigma'/sigma) x - expm1(-h) [(1 + 1/(2r)) D - 1/(2r) D_prev]``; the first step and a
    step to ``sigma = 0`` are first order (``D_prev`` dropped). 1 NFE per step. Matches
    k-diffusion's ``sample_dpmpp_2m``.
    """
    _check_x(x)
    _check_callables(model, extra_args, callback)
    host = _check_sigmas(sigmas, "sample_dpmpp_2m", decreasing=True)
    run = _Run(model, x, extra_args, callback)
    old = None
    for i in trange(len(sigmas) - 1, disable=disable):
        den = run.denoise(x, host[i])
        run.emit(_step_info(x, i, sigmas, den))
        t, t_next = _t_of(host[i]), _t_of(host[i + 1])
        h = t_next - t
        c = -float((-h).expm1())
        parts = [(_sigma_of(t_next) / _sigma_of(t), x)]
        if old is None or host[i + 1] == 0:
            parts.append((c, den))
        else:
            r = (t - _t_of(host[i - 1])) / h
            parts += [(c * float(1 + 1 / (2 * r)), den), (-c * float(1 / (2 * r)), old)]
        x = run.combine(parts)
        old = den
    return x


def _sde_setup(name, model, x, sigmas, extra_args, callback, eta, s_noise, noise_sampler):
    _check_x(x)
    _check_callables(model, extra_args, callback, noise_sampler)
    host = _check_sigmas(sigmas, name, decreasing=True)
    eta, s_noise = _check_real(eta, "eta", low=0.0), _check_real(s_noise, "s_noise")
    noise_sampler = _sde_noise_sampler(x, host, noise_sampler)
    return _Run(model, x, extra_args, callback), host, eta, s_noise, noise_sampler


@torch.no_grad()
def sample_dpmpp_2m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1., noise_sampler=None, solver_type='midpoint'):
    """DPM-Solver++(2M) SDE (Lu et al. 2022b, SDE-DPM-Solver++(2M)) with churn ``eta``.

    With ``t = -log sigma``, ``h = t' - t``, ``E = -expm1(-(1 + eta) h)``, ``r = h_prev/h``:
    ``x' = (sigma'/sigma) e^{-eta h} x + E D + c (D - D_prev)/r + s_noise sigma' sqrt(-expm1(-2 eta h)) z``
    with ``c = E/2`` (``solver_type='midpoint'``) or ``1 - E/((1 + eta) h)`` (``'heun'``); the first
    step has no correction and a step to ``sigma = 0`` returns ``D``. The default noise is a
    Brownian tree over the sigmas. 1 NFE per step. Matches k-diffusion's ``sample_dpmpp_2m_sde``.
    """
    if solver_type not in {'heun', 'midpoint'}:
        raise ValueError(f"solver_type must be 'heun' or 'midpoint', got {solver_type!r}")
    run, host, eta, s_noise, noise_sampler = _sde_setup("sample_dpmpp_2m_sde", model, x, sigmas, extra_args,
                                                        callback, eta, s_noise, noise_sampler)
    old = h_last = None
    for i in trange(len(sigmas) - 1, disable=disable):
        den = run.denoise(x, host[i])
        run.emit(_step_info(x, i, sigmas, den))
        if host[i + 1] == 0:
            x = den
            old = den
            continue
        t, s = -host[i].log(), -host[i + 1].log()
        h = s - t
        eta_h = eta * h
        E = (-h - eta_h).expm1().neg()
        parts = [(host[i + 1] / host[i] * (-eta_h).exp(), x), (E, den)]
        if old is not None:
            if solver_type == 'heun':
                c = (E / (-h - eta_h) + 1) * (1 / (h_last / h))
            else:
                c = 0.5 * E * (1 / (h_last / h))
            parts += [(c, den), (-c, old)]
        noise, scale = None, 0.0
        if eta:
            noise = run.draw(noise_sampler, sigmas[i], sigmas[i + 1])
            scale = float(host[i + 1]) * float((-2 * eta_h).expm1().neg().sqrt()) * s_noise
        x = run.combine(parts, noise, scale)
        old, h_last = den, h
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1., noise_sampler=None):
    """DPM-Solver++(3M) SDE with churn ``eta`` (Lu et al. 2022b's third-order multistep update).

    With ``H = (1 + eta) h``, ``phi_2 = 1 - (1 - e^{-H})/H``, ``phi_3 = phi_2/H - 1/2``,
    ``r_j = h_{-j-1}/h``, ``D1_0 = (D - D_1)/r_0``, ``D1_1 = (D_1 - D_2)/r_1``:
    ``x' = e^{-H} x + (1 - e^{-H}) D + phi_2 D1 - phi_3 D2 + s_noise sigma' sqrt(-expm1(-2 eta h)) z``,
    ``D1 = D1_0 + r_0/(r_0 + r_1) (D1_0 - D1_1)``, ``D2 = (D1_0 - D1_1)/(r_0 + r_1)``; the second
    step uses ``phi_2 D1_0``, the first none. The ``D2`` weight is 1 as in k-diffusion (a Taylor
    expansion would give 2). A step to ``sigma = 0`` returns ``D``; the default noise is a
    Brownian tree over the sigmas. 1 NFE per step. Matches k-diffusion's ``sample_dpmpp_3m_sde``.
    """
    run, host, eta, s_noise, noise_sampler = _sde_setup("sample_dpmpp_3m_sde", model, x, sigmas, extra_args,
                                                        callback, eta, s_noise, noise_sampler)
    den_1 = den_2 = h_1 = h_2 = None
    for i in trange(len(sigmas) - 1, disable=disable):
        den = run.denoise(x, host[i])
        run.emit(_step_info(x, i, sigmas, den))
        if host[i + 1] == 0:
            x = den
        else:
            t, s = -host[i].log(), -host[i + 1].log()
            h = s - t
            h_eta = h * (eta + 1)
            parts = [(torch.exp(-h_eta), x), ((-h_eta).expm1().neg(), den)]
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                phi_2, phi_3 = float(phi_2), float(phi_2 / h_eta - 0.5)
                # phi_2 D1 - phi_3 D2 with D1 = (1 + q) D1_0 - q D1_1, D2 = (D1_0 - D1_1)/(r0 + r1)
                w = 1 / float(r0 + r1)
                r0, r1 = float(r0), float(r1)
                q = r0 * w
                g0 = phi_2 * (1 + q) - phi_3 * w  # coefficient of D1_0
                g1 = -phi_2 * q + phi_3 * w      # coefficient of D1_1
                parts += [(g0 / r0, den), (-g0 / r0 + g1 / r1, den_1), (-g1 / r1, den_2)]
            elif h_1 is not None:
                phi_2 = float(h_eta.neg().expm1() / h_eta + 1)
                c = phi_2 / float(h_1 / h)
                parts += [(c, den), (-c, den_1)]
            noise, scale = None, 0.0
            if eta:
                noise = run.draw(noise_sampler, sigmas[i], sigmas[i + 1])
                scale = float(host[i + 1]) * float((-2 * h * eta).expm1().neg().sqrt()) * s_noise
            x = run.combine(parts, noise, scale)
        den_1, den_2 = den, den_1
        h_1, h_2 = (h if host[i + 1] != 0 else h_1), h_1
    return x
