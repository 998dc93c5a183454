"""The kNN post-processing settings (spec section 12) and their bounds: the one owner of the defaults.

Model directories (``ifseg.json`` field ``knn``), checkpoints, the exporter, ``eval`` and :class:`Segmenter` all read
and validate them through :class:`KnnSettings`. Torch-free.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, Mapping

import numpy as np

from ._cuda import MAX_L

DEFAULT_K = 3  # neighbours per cell, the cell itself included (the paper's K)
DEFAULT_ITERS = 25  # averaging steps (the paper's iterations)
DEFAULT_TEMPERATURE = 1.0  # softmax temperature before averaging
MAX_K = MAX_L + 1  # the CUDA kernel keeps up to 33 neighbours per cell (knn_kernel.cuh); far above any useful value
MAX_ITERS = 1000  # the averaging converges long before; a typo such as 10**9 would otherwise hang a request
MAX_TEMPERATURE = 1e4
MIN_TEMPERATURE = 1e-3  # sharper is the arg-max already; float32 logits / a denormal temperature become NaN
# How the CPU backend finds the neighbours (``ifseg_rt.knn.knn_average(..., screen=)``): "int16" screens candidates with
# 16-bit integer similarities and ranks them by their exact fp32 ones, "fp32" is the exact fp32 search, "auto" screens
# where the CPU has AMX-INT8 (else fp32). An execution choice, not a model setting: not in KnnSettings.
SCREENS = ("auto", "int16", "fp32")
DEFAULT_SCREEN = "auto"


@dataclass(frozen=True)
class KnnSettings:
    """How cell scores are post-processed before the resize to the original size.

    ``enabled``: softmax(logits / ``temperature``) averaged ``iters`` times over each cell's ``k`` nearest neighbours
    in ResNet feature space (``iters = 0``: the probabilities themselves). Disabled: the raw logits, the paper's plain
    prediction. An image with fewer than ``k`` cells uses all of its cells as neighbours.

    Raises ``ValueError`` naming the field for values of the wrong type or out of bounds.
    """

    enabled: bool = True
    k: int = DEFAULT_K
    iters: int = DEFAULT_ITERS
    temperature: float = DEFAULT_TEMPERATURE

    def __post_init__(self):
        if not isinstance(self.enabled, bool):
            raise ValueError(f"'knn.enabled' must be true or false, got {self.enabled!r}")
        for name, hi in (("k", MAX_K), ("iters", MAX_ITERS)):
            v = getattr(self, name)
            lo = 1 if name == "k" else 0
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral):
                raise ValueError(f"'knn.{name}' must be an integer, got {v!r} ({type(v).__name__})")
            if not lo <= v <= hi:
                raise ValueError(f"'knn.{name}' must be in [{lo}, {hi}], got {v}")
            object.__setattr__(self, name, int(v))  # numpy integers too, stored as int
        t = self.temperature
        try:
            ok = not isinstance(t, (bool, np.bool_)) and isinstance(t, numbers.Real) \
                and math.isfinite(float(t)) and MIN_TEMPERATURE <= float(t) <= MAX_TEMPERATURE
        except OverflowError:  # an int beyond float's range
            ok = False
        if not ok:
            raise ValueError(f"'knn.temperature' must be a number in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}], got "
                             f"{t!r}")
        object.__setattr__(self, "temperature", float(t))

    def k_for(self, cells: int) -> int:
        """Neighbours used for an image of ``cells`` cells: ``min(k, cells)``."""
        return max(1, min(self.k, int(cells)))

    def replace(self, **changes: Any) -> "KnnSettings":
        """A copy with the given fields changed (``None`` values keep the current field)."""
        kw = asdict(self)
        kw.update({k: v for k, v in changes.items() if v is not None})
        return KnnSettings(**kw)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "KnnSettings":
        """Parse a ``knn`` mapping; every field must be present, unknown fields are refused."""
        if not isinstance(d, Mapping):
            raise ValueError(f"'knn' must be an object, got {type(d).__name__}")
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in d]
        if missing:
            raise ValueError(f"missing field 'knn.{missing[0]}'")
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ValueError(f"unknown field 'knn.{unknown[0]}' (known: {', '.join(names)})")
        return cls(**{n: d[n] for n in names})
