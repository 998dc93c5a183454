"""The OFA encoder (ofa.md §2, §6) with IFSeg's real-image and word-grid paths (ifseg.md §6-§7)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import OFAConfig
from .layers import EncoderLayer, LayerNorm, drop_path_rates, split_heads
from .grid_attention import tracing
from .positions import grid_ids, image_rp_bucket, interpolate_grid, resize_bias_2d, resize_grid, token_rp_bucket
from .resnet import ResNet


@dataclass
class EncoderOutput:
    enc_out: Tensor  # BxSxd, after encoder.layer_norm; image tokens first, then text
    padding_mask: Optional[Tensor]  # BxS bool (True = padding) or None when nothing is padded
    enc_pos: Tensor  # BxSxd layer-normalised positions (keys of the decoder cross-attention bias)
    grid: Tuple[int, int]  # (h, w) image token grid
    features: Optional[Tensor] = None  # BxNxC raw ResNet layer3 features (real images only)

    @property
    def num_image_tokens(self) -> int:
        return self.grid[0] * self.grid[1]


class OFAEncoder(nn.Module):
    """OFA encoder. With ``ifseg=True`` it carries IFSeg's extra modules and position rule.

    Position rule (``ifseg.md`` §7): OFA looks image positions and relative buckets up directly on the 42x42 table;
    IFSeg resizes the G x G reference block bilinearly (absolute positions only when N > G^2, the relative bias
    always).
    """

    def __init__(self, config: OFAConfig, *, embed_tokens: nn.Embedding, seg_embed_tokens: Optional[nn.Embedding] = None,
                 ifseg: bool = False, dropout: float = 0.0, drop_path_rate: float = 0.0):
        super().__init__()
        cfg = self.config = config
        d, H = cfg.d_model, cfg.heads
        self.ifseg = ifseg
        self.dropout = dropout
        self.register_buffer("version", torch.tensor([3.0]))
        self.register_buffer("token_rp_bucket", token_rp_bucket(cfg.max_positions, cfg.token_bucket_size))
        self.register_buffer("image_rp_bucket", image_rp_bucket(cfg.image_bucket_size))

        self.embed_tokens = embed_tokens
        if ifseg:
            assert seg_embed_tokens is not None
            self.seg_embed_tokens = seg_embed_tokens
            self.embed_tokens_bag = nn.EmbeddingBag(embed_tokens.num_embeddings, d, mode="mean")
            self.embed_tokens_bag.weight = embed_tokens.weight  # alias, as in the original
        self.layernorm_embedding = LayerNorm(d, eps=cfg.layernorm_eps)
        self.type_embedding = nn.Embedding(cfg.type_vocab_size, d)
        self.embed_images = ResNet(layers=cfg.resnet_layers, width=cfg.resnet_width, frozen_bn=ifseg,
                                   eps=cfg.batchnorm_eps)
        self.image_proj = nn.Linear(cfg.image_feature_dim, d)
        self.patch_layernorm_embedding = LayerNorm(d, eps=cfg.layernorm_eps)
        self.embed_positions = nn.Embedding(cfg.position_rows, d)
        self.embed_image_positions = nn.Embedding(cfg.image_position_rows, d)
        self.pos_ln = LayerNorm(d, eps=cfg.layernorm_eps)
        self.image_pos_ln = LayerNorm(d, eps=cfg.layernorm_eps)
        self.pos_q_linear = nn.Linear(d, d)
        self.pos_k_linear = nn.Linear(d, d)
        self.layers = nn.ModuleList(
            EncoderLayer(d_model=d, ffn_dim=cfg.ffn_dim, heads=H, attn_scale_factor=cfg.attn_scale_factor,
                         dropout=dropout, drop_path=p, eps=cfg.layernorm_eps)
            for p in drop_path_rates(cfg.encoder_layers, drop_path_rate))
        self.layer_norm = LayerNorm(d, eps=cfg.layernorm_eps)
        self.token_rel_pos_table_list = nn.ModuleList(
            nn.Embedding(cfg.token_rel_rows, H) for _ in range(cfg.encoder_layers))
        self.image_rel_pos_table_list = nn.ModuleList(
            nn.Embedding(cfg.image_rel_rows, H) for _ in range(cfg.encoder_layers))

    # --- embeddings -------------------------------------------------------------------------------------------
    def embed_text(self, src_tokens: Tensor) -> Tensor:
        x = self.embed_tokens(src_tokens) + self.type_embedding.weight[0]  # embed_scale = 1.0
        return self.layernorm_embedding(x)

    def image_features(self, images: Tensor) -> Tuple[Tensor, Tuple[int, int]]:
        """ResNet layer3 features, ``Bx3xHxW`` -> (``BxNxC`` row-major cells, (h, w))."""
        f = self.embed_images(images)
        h, w = f.shape[-2:]
        return f.flatten(2).transpose(1, 2), (int(h), int(w))

    def embed_patches(self, features: Tensor) -> Tensor:
        return self.patch_layernorm_embedding(self.image_proj(features) + self.type_embedding.weight[1])

    def embed_cells(self, cell_embeds: Tensor) -> Tensor:
        """Word cells bypass ResNet and image_proj (ifseg.md §6): ``LN_patch(mean_emb + type[1])``."""
        return self.patch_layernorm_embedding(cell_embeds + self.type_embedding.weight[1])

    # --- positions --------------------------------------------------------------------------------------------
    def check_grid(self, h: int, w: int) -> None:
        """Raise ``ValueError`` when an h x w token grid needs image positions beyond the position table."""
        s = self.config.image_bucket_size
        if self.ifseg and h * w > self.config.seg_grid ** 2:
            return  # resized from the reference grid: any size works
        if h > s or w > s:
            raise ValueError(
                f"image token grid {h}x{w} exceeds the {s}x{s} position table "
                f"({'IFSeg looks positions up directly when N <= ' + str(self.config.seg_grid ** 2) if self.ifseg else 'OFA looks positions up directly'}); "
                f"use an image of at most {16 * s} px per side")

    def image_positions(self, h: int, w: int) -> Tensor:
        """Raw (un-normalised) image position embeddings, ``Nxd``. Under the ONNX tracer (``h``/``w`` tensors) both
        IFSeg rules are computed and one is selected in-graph (direct-lookup ids clamped to the table)."""
        cfg, table = self.config, self.embed_image_positions.weight
        G = cfg.seg_grid
        if self.ifseg and tracing():
            ids = grid_ids(h, w, cfg.image_bucket_size, table.device).clamp(max=table.shape[0] - 1)
            ref = table[grid_ids(G, G, cfg.image_bucket_size, table.device)]
            resized = interpolate_grid(ref.t(), G, h, w).t()
            return torch.where(h * w > G * G, resized, table[ids])
        if self.ifseg and h * w > G * G:
            ref = table[grid_ids(G, G, cfg.image_bucket_size, table.device)]  # (G^2, d)
            return resize_grid(ref.t(), G, h, w).t()
        return table[grid_ids(h, w, cfg.image_bucket_size, table.device)]

    def image_rel_bias(self, layer: int, h: int, w: int) -> Tensor:
        """Image relative bias of one layer, ``HxNxN`` [query, key]."""
        cfg, table = self.config, self.image_rel_pos_table_list[layer].weight
        if self.ifseg:
            G = cfg.seg_grid
            ids = grid_ids(G, G, cfg.image_bucket_size, table.device)
            ref = F.embedding(self.image_rp_bucket[ids][:, ids], table).permute(2, 0, 1)
            return resize_bias_2d(ref, G, h, w)
        ids = grid_ids(h, w, cfg.image_bucket_size, table.device)
        return F.embedding(self.image_rp_bucket[ids][:, ids], table).permute(2, 0, 1)

    def token_rel_bias(self, layer: int, length: int) -> Tensor:
        bucket = self.token_rp_bucket[:length, :length]
        return F.embedding(bucket, self.token_rel_pos_table_list[layer].weight).permute(2, 0, 1)

    def positions(self, h: int, w: int, length: int) -> Tensor:
        """``enc_pos`` (Sxd): layer-normalised image positions then text positions 0..L-1."""
        if length > self.config.max_positions:
            raise ValueError(f"text length {length} exceeds the encoder's {self.config.max_positions} positions")
        p_img = self.image_pos_ln(self.image_positions(h, w))
        p_txt = self.pos_ln(self.embed_positions.weight[:length])
        return torch.cat([p_img, p_txt], dim=0)

    def abs_bias(self, enc_pos: Tensor) -> Tensor:
        """Absolute position bias shared by all layers, ``HxSxS``."""
        H = self.config.heads
        q = split_heads(self.pos_q_linear(enc_pos), H) * self.config.scaling
        k = split_heads(self.pos_k_linear(enc_pos), H)
        return q @ k.transpose(-1, -2)

    def layer_biases(self, h: int, w: int, length: int) -> Tuple[Tensor, List[Tensor]]:
        """(``enc_pos`` Sxd, per-layer attention bias HxSxS) for an h x w grid and a text of ``length`` tokens.

        They depend only on the weights and the shapes, never on the pixels: callers may cache them.
        """
        self.check_grid(h, w)
        n = h * w
        enc_pos = self.positions(h, w, length)
        a = self.abs_bias(enc_pos)
        biases = []
        for layer in range(len(self.layers)):
            r_img = self.image_rel_bias(layer, h, w)
            r_txt = self.token_rel_bias(layer, length)
            top = torch.cat([r_img, r_img.new_zeros(r_img.shape[0], n, length)], dim=-1)
            bottom = torch.cat([r_txt.new_zeros(r_txt.shape[0], length, n), r_txt], dim=-1)
            biases.append(a + torch.cat([top, bottom], dim=-2))
        return enc_pos, biases

    # --- forward ----------------------------------------------------------------------------------------------
    def run_layers(self, x: Tensor, biases: Sequence[Tensor], key_mask: Optional[Tensor] = None) -> Tensor:
        """The encoder layers and the final LayerNorm on embedded tokens ``x`` (BxSxd).

        ``biases`` holds one attention bias per layer, ``HxSxS`` or ``1xHxSxS`` (:meth:`layer_biases`);
        ``key_mask`` (Bx1x1xS, -inf at padding) is added to each.
        """
        for layer, bias in zip(self.layers, biases):
            bias = bias if bias.dim() == 4 else bias[None]
            x = layer(x, bias if key_mask is None else bias + key_mask)
        return self.layer_norm(x)

    def forward(self, src_tokens: Tensor, *, images: Optional[Tensor] = None, cell_embeds: Optional[Tensor] = None,
                grid: Optional[Tuple[int, int]] = None, patch_masks: Optional[Tensor] = None,
                text_has_padding: Optional[bool] = None) -> EncoderOutput:
        """
        Parameters
        ----------
        src_tokens : BxL int64, ``[BOS] text [EOS]`` right-padded with PAD
        images : Bx3xHxW normalised pixels (real-image path), or
        cell_embeds : BxNxd word-cell embeddings (IFSeg word-grid path) together with ``grid`` = (h, w)
        patch_masks : B bool; False marks every image position of that sample as padding
        text_has_padding : pass False when ``src_tokens`` is known to hold no PAD (e.g. a fixed prompt) to skip the
            data-dependent padding check (keeps the graph static for export)
        """
        if (images is None) == (cell_embeds is None):
            raise ValueError("pass exactly one of images= or cell_embeds=")
        features = None
        if images is not None:
            features, grid = self.image_features(images)
            u = self.embed_patches(features)
        else:
            if grid is None or grid[0] * grid[1] != cell_embeds.shape[1]:
                raise ValueError(f"grid={grid} does not match {cell_embeds.shape[1]} word cells")
            u = self.embed_cells(cell_embeds)
        B = u.shape[0]
        if src_tokens.dim() == 1:
            src_tokens = src_tokens[None]
        if src_tokens.shape[0] != B:
            src_tokens = src_tokens.expand(B, -1)
        h, w = grid
        n, length = h * w, src_tokens.shape[1]
        t = self.embed_text(src_tokens)
        x = torch.cat([u, t.to(u.dtype)], dim=1)
        x = F.dropout(x, self.dropout, self.training)

        key_mask, padding_mask, has_pad = None, None, False
        if patch_masks is not None or text_has_padding is not False:
            txt_pad = src_tokens.eq(self.config.padding_idx)
            img_pad = torch.zeros(B, n, dtype=torch.bool, device=x.device)
            if patch_masks is not None:
                img_pad = img_pad | ~patch_masks.to(torch.bool)[:, None]
            padding_mask = torch.cat([img_pad, txt_pad], dim=1)
            has_pad = bool(padding_mask.any())
        if has_pad:
            x = x * (1 - padding_mask.unsqueeze(-1).type_as(x))
            key_mask = torch.zeros(padding_mask.shape, dtype=torch.float32, device=x.device)
            key_mask = key_mask.masked_fill(padding_mask, float("-inf"))[:, None, None, :]

        enc_pos, biases = self.layer_biases(h, w, length)
        x = self.run_layers(x, biases, key_mask)
        return EncoderOutput(enc_out=x, padding_mask=padding_mask if has_pad else None,
                             enc_pos=enc_pos[None].expand(B, -1, -1), grid=(h, w), features=features)
