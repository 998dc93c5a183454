"""OFA tokenizer (GPT-2 byte-level BPE + fairseq dictionary) and the IFSeg prompt builder.

Ids follow the fairseq layout of OFA (``ofa.md`` §3)::

    0 1 2 3            <s> <pad> </s> <unk>
    4 ... 4+D-1        the D dict.txt entries, in file order (D = 50260 for OFA)
    4+D                <mask>
    5+D ...            <code_0> ... <code_{num_codes-1}>
    ...                <bin_0> ... <bin_{num_bins-1}>

Two file sets are accepted: fairseq-style (``encoder.json`` + ``vocab.bpe`` + ``dict.txt``: GPT-2 ids are mapped
through the dictionary) and HF-style (``vocab.json`` + ``merges.txt``, where ``vocab.json`` already maps every BPE
piece to its fairseq id). The BPE itself is the ``tokenizers`` library's; this module only does the id bookkeeping.
"""

from __future__ import annotations

import io
import json
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from .files import read_text

FAIRSEQ_FILES = ("encoder.json", "vocab.bpe", "dict.txt")
HF_FILES = ("vocab.json", "merges.txt")

SPECIAL_SYMBOLS = ("<s>", "<pad>", "</s>", "<unk>")  # ids 0..3, fairseq Dictionary order
MASK_SYMBOL = "<mask>"
NUM_CODES = 8192  # image-code tokens <code_i>
NUM_BINS = 1000  # location tokens <bin_i>
MAX_POSITIONS = 1024  # encoder text positions

IFSEG_PROMPT_PREFIX = " what is the segmentation map of the image? object:"
IFSEG_UNKNOWN = "unknown"  # always appended as the last prompt word; <seg_M> in the model

# never produced by the BPE merges, so it can only come out of the model as the unk fallback
_RAW_UNK = "<|ifseg_rt_unk|>"
_CODE_BIN_RE = re.compile(r"<(code|bin)_(\d+)>")


class OFATokenizer:
    """Text <-> fairseq ids for OFA / IFSeg.

    Build it with :meth:`from_dir` or :meth:`from_files`; the constructor is internal.
    ``encode`` never adds BOS/EOS (use :meth:`frame`).
    """

    BOS, PAD, EOS, UNK = 0, 1, 2, 3

    def __init__(
        self,
        *,
        bpe: Tokenizer,
        raw_to_id: np.ndarray,
        base_symbols: Sequence[str],
        piece_ids: np.ndarray,
        num_codes: int = NUM_CODES,
        num_bins: int = NUM_BINS,
    ):
        if num_codes < 0 or num_bins < 0:
            raise ValueError(f"num_codes and num_bins must be >= 0, got {num_codes} and {num_bins}")
        self._bpe = bpe
        self._raw_to_id = raw_to_id  # BPE model id -> fairseq id (identity for HF-style files)
        self._symbols = list(base_symbols)  # fairseq id -> symbol for ids < code_offset
        self._is_piece = piece_ids  # bool per base id: symbol is a byte-level BPE piece (decoded as bytes)
        self._symbol_index = {s: i for i, s in enumerate(self._symbols)}
        self._byte_decoder = decoders.ByteLevel()
        self.num_codes = num_codes
        self.num_bins = num_bins

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_dir(cls, path, *, num_codes: int = NUM_CODES, num_bins: int = NUM_BINS) -> "OFATokenizer":
        """Load from a directory holding fairseq-style or HF-style tokenizer files.

        Parameters
        ----------
        path : str or Path
            Directory with ``encoder.json`` + ``vocab.bpe`` + ``dict.txt`` (fairseq-style, preferred when both
            sets are present) or ``vocab.json`` + ``merges.txt`` (HF-style).
        num_codes, num_bins : int
            Number of ``<code_i>`` and ``<bin_i>`` symbols appended after ``<mask>``.

        Returns
        -------
        OFATokenizer
        """
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"tokenizer directory not found: {path}")
        fairseq = [path / f for f in FAIRSEQ_FILES]
        hf = [path / f for f in HF_FILES]
        if all(p.is_file() for p in fairseq):
            return cls.from_files(
                encoder_json=fairseq[0],
                vocab_bpe=fairseq[1],
                dict_txt=fairseq[2],
                num_codes=num_codes,
                num_bins=num_bins,
            )
        if all(p.is_file() for p in hf):
            return cls.from_files(vocab_json=hf[0], merges_txt=hf[1], num_codes=num_codes, num_bins=num_bins)
        missing_fs = [p.name for p in fairseq if not p.is_file()]
        missing_hf = [p.name for p in hf if not p.is_file()]
        raise FileNotFoundError(
            f"no complete tokenizer file set in {path}: expected fairseq-style {' + '.join(FAIRSEQ_FILES)} "
            f"(missing {', '.join(missing_fs)}) or HF-style {' + '.join(HF_FILES)} (missing {', '.join(missing_hf)})"
        )

    @classmethod
    def from_files(
        cls,
        *,
        encoder_json=None,
        vocab_bpe=None,
        dict_txt=None,
        vocab_json=None,
        merges_txt=None,
        num_codes: int = NUM_CODES,
        num_bins: int = NUM_BINS,
    ) -> "OFATokenizer":
        """Load from explicit files: either ``encoder_json, vocab_bpe, dict_txt`` or ``vocab_json, merges_txt``.

        Parameters
        ----------
        encoder_json, vocab_bpe, dict_txt : str or Path, optional
            fairseq-style set: GPT-2 piece -> GPT-2 id, GPT-2 merges, fairseq dictionary of decimal GPT-2 ids.
        vocab_json, merges_txt : str or Path, optional
            HF-style set: piece -> fairseq id (specials 0-3 and ``<mask>`` included), merges.
        num_codes, num_bins : int
            Number of ``<code_i>`` and ``<bin_i>`` symbols appended after ``<mask>``.

        Returns
        -------
        OFATokenizer
        """
        fs = {"encoder_json": encoder_json, "vocab_bpe": vocab_bpe, "dict_txt": dict_txt}
        hf = {"vocab_json": vocab_json, "merges_txt": merges_txt}
        use_fs = any(v is not None for v in fs.values())
        use_hf = any(v is not None for v in hf.values())
        if use_fs == use_hf:
            raise ValueError(
                "pass exactly one file set: fairseq-style encoder_json + vocab_bpe + dict_txt, "
                "or HF-style vocab_json + merges_txt"
                + (" (got arguments from both)" if use_fs else " (got none)")
            )
        given = fs if use_fs else hf
        kind = "fairseq-style (encoder.json + vocab.bpe + dict.txt)" if use_fs else "HF-style (vocab.json + merges.txt)"
        for name, value in given.items():
            if value is None:
                raise ValueError(f"{name} is required for the {kind} tokenizer files")
            if not Path(value).is_file():
                raise FileNotFoundError(f"tokenizer file not found: {value} ({name}; the {kind} set is expected)")
        merges = _read_merges(Path(vocab_bpe if use_fs else merges_txt))
        vocab_file = Path(encoder_json if use_fs else vocab_json)
        vocab = _read_json_vocab(vocab_file)
        check_merges(vocab, merges, vocab_bpe if use_fs else merges_txt, vocab_file)
        if use_fs:
            return cls._from_fairseq(vocab, merges, Path(dict_txt), num_codes, num_bins)
        return cls._from_hf(vocab, vocab_file, merges, num_codes, num_bins)

    @classmethod
    def _from_fairseq(cls, encoder: dict, merges, dict_txt: Path, num_codes: int, num_bins: int):
        dict_symbols = read_fairseq_dict(dict_txt)
        n_raw = max(encoder.values(), default=-1) + 1
        vocab = dict(encoder)
        vocab[_RAW_UNK] = n_raw
        # fairseq id = 4 + dict line of the decimal GPT-2 id; GPT-2 ids absent from dict.txt -> <unk>
        raw_to_id = np.full(n_raw + 1, cls.UNK, dtype=np.int64)
        id_to_piece = {v: k for k, v in encoder.items()}
        base = list(SPECIAL_SYMBOLS)
        is_piece = [False] * len(SPECIAL_SYMBOLS)
        for line, sym in enumerate(dict_symbols):
            fid = len(SPECIAL_SYMBOLS) + line
            raw = int(sym) if sym.isdecimal() else -1
            if raw in id_to_piece:
                raw_to_id[raw] = fid
                base.append(id_to_piece[raw])
                is_piece.append(True)
            else:  # e.g. madeupword0000: a symbol no text maps to
                base.append(sym)
                is_piece.append(False)
        base.append(MASK_SYMBOL)
        is_piece.append(False)
        return cls(
            bpe=_byte_level_bpe(vocab, merges, _RAW_UNK),
            raw_to_id=raw_to_id,
            base_symbols=base,
            piece_ids=np.array(is_piece, dtype=bool),
            num_codes=num_codes,
            num_bins=num_bins,
        )

    @classmethod
    def _from_hf(cls, vocab: dict, vocab_json: Path, merges, num_codes: int, num_bins: int):
        n = len(vocab)
        base = [None] * n
        for sym, i in vocab.items():
            if not 0 <= i < n or base[i] is not None:
                raise ValueError(
                    f"{vocab_json}: ids must be 0..{n - 1} without gaps or repeats (bad entry {sym!r}: {i})"
                )
            base[i] = sym
        expected = {**{s: i for i, s in enumerate(SPECIAL_SYMBOLS)}, MASK_SYMBOL: n - 1}
        for sym, i in expected.items():
            if vocab.get(sym) != i:
                raise ValueError(
                    f"{vocab_json}: expected {sym!r} at id {i} (fairseq layout: <s> <pad> </s> <unk> first, "
                    f"<mask> last), found {vocab.get(sym)}"
                )
        is_piece = np.ones(n, dtype=bool)
        is_piece[list(expected.values())] = False
        return cls(
            bpe=_byte_level_bpe(vocab, merges, SPECIAL_SYMBOLS[cls.UNK]),
            raw_to_id=np.arange(n, dtype=np.int64),
            base_symbols=base,
            piece_ids=is_piece,
            num_codes=num_codes,
            num_bins=num_bins,
        )

    # ------------------------------------------------------------------ layout

    def __len__(self) -> int:
        return self.bin_offset + self.num_bins

    @property
    def mask_id(self) -> int:
        """Id of ``<mask>`` (4 + number of dict.txt entries; 50264 for OFA)."""
        return len(self._symbols) - 1

    @property
    def code_offset(self) -> int:
        """Id of ``<code_0>`` (50265 for OFA)."""
        return len(self._symbols)

    @property
    def bin_offset(self) -> int:
        """Id of ``<bin_0>`` (58457 for OFA)."""
        return self.code_offset + self.num_codes

    def id_to_symbol(self, i: int) -> str:
        """Symbol of a fairseq id: ``'<s>'``, ``'<mask>'``, ``'<code_12>'``, ``'<bin_7>'`` or a BPE piece ``'Ġthe'``."""
        i = int(i)
        if 0 <= i < self.code_offset:
            return self._symbols[i]
        if self.code_offset <= i < self.bin_offset:
            return f"<code_{i - self.code_offset}>"
        if self.bin_offset <= i < len(self):
            return f"<bin_{i - self.bin_offset}>"
        raise IndexError(f"id {i} is outside the dictionary (0..{len(self) - 1})")

    def symbol_to_id(self, symbol: str) -> int:
        """Inverse of :meth:`id_to_symbol`; raises ``KeyError`` for a symbol not in the dictionary.

        Dict entries are looked up by their BPE piece (``'Ġthe'``), not by the decimal GPT-2 id in dict.txt.
        """
        i = self._symbol_index.get(symbol)
        if i is not None:
            return i
        m = _CODE_BIN_RE.fullmatch(symbol)
        if m is not None:
            k = int(m.group(2))
            if m.group(1) == "code":
                offset, count = self.code_offset, self.num_codes
            else:
                offset, count = self.bin_offset, self.num_bins
            if k < count and m.group(2) == str(k):
                return offset + k
        raise KeyError(f"symbol {symbol!r} is not in the dictionary")

    # ------------------------------------------------------------------ text

    def encode(self, text: str, *, leading_space: bool = True) -> list[int]:
        """Encode text to fairseq ids, without BOS/EOS.

        Parameters
        ----------
        text : str
            Text, used verbatim (see :func:`normalize_text` for OFA's dataset normalisation).
        leading_space : bool
            Prepend one space, as all OFA datasets do (``" " + text``).

        Returns
        -------
        list[int]
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        raw = self._bpe.encode(" " + text if leading_space else text, add_special_tokens=False).ids
        return self._raw_to_id[np.asarray(raw, dtype=np.int64)].tolist()

    def encode_words(self, name: str) -> list[int]:
        """IFSeg category-name rule: every whitespace-separated word encoded as ``" " + word``, concatenated.

        For GPT-2 pre-tokenisation this equals ``encode(" ".join(name.split()))``; no other normalisation.
        """
        return [i for ids in self._encode_words_batch([name]) for i in ids]

    def _encode_words_batch(self, names: Sequence[str]) -> list[list[int]]:
        words = [name.split() for name in names]
        flat = [" " + w for ws in words for w in ws]
        encs = self._bpe.encode_batch_fast(flat, add_special_tokens=False) if flat else []
        out, k = [], 0
        for ws in words:
            raw = [i for e in encs[k : k + len(ws)] for i in e.ids]
            k += len(ws)
            out.append(self._raw_to_id[np.asarray(raw, dtype=np.int64)].tolist())
        return out

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
        """Decode fairseq ids to text.

        BPE pieces are decoded byte-level, so ``decode(encode(t))`` is ``" " + t`` (the leading space is kept).
        ``<s> <pad> </s> <unk>`` are dropped when ``skip_special_tokens`` else written as their symbols; other
        non-text symbols (``<mask>``, ``<code_i>``, ``<bin_i>``, madeupwords) are always written as their symbols,
        as fairseq's GPT-2 decoder does.
        """
        parts: list[str] = []
        run: list[str] = []
        n_special = len(SPECIAL_SYMBOLS)
        for i in ids:
            i = int(i)
            if skip_special_tokens and 0 <= i < n_special:
                continue
            sym = self.id_to_symbol(i)
            if i < self.code_offset and self._is_piece[i]:
                run.append(sym)
                continue
            if run:
                parts.append(self._byte_decoder.decode(run))
                run = []
            parts.append(sym)
        if run:
            parts.append(self._byte_decoder.decode(run))
        return "".join(parts)

    def frame(self, ids: Iterable[int]) -> list[int]:
        """Encoder framing: ``[BOS] + ids + [EOS]``."""
        return [self.BOS, *(int(i) for i in ids), self.EOS]

    def __repr__(self) -> str:
        return (
            f"OFATokenizer(len={len(self)}, mask_id={self.mask_id}, "
            f"code_offset={self.code_offset}, bin_offset={self.bin_offset})"
        )


# ---------------------------------------------------------------------- files


def read_fairseq_dict(path) -> list[str]:
    """Symbols of a fairseq ``dict.txt`` (``<symbol> <count>`` per line, optional ``#fairseq:overwrite``), in order."""
    symbols: list[str] = []
    seen: set[str] = set()
    for n, line in enumerate(_text_lines(path), 1):
        line = line.rstrip("\r\n")
        if not line:
            continue
        overwrite = line.endswith(" #fairseq:overwrite")
        if overwrite:
            line = line[: -len(" #fairseq:overwrite")]
        sym, sep, count = line.rpartition(" ")
        if not sep or not sym or not count.isdecimal():
            raise ValueError(f"{path}:{n}: expected '<symbol> <count>', got {line!r}")
        if sym in seen and not overwrite:
            raise ValueError(f"{path}:{n}: duplicate symbol {sym!r}")
        seen.add(sym)
        symbols.append(sym)
    return symbols


def _text_lines(path) -> list[str]:
    """The lines of a UTF-8 text file, split at "\\n" only (as iterating the file does)."""
    return list(io.StringIO(read_text(path, "; the BPE files are UTF-8")))


def _read_json_vocab(path: Path) -> dict[str, int]:
    try:
        vocab = json.loads("".join(_text_lines(path)))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
        raise ValueError(f"{path}: expected a JSON object mapping BPE pieces to integer ids")
    return vocab


def _read_merges(path: Path) -> list[tuple[str, str]]:
    merges = []
    for n, line in enumerate(_text_lines(path), 1):
        if line.startswith("#version") and n == 1:
            continue
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2:
            raise ValueError(f"{path}:{n}: expected a merge 'a b', got {line.rstrip()!r}")
        merges.append((parts[0], parts[1]))
    return merges


_NOT_MERGED = re.compile(r"^(<.*>|madeupword\d+)$")  # symbols of a vocabulary that no merge makes (<|endoftext|>)


def check_merges(vocab: dict[str, int], merges, merges_path, vocab_path) -> None:
    """The merges and the vocabulary must be one tokenizer's: every merge joins two pieces of the vocabulary into a
    third, and every piece longer than one character comes from a merge. A truncated vocab.bpe / merges.txt (or one
    of another tokenizer) would otherwise split words differently without an error (the model then reads another
    prompt). Raises ``ValueError`` naming the file and what differs."""
    made = set()
    for n, (a, b) in enumerate(merges, 1):
        missing = [p for p in (a, b, a + b) if p not in vocab]
        if missing:
            raise ValueError(f"{merges_path}: merge {n} ('{a} {b}') uses {missing[0]!r}, which {vocab_path} does not "
                             f"hold: the two files are not one tokenizer's")
        made.add(a + b)
    unmade = [p for p in vocab if len(p) > 1 and p not in made and not _NOT_MERGED.match(p)]
    if unmade:
        raise ValueError(f"{merges_path} has {len(merges)} merges, but {len(unmade)} piece(s) of {vocab_path} come "
                         f"from none (e.g. {unmade[0]!r}): the merges file is truncated or of another tokenizer")


def _byte_level_bpe(vocab: dict[str, int], merges, unk_token: str) -> Tokenizer:
    # the standard GPT-2 setup: GPT-2 regex split, byte->unicode map, no prefix space (callers add " ")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk_token))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def write_hf_vocab(fairseq_dir, out_dir) -> Path:
    """Convert fairseq-style files to HF-style ``vocab.json`` + ``merges.txt`` giving identical fairseq ids.

    ``vocab.json`` maps each GPT-2 piece to 4 + its dict.txt line, plus ``<s> <pad> </s> <unk>`` (0-3), the
    non-id dict entries (madeupwords) and ``<mask>``; 50265 entries for OFA. ``merges.txt`` is ``vocab.bpe``.

    Parameters
    ----------
    fairseq_dir : str or Path
        Directory with ``encoder.json``, ``vocab.bpe`` and ``dict.txt``.
    out_dir : str or Path
        Output directory (created if needed).

    Returns
    -------
    Path
        ``out_dir``.
    """
    fairseq_dir, out_dir = Path(fairseq_dir), Path(out_dir)
    for name in FAIRSEQ_FILES:
        if not (fairseq_dir / name).is_file():
            raise FileNotFoundError(
                f"tokenizer file not found: {fairseq_dir / name} "
                f"(the fairseq-style set {' + '.join(FAIRSEQ_FILES)} is expected)"
            )
    encoder = _read_json_vocab(fairseq_dir / "encoder.json")
    id_to_piece = {v: k for k, v in encoder.items()}
    vocab = {s: i for i, s in enumerate(SPECIAL_SYMBOLS)}
    dict_symbols = read_fairseq_dict(fairseq_dir / "dict.txt")
    for line, sym in enumerate(dict_symbols):
        piece = id_to_piece.get(int(sym)) if sym.isdecimal() else None
        key = sym if piece is None else piece
        if key in vocab:
            raise ValueError(f"cannot write vocab.json: symbol {key!r} (dict.txt line {line + 1}) occurs twice")
        vocab[key] = len(SPECIAL_SYMBOLS) + line
    if MASK_SYMBOL in vocab:
        raise ValueError(f"cannot write vocab.json: {MASK_SYMBOL!r} is already a dictionary symbol")
    vocab[MASK_SYMBOL] = len(SPECIAL_SYMBOLS) + len(dict_symbols)
    # merges must produce only pieces the HF vocab knows; a GPT-2 piece missing from dict.txt would break that
    absent = [p for p in encoder if p not in vocab]
    if absent:
        raise ValueError(
            f"cannot write vocab.json: {len(absent)} encoder.json pieces are not in dict.txt (e.g. {absent[0]!r}); "
            "the HF-style format has no way to map them to <unk>"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "vocab.json", "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    (out_dir / "merges.txt").write_bytes((fairseq_dir / "vocab.bpe").read_bytes())
    return out_dir


# ---------------------------------------------------------------------- text normalisation


_LEADING_PUNCT = ",.!?*#:;~"
_DROP_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_text(text: str, *, max_words: int | None = None, drop_punctuation: bool = False) -> str:
    """OFA dataset normalisation of questions and captions (``pre_question`` / ``pre_caption``).

    Lower-case, strip leading ``, . ! ? * # : ; ~``, replace ``-`` and ``/`` by spaces, collapse runs of two or
    more whitespace characters into one space (a lone tab or newline is kept, as in OFA), trim, and keep the first
    ``max_words`` space-separated words. IFSeg category names are *not* normalised.

    Parameters
    ----------
    text : str
    max_words : int, optional
        Truncate to this many words; ``None`` keeps all.
    drop_punctuation : bool
        Also remove all ASCII punctuation and re-split on whitespace, as OFA does for caption training targets.

    Returns
    -------
    str
    """
    if max_words is not None and max_words < 0:
        raise ValueError(f"max_words must be >= 0, got {max_words}")
    text = text.lower().lstrip(_LEADING_PUNCT).replace("-", " ").replace("/", " ")
    text = re.sub(r"\s{2,}", " ", text).rstrip("\n").strip(" ")
    if drop_punctuation:
        words = text.translate(_DROP_PUNCT).split()
    else:
        words = text.split(" ") if text else []
    if max_words is not None:
        words = words[:max_words]
    return " ".join(words)


# ---------------------------------------------------------------------- IFSeg prompt


@dataclass(frozen=True)
class IFSegPrompt:
    """Encoder text input of IFSeg (``ifseg.md`` §4) and the per-category ids (§3)."""

    src_ids: tuple[int, ...]  # [BOS] + prefix + categories + "unknown" + [EOS]; len = L
    category_ids: tuple[tuple[int, ...], ...]  # one entry per category, "unknown" excluded (M entries)
    categories: tuple[str, ...]  # the stripped names, in order
    unknown_ids: tuple[int, ...]  # ids of "unknown" (the ignore class <seg_M>)
    prefix_ids: tuple[int, ...] = ()  # ids of the task text

    def __len__(self) -> int:
        return len(self.src_ids)


def parse_categories(categories: str | Iterable[str]) -> list[str]:
    """Category names from ``"sky, road, ..."`` or a sequence of names; each stripped, order kept.

    Raises ``ValueError`` for an empty list, an empty name or a repeated name.
    """
    if isinstance(categories, str):
        items = categories.split(",")
    else:
        items = list(categories)
    names = []
    first_at: dict[str, int] = {}
    for k, item in enumerate(items):
        if not isinstance(item, str):
            raise TypeError(f"category {k} must be a str, got {type(item).__name__}")
        name = item.strip()
        if not name:
            raise ValueError(f"category {k} is empty (in {categories!r})")
        if name in first_at:
            raise ValueError(f"duplicate category {name!r} at positions {first_at[name]} and {k}")
        first_at[name] = k
        names.append(name)
    if not names:
        raise ValueError("no categories given")
    return names


def build_ifseg_prompt(
    tokenizer: OFATokenizer,
    categories: str | Iterable[str],
    *,
    prefix: str = IFSEG_PROMPT_PREFIX,
    max_length: int = MAX_POSITIONS,
) -> IFSegPrompt:
    """Build the IFSeg encoder prompt ``[0] + ids(prefix) + ids(name_0) + ... + ids("unknown") + [2]``.

    Every piece uses :meth:`OFATokenizer.encode_words`; names are concatenated without separators.

    Parameters
    ----------
    tokenizer : OFATokenizer
    categories : str or iterable of str
        Names, or one comma-separated string (see :func:`parse_categories`). "unknown" is appended automatically
        and must not be in the list.
    prefix : str
        Task text.
    max_length : int
        Longest allowed prompt L, BOS and EOS included (the encoder has 1024 text positions).

    Returns
    -------
    IFSegPrompt
    """
    names = parse_categories(categories)
    if IFSEG_UNKNOWN in names:
        raise ValueError(
            f"{IFSEG_UNKNOWN!r} is appended automatically as the ignore class; remove it from the categories"
        )
    prefix_ids, unknown_ids, *cat_ids = tokenizer._encode_words_batch([prefix, IFSEG_UNKNOWN, *names])
    seen: dict[tuple[int, ...], str] = {}
    for what, ids in (("the prompt prefix", prefix_ids), (f"{IFSEG_UNKNOWN!r}", unknown_ids),
                      *((f"category {name!r}", ids) for name, ids in zip(names, cat_ids))):
        if tokenizer.UNK in ids:  # byte-level BPE covers every byte: <unk> means the dictionary lacks a piece
            raise ValueError(f"{what} tokenizes to <unk> (id {tokenizer.UNK}): the BPE dictionary (dict.txt / "
                             f"vocab.json) lacks its pieces; it is truncated or belongs to another model")
    for name, ids in zip(names, cat_ids):
        if not ids:
            raise ValueError(f"category {name!r} tokenizes to no ids")
        if tuple(ids) in seen:
            raise ValueError(f"categories {seen[tuple(ids)]!r} and {name!r} tokenize to the same ids {list(ids)}: "
                             f"the model could not tell them apart")
        seen[tuple(ids)] = name
    src = tokenizer.frame([*prefix_ids, *(i for ids in cat_ids for i in ids), *unknown_ids])
    if len(src) > max_length:
        raise ValueError(
            f"IFSeg prompt is {len(src)} tokens long ({len(names)} categories), more than max_length={max_length}"
        )
    return IFSegPrompt(
        src_ids=tuple(src),
        category_ids=tuple(tuple(ids) for ids in cat_ids),
        categories=tuple(names),
        unknown_ids=tuple(unknown_ids),
        prefix_ids=tuple(prefix_ids),
    )
