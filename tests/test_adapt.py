"""Image-free adaptation: frozen/trainable split, loss, schedule, exact resume, CLI and its errors."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import tiny_config, tiny_segofa, write_tiny_bpe

from ifseg_rt.adapt import AdaptOptions, WordGridTrainer, cosine_lr, split_parameters, training_model, word_grid_loss
from ifseg_rt.cli import UsageError
from ifseg_rt.cli.adapt import main
from ifseg_rt.adapt.trainer import category_ids
from ifseg_rt.checkpoint import load_checkpoint, save_checkpoint
from ifseg_rt.model import build_model

SMALL = dict(patch_image_size=64)  # G = 4 word cells per side: fast on CPU
CATEGORIES = ["sky", "road", "tree", "concrete wall"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def tiny_run_inputs(tmp_path):
    """A plain tiny OFA checkpoint (ifseg_rt safetensors) and matching BPE files."""
    torch.manual_seed(0)
    ckpt = save_checkpoint(build_model(tiny_config(**SMALL)), tmp_path / "ofa-test.safetensors")
    return ckpt, write_tiny_bpe(tmp_path / "bpe")


def _scaled_model(m=4, seed=0, scale=10.0):
    """Tiny SegOFA whose frozen embeddings have a usable norm (random N(0, 0.02) rows give near-zero logits)."""
    model = tiny_segofa(m, seed=seed, **SMALL)
    with torch.no_grad():
        model.encoder.embed_tokens.weight.mul_(scale)
    model.set_categories(model.prompt_tokens.tolist(), category_ids(model))
    return model


# --- recipe pieces ----------------------------------------------------------------------------------------------
def test_trainable_count_base():
    with torch.device("meta"):
        model = build_model("base", 15)
    trainable, frozen = split_parameters(model)
    assert sum(p.numel() for p in trainable.values()) == 109_327_656  # ifseg.md §10
    assert {"encoder.embed_tokens.weight", "encoder.seg_embed_tokens.weight", "encoder.image_proj.weight",
            "encoder.embed_images.conv1.weight"} <= set(frozen)
    assert not any(k.startswith("decoder.seg_projection") or "embed_tokens_bag" in k for k in trainable)
    assert all(k.startswith(("encoder.embed_tokens", "encoder.seg_embed_tokens", "encoder.embed_images.",
                             "encoder.image_proj.")) for k in frozen)


def test_lr_schedule():
    for k in (0, 1, 500, 1000, 1999):
        assert cosine_lr(k, 2000, 5e-5) == pytest.approx(2.5e-5 * (1 + math.cos(math.pi * k / 2000)), rel=1e-12)
    assert cosine_lr(0, 2000, 5e-5) == 5e-5
    trainer = WordGridTrainer(tiny_segofa(3, **SMALL), AdaptOptions(steps=4, batch_size=1), device="cpu")
    lrs = [trainer.train_step().lr for _ in range(4)]
    assert lrs == [2.5e-5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    assert trainer.optimizer.param_groups[0]["lr"] == lrs[-1] and trainer.done
    g = trainer.optimizer.param_groups[0]
    assert (g["weight_decay"], g["betas"], g["eps"]) == (0.1, (0.9, 0.999), 1e-8)


def test_loss_matches_definition():
    torch.manual_seed(0)
    logits = torch.randn(2, 16, 3)
    targets = torch.randint(0, 3, (2, 64, 64))
    targets[0, :5] = 3  # ignore index M
    z = torch.nn.functional.interpolate(logits.transpose(1, 2).reshape(2, 3, 4, 4), size=(64, 64), mode="bilinear",
                                        align_corners=False)
    logp = torch.log_softmax(z.double(), dim=1)
    valid = targets != 3
    ref = -logp.gather(1, targets.clamp(max=2)[:, None])[:, 0][valid].mean()
    assert float(word_grid_loss(logits, targets, (4, 4))) == pytest.approx(float(ref), rel=1e-5)


def test_frozen_unchanged_trainable_changed():
    model = training_model(tiny_segofa(3, **SMALL))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = WordGridTrainer(model, AdaptOptions(steps=3, batch_size=2, lr=1e-3), device="cpu")
    grads = set()
    for _ in range(3):
        trainer.train_step()
        grads |= {k for k, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    trainable, frozen = split_parameters(model)
    for k in frozen:
        assert torch.equal(model.state_dict()[k], before[k]), k
    buffers = [k for k, _ in model.named_buffers() if k in before]  # persistent buffers
    assert any(".bn1.running_var" in k for k in buffers) and any(".bn1.weight" in k for k in buffers)
    for k in buffers:  # frozen-BN statistics/affine and every other buffer
        assert torch.equal(model.state_dict()[k], before[k]), k
    assert all(not p.requires_grad for p in frozen.values())
    for k in grads & set(trainable):
        assert not torch.equal(model.state_dict()[k], before[k]), k
    assert "decoder.layers.0.fc1.weight" in grads and "decoder.embed_seg_positions.weight" in grads
    # unused decoder tables get no gradient but still the decoupled weight decay of the original optimiser
    k = "decoder.embed_positions.weight"
    assert k not in grads
    expected = before[k].clone()
    for step in range(3):
        expected.mul_(1 - cosine_lr(step, 3, 1e-3) * 0.1)
    assert torch.equal(model.state_dict()[k], expected)


def test_loss_falls():
    model = training_model(_scaled_model(4), dropout=0.0, drop_path_rate=0.0)
    # a long schedule of which we run 60 updates: the learning rate stays near its peak
    trainer = WordGridTrainer(model, AdaptOptions(steps=300, batch_size=8, lr=3e-3, seed=0), device="cpu")
    losses = np.array([trainer.train_step().loss for _ in range(60)])
    first, last = losses[:10].mean(), losses[-10:].mean()
    assert np.isfinite(losses).all()
    assert last < 0.75 * first and last < math.log(4) - 0.3, (first, last)


def test_resume_bit_exact(tmp_path):
    opts = AdaptOptions(steps=6, batch_size=2, lr=1e-3, seed=3)
    base = training_model(tiny_segofa(3, **SMALL))

    straight = WordGridTrainer(training_model(base), opts, device="cpu")
    for _ in range(6):
        straight.train_step()

    first = WordGridTrainer(training_model(base), opts, device="cpu")
    for _ in range(3):
        first.train_step()
    torch.save(first.state_dict(), tmp_path / "state.pt")
    torch.manual_seed(1234)  # whatever happens in between must not matter
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    resumed = WordGridTrainer(training_model(tiny_segofa(3, seed=9, **SMALL)), opts, device="cpu")
    resumed.load_state_dict(state)
    assert resumed.step == 3
    for _ in range(3):
        resumed.train_step()
    for (k, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), k
    with pytest.raises(ValueError, match="different options"):
        WordGridTrainer(training_model(base), opts.replace(lr=2e-3), device="cpu").load_state_dict(state)


def test_bf16_autocast_on_cpu():
    trainer = WordGridTrainer(tiny_segofa(3, **SMALL), AdaptOptions(steps=2, batch_size=2, precision="bf16"),
                              device="cpu")
    stats = trainer.train_step()
    assert trainer.precision == "bf16" and math.isfinite(stats.loss) and math.isfinite(stats.grad_norm)
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # fp32 master weights


def test_options_validation():
    with pytest.raises(ValueError, match="steps=0"):
        AdaptOptions(steps=0)
    with pytest.raises(ValueError, match="precision"):
        AdaptOptions(precision="fp8")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        WordGridTrainer(tiny_segofa(2, **SMALL), AdaptOptions(precision="fp16"), device="cpu")
    model = build_model(tiny_config(**SMALL), 2)
    with pytest.raises(ValueError, match="no prompt"):
        WordGridTrainer(model, AdaptOptions(), device="cpu")
    assert AdaptOptions.from_dict(AdaptOptions().to_dict()) == AdaptOptions()


# --- CLI --------------------------------------------------------------------------------------------------------
def _cli(ckpt, bpe, out, *extra):
    return ["--checkpoint", str(ckpt), "--bpe-dir", str(bpe), "--categories", ", ".join(CATEGORIES),
            "--out", str(out), "--steps", "4", "--batch-size", "2", "--device", "cpu", "--no-progress",
            "--log-every", "1", *extra]


def test_cli_end_to_end(tiny_run_inputs, tmp_path, capsys):
    ckpt, bpe = tiny_run_inputs
    out = tmp_path / "run"
    assert main(_cli(ckpt, bpe, out, "--save-every", "2")) == 0
    assert "finished" in capsys.readouterr().out
    for name in ("model.safetensors", "run.json", "train_state.pt", "log.jsonl", "checkpoints/step_000002.safetensors",
                 "checkpoints/step_000004.safetensors"):
        assert (out / name).is_file(), name
    run = json.loads((out / "run.json").read_text())
    assert run["categories"] == CATEGORIES and run["num_categories"] == 4 and run["finished"]
    assert run["step"] == run["steps"] == 4 and math.isfinite(run["final_loss"])
    assert run["config"]["patch_image_size"] == 64 and run["options"]["batch_size"] == 2
    assert run["provenance"]["source_sha256"] and run["provenance"]["torch"] == torch.__version__
    assert run["category_token_ids"][3] and len(run["category_token_ids"][3]) == 2  # "concrete wall": two words
    assert run["prompt_tokens"][0] == 0 and run["prompt_tokens"][-1] == 2

    loaded = load_checkpoint(out)  # what the export step reads
    assert loaded.kind == "segofa" and loaded.categories == CATEGORIES
    assert loaded.prompt_prefix == run["prompt_prefix"]
    assert loaded.model.prompt_tokens.tolist() == run["prompt_tokens"]
    assert category_ids(loaded.model) == run["category_token_ids"]
    assert loaded.metadata["provenance"]["step"] == 4
    torch.testing.assert_close(loaded.model.encoder.seg_embed_tokens.weight,
                               loaded.model.category_embeddings(), rtol=0, atol=0)
    state = torch.load(out / "train_state.pt", weights_only=True)
    assert state["step"] == 4 and "optimizer" in state
    logs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [1, 2, 3, 4]

    with pytest.raises(UsageError, match="already holds a run"):
        main(_cli(ckpt, bpe, out))
    assert main(["--out", str(out), "--resume"]) == 0
    assert "already finished" in capsys.readouterr().out


def test_cli_stop_and_resume_exact(tiny_run_inputs, tmp_path):
    from safetensors.torch import load_file

    ckpt, bpe = tiny_run_inputs
    assert main(_cli(ckpt, bpe, tmp_path / "a")) == 0
    assert main(_cli(ckpt, bpe, tmp_path / "b", "--stop-at", "2")) == 0
    run = json.loads((tmp_path / "b" / "run.json").read_text())
    assert run["step"] == 2 and not run["finished"]
    with pytest.raises(UsageError, match="keeps its settings"):
        main(["--out", str(tmp_path / "b"), "--resume", "--lr", "1e-3"])
    assert main(["--out", str(tmp_path / "b"), "--resume", "--no-progress", "--device", "cpu"]) == 0
    a = load_file(str(tmp_path / "a" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("categories, message", [
    ("sky, road, sky", "duplicate category 'sky'"),
    ("sky, , road", "category 1 is empty"),
    ("sky, unknown", "appended automatically"),
])
def test_cli_bad_categories(tiny_run_inputs, tmp_path, categories, message):
    ckpt, bpe = tiny_run_inputs
    argv = _cli(ckpt, bpe, tmp_path / "run")
    argv[argv.index("--categories") + 1] = categories
    with pytest.raises(UsageError, match=message):
        main(argv)


def test_cli_bad_inputs(tiny_run_inputs, tmp_path):
    ckpt, bpe = tiny_run_inputs
    out = tmp_path / "run"
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no complete tokenizer file set"):
        main(_cli(ckpt, tmp_path / "empty", out))
    with pytest.raises(UsageError, match="checkpoint not found"):
        main(_cli(tmp_path / "nope.safetensors", bpe, out))
    long_prefix = " " + " ".join(["sky"] * 70)
    with pytest.raises(UsageError, match="more than the 64 text positions"):
        main(_cli(ckpt, bpe, out, "--prompt-prefix", long_prefix))
    with pytest.raises(UsageError, match="nothing to resume"):
        main(["--out", str(tmp_path / "fresh"), "--resume"])
    with pytest.raises(SystemExit):  # argparse: exit code 2
        main(_cli(ckpt, bpe, out, "--val-images", str(tmp_path)))
    cats = tmp_path / "cats.txt"
    cats.write_text("# comment\nsky\nroad, tree\n\n")
    argv = _cli(ckpt, bpe, out, "--steps", "1")
    i = argv.index("--categories")
    argv[i:i + 2] = ["--categories-file", str(cats)]
    assert main(argv) == 0
    assert json.loads((out / "run.json").read_text())["categories"] == ["sky", "road", "tree"]
    assert not list(tmp_path.glob("**/*.tmp"))


def test_cli_real_bpe_mismatch(tiny_run_inputs, tmp_path, bpe_dir):
    ckpt, _ = tiny_run_inputs
    with pytest.raises(UsageError, match=r"do not match .*token id \d+ but the checkpoint's dictionary has 300"):
        main(_cli(ckpt, bpe_dir, tmp_path / "run"))


def test_cli_validation(tiny_run_inputs, tmp_path):
    from PIL import Image

    ckpt, bpe = tiny_run_inputs
    rng = np.random.default_rng(0)
    for d in ("im", "lb"):
        (tmp_path / d).mkdir()
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "im" / f"{i}.png")
        Image.fromarray(rng.integers(0, 5, (40, 48), dtype=np.uint8)).save(tmp_path / "lb" / f"{i}.png")
    out = tmp_path / "run"
    assert main(_cli(ckpt, bpe, out, "--val-images", str(tmp_path / "im"), "--val-labels", str(tmp_path / "lb"),
                     "--val-every", "2", "--val-short-side", "64", "--knn-backend", "numpy")) == 0
    run = json.loads((out / "run.json").read_text())
    assert [v["step"] for v in run["validation"]] == [2, 4]
    for v in run["validation"]:
        assert v["images"] == 2 and 0 <= v["raw"]["mIoU"] <= 100 and 0 <= v["knn"]["mIoU"] <= 100
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert sum("validation" in r for r in logged) == 2


def test_bad_validation_pairs_are_refused_before_training(tiny_run_inputs, tmp_path):
    """Every validation pair's headers are read before the first step: a colour label map, a label map of another
    size and an unreadable image are all named, and no run is written. An EXIF-rotated photo's label map has the
    upright size, as load_image reads the photo."""
    from PIL import Image

    from ifseg_rt.evaluate import check_pairs, find_pairs
    from ifseg_rt.runtime.preprocess import load_image

    ckpt, bpe = tiny_run_inputs
    im, lb = tmp_path / "im", tmp_path / "lb"
    im.mkdir(), lb.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(im / f"{i}.png")
        Image.fromarray(rng.integers(0, 5, (40, 48), dtype=np.uint8)).save(lb / f"{i}.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees: 40 wide x 48 high as stored -> 48 x 40 upright
    Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(im / "4.jpg", exif=exif)
    Image.fromarray(rng.integers(0, 5, (40, 48), dtype=np.uint8)).save(lb / "4.png")
    check_pairs(find_pairs(im, lb))  # all good, the rotated one included
    assert load_image(im / "4.jpg").shape[:2] == (40, 48)
    Image.fromarray(rng.integers(0, 5, (40, 48, 3), dtype=np.uint8)).save(lb / "1.png")  # RGB colour map
    Image.fromarray(rng.integers(0, 5, (40, 40), dtype=np.uint8)).save(lb / "2.png")  # another size
    (im / "3.png").write_bytes(b"not a png")
    out = tmp_path / "run"
    with pytest.raises(UsageError) as e:
        main(_cli(ckpt, bpe, out, "--val-images", str(im), "--val-labels", str(lb)))
    msg = str(e.value)
    assert msg.startswith("3 of 5 image/label pair(s) cannot be used")
    assert f"{lb / '1.png'}: label maps must be single-channel (mode L, P or I), got mode RGB" in msg
    assert f"label map {lb / '2.png'} is 40x40 px but image {im / '2.png'} is 40x48 px" in msg
    assert f"cannot read image {im / '3.png'}" in msg
    assert not (out / "run.json").exists()


def test_module_entry_points():
    import subprocess
    import sys

    for cmd in (["-m", "ifseg_rt.adapt", "--help"], ["-m", "ifseg_rt", "adapt", "--help"]):
        res = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        assert "--categories-file" in res.stdout and "--val-images" in res.stdout


def test_cli_output_folder_and_resume_faults(tiny_run_inputs, tmp_path, capsys):
    """Refused before any work: an --out that holds the input checkpoint (the run would replace it), a folder of
    other files, a file; an unusable learning rate. On --resume: a damaged run.json or train state and flags that
    differ from what the run started from are named, not a traceback."""
    import shutil

    ckpt, bpe = tiny_run_inputs
    own = tmp_path / "own"
    own.mkdir()
    shutil.copy(ckpt, own / "model.safetensors")
    before = (own / "model.safetensors").read_bytes()
    with pytest.raises(UsageError, match=r"holds the input checkpoint .*would replace it"):
        main(_cli(own / "model.safetensors", bpe, own))
    assert (own / "model.safetensors").read_bytes() == before
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("x")
    with pytest.raises(UsageError, match=r"already holds files that are not an adaptation run \(mine.txt\)"):
        main(_cli(ckpt, bpe, tmp_path / "notes"))
    with pytest.raises(SystemExit) as info:
        main(_cli(ckpt, bpe, tmp_path / "notes" / "mine.txt"))
    assert info.value.code == 2 and "is a file, not a folder" in capsys.readouterr().err
    for lr in ("inf", "1e38"):
        with pytest.raises(UsageError, match=r"lr=.* must be in \(0, 1\]"):
            main(_cli(ckpt, bpe, tmp_path / "lr", "--lr", lr))
    (tmp_path / "cats.txt").write_bytes(b"sky\ncaf\xe9\n")  # Latin-1
    argv = _cli(ckpt, bpe, tmp_path / "latin1")
    argv[argv.index("--categories"):argv.index("--categories") + 2] = ["--categories-file", str(tmp_path / "cats.txt")]
    with pytest.raises(UsageError, match=r"cats.txt:2: not UTF-8 text \(byte 0xe9\); save the categories file"):
        main(argv)

    out = tmp_path / "run"
    assert main(_cli(ckpt, bpe, out, "--stop-at", "2")) == 0
    assert main([*_cli(ckpt, bpe, out), "--resume", "--stop-at", "3"]) == 0  # the same command + --resume: fine
    with pytest.raises(UsageError, match=r"keeps the checkpoint, BPE files and prompt .*--prompt-prefix"):
        main(["--out", str(out), "--resume", "--prompt-prefix", " other"])
    state = (out / "train_state.pt").read_bytes()
    (out / "train_state.pt").write_bytes(state[:100])
    with pytest.raises(UsageError, match=r"train_state.pt cannot be read .* truncated or damaged"):
        main(["--out", str(out), "--resume"])
    (out / "train_state.pt").write_bytes(state)
    run = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**run, "categories": run["categories"] + ["extra"]}))
    with pytest.raises(UsageError, match=r"'categories' \(5\), 'category_token_ids' and 'num_categories' \(4\) "
                                         r"disagree"):
        main(["--out", str(out), "--resume"])
    (out / "run.json").write_text("[]")
    with pytest.raises(UsageError, match=r"run.json is not an adaptation run file \(a JSON list\)"):
        main(["--out", str(out), "--resume"])


def test_diverged_weights_are_not_saved(tiny_run_inputs, tmp_path):
    """A trainable tensor turned NaN: the save is refused (the last good one stays), and the CLI's exit is 1."""
    from ifseg_rt.adapt import run as R

    ckpt, bpe = tiny_run_inputs
    out = tmp_path / "run"
    assert main(_cli(ckpt, bpe, out, "--stop-at", "2")) == 0
    good = (out / "model.safetensors").read_bytes()
    setup, options = R.setup_from_run(R.read_run(out))
    trainer = WordGridTrainer(setup.model, options, device="cpu")
    trainer.load_state_dict(R.load_train_state(out))
    name = next(iter(trainer.params))
    with torch.no_grad():
        trainer.params[name].view(-1)[0] = float("nan")
    writer = R.RunWriter(out, setup, args={}, save_dtype="fp32", keep_checkpoints=False, validation_log=[],
                         image_policy=None)
    with pytest.raises(R.DivergedError, match=rf"training diverged at step 2: 1 trainable tensor\(s\) hold NaN "
                                              rf"or Inf \(e.g. {name}\); not saved"):
        writer.save(trainer, final_loss=float("nan"), finished=False)
    assert (out / "model.safetensors").read_bytes() == good
