"""Attention without S x S position tables (issue 21): the blocked formulation against the materialised one and the
independent float64 reference, its index tables against brute force, the absence of any S x S tensor (eager and in
the exported graph), byte-bounded table caches, and flat memory over many image shapes."""

import json
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import ofa_reference as ref  # noqa: E402
from conftest import tiny_segofa  # noqa: E402
from ifseg_rt.model import SegTableCache  # noqa: E402
from ifseg_rt.model import grid_attention as ga  # noqa: E402
from ifseg_rt.model.positions import resize_bias_2d  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# (h, w) token grids for G = 32: the outer axis kept (rows; columns = transposed), square G x G, both axes resized
# (smaller and larger than G), one row / one column, and N > G^2 with resized absolute positions
GRIDS = [(32, 40), (40, 32), (32, 32), (8, 10), (33, 35), (32, 7), (5, 32), (1, 1), (1, 7), (7, 1), (20, 24), (48, 32)]


@pytest.fixture(scope="module")
def fp64_model():
    return tiny_segofa(5, seed=3).double()


@pytest.mark.parametrize("grid", GRIDS)
def test_blocked_attention_equals_materialised_biases(fp64_model, grid, monkeypatch):
    monkeypatch.setattr(ga, "BLOCK_ELEMENTS", 4096)  # many query blocks even on small grids
    x = torch.from_numpy(np.random.default_rng(sum(grid)).standard_normal((2, 3, 16 * grid[0], 16 * grid[1])))
    with torch.no_grad():
        got, _ = fp64_model(x)
        # the explicit prompt runs the original formulation: per-layer H x S x S biases, materialised
        want, _ = fp64_model(x, src_tokens=fp64_model.prompt_tokens)
    assert got.shape == (2, grid[0] * grid[1], 5)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("grid", [(32, 36), (36, 32), (6, 9)])
def test_blocked_attention_equals_independent_reference(fp64_model, grid):
    x = np.random.default_rng(7).standard_normal((1, 3, 16 * grid[0], 16 * grid[1]))
    expect, _ = ref.segofa_forward(ref.numpy_state(fp64_model), fp64_model.config, fp64_model.prompt_tokens.tolist(),
                                   images=x)
    with torch.no_grad():
        logits, _ = fp64_model(torch.from_numpy(x))
    np.testing.assert_allclose(logits.numpy(), expect, rtol=0, atol=1e-10)


@pytest.mark.parametrize("grid", [(32, 12), (12, 32), (5, 7), (1, 6), (6, 1)])
def test_plan_orders_and_masks_match_brute_force(grid):
    h, w = grid
    G = 32
    plan = ga.make_plan(h, w, G, dtype=torch.float64)
    n = h * w
    transposed = h != G and w == G
    ho, wi = (w, h) if transposed else (h, w)
    assert (plan.ho, plan.wi, bool(plan.transposed), bool(plan.fast)) == (ho, wi, transposed, ho == G)
    ar = torch.arange(n)
    assert torch.equal(plan.key_index[plan.cell_key], ar) and torch.equal(plan.cell_key[plan.key_index], ar)
    assert torch.equal(plan.query_key[plan.key_query], ar) and torch.equal(plan.key_query[plan.query_key], ar)
    # key k = (o, i) in processing order is original cell (o, i), or (i, o) when transposed
    o, i = ar // wi, ar % wi
    r, c = (i, o) if transposed else (o, i)
    assert torch.equal(plan.key_index, r * w + c)
    # query p = (q_i, q_o') is the key (h_o - 1 - q_o', q_i)
    assert torch.equal(plan.query_key, (ho - 1 - ar % ho) * wi + ar // ho)
    # bilinear taps: rows of the dense matrix of F.interpolate applied to the identity
    eye = torch.eye(G, dtype=torch.float64)[None]
    dense = torch.nn.functional.interpolate(eye, size=ho, mode="linear", align_corners=False)[0].t()  # ho x G
    m = ga.bilinear_matrix(ho, G, torch.float64)
    np.testing.assert_allclose(m.numpy(), dense.numpy(), atol=1e-15)
    np.testing.assert_allclose(plan.tap_weight.sum(0).numpy(), 1.0, atol=1e-15)
    # the causal mask by (q_i, q_o' + k_o, k_i) equals "key after query in row-major order" for every pair
    qcell = plan.key_index[plan.query_key]  # original cell of each query-order token
    kcell = plan.key_index
    brute = kcell[None, :] > qcell[:, None]  # N x N, query order x key order
    qi, qo_r = ar // ho, ar % ho
    ko, ki = ar // wi, ar % wi
    folded = plan.causal[qi[:, None], qo_r[:, None] + ko[None, :], ki[None, :]]
    assert torch.equal(folded, brute)


@pytest.mark.parametrize("grid", [(32, 9), (9, 32), (6, 11), (32, 32)])
@pytest.mark.parametrize("causal", [False, True])
def test_rel_bias_blocks_equal_resized_reference_bias(grid, causal):
    """Every block's bias (fast strided view, or four taps) is the G x G reference bias resized to the grid, in the
    processing orders, plus the extra key rows (their bias, then the padding keys')."""
    h, w = grid
    G, H, s = 32, 3, 42
    g = torch.Generator().manual_seed(1)
    weight = torch.randn((2 * s - 1) ** 2 + 3, H, generator=g, dtype=torch.float64)
    plan = ga.make_plan(h, w, G, dtype=torch.float64)
    n = h * w
    extra = torch.randn(H, 3, generator=g, dtype=torch.float64)  # three keys outside the grid
    layout = ga.key_layout(plan, 3, G, heads=H, batch=1)
    z = ga.inner_table(ga.rel_table_2d(weight, s, G), plan, layout, G, extra, causal=causal)
    # reference: R32 from the bucket formula, resized keys then queries (positions.resize_bias_2d), reordered
    rr, cc = torch.meshgrid(torch.arange(G), torch.arange(G), indexing="ij")
    rr, cc = rr.flatten(), cc.flatten()
    bucket = (rr[:, None] - rr[None, :] + s - 1) * (2 * s - 1) + (cc[:, None] - cc[None, :] + s - 1)
    full = resize_bias_2d(weight[bucket].permute(2, 0, 1), G, h, w)  # H x N x N, row-major cells
    qcell = plan.key_index[plan.query_key]
    want = full[:, qcell][:, :, plan.key_index]
    if causal:
        want = want.masked_fill(plan.key_index[None, :] > qcell[:, None], float("-inf"))
    ho, wi = plan.ho, plan.wi
    for lo, hi in [(0, wi), (0, 1), (wi - 1, wi), (wi // 3, 2 * wi // 3 + 1)]:
        scores = torch.zeros(1, H, (hi - lo) * ho, layout.keys, dtype=torch.float64)
        block = ga.Block(lo, hi, plan.query_key[lo * ho:hi * ho], None, None, None)
        got = ga.add_rel_bias(scores, z, plan, layout, block, causal=causal)[0]
        np.testing.assert_allclose(got[:, :, :n].numpy(), want[:, lo * ho:hi * ho].numpy(), atol=1e-12)
        np.testing.assert_allclose(got[:, :, n:n + 3].numpy(), extra[:, None, :].expand(H, (hi - lo) * ho, 3).numpy(),
                                   atol=0)
        assert (got[:, :, n + 3:] == ga.PADDING_BIAS).all()  # padding keys


class _LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest tensor any aten op produces (views included)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_layer_holds_an_s_by_s_tensor(monkeypatch):
    model = tiny_segofa(5)
    grid = (32, 48)
    H, L = model.config.heads, model.prompt_tokens.numel()
    S = grid[0] * grid[1] + L
    monkeypatch.setattr(ga, "BLOCK_ELEMENTS", S * S // 4)  # eager blocks: at most a quarter of H x S x S
    x = torch.randn(1, 3, 16 * grid[0], 16 * grid[1])
    with torch.no_grad():
        tables = SegTableCache(model).get(*grid)
        features, _ = model.encoder.image_features(x)
        with _LargestTensor() as probe:
            model.transformer(features, tables)  # the encoder and decoder, every attention layer
        assert probe.largest < H * S * S // 3
        with _LargestTensor() as probe:
            model(x, src_tokens=model.prompt_tokens)  # the materialised formulation does hold them
        assert probe.largest >= H * S * S


def test_exported_graph_holds_no_s_by_s_tensor(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from pathlib import Path

    from ifseg_rt.export.exporter import export_onnx

    model = tiny_segofa(5)
    path = tmp_path / "model.onnx"
    export_onnx(model, path)
    opts = ort.SessionOptions()
    opts.enable_profiling = True
    opts.profile_file_prefix = str(tmp_path / "prof")
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    grid = (32, 40)
    n = grid[0] * grid[1]
    x = np.random.default_rng(0).standard_normal((1, 3, 16 * grid[0], 16 * grid[1])).astype(np.float32)
    sess.run(None, {"image": x})
    events = json.loads(Path(sess.end_profiling()).read_text())
    shapes = [shape for e in events for out in (e.get("args") or {}).get("output_type_shape") or []
              for shape in out.values()]
    H, S = model.config.heads, n + model.prompt_tokens.numel()
    assert shapes and max(int(np.prod(s)) for s in shapes if s) < H * S * S // 4
    # tensors with a key axis (the last dim spans the grid's cells): one query block of the image at most, an eighth
    # of the columns against every key plus the padding slots of the prompt's row
    keyed = [int(np.prod(s)) for s in shapes if s and s[-1] >= n]
    assert keyed and max(keyed) <= H * (-(-grid[1] // ga.EXPORT_BLOCKS) * grid[0]) * (S + grid[1])


def test_table_cache_is_bounded_in_bytes_and_grids():
    model = tiny_segofa(5)
    cache = SegTableCache(model, max_bytes=0)
    one = cache.get(32, 40)
    assert len(cache) == 1 and cache.nbytes == one.nbytes > 0  # the latest grid is always kept
    biggest = SegTableCache(model).get(32, 49).nbytes
    cache = SegTableCache(model, max_bytes=int(2.5 * biggest), max_grids=10)
    for w in range(40, 50):
        cache.get(32, w)
        assert cache.nbytes <= cache.max_bytes
    assert 2 <= len(cache) <= 3
    assert cache.get(32, 49) is cache.get(32, 49)
    cache = SegTableCache(model, max_grids=2)
    for w in range(40, 50):
        cache.get(32, w)
    assert cache.grids == [(32, 48), (32, 49)]
    # per grid, O(S): six position tables of H x S x head_dim, the orders and the small index tables
    S = 32 * 40 + model.prompt_tokens.numel()
    assert one.nbytes < 40 * S * model.config.d_model * 4


MEMORY_CHILD = r"""
import json, sys
import numpy as np
from ifseg_rt.runtime import Segmenter

def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) / 1024

seg = Segmenter.load(sys.argv[1], backend=sys.argv[2], threads=1)
rng = np.random.default_rng(0)
# 30 distinct shapes (long sides 256..952 px, both orientations): the five largest first, so that the 5th image
# has met the largest working set; the other 25 in random order
sides = [256 + 24 * i for i in range(30)]
order = sides[25:][::-1] + list(rng.permutation(sides[:25]))
after = {}
for i, long in enumerate(order):
    h, w = (256, int(long)) if i % 2 else (int(long), 256)
    seg.seg(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    after[i + 1] = rss()
cache = seg.backend.cache_nbytes if hasattr(seg.backend, "cache_nbytes") else seg.backend.tables.nbytes
print(json.dumps({"after": after, "cache": cache}))
"""


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_memory_is_flat_over_thirty_shapes(nano_run, tmp_path_factory, backend):
    pytest.importorskip("onnxruntime")
    from ifseg_rt.export import export
    from ifseg_rt.geometry import TABLE_CACHE_BYTES
    from ifseg_rt.runtime import ImagePolicy

    out = tmp_path_factory.getbasetemp() / "memory_nano"
    if not (out / "ifseg.json").exists():  # the paper's policy at half scale: every image keeps its own grid
        export(nano_run, out, image_policy=ImagePolicy(short_side=256, max_long_side=1024), check=False)
    proc = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(out), backend], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    after = {int(k): v for k, v in res["after"].items()}
    assert after[30] <= 1.10 * after[5], after  # 25 new shapes after the 5th: within 10 %
    assert 0 < res["cache"] <= TABLE_CACHE_BYTES
