"""Drop-in replacements for k-diffusion's samplers (``k_diffusion.sampling``), on genflow's native solvers.

Every ``sample_*`` function has the name, signature and defaults of k-diffusion 0.1.1.post1's
function of the same name and returns the same result for the same denoiser, sigmas and noise:
``model(x, sigma * s_in, **extra_args)`` is a k-diffusion denoiser returning the data
prediction, ``sigmas`` a decreasing noise-level schedule (``get_sigmas_*``, usually ending in 0),
``callback`` receives the dicts k-diffusion passes, and ``disable`` switches the tqdm bar off.

The samplers on a sigma schedule are genflow's native solvers (``gf.solvers``) on ``gf.EDM``
with the sigmas as an explicit time grid and the denoiser as an ``x0`` model (``glue``); their
step coefficients are computed once per grid in float64 and reused by later calls with equal
sigmas. With float64 sigmas and state the results equal k-diffusion's to rounding (1e-12);
k-diffusion computes its step scalars in the dtype of ``sigmas``, so float32 sigmas give it
float32-rounded coefficients (agreement ~1e-7 relative with a float64 state).

Default noise consumes torch's global RNG exactly as k-diffusion does (the same draws, in the
same order, including the ones k-diffusion draws and discards), so ``torch.manual_seed(s)``
before either call gives the same sample. The SDE samplers whose default is k-diffusion's
``BrownianTreeNoiseSampler`` use ``BrownianTreeNoiseSampler`` here: torchsde's
``BrownianInterval`` with k-diffusion's construction when torchsde is installed (identical
noise), else genflow's Philox Brownian tree (``genflow.noise.BrownianTreeNoise``; a valid
Brownian path, but not torchsde's numbers).
"""
from genflow.compat.k_diffusion.dpm import sample_dpm_adaptive, sample_dpm_fast, sample_dpmpp_sde
from genflow.compat.k_diffusion.noise import BrownianTreeNoiseSampler
from genflow.compat.k_diffusion.samplers import (sample_dpm_2, sample_dpm_2_ancestral, sample_dpmpp_2m,
                                                 sample_dpmpp_2m_sde, sample_dpmpp_2s_ancestral, sample_dpmpp_3m_sde,
                                                 sample_euler, sample_euler_ancestral, sample_heun, sample_lms)
from genflow.compat.k_diffusion.schedules import (get_sigmas_exponential, get_sigmas_karras, get_sigmas_polyexponential,
                                                  get_sigmas_vp)

__all__ = [
    "BrownianTreeNoiseSampler", "get_sigmas_exponential", "get_sigmas_karras", "get_sigmas_polyexponential",
    "get_sigmas_vp", "sample_dpm_2", "sample_dpm_2_ancestral", "sample_dpm_adaptive", "sample_dpm_fast",
    "sample_dpmpp_2m", "sample_dpmpp_2m_sde", "sample_dpmpp_2s_ancestral", "sample_dpmpp_3m_sde",
    "sample_dpmpp_sde", "sample_euler", "sample_euler_ancestral", "sample_heun", "sample_lms",
]

from genflow.compat.k_diffusion.zoo import (sample_ald, sample_ddim, sample_ddpm, sample_deis, sample_dpm_solver_1,
                                             sample_dpm_solver_2, sample_dpm_solver_3, sample_dpm_solver_v3,
                                             sample_dpmpp_2m_sde_heun,
                                             sample_dpmpp_2s, sample_dpmpp_3m, sample_er_sde, sample_euler_maruyama,
                                             sample_exp_heun_2_x0, sample_gradient_estimation, sample_heunpp2,
                                             sample_ipndm, sample_ipndm_v, sample_lcm, sample_midpoint, sample_pc,
                                             sample_plms, sample_pndm, sample_res_2m, sample_res_3m,
                                             sample_res_multistep, sample_restart, sample_rk4, sample_sa_solver,
                                             sample_seeds_1, sample_seeds_2, sample_seeds_3, sample_tcd, sample_unipc)

__all__ += [  # the native samplers k-diffusion lacks (zoo.py)
    "sample_ald", "sample_ddim", "sample_ddpm", "sample_deis", "sample_dpm_solver_1", "sample_dpm_solver_2",
    "sample_dpm_solver_3", "sample_dpm_solver_v3", "sample_dpmpp_2m_sde_heun", "sample_dpmpp_2s", "sample_dpmpp_3m",
    "sample_er_sde",
    "sample_euler_maruyama", "sample_exp_heun_2_x0", "sample_gradient_estimation", "sample_heunpp2",
    "sample_ipndm", "sample_ipndm_v", "sample_lcm", "sample_midpoint", "sample_pc", "sample_plms", "sample_pndm",
    "sample_res_2m", "sample_res_3m", "sample_res_multistep", "sample_restart", "sample_rk4", "sample_sa_solver",
    "sample_seeds_1", "sample_seeds_2", "sample_seeds_3", "sample_tcd", "sample_unipc",
]
