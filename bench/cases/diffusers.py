"""``diffusers``: full solves vs diffusers 0.42 schedulers in their standard loop."""
from typing import Iterator

import torch

from genflow.bench import Baseline, Case, Context, group
from bench.cases.common import solve_shapes, MODELS, make_net, size_str, missing, equal_work


@group("diffusers", "full solves vs diffusers 0.42 schedulers (the standard set_timesteps / step loop)")
def _diffusers(ctx: Context) -> Iterator[Case]:
    """DPMSolverMultistepScheduler (dpmsolver++, order 2): VP process, eps network, genflow's
    log-SNR grid ending at sigma = 0 written into the scheduler's sigma table (the way the
    peer-equality tests run it). EulerDiscreteScheduler: genflow's euler on the scheduler's own
    sigmas as an EDM problem in diffusers' variables ``(y, s)`` (k-diffusion's view of a DDPM
    network). Both sides call the same network once per step; float32."""
    import genflow as gf
    from genflow import peers

    D = peers.optional("diffusers")
    steps = 10 if ctx.tiny else 20
    for model_name in MODELS:
        for shape in solve_shapes(ctx, model_name):
            size = size_str(shape)
            for solver in ("dpmpp_2m", "euler"):
                peer = "DPMSolverMultistep" if solver == "dpmpp_2m" else "EulerDiscrete"
                case = f"{solver} {steps} steps, {model_name}"
                if D is None:
                    yield missing("diffusers", case, size, f"diffusers {peer}")
                elif solver == "dpmpp_2m":
                    yield _diffusers_dpm(ctx, gf, D, model_name, shape, steps, case, size)
                else:
                    yield _diffusers_euler(ctx, gf, D, model_name, shape, steps, case, size)


def _diffusers_dpm(ctx, gf, D, model_name, shape, steps, case, size):
    process = gf.VP()
    ts = gf.time_grid(process, steps - 1, "logsnr")
    ts = torch.cat([ts, ts.new_zeros(1)])
    net = make_net(model_name)  # predicts eps
    x_T = ctx.randn(*shape, seed=2)
    sig = (process.sigma(ts) / process.alpha(ts)).float().to(ctx.device)
    times = [torch.full((shape[0],), float(t), dtype=ctx.dtype, device=ctx.device) for t in ts[:-1]]
    scheduler = D.DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2)

    def make_gf(net):
        model = gf.Model(net, process, "eps")
        return lambda: gf.sample(model, x_T=x_T, solver="dpmpp_2m", schedule=ts)

    def make_peer(net):
        def loop():
            scheduler.set_timesteps(steps, device=ctx.device)
            scheduler.sigmas = sig
            x = x_T
            for j, timestep in enumerate(scheduler.timesteps):
                eps = net(scheduler.scale_model_input(x, timestep), times[j])
                x = scheduler.step(eps, timestep, x, return_dict=False)[0]
            return x
        return loop

    return Case(case, size, make_gf(net), [
        Baseline("diffusers DPMSolverMultistep", make_peer(net), equal_work(make_gf, make_peer, net, 1e-4))])


def _diffusers_euler(ctx, gf, D, model_name, shape, steps, case, size):
    scheduler = D.EulerDiscreteScheduler()
    scheduler.set_timesteps(steps)
    sigmas = scheduler.sigmas.double()
    process = gf.EDM(sigma_min=float(sigmas[-2]), sigma_max=float(sigmas[0]))
    grid = sigmas  # genflow's grid stays on the host (its coefficients are host float64)
    nd = len(shape) - 1
    net = make_net(model_name)  # eps of the scaled input x_in = y / sqrt(1 + s^2) at s
    y_T = float(scheduler.init_noise_sigma) * ctx.randn(*shape, seed=3)
    svec = [torch.full((shape[0],), float(s), dtype=ctx.dtype, device=ctx.device) for s in sigmas[:-1]]

    def make_gf(net):
        def view(y, s):  # the EDM model in (y, s): the network sees y / sqrt(1 + s^2), as in diffusers
            # (one shared sigma per step on this grid: scale by it once, as diffusers' loop does)
            return net(y * torch.rsqrt(1 + s[:1] * s[:1]).reshape((1,) * (nd + 1)), s)
        model = gf.Model(view, process, "eps")
        return lambda: gf.sample(model, x_T=y_T, solver="euler", schedule=grid)

    def make_peer(net):
        def loop():
            scheduler.set_timesteps(steps, device=ctx.device)
            x = y_T
            for j, timestep in enumerate(scheduler.timesteps):
                eps = net(scheduler.scale_model_input(x, timestep), svec[j])
                x = scheduler.step(eps, timestep, x, return_dict=False)[0]
            return x
        return loop

    return Case(case, size, make_gf(net), [
        Baseline("diffusers EulerDiscrete", make_peer(net), equal_work(make_gf, make_peer, net, 1e-4))])
