"""OFA (seq2seq) and SegOFA (IFSeg) models and ``build_model``."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import OFAConfig, get_config
from .decoder import OFADecoder
from .encoder import EncoderOutput, OFAEncoder
from .resnet import EvalBatchNorm2d, FrozenBatchNorm2d


def init_weights(model: nn.Module, std: float = 0.02) -> None:
    """BERT-style initialisation as the original: N(0, 0.02) for every Linear/Embedding weight, zero Linear biases,
    zero padding row; LayerNorm (1, 0); convolutions Kaiming-normal; batch norms the identity."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
            nn.init.normal_(m.weight, std=std)
            if m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (EvalBatchNorm2d, FrozenBatchNorm2d)):
            with torch.no_grad():
                m.weight.fill_(1.0)
                m.bias.zero_()
                m.running_mean.zero_()
                m.running_var.fill_(1.0)
    for name, p in model.named_parameters():
        if name.endswith("c_attn"):
            nn.init.ones_(p)


class OFA(nn.Module):
    """The OFA encoder-decoder (text generation head), loadable from the official checkpoints."""

    def __init__(self, config: OFAConfig, *, dropout: float = 0.0, drop_path_rate: float = 0.0):
        super().__init__()
        self.config = config
        embed = nn.Embedding(config.vocab_size, config.d_model, padding_idx=config.padding_idx)
        self.encoder = OFAEncoder(config, embed_tokens=embed, dropout=dropout, drop_path_rate=drop_path_rate)
        self.decoder = OFADecoder(config, embed_tokens=embed, dropout=dropout, drop_path_rate=drop_path_rate)

    def forward(self, src_tokens: Tensor, patch_images: Tensor, prev_output_tokens: Tensor,
                patch_masks: Optional[Tensor] = None) -> Tensor:
        """
        Parameters
        ----------
        src_tokens : BxL int64 ``[BOS] text [EOS]`` (PAD = 1 on the right)
        patch_images : Bx3xHxW normalised image (mean = std = 0.5)
        prev_output_tokens : BxT int64 decoder input, starting with BOS
        patch_masks : B bool, False for samples without an image

        Returns
        -------
        BxTxV logits over the OFA vocabulary
        """
        enc = self.encoder(src_tokens, images=patch_images, patch_masks=patch_masks)
        return self.decoder(prev_output_tokens, enc)

    def encode(self, src_tokens: Tensor, patch_images: Tensor, patch_masks: Optional[Tensor] = None) -> EncoderOutput:
        return self.encoder(src_tokens, images=patch_images, patch_masks=patch_masks)


@dataclass(frozen=True)
class SegTables:
    """Everything a SegOFA real-image forward needs that depends only on the weights, the prompt and the token
    grid, never on the pixels: compute once per grid (:meth:`SegOFA.seg_tables`) and reuse for every image of that
    grid (:class:`SegTableCache`). Valid as long as the weights do not change."""

    grid: Tuple[int, int]  # (h, w) token grid
    text: Tensor  # 1xLxd embedded prompt
    enc_pos: Tensor  # Sxd layer-normalised encoder positions (S = h*w + L)
    enc_biases: Tuple[Tensor, ...]  # per encoder layer, 1xHxSxS
    dec_biases: Tuple[Tensor, ...]  # per decoder layer, 1xHxTxT, causal mask included (T = h*w + 1)
    cross: Tensor  # HxTxS decoder cross-attention bias

    @property
    def nbytes(self) -> int:
        ts = (self.text, self.enc_pos, self.cross, *self.enc_biases, *self.dec_biases)
        return sum(t.numel() * t.element_size() for t in ts)


class SegOFA(nn.Module):
    """IFSeg's segmentation model (ifseg.md §2-§8): OFA encoder + surrogate decoder + M-way tied category head.

    The category table ``Sg`` (``encoder.seg_embed_tokens``) holds, for every category, the mean of its subword
    embeddings; :meth:`set_categories` fills it (and remembers the prompt) from token ids.
    """

    def __init__(self, config: OFAConfig, num_categories: int, *, dropout: float = 0.0, drop_path_rate: float = 0.0):
        super().__init__()
        if num_categories < 1:
            raise ValueError(f"num_categories must be >= 1, got {num_categories}")
        self.config = config
        self.num_categories = num_categories
        d = config.d_model
        # IFSeg sizes E as (dictionary length - M) = V + 1 rows; the extra row is never indexed (ifseg.md §3)
        embed = nn.Embedding(config.vocab_size + 1, d, padding_idx=config.padding_idx)
        seg_embed = nn.Embedding(num_categories, d)
        self.encoder = OFAEncoder(config, embed_tokens=embed, seg_embed_tokens=seg_embed, ifseg=True,
                                  dropout=dropout, drop_path_rate=drop_path_rate)
        self.decoder = OFADecoder(config, embed_tokens=embed, seg_embed_tokens=seg_embed, surrogate=True,
                                  dropout=dropout, drop_path_rate=drop_path_rate)
        # the prompt and each category's subword ids (non-persistent: they come with the categories, not the weights)
        self.register_buffer("prompt_tokens", torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_buffer("category_token_ids", torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_buffer("category_offsets", torch.zeros(0, dtype=torch.long), persistent=False)

    # --- categories --------------------------------------------------------------------------------------------
    @property
    def has_prompt(self) -> bool:
        return self.prompt_tokens.numel() > 0

    def set_categories(self, prompt_tokens: Sequence[int], category_ids: Sequence[Sequence[int]], *,
                       update_table: bool = True) -> None:
        """Remember the prompt and the categories' subword ids; with ``update_table`` recompute ``Sg``.

        Parameters
        ----------
        prompt_tokens : the framed prompt ``[BOS] prefix names... unknown [EOS]`` (ifseg.md §4)
        category_ids : M lists of fairseq ids, one per category (without "unknown")
        """
        if len(category_ids) != self.num_categories:
            raise ValueError(f"got {len(category_ids)} categories, the model has M = {self.num_categories}")
        empty = [i for i, ids in enumerate(category_ids) if len(ids) == 0]
        if empty:
            raise ValueError(f"categories {empty} have no token ids")
        rows = self.encoder.embed_tokens.num_embeddings
        flat = [int(t) for ids in category_ids for t in ids] + [int(t) for t in prompt_tokens]
        bad = [t for t in flat if not 0 <= t < rows]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the {rows}-row token table")
        if len(prompt_tokens) > self.config.max_positions:
            raise ValueError(f"prompt of {len(prompt_tokens)} tokens exceeds {self.config.max_positions} positions")
        if self.config.padding_idx in [int(t) for t in prompt_tokens]:
            raise ValueError("the prompt must not contain PAD tokens")
        dev = self.encoder.embed_tokens.weight.device
        self.prompt_tokens = torch.tensor([int(t) for t in prompt_tokens], dtype=torch.long, device=dev)
        self.category_token_ids = torch.tensor([int(t) for ids in category_ids for t in ids], dtype=torch.long,
                                               device=dev)
        lengths = torch.tensor([len(ids) for ids in category_ids], dtype=torch.long)
        self.category_offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]]).to(dev)
        if update_table:
            with torch.no_grad():
                self.encoder.seg_embed_tokens.weight.copy_(self.category_embeddings())

    def category_embeddings(self) -> Tensor:
        """``Mxd`` mean of each category's subword embeddings (EmbeddingBag, mode mean, over E)."""
        if self.category_token_ids.numel() == 0:
            return self.encoder.seg_embed_tokens.weight
        return self.encoder.embed_tokens_bag(self.category_token_ids, self.category_offsets)

    def _src(self, src_tokens: Optional[Tensor]) -> Tensor:
        if src_tokens is not None:
            return src_tokens
        if not self.has_prompt:
            raise RuntimeError("no prompt: call set_categories(prompt_tokens, category_ids) or pass src_tokens")
        return self.prompt_tokens

    # --- forward paths -----------------------------------------------------------------------------------------
    def seg_tables(self, h: int, w: int) -> SegTables:
        """The pixel-independent tensors of a real-image forward on an h x w token grid, for the stored prompt.

        Computed in the current autograd mode and in the weights' dtype; cache them only while the weights are
        fixed (inference), e.g. with :class:`SegTableCache`.
        """
        src = self._src(None)
        enc, dec = self.encoder, self.decoder
        enc_pos, enc_biases = enc.layer_biases(h, w, src.numel())
        dec_biases, cross = dec.seg_biases(h, w, enc_pos)
        return SegTables(grid=(h, w), text=enc.embed_text(src[None]), enc_pos=enc_pos,
                         enc_biases=tuple(b[None] for b in enc_biases), dec_biases=tuple(b[None] for b in dec_biases),
                         cross=cross)

    def forward(self, images: Tensor, src_tokens: Optional[Tensor] = None, *,
                tables: Optional[SegTables] = None) -> Tuple[Tensor, Tensor]:
        """Real-image path.

        Parameters
        ----------
        images : Bx3xHxW normalised pixels (mean = std = 0.5), H and W multiples of 16 (any other size works too,
            with a partial last cell)
        src_tokens : L or BxL prompt (padding allowed); by default the prompt given to :meth:`set_categories`
        tables : precomputed :meth:`seg_tables` for this input's grid and the stored prompt (computed when omitted)

        Returns
        -------
        logits : BxNxM per-cell category logits, N = h*w row-major, h = ceil(H/16), w = ceil(W/16)
        features : BxNxC ResNet layer3 features before ``image_proj`` (C = 1024 for OFA sizes), for kNN
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be Bx3xHxW, got shape {tuple(images.shape)}")
        if src_tokens is not None:
            if tables is not None:
                raise ValueError("tables are built for the stored prompt: pass src_tokens or tables, not both")
            enc = self.encoder(src_tokens, images=images)
            return self.decoder.forward_seg(enc), enc.features
        encoder = self.encoder
        features, (h, w) = encoder.image_features(images)
        if tables is None:
            tables = self.seg_tables(h, w)
        elif tables.grid != (h, w):
            raise ValueError(f"tables were built for a {tables.grid[0]}x{tables.grid[1]} token grid, the images give "
                             f"{h}x{w}")
        u = encoder.embed_patches(features)
        x = torch.cat([u, tables.text.to(u.dtype).expand(u.shape[0], -1, -1)], dim=1)
        x = F.dropout(x, encoder.dropout, self.training)
        enc_out = encoder.run_layers(x, tables.enc_biases)
        enc = EncoderOutput(enc_out=enc_out, padding_mask=None, enc_pos=tables.enc_pos[None].expand(u.shape[0], -1, -1),
                            grid=(h, w), features=features)
        return self.decoder.forward_seg(enc, (tables.dec_biases, tables.cross)), features

    def word_grid_embeddings(self, cells: Tensor) -> Tensor:
        """``BxN`` category ids -> ``BxNxd`` mean subword embeddings (ifseg.md §6)."""
        return F.embedding(cells, self.category_embeddings())

    def forward_word_grid(self, cells: Tensor, src_tokens: Optional[Tensor] = None) -> Tensor:
        """Word-grid (image-free training) path: ``Bxhxw`` category ids -> ``BxNxM`` logits."""
        if cells.dim() != 3:
            raise ValueError(f"cells must be Bxhxw category ids, got shape {tuple(cells.shape)}")
        B, h, w = cells.shape
        emb = self.word_grid_embeddings(cells.reshape(B, h * w))
        src = self._src(src_tokens)
        enc = self.encoder(src, cell_embeds=emb, grid=(h, w), text_has_padding=None if src_tokens is not None else False)
        return self.decoder.forward_seg(enc)


class SegTableCache:
    """Least-recently-used :class:`SegTables` per token grid for an inference model (weights must not change).

    Arguments:
      model (SegOFA): the model, with its prompt set
      max_shapes (int): grids kept; the tables of an evicted grid are freed once nothing else references them
    """

    def __init__(self, model: SegOFA, max_shapes: int = 8):
        if max_shapes < 1:
            raise ValueError(f"max_shapes must be >= 1, got {max_shapes}")
        self.model = model
        self.max_shapes = max_shapes
        self._tables: "OrderedDict[Tuple[int, int], SegTables]" = OrderedDict()
        self._lock = threading.Lock()  # threads share one cache; a grid is computed once

    def __len__(self) -> int:
        return len(self._tables)

    def get(self, h: int, w: int) -> SegTables:
        key = (int(h), int(w))
        with self._lock:
            hit = self._tables.get(key)
            if hit is not None:
                self._tables.move_to_end(key)
                return hit
            with torch.inference_mode():
                hit = self.model.seg_tables(*key)
            self._tables[key] = hit
            while len(self._tables) > self.max_shapes:
                self._tables.popitem(last=False)
            return hit

    def clear(self) -> None:
        with self._lock:
            self._tables.clear()

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self._tables.values())


def build_model(config: Union[str, OFAConfig, dict], num_categories: Optional[int] = None, *,
                dropout: float = 0.0, drop_path_rate: float = 0.0, init: bool = True) -> Union[OFA, SegOFA]:
    """Build OFA (``num_categories=None``) or SegOFA with M = ``num_categories`` categories.

    Parameters
    ----------
    config : a registry name (``"tiny"``, ``"ofa-base"``, ...), a dict or an :class:`OFAConfig`
    num_categories : M for SegOFA
    dropout, drop_path_rate : training regularisation (0.1 / 0.1 in IFSeg training; 0 for inference)
    init : apply the BERT-style initialisation (skip when weights are loaded right after)

    Works under ``with torch.device("meta"):`` to count parameters of the big sizes without memory.
    """
    cfg = get_config(config)
    if num_categories is None:
        model = OFA(cfg, dropout=dropout, drop_path_rate=drop_path_rate)
    else:
        model = SegOFA(cfg, num_categories, dropout=dropout, drop_path_rate=drop_path_rate)
    if init and not _on_meta(model):
        init_weights(model)
    return model.eval()


def _on_meta(model: nn.Module) -> bool:
    p = next(model.parameters(), None)
    return p is not None and p.is_meta


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (shared embedding counted once)."""
    return sum(p.numel() for p in model.parameters())
