"""The fused update, genflow's core primitive, and its counter-based noise stream.

``fused_update`` computes, in one pass that reads each input once and writes the output once::

    out = c0 * x + sum_{k=1..K} c_k * terms[k-1] + noise_scale * z,      K in 0..4

where each coefficient is a Python float or one value per sample (a tensor of length B = x.shape[0])
and ``z`` is supplied (``noise=``) or generated in the kernel from ``seed`` and ``offset``. Every
solver step in genflow is one call of it (DESIGN.md §1).

The noise stream N(seed, offset) (``randn``, and ``z`` when ``seed`` is given) is Philox4x32-10
(Salmon et al., SC 2011) keyed by the 64-bit seed, counter (element index >> 2, offset), with
Box-Muller on each pair of output words, in float32 (see ``csrc/common/philox.h``). It is the same
on CPU, GPU and the pure-PyTorch reference, and does not depend on thread or block layout. With one
seed the element index is the row-major index in the tensor; with per-sample seeds (B of them)
it is the index within sample b, so sample b equals the same seed drawn with batch 1. Values are
made in float32 and rounded to the requested dtype (float64 gets the float32 values exactly).
"""
from __future__ import annotations

import array
import numbers
from typing import Optional, Sequence, Union

import torch

from genflow._checks import did_you_mean
from genflow._extension import HAS_EXTENSION, has_cuda_kernels, warn_missing_once
from genflow.ops import _reference

__all__ = ["MAX_TERMS", "STATE_DTYPES", "check_coef", "check_like", "check_offset", "fused_update", "fused_update_packed",
           "fused_update_unchecked", "host_tensor", "randn", "seed_tensor", "use_kernel", "use_op"]

MAX_TERMS = 4
STATE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_BACKENDS = ("auto", "torch", "cpu", "cuda")

Coef = Union[float, torch.Tensor]


# ---------------------------------------------------------------- argument handling

def _is_number(v) -> bool:
    return type(v) is float or type(v) is int or (isinstance(v, numbers.Real) and not isinstance(v, bool))


def host_tensor(values, dtype: torch.dtype, code: str) -> torch.Tensor:
    """A small CPU tensor of Python numbers (frombuffer is ~3x faster than torch.tensor)."""
    if torch.compiler.is_compiling():
        return torch.tensor(values, dtype=dtype)
    return torch.frombuffer(array.array(code, values), dtype=dtype)


def check_coef(value, name: str, batch: int, device: torch.device):
    """A float, or a [B] tensor (a 0-dim tensor is broadcast to [B] without a sync)."""
    if type(value) is float:
        return value
    if _is_number(value):
        return float(value)
    if isinstance(value, torch.Tensor):
        if not (value.is_floating_point() or value.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{name} must be a float or a floating tensor of shape [B], got dtype {value.dtype}")
        if value.dim() == 0:
            return value.to(device=device, dtype=torch.float64).expand(batch)
        if value.dim() != 1 or value.shape[0] != batch:
            raise ValueError(f"{name} must be a float or a tensor of shape [B] = [{batch}] (one value "
                             f"per sample), got shape {list(value.shape)}")
        if value.device != device and value.device.type != "cpu":
            raise ValueError(f"{name} must be on x's device {device} (or the CPU), got {value.device}")
        return value
    raise TypeError(f"{name} must be a float or a tensor of shape [B], got {type(value).__name__}")


def check_like(t, name: str, x: torch.Tensor):
    if isinstance(t, torch.Tensor) and t.shape == x.shape and t.dtype == x.dtype and t.device == x.device:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.shape != x.shape:
        raise ValueError(f"{name} must have x's shape {list(x.shape)}, got {list(t.shape)}")
    if t.dtype != x.dtype:
        raise TypeError(f"{name} must have x's dtype {x.dtype}, got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{name} must be on x's device {x.device}, got {t.device}")


def _seed_int(v, name: str) -> int:
    if not isinstance(v, numbers.Integral) or isinstance(v, bool):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    v = int(v)
    if not -(2**63) <= v < 2**64:
        raise ValueError(f"{name} must be in [-2^63, 2^64), got {v}")
    return v - 2**64 if v >= 2**63 else v  # the same 64 bits as an int64


def seed_tensor(seed, batch: Optional[int], device: torch.device) -> torch.Tensor:
    """int -> int64 [1] on the CPU; B ints or an int64 [B] tensor -> int64 [B] on ``device``."""
    if type(seed) is int and -(2**63) <= seed < 2**63:
        return host_tensor([seed], torch.int64, "q")
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64:
            raise TypeError(f"seed tensor must be int64, got {seed.dtype}")
        if seed.dim() == 0:
            return seed.reshape(1)
        if seed.dim() != 1 or (seed.shape[0] != 1 and seed.shape[0] != batch):
            raise ValueError(f"seed tensor must have shape [1] or [B] = [{batch}] (one seed per "
                             f"sample), got shape {list(seed.shape)}")
        return seed if seed.shape[0] == 1 else seed.to(device)
    if isinstance(seed, (list, tuple)):
        if len(seed) != batch:
            raise ValueError(f"seed must be an int or a sequence of B = {batch} ints (one per "
                             f"sample), got {len(seed)} seeds")
        values = [_seed_int(s, f"seed[{i}]") for i, s in enumerate(seed)]
        return torch.tensor(values, dtype=torch.int64, device=device)
    return host_tensor([_seed_int(seed, "seed")], torch.int64, "q")


def check_offset(offset) -> int:
    if type(offset) is int and 0 <= offset < 2**63:
        return offset
    if not isinstance(offset, numbers.Integral) or isinstance(offset, bool):
        raise TypeError(f"offset must be an int, got {type(offset).__name__}")
    if not 0 <= int(offset) < 2**63:
        raise ValueError(f"offset must be in [0, 2^63), got {offset}")
    return int(offset)


def use_kernel(backend: str, device: torch.device) -> bool:
    """True: call torch.ops.genflow; False: the pure-PyTorch reference."""
    if backend == "auto" and HAS_EXTENSION and device.type == "cpu":
        return True
    if backend not in _BACKENDS:
        hint = did_you_mean(str(backend), _BACKENDS)
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}{hint}")
    if backend == "torch":
        return False
    if backend == "auto":
        if not HAS_EXTENSION:
            warn_missing_once()
            return False
        return device.type == "cpu" or (device.type == "cuda" and has_cuda_kernels())
    if not HAS_EXTENSION:
        raise RuntimeError(f"backend={backend!r} needs the compiled extension genflow._C, which is not "
                           "built (pip install -e . from the repository root)")
    if backend == "cuda" and not has_cuda_kernels():
        raise RuntimeError("backend='cuda' needs genflow._C built with CUDA kernels (torch with CUDA "
                           "and nvcc at build time)")
    if device.type != backend:
        raise ValueError(f"backend={backend!r} runs on {backend} tensors, got tensors on {device}")
    return True


# ---------------------------------------------------------------- public wrappers

def fused_update(x: torch.Tensor, terms: Sequence[torch.Tensor] = (), coefs: Sequence[Coef] = (1.0,),
                 noise_scale: Coef = 0.0, *, noise: Optional[torch.Tensor] = None, seed=None,
                 offset: int = 0, out: Optional[torch.Tensor] = None, backend: str = "auto") -> torch.Tensor:
    """One fused update ``out = c0 x + sum_k c_k terms[k-1] + noise_scale z``.

    Args:
        x (Tensor[B, *D]): the state, float32 | float64 | bfloat16 | float16.
        terms (sequence of K <= 4 Tensor[B, *D]): like x (same shape, dtype, device).
        coefs (sequence of K + 1): c0, c1..cK; each a float or a float Tensor[B] (per sample).
        noise_scale (float or Tensor[B]): s.
        noise (Tensor[B, *D], optional): z, like x. Exclusive with ``seed``.
        seed (int, sequence of B ints, or int64 Tensor[B], optional): generate
            z = N(seed, offset) in the kernel (rounded to x's dtype); B seeds give one stream per
            sample, equal to that seed drawn alone. Required when noise_scale is nonzero and
            noise is not given.
        offset (int >= 0): stream offset; each (seed, offset) is an independent stream.
        out (Tensor[B, *D], optional): written in place and returned; may be x itself (the usual
            solver step) or any input, but must not partially overlap one.
        backend: "auto" (the compiled kernel when built for x's device, else the reference),
            "torch" (the pure-PyTorch reference), "cpu" or "cuda" (the compiled kernel, or an error).

    Returns:
        Tensor[B, *D]: out (contiguous when allocated here). Accumulation is float32 (float64
        for float64 x); coefficients are float64 on the host and rounded to that precision.

    Differentiable in x, terms, noise and the coefficient tensors (functional form only).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if x.dtype not in STATE_DTYPES:
        raise TypeError(f"x must be float32, float64, bfloat16 or float16, got {x.dtype}")
    if isinstance(terms, torch.Tensor) or not isinstance(terms, (list, tuple)):
        raise TypeError(f"terms must be a list or tuple of tensors, got {type(terms).__name__}")
    if isinstance(coefs, torch.Tensor) or not isinstance(coefs, (list, tuple)):
        raise TypeError(f"coefs must be a list or tuple (c0, c1..cK), got {type(coefs).__name__}")
    K = len(terms)
    if K > MAX_TERMS:
        raise ValueError(f"terms must hold at most {MAX_TERMS} tensors, got {K}")
    if len(coefs) != K + 1:
        raise ValueError(f"coefs must have len(terms) + 1 = {K + 1} entries (c0, c1..cK), got {len(coefs)}")
    device = x.device
    for k, t in enumerate(terms):
        check_like(t, "terms[%d]" % k, x)
    batch = x.shape[0] if x.dim() > 0 else 1
    values = list(coefs)
    values.append(noise_scale)
    for k, v in enumerate(values):
        if type(v) is not float:
            values[k] = check_coef(v, "coefs[%d]" % k if k <= K else "noise_scale", batch, device)
    if noise is not None and seed is not None:
        raise ValueError("pass either noise= or seed= (noise generated in the kernel), not both")
    if noise is not None:
        check_like(noise, "noise", x)
    elif seed is None:
        s = values[-1]  # a tensor is read back here (a device sync; pass seed= or noise= instead)
        if (bool((s != 0).any()) if isinstance(s, torch.Tensor) else s != 0.0):
            raise ValueError("noise_scale is nonzero but neither noise= nor seed= was given")
    offset = check_offset(offset)
    if out is not None:
        check_like(out, "out", x)
    seed_t = None if seed is None else seed_tensor(seed, batch, device)
    return fused_update_unchecked(x, list(terms), values, kernel=use_kernel(backend, device),
                                  noise=noise, seed=seed_t, offset=offset, out=out)


def record_nonfinite(out: torch.Tensor, nonfinite: torch.Tensor, step: int) -> None:
    """``nonfinite <- min(nonfinite, step)`` where ``out`` holds a NaN/Inf (no host sync): what the
    kernels do with their ``nonfinite`` flag, for the PyTorch paths."""
    nonfinite.copy_(torch.where(torch.isfinite(out).all(), nonfinite, nonfinite.clamp(max=step)))


def _needs_grad(x, terms, values, noise) -> bool:
    if not torch.is_grad_enabled():
        return False
    if x.requires_grad or (noise is not None and noise.requires_grad):
        return True
    for t in terms:  # plain loops: this runs on every solver step (no generator, no tuple)
        if t.requires_grad:
            return True
    for v in values:
        if type(v) is not float and isinstance(v, torch.Tensor) and v.requires_grad:
            return True
    return False


def fused_update_unchecked(x: torch.Tensor, terms: list, values: list, *, kernel: bool,
                           noise: Optional[torch.Tensor] = None, seed: Optional[torch.Tensor] = None,
                           offset: int = 0, out: Optional[torch.Tensor] = None,
                           nonfinite: Optional[torch.Tensor] = None, step: int = 0) -> torch.Tensor:
    """``fused_update`` without argument checks, for callers that validated once (solver loops).

    ``values`` is ``[c0, c1..cK, s]`` (floats or float64 [B] tensors), ``seed`` an int64 tensor
    from ``seed_tensor`` (or None), ``kernel`` the result of ``use_kernel(backend, x.device)``.
    ``nonfinite`` (int32 [1] on x's device, optional) becomes ``min(nonfinite, step)`` when the
    result holds a NaN/Inf (recorded by the kernel as it writes; see ``record_nonfinite``).
    """
    scalar = True
    for v in values:  # a plain loop, not all(generator): this runs on every solver step
        if type(v) is not float:
            scalar = False
            break
    if scalar:
        coef = host_tensor(values, torch.float64, "d")  # CPU: the CUDA op takes it by value
    else:
        # per-sample coefficients (host float64 [B] from the solvers' grid tables): packed on the
        # host and sent in one copy; from pinned memory without a stream sync on CUDA
        batch = x.shape[0]
        on_host = all(not isinstance(v, torch.Tensor) or v.device.type == "cpu" for v in values)
        where = torch.device("cpu") if on_host else x.device
        coef = torch.stack([v.to(device=where, dtype=torch.float64) if isinstance(v, torch.Tensor)
                            else torch.full((batch,), v, dtype=torch.float64, device=where)
                            for v in values])
        if on_host and x.device.type != "cpu":
            coef = coef.pin_memory().to(x.device, non_blocking=True)
    if kernel:
        if out is None and nonfinite is not None and not _needs_grad(x, terms, values, noise):
            out = torch.empty_like(x, memory_format=torch.contiguous_format)  # the flagging out= op
        if out is None:
            result = torch.ops.genflow.fused_update(x, terms, coef, noise, seed, offset)
            if nonfinite is not None:
                record_nonfinite(result, nonfinite, step)
            return result
        torch.ops.genflow.fused_update_out(x, terms, coef, noise, seed, offset, out, nonfinite, step)
        return out
    if out is None:
        out = _reference.fused_update(x, terms, coef, noise, seed, offset)
    else:
        _reference.fused_update_out(x, terms, coef, noise, seed, offset, out)
    if nonfinite is not None:
        record_nonfinite(out, nonfinite, step)
    return out


def fused_update_packed(x: torch.Tensor, terms: list, coef: torch.Tensor, *, kernel: bool,
                        out: torch.Tensor, nonfinite: Optional[torch.Tensor] = None,
                        step: int = 0) -> torch.Tensor:
    """The noise-free in-place update with a prepacked float64 CPU ``coef`` [K+2] (``s = 0``):
    the op call alone, for solver steps whose coefficients are reused across solves
    (``nonfinite``, ``step``: as for ``fused_update_unchecked``)."""
    if kernel:
        torch.ops.genflow.fused_update_out(x, terms, coef, None, None, 0, out, nonfinite, step)
    else:
        _reference.fused_update_out(x, terms, coef, None, None, 0, out)
        if nonfinite is not None:
            record_nonfinite(out, nonfinite, step)
    return out




def use_op(backend: str, device: torch.device, has_op: bool, what: str) -> bool:
    """``use_kernel`` for an op that a build of ``genflow._C`` may lack (``has_op``): False (the
    reference) for ``backend="auto"`` without it, an error naming ``what`` for an explicit backend."""
    kernel = use_kernel(backend, device)
    if kernel and not has_op:
        if backend != "auto":
            raise RuntimeError(f"backend={backend!r}: genflow._C was built without {what} "
                               "(rebuild with pip install -e .)")
        return False
    return kernel


def randn(shape, *, seed, offset: int = 0, dtype: torch.dtype = torch.float32, device=None,
          backend: str = "auto") -> torch.Tensor:
    """Standard normal samples N(seed, offset) of ``shape``: the stream ``fused_update`` generates.

    Args:
        shape (int or sequence of ints): [B, *D].
        seed (int, sequence of B ints, or int64 Tensor[B]): one stream over the row-major index,
            or one stream per sample (sample b equals ``randn((1, *D), seed=seed[b])``).
        offset (int >= 0): independent streams for one seed.
        dtype: float32 | float64 | bfloat16 | float16 (the float32 stream, rounded).
        device: default the CPU (or the seed tensor's device).
        backend: as for ``fused_update``.

    Returns:
        Tensor[B, *D]: contiguous; bitwise equal across backends and devices.
    """
    if isinstance(shape, numbers.Integral) and not isinstance(shape, bool):
        shape = (int(shape),)
    if not isinstance(shape, (list, tuple, torch.Size)) or not all(
            isinstance(s, numbers.Integral) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise ValueError(f"shape must be an int or a sequence of non-negative ints, got {shape!r}")
    shape = tuple(int(s) for s in shape)
    if dtype not in STATE_DTYPES:
        raise TypeError(f"dtype must be float32, float64, bfloat16 or float16, got {dtype}")
    if device is None:
        device = seed.device if isinstance(seed, torch.Tensor) else torch.device("cpu")
    device = torch.device(device)
    batch = shape[0] if shape else 1
    if isinstance(seed, (list, tuple, torch.Tensor)) and not shape and not (
            isinstance(seed, torch.Tensor) and seed.numel() == 1):
        raise ValueError("per-sample seeds need a shape with a batch dimension, got shape ()")
    seed_t = seed_tensor(seed, batch, device)
    offset = check_offset(offset)
    if use_kernel(backend, device):
        if seed_t.device == device:
            return torch.ops.genflow.philox_normal(seed_t, offset, list(shape), dtype)
        out = torch.empty(shape, dtype=dtype, device=device)
        torch.ops.genflow.philox_normal_out(seed_t, offset, out)
        return out
    return _reference.philox_normal(seed_t, offset, shape, dtype, device=device)


# ---------------------------------------------------------------- torch.compile support (autograd is in C++)

if HAS_EXTENSION:

    def _check_fake_devices(x, terms, coef, noise, seed, out=None, nonfinite=None):
        same = [(f"terms[{k}]", t) for k, t in enumerate(terms)] + [("noise", noise), ("out", out),
                                                                   ("nonfinite", nonfinite)]
        _reference.check_devices("x", x, same=same, cpu_ok=[("coef", coef), ("seed", seed)])

    @torch.library.register_fake("genflow::fused_update")
    def _fused_update_fake(x, terms, coef, noise, seed, offset):
        _check_fake_devices(x, terms, coef, noise, seed)
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)

    @torch.library.register_fake("genflow::fused_update_out")
    def _fused_update_out_fake(x, terms, coef, noise, seed, offset, out, nonfinite=None, step=0):
        _check_fake_devices(x, terms, coef, noise, seed, out, nonfinite)
        return None

    @torch.library.register_fake("genflow::philox_normal")
    def _philox_normal_fake(seed, offset, size, dtype):
        return torch.empty(size, dtype=dtype, device=seed.device)

    @torch.library.register_fake("genflow::philox_normal_out")
    def _philox_normal_out_fake(seed, offset, out):
        return None
