"""The image geometry every layer shares (a leaf module: no imports), so that the model, the exporter and the
torch-free runtime read one definition: OFA's normalisation and the ResNet's output stride."""

from __future__ import annotations

from typing import Tuple

MEAN = (0.5, 0.5, 0.5)  # OFA/IFSeg normalisation (not ImageNet)
STD = (0.5, 0.5, 0.5)
PATCH = 16  # ResNet output stride: one token per PATCH x PATCH px cell; also the smallest usable image side
TABLE_CACHE_BYTES = 64 * 1024 ** 2  # per-grid position tables a backend keeps (O(S) each; the latest grid always) ...
TABLE_CACHE_GRIDS = 4  # ... of at most this many grids: photos rarely repeat a grid beyond the few common sizes


def token_grid(height: int, width: int) -> Tuple[int, int]:
    """The (h, w) token grid of an ``height x width`` network input: ``ceil(H / PATCH), ceil(W / PATCH)``."""
    return -(-int(height) // PATCH), -(-int(width) // PATCH)
