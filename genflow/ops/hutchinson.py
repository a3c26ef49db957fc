"""Hutchinson trace-estimator primitives: the probe stream and the per-sample probe dot product.

Hutchinson (1989): for a square matrix ``J`` and a probe ``eps`` with ``E[eps eps^T] = I``,
``tr(J) = E[eps^T J eps]``. FFJORD (Grathwohl et al., ICLR 2019) uses it for the divergence of
an ODE drift, ``div f = tr(df/dx)``, with ``eps^T J`` (a VJP) or ``J eps`` (a JVP) dotted with
``eps``. ``gf.log_likelihood`` draws its probes with ``probes`` and accumulates the estimates
with ``probe_dot``.

``probes(shape, seed=, offset=, kind=)`` is genflow's Philox normal stream N(seed, offset) (the
stream of ``gf.ops.randn``, see ``genflow/ops/fused_update.py``): ``kind="gaussian"`` returns it
unchanged; ``kind="rademacher"`` returns ``+1`` where the float32 value N(seed, offset)[i] is
``>= 0`` (``-0.0`` included) and ``-1`` elsewhere, i.e. the sign of ``randn`` at the same
element. Both are therefore identical on every backend and device.

``probe_dot(probe, v, scale=, accumulate=)`` returns, per sample b (float64 Tensor[B])::

    out[b] = accumulate[b] + scale[b] * sum_i probe[b, i] * v[b, i]          (i over *D, row-major)

Each product is formed in float64 from the inputs converted to float64 (exact for float32,
bfloat16 and float16 inputs). Summation order: the flat index range of a sample is cut into
blocks of ``BLOCK = 1024`` consecutive elements; each block is summed in float64, then the
block sums are added in increasing block order. The order inside a block is left to the
implementation (the reference uses ``torch.sum``), so backends agree to about 1e-12 relative,
not bitwise.

Compiled ops (``csrc/ops/hutchinson.cpp``; dispatched below where marked ``# kernel:``)::

    genflow::hutchinson_probes(Tensor seed, int offset, SymInt[] size, ScalarType dtype, int kind) -> Tensor
        seed int64 [1] or [B] (per-sample streams); kind 0 = rademacher, 1 = gaussian
    genflow::probe_dot(Tensor probe, Tensor v, Tensor scale, Tensor? accumulate) -> Tensor
        probe, v [B, *D] of one floating dtype; scale float64 [1] or [B]; accumulate float64 [B]
        or None; returns float64 [B]
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Union

import torch

from genflow._checks import did_you_mean
from genflow._extension import HAS_EXTENSION
from genflow.ops import _reference
from genflow.ops.fused_update import check_offset, host_tensor, seed_tensor, use_op

__all__ = ["BLOCK", "KINDS", "probe_dot", "probes"]

BLOCK = 1024
KINDS = ("rademacher", "gaussian")
_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_HAS_OP = HAS_EXTENSION and hasattr(torch.ops.genflow, "probe_dot")


def _dispatch(backend: str, device: torch.device) -> bool:
    """True: the compiled op; False: the reference (also for backend="auto" without the op)."""
    return use_op(backend, device, _HAS_OP, "the Hutchinson ops")


# ---------------------------------------------------------------- pure-PyTorch reference (the oracle)

def _reference_probes(seed: torch.Tensor, offset: int, size, dtype: torch.dtype, kind: int,
                      device=None) -> torch.Tensor:
    """Twin of ``genflow::hutchinson_probes``: kind 0 = rademacher (sign of the float32 stream,
    +1 at >= 0), kind 1 = gaussian (the stream rounded to ``dtype``)."""
    if kind == 1:
        return _reference.philox_normal(seed, offset, size, dtype, device=device)
    z = _reference.philox_normal(seed, offset, size, torch.float32, device=device)
    return torch.where(z >= 0, 1.0, -1.0).to(dtype)


def _reference_probe_dot(probe: torch.Tensor, v: torch.Tensor, scale: torch.Tensor,
                         accumulate: Optional[torch.Tensor]) -> torch.Tensor:
    """Twin of ``genflow::probe_dot``: ``accumulate + scale * sum_i probe_i v_i`` (float64 [B]),
    in the blocked order of the module docstring."""
    batch = probe.shape[0]
    per_sample = math.prod(probe.shape[1:])
    prod = probe.reshape(batch, per_sample).to(torch.float64) * v.reshape(batch, per_sample).to(torch.float64)
    n = prod.shape[1]
    pad = (-n) % BLOCK
    if pad:
        prod = torch.nn.functional.pad(prod, (0, pad))
    total = prod.reshape(batch, (n + pad) // BLOCK, BLOCK).sum(dim=2).sum(dim=1)
    out = scale.to(device=probe.device, dtype=torch.float64) * total
    return out if accumulate is None else accumulate + out


# ---------------------------------------------------------------- public wrappers

def probes(shape, *, seed, offset: int = 0, kind: str = "rademacher", dtype: torch.dtype = torch.float32,
           device=None, backend: str = "auto") -> torch.Tensor:
    """Hutchinson probes of ``shape`` from genflow's Philox stream N(seed, offset).

    ``kind="gaussian"``: exactly ``gf.ops.randn(shape, seed=seed, offset=offset, dtype=dtype)``.
    ``kind="rademacher"``: ``+1`` where the float32 value N(seed, offset)[i] is ``>= 0``, else
    ``-1`` (the sign of ``randn``; P(+1) = P(-1) = 1/2, independent across elements). Either way
    ``E[eps eps^T] = I`` (Hutchinson 1989); Rademacher probes have the smaller variance.

    Args:
        shape (int or sequence of ints): [B, *D].
        seed (int, sequence of B ints, or int64 Tensor[B]): one stream over the row-major index,
            or one stream per sample (sample b equals ``probes((1, *D), seed=seed[b])``).
        offset (int >= 0): independent streams for one seed (e.g. one per probe).
        kind: ``"rademacher"`` or ``"gaussian"``.
        dtype: float32 | float64 | bfloat16 | float16.
        device: default the CPU (or the seed tensor's device).
        backend: "auto" (the compiled op when built for the device, else the reference), "torch"
            (the reference), "cpu" or "cuda" (the compiled op, or an error).

    Returns:
        Tensor[B, *D]: contiguous; bitwise equal across backends and devices.
    """
    if kind not in KINDS:
        hint = did_you_mean(str(kind), KINDS)
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}{hint}")
    if isinstance(shape, numbers.Integral) and not isinstance(shape, bool):
        shape = (int(shape),)
    if not isinstance(shape, (list, tuple, torch.Size)) or not all(
            isinstance(s, numbers.Integral) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise ValueError(f"shape must be an int or a sequence of non-negative ints, got {shape!r}")
    shape = tuple(int(s) for s in shape)
    if dtype not in _DTYPES:
        raise TypeError(f"dtype must be float32, float64, bfloat16 or float16, got {dtype}")
    if device is None:
        device = seed.device if isinstance(seed, torch.Tensor) else torch.device("cpu")
    device = torch.device(device)
    if isinstance(seed, (list, tuple, torch.Tensor)) and not shape and not (
            isinstance(seed, torch.Tensor) and seed.numel() == 1):
        raise ValueError("per-sample seeds need a shape with a batch dimension, got shape ()")
    seed_t = seed_tensor(seed, shape[0] if shape else 1, device)
    offset = check_offset(offset)
    code = KINDS.index(kind)
    if _dispatch(backend, device):
        return torch.ops.genflow.hutchinson_probes(seed_t.to(device), offset, list(shape), dtype, code)  # kernel:
    return _reference_probes(seed_t, offset, shape, dtype, code, device=device)


def probe_dot(probe: torch.Tensor, v: torch.Tensor, *, scale: Union[float, torch.Tensor] = 1.0,
              accumulate: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None,
              backend: str = "auto") -> torch.Tensor:
    """Per-sample probe dot product ``accumulate + scale * sum_{*D} probe * v`` in float64.

    With ``v = J^T probe`` (a VJP) or ``v = J probe`` (a JVP), ``probe . v`` is one Hutchinson
    estimate of ``tr(J)`` (Hutchinson 1989; FFJORD, Grathwohl et al. 2019); ``scale = 1/P`` and
    ``accumulate`` average P probes without another pass. Products are float64; the sum runs over
    blocks of ``BLOCK`` consecutive elements, block sums added in order (module docstring).

    Args:
        probe (Tensor[B, *D]): float32 | float64 | bfloat16 | float16.
        v (Tensor[B, *D]): like probe (same shape, dtype and device).
        scale (float or float64 Tensor[B]): per-sample factor on the dot product.
        accumulate (float64 Tensor[B], optional): added to the result.
        out (float64 Tensor[B], optional): written with the result and returned (may be
            ``accumulate`` itself; not an expand()ed tensor).
        backend: as for ``probes``.

    Returns:
        float64 Tensor[B] on probe's device. Not differentiable: inputs that require grad are
        rejected (while grad mode is on); a non-finite float ``scale`` (or CPU tensor) is rejected.
    """
    if not isinstance(probe, torch.Tensor):
        raise TypeError(f"probe must be a tensor, got {type(probe).__name__}")
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"v must be a tensor, got {type(v).__name__}")
    if probe.dtype not in _DTYPES:
        raise TypeError(f"probe must be float32, float64, bfloat16 or float16, got {probe.dtype}")
    if probe.dim() < 1:
        raise ValueError("probe must have a batch dimension, got a 0-dim tensor")
    if v.shape != probe.shape:
        raise ValueError(f"v must have probe's shape {list(probe.shape)}, got {list(v.shape)}")
    if v.dtype != probe.dtype:
        raise TypeError(f"v must have probe's dtype {probe.dtype}, got {v.dtype}")
    if v.device != probe.device:
        raise ValueError(f"v must be on probe's device {probe.device}, got {v.device}")
    batch, device = probe.shape[0], probe.device
    if isinstance(scale, torch.Tensor):
        if scale.dtype != torch.float64:
            raise TypeError(f"scale must be a float or a float64 tensor, got dtype {scale.dtype}")
        if scale.dim() > 1 or (scale.dim() == 1 and scale.shape[0] not in (1, batch)):
            raise ValueError(f"scale must be a float or a tensor of shape [B] = [{batch}], got shape {list(scale.shape)}")
        # CPU values only (no device sync, nothing data-dependent while torch.compile traces)
        host = scale.device.type == "cpu" and not torch.compiler.is_compiling()
        if host and not bool(torch.isfinite(scale).all()):
            raise ValueError(f"scale must be finite, got {scale[~torch.isfinite(scale)][0].item()}")
        scale_t = scale.reshape(-1).to(device)
    elif isinstance(scale, numbers.Real) and not isinstance(scale, bool):
        if not math.isfinite(scale):
            raise ValueError(f"scale must be finite, got {scale}")
        scale_t = host_tensor([float(scale)], torch.float64, "d").to(device)
    else:
        raise TypeError(f"scale must be a float or a float64 tensor of shape [B], got {type(scale).__name__}")
    if torch.is_grad_enabled():
        for name, t in (("probe", probe), ("v", v), ("scale", scale), ("accumulate", accumulate)):
            if isinstance(t, torch.Tensor) and t.requires_grad:
                raise ValueError(f"{name} must not require grad: probe_dot is not differentiable "
                                 f"(pass {name}.detach() or call it under torch.no_grad())")
    for name, t in (("accumulate", accumulate), ("out", out)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float64:
            raise TypeError(f"{name} must be a float64 tensor of shape [B], got "
                            f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.shape != (batch,):
            raise ValueError(f"{name} must have shape [B] = [{batch}], got {list(t.shape)}")
        if t.device != device:
            raise ValueError(f"{name} must be on probe's device {device}, got {t.device}")
    if out is not None and batch > 1 and out.stride(0) == 0:
        raise ValueError(f"out must not have overlapping memory (an expand()ed tensor), got stride "
                         f"{out.stride()} for shape {list(out.shape)}")
    if _dispatch(backend, device):
        result = torch.ops.genflow.probe_dot(probe, v, scale_t, accumulate)  # kernel:
    else:
        result = _reference_probe_dot(probe, v, scale_t, accumulate)
    if out is None:
        return result
    return out.copy_(result)


# ---------------------------------------------------------------- torch.compile support

if _HAS_OP:

    @torch.library.register_fake("genflow::hutchinson_probes")
    def _hutchinson_probes_fake(seed, offset, size, dtype, kind):
        return torch.empty(size, dtype=dtype, device=seed.device)

    @torch.library.register_fake("genflow::probe_dot")
    def _probe_dot_fake(probe, v, scale, accumulate):
        _reference.check_devices("probe", probe, same=[("v", v), ("accumulate", accumulate)],
                                 cpu_ok=[("scale", scale)])
        return torch.empty((probe.shape[0],), dtype=torch.float64, device=probe.device)
