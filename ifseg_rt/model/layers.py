"""Transformer building blocks of OFA: fp32 LayerNorm, attention with NormFormer head scale, pre-LN encoder and
decoder layers with the NormFormer extra norms (ofa.md §7)."""

from __future__ import annotations

from typing import Callable, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def upcast(x: Tensor) -> Tensor:
    """fp16/bf16 -> float32; float32/float64 unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class LayerNorm(nn.LayerNorm):
    """LayerNorm evaluated in (at least) float32 and cast back (as whisper's), eps 1e-5 everywhere in OFA."""

    def forward(self, x: Tensor) -> Tensor:
        xf = upcast(x)
        w = self.weight.to(xf.dtype) if self.weight is not None else None
        b = self.bias.to(xf.dtype) if self.bias is not None else None
        return F.layer_norm(xf, self.normalized_shape, w, b, self.eps).to(x.dtype)


def gelu_fp32(x: Tensor) -> Tensor:
    """Exact (erf) GELU evaluated in (at least) float32 (ofa.md §7.4)."""
    return F.gelu(upcast(x)).to(x.dtype)


def drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Per-sample stochastic depth: one Bernoulli per batch element, output divided by the keep probability."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask / keep


def drop_path_rates(n: int, rate: float) -> List[float]:
    """Stochastic-depth rate of each of ``n`` layers: linear from 0 to ``rate``."""
    if n == 1:
        return [0.0]
    return [rate * i / (n - 1) for i in range(n)]


def split_heads(x: Tensor, heads: int) -> Tensor:
    """``(..., T, d)`` -> ``(..., H, T, dh)``, head-major contiguous chunks of the last dimension."""
    *lead, t, d = x.shape
    return x.reshape(*lead, t, heads, d // heads).transpose(-2, -3)


class MultiheadAttention(nn.Module):
    """OFA attention (ofa.md §7.1): q scaled by (2*dh)^-1/2 after its bias, additive position bias added before the
    masks, softmax in float32, per-head output scale ``c_attn`` before ``out_proj``."""

    def __init__(self, *, d_model: int, heads: int, attn_scale_factor: float = 2.0, dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.head_dim = d_model // heads
        self.scaling = float(self.head_dim * attn_scale_factor) ** -0.5
        self.dropout = dropout
        # registration order = fairseq state_dict order: c_attn, k_proj, v_proj, q_proj, out_proj
        self.c_attn = nn.Parameter(torch.ones(heads))
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.q_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, query: Tensor, key_value: Tensor, attn_bias: Optional[Tensor] = None) -> Tensor:
        """
        Parameters
        ----------
        query : BxTxd
        key_value : BxSxd
        attn_bias : additive float bias broadcastable to BxHxTxS, already holding the position biases, the causal
            mask and the key-padding mask (``-inf`` where a key must be ignored)
        """
        q = split_heads(self.q_proj(query) * self.scaling, self.heads)
        k = split_heads(self.k_proj(key_value), self.heads)
        v = split_heads(self.v_proj(key_value), self.heads)
        if attn_bias is not None:
            attn_bias = attn_bias.to(q.dtype)
        # scale=1.0: q is already scaled (the original scales q, not the logits)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=1.0,
                                           dropout_p=self.dropout if self.training else 0.0)
        o = o * self.c_attn.to(o.dtype)[:, None, None]
        o = o.transpose(-2, -3).flatten(-2)
        return self.out_proj(o)


class EncoderLayer(nn.Module):
    """Pre-LN encoder layer with NormFormer ``attn_ln`` and ``ffn_layernorm`` (ofa.md §7.2)."""

    def __init__(self, *, d_model: int, ffn_dim: int, heads: int, attn_scale_factor: float = 2.0,
                 dropout: float = 0.0, drop_path: float = 0.0, eps: float = 1e-5):
        super().__init__()
        self.dropout = dropout
        self.drop_path = drop_path
        self.self_attn = MultiheadAttention(d_model=d_model, heads=heads, attn_scale_factor=attn_scale_factor)
        self.self_attn_layer_norm = LayerNorm(d_model, eps=eps)
        self.fc1 = nn.Linear(d_model, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, d_model)
        self.attn_ln = LayerNorm(d_model, eps=eps)
        self.ffn_layernorm = LayerNorm(ffn_dim, eps=eps)
        self.final_layer_norm = LayerNorm(d_model, eps=eps)

    def _residual(self, x: Tensor, branch: Tensor) -> Tensor:
        branch = F.dropout(branch, self.dropout, self.training)
        return x + drop_path(branch, self.drop_path, self.training)

    def forward(self, x: Tensor, attn_bias: Optional[Tensor] = None, *,
                attention: Optional[Callable[..., Tensor]] = None) -> Tensor:
        """``attention(self_attn, a)``, when given, replaces ``self_attn(a, a, attn_bias)`` (the real-image path's
        blocked attention of :mod:`~ifseg_rt.model.grid_attention`)."""
        a = self.self_attn_layer_norm(x)
        a = self.attn_ln(attention(self.self_attn, a) if attention is not None else self.self_attn(a, a, attn_bias))
        x = self._residual(x, a)
        f = gelu_fp32(self.fc1(self.final_layer_norm(x)))
        f = self.fc2(self.ffn_layernorm(f))
        return self._residual(x, f)


class DecoderLayer(nn.Module):
    """Pre-LN decoder layer: self-attention, cross-attention, FFN, each with its NormFormer norm (ofa.md §7.3)."""

    def __init__(self, *, d_model: int, ffn_dim: int, heads: int, attn_scale_factor: float = 2.0,
                 dropout: float = 0.0, drop_path: float = 0.0, eps: float = 1e-5):
        super().__init__()
        self.dropout = dropout
        self.drop_path = drop_path
        # registration order = fairseq state_dict order
        self.self_attn = MultiheadAttention(d_model=d_model, heads=heads, attn_scale_factor=attn_scale_factor)
        self.self_attn_ln = LayerNorm(d_model, eps=eps)
        self.cross_attn_ln = LayerNorm(d_model, eps=eps)
        self.self_attn_layer_norm = LayerNorm(d_model, eps=eps)
        self.encoder_attn = MultiheadAttention(d_model=d_model, heads=heads, attn_scale_factor=attn_scale_factor)
        self.encoder_attn_layer_norm = LayerNorm(d_model, eps=eps)
        self.ffn_layernorm = LayerNorm(ffn_dim, eps=eps)
        self.fc1 = nn.Linear(d_model, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, d_model)
        self.final_layer_norm = LayerNorm(d_model, eps=eps)

    def _residual(self, x: Tensor, branch: Tensor) -> Tensor:
        branch = F.dropout(branch, self.dropout, self.training)
        return x + drop_path(branch, self.drop_path, self.training)

    def forward(self, x: Tensor, enc_out: Tensor, self_bias: Optional[Tensor] = None,
                cross_bias: Optional[Tensor] = None, *, self_attention: Optional[Callable[..., Tensor]] = None,
                cross_attention: Optional[Callable[..., Tensor]] = None) -> Tensor:
        """``self_attention(self_attn, a)`` / ``cross_attention(encoder_attn, c, enc_out)``, when given, replace the
        bias-based attention calls (see :class:`EncoderLayer`)."""
        a = self.self_attn_layer_norm(x)
        a = self_attention(self.self_attn, a) if self_attention is not None else self.self_attn(a, a, self_bias)
        a = self.self_attn_ln(a)
        x = self._residual(x, a)
        c = self.encoder_attn_layer_norm(x)
        c = (cross_attention(self.encoder_attn, c, enc_out) if cross_attention is not None
             else self.encoder_attn(c, enc_out, cross_bias))
        c = self.cross_attn_ln(c)
        x = self._residual(x, c)
        f = gelu_fp32(self.fc1(self.final_layer_norm(x)))
        f = self.fc2(self.ffn_layernorm(f))
        return self._residual(x, f)
