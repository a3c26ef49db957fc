"""``train``: training steps/s vs torchcfm and a plain PyTorch loop."""
from typing import Iterator

import torch

from genflow.bench import Baseline, Case, Context, agree, group


def _train_batch(ctx):
    return 256 if ctx.tiny else 4096


def _vp_alpha_sigma(process, t):
    """VP's ``alpha = exp(-t^2 (b1 - b0)/4 - t b0/2)`` and ``sigma = sqrt(1 - alpha^2)``, written out."""
    log_alpha = -0.25 * t ** 2 * (process.beta_max - process.beta_min) - 0.5 * t * process.beta_min
    return log_alpha.exp(), (-torch.expm1(2.0 * log_alpha)).sqrt()


def _loss_and_grads(loss_fn, net):
    """The loss and the flattened gradient of ``net``'s parameters (one fresh backward)."""
    net.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    return torch.cat([loss.detach().reshape(1)] + [p.grad.reshape(-1) for p in net.parameters()])


@group("train", "training steps/s on the 2D MLP, batch 4096: flow matching vs torchcfm, DSM vs a plain PyTorch loop")
def _train(ctx: Context) -> Iterator[Case]:
    """One optimiser step (loss, backward, AdamW step; no EMA, no clipping) at batch 4096 (256 with
    --tiny) of 2D data on ``genflow.train.nets.MLP(2)`` (hidden 256, 3 FiLM blocks), the same
    initial weights on both sides. genflow's step is what ``genflow.train.train`` does per step:
    ``sample_seeds`` for the step, ``family.loss`` (per-sample Philox draws of the noise and the
    time), backward, ``AdamW.step``.

    (1) ``make_family("flow-matching")`` (independent coupling, sigma_min = 0) against torchcfm's
    training loop: ``ConditionalFlowMatcher(sigma=0).sample_location_and_conditional_flow(x0, x1)``
    with ``x0 ~ N(0, I)``, ``net(xt, t)``, MSE to ``ut``. torchcfm puts the data at t = 1 (genflow at
    t = 0), so its time is ``1 - t`` and its target ``-u``: the check runs torchcfm's loss on
    genflow's draws with the network seen as ``-net(x, 1 - t)`` and compares loss and gradients.

    (2) ``make_family("diffusion", process="VP", prediction="eps")`` (uniform t on [t_min, 1],
    ``x_t = alpha x0 + sigma eps``, MSE of eps) against the same loss written as a plain PyTorch
    loop (torchcfm has no DSM loop); checked the same way on genflow's draws.

    Both sides run in this process, so with the same torch threads (``--threads``; 1 is the
    steadiest on a busy machine). Per step, genflow's per-sample draws cost about 0.5 ms more than
    ``torch.rand``/``randn_like`` at batch 4096 (measured on a 2-core CPU), against ~150-400 ms for
    the network's forward and backward."""
    from genflow import peers
    from genflow.train import families, make_family, objectives
    from genflow.train.nets import MLP as TrainMLP
    from genflow.train.trainer import sample_seeds

    batch = _train_batch(ctx)
    size = f"({batch},2)"
    data = ctx.randn(batch, 2, seed=30)
    seeds = sample_seeds(0, 0, 0, 0, batch, ctx.device)

    def stepper(loss_fn, net):
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
        state = {"step": 0}

        def step():
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(state["step"])
            loss.backward()
            opt.step()
            state["step"] += 1
            return loss.detach()
        return step

    def twins(name, **options):
        torch.manual_seed(31)
        net = TrainMLP(2).to(ctx.device, ctx.dtype)
        family = make_family(name, data_shape=(2,), net=net, **options)
        peer_net = TrainMLP(2).to(ctx.device, ctx.dtype)
        peer_net.load_state_dict(net.state_dict())
        return family, peer_net

    def gf_step(family):
        return stepper(lambda k: family.loss("main", data, seeds=sample_seeds(0, k, 0, 0, batch, ctx.device)),
                       family.modules["net"])

    def draws(family):
        noise = objectives.draw_normal(data.shape, seeds, families._NOISE, dtype=data.dtype, device=data.device)
        return noise, objectives.draw_uniform(seeds, families._TIME, device=data.device)

    def check(family, peer_net, peer_loss):
        """Loss and gradients of both sides, same weights, on genflow's draws for ``seeds`` (rel. tol 1e-4)."""
        peer_net.load_state_dict(family.modules["net"].state_dict())
        ours = _loss_and_grads(lambda: family.loss("main", data, seeds=seeds), family.modules["net"])
        theirs = _loss_and_grads(lambda: peer_loss(peer_net, *draws(family)), peer_net)
        a = agree(ours, theirs, 1e-4)
        a.how = "loss and every gradient entry on the same draws; " + a.how
        return a

    # (1) flow matching vs torchcfm
    fm_family, fm_net = twins("flow-matching")
    cfm = peers.optional("torchcfm.conditional_flow_matching")
    if cfm is None:
        peer = Baseline("torchcfm ConditionalFlowMatcher loop", None, status="skipped: torchcfm not installed")
    else:
        matcher = cfm.ConditionalFlowMatcher(sigma=0.0)

        def torchcfm_loss(net, x0, x1, t=None):
            t, xt, ut = matcher.sample_location_and_conditional_flow(x0, x1, t)
            return torch.mean((net(xt, t) - ut) ** 2)

        def torchcfm_on_draws(net, noise, t):  # genflow's time and velocity convention
            def flipped(x, s):
                return -net(x, 1.0 - s)
            return torchcfm_loss(flipped, noise, data, (1.0 - t).to(data.dtype))

        peer = Baseline("torchcfm ConditionalFlowMatcher loop",
                        stepper(lambda k: torchcfm_loss(fm_net, torch.randn_like(data), data), fm_net),
                        lambda: check(fm_family, fm_net, torchcfm_on_draws),
                        note="x0 = randn_like, sample_location_and_conditional_flow, MSE, AdamW")
    yield Case("flow-matching train step", size, gf_step(fm_family), [peer],
               note="MLP(2) hidden 256 x 3 blocks; AdamW lr 1e-3, no EMA/clip")

    # (2) denoising score matching (VP, eps) vs a plain PyTorch loop
    family, peer_net = twins("diffusion", process="VP", prediction="eps")
    process = family.process

    def dsm_loss(net, eps, t):
        alpha, sigma = _vp_alpha_sigma(process, t.to(data.dtype)[:, None])
        return torch.mean((net(alpha * data + sigma * eps, t.to(data.dtype)) - eps) ** 2)

    def plain_dsm(k):
        t = process.t_min + (process.T - process.t_min) * torch.rand(batch, device=data.device, dtype=data.dtype)
        return dsm_loss(peer_net, torch.randn_like(data), t)

    yield Case("DSM (VP, eps) train step", size, gf_step(family), [
        Baseline("plain PyTorch DSM loop", stepper(plain_dsm, peer_net),
                 lambda: check(family, peer_net, lambda net, eps, _u: dsm_loss(net, eps, family.times(seeds)[0])),
                 note="t ~ U[t_min, 1], randn_like, closed-form VP alpha/sigma, MSE, AdamW")],
        note="MLP(2) hidden 256 x 3 blocks; AdamW lr 1e-3, no EMA/clip")

