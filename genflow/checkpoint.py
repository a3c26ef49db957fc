"""Safe, atomic training checkpoints.

A checkpoint is a plain dict of tensors, dicts, lists, numbers and strings written with
``torch.save`` and read back with ``torch.load(weights_only=True)``: unpickling is restricted
to those types, so a file from an untrusted source cannot run code (a pickle with a
``__reduce__`` payload is refused before anything executes). RNG states are stored as tensors
and configurations as plain dicts for that reason.

Writes are atomic: the new checkpoint goes to a temporary file in the same directory, is
flushed and fsync'ed, the current file (if any) is renamed to ``<name>.prev`` and the temporary
file renamed into place (``os.replace``, atomic on POSIX and Windows). A crash at any moment
leaves either the new file or the previous good one as ``.prev``; :func:`load_latest` falls back
to it with a warning when the newest file is truncated or corrupted.

:func:`run_lock` keeps two trainers out of one run directory: the first holds a lock file
``train.lock`` created with ``O_CREAT | O_EXCL`` and holding its process id; a second trainer is
refused with :class:`RunLockedError` naming the directory, and the lock of a process that no
longer exists (a trainer killed with SIGKILL) is taken over.

:func:`save_loop_state` / :func:`resume_loop_state` store and restore the state of a plain
training loop (a network, its optimizer, a ``torch.Generator``, the step and the loss history)
in such a file: ``genflow.train_cnf`` and ``genflow.train_sd_generator`` resume through them.
"""
from __future__ import annotations

import os
import pickle
import random
import tempfile
import time
import warnings
import zipfile
from contextlib import contextmanager
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

__all__ = ["CHECKPOINT_NAME", "CheckpointError", "FORMAT", "LOCK_NAME", "RunLockedError", "VERSION", "get_rng_states",
           "load_checkpoint", "load_latest", "resume_loop_state", "run_lock", "save_checkpoint", "save_loop_state",
           "set_rng_states"]

FORMAT = "genflow.train.checkpoint"
VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"
LOCK_NAME = "train.lock"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: missing, truncated, corrupted, unsafe or of another version."""


class RunLockedError(RuntimeError):
    """Another live process trains in this run directory (its ``train.lock`` names the process)."""


_HELD: Dict[str, int] = {}  # run directories whose lock this process holds -> nesting depth


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _lock_owner(path: str) -> Optional[int]:
    """The process id in the lock file, or None when it is empty or unreadable (being written)."""
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _acquire(directory: str, path: str) -> None:
    for _ in range(10):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _lock_owner(path)
            if owner is None:  # just created by another trainer that has not written its pid yet
                time.sleep(0.05)
                owner = _lock_owner(path)
            if owner is None:
                raise RunLockedError(f"run directory {directory!r} is locked by {path!r}, which names no process; "
                                     f"remove that file if no trainer is running there") from None
            if owner != os.getpid() and _pid_alive(owner):
                raise RunLockedError(f"run directory {directory!r} is in use by another trainer (process {owner}, "
                                     f"lock file {path!r}); wait for it to finish or use another directory") from None
            try:  # a stale lock (its process is gone): take it over
                os.remove(path)
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n")
        return
    raise RunLockedError(f"could not take the lock {path!r} of run directory {directory!r}: other processes keep "
                         f"replacing it")


@contextmanager
def run_lock(directory: str):
    """Hold the lock file ``directory/train.lock`` for the block (re-entrant within a process).

    Raises:
        RunLockedError: naming the directory, when a live process holds the lock.
    """
    directory = os.path.abspath(os.fspath(directory))
    if directory in _HELD:
        _HELD[directory] += 1
        try:
            yield
        finally:
            _HELD[directory] -= 1
        return
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, LOCK_NAME)
    _acquire(directory, path)
    _HELD[directory] = 1
    try:
        yield
    finally:
        del _HELD[directory]
        if _lock_owner(path) == os.getpid():
            os.remove(path)


def save_checkpoint(path: str, state: dict) -> None:
    """Write ``state`` (a dict of tensors, dicts, lists, numbers, strings) to ``path`` atomically.

    The format tag and version are added; the file at ``path`` (if any) is kept as ``path + ".prev"``.
    """
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict, got {type(state).__name__}")
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, "version": VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(path):
            os.replace(path, path + ".prev")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the renames durable
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def load_checkpoint(path: str) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (``torch.load(weights_only=True)``, on the CPU).

    Raises:
        CheckpointError: naming the file, when it is missing, truncated, corrupted, contains
            anything but tensors and plain containers (e.g. a pickled object with code), or has
            another format or version.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"checkpoint {path!r} was refused: it is corrupted or holds objects other than "
                              f"tensors and plain containers (weights_only=True): {err}") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, KeyError, IndexError) as err:
        raise CheckpointError(f"checkpoint {path!r} is truncated or corrupted: {type(err).__name__}: {err}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path!r} is not a genflow training checkpoint "
                              f"(format {state.get('format') if isinstance(state, dict) else type(state).__name__!r})")
    if state.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path!r} has version {state.get('version')!r}; this genflow reads "
                              f"version {VERSION}")
    return state


def load_latest(directory: str, name: str = CHECKPOINT_NAME) -> Tuple[Optional[dict], Optional[str]]:
    """The newest readable checkpoint in ``directory`` and its path, or ``(None, None)`` if there is none.

    Tries ``name`` then ``name + ".prev"``; a broken ``name`` falls back to ``.prev`` with a
    warning. Raises :class:`CheckpointError` when files exist but none can be read.
    """
    path = os.path.join(os.fspath(directory), name)
    candidates = [p for p in (path, path + ".prev") if os.path.exists(p)]
    errors = []
    for candidate in candidates:
        try:
            state = load_checkpoint(candidate)
        except CheckpointError as err:
            errors.append(str(err))
            continue
        if errors:
            warnings.warn(f"{errors[0]}; resuming from the previous checkpoint {candidate!r}", RuntimeWarning,
                          stacklevel=2)
        return state, candidate
    if errors:
        raise CheckpointError("no usable checkpoint: " + "; ".join(errors))
    return None, None


_LOOP_KEYS = ("net", "optimizer", "rng", "step", "history")


def save_loop_state(path: str, net: torch.nn.Module, optimizer: torch.optim.Optimizer, rng: torch.Generator,
                    step: int, history: List[float]) -> None:
    """Save a training loop's ``{net, optimizer, rng, step, history}`` to ``path`` with :func:`save_checkpoint`."""
    save_checkpoint(path, {"net": net.state_dict(), "optimizer": optimizer.state_dict(), "rng": rng.get_state(),
                           "step": int(step), "history": list(history)})


def resume_loop_state(path: str, net: torch.nn.Module, optimizer: torch.optim.Optimizer,
                      rng: torch.Generator) -> Tuple[int, List[float]]:
    """Restore ``net``, ``optimizer`` and ``rng`` in place from :func:`save_loop_state`'s file at ``path``.

    Reads ``path`` (or ``path + ".prev"``, with a warning, when ``path`` is broken) like
    :func:`load_latest`. Returns ``(step, history)``; ``(0, [])`` when neither file exists.

    Raises:
        CheckpointError: the files exist but none is a readable loop checkpoint.
    """
    path = os.path.abspath(os.fspath(path))
    state, used = load_latest(os.path.dirname(path), os.path.basename(path))
    if state is None:
        return 0, []
    missing = [key for key in _LOOP_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"checkpoint {used!r} is not a training-loop checkpoint: it lacks {missing} "
                              f"(expected keys {list(_LOOP_KEYS)})")
    net.load_state_dict(state["net"])
    optimizer.load_state_dict(state["optimizer"])
    rng.set_state(state["rng"])
    return int(state["step"]), list(state["history"])


def get_rng_states() -> dict:
    """The global RNG states (torch CPU and CUDA, Python ``random``, numpy) as tensors and ints."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64),
                   "gauss": "none" if gauss is None else float(gauss)},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
    }


def set_rng_states(states: dict) -> None:
    """Restore the states of :func:`get_rng_states`."""
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    py = states["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()),
                     None if py["gauss"] == "none" else py["gauss"]))
    npy = states["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached"]))
