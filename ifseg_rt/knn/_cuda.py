"""CUDA glue for the kNN kernels: the compiled launchers in ``ifseg_rt._C`` or, without them, the same kernel source
(``knn_kernel.cuh``) compiled at run time through CuPy/NVRTC.

Inputs stay on their device: torch CUDA tensors are processed with torch allocations on the current torch stream;
everything else goes through CuPy (``cupy.asarray`` for ``__cuda_array_interface__``, ``cupy.from_dlpack``
otherwise) on CuPy's current stream. The NVRTC path mirrors ``csrc/knn/knn_cuda.cu`` (workspace layout, launch
shapes); keep the two in step. 16-bit torch features reach CuPy as int16 views (the kernels read raw bits): torch
gives bfloat16 tensors no ``__cuda_array_interface__`` and CuPy has no bfloat16 dtype.
"""

import functools
import importlib.resources
import pathlib
import sys

from ..extension import extension

_KERNEL_FILE = "knn_kernel.cuh"
TILE, LANES, THREADS, MAX_L, TARGET_BLOCKS = 64, 4, 256, 32, 256  # the IFSEG_KNN_* macros of knn_kernel.cuh


def kernel_source():
    """Text of ``knn_kernel.cuh``: the copy installed into the package, else ``csrc/knn/`` of a source checkout."""
    try:
        installed = importlib.resources.files("ifseg_rt.knn") / _KERNEL_FILE
        if installed.is_file():
            return installed.read_text()
    except (ModuleNotFoundError, FileNotFoundError):
        pass
    checkout = pathlib.Path(__file__).resolve().parents[2] / "csrc" / "knn" / _KERNEL_FILE
    if checkout.is_file():
        return checkout.read_text()
    raise FileNotFoundError(f"{_KERNEL_FILE} is neither installed in ifseg_rt/knn nor in a source checkout")


def splits(batch, n):
    """``ifseg_knn_splits`` of the kernel source: column splits per row tile."""
    tiles = (n + TILE - 1) // TILE
    return max(1, min(tiles, -(-TARGET_BLOCKS // (tiles * batch))))


def _compiled():
    return extension("knn_cuda", cuda=True)


def _cupy():
    try:
        import cupy
    except ImportError:
        return None
    return cupy


PATHS = ("auto", "compiled", "nvrtc")  # run(path=): either, the launchers in ifseg_rt._C, CuPy/NVRTC


def available(path="auto"):
    """True when that CUDA path is installed (compiled launchers, CuPy); says nothing about a GPU being present."""
    compiled = path in ("auto", "compiled") and _compiled() is not None
    return compiled or (path in ("auto", "nvrtc") and _cupy() is not None)


def _module(device_id):
    return _compile(_cupy(), device_id)


@functools.lru_cache(maxsize=None)
def _compile(cupy, device_id):  # keyed by the cupy module too: a test's stand-in never gets a real module
    with cupy.cuda.Device(device_id):
        return cupy.RawModule(code=kernel_source(), options=("--std=c++17",))


def _is_torch(x):
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


class _Torch:
    """Array operations on torch CUDA tensors (torch is already imported when one is passed in)."""

    def __init__(self, ref):
        import torch

        self.t, self.device = torch, ref.device
        self.stream = torch.cuda.current_stream(ref.device).cuda_stream
        self.feature_dtypes = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
        self.float64, self.float32 = torch.float64, torch.float32
        self.prob_dtypes = (torch.float32, torch.float64)

    def asarray(self, x):
        return x

    def dtype_name(self, x):
        return str(x.dtype).replace("torch.", "")

    def contiguous(self, x, dtype=None):
        return x.to(dtype=dtype or x.dtype).contiguous()

    def empty(self, shape, dtype):
        dt = {"float32": self.t.float32, "int64": self.t.int64, "uint8": self.t.uint8}[dtype]
        return self.t.empty(shape, dtype=dt, device=self.device)

    def isfinite_all(self, x):
        return bool(self.t.isfinite(x).all())

    def ptr(self, x):
        return x.data_ptr()

    def nbytes(self, x):
        return x.numel() * x.element_size()

    def copy(self, x):
        return x.clone()

    def cast(self, x, dtype):
        return x.to(dtype)


class _CuPy:
    def __init__(self, ref):
        import cupy

        self.cp = cupy
        self.device = ref.device
        self.stream = cupy.cuda.get_current_stream().ptr
        self.feature_dtypes = {cupy.dtype("float32"): "float32", cupy.dtype("float16"): "float16"}
        self.float64, self.float32 = cupy.dtype("float64"), cupy.dtype("float32")
        self.prob_dtypes = (self.float32, self.float64)

    def asarray(self, x):
        if isinstance(x, self.cp.ndarray):
            return x
        if hasattr(x, "__cuda_array_interface__"):
            return self.cp.asarray(x)
        return self.cp.from_dlpack(x)

    def dtype_name(self, x):
        return str(x.dtype)

    def contiguous(self, x, dtype=None):
        return self.cp.ascontiguousarray(x, dtype=dtype or x.dtype)

    def empty(self, shape, dtype):
        with self.device:
            return self.cp.empty(shape, dtype=dtype)

    def isfinite_all(self, x):
        return bool(self.cp.isfinite(x).all())

    def ptr(self, x):
        return x.data.ptr

    def nbytes(self, x):
        return int(x.nbytes)

    def copy(self, x):
        return x.copy()

    def cast(self, x, dtype):
        return x.astype(dtype)


def _check_disjoint(xp, a_name, a, b_name, b):
    """The kernels read ``a`` while writing ``b``: refuse overlapping buffers before a launch (the compiled binding
    refuses them too; this check also covers the NVRTC path, and runs where the binding cannot be tested)."""
    pa, pb = xp.ptr(a), xp.ptr(b)
    if pa < pb + xp.nbytes(b) and pb < pa + xp.nbytes(a):
        raise ValueError(f"{b_name} must not alias {a_name}: they share device memory ({a_name} at {pa:#x}, "
                         f"{xp.nbytes(a)} bytes; {b_name} at {pb:#x}, {xp.nbytes(b)} bytes)")


def _select(path):
    """The compiled extension for ``path`` ('auto', 'compiled', 'nvrtc'), or None for the NVRTC path."""
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    ext = _compiled() if path != "nvrtc" else None
    if path == "compiled" and ext is None:
        raise RuntimeError("backend='cuda-compiled' needs ifseg_rt._C built with nvcc (pip install -e . with "
                           "IFSEG_CUDA=ON); use backend='cuda-nvrtc' or 'cuda'")
    if ext is None and _cupy() is None:
        need = ("CuPy (pip install cupy-cuda12x or cupy-cuda13x)" if path == "nvrtc" else
                "ifseg_rt._C built with nvcc, or CuPy for the NVRTC path")
        raise RuntimeError(f"the CUDA kNN backend needs {need}")
    return ext


def run(features, probs, k, iters, *, check_finite=True, path="auto"):
    """Neighbour indices (and averaged probs when ``probs`` is given) for CUDA arrays; see ``ifseg_rt.knn``.

    ``path``: "auto" (the compiled launchers when ``ifseg_rt._C`` has them, else NVRTC), "compiled" or "nvrtc".
    """
    from . import check_args

    ext = _select(path)
    if _is_torch(features):
        xp = _Torch(features)
        if probs is not None and not _is_torch(probs):
            raise TypeError("features is a torch tensor, so probs must be one too")
        # the averaging is not differentiable, and CuPy cannot read a tensor that requires grad
        features = features.detach()
        probs = None if probs is None else probs.detach()
    else:
        if _cupy() is None:
            raise RuntimeError("CUDA arrays other than torch tensors need CuPy (pip install cupy-cuda12x or "
                               "cupy-cuda13x)")
        cp = _cupy()
        features = cp.asarray(features) if hasattr(features, "__cuda_array_interface__") else cp.from_dlpack(features)
        xp = _CuPy(features)
        if probs is not None:
            probs = xp.asarray(probs)
    if probs is not None and probs.device != features.device:
        raise ValueError(f"features and probs are on different devices: {features.device} and {probs.device}")
    batched, b, n, c, m = check_args(features, probs, k, iters)

    fdtype = xp.dtype_name(features)
    if features.dtype == xp.float64:
        features, fdtype = xp.contiguous(features, xp.float32), "float32"
    elif features.dtype not in xp.feature_dtypes:
        raise TypeError(f"features must be float32, float16, bfloat16 or float64, got {fdtype} shape {features.shape}")
    if probs is not None and probs.dtype not in xp.prob_dtypes:
        raise TypeError(f"probs must be float32 or float64, got {xp.dtype_name(probs)} shape {tuple(probs.shape)}")
    if check_finite:
        if not xp.isfinite_all(features):
            raise ValueError(f"features (shape {tuple(features.shape)}) contains NaN or Inf")
        if probs is not None and not xp.isfinite_all(probs):
            raise ValueError(f"probs (shape {tuple(probs.shape)}) contains NaN or Inf")
    if k - 1 > MAX_L:
        raise ValueError(f"the CUDA backend supports k <= {MAX_L + 1}, got {k}")

    f3 = xp.contiguous(features.reshape(b, n, c))
    p3 = out = None
    if probs is not None:
        p3 = xp.contiguous(probs.reshape(b, n, m), xp.float32)
        out = xp.empty((b, n, m), "float32")
    idx = xp.empty((b, n, k), "int64")
    if p3 is not None:
        _check_disjoint(xp, "probs", p3, "out", out)

    if ext is not None:
        nbytes = ext.knn_cuda_workspace(b, n, c, m if p3 is not None else 0, k, iters)
        ws = xp.empty((max(nbytes, 1),), "uint8")
        # the compiled launcher runs on the current CUDA device: make that the inputs' device (cuda:N)
        dev = _device_id(f3)
        guard = xp.t.cuda.device(dev) if isinstance(xp, _Torch) else _cupy().cuda.Device(dev)
        with guard:
            ext.knn_cuda(
                xp.ptr(f3), fdtype, xp.ptr(idx), xp.ptr(p3) if p3 is not None else 0,
                xp.ptr(out) if out is not None else 0, xp.ptr(ws), b, n, c, m if p3 is not None else 0, k, iters,
                xp.stream,
            )
    else:
        _launch_nvrtc(xp, f3, fdtype, idx, p3, out, b, n, c, m, k, iters)

    idx = idx if batched else idx[0]
    if out is None:
        return idx, None
    out = out if batched else out[0]
    return idx, (xp.cast(out, probs.dtype) if probs.dtype != xp.float32 else out)


def _device_id(x) -> int:
    """CUDA ordinal of a torch tensor (``device.index``, None for the current device) or a CuPy array."""
    d = x.device
    if not hasattr(d, "index"):
        return int(d.id)  # CuPy
    if d.index is not None:
        return d.index
    import torch  # a torch tensor: torch is already imported

    return int(torch.cuda.current_device())


def _launch_nvrtc(xp, f3, fdtype, idx, p3, out, b, n, c, m, k, iters):
    """The launch sequence of knn_cuda.cu through cupy.RawModule, on xp's stream."""
    import numpy as np

    cp = _cupy()
    device_id = _device_id(f3)
    mod = _module(device_id)
    as_cp = (lambda x: cp.asarray(x)) if isinstance(xp, _Torch) else (lambda x: x)
    rows, L = b * n, k - 1
    with cp.cuda.Device(device_id), cp.cuda.ExternalStream(xp.stream):
        indices = as_cp(idx)
        if L > 0:
            fn = cp.empty((rows, c), dtype=cp.float32)
            if fdtype == "float32":
                feats = as_cp(f3)
            elif isinstance(xp, _Torch):  # 16-bit: the kernels read the bits (bfloat16 has no CUDA array interface)
                feats = cp.asarray(f3.view(xp.t.int16)).view(cp.uint16)
            else:
                feats = f3.view(cp.uint16)
            threads = 256 if c >= 256 else 32 * ((c + 31) // 32)
            mod.get_function(f"ifseg_knn_normalize_{ {'float32': 'f32', 'float16': 'f16', 'bfloat16': 'bf16'}[fdtype] }")(
                (rows,), (threads,), (feats, fn, np.int32(c))
            )
            s = splits(b, n)
            part_v = cp.empty((rows * s * LANES * L,), dtype=cp.float32)
            part_i = cp.empty((rows * s * LANES * L,), dtype=cp.int32)
            mod.get_function("ifseg_knn_topk_partial")(
                ((n + TILE - 1) // TILE, s, b), (THREADS,), (fn, part_v, part_i, np.int32(n), np.int32(c), np.int32(L))
            )
            cands = s * LANES
        else:
            part_v = part_i = cp.empty((1,), dtype=cp.float32)
            cands = 0
        mod.get_function("ifseg_knn_merge")(
            ((rows + 127) // 128,), (128,),
            (part_v, part_i, indices, np.int64(rows), np.int32(n), np.int32(L), np.int32(cands)),
        )
        if p3 is None:
            return
        src, dst_out = as_cp(p3), as_cp(out)
        total = rows * m
        if iters == 0 or total == 0:
            dst_out[...] = src
            return
        tmp = cp.empty_like(dst_out) if iters > 1 else None
        step = mod.get_function("ifseg_knn_average_step")
        blocks = min((total + 255) // 256, 4096)
        for it in range(iters):
            dst = dst_out if (iters - 1 - it) % 2 == 0 else tmp
            step((blocks,), (256,), (src, dst, indices, np.int64(total), np.int32(n), np.int32(m), np.int32(k)))
            src = dst
