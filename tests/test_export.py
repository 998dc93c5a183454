"""Export: branch-free wrapper, ONNX graph vs SegOFA in onnxruntime, ifseg.json, CLI and its errors."""

import json
import types

import numpy as np
from PIL import Image
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from conftest import CATEGORIES, make_run_dir, tiny_config, tiny_segofa, write_tiny_bpe  # noqa: E402

@pytest.fixture(scope="module")
def model_dir(shared_export):
    return shared_export


@pytest.fixture(scope="module")
def segofa():
    return tiny_segofa(len(CATEGORIES), seed=0)


# --- the wrapper (eager) ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("hw", [(128, 160), (528, 512), (512, 512), (100, 130), (16, 640)])
def test_wrapper_equals_segofa(segofa, hw):
    """Both position rules (N < G^2 direct lookup on a non-32 grid, N > G^2 resize, the 32x32 identity), with the
    shape-dependent tables computed in the graph and baked as constants (static_grid)."""
    from ifseg_rt.export import IFSegOnnxModel

    x = torch.randn(1, 3, *hw, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = segofa(x)
        outs = [IFSegOnnxModel(segofa)(x)]
        if hw[0] * hw[1] < 512 * 512:
            outs.append(IFSegOnnxModel(segofa, static_grid=(-(-hw[0] // 16), -(-hw[1] // 16)))(x))
    for out in outs:
        for a, b in zip(ref, out):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_wrapper_needs_prompt():
    from ifseg_rt.export import IFSegOnnxModel
    from ifseg_rt.model import build_model

    with pytest.raises(ValueError, match="no prompt"):
        IFSegOnnxModel(build_model(tiny_config(), 3))


# --- the exported graph ------------------------------------------------------------------------------------------
def test_onnx_checker_and_io(model_dir):
    path = model_dir / "model.onnx"
    onnx.checker.check_model(str(path))
    m = onnx.load(str(path), load_external_data=False)
    assert max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert any(n.op_type == "LayerNormalization" for n in m.graph.node)
    dims = lambda vi: [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]  # noqa: E731
    assert [i.name for i in m.graph.input] == ["image"]
    assert dims(m.graph.input[0]) == ["batch", 3, "height", "width"]
    assert {o.name: dims(o) for o in m.graph.output} == {"logits": ["batch", "cells", 5],
                                                         "features": ["batch", "cells", 128]}
    meta = {p.key: p.value for p in m.metadata_props}
    assert json.loads(meta["ifseg_rt.categories"]) == CATEGORIES
    assert json.loads(meta["ifseg_rt.knn"])["k"] == 3


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("hw", [(128, 160), (512, 640)])  # N = 80 < 1024 on a non-32 grid; N = 1280 > 1024
def test_onnxruntime_equals_segofa(model_dir, segofa, batch, hw):
    sess = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(batch, 3, *hw, generator=torch.Generator().manual_seed(batch))
    with torch.inference_mode():
        logits, feats = segofa(x)
    lo, fo = sess.run(["logits", "features"], {"image": x.numpy()})
    np.testing.assert_allclose(lo, logits.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(fo, feats.numpy(), atol=1e-4, rtol=1e-5)


def test_manifest(model_dir):
    from ifseg_rt.runtime.model_dir import file_sha256, load_model_dir

    d = json.loads((model_dir / "ifseg.json").read_text())
    assert d["schema_version"] == 2 and d["categories"] == CATEGORIES and d["num_categories"] == 5
    assert d["image"]["policy"]["mode"] == "short_side" and d["image"]["policy"]["short_side"] == 512
    assert d["image"]["input"]["dtype"] == "float32" and d["image"]["input"]["mean"] == [0.5] * 3
    assert d["patch_stride"] == 16 and d["knn"] == {"enabled": True, "k": 3, "iters": 25, "temperature": 1.0}
    assert d["outputs"]["features"]["shape"] == ["batch", "cells", 128]
    assert d["onnx"]["dynamic"] and d["onnx"]["static_shape"] is None and d["onnx"]["opset"] >= 17
    assert set(d["files"]) == {"model.onnx", "tables.onnx", "body.onnx", "model.safetensors"}
    assert d["onnx"]["tables"] == "tables.onnx" and d["onnx"]["body"] == "body.onnx" and d["precision"] == "fp32"
    for name, rec in d["files"].items():
        assert rec["sha256"] == file_sha256(model_dir / name)
        assert rec["bytes"] == (model_dir / name).stat().st_size
    prov = d["provenance"]
    assert prov["weights_sha256"] and prov["versions"]["torch"] and prov["run"]["finished"] is True
    err = prov["verification"]["max_abs_error"]
    assert err["logits"] < 1e-4 and err["split_logits"] < 1e-4 and err["split_features"] < 1e-3
    spec = load_model_dir(model_dir)
    spec.verify()
    assert spec.config["d_model"] == 32


# --- static shape, un-adapted source, CLI ----------------------------------------------------------------------
def test_static_shape_export(tmp_path, segofa):
    from ifseg_rt.export import export

    spec = export(make_run_dir(tmp_path), tmp_path / "static", static_shape=(96, 128), 
                  save_weights=False)
    assert spec.static_shape == (96, 128) and spec.policy.mode == "fixed" and spec.policy.size == (96, 128)
    assert set(spec.files) == {"model.onnx"}
    m = onnx.load(str(tmp_path / "static" / "model.onnx"))
    assert [d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim][1:] == [3, 96, 128]
    # position tables are constants: no Resize left in the graph
    assert not any(n.op_type == "Resize" for n in m.graph.node)
    sess = ort.InferenceSession(str(tmp_path / "static" / "model.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        logits, _ = segofa(x)
    np.testing.assert_allclose(sess.run(["logits"], {"image": x.numpy()})[0], logits.numpy(), atol=1e-4, rtol=0)


def test_unadapted_ofa_exports_with_warning(tmp_path, capsys):
    from ifseg_rt.checkpoint import save_checkpoint
    from ifseg_rt.export import ZeroShotWarning
    from ifseg_rt.cli.export import main
    from ifseg_rt.model import build_model

    torch.manual_seed(0)
    ckpt = save_checkpoint(build_model(tiny_config()), tmp_path / "ofa.safetensors")
    argv = [str(ckpt), "--out", str(tmp_path / "zs"), "--no-weights",
            "--prompt-prefix", " a"]  # the tiny vocabulary spells IFSeg's prefix letter by letter
    assert main(argv) == 2  # no categories: a clear error, not a crash
    assert "un-adapted OFA checkpoint" in capsys.readouterr().err
    with pytest.warns(ZeroShotWarning, match="zero-shot baseline"):
        rc = main(argv + ["--categories", "ab, a ab, c", "--bpe-dir",
                          str(write_tiny_bpe(tmp_path / "bpe", ["a", "ab", "c", "unknown"]))])
    assert rc == 0
    out = capsys.readouterr().out
    assert "python -m ifseg_rt segment --model" in out
    d = json.loads((tmp_path / "zs" / "ifseg.json").read_text())
    assert d["categories"] == ["ab", "a ab", "c"] and d["provenance"]["zero_shot"] is True


def test_cli_rejects_bad_options(tmp_path, capsys, model_dir):
    from ifseg_rt.cli.export import main
    from ifseg_rt.export.exporter import resolve_format

    assert resolve_format("trt")["arg"] == resolve_format("tensorrt")["arg"] == "engine"
    run = str(make_run_dir(tmp_path))
    for argv, msg in [([run, "--out", str(tmp_path / "o"), "--precision", "fp16"], "fp16 is a GPU precision"),
                      ([run, "--out", str(tmp_path / "o"), "--precision", "int4"], "expected precisions from"),
                      ([run, "--out", str(tmp_path / "o"), "--format", "engine", "--precision", "int8"],
                       "--format engine takes one --precision of fp32, fp16, bf16"),
                      ([run, "--out", str(tmp_path / "o"), "--min-agreement", "1.5"], "--min-agreement must be"),
                      ([run, "--out", str(tmp_path / "o"), "--format", "coreml"], "unknown export format"),
                      ([run, "--out", str(tmp_path / "o"), "--opset", "16"], "--opset must be >= 17"),
                      ([run, "--out", str(tmp_path / "o"), "--static-shape", "8x8"], "must be >= 16 px"),
                      ([run, "--out", str(tmp_path / "o"), "--max-shape", "1x64x64"], "--max-shape are not valid")]:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        assert msg in capsys.readouterr().err, argv
    assert main([str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main([run, "--out", str(model_dir)]) == 2  # existing directory without --force
    assert "not empty" in capsys.readouterr().err
    assert main([run, "--out", str(tmp_path / "o"), "--categories", "a, b"]) == 2
    assert "baked into the weights" in capsys.readouterr().err


def test_cli_refuses_unusable_image_and_opset_flags_before_any_work(tmp_path, capsys, monkeypatch):
    """An over-large --image-size (used to be a traceback), a fixed size with the paper policy's --short-side /
    --max-long-side (used to drop them silently, even at their default values) and an --opset above the exporter's
    (used to fail after the model was loaded): exit 2 with one error line, export() never called."""
    import ifseg_rt.cli.export as cli
    from torch.onnx import _constants

    class Reached(Exception):
        pass

    def fake_export(*_a, **kw):
        raise Reached(kw)

    monkeypatch.setattr(cli, "export", fake_export)
    from ifseg_rt.export.exporter import MAX_OPSET

    top = _constants.ONNX_MAX_OPSET  # 21-23 export and run, beyond the TorchScript exporter's documented 20
    assert MAX_OPSET == top  # our bound follows the installed torch's (private) one
    run, out = str(make_run_dir(tmp_path)), str(tmp_path / "o")
    for extra, msg in [(["--image-size", "2048x2048"], "fixed size 2048x2048"),
                       (["--image-size", "64x64", "--short-side", "256"], "--short-side and --image-size"),
                       (["--image-size", "64x64", "--short-side", "512"], "--short-side and --image-size"),
                       (["--static-shape", "32x48", "--short-side", "256"], "--short-side and --static-shape"),
                       (["--static-shape", "32x48", "--max-long-side", "64"], "--max-long-side and --static-shape"),
                       (["--static-shape", "32x48", "--max-long-side", "2048"], "--max-long-side and --static-shape"),
                       (["--opset", "99"], f"--opset must be <= {top}"),
                       (["--opset", str(top + 1)], f"--opset must be <= {top}")]:
        with pytest.raises(SystemExit) as e:
            cli.main([run, "--out", out, *extra])
        assert e.value.code == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("python -m ifseg_rt.export: error: ") and msg in err[-1], (extra, err)
    assert not (tmp_path / "o").exists()
    for extra in (["--static-shape", "32x48", "--image-size", "32x48"], ["--opset", str(top)],
                  ["--short-side", "256", "--max-long-side", "512"]):  # still valid: they reach export()
        with pytest.raises(Reached):
            cli.main([run, "--out", out, *extra])


# --- TensorRT helpers (TensorRT itself cannot be installed here) ------------------------------------------------
def test_tensorrt_module_without_tensorrt(monkeypatch):
    import sys

    from ifseg_rt.export import tensorrt as t

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(ImportError, match="TensorRT is not installed"):
        t.import_tensorrt()
    assert t.parse_shape("2x512x640", t.DEFAULT_MIN) == (2, 3, 512, 640)
    assert t.parse_shape("1,3,256,256", t.DEFAULT_MIN) == (1, 3, 256, 256)
    assert t.profile_shapes(static_shape=(96, 128)) == [((1, 3, 96, 128), (1, 3, 96, 128), (4, 3, 96, 128))]
    with pytest.raises(ValueError, match="min <= opt <= max"):
        t.profile_shapes(min_shape="1x1024x4096")
    from ifseg_rt.runtime.model_dir import engine_file

    assert engine_file("NVIDIA H100 80GB HBM3", "fp16") == "engines/nvidia-h100-80gb-hbm3-fp16.engine"


def _fake_tensorrt(version="10.3.0", bf16=True):
    """The slice of the TensorRT API the exporter uses. Like the real ``network.get_layer``, layers come back as the
    base ``ILayer`` whatever they are: ``.op`` exists only after a downcast to ``IUnaryLayer``."""
    LT = types.SimpleNamespace(NORMALIZATION="norm", SOFTMAX="softmax", REDUCE="reduce", UNARY="unary",
                               MATRIX_MULTIPLY="mm", ELEMENTWISE="ew", CONVOLUTION="conv")
    ops = types.SimpleNamespace(SQRT="sqrt", ERF="erf", EXP="exp", RECIP="recip", ABS="abs")

    class ILayer:
        def __init__(self, type, name, op=None):
            self.type, self.name, self.num_outputs, self.precision, self.types = type, name, 1, None, {}
            self._unary_op = op  # held by the C++ object; reachable only through IUnaryLayer.op

        def get_output(self, j):
            return types.SimpleNamespace(dtype="f16")

        def set_output_type(self, j, dt):
            self.types[j] = dt

    class IUnaryLayer(ILayer):
        @property
        def op(self):
            return self._unary_op

    flags = {"FP16": "fp16", "OBEY_PRECISION_CONSTRAINTS": "obey", **({"BF16": "bf16"} if bf16 else {})}
    return types.SimpleNamespace(__version__=version, LayerType=LT, UnaryOperation=ops, ILayer=ILayer,
                                 IUnaryLayer=IUnaryLayer, BuilderFlag=types.SimpleNamespace(**flags),
                                 float32="f32", float16="f16", bfloat16="bf16")


def test_tensorrt_layer_selection_with_fake_module():
    from ifseg_rt.export.tensorrt import keeps_fp32, pin_precision

    trt = _fake_tensorrt()
    L = trt.ILayer
    # unary layers named so that only their operation can select them
    layers = [L("norm", "node_LayerNormalization_3"), L("softmax", "node_Softmax_7"), L("reduce", "node_ReduceSum_1"),
              L("unary", "node_17", op="erf"), L("mm", "node_MatMul_4"), L("conv", "node_Conv_0"),
              L("ew", "/encoder/attn_ln/Mul"), L("unary", "node_18", op="abs"), L("unary", "node_19", op="sqrt")]
    assert not any(hasattr(x, "op") for x in layers)
    assert [keeps_fp32(x, trt) for x in layers] == [True, True, True, True, False, False, True, False, True]
    layers = [L(x.type, x.name, x._unary_op) for x in layers]
    outs = [types.SimpleNamespace(dtype="f16"), types.SimpleNamespace(dtype="f16")]
    net = types.SimpleNamespace(num_layers=len(layers), get_layer=lambda i: layers[i], num_outputs=2,
                                get_output=lambda i: outs[i])
    assert pin_precision(net, trt) == 6
    assert layers[3].precision == "f32" and layers[3].types == {0: "f32"} and layers[4].precision is None
    assert layers[7].precision is None and layers[8].precision == "f32"
    assert [o.dtype for o in outs] == ["f32", "f32"]


def test_tensorrt_profile_limit(model_dir, monkeypatch):
    import sys

    from ifseg_rt.export import tensorrt as t
    from ifseg_rt.model.grid_attention import EXPORT_BLOCKS

    # the default profiles hold every input of the paper policy (short side 512, long side <= 2048) at batch 4 ...
    profiles = t.profile_shapes()
    assert len(profiles) == 2
    for hw in [(512, 2048), (2048, 512), (512, 512), (512, 688), (96, 2048), (2048, 40)]:
        assert any(all(a <= b <= c for a, b, c in zip(mn, (4, 3, *hw), mx)) for mn, _, mx in profiles), hw
    # ... and every registry size fits TensorRT's tensor limit there, with the longest prompt the positions allow
    for heads in (4, 8, 12, 16):
        for _, _, mx in profiles:
            t.check_profile(mx, heads=heads, prompt_tokens=1024)
    # the largest attention tensor is a query block's scores: 512 x 2048 px = 32 x 128 cells, 8 blocks of 16
    # columns x 32 rows = 512 queries against 4096 cells + the 40-token prompt padded to one row of 128 slots
    assert EXPORT_BLOCKS == 8
    assert t.attention_elements((4, 3, 512, 2048), heads=12, prompt_tokens=40) == 4 * 12 * 512 * (4096 + 128)
    assert t.attention_elements((4, 3, 512, 2048), heads=12, prompt_tokens=40) < 2 ** 31 // 20
    # 2048 x 2048 px: blocks of 16 columns x 128 rows against 16 384 + 128 keys, 405 M elements per image
    with pytest.raises(ValueError, match=r"--max-shape 8x2048x2048 \(16384 cells\) is too large for TensorRT: an "
                                         r"attention block's scores would be a tensor of 3,246,391,296 elements .* use "
                                         r"batch <= 5 at this size"):
        t.check_profile((8, 3, 2048, 2048), heads=12, prompt_tokens=40)
    t.check_profile((5, 3, 2048, 2048), heads=12, prompt_tokens=40)
    # one shape given: one profile, the missing ones from the first default
    assert t.profile_shapes(max_shape="2x1024x1024") == [(t.DEFAULT_MIN, t.DEFAULT_OPT, (2, 3, 1024, 1024))]
    # build_engine checks every profile against the model directory's dims before it needs TensorRT
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(ValueError, match="--max-shape 8x4096x4096"):  # the tiny model has 4 heads
        t.build_engine(model_dir / "model.onnx", model_dir, max_shape="8x4096x4096")
    with pytest.raises(ImportError, match="TensorRT is not installed"):  # the default profiles pass the check
        t.build_engine(model_dir / "model.onnx", model_dir)
    with pytest.raises(ValueError, match=r"--static-shape.*too large"):
        t.build_engine(model_dir / "model.onnx", model_dir, static_shape=(4096, 4096), max_shape="8x4096x4096")


def _fake_builder(monkeypatch):
    """The fake TensorRT of :func:`_fake_tensorrt` with a builder that records its profiles and "serialises" the
    bytes b"engine"; a fake GPU. Returns the list the profiles are recorded in."""
    import sys

    from ifseg_rt.export import tensorrt as t

    trt = _fake_tensorrt()
    built = []

    class Profile:
        def set_shape(self, name, mn, op, mx):
            self.shape = (name, mn, op, mx)

    class Config:
        def set_memory_pool_limit(self, *a):
            pass

        def set_flag(self, flag):
            pass

        def add_optimization_profile(self, p):
            built.append(p.shape)

        def create_timing_cache(self, data):
            return data

        def set_timing_cache(self, cache, ignore_mismatch):
            pass

        def get_timing_cache(self):
            return types.SimpleNamespace(serialize=lambda: b"cache")

    net = types.SimpleNamespace(num_layers=0, num_outputs=0)
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    trt.Builder = lambda logger: types.SimpleNamespace(
        create_network=lambda flags: net, create_builder_config=Config,
        create_optimization_profile=Profile, build_serialized_network=lambda n, c: b"engine")
    trt.OnnxParser = lambda n, logger: types.SimpleNamespace(parse_from_file=lambda f: True)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE=0)
    trt.BuilderFlag = types.SimpleNamespace(FP16="fp16", OBEY_PRECISION_CONSTRAINTS="obey")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(t, "gpu_name", lambda: "NVIDIA Fake GPU")
    return built


def test_tensorrt_build_records_both_profiles(model_dir, monkeypatch, tmp_path):
    import shutil

    from ifseg_rt.export import tensorrt as t
    from ifseg_rt.runtime.model_dir import parse_manifest

    built = _fake_builder(monkeypatch)
    out = tmp_path / "m"
    shutil.copytree(model_dir, out)
    rec = t.build_engine(out / "model.onnx", out, precision="fp32")
    assert built == [("image", *p) for p in t.DEFAULT_PROFILES]
    assert rec["profiles"] == [{"min": list(a), "opt": list(b), "max": list(c)} for a, b, c in t.DEFAULT_PROFILES]
    assert (out / rec["file"]).read_bytes() == b"engine"
    # the manifest round trip keeps both; an input picks the first profile that holds it
    manifest = json.loads((out / "ifseg.json").read_text())
    manifest["engines"] = [{k: rec[k] for k in ("file", "gpu", "precision", "tensorrt_version", "profiles")}]
    manifest["files"][rec["file"]] = {"bytes": 6, "sha256": "0" * 64}
    eng = parse_manifest(manifest, None).engines[0]
    assert eng.profile_for((1, 3, 512, 2048)) == 0 and eng.profile_for((4, 3, 2048, 512)) == 1
    assert eng.profile_for((1, 3, 512, 512)) == 0 and eng.profile_for((1, 3, 1024, 1024)) is None


def test_export_format_engine_runs_to_the_end(monkeypatch, tmp_path):
    """export(format="engine") builds the engine before ifseg.json is written (the build reads the manifest in
    progress), then records it: the directory loads and lists the engine (fake TensorRT, fake GPU)."""
    from ifseg_rt.export import export
    from ifseg_rt.export import tensorrt as t

    built = _fake_builder(monkeypatch)
    spec = export(make_run_dir(tmp_path), tmp_path / "m", format="engine", check=False, split=False)
    assert built == [("image", *p) for p in t.DEFAULT_PROFILES]
    (engine,) = spec.engines
    assert engine.gpu == "NVIDIA Fake GPU" and (tmp_path / "m" / engine.file).read_bytes() == b"engine"
    spec.verify()


def test_export_format_engine_is_refused_before_any_work(monkeypatch, tmp_path):
    import sys

    from ifseg_rt.export import export

    run = make_run_dir(tmp_path)
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(ImportError, match="TensorRT is not installed"):
        export(run, tmp_path / "m", format="engine")
    with pytest.raises(ValueError, match=r"workspace_gb \(--workspace-gb\) must be a number > 0, got -1"):
        export(run, tmp_path / "m", format="engine", workspace_gb=-1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [run.name]  # no model directory, no partial work left


def test_low_precision_arguments_are_checked_before_any_work(tmp_path):
    from ifseg_rt.export import export

    run = make_run_dir(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "tiny").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "tiny" / "a.png")
    for kw, match in [(dict(precision=["int8", "int8"]), "lists int8 more than once"),
                      (dict(calibration=tmp_path / "empty"), "--calibration measures the label agreement"),
                      (dict(precision=["int8"], calibration=tmp_path / "nope"), "calibration folder not found"),
                      (dict(precision=["int8"], calibration=tmp_path / "empty"), "no images"),
                      (dict(precision=["int8"], calibration=tmp_path / "tiny"), "too small for one 16x16 patch")]:
        with pytest.raises((ValueError, FileNotFoundError), match=match):
            export(run, tmp_path / "m", **kw)
    assert not (tmp_path / "m").exists() and not list(tmp_path.glob(".m.partial-*"))


def test_a_model_with_nan_weights_is_not_exported(tmp_path):
    """NaN outputs used to pass the parity check (max(0.0, nan) is 0.0) and crash the runtime's kNN later."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from ifseg_rt.export import export

    run = make_run_dir(tmp_path)
    weights = run / "model.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        meta = f.metadata()
    state = load_file(str(weights))
    state["encoder.layers.0.fc1.weight"][0, 0] = float("nan")
    save_file(state, str(weights), metadata=meta)
    with pytest.raises(RuntimeError, match=r"the model's outputs are not finite .* nothing was exported"):
        export(run, tmp_path / "m", split=False, save_weights=False)
    assert not (tmp_path / "m").exists()


def test_tensorrt_bf16_needs_tensorrt_9(model_dir, monkeypatch):
    import sys

    from ifseg_rt.export import tensorrt as t

    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt("8.6.1", bf16=False))
    with pytest.raises(ValueError, match=r"precision 'bf16' needs TensorRT >= 9 .*8\.6\.1 is installed"):
        t.build_engine(model_dir / "model.onnx", model_dir, precision="bf16")
