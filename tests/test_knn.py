"""ifseg_rt.knn: every available backend against the float64 numpy reference (spec section 12)."""

import subprocess
import sys
import warnings

import numpy as np
import pytest

import ifseg_rt.knn as knn
from ifseg_rt.knn import reference

HOST_BACKENDS = [b for b in ("cpu", "numpy") if b in knn.available_backends()]


def _cuda_device():
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


requires_cuda = pytest.mark.requires_cuda
skip_no_gpu = pytest.mark.skipif(_cuda_device() is None, reason="no CUDA GPU (torch.cuda) available")


def tie_free(rng, b, n, c, k, dtype=np.float32, gap=2e-5):
    """Random features whose top-(k+1) similarities (self excluded) differ by > gap in every row.

    Rows violating the gap are redrawn until none is left (violations are rare, so this converges at once).
    """
    f = rng.standard_normal((b, n, c)).astype(dtype)
    for _ in range(100):
        fn = reference.normalize(f)
        sim = fn @ np.swapaxes(fn, -1, -2)
        sim[:, np.arange(n), np.arange(n)] = np.inf
        top = -np.sort(-sim, axis=-1)[..., 1 : min(k + 1, n)]
        bad = (np.abs(np.diff(top, axis=-1)) <= gap).any(-1) if top.shape[-1] > 1 else np.zeros((b, n), bool)
        if not bad.any():
            return f
        f[bad] = rng.standard_normal((int(bad.sum()), c)).astype(dtype)
    raise AssertionError("could not draw tie-free features")


def probs_like(rng, b, n, m):
    p = rng.random((b, n, m)).astype(np.float32) + 0.01
    return p / p.sum(-1, keepdims=True)


CASES = [  # b, n, c, m, k, iters
    (1, 1, 8, 3, 1, 25),
    (1, 7, 5, 4, 3, 25),
    (2, 7, 33, 15, 7, 3),
    (1, 250, 64, 15, 3, 25),
    (3, 97, 100, 5, 5, 10),
    (1, 250, 1024, 171, 3, 25),
    (2, 1600, 128, 15, 3, 25),
]


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("b,n,c,m,k,iters", CASES)
def test_matches_reference(backend, b, n, c, m, k, iters):
    rng = np.random.default_rng(n * 31 + c)
    f = tie_free(rng, b, n, c, k)
    p = probs_like(rng, b, n, m)
    idx = knn.knn_indices(f, k, backend=backend)
    ref_idx = reference.knn_indices(f, k)
    assert idx.dtype == np.int64 and idx.shape == (b, n, k)
    np.testing.assert_array_equal(idx, ref_idx)
    out = knn.knn_average(f, p, k, iters, backend=backend)
    ref = reference.knn_average(f.astype(np.float64), p.astype(np.float64), k, iters)
    assert out.dtype == np.float32 and out.shape == p.shape
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(out.sum(-1), 1.0, atol=1e-5)
    # unbatched gives the same as the first image
    np.testing.assert_array_equal(knn.knn_indices(f[0], k, backend=backend), idx[0])
    np.testing.assert_allclose(knn.knn_average(f[0], p[0], k, iters, backend=backend), out[0], atol=1e-6)


@pytest.mark.parametrize("isa", ["avx512", "avx2", "generic"])
def test_cpu_kernels_agree(monkeypatch, isa):
    pytest.importorskip("ifseg_rt._C")
    monkeypatch.setenv("IFSEG_KNN_CPU_ISA", isa)  # falls back to a supported kernel when the CPU lacks it
    rng = np.random.default_rng(3)
    f = tie_free(rng, 2, 203, 70, 4)
    p = probs_like(rng, 2, 203, 9)
    np.testing.assert_array_equal(knn.knn_indices(f, 4, backend="cpu"), reference.knn_indices(f, 4))
    ref = reference.knn_average(f.astype(np.float64), p.astype(np.float64), 4, 25)
    for threads in (1, 2, 3):
        np.testing.assert_allclose(knn.knn_average(f, p, 4, backend="cpu", num_threads=threads), ref, atol=1e-5)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_identities(backend):
    rng = np.random.default_rng(0)
    f = rng.standard_normal((2, 50, 16)).astype(np.float32)
    p = probs_like(rng, 2, 50, 6)
    np.testing.assert_array_equal(knn.knn_average(f, p, 3, 0, backend=backend), p)  # iters=0
    np.testing.assert_array_equal(knn.knn_average(f, p, 1, 25, backend=backend), p)  # k=1: own neighbour
    np.testing.assert_array_equal(knn.knn_indices(f, 1, backend=backend)[..., 0], np.broadcast_to(np.arange(50), (2, 50)))
    assert knn.knn_average(f, p, 3, 0, backend=backend) is not p


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_ties_zero_rows_and_duplicates(backend):
    # entries in {0, +-1} with 4 non-zeros: norms are 2, every similarity is an exact multiple of 1/4, so ties are
    # exact in any summation order; plus an all-zero row (similarity 0 to all) and duplicated rows.
    rng = np.random.default_rng(5)
    base = np.zeros((6, 12), np.float32)
    for r in range(6):
        cols = rng.choice(12, 4, replace=False)
        base[r, cols] = rng.choice([-1.0, 1.0], 4)
    f = base[rng.integers(0, 6, 40)]
    f[7] = 0.0
    idx = knn.knn_indices(f, 6, backend=backend)
    np.testing.assert_array_equal(idx, reference.knn_indices(f, 6))
    assert (idx[:, 0] == np.arange(40)).all()  # self first, duplicates or not
    zero_row_others = reference.normalize(f)[7] @ reference.normalize(f).T
    assert not zero_row_others.any()
    np.testing.assert_array_equal(idx[7], [7, 0, 1, 2, 3, 4])  # zero row: self, then lowest indices (all ties at 0)
    p = probs_like(rng, 1, 40, 3)[0]
    out = knn.knn_average(f, p, 6, 25, backend=backend)
    assert np.isfinite(out).all()


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_float16_and_float64(backend):
    rng = np.random.default_rng(11)
    f = tie_free(rng, 1, 300, 256, 3, dtype=np.float16, gap=1e-3)
    p = probs_like(rng, 1, 300, 10)
    np.testing.assert_array_equal(knn.knn_indices(f, 3, backend=backend), reference.knn_indices(f, 3))
    ref = reference.knn_average(f.astype(np.float64), p.astype(np.float64), 3, 25)
    np.testing.assert_allclose(knn.knn_average(f, p, 3, backend=backend), ref, atol=1e-5)
    out64 = knn.knn_average(f.astype(np.float64), p.astype(np.float64), 3, backend=backend)
    assert out64.dtype == np.float64
    np.testing.assert_allclose(out64, ref, atol=1e-5 if backend == "cpu" else 1e-12)


def test_non_contiguous_is_copied():
    rng = np.random.default_rng(2)
    f = tie_free(rng, 1, 120, 64, 3)[0]
    p = probs_like(rng, 1, 120, 8)[0]
    f_nc, p_nc = np.asfortranarray(f), np.asfortranarray(p)
    assert not f_nc.flags.c_contiguous
    np.testing.assert_array_equal(knn.knn_indices(f_nc, 3), knn.knn_indices(f, 3))
    np.testing.assert_array_equal(knn.knn_average(f_nc, p_nc), knn.knn_average(f, p))
    np.testing.assert_array_equal(knn.knn_average(f[::2], p[::2]), knn.knn_average(f[::2].copy(), p[::2].copy()))


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_bad_inputs(backend):
    f = np.ones((2, 10, 4), np.float32)
    p = np.full((2, 10, 3), 1 / 3, np.float32)
    with pytest.raises(ValueError, match=r"probs and features disagree.*\(2, 9, 3\)"):
        knn.knn_average(f, p[:, :9], backend=backend)
    with pytest.raises(ValueError, match=r"disagree"):
        knn.knn_average(f, p[:1], backend=backend)
    with pytest.raises(ValueError, match=r"probs must be BxNxM"):
        knn.knn_average(f, p[0], backend=backend)
    with pytest.raises(ValueError, match=r"k must be in \[1, N=10\]"):
        knn.knn_indices(f, 0, backend=backend)
    with pytest.raises(ValueError, match=r"k must be in \[1, N=10\]"):
        knn.knn_indices(f, 11, backend=backend)
    with pytest.raises(TypeError, match="k must be an int"):
        knn.knn_indices(f, 2.0, backend=backend)
    with pytest.raises(ValueError, match="iters"):
        knn.knn_average(f, p, 3, -1, backend=backend)
    with pytest.raises(ValueError, match=r"features must be NxC or BxNxC, got shape \(10,\)"):
        knn.knn_indices(f[0, :, 0], 1, backend=backend)
    with pytest.raises(ValueError, match=r"features must be NxC or BxNxC"):
        knn.knn_indices(f[None], 1, backend=backend)
    with pytest.raises(TypeError, match="features must be float16, float32 or float64, got int32"):
        knn.knn_indices(f.astype(np.int32), 3, backend=backend)
    with pytest.raises(TypeError, match="probs must be float32 or float64, got float16"):
        knn.knn_average(f, p.astype(np.float16), backend=backend)
    for bad in (np.nan, np.inf):
        g = f.copy()
        g[1, 3, 2] = bad
        with pytest.raises(ValueError, match=r"features \(shape \(2, 10, 4\)\) contains NaN or Inf"):
            knn.knn_average(g, p, backend=backend)
        q = p.copy()
        q[0, 0, 0] = bad
        with pytest.raises(ValueError, match="probs .* contains NaN or Inf"):
            knn.knn_average(f, q, backend=backend)
    with pytest.raises(ValueError, match="backend must be one of"):
        knn.knn_indices(f, 3, backend="gpu")
    with pytest.raises(ValueError, match="needs device arrays"):
        knn.knn_indices(f, 3, backend="cuda")


def test_extension_validates():
    _C = pytest.importorskip("ifseg_rt._C")
    f = np.ones((1, 10, 4), np.float32)
    idx = np.empty((1, 10, 3), np.int64)
    with pytest.raises(ValueError, match=r"features must be C-contiguous, got shape \(1, 10, 2\)"):
        _C.knn_cpu(f[..., ::2], np.empty((1, 10, 3), np.int64), k=3, iters=0)
    with pytest.raises(ValueError, match=r"features must be BxNxC \(3-D\), got shape \(10, 4\)"):
        _C.knn_cpu(f[0], idx, k=3, iters=0)
    with pytest.raises(TypeError, match="features must be float32 or float16, got dtype float64"):
        _C.knn_cpu(f.astype(np.float64), idx, k=3, iters=0)
    with pytest.raises(ValueError, match=r"indices must be BxNxK = \(1, 10, 2\)"):
        _C.knn_cpu(f, idx, k=2, iters=0)
    with pytest.raises(ValueError, match=r"k must be in \[1, N=10\]"):
        _C.knn_cpu(f, idx, k=12, iters=0)
    p = np.ones((1, 9, 2), np.float32)
    with pytest.raises(ValueError, match=r"probs must be BxNxM with B=1, N=10.*got shape \(1, 9, 2\)"):
        _C.knn_cpu(f, idx, p, p.copy(), k=3, iters=1)
    p = np.ones((1, 10, 2), np.float32)
    with pytest.raises(ValueError, match="out must not alias probs"):
        _C.knn_cpu(f, idx, p, p, k=3, iters=1)


def test_auto_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(knn, "_extension", lambda: None)
    monkeypatch.setattr(knn, "_warned", set())
    f = np.eye(5, dtype=np.float32)
    with pytest.warns(RuntimeWarning, match="falls back to the .*numpy reference"):
        idx = knn.knn_indices(f, 2)
    np.testing.assert_array_equal(idx, reference.knn_indices(f, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        knn.knn_indices(f, 2)  # warned once only
    with pytest.raises(RuntimeError, match="needs the compiled extension"):
        knn.knn_indices(f, 2, backend="cpu")


def test_imports_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import numpy as np, ifseg_rt.knn as knn\n"
        "f = np.random.default_rng(0).standard_normal((20, 8)).astype(np.float32)\n"
        "p = np.full((20, 4), 0.25, np.float32)\n"
        "assert knn.knn_average(f, p).shape == (20, 4)\n"
        "assert knn.knn_average(f, p, backend='numpy').shape == (20, 4)\n"
        "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@requires_cuda
@skip_no_gpu
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("b,n,c,m,k", [(1, 7, 33, 4, 3), (2, 250, 128, 15, 3), (1, 1600, 1024, 171, 3), (2, 300, 64, 5, 9)])
def test_cuda_matches_reference(dtype, b, n, c, m, k):
    torch = _cuda_device()
    rng = np.random.default_rng(n + k)
    f = tie_free(rng, b, n, c, k, gap=1e-3)
    p = probs_like(rng, b, n, m)
    ft = torch.from_numpy(f).to(device="cuda", dtype=getattr(torch, dtype))
    f_ref = ft.float().cpu().numpy()  # what the kernel sees after rounding to dtype
    pt = torch.from_numpy(p).cuda()
    idx = knn.knn_indices(ft, k)
    assert idx.is_cuda and idx.dtype == torch.int64
    if dtype == "float32":
        np.testing.assert_array_equal(idx.cpu().numpy(), reference.knn_indices(f_ref, k))
    out = knn.knn_average(ft, pt, k, 25)
    assert out.is_cuda and out.dtype == torch.float32 and out.shape == pt.shape
    ref_idx = idx.cpu().numpy()
    ref = p.astype(np.float64)
    for _ in range(25):
        ref = np.stack([pb[ib].mean(1) for pb, ib in zip(ref, ref_idx)])
    np.testing.assert_allclose(out.cpu().numpy(), ref, atol=1e-5)
    if dtype == "float32":
        np.testing.assert_allclose(out.cpu().numpy(), reference.knn_average(f_ref.astype(np.float64), p, k, 25), atol=1e-5)
    np.testing.assert_array_equal(knn.knn_average(ft, pt, k, 0).cpu().numpy(), p)
    np.testing.assert_array_equal(knn.knn_average(ft, pt, 1, 25).cpu().numpy(), p)


@requires_cuda
@skip_no_gpu
def test_cuda_ties_and_bad_inputs():
    torch = _cuda_device()
    rng = np.random.default_rng(5)
    base = np.zeros((6, 12), np.float32)
    for r in range(6):
        cols = rng.choice(12, 4, replace=False)
        base[r, cols] = rng.choice([-1.0, 1.0], 4)
    f = base[rng.integers(0, 6, 40)]
    f[7] = 0.0
    np.testing.assert_array_equal(knn.knn_indices(torch.from_numpy(f).cuda(), 6).cpu().numpy(), reference.knn_indices(f, 6))
    ft = torch.ones(10, 4, device="cuda")
    with pytest.raises(ValueError, match="disagree"):
        knn.knn_average(ft, torch.ones(9, 3, device="cuda"))
    with pytest.raises(ValueError, match="NaN or Inf"):
        knn.knn_indices(torch.full((10, 4), float("nan"), device="cuda"), 3)
    with pytest.raises(ValueError, match=r"k must be in \[1, N=10\]"):
        knn.knn_indices(ft, 11)
    with pytest.raises(ValueError, match="needs host"):
        knn.knn_indices(ft, 3, backend="cpu")
