"""Fused bilinear resize + arg-max of per-cell class scores: the label map of ifseg.md §11-§12 without ever holding
the ``M x H0 x W0`` resized maps.

Same result as :func:`ifseg_rt.runtime.postprocess.labels_from_scores`: the ``h x w`` grid of ``M`` class scores is
resized to ``H0 x W0`` like ``F.interpolate(mode="bilinear", align_corners=False)`` (no antialias, so down-sampling
too) and arg-maxed over the classes, ties to the lowest class. Labels can differ between backends only where two
classes' resized scores tie to within float32 rounding.

Backends: ``"cpu"`` (``ifseg_rt._C.resize_argmax_cpu``: multi-threaded, AVX-512/AVX2 dispatch), ``"numpy"`` (the
readable reference: separable interpolation matrices, a block of output rows at a time), ``"cuda"``
(``ifseg_rt._C.resize_argmax_cuda`` on a torch CUDA tensor's device and current stream). ``"auto"`` picks ``cuda`` for
torch CUDA tensors (the same matrices in torch on the tensor's device when the extension was built without CUDA),
else ``cpu`` when the extension is built, else ``numpy``. numpy in, int32 numpy out; torch CUDA in, int32 torch CUDA
out. :func:`ifseg_rt.runtime.postprocess.labels_from_scores` is the runtime's entry point to this module.

This module imports without torch; torch is imported only for CUDA tensors.
"""

from __future__ import annotations

import sys
from typing import Optional, Tuple

import numpy as np

from ..extension import extension
from ..system import MAX_THREADS

__all__ = ["BACKENDS", "interp_matrix", "resize_argmax"]

BACKENDS = ("auto", "cpu", "numpy", "cuda")
ROW_CHUNK = 64  # output rows resized at a time by the numpy path: bounds memory to M x 64 x W0 floats
TORCH_ROW_CHUNK = 256  # the same for the torch fallback


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


def _labels_numpy(scores: np.ndarray, grid: Tuple[int, int], size: Tuple[int, int]) -> np.ndarray:
    """One image, ``NxM`` -> ``H0xW0``: columns first (h x W0 x M), then blocks of output rows."""
    h, w = grid
    x = np.ascontiguousarray(scores.reshape(h, w, -1), dtype=np.float32)
    ry, rx = interp_matrix(h, size[0]), interp_matrix(w, size[1])
    cols = np.einsum("Ww,hwm->hWm", rx, x, optimize=True)
    out = np.empty(size, dtype=np.int32)
    for r0 in range(0, size[0], ROW_CHUNK):
        out[r0:r0 + ROW_CHUNK] = np.tensordot(ry[r0:r0 + ROW_CHUNK], cols, axes=(1, 0)).argmax(axis=-1)
    return out


def _labels_torch(scores, grid: Tuple[int, int], size: Tuple[int, int]):
    """The numpy path's maths in torch, on the tensor's device (CUDA without the compiled kernel)."""
    import torch

    h, w = grid
    x = scores.float().reshape(h, w, -1)
    ry = torch.from_numpy(interp_matrix(h, size[0])).to(x.device)
    rx = torch.from_numpy(interp_matrix(w, size[1])).to(x.device)
    cols = torch.einsum("Ww,hwm->hWm", rx, x)
    out = torch.empty(size, dtype=torch.int32, device=x.device)
    for r0 in range(0, size[0], TORCH_ROW_CHUNK):
        block = torch.tensordot(ry[r0:r0 + TORCH_ROW_CHUNK], cols, dims=([1], [0]))
        out[r0:r0 + TORCH_ROW_CHUNK] = block.argmax(dim=-1).to(torch.int32)
    return out


def _extension():
    """``ifseg_rt._C`` if it is built and has the resize kernel, else None."""
    return extension("resize_argmax_cpu")


def _is_torch_cuda(x) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor) and x.is_cuda


def _pair(name: str, value) -> Tuple[int, int]:
    try:
        a, b = value
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair of ints, got {value!r}") from None
    for v in (a, b):
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            raise ValueError(f"{name} must be a pair of ints, got {value!r}")
    if a < 1 or b < 1:
        raise ValueError(f"{name} must be >= 1 in both dimensions, got {value!r}")
    return int(a), int(b)


def _check(shape, grid, size):
    """-> (batched, B, N, M, (h, w), (H0, W0)) or ValueError."""
    grid, size = _pair("grid", grid), _pair("size", size)
    if len(shape) not in (2, 3):
        raise ValueError(f"scores must be NxM or BxNxM, got shape {shape}")
    batched = len(shape) == 3
    b, n, m = shape if batched else (1, *shape)
    if n != grid[0] * grid[1]:
        raise ValueError(f"scores have N={n} cells but the grid is {grid[0]}x{grid[1]} = {grid[0] * grid[1]} "
                         f"(scores shape {shape})")
    if m < 1:
        raise ValueError(f"scores must have M >= 1 classes, got shape {shape}")
    return batched, b, n, m, grid, size


def _threads(threads) -> int:
    if threads is None:
        return 0
    if isinstance(threads, (bool, np.bool_)) or not isinstance(threads, (int, np.integer)) \
            or not 0 <= threads <= MAX_THREADS:
        raise ValueError(f"threads must be None or an int in 0..{MAX_THREADS} (0: all available cores), got "
                         f"{threads!r}")
    return int(threads)


def resize_argmax(scores, grid: Tuple[int, int], size: Tuple[int, int], *, backend: str = "auto",
                  threads: Optional[int] = None, check_finite: bool = True):
    """Arg-max over the classes of the bilinearly resized cell scores -> ``H0xW0`` int32 labels.

    Parameters
    ----------
    scores : array, ``NxM`` or ``BxNxM``
        Per-cell class scores of ``B`` images on the same ``h x w`` grid (``N = h*w`` cells, row-major), float32 or
        float16 (float64 and integers are converted to float32). numpy (or anything ``np.asarray`` takes) or a torch
        CUDA tensor.
    grid : (int, int)
        ``(h, w)`` token grid.
    size : (int, int)
        ``(H0, W0)`` output size, larger or smaller than the grid.
    backend : {"auto", "cpu", "numpy", "cuda"}
    threads : int, optional
        CPU threads for ``backend="cpu"``; None or 0: the cores this process may run on. Small outputs use fewer.
    check_finite : bool
        Raise ``ValueError`` on NaN/Inf scores (on CUDA this costs one synchronisation).

    Returns
    -------
    labels : int32 array, ``H0xW0`` or ``BxH0xW0``
        numpy for host input; a torch int32 tensor on the input's device for CUDA input.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    nthreads = _threads(threads)
    if _is_torch_cuda(scores):
        if backend in ("cpu", "numpy"):
            raise ValueError(f"backend={backend!r} needs host (numpy) scores; got a CUDA tensor (use 'cuda' or 'auto')")
        return _run_cuda(scores, grid, size, backend, check_finite)
    if hasattr(scores, "__cuda_array_interface__") and not isinstance(scores, np.ndarray):
        raise TypeError("CUDA scores must be torch tensors; convert other device arrays with torch.as_tensor")
    if backend == "cuda":
        raise ValueError("backend='cuda' needs a torch CUDA tensor; got host scores")

    scores = np.asarray(scores)
    batched, b, n, m, grid, size = _check(scores.shape, grid, size)
    if scores.dtype.kind not in "fiu":
        raise TypeError(f"scores must be float32 or float16 (float64 and integers are converted), got {scores.dtype} "
                        f"shape {scores.shape}")
    if scores.dtype not in (np.float32, np.float16):
        scores = scores.astype(np.float32)
    if check_finite and not np.isfinite(scores).all():
        raise ValueError(f"scores (shape {scores.shape}) contain NaN or Inf")

    ext = _extension()
    if backend == "cpu" and ext is None:
        raise RuntimeError("backend='cpu' needs the compiled extension ifseg_rt._C, which is not importable")
    if backend == "numpy" or ext is None:
        s3 = scores.reshape(b, n, m)
        out = np.empty((b, *size), dtype=np.int32)
        for i in range(b):
            out[i] = _labels_numpy(s3[i], grid, size)
        return out if batched else out[0]
    return ext.resize_argmax_cpu(np.ascontiguousarray(scores), *grid, *size, nthreads)


def _run_cuda(scores, grid, size, backend, check_finite):
    import torch

    batched, b, n, m, grid, size = _check(tuple(scores.shape), grid, size)
    if scores.is_complex() or scores.dtype == torch.bool:
        raise TypeError(f"scores must be float32 or float16, got {scores.dtype} shape {tuple(scores.shape)}")
    if scores.dtype not in (torch.float32, torch.float16):
        scores = scores.float()
    if check_finite and not bool(torch.isfinite(scores).all()):
        raise ValueError(f"scores (shape {tuple(scores.shape)}) contain NaN or Inf")

    ext = _extension()
    if ext is None or not hasattr(ext, "resize_argmax_cuda"):
        if backend == "cuda":
            raise RuntimeError("backend='cuda' needs ifseg_rt._C built with nvcc (resize_argmax_cuda)")
        s3 = scores.reshape(b, n, m)
        out = torch.empty((b, *size), dtype=torch.int32, device=scores.device)
        for i in range(b):
            out[i] = _labels_torch(s3[i], grid, size)
        return out if batched else out[0]

    x = scores.reshape(b, n, m).contiguous()
    out = torch.empty((b, *size), dtype=torch.int32, device=x.device)
    if b > 0:
        with torch.cuda.device(x.device):  # the launcher runs on the current device: make it the input's
            ext.resize_argmax_cuda(x.data_ptr(), "float32" if x.dtype == torch.float32 else "float16", out.data_ptr(),
                                   b, grid[0], grid[1], m, size[0], size[1],
                                   torch.cuda.current_stream(x.device).cuda_stream)
    return out if batched else out[0]
