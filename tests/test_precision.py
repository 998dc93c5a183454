"""Low-precision CPU variants behind the accuracy gate, and the split graph with per-grid cached tables."""

import dataclasses
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from ifseg_rt.export import export  # noqa: E402
from ifseg_rt.export.precision import INT8_BODY, PrecisionGateError, calibration_images  # noqa: E402
from ifseg_rt.runtime import ImagePolicy, Segmenter  # noqa: E402
from ifseg_rt.system import amx_bf16, amx_permitted  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CPU_AMX_BF16 = amx_bf16  # the real test (the fixture below replaces it in ifseg_rt.system)

POLICY = ImagePolicy(short_side=64, max_long_side=256)  # small inputs: a few seconds per export check
CALIB = 4


@pytest.fixture(autouse=True)
def cpu_with_amx(monkeypatch):
    """Every test here runs as on a CPU with AMX, whatever CPU runs the suite: a bf16 default then stays the default
    and loads without the no-AMX warning (test_bf16_without_amx_falls_back pretends the opposite)."""
    monkeypatch.setattr("ifseg_rt.system.amx_bf16", lambda: True)


@pytest.fixture(scope="module")
def calib():
    return calibration_images(None, CALIB)


@pytest.fixture(scope="module")
def int8_dir(nano_run, tmp_path_factory, calib):
    out = tmp_path_factory.mktemp("int8") / "model"
    with pytest.warns(UserWarning, match=r"int8 accuracy gate is measured on only 4 images; .* --calibration DIR"):
        export(nano_run, out, image_policy=POLICY, precision=["int8"], calibration=calib, check=False)
    return out


def _fp32_copy(int8_dir, tmp_path):
    """The int8 directory without its int8 variant: an fp32 export, without exporting again."""
    import shutil

    out = tmp_path / "model"
    shutil.copytree(int8_dir, out)
    m = json.loads((out / "ifseg.json").read_text())
    del m["precisions"], m["files"][INT8_BODY]
    m["precision"] = "fp32"
    (out / INT8_BODY).unlink()
    (out / "ifseg.json").write_text(json.dumps(m))
    return out, m


def _add(out, m, precisions, calib, min_agreement, **kw):
    from ifseg_rt.export.precision import add_precisions
    from ifseg_rt.runtime.model_dir import write_manifest

    try:  # as export() does: the manifest is written whether the gate passes or not
        with pytest.warns(UserWarning, match="accuracy gate is measured on only 4 images"):
            add_precisions(out, m, precisions, calibration=calib, min_agreement=min_agreement, **kw)
        m["precision"] = precisions[0]
    finally:
        write_manifest(out, m)


def _agreement(a: Segmenter, b: Segmenter, images) -> float:
    same = total = 0
    for im in images:
        la, lb = a.seg(im).labels, b.seg(im).labels
        same, total = same + int((la == lb).sum()), total + la.size
    return same / total


def test_int8_export_records_its_agreement(int8_dir, calib):
    m = json.loads((int8_dir / "ifseg.json").read_text())
    assert m["precision"] == "int8"
    rec = m["precisions"]["int8"]
    assert rec["backend"] == "onnxruntime" and rec["body"] == INT8_BODY and INT8_BODY in m["files"]
    assert rec["agreement"]["images"] == CALIB and rec["agreement"]["pixels"] >= 0.99
    seg = Segmenter.load(int8_dir, threads=1)  # the exported default
    assert seg.precision == "int8" and seg.backend.file == INT8_BODY and seg.agreement == rec["agreement"]
    ref = Segmenter.load(int8_dir, precision="fp32", threads=1)
    assert ref.precision == "fp32" and ref.backend.file == "body.onnx"
    # the recorded number is what the two pipelines give on the same images, recomputed here
    assert _agreement(ref, seg, calib) == pytest.approx(rec["agreement"]["pixels"], abs=0)
    # int8 weights really are int8: the quantised body is much smaller than the fp32 one
    assert (int8_dir / INT8_BODY).stat().st_size < 0.6 * (int8_dir / "body.onnx").stat().st_size
    # the ResNet passed the gate in int8 (the first candidate): its convolutions read int8 weights through
    # DequantizeLinear, their inputs are quantised with the calibrated ranges
    import onnx
    from onnx import numpy_helper

    assert rec["resnet"] == "int8" and rec["search"][0] == {"resnet": "int8", "fp32_matmuls": 0,
                                                           "pixels": rec["agreement"]["pixels"]}
    g = onnx.load(str(int8_dir / INT8_BODY)).graph
    producer = {o: n for n in g.node for o in n.output}
    inits = {i.name: i for i in g.initializer}
    convs = [n for n in g.node if n.op_type == "Conv"]
    assert convs and all(n.name.startswith("/embed_images/") for n in convs)
    for conv in convs:
        x, w = (producer.get(i) for i in conv.input[:2])
        assert x.op_type == "DequantizeLinear" and producer[x.input[0]].op_type == "QuantizeLinear"
        assert w.op_type == "DequantizeLinear" and numpy_helper.to_array(inits[w.input[0]]).dtype == np.int8
    assert not [n for n in g.node if n.op_type in ("Mul", "BatchNormalization") and n.name.startswith(
        "/embed_images/")]  # the frozen batch norms were folded into the convolutions before quantising


def test_the_gate_refuses_and_leaves_a_valid_directory(int8_dir, tmp_path, calib, monkeypatch):
    import ifseg_rt.export.precision as prec

    monkeypatch.setattr(prec, "MAX_FP32_FRACTION", 0.0)  # no MatMul kept fp32: the search is another test's
    out, m = _fp32_copy(int8_dir, tmp_path)
    with pytest.raises(PrecisionGateError, match=r"int8: labels agree with fp32 on [\d.]+ % of the pixels of 4 "
                                                  r"calibration images, below the gate of 100.00 %"):
        _add(out, m, ["int8"], calib, 1.0)
    m = json.loads((out / "ifseg.json").read_text())
    assert "int8" not in m.get("precisions", {}) and INT8_BODY not in m["files"] and not (out / INT8_BODY).exists()
    seg = Segmenter.load(out, threads=1)
    assert seg.precision == "fp32"
    from ifseg_rt.runtime import ModelDirError

    with pytest.raises(ModelDirError, match=r"offers the CPU precisions \['fp32'\], not 'int8'"):
        Segmenter.load(out, precision="int8")


def test_bf16_runs_on_the_torch_backend(int8_dir, tmp_path, calib):
    out, m = _fp32_copy(int8_dir, tmp_path)
    _add(out, m, ["bf16"], calib, 0.0, bf16_backend="torch")
    m = json.loads((out / "ifseg.json").read_text())
    assert m["precision"] == "bf16" and m["precisions"]["bf16"]["backend"] == "torch"
    assert 0.5 < m["precisions"]["bf16"]["agreement"]["pixels"] <= 1.0
    seg = Segmenter.load(out)
    assert seg.backend.name == "torch" and seg.backend.dtype == torch.bfloat16 and seg.precision == "bf16"
    with pytest.raises(ValueError, match="precision 'bf16' runs on the torch backend, not 'onnxruntime'"):
        Segmenter.load(out, backend="onnxruntime", precision="bf16")


def test_bf16_runs_on_openvino(int8_dir, tmp_path, calib):
    ov = pytest.importorskip("openvino")
    from ifseg_rt.runtime.backends.openvino import bf16_native

    out, m = _fp32_copy(int8_dir, tmp_path)
    _add(out, m, ["bf16"], calib, 0.0)  # auto: OpenVINO, installed here
    m = json.loads((out / "ifseg.json").read_text())
    rec = m["precisions"]["bf16"]
    assert m["precision"] == "bf16" and rec["backend"] == "openvino" and rec["body"] == "body.onnx"
    assert set(m["files"]) == set(json.loads((int8_dir / "ifseg.json").read_text())["files"]) - {INT8_BODY}
    seg = Segmenter.load(out, threads=1)  # the exported default
    assert seg.backend.name == "openvino" and seg.precision == "bf16" and seg.agreement == rec["agreement"]
    assert rec["agreement"]["backend"] == "openvino" and 0.5 < rec["agreement"]["pixels"] <= 1.0
    ref = Segmenter.load(out, precision="fp32", threads=1)
    assert ref.backend.name == "onnxruntime"
    assert _agreement(ref, seg, calib) == pytest.approx(rec["agreement"]["pixels"], abs=0)
    # the same graph: OpenVINO in fp32 gives onnxruntime's outputs; in bf16 (where the CPU computes it natively)
    # they differ at bfloat16's resolution, no more
    x = np.stack([ref.preprocess(im)[0] for im in calib[:2]])
    lo_ref, fe_ref = ref.backend.run(x)
    ov32 = Segmenter.load(out, backend="openvino", precision="fp32", threads=1).backend
    lo32, fe32 = ov32.run(x)
    np.testing.assert_allclose(lo32, lo_ref, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(fe32, fe_ref, atol=1e-4, rtol=1e-4)
    # grids with a side of G cells run the body with the grid Ifs folded to their fast branch; others the graph as
    # it is (compiled on first use): both give onnxruntime's outputs
    G = ov32.grid_side
    assert ov32.fast_path_ifs > 0 and ov32.flat_gathers == ov32.fast_path_ifs  # every fast branch rewritten
    assert ov32.compiled_graphs == (1 if G in (x.shape[2] // 16, -(-x.shape[3] // 16)) else 2)
    rng = np.random.default_rng(1)
    for h, w in ((16 * G, 48), (56, 16 * G), (40, 16 * G + 16), (48, 64)):  # rows = G, columns = G, neither
        xi = rng.standard_normal((1, 3, h, w)).astype(np.float32)
        for a, b in zip(ov32.run(xi), ref.backend.run(xi)):
            np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
    assert ov32.compiled_graphs == 2
    lo16, fe16 = seg.backend.run(x)
    rel = float(np.abs(fe16 - fe_ref).max() / np.abs(fe_ref).max())
    assert rel < 0.05
    if bf16_native():
        assert rel > 1e-4  # really computed in bfloat16
    # every grid's tables are computed once (by OpenVINO, in fp32) and equal onnxruntime's
    calls = []
    real = seg.backend._compute_tables

    def counting(h, w):
        calls.append((h, w))
        return real(h, w)

    from ifseg_rt.grid_cache import GridCache

    seg.backend.table_cache = GridCache(counting)
    images = calib[:2] + [np.ascontiguousarray(calib[0].transpose(1, 0, 2))]  # two grids
    seg.seg(images, batch_size=1)
    seg.seg(images[0])
    assert sorted(calls) == sorted({tuple(-(-s // 16) for s in seg.preprocess(im)[0].shape[1:]) for im in images})
    assert len(calls) == 2
    for a, b in zip(seg.backend.tables(*calls[0]), ref.backend.tables(*calls[0])):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # requests from several threads (one inference at a time inside) give what they give one by one
    from concurrent.futures import ThreadPoolExecutor

    alone = [seg.seg(im).labels for im in images]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda im: seg.seg(im).labels, images * 2))
    for a, b in zip(alone * 2, together):
        np.testing.assert_array_equal(a, b)
    # torch runs bf16 on request (the recorded agreement is OpenVINO's: none reported); onnxruntime cannot
    on_request = Segmenter.load(out, backend="torch", precision="bf16")
    assert on_request.backend.name == "torch" and on_request.agreement is None
    with pytest.raises(ValueError, match="precision 'bf16' runs on the openvino backend, not 'onnxruntime'"):
        Segmenter.load(out, backend="onnxruntime", precision="bf16")
    assert ov  # imported for the skip


def test_bf16_without_amx_falls_back(int8_dir, tmp_path, monkeypatch):
    """Without AMX (AVX512-BF16 at most: AMD EPYC, or oneDNN capped below AMX) both bf16 engines run slower than fp32:
    a bf16 default loads int8 where the directory offers it, else fp32, saying why; bf16 asked for still runs, with
    a warning."""
    import shutil
    from pathlib import Path

    pytest.importorskip("openvino")
    from ifseg_rt.runtime.backends.openvino import bf16_native

    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():  # amx_bf16: the CPU's flags, capped by ONEDNN_MAX_CPU_ISA as oneDNN caps itself, and
        # Linux's grant of the tile state (refused under benchmarks/no_amx.py)
        has_amx = " amx_bf16" in cpuinfo.read_text() and amx_permitted()
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
        assert CPU_AMX_BF16() == has_amx
        for cap in ("AVX512_CORE_BF16", "avx2"):
            monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
            assert CPU_AMX_BF16() is False
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
        assert CPU_AMX_BF16() == has_amx
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.setattr("ifseg_rt.system.amx_bf16", lambda: False)
    slow = "this CPU computes bfloat16 without AMX"

    def with_bf16_default(src, backend, dst):
        shutil.copytree(src, dst)
        m = json.loads((dst / "ifseg.json").read_text())
        m.setdefault("precisions", {})["bf16"] = {"backend": backend, **({"body": "body.onnx"} if backend == "openvino"
                                                                         else {})}
        m["precision"] = "bf16"
        (dst / "ifseg.json").write_text(json.dumps(m))
        return dst

    int8_rec = json.loads((int8_dir / "ifseg.json").read_text())["precisions"]["int8"]
    fp32_dir, _ = _fp32_copy(int8_dir, tmp_path)
    for backend in ("openvino", "torch"):
        with_int8 = with_bf16_default(int8_dir, backend, tmp_path / f"int8-{backend}")
        with pytest.warns(RuntimeWarning, match=f"defaults to bf16; {slow}.*running int8 on onnxruntime"):
            seg = Segmenter.load(with_int8, threads=1)
        assert (seg.backend.name, seg.precision, seg.agreement) == ("onnxruntime", "int8", int8_rec["agreement"])
        only_fp32 = with_bf16_default(fp32_dir, backend, tmp_path / f"fp32-{backend}")
        with pytest.warns(RuntimeWarning, match=f"defaults to bf16; {slow}.*running fp32 on onnxruntime"):
            seg = Segmenter.load(only_fp32, threads=1)
        assert (seg.backend.name, seg.precision) == ("onnxruntime", "fp32")
    # asked for, bf16 runs, each engine saying it is slow here
    match = f"{slow}.*OpenVINO's bf16.*prefer precision 'int8' or 'fp32'" if bf16_native() else \
        "neither AMX nor AVX512-BF16"
    with pytest.warns(RuntimeWarning, match=match):
        seg = Segmenter.load(with_int8, backend="openvino", precision="bf16", threads=1)
    assert (seg.backend.name, seg.precision) == ("openvino", "bf16")
    with pytest.warns(RuntimeWarning, match=f"{slow}.*torch's bf16.*prefer fp32"):
        seg = Segmenter.load(fp32_dir, backend="torch", precision="bf16", threads=1)
    assert (seg.backend.name, seg.precision) == ("torch", "bf16")


NO_AMX_PROBE = """
import json, sys, numpy as np
from ifseg_rt import _C
from ifseg_rt.runtime import Segmenter
from ifseg_rt.system import amx_bf16, amx_permitted
img = np.random.default_rng(5).integers(0, 256, (64, 96, 3), dtype=np.uint8)
out = Segmenter.load(sys.argv[1], precision="int8", knn=False, threads=1).seg(img, return_probabilities=True)
np.save(sys.argv[2], out.probabilities)
print(json.dumps({"permitted": amx_permitted(), "amx_bf16": amx_bf16(), "screen": _C.screen_isa()}))
"""


def test_no_amx_refuses_the_tile_state(int8_dir, tmp_path):
    """benchmarks/no_amx.py runs a command as on a CPU without AMX: Linux refuses it the AMX tile state, so
    amx_bf16() and the kNN's screening say no AMX, and onnxruntime's int8 GEMMs (MLAS, on VNNI instead) compute what
    they compute with AMX (exact int32 sums: the same probabilities)."""
    import subprocess
    import sys
    from pathlib import Path

    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if " amx_tile" not in flags:
        pytest.skip("this CPU has no AMX")
    ext = pytest.importorskip("ifseg_rt._C")
    if CPU_AMX_BF16() is not (" amx_bf16" in flags) or not amx_permitted() or ext.screen_isa() != "amx":
        pytest.skip("AMX is already refused or capped here (ONEDNN_MAX_CPU_ISA, IFSEG_KNN_CPU_ISA, no_amx.py)")
    script = Path(__file__).parents[1] / "benchmarks" / "no_amx.py"
    runs = {}
    for name, prefix in (("amx", []), ("no_amx", [sys.executable, str(script)])):
        p = subprocess.run(prefix + [sys.executable, "-c", NO_AMX_PROBE, str(int8_dir), str(tmp_path / name)],
                           capture_output=True, text=True, timeout=300)
        if name == "no_amx" and "cannot load libseccomp" in p.stderr:
            pytest.skip("libseccomp is not installed")
        assert p.returncode == 0, p.stderr[-3000:]
        runs[name] = (json.loads(p.stdout.splitlines()[-1]), np.load(tmp_path / f"{name}.npy"))
    assert runs["amx"][0] == {"permitted": True, "amx_bf16": " amx_bf16" in flags, "screen": "amx"}
    assert runs["no_amx"][0] == {"permitted": False, "amx_bf16": False, "screen": "avx512vnni"}
    np.testing.assert_allclose(runs["no_amx"][1], runs["amx"][1], rtol=0, atol=1e-6)


def test_openvino_compile_cache(int8_dir, tmp_path, monkeypatch):
    """cache_dir (or $IFSEG_OPENVINO_CACHE_DIR) keeps the compiled graphs; a load from the cache computes what an
    uncached one does; an unusable cache directory is named."""
    pytest.importorskip("openvino")
    from ifseg_rt.runtime.backends.openvino import CACHE_ENV

    monkeypatch.delenv(CACHE_ENV, raising=False)
    x = np.random.default_rng(3).standard_normal((1, 3, 64, 80)).astype(np.float32)
    plain = Segmenter.load(int8_dir, backend="openvino", precision="fp32", threads=1).backend
    assert plain.cache_dir is None
    cache = tmp_path / "ov-cache"
    first = Segmenter.load(int8_dir, backend="openvino", precision="fp32", threads=1, cache_dir=str(cache)).backend
    entries = sorted(p.name for p in cache.iterdir())
    assert entries  # the compiled tables and body graphs
    monkeypatch.setenv(CACHE_ENV, str(cache))
    again = Segmenter.load(int8_dir, backend="openvino", precision="fp32", threads=1).backend
    assert again.cache_dir == str(cache) and sorted(p.name for p in cache.iterdir()) == entries  # reused, not added
    for backend in (first, again):
        for a, b in zip(backend.run(x), plain.run(x)):
            np.testing.assert_array_equal(a, b)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="OpenVINO cache_dir .*a-file.* cannot be created"):
        Segmenter.load(int8_dir, backend="openvino", precision="fp32", threads=1, cache_dir=str(blocker))


def test_openvino_refusals(int8_dir, tmp_path, monkeypatch):
    import sys

    from ifseg_rt.export.precision import bf16_engine
    from ifseg_rt.runtime import ModelDirError
    from ifseg_rt.runtime.backends import BackendUnavailable

    with pytest.raises(ValueError, match="--bf16-backend openvino runs the split graph"):
        bf16_engine("openvino", split=False)
    assert bf16_engine("auto", split=False) == "torch"
    with pytest.raises(ValueError, match="must be one of"):
        bf16_engine("tensorrt", split=True)
    out, m = _fp32_copy(int8_dir, tmp_path)
    m["precisions"] = {"bf16": {"backend": "openvino"}}  # no body
    (out / "ifseg.json").write_text(json.dumps(m))
    with pytest.raises(ModelDirError, match=r"precisions.bf16.body.*required .*openvino precision"):
        Segmenter.load(out)
    m["precisions"] = {"bf16": {"backend": "openvin", "body": "body.onnx"}}
    (out / "ifseg.json").write_text(json.dumps(m))
    with pytest.raises(ModelDirError, match=r"precisions.bf16.backend.*'openvin'"):
        Segmenter.load(out)
    del m["precisions"]
    (out / "ifseg.json").write_text(json.dumps(m))
    with pytest.raises(BackendUnavailable, match="the openvino backend runs on the CPU only"):
        from ifseg_rt.runtime.backends.openvino import OpenVinoBackend
        OpenVinoBackend(Segmenter.load(out, threads=1).spec, device="cuda")
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(BackendUnavailable, match=r"pip install openvino"):
        Segmenter.load(out, backend="openvino", precision="bf16")
    # a directory whose default is bf16 on OpenVINO still loads without it: fp32 on onnxruntime, with a warning
    m["precisions"] = {"bf16": {"backend": "openvino", "body": "body.onnx"}}
    m["precision"] = "bf16"
    (out / "ifseg.json").write_text(json.dumps(m))
    with pytest.warns(RuntimeWarning, match="defaults to bf16 on OpenVINO, which is not installed here"):
        seg = Segmenter.load(out, threads=1)
    assert seg.backend.name == "onnxruntime" and seg.precision == "fp32"


def test_split_graph_computes_tables_once_per_grid(int8_dir):
    from ifseg_rt.runtime.backends.onnxruntime import OnnxRuntimeBackend
    from ifseg_rt.runtime.model_dir import PrecisionSpec

    seg = Segmenter.load(int8_dir, precision="fp32", threads=1)
    backend = seg.backend
    calls = []
    real = backend.tables_session

    class Counting:
        def run(self, names, feeds, options=None):
            calls.append(feeds["grid"].shape)
            return real.run(names, feeds, options)

    backend.tables_session = Counting()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(3)]
    images.append(rng.integers(0, 256, (64, 48, 3), dtype=np.uint8))
    results = seg.seg(images, batch_size=2) + [seg.seg(images[0])]
    assert calls == [(4, 6), (6, 4)]  # two grids, each computed once for five images
    # the split graph gives the portable model.onnx's outputs
    portable = OnnxRuntimeBackend(dataclasses.replace(seg.spec, tables_file=None,
                                                      precisions={"fp32": PrecisionSpec("fp32", "onnxruntime")}),
                                  threads=1)
    assert not portable.split and portable.file == "model.onnx"
    x = np.stack([seg.preprocess(im)[0] for im in images[:2]])
    for a, b in zip(backend.run(x), portable.run(x)):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
    assert results[0].labels.shape == (48, 64)


def test_bench_formats_table(int8_dir, tmp_path, capsys):
    from ifseg_rt.cli import cli
    from ifseg_rt.world import write_dataset

    pairs = write_dataset(tmp_path / "data", [7, 8], ["sky", "grass", "water", "sand", "ball", "star"], size=64)
    out = tmp_path / "bench.json"
    assert cli(["bench", "--model", str(int8_dir), "--formats", "--warmup", "0", "--repeats", "1", "--threads", "1",
                "--size", "48x64", "--images", str(pairs[0][0].parent), "--labels", str(pairs[0][1].parent),
                "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "backend" in printed and "agree" in printed and "mIoU" in printed
    rep = json.loads(out.read_text())
    rows = {(r["backend"], r["precision"], r.get("graph", "")): r for r in rep["formats"]}
    import importlib.util

    ov = {("openvino", "bf16", "")} if importlib.util.find_spec("openvino") else set()  # on request: not recorded
    assert set(rows) == {("onnxruntime", "int8", ""), ("onnxruntime", "fp32", ""), ("onnxruntime", "fp32", "portable"),
                         ("torch", "fp32", "")} | ov
    first = rep["formats"][0]
    assert first["agreement"] == 1.0  # the reference row
    m = json.loads((int8_dir / "ifseg.json").read_text())
    assert rows[("onnxruntime", "int8", "")]["recorded_agreement"] == m["precisions"]["int8"]["agreement"]["pixels"]
    assert rows[("onnxruntime", "int8", "")]["size_mb"] < rows[("onnxruntime", "fp32", "")]["size_mb"]
    for r in rows.values():
        assert set(r["ms"]) == {"preprocess", "engine", "knn", "resize_argmax", "total"} and r["img_s"] > 0
        assert 0 <= r["miou"] <= 100 and 0.9 <= r["agreement"] <= 1.0
    if ov:
        assert rows[("openvino", "bf16", "")]["recorded_agreement"] is None


# --- accuracy-aware int8 --------------------------------------------------------------------------------------------
def _one_matmul(tmp_path, x_shape, w):
    """An ONNX graph Y = X @ W (W an initializer), and its onnxruntime dynamic-int8 version."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from ifseg_rt.export.precision import quantize_int8

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Y"], name="mm")], "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [x_shape[0], w.shape[1]])],
        [numpy_helper.from_array(w.astype(np.float32), "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, tmp_path / "fp32.onnx")
    quantize_int8(tmp_path / "fp32.onnx", tmp_path / "int8.onnx")
    return tmp_path / "fp32.onnx", tmp_path / "int8.onnx"


def test_int8_error_model_matches_onnxruntime(tmp_path):
    """int8_matmul_error predicts the error onnxruntime's DynamicQuantizeMatMul really makes (float64 numpy vs the
    quantised graph run), for plain and outlier-heavy activations."""
    from ifseg_rt.export.precision import int8_matmul_error

    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 48))
    _, q = _one_matmul(tmp_path, (200, 64), w)
    import onnxruntime as ort

    sess = ort.InferenceSession(str(q), providers=["CPUExecutionProvider"])
    for outliers in (0.0, 40.0):
        x = rng.standard_normal((200, 64)).astype(np.float32)
        x[:2, 3] += outliers  # two large activations: coarse quantisation steps for all the others
        y = x.astype(np.float64) @ w
        real = np.linalg.norm(sess.run(None, {"X": x})[0] - y) / np.linalg.norm(y)
        assert int8_matmul_error(x, w) == pytest.approx(real, rel=0.05)
    assert int8_matmul_error(x, w) > 3 * int8_matmul_error(rng.standard_normal((200, 64)), w)


def test_int8_search_keeps_the_most_sensitive_matmuls_fp32(int8_dir, tmp_path, calib, monkeypatch):
    """The search order is the sensitivity ranking; the kept variant's graph really leaves those MatMuls in fp32."""
    import onnx

    import ifseg_rt.export.precision as prec

    out, m = _fp32_copy(int8_dir, tmp_path)
    ranked = prec.matmul_sensitivity(out / "body.onnx", prec.body_feeds(out, m, calib))
    m.setdefault("precisions", {})["int8"] = {"backend": "onnxruntime", "body": INT8_BODY}
    assert len(ranked) > 8 and ranked[0][1] >= ranked[-1][1] > 0

    def agreement(spec, precision, images, reference=None, threads=None):  # better with every fp32 MatMul
        kept = [n.name for n in onnx.load(str(out / INT8_BODY)).graph.node if n.op_type == "MatMul"]
        return {"pixels": 0.9 + 0.02 * len([n for n, _ in ranked if n in kept]), "images": len(images)}

    monkeypatch.setattr(prec, "label_agreement", agreement)
    res = prec.int8_search(out, m, calib, reference=None, min_agreement=0.95)
    # the ResNet in int8 first, then in fp32, then 1, 2, 4 MatMuls in fp32: 0.90, 0.90, 0.92, 0.94, 0.98
    assert [(t["resnet"], t["fp32_matmuls"]) for t in res["search"]] == [
        ("int8", 0), ("fp32", 0), ("fp32", 1), ("fp32", 2), ("fp32", 4)]
    assert res["resnet"] == "fp32"
    assert res["fp32_matmuls"] == [n for n, _ in ranked[:4]] and res["agreement"]["pixels"] == pytest.approx(0.98)
    g = onnx.load(str(out / INT8_BODY)).graph
    assert {n.name for n in g.node if n.op_type == "MatMul"} >= set(res["fp32_matmuls"])
    assert res["int8_matmuls"] == len(ranked) - 4 and res["sensitive"][0][0] == ranked[0][0]


def test_export_command_prints_the_trade_off(nano_run, tmp_path, calib, capsys):
    """``python -m ifseg_rt.export --precision int8`` says what runs in which precision and the agreement it measured,
    as recorded in ifseg.json."""
    from PIL import Image

    from ifseg_rt.cli import cli

    folder = tmp_path / "calib"
    folder.mkdir()
    for i, im in enumerate(calib):
        Image.fromarray(im).save(folder / f"{i}.png")
    import importlib.util

    out = tmp_path / "model"
    bf16 = importlib.util.find_spec("openvino") is not None  # then also bf16, on OpenVINO
    with pytest.warns(UserWarning, match="only 4 images"):
        assert cli(["export", str(nano_run), "--out", str(out), "--precision", "int8,bf16" if bf16 else "int8",
                    "--calibration", str(folder), "--short-side", "64", "--max-long-side", "256", "--no-check",
                    "--threads", "1", "--min-agreement", "0.5", "--bf16-backend", "openvino" if bf16 else "auto"]) == 0
    printed = capsys.readouterr().out
    recs = json.loads((out / "ifseg.json").read_text())["precisions"]
    rec = recs["int8"]
    assert f"int8: the ResNet runs in {rec['resnet']}" in printed
    assert f"labels equal fp32's on {100 * rec['agreement']['pixels']:.2f} % of the pixels of 4 calibration" in printed
    if bf16:
        assert recs["bf16"]["backend"] == "openvino"
        assert (f"bf16 (openvino): labels equal fp32's on {100 * recs['bf16']['agreement']['pixels']:.2f} % of the "
                f"pixels of 4 calibration") in printed


def test_a_body_above_the_protobuf_limit_keeps_its_weights_outside(int8_dir, tmp_path, calib, monkeypatch):
    """Bodies larger than EXTERNAL_BYTES (OFA-Huge's: a protobuf holds 2 GB) go through the static int8 ResNet with
    their weights in .data files; the result equals the in-protobuf path's, and no intermediate file is left."""
    import os

    import onnxruntime as ort

    import ifseg_rt.export.precision as prec

    out, m = _fp32_copy(int8_dir, tmp_path)
    before = set(os.listdir(out))
    feeds = prec.body_feeds(out, m, calib)
    assert prec.quantize_resnet(out / "body.onnx", tmp_path / "inline.onnx", feeds, external=False) > 0
    assert prec.quantize_resnet(out / "body.onnx", tmp_path / "outside.onnx", feeds, external=True) > 0
    files = prec.external_data(tmp_path / "outside.onnx")
    assert [f.name for f in files] == ["outside.onnx", "outside.onnx.data"] and all(f.is_file() for f in files)
    assert prec.external_data(tmp_path / "inline.onnx") == [tmp_path / "inline.onnx"]
    assert not [f for f in os.listdir(tmp_path) if ".folded" in f]  # the optimiser's graphs are gone
    a, b = (ort.InferenceSession(str(tmp_path / f), providers=["CPUExecutionProvider"]) for f in
            ("inline.onnx", "outside.onnx"))
    for x, y in zip(a.run(None, feeds[0]), b.run(None, feeds[0])):
        np.testing.assert_array_equal(x, y)
    # the whole search with every intermediate graph outside: the same record, nothing left behind
    monkeypatch.setattr(prec, "EXTERNAL_BYTES", 0)
    m.setdefault("precisions", {})["int8"] = {"backend": "onnxruntime", "body": INT8_BODY}
    reference = prec.reference_labels(prec.parse_manifest({**m, "precisions": {}}, out), calib)
    res = prec.int8_search(out, m, calib, reference, prec.MIN_AGREEMENT)
    assert res["resnet"] == "int8" and set(os.listdir(out)) == before | {INT8_BODY}
