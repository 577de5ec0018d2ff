"""A bounded LRU cache of ``fp8_linear`` plans, keyed by the layout signature of a call.

The signature holds everything a plan depends on: per operand its dtype, shape, strides, device and
data-pointer alignment (below 16 bytes also the storage offset, which the copy reasons name), whether
``input_scale`` is absent, a number or a tensor, and the arguments the scaling scheme is derived from.
Computing it reads tensor metadata only (no values, no device work), so a cached call does no other
Python-side checks before it runs.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Hashable, NamedTuple, Optional

from torch import Tensor

from harness.quant.fp8.config import KERNEL_ALIGNMENT

__all__ = ["PlanCache", "CacheInfo", "plan_key"]

_LOW_BITS = KERNEL_ALIGNMENT - 1


def _sig(t: Tensor) -> tuple:
    low = t.data_ptr() & _LOW_BITS  # meta tensors: storage offset x itemsize, as Geom.of reads them
    return (t.dtype, t.shape, t.stride(), t.device, (low, t.storage_offset()) if low else 0)


def plan_key(
    input: Any, weight: Any, weight_scale: Any, input_scale: Any, bias: Any, args: Hashable
) -> Optional[tuple]:
    """The layout signature of one call, or None when an operand is not a plain tensor (not cached)."""
    try:
        return (
            args,
            _sig(input),
            _sig(weight),
            None if weight_scale is None else _sig(weight_scale),
            None
            if input_scale is None
            else (_sig(input_scale) if isinstance(input_scale, Tensor) else type(input_scale)),
            None if bias is None else _sig(bias),
        )
    except (AttributeError, TypeError, RuntimeError):  # not tensors, or tensors without storage
        return None


class CacheInfo(NamedTuple):
    hits: int
    misses: int
    maxsize: int
    currsize: int


class PlanCache:
    """Least-recently-used map from a layout signature to its plan; at most ``maxsize`` entries."""

    def __init__(self, maxsize: int = 256) -> None:
        if not isinstance(maxsize, int) or maxsize < 1:
            raise ValueError(f"maxsize={maxsize!r}; pass an int >= 1")
        self.maxsize = maxsize
        self._entries: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._hits = 0
        self._misses = 0

    def get(self, key: Hashable) -> Any:
        """The entry for ``key`` (now the most recently used), or None (counted as a miss)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self._misses += 1
                return None
            self._entries.move_to_end(key)
            self._hits += 1
            return entry

    def put(self, key: Hashable, entry: Any) -> None:
        """Store ``entry``, evicting the least recently used ones beyond ``maxsize``."""
        with self._lock:
            self._entries[key] = entry
            self._entries.move_to_end(key)
            while len(self._entries) > self.maxsize:
                self._entries.popitem(last=False)

    def info(self) -> CacheInfo:
        with self._lock:
            return CacheInfo(self._hits, self._misses, self.maxsize, len(self._entries))

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._hits = self._misses = 0
