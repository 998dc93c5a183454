"""ifseg_rt.knn: every available backend against the float64 numpy reference (spec section 12)."""

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


CPU_ISAS = ["amx", "avx512vnni", "avx512", "avx2", "generic"]  # IFSEG_KNN_CPU_ISA values, a ceiling


@pytest.mark.parametrize("screen", ["auto", "int16", "fp32"])
@pytest.mark.parametrize("isa", CPU_ISAS)
def test_cpu_kernels_agree(monkeypatch, isa, screen):
    _C = pytest.importorskip("ifseg_rt._C")
    monkeypatch.setenv("IFSEG_KNN_CPU_ISA", isa)  # falls back to a supported kernel when the CPU lacks it
    ran = _C.screen_isa() if isa in ("amx", "avx512vnni") else _C.cpu_isa()
    if ran != isa:
        pytest.skip(f"this CPU lacks {isa} (the kernel would fall back to {ran or 'the fp32 search'})")
    rng = np.random.default_rng(3)
    f = tie_free(rng, 2, 203, 70, 4)
    p = probs_like(rng, 2, 203, 9)
    np.testing.assert_array_equal(knn.knn_indices(f, 4, backend="cpu", screen=screen), reference.knn_indices(f, 4))
    ref = reference.knn_average(f.astype(np.float64), p.astype(np.float64), 4, 25)
    for threads in (1, 2, 3):
        out = knn.knn_average(f, p, 4, backend="cpu", num_threads=threads, screen=screen)
        np.testing.assert_allclose(out, ref, atol=1e-5)


# --- int16 screening + exact fp32 ranking (backend="cpu", screen="int16"/"auto") ------------------------------------
def _screen_isas(monkeypatch):
    """The screening kernels this CPU has (IFSEG_KNN_CPU_ISA value -> _C.screen_isa() under it)."""
    _C = pytest.importorskip("ifseg_rt._C")
    found = []
    for isa in ("amx", "avx512vnni"):
        monkeypatch.setenv("IFSEG_KNN_CPU_ISA", isa)
        if _C.screen_isa() == isa:
            found.append(isa)
    monkeypatch.delenv("IFSEG_KNN_CPU_ISA")
    return found


SCREEN_CASES = [  # b, n, c, m, k: N around and off the 96-row tile, K up to 33, C off the 64-byte padding
    (1, 97, 100, 5, 3),
    (2, 250, 64, 15, 3),
    (1, 517, 100, 7, 33),
    (3, 300, 256, 4, 9),
    (1, 1000, 1024, 171, 3),
    (2, 193, 17, 3, 5),
]


@pytest.mark.parametrize("b,n,c,m,k", SCREEN_CASES)
def test_screened_matches_reference(b, n, c, m, k):
    pytest.importorskip("ifseg_rt._C")
    rng = np.random.default_rng(n * 7 + k)
    f = tie_free(rng, b, n, c, k)
    p = probs_like(rng, b, n, m)
    ref_idx = reference.knn_indices(f, k)
    ref = reference.knn_average(f.astype(np.float64), p.astype(np.float64), k, 25)
    exact = knn.knn_average(f, p, k, 25, backend="cpu", screen="fp32")
    for threads in (1, 2):
        np.testing.assert_array_equal(knn.knn_indices(f, k, backend="cpu", screen="int16", num_threads=threads),
                                      ref_idx)
        out = knn.knn_average(f, p, k, 25, backend="cpu", screen="int16", num_threads=threads)
        np.testing.assert_allclose(out, ref, atol=1e-5)
        np.testing.assert_array_equal(out, exact)  # the same neighbours, the same averaging: bitwise
    np.testing.assert_array_equal(knn.knn_indices(f[0], k, backend="cpu", screen="int16"), ref_idx[0])


def near_duplicates(rng, n, c, zero_rows=3):
    """Features full of exact and near duplicates (within 1e-6 relative, below the screening's resolution) and zero
    rows, as uniform image regions give: 30 prototypes, each row a copy, a slightly jittered copy or a fresh row."""
    protos = rng.standard_normal((30, c)).astype(np.float32)
    f = protos[rng.integers(0, 30, n)]
    jitter = rng.random(n) < 0.5
    f[jitter] *= 1 + 1e-6 * rng.standard_normal((int(jitter.sum()), c)).astype(np.float32)
    fresh = rng.random(n) < 0.1
    f[fresh] = rng.standard_normal((int(fresh.sum()), c)).astype(np.float32)
    f[rng.choice(n, zero_rows, replace=False)] = 0.0
    return np.ascontiguousarray(f)


def assert_equally_similar(f, idx, k):
    """idx (NxK) starts with each row itself, and the others' exact similarities are the K-1 largest (float64) within
    float32 rounding: what a search with legitimately different tie-breaking among near-duplicates must give."""
    fn = reference.normalize(f)
    sim = fn @ fn.T
    n = f.shape[0]
    np.testing.assert_array_equal(idx[:, 0], np.arange(n))
    assert all(len(set(row)) == k for row in idx.tolist())
    np.fill_diagonal(sim, -np.inf)
    best = -np.sort(-sim, axis=1)[:, : k - 1]
    got = -np.sort(-np.take_along_axis(sim, idx[:, 1:], axis=1), axis=1)
    np.testing.assert_allclose(got, best, rtol=0, atol=2e-6 * max(1.0, np.sqrt(f.shape[1]) / 8))


@pytest.mark.parametrize("n,c,k", [(300, 64, 5), (450, 256, 12), (200, 1024, 33)])
def test_screened_near_duplicates_and_zero_rows(n, c, k):
    pytest.importorskip("ifseg_rt._C")
    rng = np.random.default_rng(n + c + k)
    f = near_duplicates(rng, n, c)
    for screen in ("int16", "fp32"):
        assert_equally_similar(f, knn.knn_indices(f, k, backend="cpu", screen=screen), k)
    # exact duplicates and zero rows tie exactly in both paths: both take the lowest indices
    zero = np.flatnonzero(~f.any(1))
    exact = knn.knn_indices(f, k, backend="cpu", screen="fp32")
    np.testing.assert_array_equal(knn.knn_indices(f, k, backend="cpu", screen="int16")[zero], exact[zero])
    p = probs_like(rng, 1, n, 6)[0]
    out = knn.knn_average(f, p, k, 25, backend="cpu", screen="int16")
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out.sum(-1), 1.0, atol=1e-5)


def test_screen_kernels_identical(monkeypatch):
    # AMX and VNNI compute the same integers: the same candidates, the same neighbours, even among near-duplicates
    isas = _screen_isas(monkeypatch)
    if len(isas) < 2:
        pytest.skip(f"needs both AMX-INT8 and AVX512-VNNI, this CPU has {sorted(isas) or 'neither'}")
    rng = np.random.default_rng(8)
    f = near_duplicates(rng, 700, 256)
    got = {}
    for isa in isas:
        monkeypatch.setenv("IFSEG_KNN_CPU_ISA", isa)
        got[isa] = [knn.knn_indices(f, 7, backend="cpu", screen="int16", num_threads=t) for t in (1, 2)]
    np.testing.assert_array_equal(got["amx"][0], got["avx512vnni"][0])
    np.testing.assert_array_equal(got["amx"][0], got["amx"][1])
    np.testing.assert_array_equal(got["avx512vnni"][0], got["avx512vnni"][1])


def test_screen_selection(monkeypatch):
    _C = pytest.importorskip("ifseg_rt._C")
    assert _C.knn_screen_margin >= 1
    assert _C.screen_isa() in ("amx", "avx512vnni", "")
    for isa in ("avx512", "avx2", "generic"):  # the ceiling below the screening kernels: fp32 search
        monkeypatch.setenv("IFSEG_KNN_CPU_ISA", isa)
        assert _C.screen_isa() == ""
    with pytest.raises(ValueError, match=r"screen must be one of \('auto', 'int16', 'fp32'\), got 'int8'"):
        knn.knn_indices(np.ones((5, 3), np.float32), 2, screen="int8")
    f = np.ones((1, 5, 3), np.float32)
    with pytest.raises(ValueError, match="screen must be 'auto', 'int16' or 'fp32'"):
        _C.knn_cpu(f, np.empty((1, 5, 2), np.int64), k=2, iters=0, screen="bf16")
    # ignored by the reference backend
    np.testing.assert_array_equal(knn.knn_indices(f[0], 2, backend="numpy", screen="int16"),
                                  reference.knn_indices(f[0], 2))


def test_thread_count():
    _C = pytest.importorskip("ifseg_rt._C")
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert _C.num_threads() == cores
    assert _C.knn_threads(1, 50, 16, 5, 3, 25) == 1  # too small to pay for a second thread
    assert _C.knn_threads(1, 4096, 1024, 171, 3, 25) == cores
    assert _C.knn_threads(1, 4096, 1024, 171, 3, 25, num_threads=3) == 3  # asked for: exactly that many
    assert _C.knn_threads(1, 2, 16, 5, 2, 1, num_threads=8) == 2  # ... but no more than the rows
    assert 1 <= _C.knn_threads(8, 256, 256, 15, 3, 25) <= cores
    with pytest.raises(ValueError, match="num_threads must be >= 0"):
        _C.knn_cpu(np.ones((1, 5, 3), np.float32), np.empty((1, 5, 2), np.int64), k=2, iters=0, num_threads=-1)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_identities(backend):
    rng = np.random.default_rng(0)
    f = rng.standard_normal((2, 50, 16)).astype(np.float32)
    p = probs_like(rng, 2, 50, 6)
    np.testing.assert_array_equal(knn.knn_average(f, p, 3, 0, backend=backend), p)  # iters=0
    np.testing.assert_array_equal(knn.knn_average(f, p, 1, 25, backend=backend), p)  # k=1: own neighbour
    np.testing.assert_array_equal(knn.knn_indices(f, 1, backend=backend)[..., 0], np.broadcast_to(np.arange(50), (2, 50)))
    assert knn.knn_average(f, p, 3, 0, backend=backend) is not p


@pytest.mark.parametrize("backend", HOST_BACKENDS + ["reference"])
def test_hand_worked_example(backend):
    """ifseg.md §12 worked by hand: four rows on a half circle at 0, 10, 30, 100 degrees (norms differ: cosine
    ignores them), k = 2 -> neighbours 0:{0,1} 1:{1,0} 2:{2,1} 3:{3,2}. Every row is updated from the previous
    step's values at once (a row-by-row update would give p1 = (0.25, 0.75) after step 1)."""
    deg = np.radians([0.0, 10.0, 30.0, 100.0])
    f = (np.stack([np.cos(deg), np.sin(deg)], 1) * np.array([1.0, 5.0, 0.2, 3.0])[:, None]).astype(np.float32)
    p = np.array([[1, 0], [0, 1], [1, 0], [1, 0]], np.float32)
    want = {0: p,
            1: [[0.5, 0.5], [0.5, 0.5], [0.5, 0.5], [1.0, 0.0]],
            2: [[0.5, 0.5], [0.5, 0.5], [0.5, 0.5], [0.75, 0.25]]}
    if backend == "reference":
        idx = reference.knn_indices(f, 2)
        got = {n: reference.knn_average(f, p, 2, n) for n in want}
    else:
        idx = knn.knn_indices(f, 2, backend=backend)
        got = {n: knn.knn_average(f, p, 2, n, backend=backend) for n in want}
    np.testing.assert_array_equal(idx, [[0, 1], [1, 0], [2, 1], [3, 2]])
    for n, w in want.items():
        np.testing.assert_allclose(got[n], w, atol=1e-6, err_msg=f"iters={n}")


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
    with pytest.raises(TypeError, match=r"features is a masked array, whose mask kNN cannot honour"):
        knn.knn_average(np.ma.masked_array(f, mask=f > 0), p, backend=backend)
    with pytest.raises(TypeError, match=r"probs is a masked array"):
        knn.knn_average(f, np.ma.masked_array(p), backend=backend)
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
    for bad in (1.7, "2", -1, True, 1025, 2 ** 31):
        with pytest.raises(ValueError, match=r"num_threads must be None or an integer >= 0 and <= 1024"):
            knn.knn_average(f, p, backend=backend, num_threads=bad)


@pytest.mark.skipif("cpu" not in knn.available_backends(), reason="needs the compiled extension")
@pytest.mark.parametrize("screen", ["fp32", "int16"])
def test_cpu_never_indexes_outside_the_rows(screen):
    """float64 features beyond float32's range (the cpu backend's precision) are refused by name; non-finite features
    passed with check_finite=False give undefined neighbours but always indices of real rows (they used to come back
    as 2**31 - 1, and the averaging then read outside the array and crashed the process)."""
    rng = np.random.default_rng(0)
    big = rng.standard_normal((50, 16)) * 1e39
    with pytest.raises(ValueError, match=r"features \(float64, shape \(50, 16\)\) hold values beyond float32's range "
                                         r"\(largest \|x\| = \d"):
        knn.knn_average(big, np.full((50, 4), 0.25), backend="cpu", screen=screen)
    ref = reference.knn_average(big, np.full((50, 4), 0.25), 3, 25)  # the float64 reference takes them
    np.testing.assert_allclose(knn.knn_average(big, np.full((50, 4), 0.25), backend="numpy"), ref)
    for n in (50, 700):
        f = rng.standard_normal((n, 64)).astype(np.float32)
        f[3, 2], f[9] = np.nan, np.inf
        for threads in (1, 2):
            idx = knn.knn_indices(f, 3, backend="cpu", screen=screen, check_finite=False, num_threads=threads)
            assert idx.min() >= 0 and idx.max() < n
            np.testing.assert_array_equal(idx[:, 0], np.arange(n))
            out = knn.knn_average(f, np.full((n, 4), 0.25, np.float32), backend="cpu", screen=screen,
                                  check_finite=False, num_threads=threads)
            assert out.shape == (n, 4)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_unusual_valid_inputs(backend):
    """Huge (float32 |x| ~ 1e20: x * x overflows) and tiny rows, empty batches and zero categories, torch bfloat16
    features: the same answer as the float64 reference of the same values, in every host backend."""
    rng = np.random.default_rng(2)
    f = tie_free(rng, 1, 60, 16, 3)[0]
    p = probs_like(rng, 1, 60, 4)[0]
    unscaled = reference.knn_average(f.astype(np.float64), p.astype(np.float64), 3, 5)
    for scale in (1e20, 1e-20):  # below the norm's 1e-12 floor rows are not unit length: dot products rank them
        fs = f * np.float32(scale)
        want = reference.knn_average(fs.astype(np.float64), p.astype(np.float64), 3, 5)
        np.testing.assert_allclose(knn.knn_average(fs, p, 3, 5, backend=backend), want, atol=1e-6)
        if scale > 1:  # cosine similarity does not see the scale
            np.testing.assert_allclose(want, unscaled, atol=1e-12)
    assert knn.knn_average(np.zeros((0, 5, 3), np.float32), np.zeros((0, 5, 2), np.float32), 2, 3,
                           backend=backend).shape == (0, 5, 2)
    assert knn.knn_indices(np.zeros((0, 5, 3), np.float32), 2, backend=backend).shape == (0, 5, 2)
    assert knn.knn_average(f, np.zeros((60, 0), np.float32), 2, 3, backend=backend).shape == (60, 0)
    torch = pytest.importorskip("torch")
    fb = torch.from_numpy(f).bfloat16()
    exact = reference.knn_average(fb.double().numpy(), p.astype(np.float64), 3, 5)
    np.testing.assert_allclose(np.asarray(knn.knn_average(fb, p, 3, 5, backend=backend)), exact, atol=1e-6)


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


# --- CUDA dispatch on the CPU: stand-ins for torch.cuda, CuPy and the compiled launchers ---------------------------
class FakeCupy:
    """Enough of CuPy for the NVRTC launch sequence, on numpy memory; like CuPy reading a torch tensor's
    __cuda_array_interface__, it cannot take bfloat16 tensors. Records every kernel launch."""

    float32, int32, uint16 = np.float32, np.int32, np.uint16
    empty, empty_like = staticmethod(np.empty), staticmethod(np.empty_like)

    def __init__(self):
        import contextlib
        import types

        self.launches = []
        self.cuda = types.SimpleNamespace(Device=lambda i: contextlib.nullcontext(),
                                          ExternalStream=lambda s: contextlib.nullcontext())

    def asarray(self, x):
        torch = _cuda_like.torch
        if torch.is_tensor(x):
            if x.dtype == torch.bfloat16:
                raise TypeError("Unsupported dtype torch.bfloat16")
            return x.detach().numpy()  # shares the tensor's memory, as CuPy shares device memory
        return np.asarray(x)

    def RawModule(self, code, options):  # noqa: N802 (CuPy's name)
        assert "ifseg_knn_normalize_bf16" in code
        launches = self.launches

        class Module:
            def get_function(self, name):
                return lambda grid, block, args: launches.append((name, args))

        return Module()


def _cuda_like():
    """A torch.Tensor subclass living on the CPU that says it is a CUDA tensor and, like a bfloat16 or
    requires-grad CUDA tensor, raises (not AttributeError) from __cuda_array_interface__."""
    torch = pytest.importorskip("torch")
    _cuda_like.torch = torch

    class CudaLike(torch.Tensor):
        @property
        def is_cuda(self):
            return True

        @property
        def __cuda_array_interface__(self):
            raise RuntimeError("__cuda_array_interface__ was read")

    return CudaLike


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda stand-ins (stream, device guard), a fake CuPy and a fake ifseg_rt._C with CUDA launchers."""
    import contextlib
    import types

    import ifseg_rt

    torch = pytest.importorskip("torch")
    cls = _cuda_like()
    rec = types.SimpleNamespace(compiled=[], devices=[], cupy=FakeCupy(), cls=cls, torch=torch)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: types.SimpleNamespace(cuda_stream=7))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda d: rec.devices.append(d) or contextlib.nullcontext())
    ext = types.SimpleNamespace(with_cuda=True, knn_cuda_workspace=lambda *a: 256,
                                knn_cuda=lambda *a: rec.compiled.append(a))
    monkeypatch.setitem(sys.modules, "ifseg_rt._C", ext)
    monkeypatch.setattr(ifseg_rt, "_C", ext, raising=False)
    monkeypatch.setitem(sys.modules, "cupy", rec.cupy)
    return rec


def _device_inputs(rec, dtype, b=2, n=40, c=16, m=5, grad=False):
    torch = rec.torch
    f = torch.randn(b, n, c).to(getattr(torch, dtype)).as_subclass(rec.cls)
    p = torch.softmax(torch.randn(b, n, m), -1).as_subclass(rec.cls)
    return f.requires_grad_(grad), p


@pytest.mark.parametrize("dtype,kernel", [("float32", "f32"), ("float16", "f16"), ("bfloat16", "bf16"),
                                          ("float64", "f32")])
def test_cuda_dtype_routing_nvrtc(fake_cuda, dtype, kernel):
    f, p = _device_inputs(fake_cuda, dtype, grad=True)
    out = knn.knn_average(f, p, 3, 2, backend="cuda-nvrtc")
    names = [name for name, _ in fake_cuda.cupy.launches]
    assert names == [f"ifseg_knn_normalize_{kernel}", "ifseg_knn_topk_partial", "ifseg_knn_merge",
                     "ifseg_knn_average_step", "ifseg_knn_average_step"]
    assert not fake_cuda.compiled
    feats = fake_cuda.cupy.launches[0][1][0]
    want = f.detach().float() if dtype == "float64" else f.detach()
    if dtype in ("float16", "bfloat16"):  # the raw bits, handed over as a 16-bit integer view
        assert feats.dtype == np.uint16
        bits = want.view(fake_cuda.torch.int16).numpy().view(np.uint16)
        np.testing.assert_array_equal(feats.reshape(-1), bits.ravel())
    else:
        assert feats.dtype == np.float32
        np.testing.assert_array_equal(feats.reshape(-1), want.numpy().ravel())
    assert tuple(out.shape) == tuple(p.shape) and out.dtype == fake_cuda.torch.float32


@pytest.mark.parametrize("dtype,name", [("float32", "float32"), ("float16", "float16"), ("bfloat16", "bfloat16"),
                                        ("float64", "float32")])
def test_cuda_dtype_routing_compiled(fake_cuda, dtype, name):
    f, p = _device_inputs(fake_cuda, dtype, grad=True)
    knn.knn_indices(f, 3)  # "auto" on device arrays: the compiled launchers when _C has them
    out = knn.knn_average(f, p, 3, 25, backend="cuda-compiled")
    assert [a[1] for a in fake_cuda.compiled] == [name, name]
    (search, avg) = fake_cuda.compiled
    assert search[3] == 0 and search[4] == 0 and search[9] == 0  # neighbour search only: no probs, out, M
    assert avg[9] == 5 and avg[10] == 3 and avg[11] == 25 and avg[12] == 7  # M, k, iters, the current stream
    assert avg[3] == p.data_ptr() and avg[4] == out.data_ptr() != p.data_ptr()
    assert fake_cuda.devices and all(d == 0 for d in fake_cuda.devices)  # launched under the inputs' device
    assert not fake_cuda.cupy.launches
    assert "cuda-compiled" in knn.available_backends() and "cuda-nvrtc" in knn.available_backends()


def test_device_check_never_reads_the_array_interface(fake_cuda):
    # a CUDA tensor that requires grad (or bf16 on older torch) raises from __cuda_array_interface__
    f, p = _device_inputs(fake_cuda, "bfloat16", grad=True)
    with pytest.raises(RuntimeError, match="was read"):
        f.__cuda_array_interface__
    knn.knn_average(f, p.requires_grad_(), 3, 1)
    assert len(fake_cuda.compiled) == 1
    with pytest.raises(ValueError, match="needs host"):
        knn.knn_average(f, p, backend="cpu")
    # a CPU tensor that requires grad is a host array: read as numpy, detached
    torch = fake_cuda.torch
    rng = np.random.default_rng(4)
    fh, ph = tie_free(rng, 1, 30, 8, 3)[0], probs_like(rng, 1, 30, 4)[0]
    out = knn.knn_average(torch.from_numpy(fh).requires_grad_(), torch.from_numpy(ph).requires_grad_(), 3, 5,
                          backend="numpy")  # (the fake _C has no CPU kernels)
    assert isinstance(out, np.ndarray)
    np.testing.assert_allclose(out, reference.knn_average(fh.astype(np.float64), ph, 3, 5), atol=1e-5)
    with pytest.raises(ValueError, match="'cuda-nvrtc' needs device arrays"):
        knn.knn_indices(fh, 3, backend="cuda-nvrtc")


@pytest.mark.parametrize("backend", ["cuda-compiled", "cuda-nvrtc"])
def test_cuda_refuses_out_aliasing_probs(fake_cuda, monkeypatch, backend):
    torch = fake_cuda.torch
    f, p = _device_inputs(fake_cuda, "float32")
    real_empty = torch.empty

    def aliasing_empty(shape, dtype=None, device=None):  # an allocator handing out probs' memory again
        return p if dtype == torch.float32 and tuple(shape) == tuple(p.shape) else real_empty(shape, dtype=dtype,
                                                                                            device=device)

    monkeypatch.setattr(torch, "empty", aliasing_empty)
    with pytest.raises(ValueError, match="out must not alias probs"):
        knn.knn_average(f, p, 3, 25, backend=backend)
    assert not fake_cuda.compiled and not fake_cuda.cupy.launches


def test_cuda_path_errors(fake_cuda, monkeypatch):
    f, p = _device_inputs(fake_cuda, "float32")
    monkeypatch.setitem(sys.modules, "cupy", None)
    with pytest.raises(RuntimeError, match="needs CuPy"):
        knn.knn_average(f, p, backend="cuda-nvrtc")
    import ifseg_rt

    monkeypatch.setattr(ifseg_rt, "_C", None)
    monkeypatch.setitem(sys.modules, "ifseg_rt._C", None)
    with pytest.raises(RuntimeError, match="'cuda-compiled' needs ifseg_rt._C built with nvcc"):
        knn.knn_average(f, p, backend="cuda-compiled")
    assert knn.available_backends()[-1] == "numpy" and "cuda" not in knn.available_backends()
