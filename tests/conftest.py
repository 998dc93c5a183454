"""Shared fixtures: small random models (no weights are ever downloaded) and the optional shared test data (the real
OFA BPE files, which users bring with their checkpoints; the specification's key lists live in tests/data)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SPEC_DIR = SHARED / "spec"
BPE_DIR = SHARED / "data" / "ofa-bpe"


def has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        try:
            import cupy

            return cupy.cuda.runtime.getDeviceCount() > 0
        except Exception:
            return False


def pytest_collection_modifyitems(config, items):
    if has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "requires_cuda" in item.keywords:
            item.add_marker(skip)


def tiny_config(**overrides):
    """A fast custom OFA config: d=32, 4 heads, 2+2 layers, one ResNet block per stage (128 feature channels)."""
    from ifseg_rt.model import OFAConfig

    kw = dict(d_model=32, ffn_dim=64, heads=4, encoder_layers=2, decoder_layers=2, resnet_layers=(1, 1, 1),
              resnet_width=8, vocab_size=300, max_positions=64, token_bucket_size=16, name="test-tiny")
    kw.update(overrides)
    return OFAConfig(**kw)


def tiny_segofa(num_categories: int = 5, seed: int = 0, **overrides):
    """A random tiny SegOFA with a prompt and category ids set (ids are arbitrary rows of the small vocabulary)."""
    import torch

    from ifseg_rt.model import build_model

    torch.manual_seed(seed)
    model = build_model(tiny_config(**overrides), num_categories)
    cat_ids = [[10 + 2 * k] if k % 2 else [10 + 2 * k, 11 + 2 * k] for k in range(num_categories)]
    prompt = [0, 5, 6, 7, 8] + [t for ids in cat_ids for t in ids] + [9, 2]
    model.set_categories(prompt, cat_ids)
    return model


CATEGORIES = ["sky", "road", "car", "tree", "person"]  # of the shared export's tiny model


def make_run_dir(root: Path, seed: int = 0) -> Path:
    """A tiny adaptation run directory: model.safetensors (prompt + categories) and a minimal run.json."""
    from ifseg_rt.checkpoint import save_checkpoint
    from ifseg_rt.files import RUN_FILE, WEIGHTS_FILE

    run = root / f"run{seed}"
    run.mkdir(parents=True, exist_ok=True)
    save_checkpoint(tiny_segofa(len(CATEGORIES), seed=seed), run / WEIGHTS_FILE, categories=CATEGORIES)
    (run / RUN_FILE).write_text(json.dumps({"format": "ifseg_rt.adapt.run", "finished": True, "step": 3,
                                            "steps": 3, "categories": CATEGORIES}))
    return run


@pytest.fixture(scope="session")
def shared_export(tmp_path_factory) -> Path:
    """One dynamic-shape export of a tiny random model (CATEGORIES), shared by the whole session (~20 s). Tests
    that change it work on :func:`export_copy`."""
    pytest.importorskip("onnxruntime")
    from ifseg_rt.export import export

    root = tmp_path_factory.mktemp("export")
    export(make_run_dir(root), root / "model")
    return root / "model"


def export_copy(src: Path, tmp_path_factory, name: str, policy) -> Path:
    """A copy of the model directory ``src`` with ``policy`` (an ImagePolicy) written into its manifest."""
    import shutil

    from ifseg_rt.runtime.model_dir import MANIFEST

    d = tmp_path_factory.mktemp(name) / "model"
    shutil.copytree(src, d)
    m = json.loads((d / MANIFEST).read_text())
    m["image"]["policy"] = policy.to_dict()
    (d / MANIFEST).write_text(json.dumps(m))
    return d


@pytest.fixture
def one_torch_thread():
    """Tiny models run fastest on one thread, and OpenMP spin-waits make shared CPUs crawl: use one, then restore."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def bpe_dir():
    if not (BPE_DIR / "encoder.json").exists():
        pytest.skip(f"OFA BPE files not found in {BPE_DIR}")
    return BPE_DIR


@pytest.fixture(scope="session")
def quick_nano_model(tmp_path_factory):
    """An exported model directory of the shipped nano model, adapted for a few steps (``demo --quick``, ~20 s):
    a real IFSeg model end to end, shared by the tests that need one on disk (serving, repositories)."""
    import torch

    from ifseg_rt.nano.demo import QUICK, run_demo
    from ifseg_rt.world import DEFAULT_DEMO_CATEGORIES

    out = tmp_path_factory.mktemp("quick_nano")
    n = torch.get_num_threads()
    try:
        run_demo(out, DEFAULT_DEMO_CATEGORIES, QUICK, threads=1, progress=False, log=lambda *a, **k: None)
    finally:
        torch.set_num_threads(n)
    return out / "model"


def adapted_nano_run(root: Path, steps: int = 4) -> Path:
    """The shipped nano model adapted for a few steps to 6 synthetic-world categories: a run directory (seconds)."""
    from ifseg_rt.adapt import AdaptOptions, RunWriter, WordGridTrainer, prepare, train
    from ifseg_rt.nano.demo import find_nano

    nano = find_nano(None)
    names = ["sky", "grass", "water", "sand", "ball", "star"]
    options = AdaptOptions(steps=steps, batch_size=2, lr=1e-3, seed=1)
    setup = prepare(nano / "model.safetensors", nano, names, options=options)
    trainer = WordGridTrainer(setup.model, options, device="cpu")
    writer = RunWriter(root / "run", setup, keep_checkpoints=False)
    train(trainer, writer, save_every=0, log_every=steps, progress=False)
    return root / "run"


@pytest.fixture(scope="session")
def nano_run(tmp_path_factory):
    """A briefly adapted nano model's run directory, shared by the whole session."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return adapted_nano_run(tmp_path_factory.mktemp("nano_run"))
    finally:
        torch.set_num_threads(n)


# --- a tiny fairseq-style BPE vocabulary (whole words of a few test sentences) ----------------------------------
TINY_WORDS = ["what", "is", "the", "segmentation", "map", "of", "image", "object", "sky", "road", "tree", "grass",
              "concrete", "wall", "unknown"]


def write_tiny_bpe(d, words=TINY_WORDS):
    """encoder.json + vocab.bpe + dict.txt where every word (with its leading space) is one BPE piece."""
    d.mkdir(parents=True, exist_ok=True)
    chars = sorted({c for w in words for c in w} | {"?", ":"})
    pieces, merges = ["Ġ", *chars], []
    for w in words:
        cur = "Ġ"
        for c in w:
            if cur + c not in pieces:
                merges.append(f"{cur} {c}")
                pieces.append(cur + c)
            cur += c
    encoder = {p: i for i, p in enumerate(pieces)}
    (d / "encoder.json").write_text(json.dumps(encoder), encoding="utf-8")
    (d / "vocab.bpe").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (d / "dict.txt").write_text("".join(f"{i} 1\n" for i in range(len(pieces))), encoding="utf-8")
    return d
