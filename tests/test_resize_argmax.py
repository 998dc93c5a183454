"""Fused bilinear resize + arg-max (ifseg_rt.runtime.resize_argmax, csrc/resize/) against an independent float64
reference: torch's align_corners=False half-pixel taps written out per coordinate, applied in row chunks."""

import math
import os
import pathlib
import shutil
import subprocess

import numpy as np
import pytest

from ifseg_rt.runtime.postprocess import labels_from_scores
from ifseg_rt.runtime.resize_argmax import resize_argmax

ROOT = pathlib.Path(__file__).resolve().parents[1]
NVCC = shutil.which("nvcc")
_C = pytest.importorskip("ifseg_rt._C")
if not hasattr(_C, "resize_argmax_cpu"):
    pytest.skip("ifseg_rt._C was built without the resize kernel", allow_module_level=True)

REL_GAP = 1e-4  # labels must match wherever the top two resized scores differ by more than this (relative)


def taps(n_in, n_out):
    """Per output coordinate: (i0, i1, lambda) of F.interpolate(bilinear, align_corners=False), no antialias."""
    i0s, i1s, lams = [], [], []
    for d in range(n_out):
        src = max((d + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(math.floor(src)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        i0s.append(i0)
        i1s.append(i1)
        lams.append(src - i0)
    return np.array(i0s), np.array(i1s), np.array(lams)


def reference(scores, grid, size, chunk=32):
    """-> (labels, decided): float64 arg-max labels and the mask of pixels whose top-two gap exceeds REL_GAP."""
    (h, w), (H, W) = grid, size
    x = np.asarray(scores, dtype=np.float64).reshape(h, w, -1)
    m = x.shape[-1]
    y0, y1, ly = taps(h, H)
    x0, x1, lx = taps(w, W)
    labels = np.empty((H, W), dtype=np.int64)
    decided = np.ones((H, W), dtype=bool)
    for r in range(0, H, chunk):
        s = slice(r, r + chunk)
        rows = (1 - ly[s])[:, None, None] * x[y0[s]] + ly[s][:, None, None] * x[y1[s]]  # rows x w x M
        vals = (1 - lx)[None, :, None] * rows[:, x0] + lx[None, :, None] * rows[:, x1]  # rows x W x M
        labels[s] = vals.argmax(-1)
        if m > 1:
            top2 = np.partition(vals, m - 2, axis=-1)[..., m - 2:]
            decided[s] = top2[..., 1] - top2[..., 0] > REL_GAP * np.maximum(1.0, np.abs(top2[..., 1]))
    return labels, decided


def assert_matches(got, scores, grid, size, min_decided=0.99):
    ref, decided = reference(scores, grid, size)
    assert got.shape == tuple(size) and got.dtype == np.int32
    assert decided.mean() >= min_decided
    bad = np.argwhere((got != ref) & decided)
    if bad.size:
        at = tuple(bad[0])
        raise AssertionError(f"{len(bad)} labels differ from the reference, first at {at}: {got[at]} vs {ref[at]}")


def random_scores(n, m, seed=0, b=None):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, m) if b is None else (b, n, m)).astype(np.float32) * 3


CASES = [
    ((7, 5), (13, 11), 6),  # odd sizes
    ((3, 4), (37, 23), 9),
    ((5, 7), (5, 7), 4),  # same size
    ((1, 1), (5, 9), 3),  # tiny grids
    ((1, 7), (4, 30), 5),
    ((5, 1), (17, 3), 2),
    ((32, 32), (20, 20), 7),  # down-sampling (a 20x20 image on a 32x32 grid)
    ((48, 64), (40, 50), 5),  # mild down-sampling
    ((128, 96), (9, 13), 4),  # strong down-sampling: wide taps per pixel group
    ((64, 48), (7, 100), 3),  # down in y, up in x
    ((16, 22), (375, 500), 14),  # nano: 256x341 input, 375x500 original
]


@pytest.mark.parametrize("grid,size,m", CASES)
def test_matches_reference(grid, size, m):
    s = random_scores(grid[0] * grid[1], m, seed=m)
    assert_matches(resize_argmax(s, grid, size, backend="cpu"), s, grid, size)


@pytest.mark.parametrize("grid,size,m", CASES[:7])
def test_numpy_backend_matches_reference(grid, size, m):
    s = random_scores(grid[0] * grid[1], m, seed=m)
    assert_matches(resize_argmax(s, grid, size, backend="numpy"), s, grid, size)


@pytest.mark.parametrize("isa", ["avx512", "avx2", "generic"])
@pytest.mark.parametrize("grid,size,m", [CASES[1], CASES[7], CASES[8], ((16, 22), (97, 300), 14)])
def test_every_cpu_isa(monkeypatch, isa, grid, size, m):
    monkeypatch.setenv("IFSEG_RESIZE_CPU_ISA", isa)  # unsupported here: the next best one runs
    if _C.resize_argmax_cpu_isa() != isa:
        pytest.skip(f"this CPU lacks {isa} (the kernel would fall back to {_C.resize_argmax_cpu_isa()})")
    s = random_scores(grid[0] * grid[1], m, seed=3)
    assert_matches(resize_argmax(s, grid, size, backend="cpu"), s, grid, size)


def test_large_up_sampling_thread_counts():
    grid, size = (32, 43), (512, 683)
    s = random_scores(grid[0] * grid[1], 171, seed=1)
    assert _C.resize_argmax_threads(1, *size, 171, 2) == 2
    one = resize_argmax(s, grid, size, threads=1)
    two = resize_argmax(s, grid, size, threads=2)
    np.testing.assert_array_equal(one, two)
    np.testing.assert_array_equal(one, resize_argmax(s, grid, size, threads=5))
    assert_matches(one, s, grid, size)


def test_single_class_is_all_zero():
    s = random_scores(6 * 9, 1)
    out = resize_argmax(s, (6, 9), (31, 17))
    assert out.shape == (31, 17) and not out.any()


def test_ties_pick_the_lowest_class():
    s = random_scores(8 * 6, 7, seed=2)
    s[:, 2] = s[:, 5] = 100.0 + s[:, 0]  # classes 2 and 5 equal and above all others
    np.testing.assert_array_equal(resize_argmax(s, (8, 6), (33, 21)), np.full((33, 21), 2))
    np.testing.assert_array_equal(resize_argmax(np.zeros((48, 4), np.float32), (8, 6), (5, 50)), np.zeros((5, 50)))


def test_float16_equals_float32_of_the_same_values():
    s = random_scores(12 * 10, 11, seed=4).astype(np.float16)
    got = resize_argmax(s, (12, 10), (100, 70))
    np.testing.assert_array_equal(got, resize_argmax(s.astype(np.float32), (12, 10), (100, 70)))
    assert_matches(got, s, (12, 10), (100, 70))


def test_float64_and_non_contiguous_inputs():
    s = random_scores(9 * 7, 5, seed=5)
    want = resize_argmax(s, (9, 7), (40, 30))
    np.testing.assert_array_equal(resize_argmax(s.astype(np.float64), (9, 7), (40, 30)), want)
    wide = np.repeat(s, 2, axis=1)[:, ::2]  # strided view
    assert not wide.flags.c_contiguous
    np.testing.assert_array_equal(resize_argmax(wide, (9, 7), (40, 30)), want)


def test_batched_equals_per_image():
    s = random_scores(10 * 12, 6, seed=6, b=3)
    got = resize_argmax(s, (10, 12), (45, 61))
    assert got.shape == (3, 45, 61) and got.dtype == np.int32
    for i in range(3):
        np.testing.assert_array_equal(got[i], resize_argmax(s[i], (10, 12), (45, 61)))
    np.testing.assert_array_equal(resize_argmax(s, (10, 12), (45, 61), backend="numpy"), got)
    assert resize_argmax(s[:0], (10, 12), (45, 61)).shape == (0, 45, 61)


def test_numpy_path_and_runtime_entry_point_agree():
    """The numpy fallback and the runtime's entry point (labels_from_scores -> the compiled kernel) give the same
    labels wherever the reference decides them."""
    s = random_scores(16 * 22, 14, seed=7)
    got = resize_argmax(s, (16, 22), (375, 500), backend="numpy")
    _, decided = reference(s, (16, 22), (375, 500))
    np.testing.assert_array_equal(got[decided], labels_from_scores(s, (16, 22), (375, 500))[decided])


@pytest.mark.parametrize("grid,size", [((7, 9), (50, 41)), ((32, 32), (20, 20))])
def test_agrees_with_torch_interpolate(grid, size):
    torch = pytest.importorskip("torch")
    s = random_scores(grid[0] * grid[1], 8, seed=8)
    t = torch.from_numpy(s.reshape(*grid, -1)).permute(2, 0, 1)[None].double()
    vals = torch.nn.functional.interpolate(t, size=size, mode="bilinear", align_corners=False)[0].numpy()
    ref, decided = reference(s, grid, size)
    np.testing.assert_array_equal(vals.argmax(0)[decided], ref[decided])  # the reference is torch's resize
    np.testing.assert_array_equal(resize_argmax(s, grid, size)[decided], ref[decided])


def test_thread_count_policy():
    cores = _C.resize_available_cores()
    if hasattr(os, "sched_getaffinity"):
        assert cores == len(os.sched_getaffinity(0))
    default = _C.resize_argmax_threads(1, 512, 683, 171)
    assert 1 <= default <= cores and (default == cores or cores > 64)
    assert _C.resize_argmax_threads(1, 512, 683, 171, 3) == 3
    assert _C.resize_argmax_threads(1, 20, 20, 5, 8) == 1  # small outputs: one thread
    assert _C.resize_argmax_threads(1, 3, 4096, 1000, 64) == 3  # never more threads than rows
    assert _C.resize_argmax_threads(2, 3, 4096, 1000, 64) == 6  # rows of every image


@pytest.mark.parametrize(
    "shape,grid,size,match",
    [
        ((20, 3), (4, 6), (8, 8), "N=20 cells but the grid is 4x6 = 24"),
        ((24, 3), (4, 6), (0, 8), "size must be >= 1"),
        ((24, 3), (4, 6), (8, -1), "size must be >= 1"),
        ((24, 3), (0, 6), (8, 8), "grid must be >= 1"),
        ((24, 3), (4, 6), (8,), "size must be a pair"),
        ((24, 3), (4, 6.0), (8, 8), "grid must be a pair of ints"),
        ((24,), (4, 6), (8, 8), r"NxM or BxNxM, got shape \(24,\)"),
        ((24, 0), (4, 6), (8, 8), "M >= 1"),
    ],
)
def test_bad_arguments(shape, grid, size, match):
    with pytest.raises(ValueError, match=match):
        resize_argmax(np.zeros(shape, np.float32), grid, size)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_scores(bad):
    s = random_scores(24, 3)
    s[5, 1] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        resize_argmax(s, (4, 6), (8, 8))
    assert resize_argmax(s, (4, 6), (8, 8), check_finite=False).shape == (8, 8)


def test_bad_options():
    s = random_scores(24, 3)
    with pytest.raises(ValueError, match="backend must be one of"):
        resize_argmax(s, (4, 6), (8, 8), backend="gpu")
    with pytest.raises(ValueError, match="needs a torch CUDA tensor"):
        resize_argmax(s, (4, 6), (8, 8), backend="cuda")
    with pytest.raises(ValueError, match="threads must be"):
        resize_argmax(s, (4, 6), (8, 8), threads=-1)
    with pytest.raises(TypeError, match="scores must be float32 or float16"):
        resize_argmax(s.astype(np.complex64), (4, 6), (8, 8))


def test_extension_validates_its_arguments():
    s = random_scores(24, 3)
    with pytest.raises(ValueError, match=r"scores must be C-contiguous, got shape \(24, 3\)"):
        _C.resize_argmax_cpu(np.asfortranarray(s), 4, 6, 8, 8)
    with pytest.raises(TypeError, match="scores must be float32 or float16, got dtype float64"):
        _C.resize_argmax_cpu(s.astype(np.float64), 4, 6, 8, 8)
    with pytest.raises(ValueError, match=r"scores have N=24 cells but the grid is 5x6 = 30 \(scores shape \(24, 3\)\)"):
        _C.resize_argmax_cpu(s, 5, 6, 8, 8)
    with pytest.raises(ValueError, match=r"out must be H0xW0 = \(8, 8\), got shape \(8, 9\)"):
        _C.resize_argmax_cpu(s, 4, 6, 8, 8, out=np.empty((8, 9), np.int32))
    with pytest.raises(TypeError, match="out must be int32"):
        _C.resize_argmax_cpu(s, 4, 6, 8, 8, out=np.empty((8, 8), np.int64))
    out = np.full((8, 8), -1, np.int32)
    assert _C.resize_argmax_cpu(s, 4, 6, 8, 8, 1, out=out) is out
    np.testing.assert_array_equal(out, resize_argmax(s, (4, 6), (8, 8)))


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
def test_cuda_kernel_compiles(tmp_path):
    subprocess.run(
        [NVCC, "-c", "-std=c++17", "-arch=sm_90", str(ROOT / "csrc/resize/resize_argmax_cuda.cu"), "-I",
         str(ROOT / "csrc"), "-o", str(tmp_path / "resize_argmax_cuda.o")],
        check=True, capture_output=True,
    )


@pytest.mark.requires_cuda
@pytest.mark.parametrize("grid,size,m", [CASES[1], CASES[6], CASES[8], ((32, 43), (512, 683), 171)])
def test_cuda_matches_cpu(grid, size, m):
    torch = pytest.importorskip("torch")
    if not hasattr(_C, "resize_argmax_cuda"):
        pytest.skip("ifseg_rt._C was built without CUDA")
    s = random_scores(grid[0] * grid[1], m, seed=9, b=2)
    got = resize_argmax(torch.from_numpy(s).cuda(), grid, size, backend="cuda")
    assert got.is_cuda and got.dtype == torch.int32 and tuple(got.shape) == (2, *size)
    for i in range(2):
        assert_matches(got[i].cpu().numpy(), s[i], grid, size)
    half = resize_argmax(torch.from_numpy(s[0]).cuda().half(), grid, size)
    assert_matches(half.cpu().numpy(), s[0].astype(np.float16), grid, size)
