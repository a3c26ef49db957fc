"""``kernel``: the Gaussian-kernel weighted mean vs chunked and dense PyTorch."""
from typing import Iterator

import torch

from genflow.bench import Baseline, Case, Context, agree, group


def _kernel_sizes(ctx):
    """(N = M, d) of the kernel rows: the SD-flow step sizes at d = 2, and d = 64."""
    if ctx.tiny:
        return [(512, 2)]
    if ctx.quick:
        return [(4096, 2), (16384, 2), (4096, 64)]
    return [(4096, 2), (16384, 2), (65536, 2), (4096, 64), (16384, 64)]


def kernel_mean_chunked_torch(q, k, v, sigma, chunk=1024):
    """The Gaussian-kernel weighted mean as a PyTorch user writes it: query chunks of ``chunk`` rows,
    ``torch.cdist`` (matmul-based), softmax, product with the values; memory O(chunk * M)."""
    out = q.new_empty((q.shape[0], v.shape[1]))
    for i in range(0, q.shape[0], chunk):
        s = torch.cdist(q[i:i + chunk], k).square_().mul_(-0.5 / sigma ** 2)
        out[i:i + chunk] = torch.softmax(s, 1) @ v
    return out


@group("kernel", "Gaussian-kernel weighted mean (kernel SD-flow step) vs chunked and dense PyTorch")
def _kernel(ctx: Context) -> Iterator[Case]:
    """``kernel_weighted_mean(q, k, sigma=)`` with values = keys (the denoiser E[x | z] of the kernel
    SD flow, Weber, "The Score-Difference Flow for Implicit Generative Modeling"), N = M, float32. Peers: chunked PyTorch (cdist, softmax, matmul over query
    chunks of 1024) and dense PyTorch (the full N x M matrix, where it fits in 4 GB). Sigma = 0.1
    at d = 2 and 4 at d = 64 (scores of order 10 on standard normal points)."""
    from genflow.ops import kernel_weighted_mean

    for n, d in _kernel_sizes(ctx):
        q, k = ctx.randn(n, d, seed=20), ctx.randn(n, d, seed=21)
        sigma = 0.1 if d <= 3 else 4.0
        ours = kernel_weighted_mean(q, k, sigma=sigma)

        def genflow(q=q, k=k, sigma=sigma):
            return kernel_weighted_mean(q, k, sigma=sigma)

        def chunked(q=q, k=k, sigma=sigma):
            return kernel_mean_chunked_torch(q, k, k, sigma)

        def dense(q=q, k=k, sigma=sigma):
            return torch.softmax(torch.cdist(q, k).square_().mul_(-0.5 / sigma ** 2), 1) @ k

        baselines = [Baseline("chunked PyTorch", chunked, lambda ours=ours, f=chunked: agree(ours, f(), 1e-4))]
        if 3 * n * n * q.element_size() <= 4 * 2 ** 30:
            baselines.append(Baseline("dense PyTorch", dense, lambda ours=ours, f=dense: agree(ours, f(), 1e-4)))
        else:
            baselines.append(Baseline("dense PyTorch", None,
                                      status=f"skipped: the {n}x{n} matrices need {3 * n * n * 4 / 2 ** 30:.0f} GB"))
        yield Case("kernel_weighted_mean", f"N=M={n}, d={d} f32", genflow, baselines,
                   note="values = keys; streaming log-sum-exp, no N x M matrix")
