"""The OFA decoder (ofa.md §8) and IFSeg's surrogate decoder (ifseg.md §8)."""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import OFAConfig
from .encoder import EncoderOutput
from .layers import DecoderLayer, LayerNorm, drop_path_rates, split_heads
from .positions import (image_position_idx, image_rp_bucket, resize_bias_2d_keep_first, resize_grid,
                        token_rp_bucket)

# IFSeg decoder constants kept only for state_dict parity (ifseg.md §2): fairseq ids of " region" and ":"
REGION_PREFIX = (976, 35)
NUM_BINS = 1000


def causal_mask(t: int, device=None) -> Tensor:
    """``TxT`` float mask with -inf above the diagonal."""
    return torch.full((t, t), float("-inf"), device=device).triu(1)


class OFADecoder(nn.Module):
    """OFA decoder. ``surrogate=True`` builds IFSeg's segmentation decoder: no vocabulary head, the M-row tied
    category head, and the seg position modules trained from scratch."""

    def __init__(self, config: OFAConfig, *, embed_tokens: nn.Embedding, seg_embed_tokens: Optional[nn.Embedding] = None,
                 surrogate: bool = False, dropout: float = 0.0, drop_path_rate: float = 0.0):
        super().__init__()
        cfg = self.config = config
        d, H = cfg.d_model, cfg.heads
        self.surrogate = surrogate
        self.dropout = dropout
        # buffers, in the original's registration order
        self.register_buffer("version", torch.tensor([3.0]))
        if surrogate:
            self.register_buffer("seg_rp_bucket", image_rp_bucket(cfg.seg_grid))
        self.register_buffer("token_rp_bucket", token_rp_bucket(cfg.max_positions, cfg.token_bucket_size))
        self.register_buffer("image_rp_bucket", image_rp_bucket(cfg.image_bucket_size))
        self.register_buffer("image_position_idx",
                             image_position_idx(cfg.code_image_size, cfg.image_bucket_size, cfg.position_rows))
        if surrogate:
            self.register_buffer("bin_id_offset", torch.tensor([cfg.vocab_size - NUM_BINS]))
            self.register_buffer("seg_id_offset", torch.tensor([cfg.vocab_size]))
            self.register_buffer("region_prefix", torch.tensor(REGION_PREFIX))
            assert seg_embed_tokens is not None
            self.seg_embed_tokens = seg_embed_tokens
            self.seg_projection = nn.Linear(d, seg_embed_tokens.num_embeddings, bias=False)
            self.seg_projection.weight = seg_embed_tokens.weight  # tied, bias-free head (ifseg.md §3)
        self.embed_tokens = embed_tokens
        self.layernorm_embedding = LayerNorm(d, eps=cfg.layernorm_eps)
        self.embed_positions = nn.Embedding(cfg.position_rows, d)
        self.embed_image_positions = nn.Embedding(cfg.image_position_rows, d)
        if surrogate:
            self.embed_seg_positions = nn.Embedding(cfg.seg_grid ** 2 + 1, d)
        self.pos_ln = LayerNorm(d, eps=cfg.layernorm_eps)
        self.image_pos_ln = LayerNorm(d, eps=cfg.layernorm_eps)
        if surrogate:
            self.seg_pos_ln = LayerNorm(d, eps=cfg.layernorm_eps)
        self.self_pos_q_linear = nn.Linear(d, d)
        self.self_pos_k_linear = nn.Linear(d, d)
        self.cross_pos_q_linear = nn.Linear(d, d)
        self.cross_pos_k_linear = nn.Linear(d, d)
        self.code_layernorm_embedding = LayerNorm(d, eps=cfg.layernorm_eps)
        self.layers = nn.ModuleList(
            DecoderLayer(d_model=d, ffn_dim=cfg.ffn_dim, heads=H, attn_scale_factor=cfg.attn_scale_factor,
                         dropout=dropout, drop_path=p, eps=cfg.layernorm_eps)
            for p in drop_path_rates(cfg.decoder_layers, drop_path_rate))
        self.layer_norm = LayerNorm(d, eps=cfg.layernorm_eps)
        if not surrogate:
            self.output_projection = nn.Linear(d, embed_tokens.num_embeddings, bias=False)
            self.output_projection.weight = embed_tokens.weight  # tied output projection
        self.token_rel_pos_table_list = nn.ModuleList(
            nn.Embedding(cfg.token_rel_rows, H) for _ in range(cfg.decoder_layers))
        self.image_rel_pos_table_list = nn.ModuleList(
            nn.Embedding(cfg.image_rel_rows, H) for _ in range(cfg.decoder_layers))
        if surrogate:
            self.seg_rel_pos_table_list = nn.ModuleList(
                nn.Embedding(cfg.seg_rel_rows, H) for _ in range(cfg.decoder_layers))

    # --- shared pieces -----------------------------------------------------------------------------------------
    def abs_biases(self, z: Tensor, enc_pos: Tensor) -> Tuple[Tensor, Tensor]:
        """Self (HxTxT) and cross (BxHxTxS) absolute biases from normalised target positions ``z`` (Txd)."""
        H, s = self.config.heads, self.config.scaling
        q = split_heads(self.self_pos_q_linear(z), H) * s
        k = split_heads(self.self_pos_k_linear(z), H)
        self_abs = q @ k.transpose(-1, -2)
        q = split_heads(self.cross_pos_q_linear(z), H) * s
        k = split_heads(self.cross_pos_k_linear(enc_pos), H)
        cross_abs = q @ k.transpose(-1, -2)
        return self_abs, cross_abs

    def run_layers(self, y: Tensor, enc: EncoderOutput, self_biases: Sequence[Tensor], cross_abs: Tensor) -> Tensor:
        """The decoder layers and the final LayerNorm: ``y`` (BxTxd) attends to ``enc.enc_out``; one self-attention
        bias per layer (causal mask included), one cross bias shared by all layers (padding added from ``enc``)."""
        cross_bias = cross_abs
        if enc.padding_mask is not None:
            pad = torch.zeros(enc.padding_mask.shape, dtype=cross_abs.dtype, device=cross_abs.device)
            cross_bias = cross_bias + pad.masked_fill(enc.padding_mask, float("-inf"))[:, None, None, :]
        for layer, bias in zip(self.layers, self_biases):
            y = layer(y, enc.enc_out, bias, cross_bias)
        return self.layer_norm(y)

    # --- OFA text decoding -------------------------------------------------------------------------------------
    def forward(self, prev_output_tokens: Tensor, enc: EncoderOutput) -> Tensor:
        """Teacher-forced OFA text decoding: ``BxT`` tokens -> ``BxTxV`` logits (ofa.md §8)."""
        if self.surrogate:
            raise RuntimeError("the surrogate (IFSeg) decoder has no vocabulary head; use forward_seg")
        B, T = prev_output_tokens.shape
        if T > self.config.max_positions:
            raise ValueError(f"decoder length {T} exceeds {self.config.max_positions} positions")
        y = self.layernorm_embedding(self.embed_tokens(prev_output_tokens))  # no position added (disable_entangle)
        y = F.dropout(y, self.dropout, self.training)
        z = self.pos_ln(self.embed_positions.weight[:T])
        self_abs, cross_abs = self.abs_biases(z, enc.enc_pos)
        mask = causal_mask(T, y.device)
        pad = prev_output_tokens.eq(self.config.padding_idx)
        if bool(pad.any()):
            mask = mask + torch.zeros(pad.shape, device=y.device).masked_fill(pad, float("-inf"))[:, None, None, :]
        bucket = self.token_rp_bucket[:T, :T]
        self_biases = [self_abs + F.embedding(bucket, t.weight).permute(2, 0, 1) + mask
                       for t in self.token_rel_pos_table_list]
        y = self.run_layers(y, enc, self_biases, cross_abs)
        return self.output_projection(y)

    # --- IFSeg surrogate decoding ------------------------------------------------------------------------------
    def seg_positions(self, h: int, w: int) -> Tensor:
        """Raw decoder seg positions ``(1 + h*w) x d``: BOS row then cells resized from the G x G table."""
        G, table = self.config.seg_grid, self.embed_seg_positions.weight
        cells = resize_grid(table[1:].t(), G, h, w).t()
        return torch.cat([table[:1], cells], dim=0)

    def seg_rel_bias(self, layer: int, h: int, w: int) -> Tensor:
        """Seg relative bias of one layer, ``Hx(1+N)x(1+N)``, BOS row/column kept (ifseg.md §8.3)."""
        ref = F.embedding(self.seg_rp_bucket, self.seg_rel_pos_table_list[layer].weight).permute(2, 0, 1)
        return resize_bias_2d_keep_first(ref, self.config.seg_grid, h, w)

    def seg_biases(self, h: int, w: int, enc_pos: Tensor) -> Tuple[List[Tensor], Tensor]:
        """Per-layer self-attention biases (causal mask included) and the shared cross bias for an h x w grid."""
        t = h * w + 1
        z = self.seg_pos_ln(self.seg_positions(h, w))
        self_abs, cross_abs = self.abs_biases(z, enc_pos)
        mask = causal_mask(t, z.device)
        self_biases = [self_abs + self.seg_rel_bias(layer, h, w) + mask for layer in range(len(self.layers))]
        return self_biases, cross_abs

    def forward_seg(self, enc: EncoderOutput, biases: Optional[Tuple[Sequence[Tensor], Tensor]] = None) -> Tensor:
        """Surrogate decoding: ``[BOS; enc_out at image cells]`` -> per-cell logits ``BxNxM`` (last output dropped).

        ``biases``: precomputed ``(self biases, cross bias)`` of :meth:`seg_biases` for ``enc.grid`` (they depend only on
        the weights and the grid); computed here when omitted.
        """
        if not self.surrogate:
            raise RuntimeError("this decoder was built without the IFSeg surrogate modules")
        h, w = enc.grid
        n = h * w
        B = enc.enc_out.shape[0]
        bos = self.embed_tokens.weight[0].to(enc.enc_out.dtype).expand(B, 1, -1)
        y = torch.cat([bos, enc.enc_out[:, :n]], dim=1)
        y = F.dropout(self.layernorm_embedding(y), self.dropout, self.training)
        self_biases, cross_abs = biases if biases is not None else self.seg_biases(h, w, enc.enc_pos)
        self_biases = [b if b.dim() == 4 else b[None] for b in self_biases]
        y = self.run_layers(y, enc, self_biases, cross_abs)
        return self.seg_projection(y[:, :n])
