"""genflow's basic solvers equal their peers' implementations on the same grid and noise.

* k-diffusion (float64, ``gf.EDM``, the same sigmas incl. the appended 0, the same noise):
  ``sample_euler``, ``sample_heun``, ``sample_euler_ancestral``, ``sample_dpm_2``,
  ``sample_dpm_2_ancestral``, ``sample_lms`` to 1e-6 relative.
* diffusers (float32, ``gf.DiscreteVP(scheduler.alphas_cumprod)``, a network with
  ``time=process.timestep``, the scheduler's timesteps given to genflow as an explicit grid
  ``t = (timestep + 1) / N``) to 1e-4 relative: DDIM (eta 0 and 1, ``variance_noise``), DDPM
  (fixed_small / fixed_large), Euler, Euler ancestral, Heun and LMS.

The k-style diffusers schedulers (Euler, EulerAncestral, Heun, LMS) integrate in k-diffusion's
scaled variables ``y = x / alpha``, ``s = sigma / alpha``; genflow's ``euler``/``heun``
integrate ``dx/dt`` in the process time, which equals those only where ``alpha = 1`` and
``t = s`` (EDM). So those two are compared through the EDM view of the DDPM network
(``_edm_view``, k-diffusion's ``DiscreteEpsDDPMDenoiser`` construction), and the direct
DiscreteVP difference is pinned. Schedulers whose last step goes to sigma = 0 (alpha = 1),
which ``DiscreteVP`` cannot represent, are matched with ``final_step="x0"``: a step to
sigma = 0 of Euler, Euler ancestral, DDIM with ``set_alpha_to_one`` and DDPM returns the
data prediction.
"""
import math

import pytest
import torch

import genflow as gf

from ..peers import diffusers, k_diffusion_sampling
from .references import mixture

F64_RTOL, F32_RTOL = 1e-6, 1e-4
BATCH = 16


def _assert_rel(actual, expected, rtol):
    """Elementwise ``|a - e| <= rtol (|e| + max|e|)``: relative, with the scale of the batch."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale)


def _noise_list(n, shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=dtype) for _ in range(n)]


def _sampler(noises):
    """A k-diffusion style ``noise_sampler`` handing out ``noises`` in order."""
    it = iter(noises)
    return lambda sigma, sigma_next: next(it)


# ------------------------------------------------------------------ k-diffusion, float64, EDM


def _karras(steps, final_zero):
    K = k_diffusion_sampling()
    sigmas = K.get_sigmas_karras(steps, 0.002, 80.0).double()  # float32 ramp, then the shared grid
    return sigmas if final_zero else sigmas[:-1]


KD_CASES = [  # genflow solver, k-diffusion sampler, options, noisy
    ("euler", "sample_euler", {}, False),
    ("heun", "sample_heun", {}, False),
    ("dpm_2", "sample_dpm_2", {}, False),
    ("lms", "sample_lms", {}, False),
    ("lms", "sample_lms", {"order": 2}, False),
    ("euler_ancestral", "sample_euler_ancestral", {}, True),
    ("euler_ancestral", "sample_euler_ancestral", {"eta": 0.5}, True),
    ("dpm_2_ancestral", "sample_dpm_2_ancestral", {}, True),
    ("dpm_2_ancestral", "sample_dpm_2_ancestral", {"eta": 0.5}, True),
]


@pytest.mark.parametrize("final_zero", [True, False], ids=["to0", "to_sigma_min"])
@pytest.mark.parametrize("solver, peer, options, noisy", KD_CASES, ids=[f"{c[0]}{c[2] or ''}" for c in KD_CASES])
def test_equals_k_diffusion(solver, peer, options, noisy, final_zero):
    K = k_diffusion_sampling()
    sigmas = _karras(12, final_zero)
    process = gf.EDM(sigma_min=0.002, sigma_max=float(sigmas[0]))
    model = mixture().model(process)

    def denoiser(x, sigma):  # k-diffusion's model(x, sigma * s_in)
        return model.x0(x, sigma)

    x_T = sigmas[0] * torch.randn(BATCH, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    noises = _noise_list(len(sigmas), (BATCH, 2), torch.float64, seed=2)
    kd_kwargs = dict(options)
    if noisy:
        kd_kwargs["noise_sampler"] = _sampler(noises)
    expected = getattr(K, peer)(denoiser, x_T.clone(), sigmas, disable=True, **kd_kwargs)
    ours = gf.sample(model, x_T=x_T, solver=solver, schedule=sigmas, noise_sampler=_sampler(noises) if noisy else None,
                     **options)
    _assert_rel(ours, expected, F64_RTOL)


# ------------------------------------------------------------------ diffusers, float32, DiscreteVP


def _eps_net(process):
    """A DDPM-style network ``net(x, timestep) -> eps`` (the exact mixture's, in float64)."""
    exact = mixture().model(process)

    def net(x, timestep):
        timestep = torch.as_tensor(timestep, dtype=torch.float64).reshape(-1).expand(x.shape[0])
        return exact.eps(x.double(), process.t_from_timestep(timestep)).to(x.dtype)

    return net


def _setup(scheduler_cls, **config):
    sched = scheduler_cls(**config)
    process = gf.DiscreteVP(sched.alphas_cumprod)
    net = _eps_net(process)
    model = gf.Model(net, process, prediction="eps", time=process.timestep)
    return sched, process, net, model


def _grid(process, timesteps):
    """genflow times of diffusers timesteps: ``t = (timestep + 1) / N``."""
    return process.t_from_timestep(torch.as_tensor(timesteps, dtype=torch.float64))


def _x_T():
    return torch.randn(BATCH, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float32)


def _run_k_style(sched, net, x_T, steps, step_kwargs=None):
    """diffusers' sampling loop for a k-style scheduler; returns the final sample and the states
    ``x = y / sqrt(s^2 + 1)`` after every step (the scheduler's own ``sigmas``)."""
    sched.set_timesteps(steps)
    sample = x_T * (sched.sigmas[0] ** 2 + 1) ** 0.5
    states = []
    for i, t in enumerate(sched.timesteps):
        eps = net(sched.scale_model_input(sample, t), t)
        sample = sched.step(eps, t, sample, **(step_kwargs or {})).prev_sample
        sigma = sched.sigmas[sched.step_index]
        states.append(sample / (sigma ** 2 + 1) ** 0.5)
    return sample, states


def _edm_view(net, sched):
    """The DDPM network as an EDM denoiser in ``(y, s)`` (k-diffusion's DiscreteEpsDDPMDenoiser):
    ``eps(y, s) = net(y / sqrt(s^2 + 1), timestep(s))`` on the scheduler's own sigma table."""
    sigmas = torch.unique_consecutive(sched.sigmas)[:-1]  # drop the final 0; Heun repeats entries
    timesteps = torch.unique_consecutive(sched.timesteps)

    def view(y, s):
        index = (sigmas[:, None] - s.to(sigmas.dtype)[None, :]).abs().argmin(0)
        return net(y / (s[:, None] ** 2 + 1) ** 0.5, timesteps[index])

    grid = torch.cat([sigmas.double(), torch.zeros(1, dtype=torch.float64)])
    process = gf.EDM(sigma_min=float(sigmas[-1]), sigma_max=float(sigmas[0]))
    return gf.Model(view, process, prediction="eps"), grid


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("final", ["alpha_one", "offset1", "offset0"])
def test_ddim_equals_diffusers(eta, final):
    """DDIM (Song et al. 2021a) ends at alpha_0 = 1, i.e. with the data prediction: diffusers'
    ``set_alpha_to_one=True``. Stable Diffusion's ``set_alpha_to_one=False`` ends at
    ``alphas_cumprod[0]`` (t = 1/N): with ``steps_offset=1`` its last step goes from timestep 1 to
    there, and with ``steps_offset=0`` the last step goes from timestep 0 to timestep 0, a
    zero-length step that spends one NFE and changes nothing (genflow: the grid just ends there)."""
    D = diffusers()
    config = {"alpha_one": dict(set_alpha_to_one=True), "offset1": dict(set_alpha_to_one=False, steps_offset=1),
              "offset0": dict(set_alpha_to_one=False, steps_offset=0)}[final]
    sched, process, net, model = _setup(D.DDIMScheduler, clip_sample=False, **config)
    steps, x_T = 10, _x_T()
    sched.set_timesteps(steps)
    noises = _noise_list(steps, x_T.shape, torch.float32, seed=4)
    sample = x_T.clone()
    for i, t in enumerate(sched.timesteps):
        sample = sched.step(net(sample, t), t, sample, eta=eta, variance_noise=noises[i]).prev_sample
    grid = _grid(process, sched.timesteps)
    kwargs = {}
    if final == "alpha_one":
        kwargs["final_step"] = "x0"
    elif final == "offset1":
        grid = torch.cat([grid, torch.tensor([1.0 / process.num_train_timesteps], dtype=torch.float64)])
    ours = gf.sample(model, x_T=x_T, solver="ddim", eta=eta, schedule=grid, noise_sampler=_sampler(noises), **kwargs)
    _assert_rel(ours, sample, F32_RTOL)


@pytest.mark.parametrize("variance", ["small", "large"])
def test_ddpm_equals_diffusers(variance):
    """Ho et al. (2020) eqs. 6-7 with ``sigma_t^2 = beta-tilde`` (small) or ``beta`` (large) on the
    strided grid of 'leading' timesteps; the last step (timestep 0 -> data) is the noise-free
    data prediction, genflow's ``final_step="x0"``."""
    D = diffusers()
    sched, process, net, model = _setup(D.DDPMScheduler, clip_sample=False, variance_type=f"fixed_{variance}")
    steps, x_T = 20, _x_T()
    sched.set_timesteps(steps)
    generator = torch.Generator().manual_seed(5)
    sample = x_T.clone()
    for t in sched.timesteps:
        sample = sched.step(net(sample, t), t, sample, generator=generator).prev_sample
    noises = _noise_list(steps - 1, x_T.shape, torch.float32, seed=5)  # diffusers' draws, t > 0
    ours = gf.sample(model, x_T=x_T, solver="ddpm", variance=variance, schedule=_grid(process, sched.timesteps),
                     final_step="x0", noise_sampler=_sampler(noises))
    _assert_rel(ours, sample, F32_RTOL)


def test_diffusers_ddpm_large_variance_adds_noise_after_the_last_step_unless_it_ends_at_timestep_0():
    """Pinned deviation: diffusers adds noise whenever ``timestep > 0``, so with 'trailing'
    spacing (last timestep N/steps - 1) and ``fixed_large`` the returned sample is the data
    prediction plus ``sqrt(1 - alphas_cumprod[last]) z``. Ho et al. (Algorithm 2) and genflow set
    ``z = 0`` on the last step; with ``fixed_small`` the extra variance is 0 (clamped to 1e-20)."""
    D = diffusers()
    sched, process, net, model = _setup(D.DDPMScheduler, clip_sample=False, variance_type="fixed_large",
                                        timestep_spacing="trailing")
    steps, x_T = 20, _x_T()
    sched.set_timesteps(steps)
    assert int(sched.timesteps[-1]) > 0
    generator = torch.Generator().manual_seed(6)
    sample = x_T.clone()
    for t in sched.timesteps:
        sample = sched.step(net(sample, t), t, sample, generator=generator).prev_sample
    noises = _noise_list(steps, x_T.shape, torch.float32, seed=6)
    ours = gf.sample(model, x_T=x_T, solver="ddpm", variance="large", schedule=_grid(process, sched.timesteps),
                     final_step="x0", noise_sampler=_sampler(noises[:-1]))
    last = float(sched.alphas_cumprod[int(sched.timesteps[-1])])
    _assert_rel(ours + math.sqrt(1.0 - last) * noises[-1], sample, F32_RTOL)
    assert (ours - sample).abs().max() > 0.1 * math.sqrt(1.0 - last)


def test_euler_equals_diffusers():
    """diffusers' Euler steps ``y`` in ``s``: genflow's euler on the EDM view equals it, and so do
    DDIM and euler_ancestral(eta=0) on the DiscreteVP itself (Euler in ``(y, s)`` is DDIM).
    genflow's euler on DiscreteVP steps ``dx/dt`` in t instead: a different first-order method
    (pinned: it differs by far more than rounding)."""
    D = diffusers()
    sched, process, net, model = _setup(D.EulerDiscreteScheduler, timestep_spacing="trailing")
    steps, x_T = 12, _x_T()
    expected, _ = _run_k_style(sched, net, x_T, steps)
    view, sigmas = _edm_view(net, sched)
    ours = gf.sample(view, x_T=x_T * (sched.sigmas[0] ** 2 + 1) ** 0.5, solver="euler", schedule=sigmas)
    _assert_rel(ours, expected, F32_RTOL)
    grid = _grid(process, sched.timesteps)
    for solver, options in [("ddim", {}), ("euler_ancestral", {"eta": 0.0})]:
        direct = gf.sample(model, x_T=x_T, solver=solver, schedule=grid, final_step="x0", **options)
        _assert_rel(direct, expected, F32_RTOL)
    in_t = gf.sample(model, x_T=x_T, solver="euler", schedule=grid, final_step="x0")
    assert (in_t - expected).abs().max() > 100 * F32_RTOL * expected.abs().max()


def test_euler_ancestral_equals_diffusers():
    D = diffusers()
    sched, process, net, model = _setup(D.EulerAncestralDiscreteScheduler, timestep_spacing="trailing")
    steps, x_T = 12, _x_T()
    expected, _ = _run_k_style(sched, net, x_T, steps, {"generator": torch.Generator().manual_seed(7)})
    noises = _noise_list(steps, x_T.shape, torch.float32, seed=7)  # one draw per step (the last is scaled by 0)
    ours = gf.sample(model, x_T=x_T, solver="euler_ancestral", schedule=_grid(process, sched.timesteps),
                     final_step="x0", noise_sampler=_sampler(noises[:-1]))
    _assert_rel(ours, expected, F32_RTOL)
    # and in the EDM view (noise in y; the step to s = 0 adds none)
    view, sigmas = _edm_view(net, sched)
    sched, _, _, _ = _setup(D.EulerAncestralDiscreteScheduler, timestep_spacing="trailing")
    expected, _ = _run_k_style(sched, net, x_T, steps, {"generator": torch.Generator().manual_seed(7)})
    y_T = x_T * (sched.sigmas[0] ** 2 + 1) ** 0.5
    ours = gf.sample(view, x_T=y_T, solver="euler_ancestral", schedule=sigmas, noise_sampler=_sampler(noises[:-1]))
    _assert_rel(ours, expected, F32_RTOL)


def test_heun_equals_diffusers_through_the_edm_view():
    """diffusers' Heun is Karras et al. Algorithm 1 in ``(y, s)`` with an Euler last step to
    s = 0, as genflow's heun on the EDM view. On the DiscreteVP itself genflow's heun integrates
    ``dx/dt`` in t, a different second-order method (pinned: close, not equal)."""
    D = diffusers()
    sched, process, net, model = _setup(D.HeunDiscreteScheduler, timestep_spacing="trailing")
    steps, x_T = 12, _x_T()
    expected, _ = _run_k_style(sched, net, x_T, steps)
    view, sigmas = _edm_view(net, sched)
    ours = gf.sample(view, x_T=x_T * (sched.sigmas[0] ** 2 + 1) ** 0.5, solver="heun", schedule=sigmas)
    _assert_rel(ours, expected, F32_RTOL)
    grid = _grid(process, torch.unique_consecutive(sched.timesteps))
    in_t = gf.sample(model, x_T=x_T, solver="heun", schedule=grid, final_step="x0")
    gap = (in_t - expected).abs().max() / expected.abs().max()
    assert 100 * F32_RTOL < gap < 0.2


def test_lms_equals_diffusers():
    """LMSDiscreteScheduler (order 4) equals genflow's lms on the DiscreteVP at every state up to
    the last step, which goes to sigma = 0 (beyond DiscreteVP's range) with the fourth-order
    polynomial; on the EDM view, including that last step."""
    D = diffusers()
    sched, process, net, model = _setup(D.LMSDiscreteScheduler, timestep_spacing="trailing")
    steps, x_T = 12, _x_T()
    expected, states = _run_k_style(sched, net, x_T, steps)
    _, trajectory = gf.sample(model, x_T=x_T, solver="lms", schedule=_grid(process, sched.timesteps),
                              return_trajectory=True)
    for i in range(steps - 1):
        _assert_rel(trajectory[i + 1], states[i], F32_RTOL)
    view, sigmas = _edm_view(net, sched)
    ours = gf.sample(view, x_T=x_T * (sched.sigmas[0] ** 2 + 1) ** 0.5, solver="lms", schedule=sigmas)
    _assert_rel(ours, expected, F32_RTOL)
