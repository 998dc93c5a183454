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
compiled through CuPy/NVRTC; ``"cuda-compiled"`` and ``"cuda-nvrtc"`` insist on one of the two, e.g. to check one
against the other). ``"auto"`` picks ``cuda`` for device arrays and ``cpu`` (else ``numpy``, with a one-time warning)
for host arrays. numpy in, numpy out; CuPy/torch CUDA tensors in, the same kind out on the same device and stream
(other ``__cuda_array_interface__``/DLPack device arrays come back as CuPy arrays); torch CPU tensors are read as
numpy arrays (detached: the averaging is not differentiable). :func:`kernel_source` is the CUDA source both paths
compile.

Screening (``backend="cpu"``, argument ``screen``). ``"fp32"`` is the exact fp32 search. ``"int16"`` first screens the
candidates with 16-bit integer similarities (each row of ``Fn`` quantised to 16 bits with its own scale; int8 GEMM
passes over the high and low bytes, on AMX-INT8 or AVX512-VNNI), keeps each row's best ``K - 1 + 8`` of them
(``ifseg_rt._C.knn_screen_margin``) and ranks those by their exact fp32 similarities, computed exactly as the fp32
search computes them, ties to the lower index: the neighbours equal the fp32 search's whenever its ``K - 1`` are among
the candidates. ``"auto"`` (the default) screens where the CPU has AMX-INT8 (three VNNI passes cost about as much as
the fp32 search itself) and falls back to fp32 elsewhere, also where ``K - 1 + 8 >= N - 1``.
Caveat: the margin is fixed, not derived from the quantisation error. A rigorous bound on |screening - fp32| exists
(Cauchy-Schwarz on each row's rounding error, plus fp32's own C 2^-24, ~1e-4 at C = 1024) and is used to skip
re-computing candidates that cannot make the best ``K - 1``, but sizing the candidate list by it would keep whole
rows wherever many rows lie within it. Rows with many near-duplicates (uniform image regions), whose similarities
differ by less than the 16-bit error, may therefore get other, equally similar neighbours than the fp32 search. On
the nano model's synthetic scenes (``benchmarks/knn.py --agreement``): none of the 256 px scenes' cells, ~0.2 % of the
512 px scenes' cells (N = 1024), their neighbours' similarities within 5e-6 of the best, changing 0.003-0.015 % of
the pixels' labels; for scale, fp32 itself picks other neighbours than a float64 search for 0.3-0.7 % of those cells
and 0.15-0.5 % of the labels. On random Gaussian features: no differences. Screening with int8 alone is not offered:
with the same margin it changed 50-70 % of the 512 px cells' neighbours and 3-8 % of the labels.

This module imports without torch.
"""

import sys
import warnings

import numpy as np

from ..extension import extension
from ..system import MAX_THREADS
from . import reference
from ._cuda import kernel_source
from .settings import DEFAULT_ITERS, DEFAULT_K, DEFAULT_SCREEN, MAX_ITERS, SCREENS, KnnSettings

__all__ = ["BACKENDS", "KnnSettings", "available_backends", "kernel_source", "knn_average", "knn_indices",
           "reference"]

BACKENDS = ("auto", "cuda", "cuda-compiled", "cuda-nvrtc", "cpu", "numpy")
_CUDA_PATHS = {"cuda": "auto", "cuda-compiled": "compiled", "cuda-nvrtc": "nvrtc"}  # backend -> _cuda.run(path=)
_HOST_FEATURE_DTYPES = (np.float16, np.float32, np.float64)
_PROB_DTYPES = (np.float32, np.float64)
_warned = set()


def _extension():
    """``ifseg_rt._C`` if it is built and has the kNN kernels, else None."""
    return extension("knn_cpu")


def _warn_once(key, message):
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def _torch_tensor(x):
    """Whether ``x`` is a torch tensor (torch is never imported here: a tensor implies it already is)."""
    torch = sys.modules.get("torch")
    return torch is not None and torch.is_tensor(x)


def _is_device_array(x):
    if _torch_tensor(x):
        # decided without touching __cuda_array_interface__: torch raises from it (not AttributeError, so hasattr
        # does not help) for CUDA tensors that require grad, and for bfloat16 on older releases
        return bool(x.is_cuda)
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
    """Names of the backends usable here. The ``"cuda*"`` names only report that a CUDA path is installed
    (``"cuda-compiled"``: ``ifseg_rt._C`` built with nvcc; ``"cuda-nvrtc"``: CuPy importable), not that a GPU is."""
    from . import _cuda

    names = [b for b, path in _CUDA_PATHS.items() if _cuda.available(path)]
    if _extension() is not None:
        names.append("cpu")
    return names + ["numpy"]


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
    for name, a in (("features", features), ("probs", probs)):
        if isinstance(a, np.ma.MaskedArray):  # np.asarray would drop the mask and use the hidden values
            raise TypeError(f"{name} is a masked array, whose mask kNN cannot honour; pass {name}.filled(value) or "
                            f"leave the masked rows out")
    if _torch_tensor(features):
        features = features.detach()
        if str(features.dtype) == "torch.bfloat16":  # numpy has no bfloat16; float32 holds it exactly
            features = features.float()
    if _torch_tensor(probs):
        probs = probs.detach()
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
        return "cuda" if backend == "auto" else backend
    if backend in _CUDA_PATHS:
        raise ValueError(f"backend={backend!r} needs device arrays (CuPy, torch CUDA, DLPack); got host arrays")
    if backend == "auto":
        if _extension() is not None:
            return "cpu"
        _warn_once("no-ext", "ifseg_rt._C is not built; kNN falls back to the (slow) numpy reference")
        return "numpy"
    if backend == "cpu" and _extension() is None:
        raise RuntimeError("backend='cpu' needs the compiled extension ifseg_rt._C, which is not importable")
    return backend


def _run(features, probs, k, iters, backend, num_threads, check_finite, screen=DEFAULT_SCREEN):
    if screen not in SCREENS:
        raise ValueError(f"screen must be one of {SCREENS}, got {screen!r}")
    if num_threads is not None and (isinstance(num_threads, bool) or not isinstance(num_threads, (int, np.integer))
                                    or not 0 <= num_threads <= MAX_THREADS):
        raise ValueError(f"num_threads must be None or an integer >= 0 and <= {MAX_THREADS} (0: the cores available), "
                         f"got {num_threads!r}")
    device = _is_device_array(features)
    if probs is not None and _is_device_array(probs) != device:
        raise ValueError("features and probs must both be host arrays or both device arrays")
    backend = _resolve_backend(backend, device)
    if backend in _CUDA_PATHS:
        from . import _cuda

        return _cuda.run(features, probs, k, iters, check_finite=check_finite, path=_CUDA_PATHS[backend])

    features, probs = _host_inputs(features, probs, check_finite)
    batched, b, n, c, m = check_args(features, probs, k, iters)
    if backend == "numpy":
        idx = reference.knn_indices(features, k, dtype=np.float64 if features.dtype == np.float64 else np.float32)
        if probs is None:
            return idx, None
        out = reference.knn_average(features, probs, k, iters).astype(probs.dtype, copy=False)
        return idx, out

    f3 = features.reshape(b, n, c)
    if f3.dtype == np.float64:
        with np.errstate(over="ignore"):
            f3 = np.ascontiguousarray(f3, dtype=np.float32)
        if check_finite and not np.isfinite(f3).all():
            raise ValueError(f"features (float64, shape {features.shape}) hold values beyond float32's range (largest "
                             f"|x| = {np.abs(features).max():.3g}), in which backend='cpu' computes: scale them "
                             f"(cosine similarity ignores the scale) or use backend='numpy'")
    else:
        f3 = np.ascontiguousarray(f3)
    idx = np.empty((b, n, k), dtype=np.int64)
    p3 = out = None
    if probs is not None:
        p3 = np.ascontiguousarray(probs.reshape(b, n, m), dtype=np.float32)
        out = np.empty_like(p3)
    _extension().knn_cpu(f3, idx, p3, out, k=int(k), iters=int(iters), num_threads=int(num_threads or 0),
                         screen=screen)
    idx = idx if batched else idx[0]
    if out is not None:
        out = (out if batched else out[0]).astype(probs.dtype, copy=False)
    return idx, out


def knn_indices(features, k=DEFAULT_K, *, backend="auto", num_threads=None, screen=DEFAULT_SCREEN, check_finite=True):
    """Indices of each row's ``k`` nearest rows by cosine similarity (the row itself first).

    Parameters
    ----------
    features : array, ``NxC`` or ``BxNxC``
        float32, float16 or float64 (bfloat16 too for CUDA tensors). numpy (or anything ``np.asarray`` accepts) or a
        CUDA array (CuPy, torch, ``__cuda_array_interface__``/DLPack).
    k : int
        Neighbours per row, ``1 <= k <= N``.
    backend : {"auto", "cuda", "cuda-compiled", "cuda-nvrtc", "cpu", "numpy"}
    num_threads : int, optional
        CPU threads for ``backend="cpu"``: exactly that many (at most N). Default: the cores this process may run
        on (its affinity mask), fewer when the problem is too small to pay for starting them.
    screen : {"auto", "int16", "fp32"}
        How ``backend="cpu"`` finds the neighbours (ignored by the other backends): 16-bit integer screening + exact
        fp32 ranking of the candidates (``"int16"``; ``"auto"`` where the CPU has AMX-INT8), or the exact fp32
        search; see the module docstring.
    check_finite : bool
        Raise ``ValueError`` on NaN/Inf inputs (on CUDA this costs one synchronisation).

    Returns
    -------
    indices : int64 array, ``NxK`` or ``BxNxK``
        Row ``i``: ``i``, then the others by descending similarity, ties by lower index. Same array kind and device
        as ``features``.
    """
    return _run(features, None, k, 0, backend, num_threads, check_finite, screen)[0]


def knn_average(features, probs, k=DEFAULT_K, iters=DEFAULT_ITERS, *, backend="auto", num_threads=None,
                screen=DEFAULT_SCREEN, check_finite=True):
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
    backend : {"auto", "cuda", "cuda-compiled", "cuda-nvrtc", "cpu", "numpy"}
    num_threads : int, optional
        CPU threads for ``backend="cpu"``: exactly that many (at most N). Default: the cores this process may run
        on (its affinity mask), fewer when the problem is too small to pay for starting them.
    screen : {"auto", "int16", "fp32"}
        How ``backend="cpu"`` finds the neighbours (ignored by the other backends): 16-bit integer screening + exact
        fp32 ranking of the candidates (``"int16"``; ``"auto"`` where the CPU has AMX-INT8), or the exact fp32
        search; see the module docstring.
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
    return _run(features, probs, k, iters, backend, num_threads, check_finite, screen)[1]
