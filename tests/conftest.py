"""Shared fixtures: small random models (no weights are ever downloaded) and the optional shared test data (the real
OFA BPE files, which users bring with their checkpoints; the specification's key lists live in tests/data)."""

from __future__ import annotations

import shutil
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
