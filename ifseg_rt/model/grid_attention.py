"""IFSeg's real-image attention without S x S position tables (ifseg.md §7-§8, ofa.md §6-§7).

Every attention logit of the real-image forward carries position terms that the original builds as ``H x S x S``
tensors per layer (and an earlier version of this package cached per token grid). Here nothing of that size exists:

* **absolute bias** ``scale * (P_q W_q)(P_k W_k)^T`` has rank ``head_dim``: it is folded into the logits by
  concatenating ``[q, pos_q]`` and ``[k, pos_k]`` along the head dimension (the per-grid ``pos_q``/``pos_k`` are
  ``H x S x head_dim``: O(S));
* **image relative bias** (encoder: every layer; decoder self-attention: every layer) is the G x G reference bias
  resized bilinearly to the h x w grid. With one grid axis equal to G (the paper's policy: the short side is 32 = G
  tokens) call that axis *outer* and the other *inner*: then ``bias[q, k] = Z[q_inner, q_outer - k_outer, k_inner]``
  where ``Z`` (``H x w_i x (2G-1) x w_i`` per layer) is the Toeplitz matrix of each outer offset resized along the
  inner axis. With queries ordered inner-major (outer index reversed) and keys row-major, the bias of a block of
  queries is *one* gather of ``Z`` (a strided view in eager PyTorch, an ONNX ``Gather``). When neither axis is G
  (elongated images, other reference sizes) the outer axis takes four bilinear taps instead;
* **decoder causal mask** (row-major cell order) depends only on ``(q_inner, outer offset, k_inner)`` and is folded
  into ``Z``; the decoder's BOS query sees only the BOS key, so its output is that key's value, exactly.

Queries are processed in blocks, so the largest tensor of a layer is ``B x H x block x S`` (eager: at most
:data:`BLOCK_ELEMENTS` elements; exported graphs: up to :data:`EXPORT_BLOCKS` blocks per image, as many as the image
policy's largest input needs, :func:`export_query_blocks`).

The same functions run eagerly (torch backend, ``Segmenter.from_model``, GPU) and under the ONNX tracer
(:mod:`ifseg_rt.export.onnx_model`): shape-dependent values are tensor arithmetic, the one branch (outer axis resized
or not) is an ONNX ``If``.
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

EXPORT_BLOCKS = 8  # at most this many query blocks of the image per attention layer in an exported graph ...
EXPORT_MIN_QUERIES = 128  # ... of at least this many queries (fewer, larger blocks for small grids) ...
EXPORT_BLOCK_ELEMENTS = 1 << 25  # ... and as few as keep a block's scores under this for the policy's largest input
BLOCK_ELEMENTS = 1 << 22  # eager: attention-score elements per query block (16 MB in float32)
PADDING_BIAS = -1e9  # bias of the padding keys: finite (matmuls weight it by zeros), and exp(-1e9) = 0 in fp32

IntLike = Union[int, Tensor]


_query_blocks = [EXPORT_BLOCKS]  # the block count traced graphs use (export_query_blocks sets it per export)


def export_query_blocks(heads: int, max_cells: int, prompt_tokens: int) -> int:
    """Query blocks per attention for an exported graph whose inputs have at most ``max_cells`` cells: as few as
    keep one block's scores (batch 1) under :data:`EXPORT_BLOCK_ELEMENTS`, at most :data:`EXPORT_BLOCKS`. Each block
    costs fixed per-operator time, which dominates small models (the nano model at 256 px: one block)."""
    scores = heads * max_cells * (max_cells + prompt_tokens + max_cells ** 0.5)
    return max(1, min(EXPORT_BLOCKS, -(-int(scores) // EXPORT_BLOCK_ELEMENTS)))


class query_blocks:
    """Context manager: trace graphs with ``n`` query blocks per attention (:func:`export_query_blocks`)."""

    def __init__(self, n: int):
        if not 1 <= int(n) <= EXPORT_BLOCKS:
            raise ValueError(f"query blocks must be in [1, {EXPORT_BLOCKS}], got {n}")
        self.n = int(n)

    def __enter__(self):
        _query_blocks.append(self.n)
        return self

    def __exit__(self, *exc):
        _query_blocks.pop()


def tracing() -> bool:
    """Whether the current code runs under the ONNX/TorchScript tracer (then no Python branches on shapes)."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


# --- bilinear weights, as PyTorch computes them -------------------------------------------------------------------
def bilinear_taps(n_out: IntLike, n_in: int, dtype: torch.dtype, device=None):
    """Source indices and weights of a 1-D bilinear resize ``n_in -> n_out`` (``align_corners=False``, no
    antialias), computed as ``F.interpolate`` does: ``src = max(in/out * (dst + 0.5) - 0.5, 0)``.

    Returns ``(i0, i1, w0, w1)``, each of length ``n_out``.
    """
    dst = torch.arange(n_out, device=device).to(dtype)
    n_out_f = torch.as_tensor(n_out, device=device).to(dtype)
    scale = torch.full((), float(n_in), dtype=dtype, device=device) / n_out_f
    real = (scale * (dst + 0.5) - 0.5).clamp(min=0)
    i0 = real.floor().to(torch.long).clamp(max=n_in - 1)
    w1 = real - i0.to(dtype)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    return i0, i1, 1 - w1, w1


def bilinear_matrix(n_out: IntLike, n_in: int, dtype: torch.dtype, device=None) -> Tensor:
    """``n_out x n_in`` matrix of :func:`bilinear_taps` (a resize is ``M @ x`` along that axis)."""
    i0, i1, w0, w1 = bilinear_taps(n_out, n_in, dtype, device)
    cols = torch.arange(n_in, device=device)
    return (w0[:, None] * (cols[None, :] == i0[:, None]).to(dtype)
            + w1[:, None] * (cols[None, :] == i1[:, None]).to(dtype))


# --- per-grid plan ------------------------------------------------------------------------------------------------
class GridPlan(NamedTuple):
    """Token orders and index tables of one h x w grid (a function of the shape and G only; O(N + w_i^2 h_o)).

    Processing grid: ``(h_o, w_i)`` = ``(h, w)``, or ``(w, h)`` when only the columns span G (``transposed``).
    Key order: processing row-major ``k = o * w_i + i``. Query order: ``p = i * h_o + (h_o - 1 - o)``.
    """

    transposed: Tensor  # bool, 0-dim
    fast: Tensor  # bool, 0-dim: h_o == G (the outer axis is not resized: one gather per block)
    key_index: Tensor  # N: the original (row-major) cell of each key-order token
    cell_key: Tensor  # N: the key-order position of each original cell (inverse of key_index)
    query_key: Tensor  # N: the key-order position of each query-order token
    key_query: Tensor  # N: the query-order position of each key-order token (inverse of query_key)
    hankel: Tensor  # h_o x h_o: q_o' + k_o + G - h_o, the fast path's gather index into Z's offset axis
    tap_index: Tensor  # 4 x h_o x h_o: general path, gather indices into Z's offset axis (query tap x key tap)
    tap_weight: Tensor  # 4 x h_o x h_o: their bilinear weights
    causal: Tensor  # w_i x (2 h_o - 1) x w_i bool: key after query in row-major order, by (q_i, q_o' + k_o, k_i)
    inner: Tensor  # w_i x (2G - 1) x w_i: P[q_i, j, k_i] = sum of m[q_i, a] m[k_i, b] over a - b + G - 1 = j, m the
    # inner axis' bilinear matrix, so that Z = T @ P for a layer's table T (outer offset x inner offset)

    @property
    def ho(self) -> int:
        return self.hankel.shape[0]

    @property
    def wi(self) -> int:
        return self.inner.shape[0]

    @property
    def num_cells(self) -> int:
        return self.key_index.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self)


def _floordiv(a, b):
    return torch.div(a, b, rounding_mode="floor")


def make_plan(h: IntLike, w: IntLike, G: int, *, dtype: torch.dtype = torch.float32, device=None) -> GridPlan:
    """The :class:`GridPlan` of an h x w grid for reference side ``G``; ``h``/``w`` may be traced 0-dim tensors."""
    h = h if isinstance(h, Tensor) else torch.tensor(h, device=device)
    w = w if isinstance(w, Tensor) else torch.tensor(w, device=device)
    transposed = (h != G) & (w == G)
    ho = torch.where(transposed, w, h)
    wi = torch.where(transposed, h, w)
    n = h * w
    k = torch.arange(n, device=device)
    o, i = _floordiv(k, wi), k % wi
    key_index = torch.where(transposed, i * w + o, o * w + i)
    r_c, c_c = _floordiv(k, w), k % w  # original row and column of cell k
    cell_key = torch.where(transposed, c_c * h + r_c, k)
    qi, qo = _floordiv(k, ho), ho - 1 - k % ho
    query_key = qo * wi + qi
    key_query = i * ho + (ho - 1 - o)
    r = torch.arange(ho, device=device)
    hankel = r[:, None] + r[None, :] + (G - ho)
    i0, i1, w0, w1 = bilinear_taps(ho, G, dtype, device)
    src, wt = torch.stack([i0, i1]), torch.stack([w0, w1])  # 2 x h_o: taps of the (unreversed) outer index
    qsrc, qwt = src.flip(1), wt.flip(1)  # the query order runs the outer index backwards
    tap_index = torch.stack([src[b][None, :] - qsrc[a][:, None] + G - 1 for a in range(2) for b in range(2)])
    tap_weight = torch.stack([qwt[a][:, None] * wt[b][None, :] for a in range(2) for b in range(2)])
    # causal mask of the decoder by (q_i, x = q_o' + k_o, k_i); the outer offset is q_o - k_o = h_o - 1 - x
    ii = torch.arange(wi, device=device)
    d = (ho - 1 - torch.arange(2 * ho - 1, device=device))[None, :, None]
    later_inner = (ii[None, None, :] > ii[:, None, None])
    same_inner = (ii[None, None, :] == ii[:, None, None])
    rows = (d < 0) | ((d == 0) & later_inner)  # outer = rows: a later row, or the same row and a later column
    cols = later_inner | (same_inner & (d < 0))  # outer = columns: a later row (inner), then a later column
    causal = (transposed & cols) | (~transposed & rows)  # (onnxruntime has no boolean Where)
    fast = ho == G
    m = bilinear_matrix(wi, G, dtype, device)  # w_i x G
    b = torch.arange(G, device=device)
    shifted = F.pad(m, (G - 1, G - 1))[:, b[None, :] + torch.arange(2 * G - 1, device=device)[:, None]]
    inner = (shifted.reshape(-1, G) @ m.t()).reshape(-1, 2 * G - 1, m.shape[0])  # m[q_i, b + j - G + 1] m[k_i, b]
    return GridPlan(transposed=transposed, fast=fast, key_index=key_index, cell_key=cell_key, query_key=query_key,
                    key_query=key_query, hankel=hankel, tap_index=tap_index, tap_weight=tap_weight, causal=causal,
                    inner=inner)


# --- per-layer tables -----------------------------------------------------------------------------------------------
def rel_table_2d(weight: Tensor, bucket_size: int, G: int) -> Tensor:
    """A layer's relative table (``rows x H``, buckets ``(dr + s - 1)(2s - 1) + (dc + s - 1)``, ofa.md §6.3) at the
    offsets of a G x G grid -> ``2 x H x (2G-1) x (2G-1)``: ``[0]`` indexed (outer = row offset, inner = column
    offset), ``[1]`` transposed (outer = column offset); the outer axis reversed (index ``G - 1 - offset``)."""
    s = bucket_size
    d = torch.arange(-(G - 1), G, device=weight.device) + s - 1
    t = weight[d[:, None] * (2 * s - 1) + d[None, :]].permute(2, 0, 1)  # H x dr x dc
    return torch.stack([t.flip(1), t.transpose(1, 2).flip(1)])


def extra_rows(count: IntLike, wi: IntLike) -> IntLike:
    """Key rows of ``w_i`` slots that hold ``count`` keys outside the grid (prompt tokens, the decoder's BOS)."""
    return _floordiv(count + wi - 1, wi) if isinstance(wi, Tensor) or isinstance(count, Tensor) else -(-count // wi)


def inner_table(rel2d: Tensor, plan: GridPlan, layout: KeyLayout, G: int, extra: Tensor, *,
                causal: bool = False) -> Tensor:
    """``Z`` of one layer: ``H x w_i x (2G - 1 + r) x w_i`` (see the module docstring), float32 or float64.

    ``rel2d`` is the layer's :func:`rel_table_2d`. The keys outside the grid follow the grid's keys as ``r`` extra
    key rows of ``w_i`` slots: ``extra`` (``H x E``) is their bias (the same for every query), the slots beyond ``E``
    are padding (:data:`PADDING_BIAS`). With ``causal`` (decoder) and the fast path, keys after the query are ``-inf`` here
    already; the general path applies the mask after its gathers.
    """
    t = torch.where(plan.transposed, rel2d[1], rel2d[0])
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    # z[h, q_i, x, k_i] = sum_j t[h, x, j] P[q_i, j, k_i]: the Toeplitz matrix of each outer offset x, resized
    # bilinearly along both inner axes
    z = t[:, None] @ plan.inner.to(t.dtype)[None]  # H x w_i(query) x (2G-1) x w_i(key)
    if causal and not tracing() and bool(plan.fast):
        z = z.masked_fill(plan.causal, float("-inf"))
    H, wi = z.shape[0], z.shape[1]
    E, r = extra.shape[-1], layout.r
    pad = torch.full((H, 1), PADDING_BIAS, dtype=t.dtype, device=t.device)
    slots = torch.arange(r * wi, device=t.device).clamp(max=E)
    ext = torch.cat([extra.to(t.dtype), pad], dim=1).index_select(1, slots)  # H x r*w_i
    ext = ext.reshape(H, 1, r, wi).expand(H, wi, r, wi)
    return torch.cat([z, ext], dim=2).contiguous()


@torch.jit.script
def _traced_rel_bias(z: Tensor, fast: Tensor, hankel: Tensor, toep_index: Tensor, q_taps: Tensor, k_taps: Tensor,
                     causal: Tensor, use_causal: bool) -> Tensor:
    """Export form of the relative bias (an ONNX ``If`` on ``fast``): ``z`` ``H x c x (2G-1+r) x w_i`` ->
    ``H x c x h_o x (h_o+r) x w_i``. The fast branch is one ``Gather`` writing the ``If``'s output. The general
    branch gathers the G x G source Toeplitz block (plus the ``r`` extra key rows) and resizes its outer axes with
    two matmuls: the queries' bilinear matrix (``h_o x G``, outer index reversed), then the keys' (``(h_o+r) x
    (G+r)``, the identity on the extra rows)."""
    if bool(fast):
        if use_causal:
            z = z.masked_fill(causal, float("-inf"))
        return z[:, :, hankel]
    H, c, wi = z.shape[0], z.shape[1], z.shape[3]
    G, Gr = toep_index.shape[0], toep_index.shape[1]
    t2 = z[:, :, toep_index].reshape(H, c, G, Gr * wi)  # [a, b, k_i] = Z[q_i, b - a + G - 1, k_i]
    x = (q_taps @ t2).reshape(H, c, q_taps.shape[0], Gr, wi)  # resized over a (the query's outer source index)
    out = k_taps @ x  # resized over b (the key's): H x c x h_o x (h_o + r) x w_i
    if use_causal:
        ho, kr = hankel.shape[0], hankel.shape[1]
        m = causal[:, hankel[:, :ho] - hankel[0, 0]]  # by q_o' + k_o
        m = torch.cat([m, torch.zeros(m.shape[0], ho, kr - ho, m.shape[3], dtype=m.dtype, device=m.device)], dim=2)
        out = out.masked_fill(m, float("-inf"))
    return out


class Block(NamedTuple):
    """One query block of the image: the queries with inner index ``lo <= q_i < hi`` (computed once per forward)."""

    lo: IntLike
    hi: IntLike
    queries: Tensor  # (hi - lo) * h_o key-order positions of the block's queries, in query order
    inner: Optional[Tensor]  # traced only: arange(lo, hi), the block's rows of Z
    causal: Optional[Tensor]  # traced only: (hi - lo) x (2 h_o - 1 + r) x w_i rows of the causal mask
    bias_shape: Optional[Tensor]  # traced only: [H, (hi - lo) h_o, keys], the block's relative bias as its scores


class KeyLayout(NamedTuple):
    """How one attention kind lays out its keys for a grid (computed once per forward): the grid's keys in key
    order, then ``extra`` keys outside the grid (the prompt; the decoder's BOS) as ``r`` rows of ``w_i`` slots (the
    slots beyond ``extra`` are padding keys), and the query blocks of the image."""

    extra: IntLike  # keys outside the grid
    r: IntLike  # extra key rows
    keys: IntLike  # N + r * w_i
    blocks: List[Block]
    hankel: Optional[Tensor]  # traced only: h_o x (h_o + r) fast-path gather index (extended)
    toep_index: Optional[Tensor]  # traced only: G x (G + r) general path: Z's offset slot of (source a, source b)
    q_taps: Optional[Tensor]  # traced only: h_o x G bilinear matrix of the queries' outer index (reversed)
    k_taps: Optional[Tensor]  # traced only: (h_o + r) x (G + r) the keys' (identity on the extra rows)


def key_layout(plan: GridPlan, extra: IntLike, G: int, *, heads: int, batch: IntLike) -> KeyLayout:
    """The :class:`KeyLayout` of ``plan`` with ``extra`` keys outside the grid. Under the tracer everything a
    block needs is computed here, once per graph, not once per layer."""
    ho, wi = plan.ho, plan.wi
    r = extra_rows(extra, wi)
    keys = plan.num_cells + r * wi
    ranges = _blocks(wi, heads * ho * keys, batch, ho)
    if not tracing():
        blocks = [Block(lo, hi, plan.query_key[lo * ho:hi * ho], None, None, None) for lo, hi in ranges]
        return KeyLayout(extra, r, keys, blocks, None, None, None, None)
    dev = plan.hankel.device
    rows = (2 * G - 1 + torch.arange(r, device=dev))[None, :].expand(ho, r)  # Z's extra offset slots
    a = torch.arange(G, device=dev)
    toep_index = torch.cat([a[None, :] - a[:, None] + G - 1, (2 * G - 1 + torch.arange(r, device=dev))[None, :]
                            .expand(G, r)], dim=1)
    m = bilinear_matrix(ho, G, plan.tap_weight.dtype, dev)  # h_o x G
    k_taps = torch.cat([torch.cat([m, torch.zeros(ho, r, dtype=m.dtype, device=dev)], dim=1),
                        torch.cat([torch.zeros(r, G, dtype=m.dtype, device=dev),
                                   torch.eye(r, dtype=m.dtype, device=dev)], dim=1)], dim=0)
    causal = torch.cat([plan.causal, torch.zeros_like(plan.causal[:, :1]).expand(-1, r, -1)], dim=1)
    h, o, k = (torch.as_tensor(v).reshape(1) for v in (heads, ho, keys))
    blocks = []
    for lo, hi in ranges:
        c = (hi - lo).reshape(1)
        blocks.append(Block(lo, hi, plan.query_key[lo * ho:hi * ho], torch.arange(lo, hi, device=dev), causal[lo:hi],
                            torch.cat([h, c * o, k])))
    return KeyLayout(extra, r, keys, blocks, torch.cat([plan.hankel, rows], dim=1), toep_index, m.flip(0), k_taps)


def add_rel_bias(s: Tensor, z: Tensor, plan: GridPlan, layout: KeyLayout, block: Block, *,
                 causal: bool = False) -> Tensor:
    """``s`` (``B x H x c*h_o x keys`` scores of the queries of ``block``) plus their relative bias against every
    key (:class:`KeyLayout`). Eager: added in place (the fast path reads a strided view of ``z``); traced: one gather
    (or four taps) per block, reshaped to the scores' ``H x c*h_o x keys`` (so that the graph reads matmul, add,
    softmax, matmul: the pattern engines fuse into one attention kernel)."""
    if tracing():
        from torch.onnx.operators import reshape_from_tensor_shape as reshape

        rel = _traced_rel_bias(z.index_select(1, block.inner), plan.fast, layout.hankel, layout.toep_index,
                               layout.q_taps, layout.k_taps, block.causal, causal)
        return s + reshape(rel, block.bias_shape)
    lo, hi = block.lo, block.hi
    zb = z[:, lo:hi]
    H, c, _, wi = zb.shape
    ho, n, B, r = plan.ho, plan.num_cells, s.shape[0], layout.r
    G = (z.shape[2] - r + 1) // 2
    grid = s[..., :n].view(B, H, c, ho, ho, wi)
    if bool(plan.fast):
        st = zb.stride()
        grid.add_(zb.as_strided((H, c, ho, ho, wi), (st[0], st[1], st[2], st[2], st[3]),
                                zb.storage_offset() + (G - ho) * st[2]))
    else:
        for t in range(4):
            grid.add_(zb[:, :, plan.tap_index[t]] * plan.tap_weight[t][:, :, None].to(zb.dtype))
        if causal:
            x = plan.hankel - plan.hankel[0, 0]  # q_o' + k_o
            grid.masked_fill_(plan.causal[lo:hi][:, x], float("-inf"))
    s[..., n:].view(B, H, c, ho, r, wi).add_(zb[:, :, None, 2 * G - 1:])
    return s


# --- attention ----------------------------------------------------------------------------------------------------
def _split(x: Tensor, heads: int) -> Tensor:
    *lead, t, d = x.shape
    return x.reshape(*lead, t, heads, d // heads).transpose(-2, -3)


def _merge(o: Tensor) -> Tensor:
    o = o.transpose(1, 2)
    return o.reshape(o.shape[0], o.shape[1], -1)


def _softmax_av(scores: Tensor, v: Tensor, attn) -> Tensor:
    p = torch.softmax(scores, dim=-1).to(v.dtype)
    if attn.training and attn.dropout > 0:
        p = F.dropout(p, attn.dropout, True)
    return p @ v


def _scores(q: Tensor, k: Tensor) -> Tensor:
    s = q @ k.transpose(-1, -2)
    return s.float() if s.dtype in (torch.float16, torch.bfloat16) else s


def _blocks(total: IntLike, per_unit: int, batch: int, queries_per_unit: IntLike = 1):
    """(lo, hi) ranges covering ``range(total)`` units of ``queries_per_unit`` queries each. Under the tracer the
    :class:`query_blocks` count of tensor-valued ranges, of at least :data:`EXPORT_MIN_QUERIES` queries (a small
    grid fills only the first blocks; the others are empty); eager, ranges of at most :data:`BLOCK_ELEMENTS` scores."""
    if tracing():
        nb = _query_blocks[-1]
        total = total if isinstance(total, Tensor) else torch.tensor(total)
        least = _floordiv(EXPORT_MIN_QUERIES + queries_per_unit - 1, queries_per_unit)
        size = torch.maximum(_floordiv(total + nb - 1, nb), least)
        return [(torch.minimum(size * j, total), torch.minimum(size * (j + 1), total)) for j in range(nb)]
    total = int(total)
    step = max(1, BLOCK_ELEMENTS // max(1, per_unit * batch))
    return [(lo, min(lo + step, total)) for lo in range(0, total, step)]


def _heads_qkv(attn, xq: Tensor, xkv: Tensor):
    H = attn.heads
    q = _split(attn.q_proj(xq) * attn.scaling, H)
    k = _split(attn.k_proj(xkv), H)
    v = _split(attn.v_proj(xkv), H)
    return q, k, v


def _fold(x: Tensor, pos: Tensor) -> Tensor:
    """``[x, pos]`` along the head dimension (pos ``H x T x dh`` broadcast over the batch)."""
    return torch.cat([x, pos.to(x.dtype).expand(x.shape[0], -1, -1, -1)], dim=-1)


def _finish(attn, o: Tensor) -> Tensor:
    o = o * attn.c_attn.to(o.dtype)[:, None, None]
    return attn.out_proj(_merge(o))


def _pad_tokens(x: Tensor, count: IntLike) -> Tensor:
    """Append ``count`` zero rows along the token axis of ``B x T x d`` (the padding keys' inputs)."""
    pad = torch.zeros(1, 1, 1, dtype=x.dtype, device=x.device).expand(x.shape[0], count, x.shape[2])
    return torch.cat([x, pad], dim=1)


def pad_positions(pos: Tensor, count: IntLike) -> Tensor:
    """Append ``count`` zero rows to ``H x T x dh`` positions (the padding keys')."""
    pad = torch.zeros(1, 1, 1, dtype=pos.dtype, device=pos.device).expand(pos.shape[0], count, pos.shape[2])
    return torch.cat([pos, pad], dim=1)


def encoder_self_attention(attn, x: Tensor, plan: GridPlan, layout: KeyLayout, pos_q: Tensor, pos_k: Tensor,
                           z: Tensor, text_rel: Tensor) -> Tensor:
    """One encoder self-attention on ``x`` (``B x S x d``: image tokens in key order, then the prompt).

    ``layout``: :func:`key_layout` with the prompt as extra keys; ``pos_q``: ``H x S x dh`` absolute positions (image
    rows in key order, then the prompt); ``pos_k``: the same for the keys, with the layout's padding keys after them
    (zeros); ``z`` the layer's :func:`inner_table` (extra keys' bias 0, padding -inf); ``text_rel`` its
    ``H x L x L`` token relative bias.
    """
    n, L = plan.num_cells, layout.extra
    pad = layout.keys - n - L
    q, k, v = _heads_qkv(attn, x, _pad_tokens(x, pad))  # padding keys: finite, and -inf in every bias
    qf, kf = _fold(q, pos_q), _fold(k, pos_k)
    outs = [_softmax_av(add_rel_bias(_scores(qf.index_select(2, b.queries), kf), z, plan, layout, b), v, attn)
            for b in layout.blocks]
    st = _scores(qf[:, :, n:], kf)  # the prompt's queries: token relative bias on the prompt's keys
    if tracing():
        st = st + F.pad(F.pad(text_rel, (n, 0)), (0, pad), value=PADDING_BIAS)
    else:
        st[..., n:n + L].add_(text_rel)
        st[..., n + L:] = PADDING_BIAS
    outs.append(_softmax_av(st, v, attn))
    order = torch.cat([plan.key_query, torch.arange(n, n + L, device=plan.key_query.device)])  # image back to key order
    return _finish(attn, torch.cat(outs, dim=2).index_select(2, order))


def decoder_self_attention(attn, y: Tensor, plan: GridPlan, layout: KeyLayout, pos_q: Tensor, pos_k: Tensor,
                           z: Tensor) -> Tensor:
    """One causal decoder self-attention on ``y`` (``B x (1 + N) x d``: BOS, then the cells in key order).

    ``layout``: :func:`key_layout` with BOS as the one extra key; ``pos_q``: ``H x N x dh`` (the cells in key
    order); ``pos_k``: (cells in key order, BOS, the layout's padding keys); ``z`` the layer's causal
    :func:`inner_table`. The BOS query sees only the BOS key: its output is the BOS value.
    """
    n = plan.num_cells
    pad = layout.keys - n - 1
    keys = _pad_tokens(torch.cat([y[:, 1:], y[:, :1]], dim=1), pad)  # cells, BOS, padding
    q, k, v = _heads_qkv(attn, y[:, 1:], keys)
    qc, kf = _fold(q, pos_q), _fold(k, pos_k)
    outs = [_softmax_av(add_rel_bias(_scores(qc.index_select(2, b.queries), kf), z, plan, layout, b, causal=True),
                        v, attn) for b in layout.blocks]
    outs.append(v[:, :, n:n + 1])  # the BOS query's output: the BOS value
    order = torch.cat([plan.key_query.new_full((1,), n), plan.key_query])  # BOS, then the cells in key order
    return _finish(attn, torch.cat(outs, dim=2).index_select(2, order))


def cross_blocks(tokens: IntLike, keys: IntLike, *, heads: int, batch: IntLike) -> List[Tuple]:
    """Query blocks of the cross-attention (``tokens`` decoder tokens against ``keys``), once per forward:
    ``(lo, hi, index)``, the index (``arange(lo, hi)``) only under the tracer."""
    ranges = _blocks(tokens, heads * keys, batch)
    if not tracing():
        return [(lo, hi, None) for lo, hi in ranges]
    return [(lo, hi, torch.arange(lo, hi)) for lo, hi in ranges]


def cross_attention(attn, y: Tensor, enc_out: Tensor, pos_q: Tensor, pos_k: Tensor, blocks: List[Tuple]) -> Tensor:
    """Decoder cross-attention (absolute bias only, folded): ``y`` ``B x T x d`` attends to ``enc_out``, in the
    query ``blocks`` of :func:`cross_blocks`."""
    q, k, v = _heads_qkv(attn, y, enc_out)
    qf, kf = _fold(q, pos_q), _fold(k, pos_k)
    outs = [_softmax_av(_scores(qf[:, :, lo:hi] if idx is None else qf.index_select(2, idx), kf), v, attn)
            for lo, hi, idx in blocks]
    return _finish(attn, torch.cat(outs, dim=2))


def head_positions(linear, pos: Tensor, heads: int, scale: Optional[float] = None) -> Tensor:
    """``H x T x dh`` projected positions (``scale`` on the query side, as the original scales its bias)."""
    p = _split(linear(pos), heads)
    return p * scale if scale is not None else p


def reorder_cells(x: Tensor, index: Tensor, *, first: int = 0) -> Tensor:
    """Reorder the cell rows of ``x`` (``... x T x d``, cells at ``first..first+N``) by ``index``."""
    cells = x[..., first:first + index.shape[0], :].index_select(-2, index)
    return torch.cat([x[..., :first, :], cells, x[..., first + index.shape[0]:, :]], dim=-2)


__all__ = ["EXPORT_BLOCKS", "EXPORT_MIN_QUERIES", "EXPORT_BLOCK_ELEMENTS", "BLOCK_ELEMENTS", "PADDING_BIAS",
           "export_query_blocks", "query_blocks", "GridPlan", "make_plan", "bilinear_taps", "bilinear_matrix",
           "rel_table_2d", "inner_table", "add_rel_bias", "extra_rows", "Block", "KeyLayout", "key_layout",
           "encoder_self_attention", "decoder_self_attention", "cross_attention", "cross_blocks", "head_positions", "reorder_cells",
           "pad_positions", "tracing"]
