"""The training loop: AdamW, warm-up and decay, clipping, EMA, exact resume and data parallelism.

``train(family, data, config)`` drives any family that implements the training interface
(``genflow/train/families.py``): ``family.modules`` (an ``nn.ModuleDict``), ``family.phases``,
``family.parameters(phase)``, ``family.loss(phase, batch, labels=..., seeds=...)`` and
``family.state_dict()`` / ``load_state_dict()``. Per step, one global batch is drawn from the
data set by a seeded generator (identically on every process; each takes its contiguous slice)
and, for each phase in order: zero the gradients, compute the loss, backpropagate, average the
gradients over processes (``torch.distributed`` all-reduce), clip, take an AdamW step (Loshchilov
& Hutter 2019) at the scheduled learning rate; after the last phase the EMA weights are updated.

All randomness of sample ``b`` comes from its seed ``seeds[b] = H(run seed, step, phase, b)``
(``b`` the global index in the batch, ``H`` a SplitMix64 hash), so a global batch gives the same
loss however it is split over processes, and a resumed run repeats the uninterrupted one bit
for bit (the checkpoint holds modules, optimisers, the schedule position, EMA, the data
generator and the global RNG states).
"""
from __future__ import annotations

import dataclasses
import glob
import json
import math
import numbers
import os
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import distributed as dist
from tqdm.auto import tqdm

from genflow._checks import check_bool, check_choice, check_int, check_real
from genflow.noise import mix_keys
from genflow.errors import NonFiniteError
from genflow.checkpoint import (CHECKPOINT_NAME, CheckpointError, get_rng_states, load_latest, run_lock,
                                      save_checkpoint, set_rng_states)
from genflow.train.data import Dataset, load_dataset

__all__ = ["EMA", "DECAYS", "NONFINITE_POLICIES", "TrainConfig", "TrainResult", "family_name", "learning_rate",
           "plot_samples", "sample_plotter", "sample_seeds", "train"]

DECAYS = ("cosine", "constant", "linear")
NONFINITE_POLICIES = ("raise", "skip")
LOG_NAME = "metrics.jsonl"
# settings a resumed run may change; any other difference from the checkpoint is an error
_RESUMABLE = ("steps", "eval_every", "checkpoint_every", "log_every", "on_nonfinite")


def _unit_interval(name: str, value) -> float:
    """``value`` as a float in [0, 1), else a ValueError/TypeError naming ``name``."""
    value = check_real(name, value, low=0.0)
    if value >= 1:
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return value


@dataclass
class TrainConfig:
    """Training hyper-parameters (all plain numbers, stored in checkpoints as a dict).

    Args:
        steps: optimiser steps in all. batch_size: the global batch (split over processes).
        lr: peak learning rate. weight_decay, betas: AdamW's.
        warmup: steps of linear warm-up. decay: ``"cosine"``, ``"linear"`` or ``"constant"``
            after warm-up (see :func:`learning_rate`).
        grad_clip: maximum global gradient norm per phase (None: no clipping).
        ema: EMA decay (None: no EMA). bf16: autocast the loss to bfloat16.
        seed: seeds the data order and every per-sample seed.
        eval_every, checkpoint_every, log_every: periods in steps (0: never; a final checkpoint
            is always written when a checkpoint directory is given).
        on_nonfinite: what a non-finite loss or gradient norm does: ``"raise"`` (default) stops
            with ``gf.NonFiniteError`` naming the step and keeps the last checkpoint;
            ``"skip"`` drops that step's update for the phase (its loss is recorded as is).

    Integers and reals may be Python, NumPy or 0-d tensor numbers.
    """

    steps: int
    batch_size: int
    lr: float = 2e-3
    weight_decay: float = 0.0
    betas: Tuple[float, float] = (0.9, 0.999)
    warmup: int = 0
    decay: str = "cosine"
    grad_clip: Optional[float] = 1.0
    ema: Optional[float] = 0.999
    bf16: bool = False
    seed: int = 0
    eval_every: int = 0
    checkpoint_every: int = 0
    log_every: int = 50
    on_nonfinite: str = "raise"

    def __post_init__(self):
        for name, low in (("steps", 1), ("batch_size", 1), ("warmup", 0), ("seed", 0), ("eval_every", 0),
                          ("checkpoint_every", 0), ("log_every", 0)):
            setattr(self, name, check_int(f"TrainConfig.{name}", getattr(self, name), low=low))
        self.lr = check_real("TrainConfig.lr", self.lr, low=0.0, low_open=True)
        self.weight_decay = check_real("TrainConfig.weight_decay", self.weight_decay, low=0.0)
        betas = tuple(self.betas) if isinstance(self.betas, (tuple, list)) else ()
        if len(betas) != 2:
            raise ValueError(f"TrainConfig.betas must be two numbers in [0, 1), got {self.betas!r}")
        self.betas = tuple(_unit_interval(f"TrainConfig.betas[{i}]", b) for i, b in enumerate(betas))
        check_choice("TrainConfig.decay", self.decay, DECAYS)
        check_choice("TrainConfig.on_nonfinite", self.on_nonfinite, NONFINITE_POLICIES)
        if self.grad_clip is not None:
            self.grad_clip = check_real("TrainConfig.grad_clip", self.grad_clip, low=0.0, low_open=True)
        if self.ema is not None:
            self.ema = _unit_interval("TrainConfig.ema", self.ema)
        self.bf16 = check_bool("TrainConfig.bf16", self.bf16)

    def to_dict(self) -> dict:
        """Plain dict (lists for tuples), as stored in checkpoints."""
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        return out


def learning_rate(config: TrainConfig, step: int) -> float:
    """The learning rate of (0-based) optimiser step ``step``.

    Warm-up ``lr (step + 1) / warmup`` for ``step < warmup``; after it, with
    ``p = (step - warmup) / (steps - warmup)``: ``lr (1 + cos(pi p)) / 2`` (cosine, Loshchilov &
    Hutter 2017, "SGDR", Eq. 5, without restarts), ``lr (1 - p)`` (linear) or ``lr`` (constant).
    """
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    p = (step - config.warmup) / max(config.steps - config.warmup, 1)
    if config.decay == "cosine":
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * p))
    if config.decay == "linear":
        return config.lr * (1.0 - p)
    return config.lr


def sample_seeds(seed: int, step: int, phase: int, start: int, stop: int, device=None) -> torch.Tensor:
    """Per-sample seeds (int64 Tensor[stop - start], in [0, 2^63)) of global batch rows ``start..stop-1``.

    ``seeds[b] = H(H(H(seed, step), phase), b) >> 1`` with ``H`` SplitMix64 mixing: a function of
    the run seed, the step, the phase and the global row only.
    """
    key = mix_keys(np.array([seed], dtype=np.uint64), np.uint64(step))
    key = mix_keys(key, np.uint64(phase))
    rows = mix_keys(key, np.arange(start, stop, dtype=np.uint64)) >> np.uint64(1)
    return torch.from_numpy(rows.astype(np.int64)).to(device)


class EMA:
    """Exponential moving average of parameters: ``ema <- d ema + (1 - d) theta`` after each step.

    Starts at the initial parameters (Polyak & Juditsky 1992; as used for diffusion models by Ho
    et al. 2020, Appendix B). Keys are the parameter names of the module it was built from.
    """

    def __init__(self, module: torch.nn.Module, decay: float):
        if not 0 <= decay < 1:
            raise ValueError(f"decay must be in [0, 1), got {decay!r}")
        self.decay = float(decay)
        self.shadow = {name: p.detach().clone() for name, p in module.named_parameters()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        for name, p in module.named_parameters():
            self.shadow[name].mul_(self.decay).add_(p.detach(), alpha=1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, module: torch.nn.Module) -> None:
        """Overwrite ``module``'s parameters with the averages."""
        for name, p in module.named_parameters():
            p.copy_(self.shadow[name])

    @contextmanager
    def applied(self, module: torch.nn.Module):
        """Within the block ``module`` holds the EMA weights; its own weights are restored after."""
        saved = {name: p.detach().clone() for name, p in module.named_parameters()}
        self.copy_to(module)
        try:
            yield module
        finally:
            with torch.no_grad():
                for name, p in module.named_parameters():
                    p.copy_(saved[name])

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) ^ set(state["shadow"])
        if missing:
            raise ValueError(f"EMA state does not match the module: parameters {sorted(missing)} differ")
        self.decay = float(state["decay"])
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)


@dataclass
class TrainResult:
    """What :func:`train` returns.

    ``losses[phase]`` is the loss curve (float64 Tensor[steps], the mean over the global batch),
    ``metrics`` the evaluations (``{"step": s, **metrics}``), ``ema`` the EMA weights (use
    ``result.ema.copy_to(family.modules)`` or ``with result.ema.applied(family.modules):`` to
    sample with them).
    """

    family: object
    step: int
    losses: Dict[str, torch.Tensor]
    metrics: List[dict] = field(default_factory=list)
    ema: Optional[EMA] = None
    checkpoint: Optional[str] = None
    log: Optional[str] = None
    seconds: float = 0.0
    steps_per_s: float = 0.0


def _world() -> Tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _average_gradients(params: List[torch.Tensor], world: int) -> None:
    """``grad <- sum over processes of grad / world``, one all-reduce per (device, dtype) bucket."""
    buckets: Dict[tuple, List[torch.Tensor]] = {}
    for p in params:
        buckets.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
    for grads in buckets.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= world
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))


def _check_family(family) -> None:
    for attr in ("modules", "phases", "parameters", "loss", "state_dict", "load_state_dict"):
        if not hasattr(family, attr):
            raise TypeError(f"family must implement the training interface (genflow.train.families.Family); "
                            f"{type(family).__name__} has no {attr!r}")
    if not isinstance(family.modules, torch.nn.Module):
        raise TypeError(f"family.modules must be an nn.ModuleDict, got {type(family.modules).__name__}")
    if not family.phases:
        raise ValueError("family.phases must name at least one phase")


def _plain_metrics(metrics, step: int) -> dict:
    if not isinstance(metrics, dict):
        raise TypeError(f"evaluate must return a dict of numbers, got {type(metrics).__name__}")
    out = {"step": step}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"evaluate must return numbers; metric {key!r} is {type(value).__name__}")
        out[str(key)] = float(value)
    return out


def _truncate_log(path: str, step: int) -> None:
    """Drop log lines written after ``step`` by an interrupted run (and a half-written last line)."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except json.JSONDecodeError:
                continue
    with open(path, "w") as f:
        f.writelines(kept)


def family_name(family) -> str:
    """The name a checkpoint records for ``family`` (its ``name``, else its class name)."""
    return str(getattr(family, "name", type(family).__name__))


def _checkpoint_to_resume(checkpoint_dir: str, family, resume: bool) -> Tuple[Optional[dict], Optional[str]]:
    """``(state, path)`` of the checkpoint to resume from, ``(None, None)`` to start afresh.

    A run directory belongs to one family: its checkpoint of another family is refused, also
    with ``resume=False`` (which only restarts the same family).
    """
    try:
        state, path = load_latest(checkpoint_dir)
    except CheckpointError:
        if resume:
            raise
        return None, None  # starting afresh over unreadable files
    if state is None:
        return None, None
    saved = state.get("family_name")
    if saved is not None and saved != family_name(family):
        raise CheckpointError(f"run directory {checkpoint_dir!r} holds a checkpoint of family {saved!r} ({path!r}); "
                              f"this run trains family {family_name(family)!r}: use another directory")
    return (state, path) if resume else (None, None)


def _first_nonfinite(**values) -> Optional[Tuple[str, float]]:
    """``(name, value)`` of the first value that is not None and not finite."""
    for name, value in values.items():
        if value is not None and not math.isfinite(value):
            return name.replace("_", " "), value
    return None


class _Run:
    """The state of one :func:`train` call: optimisers, EMA, data order, curves; one step at a time."""

    def __init__(self, family, data: Dataset, config: TrainConfig, checkpoint_dir: Optional[str]):
        self.family, self.data, self.config = family, data, config
        self.world, self.rank = _world()
        if config.batch_size % self.world:
            raise ValueError(f"batch_size ({config.batch_size}) must be divisible by the number of processes "
                             f"({self.world})")
        local = config.batch_size // self.world
        self.lo, self.hi = self.rank * local, (self.rank + 1) * local
        first = next(family.modules.parameters(), None)
        self.device = first.device if first is not None else torch.device("cpu")
        self.phases = tuple(family.phases)
        self.conditional = getattr(family, "num_classes", None) is not None
        self.optimizers = {}
        for phase in self.phases:
            params = list(family.parameters(phase))
            if not params:
                raise ValueError(f"family.parameters({phase!r}) is empty: nothing to train in this phase")
            self.optimizers[phase] = torch.optim.AdamW(params, lr=config.lr, betas=config.betas,
                                                       weight_decay=config.weight_decay)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.losses = {phase: torch.zeros(config.steps, dtype=torch.float64) for phase in self.phases}
        self.metrics: List[dict] = []
        self.ema: Optional[EMA] = None
        self.checkpoint_dir = checkpoint_dir
        self.ckpt_path = os.path.join(checkpoint_dir, CHECKPOINT_NAME) if checkpoint_dir is not None else None
        self.last_ckpt = 0
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if config.bf16 \
            else nullcontext

    def restore(self, state: dict, path: str) -> int:
        """Continue from checkpoint ``state`` (read from ``path``); returns its step."""
        saved = state["config"]
        changed = [k for k, v in self.config.to_dict().items() if k not in _RESUMABLE and saved.get(k) != v]
        if changed:
            raise ValueError(f"cannot resume from {path!r}: settings {changed} differ from the checkpoint's "
                             f"({ {k: saved.get(k) for k in changed} })")
        try:
            self.family.load_state_dict(state["family"])
        except (RuntimeError, KeyError, ValueError, TypeError) as err:
            lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
            raise CheckpointError(f"cannot resume from {path!r}: its weights do not fit this family's networks "
                                  f"(built with other options, e.g. another width?): {' '.join(lines[:2])}") from None
        start = int(state["step"])
        for phase in self.phases:
            self.optimizers[phase].load_state_dict(state["optimizers"][phase])
            done = state["losses"][phase][:min(start, self.config.steps)]
            self.losses[phase][:done.numel()] = done
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.generator.set_state(state["data_generator"])
        set_rng_states(state["rng"])
        self.metrics = [dict(m) for m in state["metrics"]]
        self.last_ckpt = start
        return start

    def check_weights(self, step: int) -> None:
        """NonFiniteError when a weight is NaN/Inf (they are then neither saved nor returned)."""
        shadow = self.ema.shadow.items() if self.ema is not None else ()
        for name, p in [*self.family.modules.named_parameters(), *((f"EMA of {n}", t) for n, t in shadow)]:
            if not bool(torch.isfinite(p).all()):
                raise NonFiniteError(f"training stopped after step {step}: parameter {name!r} is not finite; "
                                     f"{self._kept()}")

    def _kept(self) -> str:
        if self.ckpt_path is None:
            return "no checkpoint directory was given"
        if self.last_ckpt == 0:
            return "no checkpoint was written"
        return f"the last finite checkpoint (step {self.last_ckpt}) is kept in {self.checkpoint_dir!r}"

    def save(self, step: int) -> None:
        self.check_weights(step)
        self.last_ckpt = step
        if self.ckpt_path is None or self.rank != 0:
            return
        save_checkpoint(self.ckpt_path, {
            "step": step, "config": self.config.to_dict(), "family": self.family.state_dict(),
            "family_name": family_name(self.family),
            "optimizers": {phase: opt.state_dict() for phase, opt in self.optimizers.items()},
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "data_generator": self.generator.get_state(), "rng": get_rng_states(),
            "losses": {phase: curve[:step].clone() for phase, curve in self.losses.items()},
            "metrics": self.metrics,
        })

    def step(self, step: int, lr: float) -> Dict[str, float]:
        """One optimiser step of every phase; returns the gradient norms (with clipping)."""
        config = self.config
        x, labels = self.data.batch(config.batch_size, generator=self.generator)
        x = x[self.lo:self.hi].to(self.device)
        labels = labels[self.lo:self.hi].to(self.device) if labels is not None and self.conditional else None
        grad_norms = {}
        for index, phase in enumerate(self.phases):
            opt = self.optimizers[phase]
            for group in opt.param_groups:
                group["lr"] = lr
            opt.zero_grad(set_to_none=True)
            seeds = sample_seeds(config.seed, step, index, self.lo, self.hi, self.device)
            with self.autocast():
                loss = self.family.loss(phase, x, labels=labels, seeds=seeds)
            if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                raise ValueError(f"family.loss({phase!r}) must return a scalar tensor, got "
                                 f"{getattr(loss, 'shape', type(loss).__name__)}")
            loss.backward()
            params = [p for group in opt.param_groups for p in group["params"] if p.grad is not None]
            value = loss.detach().float().reshape(1)
            if self.world > 1:
                _average_gradients(params, self.world)
                dist.all_reduce(value, op=dist.ReduceOp.SUM)
                value /= self.world
            self.losses[phase][step] = float(value)
            norm = None
            if config.grad_clip is not None:
                norm = grad_norms[phase] = float(torch.nn.utils.clip_grad_norm_(params, config.grad_clip))
            bad = _first_nonfinite(loss=float(value), gradient_norm=norm)
            if bad is not None:
                if config.on_nonfinite == "raise":
                    raise NonFiniteError(f"training stopped at step {step + 1} of {config.steps}: the {bad[0]} of "
                                         f"phase {phase!r} is {bad[1]} (TrainConfig.on_nonfinite='skip' drops such "
                                         f"updates); nothing of this step was saved, {self._kept()}")
                opt.zero_grad(set_to_none=True)
                continue
            opt.step()
        if self.ema is not None:
            self.ema.update(self.family.modules)
        return grad_norms


def train(family, data, config: TrainConfig, *, checkpoint_dir: Optional[str] = None, resume: bool = True,
          evaluate: Optional[Callable] = None, progress: bool = True) -> TrainResult:
    """Train ``family`` on ``data`` with ``config``; see the module docstring for the step.

    Args:
        family: a training family (``genflow.train.make_family(...)`` or anything with its interface).
        data: a :class:`~genflow.train.data.Dataset`, or anything :func:`load_dataset` accepts.
        config (TrainConfig): hyper-parameters.
        checkpoint_dir (str, optional): where ``checkpoint.pt`` (+ ``.prev``) and ``metrics.jsonl``
            go (rank 0 writes). While training, rank 0 holds the directory's lock file
            ``train.lock``: a second trainer on the same directory gets
            :class:`~genflow.checkpoint.RunLockedError` (the lock of a dead process is taken over).
        resume (bool): continue from the newest good checkpoint in ``checkpoint_dir``, if any
            (a broken newest file falls back to ``.prev`` with a warning). Settings other than
            ``steps``, the periods and ``on_nonfinite`` must match the checkpoint's, and its
            weights must fit the family's networks. ``resume=False`` starts afresh, but only
            for the same family: a directory holding another family's checkpoint is refused.
        evaluate (callable, optional): ``evaluate(family, step) -> dict of numbers``, called every
            ``eval_every`` steps with the EMA weights in place (see :func:`sample_plotter`), on
            every process (so it may use collectives); rank 0 logs the results.
        progress (bool): a tqdm bar with the loss and throughput (rank 0).

    A NaN/Inf loss or gradient norm stops training with ``gf.NonFiniteError`` naming the step
    (or is skipped, ``config.on_nonfinite="skip"``); weights are checked before every
    checkpoint and before returning, so non-finite weights are never saved or returned and the
    last finite checkpoint stays in place.

    The data's labels are passed to ``family.loss`` when the family is class-conditional
    (``family.num_classes`` set), otherwise ``labels=None``.

    Data parallel: when ``torch.distributed`` is initialised, rank 0's initial weights are
    broadcast, each process computes the loss of its slice of the global batch and the
    gradients are averaged (all-reduce) before clipping, which equals one process at the same
    global batch up to float rounding.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    _check_family(family)
    resume = check_bool("resume", resume)
    data = data if isinstance(data, Dataset) else load_dataset(data)
    locked = checkpoint_dir is not None and _world()[1] == 0
    with run_lock(checkpoint_dir) if locked else nullcontext():
        return _train(_Run(family, data, config, checkpoint_dir), resume, evaluate, progress)


def _train(run: _Run, resume: bool, evaluate: Optional[Callable], progress: bool) -> TrainResult:
    config, family, phases = run.config, run.family, run.phases
    checkpoint_dir = run.checkpoint_dir
    log_path = os.path.join(checkpoint_dir, LOG_NAME) if checkpoint_dir is not None and run.rank == 0 else None
    state, state_path = _checkpoint_to_resume(checkpoint_dir, family, resume) if checkpoint_dir is not None \
        else (None, None)
    if state is None and run.world > 1:
        with torch.no_grad():
            for tensor in family.modules.state_dict().values():
                dist.broadcast(tensor, src=0)
    run.ema = EMA(family.modules, config.ema) if config.ema is not None else None
    start = 0
    if state is not None:
        start = run.restore(state, state_path)
        if log_path is not None:
            _truncate_log(log_path, start)
    elif log_path is not None and os.path.exists(log_path):
        os.remove(log_path)
    if log_path is not None:
        os.makedirs(checkpoint_dir, exist_ok=True)
        for stale in glob.glob(os.path.join(glob.escape(checkpoint_dir), CHECKPOINT_NAME + ".*.tmp")):
            os.remove(stale)  # left by a writer that was killed mid-save
    log_file = open(log_path, "a") if log_path is not None else None
    bar = tqdm(total=config.steps, initial=min(start, config.steps), desc=f"training {getattr(family, 'name', '')}",
               disable=not progress or run.rank != 0, leave=False)
    t0 = time.perf_counter()
    try:
        for step in range(start, config.steps):
            lr = learning_rate(config, step)
            grad_norms = run.step(step, lr)
            done = step + 1
            bar.update(1)
            if done % max(config.log_every, 1) == 0 or done == config.steps:
                rate = (done - start) / max(time.perf_counter() - t0, 1e-9)
                record = {"step": done, "lr": lr, "steps_per_s": rate, "samples_per_s": rate * config.batch_size,
                          **{f"loss/{p}": float(run.losses[p][step]) for p in phases},
                          **{f"grad_norm/{p}": g for p, g in grad_norms.items()}}
                bar.set_postfix(loss=f"{float(run.losses[phases[-1]][step]):.4g}",
                                samples_s=f"{rate * config.batch_size:.3g}")
                if log_file is not None and config.log_every:
                    log_file.write(json.dumps(record) + "\n")
                    log_file.flush()
            if evaluate is not None and config.eval_every and done % config.eval_every == 0:
                with run.ema.applied(family.modules) if run.ema is not None else nullcontext():
                    result = _plain_metrics(evaluate(family, done), done)
                run.metrics.append(result)
                if log_file is not None:
                    log_file.write(json.dumps({"eval": True, **result}) + "\n")
                    log_file.flush()
            if config.checkpoint_every and done % config.checkpoint_every == 0:
                run.save(done)
        if run.last_ckpt != max(start, config.steps):
            run.save(config.steps)
    finally:
        bar.close()
        if log_file is not None:
            log_file.close()
    elapsed = time.perf_counter() - t0
    ran = max(config.steps - start, 0)
    return TrainResult(family=family, step=max(start, config.steps), losses=run.losses, metrics=run.metrics,
                       ema=run.ema, checkpoint=run.ckpt_path, log=log_path, seconds=elapsed,
                       steps_per_s=ran / max(elapsed, 1e-9))


def plot_samples(x: torch.Tensor, path: str, *, title: str = "", max_images: int = 64) -> str:
    """Save ``x`` as a figure at ``path``: a scatter for 2D points (Tensor[n, 2]), a grid of at
    most ``max_images`` images for Tensor[n, C, H, W] in [-1, 1]. Returns ``path``."""
    from matplotlib.figure import Figure

    x = x.detach().float().cpu().numpy()   # NumPy arrays: matplotlib warns on torch's __array__ under NumPy 2
    fig = Figure(figsize=(4, 4))
    ax = fig.add_subplot()
    if x.ndim == 2 and x.shape[1] == 2:
        ax.scatter(x[:, 0], x[:, 1], s=2)
        ax.set_aspect("equal")
    elif x.ndim == 4:
        imgs = x[:max_images].clip(-1, 1) * 0.5 + 0.5
        cols = math.ceil(math.sqrt(imgs.shape[0]))
        rows = math.ceil(imgs.shape[0] / cols)
        c, h, w = imgs.shape[1:]
        grid = np.ones((c, rows * h, cols * w), dtype=np.float32)
        for k, img in enumerate(imgs):
            grid[:, (k // cols) * h:(k // cols + 1) * h, (k % cols) * w:(k % cols + 1) * w] = img
        image = grid.transpose(1, 2, 0)
        ax.imshow(image[..., 0] if c == 1 else image, cmap="gray" if c == 1 else None, vmin=0, vmax=1)
        ax.axis("off")
    else:
        raise ValueError(f"plot_samples draws 2D points or images, got samples of shape {tuple(x.shape)}")
    ax.set_title(title)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def sample_plotter(directory: str, n: int = 512, *, seed: int = 0, max_images: int = 64) -> Callable:
    """An ``evaluate`` callback that saves ``samples_<step>.png`` (a scatter for 2D data, an image grid
    for Tensor[n, C, H, W]) from ``family.sample(n, generator=seed)`` and returns no metrics."""

    def plot(family, step: int) -> dict:
        x = family.sample(n, generator=torch.Generator().manual_seed(seed))
        plot_samples(x, os.path.join(directory, f"samples_{step:07d}.png"),
                     title=f"{getattr(family, 'name', '')} step {step}", max_images=max_images)
        return {}
    return plot
