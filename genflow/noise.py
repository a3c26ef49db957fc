"""Noise sources for samplers.

A sampler asks its source for noise once per draw. ``PhiloxNoise`` hands the fused op a seed
and a fresh stream offset, so the noise is made in-kernel (DESIGN.md §2): offset 0 is the
prior sample ``x_T`` and every later draw takes the next offset. With per-sample seeds each
sample owns its stream, so a sample's noise never depends on the batch it was drawn in.
``SuppliedNoise`` calls a user function instead (k-diffusion's ``noise_sampler`` style).
``BrownianTreeNoise`` draws every increment from one Brownian path ``W(sigma)`` (a Brownian
bridge tree over Philox streams), so a seed gives nearly the same sample at any step count.
"""
import math
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from genflow._checks import did_you_mean

__all__ = ["BrownianTreeNoise", "NOISE_KINDS", "PhiloxNoise", "SuppliedNoise", "generator_seed", "mix_keys", "noise_source"]

NOISE_KINDS = ("philox", "brownian_tree")

_SEED_LIMIT = 2 ** 63 - 1


class PhiloxNoise:
    """In-kernel Philox4x32-10 noise keyed by ``(seed, offset)``; ``seed`` is an int or [B] ints."""

    def __init__(self, seed: Union[int, torch.Tensor]):
        self.seed = seed
        self.offset = 0

    def draw(self, like: torch.Tensor, sigma_from=None, sigma_to=None) -> dict:
        """Keyword arguments for ``fused_update`` that add this draw's noise."""
        self.offset += 1
        return {"seed": self.seed, "offset": self.offset}

    def prior(self, shape, dtype, device) -> torch.Tensor:
        """Standard normal noise of ``shape`` from offset 0 (the prior sample)."""
        from genflow.ops import randn

        return randn(shape, seed=self.seed, offset=0, dtype=dtype, device=device)


class SuppliedNoise:
    """Noise from ``fn(sigma_from, sigma_to) -> Tensor`` (k-diffusion's ``noise_sampler``)."""

    def __init__(self, fn: Callable, generator: Optional[torch.Generator] = None):
        self.fn = fn
        self.generator = generator

    def draw(self, like: torch.Tensor, sigma_from=None, sigma_to=None) -> dict:
        noise = self.fn(sigma_from, sigma_to)
        if not isinstance(noise, torch.Tensor) or noise.shape != like.shape:
            raise ValueError(f"noise_sampler must return a tensor of shape {tuple(like.shape)}")
        return {"noise": noise.to(like.dtype)}

    def prior(self, shape, dtype, device) -> torch.Tensor:
        return torch.randn(shape, dtype=dtype, device=device, generator=self.generator)


_U64 = np.uint64
_TOP = 0                     # node id of the endpoint W(sigma_max)
_FINAL = np.uint64(1 << 63)  # flag: the final bridge draw below a leaf (leaf id | _FINAL)
_BATCH_TAG = 0xD1B54A32D192ED03  # keys a per-sample seed (distinct from sample indices 0..B-1)


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's mixing function (Steele et al. 2014) on uint64 arrays (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = z + _U64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
        return z ^ (z >> _U64(31))


def mix_keys(a: np.ndarray, b) -> np.ndarray:
    """A 64-bit key from two 64-bit words (uint64 arrays, broadcast)."""
    return _splitmix64(a ^ _splitmix64(np.asarray(b, dtype=_U64)))


class BrownianTreeNoise(PhiloxNoise):
    """Increments of one Brownian path ``W(sigma)`` on ``[sigma_min, sigma_max]``, per sample.

    ``draw(like, sigma, sigma_next)`` returns ``(W(sigma_next) - W(sigma)) / sqrt(|sigma_next - sigma|)``,
    standard normal like the other sources, but every draw is an increment of the same path, so
    the same seed gives nearly the same sample whatever the step count or step sizes (as
    k-diffusion's ``BrownianTreeNoiseSampler``, here without torchsde and on genflow's Philox
    stream). The path is indexed by ``sigma``, which every process increases with ``t``; a time
    change of a Brownian motion is again a valid driving noise for the reverse SDE.

    The tree (the virtual Brownian tree of Li et al. 2020, "Scalable Gradients for Stochastic
    Differential Equations", §4): ``W(sigma_min) = 0`` and ``W(sigma_max) = sqrt(sigma_max - sigma_min) z_0``;
    node ``n`` (heap numbering, root 1, children ``2n``, ``2n+1``) covering ``[l, r]`` sets its
    midpoint by the Brownian bridge ``W(m) = (W(l) + W(r)) / 2 + sqrt(r - l) / 2 z_n``. A query
    bisects ``depth = ceil(log2((sigma_max - sigma_min) / tol))`` levels down to a leaf of width
    ``<= tol`` and ends with the bridge draw ``W(s) = W(l) + (s - l)/(r - l) (W(r) - W(l)) +
    sqrt((s - l)(r - s)/(r - l)) z_leaf'``. Every ``z`` is a Philox stream (``genflow.ops.randn``'s,
    generated inside the fused kernel) keyed by a 64-bit hash of (the sample's seed, the node id),
    so ``W`` at a time never depends on which other times were queried, nor on the batch when
    seeds are per sample. (A per-node stream *offset* would need one offset per sample, which the
    kernel does not take: samples with their own times sit at different nodes.)

    A draw is ``W(sigma_next) - W(sigma)`` written as one linear combination of node normals:
    the path coefficients are float64 on the host (shared nodes merge, so nothing cancels in the
    state dtype), then one fused pass per node with a nonzero coefficient (at most
    ``2 (depth + 2)``, about 50 for EDM's ``[0, 80]`` at ``tol = 1e-6``). Increments over
    intervals shorter than ``tol`` are not Brownian (both ends share a leaf's bridge draw): keep
    ``tol`` well below the smallest step in sigma.

    Args:
        seed: an int (sample ``b`` gets the path keyed by ``(seed, b)``) or B per-sample seeds
            (a sequence or int64 tensor; sample ``b``'s path depends on ``seed[b]`` alone).
        sigma_max: the top of the interval (``gf.sample`` uses ``sigma(T)`` of the process).
        sigma_min: the bottom, where ``W = 0`` (default 0).
        tol: leaf width (absolute, in sigma; default 1e-6 as torchsde's ``BrownianTree``).

    ``prior`` is ``PhiloxNoise``'s (offset 0 of ``seed``), so ``x_T`` is the same for both kinds.
    """

    def __init__(self, seed: Union[int, torch.Tensor], sigma_max: float, *, sigma_min: float = 0.0,
                 tol: float = 1e-6):
        if not isinstance(seed, int):
            seed = torch.as_tensor(seed, dtype=torch.int64).reshape(-1)
        super().__init__(seed)
        self.sigma_min, self.sigma_max, self.tol = float(sigma_min), float(sigma_max), float(tol)
        if not (math.isfinite(self.sigma_min) and math.isfinite(self.sigma_max) and self.sigma_max > self.sigma_min):
            raise ValueError(f"need finite sigma_min < sigma_max, got [{sigma_min}, {sigma_max}]")
        if not (math.isfinite(self.tol) and self.tol > 0):
            raise ValueError(f"tol must be a finite number > 0, got {tol}")
        self.depth = max(0, math.ceil(math.log2((self.sigma_max - self.sigma_min) / self.tol)))
        if self.depth > 60:
            raise ValueError(f"tol={tol} needs {self.depth} tree levels on [{sigma_min}, {sigma_max}] (at most 60)")
        self._bases = None  # uint64 [B]: the per-sample root keys

    def __repr__(self):
        return f"BrownianTreeNoise(sigma_min={self.sigma_min}, sigma_max={self.sigma_max}, tol={self.tol})"

    def _sample_keys(self, batch: int) -> np.ndarray:
        if self._bases is None or self._bases.shape[0] != batch:
            if isinstance(self.seed, torch.Tensor):
                if self.seed.numel() != batch:
                    raise ValueError(f"{self.seed.numel()} per-sample seeds for a batch of {batch}")
                seeds = self.seed.detach().cpu().reshape(-1).numpy().astype(np.int64).view(_U64)
                self._bases = mix_keys(seeds, _BATCH_TAG)
            else:
                seed = np.array([int(self.seed) % 2 ** 64], dtype=_U64)
                self._bases = mix_keys(seed, np.arange(batch, dtype=_U64))
        return self._bases

    def _paths(self, s: np.ndarray):
        """``W(s_i) = sum_j coef[i, j] z(node[i, j])`` for query times ``s`` (float64 [N]).

        Column 0 is the top endpoint, column ``1 + k`` the node bisected at level ``k``, the last
        column the leaf's final bridge draw. Unrolling the bridge recursion gives the Levy-Ciesielski
        form: node ``[l, r]``'s normal enters ``W(s)`` with weight ``sqrt(r - l)/2`` times the tent
        that is 1 at the midpoint and 0 outside ``[l, r]`` (so only the nodes on the path to
        ``s`` count), the top one with ``(s - sigma_min)/sqrt(sigma_max - sigma_min)``.
        Returns (coef float64 [N, depth+2], node uint64 [N, depth+2]).
        """
        n, depth = s.shape[0], self.depth
        lo, hi = np.full(n, self.sigma_min), np.full(n, self.sigma_max)
        coef = np.empty((n, depth + 2))
        nodes = np.full((n, depth + 2), _TOP, dtype=_U64)
        coef[:, 0] = (s - self.sigma_min) / math.sqrt(self.sigma_max - self.sigma_min)
        node = np.ones(n, dtype=_U64)  # the root
        for k in range(depth):
            half = 0.5 * (hi - lo)
            mid = lo + half
            coef[:, 1 + k] = np.sqrt(0.5 * half) * np.clip(1.0 - np.abs(s - mid) / half, 0.0, None)
            nodes[:, 1 + k] = node
            left = s < mid
            hi, lo = np.where(left, mid, hi), np.where(left, lo, mid)
            node = 2 * node + (~left).astype(_U64)
        coef[:, -1] = np.sqrt(np.clip((s - lo) * (hi - s) / (hi - lo), 0.0, None))
        nodes[:, -1] = node | _FINAL
        return coef, nodes

    def _times(self, sigma, batch: int):
        """Query times as float64 numpy: [1] for a scalar, [B] per sample; checked and clamped."""
        s = (sigma.detach().to("cpu", torch.float64).reshape(-1).numpy() if isinstance(sigma, torch.Tensor)
             else np.array([float(sigma)]))
        if s.shape[0] not in (1, batch):
            raise ValueError(f"sigma must be a scalar or have {batch} values (one per sample), got {s.shape[0]}")
        slack = 1e-9 * (self.sigma_max - self.sigma_min)
        if not np.all((s >= self.sigma_min - slack) & (s <= self.sigma_max + slack)):
            raise ValueError(f"BrownianTreeNoise is defined on sigma in [{self.sigma_min}, {self.sigma_max}], "
                             f"got {s.min()}..{s.max()}")
        return np.clip(s, self.sigma_min, self.sigma_max)

    def _combine(self, like: torch.Tensor, coef: np.ndarray, nodes: np.ndarray) -> torch.Tensor:
        """``sum_j coef[:, j] z(nodes[:, j])`` shaped like ``like`` (coef/nodes [1 or B, J])."""
        from genflow.ops.fused_update import fused_update_unchecked, use_kernel

        batch = like.shape[0]
        acc_dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        acc = torch.zeros(like.shape, dtype=acc_dtype, device=like.device)
        used = np.any(coef != 0.0, axis=0)
        if not used.any():
            return acc.to(like.dtype)
        keys = mix_keys(self._sample_keys(batch)[:, None], nodes[:, used])  # [B, J']
        keys = torch.from_numpy(np.ascontiguousarray(keys.T).view(np.int64)).to(like.device)
        coef = coef[:, used]
        per_sample = coef.shape[0] > 1
        scales = torch.from_numpy(np.ascontiguousarray(coef.T)) if per_sample else coef[0].tolist()
        kernel = use_kernel("auto", like.device)
        for j in range(keys.shape[0]):
            fused_update_unchecked(acc, [], [1.0, scales[j]], kernel=kernel, seed=keys[j], offset=0, out=acc)
        return acc.to(like.dtype)

    def value(self, like: torch.Tensor, sigma) -> torch.Tensor:
        """``W(sigma)`` shaped like ``like`` (``sigma``: a float or [B] per-sample values)."""
        s = self._times(sigma, like.shape[0])
        coef, nodes = self._paths(s)
        return self._combine(like, coef, nodes)

    def increment(self, like: torch.Tensor, sigma_from, sigma_to) -> torch.Tensor:
        """``W(sigma_to) - W(sigma_from)`` shaped like ``like`` (floats or [B] per-sample values)."""
        return self._increment(like, sigma_from, sigma_to, normalise=False)

    def _increment(self, like, sigma_from, sigma_to, normalise: bool):
        batch = like.shape[0]
        s0, s1 = self._times(sigma_from, batch), self._times(sigma_to, batch)
        if s0.shape != s1.shape:
            s0, s1 = np.broadcast_arrays(s0, s1)
        n = s0.shape[0]
        coef, nodes = self._paths(np.concatenate([s0, s1]))
        c0, c1, n0, n1 = coef[:n], coef[n:], nodes[:n], nodes[n:]
        shared = n0 == n1  # the two paths run through the same nodes down to where they split
        c1 = np.where(shared, c1 - c0, c1)
        c0 = np.where(shared, 0.0, -c0)
        coef, nodes = np.concatenate([c1, c0], axis=1), np.concatenate([n1, n0], axis=1)
        if normalise:
            gap = np.abs(s1 - s0)
            coef = coef * np.where(gap > 0, 1.0 / np.sqrt(np.where(gap > 0, gap, 1.0)), 0.0)[:, None]
        return self._combine(like, coef, nodes)

    def draw(self, like: torch.Tensor, sigma_from=None, sigma_to=None) -> dict:
        """``{"noise": (W(sigma_to) - W(sigma_from)) / sqrt(|sigma_to - sigma_from|)}`` (zero where
        the two are equal); floats or [B] per-sample values."""
        if sigma_from is None or sigma_to is None:
            raise ValueError("BrownianTreeNoise.draw needs the step's sigma_from and sigma_to")
        return {"noise": self._increment(like, sigma_from, sigma_to, normalise=True)}


def generator_seed(generator, batch: int):
    """An int seed or an int64 [B] tensor of per-sample seeds from ``generator=`` (``gf.sample``,
    ``gf.solve``): None (a fresh seed from torch's global RNG), an int, ``batch`` per-sample seeds
    or a ``torch.Generator`` (one seed drawn from it)."""
    if generator is None:
        return int(torch.randint(0, _SEED_LIMIT, ()).item())
    if isinstance(generator, torch.Generator):
        return int(torch.randint(0, _SEED_LIMIT, (), generator=generator).item())
    if isinstance(generator, bool):
        raise TypeError("generator must be an int seed, a sequence of per-sample seeds or a torch.Generator, got bool")
    if isinstance(generator, np.integer) or (isinstance(generator, torch.Tensor) and generator.dim() == 0
                                             and not generator.dtype.is_floating_point and not generator.is_complex()
                                             and generator.dtype != torch.bool):
        generator = int(generator)  # a NumPy or 0-d tensor integer seed
    if isinstance(generator, int):
        if not 0 <= generator <= _SEED_LIMIT:
            raise ValueError(f"generator seed must be in [0, 2**63 - 1], got {generator}")
        return generator
    if isinstance(generator, (Sequence, torch.Tensor)) and not isinstance(generator, str):
        seeds = torch.as_tensor(generator)
        if seeds.dtype.is_floating_point or seeds.dtype == torch.bool or seeds.shape != (batch,):
            raise ValueError(f"generator: per-sample seeds must be {batch} integers (one per sample), "
                             f"got {seeds.dtype} {tuple(seeds.shape)}")
        if (seeds < 0).any():
            raise ValueError(f"generator: per-sample seeds must be non-negative, got {int(seeds.min())}")
        return seeds.to(torch.int64)
    raise TypeError(f"generator must be None, an int seed, per-sample seeds or a torch.Generator, got {type(generator).__name__}")




def noise_source(generator, batch: int, noise_sampler: Optional[Callable] = None, *,
                 noise=None, sigma_max: Optional[float] = None):
    """Build the noise source for ``gf.sample(generator=..., noise=..., noise_sampler=...)``.

    ``generator`` may be None (a fresh seed from torch's global RNG), an int seed, a sequence
    or int64 tensor of ``batch`` per-sample seeds, or a ``torch.Generator`` (one seed is drawn
    from it). ``noise`` is ``"philox"`` (or None: independent in-kernel draws), ``"brownian_tree"``
    (increments of one Brownian path on ``[0, sigma_max]``) or a noise source object (used as
    is; ``generator`` is then ignored). ``noise_sampler`` overrides the in-kernel noise.
    """
    if noise_sampler is not None:
        if not callable(noise_sampler):
            raise TypeError("noise_sampler must be callable")
        if noise not in (None, "philox"):
            raise ValueError(f"noise_sampler supplies the noise itself; leave noise='philox', got noise={noise!r}")
        return SuppliedNoise(noise_sampler, generator if isinstance(generator, torch.Generator) else None)
    if noise is None:
        noise = "philox"
    if not isinstance(noise, str):
        if callable(getattr(noise, "draw", None)) and callable(getattr(noise, "prior", None)):
            return noise
        raise TypeError(f"noise must be one of {NOISE_KINDS} or a noise source (with draw and prior), "
                        f"got {type(noise).__name__}")
    if noise == "philox":
        return PhiloxNoise(generator_seed(generator, batch))
    if noise == "brownian_tree":
        if sigma_max is None:
            raise ValueError("noise='brownian_tree' needs sigma_max (the top of the tree's interval)")
        return BrownianTreeNoise(generator_seed(generator, batch), sigma_max)
    hint = did_you_mean(noise, NOISE_KINDS)
    raise ValueError(f"noise must be one of {NOISE_KINDS} or a noise source, got {noise!r}{hint}")
