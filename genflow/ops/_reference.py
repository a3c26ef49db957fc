"""Pure-PyTorch twins of genflow's compiled ops: the test oracle and the fallback path.

Each function here has the semantics of the op of the same name in ``torch.ops.genflow``
(``csrc/ops/*.cpp``), with the packed arguments the op takes. The Philox normal stream is
reproduced bit for bit: Philox4x32-10 in int64 tensor arithmetic (the 32x32->64 products are
split into 16-bit limbs, so nothing overflows), then the same float32 operations as
``csrc/common/philox.h``: every fused multiply-add is emulated exactly (float64 product, an
error-free sum rounded to odd, then one rounding to float32), so the reference stream equals
the kernels' stream bitwise.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

__all__ = [
    "philox4x32_10", "normal_stream", "philox_normal", "fused_update", "fused_update_out",
    "log_approx", "sincos_2pi_approx", "sqrt_approx",
]

_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_MASK32 = 0xFFFFFFFF


# ---------------------------------------------------------------- Philox4x32-10 (int64 tensors)

def _mulhilo(m: int, c: torch.Tensor):
    """(hi, lo) 32-bit halves of m * c for m < 2^32 and c an int64 tensor in [0, 2^32)."""
    p_lo = m * (c & 0xFFFF)  # < 2^48
    p_hi = m * (c >> 16)  # < 2^48
    s = ((p_hi & 0xFFFF) << 16) + p_lo  # < 2^49
    return (p_hi >> 16) + (s >> 32), s & _MASK32


def philox4x32_10(counter, key):
    """Philox4x32-10 of ``counter`` (4 int64 tensors/ints in [0, 2^32)) under ``key`` (2 of them).

    Returns the 4 output words as int64 tensors in [0, 2^32) (broadcast shape of the inputs).
    """
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) for c in counter)
    k0, k1 = (torch.as_tensor(k, dtype=torch.int64) for k in key)
    for _ in range(10):
        hi0, lo0 = _mulhilo(_M0, c0)
        hi1, lo1 = _mulhilo(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _W0) & _MASK32
        k1 = (k1 + _W1) & _MASK32
    return c0, c1, c2, c3


# ---------------------------------------------------------------- exact float32 arithmetic

def _f64(v):
    return v.double() if isinstance(v, torch.Tensor) else float(v)


def _mul32(a, b) -> torch.Tensor:
    """float32 a * b, rounded once (the float64 product of two floats is exact)."""
    return (_f64(a) * _f64(b)).float()


def _fma32(a, b, c) -> torch.Tensor:
    """float32 fma(a, b, c) with a single rounding, like fmaf.

    a * b is exact in float64; TwoSum gives p + c = s + err exactly; rounding s to odd (when err
    is nonzero and s is even, step one ulp toward err) keeps enough information that the final
    rounding to float32 is the correctly rounded result (Boldo & Melquiond 2008).
    """
    p = _f64(a) * _f64(b)
    cd = _f64(c)
    if not isinstance(p, torch.Tensor):
        p = torch.tensor(p, dtype=torch.float64)
    s = p + cd
    bb = s - p
    err = (p - (s - bb)) + (cd - bb)
    even = (s.view(torch.int64) & 1) == 0
    toward = torch.where(err > 0, torch.full_like(s, float("inf")), torch.full_like(s, float("-inf")))
    s = torch.where((err != 0) & even, torch.nextafter(s, toward), s)
    return s.float()


def _bits(v: torch.Tensor) -> torch.Tensor:
    """IEEE bits of a float32 tensor as int64 in [0, 2^32)."""
    return v.contiguous().view(torch.int32).to(torch.int64) & _MASK32


def _from_bits(b: torch.Tensor) -> torch.Tensor:
    """float32 tensor with IEEE bits b (int64 in [0, 2^32))."""
    b = torch.where(b >= 2**31, b - 2**32, b)
    return b.to(torch.int32).view(torch.float32)


# ---------------------------------------------------------------- float32 approximations

_LOG_P = (-0.07621793448925018, 0.12904445827007294, -0.13242986798286438, 0.14181822538375854,
          -0.16609081625938416, 0.2000197470188141, -0.25001582503318787, 0.33333325386047363,
          -0.49999988079071045)
_SIN_P = (-75.39356231689453, 81.59235382080078, -41.3416633605957, 6.2831854820251465)
_COS_P = (59.229244232177734, -85.4432373046875, 64.93932342529297, -19.739208221435547, 1.0)


def _horner(coefs, v):
    p = torch.full_like(v, coefs[0])
    for c in coefs[1:]:
        p = _fma32(p, v, c)
    return p


def log_approx(u: torch.Tensor) -> torch.Tensor:
    """genflow's float32 natural log (philox.h ``log_approx``) of positive normal floats."""
    ix = _bits(u)
    e = (ix - 0x3F3504F3) >> 23  # ix < 2^31, so this is the int32 arithmetic shift
    m = _from_bits(ix - e * (1 << 23))
    f = (m.double() - 1.0).float()  # exact
    y = _fma32(_mul32(f, f), _horner(_LOG_P, f), f)
    ef = e.to(torch.float32)
    return _fma32(ef, 0.693145751953125, _fma32(ef, 1.428606765330187e-06, y))


def sincos_2pi_approx(t: torch.Tensor):
    """genflow's float32 (cos 2 pi t, sin 2 pi t) for t in [0, 1] (philox.h ``sincos_2pi_approx``)."""
    magic = 12582912.0
    qm = _fma32(t, 4.0, magic)
    quadrant = _bits(qm) & 3
    q = (qm.double() - magic).float()
    r = _fma32(q, -0.25, t)
    v = _mul32(r, r)
    s = _mul32(r, _horner(_SIN_P, v))
    c = _horner(_COS_P, v)
    swap = (quadrant & 1) == 1
    cos = torch.where(swap, s, c)
    sin = torch.where(swap, c, s)
    cos = torch.where(((quadrant + 1) & 2) != 0, -cos, cos)
    sin = torch.where((quadrant & 2) != 0, -sin, sin)
    return cos, sin


def sqrt_approx(v: torch.Tensor) -> torch.Tensor:
    """genflow's float32 square root (philox.h ``sqrt_approx``) of v in [0, 2^64]."""
    b = torch.clamp_min(_bits(v) & 0x7FFFFFFF, 0x0DA24260)  # max(|v|, 1e-30) on the bits
    vc = _from_bits(b)
    y = _from_bits(0x5F375A86 - (b >> 1))
    h = _mul32(0.5, vc)
    y = _mul32(y, _fma32(-h, _mul32(y, y), 1.5))
    y = _mul32(y, _fma32(-h, _mul32(y, y), 1.5))
    s = _mul32(v, y)
    return _fma32(_fma32(-s, s, v), _mul32(0.5, y), s)


def _box_muller(wa: torch.Tensor, wb: torch.Tensor):
    u = _fma32(wa.double().float(), 2.0**-32, 2.0**-33)
    r = sqrt_approx(_mul32(-2.0, log_approx(u)))
    t = _mul32(wb.double().float(), 2.0**-32)
    c, s = sincos_2pi_approx(t)
    return _mul32(r, c), _mul32(r, s)


# ---------------------------------------------------------------- the normal stream

def _split64(v) -> tuple:
    """(lo32, hi32) of a 64-bit two's complement integer (int or int64 tensor)."""
    if isinstance(v, torch.Tensor):
        return v & _MASK32, (v >> 32) & _MASK32
    v = int(v) % 2**64
    return v & _MASK32, v >> 32


def normal_stream(seed, offset: int, count: int, device=None) -> torch.Tensor:
    """The first ``count`` values N(seed, offset)[0:count] of the stream (float32).

    ``seed`` is an int or an int64 tensor of shape [S] (S streams; then the result is [S, count]).
    """
    groups = (count + 3) // 4
    g = torch.arange(groups, dtype=torch.int64, device=device)
    k0, k1 = _split64(seed)
    if isinstance(seed, torch.Tensor):
        k0, k1, g = k0.to(device)[:, None], k1.to(device)[:, None], g[None, :]
    o0, o1 = _split64(offset)
    w0, w1, w2, w3 = philox4x32_10((g & _MASK32, g >> 32, o0, o1), (k0, k1))
    z0, z1 = _box_muller(w0, w1)
    z2, z3 = _box_muller(w2, w3)
    z = torch.stack(torch.broadcast_tensors(z0, z1, z2, z3), dim=-1)
    return z.reshape(*z.shape[:-2], 4 * groups)[..., :count]


def philox_normal(seed: torch.Tensor, offset: int, size: Sequence[int], dtype: torch.dtype,
                  device=None) -> torch.Tensor:
    """Twin of ``genflow::philox_normal``: the stream in the shape ``size``, as ``dtype``.

    seed (int64 [1]: one stream over the row-major flat index; [B]: stream b for sample b).
    The values are float32 rounded to ``dtype``. ``device`` defaults to seed's device.
    """
    size = tuple(int(s) for s in size)
    device = seed.device if device is None else torch.device(device)
    numel = 1
    for s in size:
        numel *= s
    seed = seed.to(torch.int64).reshape(-1)
    if numel == 0:
        return torch.empty(size, dtype=dtype, device=device)
    if seed.numel() > 1:
        batch = size[0]
        z = normal_stream(seed.to(device), offset, numel // batch, device=device)
    else:
        z = normal_stream(int(seed[0]), offset, numel, device=device)
    return z.reshape(size).to(dtype)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def fused_update(x: torch.Tensor, terms: Sequence[torch.Tensor], coef: torch.Tensor,
                 noise: Optional[torch.Tensor] = None, seed: Optional[torch.Tensor] = None,
                 offset: int = 0) -> torch.Tensor:
    """Twin of ``genflow::fused_update``: ``c0 x + sum_k c_k terms[k-1] + s z`` (contiguous).

    coef is float64 [K+2] or [K+2, B] (c0, c1..cK, s); z is ``noise``, or the stream of ``seed``
    rounded to x's dtype, or absent. Accumulates in float32 (float64 for float64 x) in the
    kernels' order with their fmas: bitwise equal to them except for float64 (within 1e-16).
    """
    acc = _acc_dtype(x.dtype)
    coef = coef.to(device=x.device, dtype=torch.float64)
    if coef.dim() == 2:
        shape = (coef.shape[1],) + (1,) * (x.dim() - 1) if x.dim() > 0 else ()
        c = [coef[k].reshape(shape).to(acc) for k in range(coef.shape[0])]
    else:
        c = [coef[k].to(acc) for k in range(coef.shape[0])]
    if noise is None and seed is not None:
        noise = philox_normal(seed, offset, x.shape, x.dtype, device=x.device)
    inputs = list(terms) + ([noise] if noise is not None else [])
    # The kernels' order and rounding: acc = c0 x, then acc = fma(c_k, input_k, acc). float32
    # fmas are emulated exactly (bitwise equal results); float64 ones round twice (~1e-16).
    out = c[0] * x.to(acc)
    for ck, v in zip(c[1:len(terms) + 1] + c[-1:], inputs):
        out = _fma32(ck, v.to(acc), out) if acc == torch.float32 else out + ck * v.to(acc)
    return out.to(x.dtype).contiguous()


def fused_update_out(x: torch.Tensor, terms: Sequence[torch.Tensor], coef: torch.Tensor,
                     noise: Optional[torch.Tensor], seed: Optional[torch.Tensor], offset: int,
                     out: torch.Tensor) -> None:
    """Twin of ``genflow::fused_update_out``: the update written into ``out`` (may be x)."""
    out.copy_(fused_update(x, terms, coef, noise, seed, offset))


# ---------------------------------------------------------------- the Langevin corrector step

# The kernels' reduction layout (csrc/common/langevin.h): each sample is cut into chunks of
# _LANGEVIN_CHUNK elements; in a chunk, lane q < _LANGEVIN_LANES accumulates v[q + 1024 k]^2
# for k = 0..3 in order, and the lanes are summed by an adjacent-pairs tree. The chunk sums of a
# sample are reduced the same way (lane q sums chunks q + 1024 k in order, then the tree).
_LANGEVIN_CHUNK = 4096
_LANGEVIN_LANES = 1024


def _pairwise_sum(v: torch.Tensor) -> torch.Tensor:
    """Adjacent-pairs tree sum over the last dimension (a power of two): ((v0+v1)+(v2+v3))+..."""
    while v.shape[-1] > 1:
        v = v[..., 0::2] + v[..., 1::2]
    return v[..., 0]


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def langevin_sums(v: torch.Tensor) -> torch.Tensor:
    """Per-sample ``sum v^2`` (float64 [B]) of ``v`` (Tensor[B, P]) in the kernels' order.

    Products of float32 values are exact in float64, so for float32, bfloat16 and float16
    state the result equals the kernels' bitwise; float64 products are rounded before the
    addition here (the kernels use an fma), a difference of an ulp or so.
    """
    v = v.to(torch.float64)
    B, P = v.shape
    if P <= _LANGEVIN_LANES:  # one chunk, one element per lane; the zero lanes add nothing
        lanes = torch.nn.functional.pad(v * v, (0, _next_pow2(max(P, 1)) - P))
        return _pairwise_sum(lanes)
    nch = -(-P // _LANGEVIN_CHUNK)
    v = torch.nn.functional.pad(v, (0, nch * _LANGEVIN_CHUNK - P)).reshape(B, nch, 4, _LANGEVIN_LANES)
    acc = torch.zeros(B, nch, _LANGEVIN_LANES, dtype=torch.float64, device=v.device)
    for k in range(4):
        acc = acc + v[:, :, k] * v[:, :, k]
    return lane_sum(_pairwise_sum(acc))  # chunk sums [B, nch] -> [B]


def lane_sum(c: torch.Tensor) -> torch.Tensor:
    """Sum over the last dimension of float64 ``c`` (Tensor[..., n]) in the kernels' order for
    chunk sums and batch sums: lane q < 1024 adds c[q + 1024 k] for k = 0, 1, ... in order,
    then the lanes are summed by the adjacent-pairs tree."""
    n = c.shape[-1]
    if n <= _LANGEVIN_LANES:
        return _pairwise_sum(torch.nn.functional.pad(c, (0, _next_pow2(max(n, 1)) - n)))
    m = -(-n // _LANGEVIN_LANES)
    c = torch.nn.functional.pad(c, (0, m * _LANGEVIN_LANES - n)).reshape(*c.shape[:-1], m, _LANGEVIN_LANES)
    lanes = torch.zeros_like(c[..., 0, :])
    for k in range(m):
        lanes = lanes + c[..., k, :]
    return _pairwise_sum(lanes)


def langevin_step_coefs(coef: torch.Tensor, ss: torch.Tensor, zz: torch.Tensor,
                        batch_mean: bool = False) -> torch.Tensor:
    """The fused-update coefficients ``(1 + eps a, eps b, sqrt(2 eps))`` (float64 [3, B]) of a
    Langevin step with ``coef = (a, b, r)`` ([3] or [3, B]), in the kernels' order and rounding
    (each operation rounded once). ``eps = r zz / ss`` per sample (0 where ss = 0); with
    ``batch_mean``, ``eps = r (Z / S)^2`` with ``Z = sum_b sqrt(zz_b)``, ``S = sum_b sqrt(ss_b)``
    (the ratio of the batch-mean norms; 0 where S = 0)."""
    coef = coef.to(device=ss.device, dtype=torch.float64)
    if coef.dim() == 1:
        coef = coef[:, None].expand(3, ss.shape[0])
    a, b, r = coef[0], coef[1], coef[2]
    if batch_mean:
        S, Z = lane_sum(torch.sqrt(ss)), lane_sum(torch.sqrt(zz))
        q = torch.where(S == 0, torch.zeros_like(S), Z / S)
        eps = r * (q * q)
    else:
        eps = torch.where(ss == 0, torch.zeros_like(ss), (r * zz) / ss)
    return torch.stack([1.0 + eps * a, eps * b, torch.sqrt(2.0 * eps)])


def langevin_update(x: torch.Tensor, model_out: torch.Tensor, coef: torch.Tensor,
                    noise: Optional[torch.Tensor] = None, seed: Optional[torch.Tensor] = None,
                    offset: int = 0, batch_mean: bool = False) -> torch.Tensor:
    """Twin of ``genflow::langevin_update``: one Langevin corrector step (contiguous result).

    With the score ``s = a x + b model_out`` (accumulated like the kernels: float32 for
    float32/bfloat16/float16 state with an exact fma, float64 otherwise), the noise ``z``
    (``noise``, or the stream of ``seed`` at ``offset`` rounded to x's dtype) and per-sample
    ``eps_b = r ||z_b||^2 / ||s_b||^2`` (0 where ||s_b|| = 0)::

        out = (1 + eps a) x + eps b model_out + sqrt(2 eps) z.

    coef is float64 [3] or [3, B]: (a, b, r), r = 2 alpha_i snr^2. ``batch_mean``: one step
    size from the batch-mean norms, ``eps = r (mean_b ||z_b|| / mean_b ||s_b||)^2``.
    """
    if (noise is None) == (seed is None):
        raise ValueError("langevin_update needs exactly one of noise or seed")
    acc = _acc_dtype(x.dtype)
    batch = x.shape[0] if x.dim() > 0 else 1
    coef64 = coef.to(device=x.device, dtype=torch.float64)
    if coef64.dim() == 2:
        ca, cb = (coef64[k].reshape((batch,) + (1,) * max(x.dim() - 1, 0)).to(acc) for k in range(2))
        if x.dim() == 0:
            ca, cb = ca.reshape(()), cb.reshape(())
    else:
        ca, cb = coef64[0].to(acc), coef64[1].to(acc)
    if noise is None:
        noise = philox_normal(seed, offset, x.shape, x.dtype, device=x.device)
    s = ca * x.to(acc)
    s = _fma32(cb, model_out.to(acc), s) if acc == torch.float32 else s + cb * model_out.to(acc)
    per_sample = math.prod(x.shape[1:])
    ss = langevin_sums(s.reshape(batch, per_sample))
    zz = langevin_sums(noise.to(acc).reshape(batch, per_sample))
    step = langevin_step_coefs(coef64, ss, zz, batch_mean)
    return fused_update(x, [model_out], step, noise, None, 0)


def langevin_update_out(x: torch.Tensor, model_out: torch.Tensor, coef: torch.Tensor,
                        noise: Optional[torch.Tensor], seed: Optional[torch.Tensor], offset: int,
                        batch_mean: bool, out: torch.Tensor) -> None:
    """Twin of ``genflow::langevin_update_out``: the step written into ``out`` (may be x)."""
    out.copy_(langevin_update(x, model_out, coef, noise, seed, offset, batch_mean))


__all__ += ["langevin_sums", "lane_sum", "langevin_step_coefs", "langevin_update", "langevin_update_out"]


# ---------------------------------------------------------------- device rule of the fake (meta) kernels

def check_devices(ref_name: str, ref: torch.Tensor, same=(), cpu_ok=()) -> None:
    """The ops' device check (``csrc/common/checks.h``) for their fake kernels: each ``(name,
    tensor)`` of ``same`` on ``ref``'s device, of ``cpu_ok`` there or on the CPU; None skipped.
    Without it a call mixing meta and real tensors would run the fake kernel and return
    uninitialised memory."""
    for names, cpu in ((same, False), (cpu_ok, True)):
        for name, t in names:
            if t is not None and t.device != ref.device and not (cpu and t.device.type == "cpu"):
                owner = ref_name + ("'" if ref_name.endswith("s") else "'s")
                where = f"{ref.device} (or the CPU)" if cpu else str(ref.device)
                raise RuntimeError(f"{name} must be on {owner} device {where}, got {t.device}")


__all__ += ["check_devices"]
