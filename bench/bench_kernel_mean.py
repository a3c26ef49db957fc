"""Benchmark of the Gaussian-kernel weighted mean (one kernel SD-flow denoiser evaluation,
values = keys): genflow's op vs chunked PyTorch, dense PyTorch and genflow's own reference.

    python -m pytest bench/bench_kernel_mean.py --benchmark-only      # pytest-benchmark suite
    python bench/bench_kernel_mean.py [--sizes 4096,16384] [--repeat 3]   # a table of ms and ratios

Rows: ``genflow`` is ``kernel_weighted_mean(q, k, sigma=)`` (streaming log-sum-exp, forward only);
``genflow_fwd_bwd`` adds the backward w.r.t. queries and keys; ``chunked`` is
``bench.cases.kernel.kernel_mean_chunked_torch`` (cdist, softmax, matmul over query chunks of 1024);
``dense`` the same on the full N x M matrix (only where it fits: N = M <= 16384); ``reference``
is genflow's pure-PyTorch twin (``backend="torch"``, sums of squared differences).
"""
import argparse
import time

import pytest
import torch

from genflow._extension import HAS_EXTENSION
from bench.cases.kernel import kernel_mean_chunked_torch
from genflow.ops import kernel_weighted_mean

CASES = [(4096, 2), (16384, 2), (65536, 2), (4096, 64), (16384, 64)]
IMPLS = ["genflow", "genflow_fwd_bwd", "chunked", "dense", "reference"]


def _sigma(d):
    return 0.1 if d <= 3 else 4.0


def make_call(impl, n, d):
    """A zero-argument callable for one evaluation at N = M = n, or None where it does not fit."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    sigma = _sigma(d)
    if impl == "genflow":
        return lambda: kernel_weighted_mean(q, k, sigma=sigma)
    if impl == "genflow_fwd_bwd":
        qg, kg = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
        return lambda: kernel_weighted_mean(qg, kg, sigma=sigma).sum().backward()
    if impl == "chunked":
        return lambda: kernel_mean_chunked_torch(q, k, k, sigma)
    if impl == "dense":
        if n > 16384:
            return None
        return lambda: torch.softmax(torch.cdist(q, k).square_().mul_(-0.5 / sigma ** 2), 1) @ k
    if impl == "reference":
        if n * n * d > 16384 * 16384 * 2:
            return None
        return lambda: kernel_weighted_mean(q, k, sigma=sigma, backend="torch")
    raise ValueError(impl)


def time_ms(fn, repeat):
    """Best wall time of one call in ms (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return min(times)


# ---------------------------------------------------------------- pytest-benchmark suite

@pytest.mark.parametrize("n, d", CASES[:2] + CASES[3:4], ids=["4096x2", "16384x2", "4096x64"])
@pytest.mark.parametrize("impl", IMPLS)
def test_kernel_weighted_mean(benchmark, impl, n, d):
    if impl.startswith("genflow") and not HAS_EXTENSION:
        pytest.skip("genflow._C is not built")
    call = make_call(impl, n, d)
    if call is None:
        pytest.skip("too large for this implementation")
    benchmark.pedantic(call, rounds=3, iterations=1, warmup_rounds=1)


# ---------------------------------------------------------------- table

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cases", default=",".join(f"{n}x{d}" for n, d in CASES),
                        help="comma-separated NxD (N = M)")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, ms per call (best of {args.repeat})")
    print(f"{'N=M':>7} {'d':>4} | " + " ".join(f"{i:>15}" for i in IMPLS) + " | chunked/genflow dense/genflow")
    for case in args.cases.split(","):
        n, d = (int(x) for x in case.split("x"))
        row = {}
        for impl in IMPLS:
            call = make_call(impl, n, d)
            row[impl] = float("nan") if call is None else time_ms(call, 1 if impl == "reference" else args.repeat)
        print(f"{n:>7} {d:>4} | " + " ".join(f"{row[i]:>15.2f}" for i in IMPLS)
              + f" | {row['chunked'] / row['genflow']:>15.1f} {row['dense'] / row['genflow']:>11.1f}", flush=True)


if __name__ == "__main__":
    main()
