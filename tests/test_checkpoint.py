"""ifseg_rt.checkpoint: fairseq / HF-port / IFSeg / safetensors files load exactly, bad files fail clearly."""

from __future__ import annotations

import argparse
import copy
import os
import re
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from ifseg_rt.checkpoint import (CheckpointError, CheckpointMismatchError, UnsafeCheckpointError, file_sha256,  # noqa: E402
                                 load_checkpoint, save_checkpoint, to_hf_keys)
from ifseg_rt.model import OFA, SegOFA, build_model  # noqa: E402

from conftest import tiny_config, tiny_segofa  # noqa: E402

CATEGORIES = ["sky", "road", "tree", "person", "car"]


def tiny_ofa(seed: int = 0) -> OFA:
    torch.manual_seed(seed)
    return build_model(tiny_config()).eval()


def ofa_inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, 300, (2, 7), generator=g)
    src[:, 0], src[:, -1] = 0, 2
    images = torch.rand(2, 3, 48, 64, generator=g) * 2 - 1
    prev = torch.randint(4, 300, (2, 5), generator=g)
    prev[:, 0] = 0
    return src, images, prev


def fp16_round(model):
    """The model a fp16 checkpoint of ``model`` describes (floats rounded to half, computed in fp32)."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.half().float())
        for name, b in ref.named_buffers():
            if b.is_floating_point():
                b.copy_(b.half().float())
    return ref.eval()


def fairseq_file(path: Path, state, *, task: argparse.Namespace | None = None, ema=None) -> Path:
    """A file laid out like fairseq's ``checkpoint_utils.save_state``: fp16 weights and argparse objects."""
    cfg = {"model": argparse.Namespace(arch="ofa_tiny", encoder_embed_dim=32, dropout=0.1),
           "task": task or argparse.Namespace(_name="caption", max_src_length=80),
           "common": argparse.Namespace(fp16=True, seed=7)}
    obj = {"args": None, "cfg": cfg, "model": {k: v.half() if v.is_floating_point() else v for k, v in state.items()},
           "optimizer_history": [{"criterion_name": "AdjustLabelSmoothedCrossEntropyCriterion", "num_updates": 10}],
           "extra_state": {"epoch": 3, "train_iterator": {"epoch": 3}, "ema": ema}}
    torch.save(obj, path)
    return path


# --- fairseq OFA ----------------------------------------------------------------------------------------------
def test_fairseq_fp16_pt_with_argparse_cfg_loads_exactly(tmp_path):
    src_model = tiny_ofa()
    state = src_model.state_dict()
    # buffers are regenerated in code: a file with garbage bucket tables must still give the right answer
    for k in list(state):
        if k.endswith("token_rp_bucket") or k.endswith("image_rp_bucket"):
            state[k] = torch.zeros_like(state[k])
    path = fairseq_file(tmp_path / "ofa_tiny.pt", state)
    loaded = load_checkpoint(path)
    assert loaded.kind == "ofa" and loaded.source_format == "fairseq"
    assert isinstance(loaded.model, OFA) and not loaded.model.training
    assert loaded.config.d_model == 32 and loaded.config.resnet_layers == (1, 1, 1)
    ref = fp16_round(src_model)
    with torch.no_grad():
        want = ref(*ofa_inputs())
        got = loaded.model(*ofa_inputs())
    assert got.shape == want.shape == (2, 5, 300)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # and really a fp16 rounding: the fp32 source differs measurably
    with torch.no_grad():
        assert (src_model(*ofa_inputs()) - got).abs().max() > 1e-6


def test_requested_config_must_match_the_file(tmp_path):
    path = fairseq_file(tmp_path / "ofa.pt", tiny_ofa().state_dict())
    assert load_checkpoint(path, config=tiny_config()).config == tiny_config()
    with pytest.raises(CheckpointError, match=r"requested dimensions.*d_model"):
        load_checkpoint(path, config=tiny_config(d_model=64, ffn_dim=128))


def test_ema_weights_are_read_when_asked(tmp_path):
    a, b = tiny_ofa(0), tiny_ofa(1)
    path = fairseq_file(tmp_path / "ofa.pt", a.state_dict(), ema={k: v.half() for k, v in b.state_dict().items()})
    with torch.no_grad():
        got = load_checkpoint(path, ema=True).model(*ofa_inputs())
        torch.testing.assert_close(got, fp16_round(b)(*ofa_inputs()), rtol=0, atol=1e-5)
    no_ema = fairseq_file(tmp_path / "no_ema.pt", a.state_dict())
    with pytest.raises(CheckpointError, match="no extra_state\\['ema'\\]"):
        load_checkpoint(no_ema, ema=True)


# --- HF port ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prefix", ["", "model."])
def test_hf_port_pytorch_model_bin_loads_exactly(tmp_path, prefix):
    src_model = tiny_ofa()
    # ofa.md §10.2's renames, written out here (not the loader's own table); no `version` buffers in the port
    renames = [(r"^(encoder\.layers\.\d+)\.attn_ln\.", r"\1.self_attn_mid_layer_norm."),
               (r"^(encoder\.layers\.\d+)\.ffn_layernorm\.", r"\1.ffn_layer_norm."),
               (r"^(decoder\.layers\.\d+)\.self_attn_ln\.", r"\1.self_attn_mid_layer_norm."),
               (r"^(decoder\.layers\.\d+)\.cross_attn_ln\.", r"\1.cross_attn_mid_layer_norm."),
               (r"^(decoder\.layers\.\d+)\.encoder_attn\.", r"\1.cross_attn."),
               (r"^(decoder\.layers\.\d+)\.encoder_attn_layer_norm\.", r"\1.cross_attn_layer_norm."),
               (r"^(decoder\.layers\.\d+)\.ffn_layernorm\.", r"\1.ffn_layer_norm.")]
    hf = {}
    for k, v in src_model.state_dict().items():
        if k.endswith(".version"):
            continue
        for pat, rep in renames:
            k = re.sub(pat, rep, k)
        hf[prefix + k] = v
    assert hf.keys() == {prefix + k for k in to_hf_keys(src_model.state_dict())}  # the exporter's table agrees
    assert sum(any(re.search(pat, k) for pat, _ in renames) for k in src_model.state_dict()) > 20
    d = tmp_path / "ofa-tiny-hf"
    d.mkdir()
    torch.save(hf, d / "pytorch_model.bin")
    loaded = load_checkpoint(d)  # the directory, as users point at it
    assert loaded.source_format == "hf" and loaded.kind == "ofa"
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(*ofa_inputs()), src_model(*ofa_inputs()), rtol=0, atol=1e-6)


# --- strict key checks ------------------------------------------------------------------------------------------
def test_missing_unexpected_and_mismatched_keys_are_listed(tmp_path):
    state = dict(tiny_ofa().state_dict())
    del state["encoder.layers.1.fc1.weight"]
    del state["decoder.layers.1.self_attn.q_proj.bias"]
    state["encoder.layers.0.not_a_module.weight"] = torch.zeros(3)
    state["encoder.layers.1.fc2.weight"] = torch.zeros(32, 65)
    path = fairseq_file(tmp_path / "broken.pt", state)
    with pytest.raises(CheckpointMismatchError) as info:
        load_checkpoint(path)
    err = info.value
    assert sorted(err.missing) == ["decoder.layers.1.self_attn.q_proj.bias", "encoder.layers.1.fc1.weight"]
    assert err.unexpected == ["encoder.layers.0.not_a_module.weight"]
    assert err.mismatched == [("encoder.layers.1.fc2.weight", (32, 65), (32, 64))]
    msg = str(err)
    assert "2 missing key(s)" in msg and "1 unexpected key(s)" in msg and "1 shape mismatch(es)" in msg
    assert "encoder.layers.1.fc2.weight file [32, 65] vs model [32, 64]" in msg and "broken.pt" in msg


def test_missing_size_key_names_it(tmp_path):
    state = dict(tiny_ofa().state_dict())
    del state["encoder.layers.0.self_attn.c_attn"]
    with pytest.raises(CheckpointError, match="encoder.layers.0.self_attn.c_attn"):
        load_checkpoint(fairseq_file(tmp_path / "x.pt", state))


def test_ofa_to_segofa_refuses_missing_ofa_weights(tmp_path):
    """Only IFSeg's new modules may start fresh (ifseg.md §14.1); a missing OFA weight is an error, not random."""
    state = dict(tiny_ofa().state_dict())
    del state["encoder.layers.1.fc1.weight"]
    del state["decoder.layer_norm.weight"]
    with pytest.raises(CheckpointMismatchError) as info:
        load_checkpoint(fairseq_file(tmp_path / "ofa.pt", state), num_categories=4)
    assert sorted(info.value.missing) == ["decoder.layer_norm.weight", "encoder.layers.1.fc1.weight"]


def test_hf_and_fairseq_names_of_one_tensor_are_refused(tmp_path):
    state = dict(tiny_ofa().state_dict())
    state["decoder.layers.0.cross_attn_mid_layer_norm.weight"] = torch.full((32,), 7.0)  # HF name of cross_attn_ln
    with pytest.raises(CheckpointError, match=r"'decoder.layers.0.cross_attn_ln.weight' .*\n?.*"
                                              r"'decoder.layers.0.cross_attn_mid_layer_norm.weight' both name"):
        load_checkpoint(fairseq_file(tmp_path / "mixed.pt", state))


def test_english_vocabulary_needs_an_official_size(tmp_path):
    """An English-vocabulary file that is no OFA size (here OFA-tiny without its last encoder layer and last ResNet
    block) is refused, naming what differs, instead of loading as a smaller custom model."""
    with torch.device("meta"):
        shapes = {k: (tuple(v.shape), v.dtype) for k, v in build_model("tiny", init=False).state_dict().items()}
    state = {k: torch.zeros(shp, dtype=dt) for k, (shp, dt) in shapes.items()
             if not k.startswith(("encoder.layers.3.", "encoder.embed_images.layer3.5."))}
    path = tmp_path / "tiny_truncated.pt"
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert "dimensions of no OFA size" in msg
    assert "encoder_layers 3 (from encoder.layers.N.*) where OFA-tiny has 4" in msg
    assert "resnet_layers [3, 4, 5]" in msg and "OFA-tiny has [3, 4, 6]" in msg
    torch.save({"model": {k: torch.zeros(shp, dtype=dt) for k, (shp, dt) in shapes.items()}}, path)
    assert load_checkpoint(path).config.name == "tiny"  # complete: loads


@pytest.mark.parametrize("key,value,match", [
    ("encoder.embed_tokens.weight", torch.zeros(300), r"'encoder.embed_tokens.weight' should be a 2-D tensor, got a "
                                                      r"1-D tensor \[300\]"),
    ("encoder.layers.0.self_attn.c_attn", torch.zeros(5), r"bad.pt: the tensor shapes give no valid model .*heads"),
    ("encoder.layers.0.self_attn.c_attn", [1.0, 2.0], r"'encoder.layers.0.self_attn.c_attn' should be a 1-D tensor, "
                                                      r"got a list"),
    ("encoder.layers.1.fc1.weight", [1.0], r"entry 'encoder.layers.1.fc1.weight' is a list, not a tensor"),
])
def test_malformed_size_keys_are_named(tmp_path, key, value, match):
    state = dict(tiny_ofa().state_dict())
    state[key] = value
    path = tmp_path / "bad.pt"
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path)


# --- untrusted pickles ------------------------------------------------------------------------------------------
class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_malicious_pickle_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    obj = {"model": tiny_ofa().state_dict(), "cfg": {"task": _Payload(marker)}}
    path = tmp_path / "evil.pt"
    torch.save(obj, path)
    with pytest.raises(UnsafeCheckpointError, match=r"refusing to load .*evil\.pt.*not executed"):
        load_checkpoint(path)
    assert not marker.exists()
    # the same payload unpickled without our guard would have run (so the test above can fail)
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_unreadable_and_truncated_files(tmp_path):
    good = fairseq_file(tmp_path / "good.pt", tiny_ofa().state_dict())
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated.pt"):
        load_checkpoint(truncated)
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(CheckpointError, match="without model.safetensors"):
        load_checkpoint(empty_dir)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="expected a fairseq checkpoint"):
        load_checkpoint(tmp_path / "list.pt")
    # files that are no torch checkpoint at all say what they are (not "unsafe", not a bare KeyError)
    import pickle

    import numpy as np
    from safetensors.torch import save_file

    (tmp_path / "page.pt").write_text("<html><body>403 Forbidden</body></html>")
    (tmp_path / "empty.pt").write_bytes(b"")
    np.save(tmp_path / "arr.npy", np.zeros(3))
    (tmp_path / "arr.npy").rename(tmp_path / "arr.pt")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "st.pt"))
    (tmp_path / "plain.pt").write_bytes(b"plain text, no pickle")
    for name, what in [("page.pt", "text file"), ("empty.pt", "the file is empty"), ("arr.pt", "numpy .npy"),
                       ("st.pt", "safetensors file"), ("plain.pt", "text file")]:
        with pytest.raises(CheckpointError, match=f"cannot read .*{name} as a torch checkpoint: .*{what}") as info:
            load_checkpoint(tmp_path / name)
        assert not isinstance(info.value, UnsafeCheckpointError)
    with open(tmp_path / "pickled.pt", "wb") as f:  # a plain pickle (protocol byte 0x80): not refused as text
        pickle.dump({"model": {"a": 1}}, f)
    with pytest.raises(CheckpointError, match="pickled.pt as a torch checkpoint: it is a plain Python pickle"):
        load_checkpoint(tmp_path / "pickled.pt")


def test_sha256_is_verified_before_reading(tmp_path):
    path = fairseq_file(tmp_path / "ofa.pt", tiny_ofa().state_dict())
    sha = file_sha256(path)
    assert load_checkpoint(path, expected_sha256=sha.upper()).sha256 == sha
    with pytest.raises(CheckpointError, match=r"sha256 mismatch for .*ofa\.pt"):
        load_checkpoint(path, expected_sha256="0" * 64)


# --- IFSeg checkpoints and the OFA -> SegOFA surgery --------------------------------------------------------------
def test_ifseg_checkpoint_reads_weights_and_categories(tmp_path):
    seg = tiny_segofa(len(CATEGORIES))
    task = argparse.Namespace(_name="segmentation", category_list=", ".join(CATEGORIES), prompt_prefix="what is?")
    path = fairseq_file(tmp_path / "ifseg.pt", seg.state_dict(), task=task)
    loaded = load_checkpoint(path)
    assert loaded.kind == "segofa" and isinstance(loaded.model, SegOFA)
    assert loaded.categories == CATEGORIES and loaded.prompt_prefix == "what is?"
    assert loaded.model.num_categories == 5
    ref = fp16_round(seg)
    images = torch.rand(1, 3, 32, 48) * 2 - 1
    prompt = seg.prompt_tokens
    with torch.no_grad():
        lg, ft = loaded.model(images, prompt)
        lg_ref, ft_ref = ref(images, prompt)
    assert lg.shape == (1, 6, 5) and ft.shape == (1, 6, 4 * 8 * 4)
    torch.testing.assert_close(lg, lg_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(ft, ft_ref, rtol=0, atol=1e-5)
    with pytest.raises(CheckpointError, match="M = 5 categories, not 7"):
        load_checkpoint(path, num_categories=7)
    bad = fairseq_file(tmp_path / "bad.pt", seg.state_dict(),
                       task=argparse.Namespace(category_list="sky, road"))
    with pytest.raises(CheckpointError, match="lists 2 categories but the weights have M = 5"):
        load_checkpoint(bad)


def test_ofa_to_segofa_surgery(tmp_path):
    src_model = tiny_ofa()
    path = fairseq_file(tmp_path / "ofa.pt", src_model.state_dict())
    a = load_checkpoint(path, num_categories=4, seed=3)
    b = load_checkpoint(path, num_categories=4, seed=3)
    c = load_checkpoint(path, num_categories=4, seed=4)
    assert a.kind == "segofa" and isinstance(a.model, SegOFA) and a.model.num_categories == 4
    sa, sb, sc = a.model.state_dict(), b.model.state_dict(), c.model.state_dict()
    src = src_model.state_dict()
    emb = sa["encoder.embed_tokens.weight"]
    assert emb.shape == (301, 32)  # one appended row (ifseg.md §14.1)
    torch.testing.assert_close(emb[:300], src["encoder.embed_tokens.weight"].half().float(), rtol=0, atol=0)
    torch.testing.assert_close(sa["encoder.layers.1.fc1.weight"], src["encoder.layers.1.fc1.weight"].half().float(),
                               rtol=0, atol=0)
    fresh = [k for k in sa if k.startswith("decoder.embed_seg_positions") or "seg_" in k and k.endswith("weight")]
    assert fresh, "the new seg modules should exist"
    for k in list(sa):
        if sa[k].is_floating_point():
            torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0)  # same seed: reproducible
    assert any(not torch.equal(sa[k], sc[k]) for k in fresh)  # another seed: other fresh values
    assert not any(k.startswith("decoder.output_projection") and sa[k].shape[0] == 300 for k in sa)


# --- our format -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [None, torch.float16])
def test_safetensors_roundtrip(tmp_path, dtype):
    seg = tiny_segofa(len(CATEGORIES)).eval()
    prov = {"source": "unit-test", "steps": 3}
    path = save_checkpoint(seg, tmp_path / "run" / "model.safetensors", categories=CATEGORIES, prompt_prefix="p?",
                           provenance=prov, dtype=dtype)
    loaded = load_checkpoint(tmp_path / "run")
    assert loaded.source_format == "ifseg_rt" and loaded.kind == "segofa"
    assert loaded.categories == CATEGORIES and loaded.prompt_prefix == "p?"
    assert loaded.metadata["provenance"] == prov and loaded.config == seg.config
    assert loaded.model.prompt_tokens.tolist() == seg.prompt_tokens.tolist()
    assert loaded.model.category_token_ids.tolist() == seg.category_token_ids.tolist()
    ref = fp16_round(seg) if dtype is torch.float16 else seg
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        lg, ft = loaded.model(images)
        lg_ref, ft_ref = ref(images)
    torch.testing.assert_close(lg, lg_ref, rtol=0, atol=1e-5 if dtype else 0)
    torch.testing.assert_close(ft, ft_ref, rtol=0, atol=1e-5 if dtype else 0)
    with pytest.raises(ValueError, match="2 category names for a model with M = 5"):
        save_checkpoint(seg, tmp_path / "x.safetensors", categories=["a", "b"])
    with pytest.raises(ValueError, match="writes .safetensors files"):
        save_checkpoint(seg, tmp_path / "x.pt")
    assert path.exists() and not path.with_suffix(".safetensors.tmp").exists()


def test_saving_is_byte_reproducible(tmp_path):
    """Equal weights and metadata give equal files (safetensors alone orders its header differently per save)."""
    import json

    seg = tiny_segofa(len(CATEGORIES)).eval()
    paths = [save_checkpoint(seg, tmp_path / f"m{i}.safetensors", categories=CATEGORIES, provenance={"i": 0})
             for i in range(4)]
    assert len({p.read_bytes() for p in paths}) == 1
    raw = paths[0].read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    assert list(header) == sorted(header) and list(header["__metadata__"]) == sorted(header["__metadata__"])
    loaded = load_checkpoint(paths[0])
    assert loaded.categories == CATEGORIES
    for k, v in seg.state_dict().items():
        if k in loaded.model.state_dict():
            torch.testing.assert_close(loaded.model.state_dict()[k], v, rtol=0, atol=0)


def test_corrupt_safetensors_is_a_clear_error(tmp_path):
    path = save_checkpoint(tiny_ofa(), tmp_path / "m.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="cannot read .*m.safetensors as safetensors"):
        load_checkpoint(path)


def test_load_checkpoint_checks_device_and_dtype_before_reading(tmp_path):
    """They used to fail inside torch (AssertionError 'Torch not compiled with CUDA', a TypeError) after the whole file
    was read."""
    import torch

    from ifseg_rt.checkpoint import load_checkpoint

    missing = tmp_path / "not-read.pt"  # never opened: the arguments fail first
    for kw, msg in (({"device": "gpu"}, "device must be 'cpu', 'cuda' or 'cuda:N'"),
                    ({"dtype": torch.int64}, "dtype must be a floating-point torch dtype"),
                    ({"dtype": "float16"}, "dtype must be a floating-point torch dtype")):
        with pytest.raises(ValueError, match=msg):
            load_checkpoint(missing, **kw)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch sees no CUDA GPU here"):
            load_checkpoint(missing, device="cuda")


def test_save_checkpoint_refuses_what_it_would_lose(tmp_path):
    import torch

    from conftest import tiny_segofa

    from ifseg_rt.checkpoint import save_checkpoint

    model = tiny_segofa(3)
    with pytest.raises(ValueError, match="dtype must be a floating-point torch dtype"):
        save_checkpoint(model, tmp_path / "m.safetensors", dtype=torch.int8)  # wrote all-zero weights
    with pytest.raises(TypeError, match="categories must be a list of names"):
        save_checkpoint(model, tmp_path / "m.safetensors", categories="abc")  # 3 one-letter names
    (tmp_path / "d.safetensors").mkdir()
    with pytest.raises(ValueError, match="is a folder"):
        save_checkpoint(model, tmp_path / "d.safetensors")
    assert not list(tmp_path.glob("*.tmp"))
