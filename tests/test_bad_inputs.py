"""The runtime survives every bad input with a clear error naming it: per-image errors in batches (API and CLI),
manifests that disagree with their engine, unloadable engine files, oversized policies and kNN settings (see
test_runtime.py::test_malformed_manifest), elongated images, EXIF orientation, and non-English OFA vocabularies."""

import dataclasses
import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from PIL import Image  # noqa: E402
from conftest import CATEGORIES  # noqa: E402

from ifseg_rt.runtime import ImagePolicy, ModelDirError, Segmenter  # noqa: E402
from ifseg_rt.runtime.segmenter import ImageError  # noqa: E402

SMALL = ImagePolicy(mode="fixed", size=(64, 80))


@pytest.fixture(scope="module")
def model_dir(shared_export):
    return shared_export


@pytest.fixture(scope="module")
def seg(model_dir):
    s = Segmenter.load(model_dir, backend="onnxruntime", threads=1)
    s.spec = dataclasses.replace(s.spec, policy=SMALL)
    return s


def _image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _copy(model_dir, tmp_path):
    d = tmp_path / "model"
    shutil.copytree(model_dir, d)
    return d


def _bad_files(folder):
    """Six files that are not usable images, each for a different reason."""
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.png").write_text("not an image")
    Image.fromarray(_image(8, 8)).save(folder / "tiny.png")  # below one 16 px patch
    Image.fromarray(np.ones((32, 32), np.float32)).save(folder / "float.tif")  # mode F: no 0..255 range
    good = folder / "truncated.jpg"
    Image.fromarray(_image(64, 64, 5)).save(good, quality=90)
    good.write_bytes(good.read_bytes()[:200])
    return ["corrupt.png", "empty.jpg", "text.png", "tiny.png", "float.tif", "truncated.jpg"]


# --- per-image errors ------------------------------------------------------------------------------------------------
def test_one_bad_image_in_a_batch(seg, tmp_path):
    good1, good2 = _image(40, 50, 1), _image(60, 30, 2)
    (tmp_path / "bad.png").write_bytes(b"garbage")
    Image.fromarray(good1).save(tmp_path / "closed.png")
    with Image.open(tmp_path / "closed.png") as closed:  # lazily opened: no pixels once the block ends
        pass
    items = [good1, str(tmp_path / "bad.png"), good2, np.zeros((10, 10, 3), np.uint8), closed]
    with pytest.raises(ImageError, match=r"image 1 \(.*bad.png\): cannot read image") as info:
        seg.seg(items)
    assert info.value.index == 1
    out = seg.seg(items, batch_size=4, return_exceptions=True)
    assert isinstance(out[1], ImageError) and "bad.png" in out[1].source
    assert isinstance(out[3], ImageError) and out[3].index == 3 and "too small" in out[3].reason
    assert isinstance(out[4], ImageError) and "PIL image: it is closed" in out[4].reason
    np.testing.assert_array_equal(out[0].labels, seg.seg(good1).labels)
    np.testing.assert_array_equal(out[2].labels, seg.seg(good2).labels)
    with pytest.raises(ValueError, match="cannot read image"):  # a single image raises the underlying error
        seg.seg(str(tmp_path / "bad.png"))


def test_segment_list_file_that_is_not_utf8(model_dir, tmp_path, capsys):
    from ifseg_rt.cli import cli

    (tmp_path / "list.txt").write_bytes(b"a.png\n# comment\ncaf\xe9.png\n")  # Latin-1, not UTF-8
    rc = cli(["segment", "--model", str(model_dir), str(tmp_path / "list.txt"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "list.txt:3: not UTF-8 text (byte 0xe9)" in err and "Traceback" not in err


def test_segment_cli_names_every_failure_once(model_dir, tmp_path, capsys):
    from ifseg_rt.cli import cli

    d = _copy(model_dir, tmp_path)
    m = json.loads((d / "ifseg.json").read_text())
    m["image"]["policy"] = SMALL.to_dict()
    (d / "ifseg.json").write_text(json.dumps(m))
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    bad = _bad_files(imgs)
    good = [f"good{i}.png" for i in range(8)]
    for i, name in enumerate(good):
        Image.fromarray(_image(40 + i, 50, i)).save(imgs / name)
    rc = cli(["segment", "--model", str(d), str(imgs), "--out", str(tmp_path / "out"), "--batch-size", "4",
              "--backend", "onnxruntime", "--threads", "1", "--quiet"])
    assert rc == 1
    captured = capsys.readouterr()
    assert "wrote 8 label map(s)" in captured.out and "6 failed" in captured.out
    assert "Traceback" not in captured.err
    for name in bad:
        assert captured.err.count(name) == 1, (name, captured.err)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(good)


# --- manifest vs engine ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("names", [3, 9])
@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_category_count_must_match_the_graph(model_dir, tmp_path, names, backend, capsys):
    d = _copy(model_dir, tmp_path)
    m = json.loads((d / "ifseg.json").read_text())
    m["categories"] = [f"c{i}" for i in range(names)]
    m["num_categories"] = names
    m["outputs"]["logits"]["shape"][2] = names
    (d / "ifseg.json").write_text(json.dumps(m))
    file = "body.onnx" if backend == "onnxruntime" else "model.safetensors"  # what each backend loads
    with pytest.raises(ModelDirError, match=rf"{file} outputs {len(CATEGORIES)} category scores per cell .* lists "
                                            rf"{names} categories"):
        Segmenter.load(d, backend=backend, threads=1)
    from ifseg_rt.cli import cli

    Image.fromarray(_image(32, 32)).save(tmp_path / "a.png")
    assert cli(["segment", "--model", str(d), str(tmp_path / "a.png"), "--out", str(tmp_path / "o"), "--backend",
                backend]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err


@pytest.mark.parametrize("content", [b"garbage", b"", b"\x08\x07" * 1000], ids=["garbage", "empty", "binary"])
@pytest.mark.parametrize("file", ["body.onnx", "tables.onnx"])
def test_unloadable_onnx_is_a_model_dir_error(model_dir, tmp_path, content, file, capsys):
    d = _copy(model_dir, tmp_path)
    (d / file).write_bytes(content)
    with pytest.raises(ModelDirError, match=rf"{file}: onnxruntime cannot load it"):
        Segmenter.load(d, backend="onnxruntime", verify=False)
    with pytest.raises(ModelDirError, match=rf"{file}: (size|sha256)"):  # with verification: caught earlier
        Segmenter.load(d, backend="onnxruntime")
    from ifseg_rt.cli import cli

    Image.fromarray(_image(32, 32)).save(tmp_path / "a.png")
    assert cli(["segment", "--model", str(d), str(tmp_path / "a.png"), "--out", str(tmp_path / "o"),
                "--no-verify", "--backend", "onnxruntime"]) == 2
    err = capsys.readouterr().err
    assert f"{file}: onnxruntime cannot load it" in err and "Traceback" not in err


# --- geometry ----------------------------------------------------------------------------------------------------
def test_extreme_aspect_ratio_keeps_one_patch_per_side(model_dir):
    img = _image(16, 4000, 3)
    paper = ImagePolicy()
    assert paper.target_size(16, 4000) == (16, 2048)  # the paper's formula gives 8 x 2048: raised to one patch
    assert paper.target_size(4000, 16) == (2048, 16)
    s = Segmenter.load(model_dir, backend="onnxruntime", threads=1)
    # a 1 x 128 grid (N <= G^2) would need IFSeg's direct position lookup past the 42-column table: a clear refusal
    with pytest.raises(ValueError, match="direct position lookup"):
        s.seg(img)
    s.spec = dataclasses.replace(s.spec, policy=ImagePolicy(short_side=16, max_long_side=512))
    r = s.seg(img)
    assert r.input_size == (16, 512) and r.grid == (1, 32) and r.labels.shape == (16, 4000)


def test_exif_orientation_is_applied(seg, tmp_path):
    """A photo stored rotated with EXIF orientation 6 (rotate 90 degrees clockwise to display) is segmented as
    displayed: labels have the displayed shape and equal the labels of the displayed pixels."""
    stored = _image(48, 80, 7)  # stored landscape, displayed portrait (80 x 48)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    with Image.open(tmp_path / "phone.jpg") as im:
        raw = np.asarray(im.convert("RGB"))  # the decoded stored pixels, no orientation applied
    displayed = np.ascontiguousarray(np.rot90(raw, k=-1))  # 90 degrees clockwise
    r = seg.seg(tmp_path / "phone.jpg")
    assert r.original_size == (80, 48) == r.labels.shape
    np.testing.assert_array_equal(r.labels, seg.seg(displayed).labels)
    with Image.open(tmp_path / "phone.jpg") as im:  # a PIL image carries its EXIF too
        np.testing.assert_array_equal(seg.seg(im).labels, r.labels)


# --- checkpoints ---------------------------------------------------------------------------------------------------
def test_non_english_ofa_vocabulary_is_refused(tmp_path):
    import argparse

    from ifseg_rt.checkpoint import ENGLISH_OFA_VOCAB, CheckpointError, check_english_vocabulary, load_checkpoint
    from ifseg_rt.model import build_model, get_config

    bert_sized = 21128 + 1000 + 8192  # a BERT (Chinese) word-piece vocabulary + location bins + image codes
    cfg = dataclasses.replace(get_config("tiny"), vocab_size=bert_sized)
    with torch.device("meta"):
        layout = build_model(cfg).state_dict()
    state = {k: torch.zeros(v.shape, dtype=torch.float16 if v.is_floating_point() else v.dtype)
             for k, v in layout.items()}
    path = tmp_path / "ofa_cn_tiny.pt"
    torch.save({"model": state, "cfg": {"task": argparse.Namespace(bpe="bert")}}, path)
    with pytest.raises(CheckpointError, match=rf"ofa_cn_tiny.pt has the dimensions of OFA-tiny but a {bert_sized}-symbol "
                                              rf"vocabulary, not the English OFA dictionary \({ENGLISH_OFA_VOCAB}"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="Chinese OFA"):
        load_checkpoint(path, num_categories=3)  # the adaptation's entry point refuses it too
    # an English OFA-tiny file with a stray IFSeg category table (or an IFSeg file that lost its own): one row off
    with torch.device("meta"):
        layout = build_model("tiny").state_dict()
    state = {k: torch.zeros(v.shape, dtype=torch.float16 if v.is_floating_point() else v.dtype)
             for k, v in layout.items()}
    state["encoder.seg_embed_tokens.weight"] = torch.zeros(4, layout["encoder.embed_tokens.weight"].shape[1])
    torch.save({"model": state}, tmp_path / "stray.pt")
    with pytest.raises(CheckpointError, match=r"stray.pt has the dimensions of OFA-tiny and a token table one row off "
                                              r"the English OFA dictionary.*An OFA file has 59457 rows"):
        load_checkpoint(tmp_path / "stray.pt")
    check_english_vocabulary(get_config("base"), "ofa_base.pt")  # the English sizes pass
    check_english_vocabulary(dataclasses.replace(get_config("tiny"), d_model=128, heads=4), "custom")  # custom sizes too


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_tables_of_another_model_are_refused(model_dir, tmp_path, backend, capsys):
    """A tables.onnx whose per-grid positions have another head count than the body takes (a graph of another
    model) is a ModelDirError at load, naming both files, not an engine error at the first image."""
    onnx = pytest.importorskip("onnx")
    if backend == "openvino":
        pytest.importorskip("openvino")
    from onnx import TensorProto, helper

    d = _copy(model_dir, tmp_path)
    body = onnx.load(str(d / "body.onnx"), load_external_data=False)
    shapes = {i.name: [x.dim_value or x.dim_param for x in i.type.tensor_type.shape.dim] for i in body.graph.input}
    names = [i.name for i in body.graph.input][1:]
    heads, dh = shapes[names[0]][0], shapes[names[0]][2]
    nodes = [helper.make_node("ConstantOfShape", ["shape"], [n]) for n in names]
    graph = helper.make_graph(
        nodes, "tables", [helper.make_tensor_value_info("grid", TensorProto.FLOAT, ["h", "w"])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [heads + 2, "S", dh]) for n in names],
        initializer=[helper.make_tensor("shape", TensorProto.INT64, [3], [heads + 2, 1, dh])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(d / "tables.onnx"))
    with pytest.raises(ModelDirError, match=rf"tables.onnx gives {names[0]} of shape \[{heads + 2}, (\?|1), {dh}\] but "
                                            rf".*body.onnx takes \[{heads}, \?, {dh}\]: the two graphs belong to "
                                            rf"different models"):
        Segmenter.load(d, backend=backend, verify=False)
    from ifseg_rt.cli import cli

    Image.fromarray(_image(32, 32)).save(tmp_path / "a.png")
    assert cli(["segment", "--model", str(d), str(tmp_path / "a.png"), "--out", str(tmp_path / "o"),
                "--no-verify", "--backend", backend]) == 2
    err = capsys.readouterr().err
    assert "belong to different models" in err and "Traceback" not in err
