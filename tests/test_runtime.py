"""Runtime: Segmenter (onnxruntime CPU, torch) vs SegOFA + reference post-processing, errors, CLIs, torch-free."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from conftest import CATEGORIES  # noqa: E402

from ifseg_rt.runtime import ImagePolicy, ModelDirError, Segmenter  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(shared_export):
    return shared_export


def _small(seg: Segmenter, size=(96, 128)) -> Segmenter:
    """The same engine with a fixed small input size (fast; N < 1024 on a non-32 grid)."""
    seg.spec = dataclasses.replace(seg.spec, policy=ImagePolicy(mode="fixed", size=size))
    return seg


@pytest.fixture(scope="module")
def ort_seg(model_dir):
    return _small(Segmenter.load(model_dir, backend="onnxruntime", threads=2))


@pytest.fixture(scope="module")
def segofa(model_dir):
    from ifseg_rt.checkpoint import load_checkpoint

    return load_checkpoint(model_dir / "model.safetensors").model


def _image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def reference_outputs(model, image, size_hw, knn):
    """SegOFA + the reference post-processing: (softmax -> numpy float64 kNN) -> torch bilinear -> arg-max.
    -> (labels, h x w x M cell probabilities in float64)."""
    import torch.nn.functional as F

    from ifseg_rt.runtime.preprocess import normalize, resize_bilinear

    x = torch.from_numpy(normalize(resize_bilinear(image, *size_hw))[None])
    with torch.inference_mode():
        logits, feats = model(x)
    h, w = -(-size_hw[0] // 16), -(-size_hw[1] // 16)
    scores = logits[0].double()
    probs = torch.softmax(scores, dim=-1).numpy()
    if knn:
        from ifseg_rt.knn import reference

        probs = reference.knn_average(feats[0].double().numpy(), probs, k=3, iters=25)
        scores = torch.from_numpy(probs)
    grid = scores.T.reshape(1, -1, h, w)
    up = F.interpolate(grid, size=image.shape[:2], mode="bilinear", align_corners=False)
    return up[0].argmax(0).numpy().astype(np.int32), probs.reshape(h, w, -1)


@pytest.mark.parametrize("knn", [False, True])
@pytest.mark.parametrize("shape,size", [((70, 90), (96, 128)), ((300, 200), (528, 512))])  # N = 48 / N = 1056
def test_segmenter_equals_reference(model_dir, ort_seg, segofa, knn, shape, size):
    if knn:
        pytest.importorskip("ifseg_rt.knn")
    seg = _small(Segmenter.load(model_dir, backend="onnxruntime", threads=2, knn=knn), size)
    img = _image(*shape)
    r = seg.seg(img, return_probabilities=True)
    assert r.labels.dtype == np.int32 and r.labels.shape == shape and r.original_size == shape
    assert r.grid == (-(-size[0] // 16), -(-size[1] // 16)) and r.categories == tuple(CATEGORIES)
    assert r.probabilities.shape == (*r.grid, 5)
    np.testing.assert_allclose(r.probabilities.sum(-1), 1.0, atol=1e-5)
    assert set(r.timings) == {"preprocess", "engine", "knn", "resize_argmax", "total"}
    labels, probs = reference_outputs(segofa, img, size, knn)
    np.testing.assert_array_equal(r.labels, labels)
    # the random model is nearly flat (one class wins almost everywhere): the probabilities are what tell a wrong
    # softmax / kNN apart
    np.testing.assert_allclose(r.probabilities, probs, atol=2e-5, rtol=0)


@pytest.mark.parametrize("src,dst", [((70, 90), (96, 128)), ((300, 200), (528, 512)), ((513, 77), (64, 31)),
                                     ((17, 16), (16, 17))])
def test_preprocessing_equals_an_independent_bilinear(src, dst):
    """OpenCV INTER_LINEAR semantics (half-pixel centres, edges clamped, no antialias) = torch's bilinear with
    align_corners=False, here in float64: within one intensity level (rounding), almost always equal; then
    (x / 255 - 0.5) / 0.5 in RGB order, channels first."""
    import torch.nn.functional as F

    from ifseg_rt.runtime.preprocess import ImagePolicy, network_input, resize_bilinear

    img = _image(*src, seed=sum(src))
    got = resize_bilinear(img, *dst)
    t = torch.from_numpy(img).double().permute(2, 0, 1)[None]
    want = F.interpolate(t, size=dst, mode="bilinear", align_corners=False)[0].permute(1, 2, 0).numpy()
    assert got.shape == (*dst, 3) and got.dtype == np.uint8
    assert np.abs(got - want).max() <= 0.5 + 1 and np.mean(np.abs(got - np.rint(want)) > 0) < 0.01
    x = network_input(img, ImagePolicy(mode="fixed", size=dst))
    assert x.shape == (3, *dst) and x.dtype == np.float32
    np.testing.assert_allclose(x, (got.transpose(2, 0, 1) / 255.0 - 0.5) / 0.5, atol=1e-6, rtol=0)


def test_paper_policy_and_batching(model_dir, ort_seg):
    seg = Segmenter.load(model_dir, backend="onnxruntime", threads=2, knn=False)
    a, b = _image(40, 50, 1), _image(40, 50, 2)
    r = seg.seg(a)
    assert r.input_size == (512, 640) and r.grid == (32, 40)  # short side 512, aspect kept
    both = seg.seg([a, b, _image(30, 30, 3)], batch_size=2)
    np.testing.assert_array_equal(both[0].labels, r.labels)
    np.testing.assert_array_equal(both[1].labels, seg.seg(b).labels)
    assert both[2].labels.shape == (30, 30)


def test_torch_backend_equals_onnxruntime(model_dir, ort_seg):
    ts = _small(Segmenter.load(model_dir, backend="torch", threads=2))
    resnet = ts.backend.model.encoder.embed_images  # on the CPU the ResNet runs in oneDNN's channels-last order
    import torch

    assert resnet.channels_last and resnet.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    imgs = [_image(96, 128, s) for s in range(2)]
    x = np.stack([ort_seg.preprocess(im)[0] for im in imgs])
    lo, fo = ort_seg.backend.run(x)
    lt, ft = ts.backend.run(x)
    np.testing.assert_allclose(lt, lo, atol=1e-4, rtol=0)
    np.testing.assert_allclose(ft, fo, atol=1e-4, rtol=1e-5)
    for a, b in zip(ts.seg(imgs), ort_seg.seg(imgs)):
        np.testing.assert_array_equal(a.labels, b.labels)


def test_runs_without_torch(model_dir):
    code = f"""
import sys
sys.modules["torch"] = None  # any import of torch now raises ImportError
import numpy as np
import ifseg_rt
from ifseg_rt import Segmenter
seg = Segmenter.load({str(model_dir)!r}, backend="auto", threads=1)
assert seg.backend.name == "onnxruntime"
r = seg.seg(np.zeros((40, 48, 3), np.uint8))
assert r.labels.shape == (40, 48)
print("ok", r.grid)
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("ok (32, 39)")


# --- errors ----------------------------------------------------------------------------------------------------
def _copy(model_dir, tmp_path, name="m"):
    dst = tmp_path / name
    shutil.copytree(model_dir, dst)
    return dst


def test_tampered_and_truncated_files(model_dir, tmp_path):
    d = _copy(model_dir, tmp_path)
    for name in ("body.onnx", "tables.onnx"):  # the files the onnxruntime backend reads
        original = (d / name).read_bytes()
        data = bytearray(original)
        data[len(data) // 2] ^= 0xFF
        (d / name).write_bytes(bytes(data))
        with pytest.raises(ModelDirError, match=rf"{name}: sha256 .* does not match"):
            Segmenter.load(d, backend="onnxruntime")
        (d / name).write_bytes(bytes(data[:-100]))
        with pytest.raises(ModelDirError, match=rf"{name}: .*truncated"):
            Segmenter.load(d, backend="onnxruntime")
        (d / name).write_bytes(original)
    data = bytearray((d / "model.onnx").read_bytes())  # the portable graph, read without a split graph
    data[len(data) // 2] ^= 0xFF
    (d / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ModelDirError, match=r"model\.onnx: sha256 .* does not match"):
        d2 = json.loads((d / "ifseg.json").read_text())
        del d2["onnx"]["tables"], d2["onnx"]["body"]
        (d / "ifseg.json").write_text(json.dumps(d2))
        Segmenter.load(d, backend="onnxruntime")
    (d / "model.safetensors").unlink()
    with pytest.raises(ModelDirError, match="model.safetensors listed in ifseg.json is missing"):
        Segmenter.load(d, backend="torch")


def _set(d, path, value):
    *parents, last = path.split(".")
    for p in parents:
        d = d[p]
    if value is KeyError:
        del d[last]
    else:
        d[last] = value


@pytest.mark.parametrize("path,value,msg", [
    ("knn.k", KeyError, "missing field 'knn.k'"),
    ("knn.k", 0, "'knn.k' must be in [1, 33], got 0"),
    ("knn.iters", "25", "'knn.iters' must be an integer"),
    ("knn.iters", 10 ** 9, "'knn.iters' must be in [0, 1000], got 1000000000"),
    ("knn.temperature", 0, "'knn.temperature' must be a number in [0.001,"),
    ("knn.temperature", 1e-300, "'knn.temperature' must be a number in [0.001, 10000], got 1e-300"),
    ("image.policy", {"mode": "short_side", "size": None, "short_side": 40000, "max_long_side": 40000,
                      "multiple": 1}, "allows network inputs of up to 40000x40000 px = 6250000 cells"),
    ("image.policy", {"mode": "fixed", "size": [60000, 60000], "short_side": 512, "max_long_side": 2048,
                      "multiple": 1}, "fixed size 60000x60000 allows network inputs of up to 60000x60000 px"),
    ("categories", [], "'categories' must be a non-empty list"),
    ("categories", ["sky", "road", "sky", "person", "car"], "'categories' names 'sky' twice .entries 0 and 2."),
    ("categories", ["sky", "road", "  ", "person", "car"], "'categories' must be a non-empty list of names"),
    ("categories", ["sky", "road", "tr\nee", "person", "car"], "'categories' must be a non-empty list of names"),
    ("precisons", {}, "'precisons' is not a field of schema version 2"),
    ("config.patch_image_size", 8, "'config.patch_image_size' must be a multiple of the 16 px cell"),
    ("config.image_bucket_size", 0, "'config.image_bucket_size' must be an integer >= 1, got 0"),
    ("config.d_model", True, "'config.d_model' must be an integer >= 1, got True"),
    ("num_categories", 4, "'num_categories' is 4 but 'categories' has 5"),
    ("schema_version", 99, "'schema_version' is 99"),
    ("image.policy.mode", "crop", "'image.policy' is invalid"),
    ("image.input.dtype", "uint8", "'image.input.dtype'"),
    ("outputs.logits.shape", ["batch", "cells", 7], "'outputs.logits.shape'"),
    ("files.model.onnx", {"sha256": "x"}, "'files.model.onnx'"),
    ("onnx.file", "other.onnx", "'onnx.file'"),
    ("patch_stride", 32, "'patch_stride'"),
])
def test_malformed_manifest(model_dir, tmp_path, path, value, msg):
    d = _copy(model_dir, tmp_path)
    m = json.loads((d / "ifseg.json").read_text())
    if path.startswith("files."):
        m["files"]["model.onnx"] = value
    else:
        _set(m, path, value)
    (d / "ifseg.json").write_text(json.dumps(m))
    with pytest.raises(ModelDirError, match=msg.replace("(", r"\(").replace("[", r"\[")):
        Segmenter.load(d, backend="onnxruntime")


def test_from_model_and_infer_arguments(segofa, model_dir):
    """from_model takes knn as load() does (a bool switched kNN on whatever it said), refuses a dict or a string where
    settings, a policy or a list of names belong; infer() refuses one image where it takes a list (it iterated a
    path's characters); the sharpest temperature still gives finite probabilities."""
    from ifseg_rt.knn import KnnSettings
    from ifseg_rt.runtime import ImageError

    cats = list(CATEGORIES)
    assert Segmenter.from_model(segofa, cats, knn=False).knn.enabled is False
    assert Segmenter.from_model(segofa, cats, knn=True).knn == KnnSettings()
    for kw, msg in (({"knn": {"k": 3}}, "knn must be None, a bool or a KnnSettings"),
                    ({"policy": {"short_side": 64}}, "policy must be an ImagePolicy"),
                    ({"categories": ",".join(cats)}, "categories must be a list of names")):
        with pytest.raises(TypeError, match=msg):
            Segmenter.from_model(segofa, **{"categories": cats, **kw})
    with pytest.raises(ValueError, match=rf"{len(cats) - 1} category names for a model of {len(cats)} categories"):
        Segmenter.from_model(segofa, cats[:-1])
    seg = _small(Segmenter.load(model_dir, backend="onnxruntime", threads=1,
                                knn=KnnSettings(enabled=False, temperature=1e-3)), size=(32, 48))
    img = _image(32, 48)
    for one in ("photo.png", img, b"\x89PNG"):
        with pytest.raises(TypeError, match="infer takes a list of images"):
            seg.infer(one)
    assert len(seg.infer(im for im in [img, img])) == 2
    assert isinstance(seg.infer(["missing.png"], return_exceptions=True)[0], ImageError)
    out = seg.infer([img])[0]
    for bad, msg in ((dataclasses.replace(out, logits=out.logits.ravel()), r"need logits of shape \(6, 5\)"),
                     (dataclasses.replace(out, features=out.features[:-1]), r"features of shape \(6, C\)"),
                     (dataclasses.replace(out, grid=(2,)), "a \\(rows, columns\\) grid")):
        with pytest.raises(ValueError, match=msg):
            seg.finish(bad)
    with pytest.raises(TypeError, match="finish takes the CellOutputs of Segmenter.infer"):
        seg.finish(out.logits)
    p = seg.seg(img, return_probabilities=True).probabilities
    assert np.isfinite(p).all() and np.allclose(p.sum(-1), 1, atol=1e-5)
    s = KnnSettings(k=np.int64(5), iters=np.int32(2), temperature=np.float32(0.5))
    assert (s.k, s.iters, s.temperature) == (5, 2, 0.5) and type(s.k) is int and type(s.temperature) is float
    for bad in (10 ** 400, 1e-300, 0.0, float("nan"), np.bool_(True), "1"):
        with pytest.raises(ValueError, match="'knn.temperature' must be a number in"):
            KnnSettings(temperature=bad)
    with pytest.raises(ModelDirError, match="fp16 runs on a GPU only"):
        Segmenter.load(model_dir, precision="fp16")


def test_thread_and_knn_backend_arguments_are_checked_at_load(model_dir):
    for bad in (0, -3, 2.5, "2", True, 1025, 2 ** 31):
        with pytest.raises(ValueError, match=r"threads must be an integer >= 1 and <= 1024 .*got "
                                             + repr(bad).replace(".", r"\.")):
            Segmenter.load(model_dir, backend="onnxruntime", threads=bad)
    with pytest.raises(ValueError, match="knn_backend must be one of .*got 'gpu'"):
        Segmenter.load(model_dir, backend="onnxruntime", knn_backend="gpu")
    assert Segmenter.load(model_dir, backend="onnxruntime", threads=np.int64(1)).threads == 1


def test_missing_or_broken_manifest(model_dir, tmp_path):
    d = _copy(model_dir, tmp_path)
    (d / "ifseg.json").write_text("{not json")
    with pytest.raises(ModelDirError, match="not valid JSON"):
        Segmenter.load(d)
    (d / "ifseg.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ModelDirError, match="nested too deeply"):
        Segmenter.load(d)
    (d / "ifseg.json").unlink()
    with pytest.raises(ModelDirError, match="ifseg.json is missing"):
        Segmenter.load(d)
    (d / "ifseg.json").mkdir()
    with pytest.raises(ModelDirError, match="ifseg.json is a folder"):
        Segmenter.load(d)
    with pytest.raises(ModelDirError, match="not found"):
        Segmenter.load(tmp_path / "nowhere")


def test_bad_images(ort_seg, monkeypatch, tmp_path):
    from ifseg_rt.runtime import preprocess

    with pytest.raises(ValueError, match="too small"):
        ort_seg.seg(_image(8, 40))
    with pytest.raises(ValueError, match="must be uint8"):
        ort_seg.seg(np.zeros((32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="shape"):
        ort_seg.seg(np.zeros((32, 32, 5), np.uint8))
    with pytest.raises(TypeError, match="unsupported image type"):
        ort_seg.seg(42)
    with pytest.raises(FileNotFoundError):
        ort_seg.seg(tmp_path / "missing.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image"):
        ort_seg.seg(tmp_path / "bad.png")
    with pytest.raises(ValueError, match="image path is empty"):
        ort_seg.seg("")
    # any os.PathLike names a file; a numpy matrix is its plain array
    import os

    from PIL import Image

    class Where(os.PathLike):
        def __fspath__(self):
            return str(tmp_path / "good.png")

    img = _image(40, 48, 3)
    Image.fromarray(img).save(tmp_path / "good.png")
    np.testing.assert_array_equal(ort_seg.seg(Where()).labels, ort_seg.seg(img).labels)
    gray = img[:, :, 0]
    with pytest.warns(PendingDeprecationWarning):  # numpy discourages matrices; users still have them
        matrix = np.matrix(gray)
    np.testing.assert_array_equal(ort_seg.seg(matrix).labels, ort_seg.seg(gray).labels)
    monkeypatch.setattr(preprocess, "MAX_PIXELS", 1000)
    with pytest.raises(ValueError, match="Mpx limit"):
        ort_seg.seg(_image(40, 40))


def test_grid_beyond_position_table(model_dir):
    seg = _small(Segmenter.load(model_dir, backend="onnxruntime"), (16, 720))  # 1x45 cells, direct lookup
    with pytest.raises(ValueError, match=r"grid 1x45 .* both sides <= 42 cells"):
        seg.seg(_image(20, 100))


def test_grayscale_and_rgba(ort_seg, tmp_path):
    from PIL import Image

    rgb = _image(64, 80, 5)
    gray = rgb[:, :, 0]
    ref_gray = ort_seg.seg(np.repeat(gray[:, :, None], 3, axis=2)).labels
    np.testing.assert_array_equal(ort_seg.seg(gray).labels, ref_gray)
    np.testing.assert_array_equal(ort_seg.seg(Image.fromarray(gray, mode="L")).labels, ref_gray)
    rgba = np.dstack([rgb, np.full((64, 80, 1), 128, np.uint8)])
    np.testing.assert_array_equal(ort_seg.seg(rgba).labels, ort_seg.seg(rgb).labels)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    np.testing.assert_array_equal(ort_seg.seg(tmp_path / "a.png").labels, ort_seg.seg(rgb).labels)


def test_16bit_images_are_scaled_not_clipped(ort_seg, tmp_path):
    from PIL import Image

    from ifseg_rt.runtime import load_image

    ramp = (np.arange(48 * 64, dtype=np.uint32).reshape(48, 64) * 21).astype(np.uint16)  # 0 .. 64491
    want = np.repeat((ramp >> 8).astype(np.uint8)[:, :, None], 3, axis=2)  # OpenCV IMREAD_COLOR: high byte
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    with Image.open(tmp_path / "ramp16.png") as im:
        assert im.mode.startswith("I")
    np.testing.assert_array_equal(load_image(tmp_path / "ramp16.png"), want)
    np.testing.assert_array_equal(load_image(ramp), want)
    np.testing.assert_array_equal(ort_seg.seg(tmp_path / "ramp16.png").labels, ort_seg.seg(want).labels)
    with pytest.raises(ValueError, match="mode 'F'"):
        load_image(Image.fromarray(np.ones((32, 32), np.float32)))


def _softmax64(z, temperature=1.0):
    z = np.asarray(z, np.float64) / temperature
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_probabilities_with_knn_and_zero_iterations(model_dir):
    seg = _small(Segmenter.load(model_dir, backend="onnxruntime", threads=2))
    seg.knn = seg.knn.replace(iters=0)
    img = _image(64, 80, 9)
    r = seg.seg(img, return_probabilities=True)
    out = seg.infer([img])[0]  # the engine's own logits: the probabilities are their softmax, in float64 here
    np.testing.assert_allclose(r.probabilities.reshape(-1, out.logits.shape[-1]), _softmax64(out.logits),
                               atol=1e-6, rtol=0)
    off = _small(Segmenter.load(model_dir, backend="onnxruntime", threads=2, knn=False))
    np.testing.assert_allclose(off.seg(img, return_probabilities=True).probabilities, r.probabilities, atol=1e-6)


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_knn_temperature(model_dir, backend):
    """kNN at temperature T: softmax(logits / T), then the averaging (float64 reference); T changes the result."""
    from ifseg_rt.knn import reference

    seg = _small(Segmenter.load(model_dir, backend=backend, threads=2))
    img = _image(64, 80, 4)
    out = seg.infer([img])[0]
    feats = np.asarray(out.features, np.float64)
    got = {}
    for t in (1.0, 0.05):
        seg.knn = seg.knn.replace(temperature=t)
        got[t] = seg.seg(img, return_probabilities=True).probabilities.reshape(feats.shape[0], -1)
        want = reference.knn_average(feats, _softmax64(out.logits, t), k=seg.knn.k, iters=seg.knn.iters)
        np.testing.assert_allclose(got[t], want, atol=2e-5, rtol=0)
    assert np.abs(got[1.0] - got[0.05]).max() > 0.05  # the setting is not ignored


def test_long_lists_are_batched_in_windows(ort_seg):
    images = [_image(64, 80, i) if i % 3 else _image(48, 48, i) for i in range(11)]
    single = [ort_seg.seg(im).labels for im in images]
    batched = ort_seg.seg(images, batch_size=2)  # 11 inputs: more than one window of 8
    assert [r.original_size for r in batched] == [im.shape[:2] for im in images]
    for a, b in zip(single, batched):
        np.testing.assert_array_equal(a, b.labels)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
            ort_seg.seg(images[:2], batch_size=bad)
        with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
            ort_seg.seg(images[0], batch_size=bad)  # one image: the same rule


def test_segment_cli_rejects_bad_batch_size(model_dir, tmp_path, capsys):
    from ifseg_rt.cli import cli

    for bad in ("0", "-1"):
        with pytest.raises(SystemExit) as info:
            cli(["segment", "--model", str(model_dir), str(tmp_path), "--out", str(tmp_path / "o"), "--batch-size", bad])
        assert info.value.code == 2
        assert "--batch-size: must be >= 1" in capsys.readouterr().err


def test_unavailable_backends(model_dir, monkeypatch, capsys):
    import ifseg_rt.runtime.backends as backends
    from ifseg_rt.cli.serve import main as serve_main
    from ifseg_rt.runtime.backends import BackendUnavailable

    if backends._no_nvidia_driver():  # a CUDA device is refused before any engine tries it: library, serve
        for device in ("cuda", "cuda:1"):
            with pytest.raises(BackendUnavailable, match=rf"device '{device}', but this machine has no NVIDIA GPU "
                                                         rf"driver \(none of /proc/driver/nvidia/version, /dev/dxg"):
                Segmenter.load(model_dir, device=device)
        with pytest.raises(SystemExit):
            serve_main(["--model", str(model_dir), "--device", "cuda"])
        assert "device 'cuda', but this machine has no NVIDIA GPU driver" in capsys.readouterr().err
        assert backends.resolve_device("auto") == "cpu"
    monkeypatch.setattr(backends, "_no_nvidia_driver", lambda: False)  # as on a machine with a GPU driver
    if not backends._ort_cuda():
        with pytest.raises(BackendUnavailable, match="onnxruntime-gpu"):
            Segmenter.load(model_dir, backend="onnxruntime", device="cuda")
    with pytest.raises(BackendUnavailable, match="tensorrt"):
        Segmenter.load(model_dir, backend="tensorrt", device="cpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        Segmenter.load(model_dir, backend="tvm")


# --- CLIs ------------------------------------------------------------------------------------------------------
def test_segment_cli(model_dir, tmp_path, capsys):
    from PIL import Image

    from ifseg_rt.cli import cli

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    Image.fromarray(_image(40, 60, 1)).save(imgs / "one.png")
    Image.fromarray(_image(40, 60, 2)[:, :, 0], mode="L").save(imgs / "two.jpg")
    Image.fromarray(_image(36, 36, 3)).save(tmp_path / "three.png")
    rc = cli(["segment", "--model", str(model_dir), str(imgs), str(tmp_path / "three.png"), "--out",
              str(tmp_path / "out"), "--overlay", "--backend", "onnxruntime", "--threads", "2", "--quiet"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "one.png: 40x60 -> 512x768 (32x48 cells, HxW)" in out and "wrote 3 label map(s)" in out
    for stem, size in (("one", (60, 40)), ("two", (60, 40)), ("three", (36, 36))):
        with Image.open(tmp_path / "out" / f"{stem}.png") as lab:
            assert lab.mode == "P" and lab.size == size
            assert np.asarray(lab).max() < 5
        with Image.open(tmp_path / "out" / f"{stem}.overlay.jpg") as ov:
            assert ov.size[0] == size[0] and ov.size[1] > size[1]  # the image, then a legend below


def test_bench_cli(model_dir, tmp_path, capsys):
    from ifseg_rt.cli import cli

    out = tmp_path / "bench.json"
    rc = cli(["bench", "--model", str(model_dir), "--batch", "1", "2", "--size", "32x48", "--warmup", "0",
              "--repeats", "1", "--threads", "2", "--json", str(out), "--no-knn"])
    assert rc == 0
    rep = json.loads(out.read_text())
    assert rep["backend"] == "onnxruntime" and [r["batch"] for r in rep["runs"]] == [1, 2]
    run = rep["runs"][1]
    assert run["input_size"] == [512, 768] and run["throughput_img_s"] > 0
    assert set(run["stages_ms_per_image"]) == {"preprocess", "engine", "knn", "resize_argmax", "total"}
    assert set(run["stages_ms_per_image"]["total"]) >= {"median", "p90"}
    assert rep["cpu"] and rep["cores"] >= 1 and rep["precision"] == "fp32"
    from ifseg_rt.system import amx_bf16

    assert rep["amx_bf16"] is amx_bf16()  # whether bf16 can be fast here, in the report and the header
    printed = capsys.readouterr().out  # a human-readable line per batch size, not JSON
    amx = {True: ", AMX", False: ", no AMX", None: ""}[rep["amx_bf16"]]
    assert f"{rep['cores']} cores{amx}, threads 2)" in printed
    assert "batch 2 512x768:" in printed and "img/s" in printed and not printed.lstrip().startswith("{")


def test_bench_and_output_limits_are_checked_before_work(model_dir, tmp_path, capsys):
    from ifseg_rt.cli import cli

    with pytest.raises(SystemExit) as info:
        cli(["bench", "--model", str(model_dir), "--size", "100000x100000"])
    assert info.value.code == 2 and "above the 268 Mpx an image may have" in capsys.readouterr().err
    # the policy's 512 x 768 network inputs: 1 000 of them in one engine call is far beyond one image's pixels
    assert cli(["bench", "--model", str(model_dir), "--size", "32x48", "--batch-size", "1", "1000", "--no-knn"]) == 2
    assert "--batch-size 1000 of 512x768 px network inputs is 393 Mpx in one engine call" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as info:
        cli(["bench", "--model", str(model_dir), "--json", str(tmp_path / "file" / "x.json")])
    assert info.value.code == 2 and "is a file, not a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:  # checked before the model loads (a missing model would say so later)
        cli(["serve", "--model", str(tmp_path / "nope"), "--ready-file", str(tmp_path / "file" / "r.json")])
    assert info.value.code == 2 and "--ready-file" in capsys.readouterr().err
    from ifseg_rt.cli.args import check_output_file

    check_output_file(str(tmp_path / "new" / "deeper" / "x.json"), "--json")  # folders to be made: fine
    assert not list(tmp_path.glob(".ifseg_rt-probe-*"))  # the probe leaves nothing behind
    try:  # a folder that refuses new files even to root (sysfs), where the machine has one
        with open("/sys/.ifseg_rt-test", "w"):
            pass
        pytest.skip("/sys accepts new files here")
    except OSError:
        pass
    import argparse

    with pytest.raises(argparse.ArgumentTypeError, match="--json /sys/x.json: cannot write there"):
        check_output_file("/sys/x.json", "--json")


def test_pixel_counts_and_names_by_area():
    """Counts = a bincount over the categories (absent ones 0); names by decreasing area, ties in category order."""
    from ifseg_rt.runtime import SegmentationResult

    cats = ("sky", "road", "tree", "person", "car")
    labels = np.array([[0, 0, 0, 2, 2], [2, 2, 2, 3, 3], [3, 3, 3, 4, 4]], np.int32)  # 3, 0, 5, 5, 2 pixels
    r = SegmentationResult(labels=labels, categories=cats, grid=(1, 1), original_size=labels.shape,
                           input_size=(16, 16))
    assert r.pixel_counts().tolist() == [3, 0, 5, 5, 2] and r.pixel_counts().sum() == labels.size
    assert r.names() == ["tree", "person", "sky", "car"]


def test_top_level_names_resolve_lazily():
    import ifseg_rt
    import ifseg_rt.checkpoint
    import ifseg_rt.knn
    import ifseg_rt.model

    assert ifseg_rt.Segmenter is Segmenter and ifseg_rt.knn_average is ifseg_rt.knn.knn_average
    assert ifseg_rt.build_model is ifseg_rt.model.build_model and ifseg_rt.OFAConfig is ifseg_rt.model.OFAConfig
    assert ifseg_rt.load_checkpoint is ifseg_rt.checkpoint.load_checkpoint
    assert ifseg_rt.save_checkpoint is ifseg_rt.checkpoint.save_checkpoint
    assert set(dir(ifseg_rt)) >= {"Segmenter", "knn_average", "build_model", "load_checkpoint", "__version__"}
    with pytest.raises(AttributeError, match="no attribute 'segmenter'"):
        ifseg_rt.segmenter  # noqa: B018
