"""An independent, deliberately naive float64 re-implementation of the OFA / SegOFA forward pass, written straight
from the specification (ofa.md §2-§8, ifseg.md §6-§8) on a plain dict of numpy arrays.

It shares no code with ``ifseg_rt.model``: buckets are evaluated pair by pair from the spec formulas, attention is
written per head, bilinear resizing uses explicit 1-D weights. Only the ResNet convolutions use torch's ``conv2d`` as
a primitive. Used by tests/test_model.py to check the model and by tests/test_checkpoint.py to check loading.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

EPS = 1e-5


def ln(x, sd, name):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + EPS) * sd[name + ".weight"] + sd[name + ".bias"]


def linear(x, sd, name, bias=True):
    y = x @ sd[name + ".weight"].T
    return y + sd[name + ".bias"] if bias else y


def gelu(x):
    return 0.5 * x * (1.0 + torch.erf(torch.from_numpy(x) / math.sqrt(2.0)).numpy())


def softmax(x):
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


# --- buckets, pair by pair from the formulas -----------------------------------------------------------------------
def token_bucket(i, j, bucket_size=256, max_positions=1024):
    r, m = i - j, bucket_size // 2
    if abs(r) <= m:
        b = r
    else:
        b = int(math.copysign(m + math.ceil(math.log(abs(r) / m) / math.log((max_positions - 1) / m) * (m - 1)), r))
    return b + bucket_size - 1


def grid_bucket(p, q, s):
    """Relative bucket of ids p (query) and q (key) over a grid of side s (id 0 special, id 1 + s*r + c)."""
    n = (2 * s - 1) ** 2 + 3
    if p == 0 and q == 0:
        return n - 1
    if p == 0:
        return n - 3
    if q == 0:
        return n - 2
    rp, cp = divmod(p - 1, s)
    rq, cq = divmod(q - 1, s)
    return (rp - rq + s - 1) * (2 * s - 1) + (cp - cq + s - 1)


def grid_bucket_table(ids, s):
    """Vectorised :func:`grid_bucket` over all pairs of ``ids`` (same formula, checked against it in the tests)."""
    ids = np.asarray(ids)
    n = (2 * s - 1) ** 2 + 3
    r, c = (ids - 1) // s, (ids - 1) % s
    out = (r[:, None] - r[None, :] + s - 1) * (2 * s - 1) + (c[:, None] - c[None, :] + s - 1)
    out = np.where(ids[:, None] == 0, n - 3, out)
    out = np.where(ids[None, :] == 0, n - 2, out)
    return np.where((ids[:, None] == 0) & (ids[None, :] == 0), n - 1, out)


def interp_weights(n_in, n_out):
    """n_out x n_in bilinear weights, align_corners=False (src = (dst + 0.5) * in/out - 0.5, clamped at 0)."""
    w = np.zeros((n_out, n_in))
    for o in range(n_out):
        src = max((o + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(math.floor(src)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        lam = src - i0
        w[o, i0] += 1 - lam
        w[o, i1] += lam
    return w


def resize_cells(x, side, h, w):
    """Resize the last axis (a side x side row-major grid) to h*w."""
    ry, rx = interp_weights(side, h), interp_weights(side, w)
    lead = x.shape[:-1]
    g = x.reshape(*lead, side, side)
    out = np.matmul(np.matmul(ry, g), rx.T)  # ry @ grid @ rx^T
    return out.reshape(*lead, h * w)


# --- attention and layers ------------------------------------------------------------------------------------------
def attention(xq, xkv, sd, name, heads, bias, scale_factor=2.0):
    d = xq.shape[-1]
    dh = d // heads
    scaling = (dh * scale_factor) ** -0.5
    q = linear(xq, sd, name + ".q_proj") * scaling
    k = linear(xkv, sd, name + ".k_proj")
    v = linear(xkv, sd, name + ".v_proj")
    outs = []
    for hd in range(heads):
        sl = slice(hd * dh, (hd + 1) * dh)
        logits = q[..., sl] @ np.swapaxes(k[..., sl], -1, -2) + bias[..., hd, :, :]
        outs.append(sd[name + ".c_attn"][hd] * (softmax(logits) @ v[..., sl]))
    return linear(np.concatenate(outs, -1), sd, name + ".out_proj")


def encoder_layer(x, sd, p, heads, bias):
    a = ln(x, sd, p + "self_attn_layer_norm")
    a = ln(attention(a, a, sd, p + "self_attn", heads, bias), sd, p + "attn_ln")
    x = x + a
    f = gelu(linear(ln(x, sd, p + "final_layer_norm"), sd, p + "fc1"))
    return x + linear(ln(f, sd, p + "ffn_layernorm"), sd, p + "fc2")


def decoder_layer(x, enc, sd, p, heads, self_bias, cross_bias):
    a = ln(x, sd, p + "self_attn_layer_norm")
    a = ln(attention(a, a, sd, p + "self_attn", heads, self_bias), sd, p + "self_attn_ln")
    x = x + a
    c = ln(x, sd, p + "encoder_attn_layer_norm")
    c = ln(attention(c, enc, sd, p + "encoder_attn", heads, cross_bias), sd, p + "cross_attn_ln")
    x = x + c
    f = gelu(linear(ln(x, sd, p + "final_layer_norm"), sd, p + "fc1"))
    return x + linear(ln(f, sd, p + "ffn_layernorm"), sd, p + "fc2")


def pos_bias(zq, zk, sd, qname, kname, heads, scale_factor=2.0):
    d = zq.shape[-1]
    dh = d // heads
    q = linear(zq, sd, qname) * (dh * scale_factor) ** -0.5
    k = linear(zk, sd, kname)
    return np.stack([q[..., h * dh:(h + 1) * dh] @ np.swapaxes(k[..., h * dh:(h + 1) * dh], -1, -2)
                     for h in range(heads)], axis=-3)


# --- ResNet --------------------------------------------------------------------------------------------------------
def resnet(sd, images, blocks, eps=EPS):
    def bn(x, name):
        w, b = sd[name + ".weight"], sd[name + ".bias"]
        m, v = sd[name + ".running_mean"], sd[name + ".running_var"]
        t = lambda a: torch.from_numpy(a)[None, :, None, None]  # noqa: E731
        return (x - t(m)) / torch.sqrt(t(v) + eps) * t(w) + t(b)

    def conv(x, name, stride=1, pad=0):
        return F.conv2d(x, torch.from_numpy(sd[name]), stride=stride, padding=pad)

    pre = "encoder.embed_images."
    x = torch.from_numpy(images)
    x = torch.relu(bn(conv(x, pre + "conv1.weight", 2, 3), pre + "bn1"))
    x = F.max_pool2d(x, 3, 2, 1)
    for k, n in zip((1, 2, 3), blocks):
        for i in range(n):
            p = f"{pre}layer{k}.{i}."
            s = 2 if (i == 0 and k > 1) else 1
            out = torch.relu(bn(conv(x, p + "conv1.weight"), p + "bn1"))
            out = torch.relu(bn(conv(out, p + "conv2.weight", s, 1), p + "bn2"))
            out = bn(conv(out, p + "conv3.weight"), p + "bn3")
            skip = bn(conv(x, p + "downsample.0.weight", s), p + "downsample.1") if i == 0 else x
            x = torch.relu(skip + out)
    return x.numpy()


# --- encoder -------------------------------------------------------------------------------------------------------
def encoder(sd, cfg, src, *, images=None, cells=None, grid=None, ifseg=True):
    """src: L ids (one prompt for the batch). Returns enc_out (B,S,d), enc_pos (S,d), (h, w), features."""
    H, s, G = cfg.heads, cfg.image_bucket_size, cfg.seg_grid
    E, T = sd["encoder.embed_tokens.weight"], sd["encoder.type_embedding.weight"]
    feats = None
    if images is not None:
        f = resnet(sd, images, cfg.resnet_layers)
        B, C, h, w = f.shape
        feats = f.reshape(B, C, h * w).transpose(0, 2, 1)
        u = ln(linear(feats, sd, "encoder.image_proj") + T[1], sd, "encoder.patch_layernorm_embedding")
    else:
        h, w = grid
        u = ln(cells + T[1], sd, "encoder.patch_layernorm_embedding")
    B, n, L = u.shape[0], h * w, len(src)
    t = ln(E[np.asarray(src)] + T[0], sd, "encoder.layernorm_embedding")
    x = np.concatenate([u, np.broadcast_to(t, (B, L, t.shape[-1]))], axis=1)

    table = sd["encoder.embed_image_positions.weight"]
    if ifseg and n > G * G:
        ref = np.stack([table[1 + s * r + c] for r in range(G) for c in range(G)])  # (G^2, d)
        p_img = resize_cells(ref.T, G, h, w).T
    else:
        p_img = np.stack([table[1 + s * r + c] for r in range(h) for c in range(w)])
    p_txt = sd["encoder.embed_positions.weight"][:L]
    enc_pos = np.concatenate([ln(p_img, sd, "encoder.image_pos_ln"), ln(p_txt, sd, "encoder.pos_ln")])
    A = pos_bias(enc_pos, enc_pos, sd, "encoder.pos_q_linear", "encoder.pos_k_linear", H)

    if ifseg:
        ids = [1 + s * r + c for r in range(G) for c in range(G)]
    else:
        ids = [1 + s * r + c for r in range(h) for c in range(w)]
    img_bucket = grid_bucket_table(ids, s)
    txt_bucket = np.array([[token_bucket(i, j, cfg.token_bucket_size, cfg.max_positions) for j in range(L)]
                           for i in range(L)])
    for layer in range(cfg.encoder_layers):
        r_img = sd[f"encoder.image_rel_pos_table_list.{layer}.weight"][img_bucket].transpose(2, 0, 1)
        if ifseg:
            r_img = resize_cells(r_img, G, h, w)  # keys
            r_img = np.swapaxes(resize_cells(np.swapaxes(r_img, 1, 2), G, h, w), 1, 2)  # queries
        r_txt = sd[f"encoder.token_rel_pos_table_list.{layer}.weight"][txt_bucket].transpose(2, 0, 1)
        bias = A.copy()
        bias[:, :n, :n] += r_img
        bias[:, n:, n:] += r_txt
        x = encoder_layer(x, sd, f"encoder.layers.{layer}.", H, bias[None])
    return ln(x, sd, "encoder.layer_norm"), enc_pos, (h, w), feats


def segofa_forward(sd, cfg, src, *, images=None, cells=None, grid=None):
    """Reference SegOFA: returns (logits B x N x M, features or None)."""
    H, G = cfg.heads, cfg.seg_grid
    enc, enc_pos, (h, w), feats = encoder(sd, cfg, src, images=images, cells=cells, grid=grid, ifseg=True)
    n, B = h * w, enc.shape[0]
    E = sd["encoder.embed_tokens.weight"]
    y = np.concatenate([np.broadcast_to(E[0], (B, 1, E.shape[1])), enc[:, :n]], axis=1)
    y = ln(y, sd, "decoder.layernorm_embedding")
    table = sd["decoder.embed_seg_positions.weight"]
    pdec = np.concatenate([table[:1], resize_cells(table[1:].T, G, h, w).T])
    z = ln(pdec, sd, "decoder.seg_pos_ln")
    self_abs = pos_bias(z, z, sd, "decoder.self_pos_q_linear", "decoder.self_pos_k_linear", H)
    cross = pos_bias(z, enc_pos, sd, "decoder.cross_pos_q_linear", "decoder.cross_pos_k_linear", H)
    t = n + 1
    causal = np.triu(np.full((t, t), -np.inf), 1)
    seg_bucket = grid_bucket_table(np.arange(G * G + 1), G)
    for layer in range(cfg.decoder_layers):
        R = sd[f"decoder.seg_rel_pos_table_list.{layer}.weight"][seg_bucket].transpose(2, 0, 1)
        # queries (BOS row kept), then keys (BOS column kept)
        Rq = np.concatenate([R[:, :1, :], np.swapaxes(resize_cells(np.swapaxes(R[:, 1:, :], 1, 2), G, h, w), 1, 2)], 1)
        Rk = np.concatenate([Rq[:, :, :1], resize_cells(Rq[:, :, 1:], G, h, w)], 2)
        y = decoder_layer(y, enc, sd, f"decoder.layers.{layer}.", H, (self_abs + Rk + causal)[None], cross[None])
    y = ln(y, sd, "decoder.layer_norm")
    logits = y @ sd["encoder.seg_embed_tokens.weight"].T
    return logits[:, :n], feats


def ofa_forward(sd, cfg, src, images, prev):
    """Reference OFA text decoding: returns B x T x V logits."""
    H = cfg.heads
    enc, enc_pos, _, _ = encoder(sd, cfg, src, images=images, ifseg=False)
    E = sd["encoder.embed_tokens.weight"]
    T_ = len(prev)
    y = ln(E[np.asarray(prev)], sd, "decoder.layernorm_embedding")[None].repeat(enc.shape[0], 0)
    z = ln(sd["decoder.embed_positions.weight"][:T_], sd, "decoder.pos_ln")
    self_abs = pos_bias(z, z, sd, "decoder.self_pos_q_linear", "decoder.self_pos_k_linear", H)
    cross = pos_bias(z, enc_pos, sd, "decoder.cross_pos_q_linear", "decoder.cross_pos_k_linear", H)
    causal = np.triu(np.full((T_, T_), -np.inf), 1)
    bucket = np.array([[token_bucket(i, j, cfg.token_bucket_size, cfg.max_positions) for j in range(T_)]
                       for i in range(T_)])
    for layer in range(cfg.decoder_layers):
        r = sd[f"decoder.token_rel_pos_table_list.{layer}.weight"][bucket].transpose(2, 0, 1)
        y = decoder_layer(y, enc, sd, f"decoder.layers.{layer}.", H, (self_abs + r + causal)[None], cross[None])
    y = ln(y, sd, "decoder.layer_norm")
    return y @ E.T


def numpy_state(model) -> dict:
    return {k: v.detach().double().numpy() if v.is_floating_point() else v.numpy()
            for k, v in model.state_dict().items()}
