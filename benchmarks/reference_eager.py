"""A reference-style eager pipeline mirroring the original IFSeg inference code, for ``benchmarks/e2e.py``.

What it deliberately keeps from the original: position bias tables gathered and resized on every call
(``encoder.layer_biases`` / ``decoder.seg_biases``), unfused attention (explicit matmul + float32 softmax + matmul),
and kNN in torch with the full NxN similarity matrix, ``topk`` and a 25-step gather loop; the output resize is
``F.interpolate`` of all M score maps to the original size followed by ``argmax``.
"""

from __future__ import annotations

import time
from typing import Dict, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ifseg_rt.model.layers import split_heads
from ifseg_rt.runtime.preprocess import normalize, resize_bilinear, ImagePolicy


def attention_explicit(attn, query: torch.Tensor, key_value: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The original's attention: q k^T + the full S x S bias, float32 softmax, then v (no fused kernel)."""
    H = attn.heads
    q = split_heads(attn.q_proj(query) * attn.scaling, H)
    k = split_heads(attn.k_proj(key_value), H)
    v = split_heads(attn.v_proj(key_value), H)
    p = torch.softmax((q @ k.transpose(-1, -2)).float() + bias.float(), dim=-1).to(v.dtype)
    o = ((p @ v) * attn.c_attn.to(v.dtype)[:, None, None]).transpose(1, 2)
    return attn.out_proj(o.reshape(o.shape[0], o.shape[1], -1))


def encoder_layer_explicit(layer, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    a = layer.self_attn_layer_norm(x)
    x = x + layer.attn_ln(attention_explicit(layer.self_attn, a, a, bias))
    f = F.gelu(layer.fc1(layer.final_layer_norm(x)).float()).to(x.dtype)
    return x + layer.fc2(layer.ffn_layernorm(f))


def decoder_layer_explicit(layer, y: torch.Tensor, enc_out: torch.Tensor, self_bias: torch.Tensor,
                           cross_bias: torch.Tensor) -> torch.Tensor:
    a = layer.self_attn_layer_norm(y)
    y = y + layer.self_attn_ln(attention_explicit(layer.self_attn, a, a, self_bias))
    c = layer.encoder_attn_layer_norm(y)
    y = y + layer.cross_attn_ln(attention_explicit(layer.encoder_attn, c, enc_out, cross_bias))
    f = F.gelu(layer.fc1(layer.final_layer_norm(y)).float()).to(y.dtype)
    return y + layer.fc2(layer.ffn_layernorm(f))


@torch.inference_mode()
def forward(model, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, Tuple[int, int]]:
    enc, dec = model.encoder, model.decoder
    feats, (h, w) = enc.image_features(x)
    B, n = x.shape[0], h * w
    src = model.prompt_tokens[None].expand(B, -1)
    y = torch.cat([enc.embed_patches(feats), enc.embed_text(src)], dim=1)
    enc_pos, biases = enc.layer_biases(h, w, src.shape[1])  # recomputed every call, as the original
    for layer, b in zip(enc.layers, biases):
        y = encoder_layer_explicit(layer, y, b[None])
    enc_out = enc.layer_norm(y)
    z = dec.layernorm_embedding(torch.cat([dec.embed_tokens.weight[0].expand(B, 1, -1), enc_out[:, :n]], dim=1))
    self_b, cross = dec.seg_biases(h, w, enc_pos)
    for layer, b in zip(dec.layers, self_b):
        z = decoder_layer_explicit(layer, z, enc_out, b[None], cross)
    return dec.seg_projection(dec.layer_norm(z)[:, :n]), feats, (h, w)


@torch.inference_mode()
def knn_torch(features: torch.Tensor, probs: torch.Tensor, k: int = 3, iters: int = 25) -> torch.Tensor:
    fn = F.normalize(features, dim=-1)
    sim = fn @ fn.T  # N x N
    idx = sim.topk(k, dim=-1).indices
    p = probs
    for _ in range(iters):
        p = p[idx].mean(dim=1)
    return p


def segment(model, image: np.ndarray, policy: ImagePolicy = ImagePolicy(), knn: bool = True) -> Tuple[np.ndarray, Dict[str, float]]:
    t = {}
    t0 = time.perf_counter()
    h0, w0 = image.shape[:2]
    x = torch.from_numpy(normalize(resize_bilinear(image, *policy.target_size(h0, w0)))[None])
    t1 = time.perf_counter()
    logits, feats, (h, w) = forward(model, x)
    t2 = time.perf_counter()
    scores = logits[0].float()
    if knn:
        scores = knn_torch(feats[0].float(), torch.softmax(scores, dim=-1))
    t3 = time.perf_counter()
    with torch.inference_mode():
        up = F.interpolate(scores.T.reshape(1, -1, h, w), size=(h0, w0), mode="bilinear", align_corners=False)
        labels = up[0].argmax(0).to(torch.int32).numpy()
    t4 = time.perf_counter()
    t.update(preprocess=(t1 - t0) * 1e3, engine=(t2 - t1) * 1e3, knn=(t3 - t2) * 1e3, resize_argmax=(t4 - t3) * 1e3,
             total=(t4 - t0) * 1e3)
    return labels, t
