"""Deterministic position tables of OFA and IFSeg: relative buckets (ofa.md §6.2-6.3, ifseg.md §8.2) and the
bilinear resizing IFSeg applies to position tables for grids other than the reference G x G (ifseg.md §7, §8.3)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .grid_attention import tracing


def token_rp_bucket(max_positions: int = 1024, bucket_size: int = 256) -> torch.Tensor:
    """``max_positions x max_positions`` int64 table of token relative buckets (ofa.md §6.2).

    r = i - j (query minus key), m = bucket_size // 2; |r| <= m -> r, else sign(r) * (m + ceil(log(|r|/m) /
    log((max_positions - 1)/m) * (m - 1))); plus bucket_size - 1 so that the range is [0, 2 * bucket_size - 2].
    """
    ctx = torch.arange(max_positions, dtype=torch.long)
    rel = ctx[:, None] - ctx[None, :]
    mid = bucket_size // 2
    sign = torch.sign(rel)
    abs_pos = torch.where((rel < mid) & (rel > -mid), torch.full_like(rel, mid - 1), rel.abs())
    # float32 log divided by a float64 constant, as the original (same table as float64, checked in tests)
    log_pos = torch.ceil(torch.log(abs_pos.float() / mid) / math.log((max_positions - 1) / mid) * (mid - 1)) + mid
    log_pos = log_pos.long()
    bucket = torch.where(abs_pos.le(mid), rel, log_pos * sign)
    return bucket + bucket_size - 1


def image_rp_bucket(bucket_size: int) -> torch.Tensor:
    """``(s^2 + 1) x (s^2 + 1)`` int64 image relative buckets over ids 0 (special) and 1 + s*r + c (ofa.md §6.3)."""
    coords = torch.stack(torch.meshgrid(torch.arange(bucket_size), torch.arange(bucket_size), indexing="ij"))
    coords = coords.flatten(1)  # (2, s*s): row, col of id - 1
    rel = coords[:, :, None] - coords[:, None, :]  # query minus key
    rel = rel.permute(1, 2, 0) + (bucket_size - 1)
    span = 2 * bucket_size - 1
    n = span * span + 3
    table = torch.zeros(bucket_size * bucket_size + 1, bucket_size * bucket_size + 1, dtype=torch.long)
    table[1:, 1:] = rel[..., 0] * span + rel[..., 1]
    table[0, 0:] = n - 3
    table[0:, 0] = n - 2
    table[0, 0] = n - 1
    return table


def image_position_idx(code_image_size: int = 128, bucket_size: int = 42, length: int = 1026) -> torch.Tensor:
    """Decoder image-code position ids (ofa.md §8.2): ``[0] + [1 + s*r + c for r, c < code/8] + [1024] * pad``."""
    side = code_image_size // 8
    r, c = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    ids = (1 + bucket_size * r + c).flatten()
    pad = length - 1 - ids.numel()
    return torch.cat([torch.zeros(1, dtype=torch.long), ids, torch.full((max(pad, 0),), 1024, dtype=torch.long)])


def grid_ids(h: int, w: int, stride: int, device=None) -> torch.Tensor:
    """Row-major ids ``1 + stride*r + c`` of an h x w grid (image positions use stride = bucket size 42)."""
    r = torch.arange(h, device=device)[:, None]
    c = torch.arange(w, device=device)[None, :]
    return (1 + stride * r + c).flatten()


def resize_grid(x: torch.Tensor, side: int, h: int, w: int) -> torch.Tensor:
    """Bilinearly resize the trailing ``side*side`` (row-major grid) axis of ``x`` to ``h*w``.

    Matches ``F.interpolate(mode="bilinear", align_corners=False)`` without antialias, as the original; a resize to
    the same size is an exact identity.
    """
    if not tracing() and (h, w) == (side, side):
        return x  # the interpolation below would be an exact identity (tested); skip the work
    return interpolate_grid(x, side, h, w)


def interpolate_grid(x: torch.Tensor, side: int, h: int, w: int) -> torch.Tensor:
    """:func:`resize_grid` without the same-size shortcut (bilinear, align_corners=False; half types computed in
    float32)."""
    lead = x.shape[:-1]
    y = x.reshape(-1, 1, side, side)
    if y.dtype in (torch.float16, torch.bfloat16):
        y = y.float()
    y = F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False).to(x.dtype)
    return y.reshape(*lead, h * w)


def resize_bias_2d(bias: torch.Tensor, side: int, h: int, w: int) -> torch.Tensor:
    """Resize a ``(..., side^2, side^2)`` [query, key] bias to ``(..., h*w, h*w)``: keys first, then queries."""
    if (h, w) == (side, side):
        return bias
    bias = resize_grid(bias, side, h, w)  # key axis
    bias = resize_grid(bias.transpose(-1, -2), side, h, w)  # query axis
    return bias.transpose(-1, -2)


def resize_bias_2d_keep_first(bias: torch.Tensor, side: int, h: int, w: int) -> torch.Tensor:
    """Like :func:`resize_bias_2d` for a ``(..., 1 + side^2, 1 + side^2)`` bias whose index 0 (BOS) is kept as is.

    The original resizes queries first, then keys (ifseg.md §8.3).
    """
    if (h, w) == (side, side):
        return bias

    def _resize_last(b):  # resize cells of the last axis, keep entry 0
        return torch.cat([b[..., :1], resize_grid(b[..., 1:], side, h, w)], dim=-1)

    bias = _resize_last(bias.transpose(-1, -2)).transpose(-1, -2)  # queries
    return _resize_last(bias)  # keys
