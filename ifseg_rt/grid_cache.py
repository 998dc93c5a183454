"""Per-token-grid values (the split graph's position tables, a model's :class:`~ifseg_rt.model.SegTables`) computed
once per grid and kept in an LRU bounded by bytes and by grids (``geometry.TABLE_CACHE_BYTES`` and
``TABLE_CACHE_GRIDS`` by default; the most recent grid is always kept). Concurrent first requests of one grid compute
it once and share one copy. A leaf module: the model and every engine use it."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Callable, List, Tuple

from .geometry import TABLE_CACHE_BYTES, TABLE_CACHE_GRIDS


def _nbytes(value: Any) -> int:
    """Bytes of a cached value: its ``nbytes``, or the sum over a tuple of arrays."""
    return value.nbytes if hasattr(value, "nbytes") else sum(a.nbytes for a in value)


class GridCache:
    """
    Arguments:
      compute: ``(h, w) -> value`` (an object with ``nbytes``, or a tuple of arrays), called once per grid held
      max_bytes (int): bytes kept; the least recently used grids are dropped beyond it
      max_grids (int): and at most this many grids
    """

    def __init__(self, compute: Callable[[int, int], Any], *, max_bytes: int = TABLE_CACHE_BYTES,
                 max_grids: int = TABLE_CACHE_GRIDS):
        if max_bytes < 0 or max_grids < 1:
            raise ValueError(f"max_bytes must be >= 0 and max_grids >= 1, got {max_bytes} and {max_grids}")
        self.compute = compute
        self.max_bytes = int(max_bytes)
        self.max_grids = int(max_grids)
        self._values: "OrderedDict[Tuple[int, int], Any]" = OrderedDict()
        self._lock = threading.Lock()
        self._compute_lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._values)

    def get(self, h: int, w: int) -> Any:
        key = (int(h), int(w))
        with self._lock:
            hit = self._values.get(key)
            if hit is not None:
                self._values.move_to_end(key)
                return hit
        with self._compute_lock:  # concurrent first requests of a grid: one computes, the others wait for it
            with self._lock:
                hit = self._values.get(key)
            if hit is None:
                hit = self.compute(*key)
                with self._lock:
                    self._values[key] = hit
                    while len(self._values) > 1 and (self.nbytes > self.max_bytes
                                                     or len(self._values) > self.max_grids):
                        self._values.popitem(last=False)
        return hit

    def clear(self) -> None:
        with self._lock:
            self._values.clear()

    @property
    def grids(self) -> List[Tuple[int, int]]:
        """The cached grids, least recently used first."""
        return list(self._values)

    @property
    def nbytes(self) -> int:
        """Bytes of the cached values."""
        return sum(_nbytes(v) for v in list(self._values.values()))
