"""The first hour of a user: CLI conventions of every command, --version, closed pipes, the demo's output folder,
pictures with legends (result.plot / save / save_labels, segment --overlay), and file permissions."""

import os
import re
import stat
import subprocess
import sys

import numpy as np
import pytest

from ifseg_rt.cli import COMMANDS, cli

COMMAND_NAMES = sorted(COMMANDS)


@pytest.mark.parametrize("cmd", COMMAND_NAMES)
def test_every_help_renders_with_examples_and_no_internal_references(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        cli([cmd, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage:")
    assert "examples:" in text
    for bad in ("ifseg.md", "ofa.md", "§", "(default: None)", "``"):
        assert bad not in text, (cmd, bad)
    for block in re.split(r"\n  (?=-)", text):  # one option's help: a default is stated once
        flat = " ".join(block.split()).lower()
        assert flat.count("(default:") <= 1, (cmd, flat)


def test_export_module_help_too(capsys):
    from ifseg_rt.cli.export import main

    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "examples:" in text and "(default: None)" not in text


def test_version_and_usage(capsys):
    from ifseg_rt import __version__

    assert cli(["--version"]) == 0 and capsys.readouterr().out.strip() == f"ifseg_rt {__version__}"
    assert cli(["-V"]) == 0
    assert cli([]) == 0
    out = capsys.readouterr().out
    assert "ifseg-rt COMMAND" in out and all(name in out for name in COMMANDS)
    assert cli(["nonsense"]) == 2


def test_closed_pipe_ends_quietly():
    """`ifseg-rt --help | head -1`: the reader goes away; no BrokenPipeError traceback, the shell's 141."""
    code = ("import sys, ifseg_rt.cli as m\n"
            "def boom(*a, **k): raise BrokenPipeError(32, 'Broken pipe')\n"
            "m.print = boom\n"
            "sys.exit(m.cli(['--help']))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 141 and "Traceback" not in r.stderr
    r = subprocess.run(f"{sys.executable} -m ifseg_rt --help | head -1", shell=True, capture_output=True, text=True)
    assert r.stdout.startswith("usage:") and "Traceback" not in r.stderr


def test_console_script_is_declared():
    import tomllib
    from pathlib import Path

    meta = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert meta["project"]["scripts"]["ifseg-rt"] == "ifseg_rt.cli:cli"


# --- pictures ------------------------------------------------------------------------------------------------------
def test_palette_is_legible():
    from ifseg_rt.runtime.palette import palette

    pal = palette(40).astype(int)
    assert len({tuple(c) for c in pal}) == 40
    assert (pal.max(1) >= 100).all()  # nothing near black
    assert ((pal.max(1) - pal.min(1)) >= 40).all()  # nothing grey


def test_plot_has_a_legend_with_the_present_categories(tmp_path):
    from PIL import Image

    from ifseg_rt.runtime.palette import LEGEND_ROW, legend_layout, palette
    from ifseg_rt.runtime.segmenter import SegmentationResult

    cats = ("sky", "grass", "water", "sand")
    labels = np.zeros((60, 300), np.int32)
    labels[:, 100:] = 2  # water the largest, then sky; grass and sand absent
    r = SegmentationResult(labels=labels, categories=cats, grid=(4, 19), original_size=(60, 300),
                           input_size=(64, 304))
    img = np.full((60, 300, 3), 200, np.uint8)
    pic = r.plot(img)
    assert pic.shape[1] == 300 and pic.shape[0] > 60 + LEGEND_ROW - 1
    pal = palette(len(cats))
    np.testing.assert_array_equal(pic[10, 200], np.round(0.5 * 200 + 0.5 * pal[2].astype(float)).astype(np.uint8))
    strip = pic[60:]
    entries = legend_layout(cats, [2, 0], 300)
    assert [(c, n) for c, n, _, _ in entries] == [(2, "water"), (0, "sky")]  # largest area first, absent omitted
    for c, _name, (x0, y0, x1, y1), (tx, ty) in entries:
        np.testing.assert_array_equal(strip[(y0 + y1) // 2, (x0 + x1) // 2], pal[c])  # the swatch's colour
        text = strip[ty:ty + 11, tx:tx + 40]
        assert (text.min(-1) < 100).any()  # the name is drawn (dark pixels right of the swatch)
    assert r.plot().shape == pic.shape  # without the image: the colours alone, same legend
    out = r.save(tmp_path / "vis.png", img)
    np.testing.assert_array_equal(np.asarray(Image.open(out)), pic)
    with Image.open(r.save_labels(tmp_path / "labels.png")) as lab:
        assert lab.mode == "P"
        np.testing.assert_array_equal(np.asarray(lab), labels)
    with pytest.raises(ValueError, match="pass the image that was segmented"):
        r.plot(np.zeros((20, 20, 3), np.uint8))


# --- the demo's folder and file permissions ------------------------------------------------------------------------
def test_demo_refuses_a_non_empty_out(tmp_path, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "results.json").write_text("{}")
    assert cli(["demo", "--quick", "--out", str(out), "--no-progress"]) == 2
    assert "is not empty; pass --overwrite" in capsys.readouterr().err
    (out / "notes.txt").write_text("mine")
    assert cli(["demo", "--quick", "--out", str(out), "--no-progress", "--overwrite"]) == 2
    assert "holds files the demo did not write (notes.txt)" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"


def test_saved_weights_are_readable_by_others(tmp_path):
    torch = pytest.importorskip("torch")
    from conftest import tiny_segofa

    from ifseg_rt.checkpoint import save_checkpoint

    old = os.umask(0o022)
    try:
        path = save_checkpoint(tiny_segofa(3), tmp_path / "m.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    del torch


@pytest.mark.parametrize("argv", [["segment", "--model", "m", "x", "--out", "o"], ["eval", "--model", "m", "--images", "i",
                                  "--labels", "l"], ["bench", "--model", "m"], ["serve", "--model", "m"],
                                  ["demo", "--out", "o"], ["export", "run", "--out", "o"]])
def test_thread_counts_are_bounded(argv, capsys):
    """A thread count is 1 .. 1024 (serve: 0 = the cores available): torch.set_num_threads(100000) crashes."""
    from ifseg_rt.cli import cli

    with pytest.raises(SystemExit) as info:
        cli([*argv, "--threads", "100000"])
    assert info.value.code == 2 and "--threads: must be <= 1024 threads, got 100000" in capsys.readouterr().err
