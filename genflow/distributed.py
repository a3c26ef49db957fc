"""Gaussian-kernel weighted means over keys sharded across ``torch.distributed`` ranks.

Each rank holds a shard of the keys (the target samples of the SD flow) and the same queries.
The shards' results merge exactly, like the tiles of the streaming log-sum-exp: with rank r's
``(out_r, lse_r)`` from ``genflow.ops.kernel_weighted_mean``::

    m   = max_r lse_r                         (all_reduce MAX)
    w_r = exp(lse_r - m)
    out = sum_r w_r out_r / sum_r w_r          (one all_reduce SUM of [w_r out_r, w_r])
    lse = m + log sum_r w_r

A rank with no keys contributes ``w_r = 0``. Two collectives per call, O(N dv) traffic,
independent of the number of keys.
"""
import math
from typing import Optional

import torch
import torch.distributed as dist

from genflow.ops.kernel_mean import check_kernel_mean_args, use_kernel_mean_op
from genflow.ops.kernel_mean import kernel_weighted_mean as _local_mean

__all__ = ["kernel_weighted_mean", "shard"]


def shard(x: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank ``rank``'s contiguous block of the rows of ``x`` (Tensor[M, ...]) out of ``world_size``
    near-equal blocks (sizes differ by at most one, the first ``M % world_size`` ranks one larger;
    ``torch.tensor_split``'s split). A view, possibly empty."""
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise TypeError(f"x must be a tensor with at least one dimension, got {type(x).__name__}")
    for name, value in (("world_size", world_size), ("rank", rank)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size) = [0, {world_size}), got {rank}")
    return torch.tensor_split(x, world_size)[rank]


def kernel_weighted_mean(queries: torch.Tensor, keys_local: torch.Tensor, values_local: Optional[torch.Tensor] = None,
                         *, sigma: float, log_weights: Optional[torch.Tensor] = None, group=None,
                         return_lse: bool = False, precision: str = "highest", backend: str = "auto"):
    """``genflow.ops.kernel_weighted_mean`` over keys sharded across the ranks of ``group``.

    Computes, for all keys ``k_j`` of all ranks (``s_ij = -|q_i - k_j|^2 / (2 sigma^2) + lw_j``)::

        out_i = sum_j softmax_j(s_ij) v_j,   lse_i = logsumexp_j s_ij

    from each rank's local ``(out_r, lse_r)`` merged with an all-reduce of the max and of the
    rescaled sums (module docstring). Collective: every rank of ``group`` must call it with the
    same queries. Forward only (the collectives carry no gradient): inputs must not require grad.

    Args:
        queries (Tensor[N, d]): the same on every rank.
        keys_local (Tensor[M_r, d]): this rank's keys; ``M_r = 0`` is allowed.
        values_local (Tensor[M_r, dv], optional): this rank's values; None uses the keys.
        sigma (float > 0): the kernel bandwidth.
        log_weights (Tensor[M_r], optional): this rank's log-weights.
        group: the process group (None: the default group).
        return_lse: also return lse.
        precision, backend: passed to the local engine.

    Returns:
        Tensor[N, dv], or ``(out, lse [N])`` with ``return_lse``.

    Raises:
        RuntimeError: when torch.distributed is not initialised.
        ValueError: when no rank holds a key with a finite weight for some query.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("genflow.distributed.kernel_weighted_mean needs torch.distributed: call "
                           "torch.distributed.init_process_group first")
    values = keys_local if values_local is None else values_local
    for name, t in (("queries", queries), ("keys_local", keys_local), ("values_local", values_local),
                    ("log_weights", log_weights)):
        if not isinstance(t, torch.Tensor) and (t is not None or name in ("queries", "keys_local")):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t is not None and t.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{name} must not require grad: the sharded kernel mean is forward only")
    if keys_local.shape[0] > 0:
        out, lse = _local_mean(queries, keys_local, values, sigma=sigma, log_weights=log_weights, return_lse=True,
                               precision=precision, backend=backend)
    else:  # checked as the engine checks a non-empty shard, then the empty shard's neutral element
        check_kernel_mean_args(queries, keys_local, values, sigma, log_weights, precision, empty_keys_ok=True)
        use_kernel_mean_op(backend, queries.device)  # validates backend as the engine does
        out = queries.new_zeros((queries.shape[0], values.shape[1]))
        lse = queries.new_full((queries.shape[0],), -math.inf)
    m = lse.clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    if not bool(torch.isfinite(m).all()):
        raise ValueError("no rank holds a key with a finite kernel weight for some query (all shards empty "
                         "or all log_weights -inf)")
    w = torch.exp(lse - m)[:, None]
    sums = torch.cat([torch.where(w > 0, w * out, 0.0), w], dim=1)  # an all -inf shard gives out = NaN
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    total = sums[:, -1:]
    out = sums[:, :-1] / total
    return (out, m + torch.log(total[:, 0])) if return_lse else out
