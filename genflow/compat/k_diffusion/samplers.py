"""k-diffusion's samplers on a sigma schedule, each a native genflow solver on the same grid.

Every function has the name, signature and defaults of k-diffusion 0.1.1.post1's function of the
same name and returns its result for the same denoiser, sigmas and noise (see the package
docstring). The steps are the native solvers' (``gf.solvers``) on ``gf.EDM`` with the sigmas as
the time grid; k-diffusion's ancestral samplers step to its ``sigma_down`` and add
``s_noise sigma_up z``, its Algorithm 2 samplers step from the churned ``sigma_hat``.
"""
import torch

from genflow._checks import check_choice, check_int
from genflow.compat.k_diffusion import glue
from genflow.compat.k_diffusion.noise import sde_noise_sampler
from genflow.solvers import get as get_solver

__all__ = ["sample_dpm_2", "sample_dpm_2_ancestral", "sample_dpmpp_2m", "sample_dpmpp_2m_sde",
           "sample_dpmpp_2s_ancestral", "sample_dpmpp_3m_sde", "sample_euler", "sample_euler_ancestral",
           "sample_heun", "sample_lms"]


def _karras(name, solver, model, x, sigmas, extra_args, callback, disable, s_churn, s_tmin, s_tmax, s_noise):
    """Algorithm 2 of Karras et al. (2022) with ``solver``'s step from ``sigma_hat`` to ``sigma'``."""
    glue.check_x(x)
    glue.check_callables(model, extra_args, callback)
    s_churn, s_tmin, s_tmax, s_noise = glue.check_churn(s_churn, s_tmin, s_tmax, s_noise)
    plan = glue.plan("churn", name, sigmas, s_churn, s_tmin, s_tmax, decreasing=False)
    denoiser = glue.Denoiser(model, extra_args, callback)
    stepper = get_solver(solver)(glue.model_of(denoiser), plan.ts)
    return glue.run(name, stepper, x, plan, sigmas, denoiser, disable, s_noise=s_noise, churn_noise=True)


@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0., s_tmax=float('inf'), s_noise=1.):
    """Euler steps with churn: Algorithm 2 of Karras et al. (2022) without the Heun correction.

    ``x' = x_hat + (sigma_{i+1} - sigma_hat) (x_hat - D(x_hat, sigma_hat)) / sigma_hat`` after the
    churn ``x_hat = x + s_noise sqrt(sigma_hat^2 - sigma_i^2) z``, ``sigma_hat = (1 + gamma) sigma_i``:
    the native ``euler`` step. Order 1, 1 NFE per step. Matches k-diffusion's ``sample_euler``.
    """
    return _karras("sample_euler", "euler", model, x, sigmas, extra_args, callback, disable,
                   s_churn, s_tmin, s_tmax, s_noise)


@torch.no_grad()
def sample_heun(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0., s_tmax=float('inf'), s_noise=1.):
    """Heun steps with churn: Algorithm 2 of Karras et al. (2022).

    ``x~ = x_hat + h d``, ``x' = x_hat + h (d + d~)/2`` with ``h = sigma_{i+1} - sigma_hat``,
    ``d = (x_hat - D(x_hat, sigma_hat))/sigma_hat``, ``d~ = (x~ - D(x~, sigma_{i+1}))/sigma_{i+1}``;
    a step to ``sigma = 0`` is Euler: the native ``heun`` step. Order 2, 2 NFE per step. Matches
    k-diffusion's ``sample_heun``.
    """
    return _karras("sample_heun", "heun", model, x, sigmas, extra_args, callback, disable,
                   s_churn, s_tmin, s_tmax, s_noise)


@torch.no_grad()
def sample_dpm_2(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0., s_tmax=float('inf'), s_noise=1.):
    """k-diffusion's DPM-2: Algorithm 2 of Karras et al. (2022) with a midpoint in log sigma
    (inspired by DPM-Solver-2, Lu et al. 2022).

    ``sigma_m = sqrt(sigma_hat sigma_{i+1})``, ``x_m = x_hat + (sigma_m - sigma_hat) d``,
    ``x' = x_hat + (sigma_{i+1} - sigma_hat) (x_m - D(x_m, sigma_m))/sigma_m``; a step to
    ``sigma = 0`` is Euler: the native ``dpm_2`` step. Order 2, 2 NFE per step. Matches
    k-diffusion's ``sample_dpm_2``.
    """
    return _karras("sample_dpm_2", "dpm_2", model, x, sigmas, extra_args, callback, disable,
                   s_churn, s_tmin, s_tmax, s_noise)


def _ancestral(name, solver, draw_rule, model, x, sigmas, extra_args, callback, disable, eta, s_noise,
               noise_sampler):
    """``solver``'s deterministic step from ``sigma`` to ``sigma_down``, then ``s_noise sigma_up z``."""
    glue.check_x(x)
    glue.check_callables(model, extra_args, callback, noise_sampler)
    eta, s_noise = glue.check_noise_options(eta, s_noise)
    plan = glue.plan("ancestral", name, sigmas, eta, draw_rule)
    denoiser = glue.Denoiser(model, extra_args, callback)
    stepper = get_solver(solver)(glue.model_of(denoiser), plan.ts)
    noise_sampler = glue.default_noise(x) if noise_sampler is None else noise_sampler
    return glue.run(name, stepper, x, plan, sigmas, denoiser, disable, noise_sampler=noise_sampler, s_noise=s_noise)


@torch.no_grad()
def sample_euler_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1., noise_sampler=None):
    """Ancestral sampling with Euler steps.

    ``x' = x + (sigma_down - sigma) (x - D(x, sigma))/sigma + s_noise sigma_up z`` with
    ``sigma_up = min(sigma', eta sigma' sqrt(1 - sigma'^2/sigma^2))``,
    ``sigma_down = sqrt(sigma'^2 - sigma_up^2)``; ``eta = 1`` is ancestral DDPM sampling
    (Ho et al. 2020) in EDM variables. The native ``euler`` step to ``sigma_down``; 1 NFE per
    step. Matches k-diffusion's ``sample_euler_ancestral``.
    """
    return _ancestral("sample_euler_ancestral", "euler", "next", model, x, sigmas, extra_args, callback, disable,
                      eta, s_noise, noise_sampler)


@torch.no_grad()
def sample_dpm_2_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1., noise_sampler=None):
    """Ancestral sampling with k-diffusion's DPM-2 steps.

    The ``sample_dpm_2`` step (native ``dpm_2``) from ``sigma`` to ``sigma_down`` (midpoint
    ``sqrt(sigma sigma_down)``), then ``+ s_noise sigma_up z`` (``sigma_up``, ``sigma_down`` as in
    ``sample_euler_ancestral``); a step with ``sigma_down = 0`` is Euler and adds no noise, as in
    k-diffusion. 2 NFE per step. Matches k-diffusion's ``sample_dpm_2_ancestral``.
    """
    return _ancestral("sample_dpm_2_ancestral", "dpm_2", "down", model, x, sigmas, extra_args, callback, disable,
                      eta, s_noise, noise_sampler)


@torch.no_grad()
def sample_dpmpp_2s_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1., noise_sampler=None):
    """Ancestral sampling with DPM-Solver++(2S) steps (Lu et al. 2022b, Algorithm 1, r = 1/2).

    With ``t = -log sigma``, ``t' = -log sigma_down``, ``h = t' - t``, ``s = t + h/2``:
    ``u = (sigma_s/sigma) x - expm1(-h/2) D(x, sigma)``,
    ``x' = (sigma_down/sigma) x - expm1(-h) D(u, sigma_s) + s_noise sigma_up z`` (the native
    ``dpmpp_2s`` step to ``sigma_down``); a step with ``sigma_down = 0`` is Euler. 2 NFE per step.
    Matches k-diffusion's ``sample_dpmpp_2s_ancestral``.
    """
    return _ancestral("sample_dpmpp_2s_ancestral", "dpmpp_2s", "next", model, x, sigmas, extra_args, callback,
                      disable, eta, s_noise, noise_sampler)


def _grid(name, solver, model, x, sigmas, extra_args, callback, disable, *, decreasing=True, noise_sampler=None,
          eta=None, s_noise=1.0, **options):
    """``solver`` on the sigmas as they are (its own noise, if any, from ``noise_sampler``)."""
    glue.check_x(x)
    glue.check_callables(model, extra_args, callback, noise_sampler)
    plan = glue.plan("grid", name, sigmas, decreasing=decreasing)
    denoiser = glue.Denoiser(model, extra_args, callback)
    noise = None if noise_sampler is None else glue.StepNoise(noise_sampler, sigmas, plan.grid, s_noise)
    stepper = get_solver(solver)(glue.model_of(denoiser), plan.ts, noise=noise, eta=eta, **options)
    return glue.run(name, stepper, x, plan, sigmas, denoiser, disable)


@torch.no_grad()
def sample_lms(model, x, sigmas, extra_args=None, callback=None, disable=None, order=4):
    """Linear multistep (Adams–Bashforth in sigma) on ``dx/dsigma = (x - D(x, sigma))/sigma``.

    ``x' = x + sum_j c_j d_{i-j}`` over the last ``K = min(order, i + 1)`` derivatives, with
    ``c_j = int_{sigma_i}^{sigma_{i+1}} l_j`` the integral of the Lagrange basis polynomial of the
    nodes ``sigma_i..sigma_{i-K+1}`` that is 1 at ``sigma_{i-j}`` (the native ``lms``: exact
    integrals; k-diffusion integrates the same polynomials with ``scipy.integrate.quad``).
    ``order`` 1..4. 1 NFE per step. Matches k-diffusion's ``sample_lms``.
    """
    order = check_int("order", order, low=1, high=4)
    return _grid("sample_lms", "lms", model, x, sigmas, extra_args, callback, disable, decreasing=False, order=order)


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2).

    With ``t = -log sigma``, ``h = t' - t``, ``r = h_prev/h``:
    ``x' = (sigma'/sigma) x - expm1(-h) [(1 + 1/(2r)) D - 1/(2r) D_prev]``; the first step and a
    step to ``sigma = 0`` are first order (``D_prev`` dropped): the native ``dpmpp_2m`` with
    ``lower_order_final=False``. 1 NFE per step. Matches k-diffusion's ``sample_dpmpp_2m``.
    """
    return _grid("sample_dpmpp_2m", "dpmpp_2m", model, x, sigmas, extra_args, callback, disable,
                 lower_order_final=False)


def _sde(name, solver, model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler, **options):
    eta, s_noise = glue.check_noise_options(eta, s_noise)
    if eta > 1:
        raise ValueError(f"eta must be in [0, 1] for {name} on genflow's native solver, got {eta}")
    glue.check_x(x)
    if noise_sampler is None:  # built even for eta = 0, as k-diffusion does (its seed is a global RNG draw)
        noise_sampler = sde_noise_sampler(x, glue.plan("grid", name, sigmas).grid.to(sigmas.dtype))
    return _grid(name, solver, model, x, sigmas, extra_args, callback, disable, noise_sampler=noise_sampler, eta=eta,
                 s_noise=s_noise, lower_order_final=False, **options)


@torch.no_grad()
def sample_dpmpp_2m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1., noise_sampler=None, solver_type='midpoint'):
    """DPM-Solver++(2M) SDE (Lu et al. 2022b, SDE-DPM-Solver++(2M)) with churn ``eta``.

    With ``t = -log sigma``, ``h = t' - t``, ``E = -expm1(-(1 + eta) h)``, ``r = h_prev/h``:
    ``x' = (sigma'/sigma) e^{-eta h} x + E D + c (D - D_prev)/r + s_noise sigma' sqrt(-expm1(-2 eta h)) z``
    with ``c = E/2`` (``solver_type='midpoint'``) or ``1 - E/((1 + eta) h)`` (``'heun'``); the first
    step has no correction and a step to ``sigma = 0`` returns ``D``: the native ``dpmpp_2m_sde``.
    The default noise is a Brownian tree over the sigmas. 1 NFE per step. Matches k-diffusion's
    ``sample_dpmpp_2m_sde``.
    """
    solver_type = check_choice("solver_type", solver_type, ("heun", "midpoint"))
    return _sde("sample_dpmpp_2m_sde", "dpmpp_2m_sde", model, x, sigmas, extra_args, callback, disable, eta, s_noise,
                noise_sampler, solver_type=solver_type)


@torch.no_grad()
def sample_dpmpp_3m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1., noise_sampler=None):
    """DPM-Solver++(3M) SDE with churn ``eta`` (Lu et al. 2022b's third-order multistep update).

    With ``H = (1 + eta) h``, ``phi_2 = 1 - (1 - e^{-H})/H``, ``phi_3 = phi_2/H - 1/2``,
    ``r_j = h_{-j-1}/h``, ``D1_0 = (D - D_1)/r_0``, ``D1_1 = (D_1 - D_2)/r_1``:
    ``x' = e^{-H} x + (1 - e^{-H}) D + phi_2 D1 - phi_3 D2 + s_noise sigma' sqrt(-expm1(-2 eta h)) z``,
    ``D1 = D1_0 + r_0/(r_0 + r_1) (D1_0 - D1_1)``, ``D2 = (D1_0 - D1_1)/(r_0 + r_1)``; the second
    step uses ``phi_2 D1_0``, the first none: the native ``dpmpp_3m_sde`` with
    ``variant="reference"`` (the ``D2`` weight 1 of k-diffusion; a Taylor expansion gives 2). A step
    to ``sigma = 0`` returns ``D``; the default noise is a Brownian tree over the sigmas. 1 NFE per
    step. Matches k-diffusion's ``sample_dpmpp_3m_sde``.
    """
    return _sde("sample_dpmpp_3m_sde", "dpmpp_3m_sde", model, x, sigmas, extra_args, callback, disable, eta, s_noise,
                noise_sampler, variant="reference")
