"""Pieces shared by the benchmark cases: the fixed test networks, batch sizes and the equal-work check."""
import math

import torch

from genflow.bench import Baseline, Case, Counted, agree


def solve_shapes(ctx, kind, adaptive=False):
    if ctx.tiny:
        return [(1, 2), (64, 2)]
    return [(1, 2), (large_batch(ctx, kind, adaptive), 2)]


class MLP:
    """A small fixed network ``net(x, t)``: ``[x, log1p(t)] -> 64 -> 64 -> D`` with SiLU, random
    weights from a fixed seed (float32 and float64 copies), no autograd. It stands for a real
    denoiser in the "mlp" rows; ``scale_in`` divides x by ``sqrt(1 + t^2)`` (EDM-style input scaling)."""

    def __init__(self, dim: int = 2, hidden: int = 64, *, seed: int = 0, scale_in: bool = False):
        g = torch.Generator().manual_seed(seed)
        sizes = [dim + 1, hidden, hidden, dim]
        self.weights = {torch.float64: [(torch.randn(a, b, generator=g, dtype=torch.float64) / math.sqrt(a),
                                         0.1 * torch.randn(b, generator=g, dtype=torch.float64))
                                        for a, b in zip(sizes[:-1], sizes[1:])]}
        self.scale_in = scale_in
        self.dim = dim

    def _params(self, dtype, device):
        key = (dtype, torch.device(device))
        if key not in self.weights:
            self.weights[key] = [(w.to(dtype=dtype, device=device), b.to(dtype=dtype, device=device))
                                 for w, b in self.weights[torch.float64]]
        return self.weights[key]

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.to(x.dtype).reshape(-1, 1)
        if self.scale_in:
            x = x / torch.sqrt(1 + t * t)
        h = torch.cat([x, torch.log1p(t).expand(x.shape[0], 1)], dim=1)
        layers = self._params(x.dtype, x.device)
        for k, (w, b) in enumerate(layers):
            h = torch.addmm(b, h, w)
            if k < len(layers) - 1:
                h = torch.nn.functional.silu(h)
        return h


MODELS = ("free", "mlp")


def make_net(kind: str, *, scale_in: bool = False):
    """``net(x, t)``: ``0.5 x`` ("free": the overhead rows) or the small MLP ("mlp")."""
    if kind == "free":
        return lambda x, t: 0.5 * x
    return MLP(scale_in=scale_in)


def large_batch(ctx, kind, adaptive=False):
    """The large batch: 65536 (8192 with --quick for the MLP and for adaptive solvers)."""
    return 8192 if (ctx.quick and (kind != "free" or adaptive)) else 65536


def size_str(shape):
    return str(tuple(shape)).replace(" ", "")


def missing(name, case, size, peer):
    return Case(case, size, lambda: None, [Baseline(peer, None, status=f"skipped: {name} not installed")])


class DeepMLP:
    """A 3-hidden-layer MLP denoiser ``net(x, sigma) -> x0`` (256 wide, SiLU, EDM input scaling
    ``x / sqrt(1 + sigma^2)``), fixed random weights, no autograd: the "mlp256" rows."""

    def __init__(self, dim: int = 2, hidden: int = 256, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        sizes = [dim + 1, hidden, hidden, hidden, dim]
        self.layers = [(torch.randn(a, b, generator=g) / math.sqrt(a), 0.1 * torch.randn(b, generator=g))
                       for a, b in zip(sizes[:-1], sizes[1:])]
        self._on = {}

    def __call__(self, x, sigma):
        key = (x.dtype, x.device)
        if key not in self._on:
            self._on[key] = [(w.to(x), b.to(x)) for w, b in self.layers]
        s = sigma.to(x.dtype).reshape(-1, 1)
        h = torch.cat([x * torch.rsqrt(1 + s * s), torch.log(s) / 4], dim=1)
        layers = self._on[key]
        for k, (w, b) in enumerate(layers):
            h = torch.addmm(b, h, w)
            if k < len(layers) - 1:
                h = torch.nn.functional.silu(h)
        return h


class ConvNet:
    """A 3-layer 3x3 convolutional denoiser ``net(x, sigma) -> x0`` on [B, C, H, W] (64 channels,
    SiLU, EDM input scaling), fixed random weights, no autograd: the "conv" rows."""

    def __init__(self, channels: int = 4, hidden: int = 64, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        sizes = [channels, hidden, hidden, channels]
        self.layers = [(torch.randn(b, a, 3, 3, generator=g) / math.sqrt(9 * a), 0.1 * torch.randn(b, generator=g))
                       for a, b in zip(sizes[:-1], sizes[1:])]
        self._on = {}

    def __call__(self, x, sigma):
        key = (x.dtype, x.device)
        if key not in self._on:
            self._on[key] = [(w.to(x), b.to(x)) for w, b in self.layers]
        h = x * torch.rsqrt(1 + sigma.to(x.dtype) ** 2).reshape(-1, 1, 1, 1)
        layers = self._on[key]
        for k, (w, b) in enumerate(layers):
            h = torch.nn.functional.conv2d(h, w, b, padding=1)
            if k < len(layers) - 1:
                h = torch.nn.functional.silu(h)
        return h


def equal_work(make_gf, make_peer, net, tol, reference=None, *, how=None):
    """The agreement check of a solve: both on the same inputs with counting nets (NFE). With a
    ``reference`` solution (different methods of equal order, adaptive methods) the outputs must
    agree to within the sum of their errors against it plus ``tol``, and each error must stay
    below 5% of the solution's scale (both solve the same problem)."""
    def check():
        ours_net, peer_net = Counted(net), Counted(net)
        ours = make_gf(ours_net)()
        theirs = make_peer(peer_net)()
        extra = {"nfe_genflow": ours_net.calls, "nfe_peer": peer_net.calls}
        if reference is None:
            return agree(ours, theirs, tol, **extra)
        ref = reference().to(ours.device)
        e_ours = (ours.double() - ref).abs().max().item()
        e_peer = (theirs.double() - ref).abs().max().item()
        extra.update(err_genflow=e_ours, err_peer=e_peer)
        a = agree(ours, theirs, tol, **extra)
        bound = (e_ours + e_peer) / a.scale + tol
        a.tol = bound if max(e_ours, e_peer) <= 0.05 * a.scale else 0.0
        a.how = how or ("max |genflow - peer| <= (their errors vs a float64 reference) + tol, relative to max |peer|; "
                        "each error < 5% of it")
        return a
    return check


def cached(fn):
    memo = []

    def cached():
        if not memo:
            memo.append(fn())
        return memo[0]
    return cached
