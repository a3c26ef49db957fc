"""k-diffusion-style entry points for the native samplers k-diffusion lacks.

Every ``sample_<name>(model, x, sigmas, extra_args=None, callback=None, disable=None, ...)`` has
k-diffusion's calling convention, so tools built on it (ComfyUI's ``KSAMPLER``, A1111) can call it
unchanged: ``model(x, sigma * s_in, **extra_args)`` is a denoiser returning the data prediction,
``sigmas`` a noise-level schedule (usually ending in 0), ``callback`` receives k-diffusion's dict
(``x``, ``i``, ``sigma``, ``sigma_hat``, ``denoised``) once per step and ``disable`` switches the
tqdm bar off. Each runs the native solver of the same name (``gf.solvers``; ``dpmpp_2m_sde_heun``
is ``dpmpp_2m_sde`` with ``solver_type="heun"``) on ``gf.EDM`` with the sigmas as its time grid
(``glue``), so it equals ``gf.sample`` with that grid and the denoiser as an ``x0`` model. Further
keyword options go to the native solver (``max_order=3``, ``restart_intervals=...``, ``eta=0.5``).
The adaptive ``rk45`` and ``sde_adaptive`` choose their own steps, so they have no entry point here
(k-diffusion's own adaptive sampler is ``sample_dpm_adaptive``).

The stochastic ones take k-diffusion's ``noise_sampler(sigma, sigma_next)`` (called with the
levels, as floats, that each draw's noise spans: a step's, a stage's or, for ``restart``, a jump's)
and ``s_noise``. Their default noise is k-diffusion's
``torch.randn_like(x)`` from torch's global RNG, or, where ``extra_args`` holds a ``"seed"`` (as
ComfyUI's KSampler passes it), ComfyUI's ``default_noise_sampler``: one ``torch.Generator`` on
``x``'s device seeded with ``seed`` (``seed + 1`` on the CPU).
"""
import torch

from genflow._checks import check_real
from genflow.compat.k_diffusion import glue
from genflow.compat.k_diffusion.samplers import sample_dpmpp_2m_sde
from genflow.noise import SuppliedNoise
from genflow.solvers import get as get_solver

# entry point name -> (native solver, its fixed options), filled by ``deterministic``/``stochastic``
ENTRY_POINTS = {"dpmpp_2m_sde_heun": ("dpmpp_2m_sde", {"solver_type": "heun", "lower_order_final": False})}


def default_noise(x, extra_args):
    """k-diffusion's ``randn_like`` noise, or ComfyUI's seeded ``default_noise_sampler`` when
    ``extra_args`` holds a ``"seed"``."""
    seed = None if extra_args is None else extra_args.get("seed")
    if seed is None:
        return glue.default_noise(x)
    generator = torch.Generator(device=x.device)
    generator.manual_seed(seed + 1 if x.device.type == "cpu" else seed)
    return lambda sigma, sigma_next: torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)


def run_native(name, solver, model, x, sigmas, extra_args, callback, disable, *, noise_sampler=None, s_noise=1.0,
               **options):
    """The native ``solver`` on ``sigmas`` as a time grid with the denoiser as an ``x0`` model."""
    glue.check_x(x)
    glue.check_callables(model, extra_args, callback, noise_sampler)
    s_noise = check_real("s_noise", s_noise)
    plan = glue.plan("grid", name, sigmas)
    denoiser = glue.Denoiser(model, extra_args, callback)
    noise = None
    if get_solver(solver).stochastic or options.get("eta"):
        noise_sampler = default_noise(x, extra_args) if noise_sampler is None else noise_sampler
        unscaled = noise_sampler
        draw = unscaled if s_noise == 1.0 else (lambda sigma, sigma_next: unscaled(sigma, sigma_next) * s_noise)
        noise = SuppliedNoise(draw)
    stepper = get_solver(solver)(glue.model_of(denoiser), plan.ts, noise=noise, **options)
    return glue.run(name, stepper, x, plan, sigmas, denoiser, disable)


def _documented(entry, name, solver, fixed):
    ENTRY_POINTS[name] = (solver, fixed)
    summary = (get_solver(solver).__doc__ or "").strip().split("\n\n")[0]
    entry.__name__ = entry.__qualname__ = f"sample_{name}"
    entry.__doc__ = (f"The native ``{solver}`` sampler on k-diffusion's ``sigmas`` (``gf.sample(..., "
                     f"solver={solver!r})`` on that grid); keyword options go to the solver.\n\n{summary}\n")
    return torch.no_grad()(entry)


def deterministic(name, solver=None, **fixed):
    """The entry point ``sample_<name>(model, x, sigmas, extra_args=None, callback=None, disable=None,
    **options)`` of the native ``solver`` (default: ``name``) with ``fixed`` options."""
    solver = name if solver is None else solver

    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
        return run_native(f"sample_{name}", solver, model, x, sigmas, extra_args, callback, disable,
                          **fixed, **options)
    return _documented(sample, name, solver, fixed)


def stochastic(name, solver=None, **fixed):
    """As ``deterministic``, with k-diffusion's ``noise_sampler`` and ``s_noise``."""
    solver = name if solver is None else solver

    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None, s_noise=1.,
               **options):
        return run_native(f"sample_{name}", solver, model, x, sigmas, extra_args, callback, disable,
                          noise_sampler=noise_sampler, s_noise=s_noise, **fixed, **options)
    return _documented(sample, name, solver, fixed)


sample_ddim = deterministic("ddim")
sample_deis = deterministic("deis")
sample_dpm_solver_1 = deterministic("dpm_solver_1")
sample_dpm_solver_2 = deterministic("dpm_solver_2")
sample_dpm_solver_3 = deterministic("dpm_solver_3")
sample_dpm_solver_v3 = deterministic("dpm_solver_v3")
sample_dpmpp_2s = deterministic("dpmpp_2s")
sample_dpmpp_3m = deterministic("dpmpp_3m")
sample_exp_heun_2_x0 = deterministic("exp_heun_2_x0")
sample_gradient_estimation = deterministic("gradient_estimation")
sample_heunpp2 = deterministic("heunpp2")
sample_ipndm = deterministic("ipndm")
sample_ipndm_v = deterministic("ipndm_v")
sample_midpoint = deterministic("midpoint")
sample_plms = deterministic("plms")
sample_pndm = deterministic("pndm")
sample_res_2m = deterministic("res_2m")
sample_res_multistep = deterministic("res_multistep", "res_2m")  # ComfyUI's name for RES 2M
sample_res_3m = deterministic("res_3m")
sample_rk4 = deterministic("rk4")
sample_unipc = deterministic("unipc")

sample_ald = stochastic("ald")
sample_ddpm = stochastic("ddpm")
sample_er_sde = stochastic("er_sde")
sample_euler_maruyama = stochastic("euler_maruyama")
sample_lcm = stochastic("lcm")
sample_pc = stochastic("pc")
sample_restart = stochastic("restart")
sample_sa_solver = stochastic("sa_solver")
sample_seeds_1 = stochastic("seeds_1")
sample_seeds_2 = stochastic("seeds_2")
sample_seeds_3 = stochastic("seeds_3")
sample_tcd = stochastic("tcd")


@torch.no_grad()
def sample_dpmpp_2m_sde_heun(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                             noise_sampler=None, solver_type='heun'):
    """DPM-Solver++(2M) SDE with the Heun-type (``phi_2``) correction: ComfyUI's
    ``sample_dpmpp_2m_sde_heun``, i.e. ``sample_dpmpp_2m_sde(..., solver_type='heun')`` (the native
    ``dpmpp_2m_sde`` with ``solver_type="heun"``; the default noise is the Brownian tree over the sigmas)."""
    return sample_dpmpp_2m_sde(model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable, eta=eta,
                               s_noise=s_noise, noise_sampler=noise_sampler, solver_type=solver_type)


__all__ = ["ENTRY_POINTS", "deterministic", "run_native", "stochastic"] + [
    f"sample_{name}" for name in sorted(ENTRY_POINTS)]
