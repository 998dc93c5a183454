"""One inference path: the same model gives identical labels through ``Segmenter.seg``, ``eval`` (per image) and
adaptation validation, for kNN iterations 0, 1, 25 and an image with fewer cells than k; and those labels equal an
independent float64 re-computation of ifseg.md §11-§12."""

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from PIL import Image  # noqa: E402
from conftest import CATEGORIES, export_copy  # noqa: E402

from ifseg_rt.cli.eval import main  # noqa: E402
from ifseg_rt.evaluate import evaluate, find_pairs, load_segmenter  # noqa: E402
from ifseg_rt.knn import KnnSettings  # noqa: E402
from ifseg_rt.runtime import ImagePolicy, Segmenter  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

POLICY = ImagePolicy(short_side=32, max_long_side=128)  # small grids: 2x3 .. 2x8 cells
SIZES = [(40, 56), (64, 48), (16, 64), (50, 50)]  # grids 2x3, 3x2, 2x8, 2x2


@pytest.fixture(scope="module")
def model_dir(shared_export, tmp_path_factory):
    """The shared export, with the small policy written into its ifseg.json."""
    return export_copy(shared_export, tmp_path_factory, "one_path", POLICY)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("one_path_data")
    rng = np.random.default_rng(3)
    (root / "images").mkdir()
    (root / "labels").mkdir()
    for i, (h, w) in enumerate(SIZES):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "images" / f"im{i}.png")
        Image.fromarray(rng.integers(0, 6, (h, w)).astype(np.uint8)).save(root / "labels" / f"im{i}.png")
    return find_pairs(root / "images", root / "labels")


def with_knn(model_dir, tmp_path, knn: KnnSettings):
    d = tmp_path / "model"
    shutil.copytree(model_dir, d)
    m = json.loads((d / "ifseg.json").read_text())
    m["knn"] = knn.to_dict()
    (d / "ifseg.json").write_text(json.dumps(m))
    return d


def reference_labels(model, image: np.ndarray, knn: KnnSettings) -> np.ndarray:
    """float64 numpy: softmax -> kNN (the numpy reference, min(k, N) neighbours) -> bilinear to H0xW0 -> argmax."""
    import torch.nn.functional as F

    from ifseg_rt.knn import reference
    from ifseg_rt.runtime.preprocess import normalize, resize_bilinear

    h0, w0 = image.shape[:2]
    H, W = POLICY.target_size(h0, w0)
    x = torch.from_numpy(normalize(resize_bilinear(image, H, W))[None])
    with torch.inference_mode():
        logits, feats = model(x)
    z = logits[0].double().numpy()
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    n = p.shape[0]
    p = reference.knn_average(feats[0].double().numpy(), p, k=min(knn.k, n), iters=knn.iters)
    grid = torch.from_numpy(p.T.reshape(1, -1, -(-H // 16), -(-W // 16)))
    return F.interpolate(grid, size=(h0, w0), mode="bilinear", align_corners=False)[0].argmax(0).numpy()


@pytest.mark.parametrize("knn", [KnnSettings(iters=0), KnnSettings(iters=1), KnnSettings(iters=25),
                                 KnnSettings(k=8, iters=25)], ids=["iters0", "iters1", "iters25", "k8-fewer-cells"])
def test_segmenter_eval_and_validation_agree(model_dir, dataset, tmp_path, knn):
    from ifseg_rt.adapt import AdaptOptions, WordGridTrainer
    from ifseg_rt.adapt.run import Validation, validate, validation_segmenter
    from ifseg_rt.checkpoint import load_checkpoint

    d = with_knn(model_dir, tmp_path, knn)
    images = [np.asarray(Image.open(p).convert("RGB")) for p, _ in dataset]
    if knn.k == 8:
        assert any(-(-h // 16) * -(-w // 16) < 8 for h, w in (POLICY.target_size(*im.shape[:2]) for im in images))

    # 1. the runtime, as users call it (onnxruntime, the manifest's kNN settings)
    seg = Segmenter.load(d, backend="onnxruntime", threads=1)
    assert seg.knn == knn
    direct = [seg.seg(p).labels for p, _ in dataset]
    batched = seg.seg([str(p) for p, _ in dataset], batch_size=3)
    for a, b in zip(direct, batched):
        np.testing.assert_array_equal(a, b.labels)

    # independent float64 reference on the same weights
    model = load_checkpoint(d / "model.safetensors").model
    for im, labels in zip(images, direct):
        np.testing.assert_array_equal(labels, reference_labels(model, im, knn))

    # 2. eval: its per-image kNN predictions (the exported directory with its manifest's settings, and the
    #    checkpoint file inside it, whose recorded defaults the flags override)
    for source, flags in ((d, None), (d / "model.safetensors", knn.to_dict())):
        got = {}
        ev = load_segmenter(source, device="cpu", threads=1, policy=POLICY, knn=flags)
        assert ev.knn == knn
        res = evaluate(ev, dataset, knn=True, on_prediction=lambda p, pred: got.update({p: pred}))
        for (p, _), labels in zip(dataset, direct):
            np.testing.assert_array_equal(got[p]["knn"], labels)
    out = tmp_path / "eval.json"
    assert main(["--model", str(d), "--images", str(dataset[0][0].parent), "--labels", str(dataset[0][1].parent),
                 "--json", str(out), "--no-progress", "--threads", "1"]) == 0
    report = json.loads(out.read_text())
    assert report["knn"] == knn.to_dict()
    assert report["metrics"]["knn"]["mIoU"] == pytest.approx(100 * res.metrics["knn"].miou, abs=1e-9)

    # 3. validation during adaptation: the trainer's in-memory model, no export
    trainer = WordGridTrainer(model, AdaptOptions(steps=1, batch_size=1), device="cpu")
    val = Validation(pairs=dataset, every=0, short_side=POLICY.short_side, max_long_side=POLICY.max_long_side,
                     knn_settings=knn)
    vseg = validation_segmenter(trainer, val, CATEGORIES)
    for (p, _), labels in zip(dataset, direct):
        np.testing.assert_array_equal(vseg.seg(p).labels, labels)
    rec = validate(trainer, val, CATEGORIES)
    assert rec["knn"]["mIoU"] == pytest.approx(100 * res.metrics["knn"].miou, abs=1e-3)
    assert trainer.model.training  # validation switched it to eval mode only while it ran


def test_plain_prediction_resizes_logits_not_probabilities(model_dir, dataset):
    """kNN off: the paper's plain prediction (logits resized); kNN on with 0 iterations: probabilities resized."""
    import torch.nn.functional as F

    from ifseg_rt.checkpoint import load_checkpoint
    from ifseg_rt.runtime.preprocess import normalize, resize_bilinear

    model = load_checkpoint(model_dir / "model.safetensors").model
    seg = Segmenter.load(model_dir, backend="onnxruntime", threads=1, knn=False)
    for p, _ in dataset:
        im = np.asarray(Image.open(p).convert("RGB"))
        H, W = POLICY.target_size(*im.shape[:2])
        with torch.inference_mode():
            logits, _ = model(torch.from_numpy(normalize(resize_bilinear(im, H, W))[None]))
        grid = logits[0].double().T.reshape(1, -1, -(-H // 16), -(-W // 16))
        want = F.interpolate(grid, size=im.shape[:2], mode="bilinear", align_corners=False)[0].argmax(0).numpy()
        np.testing.assert_array_equal(seg.seg(p).labels, want)

    # the random model is nearly flat (resizing its logits or its probabilities differs on a handful of pixels):
    # steep logits through the same post-processing tell the two apart on many pixels
    from ifseg_rt.runtime.segmenter import CellOutputs

    rng = np.random.default_rng(0)
    grid, size = (4, 5), (61, 77)
    logits = (rng.standard_normal((20, 5)) * 6).astype(np.float32)
    feats = rng.standard_normal((20, 8)).astype(np.float32)
    z = torch.from_numpy(logits).double()

    def resized(scores):
        up = F.interpolate(scores.T.reshape(1, -1, *grid), size=size, mode="bilinear", align_corners=False)
        return up[0].argmax(0).numpy()

    out = CellOutputs(logits=logits, features=feats, grid=grid, original_size=size, input_size=(64, 80))
    plain, probs = resized(z), resized(torch.softmax(z, -1))
    assert (plain != probs).mean() > 0.02
    np.testing.assert_array_equal(seg.finish(out).labels, plain)
    np.testing.assert_array_equal(seg.finish(out, knn=KnnSettings(iters=0)).labels, probs)
