"""The nano VL model: vocabulary, pretraining samples, a short pretraining run that lowers the loss, and the shipped
checkpoint (loads, matches its card's sha256, fits the size budget)."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from ifseg_rt.checkpoint import file_sha256, load_checkpoint
from ifseg_rt.model import build_model
from ifseg_rt.nano.tasks import (CAPTION_PROMPT, NUM_BINS, PATCH, REGION_PROMPT, TaskBuilder, build_vocab, collate,
                           load_tokenizer, model_inputs, nano_config, write_vocab)
from ifseg_rt.cli.pretrain_nano import main
from ifseg_rt.nano.pretrain import PretrainOptions, calibrate_batchnorm, pretrain
from ifseg_rt.world import CATEGORY_NAMES, render_scene
from ifseg_rt.tokenizer import IFSEG_PROMPT_PREFIX, build_ifseg_prompt

SHIPPED = Path(__file__).resolve().parents[1] / "export" / "nano"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def nano_bpe(tmp_path_factory):
    return write_vocab(tmp_path_factory.mktemp("nano-bpe"))


def test_vocabulary(nano_bpe):
    tok = load_tokenizer(nano_bpe)
    assert build_vocab() == build_vocab()  # deterministic
    for name in CATEGORY_NAMES + ("unknown", "yes", "no"):
        ids = tok.encode_words(name)
        assert len(ids) == 1 and tok.decode(ids) == " " + name
    prompt = build_ifseg_prompt(tok, ["sky", "ball"])
    assert tok.decode(prompt.src_ids[1:-1]) == IFSEG_PROMPT_PREFIX + " sky ball unknown"
    assert len(prompt.src_ids) <= 16  # every prompt word is one piece
    assert tok.encode_words("giraffe")  # an unseen word still tokenises (byte pieces), never to <unk>
    assert 3 not in tok.encode_words("giraffe")
    assert tok.num_codes == 0 and tok.num_bins == NUM_BINS and len(tok) == tok.bin_offset + NUM_BINS
    assert nano_config(len(tok)).vocab_size == len(tok)


def test_samples_are_box_level(nano_bpe):
    tok = load_tokenizer(nano_bpe)
    b = TaskBuilder(tok)
    s = b.sample(5, "region", "image")
    scene = render_scene(5, 128)
    assert np.array_equal(s.image, scene.image) and s.words is None
    assert tok.decode(s.src[1:-5]) == REGION_PROMPT and tok.decode(s.tgt).strip() in scene.names
    cap = b.sample(5, "caption", "image")
    assert tok.decode(cap.src[1:-1]) == CAPTION_PROMPT and tok.decode(cap.tgt).split() == scene.names
    g = b.sample(5, "grounding", "words")
    assert g.image is None and g.words.shape == b.grid and all(t >= tok.bin_offset for t in g.tgt)
    # mixed: the cells fully inside one annotated box carry that box's word, all others stay image patches
    for seed in range(20):
        m = b.sample(seed, "caption", "mixed")
        word = set(np.unique(m.words)) - {-1}
        assert len(word) <= 1
        if word:
            name = tok.decode([word.pop()]).strip()
            box = next(o.box for o in render_scene(seed, 128).objects if o.name == name)
            rows, cols = np.nonzero(m.words >= 0)
            assert rows.min() * PATCH >= box[1] and (rows.max() + 1) * PATCH <= box[3]
            assert cols.min() * PATCH >= box[0] and (cols.max() + 1) * PATCH <= box[2]


def test_mixed_inputs_equal_the_image_path(nano_bpe):
    """Image cells fed through the word-cell path give exactly the encoder's image path."""
    tok = load_tokenizer(nano_bpe)
    torch.manual_seed(0)
    model = build_model(nano_config(len(tok)))
    b = TaskBuilder(tok, size=64)
    batch = collate([b.sample(i, "vqa", "image") for i in range(2)], b.grid)
    calibrate_batchnorm(model, torch.from_numpy(batch.images))
    src = torch.from_numpy(batch.src)
    with torch.no_grad():
        via_cells = model.encoder(src, cell_embeds=model_inputs(model, batch), grid=batch.grid).enc_out
        via_images = model.encoder(src, images=torch.from_numpy(batch.images)).enc_out
    torch.testing.assert_close(via_cells, via_images)


def test_short_pretraining_lowers_the_loss(tmp_path):
    opts = PretrainOptions(steps=24, batch_size=8, size=64, warmup=4, lr=2e-3, threads=1)
    report = pretrain(tmp_path, opts, progress=False, log_every=4, eval_samples=4)
    losses = [r["loss"] for r in report["curve"]]
    assert len(losses) == 6
    assert losses[-1] < losses[0] - 1.0, losses
    assert set(report["heldout_accuracy"]) == {f"{t}/{s}" for t in ("caption", "vqa", "region", "grounding")
                                               for s in ("image", "words", "mixed")}
    ck = load_checkpoint(tmp_path / "model.safetensors")
    assert ck.kind == "ofa" and ck.config == nano_config(len(load_tokenizer(tmp_path)))
    assert ck.metadata["provenance"]["steps_done"] == 24
    card = (tmp_path / "CARD.md").read_text()
    assert file_sha256(tmp_path / "model.safetensors") in card


def test_cli_rejects_bad_size(capsys):
    with pytest.raises(SystemExit):
        main(["--size", "100", "--out", "unused"])
    assert "multiple of 16" in capsys.readouterr().err


def test_cli_refuses_unusable_options_before_training(tmp_path, capsys):
    """lr inf trained a NaN model (exit 0), lr -1/nan crashed inside torch, --eval-samples -1 crashed after the whole
    training, --seed -1 inside numpy; an --out holding files (an adapted run, the shipped model) was overwritten.
    `python -m ifseg_rt pretrain_nano` is a command too."""
    from ifseg_rt.cli import COMMANDS, cli

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "model.safetensors").write_bytes(b"an adapted model")
    for argv, msg in ((["--lr", "inf"], "lr must be in (0, 1]"), (["--lr", "nan"], "lr must be in (0, 1]"),
                      (["--lr", "-1"], "lr must be in (0, 1]"), (["--lr", "0"], "lr must be in (0, 1]"),
                      (["--eval-samples", "-1"], "must be >= 0"), (["--seed", "-1"], "must be >= 0"),
                      (["--out", str(tmp_path / "run")], "already holds files (model.safetensors)")):
        with pytest.raises(SystemExit) as e:
            main(["--out", str(tmp_path / "new"), "--steps", "1", *argv])
        assert e.value.code == 2 and msg in capsys.readouterr().err, argv
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == b"an adapted model"
    assert not (tmp_path / "new").exists()
    assert "pretrain_nano" in COMMANDS
    with pytest.raises(SystemExit):  # dispatched to the command (an unknown command returns 2 with the usage)
        cli(["pretrain_nano", "--out", str(tmp_path / "new"), "--lr", "inf"])
    assert "lr must be in (0, 1]" in capsys.readouterr().err


def test_shipped_checkpoint_matches_its_card():
    model_file = SHIPPED / "model.safetensors"
    if not model_file.is_file():
        pytest.skip(f"no shipped nano checkpoint in {SHIPPED}")
    card = (SHIPPED / "CARD.md").read_text(encoding="utf-8")
    m = re.search(r"sha256\*\*: `([0-9a-f]{64})`", card)
    assert m, "CARD.md states no sha256"
    assert file_sha256(model_file) == m.group(1)
    assert model_file.stat().st_size <= 20 * 1024 ** 2
    report = json.loads((SHIPPED / "pretrain.json").read_text(encoding="utf-8"))
    assert report["checkpoint"]["sha256"] == m.group(1)
    assert report["final_loss"] < report["first_loss"]
    # the tokenizer files are the ones the code builds, and the weights load with the matching config
    assert json.loads((SHIPPED / "vocab.json").read_text(encoding="utf-8")) == build_vocab()[0]
    ck = load_checkpoint(model_file, expected_sha256=m.group(1))
    assert ck.config == nano_config(len(load_tokenizer(SHIPPED)))
