"""The Gaussian-kernel weighted mean: the engine of the kernel SD flow, MMD flow and SVGD.

For queries ``q_i`` (i < N), keys ``k_j`` (j < M), values ``v_j`` and optional log-weights
``lw_j``, with ``scale = 1 / (2 sigma^2)``::

    s_ij  = -scale * |q_i - k_j|^2 + lw_j
    lse_i = log sum_j exp(s_ij)
    out_i = sum_j exp(s_ij - lse_i) v_j

i.e. the Nadaraya-Watson estimate ``E[v | q]`` under the Gaussian kernel ``K_sigma``; with
``values = keys`` it is the denoiser ``E[x | z]`` of the kernel score-difference flow (Weber, "The Score-Difference Flow for Implicit Generative Modeling":
``grad log p(z; sigma) = (E[x | z] - z) / sigma^2``). The compiled op (``csrc/ops/kernel_mean.cpp``,
math in ``csrc/common/kernel_mean.h``) streams over key tiles with an online log-sum-exp, so no
N x M matrix is formed and any sigma works (a naive softmax underflows at sigma = 1e-3). The
pure-PyTorch reference below streams the same way over chunks; it is the test oracle and the
fallback when the op is not built. The wrapper handles the extremes before and after the
kernels, identically for every backend: ``+inf`` log-weights (their keys are selected), sigma so
large that ``scale`` underflows (the reference at ``scale = 0``) and sigma so small that scores
overflow (the nearest-key limit, ``_NearestKeyMean``); the ops themselves take finite
``scale > 0`` and log-weights ``< +inf``.

Compiled ops::

    genflow::kernel_weighted_mean(Tensor queries, Tensor keys, Tensor values, Tensor? log_weights,
                                  float scale, int precision) -> (Tensor out, Tensor lse)
    genflow::kernel_weighted_mean_backward(Tensor queries, Tensor keys, Tensor values,
                                  Tensor? log_weights, Tensor out, Tensor lse, Tensor grad_out,
                                  float scale, bool[3] output_mask) -> (Tensor?, Tensor?, Tensor?)
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from genflow._checks import check_real, did_you_mean
from genflow._extension import HAS_EXTENSION
from genflow.ops._reference import check_devices
from genflow.ops.fused_update import use_op

__all__ = ["PRECISIONS", "check_kernel_mean_args", "kernel_weighted_mean", "use_kernel_mean_op"]

PRECISIONS = ("highest", "tf32", "bf16")  # the codes of KernelPrecision in kernel_mean.h
_DTYPES = (torch.float32, torch.float64)
_HAS_OP = HAS_EXTENSION and hasattr(torch.ops.genflow, "kernel_weighted_mean")
# reference chunking: at most _BLOCK_ELEMS elements in a [query chunk, key chunk, d] difference
_BLOCK_ELEMS = 1 << 22
_KEY_CHUNK = 1024


def use_kernel_mean_op(backend: str, device: torch.device) -> bool:
    """True: the compiled op; False: the reference (also for backend="auto" without the op)."""
    return use_op(backend, device, _HAS_OP, "the kernel_weighted_mean op")


# ---------------------------------------------------------------- pure-PyTorch reference (the oracle)

def _chunks(n: int, m: int, d: int):
    """(query chunk, key chunk) sizes with chunk_q * chunk_k * max(d, 1) <= _BLOCK_ELEMS (about)."""
    kc = max(1, min(m, _KEY_CHUNK))
    qc = max(8, _BLOCK_ELEMS // (kc * max(d, 1)))
    return max(1, min(n, qc)), kc


def _scores(q: torch.Tensor, k: torch.Tensor, lw: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """s = -scale |q_i - k_j|^2 + lw_j for a chunk, [nq, nk], from sums of squared differences."""
    s = (q[:, None, :] - k[None, :, :]).square().sum(-1).mul_(-scale)
    return s if lw is None else s.add_(lw)


def _kernel_scores(keys: torch.Tensor, log_weights: Optional[torch.Tensor], scale: float):
    """``score(i0, q, j0, j1)``: the scores of the query chunk ``q`` (rows from ``i0``) against keys ``j0:j1``."""
    def score(i0, q, j0, j1):
        return _scores(q, keys[j0:j1], None if log_weights is None else log_weights[j0:j1], scale)
    return score


def _streaming_mean(queries: torch.Tensor, values: torch.Tensor, score):
    """``(out, lse)`` of the scores ``score(i0, q, j0, j1)`` by a streaming log-sum-exp over key
    chunks (running max, sum and weighted sum rescaled when the max grows)."""
    n, d = queries.shape
    m, dv = values.shape
    out = queries.new_empty((n, dv))
    lse = queries.new_empty((n,))
    qc, kc = _chunks(n, m, d)
    for i0 in range(0, n, qc):
        q = queries[i0:i0 + qc]
        run_max = q.new_full((q.shape[0],), -math.inf)
        run_sum = q.new_zeros((q.shape[0],))
        run_acc = q.new_zeros((q.shape[0], dv))
        for j0 in range(0, m, kc):
            s = score(i0, q, j0, j0 + kc)
            new_max = torch.maximum(run_max, s.amax(1))
            shift = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
            rescale = torch.exp(run_max - shift)
            p = torch.exp(s - shift[:, None])
            run_sum = run_sum * rescale + p.sum(1)
            run_acc = run_acc * rescale[:, None] + p @ values[j0:j0 + kc]
            run_max = new_max
        out[i0:i0 + qc] = run_acc / run_sum[:, None]
        lse[i0:i0 + qc] = run_max + torch.log(run_sum)
    return out, lse


def reference_forward(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                      log_weights: Optional[torch.Tensor], scale: float):
    """Twin of ``genflow::kernel_weighted_mean``: ``(out [N, dv], lse [N])`` by a streaming
    log-sum-exp over key chunks (running max, sum and weighted sum rescaled when the max grows).

    Memory is O(chunk_q * chunk_k * d), independent of N * M. Rows whose scores are all ``-inf``
    (every log-weight ``-inf``) give ``out = NaN`` and ``lse = -inf``. ``scale = 0`` (sigma so
    large that ``1 / (2 sigma^2)`` underflows) gives the weights ``softmax(lw)`` for every query.
    """
    return _streaming_mean(queries, values, _kernel_scores(keys, log_weights, scale))


def reference_backward(queries, keys, values, log_weights, out, lse, grad_out, scale: float,
                       output_mask=(True, True, True), score=None):
    """Twin of ``genflow::kernel_weighted_mean_backward`` (``csrc/common/kernel_mean.h``), with
    ``w_ij = exp(s_ij - lse_i)`` from the saved lse and ``a_ij = w_ij g_i . (v_j - out_i)``::

        dq_i = 2 scale sum_j a_ij (k_j - q_i)
        dk_j = 2 scale sum_i a_ij (q_i - k_j)
        dv_j = sum_i w_ij g_i

    ``score``: other scores ``score(i0, q, j0, j1)`` than the kernel's (the limits' ``dv``).
    """
    n, d = queries.shape
    m = keys.shape[0]
    score = score or _kernel_scores(keys, log_weights, scale)
    dq = torch.zeros_like(queries) if output_mask[0] else None
    dk = torch.zeros_like(keys) if output_mask[1] else None
    dv = torch.zeros_like(values) if output_mask[2] else None
    go = (grad_out * out).sum(1)
    qc, kc = _chunks(n, m, d)
    for i0 in range(0, n, qc):
        q, g, lse_c, go_c = queries[i0:i0 + qc], grad_out[i0:i0 + qc], lse[i0:i0 + qc], go[i0:i0 + qc]
        for j0 in range(0, m, kc):
            k, v = keys[j0:j0 + kc], values[j0:j0 + kc]
            w = torch.exp(score(i0, q, j0, j0 + kc) - lse_c[:, None])
            if dv is not None:
                dv[j0:j0 + kc] += w.T @ g
            if dq is None and dk is None:
                continue
            a = w * (g @ v.T - go_c[:, None])
            if dq is not None:
                dq[i0:i0 + qc] += (2 * scale) * (a @ k - a.sum(1)[:, None] * q)
            if dk is not None:
                dk[j0:j0 + kc] += (2 * scale) * (a.T @ q - a.sum(0)[:, None] * k)
    return dq, dk, dv


# ---------------------------------------------------------------- the sigma -> 0 limit

def _nearest_distances(queries: torch.Tensor, keys: torch.Tensor, log_weights: Optional[torch.Tensor]):
    """``dmin [N]``: each query's smallest squared distance to a key of finite log-weight (inf: none)."""
    n, d = queries.shape
    m = keys.shape[0]
    dmin = queries.new_full((n,), math.inf)
    qc, kc = _chunks(n, m, d)
    for i0 in range(0, n, qc):
        for j0 in range(0, m, kc):
            dist = _scores(queries[i0:i0 + qc], keys[j0:j0 + kc], None, -1.0)
            if log_weights is not None:
                dist = dist.masked_fill(log_weights[j0:j0 + kc] == -math.inf, math.inf)
            dmin[i0:i0 + qc] = torch.minimum(dmin[i0:i0 + qc], dist.amin(1))
    return dmin


def _nearest_scores(keys: torch.Tensor, log_weights: Optional[torch.Tensor], dmin: torch.Tensor):
    """The limit's scores: ``lw_j`` (0 without log-weights) on each query's nearest keys, ``-inf`` elsewhere."""
    def score(i0, q, j0, j1):
        dist = _scores(q, keys[j0:j1], None, -1.0)
        lw = dist.new_zeros(()) if log_weights is None else log_weights[j0:j1]
        return torch.where(dist == dmin[i0:i0 + q.shape[0], None], lw, -math.inf)
    return score


class _NearestKeyMean(torch.autograd.Function):
    """The ``sigma -> 0`` limit of the kernel mean: ``out_i`` is the ``softmax(lw)``-weighted mean
    of the values of the keys nearest to ``q_i`` (among keys of finite log-weight; one key unless
    there are ties), and ``lse_i = -scale dmin_i + logsumexp_{nearest j} lw_j`` (``-inf`` when it
    underflows). Piecewise constant in queries and keys (zero gradients), linear in values."""

    @staticmethod
    def forward(ctx, queries, keys, values, log_weights, scale):
        dmin = _nearest_distances(queries, keys, log_weights)
        out, tie_lse = _streaming_mean(queries, values, _nearest_scores(keys, log_weights, dmin))
        lse = torch.where(dmin == 0, tie_lse, tie_lse - scale * dmin)
        ctx.save_for_backward(queries, keys, values, log_weights, out, tie_lse, dmin)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        queries, keys, values, log_weights, out, tie_lse, dmin = ctx.saved_tensors
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        dv = None
        if need_v:
            dv = reference_backward(queries, keys, values, log_weights, out, tie_lse, grad_out.contiguous(), 0.0,
                                    (False, False, True), _nearest_scores(keys, log_weights, dmin))[2]
        return (torch.zeros_like(queries) if need_q else None, torch.zeros_like(keys) if need_k else None, dv,
                None, None)


class _ReferenceMean(torch.autograd.Function):
    """Autograd of the reference: chunked forward and backward (O(chunk) memory both ways)."""

    @staticmethod
    def forward(ctx, queries, keys, values, log_weights, scale):
        out, lse = reference_forward(queries, keys, values, log_weights, scale)
        ctx.save_for_backward(queries, keys, values, log_weights, out, lse)
        ctx.scale = scale
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        queries, keys, values, log_weights, out, lse = ctx.saved_tensors
        dq, dk, dv = reference_backward(queries, keys, values, log_weights, out, lse, grad_out.contiguous(),
                                        ctx.scale, ctx.needs_input_grad[:3])
        return dq, dk, dv, None, None


# ---------------------------------------------------------------- argument checks

def check_sigma(sigma) -> float:
    """``sigma`` as a float: a Python, NumPy or 0-d tensor real number, finite and > 0 (the
    kernel is undefined at 0 and constant at inf); a TypeError/ValueError naming ``sigma`` otherwise."""
    try:
        return check_real("sigma", sigma, low=0.0, low_open=True)
    except ValueError:
        raise ValueError(f"sigma must be a finite number > 0, got {float(sigma)}") from None


def check_kernel_mean_args(queries, keys, values, sigma, log_weights, precision, empty_keys_ok: bool = False) -> None:
    """ValueError/TypeError for bad arguments (``empty_keys_ok``: M = 0, an empty shard of the keys)."""
    for name, t in (("queries", queries), ("keys", keys), ("values", values), ("log_weights", log_weights)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if queries.dtype not in _DTYPES:
        raise TypeError(f"queries must be float32 or float64, got {queries.dtype}")
    if queries.dim() != 2:
        raise ValueError(f"queries must have shape [N, d], got {list(queries.shape)}")
    if keys.dim() != 2 or keys.shape[1] != queries.shape[1]:
        raise ValueError(f"keys must have shape [M, d] = [M, {queries.shape[1]}] (d of queries), "
                         f"got {list(keys.shape)}")
    if keys.shape[0] < 1 and not empty_keys_ok:
        raise ValueError("keys must have at least one row (M >= 1), got shape " + str(list(keys.shape)))
    if values.dim() != 2 or values.shape[0] != keys.shape[0]:
        raise ValueError(f"values must have shape [M, dv] = [{keys.shape[0]}, dv] (M of keys), "
                         f"got {list(values.shape)}")
    if log_weights is not None and (log_weights.dim() != 1 or log_weights.shape[0] != keys.shape[0]):
        raise ValueError(f"log_weights must have shape [M] = [{keys.shape[0]}], got {list(log_weights.shape)}")
    for name, t in (("keys", keys), ("values", values), ("log_weights", log_weights)):
        if t is None:
            continue
        if t.dtype != queries.dtype:
            raise TypeError(f"{name} must have queries' dtype {queries.dtype}, got {t.dtype}")
        if t.device != queries.device:
            raise ValueError(f"{name} must be on queries' device {queries.device}, got {t.device}")
    if log_weights is not None and log_weights.requires_grad:
        raise ValueError("log_weights must not require grad: kernel_weighted_mean is differentiable "
                         "w.r.t. queries, keys and values only (pass log_weights.detach())")
    check_sigma(sigma)
    if precision not in PRECISIONS:
        hint = did_you_mean(str(precision), PRECISIONS)
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}{hint}")


# ---------------------------------------------------------------- public wrapper

def kernel_weighted_mean(queries: torch.Tensor, keys: torch.Tensor, values: Optional[torch.Tensor] = None, *,
                         sigma: float, log_weights: Optional[torch.Tensor] = None, precision: str = "highest",
                         return_lse: bool = False, backend: str = "auto"):
    """Gaussian-kernel weighted mean of ``values`` at each query (Nadaraya-Watson / kernel denoiser).

    With ``scale = 1 / (2 sigma^2)`` and ``s_ij = -scale |q_i - k_j|^2 + lw_j``::

        out_i = sum_j softmax_j(s_ij) v_j,        lse_i = logsumexp_j s_ij

    The kernel score-difference flow (Weber, "The Score-Difference Flow for Implicit Generative Modeling") moves a sample z by
    ``(out_p(z) - out_q(z)) / sigma^2``, each term one call with ``values=None`` (``E[x | z]``).
    Computed with a streaming log-sum-exp over key tiles: O((N + M) d) memory, exact for any
    sigma (no underflow at sigma = 1e-3); rows whose log-weights are all ``-inf`` give NaN.

    Extremes, computed in log space where the answer is defined:

    - sigma so large that ``1 / (2 sigma^2)`` underflows (> ~1e154): the limit, weights
      ``softmax(lw)`` (uniform without log-weights) for every query; no overflow.
    - sigma so small that ``2 scale |q - k|^2`` overflows the dtype, or that every score of a
      row overflows to ``-inf``: the ``sigma -> 0`` limit, the ``softmax(lw)``-weighted mean of
      the values of the key(s) nearest to the query (zero gradient w.r.t. queries and keys);
      ``lse = -scale dmin + logsumexp_nearest lw`` (``-inf`` when that underflows). Under
      ``torch.compile`` only the first case is applied (the second is a data-dependent branch).
    - ``+inf`` log-weights select their keys: the result is the kernel-weighted mean over the
      keys with ``lw_j = +inf`` (the limit of ``lw_j -> inf`` at one rate), and ``lse = +inf``.
    - sigma <= 0, NaN or inf: ValueError naming ``sigma`` (the kernel is undefined or constant).

    Args:
        queries (Tensor[N, d]): float32 | float64. N = 0 gives empty outputs.
        keys (Tensor[M, d]): like queries, M >= 1.
        values (Tensor[M, dv], optional): like queries; None uses keys (dv = d).
        sigma (float > 0): the kernel bandwidth (a Python, NumPy or 0-d tensor number).
        log_weights (Tensor[M], optional): ``lw_j`` added to the scores (e.g. log sample weights);
            must not require grad; ``+inf`` entries select their keys (see above).
        precision: ``"highest"`` (sums of squared differences in the accumulation type),
            ``"tf32"`` or ``"bf16"`` (tensor-core ``q.k`` products; only on CUDA with float32 and
            d >= 32, elsewhere computed at highest precision).
        return_lse: also return ``lse`` (not differentiable).
        backend: "auto" (the compiled op when built for the device, else the reference), "torch"
            (the chunked PyTorch reference), "cpu" or "cuda" (the compiled op, or an error).

    Returns:
        Tensor[N, dv], or ``(out, lse)`` with lse Tensor[N] when ``return_lse``. Differentiable
        w.r.t. queries, keys and values (accumulation in float32 for float32, float64 for float64).
    """
    if values is None:
        values = keys
    check_kernel_mean_args(queries, keys, values, sigma, log_weights, precision)
    use_op = use_kernel_mean_op(backend, queries.device)
    sigma = check_sigma(sigma)
    scale = 0.5 / sigma / sigma  # 0 for sigma > ~1e154 (weights softmax(lw)); inf below ~1e-154
    use_op = use_op and scale > 0  # the ops take scale > 0; the reference computes scale = 0 exactly
    selected = None
    if log_weights is not None:
        log_weights, selected = _select_infinite(log_weights)
    if scale > torch.finfo(queries.dtype).max / 4:  # 2 scale |q - k|^2 overflows: the sigma -> 0 limit
        out, lse = _NearestKeyMean.apply(queries, keys, values, log_weights, scale)
    else:
        out, lse = _engine(queries, keys, values, log_weights, scale, precision, use_op)
        if not torch.compiler.is_compiling():
            out, lse = _overflowed_rows(queries, keys, values, log_weights, scale, precision, use_op, out, lse)
    if selected is not None:
        lse = torch.where(selected, math.inf, lse)
    return (out, lse) if return_lse else out


def _engine(queries, keys, values, log_weights, scale: float, precision: str, use_op: bool):
    """``(out, lse)`` of the compiled op or the chunked reference (``scale = 0``: the reference)."""
    if use_op:
        return torch.ops.genflow.kernel_weighted_mean(  # kernel:
            queries, keys, values, log_weights, scale, PRECISIONS.index(precision))
    return _ReferenceMean.apply(queries.contiguous(), keys.contiguous(), values.contiguous(),
                                None if log_weights is None else log_weights.contiguous(), scale)


def _select_infinite(log_weights: torch.Tensor):
    """``(log_weights, selected)``: when some ``lw_j = +inf``, those keys get 0 and the others
    ``-inf`` (the limit of the weights, taken without a host sync); ``selected`` is a 0-d bool."""
    infinite = torch.isposinf(log_weights)
    selected = infinite.any()
    chosen = torch.where(infinite, 0.0, -math.inf).to(log_weights.dtype)
    return torch.where(selected, chosen, log_weights), selected


def _overflowed_rows(queries, keys, values, log_weights, scale, precision, use_op, out, lse):
    """Rows whose every score overflowed to ``-inf`` (sigma tiny for their distances) replaced by
    the ``sigma -> 0`` limit; rows without a key of finite log-weight stay NaN. The other rows
    are recomputed without them, so that their gradients do not meet the overflowed rows' NaN."""
    bad = torch.isneginf(lse)
    if not bool(bad.any()):
        return out, lse
    good_rows, bad_rows = (~bad).nonzero()[:, 0], bad.nonzero()[:, 0]
    parts = [_NearestKeyMean.apply(queries[bad_rows], keys, values, log_weights, scale)]
    if good_rows.numel():
        parts.append(_engine(queries[good_rows], keys, values, log_weights, scale, precision, use_op))
    order = torch.argsort(torch.cat([bad_rows, good_rows]))
    return (torch.cat([p[0] for p in parts])[order], torch.cat([p[1] for p in parts])[order])


# ---------------------------------------------------------------- torch.compile and autograd support

if _HAS_OP:

    @torch.library.register_fake("genflow::kernel_weighted_mean")
    def _kernel_weighted_mean_fake(queries, keys, values, log_weights, scale, precision):
        check_devices("queries", queries, same=[("keys", keys), ("values", values), ("log_weights", log_weights)])
        return queries.new_empty((queries.shape[0], values.shape[1])), queries.new_empty((queries.shape[0],))

    @torch.library.register_fake("genflow::kernel_weighted_mean_backward")
    def _kernel_weighted_mean_backward_fake(queries, keys, values, log_weights, out, lse, grad_out, scale,
                                            output_mask):
        check_devices("queries", queries, same=[("keys", keys), ("values", values), ("log_weights", log_weights),
                                                ("out", out), ("lse", lse), ("grad_out", grad_out)])
        return tuple(torch.empty_like(t) if need else None
                     for t, need in zip((queries, keys, values), output_mask))

    def _setup_context(ctx, inputs, output):
        queries, keys, values, log_weights, scale, _ = inputs
        if log_weights is not None and log_weights.requires_grad:  # the op has no gradient for it
            raise ValueError("log_weights must not require grad: genflow::kernel_weighted_mean is "
                             "differentiable w.r.t. queries, keys and values only (pass log_weights.detach())")
        out, lse = output
        ctx.save_for_backward(queries, keys, values, log_weights, out, lse)
        ctx.scale = scale
        ctx.mark_non_differentiable(lse)

    def _backward(ctx, grad_out, grad_lse):
        """dq, dk, dv of ``csrc/common/kernel_mean.h`` from the saved out and lse (one pass each)."""
        queries, keys, values, log_weights, out, lse = ctx.saved_tensors
        dq, dk, dv = torch.ops.genflow.kernel_weighted_mean_backward(
            queries, keys, values, log_weights, out, lse, grad_out, ctx.scale, list(ctx.needs_input_grad[:3]))
        return dq, dk, dv, None, None, None

    torch.library.register_autograd("genflow::kernel_weighted_mean", _backward, setup_context=_setup_context)
