"""OFA (seq2seq) and SegOFA (IFSeg) models and ``build_model``."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..geometry import TABLE_CACHE_BYTES, TABLE_CACHE_GRIDS
from ..grid_cache import GridCache
from .config import OFAConfig, get_config
from .decoder import OFADecoder
from .encoder import EncoderOutput, OFAEncoder
from .grid_attention import (GridPlan, cross_attention, cross_blocks, decoder_self_attention, encoder_self_attention, head_positions,
                             extra_rows, inner_table, key_layout, make_plan, pad_positions, rel_table_2d,
                             reorder_cells)
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
class SegConstants:
    """The grid-independent inputs of a real-image forward besides the modules: the embedded prompt and the
    per-layer relative tables in the form :mod:`~ifseg_rt.model.grid_attention` reads (all small)."""

    text: Tensor  # 1xLxd embedded prompt
    enc_rel: Tensor  # encoder layers x 2 x H x (2G-1) x (2G-1) (rel_table_2d of each layer)
    dec_rel: Tensor  # decoder layers x 2 x H x (2G-1) x (2G-1)
    text_rel: Tensor  # encoder layers x H x L x L token relative bias of the prompt
    dec_bos: Tensor  # decoder layers x H: relative bias of a cell query on the BOS key

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.text, self.enc_rel, self.dec_rel, self.text_rel,
                                                          self.dec_bos))


@dataclass(frozen=True)
class SegTables:
    """Everything a SegOFA real-image forward needs that depends only on the weights, the prompt and the token
    grid, never on the pixels (:meth:`SegOFA.seg_tables`). All of it is O(S): token orders and the absolute
    positions projected per head; the S x S position terms are computed per query block inside attention
    (:mod:`~ifseg_rt.model.grid_attention`). Valid as long as the weights do not change."""

    grid: Tuple[int, int]  # (h, w) token grid
    plan: GridPlan
    enc_pos_q: Tensor  # HxSxdh encoder query positions (image rows in key order, then text), scaled
    enc_pos_k: Tensor  # Hx(S+P)xdh encoder key positions (image rows in key order, text, P padding keys' zeros)
    dec_pos_q: Tensor  # HxNxdh decoder self-attention query positions (cells in key order), scaled
    dec_pos_k: Tensor  # Hx(T+P)xdh decoder self-attention key positions (cells in key order, BOS, padding zeros)
    cross_pos_q: Tensor  # HxTxdh cross-attention query positions (BOS, cells in key order), scaled
    cross_pos_k: Tensor  # HxSxdh cross-attention key positions (encoder order)
    constants: SegConstants

    def positions(self) -> Tuple[Tensor, ...]:
        return (self.enc_pos_q, self.enc_pos_k, self.dec_pos_q, self.dec_pos_k, self.cross_pos_q, self.cross_pos_k)

    @property
    def nbytes(self) -> int:
        """Bytes of the per-grid tensors (the shared :class:`SegConstants` not counted)."""
        return self.plan.nbytes + sum(t.numel() * t.element_size() for t in self.positions())


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
    def seg_constants(self) -> SegConstants:
        """The grid-independent :class:`SegConstants` for the stored prompt (current autograd mode and dtype)."""
        src = self._src(None)
        enc, dec, cfg = self.encoder, self.decoder, self.config
        G, L = cfg.seg_grid, src.numel()
        seg_rows = dec.seg_rel_pos_table_list[0].weight.shape[0]
        return SegConstants(
            text=enc.embed_text(src[None]),
            enc_rel=torch.stack([rel_table_2d(t.weight, cfg.image_bucket_size, G)
                                 for t in enc.image_rel_pos_table_list]),
            dec_rel=torch.stack([rel_table_2d(t.weight, G, G) for t in dec.seg_rel_pos_table_list]),
            text_rel=torch.stack([enc.token_rel_bias(i, L) for i in range(len(enc.layers))]),
            dec_bos=torch.stack([t.weight[seg_rows - 2] for t in dec.seg_rel_pos_table_list]))  # bucket(cell, BOS)

    def seg_tables(self, h, w, constants: Optional[SegConstants] = None) -> SegTables:
        """The pixel-independent tensors of a real-image forward on an h x w token grid, for the stored prompt.

        ``h``/``w`` may be traced 0-dim tensors (ONNX export). Computed in the current autograd mode and in the
        weights' dtype; cache them only while the weights are fixed (inference), e.g. with :class:`SegTableCache`.
        """
        enc, dec, cfg = self.encoder, self.decoder, self.config
        constants = constants if constants is not None else self.seg_constants()
        L = constants.text.shape[1]
        H, s = cfg.heads, cfg.scaling
        dtype = enc.embed_image_positions.weight.dtype
        plan = make_plan(h, w, cfg.seg_grid, dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                         device=enc.embed_image_positions.weight.device)
        enc_pos = enc.positions(h, w, L)  # image cells row-major, then text
        z = dec.seg_pos_ln(dec.seg_positions(h, w))  # BOS, cells row-major
        enc_pos = reorder_cells(enc_pos, plan.key_index)  # image cells in key order
        z = reorder_cells(z, plan.key_index, first=1)
        dec_k = head_positions(dec.self_pos_k_linear, z, H)
        wi = plan.wi  # keys outside the grid come in rows of w_i slots; the slots they leave are padding keys
        return SegTables(grid=(h, w), plan=plan, enc_pos_q=head_positions(enc.pos_q_linear, enc_pos, H, s),
                         enc_pos_k=pad_positions(head_positions(enc.pos_k_linear, enc_pos, H),
                                                 extra_rows(L, wi) * wi - L),
                         dec_pos_q=head_positions(dec.self_pos_q_linear, z[1:], H, s),
                         dec_pos_k=pad_positions(torch.cat([dec_k[:, 1:], dec_k[:, :1]], dim=1), wi - 1),
                         cross_pos_q=head_positions(dec.cross_pos_q_linear, z, H, s),
                         cross_pos_k=head_positions(dec.cross_pos_k_linear, enc_pos, H), constants=constants)

    def forward(self, images: Tensor, src_tokens: Optional[Tensor] = None, *,
                tables: Optional[SegTables] = None) -> Tuple[Tensor, Tensor]:
        """Real-image path.

        Parameters
        ----------
        images : Bx3xHxW normalised pixels (mean = std = 0.5), H and W multiples of 16 (any other size works too,
            with a partial last cell)
        src_tokens : L or BxL prompt (padding allowed); by default the prompt given to :meth:`set_categories`. An
            explicit prompt runs the reference formulation (per-layer S x S biases, as the original)
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
        features, (h, w) = self.encoder.image_features(images)
        if tables is None:
            self.encoder.check_grid(h, w)
            tables = self.seg_tables(h, w)
        elif tuple(tables.grid) != (h, w):
            raise ValueError(f"tables were built for a {tables.grid[0]}x{tables.grid[1]} token grid, the images give "
                             f"{h}x{w}")
        return self.transformer(features, tables), features

    def transformer(self, features: Tensor, tables: SegTables) -> Tensor:
        """Encoder and surrogate decoder on ResNet ``features`` (BxNxC, row-major cells) -> logits BxNxM.

        Attention runs in query blocks with the position terms computed per block from ``tables`` (no S x S tensor
        for all heads; :mod:`~ifseg_rt.model.grid_attention`). Traceable for ONNX export.
        """
        enc, dec, G = self.encoder, self.decoder, self.config.seg_grid
        plan, const = tables.plan, tables.constants
        B, n = features.shape[0], features.shape[1]
        u = enc.embed_patches(features).index_select(1, plan.key_index)  # cells in key order
        x = torch.cat([u, const.text.to(u.dtype).expand(B, -1, -1)], dim=1)
        x = F.dropout(x, enc.dropout, self.training)
        H, L = const.text_rel.shape[1], const.text_rel.shape[-1]
        layout = key_layout(plan, L, G, heads=H, batch=B)  # extra keys: the prompt (no relative bias)
        no_bias = torch.zeros(1, 1, dtype=const.text_rel.dtype, device=x.device).expand(H, L)
        for i, layer in enumerate(enc.layers):
            z = inner_table(const.enc_rel[i], plan, layout, G, no_bias)
            x = layer(x, attention=functools.partial(encoder_self_attention, plan=plan, layout=layout,
                                                     pos_q=tables.enc_pos_q, pos_k=tables.enc_pos_k, z=z,
                                                     text_rel=const.text_rel[i]))
        enc_out = enc.layer_norm(x)
        bos = dec.embed_tokens.weight[0].to(enc_out.dtype).expand(B, 1, -1)
        y = dec.layernorm_embedding(torch.cat([bos, enc_out[:, :n]], dim=1))
        y = F.dropout(y, dec.dropout, self.training)
        H = const.text_rel.shape[1]
        blocks = cross_blocks(n + 1, enc_out.shape[1], heads=H, batch=B)
        cross = functools.partial(cross_attention, pos_q=tables.cross_pos_q, pos_k=tables.cross_pos_k, blocks=blocks)
        layout = key_layout(plan, 1, G, heads=H, batch=B)  # extra key: BOS
        for i, layer in enumerate(dec.layers):
            z = inner_table(const.dec_rel[i], plan, layout, G, const.dec_bos[i][:, None], causal=True)
            self_attn = functools.partial(decoder_self_attention, plan=plan, layout=layout, pos_q=tables.dec_pos_q,
                                          pos_k=tables.dec_pos_k, z=z)
            y = layer(y, enc_out, self_attention=self_attn, cross_attention=cross)
        y = dec.layer_norm(y)
        # output t predicts cell t: BOS's output, then those of cells 0..N-2 in row-major order
        cells = y[:, 1:].index_select(1, plan.cell_key)
        return dec.seg_projection(torch.cat([y[:, :1], cells[:, :n - 1]], dim=1))

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


class SegTableCache(GridCache):
    """Least-recently-used :class:`SegTables` per token grid for an inference model (weights must not change),
    bounded in bytes and in grids (:class:`~ifseg_rt.grid_cache.GridCache`): the grid-independent
    :class:`SegConstants` once, plus per grid O(S) tables (OFA-Base at 512 x 512: ~20 MB; at 512 x 2048: ~75 MB).
    Thread-safe: concurrent first requests of a grid compute it once.

    Arguments:
      model (SegOFA): the model, with its prompt set
      max_bytes (int): per-grid bytes kept; the least recently used grids are dropped beyond it (the most recent
        one is always kept)
      max_grids (int): and at most this many grids
    """

    def __init__(self, model: SegOFA, max_bytes: int = TABLE_CACHE_BYTES, max_grids: int = TABLE_CACHE_GRIDS):
        super().__init__(self._tables_of, max_bytes=max_bytes, max_grids=max_grids)
        self.model = model
        self._constants: Optional[SegConstants] = None

    def _tables_of(self, h: int, w: int) -> SegTables:
        with torch.inference_mode():
            self.model.encoder.check_grid(h, w)
            if self._constants is None:
                self._constants = self.model.seg_constants()
            return self.model.seg_tables(h, w, constants=self._constants)

    def clear(self) -> None:
        super().clear()
        self._constants = None


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
