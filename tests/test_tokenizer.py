import json
from pathlib import Path

import pytest

from ifseg_rt.tokenizer import (
    IFSEG_PROMPT_PREFIX,
    OFATokenizer,
    build_ifseg_prompt,
    normalize_text,
    parse_categories,
    write_hf_vocab,
)

BPE_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "ofa-bpe"
requires_bpe = pytest.mark.skipif(
    not all((BPE_DIR / f).is_file() for f in ("encoder.json", "vocab.bpe", "dict.txt")),
    reason=f"OFA BPE files not found in {BPE_DIR}",
)

# ifseg.md §15, verbatim
COCO_15 = """frisbee, skateboard, cardboard, carrot, scissors, suitcase, giraffe, cow, road, concrete wall, tree, grass, river,
clouds, playingfield"""
ADE_150 = """wall, building, sky, floor, tree, ceiling, road, bed, windowpane, grass, cabinet, sidewalk, person, earth, door,
table, mountain, plant, curtain, chair, car, water, painting, sofa, shelf, house, sea, mirror, rug, field, armchair,
seat, fence, desk, rock, wardrobe, lamp, bathtub, railing, cushion, base, box, column, signboard, chest of drawers,
counter, sand, sink, skyscraper, fireplace, refrigerator, grandstand, path, stairs, runway, case, pool table, pillow,
screen door, stairway, river, bridge, bookcase, blind, coffee table, toilet, flower, book, hill, bench, countertop,
stove, palm, kitchen island, computer, swivel chair, boat, bar, arcade machine, hovel, bus, towel, light, truck,
tower, chandelier, awning, streetlight, booth, television receiver, airplane, dirt track, apparel, pole, land,
bannister, escalator, ottoman, bottle, buffet, poster, stage, van, ship, fountain, conveyer belt, canopy, washer,
plaything, swimming pool, stool, barrel, basket, waterfall, tent, bag, minibike, cradle, oven, ball, food, step,
tank, trade name, microwave, pot, animal, bicycle, lake, dishwasher, screen, blanket, sculpture, hood, sconce, vase,
traffic light, tray, ashcan, fan, pier, crt screen, plate, monitor, bulletin board, shower, radiator, glass, clock,
flag"""
COCO_171 = """person, bicycle, car, motorcycle, airplane, bus, train, truck, boat, traffic light, fire hydrant, stop sign,
parking meter, bench, bird, cat, dog, horse, sheep, cow, elephant, bear, zebra, giraffe, backpack, umbrella,
handbag, tie, suitcase, frisbee, skis, snowboard, sports ball, kite, baseball bat, baseball glove, skateboard,
surfboard, tennis racket, bottle, wine glass, cup, fork, knife, spoon, bowl, banana, apple, sandwich, orange,
broccoli, carrot, hot dog, pizza, donut, cake, chair, couch, potted plant, bed, dining table, toilet, tv, laptop,
mouse, remote, keyboard, cell phone, microwave, oven, toaster, sink, refrigerator, book, clock, vase, scissors,
teddy bear, hair drier, toothbrush, banner, blanket, branch, bridge, building, bush, cabinet, cage, cardboard,
carpet, ceiling, ceiling tile, cloth, clothes, clouds, counter, cupboard, curtain, desk, dirt, door, fence,
marble floor, other floor, stone floor, tile floor, wood floor, flower, fog, food, fruit, furniture, grass, gravel,
ground, hill, house, leaves, light, mat, metal, mirror, moss, mountain, mud, napkin, net, paper, pavement, pillow,
plant, plastic, platform, playingfield, railing, railroad, river, road, rock, roof, rug, salad, sand, sea, shelf,
sky, skyscraper, snow, solid, stairs, stone, straw, structural, table, tent, textile, towel, tree, vegetable,
brick wall, concrete wall, other wall, panel wall, stone wall, tile wall, wood wall, water, waterdrops,
blind window, other window, wood"""

# ifseg.md §3 reference ids
REFERENCE_IDS = {
    "what is the segmentation map of the image? object:": [99, 16, 5, 2835, 1258, 5456, 9, 5, 2274, 116, 7626, 35],
    "frisbee": [6664, 354, 14650],
    "skateboard": [12800, 4929],
    "cardboard": [25081],
    "carrot": [33129],
    "scissors": [36063],
    "suitcase": [28441],
    "giraffe": [25650, 17459],
    "cow": [12094],
    "road": [921],
    "concrete wall": [6369, 2204],
    "tree": [3907],
    "grass": [6964],
    "river": [4908],
    "clouds": [10722],
    "playingfield": [816, 1399],
    "unknown": [4727],
    "plant": [2195],
    "cat": [4758],
    "dog": [2335],
    "other": [97],
}


@pytest.fixture(scope="module")
def tok():
    if not BPE_DIR.is_dir():
        pytest.skip(f"OFA BPE files not found in {BPE_DIR}")
    return OFATokenizer.from_dir(BPE_DIR)


# ---------------------------------------------------------------- real files


@requires_bpe
@pytest.mark.parametrize("name", list(REFERENCE_IDS))
def test_reference_ids(tok, name):
    assert tok.encode_words(name) == REFERENCE_IDS[name]
    assert tok.encode(name) == REFERENCE_IDS[name]


@requires_bpe
def test_layout(tok):
    assert len(tok) == 59457
    assert (tok.mask_id, tok.code_offset, tok.bin_offset) == (50264, 50265, 58457)
    for sym, i in [("<s>", 0), ("<pad>", 1), ("</s>", 2), ("<unk>", 3), ("<mask>", 50264), ("<code_0>", 50265),
                   ("<code_8191>", 58456), ("<bin_0>", 58457), ("<bin_999>", 59456), ("madeupword0000", 50261),
                   ("Ġthe", 5), (".", 4)]:
        assert tok.symbol_to_id(sym) == i
        assert tok.id_to_symbol(i) == sym
    # ofa.md §3: GPT-2 13 "." -> 4, 262 " the" -> 5, 50256 <|endoftext|> -> 50260 (an ordinary token)
    assert tok.encode(".", leading_space=False) == [4]
    assert tok.encode("the") == [5]
    assert tok.symbol_to_id("<|endoftext|>") == 50260
    with pytest.raises(IndexError):
        tok.id_to_symbol(59457)
    for bad in ["<code_8192>", "<bin_1000>", "<code_01>", "nope"]:
        with pytest.raises(KeyError):
            tok.symbol_to_id(bad)


def _reference_gpt2_ids(text, encoder, ranks):
    """OpenAI's GPT-2 encoder.py algorithm, written out independently of `tokenizers`."""
    regex = pytest.importorskip("regex")
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    byte_enc = dict(zip(bs, map(chr, cs)))
    pat = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
    out = []
    for token in pat.findall(text):
        word = [byte_enc[b] for b in token.encode("utf-8")]
        while len(word) > 1:
            rank, a, b = min((ranks.get(p, float("inf")), *p) for p in zip(word, word[1:]))
            if rank == float("inf"):
                break
            merged, j = [], 0
            while j < len(word):
                if j + 1 < len(word) and word[j] == a and word[j + 1] == b:
                    merged.append(a + b)
                    j += 2
                else:
                    merged.append(word[j])
                    j += 1
            word = merged
        out += [encoder[w] for w in word]
    return out


@requires_bpe
def test_independent_dict_mapping(tok):
    encoder = json.loads((BPE_DIR / "encoder.json").read_text(encoding="utf-8"))
    lines = (BPE_DIR / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:]
    ranks = {tuple(line.split()): r for r, line in enumerate(lines) if line}
    dict_line = {line.split()[0]: k for k, line in enumerate((BPE_DIR / "dict.txt").read_text().splitlines())}
    for text in [" Hello, world! It's 2024 — naïve café", "  multiple   spaces\tand\ttabs\n", " <|endoftext|>",
                 " 🙂 emoji, ÄÖÜ", " chest of drawers", " crt screen", "don't re-use 3.14/2"]:
        gpt2 = _reference_gpt2_ids(text, encoder, ranks)
        assert tok.encode(text, leading_space=False) == [4 + dict_line[str(i)] for i in gpt2], text


@requires_bpe
def test_word_by_word_equals_joined(tok):
    for name in [*parse_categories(ADE_150), *parse_categories(COCO_171), "  two   spaces ", IFSEG_PROMPT_PREFIX]:
        assert tok.encode_words(name) == tok.encode(" ".join(name.split())), name


@requires_bpe
def test_decode_roundtrip(tok):
    text = "Hello wörld 🙂, it's fine"
    ids = tok.frame(tok.encode(text))
    assert tok.decode(ids) == " " + text
    assert tok.decode(ids, skip_special_tokens=False) == "<s> " + text + "</s>"
    assert tok.decode([tok.mask_id, tok.code_offset + 12, tok.bin_offset + 7]) == "<mask><code_12><bin_7>"


@requires_bpe
@pytest.mark.parametrize("categories, m, length", [(COCO_15, 15, 36), (ADE_150, 150, 215), (COCO_171, 171, 239)])
def test_prompt_lengths(tok, categories, m, length):
    p = build_ifseg_prompt(tok, categories)
    assert len(p.categories) == len(p.category_ids) == m
    assert len(p.src_ids) == len(p) == length
    assert p.src_ids[0] == tok.BOS and p.src_ids[-1] == tok.EOS
    assert list(p.prefix_ids) == REFERENCE_IDS["what is the segmentation map of the image? object:"]
    assert p.unknown_ids == (4727,)
    flat = [i for ids in p.category_ids for i in ids]
    assert list(p.src_ids) == tok.frame([*p.prefix_ids, *flat, *p.unknown_ids])


@requires_bpe
def test_prompt_coco15_ids(tok):
    p = build_ifseg_prompt(tok, COCO_15)
    assert p.categories[9] == "concrete wall"
    for name, ids in zip(p.categories, p.category_ids):
        assert list(ids) == REFERENCE_IDS[name]


@requires_bpe
def test_prompt_too_long(tok):
    with pytest.raises(ValueError, match=r"36 tokens .* max_length=30"):
        build_ifseg_prompt(tok, COCO_15, max_length=30)
    assert len(build_ifseg_prompt(tok, COCO_15, max_length=36)) == 36


@requires_bpe
def test_hf_path_matches_fairseq(tok, tmp_path):
    write_hf_vocab(BPE_DIR, tmp_path)
    vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 50265 and vocab["<mask>"] == 50264 and vocab["Ġthe"] == 5
    hf = OFATokenizer.from_dir(tmp_path)
    assert len(hf) == len(tok) and hf.mask_id == tok.mask_id
    for text in [*REFERENCE_IDS, " Hello, world! It's 2024 — naïve café", "<|endoftext|> 🙂"]:
        assert hf.encode(text) == tok.encode(text)
    assert build_ifseg_prompt(hf, ADE_150) == build_ifseg_prompt(tok, ADE_150)
    assert hf.decode(tok.encode("café 🙂")) == " café 🙂"
    assert all(hf.id_to_symbol(i) == tok.id_to_symbol(i) for i in range(0, 59457, 97))


# ---------------------------------------------------------------- tiny custom vocabulary (no shared files)

TINY_ENCODER = {"a": 0, "b": 1, "c": 2, "Ġ": 3, "Ġa": 4, "ab": 5, "Ġab": 6, "t": 7, "Ġc": 8}
TINY_MERGES = ["Ġ a", "Ġa b", "a b", "Ġ c"]


def _write_tiny(d, dict_lines):
    d.mkdir(parents=True, exist_ok=True)
    (d / "encoder.json").write_text(json.dumps(TINY_ENCODER), encoding="utf-8")
    (d / "vocab.bpe").write_text("#version: 0.2\n" + "\n".join(TINY_MERGES) + "\n", encoding="utf-8")
    (d / "dict.txt").write_text("".join(f"{s} {n}\n" for s, n in dict_lines), encoding="utf-8")
    return d


def test_tiny_vocab(tmp_path):
    # dict order differs from GPT-2 order; "ab" (5), "t" (7), "Ġc" (8) are missing -> <unk>
    d = _write_tiny(tmp_path, [("6", 10), ("0", 5), ("4", 3), ("3", 2), ("1", 1), ("2", 1), ("madeupword0000", 0)])
    tok = OFATokenizer.from_dir(d, num_codes=4, num_bins=3)
    assert (tok.mask_id, tok.code_offset, tok.bin_offset, len(tok)) == (11, 12, 16, 19)
    assert tok.id_to_symbol(10) == "madeupword0000"
    assert tok.id_to_symbol(15) == "<code_3>" and tok.id_to_symbol(18) == "<bin_2>"
    assert tok.encode("ab") == [4]
    assert tok.encode("ab", leading_space=False) == [3]
    assert tok.encode("a c") == [6, 3]
    assert tok.encode("z") == [7, 3]  # "z" is not even a BPE piece
    assert tok.encode_words(" ab  a ") == [4, 6]
    assert tok.decode([0, 4, 6, 2, 11, 12]) == " ab a<mask><code_0>"
    # "unknown" is "Ġ" + seven characters outside this dictionary here, one <unk> each: a prompt the model could
    # not read (fairseq builds it silently); with the real dictionary every byte has a piece and <unk> never occurs
    assert tok.encode_words("unknown") == [7, *[3] * 7]
    with pytest.raises(ValueError, match=r"'unknown' tokenizes to <unk> \(id 3\): the BPE dictionary"):
        build_ifseg_prompt(tok, ["ab", "a ab"], prefix=" a")
    with pytest.raises(ValueError, match="not in dict.txt"):
        write_hf_vocab(d, tmp_path / "hf")


def test_tiny_hf_path(tmp_path):
    d = _write_tiny(tmp_path / "fs", [(str(i), 1) for i in [8, 3, 0, 7, 5, 4, 6, 1, 2]])
    fs = OFATokenizer.from_dir(d)
    hf = OFATokenizer.from_dir(write_hf_vocab(d, tmp_path / "hf"))
    assert len(hf) == len(fs) == 4 + 9 + 1 + 8192 + 1000
    for text in ["ab", "a c", "cab ab", "z", "tabby"]:
        assert hf.encode(text) == fs.encode(text), text
    assert fs.encode("c") == [4]


# ---------------------------------------------------------------- errors and helpers


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        OFATokenizer.from_dir(tmp_path / "nope")
    _write_tiny(tmp_path, [("0", 1)])
    (tmp_path / "dict.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing dict\.txt.*vocab\.json, merges\.txt"):
        OFATokenizer.from_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"dict\.txt.*fairseq-style"):
        OFATokenizer.from_files(encoder_json=tmp_path / "encoder.json", vocab_bpe=tmp_path / "vocab.bpe",
                                dict_txt=tmp_path / "dict.txt")
    with pytest.raises(ValueError, match="dict_txt is required"):
        OFATokenizer.from_files(encoder_json=tmp_path / "encoder.json", vocab_bpe=tmp_path / "vocab.bpe")
    with pytest.raises(ValueError, match="exactly one file set"):
        OFATokenizer.from_files(encoder_json=tmp_path / "encoder.json", merges_txt=tmp_path / "vocab.bpe")


def test_bad_dict(tmp_path):
    d = _write_tiny(tmp_path, [("0", 1), ("0", 2)])
    with pytest.raises(ValueError, match="duplicate symbol '0'"):
        OFATokenizer.from_dir(d)
    (d / "dict.txt").write_text("0 1\nbroken\n")
    with pytest.raises(ValueError, match=r"dict\.txt:2"):
        OFATokenizer.from_dir(d)


def test_parse_categories():
    assert parse_categories(" sky,road , concrete wall") == ["sky", "road", "concrete wall"]
    assert parse_categories(["a ", " b"]) == ["a", "b"]
    assert len(parse_categories(COCO_171)) == 171 and len(parse_categories(ADE_150)) == 150
    with pytest.raises(ValueError, match="category 1 is empty"):
        parse_categories("sky, , road")
    with pytest.raises(ValueError, match="category 1 is empty"):
        parse_categories(["sky", "  "])
    with pytest.raises(ValueError, match=r"duplicate category 'sky' at positions 0 and 2"):
        parse_categories("sky, road, sky")
    with pytest.raises(ValueError, match="no categories"):
        parse_categories([])


def test_prompt_rejects_unknown(tmp_path):
    tok = OFATokenizer.from_dir(_write_tiny(tmp_path, [("0", 1)]))
    with pytest.raises(ValueError, match="appended automatically"):
        build_ifseg_prompt(tok, "a, unknown")


@pytest.mark.parametrize(
    "text, kwargs, expected",
    [
        ("  What's up?", {}, "what's up?"),
        (",.!Hello -- World/Foo  ", {}, "hello world foo"),
        ("a  b\t\tc\nd", {}, "a b c\nd"),
        ("One two three four", {"max_words": 2}, "one two"),
        ("A man, riding a horse.", {"drop_punctuation": True}, "a man riding a horse"),
        ("it's a dog's life!", {"drop_punctuation": True, "max_words": 3}, "its a dogs"),
        ("", {}, ""),
    ],
)
def test_normalize_text(text, kwargs, expected):
    assert normalize_text(text, **kwargs) == expected


@requires_bpe
def test_damaged_bpe_files_and_indistinguishable_names(tok, tmp_path):
    """A truncated dict.txt turns pieces into <unk> (refused, not a prompt of unk ids); files that are not UTF-8 or
    not JSON are named; two names with the same ids (they differ only in spacing) cannot be two categories."""
    import shutil

    with pytest.raises(ValueError, match=r"categories 'sky blue' and 'sky  blue' tokenize to the same ids"):
        build_ifseg_prompt(tok, ["sky blue", "sky  blue"])
    d = tmp_path / "bpe"
    shutil.copytree(BPE_DIR, d)
    lines = (BPE_DIR / "dict.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    (d / "dict.txt").write_text("".join(lines[:1000]), encoding="utf-8")
    with pytest.raises(ValueError, match=r"tokenizes to <unk> \(id 3\)"):
        build_ifseg_prompt(OFATokenizer.from_dir(d), ["sky", "grass"])
    (d / "dict.txt").write_bytes("".join(lines[:5]).encode() + b"caf\xe9 1\n")
    with pytest.raises(ValueError, match=r"dict.txt:6: not UTF-8 text \(byte 0xe9\)"):
        OFATokenizer.from_dir(d)
    shutil.copy(BPE_DIR / "dict.txt", d / "dict.txt")
    (d / "encoder.json").write_text('{"a": 1,', encoding="utf-8")
    with pytest.raises(ValueError, match=r"encoder.json: not valid JSON"):
        OFATokenizer.from_dir(d)


def test_merges_and_vocabulary_must_be_one_tokenizer(tmp_path):
    """A truncated vocab.bpe split 'sky' into two pieces without an error (another prompt for the model); a merge of
    pieces the vocabulary lacks failed inside the tokenizers library."""
    from conftest import write_tiny_bpe

    from ifseg_rt.tokenizer import OFATokenizer

    d = tmp_path / "bpe"
    write_tiny_bpe(d)
    full = OFATokenizer.from_dir(d)
    lines = (d / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    (d / "vocab.bpe").write_text("\n".join(lines[:len(lines) // 2]) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"vocab.bpe has \d+ merges, but \d+ piece\(s\) of .*encoder.json come from "
                                         r"none .*truncated or of another tokenizer"):
        OFATokenizer.from_dir(d)
    (d / "vocab.bpe").write_text("\n".join(lines + ["zz qq"]) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"merge {len(lines)} \('zz qq'\) uses 'zz', which .*encoder.json does not "
                                         rf"hold"):
        OFATokenizer.from_dir(d)
    (d / "vocab.bpe").write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert OFATokenizer.from_dir(d).encode(" sky") == full.encode(" sky")
