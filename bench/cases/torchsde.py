"""``torchsde``: reverse-SDE solves vs torchsde sdeint."""
import math
from typing import Iterator

import torch

from genflow.bench import Baseline, Case, Context, Counted, agree, group
from bench.cases.common import solve_shapes, MODELS, make_net, size_str, missing


class _ReverseSDE(torch.nn.Module):
    """The reverse SDE of a model in torchsde's forward time ``s = T - t`` (Ito, diagonal noise):
    ``dx = -[f x - g2 score(x, t)] ds + sqrt(g2) dW``, one network call per drift."""

    noise_type = "diagonal"
    sde_type = "ito"

    def __init__(self, model, batch, device, dtype):
        super().__init__()
        self.model, self.batch, self.device, self.dtype = model, batch, device, dtype
        self.T = float(model.process.T)

    def f(self, s, y):
        t = self.T - float(s)
        p = self.model.process
        a, b = self.model.coefficients("score", t)
        g2, f = float(p.g2(t)), float(p.f(t))
        out = self.model.net(y, torch.full((self.batch,), t, dtype=self.dtype, device=self.device))
        return (g2 * a - f) * y + (g2 * b) * out

    def g(self, s, y):
        return y.new_full((1, 1), math.sqrt(float(self.model.process.g2(self.T - float(s))))).expand_as(y)


def _increments_brownian(torchsde, dws):
    """A torchsde Brownian motion handing out the given increments in order (the agreement check)."""
    class Increments(torchsde.BaseBrownian):
        def __init__(self):
            self.i = 0

        def __call__(self, ta, tb=None, return_U=False, return_A=False):
            dw = dws[self.i]
            self.i += 1
            return dw

        def __repr__(self):
            return "Increments()"

        dtype = property(lambda self: dws[0].dtype)
        device = property(lambda self: dws[0].device)
        shape = property(lambda self: tuple(dws[0].shape))
        levy_area_approximation = property(lambda self: "none")

    return Increments()


@group("torchsde", "reverse-SDE solves vs torchsde 0.2.6 sdeint (Euler-Maruyama, equal steps)")
def _torchsde(ctx: Context) -> Iterator[Case]:
    """VP reverse SDE (eta = 1), x0 network, from T = 1 to t_min on a uniform grid: genflow
    ``euler_maruyama`` (in-kernel Philox noise) vs ``sdeint(method="euler")`` (its default
    BrownianInterval, built per solve as usual) at equal steps. Agreement is checked once with the
    same Brownian increments fed to both. torchsde evaluates the drift once more than it steps
    (its shape check at the start)."""
    import genflow as gf
    from genflow import peers

    tsde = peers.optional("torchsde")
    steps = 10 if ctx.tiny else (50 if ctx.quick else 100)
    for model_name in MODELS:
        for shape in solve_shapes(ctx, model_name):
            size = size_str(shape)
            case = f"euler_maruyama {steps} steps, {model_name}"
            if tsde is None:
                yield missing("torchsde", case, size, "torchsde euler")
                continue
            process = gf.VP()
            net = make_net(model_name)
            ts = gf.time_grid(process, steps, "uniform")
            span = float(process.T - process.t_min)
            dt = span / steps * (1 + 1e-6)  # exactly `steps` steps (the last one clipped to the end)
            s_span = torch.tensor([0.0, span], dtype=ctx.dtype, device=ctx.device)
            x_T = ctx.randn(*shape, seed=5)
            g = torch.Generator().manual_seed(6)
            zs = [torch.randn(shape, generator=g, dtype=ctx.dtype).to(ctx.device) for _ in range(steps)]

            def make_gf(net, ts=ts, x_T=x_T, process=process, noise=None):
                model = gf.Model(net, process, "x0")
                if noise is None:
                    return lambda: gf.sample(model, x_T=x_T, solver="euler_maruyama", schedule=ts, generator=0)
                it = iter(noise)
                return lambda: gf.sample(model, x_T=x_T, solver="euler_maruyama", schedule=ts,
                                         noise_sampler=lambda a, b: next(it))

            def make_peer(net, x_T=x_T, process=process, s_span=s_span, dt=dt, bm=None):
                sde = _ReverseSDE(gf.Model(net, process, "x0"), x_T.shape[0], x_T.device, x_T.dtype)
                return lambda: tsde.sdeint(sde, x_T, s_span, method="euler", dt=dt, bm=bm)[-1]

            def check(net=net, make_gf=make_gf, make_peer=make_peer, zs=zs, dt=dt):
                ours_net, peer_net = Counted(net), Counted(net)
                ours = make_gf(ours_net, noise=zs)()
                dws = [z * math.sqrt(dt) for z in zs]
                bm = _increments_brownian(tsde, dws)
                theirs = make_peer(peer_net, bm=bm)()
                if bm.i != len(dws):
                    raise RuntimeError(f"torchsde took {bm.i} steps, expected {len(dws)}")
                a = agree(ours, theirs, 1e-4, nfe_genflow=ours_net.calls, nfe_peer=peer_net.calls)
                a.how = "same Brownian increments; " + a.how
                return a

            yield Case(case, size, make_gf(net), [Baseline("torchsde euler", make_peer(net), check)])



# ---------------------------------------------------------------- likelihood
