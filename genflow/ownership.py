"""Who owns a tensor during a solve: the engine owns its state and history, the model its outputs.

A solver updates its state in place and keeps earlier model outputs (multistep history, Runge–Kutta
stages). That is only correct while no model output shares memory with the state or with an
output the solver still holds. Networks that break this are common: one that returns its input
(``lambda x, t: x``), one that writes every result into one preallocated buffer (CUDA-graph
captured models, ``torch.compile(mode="reduce-overhead")``, TensorRT-style engines), one that
modifies its input in place. ``OutputOwnership`` makes the solve correct on purpose for the first
two and ``check_input_unchanged`` turns the third into a clear error, at the cost of a few
pointer comparisons per model call when nothing aliases (data pointers; whole storages only
for outputs that are views, whose creation already costs more):

* an output sharing storage with the evaluated state is copied;
* the first output of a solve is copied, and a later output in the same storage (one static
  buffer) switches the solve to copying every output, so nothing held is ever overwritten;
* an output in the storage of another recent output (a pool of rotating buffers, where an
  output the solver holds may already be overwritten) raises ``OutputAliasError``: pass
  ``model_reuses_buffers=True``, which copies every output from the start.

The outputs of the last ``RECENT`` evaluations are kept alive, so a fresh allocation can never
reuse their memory and a shared storage always means the model reused it.
"""
from collections import deque
from typing import Callable, Optional

import torch

__all__ = ["FRESH_OUTPUT_ADVICE", "RECENT", "InputMutationError", "OutputAliasError", "OutputOwnership", "check_input_unchanged",
           "own_output", "shares_storage", "storage_id"]

FRESH_OUTPUT_ADVICE = "return a new tensor on every call (e.g. out.clone())"  # where no option copies for you
RECENT = 4  # outputs a solver holds across later model calls: at most 3 (RK4 stages, 3rd-order history)


class InputMutationError(RuntimeError):
    """The model modified its input tensor in place (the solver's state) during a call."""


class OutputAliasError(RuntimeError):
    """The model returned memory of an earlier output that the solver may still hold."""


def storage_id(t: torch.Tensor) -> int:
    """The address of ``t``'s storage: tensors (views included) share memory only when equal."""
    return t.untyped_storage().data_ptr()


def shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` live in the same (non-empty) storage."""
    ptr = storage_id(a)
    return ptr != 0 and ptr == storage_id(b)


def own_output(out: torch.Tensor, held) -> torch.Tensor:
    """``out``, or a contiguous copy of it when it shares storage with any tensor in ``held``."""
    ptr = storage_id(out)
    if ptr != 0 and any(storage_id(h) == ptr for h in held if h is not None):
        return out.clone(memory_format=torch.contiguous_format)
    return out


def check_input_unchanged(x: torch.Tensor, version: int, where: str) -> None:
    """Raise ``InputMutationError`` when ``x._version`` moved past ``version`` (read before the
    model call): the model wrote into its input, the solver's state, so the solve would be
    silently wrong. ``where`` names the call (solver and step)."""
    if x._version != version:
        raise InputMutationError(
            f"{where}: the model modified its input tensor in place (e.g. x.mul_(...), x += ...), which is "
            f"the solver's state; compute into a new tensor instead (x = x * ...), or clone the input first")


class OutputOwnership:
    """Per-solve ownership of model outputs (see the module docstring).

    Args:
        reuses_buffers: the model returns memory it reuses on later calls (a static output
            buffer or a pool of them): copy every output.
        advice: what ``OutputAliasError`` tells the caller to do about a pool of buffers.
        recent: how many outputs to keep alive: more than the caller holds across later calls
            (``RECENT`` for the diffusion solvers; a Runge–Kutta tableau's stages plus one).
    """

    def __init__(self, reuses_buffers: bool = False,
                 advice: str = "pass model_reuses_buffers=True to copy every output", recent: int = RECENT):
        self.copy_all = bool(reuses_buffers)
        self.advice = advice
        self.first: Optional[int] = None  # storage of the first (copied) output
        self.recent = deque(maxlen=recent)  # the last `recent` outputs (the first one included), kept alive
        self.recent_ids = deque(maxlen=recent)

    def own(self, out: torch.Tensor, x: torch.Tensor, where: Callable[[], str]) -> torch.Tensor:
        """The output a solver may hold: ``out`` itself or a copy (``x``: the evaluated state;
        ``where()`` names the call in the error message)."""
        if self.copy_all:
            return out.clone(memory_format=torch.contiguous_format)
        ptr = out.data_ptr()  # cheap; a view is compared by whole storages below
        if ptr == 0:  # empty output: nothing to share
            return out
        if out._base is not None:  # a view (of its input, of a larger buffer): compare storages
            storage = storage_id(out)
            if storage == storage_id(x):
                return out.clone(memory_format=torch.contiguous_format)
            ptr = next((r.data_ptr() for r in self.recent if storage_id(r) == storage), ptr)
        elif ptr == x.data_ptr():  # the model returned its input (or a detached alias of it)
            return out.clone(memory_format=torch.contiguous_format)
        if ptr in self.recent_ids:
            if ptr == self.first and len(self.recent_ids) == 1:  # one static buffer: copy from now on
                self.copy_all = True
                self.recent.clear()
                self.recent_ids.clear()
                return out.clone(memory_format=torch.contiguous_format)
            raise OutputAliasError(
                f"{where()}: the model returned memory of an earlier output (a pool of reused output buffers), "
                f"which the solver may still hold; {self.advice}")
        if self.first is None:
            self.first = ptr
            self.recent.append(out)
            self.recent_ids.append(ptr)
            return out.clone(memory_format=torch.contiguous_format)
        self.recent.append(out)
        self.recent_ids.append(ptr)
        return out

    def call(self, fn: Callable, y: torch.Tensor, *args, where: Callable[[], str]) -> torch.Tensor:
        """``fn(*args)`` (a call that reads the state ``y``) owned: ``InputMutationError`` when it
        wrote into ``y``, and its output through ``own``."""
        version = y._version
        out = fn(*args)
        if y._version != version:
            check_input_unchanged(y, version, where())
        return self.own(out, y, where) if isinstance(out, torch.Tensor) else out
