"""The kernel score-difference (SD) flow and SD-flow generator training (Weber, "The Score-Difference Flow for Implicit Generative Modeling"; Weber 2023).

Particles ``y ~ q_t`` move toward target samples ``x ~ p`` along the score difference of the
noised proxies ``p(z; sigma) = p * N(0, sigma^2 I)`` and ``q_t(z; sigma)``, which by Tweedie's
formula is a difference of two denoisers::

    grad log p(z; sigma) - grad log q_t(z; sigma) = (D_p(z) - D_q(z)) / sigma^2,
    D_p(z) = sum_j K(z, x_j) x_j / sum_j K(z, x_j),   K(z, x) = exp(-|z - x|^2 / (2 sigma^2)).

The move computed at the proxy ``z = y + sigma eps`` is applied to the clean particle ``y``
("proxies are enough", Weber, "The Score-Difference Flow for Implicit Generative Modeling"). Every kernel sum is one call of the streaming engine
``genflow.ops.kernel_weighted_mean``: no N x M matrix is formed. The baselines on the same
engine (MMD flow, SVGD) live in ``genflow.kernel_flows``.
"""
import math
import os
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from genflow._checks import (check_bool, check_int, check_points, check_real, did_you_mean, make_generator,
                             per_step)
from genflow.checkpoint import resume_loop_state, save_loop_state
from genflow.distributed import kernel_weighted_mean as sharded_mean
from genflow.engine.solve import solve
from genflow.engine.terms import ODE
from genflow.ops.kernel_mean import kernel_weighted_mean
from genflow.errors import NonFiniteError, diverged_rows

__all__ = ["DENOISERS_Q", "MLPGenerator", "SIGMA_SCHEDULES", "sd_flow", "sigma_sequence", "train_sd_generator"]

SIGMA_SCHEDULES = ("constant", "linear", "geometric", "cosine")
DENOISERS_Q = ("kernel", "identity")

# -------------------------------------------------------------------------- shared argument checks


def check_particles(y: torch.Tensor, method: str, step: int, steps: int, hint: str) -> None:
    """Raise ``NonFiniteError`` naming ``step`` (0-based) and the number of diverged particles
    when ``y`` holds NaN or Inf (one pass over the particles and a host sync)."""
    if not bool(torch.isfinite(y).all()):
        bad = int(diverged_rows(y).sum())
        raise NonFiniteError(f"{method} diverged at step {step} (of {steps}): {bad} of {y.shape[0]} particles are "
                             f"NaN/Inf; {hint} (pass check_finite=False to skip this check)")


def particle_flow(velocity: Callable[[int, torch.Tensor], torch.Tensor], source: torch.Tensor,
                  step_sizes: Sequence[float], *, method: str, check_finite: bool, progress: bool,
                  return_trajectory: bool, hint: Callable[[int], str]):
    """``y_{k+1} = y_k + h_k velocity(k, y_k)`` for ``k < len(step_sizes)``, run by the engine's
    one time loop: forward Euler (``gf.solve(..., solver="euler")``) on the ODE
    ``dy/dt = h_[t] velocity([t], y)`` in step-index time ``t = 0, 1, ..., steps``, so the
    particle flows share its progress bar and callback. ``source`` is not modified; with
    ``check_finite`` every step's particles are checked (``check_particles``, naming ``method``
    and ``hint(k)``). Returns the particles, or ``(y, trajectory [steps + 1, N, d])``."""
    steps = len(step_sizes)

    def drift(t, y):
        k = int(round(float(t)))
        return step_sizes[k] * velocity(k, y)

    states = [source.detach()] if return_trajectory else None

    def after_step(info):
        if check_finite:
            check_particles(info["x"], method, info["i"], steps, hint(info["i"]))
        if states is not None:
            states.append(info["x"].clone())

    y = solve(ODE(drift), source.detach(), 0.0, float(steps), solver="euler", steps=steps, callback=after_step,
              progress=progress, check_finite=False)
    return (y, torch.stack(states)) if return_trajectory else y


# -------------------------------------------------------------------------- sigma schedules


def sigma_sequence(schedule: Union[str, Sequence[float], Callable[[int], float]] = "constant", *,
                   sigma: float, steps: int, sigma_min: Optional[float] = None) -> List[float]:
    """The per-step kernel bandwidths ``sigma_0, ..., sigma_{steps-1}`` of a schedule.

    With ``r = k / (steps - 1)`` (0 for a single step): ``"constant"`` ``sigma_k = sigma``;
    ``"linear"`` ``sigma + r (sigma_min - sigma)``; ``"geometric"`` ``sigma (sigma_min / sigma)^r``;
    ``"cosine"`` ``sigma_min + (sigma - sigma_min) (1 + cos(pi r)) / 2``. A sequence of ``steps``
    positive numbers is used as is; a callable is called as ``schedule(k)`` for each step.
    Decreasing bandwidths sharpen the SD flow's denoisers as the particles approach the target
    (Weber, "The Score-Difference Flow for Implicit Generative Modeling": "proxies are enough" holds at every sigma > 0).

    Returns:
        list of ``steps`` floats > 0.
    """
    sigma = check_real("sigma", sigma, low=0.0, low_open=True)
    steps = check_int("steps", steps, low=1)
    if isinstance(schedule, str):
        if schedule not in SIGMA_SCHEDULES:
            hint = did_you_mean(schedule, SIGMA_SCHEDULES)
            raise ValueError(f"sigma_schedule must be one of {SIGMA_SCHEDULES}, a sequence or a callable, "
                             f"got {schedule!r}{hint}")
        if schedule == "constant":
            return [sigma] * steps
        if sigma_min is None:
            raise ValueError(f"sigma_schedule={schedule!r} needs sigma_min (the last step's bandwidth)")
        sigma_min = check_real("sigma_min", sigma_min, low=0.0, low_open=True)
        if sigma_min > sigma:
            raise ValueError(f"sigma_min must be <= sigma = {sigma}, got {sigma_min}")
        ratios = [k / (steps - 1) if steps > 1 else 0.0 for k in range(steps)]
        if schedule == "linear":
            return [sigma + r * (sigma_min - sigma) for r in ratios]
        if schedule == "geometric":
            return [sigma * (sigma_min / sigma) ** r for r in ratios]
        return [sigma_min + (sigma - sigma_min) * 0.5 * (1.0 + math.cos(math.pi * r)) for r in ratios]
    if callable(schedule):
        return per_step("sigma_schedule", [schedule(k) for k in range(steps)], steps)
    if isinstance(schedule, (Sequence, torch.Tensor, np.ndarray)):
        return per_step("sigma_schedule", schedule, steps)
    raise TypeError(f"sigma_schedule must be a name, a sequence or a callable, got {type(schedule).__name__}")


# -------------------------------------------------------------------------- the SD flow


def _target_mean(z, target, sigma, rng, target_batch, group, precision, backend):
    """``D_p(z)``: the kernel mean of the target, or of a random subset of ``target_batch`` of its
    rows. With ``group``, of this rank's shard merged across ranks; a rank's subset then carries
    the log-weight ``log(M_r / target_batch)`` so that it stands for its whole shard."""
    log_weights = None
    m = target.shape[0]
    if target_batch is not None and target_batch < m:
        target = target[torch.randperm(m, generator=rng, device=rng.device)[:target_batch].to(target.device)]
        if group is not None:
            log_weights = target.new_full((target_batch,), math.log(m / target_batch))
    if group is None:
        return kernel_weighted_mean(z, target, sigma=sigma, precision=precision, backend=backend)
    return sharded_mean(z, target, sigma=sigma, log_weights=log_weights, group=group, precision=precision,
                        backend=backend)


def sd_flow(source: torch.Tensor, target: torch.Tensor, *, sigma: float, steps: int,
            step_size: Union[float, Sequence[float]],
            sigma_schedule: Union[str, Sequence[float], Callable[[int], float]] = "constant",
            sigma_min: Optional[float] = None, denoiser_q: str = "kernel", target_batch: Optional[int] = None,
            generator=None, return_trajectory: bool = False, progress: bool = False, group=None,
            precision: str = "highest", backend: str = "auto", check_finite: bool = True) -> torch.Tensor:
    """Move particles ``source`` toward target samples along the kernel score-difference flow.

    Step ``k`` (bandwidth ``sigma_k`` from ``sigma_schedule``, step ``h_k``) draws
    ``eps ~ N(0, I)``, forms the noisy proxy ``z = y + sigma_k eps`` and updates the clean particles::

        y <- y + (h_k / sigma_k^2) (D_p(z) - D_q(z)),
        D_p(z) = sum_j K(z, x_j) x_j / sum_j K(z, x_j),   K(z, x) = exp(-|z - x|^2 / (2 sigma_k^2)),

    with ``D_q`` the same kernel mean over the current particles (``denoiser_q="kernel"``), or
    ``D_q(z) = y`` (``"identity"``: the cheap variant, which recovers the reverse process of
    denoising diffusion, Weber, "The Score-Difference Flow for Implicit Generative Modeling" "Diffusion Models"). ``h_k = sigma_k^2`` moves ``y`` by the full
    denoiser difference. Implements the kernel SD flow of Weber (2023), "The Score-Difference
    Flow for Implicit Generative Modeling" (TMLR), Weber, "The Score-Difference Flow for Implicit Generative Modeling". Cost per step: two kernel means
    (one for the identity variant), O((N + M) N d) time, O((N + M) d) memory.

    Args:
        source (Tensor[N, d]): initial particles (float32 | float64); not modified. The flow is
            not differentiable (source and target are detached).
        target (Tensor[M, d]): target samples ``x_j``, source's dtype and device (with ``group``:
            this rank's shard, possibly empty).
        sigma (float > 0): the kernel bandwidth (the first one for decreasing schedules).
        steps (int >= 1): number of steps.
        step_size (float > 0 or a sequence of ``steps`` floats): ``h_k``. With a decreasing
            schedule keep ``h_k / sigma_k^2`` bounded (about 1 at most), e.g.
            ``[0.5 * s**2 for s in sigma_sequence("cosine", sigma=1, sigma_min=0.2, steps=steps)]``.
        sigma_schedule: ``"constant"``, ``"linear"``, ``"geometric"``, ``"cosine"`` (from
            ``sigma`` to ``sigma_min``), a sequence of ``steps`` bandwidths or a callable
            ``k -> sigma_k`` (see ``sigma_sequence``).
        sigma_min (float, optional): the last bandwidth of the decreasing schedules.
        denoiser_q: ``"kernel"`` or ``"identity"``.
        target_batch (int, optional): use a random subset of ``target_batch`` target rows per
            step (without replacement), for very large M; None or >= M uses them all.
        generator: None, an int seed or a torch.Generator on the source's device. It first yields
            one int (the seed of the target-subset stream, drawn whether or not ``target_batch``
            is set, so the noise does not depend on it), then ``eps`` of each step in order.
        return_trajectory: also return the particles after every step.
        progress: show a tqdm progress bar.
        group: a ``torch.distributed`` process group (e.g. ``torch.distributed.group.WORLD``):
            ``target`` is this rank's shard and ``D_p`` is merged across ranks with
            ``genflow.distributed.kernel_weighted_mean``; ``source`` and the generator's seed must
            be the same on every rank (every rank then computes the same particles). None: no
            distribution.
        precision, backend: passed to ``kernel_weighted_mean``.
        check_finite: after every step, raise ``gf.NonFiniteError`` (a ``FloatingPointError``)
            naming the step and the number of diverged particles when some are NaN/Inf.

    Returns:
        Tensor[N, d] the final particles, or ``(y, trajectory)`` with trajectory
        Tensor[steps + 1, N, d] (the source first) when ``return_trajectory``.

    Raises:
        NonFiniteError: naming the step, when the particles become NaN/Inf (lower step_size).
    """
    check_points("source", source)
    check_points("target", target, dim=source.shape[1], like=source, min_rows=0 if group is not None else 1)
    steps = check_int("steps", steps, low=1)
    check_finite = check_bool("check_finite", check_finite)
    sigmas = sigma_sequence(sigma_schedule, sigma=sigma, steps=steps, sigma_min=sigma_min)
    sizes = per_step("step_size", step_size, steps)
    if denoiser_q not in DENOISERS_Q:
        hint = did_you_mean(str(denoiser_q), DENOISERS_Q)
        raise ValueError(f"denoiser_q must be one of {DENOISERS_Q}, got {denoiser_q!r}{hint}")
    if target_batch is not None:
        target_batch = check_int("target_batch", target_batch, low=1)
    rng = make_generator(generator, source.device)
    subset_rng = torch.Generator(device=source.device)
    subset_rng.manual_seed(int(torch.randint(0, 1 << 62, (1,), generator=rng, device=source.device)))

    target = target.detach()

    def velocity(k, y):
        s = sigmas[k]
        z = y + s * torch.randn(y.shape, generator=rng, dtype=y.dtype, device=y.device)
        d_p = _target_mean(z, target, s, subset_rng, target_batch, group, precision, backend)
        d_q = y if denoiser_q == "identity" else kernel_weighted_mean(z, y, sigma=s, precision=precision,
                                                                      backend=backend)
        return (d_p - d_q) / (s * s)

    return particle_flow(velocity, source, sizes, method="sd_flow", check_finite=check_finite, progress=progress,
                         return_trajectory=return_trajectory,
                         hint=lambda k: f"sigma_k = {sigmas[k]:g}, step_size = {sizes[k]:g}; lower step_size")


# -------------------------------------------------------------------------- SD-flow generator training


class MLPGenerator(nn.Module):
    """A small MLP generator ``g_theta(eps)``: latent Tensor[B, latent_dim] -> Tensor[B, out_dim]
    (``depth`` hidden layers of width ``hidden`` with SiLU)."""

    def __init__(self, latent_dim: int, out_dim: int, *, hidden: int = 128, depth: int = 3):
        super().__init__()
        self.latent_dim = check_int("latent_dim", latent_dim, low=1)
        layers, width = [], self.latent_dim
        for _ in range(check_int("depth", depth, low=1)):
            layers += [nn.Linear(width, check_int("hidden", hidden, low=1)), nn.SiLU()]
            width = hidden
        layers.append(nn.Linear(width, check_int("out_dim", out_dim, low=1)))
        self.net = nn.Sequential(*layers)

    def forward(self, eps: torch.Tensor) -> torch.Tensor:
        return self.net(eps)


def train_sd_generator(generator_net: nn.Module, target: torch.Tensor, *, sigma: float, steps: int,
                       batch_size: int = 256, lr: float = 1e-3, inner_steps: int = 1,
                       step_size: Optional[float] = None, latent_dim: Optional[int] = None,
                       denoiser_q: str = "kernel", target_batch: Optional[int] = None, generator=None,
                       progress: bool = False, checkpoint: Optional[Union[str, os.PathLike]] = None,
                       checkpoint_every: int = 100, check_finite: bool = True) -> Tuple[nn.Module, List[float]]:
    """Fit a one-step generator ``g_theta(eps)`` by regression onto SD-flow-moved samples.

    Each iteration draws ``eps ~ N(0, I)`` [batch_size, latent_dim], moves ``y = g_theta(eps)``
    (detached) by ``inner_steps`` kernel SD-flow steps toward the target (``sd_flow`` with
    ``sigma``, ``step_size``, ``denoiser_q`` and a subset of ``target_batch`` target rows), and takes
    one Adam step on ``mean |g_theta(eps) - y_moved|^2``: the SD flow supplies the generator's
    regression targets in place of a discriminator (Weber, "The Score-Difference Flow for Implicit Generative Modeling", "Generative Adversarial
    Networks"). The trained net samples in one evaluation. With ``checkpoint`` set,
    ``{net, optimizer, step, history, rng}`` is saved every ``checkpoint_every`` steps and at the
    end, and a call that finds the file resumes from it (bitwise the same as an uninterrupted run
    on the same machine).

    Args:
        generator_net (nn.Module): ``eps [B, latent_dim] -> Tensor[B, d]``, trained in place
            (e.g. ``MLPGenerator``).
        target (Tensor[M, d]): target samples (on the net's device).
        sigma (float > 0): SD-flow bandwidth. steps (int >= 1): optimisation steps.
        batch_size (int >= 1), lr (float > 0): minibatch size and Adam's learning rate.
        inner_steps (int >= 1): SD-flow steps per iteration. step_size (float > 0, optional):
            the SD-flow step, default ``sigma^2`` (the full denoiser difference).
        latent_dim (int, optional): defaults to ``generator_net.latent_dim``.
        denoiser_q, target_batch: passed to ``sd_flow``.
        generator: None, an int seed or a CPU torch.Generator (latents and SD-flow seeds).
        progress (bool): tqdm bar. checkpoint (path, optional), checkpoint_every (int >= 1).
        check_finite (bool): raise ``gf.NonFiniteError`` naming the step when the generated
            samples, their SD-flow targets (checked per inner step) or the loss are NaN/Inf.

    Returns:
        ``(generator_net, history)``: the trained net and the loss of each step (from step 0,
        including steps done before a resume).
    """
    if not isinstance(generator_net, nn.Module):
        raise TypeError(f"generator_net must be a torch.nn.Module, got {type(generator_net).__name__}")
    check_points("target", target)
    sigma = check_real("sigma", sigma, low=0.0, low_open=True)
    steps, batch_size = check_int("steps", steps, low=1), check_int("batch_size", batch_size, low=1)
    inner_steps = check_int("inner_steps", inner_steps, low=1)
    checkpoint_every = check_int("checkpoint_every", checkpoint_every, low=1)
    check_finite = check_bool("check_finite", check_finite)
    lr = check_real("lr", lr, low=0.0, low_open=True)
    step_size = sigma * sigma if step_size is None else check_real("step_size", step_size, low=0.0, low_open=True)
    if latent_dim is None:
        latent_dim = getattr(generator_net, "latent_dim", None)
        if latent_dim is None:
            raise ValueError("latent_dim is required when generator_net has no latent_dim attribute")
    latent_dim = check_int("latent_dim", latent_dim, low=1)
    rng = make_generator(generator, torch.device("cpu"))

    optimizer = torch.optim.Adam(generator_net.parameters(), lr=lr)
    start, history = 0, []
    if checkpoint is not None:
        start, history = resume_loop_state(checkpoint, generator_net, optimizer, rng)

    def save(step):
        save_loop_state(checkpoint, generator_net, optimizer, rng, step, history)

    with tqdm(total=steps, initial=min(start, steps), desc="SD-flow generator", disable=not progress,
              leave=False) as bar:
        for step in range(start, steps):
            eps = torch.randn(batch_size, latent_dim, generator=rng).to(target.device, target.dtype)
            fake = generator_net(eps)
            if fake.shape != (batch_size, target.shape[1]):
                raise ValueError(f"generator_net must map [B, {latent_dim}] to [B, {target.shape[1]}] "
                                 f"(target's d), got {list(fake.shape)}")
            seed = int(torch.randint(0, 1 << 62, (), generator=rng))
            if check_finite:
                check_particles(fake.detach(), "train_sd_generator (generator_net's samples)", step, steps,
                                "the generator net diverged; lower lr")
            moved = sd_flow(fake.detach(), target, sigma=sigma, steps=inner_steps, step_size=step_size,
                            denoiser_q=denoiser_q, target_batch=target_batch, generator=seed,
                            check_finite=check_finite)
            loss = (fake - moved).square().sum(1).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            history.append(loss.item())
            if check_finite and not math.isfinite(history[-1]):
                raise NonFiniteError(f"train_sd_generator diverged at step {step} (of {steps}): the loss is "
                                     f"{history[-1]}; lower lr or step_size (pass check_finite=False to skip "
                                     f"this check)")
            bar.update(1)
            bar.set_postfix(loss=f"{history[-1]:.4f}")
            if checkpoint is not None and (step + 1) % checkpoint_every == 0:
                save(step + 1)
    if checkpoint is not None and start < steps:
        save(steps)
    return generator_net, history
