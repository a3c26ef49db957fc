"""``k-diffusion``: full solves vs k-diffusion 0.1.1."""
from typing import Iterator


from genflow.bench import Baseline, Case, Context, group
from bench.cases.common import solve_shapes, MODELS, make_net, size_str, missing, equal_work


@group("k-diffusion", "full solves vs k-diffusion 0.1.1 (EDM, its Karras sigmas with the final 0)")
def _k_diffusion(ctx: Context) -> Iterator[Case]:
    """genflow and k-diffusion integrate the same EDM problem on k-diffusion's own Karras grid (the
    same sigmas tensor, ending at 0) with the same denoiser ``net(x, sigma) -> x0``; float32."""
    import genflow as gf
    from genflow import peers

    K = peers.k_diffusion_sampling()
    steps = 10 if ctx.tiny else 20
    solvers = [("euler", "sample_euler", {}), ("heun", "sample_heun", {}),
               ("dpmpp_2m", "sample_dpmpp_2m", {"lower_order_final": False})]
    for model_name in MODELS:
        for shape in solve_shapes(ctx, model_name):
            for solver, peer, options in solvers:
                case, size = f"{solver} {steps} steps, {model_name}", size_str(shape)
                if K is None:
                    yield missing("k-diffusion", case, size, f"k-diffusion {peer}")
                    continue
                process = gf.EDM(sigma_min=0.002, sigma_max=80.0)
                sigmas = K.get_sigmas_karras(steps, 0.002, 80.0).double()  # genflow: host grid
                net = make_net(model_name, scale_in=True)
                x_T = 80.0 * ctx.randn(*shape, seed=1)

                def make_gf(net, solver=solver, options=options, process=process, sigmas=sigmas, x_T=x_T):
                    model = gf.Model(net, process, "x0")
                    return lambda: gf.sample(model, x_T=x_T, solver=solver, schedule=sigmas, **options)

                def make_peer(net, peer=peer, sigmas=sigmas.to(ctx.device), x_T=x_T):
                    sampler = getattr(K, peer)
                    return lambda: sampler(net, x_T, sigmas, disable=True)

                yield Case(case, size, make_gf(net), [
                    Baseline(f"k-diffusion {peer}", make_peer(net), equal_work(make_gf, make_peer, net, 1e-4))])
