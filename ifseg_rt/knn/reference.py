"""Plain numpy reference of the kNN post-processing (spec section 12), one image at a time.

Readable rather than fast: it builds the full NxN similarity matrix per image. It computes in float64 when given
float64 (or when ``dtype=np.float64``) and is the oracle every other backend is tested against.

Conventions shared by all backends:

* ``Fn = F / max(||F||_2, 1e-12)`` per row, so an all-zero feature row stays zero and has similarity 0 to every row.
* Row ``i``'s neighbour list starts with ``i`` itself (exactly as in exact arithmetic, where ``C[i, i] = 1`` is
  maximal; this also holds for zero rows and duplicates), followed by the ``K - 1`` other rows with the largest
  similarity, ties broken by the lower index first.
"""

import numpy as np

from .settings import DEFAULT_ITERS, DEFAULT_K

EPS = 1e-12  # F.normalize's default eps


def normalize(features, dtype=np.float64):
    """Row-wise L2 normalisation ``F / max(||F||, 1e-12)`` of ``...xNxC`` features, computed in ``dtype``."""
    f = np.asarray(features).astype(dtype)
    # in float64, each row divided by its largest |x| first: f * f would overflow to inf for float32 features beyond
    # ~1.8e19 (their rows would become zeros) and underflow for tiny ones
    g = f.astype(np.float64)
    scale = np.max(np.abs(g), axis=-1, keepdims=True, initial=0.0)
    scale = np.where(scale > 0, scale, 1.0)
    g = g / scale
    norm = (np.sqrt(np.sum(g * g, axis=-1, keepdims=True)) * scale).astype(f.dtype)
    return f / np.maximum(norm, EPS)


def knn_indices(features, k, *, dtype=np.float64):
    """Neighbour indices ``...xNxK`` (int64): row ``i`` first, then the others by descending cosine similarity."""
    features = np.asarray(features)
    fn = normalize(features, dtype)
    batch = fn.reshape(int(np.prod(fn.shape[:-2], dtype=np.int64)), *fn.shape[-2:])
    out = np.empty((batch.shape[0], batch.shape[1], k), dtype=np.int64)
    for b, f in enumerate(batch):
        sim = f @ f.T
        np.fill_diagonal(sim, np.inf)  # self first, whatever rounding does to C[i, i]
        # stable sort of -sim: equal similarities keep ascending index order
        out[b] = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    return out.reshape(*features.shape[:-1], k)


def knn_average(features, probs, k=DEFAULT_K, iters=DEFAULT_ITERS, *, dtype=None):
    """Average ``probs`` (``...xNxM``) ``iters`` times over each row's ``k`` nearest neighbours.

    ``dtype`` defaults to float64 when ``probs`` or ``features`` is float64, else float32.
    """
    probs = np.asarray(probs)
    if dtype is None:
        dtype = np.float64 if np.float64 in (probs.dtype, np.asarray(features).dtype) else np.float32
    idx = knn_indices(features, k, dtype=dtype)
    batch = int(np.prod(probs.shape[:-2], dtype=np.int64))
    p = probs.astype(dtype, copy=True).reshape(batch, *probs.shape[-2:])
    idx = idx.reshape(batch, p.shape[1], k)
    for _ in range(iters if batch else 0):
        p = np.stack([pb[ib].mean(axis=1) for pb, ib in zip(p, idx)])  # p_i <- mean_{j in Nb(i)} p_j
    return p.reshape(probs.shape).astype(dtype, copy=False)
