"""The per-grid position tables of the split graph, computed once per token grid and kept in an LRU bounded by
``geometry.TABLE_CACHE_BYTES`` and ``TABLE_CACHE_GRIDS`` (the most recent grid is always kept). Concurrent first
requests of one grid compute it once and share one copy. Used by every engine that runs ``tables.onnx``."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, List, Tuple

import numpy as np

from ...geometry import TABLE_CACHE_BYTES, TABLE_CACHE_GRIDS

Tables = Tuple[np.ndarray, ...]


class GridTableCache:
    """
    Arguments:
      compute: ``(h, w) -> tables`` (numpy arrays), called once per grid held
      max_bytes, max_grids: the bounds (the least recently used grids are dropped beyond either)
    """

    def __init__(self, compute: Callable[[int, int], Tables], *, max_bytes: int = TABLE_CACHE_BYTES,
                 max_grids: int = TABLE_CACHE_GRIDS):
        self.compute = compute
        self.max_bytes = int(max_bytes)
        self.max_grids = int(max_grids)
        self._tables: "OrderedDict[Tuple[int, int], Tables]" = OrderedDict()
        self._lock = threading.Lock()
        self._compute_lock = threading.Lock()

    def get(self, h: int, w: int) -> Tables:
        key = (int(h), int(w))
        with self._lock:
            hit = self._tables.get(key)
            if hit is not None:
                self._tables.move_to_end(key)
                return hit
        with self._compute_lock:  # concurrent first requests of a grid: one computes, the others wait for it
            with self._lock:
                hit = self._tables.get(key)
            if hit is None:
                hit = tuple(self.compute(*key))
                with self._lock:
                    self._tables[key] = hit
                    while len(self._tables) > 1 and (self.nbytes > self.max_bytes
                                                     or len(self._tables) > self.max_grids):
                        self._tables.popitem(last=False)
        return hit

    @property
    def grids(self) -> List[Tuple[int, int]]:
        """The cached grids, least recently used first."""
        return list(self._tables)

    @property
    def nbytes(self) -> int:
        """Bytes of the cached tables."""
        return sum(a.nbytes for t in list(self._tables.values()) for a in t)
