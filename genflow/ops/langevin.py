"""The fused Langevin corrector step (Song et al. 2021, Algorithms 4 and 5).

``langevin_update`` computes, for every sample b of a batch,

    s   = a x + b_coef model_out                   (the score, folded from the network output)
    eps = 2 alpha_i (snr ||z_b|| / ||s_b||)^2      (norms over all non-batch dimensions)
    x'  = x + eps s + sqrt(2 eps) z

with ``z`` supplied or generated in the kernel from the Philox stream of ``fused_update``
(same ``seed``/``offset`` definition). The compiled op makes two passes over memory: the first
computes ``s`` and ``z`` in registers and reduces ``||s_b||^2`` and ``||z_b||^2`` in float64 in a
fixed order (so the result does not depend on the thread count or device), the second is the
fused update ``(1 + eps a) x + eps b model_out + sqrt(2 eps) z`` with ``z`` regenerated from its
counter. A sample whose score is exactly zero is left unchanged (``eps = 0``).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from genflow._checks import did_you_mean
from genflow._extension import HAS_EXTENSION
from genflow.ops import _reference
from genflow.ops.fused_update import (STATE_DTYPES, check_coef, check_like, check_offset,
                                      host_tensor, seed_tensor, use_kernel)

__all__ = ["langevin_update"]

# The op exists only in builds that include csrc/ops/langevin.cpp.
_HAS_OP = HAS_EXTENSION and hasattr(torch.ops.genflow, "langevin_update")


def _check_finite(value, name: str, nonnegative: bool = False):
    """Reject a NaN, infinite (or, with ``nonnegative``, negative) float or CPU tensor entry.
    Tensors on an accelerator are not read here (that would wait for the device), nor while
    torch.compile traces (data-dependent); the op checks CPU values when it runs."""
    if isinstance(value, torch.Tensor):
        if value.device.type != "cpu" or torch.compiler.is_compiling():
            return
        v = value.to(torch.float64)
        bad = ~torch.isfinite(v)
        if nonnegative:
            bad |= v < 0
        if not bool(bad.any()):
            return
        value = v[bad][0].item()
    elif math.isfinite(value) and (value >= 0 or not nonnegative):
        return
    raise ValueError(f"{name} must be a finite number{' >= 0' if nonnegative else ''}, got {value}")


def langevin_update(x: torch.Tensor, model_out: torch.Tensor, coefs: Sequence = (0.0, 1.0), *,
                    snr, alpha_i=1.0, norm: str = "sample", noise: Optional[torch.Tensor] = None,
                    seed=None, offset: int = 0, out: Optional[torch.Tensor] = None,
                    backend: str = "auto") -> torch.Tensor:
    """One Langevin corrector step with the signal-to-noise step-size rule of Song et al. (2021).

    Args:
        x (Tensor[B, *D]): the state, float32 | float64 | bfloat16 | float16.
        model_out (Tensor[B, *D]): the network output, like x.
        coefs (pair): ``(a, b)`` with the score ``s = a x + b model_out``; each a float or a
            float Tensor[B] (per sample). ``(0.0, 1.0)`` when model_out is the score itself.
        snr (float or Tensor[B]): the target signal-to-noise ratio r (>= 0).
        alpha_i (float or Tensor[B]): Song et al.'s ``alpha_i`` (1 for VE, ``1 - beta_i`` for VP).
        norm: ``"sample"``: each sample's own norms (the paper's Algorithms 4/5; a sample does
            not depend on its batch); ``"batch"``: one ratio from the batch-mean norms,
            ``eps_b = 2 alpha_i (snr mean_c ||z_c|| / mean_c ||s_c||)^2`` (Song et al.'s code;
            use it for low-dimensional data, where per-sample norms fluctuate too much).
        noise (Tensor[B, *D], optional): z, like x. Exclusive with ``seed``; one is required.
        seed (int, sequence of B ints, or int64 Tensor[B]): generate z = N(seed, offset) in the
            kernel, exactly as ``fused_update``/``randn`` do (rounded to x's dtype).
        offset (int >= 0): the stream offset.
        out (Tensor[B, *D], optional): written and returned; may be x itself (in place). Not
            differentiable: with out=, inputs that require grad are rejected (in grad mode).
        backend: "auto" | "torch" | "cpu" | "cuda", as for ``fused_update``.

    Returns:
        Tensor[B, *D]: ``x + eps s + sqrt(2 eps) z`` with the per-sample
        ``eps_b = 2 alpha_i (snr ||z_b|| / ||s_b||)^2`` (0 for a sample whose score is 0; with
        ``norm="batch"``, 0 when every score is 0).
        ``s`` is formed in float32 (float64 for float64 x), the norms are float64 sums in a
        fixed order, the step coefficients are float64 on the kernel's device.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if x.dtype not in STATE_DTYPES:
        raise TypeError(f"x must be float32, float64, bfloat16 or float16, got {x.dtype}")
    check_like(model_out, "model_out", x)
    if isinstance(coefs, torch.Tensor) or not isinstance(coefs, (list, tuple)) or len(coefs) != 2:
        raise ValueError(f"coefs must be a pair (a, b) with the score s = a x + b model_out, got {coefs!r}")
    device = x.device
    batch = x.shape[0] if x.dim() > 0 else 1
    a = check_coef(coefs[0], "coefs[0]", batch, device)
    b = check_coef(coefs[1], "coefs[1]", batch, device)
    snr = check_coef(snr, "snr", batch, device)
    alpha_i = check_coef(alpha_i, "alpha_i", batch, device)
    _check_finite(a, "coefs[0]")
    _check_finite(b, "coefs[1]")
    _check_finite(snr, "snr", nonnegative=True)
    _check_finite(alpha_i, "alpha_i", nonnegative=True)
    if norm not in ("sample", "batch"):
        hint = did_you_mean(str(norm), ("sample", "batch"))
        raise ValueError(f"norm must be 'sample' or 'batch', got {norm!r}{hint}")
    batch_mean = norm == "batch"
    if noise is not None and seed is not None:
        raise ValueError("pass either noise= or seed= (noise generated in the kernel), not both")
    if noise is None and seed is None:
        raise ValueError("langevin_update needs noise: pass noise= or seed=")
    if noise is not None:
        check_like(noise, "noise", x)
    offset = check_offset(offset)
    if out is not None:
        check_like(out, "out", x)
        if any(st == 0 and n > 1 for st, n in zip(out.stride(), out.shape)):
            raise ValueError(f"out must not have overlapping memory (an expand()ed tensor), got "
                             f"strides {out.stride()} for shape {list(out.shape)}")
        if torch.is_grad_enabled():
            for name, t in (("x", x), ("model_out", model_out), ("coefs[0]", a), ("coefs[1]", b),
                            ("snr", snr), ("alpha_i", alpha_i), ("noise", noise), ("out", out)):
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    raise ValueError(f"{name} must not require grad with out= (out= is not "
                                     "differentiable: call without out=, or under torch.no_grad())")

    values = [a, b, None]
    if all(type(v) is float for v in (a, b, snr, alpha_i)):
        values[2] = 2.0 * alpha_i * snr * snr
        coef = host_tensor(values, torch.float64, "d")
    else:
        def vec(v):
            if isinstance(v, torch.Tensor):
                return v.to(device=device, dtype=torch.float64)
            return torch.full((batch,), v, dtype=torch.float64, device=device)
        r = 2.0 * vec(alpha_i) * vec(snr) * vec(snr)
        coef = torch.stack([vec(a), vec(b), r])
    seed_t = None if seed is None else seed_tensor(seed, batch, device)

    if use_kernel(backend, device) and (_HAS_OP or backend != "auto"):
        if not _HAS_OP:
            raise RuntimeError("this build of genflow._C has no langevin_update op: rebuild it "
                               "with pip install -e . from the repository root")
        if out is None:
            return torch.ops.genflow.langevin_update(x, model_out, coef, noise, seed_t, offset, batch_mean)
        torch.ops.genflow.langevin_update_out(x, model_out, coef, noise, seed_t, offset, batch_mean, out)
        return out
    if out is None:
        return _reference.langevin_update(x, model_out, coef, noise, seed_t, offset, batch_mean)
    _reference.langevin_update_out(x, model_out, coef, noise, seed_t, offset, batch_mean, out)
    return out


# ---------------------------------------------------------------- torch.compile and autograd

if _HAS_OP:

    @torch.library.register_fake("genflow::langevin_update")
    def _langevin_update_fake(x, model_out, coef, noise, seed, offset, batch_mean=False):
        _reference.check_devices("x", x, same=[("model_out", model_out), ("noise", noise)],
                                 cpu_ok=[("coef", coef), ("seed", seed)])
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)

    @torch.library.register_fake("genflow::langevin_update_out")
    def _langevin_update_out_fake(x, model_out, coef, noise, seed, offset, batch_mean, out):
        _reference.check_devices("x", x, same=[("model_out", model_out), ("noise", noise), ("out", out)],
                                 cpu_ok=[("coef", coef), ("seed", seed)])
        return None

    def _langevin_setup_context(ctx, inputs, output):
        x, model_out, coef, noise, seed, offset, batch_mean = inputs
        ctx.save_for_backward(x, model_out, coef, noise, seed)
        ctx.offset, ctx.batch_mean = offset, batch_mean

    def _langevin_backward(ctx, grad):
        """Exact gradient of the step, the per-sample eps included (float64 arithmetic).

        With S = ||s||^2, Z = ||z||^2, c = sqrt(2 eps) and G = <g, s> + <g, z> / c (d out / d eps):
        per sample, eps = r Z / S, so d eps / ds = -2 eps s / S and d eps / dz = 2 eps z / Z;
        with batch_mean, eps_b = r_b Q^2, Q = sum sqrt(Z) / sum sqrt(S), and the Q-terms couple
        the samples. A sample with S = 0 (eps = 0) passes x's gradient through unchanged.
        """
        x, model_out, coef, noise, seed = ctx.saved_tensors
        B = x.shape[0] if x.dim() > 0 else 1
        if noise is None:
            noise = torch.ops.genflow.philox_normal(seed, ctx.offset, list(x.shape), x.dtype).to(x.device)
        f = lambda t: t.to(torch.float64).reshape(B, -1)  # noqa: E731
        xf, mf, zf, g = f(x), f(model_out), f(noise), f(grad)
        c64 = coef.to(device=x.device, dtype=torch.float64)
        a, b, r = (c64 if c64.dim() == 2 else c64[:, None].expand(3, B)).unbind(0)
        s = a[:, None] * xf + b[:, None] * mf
        S, Z = (s * s).sum(1), (zf * zf).sum(1)
        if ctx.batch_mean:
            sS, sZ = S.sqrt().sum(), Z.sqrt().sum()
            Q = torch.where(sS > 0, sZ / sS, torch.zeros_like(sS))
            eps = r * Q * Q
        else:
            eps = torch.where(S > 0, r * Z / S, torch.zeros_like(S))
        live = eps > 0
        c = torch.sqrt(2 * eps)
        G = (g * s).sum(1) + torch.where(live, (g * zf).sum(1) / torch.where(live, c, 1.0), 0.0)
        safe = lambda v: torch.where(v > 0, v, torch.ones_like(v))  # noqa: E731
        if ctx.batch_mean:
            dQ = (G * 2 * r * Q).sum()  # dL/dQ
            grad_s = eps[:, None] * g - (dQ * Q / safe(sS)) * s / safe(S.sqrt())[:, None]
            grad_z = c[:, None] * g + (dQ / safe(sS)) * zf / safe(Z.sqrt())[:, None]
            grad_r = G * Q * Q
        else:
            grad_s = eps[:, None] * g - (2 * G * eps / safe(S))[:, None] * s
            grad_z = c[:, None] * g + (2 * G * eps / safe(Z))[:, None] * zf
            grad_r = torch.where(live, G * eps / torch.where(live, r, 1.0), G * Z / safe(S))
        back = lambda t, like: t.reshape(like.shape).to(like.dtype)  # noqa: E731
        grad_x = back(g + a[:, None] * grad_s, x)
        grad_m = back(b[:, None] * grad_s, model_out)
        grad_noise = back(grad_z, noise) if ctx.needs_input_grad[3] else None
        grad_coef = None
        if ctx.needs_input_grad[2]:
            rows = torch.stack([(grad_s * xf).sum(1), (grad_s * mf).sum(1), grad_r])
            grad_coef = (rows if coef.dim() == 2 else rows.sum(1)).to(coef.device)
        return grad_x, grad_m, grad_coef, grad_noise, None, None, None

    torch.library.register_autograd("genflow::langevin_update", _langevin_backward,
                                    setup_context=_langevin_setup_context)
