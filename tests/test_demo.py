"""``python -m ifseg_rt demo`` end to end at a reduced size, and its input errors."""

import json

import numpy as np
import pytest
from PIL import Image

from ifseg_rt.cli import cli
from ifseg_rt.cli.demo import main
from ifseg_rt.nano.demo import NANO_DIR, DemoSettings, panel_scale, parse_demo_categories, run_demo
from ifseg_rt.world import DEFAULT_DEMO_CATEGORIES

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def nano_dir(tmp_path_factory):
    """The shipped nano model, or (in a checkout without it) a freshly pretrained few-step stand-in."""
    if (NANO_DIR / "model.safetensors").is_file():
        return NANO_DIR
    from ifseg_rt.nano.pretrain import PretrainOptions, pretrain

    d = tmp_path_factory.mktemp("nano")
    pretrain(d, PretrainOptions(steps=2, batch_size=4, size=64, warmup=1, threads=1), progress=False, eval_samples=0)
    return d


def test_demo_end_to_end(tmp_path, nano_dir, capsys):
    out = tmp_path / "demo"
    assert cli(["demo", "--quick", "--out", str(out), "--model", str(nano_dir), "--no-progress",
                "--categories", "sky, grass, water, sand, brick, snow, ball, star", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    for row in ("un-adapted", "un-adapted + kNN", "IFSeg", "IFSeg + kNN"):
        assert f"\n{row} " in printed
    res = json.loads((out / "results.json").read_text())
    assert res["categories"] == ["sky", "grass", "water", "sand", "brick", "snow", "ball", "star"]
    assert set(res["miou"]) == {"un-adapted", "un-adapted + kNN", "IFSeg", "IFSeg + kNN"}
    assert all(v is None or 0.0 <= v <= 100.0 for v in res["miou"].values())
    assert res["adaptation"]["steps"] == 4
    # the adapted model was exported and is what the runtime scored
    manifest = json.loads((out / "model" / "ifseg.json").read_text())
    assert manifest["categories"] == res["categories"]
    assert (out / "model" / "model.onnx").is_file() and (out / "run" / "run.json").is_file()
    # scenes + labels, and one overlay panel per requested scene (image + 4 label maps side by side)
    assert len(list((out / "scenes" / "images").glob("*.png"))) == 3
    assert len(res["overlays"]) == 2
    scale = panel_scale(64)
    for p, img in zip(res["overlays"], sorted((out / "scenes" / "images").glob("*.png"))):
        panel = np.asarray(Image.open(p))
        assert panel.shape[1] == 5 * 64 * scale and panel.shape[0] > 64 * scale  # 5 tiles + titles/legend below
        first = np.repeat(np.repeat(np.asarray(Image.open(img)), scale, axis=0), scale, axis=1)
        np.testing.assert_array_equal(panel[:64 * scale, :64 * scale], first)


@pytest.mark.slow
def test_shipped_model_meets_the_quality_targets(tmp_path):
    """The whole method, not just the plumbing: the shipped nano model adapted image-free at the demo's default
    settings (fewer scenes) and run through export + onnxruntime reaches the issue's targets on held-out scenes:
    >= 50 mIoU, >= 20 points above the un-adapted model, kNN post-processing adds >= 1 point."""
    if not (NANO_DIR / "model.safetensors").is_file():
        pytest.skip(f"no shipped nano checkpoint in {NANO_DIR}")
    settings = DemoSettings(images=30, overlays=0, check_export=False)
    res = run_demo(tmp_path, list(DEFAULT_DEMO_CATEGORIES), settings, threads=2, progress=False, log=lambda *a: None)
    miou = res["miou"]
    assert miou["IFSeg + kNN"] >= 50.0, miou
    assert miou["IFSeg"] - miou["un-adapted"] >= 20.0, miou
    assert miou["IFSeg + kNN"] - miou["IFSeg"] >= 1.0, miou


def test_default_categories():
    assert parse_demo_categories(None) == list(DEFAULT_DEMO_CATEGORIES)
    assert parse_demo_categories(" sky ,ball") == ["sky", "ball"]


@pytest.mark.parametrize("value, message", [
    ("sky, giraffe", "unknown category 'giraffe'"),
    ("", "--categories is empty"),
    ("sky,,ball", "empty name"),
    ("sky, sky", "listed twice"),
])
def test_bad_categories(value, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--categories", value, "--out", "unused"])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_model_is_reported(tmp_path, capsys):
    assert main(["--quick", "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    assert "lacks model.safetensors" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [(["--lr", "1.5"], "--lr must be in (0, 1]"),
                                           (["--lr", "nan"], "--lr must be in (0, 1]"),
                                           (["--seed", "-1"], "--seed: must be >= 0")])
def test_bad_options_are_refused_before_any_work(argv, message, tmp_path, capsys):
    """They used to fail inside numpy / AdaptOptions after the scenes were rendered and the baseline scored."""
    with pytest.raises(SystemExit) as e:
        main(["--quick", "--out", str(tmp_path / "o"), *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_model_that_is_not_the_nano_checkpoint_is_one_error_line(tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(NANO_DIR, bad)
    (bad / "model.safetensors").write_bytes(b"not safetensors")
    assert main(["--quick", "--model", str(bad), "--out", str(tmp_path / "o"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "model.safetensors" in err and "Traceback" not in err
