"""Word-grid synthesis (ifseg.md §5) and the word-cell embeddings (§6)."""

import io

import numpy as np
import pytest
import torch
from conftest import tiny_segofa

from ifseg_rt.adapt.grids import WordGridSampler, mismatch_fraction, nearest_indices, nearest_resize


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _floor_index(n_in, n_out):
    """Independent float64 re-computation of src = floor(dst * in / out)."""
    return np.floor(np.arange(n_out, dtype=np.float64) * n_in / n_out).astype(np.int64)


def test_nearest_indices():
    for n_in in range(1, 33):
        for n_out in (32, 512, 8, 128):
            idx = nearest_indices(n_in, n_out)
            assert np.array_equal(idx, _floor_index(n_in, n_out))
            assert np.array_equal(idx, np.arange(n_out) * n_in // n_out)
    g = np.arange(6).reshape(2, 3)
    assert np.array_equal(nearest_resize(g, 4), [[0, 0, 1, 2], [0, 0, 1, 2], [3, 3, 4, 5], [3, 3, 4, 5]])


def test_side_and_category_statistics():
    m, n = 7, 20000
    s = WordGridSampler(m, grid=32, seed=0)
    shapes = np.array([s.sample_grid().shape for _ in range(n)])
    assert shapes.min() == 1 and shapes.max() == 32
    for axis in (0, 1):
        counts = np.bincount(shapes[:, axis], minlength=33)[1:]
        assert (counts > 0).all()
        expected = n / 32  # 625, sd ~ 24
        assert np.abs(counts - expected).max() < 0.25 * expected, counts
        chi2 = ((counts - expected) ** 2 / expected).sum()
        assert chi2 < 80  # 31 degrees of freedom: p ~ 1e-6
    assert abs(np.corrcoef(shapes[:, 0], shapes[:, 1])[0, 1]) < 0.03  # U and V independent

    cells = np.concatenate([s.sample_grid().ravel() for _ in range(2000)])
    assert cells.min() == 0 and cells.max() == m - 1  # "unknown" (= M) never drawn
    freq = np.bincount(cells, minlength=m) / cells.size
    assert np.abs(freq - 1 / m).max() < 0.01


def test_batch_matches_independent_resizes():
    m, batch = 5, 48
    s = WordGridSampler(m, grid=32, seed=1)
    twin = WordGridSampler(m, grid=32, seed=1)
    out = s.sample(batch)
    assert out.cells.shape == (batch, 32, 32) and out.targets.shape == (batch, 512, 512)
    assert out.cells.dtype == out.targets.dtype == np.int64
    differs = 0
    for b in range(batch):
        g = twin.sample_grid()  # sample() draws the grids in the same order
        u, v = g.shape
        assert tuple(out.shapes[b]) == (u, v)
        tgt = g[_floor_index(u, 512)][:, _floor_index(v, 512)]  # tgt[p, q] = g[floor(p U/512), floor(q V/512)]
        tok = g[_floor_index(u, 32)][:, _floor_index(v, 32)]  # tok[r, c] = g[floor(r U/32), floor(c V/32)]
        assert np.array_equal(out.targets[b], tgt)
        assert np.array_equal(out.cells[b], tok)
        differs += not np.array_equal(np.kron(tok, np.ones((16, 16), np.int64)), tgt)
    assert differs > 0  # tgt is resized from g, not from tok


def test_mismatch_fraction_spec_value():
    def independent(u):
        p = np.arange(512)
        return np.mean(np.floor(p * u / 512) != np.floor((p // 16) * u / 32))

    fr = [independent(u) for u in range(1, 33)]
    assert round(100 * np.mean(fr), 2) == 19.04  # ifseg.md §5
    assert [mismatch_fraction(u) for u in range(1, 33)] == pytest.approx(fr, abs=0)
    assert all(fr[u - 1] == 0 for u in (1, 2, 4, 8, 16, 32))


def test_generalised_grid_and_max_side():
    s = WordGridSampler(3, grid=8, max_side=4, seed=2)
    out = s.sample(64)
    assert out.cells.shape == (64, 8, 8) and out.targets.shape == (64, 128, 128)
    assert out.shapes.min() >= 1 and out.shapes.max() <= 4
    with pytest.raises(ValueError, match="num_categories"):
        WordGridSampler(0)


def test_sampler_state_roundtrip():
    s = WordGridSampler(4, grid=8, seed=5)
    s.sample(3)
    buf = io.BytesIO()
    torch.save({"sampler": s.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)["sampler"]
    a = s.sample(4)
    s2 = WordGridSampler(4, grid=8, seed=99)
    s2.load_state_dict(state)
    b = s2.sample(4)
    assert np.array_equal(a.cells, b.cells) and np.array_equal(a.targets, b.targets)


def test_word_grid_embeddings_are_subword_means():
    model = tiny_segofa(5, seed=3, patch_image_size=64)
    E = model.encoder.embed_tokens.weight.detach().double()
    offs = model.category_offsets.tolist() + [model.category_token_ids.numel()]
    ids = model.category_token_ids.tolist()
    manual = torch.stack([E[ids[a:b]].mean(0) for a, b in zip(offs[:-1], offs[1:])])
    assert any(b - a > 1 for a, b in zip(offs[:-1], offs[1:]))  # some categories have several subwords
    cells = torch.from_numpy(WordGridSampler(5, grid=4, seed=0).sample(3).cells)
    emb = model.word_grid_embeddings(cells.reshape(3, -1)).double()
    torch.testing.assert_close(emb, manual[cells.reshape(3, -1)], rtol=0, atol=1e-7)
    # the frozen category table Sg (= the head) holds the same means
    torch.testing.assert_close(model.encoder.seg_embed_tokens.weight.double(), manual, rtol=0, atol=1e-7)
