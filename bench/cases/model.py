"""``model``: 20-step dpmpp_2m solves with real denoisers vs k-diffusion and the model alone."""
from typing import Iterator

import torch

from genflow.bench import Baseline, Case, Context, group
from bench.cases.common import size_str, DeepMLP, ConvNet, equal_work


@group("model", "20-step dpmpp_2m solves with real denoisers vs k-diffusion and the model's own 20 evaluations")
def _model_bound(ctx: Context) -> Iterator[Case]:
    """Where the model dominates, a solver's own cost should vanish: genflow's solve against
    k-diffusion's ``sample_dpmpp_2m`` on the same EDM problem and against the model's 20
    evaluations alone (a "bound" row: ratio = model time / genflow time, 1.0 = no solver
    overhead left). On CUDA a second genflow case replays the solve as a CUDA graph
    (``cuda_graph=True``)."""
    import genflow as gf
    from genflow import peers

    K = peers.k_diffusion_sampling()
    steps = 5 if ctx.tiny else 20
    if ctx.tiny:
        cases = [("mlp256", DeepMLP(), (1, 2)), ("conv", ConvNet(), (1, 4, 8, 8))]
    elif ctx.quick:
        cases = [("mlp256", DeepMLP(), (1, 2)), ("mlp256", DeepMLP(), (8192, 2)), ("conv", ConvNet(), (4, 4, 32, 32))]
    else:
        cases = [("mlp256", DeepMLP(), (1, 2)), ("mlp256", DeepMLP(), (65536, 2)), ("conv", ConvNet(), (16, 4, 64, 64))]
    graphs = [False, True] if ctx.device == "cuda" else [False]
    for net_name, net, shape in cases:
        process = gf.EDM(sigma_min=0.002, sigma_max=80.0)
        sigmas = (K.get_sigmas_karras(steps, 0.002, 80.0) if K is not None else
                  torch.cat([gf.time_grid(process, steps, "karras"), torch.zeros(1)])).double()
        x_T = 80.0 * ctx.randn(*shape, seed=5)
        svec = [torch.full((shape[0],), float(v), dtype=ctx.dtype, device=ctx.device) for v in sigmas[:-1]]

        def model_alone(net=net, x_T=x_T, svec=svec):
            for s in svec:
                out = net(x_T, s)
            return out

        for graph in graphs:
            def make_gf(net, process=process, sigmas=sigmas, x_T=x_T, graph=graph):
                model = gf.Model(net, process, "x0")
                return lambda: gf.sample(model, x_T=x_T, solver="dpmpp_2m", schedule=sigmas, lower_order_final=False,
                                         cuda_graph=graph)

            case = f"dpmpp_2m {steps} steps, {net_name}" + (", cuda graph" if graph else "")
            if K is None:
                peer = Baseline("k-diffusion sample_dpmpp_2m", None, status="skipped: k-diffusion not installed")
            else:
                def make_peer(net, sigmas=sigmas.to(ctx.device), x_T=x_T):
                    return lambda: K.sample_dpmpp_2m(net, x_T, sigmas, disable=True)
                peer = Baseline("k-diffusion sample_dpmpp_2m", make_peer(net), equal_work(make_gf, make_peer, net, 1e-4))
            yield Case(case, size_str(shape), make_gf(net), [
                peer, Baseline(f"model alone ({steps} evaluations)", model_alone, kind="bound")])
