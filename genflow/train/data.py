"""Training data: 2D toy sets, Gaussian mixtures, scikit-learn's 8x8 digits and user data.

Every set is a :class:`Dataset`: a fixed tensor ``data (Tensor[N, *D])`` with optional integer
``labels (Tensor[N])``. The 2D toy sets and Gaussian mixtures also carry an infinite sampler
(``Dataset.sample(n, generator=...)`` draws fresh points), and ``load_dataset(...,
infinite=True)`` makes :meth:`Dataset.batch` (what the trainer calls) use it instead of
resampling the fixed draw. Everything is deterministic given ``seed`` / ``generator``.

The toy sets follow the usual benchmark shapes (FFJORD, Grathwohl et al. 2019, Appendix;
pinwheel from Johnson et al. 2016, "Composing graphical models with neural networks", §6);
``table2`` is the toy set of Bogensperger, "Introduction to Generative Modeling" (Table 2): 8 Gaussians with 250 points each, means at
radius ``4/sqrt(2)`` at angles ``k * 45`` degrees, covariance ``0.1 I``.
"""
from __future__ import annotations

import difflib
import math
import os
from typing import Callable, Optional, Tuple

import numpy as np
import torch

from genflow._checks import check_int
from genflow.mixtures import GaussianMixture

__all__ = ["Dataset", "TOY_SETS", "available_datasets", "load_dataset", "toy_sample"]

Sampler = Callable[[int, Optional[torch.Generator]], Tuple[torch.Tensor, Optional[torch.Tensor]]]

_RING_RADIUS = 4.0 / math.sqrt(2.0)


class Dataset:
    """A data set: ``data (Tensor[N, *D])``, optional ``labels (Tensor[N], int64)`` and a name.

    Args:
        data (Tensor[N, *D]): the samples (floating point).
        labels (Tensor[N], optional): integer class labels in ``[0, num_classes)``.
        name (str): a name for logs and plots.
        sampler (callable, optional): ``sampler(n, generator) -> (Tensor[n, *D], labels or None)``,
            an infinite source of fresh samples from the same law.
        infinite (bool): :meth:`batch` draws fresh samples from ``sampler`` instead of
            resampling ``data``.
        mixture (GaussianMixture, optional): the exact law, when the set is a Gaussian mixture.
    """

    def __init__(self, data: torch.Tensor, labels: Optional[torch.Tensor] = None, *, name: str = "data",
                 sampler: Optional[Sampler] = None, infinite: bool = False,
                 mixture: Optional[GaussianMixture] = None):
        if not isinstance(data, torch.Tensor) or not data.is_floating_point() or data.dim() < 2:
            raise ValueError(f"data must be a floating-point Tensor[N, *D] with N >= 1, got "
                             f"{type(data).__name__} {getattr(data, 'dtype', '')} {tuple(getattr(data, 'shape', ()))}")
        if data.shape[0] < 1:
            raise ValueError("data must hold at least one sample, got N = 0")
        bad = ~torch.isfinite(data.reshape(data.shape[0], -1)).all(1)
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise ValueError(f"data set {name!r} has non-finite values (NaN/Inf) in {int(bad.sum())} of "
                             f"{data.shape[0]} rows; the first is row {row}: {data[row].flatten()[:8].tolist()}")
        if labels is not None:
            labels = torch.as_tensor(labels)
            if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.shape != data.shape[:1]:
                raise ValueError(f"labels must be integers of shape [{data.shape[0]}], got "
                                 f"{labels.dtype} {tuple(labels.shape)}")
            if labels.min() < 0:
                raise ValueError(f"labels must be >= 0, got min {int(labels.min())}")
            labels = labels.to(torch.int64)
        if infinite and sampler is None:
            raise ValueError(f"infinite=True needs a sampler; data set {name!r} has none")
        self.data = data
        self.labels = labels
        self.name = name
        self.sampler = sampler
        self.infinite = bool(infinite)
        self.mixture = mixture

    @property
    def data_shape(self) -> Tuple[int, ...]:
        """The shape ``D`` of one sample."""
        return tuple(self.data.shape[1:])

    @property
    def num_classes(self) -> Optional[int]:
        """``max(labels) + 1``, or None without labels."""
        return None if self.labels is None else int(self.labels.max()) + 1

    def __len__(self) -> int:
        return self.data.shape[0]

    def __repr__(self) -> str:
        extra = f", num_classes={self.num_classes}" if self.labels is not None else ""
        return f"Dataset({self.name!r}, n={len(self)}, data_shape={self.data_shape}{extra}, infinite={self.infinite})"

    def sample(self, n: int, *, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``n`` fresh samples (Tensor[n, *D]) from the sampler, or drawn with replacement from ``data``."""
        return self.batch(n, generator=generator, fresh=True)[0]

    def batch(self, n: int, *, generator: Optional[torch.Generator] = None,
              fresh: Optional[bool] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """A batch ``(Tensor[n, *D], labels Tensor[n] or None)``.

        Fresh samples from the sampler when ``fresh`` (default: ``self.infinite``) and there is
        one; otherwise ``n`` rows of ``data`` drawn uniformly with replacement.
        """
        n = check_int("n", n, low=0)
        fresh = self.infinite if fresh is None else fresh
        if fresh and self.sampler is not None:
            x, labels = self.sampler(int(n), generator)
            return x.to(self.data.dtype), labels
        idx = torch.randint(len(self), (int(n),), generator=generator)
        return self.data[idx], None if self.labels is None else self.labels[idx]




def _normal(n: int, d: int, g) -> torch.Tensor:
    return torch.randn(n, d, generator=g, dtype=torch.float64)


def _uniform(n: int, g) -> torch.Tensor:
    return torch.rand(n, generator=g, dtype=torch.float64)


def _choice(n: int, k: int, g) -> torch.Tensor:
    return torch.randint(k, (n,), generator=g)


def _polar(r: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    return torch.stack([r * torch.cos(theta), r * torch.sin(theta)], dim=1)


def _ring_means(k: int = 8) -> torch.Tensor:
    """``k`` means at radius ``4/sqrt(2)`` and angles ``2 pi j / k``."""
    angles = torch.arange(k, dtype=torch.float64) * (2 * math.pi / k)
    return _polar(torch.full((k,), _RING_RADIUS, dtype=torch.float64), angles)


def _grid_means() -> torch.Tensor:
    """The 5x5 grid ``{-2, -1, 0, 1, 2}^2``."""
    axis = torch.arange(-2, 3, dtype=torch.float64)
    return torch.cartesian_prod(axis, axis)


def _mixture_sampler(means: torch.Tensor, std: float, *, balanced: bool = False) -> Sampler:
    """Isotropic mixture ``(1/K) sum_k N(mu_k, std^2 I)``; labels are the components.

    ``balanced``: exactly ``n / K`` points per component (``n`` must be a multiple of ``K``),
    ordered by component.
    """
    k = means.shape[0]

    def sample(n: int, g):
        if balanced:
            if n % k:
                raise ValueError(f"n must be a multiple of {k} for this balanced set, got {n}")
            labels = torch.arange(k).repeat_interleave(n // k)
        else:
            labels = _choice(n, k, g)
        return means[labels] + std * _normal(n, means.shape[1], g), labels
    return sample


def _moons(n: int, g):
    """Two interleaved half circles (outer ``(cos s, sin s)``, inner ``(1 - cos s, 1/2 - sin s)``,
    ``s ~ U[0, pi]``), noise std 0.1, centred and scaled by 2."""
    labels = _choice(n, 2, g)
    s = math.pi * _uniform(n, g)
    outer = torch.stack([torch.cos(s), torch.sin(s)], dim=1)
    inner = torch.stack([1 - torch.cos(s), 0.5 - torch.sin(s)], dim=1)
    x = torch.where(labels[:, None] == 0, outer, inner) + 0.1 * _normal(n, 2, g)
    return 2.0 * (x - torch.tensor([0.5, 0.25], dtype=torch.float64)), labels


def _circles(n: int, g):
    """Two concentric circles of radius 2 and 1, noise std 0.08."""
    labels = _choice(n, 2, g)
    r = torch.where(labels == 0, 2.0, 1.0).to(torch.float64)
    return _polar(r, 2 * math.pi * _uniform(n, g)) + 0.08 * _normal(n, 2, g), labels


def _swissroll(n: int, g):
    """The 2D Swiss roll ``s (cos s, sin s) / 5`` with ``s = 1.5 pi (1 + 2u)``, noise std 0.1."""
    s = 1.5 * math.pi * (1 + 2 * _uniform(n, g))
    return _polar(s, s) / 5.0 + 0.1 * _normal(n, 2, g), None


def _checkerboard(n: int, g):
    """Uniform on the 8 dark squares (side 2) of a 4x4 board on ``[-4, 4]^2``."""
    cells = torch.tensor([(i, j) for i in range(4) for j in range(4) if (i + j) % 2 == 0], dtype=torch.float64)
    labels = _choice(n, cells.shape[0], g)
    corner = 2.0 * cells[labels] - 4.0
    return corner + 2.0 * torch.rand(n, 2, generator=g, dtype=torch.float64), labels


def _pinwheel(n: int, g):
    """Five arms: ``z = (1 + 0.3 e1, 0.1 e2)`` rotated by ``2 pi k / 5 + 0.25 exp(z_1)``, times 2
    (Johnson et al. 2016, §6)."""
    labels = _choice(n, 5, g)
    z = _normal(n, 2, g) * torch.tensor([0.3, 0.1], dtype=torch.float64) + torch.tensor([1.0, 0.0], dtype=torch.float64)
    angle = 2 * math.pi * labels.to(torch.float64) / 5 + 0.25 * torch.exp(z[:, 0])
    c, s = torch.cos(angle), torch.sin(angle)
    return 2.0 * torch.stack([c * z[:, 0] - s * z[:, 1], s * z[:, 0] + c * z[:, 1]], dim=1), labels


def _spirals(n: int, g):
    """Two interleaved spirals ``s (cos(s + k pi), sin(s + k pi)) / 3`` with ``s = 3 pi sqrt(u)``,
    noise std 0.1."""
    labels = _choice(n, 2, g)
    s = 3 * math.pi * torch.sqrt(_uniform(n, g))
    return _polar(s, s + math.pi * labels.to(torch.float64)) / 3.0 + 0.1 * _normal(n, 2, g), labels


# name -> (sampler, default n, exact mixture or None)
TOY_SETS = {
    "8gaussians": (_mixture_sampler(_ring_means(), 0.5 / math.sqrt(2)), 10000,
                   GaussianMixture(_ring_means(), 0.5 / math.sqrt(2))),
    "25gaussians": (_mixture_sampler(_grid_means(), 0.1), 10000, GaussianMixture(_grid_means(), 0.1)),
    "moons": (_moons, 10000, None),
    "circles": (_circles, 10000, None),
    "swissroll": (_swissroll, 10000, None),
    "checkerboard": (_checkerboard, 10000, None),
    "pinwheel": (_pinwheel, 10000, None),
    "spirals": (_spirals, 10000, None),
    "table2": (_mixture_sampler(_ring_means(), math.sqrt(0.1)), 2000, GaussianMixture(_ring_means(), math.sqrt(0.1))),
}
# fixed draws that differ from the infinite sampler: table2 has exactly n/8 points per component
_FIXED_DRAW = {"table2": _mixture_sampler(_ring_means(), math.sqrt(0.1), balanced=True)}
_ALIASES = {"twomoons": "moons", "2spirals": "spirals", "eightgaussians": "8gaussians", "swiss": "swissroll"}
_NAMES = tuple(TOY_SETS) + ("digits",)


def available_datasets() -> Tuple[str, ...]:
    """The names ``load_dataset`` accepts."""
    return _NAMES


def toy_sample(name: str, n: int, *, generator: Optional[torch.Generator] = None,
               dtype: torch.dtype = torch.float32) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``n`` points (Tensor[n, 2]) and labels (Tensor[n] or None) of the toy set ``name``."""
    n = check_int("n", n, low=0)
    sampler = TOY_SETS[_canonical(name)][0]
    x, labels = sampler(int(n), generator)
    return x.to(dtype), labels


def _canonical(name: str) -> str:
    key = name.lower().replace("_", "").replace("-", "").replace(" ", "")
    key = _ALIASES.get(key, key)
    if key not in _NAMES:
        close = difflib.get_close_matches(key, _NAMES + tuple(_ALIASES), n=1)
        hint = f"; did you mean {_ALIASES.get(close[0], close[0])!r}?" if close else ""
        raise ValueError(f"unknown data set {name!r}{hint} Known: {', '.join(_NAMES)}, "
                         f"a GaussianMixture, a tensor, a numpy array or a .npy/.npz path")
    return key


def _digits(n: Optional[int], seed: int) -> Dataset:
    """scikit-learn's 8x8 digits (1797 images, 16 grey levels) scaled to [-1, 1]."""
    from sklearn.datasets import load_digits

    raw = load_digits()
    x = torch.as_tensor(raw.images, dtype=torch.float32).reshape(-1, 1, 8, 8) / 8.0 - 1.0
    labels = torch.as_tensor(raw.target, dtype=torch.int64)
    if n is not None:
        if n > x.shape[0]:
            raise ValueError(f"n must be <= {x.shape[0]} for digits, got {n}")
        idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
        x, labels = x[idx], labels[idx]
    return Dataset(x, labels, name="digits")


def _from_file(path: str) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as arrays:
            keys = list(arrays.keys())
            data_key = next((k for k in ("data", "x", "X") if k in keys), keys[0] if len(keys) == 1 else None)
            if data_key is None:
                raise ValueError(f"{path}: a .npz needs an array named 'data' or 'x' (or a single array), "
                                 f"got {keys}")
            label_key = next((k for k in ("labels", "y") if k in keys), None)
            return arrays[data_key], None if label_key is None else arrays[label_key]
    return np.load(path, allow_pickle=False), None


def load_dataset(source, *, n: Optional[int] = None, seed: int = 0, labels=None, infinite: bool = False,
                 dtype: torch.dtype = torch.float32, name: Optional[str] = None) -> Dataset:
    """A :class:`Dataset` from a name, a ``GaussianMixture``, a tensor, an array or a file.

    Args:
        source: a toy set name (see :func:`available_datasets`: ``8gaussians``, ``25gaussians``,
            ``moons``, ``circles``, ``swissroll``, ``checkerboard``, ``pinwheel``, ``spirals``,
            ``table2``), ``"digits"`` (scikit-learn's 8x8 digits, Tensor[1797, 1, 8, 8] in
            [-1, 1] with labels), a ``gf.GaussianMixture``, a Tensor[N, *D], a numpy array, a
            ``Dataset`` (returned as is) or a path to a ``.npy`` / ``.npz`` file (``.npz``:
            arrays ``data`` or ``x``, optional ``labels`` or ``y``; pickles are refused).
        n (int, optional): size of the fixed draw (toy sets: default 10000, table2 2000, a
            multiple of 8; mixtures: 10000; digits: a seeded subset). Not for user data.
        seed (int): seeds the fixed draw.
        labels: labels for user data (Tensor[N] or array).
        infinite (bool): batches are fresh samples (toy sets and mixtures only).
        dtype: floating dtype of the data (default float32).
        name (str, optional): overrides the set's name.

    Raises:
        ValueError: unknown names (with a did-you-mean suggestion), bad shapes or sizes.
    """
    n = None if n is None else check_int("n", n, low=1)
    seed = check_int("seed", seed)
    g = torch.Generator().manual_seed(int(seed))
    if isinstance(source, Dataset):
        return source
    if isinstance(source, GaussianMixture):
        mixture = source

        def sampler(k, gen):
            return mixture.sample(k, generator=gen, dtype=torch.float64), None
        x = mixture.sample(n or 10000, generator=g, dtype=dtype)
        return Dataset(x, None, name=name or "mixture", sampler=sampler, infinite=infinite, mixture=mixture)
    if isinstance(source, (str, os.PathLike)) and not (str(source).endswith((".npy", ".npz"))
                                                       or os.path.isfile(source)):
        key = _canonical(str(source))
        if key == "digits":
            if infinite:
                raise ValueError("infinite=True needs a sampler; 'digits' is a fixed set")
            ds = _digits(n, int(seed))
            ds.data = ds.data.to(dtype)
            ds.name = name or ds.name
            return ds
        sampler, default_n, mixture = TOY_SETS[key]
        x, lab = _FIXED_DRAW.get(key, sampler)(n or default_n, g)
        return Dataset(x.to(dtype), lab, name=name or key, sampler=sampler, infinite=infinite, mixture=mixture)
    if n is not None:
        raise ValueError("n applies to named sets and mixtures only; slice user data yourself")
    if infinite:
        raise ValueError("infinite=True needs a sampler; user data is a fixed set")
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise ValueError(f"data file {path!r} does not exist")
        array, file_labels = _from_file(path)
        labels = file_labels if labels is None else labels
        default_name = os.path.splitext(os.path.basename(path))[0]
    elif isinstance(source, np.ndarray):
        array, default_name = source, "array"
    elif isinstance(source, torch.Tensor):
        array, default_name = source, "tensor"
    else:
        raise TypeError(f"data must be a name, GaussianMixture, Dataset, Tensor, numpy array or .npy/.npz path, "
                        f"got {type(source).__name__}")
    x = torch.as_tensor(array)
    if not (x.is_floating_point() or x.dtype in (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)):
        raise ValueError(f"data must be numeric, got {x.dtype}")
    if x.dim() == 1:
        x = x[:, None]
    x = x.detach().to("cpu", dtype).contiguous()
    if labels is not None:
        labels = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels)
    return Dataset(x, labels, name=name or default_name)
