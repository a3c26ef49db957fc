"""Time-conditional networks for training: an MLP for vectors and a small U-Net for images.

Both take ``net(x, t, labels=None)`` with ``x (Tensor[B, *D])``, ``t (Tensor[B])`` (or a number)
and optional class ``labels (Tensor[B], int64)``, where ``-1`` means "no label" (a learned null
embedding, for classifier-free guidance; the label dropout itself belongs to the objective).
Every layer acts on each sample separately (LayerNorm / GroupNorm, never BatchNorm), so a row
of the output depends on that row of the input alone, as genflow's likelihood code requires.

Time embedding: ``s = 1000 t`` (``time="linear"``, for ``t`` in [0, 1]) or ``s = 250 log t``
(``time="log"``, for EDM's ``t = sigma`` over decades, Karras et al. 2022's ``c_noise = ln(sigma)/4``
times 1000), then sinusoids ``[sin(s w_k), cos(s w_k)]`` with ``w_k = 10000^(-k/(half-1))``
(Vaswani et al. 2017, §3.5; Ho et al. 2020, Appendix B), then a two-layer SiLU MLP.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from genflow._checks import check_int

__all__ = ["MLP", "UNet", "time_embedding"]

TIME_MODES = ("linear", "log")


def time_embedding(t: torch.Tensor, dim: int, *, time: str = "linear") -> torch.Tensor:
    """Sinusoidal embedding of times: Tensor[B] -> Tensor[B, dim].

    ``emb = [sin(s w_0), ..., sin(s w_{h-1}), cos(s w_0), ..., cos(s w_{h-1})]`` with ``h = dim/2``,
    ``w_k = 10000^(-k/(h-1))`` and ``s = 1000 t`` (``time="linear"``) or ``s = 250 log t``
    (``time="log"``, ``t > 0``), in float64 for float64 ``t`` and float32 otherwise.
    Ho et al. 2020 (DDPM), Appendix B; Karras et al. 2022, Table 1.
    """
    if time not in TIME_MODES:
        raise ValueError(f"time must be one of {TIME_MODES}, got {time!r}")
    t = t if t.dtype == torch.float64 else t.to(torch.float32)
    s = 1000.0 * t if time == "linear" else 250.0 * torch.log(t)
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=t.dtype) / max(half - 1, 1))
    angles = s[:, None] * freqs[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


class _Conditioning(nn.Module):
    """Time (+ class) embedding shared by all blocks: ``c = MLP(emb(t)) + E[label]``."""

    def __init__(self, time_dim: int, out_dim: int, num_classes: Optional[int], time: str):
        super().__init__()
        if time_dim < 2 or time_dim % 2:
            raise ValueError(f"time_dim must be an even int >= 2, got {time_dim!r}")
        if time not in TIME_MODES:
            raise ValueError(f"time must be one of {TIME_MODES}, got {time!r}")
        self.time_dim, self.time, self.num_classes = time_dim, time, num_classes
        self.mlp = nn.Sequential(nn.Linear(time_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))
        # index num_classes is the learned "no label" embedding (labels == -1)
        self.label_emb = nn.Embedding(num_classes + 1, out_dim) if num_classes is not None else None

    def forward(self, t, batch: int, device, labels: Optional[torch.Tensor]) -> torch.Tensor:
        t = torch.as_tensor(t, device=device)
        if t.dim() == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"t must be a number or Tensor[{batch}], got shape {tuple(t.shape)}")
        weight = self.mlp[0].weight
        c = self.mlp(time_embedding(t.to(weight.device), self.time_dim, time=self.time).to(weight.dtype))
        if self.label_emb is None:
            if labels is not None:
                raise ValueError("labels given, but the network was built with num_classes=None")
            return c
        if labels is None:
            labels = torch.full((batch,), -1, dtype=torch.int64, device=device)
        if labels.dtype.is_floating_point or labels.shape != (batch,):
            raise ValueError(f"labels must be integers of shape [{batch}], got {labels.dtype} {tuple(labels.shape)}")
        if bool(((labels < -1) | (labels >= self.num_classes)).any()):
            raise ValueError(f"labels must be in [0, {self.num_classes}) or -1 (no label)")
        idx = torch.where(labels < 0, torch.full_like(labels, self.num_classes), labels)
        return c + self.label_emb(idx)


class _FiLMBlock(nn.Module):
    """``h + W2 SiLU(LN(W1 h) (1 + scale(c)) + shift(c))``: a residual block with FiLM conditioning
    (Perez et al. 2018, "FiLM", Eq. 1)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.film = nn.Linear(hidden, 2 * hidden)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(F.silu(c)).chunk(2, dim=1)
        return h + self.fc2(F.silu(self.norm(self.fc1(h)) * (1 + scale) + shift))


class MLP(nn.Module):
    """Time-conditional residual MLP for vectors: ``net(x, t, labels=None) -> Tensor[B, dim]``.

    ``h_0 = W_in x``; ``h_{k+1} = h_k + W2 SiLU(LN(W1 h_k) (1 + a_k(c)) + b_k(c))`` with the
    conditioning ``c = MLP(emb(t)) + E[label]`` (see :func:`time_embedding`); output
    ``W_out SiLU(h_L)``. FiLM conditioning (Perez et al. 2018) in every block.

    Args:
        dim (int): data dimension. hidden (int): width. layers (int): residual blocks.
        time_dim (int): sinusoidal embedding size (even). num_classes (int, optional): class
            conditioning (labels in [0, num_classes) or -1 for none).
        time (str): ``"linear"`` (t in [0, 1]) or ``"log"`` (t = sigma > 0, EDM).
    """

    def __init__(self, dim: int, hidden: int = 256, layers: int = 3, time_dim: int = 64,
                 num_classes: Optional[int] = None, *, time: str = "linear"):
        super().__init__()
        dim, hidden = check_int("dim", dim, low=1), check_int("hidden", hidden, low=1)
        layers = check_int("layers", layers, low=1)
        time_dim = check_int("time_dim", time_dim, low=2)
        if num_classes is not None:
            num_classes = check_int("num_classes", num_classes, low=1)
        self.dim = dim
        self.cond = _Conditioning(time_dim, hidden, num_classes, time)
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(_FiLMBlock(hidden) for _ in range(layers))
        self.out = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, t, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape [B, {self.dim}], got {tuple(x.shape)}")
        c = self.cond(t, x.shape[0], x.device, labels).to(x.dtype)
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, c)
        return self.out(F.silu(h))


def _groups(channels: int) -> int:
    return math.gcd(channels, 8)


class _ResBlock(nn.Module):
    """``skip(x) + conv2(SiLU(GN(conv1(SiLU(GN(x))) + W c)))`` (Ho et al. 2020, Appendix B)."""

    def __init__(self, cin: int, cout: int, cond_dim: int):
        super().__init__()
        self.norm1, self.norm2 = nn.GroupNorm(_groups(cin), cin), nn.GroupNorm(_groups(cout), cout)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.cond = nn.Linear(cond_dim, cout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.cond(F.silu(c))[:, :, None, None]
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class _Attention(nn.Module):
    """Single-head self-attention over the pixels of each image, with a residual connection."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.GroupNorm(_groups(channels), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, ch, hgt, wid = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, ch, hgt * wid).unbind(1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return x + self.proj(out.transpose(1, 2).reshape(b, ch, hgt, wid))


class UNet(nn.Module):
    """A small time-conditional U-Net for images: ``net(x, t, labels=None) -> Tensor[B, C, H, W]``.

    Levels ``base * mults[i]`` channels; per level ``blocks`` residual blocks (GroupNorm + SiLU,
    conditioning ``c = MLP(emb(t)) + E[label]`` added inside every block), then a stride-2
    convolution down; a middle of two residual blocks (with single-head self-attention between
    them when ``attention``); the way up mirrors it, concatenating the skip activations, with
    nearest-neighbour upsampling + convolution. Lim, "An Introduction to Generative Modeling with Flows and Diffusion Models", §6.5.1 (Ho et al. 2020's DDPM U-Net,
    scaled down).

    Args:
        channels (int): image channels. image_size (int): H = W, divisible by
            ``2^(len(mults) - 1)``. base (int): channels of the first level.
        mults (sequence of int): channel multipliers per level. num_classes (int, optional).
        blocks (int): residual blocks per level. attention (bool): self-attention in the middle.
        time (str): ``"linear"`` or ``"log"`` (see :func:`time_embedding`).
    """

    def __init__(self, channels: int = 1, image_size: int = 8, base: int = 32, mults: Sequence[int] = (1, 2),
                 num_classes: Optional[int] = None, *, blocks: int = 1, attention: bool = False,
                 time: str = "linear"):
        super().__init__()
        channels, image_size = check_int("channels", channels, low=1), check_int("image_size", image_size, low=1)
        base, blocks = check_int("base", base, low=1), check_int("blocks", blocks, low=1)
        mults = tuple(check_int(f"mults[{i}]", m, low=1) for i, m in enumerate(mults))
        if not mults:
            raise ValueError("mults must be a non-empty sequence of ints >= 1, got ()")
        if image_size % 2 ** (len(mults) - 1):
            raise ValueError(f"image_size must be divisible by 2^(len(mults) - 1) = {2 ** (len(mults) - 1)}, "
                             f"got {image_size}")
        if num_classes is not None:
            num_classes = check_int("num_classes", num_classes, low=1)
        self.channels, self.image_size = channels, image_size
        cond_dim = 4 * base
        self.cond = _Conditioning(base if base % 2 == 0 else base + 1, cond_dim, num_classes, time)
        self.inp = nn.Conv2d(channels, base, 3, padding=1)
        widths = [base * m for m in mults]
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        skips, ch = [base], base
        for i, w in enumerate(widths):
            for _ in range(blocks):
                self.down.append(_ResBlock(ch, w, cond_dim))
                ch = w
                skips.append(ch)
            if i + 1 < len(widths):
                self.downsample.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skips.append(ch)
        self.mid1, self.mid2 = _ResBlock(ch, ch, cond_dim), _ResBlock(ch, ch, cond_dim)
        self.attn = _Attention(ch) if attention else nn.Identity()
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for i, w in reversed(list(enumerate(widths))):
            for _ in range(blocks + 1):
                self.up.append(_ResBlock(ch + skips.pop(), w, cond_dim))
                ch = w
            if i > 0:
                self.upsample.append(nn.Conv2d(ch, ch, 3, padding=1))
        self.out_norm = nn.GroupNorm(_groups(ch), ch)
        self.out = nn.Conv2d(ch, channels, 3, padding=1)
        self.blocks, self.levels = blocks, len(widths)

    def forward(self, x: torch.Tensor, t, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels or x.shape[2] % 2 ** (self.levels - 1) \
                or x.shape[3] % 2 ** (self.levels - 1):
            raise ValueError(f"x must have shape [B, {self.channels}, H, W] with H, W divisible by "
                             f"{2 ** (self.levels - 1)}, got {tuple(x.shape)}")
        c = self.cond(t, x.shape[0], x.device, labels).to(x.dtype)
        h = self.inp(x)
        hs = [h]
        blocks = iter(self.down)
        for i in range(self.levels):
            for _ in range(self.blocks):
                h = next(blocks)(h, c)
                hs.append(h)
            if i + 1 < self.levels:
                h = self.downsample[i](h)
                hs.append(h)
        h = self.mid2(self.attn(self.mid1(h, c)), c)
        blocks = iter(self.up)
        for i in range(self.levels):
            for _ in range(self.blocks + 1):
                h = next(blocks)(torch.cat([h, hs.pop()], dim=1), c)
            if i + 1 < self.levels:
                h = self.upsample[i](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.out(F.silu(self.out_norm(h)))
