"""The deploy-time I/O contract of an IFSeg model, as a wrapper around a trained :class:`SegOFA` (SAM's
``SamOnnxModel`` pattern). It should not be called directly: use :func:`ifseg_rt.export.export`.

The model's own code picks position rules with Python branches on the token grid (``ifseg.md`` §7: absolute image
positions resized from the G x G block only when N > G^2, else looked up directly; ``resize_grid`` returning early
for G x G). A traced graph would bake in whichever branch the dummy input took. This wrapper reuses every trained
module but computes the position tables branch-free:

* both absolute-position rules are evaluated and one is selected in-graph with ``torch.where(N > G^2, ...)``
  (direct-lookup ids are clamped to the table, so the unused branch never indexes out of range);
* every resize is an unconditional ``F.interpolate`` (bilinear, ``align_corners=False``), which is an exact
  identity at G x G, so no early return is needed;
* the causal mask is built from ``arange`` comparisons.

The prompt (text embedding, text positions, token relative biases) is baked in as constants: the runtime needs no
tokenizer. With ``static_grid=(h, w)`` every shape-only table (encoder biases, ``enc_pos``, decoder biases) is
computed once here and stored as a constant, so the exported graph holds no position arithmetic at all.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..model.layers import split_heads
from ..model.ofa import SegOFA


def _resize_last(x: Tensor, side: int, h, w) -> Tensor:
    """Bilinearly resize the trailing ``side*side`` axis of ``x`` to ``h*w`` (no identity shortcut)."""
    lead = x.shape[:-1]
    y = F.interpolate(x.reshape(-1, 1, side, side).float(), size=(h, w), mode="bilinear", align_corners=False)
    return y.to(x.dtype).reshape(*lead, h * w)


def _resize_bias(bias: Tensor, side: int, h, w) -> Tensor:
    """``(..., G^2, G^2)`` [query, key] -> ``(..., N, N)``: keys first, then queries (``resize_bias_2d``)."""
    bias = _resize_last(bias, side, h, w)
    return _resize_last(bias.transpose(-1, -2), side, h, w).transpose(-1, -2)


def _resize_bias_keep_first(bias: Tensor, side: int, h, w) -> Tensor:
    """``(..., 1+G^2, 1+G^2)`` -> ``(..., 1+N, 1+N)``, index 0 kept; queries first (``resize_bias_2d_keep_first``)."""

    def last(b):
        return torch.cat([b[..., :1], _resize_last(b[..., 1:], side, h, w)], dim=-1)

    bias = last(bias.transpose(-1, -2)).transpose(-1, -2)
    return last(bias)


def _gather_rel(tables: Tensor, bucket: Tensor) -> Tensor:
    """Per-layer tables ``Lyr x rows x H`` at a ``P x P`` bucket map -> ``Lyr x H x P x P`` (one ONNX Gather)."""
    p = bucket.shape[0]
    out = torch.index_select(tables, 1, bucket.reshape(-1))
    return out.reshape(tables.shape[0], p, p, tables.shape[2]).permute(0, 3, 1, 2)


def _attention(attn, query: Tensor, key_value: Tensor, bias: Tensor) -> Tensor:
    """:class:`~ifseg_rt.model.layers.MultiheadAttention` written out as matmul + float32 softmax + matmul.

    Same maths as the module (q scaled after its bias, additive bias, per-head ``c_attn``); explicit so that the
    exported graph has a plain ``Softmax`` node (precision-pinnable in TensorRT) and reshapes instead of the
    stride-dependent views that SDPA's decomposition produces under dynamic shapes.
    """
    H = attn.heads
    q = split_heads(attn.q_proj(query) * attn.scaling, H)
    k = split_heads(attn.k_proj(key_value), H)
    v = split_heads(attn.v_proj(key_value), H)
    scores = (q @ k.transpose(-1, -2)).float() + bias.float()
    p = torch.softmax(scores, dim=-1).to(v.dtype)
    o = (p @ v) * attn.c_attn.to(v.dtype)[:, None, None]
    o = o.transpose(1, 2)
    o = o.reshape(o.shape[0], o.shape[1], -1)
    return attn.out_proj(o)


def encoder_layer_explicit(layer, x: Tensor, bias: Tensor) -> Tensor:
    """``EncoderLayer.forward`` (eval mode) with :func:`_attention`."""
    a = layer.self_attn_layer_norm(x)
    x = x + layer.attn_ln(_attention(layer.self_attn, a, a, bias))
    f = F.gelu(layer.fc1(layer.final_layer_norm(x)).float()).to(x.dtype)
    return x + layer.fc2(layer.ffn_layernorm(f))


def decoder_layer_explicit(layer, y: Tensor, enc_out: Tensor, self_bias: Tensor, cross_bias: Tensor) -> Tensor:
    """``DecoderLayer.forward`` (eval mode) with :func:`_attention`."""
    a = layer.self_attn_layer_norm(y)
    y = y + layer.self_attn_ln(_attention(layer.self_attn, a, a, self_bias))
    c = layer.encoder_attn_layer_norm(y)
    y = y + layer.cross_attn_ln(_attention(layer.encoder_attn, c, enc_out, cross_bias))
    f = F.gelu(layer.fc1(layer.final_layer_norm(y)).float()).to(y.dtype)
    return y + layer.fc2(layer.ffn_layernorm(f))


class IFSegOnnxModel(nn.Module):
    """``image`` (Bx3xHxW float32, normalised) -> ``logits`` (BxNxM), ``features`` (BxNxC).

    Arguments:
      model (SegOFA): a trained model with its prompt set (``set_categories``); used read-only.
      normalize_features (bool): L2-normalise ``features`` in the graph (kNN is invariant to it; keeps the
        reduction in fp32 on engines that honour precision constraints).
      static_grid (tuple(int, int) or None): bake every shape-dependent table for this token grid.
    """

    def __init__(self, model: SegOFA, *, normalize_features: bool = False,
                 static_grid: Optional[Tuple[int, int]] = None):
        super().__init__()
        if not isinstance(model, SegOFA):
            raise TypeError(f"expected a SegOFA model, got {type(model).__name__}")
        if not model.has_prompt:
            raise ValueError("the model has no prompt: call set_categories() (or load a run directory) first")
        self.model = model.eval()
        self.normalize_features = normalize_features
        self.static_grid = static_grid
        enc, dec, cfg = model.encoder, model.decoder, model.config
        self.G = cfg.seg_grid
        self.stride = cfg.image_bucket_size
        self.heads = cfg.heads
        with torch.no_grad():
            src = model.prompt_tokens
            L = src.numel()
            self.text_len = L
            G = self.G
            dev = src.device
            r = torch.arange(G, device=dev)
            ids32 = (1 + self.stride * r[:, None] + r[None, :]).flatten()
            # constants of the prompt (pixel- and shape-independent)
            self.register_buffer("text_embed", enc.embed_text(src[None])[0].detach().clone(), persistent=False)
            self.register_buffer("text_pos", enc.pos_ln(enc.embed_positions.weight[:L]).detach().clone(),
                                 persistent=False)
            self.register_buffer("text_rel", torch.stack([enc.token_rel_bias(i, L) for i in range(len(enc.layers))]),
                                 persistent=False)  # Lyr x H x L x L
            # reference G x G tables the position rules resize
            self.register_buffer("img_pos_ref", enc.embed_image_positions.weight[ids32].t().reshape(1, -1, G, G)
                                 .detach().clone(), persistent=False)  # 1 x d x G x G
            # relative tables stay small in the graph: per-layer tables + one shared int32 bucket map, gathered per call
            self.register_buffer("img_rel_tables", torch.stack([t.weight for t in enc.image_rel_pos_table_list])
                                 .detach().clone(), persistent=False)  # Lyr x rows x H
            self.register_buffer("img_bucket", enc.image_rp_bucket[ids32][:, ids32].to(torch.int32).clone(),
                                 persistent=False)  # G^2 x G^2
            self.register_buffer("seg_rel_tables", torch.stack([t.weight for t in dec.seg_rel_pos_table_list])
                                 .detach().clone(), persistent=False)
            self.register_buffer("seg_bucket", dec.seg_rp_bucket.to(torch.int32).clone(), persistent=False)
            if static_grid is not None:
                h, w = (int(v) for v in static_grid)
                enc_pos, enc_bias, dec_bias, cross = self._tables(h, w)
                self.register_buffer("s_enc_pos", enc_pos.detach().clone(), persistent=False)
                self.register_buffer("s_enc_bias", enc_bias.detach().clone(), persistent=False)
                self.register_buffer("s_dec_bias", dec_bias.detach().clone(), persistent=False)
                self.register_buffer("s_cross", cross.detach().clone(), persistent=False)

    # --- shape-only tables (branch-free) -------------------------------------------------------------------------
    def _tables(self, h, w) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """(``enc_pos`` Sxd, encoder biases LyrxHxSxS, decoder self biases LyrxHxTxT incl. causal mask,
        cross bias HxTxS) for an h x w grid."""
        enc, dec = self.model.encoder, self.model.decoder
        G, L = self.G, self.text_len
        dev = self.text_embed.device
        n = h * w
        # absolute image positions: both IFSeg rules, selected in-graph on N > G^2
        r = torch.arange(h, device=dev)
        c = torch.arange(w, device=dev)
        table = enc.embed_image_positions.weight
        ids = (1 + self.stride * r[:, None] + c[None, :]).flatten().clamp(max=table.shape[0] - 1)
        direct = table[ids]
        resized = F.interpolate(self.img_pos_ref.float(), size=(h, w), mode="bilinear", align_corners=False)
        resized = resized.to(table.dtype).flatten(2)[0].t()
        big = (torch.arange(n, device=dev) >= G * G).any()  # N > G^2 as a tensor: no Python branch
        img_pos = torch.where(big, resized, direct)
        enc_pos = torch.cat([enc.image_pos_ln(img_pos), self.text_pos], dim=0)
        a = enc.abs_bias(enc_pos)  # H x S x S
        rel = _resize_bias(_gather_rel(self.img_rel_tables, self.img_bucket), G, h, w)  # Lyr x H x N x N, always resized
        enc_bias = a + F.pad(rel, (0, L, 0, L)) + F.pad(self.text_rel, (n, 0, n, 0))
        # decoder
        st = dec.embed_seg_positions.weight
        cells = _resize_last(st[1:].t(), G, h, w).t()
        z = dec.seg_pos_ln(torch.cat([st[:1], cells], dim=0))
        self_abs, cross = dec.abs_biases(z, enc_pos)
        i = torch.arange(n + 1, device=dev)
        mask = torch.where(i[None, :] > i[:, None], torch.full((), float("-inf"), device=dev),
                           torch.zeros((), device=dev))
        dec_bias = self_abs + _resize_bias_keep_first(_gather_rel(self.seg_rel_tables, self.seg_bucket), G, h, w) + mask
        return enc_pos, enc_bias, dec_bias, cross

    # --- forward ---------------------------------------------------------------------------------------------
    def tables(self, h, w) -> Tuple[Tensor, Tensor, Tensor]:
        """The per-grid position tables the transformer reads: (encoder biases LyrxHxSxS, decoder self biases
        LyrxHxTxT incl. the causal mask, cross bias HxTxS). Pixel-independent: callers may cache them per grid."""
        if self.static_grid is not None:
            return self.s_enc_bias, self.s_dec_bias, self.s_cross
        return self._tables(h, w)[1:]

    def forward(self, image: Tensor) -> Tuple[Tensor, Tensor]:
        """
        Arguments:
          image (torch.Tensor): Bx3xHxW float32, ``(pixel / 255 - 0.5) / 0.5``

        Returns:
          (torch.Tensor): logits, BxNxM per-cell category logits, N = ceil(H/16) * ceil(W/16) row-major
          (torch.Tensor): features, BxNxC ResNet layer3 features (L2-normalised when built with
            ``normalize_features``)
        """
        f = self.model.encoder.embed_images(image)
        return self.transformer(f, *self.tables(f.shape[2], f.shape[3]))

    def transformer(self, f: Tensor, enc_bias: Tensor, dec_bias: Tensor, cross: Tensor) -> Tuple[Tensor, Tensor]:
        """ResNet feature map ``f`` (BxCxhxw) + the grid's tables -> (logits, features)."""
        m = self.model
        enc, dec = m.encoder, m.decoder
        B, h, w = f.shape[0], f.shape[2], f.shape[3]
        n = h * w
        features = f.flatten(2).transpose(1, 2)
        u = enc.embed_patches(features)
        x = torch.cat([u, self.text_embed.to(u.dtype).expand(B, -1, -1)], dim=1)
        for i, layer in enumerate(enc.layers):
            x = encoder_layer_explicit(layer, x, enc_bias[i][None])
        enc_out = enc.layer_norm(x)
        bos = dec.embed_tokens.weight[0].to(enc_out.dtype).expand(B, 1, -1)
        y = dec.layernorm_embedding(torch.cat([bos, enc_out[:, :n]], dim=1))
        for i, layer in enumerate(dec.layers):
            y = decoder_layer_explicit(layer, y, enc_out, dec_bias[i][None], cross)
        y = dec.layer_norm(y)
        logits = dec.seg_projection(y[:, :n])
        if self.normalize_features:
            features = F.normalize(features.float(), dim=-1, eps=1e-12)
        return logits, features


class IFSegTablesGraph(nn.Module):
    """The split graph's first half: ``grid`` (an h x w tensor whose values are unused: only its shape is read)
    -> the grid's position tables (``enc_bias``, ``dec_bias``, ``cross``). Run once per grid and cached by the
    runtime, so that no request recomputes them (``tables.onnx``)."""

    def __init__(self, core: IFSegOnnxModel):
        super().__init__()
        self.core = core

    def forward(self, grid: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        return self.core.tables(grid.shape[0], grid.shape[1])


class IFSegBodyGraph(nn.Module):
    """The split graph's second half: ``image`` + the grid's tables -> (``logits``, ``features``) (``body.onnx``)."""

    def __init__(self, core: IFSegOnnxModel):
        super().__init__()
        self.core = core

    def forward(self, image: Tensor, enc_bias: Tensor, dec_bias: Tensor, cross: Tensor) -> Tuple[Tensor, Tensor]:
        return self.core.transformer(self.core.model.encoder.embed_images(image), enc_bias, dec_bias, cross)
