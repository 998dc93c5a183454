"""mIoU exactly as ifseg.md §13, label decoding, and ``python -m ifseg_rt eval`` end to end."""

import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config, tiny_segofa
from PIL import Image

from ifseg_rt.checkpoint import save_checkpoint
from ifseg_rt.cli import UsageError
from ifseg_rt.cli.eval import main
from ifseg_rt.evaluate import evaluate, find_pairs
from ifseg_rt.model import build_model
from ifseg_rt.metrics import ConfusionMatrix, decode_labels, format_table, load_label
from ifseg_rt.runtime.preprocess import ImagePolicy, preprocess

# stored PNG values (ADE-style: 0 and 255 ignored, v -> v - 1) and predictions
STORED = np.array([[1, 1, 2, 0],
                   [3, 3, 255, 2]])
PRED = np.array([[0, 1, 1, 2],
                 [2, 0, 0, 1]])


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_hand_computed_example():
    gt = decode_labels(STORED, 3)
    assert gt.tolist() == [[0, 0, 1, 3], [2, 2, 3, 1]]  # ignore = M = 3
    cm = ConfusionMatrix(3)
    cm.update(PRED, gt)
    m = cm.metrics()
    # valid pixels (gt, pred): (0,0) (0,1) (1,1) (2,2) (2,0) (1,1)
    assert m.intersection.tolist() == [1, 2, 1]
    assert m.pred_pixels.tolist() == [2, 3, 1] and m.gt_pixels.tolist() == [2, 2, 2]
    assert m.union.tolist() == [3, 3, 2]
    assert m.iou == pytest.approx([1 / 3, 2 / 3, 1 / 2])
    assert m.miou == pytest.approx(0.5)
    assert m.aacc == pytest.approx(4 / 6)
    assert m.macc == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    d = m.to_dict(["a", "b", "c"])
    assert d["mIoU"] == pytest.approx(50.0) and d["per_class"][1]["IoU"] == pytest.approx(200 / 3)
    assert d["valid_pixels"] == 6


def test_absent_classes_and_false_positives():
    # M = 5: class 3 appears nowhere (IoU NaN, skipped); class 4 only predicted (IoU 0, counted)
    gt = decode_labels(STORED, 5)
    pred = PRED.copy()
    pred[0, 3] = 4  # on an ignore pixel: not counted
    cm = ConfusionMatrix(5)
    cm.update(pred, gt)
    cm2 = ConfusionMatrix(5)
    cm2.update(np.array([[4, 0]]), np.array([[0, 0]]))
    cm.merge(cm2)
    m = cm.metrics()
    # dataset-level counts: class 0 gets I = 1 + 1, P = 2 + 1, G = 2 + 2 -> U = 5
    assert m.intersection.tolist() == [2, 2, 1, 0, 0] and m.union.tolist() == [5, 3, 2, 0, 1]
    assert np.isnan(m.iou[3]) and m.iou[4] == 0 and np.isnan(m.acc[3]) and np.isnan(m.acc[4])
    assert m.miou == pytest.approx((2 / 5 + 2 / 3 + 1 / 2 + 0) / 4)
    assert m.aacc == pytest.approx(5 / 8)
    assert m.to_dict()["per_class"][3]["IoU"] is None
    assert "nan" not in json.dumps(m.to_dict()).lower()
    assert np.isnan(ConfusionMatrix(2).metrics().miou)


def test_label_offset():
    ids = np.array([[0, 0, 1, 255], [2, 2, 255, 1]])
    assert decode_labels(ids, 3, label_offset=0).tolist() == decode_labels(STORED, 3).tolist()
    with pytest.raises(ValueError, match=r"stored value 4 decodes to class 3, but there are only M = 3"):
        decode_labels(np.array([[4]]), 3)
    with pytest.raises(ValueError, match="label_offset"):
        decode_labels(ids, 3, label_offset=2)
    with pytest.raises(ValueError, match="single-channel"):
        decode_labels(np.zeros((2, 2, 3), np.uint8), 3)


def test_load_label_png(tmp_path):
    Image.fromarray(STORED.astype(np.uint8), mode="L").save(tmp_path / "a.png")
    pal = Image.fromarray(STORED.astype(np.uint8), mode="P")
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] * 64)
    pal.save(tmp_path / "b.png")
    Image.fromarray(np.zeros((2, 4, 3), np.uint8)).save(tmp_path / "c.png")
    for name in ("a.png", "b.png"):
        assert load_label(tmp_path / name, 3).tolist() == [[0, 0, 1, 3], [2, 2, 3, 1]]
    with pytest.raises(ValueError, match="c.png: label maps must be single-channel"):
        load_label(tmp_path / "c.png", 3)


def test_format_table():
    cm = ConfusionMatrix(3)
    cm.update(PRED, decode_labels(STORED, 3))
    table = format_table({"raw": cm.metrics(), "knn": cm.metrics()}, ["sky", "road", "concrete wall"])
    assert "concrete wall" in table and "50.00" in table and "IoU knn" in table


# --- evaluate end to end ----------------------------------------------------------------------------------------
CATS = ["sky", "road", "tree"]
SIZES = [(40, 56), (64, 48), (33, 70)]


@pytest.fixture
def dataset(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    for i, (h, w) in enumerate(SIZES):
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ext = ".jpg" if i == 1 else ".png"
        Image.fromarray(img).save(tmp_path / "images" / f"img{i}{ext}")
        label = rng.integers(0, 4, (h, w)).astype(np.uint8)  # 0 = ignore, 1..3 = classes
        label[:3, :3] = 255
        Image.fromarray(label).save(tmp_path / "labels" / f"img{i}.png")
    return tmp_path / "images", tmp_path / "labels"


@pytest.fixture
def checkpoint(tmp_path):
    model = tiny_segofa(3, seed=1, patch_image_size=64)
    return model, save_checkpoint(model, tmp_path / "model.safetensors", categories=CATS, prompt_prefix=" test")


POLICY = ImagePolicy(short_side=64, max_long_side=256)  # small inputs keep the tests fast
FAST = ["--short-side", "64", "--max-long-side", "256"]


def _reference_metrics(model, pairs, probs=False):
    """Independent plain pipeline: torch bilinear resize of the logits (or probabilities) to the original size,
    argmax."""
    cm = ConfusionMatrix(3)
    for img_path, label_path in pairs:
        x, (h0, w0) = preprocess(img_path, POLICY)
        with torch.no_grad():
            logits, _ = model(torch.from_numpy(x))
        h, w = -(-x.shape[2] // 16), -(-x.shape[3] // 16)
        scores = logits[0].softmax(-1) if probs else logits[0]
        z = F.interpolate(scores.T.reshape(1, 3, h, w), size=(h0, w0), mode="bilinear", align_corners=False)
        cm.update(z[0].argmax(0).numpy(), load_label(label_path, 3))
    return cm.metrics()


def test_evaluate_end_to_end(dataset, checkpoint, tmp_path, capsys):
    model, ckpt = checkpoint
    out = tmp_path / "out" / "metrics.json"
    assert main(["--model", str(ckpt), "--images", str(dataset[0]), "--labels", str(dataset[1]), "--json", str(out),
                 "--no-progress", "--device", "cpu", "--knn-backend", "numpy", *FAST]) == 0
    printed = capsys.readouterr().out
    assert "IoU raw" in printed and "IoU knn" in printed and "tree" in printed
    report = json.loads(out.read_text())
    assert report["images"] == 3 and report["categories"] == CATS and report["label_offset"] == "auto"
    for variant in ("raw", "knn"):
        m = report["metrics"][variant]
        assert len(m["per_class"]) == 3 and 0 <= m["mIoU"] <= 100
    ref = _reference_metrics(model, find_pairs(*dataset))
    assert report["metrics"]["raw"]["mIoU"] == pytest.approx(100 * ref.miou, abs=1e-9)
    assert report["metrics"]["raw"]["valid_pixels"] == int(ref.pred_pixels.sum())

    assert main(["--model", str(ckpt), "--images", str(dataset[0]), "--labels", str(dataset[1]), "--json", str(out),
                 "--no-progress", "--no-knn", "--limit", "2", *FAST]) == 0
    report = json.loads(out.read_text())
    assert "knn" not in report["metrics"] and report["images"] == 2 and not report["knn"]["enabled"]


def test_evaluate_knn_identity(dataset, checkpoint, tmp_path):
    from ifseg_rt.knn import KnnSettings
    from ifseg_rt.runtime import Segmenter

    model, _ = checkpoint
    pairs = find_pairs(*dataset)
    seg = Segmenter.from_model(model, CATS, policy=POLICY, knn=KnnSettings(k=1), knn_backend="numpy")
    # kNN with K = 1 keeps every cell's probabilities: the argmax of the resized softmax
    res = evaluate(seg, pairs, knn=True)
    ref = _reference_metrics(model, pairs, probs=True)
    np.testing.assert_array_equal(res.metrics["knn"].intersection, ref.intersection)
    np.testing.assert_array_equal(res.metrics["knn"].union, ref.union)
    assert res.num_images == 3 and res.knn == KnnSettings(k=1)


def test_evaluate_batches_without_changing_the_scores(dataset, checkpoint):
    from ifseg_rt.runtime import Segmenter

    model, _ = checkpoint
    pairs = find_pairs(*dataset) * 2  # repeated images: equal network sizes that a batch joins
    seg = Segmenter.from_model(model, CATS, policy=POLICY, knn_backend="numpy")
    one = evaluate(seg, pairs, knn=True, batch_size=1)
    four = evaluate(seg, pairs, knn=True, batch_size=4)
    for name in ("raw", "knn"):
        np.testing.assert_array_equal(one.metrics[name].intersection, four.metrics[name].intersection)
        np.testing.assert_array_equal(one.metrics[name].union, four.metrics[name].union)
    ref = _reference_metrics(model, pairs)
    np.testing.assert_array_equal(four.metrics["raw"].intersection, ref.intersection)
    assert four.num_images == len(pairs) and 0 < four.ignored < 1
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        evaluate(seg, pairs, batch_size=0)


def test_evaluate_uses_the_checkpoints_knn_settings(dataset, tmp_path):
    """kNN settings recorded with the weights are what eval applies; CLI flags only override them."""
    from ifseg_rt.evaluate import load_segmenter
    from ifseg_rt.knn import KnnSettings

    model = tiny_segofa(3, seed=1, patch_image_size=64)
    ckpt = save_checkpoint(model, tmp_path / "k5.safetensors", categories=CATS, knn=KnnSettings(k=5, iters=7))
    assert load_segmenter(ckpt, device="cpu", policy=POLICY).knn == KnnSettings(k=5, iters=7)
    seg = load_segmenter(ckpt, device="cpu", policy=POLICY, knn={"k": 2, "iters": None})
    assert seg.knn == KnnSettings(k=2, iters=7)
    out = tmp_path / "m.json"
    assert main(["--model", str(ckpt), "--images", str(dataset[0]), "--labels", str(dataset[1]), "--json", str(out),
                 "--no-progress", "--knn-iters", "3", *FAST]) == 0
    assert json.loads(out.read_text())["knn"] == {"enabled": True, "k": 5, "iters": 3, "temperature": 1.0}


def test_evaluate_bad_inputs(dataset, checkpoint, tmp_path, capsys):
    model, ckpt = checkpoint
    images, labels = dataset
    base = ["--model", str(ckpt), "--images", str(images), "--labels", str(labels), "--no-progress", "--no-knn", *FAST]
    # an image or label map that cannot be used is reported, naming it, and the others are scored (exit 1), as with
    # --ray; the JSON report covers the scored ones
    others = find_pairs(*dataset)[1:]
    for make, reason in [
            (lambda: Image.fromarray(np.zeros((10, 10), np.uint8)).save(labels / "img0.png"),
             r"label map .*img0.png is 10x10 px but image .*img0.png is 40x56 px"),
            (lambda: Image.fromarray(np.full((40, 56), 9, np.uint8)).save(labels / "img0.png"),
             "stored value 9 decodes to class 8, but there are only M = 3"),
            (lambda: (images / "img0.png").write_bytes(b"not a png"), r"cannot read image .*img0.png")]:
        make()
        out = tmp_path / "partial.json"
        assert main([*base, "--json", str(out), "--batch-size", "2"]) == 1
        err = capsys.readouterr().err
        assert re.search(reason, err), err
        assert "1 image(s) could not be scored; the metrics cover the other 2" in err and "Traceback" not in err
        report = json.loads(out.read_text())
        ref = _reference_metrics(model, others)
        assert report["images"] == 2 and report["metrics"]["raw"]["mIoU"] == pytest.approx(100 * ref.miou, abs=1e-9)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(images / "img0.png")
    (labels / "img0.png").unlink()
    with pytest.raises(UsageError, match=r"1 image\(s\) .* have no label map .*: img0.png"):
        main(base)  # found before any work: the command cannot start
    with pytest.raises(SystemExit) as info:
        main([*base, "--knn-k", "5"])  # base has --no-knn
    assert info.value.code == 2 and "--knn-k set(s) the kNN scores, which --no-knn switches off" in \
        capsys.readouterr().err
    Image.fromarray(np.zeros((40, 56), np.uint8)).save(labels / "img0.png")
    with pytest.raises(UsageError, match="model not found"):
        main(["--model", str(tmp_path / "nope"), *base[2:]])
    plain = save_checkpoint(build_model(tiny_config(patch_image_size=64)), tmp_path / "ofa.safetensors")
    with pytest.raises(UsageError, match="plain OFA checkpoint"):
        main(["--model", str(plain), *base[2:]])
