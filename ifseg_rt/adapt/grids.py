"""Artificial word grids: the image-free training data of IFSeg (ifseg.md §5).

One fresh grid per training sample::

    U, V ~ uniform{1..S}, independently           (S = G = 32: rows U, columns V)
    g    ~ U x V, each cell uniform{0..M-1}       (with replacement; "unknown" = M is never drawn)
    tok  = nearest_resize(g, G x G)               (category ids of the word cells fed to the encoder)
    tgt  = nearest_resize(g, 16G x 16G)           (pixel labels of the loss), resized from g, NOT from tok

``nearest_resize`` is PyTorch's legacy "nearest" (the default of the torchvision ``Resize`` the original used):
per axis ``src = floor(dst * in / out)``. Because the two resizes are independent, ``tgt`` is not ``tok`` upsampled
x16 whenever U or V does not divide G (averaged over U = 1..32, 19.04 % of the pixel rows per axis differ).

numpy only; the sampler owns a seeded ``numpy.random.Generator`` whose state can be saved for exact resume.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Dict, Optional

import numpy as np

from ..geometry import PATCH  # the loss is computed at PATCH * G pixels per side (512 for G = 32)



def nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """Source index of every output position of a legacy-nearest resize ``n_in -> n_out``: ``floor(dst * in/out)``.

    The scale is the float ``in / out`` (as in PyTorch); for the power-of-two outputs used here (32, 512) it is
    exact, so the result equals the integer formula ``dst * in // out``.
    """
    if n_in < 1 or n_out < 1:
        raise ValueError(f"resize sizes must be >= 1, got {n_in} -> {n_out}")
    scale = n_in / n_out
    return np.minimum(np.floor(np.arange(n_out) * scale).astype(np.int64), n_in - 1)


def nearest_resize(grid: np.ndarray, size: int) -> np.ndarray:
    """Legacy-nearest resize of a ``UxV`` array to ``size x size`` (rows and columns independently)."""
    u, v = grid.shape
    return grid[nearest_indices(u, size)][:, nearest_indices(v, size)]


@dataclass
class WordGridBatch:
    """A batch of word grids (numpy int64)."""

    cells: np.ndarray  # BxGxG category ids of the word cells (``tok``)
    targets: np.ndarray  # BxTxT pixel labels, T = 16 * G (``tgt``)
    shapes: np.ndarray  # Bx2 the drawn (U, V)


class WordGridSampler:
    """Draws IFSeg word grids for M categories.

    Parameters
    ----------
    num_categories : M; cells take values 0..M-1
    grid : G, side of the token grid (``config.seg_grid``, 32 for OFA)
    target_size : side of the pixel-label map; default 16 * G (512)
    max_side : S, the largest initial grid side (default G, the paper's S = 32)
    seed : seed of the sampler's own ``numpy.random.Generator`` (PCG64)
    """

    def __init__(self, num_categories: int, *, grid: int = 32, target_size: Optional[int] = None,
                 max_side: Optional[int] = None, seed: int = 0):
        if num_categories < 1:
            raise ValueError(f"num_categories must be >= 1, got {num_categories}")
        if grid < 1:
            raise ValueError(f"grid must be >= 1, got {grid}")
        self.num_categories = int(num_categories)
        self.grid = int(grid)
        self.target_size = int(target_size) if target_size is not None else PATCH * self.grid
        self.max_side = int(max_side) if max_side is not None else self.grid
        if self.max_side < 1:
            raise ValueError(f"max_side must be >= 1, got {self.max_side}")
        self.rng = np.random.default_rng(seed)
        # resize tables for every possible side, built once
        self._tok_idx = {n: nearest_indices(n, self.grid) for n in range(1, self.max_side + 1)}
        self._tgt_idx = {n: nearest_indices(n, self.target_size) for n in range(1, self.max_side + 1)}

    def sample_grid(self) -> np.ndarray:
        """One ``UxV`` grid of category ids."""
        u, v = self.rng.integers(1, self.max_side + 1, size=2)
        return self.rng.integers(0, self.num_categories, size=(int(u), int(v)))

    def sample(self, batch_size: int) -> WordGridBatch:
        """``batch_size`` fresh grids with their token grids and pixel targets."""
        G, T = self.grid, self.target_size
        cells = np.empty((batch_size, G, G), dtype=np.int64)
        targets = np.empty((batch_size, T, T), dtype=np.int64)
        shapes = np.empty((batch_size, 2), dtype=np.int64)
        for b in range(batch_size):
            g = self.sample_grid()
            u, v = g.shape
            shapes[b] = (u, v)
            cells[b] = g[self._tok_idx[u]][:, self._tok_idx[v]]
            targets[b] = g[self._tgt_idx[u]][:, self._tgt_idx[v]]
        return WordGridBatch(cells=cells, targets=targets, shapes=shapes)

    # --- exact resume ----------------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """The generator state as JSON text (its 128-bit integers survive ``torch.load(weights_only=True)``)."""
        return {"bit_generator": json.dumps(self.rng.bit_generator.state)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.rng.bit_generator.state = json.loads(state["bit_generator"])


def mismatch_fraction(u: int, grid: int = 32, target_size: Optional[int] = None) -> float:
    """Fraction of pixel rows whose ``tgt`` grid row differs from the grid row of their token (for a side ``u``).

    Pixel row p reads grid row ``floor(p * u / T)``; its token row ``p // (T / G)`` reads ``floor((p // s) * u / G)``.
    """
    T = target_size if target_size is not None else PATCH * grid
    tgt = nearest_indices(u, T)
    tok = nearest_indices(u, grid)[np.arange(T) * grid // T]
    return float(np.mean(tgt != tok))
