"""Benchmark of the fused update: genflow's compiled op vs the same update in eager PyTorch.

The update is one stochastic solver step with two terms, ``x <- c0 x + c1 t1 + c2 t2 + s z``, on
float32 tensors of 1e3, 1e5 and 1e7 elements, with supplied noise (``z`` given) and with noise
generated in the kernel (``z`` = the Philox stream; eager PyTorch calls ``torch.randn_like``).

    python -m pytest bench/bench_fused_update.py --benchmark-only     # pytest-benchmark suite
    python bench/bench_fused_update.py [--device cpu] [--repeat 20]   # a table of ms and ratios

Rows: ``fused`` is ``fused_update(..., out=x)`` (in place: reads x, t1, t2 (and z), writes x once);
``eager`` is the expression ``c0*x + c1*t1 + c2*t2 + s*torch.randn_like(x)``; ``eager_inplace``
is the same with in-place ``mul_``/``add_`` (fewer allocations); ``reference`` is genflow's
pure-PyTorch twin (``backend="torch"``), the fallback without the extension.
"""
import argparse
import statistics
import sys
import time

import pytest
import torch

from genflow._extension import HAS_EXTENSION, has_cuda_kernels
from genflow.ops import fused_update

SIZES = [1_000, 100_000, 10_000_000]
NOISE = ["supplied", "generated"]
C0, C1, C2, S = 0.95, 0.03, -0.01, 0.2


def _inputs(n, device):
    gen = torch.Generator().manual_seed(0)
    x, t1, t2, z = (torch.randn(n, generator=gen).to(device) for _ in range(4))
    return x, t1, t2, z


def make_step(impl, noise, n, device):
    """A zero-argument callable doing one update of the given implementation."""
    x, t1, t2, z = _inputs(n, device)
    counter = [0]
    if impl == "fused":
        if noise == "supplied":
            return lambda: fused_update(x, [t1, t2], [C0, C1, C2], S, noise=z, out=x)

        def fused_generated():
            counter[0] += 1
            return fused_update(x, [t1, t2], [C0, C1, C2], S, seed=1, offset=counter[0], out=x)

        return fused_generated
    if impl == "reference":
        if noise == "supplied":
            return lambda: fused_update(x, [t1, t2], [C0, C1, C2], S, noise=z, out=x, backend="torch")
        return lambda: fused_update(x, [t1, t2], [C0, C1, C2], S, seed=1, offset=1, out=x, backend="torch")
    if impl == "eager":
        if noise == "supplied":
            return lambda: C0 * x + C1 * t1 + C2 * t2 + S * z
        return lambda: C0 * x + C1 * t1 + C2 * t2 + S * torch.randn_like(x)
    if impl == "eager_inplace":
        if noise == "supplied":
            return lambda: x.mul_(C0).add_(t1, alpha=C1).add_(t2, alpha=C2).add_(z, alpha=S)
        return lambda: x.mul_(C0).add_(t1, alpha=C1).add_(t2, alpha=C2).add_(torch.randn_like(x), alpha=S)
    raise ValueError(impl)


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device, repeat, warmup=3):
    """Median wall time of one call in ms."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


# ---------------------------------------------------------------- pytest-benchmark suite

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and has_cuda_kernels() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", SIZES, ids=["1e3", "1e5", "1e7"])
@pytest.mark.parametrize("noise", NOISE)
@pytest.mark.parametrize("impl", ["fused", "eager", "eager_inplace", "reference"])
def test_fused_update_step(benchmark, impl, noise, n, device):
    if impl == "fused" and not HAS_EXTENSION:
        pytest.skip("genflow._C is not built")
    if impl == "reference" and n > 100_000:
        pytest.skip("the reference is slow at 1e7 (run the table for it)")
    step = make_step(impl, noise, n, device)
    if device == "cuda":
        benchmark(lambda: (step(), torch.cuda.synchronize()))
    else:
        benchmark(step)


# ---------------------------------------------------------------- table

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--no-reference", action="store_true", help="skip the slow reference rows")
    args = parser.parse_args(argv)
    if not HAS_EXTENSION:
        sys.exit("genflow._C is not built: pip install -e . first")
    device = args.device
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}")
    print(f"{'elements':>9} {'noise':>9} | {'fused':>9} {'eager':>9} {'eager_ip':>9} {'reference':>10} | "
          f"{'eager/fused':>11} {'eager_ip/fused':>14} {'ref/fused':>9}")
    for n in SIZES:
        for noise in NOISE:
            row = {}
            for impl in ("fused", "eager", "eager_inplace", "reference"):
                if impl == "reference" and args.no_reference:
                    continue
                repeat = args.repeat if not (impl == "reference" and n >= 10_000_000) else 3
                row[impl] = time_ms(make_step(impl, noise, n, device), device, repeat,
                                    warmup=1 if impl == "reference" else 3)
            ref = row.get("reference", float("nan"))
            print(f"{n:>9.0e} {noise:>9} | {row['fused']:>9.4f} {row['eager']:>9.4f} "
                  f"{row['eager_inplace']:>9.4f} {ref:>10.4f} | {row['eager'] / row['fused']:>11.2f} "
                  f"{row['eager_inplace'] / row['fused']:>14.2f} {ref / row['fused']:>9.1f}")


if __name__ == "__main__":
    main()
