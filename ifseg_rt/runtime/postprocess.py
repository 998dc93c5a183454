"""From engine outputs to label maps: the one path every caller takes (``Segmenter``, and through it ``eval``, the
demo, adaptation validation, serving and Ray).

Per image (``ifseg.md`` §11-§12), with :class:`~ifseg_rt.knn.KnnSettings` ``knn``:

* **cell scores** (:func:`cell_scores`): kNN enabled -> ``softmax(logits / temperature)``, then ``iters`` averaging
  steps over each cell's ``min(k, N)`` nearest neighbours in ResNet feature space (``iters = 0``: the probabilities
  themselves); kNN disabled -> the raw logits (the paper's plain prediction resizes logits, not probabilities);
* **labels** (:func:`labels_from_scores`): the ``NxM`` scores of the ``h x w`` grid resized bilinearly
  (``align_corners=False``) straight to the original ``H0 x W0`` and arg-maxed, never holding ``M x H0 x W0``;
* **probabilities** (:func:`cell_probabilities`): what a caller asking for them gets, ``NxM`` rows summing to one.

Each function takes numpy arrays (CPU engines; the C++ kernels do the work) or torch tensors (GPU engines; the
result stays on the tensor's device). torch is imported only inside the torch branches: this module is torch-free.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import numpy as np

from ..knn.settings import KnnSettings
from .resize_argmax import resize_argmax


def is_torch(x: Any) -> bool:
    """Whether ``x`` is a torch tensor, without importing torch."""
    return type(x).__module__.split(".")[0] == "torch"


# --- scores ------------------------------------------------------------------------------------------------------
def softmax(x: np.ndarray, axis: int = -1, temperature: float = 1.0) -> np.ndarray:
    """Numerically stable softmax in float32 (float64 input stays float64)."""
    x = np.asarray(x)
    dt = np.float64 if x.dtype == np.float64 else np.float32
    z = x.astype(dt) / dt(temperature)
    z = z - z.max(axis=axis, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=axis, keepdims=True)
    return z


def cell_scores(logits, features, knn: KnnSettings, *, knn_backend: str = "auto", num_threads: Optional[int] = None):
    """``NxM`` or ``BxNxM`` logits (+ ``NxC`` / ``BxNxC`` features) -> the scores whose arg-max gives the labels.

    Raises ``ValueError`` when kNN averaging is asked for without features.
    """
    if not knn.enabled:
        return logits.float() if is_torch(logits) else np.asarray(logits, dtype=np.float32)
    if is_torch(logits):
        import torch

        probs = torch.softmax(logits.float() / knn.temperature, dim=-1)
    else:
        probs = softmax(logits, temperature=knn.temperature)
    if knn.iters == 0:
        return probs
    if features is None:
        raise ValueError("kNN post-processing needs the model's features; this engine returned none "
                         "(disable kNN to use the plain prediction)")
    from ..knn import knn_average

    backend = knn_backend
    if is_torch(probs) and backend == "auto":
        backend = "cuda" if probs.is_cuda else "numpy"
    n = probs.shape[-2]
    return knn_average(features, probs, k=knn.k_for(n), iters=knn.iters, backend=backend, num_threads=num_threads)


def cell_probabilities(scores, knn: KnnSettings):
    """The class probabilities behind ``scores`` of :func:`cell_scores`: the scores themselves when kNN is enabled,
    else the softmax of the logits (at the model's temperature)."""
    if knn.enabled:
        return scores
    if is_torch(scores):
        import torch

        return torch.softmax(scores.float() / knn.temperature, dim=-1)
    return softmax(scores, temperature=knn.temperature)


# --- resize + arg-max ----------------------------------------------------------------------------------------------
def labels_from_scores(scores, grid: Tuple[int, int], size: Tuple[int, int], *, threads: Optional[int] = None):
    """Arg-max of the bilinearly resized ``NxM`` scores at ``size`` = (H0, W0) -> ``H0xW0`` int32 labels (a numpy
    array, or a torch tensor on the scores' device), by the fused kernel of :mod:`~ifseg_rt.runtime.resize_argmax`
    (C++ / CUDA; a numpy or torch fallback without the compiled extension): M x H0 x W0 floats are never held.

    ``threads``: CPU threads (None: the cores available to the process, fewer for small outputs).
    """
    if len(scores.shape) != 2:
        raise ValueError(f"scores must be NxM (one image), got shape {tuple(scores.shape)}")
    return resize_argmax(scores, grid, size, threads=threads)
