"""The package's one cache helper: small bounded LRU caches keyed by values, never by ``id()``.

A key built by ``value_key`` holds the numbers a cached result depends on (floats, tensor
contents, a process's parameters through its ``cache_key``), so a result can only be found
again for equal inputs: a changed parameter or a modified grid misses, however the objects were
reused, and an evicted entry can never be confused with a new object at the same address.
"""
import threading
from collections import OrderedDict
from typing import Callable, Hashable

import numpy
import torch

__all__ = ["LRU", "tensor_key", "value_key"]


def tensor_key(t: torch.Tensor) -> tuple:
    """A hashable key of a tensor's values: dtype, shape and its bytes (copied to the host)."""
    host = t.detach()
    if host.device.type != "cpu":
        host = host.cpu()
    return ("tensor", str(host.dtype), tuple(host.shape), host.contiguous().numpy().tobytes())


def value_key(value) -> Hashable:
    """A hashable key of ``value`` built from what it holds: numbers and strings as themselves
    (NumPy and 0-d tensor numbers as Python ones), tensors and arrays by their contents,
    sequences element by element, objects with a ``cache_key()`` method (processes) by it, and
    types and functions by themselves (their identity is their value)."""
    if value is None or isinstance(value, (bool, int, float, str, bytes, type)):
        return value
    if isinstance(value, torch.Tensor):
        return tensor_key(value)
    if isinstance(value, numpy.ndarray):
        return tensor_key(torch.from_numpy(value))
    if isinstance(value, numpy.generic):
        return value.item()
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, (tuple, list)):
        return (type(value).__name__,) + tuple(value_key(v) for v in value)
    if isinstance(value, dict):
        return ("dict",) + tuple(sorted((k, value_key(v)) for k, v in value.items()))
    method = getattr(value, "cache_key", None)
    if callable(method):
        return method()
    if callable(value):
        return value
    raise TypeError(f"no value key for {type(value).__name__} {value!r}: give it a cache_key() method")


class LRU:
    """A bounded least-recently-used mapping (thread-safe).

    Args:
        maxsize: the number of entries kept; the least recently used one is dropped first.
    """

    def __init__(self, maxsize: int):
        if isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 1:
            raise ValueError(f"maxsize must be an int >= 1, got {maxsize!r}")
        self.maxsize = maxsize
        self._data = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key, default=None):
        """The value stored under ``key`` (now the most recently used), or ``default``."""
        with self._lock:
            try:
                self._data.move_to_end(key)
            except KeyError:
                return default
            return self._data[key]

    def put(self, key, value):
        """Store ``value`` under ``key``, dropping the least recently used entry when full."""
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.maxsize:
                self._data.popitem(last=False)
        return value

    def get_or_compute(self, key, compute: Callable):
        """The value under ``key``, computing and storing ``compute()`` on a miss."""
        hit = self.get(key, _MISSING)
        return self.put(key, compute()) if hit is _MISSING else hit

    def clear(self) -> None:
        with self._lock:
            self._data.clear()


_MISSING = object()
