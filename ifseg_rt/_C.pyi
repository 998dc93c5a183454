"""ifseg_rt compiled kernels (CPU, and CUDA when built with nvcc). Private: use ifseg_rt.knn and
ifseg_rt.runtime.resize_argmax."""

import numpy as np
import numpy.typing as npt

__version__: str
"""The package version the extension was built from (equals ifseg_rt.__version__)."""
with_cuda: bool
"""True when the CUDA launchers (knn_cuda, knn_cuda_workspace, resize_argmax_cuda) were compiled in."""

def num_threads() -> int:
    """Cores this process may run on (sched_getaffinity): the most threads the kNN kernel uses by default."""

def knn_threads(batch: int, n: int, c: int, m: int, k: int, iters: int, num_threads: int = 0,
                screen: str = "auto") -> int:
    """Threads knn_cpu uses for these sizes: num_threads (at most n), or for 0 the available cores, fewer when the
    problem is too small to pay for starting them."""

def screen_isa() -> str:
    """The screening kernel screen='int16' uses here: 'amx', 'avx512vnni', or '' (fp32 search); screen='auto'
    screens with 'amx' only (override with IFSEG_KNN_CPU_ISA, a ceiling: amx|avx512vnni|avx512|avx2|generic)."""

knn_screen_margin: int
"""Candidates kept per row beyond the K - 1 neighbours when screening."""

def cpu_isa() -> str:
    """The fp32 micro-kernel the CPU kNN dispatches to here: 'avx512', 'avx2' or 'generic'
    (override with the IFSEG_KNN_CPU_ISA environment variable)."""

def knn_cpu(
    features: npt.NDArray[np.float32] | npt.NDArray[np.float16],
    indices: npt.NDArray[np.int64],
    probs: npt.NDArray[np.float32] | None = None,
    out: npt.NDArray[np.float32] | None = None,
    *,
    k: int,
    iters: int,
    num_threads: int = 0,
    screen: str = "auto",
) -> None:
    """kNN search (and averaging when probs/out are given) on the CPU, in place.

    Arguments: features (BxNxC float32/float16, C-contiguous), indices (BxNxK int64, written: row i, then the K-1
    most similar other rows, ties by lower index), probs (BxNxM float32) and out (BxNxM float32, written; must not
    alias probs), k (1 <= k <= N), iters (>= 0), num_threads (0: knn_threads(...)), screen ('auto' | 'int16' |
    'fp32', see ifseg_rt.knn). Releases the GIL.
    Raises ValueError/TypeError naming the argument and its shape.
    """

def knn_cuda_workspace(batch: int, n: int, c: int, m: int, k: int, iters: int) -> int:
    """Bytes of device workspace knn_cuda needs for these sizes (m = 0: neighbour search only). CUDA builds only."""

def knn_cuda(
    features: int, dtype: str, indices: int, probs: int, out: int, workspace: int,
    batch: int, n: int, c: int, m: int, k: int, iters: int, stream: int,
) -> None:
    """Launch the kNN kernels on raw device pointers, asynchronously on `stream` (a cudaStream_t as int).

    features: contiguous BxNxC of dtype 'float32' | 'float16' | 'bfloat16'; indices: BxNxK int64; probs/out: BxNxM
    float32 or 0 (search only), out must not overlap probs; workspace: knn_cuda_workspace(...) bytes. k <= 33.
    CUDA builds only.
    """

def resize_argmax_cpu(
    scores: npt.NDArray[np.float32] | npt.NDArray[np.float16],
    grid_h: int,
    grid_w: int,
    out_h: int,
    out_w: int,
    threads: int = 0,
    *,
    out: npt.NDArray[np.int32] | None = None,
) -> npt.NDArray[np.int32]:
    """Fused bilinear resize (align_corners=False, no antialias) + arg-max over the classes, on the CPU.

    scores: NxM or BxNxM float32/float16, C-contiguous, N = grid_h * grid_w cells in row-major order. Returns (or
    fills `out`, C-contiguous int32) H0xW0 or BxH0xW0 labels, ties to the lowest class. threads: 0 = the cores this
    process may run on, capped by the rows and a minimum of work per thread; the labels do not depend on it.
    Releases the GIL. Raises ValueError/TypeError naming the argument and its shape. Use
    ifseg_rt.runtime.resize_argmax.resize_argmax.
    """

def resize_argmax_threads(batch: int, out_h: int, out_w: int, m: int, threads: int = 0) -> int:
    """Threads resize_argmax_cpu uses for these sizes (`threads`, 0: resize_available_cores(), capped)."""

def resize_available_cores() -> int:
    """Cores this process may run on (sched_getaffinity): resize_argmax_cpu's default thread count."""

def resize_argmax_cpu_isa() -> str:
    """The vector loop resize_argmax_cpu dispatches to here: 'avx512', 'avx2' or 'generic'
    (override with the IFSEG_RESIZE_CPU_ISA environment variable)."""

def resize_argmax_cuda(
    scores: int, dtype: str, out: int, batch: int, grid_h: int, grid_w: int, m: int, out_h: int, out_w: int,
    stream: int,
) -> None:
    """Launch the fused resize + arg-max kernel on raw device pointers, asynchronously on `stream`.

    scores: contiguous BxNxM of dtype 'float32' | 'float16' (N = grid_h * grid_w); out: BxH0xW0 int32. Runs on the
    current CUDA device. CUDA builds only.
    """
