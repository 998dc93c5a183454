"""From per-cell logits to a label map at the original image size (ifseg.md §11-§12), numpy only.

Plain prediction: logits of the h x w token grid are resized bilinearly (align_corners=False) straight to the
original H0 x W0 and arg-maxed. With kNN post-processing the softmax probabilities are averaged over each cell's
top-K cosine neighbours in ResNet feature space (``ifseg_rt.knn``) first.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

ROW_CHUNK = 64  # output rows resized at a time: bounds memory to M x 64 x W0 floats for any image size


def softmax(x: np.ndarray, axis: int = -1, temperature: float = 1.0) -> np.ndarray:
    """Numerically stable softmax in float32 (float64 input stays float64)."""
    x = np.asarray(x)
    dt = np.float64 if x.dtype == np.float64 else np.float32
    z = x.astype(dt) / dt(temperature)
    z = z - z.max(axis=axis, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=axis, keepdims=True)
    return z


def interp_matrix(n_in: int, n_out: int, dtype=np.float32) -> np.ndarray:
    """``n_out x n_in`` matrix of 1-D bilinear weights, align_corners=False, no antialias (torch semantics)."""
    scale = n_in / n_out
    src = np.maximum((np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = src - i0
    r = np.zeros((n_out, n_in), dtype=np.float64)
    np.add.at(r, (np.arange(n_out), i0), 1.0 - lam)
    np.add.at(r, (np.arange(n_out), i1), lam)
    return r.astype(dtype)


def resize_scores(scores: np.ndarray, grid: Tuple[int, int], size: Tuple[int, int]) -> np.ndarray:
    """``NxM`` cell scores on an h x w grid -> ``MxH0xW0`` bilinear resize (memory: the full output)."""
    h, w = grid
    m = scores.shape[-1]
    x = scores.reshape(h, w, m).astype(np.float32)
    ry, rx = interp_matrix(h, size[0]), interp_matrix(w, size[1])
    return np.einsum("Hh,hwm,Ww->mHW", ry, x, rx, optimize=True)


def labels_from_scores(scores: np.ndarray, grid: Tuple[int, int], size: Tuple[int, int]) -> np.ndarray:
    """Arg-max of the bilinearly resized ``NxM`` scores at ``size`` = (H0, W0) -> ``H0xW0`` int32.

    Resizes ``ROW_CHUNK`` output rows at a time so that M x H0 x W0 floats are never held at once.
    """
    h, w = grid
    n, m = scores.shape
    if n != h * w:
        raise ValueError(f"scores have {n} cells but the grid is {h}x{w} = {h * w}")
    x = np.ascontiguousarray(scores.reshape(h, w, m), dtype=np.float32)
    ry, rx = interp_matrix(h, size[0]), interp_matrix(w, size[1])
    # columns first: (h, W0, M), then rows in chunks
    cols = np.einsum("Ww,hwm->hWm", rx, x, optimize=True)
    out = np.empty(size, dtype=np.int32)
    for r0 in range(0, size[0], ROW_CHUNK):
        block = np.tensordot(ry[r0:r0 + ROW_CHUNK], cols, axes=(1, 0))  # (rows, W0, M)
        out[r0:r0 + ROW_CHUNK] = block.argmax(axis=-1)
    return out


def postprocess(logits: np.ndarray, grid: Tuple[int, int], size: Tuple[int, int], *,
                features: Optional[np.ndarray] = None, knn_k: int = 3, knn_iters: int = 25,
                temperature: float = 1.0, knn_backend: str = "auto") -> Tuple[np.ndarray, np.ndarray]:
    """One image: ``NxM`` logits (+ ``NxC`` features for kNN) -> (``H0xW0`` int32 labels, ``NxM`` cell scores).

    With ``features`` the scores are the kNN-averaged probabilities (softmax first, ifseg.md §12); without, the raw
    logits (the paper's plain prediction resizes logits, not probabilities).
    """
    scores = np.asarray(logits, dtype=np.float32)
    if features is not None and knn_iters > 0:
        from ..knn import knn_average

        probs = softmax(scores, temperature=temperature)
        scores = knn_average(features, probs, k=knn_k, iters=knn_iters, backend=knn_backend)
    return labels_from_scores(scores, grid, size), scores
