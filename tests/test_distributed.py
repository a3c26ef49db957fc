"""Sharded kernel means (genflow.distributed) across 2 local gloo processes vs the single-process engine."""
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from genflow.distributed import kernel_weighted_mean, shard
from genflow.ops.kernel_mean import kernel_weighted_mean as engine
from genflow.sdflow import sd_flow

WORLD = 2
TOL = {torch.float32: 1e-6, torch.float64: 1e-12}
# (dtype, keys on rank 0, keys on rank 1, with values, with log_weights, return_lse)
CASES = [
    (torch.float64, 17, 6, False, False, True),
    (torch.float64, 5, 30, True, True, True),
    (torch.float32, 17, 6, True, False, False),
    (torch.float32, 9, 20, False, True, True),
    (torch.float64, 23, 0, False, True, True),   # rank 1 holds no keys
    (torch.float32, 0, 23, True, False, True),   # rank 0 holds no keys
]


def _case_data(index, dtype, m0, m1, with_values, with_weights):
    g = torch.Generator().manual_seed(100 + index)  # the same tensors on every rank
    m = m0 + m1
    queries = torch.randn(13, 3, generator=g, dtype=dtype)
    keys = 0.8 * torch.randn(m, 3, generator=g, dtype=dtype)
    values = torch.randn(m, 4, generator=g, dtype=dtype) if with_values else None
    log_weights = torch.randn(m, generator=g, dtype=dtype) if with_weights else None
    return queries, keys, values, log_weights


def _worker(rank, init_method):
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=WORLD)
    try:
        for index, (dtype, m0, m1, with_values, with_weights, return_lse) in enumerate(CASES):
            queries, keys, values, log_weights = _case_data(index, dtype, m0, m1, with_values, with_weights)
            part = slice(0, m0) if rank == 0 else slice(m0, m0 + m1)
            local = dict(values_local=None if values is None else values[part],
                         log_weights=None if log_weights is None else log_weights[part])
            got = kernel_weighted_mean(queries, keys[part], sigma=0.7, return_lse=return_lse, **local)
            want = engine(queries, keys, values, sigma=0.7, log_weights=log_weights, return_lse=return_lse)
            tol = TOL[dtype]
            for a, b in zip(got, want) if return_lse else [(got, want)]:
                torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m: f"case {index}: {m}")
        # the SD flow with the target sharded (unevenly by tensor_split: 21 and 20 rows)
        g = torch.Generator().manual_seed(7)
        source, target = torch.randn(15, 2, generator=g, dtype=torch.float64), torch.randn(41, 2, generator=g,
                                                                                             dtype=torch.float64)
        opts = dict(sigma=0.6, steps=4, step_size=0.2, generator=3)
        got = sd_flow(source, shard(target, rank, WORLD), group=dist.group.WORLD, **opts)
        torch.testing.assert_close(got, sd_flow(source, target, **opts), rtol=1e-12, atol=1e-12)
        # per-rank target subsets reweighted by log(M_r / b): deterministic and close to the full flow
        sub = sd_flow(source, shard(target, rank, WORLD), group=dist.group.WORLD, target_batch=15, **opts)
        everyone = [torch.empty_like(sub) for _ in range(WORLD)]
        dist.all_gather(everyone, sub)
        torch.testing.assert_close(everyone[0], everyone[1], rtol=0, atol=0)
        assert (sub - got).abs().max() < 0.5
    finally:
        dist.destroy_process_group()


def test_sharded_mean_matches_engine(tmp_path):
    mp.spawn(_worker, args=(f"file://{tmp_path / 'rendezvous'}",), nprocs=WORLD, join=True)


def test_needs_initialised_process_group():
    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        kernel_weighted_mean(torch.randn(3, 2), torch.randn(4, 2), sigma=1.0)


def test_shard():
    x = torch.arange(10).reshape(5, 2)
    parts = [shard(x, r, 3) for r in range(3)]
    assert [p.shape[0] for p in parts] == [2, 2, 1]
    torch.testing.assert_close(torch.cat(parts), x)
    assert shard(x, 6, 7).shape == (0, 2)
    with pytest.raises(ValueError, match=r"rank must be in \[0, world_size\)"):
        shard(x, 3, 3)
    with pytest.raises(ValueError, match="world_size must be >= 1"):
        shard(x, 0, 0)
    with pytest.raises(TypeError, match="x must be a tensor"):
        shard([1, 2], 0, 1)
