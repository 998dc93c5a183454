"""kNN post-processing of IFSeg probabilities (spec section 12), with numpy, C++ and CUDA backends.

For every image, with features ``F`` (``NxC``) and probabilities ``P`` (``NxM``, softmax already applied)::

    Fn    = F / max(||F||_2, 1e-12)                      per row
    Nb(i) = i, then the K-1 rows j != i with the largest Fn_i . Fn_j (ties: lower j first)
    repeat iters times:  P_i <- (1/K) sum_{j in Nb(i)} P_j   (all rows at once, Nb fixed)

Conventions, identical in every backend:

* Row ``i`` always comes first in its own neighbour list (in exact arithmetic ``C[i, i] = 1`` is maximal; forcing it
  keeps duplicated rows and rounding from displacing it), so ``k=1`` and ``iters=0`` return ``probs`` unchanged.
* An all-zero feature row normalises to zero: similarity 0 to every row, it still ranks itself first, then the
  lowest-indexed rows among those with the largest similarity (0 for it).
* NaN or Inf in ``features`` or ``probs`` raise ``ValueError`` (``check_finite=False`` skips the scan).
* Non-contiguous inputs are copied; float64 features are converted to float32 by the compiled backends (which compute
  in float32 and return ``probs``' dtype); ``backend="numpy"`` computes float64 inputs in float64.
* float16 features are widened to float32 before normalising (bfloat16 too, on CUDA); similarities accumulate in
  float32.

Backends: ``"numpy"`` (:mod:`ifseg_rt.knn.reference`), ``"cpu"`` (``ifseg_rt._C``: tiled, multi-threaded, never holds
the NxN matrix), ``"cuda"`` (the kernels of ``csrc/knn/knn_kernel.cuh``, compiled into ``ifseg_rt._C`` or runtime-
compiled through CuPy/NVRTC). ``"auto"`` picks ``cuda`` for device arrays and ``cpu`` (else ``numpy``, with a
one-time warning) for host arrays. numpy in, numpy out; CuPy/torch CUDA tensors in, the same kind out on the same
device and stream (other ``__cuda_array_interface__``/DLPack device arrays come back as CuPy arrays).

This module imports without torch.
"""

import warnings

import numpy as np

from . import reference
from .settings import DEFAULT_ITERS, DEFAULT_K, MAX_ITERS, KnnSettings

__all__ = ["BACKENDS", "KnnSettings", "available_backends", "knn_average", "knn_indices", "reference"]

BACKENDS = ("auto", "cuda", "cpu", "numpy")
_HOST_FEATURE_DTYPES = (np.float16, np.float32, np.float64)
_PROB_DTYPES = (np.float32, np.float64)
_warned = set()


def _extension():
    """``ifseg_rt._C`` if it is built and has the kNN kernels, else None."""
    try:
        from ifseg_rt import _C
    except ImportError:
        return None
    return _C if hasattr(_C, "knn_cpu") else None


def _warn_once(key, message):
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def _is_device_array(x):
    if hasattr(x, "__cuda_array_interface__"):
        return True
    dlpack_device = getattr(x, "__dlpack_device__", None)
    if dlpack_device is not None and not isinstance(x, np.ndarray):
        try:
            return int(dlpack_device()[0]) in (2, 13)  # kDLCUDA, kDLCUDAManaged
        except Exception:
            return False
    return False


def available_backends():
    """Names of the backends usable here (``"cuda"`` only reports whether a CUDA path is installed)."""
    names = ["numpy"]
    if _extension() is not None:
        names.insert(0, "cpu")
    from . import _cuda

    if _cuda.available():
        names.insert(0, "cuda")
    return names


def _shape(a):
    return tuple(int(s) for s in a.shape)


def check_args(features, probs, k, iters):
    """Validate shapes, ``k`` and ``iters`` (dtype- and library-agnostic); returns ``(batched, B, N, C, M)``."""
    fshape = _shape(features)
    if len(fshape) not in (2, 3):
        raise ValueError(f"features must be NxC or BxNxC, got shape {fshape}")
    batched = len(fshape) == 3
    b, n, c = fshape if batched else (1, *fshape)
    if n < 1 or c < 1:
        raise ValueError(f"features must have N >= 1 rows and C >= 1 channels, got shape {fshape}")
    m = 0
    if probs is not None:
        pshape = _shape(probs)
        if len(pshape) != len(fshape):
            want = "BxNxM" if batched else "NxM"
            raise ValueError(f"probs must be {want} like features {fshape}, got shape {pshape}")
        if pshape[:-1] != fshape[:-1]:
            raise ValueError(
                f"probs and features disagree on {'B, N' if batched else 'N'}: probs {pshape}, features {fshape}"
            )
        m = pshape[-1]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, N={n}] for features of shape {fshape}, got {k}")
    if isinstance(iters, bool) or not isinstance(iters, (int, np.integer)) or not 0 <= iters <= MAX_ITERS:
        raise ValueError(f"iters must be an int in [0, {MAX_ITERS}], got {iters!r}")
    return batched, b, n, c, m


def _host_inputs(features, probs, check_finite):
    features = np.asarray(features)
    if features.dtype not in _HOST_FEATURE_DTYPES:
        raise TypeError(f"features must be float16, float32 or float64, got {features.dtype} shape {features.shape}")
    if check_finite and not np.isfinite(features).all():
        raise ValueError(f"features (shape {features.shape}) contains NaN or Inf")
    if probs is not None:
        probs = np.asarray(probs)
        if probs.dtype not in _PROB_DTYPES:
            raise TypeError(f"probs must be float32 or float64, got {probs.dtype} shape {probs.shape}")
        if check_finite and not np.isfinite(probs).all():
            raise ValueError(f"probs (shape {probs.shape}) contains NaN or Inf")
    return features, probs


def _resolve_backend(backend, device):
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if device:
        if backend in ("cpu", "numpy"):
            raise ValueError(f"backend={backend!r} needs host (numpy) arrays; got device arrays (use 'cuda' or 'auto')")
        return "cuda"
    if backend == "cuda":
        raise ValueError("backend='cuda' needs device arrays (CuPy, torch CUDA, DLPack); got host arrays")
    if backend == "auto":
        if _extension() is not None:
            return "cpu"
        _warn_once("no-ext", "ifseg_rt._C is not built; kNN falls back to the (slow) numpy reference")
        return "numpy"
    if backend == "cpu" and _extension() is None:
        raise RuntimeError("backend='cpu' needs the compiled extension ifseg_rt._C, which is not importable")
    return backend


def _run(features, probs, k, iters, backend, num_threads, check_finite):
    device = _is_device_array(features)
    if probs is not None and _is_device_array(probs) != device:
        raise ValueError("features and probs must both be host arrays or both device arrays")
    backend = _resolve_backend(backend, device)
    if backend == "cuda":
        from . import _cuda

        return _cuda.run(features, probs, k, iters, check_finite=check_finite)

    features, probs = _host_inputs(features, probs, check_finite)
    batched, b, n, c, m = check_args(features, probs, k, iters)
    if backend == "numpy":
        idx = reference.knn_indices(features, k, dtype=np.float64 if features.dtype == np.float64 else np.float32)
        if probs is None:
            return idx, None
        out = reference.knn_average(features, probs, k, iters).astype(probs.dtype, copy=False)
        return idx, out

    f3 = features.reshape(b, n, c)
    f3 = np.ascontiguousarray(f3, dtype=np.float32 if f3.dtype == np.float64 else f3.dtype)
    idx = np.empty((b, n, k), dtype=np.int64)
    p3 = out = None
    if probs is not None:
        p3 = np.ascontiguousarray(probs.reshape(b, n, m), dtype=np.float32)
        out = np.empty_like(p3)
    _extension().knn_cpu(f3, idx, p3, out, k=int(k), iters=int(iters), num_threads=int(num_threads or 0))
    idx = idx if batched else idx[0]
    if out is not None:
        out = (out if batched else out[0]).astype(probs.dtype, copy=False)
    return idx, out


def knn_indices(features, k=DEFAULT_K, *, backend="auto", num_threads=None, check_finite=True):
    """Indices of each row's ``k`` nearest rows by cosine similarity (the row itself first).

    Parameters
    ----------
    features : array, ``NxC`` or ``BxNxC``
        float32, float16 or float64 (bfloat16 too for CUDA tensors). numpy (or anything ``np.asarray`` accepts) or a
        CUDA array (CuPy, torch, ``__cuda_array_interface__``/DLPack).
    k : int
        Neighbours per row, ``1 <= k <= N``.
    backend : {"auto", "cuda", "cpu", "numpy"}
    num_threads : int, optional
        CPU threads for ``backend="cpu"`` (default: all cores).
    check_finite : bool
        Raise ``ValueError`` on NaN/Inf inputs (on CUDA this costs one synchronisation).

    Returns
    -------
    indices : int64 array, ``NxK`` or ``BxNxK``
        Row ``i``: ``i``, then the others by descending similarity, ties by lower index. Same array kind and device
        as ``features``.
    """
    return _run(features, None, k, 0, backend, num_threads, check_finite)[0]


def knn_average(features, probs, k=DEFAULT_K, iters=DEFAULT_ITERS, *, backend="auto", num_threads=None, check_finite=True):
    """Average ``probs`` ``iters`` times over each row's ``k`` nearest neighbours in feature space.

    Parameters
    ----------
    features : array, ``NxC`` or ``BxNxC``
        Per-patch features (ResNet stage-3, C = 1024); float32, float16 or float64 (bfloat16 for CUDA tensors).
    probs : array, ``NxM`` or ``BxNxM``
        Class probabilities (softmax already applied), float32 or float64; same N (and B) as ``features``.
    k : int
        Neighbours per row including the row itself, ``1 <= k <= N`` (spec: 3).
    iters : int
        Averaging steps, ``>= 0`` (spec: 25).
    backend : {"auto", "cuda", "cpu", "numpy"}
    num_threads : int, optional
        CPU threads for ``backend="cpu"`` (default: all cores).
    check_finite : bool
        Raise ``ValueError`` on NaN/Inf inputs (on CUDA this costs one synchronisation).

    Returns
    -------
    probs : array, ``NxM`` or ``BxNxM``
        The averaged probabilities, a new array of the same kind, device and dtype as ``probs`` (float32 for
        float32 input; the compiled backends compute in float32).
    """
    if probs is None:
        raise TypeError("probs must be an array, got None")
    return _run(features, probs, k, iters, backend, num_threads, check_finite)[1]
