"""ifseg_rt.model against the specification: sizes, state_dict layout, forward shapes, and an independent float64
re-implementation of the equations (tests/ofa_reference.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import ofa_reference as ref
from conftest import SPEC_DIR, tiny_config, tiny_segofa
from ifseg_rt.model import MODEL_REGISTRY, OFAConfig, build_model, count_parameters, get_config
from ifseg_rt.model.positions import (image_position_idx, image_rp_bucket, interpolate_grid, resize_bias_2d_keep_first,
                                      token_rp_bucket)

# ofa.md §1: unique parameters and state_dict entries per size
SPEC_SIZES = {
    "tiny": (33_488_336, 543),
    "medium": (92_892_000, 849),
    "base": (182_238_536, 967),
    "large": (472_977_152, 1627),
    "huge": (929_486_848, 1903),
}
ISSUE_COUNTS_M = {"tiny": 33.5, "medium": 92.9, "base": 182.2, "large": 473.0, "huge": 929.5}


def meta_model(size, m=None):
    with torch.device("meta"):
        return build_model(size, m)


def layout(model):
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


DATA = Path(__file__).resolve().parent / "data"
APPENDIX_A = DATA / "ofa_tiny_state_dict.txt"  # ofa.md Appendix A, verbatim
APPENDIX_IFSEG = DATA / "segofa_base_m15_state_dict.txt"  # ifseg.md's state_dict appendix, verbatim


def parse_layout(text):
    """``key [shape] ...`` lines (``#`` comments skipped) -> [(key, shape)]."""
    out = []
    for line in text.strip().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape = line.split()[:2]
        out.append((key, tuple(int(x) for x in shape.strip("[]").split(",") if x)))
    return out


def spec_block(path, heading):
    text = path.read_text()
    sec = text[text.index(heading):]
    block = sec[sec.index("```") + 3:]
    return block[:block.index("```")]


def pattern_layout(cfg: OFAConfig, m=None):
    """Appendix B of ofa.md (and the IFSeg deltas of ifseg.md's appendix), generated for any size."""
    d, F_, H = cfg.d_model, cfg.ffn_dim, cfg.heads
    seg = m is not None
    V = cfg.vocab_size + (1 if seg else 0)
    out = []
    add = lambda k, *s: out.append((k, tuple(s)))  # noqa: E731

    def wb(k, n):
        add(k + ".weight", n)
        add(k + ".bias", n)

    def bn(k, n):
        wb(k, n)
        add(k + ".running_mean", n)
        add(k + ".running_var", n)
        if not seg:
            add(k + ".num_batches_tracked")

    add("encoder.version", 1)
    add("encoder.token_rp_bucket", 1024, 1024)
    add("encoder.image_rp_bucket", 1765, 1765)
    add("encoder.embed_tokens.weight", V, d)
    if seg:
        add("encoder.seg_embed_tokens.weight", m, d)
        add("encoder.embed_tokens_bag.weight", V, d)
    wb("encoder.layernorm_embedding", d)
    add("encoder.type_embedding.weight", 2, d)
    add("encoder.embed_images.conv1.weight", 64, 3, 7, 7)
    bn("encoder.embed_images.bn1", 64)
    for K, (n, w) in enumerate(zip(cfg.resnet_layers, (64, 128, 256)), start=1):
        for i in range(n):
            cin = (64, 256, 512)[K - 1] if i == 0 else 4 * w
            p = f"encoder.embed_images.layer{K}.{i}."
            add(p + "conv1.weight", w, cin, 1, 1)
            bn(p + "bn1", w)
            add(p + "conv2.weight", w, w, 3, 3)
            bn(p + "bn2", w)
            add(p + "conv3.weight", 4 * w, w, 1, 1)
            bn(p + "bn3", 4 * w)
            if i == 0:
                add(p + "downsample.0.weight", 4 * w, cin, 1, 1)
                bn(p + "downsample.1", 4 * w)
    add("encoder.image_proj.weight", d, 1024)
    add("encoder.image_proj.bias", d)
    wb("encoder.patch_layernorm_embedding", d)
    add("encoder.embed_positions.weight", 1026, d)
    add("encoder.embed_image_positions.weight", 1765, d)
    wb("encoder.pos_ln", d)
    wb("encoder.image_pos_ln", d)
    for k in ("pos_q_linear", "pos_k_linear"):
        add(f"encoder.{k}.weight", d, d)
        add(f"encoder.{k}.bias", d)

    def attn(p):
        add(p + "c_attn", H)
        for k in ("k_proj", "v_proj", "q_proj", "out_proj"):
            add(p + k + ".weight", d, d)
            add(p + k + ".bias", d)

    for L in range(cfg.encoder_layers):
        p = f"encoder.layers.{L}."
        attn(p + "self_attn.")
        wb(p + "self_attn_layer_norm", d)
        add(p + "fc1.weight", F_, d)
        add(p + "fc1.bias", F_)
        add(p + "fc2.weight", d, F_)
        add(p + "fc2.bias", d)
        wb(p + "attn_ln", d)
        wb(p + "ffn_layernorm", F_)
        wb(p + "final_layer_norm", d)
    wb("encoder.layer_norm", d)
    for L in range(cfg.encoder_layers):
        add(f"encoder.token_rel_pos_table_list.{L}.weight", 511, H)
    for L in range(cfg.encoder_layers):
        add(f"encoder.image_rel_pos_table_list.{L}.weight", 6892, H)
    add("decoder.version", 1)
    if seg:
        add("decoder.seg_rp_bucket", 1025, 1025)
    add("decoder.token_rp_bucket", 1024, 1024)
    add("decoder.image_rp_bucket", 1765, 1765)
    add("decoder.image_position_idx", 1026)
    if seg:
        add("decoder.bin_id_offset", 1)
        add("decoder.seg_id_offset", 1)
        add("decoder.region_prefix", 2)
        add("decoder.seg_embed_tokens.weight", m, d)
        add("decoder.seg_projection.weight", m, d)
    add("decoder.embed_tokens.weight", V, d)
    wb("decoder.layernorm_embedding", d)
    add("decoder.embed_positions.weight", 1026, d)
    add("decoder.embed_image_positions.weight", 1765, d)
    if seg:
        add("decoder.embed_seg_positions.weight", 1025, d)
    wb("decoder.pos_ln", d)
    wb("decoder.image_pos_ln", d)
    if seg:
        wb("decoder.seg_pos_ln", d)
    for k in ("self_pos_q_linear", "self_pos_k_linear", "cross_pos_q_linear", "cross_pos_k_linear"):
        add(f"decoder.{k}.weight", d, d)
        add(f"decoder.{k}.bias", d)
    wb("decoder.code_layernorm_embedding", d)
    for L in range(cfg.decoder_layers):
        p = f"decoder.layers.{L}."
        attn(p + "self_attn.")
        wb(p + "self_attn_ln", d)
        wb(p + "cross_attn_ln", d)
        wb(p + "self_attn_layer_norm", d)
        attn(p + "encoder_attn.")
        wb(p + "encoder_attn_layer_norm", d)
        wb(p + "ffn_layernorm", F_)
        add(p + "fc1.weight", F_, d)
        add(p + "fc1.bias", F_)
        add(p + "fc2.weight", d, F_)
        add(p + "fc2.bias", d)
        wb(p + "final_layer_norm", d)
    wb("decoder.layer_norm", d)
    if not seg:
        add("decoder.output_projection.weight", V, d)
    for L in range(cfg.decoder_layers):
        add(f"decoder.token_rel_pos_table_list.{L}.weight", 511, H)
    for L in range(cfg.decoder_layers):
        add(f"decoder.image_rel_pos_table_list.{L}.weight", 6892, H)
    if seg:
        for L in range(cfg.decoder_layers):
            add(f"decoder.seg_rel_pos_table_list.{L}.weight", 3972, H)
    return out


# --- sizes and layout ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", list(MODEL_REGISTRY))
def test_parameter_counts_match_spec(size):
    model = meta_model(size)
    n = count_parameters(model)
    assert n == SPEC_SIZES[size][0]
    assert abs(n / 1e6 - ISSUE_COUNTS_M[size]) <= 0.1
    assert len(model.state_dict()) == SPEC_SIZES[size][1]


def test_tiny_state_dict_equals_appendix_a():
    expected = parse_layout(APPENDIX_A.read_text())
    assert len(expected) == 543
    assert layout(meta_model("tiny")) == expected


def test_segofa_base_state_dict_equals_ifseg_appendix():
    expected = parse_layout(APPENDIX_IFSEG.read_text())
    assert len(expected) == 889
    assert layout(meta_model("base", 15)) == expected


def test_pattern_generator_reproduces_both_appendices():
    # the generator used for the other sizes is itself checked against the two full lists
    assert pattern_layout(get_config("tiny")) == parse_layout(APPENDIX_A.read_text())
    assert pattern_layout(get_config("base"), 15) == parse_layout(APPENDIX_IFSEG.read_text())


def test_appendix_copies_equal_the_specification():
    """tests/data holds verbatim copies of the spec's appendices (a clone without ../shared still checks layouts);
    where the specification is present, the copies must not have drifted from it."""
    for name, path in ((APPENDIX_A, SPEC_DIR / "ofa.md"), (APPENDIX_IFSEG, SPEC_DIR / "ifseg.md")):
        assert parse_layout(name.read_text())  # non-empty, parseable
    if not (SPEC_DIR / "ofa.md").exists():
        return  # no specification next to this checkout: the copies are the reference
    assert parse_layout(spec_block(SPEC_DIR / "ofa.md", "## Appendix A")) == parse_layout(APPENDIX_A.read_text())
    assert parse_layout(spec_block(SPEC_DIR / "ifseg.md", "## Appendix — state_dict")) == \
        parse_layout(APPENDIX_IFSEG.read_text())


@pytest.mark.parametrize("size", list(MODEL_REGISTRY))
@pytest.mark.parametrize("m", [None, 7])
def test_state_dict_follows_appendix_b_pattern(size, m):
    assert layout(meta_model(size, m)) == pattern_layout(get_config(size), m)


def test_segofa_parameter_roles():
    model = meta_model("base", 15)
    # ifseg.md §10: 109,327,656 trainable parameters for OFA-Base
    frozen = ("encoder.embed_tokens.", "encoder.seg_embed_tokens.", "encoder.embed_images.", "encoder.image_proj.")
    trainable = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(frozen))
    assert trainable == 109_327_656
    # frozen BN: weight/bias are buffers, no num_batches_tracked
    buffers = dict(model.named_buffers())
    assert "encoder.embed_images.bn1.weight" in buffers
    assert not any("num_batches_tracked" in k for k in model.state_dict())
    # aliases are the same tensor
    sd = model.state_dict(keep_vars=True)
    assert sd["decoder.seg_projection.weight"] is sd["encoder.seg_embed_tokens.weight"]
    assert sd["encoder.embed_tokens_bag.weight"] is sd["encoder.embed_tokens.weight"]


def test_config_validation_and_registry():
    with pytest.raises(ValueError, match="divisible"):
        OFAConfig(d_model=30, heads=4)
    with pytest.raises(ValueError, match="available"):
        get_config("gigantic")
    assert get_config("ofa-base") is MODEL_REGISTRY["base"]
    cfg = tiny_config()
    assert OFAConfig.from_dict(cfg.to_dict()) == cfg
    assert MODEL_REGISTRY["huge"].head_dim == 80
    assert MODEL_REGISTRY["base"].scaling == pytest.approx(0.08838834764831845)
    assert MODEL_REGISTRY["huge"].scaling == pytest.approx(0.07905694150420949)
    with pytest.raises(ValueError, match="unknown OFAConfig field"):
        OFAConfig.from_dict({"d_model": 8, "bogus": 1})


# --- buckets and position tables -------------------------------------------------------------------------------
def test_token_buckets_spec_values():
    table = token_rp_bucket(1024, 256)
    worked = {0: 255, 1: 256, -1: 254, 127: 382, 128: 383, 129: 384, 130: 384, 200: 411, 300: 436, 500: 467,
              700: 487, 1000: 509, 1023: 510, -129: 126, -1023: 0}
    for r, b in worked.items():
        i, j = (r, 0) if r >= 0 else (0, -r)
        assert table[i, j] == b, r
        assert ref.token_bucket(i, j) == b, r
    # the whole table equals the pair-by-pair float64 formula
    rng = np.random.default_rng(0)
    for i, j in rng.integers(0, 1024, size=(2000, 2)):
        assert table[i, j] == ref.token_bucket(int(i), int(j))
    assert table.min() == 0 and table.max() == 510


def test_image_and_seg_buckets_spec_values():
    t = image_rp_bucket(42)
    assert t.shape == (1765, 1765)
    assert (t[1, 1], t[1, 2], t[1, 43]) == (3444, 3443, 3361)
    assert (t[0, 5], t[5, 0], t[0, 0]) == (6889, 6890, 6891)
    s = image_rp_bucket(32)
    assert s.shape == (1025, 1025)
    assert (s[0, 1], s[1, 0], s[0, 0]) == (3969, 3970, 3971)
    assert s[1:, 1:].max() == 3968
    ids = np.arange(1765)
    rng = np.random.default_rng(1)
    for p, q in rng.integers(0, 1765, size=(500, 2)):
        assert t[p, q] == ref.grid_bucket(int(p), int(q), 42)
    assert np.array_equal(ref.grid_bucket_table(ids, 42), t.numpy())
    assert np.array_equal(ref.grid_bucket_table(np.arange(1025), 32), s.numpy())


def test_image_position_idx():
    idx = image_position_idx(128, 42, 1026)
    assert idx.shape == (1026,)
    assert idx[0] == 0 and idx[1] == 1 and idx[16] == 16 and idx[17] == 43 and idx[256] == 1 + 42 * 15 + 15
    assert (idx[257:] == 1024).all()


def test_native_grid_resize_is_exact_identity():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1024, generator=g)
    assert torch.equal(interpolate_grid(x, 32, 32, 32), x)
    model = tiny_segofa(3)
    dec = model.decoder
    with torch.no_grad():
        table = dec.embed_seg_positions.weight
        assert torch.equal(dec.seg_positions(32, 32), table)
        # through the interpolation itself (no shortcut)
        cells = interpolate_grid(table[1:].t(), 32, 32, 32).t()
        assert torch.equal(cells, table[1:])
        full = torch.nn.functional.embedding(dec.seg_rp_bucket, dec.seg_rel_pos_table_list[0].weight).permute(2, 0, 1)
        assert torch.equal(dec.seg_rel_bias(0, 32, 32), full)
        q = torch.cat([full[:, :1], interpolate_grid(full[:, 1:].transpose(1, 2), 32, 32, 32).transpose(1, 2)], 1)
        assert torch.equal(q, full)


def test_resize_matches_independent_bilinear():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1 + 32 * 32, 1 + 32 * 32, generator=g, dtype=torch.float64)
    out = resize_bias_2d_keep_first(x, 32, 5, 7).numpy()
    xn = x.numpy()
    rq = np.concatenate([xn[:, :1], np.swapaxes(ref.resize_cells(np.swapaxes(xn[:, 1:], 1, 2), 32, 5, 7), 1, 2)], 1)
    rk = np.concatenate([rq[:, :, :1], ref.resize_cells(rq[:, :, 1:], 32, 5, 7)], 2)
    np.testing.assert_allclose(out, rk, rtol=0, atol=1e-12)


# --- forward -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fp64_segofa():
    model = tiny_segofa(5, seed=3)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():  # non-trivial norms and BN statistics so that they matter
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.uniform_(0.5, 2.0, generator=g)
            elif name.endswith(("running_mean", "bias")) and "embed_images" in name:
                b.normal_(0, 0.1, generator=g)
    return model.double()


@pytest.mark.parametrize("hw", [(128, 160), (384, 512)])
def test_segofa_forward_shapes(hw):
    model = tiny_segofa(4)
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        logits, feats = model(x)
    n = (hw[0] // 16) * (hw[1] // 16)
    assert logits.shape == (2, n, 4) and feats.shape == (2, n, model.config.image_feature_dim)
    assert torch.isfinite(logits).all() and torch.isfinite(feats).all()


def test_segofa_matches_reference_small_grid(fp64_segofa):
    # 128 x 160 -> 8 x 10 grid, N = 80 <= 1024: direct absolute lookup, resized relative bias
    model = fp64_segofa
    x = np.random.default_rng(0).standard_normal((2, 3, 128, 160))
    expect, feats = ref.segofa_forward(ref.numpy_state(model), model.config, model.prompt_tokens.tolist(), images=x)
    with torch.no_grad():
        logits, f = model(torch.from_numpy(x))
    np.testing.assert_allclose(logits.numpy(), expect, rtol=0, atol=1e-10)
    np.testing.assert_allclose(f.numpy(), feats, rtol=0, atol=1e-10)


def test_segofa_matches_reference_large_grid(fp64_segofa):
    # 528 x 560 -> 33 x 35 grid, N = 1155 > 1024: absolute positions resized too; odd size with a partial cell
    model = fp64_segofa
    x = np.random.default_rng(1).standard_normal((1, 3, 520, 560))
    expect, _ = ref.segofa_forward(ref.numpy_state(model), model.config, model.prompt_tokens.tolist(), images=x)
    with torch.no_grad():
        logits, _ = model(torch.from_numpy(x))
    assert logits.shape[1] == 33 * 35
    np.testing.assert_allclose(logits.numpy(), expect, rtol=0, atol=1e-10)


def test_word_grid_forward_matches_reference(fp64_segofa):
    model = fp64_segofa
    rng = np.random.default_rng(2)
    cells = torch.from_numpy(rng.integers(0, 5, size=(2, 32, 32)))
    with torch.no_grad():
        logits = model.forward_word_grid(cells)
        emb = model.word_grid_embeddings(cells.reshape(2, -1)).numpy()
    sd = ref.numpy_state(model)
    # word cells = mean of the category's subword embeddings (ifseg.md §6)
    E = sd["encoder.embed_tokens.weight"]
    ids = model.category_token_ids.tolist()
    offs = model.category_offsets.tolist() + [len(ids)]
    means = np.stack([E[ids[a:b]].mean(0) for a, b in zip(offs[:-1], offs[1:])])
    np.testing.assert_allclose(emb, means[cells.reshape(2, -1).numpy()], atol=1e-12)
    np.testing.assert_allclose(sd["encoder.seg_embed_tokens.weight"], means, atol=1e-12)
    expect, _ = ref.segofa_forward(sd, model.config, model.prompt_tokens.tolist(), cells=emb, grid=(32, 32))
    assert logits.shape == (2, 1024, 5)
    np.testing.assert_allclose(logits.numpy(), expect, rtol=0, atol=1e-10)
    # changing one cell changes the prediction of later cells only through attention, never the earlier outputs
    cells2 = cells.clone()
    cells2[0, 31, 31] = (cells[0, 31, 31] + 1) % 5
    with torch.no_grad():
        logits2 = model.forward_word_grid(cells2)
    assert not torch.allclose(logits[0], logits2[0])
    assert torch.equal(logits[1], logits2[1])


def test_ofa_text_forward_matches_reference():
    torch.manual_seed(5)
    model = build_model(tiny_config()).double()
    x = np.random.default_rng(3).standard_normal((2, 3, 64, 96))
    src, prev = [0, 17, 23, 42, 2], [0, 17, 99, 5]
    expect = ref.ofa_forward(ref.numpy_state(model), model.config, src, x, prev)
    with torch.no_grad():
        logits = model(torch.tensor([src, src]), torch.from_numpy(x), torch.tensor([prev, prev]))
    assert logits.shape == (2, 4, model.config.vocab_size)
    np.testing.assert_allclose(logits.numpy(), expect, rtol=0, atol=1e-10)


def test_segofa_bf16_close_to_fp32():
    """bf16 (8-bit mantissa) stays within a tenth of the logits' per-cell spread (measured: ~0.02 of it) and keeps
    the arg-max; a wrong cast or a skipped layer moves logits by about the spread itself."""
    model = tiny_segofa(4)
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        a, _ = model(x)
        b, _ = model.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert b.dtype == torch.bfloat16 and torch.isfinite(b).all()
    spread = (a.max(-1).values - a.min(-1).values).mean()
    assert (a - b.float()).abs().max() < 0.1 * spread
    assert (a.argmax(-1) == b.float().argmax(-1)).float().mean() >= 0.95


def test_bad_inputs():
    model = tiny_segofa(3)
    with pytest.raises(ValueError, match="Bx3xHxW"):
        model(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match="exceeds"):
        model(torch.randn(1, 3, 16, 16 * 50))  # 1 x 50 grid, N <= 1024 but w > 42 columns of the table
    with pytest.raises(ValueError, match="categories"):
        model.set_categories([0, 2], [[5]])
    with pytest.raises(ValueError, match="outside"):
        model.set_categories([0, 2], [[5], [6], [10_000]])
    with pytest.raises(ValueError, match="PAD"):
        model.set_categories([0, 1, 2], [[5], [6], [7]])
    bare = build_model(tiny_config(), 3)
    with pytest.raises(RuntimeError, match="set_categories"):
        bare(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="num_categories"):
        build_model(tiny_config(), 0)
