"""A new user's first hour (issue 23): no command writes over its inputs or reads its own outputs, one label numbering
between segment and eval, a run's image policy survives its export, one error handler (Ctrl-C, OS errors, exit
codes), re-runs that continue, errors that recognise the usual mix-ups, overlays that can be read."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from PIL import Image  # noqa: E402
from conftest import CATEGORIES, export_copy, make_run_dir  # noqa: E402

from ifseg_rt.cli import EXIT_INTERRUPTED, EXIT_USAGE, cli, run  # noqa: E402
from ifseg_rt.runtime import ImagePolicy, Segmenter  # noqa: E402

POLICY = ImagePolicy(short_side=32, max_long_side=128)  # 2 x k cells: fast


@pytest.fixture(scope="module")
def model_dir(shared_export, tmp_path_factory):
    return export_copy(shared_export, tmp_path_factory, "first_hour", POLICY)


def _photos(folder: Path, n: int = 3) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        p = folder / f"p{i}.png"
        Image.fromarray(rng.integers(0, 255, (40 + 8 * i, 56, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


# --- inputs are never outputs -------------------------------------------------------------------------------------
def test_segment_refuses_an_out_folder_that_holds_inputs(model_dir, tmp_path, capsys):
    photos = _photos(tmp_path / "photos")
    before = {p: p.read_bytes() for p in photos}
    for out in (tmp_path / "photos", tmp_path):  # the inputs' folder, or a folder above it
        assert cli(["segment", "--model", str(model_dir), str(tmp_path / "photos"), "--out", str(out),
                    "--quiet"]) == EXIT_USAGE
        err = capsys.readouterr().err
        assert f"--out {out} holds the input" in err and "overwrite inputs" in err
    assert {p: p.read_bytes() for p in photos} == before
    assert sorted(p.name for p in (tmp_path / "photos").iterdir()) == ["p0.png", "p1.png", "p2.png"]


def test_segment_rerun_continues_and_ctrl_c_says_how_far(model_dir, tmp_path, capsys, monkeypatch):
    _photos(tmp_path / "photos")
    out = tmp_path / "labels"
    args = ["segment", "--model", str(model_dir), str(tmp_path / "photos"), "--out", str(out), "--quiet"]
    import ifseg_rt.cli.segment as segment_cli

    real = segment_cli.segment_files

    def interrupted(*a, **k):  # Ctrl-C while the second image runs
        gen = real(*a, **k)
        yield next(gen)
        raise KeyboardInterrupt

    monkeypatch.setattr(segment_cli, "segment_files", interrupted)
    assert cli(args) == EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert "interrupted: 1/3 images done" in err and "run the same command again" in err and "Traceback" not in err
    monkeypatch.setattr(segment_cli, "segment_files", real)
    first = (out / "p0.png").stat().st_mtime_ns
    assert cli(args) == 0
    text = capsys.readouterr().out
    assert "p0.png: done before (p0.png kept)" in text
    assert "wrote 2 label map(s)" in text and "kept 1 from before" in text
    assert (out / "p0.png").stat().st_mtime_ns == first
    assert cli(args + ["--overwrite"]) == 0
    assert "wrote 3 label map(s)" in capsys.readouterr().out


def test_segment_rerun_keeps_only_maps_of_the_same_image_and_model(model_dir, tmp_path, capsys):
    """A re-run keeps a label map only when it records this input and this model: a new image that takes an existing
    name (x.bmp sorts before x.png, so it becomes 'x' and x.png 'x_1'), another model (here: other kNN settings) and
    a map of another size written by an older ifseg_rt (no records) are segmented again; long names work too."""
    from ifseg_rt.runtime.outputs import MODEL_KEY, SOURCE_KEY

    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(photos / "x.png")
    long_name = "a" * 240 + ".png"  # its temporary file's name would pass 255 bytes
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(photos / long_name)
    out = tmp_path / "labels"
    args = ["segment", "--model", str(model_dir), str(photos), "--out", str(out), "--quiet"]
    assert cli(args) == 0
    with Image.open(out / "x.png") as im:
        assert im.text[SOURCE_KEY] == str((photos / "x.png").resolve()) and len(im.text[MODEL_KEY]) == 16
    capsys.readouterr()
    Image.fromarray(rng.integers(0, 256, (48, 96, 3), dtype=np.uint8)).save(photos / "x.bmp")
    assert cli(args) == 0
    text = capsys.readouterr().out
    assert "x.bmp: 48x96" in text and "x.png: 64x64" in text and f"{long_name}: done before" in text
    assert np.asarray(Image.open(out / "x.png")).shape == (48, 96)  # now x.bmp's map
    assert np.asarray(Image.open(out / "x_1.png")).shape == (64, 64)
    assert cli(args + ["--no-knn"]) == 0  # another model (no kNN post-processing): nothing kept
    assert "wrote 3 label map(s)" in capsys.readouterr().out
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(out / "x_1.png")  # an older map without records, wrong size
    Image.fromarray(np.zeros((48, 96), np.uint8)).save(out / "x.png")  # ... and one of the right size: kept
    assert cli(args + ["--no-knn"]) == 0
    text = capsys.readouterr().out
    assert "x.bmp: done before (x.png kept)" in text and "x.png: 64x64" in text
    assert not list(out.glob(".*.tmp"))


def test_folder_of_folders_gets_a_hint(tmp_path):
    from ifseg_rt.runtime.inputs import list_images

    _photos(tmp_path / "set" / "a")
    with pytest.raises(ValueError, match=r"holds no images, only folders \(a\); give those folders, or a recursive "
                                         r"glob such as '.*\*\*/\*\.jpg'"):
        list_images([str(tmp_path / "set")])


# --- one label numbering ------------------------------------------------------------------------------------------
def test_eval_reads_segment_outputs_with_the_same_numbering(model_dir, tmp_path, capsys):
    """Scoring a model against its own segment output must give 100 mIoU by default (it gave ~0 before)."""
    _photos(tmp_path / "photos", 4)
    assert cli(["segment", "--model", str(model_dir), str(tmp_path / "photos"), "--out", str(tmp_path / "labels"),
                "--quiet", "--no-knn"]) == 0
    from ifseg_rt.metrics import label_offset_of

    assert label_offset_of(tmp_path / "labels" / "p0.png") == 0
    report = tmp_path / "r.json"
    assert cli(["eval", "--model", str(model_dir), "--images", str(tmp_path / "photos"), "--labels",
                str(tmp_path / "labels"), "--no-knn", "--json", str(report), "--no-progress"]) == 0
    raw = json.loads(report.read_text())["metrics"]["raw"]
    assert raw["aAcc"] == pytest.approx(100.0)
    # with the ADE-style offset forced, class 0 becomes "ignore": the command says so loudly
    labels = [np.asarray(Image.open(p)) for p in sorted((tmp_path / "labels").glob("*.png"))]
    zero = sum(int((x == 0).sum()) for x in labels) / sum(x.size for x in labels)
    capsys.readouterr()
    cli(["eval", "--model", str(model_dir), "--images", str(tmp_path / "photos"), "--labels",
         str(tmp_path / "labels"), "--no-knn", "--label-offset", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert ("label pixels were ignored" in err) == (zero > 0.5), (zero, err)


def test_eval_warns_when_most_pixels_are_ignored(model_dir, tmp_path, capsys):
    photos = _photos(tmp_path / "photos", 2)
    (tmp_path / "labels").mkdir()
    for p in photos:  # ADE-style maps that are almost all "0 = ignore"
        h, w = np.asarray(Image.open(p)).shape[:2]
        lab = np.zeros((h, w), np.uint8)
        lab[:4] = 1
        Image.fromarray(lab, mode="L").save(tmp_path / "labels" / p.name)
    assert cli(["eval", "--model", str(model_dir), "--images", str(tmp_path / "photos"), "--labels",
                str(tmp_path / "labels"), "--no-knn", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "warning: 9" in err and "% of the label pixels were ignored" in err and "--label-offset 0" in err


# --- the run's image policy survives its export ----------------------------------------------------------------
def test_export_uses_the_image_policy_the_run_records(tmp_path, capsys):
    run_dir = make_run_dir(tmp_path)
    rj = json.loads((run_dir / "run.json").read_text())
    rj["image_policy"] = ImagePolicy(short_side=256, max_long_side=1024).to_dict()
    (run_dir / "run.json").write_text(json.dumps(rj))
    assert cli(["export", str(run_dir), "--out", str(tmp_path / "m"), "--no-check", "--no-split"]) == 0
    assert "image policy short side 256, long side <= 1024: the run's" in capsys.readouterr().err
    spec = Segmenter.load(tmp_path / "m").spec
    assert spec.policy == ImagePolicy(short_side=256, max_long_side=1024)
    assert cli(["export", str(run_dir), "--out", str(tmp_path / "m"), "--no-check", "--no-split", "--overwrite",
                "--short-side", "64"]) == 0
    assert Segmenter.load(tmp_path / "m").spec.policy.short_side == 64
    # the directory is replaced as a whole, so a user's own file in it stops the overwrite
    (tmp_path / "m" / "notes.txt").write_text("mine")
    assert cli(["export", str(run_dir), "--out", str(tmp_path / "m"), "--no-check", "--no-split",
                "--overwrite"]) == EXIT_USAGE
    assert "holds files that are not part of its model (notes.txt)" in capsys.readouterr().err
    assert (tmp_path / "m" / "notes.txt").read_text() == "mine"
    # eval on the run directory itself scores at the same size (it used to take the paper's 512 px silently)
    from ifseg_rt.evaluate import load_segmenter

    assert load_segmenter(run_dir, device="cpu").spec.policy == ImagePolicy(short_side=256, max_long_side=1024)
    assert load_segmenter(run_dir, device="cpu", policy=ImagePolicy(short_side=64)).spec.policy.short_side == 64


def test_adapt_records_its_validation_policy(tmp_path):
    from ifseg_rt.adapt import RunWriter, WordGridTrainer
    from ifseg_rt.adapt.options import AdaptOptions
    from ifseg_rt.adapt.run import RunSetup
    from conftest import tiny_segofa

    model = tiny_segofa(len(CATEGORIES))
    setup = RunSetup(model=model, categories=list(CATEGORIES), prompt_prefix="p", provenance={"x": 1})
    trainer = WordGridTrainer(model, AdaptOptions(steps=1, batch_size=1), device="cpu")
    policy = ImagePolicy(short_side=96, max_long_side=384)
    RunWriter(tmp_path / "run", setup, keep_checkpoints=False, image_policy=policy).save(
        trainer, final_loss=None, finished=True)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["image_policy"] == policy.to_dict()


# --- errors that point the right way -------------------------------------------------------------------------------
def test_model_mix_ups_get_the_fixing_command(model_dir, tmp_path):
    import shutil

    from ifseg_rt.runtime import ModelDirError

    demo = tmp_path / "demo_out"
    shutil.copytree(model_dir, demo / "model")
    with pytest.raises(ModelDirError, match=rf"it holds the model directory {demo / 'model'}: --model "):
        Segmenter.load(demo)
    run_dir = make_run_dir(tmp_path)
    with pytest.raises(ModelDirError, match=r"it is an adaptation run: export it first with `python -m ifseg_rt "
                                            r"export .*run0 --out run0-model`"):
        Segmenter.load(run_dir)
    with pytest.raises(ModelDirError, match=rf"is a file of the model directory {model_dir}; pass the directory"):
        Segmenter.load(model_dir / "model.onnx")


def test_output_paths_are_checked_before_any_work(model_dir, tmp_path, capsys):
    folder = tmp_path / "existing"
    folder.mkdir()
    _photos(tmp_path / "photos", 1)
    for cmd in (["eval", "--model", str(model_dir), "--images", str(tmp_path / "photos"), "--labels",
                 str(tmp_path / "photos"), "--json", str(folder)],
                ["bench", "--model", str(model_dir), "--json", str(folder)]):
        with pytest.raises(SystemExit) as e:
            cli(cmd)
        assert e.value.code == EXIT_USAGE and f"--json {folder} is a folder" in capsys.readouterr().err
    # an output file that is an input, or lies in one, would replace it (bench --json MODEL/ifseg.json broke the model)
    manifest = (model_dir / "ifseg.json").read_bytes()
    label = tmp_path / "photos" / "p0.png"
    for cmd, out in ((["bench", "--model", str(model_dir)], model_dir / "ifseg.json"),
                     (["eval", "--model", str(model_dir), "--images", str(tmp_path / "photos"), "--labels",
                       str(tmp_path / "photos")], label)):
        with pytest.raises(SystemExit) as e:
            cli(cmd + ["--json", str(out)])
        assert e.value.code == EXIT_USAGE and f"--json {out} is inside the input" in capsys.readouterr().err
    assert (model_dir / "ifseg.json").read_bytes() == manifest and label.read_bytes()[:4] == b"\x89PNG"
    for flags in (["--device", "cuda"], ["--no-knn"], ["--precision", "int8"], ["--batch-size", "2"]):
        with pytest.raises(SystemExit) as e:  # bench --formats used to ignore them and record them as measured
            cli(["bench", "--model", str(model_dir), "--formats", *flags])
        assert e.value.code == EXIT_USAGE and "not apply with --formats" in capsys.readouterr().err, flags
    (tmp_path / "file").write_text("x")
    assert cli(["export", str(make_run_dir(tmp_path)), "--out", str(tmp_path / "file")]) == EXIT_USAGE
    assert "is a file; the export writes a directory" in capsys.readouterr().err


def test_same_error_same_exit_code(tmp_path, capsys):
    missing = str(tmp_path / "nope")
    codes = {cmd[0]: cli(cmd) for cmd in (
        ["segment", "--model", missing, str(tmp_path), "--out", str(tmp_path / "o")],
        ["eval", "--model", missing, "--images", str(tmp_path), "--labels", str(tmp_path)])}
    assert codes == {"segment": EXIT_USAGE, "eval": EXIT_USAGE}, capsys.readouterr().err


def test_one_handler_for_interrupts_and_os_errors(capsys):
    def interrupted(argv):
        raise KeyboardInterrupt("7/9 done")

    def unreadable(argv):
        open("/nonexistent-folder/x.json")

    assert run(interrupted, []) == EXIT_INTERRUPTED
    assert capsys.readouterr().err.strip() == "interrupted: 7/9 done"
    assert run(unreadable, []) == 1
    err = capsys.readouterr().err.strip()
    assert err == "error: No such file or directory (/nonexistent-folder/x.json)"


# --- overlays a person can read ------------------------------------------------------------------------------------
def test_overlay_outlines_regions_in_their_legend_colour():
    from ifseg_rt.runtime.palette import overlay, palette

    labels = np.zeros((20, 30), np.int32)
    labels[5:15, 10:20] = 3
    image = np.full((20, 30, 3), 30, np.uint8)  # a dark photo: blended colours alone are murky
    out = overlay(image, labels, 5)
    pal = palette(5)
    np.testing.assert_array_equal(out[5, 12], pal[3])  # the square's border: its pure colour
    np.testing.assert_array_equal(out[4, 12], pal[0])  # the outside's border: its own colour
    np.testing.assert_array_equal(out[10, 15], np.round(0.5 * 30 + 0.5 * pal[3].astype(float)).astype(np.uint8))
    assert not np.array_equal(overlay(image, labels, 5, outlines=False)[5, 12], pal[3])


def test_legend_grows_with_the_image():
    from ifseg_rt.runtime.palette import legend, legend_layout

    cats = ["sky", "grass", "water"]
    small, big = legend(cats, [0, 1, 2], 600), legend(cats, [0, 1, 2], 2560)
    assert big.shape[0] >= 4 * small.shape[0] - 4
    box = legend_layout(cats, [0], 2560)[0][2]
    assert box[2] - box[0] == 4 * (legend_layout(cats, [0], 600)[0][2][2] - legend_layout(cats, [0], 600)[0][2][0])


def test_first_colours_are_far_apart():
    """The first 18 colours differ clearly (CIE76 colour difference >= 14 between any two), none black or grey."""
    from ifseg_rt.runtime.palette import palette

    rgb = palette(18).astype(np.float64) / 255
    lin = np.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    xyz = lin @ np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]).T
    xyz /= np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
    lab = np.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], axis=1)
    d = np.linalg.norm(lab[:, None] - lab[None], axis=-1) + np.eye(18) * 1e9
    assert d.min() >= 14, d.min()
