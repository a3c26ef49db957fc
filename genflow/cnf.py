"""Maximum-likelihood training of continuous normalizing flows (FFJORD).

A continuous normalizing flow (Chen et al. 2018, "Neural Ordinary Differential Equations", §4;
Grathwohl et al., ICLR 2019, "FFJORD") is a velocity network ``v(x, t)`` whose ODE
``dx/dt = v(x, t)`` carries data at ``t = 0`` to a standard normal at ``t = 1`` (genflow's
``LinearPath`` convention: data at 0, noise at 1). By the instantaneous change of variables
(Chen et al. 2018, Theorem 1)::

    d/dt log p_t(x_t) = -div v(x_t, t)

so integrating ``[x, delta]`` with ``d delta/dt = +div v(x_t, t)`` from ``x_0 = x``,
``delta = 0`` to ``t = 1`` gives::

    log p(x) = log N(x_1; 0, I) + delta(1)

exactly as ``gf.log_likelihood`` does, but here every operation keeps its autograd graph, so
``log p(x)`` is differentiable with respect to the network's parameters and the flow can be
trained by maximum likelihood. The divergence is the Hutchinson estimate ``eps^T (dv/dx) eps``
(``E[eps eps^T] = I``; the probes are held fixed over the solve, FFJORD §3.1), one
vector-Jacobian product built with ``create_graph=True``, or the exact trace (``D`` VJPs, for
small ``D``). A trained network wrapped as ``gf.Model(net, gf.LinearPath(),
prediction="velocity")`` is evaluated with ``gf.log_likelihood``.
"""
from __future__ import annotations

import numbers
import os
from typing import Callable, List, Optional, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from genflow.checkpoint import resume_loop_state, save_loop_state
from genflow.divergence import DivergenceDrift
from genflow.likelihood import integrate_divergence
from genflow.noise import generator_seed
from genflow.ops import hutchinson

__all__ = ["CNFNet", "cnf_log_likelihood", "train_cnf"]

METHODS = ("hutchinson", "exact")
SOLVERS = ("euler", "heun", "rk4")  # engine tableaux (genflow.engine.tableau), as gf.log_likelihood's heun/rk4
_HALF_LOG_2PI = 0.9189385332046727  # log(2 pi) / 2


class CNFNet(nn.Module):
    """A smooth velocity MLP ``v(x, t)`` for continuous normalizing flows.

    Every layer sees the time: ``h_{k+1} = tanh(W_k [h_k, t] + b_k)`` and the output is
    ``W_L [h_L, t] + b_L`` (FFJORD's "concat" layers, Grathwohl et al. 2019). The activation is
    smooth on purpose: the likelihood integrates the divergence of ``v``, and training
    differentiates it again, so piecewise-linear activations (ReLU) give a piecewise-constant
    divergence with zero gradient almost everywhere.

    Args:
        dim (int): data dimension ``D``.
        hidden (int): hidden width. depth (int): number of hidden layers.

    Input ``x (Tensor[B, D])`` and ``t (Tensor[B])`` (cast to x's dtype), output Tensor[B, D].
    """

    def __init__(self, dim: int, hidden: int = 64, depth: int = 3):
        super().__init__()
        for name, value in (("dim", dim), ("hidden", hidden), ("depth", depth)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        sizes = [dim] + [hidden] * depth + [dim]
        self.layers = nn.ModuleList(nn.Linear(a + 1, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tc = t.to(x.dtype).reshape(-1, 1).expand(x.shape[0], 1)
        h = x
        for k, layer in enumerate(self.layers):
            h = layer(torch.cat([h, tc], dim=1))
            if k + 1 < len(self.layers):
                h = torch.tanh(h)
        return h


class NetVelocity:
    """A CNF network ``net(x, t)`` as the velocity of a ``DivergenceDrift``: ``t`` (float64 [B])
    cast to x's dtype, the output checked to be shaped like x."""

    def __init__(self, net: Callable):
        self.net = net

    def velocity(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        v = self.net(x, t.to(x.dtype))
        if not isinstance(v, torch.Tensor) or v.shape != x.shape:
            got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"net must return a tensor shaped like x {tuple(x.shape)}, got {got}")
        return v


def _check_int(name, value, low=1):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def cnf_log_likelihood(net: Callable, x: torch.Tensor, *, steps: int = 8, method: str = "hutchinson",
                       probes: int = 1, noise: str = "rademacher", generator=None,
                       solver: str = "rk4", check_finite: bool = True) -> torch.Tensor:
    """Differentiable log-likelihood ``log p(x)`` (nats per sample) of a CNF velocity network.

    Integrates ``d[x, delta]/dt = [v(x, t), div v(x, t)]`` from ``t = 0`` (``x_0 = x``,
    ``delta = 0``) to ``t = 1`` on a uniform grid of ``steps`` steps and returns::

        log p(x) = log N(x_1; 0, I) + delta(1),   delta(1) = int_0^1 div v(x_t, t) dt

    (instantaneous change of variables, Chen et al. 2018, Theorem 1; FFJORD, Grathwohl et al.
    2019, eq. 4). ``div v`` is Hutchinson's estimate ``mean_k eps_k^T (dv/dx) eps_k`` with
    ``probes`` probes per sample drawn once and held fixed over the solve (FFJORD §3.1): an
    unbiased estimate of ``log p(x)`` up to the solver error, as is its gradient. Under grad mode
    the whole solve keeps its graph (the VJPs use ``create_graph=True``), so ``log p(x)`` can be
    back-propagated to the network's parameters (and to ``x``); under ``torch.no_grad()`` it is
    evaluated without one. The same solve on ``gf.Model(net, gf.LinearPath(),
    prediction="velocity")`` is ``gf.log_likelihood(model, x, solver=..., steps=...)``.

    Args:
        net: the velocity network ``net(x, t) -> Tensor[B, *D]`` with ``t (Tensor[B])`` in x's
            dtype; samples must not interact (no batch norm).
        x (Tensor[B, *D]): data points (the solve runs in x's dtype).
        steps (int >= 1): solver steps over ``[0, 1]``.
        method: ``"hutchinson"`` (one VJP per probe per evaluation) or ``"exact"`` (the full trace,
            ``D`` VJPs per evaluation: for small D).
        probes (int >= 1): Hutchinson probes per sample (averaged).
        noise: ``"rademacher"`` or ``"gaussian"`` probes (``genflow.ops.hutchinson.probes``;
            probe k is the Philox stream at offset k, as in ``gf.log_likelihood``).
        generator: probe seed: None (fresh), an int, B per-sample ints or a torch.Generator.
        solver: ``"euler"``, ``"heun"`` or ``"rk4"`` (classic fourth-order Runge–Kutta).
        check_finite (bool): raise ``gf.NonFiniteError`` (naming the step, the time and how many
            samples diverged) after the first step that leaves a NaN/Inf state or log-density.

    Returns:
        float64 Tensor[B]: ``log p(x)``.
    """
    if not callable(net):
        raise ValueError(f"net must be callable as net(x, t), got {type(net).__name__}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a floating tensor, got {got}")
    if x.dim() < 2 or x.shape[0] == 0:
        raise ValueError(f"x must have shape [B, *D] with B >= 1 and at least one data dimension, got {list(x.shape)}")
    steps = _check_int("steps", steps)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    probes = _check_int("probes", probes)
    if noise not in hutchinson.KINDS:
        raise ValueError(f"noise must be one of {hutchinson.KINDS}, got {noise!r}")
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    batch = x.shape[0]
    eps = ()
    if method == "hutchinson":
        seed = generator_seed(generator, batch)
        eps = [hutchinson.probes(x.shape, seed=seed, offset=k, kind=noise, dtype=x.dtype, device=x.device)
               for k in range(probes)]
    # under grad mode the drift keeps its graph (double backward) and the engine its differentiable path
    drift = DivergenceDrift(NetVelocity(net), method, eps, "loop" if method == "exact" else "vjp",
                            graph=torch.is_grad_enabled())
    x1, delta, _, _ = integrate_divergence(drift, x, 0.0, 1.0, solver=solver, steps=steps,
                                           check_finite=bool(check_finite), caller="gf.cnf_log_likelihood")
    z = x1.reshape(batch, -1).to(torch.float64)
    prior = -0.5 * z.square().sum(1) - z.shape[1] * _HALF_LOG_2PI
    return prior + delta


def train_cnf(net: nn.Module, data: Union[torch.Tensor, Callable], *, steps: int, batch: int = 256,
              lr: float = 1e-3, solve_steps: int = 8, probes: int = 1, noise: str = "rademacher",
              method: str = "hutchinson", solver: str = "rk4", generator=None,
              checkpoint: Optional[Union[str, os.PathLike]] = None, checkpoint_every: int = 50,
              progress: bool = True) -> List[float]:
    """Train a CNF by maximum likelihood: Adam on ``-mean_b log p(x_b)`` (FFJORD, Grathwohl et al. 2019).

    Step ``i`` draws a minibatch and a probe seed from one ``torch.Generator``, evaluates
    ``log p`` with ``cnf_log_likelihood(net, x, steps=solve_steps, ...)`` and takes an Adam step
    on the negative log-likelihood. With ``checkpoint`` set, ``{net, optimizer, step, history,
    rng}`` is saved there every ``checkpoint_every`` steps and at the end, and a call that finds
    the file resumes from it: the network, Adam's moments and the generator's state are
    restored, so an interrupted run resumed to ``steps`` equals an uninterrupted one (bitwise,
    on the same machine and thread count); at most ``checkpoint_every - 1`` steps are redone.
    A checkpoint already at or past ``steps`` is returned as is (its history, no training).

    Args:
        net (nn.Module): the velocity network ``net(x, t)`` (e.g. ``CNFNet``), trained in place.
        data: a Tensor[N, *D] (minibatches drawn uniformly with replacement) or a callable
            ``data(n, generator=g) -> Tensor[n, *D]`` such as ``GaussianMixture.sample``.
        steps (int >= 1): total optimisation steps (a resumed run continues up to ``steps``).
        batch (int >= 1): minibatch size. lr (float > 0): Adam's learning rate (a resumed run
            keeps the checkpoint's optimizer settings).
        solve_steps, probes, noise, method, solver: passed to ``cnf_log_likelihood``.
        generator: None (fresh seed), an int seed or a torch.Generator (CPU) of minibatches
            and probes; on resume its state is replaced by the checkpoint's.
        checkpoint (path, optional): the checkpoint file, written atomically and read safely by
            ``genflow.checkpoint`` (``save_loop_state`` / ``resume_loop_state``: the previous
            file is kept as ``.prev`` and used when the newest is broken; ``CheckpointError`` when
            none is usable). checkpoint_every (int >= 1).
        progress (bool): show a tqdm progress bar with the running negative log-likelihood.

    Returns:
        list of float: the training loss (mean NLL in nats of each step's minibatch), one per
        step from step 0, including the steps done before a resume.
    """
    if not isinstance(net, nn.Module):
        raise ValueError(f"net must be a torch.nn.Module, got {type(net).__name__}")
    if isinstance(data, torch.Tensor):
        if not data.is_floating_point() or data.dim() < 2 or data.shape[0] == 0:
            raise ValueError(f"data must be a floating Tensor[N, *D] with N >= 1, got {data.dtype} {list(data.shape)}")
    elif not callable(data):
        raise ValueError(f"data must be a Tensor[N, *D] or a callable n -> samples, got {type(data).__name__}")
    steps, batch = _check_int("steps", steps), _check_int("batch", batch)
    checkpoint_every = _check_int("checkpoint_every", checkpoint_every)
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not lr > 0:
        raise ValueError(f"lr must be a number > 0, got {lr!r}")
    options = dict(steps=_check_int("solve_steps", solve_steps), probes=probes, noise=noise,
                   method=method, solver=solver)
    if method not in METHODS:  # the rest are checked by cnf_log_likelihood on the first step
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if isinstance(generator, torch.Generator):
        rng = generator
    elif generator is None:
        rng = torch.Generator()
        rng.seed()
    elif isinstance(generator, numbers.Integral) and not isinstance(generator, bool):
        rng = torch.Generator().manual_seed(int(generator))
    else:
        raise ValueError(f"generator must be None, an int seed or a torch.Generator, got {type(generator).__name__}")

    optimizer = torch.optim.Adam(net.parameters(), lr=float(lr))
    start, history = 0, []
    if checkpoint is not None:
        start, history = resume_loop_state(checkpoint, net, optimizer, rng)

    def save(step):
        save_loop_state(checkpoint, net, optimizer, rng, step, history)

    with tqdm(total=steps, initial=min(start, steps), desc="training CNF", disable=not progress, leave=False) as bar:
        for step in range(start, steps):
            if isinstance(data, torch.Tensor):
                idx = torch.randint(data.shape[0], (batch,), generator=rng)
                x = data[idx.to(data.device)]
            else:
                x = data(batch, generator=rng)
            seed = int(torch.randint(0, 1 << 62, (), generator=rng))
            loss = -cnf_log_likelihood(net, x, generator=seed, **options).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            history.append(loss.item())
            bar.update(1)
            bar.set_postfix(nll=f"{history[-1]:.3f}")
            if checkpoint is not None and (step + 1) % checkpoint_every == 0:
                save(step + 1)
    if checkpoint is not None and start < steps:
        save(steps)
    return history
