"""Resize + arg-max of cell scores with torch (GPU path of :class:`Segmenter`); imported only when torch is used."""

from __future__ import annotations

from typing import Tuple

ROW_CHUNK = 256  # output rows per step: bounds memory to M x 256 x W0 floats


def _interp(n_in: int, n_out: int, device):
    """``n_out x n_in`` bilinear weights, align_corners=False (torch semantics), on ``device``."""
    import torch

    src = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5).clamp_(min=0)
    i0 = src.floor().long().clamp_(max=n_in - 1)
    i1 = (i0 + 1).clamp_(max=n_in - 1)
    lam = src - i0
    r = torch.zeros(n_out, n_in, dtype=torch.float64)
    r.index_put_((torch.arange(n_out), i0), 1 - lam, accumulate=True)
    r.index_put_((torch.arange(n_out), i1), lam, accumulate=True)
    return r.float().to(device)


def labels_from_scores_torch(scores, grid: Tuple[int, int], size: Tuple[int, int]):
    """``NxM`` scores (any device) -> ``H0xW0`` int32 labels on the same device (same maths as the numpy path)."""
    import torch

    h, w = grid
    x = scores.float().reshape(h, w, -1)
    ry, rx = _interp(h, size[0], x.device), _interp(w, size[1], x.device)
    cols = torch.einsum("Ww,hwm->hWm", rx, x)
    out = torch.empty(size, dtype=torch.int32, device=x.device)
    for r0 in range(0, size[0], ROW_CHUNK):
        block = torch.tensordot(ry[r0:r0 + ROW_CHUNK], cols, dims=([1], [0]))
        out[r0:r0 + ROW_CHUNK] = block.argmax(dim=-1).to(torch.int32)
    return out
