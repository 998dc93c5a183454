"""Self-training on unlabelled images (issue 25): pseudo-labels against an independent float64 re-computation, the
training loop on a tiny model, bad options, and (slow) a real mIoU gain on the nano world."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import CATEGORIES, tiny_segofa  # noqa: E402

from ifseg_rt.adapt import AdaptOptions, WordGridTrainer  # noqa: E402
from ifseg_rt.adapt.selftrain import IGNORE, SelfTrainOptions, label_images, pseudo_labels, self_train  # noqa: E402
from ifseg_rt.knn import KnnSettings, reference  # noqa: E402
from ifseg_rt.runtime import ImagePolicy  # noqa: E402
from ifseg_rt.runtime.preprocess import network_input  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
POLICY = ImagePolicy(short_side=48, max_long_side=64)


def test_pseudo_labels_keep_confident_cells_only():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(5) * 0.3, size=(3, 4))
    got = pseudo_labels(p, 0.6)
    for i, cell in enumerate(p.reshape(-1, 5)):  # cell by cell, as written in the paper's recipe
        want = int(np.argmax(cell)) if cell.max() >= 0.6 else IGNORE
        assert got[i] == want
    assert (got == IGNORE).any() and (got != IGNORE).any()
    assert (pseudo_labels(p, 0.0) == p.reshape(-1, 5).argmax(1)).all()


def test_label_images_equal_a_float64_reference():
    """Targets from the runtime path (Segmenter, kNN on) = softmax -> numpy float64 kNN -> arg-max / threshold."""
    model = tiny_segofa(len(CATEGORIES), seed=3).eval()
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for _ in range(3)]
    knn = KnnSettings()
    x, y = label_images(model, CATEGORIES, images, POLICY, threshold=0.3)
    assert [a.shape for a in x] == [(3, 48, 64)] * 3 and [a.shape for a in y] == [(12,)] * 3
    for k, im in enumerate(images):
        np.testing.assert_allclose(x[k], network_input(im, POLICY))
        with torch.inference_mode():
            logits, feats = model(torch.from_numpy(x[k][None]))
        z = logits[0].double().numpy()
        p = np.exp(z - z.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        p = reference.knn_average(feats[0].double().numpy(), p, k=knn.k, iters=knn.iters)
        want = np.where(p.max(1) >= 0.3, p.argmax(1), IGNORE)
        close = np.abs(p.max(1) - 0.3) < 1e-5  # float32 runtime vs float64 here: only at the threshold itself
        np.testing.assert_array_equal(y[k][~close], want[~close])


def test_self_train_updates_the_model_and_reports_rounds():
    model = tiny_segofa(len(CATEGORIES), seed=4)
    trainer = WordGridTrainer(model, AdaptOptions(steps=2, batch_size=2, seed=0), device="cpu")
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 255, (48, 64 if i % 2 else 48, 3), dtype=np.uint8) for i in range(4)]  # 2 sizes
    before = {k: v.detach().clone() for k, v in trainer.params.items()}
    seen = []
    hist = self_train(trainer, CATEGORIES, images, SelfTrainOptions(rounds=2, steps=2, batch_size=2, word_grids=2,
                                                                    threshold=0.0),
                      policy=POLICY, log=lambda m: None, on_round=lambda r: seen.append(r) or {"checked": r})
    assert [h["round"] for h in hist] == [1, 2] and seen == [1, 2] and hist[1]["checked"] == 2
    assert all(h["kept_cells"] == 1.0 and np.isfinite(h["image_loss"]) for h in hist)
    assert any(not torch.equal(before[k], v) for k, v in trainer.params.items())
    assert not model.training


def test_no_confident_cell_is_no_loss_not_nan():
    model = tiny_segofa(len(CATEGORIES), seed=5)
    trainer = WordGridTrainer(model, AdaptOptions(steps=1, batch_size=1), device="cpu")
    images = [np.random.default_rng(i).integers(0, 255, (48, 48, 3), dtype=np.uint8) for i in range(2)]
    hist = self_train(trainer, CATEGORIES, images, SelfTrainOptions(steps=2, batch_size=2, word_grids=1,
                                                                    threshold=1.0),
                      policy=POLICY, log=lambda m: None)
    assert hist[0]["kept_cells"] == 0.0 and hist[0]["image_loss"] == 0.0
    assert all(torch.isfinite(v).all() for v in trainer.params.values())


@pytest.mark.parametrize("kw, message", [({"steps": 0}, "steps must be an integer >= 1"),
                                         ({"threshold": 1.5}, "threshold must be in"),
                                         ({"lr": 0.0}, "lr must be > 0")])
def test_bad_options(kw, message):
    with pytest.raises(ValueError, match=message):
        SelfTrainOptions(**kw)


def test_too_few_images():
    trainer = WordGridTrainer(tiny_segofa(len(CATEGORIES)), AdaptOptions(steps=1, batch_size=1), device="cpu")
    with pytest.raises(ValueError, match="at least batch_size = 8 images, got 2"):
        self_train(trainer, CATEGORIES, [np.zeros((48, 64, 3), np.uint8)] * 2, policy=POLICY, log=lambda m: None)


@pytest.mark.slow
def test_self_training_improves_the_nano_model(tmp_path):
    """The demo's adaptation, then self-training on 100 unlabelled scenes: >= +2 mIoU (kNN) on held-out scenes."""
    from ifseg_rt.nano.demo import NANO_DIR, DemoSettings, run_demo
    from ifseg_rt.world import DEFAULT_DEMO_CATEGORIES

    if not (NANO_DIR / "model.safetensors").is_file():
        pytest.skip(f"no shipped nano checkpoint in {NANO_DIR}")
    settings = DemoSettings(images=30, overlays=0, check_export=False, self_train=100, self_train_steps=200)
    res = run_demo(tmp_path, list(DEFAULT_DEMO_CATEGORIES), settings, threads=2, progress=False,
                   log=lambda *a: None)
    miou = res["miou"]
    assert miou["+ self-training + kNN"] - miou["IFSeg + kNN"] >= 2.0, miou


def test_adapt_cli_self_trains_a_finished_run(nano_run, tmp_path, capsys):
    import json
    import shutil

    from ifseg_rt.cli import UsageError
    from ifseg_rt.cli.adapt import main
    from ifseg_rt.world import write_dataset

    run = tmp_path / "run"
    shutil.copytree(nano_run, run)
    before = (run / "model.safetensors").read_bytes()
    pairs = write_dataset(tmp_path / "unlabelled", list(range(500, 509)), ["sky", "grass", "water", "ball"], size=64)
    assert main(["--out", str(run), "--self-train", str(pairs[0][0].parent), "--self-train-steps", "2",
                 "--device", "cpu", "--no-progress"]) == 0
    assert "self-training" in capsys.readouterr().out
    rj = json.loads((run / "run.json").read_text())
    st = rj["self_training"][0]
    assert st["count"] == 9 and st["options"]["steps"] == 2 and len(st["rounds"]) == 1
    assert (run / "model.safetensors").read_bytes() != before
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no images found"):
        main(["--out", str(run), "--self-train", str(tmp_path / "empty")])
    with pytest.raises(UsageError, match="nothing to resume|no run.json"):
        main(["--out", str(tmp_path / "nowhere"), "--self-train", str(pairs[0][0].parent)])
