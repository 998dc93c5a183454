"""The embedded nano VL model: its dimensions, its own small word vocabulary, and the OFA-style pretraining tasks
built from the synthetic world (``ifseg_rt.world``).

The vocabulary is a byte-level BPE in the HF-style files the :class:`~ifseg_rt.tokenizer.OFATokenizer` reads
(``vocab.json`` + ``merges.txt``; fairseq id layout ``<s> <pad> </s> <unk>``, pieces, ``<mask>``), followed by
:data:`NUM_BINS` location tokens ``<bin_i>`` and no image codes. Every word the tasks and the IFSeg prompt use is one
piece (its merges build it letter by letter), the 256 byte symbols cover any other text.

Pretraining tasks (image- and box-level only; the per-pixel label maps are never read):

=============  =====================================================  ========================
task           encoder text                                           decoder target
=============  =====================================================  ========================
caption        `` what does the image describe?``                    the names, by area
vqa            `` is there a {name} in the image?``                   `` yes`` / `` no``
region         `` what does the region describe? region:`` + 4 bins  the name of the box
grounding      `` which region does the text {name} describe?``      4 bins of its box
=============  =====================================================  ========================

Inputs: a rendered scene (image patches), a *word layout* (a blocky random grid of category words in the image
slots, as OFA mixes text into its image-text tasks and IFSeg feeds word cells; it carries no image), or a scene with
the cells inside one annotated box replaced by that box's word.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..geometry import PATCH
from ..tokenizer import IFSEG_PROMPT_PREFIX, IFSEG_UNKNOWN, MASK_SYMBOL, SPECIAL_SYMBOLS, OFATokenizer
from ..world import CATEGORIES, CATEGORY_NAMES, SceneObject, render_scene

NUM_BINS = 16  # location tokens <bin_0> ... <bin_15> (8 px per bin on 128-px scenes)
IMAGE_SIZE = 128  # px; pretraining scenes (an 8x8 cell grid, = the IFSeg reference grid of the nano config)

CAPTION_PROMPT = " what does the image describe?"
VQA_PROMPT = " is there a {} in the image?"
REGION_PROMPT = " what does the region describe? region:"
GROUNDING_PROMPT = " which region does the text {} describe?"
TASKS = ("caption", "vqa", "region", "grounding")
INPUTS = ("image", "words", "mixed")


def _nano_config_kwargs() -> Dict:
    return dict(d_model=128, ffn_dim=512, heads=4, encoder_layers=4, decoder_layers=3, resnet_layers=(1, 1, 1),
                resnet_width=16, max_positions=64, token_bucket_size=16, image_bucket_size=16, code_image_size=64,
                patch_image_size=IMAGE_SIZE, name="nano")


def nano_config(vocab_size: int):
    """The nano OFAConfig: d = 128, 4 heads, 4 + 3 layers, a 1-1-1 ResNet of width 16 (256 feature channels),
    64 text positions, reference grid G = 8 (128-px images)."""
    from ..model import OFAConfig

    return OFAConfig(vocab_size=vocab_size, **_nano_config_kwargs())


# --- vocabulary --------------------------------------------------------------------------------------------------
def corpus() -> List[str]:
    """Every text the tasks, the captions and the IFSeg prompt can produce (the words of the vocabulary)."""
    texts = [CAPTION_PROMPT, REGION_PROMPT, IFSEG_PROMPT_PREFIX, " " + IFSEG_UNKNOWN, " yes", " no"]
    for c in CATEGORIES:
        texts += [VQA_PROMPT.format(c.name), GROUNDING_PROMPT.format(c.name), " " + c.name, " " + c.colour_word]
    return texts


def build_vocab(texts: Optional[Sequence[str]] = None) -> Tuple[Dict[str, int], List[Tuple[str, str]]]:
    """A deterministic byte-level BPE: the 256 byte symbols, then for every pre-tokenised word of ``texts`` the
    chain of merges that builds it from its first letter. Returns (vocab.json mapping, merges)."""
    from tokenizers import pre_tokenizers

    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    words = sorted({piece for t in (texts or corpus()) for piece, _ in pre.pre_tokenize_str(t)})
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: Dict[str, int] = {s: i for i, s in enumerate(SPECIAL_SYMBOLS)}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    merges: List[Tuple[str, str]] = []
    for w in words:
        cur = w[0]
        for ch in w[1:]:
            if cur + ch not in vocab:
                merges.append((cur, ch))
                vocab[cur + ch] = len(vocab)
            cur += ch
    vocab[MASK_SYMBOL] = len(vocab)
    return vocab, merges


def write_vocab(out_dir: Union[str, Path]) -> Path:
    """Write ``vocab.json`` + ``merges.txt`` (HF-style OFA tokenizer files) to ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab()
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                        encoding="utf-8")
    return out_dir


def load_tokenizer(bpe_dir: Union[str, Path]) -> OFATokenizer:
    """The nano tokenizer: HF-style files, no image codes, :data:`NUM_BINS` location tokens."""
    return OFATokenizer.from_dir(bpe_dir, num_codes=0, num_bins=NUM_BINS)


# --- samples -----------------------------------------------------------------------------------------------------
@dataclass
class Sample:
    """One pretraining example."""

    src: List[int]  # [BOS] text [EOS]
    tgt: List[int]  # target ids without BOS/EOS
    image: Optional[np.ndarray] = None  # HxWx3 uint8, or None for a word layout
    words: Optional[np.ndarray] = None  # hxw token id per cell, -1 = image patch; None = all image
    task: str = ""
    source: str = ""


@dataclass
class Batch:
    """Tensors of a padded batch (numpy; the trainer moves them to torch)."""

    images: np.ndarray  # Bi x 3 x H x W float32 normalised, the samples that have an image
    image_rows: np.ndarray  # Bi int64: which batch rows they are
    words: np.ndarray  # B x N int64 token id per cell, -1 = image patch
    src: np.ndarray  # B x L int64, PAD on the right
    prev: np.ndarray  # B x T int64 decoder input [BOS] tgt, PAD on the right
    target: np.ndarray  # B x T int64 tgt [EOS], PAD on the right (ignored)
    grid: Tuple[int, int]
    tasks: List[str] = field(default_factory=list)


def quantize(v: float, extent: int) -> int:
    """Pixel coordinate -> bin index (OFA: ``round(v / extent * (num_bins - 1))``)."""
    return int(np.clip(round(v / extent * (NUM_BINS - 1)), 0, NUM_BINS - 1))


class TaskBuilder:
    """Turns scenes and word layouts into :class:`Sample` s (image-/box-level texts only)."""

    def __init__(self, tokenizer: OFATokenizer, *, size: int = IMAGE_SIZE):
        self.tok = tokenizer
        self.size = size
        self.grid = (-(-size // PATCH), -(-size // PATCH))
        self.word_ids = [self._one_piece(n) for n in CATEGORY_NAMES]
        self._prompt = {k: tokenizer.encode(t, leading_space=False)
                        for k, t in (("caption", CAPTION_PROMPT), ("region", REGION_PROMPT))}
        self._yes = tokenizer.encode(" yes", leading_space=False)
        self._no = tokenizer.encode(" no", leading_space=False)

    def _one_piece(self, name: str) -> int:
        ids = self.tok.encode_words(name)
        if len(ids) != 1:
            raise ValueError(f"category {name!r} is {len(ids)} pieces in this vocabulary; the nano tasks need one")
        return ids[0]

    def bins(self, box: Tuple[int, int, int, int], h: int, w: int) -> List[int]:
        x0, y0, x1, y1 = box
        return [self.tok.bin_offset + quantize(v, e) for v, e in ((x0, w), (y0, h), (x1, w), (y1, h))]

    def texts(self, objects: Sequence[SceneObject], h: int, w: int, task: str, rng: np.random.Generator
              ) -> Tuple[List[int], List[int]]:
        """(src ids framed, target ids) for one task on a set of annotations."""
        tok = self.tok
        if task == "caption":
            src = self._prompt["caption"]
            tgt = [self.word_ids[o.category] for o in objects]
        elif task == "vqa":
            present = {o.category for o in objects}
            if rng.random() < 0.5:
                c, ans = objects[int(rng.integers(len(objects)))].category, self._yes
            else:
                absent = [c for c in range(len(CATEGORY_NAMES)) if c not in present]
                c, ans = int(rng.choice(absent)), self._no
            src = tok.encode(VQA_PROMPT.format(CATEGORY_NAMES[c]), leading_space=False)
            tgt = ans
        elif task == "region":
            o = objects[int(rng.integers(len(objects)))]
            src = self._prompt["region"] + self.bins(o.box, h, w)
            tgt = [self.word_ids[o.category]]
        elif task == "grounding":
            o = objects[int(rng.integers(len(objects)))]
            src = tok.encode(GROUNDING_PROMPT.format(o.name), leading_space=False)
            tgt = self.bins(o.box, h, w)
        else:
            raise ValueError(f"unknown task {task!r}; tasks: {TASKS}")
        return tok.frame(src), list(tgt)

    # --- inputs ----------------------------------------------------------------------------------------------
    def word_layout(self, rng: np.random.Generator, max_side: int = 4) -> Tuple[np.ndarray, List[SceneObject]]:
        """A blocky random U x V grid of category words (U, V <= ``max_side``) on the cell grid, with the box
        annotations it implies (in pixels of a scene of the same size)."""
        h, w = self.grid
        u, v = (int(x) for x in rng.integers(1, max_side + 1, size=2))
        g = rng.integers(0, len(CATEGORY_NAMES), size=(u, v))
        cells = g[np.arange(h) * u // h][:, np.arange(w) * v // w]
        objs = []
        for c in np.unique(cells):
            rows, cols = np.nonzero(np.any(cells == c, axis=1))[0], np.nonzero(np.any(cells == c, axis=0))[0]
            box = (int(cols[0]) * PATCH, int(rows[0]) * PATCH, (int(cols[-1]) + 1) * PATCH, (int(rows[-1]) + 1) * PATCH)
            objs.append(SceneObject(category=int(c), name=CATEGORY_NAMES[c], box=box,
                                    area=int((cells == c).sum()) * PATCH * PATCH))
        objs.sort(key=lambda o: (-o.area, o.category))
        return cells, objs

    def sample(self, seed: int, task: str, source: str) -> Sample:
        """One example: ``source`` is "image", "words" or "mixed"; everything derives from ``seed``."""
        rng = np.random.default_rng([seed, 7])
        H = W = self.size
        if source == "words":
            cells, objects = self.word_layout(rng)
            words = np.asarray(self.word_ids)[cells]
            src, tgt = self.texts(objects, H, W, task, rng)
            return Sample(src=src, tgt=tgt, words=words, task=task, source=source)
        scene = render_scene(seed, self.size)
        words = None
        if source == "mixed":
            words = np.full(self.grid, -1, dtype=np.int64)
            o = scene.objects[int(rng.integers(len(scene.objects)))]
            x0, y0, x1, y1 = o.box  # cells that lie fully inside the box take the box's word
            r0, r1 = -(-y0 // PATCH), y1 // PATCH
            c0, c1 = -(-x0 // PATCH), x1 // PATCH
            words[r0:r1, c0:c1] = self.word_ids[o.category]
        elif source != "image":
            raise ValueError(f"unknown input source {source!r}; sources: {INPUTS}")
        src, tgt = self.texts(scene.objects, H, W, task, rng)
        return Sample(src=src, tgt=tgt, image=scene.image, words=words, task=task, source=source)


def collate(samples: Sequence[Sample], grid: Tuple[int, int], pad: int = OFATokenizer.PAD,
            bos: int = OFATokenizer.BOS, eos: int = OFATokenizer.EOS) -> Batch:
    """Pad and stack samples into a :class:`Batch`."""
    B, n = len(samples), grid[0] * grid[1]
    L = max(len(s.src) for s in samples)
    T = max(len(s.tgt) for s in samples) + 1
    src = np.full((B, L), pad, dtype=np.int64)
    prev = np.full((B, T), pad, dtype=np.int64)
    target = np.full((B, T), pad, dtype=np.int64)
    words = np.full((B, n), -1, dtype=np.int64)
    images, rows = [], []
    for i, s in enumerate(samples):
        src[i, :len(s.src)] = s.src
        prev[i, :len(s.tgt) + 1] = [bos, *s.tgt]
        target[i, :len(s.tgt) + 1] = [*s.tgt, eos]
        if s.words is not None:
            words[i] = np.asarray(s.words).reshape(-1)
        if s.image is not None:
            images.append(np.transpose(s.image, (2, 0, 1)).astype(np.float32) / 127.5 - 1.0)  # mean = std = 0.5
            rows.append(i)
    imgs = np.stack(images) if images else np.zeros((0, 3, 1, 1), dtype=np.float32)
    return Batch(images=imgs, image_rows=np.asarray(rows, dtype=np.int64), words=words, src=src, prev=prev,
                 target=target, grid=grid, tasks=[s.task for s in samples])


def model_inputs(model, batch: Batch, device="cpu"):
    """Encoder cell embeddings for a batch: ``image_proj(ResNet)`` for image patches, the word's row of E for word
    cells. Feeding them through the word-cell path (``LN_patch(x + type[1])``) equals the image path exactly."""
    import torch

    enc = model.encoder
    words = torch.from_numpy(batch.words).to(device)
    x = enc.embed_tokens(words.clamp(min=0))
    if len(batch.image_rows):
        feats, grid = enc.image_features(torch.from_numpy(batch.images).to(device))
        if grid != batch.grid:
            raise ValueError(f"images give a {grid} cell grid, the batch expects {batch.grid}")
        rows = torch.from_numpy(batch.image_rows).to(device)
        img = torch.zeros_like(x).index_copy(0, rows, enc.image_proj(feats))
        x = torch.where(words[..., None] >= 0, x, img)
    return x


def forward(model, batch: Batch, device="cpu"):
    """Teacher-forced logits ``BxTxV`` of an :class:`~ifseg_rt.model.OFA` on a batch."""
    import torch

    cells = model_inputs(model, batch, device)
    src = torch.from_numpy(batch.src).to(device)
    enc = model.encoder(src, cell_embeds=cells, grid=batch.grid)
    return model.decoder(torch.from_numpy(batch.prev).to(device), enc)
