"""The deploy-time I/O contract of an IFSeg model, as a wrapper around a trained :class:`SegOFA` (SAM's
``SamOnnxModel`` pattern). It should not be called directly: use :func:`ifseg_rt.export.export`.

The graph runs the model's own real-image forward (:meth:`SegOFA.transformer`, attention in query blocks with the
position terms computed per block, :mod:`ifseg_rt.model.grid_attention`), traced with every shape-dependent value as
tensor arithmetic:

* the absolute image positions evaluate both IFSeg rules and select one in-graph (``N > G^2``), every resize is an
  unconditional bilinear one (an exact identity at G x G);
* token orders, gather indices and bilinear taps of the grid come from ``arange`` arithmetic on the feature map's
  shape; the one branch (the grid's outer axis resized or not) is an ONNX ``If``;
* each attention runs ``query_blocks`` query blocks of the image (as many as the image policy's largest input needs,
  :func:`~ifseg_rt.model.grid_attention.export_query_blocks`), so no tensor is ``S x S`` for all heads.

The prompt (text embedding, token relative biases) and the per-layer relative tables are constants: the runtime needs
no tokenizer. The split graph moves the per-grid absolute positions (``H x S x head_dim`` each, O(S)) into
``tables.onnx`` so that the runtime computes them once per grid.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..model.grid_attention import EXPORT_BLOCKS, make_plan, query_blocks
from ..model.ofa import SegConstants, SegOFA, SegTables


class IFSegOnnxModel(nn.Module):
    """``image`` (Bx3xHxW float32, normalised) -> ``logits`` (BxNxM), ``features`` (BxNxC).

    Arguments:
      model (SegOFA): a trained model with its prompt set (``set_categories``); used read-only.
      normalize_features (bool): L2-normalise ``features`` in the graph (kNN is invariant to it; keeps the
        reduction in fp32 on engines that honour precision constraints).
      static_grid (tuple(int, int) or None): compute the grid's position tables once here and store them.
      query_blocks (int): query blocks of the image per attention in the traced graph
    """

    def __init__(self, model: SegOFA, *, normalize_features: bool = False,
                 static_grid: Optional[Tuple[int, int]] = None, query_blocks: int = EXPORT_BLOCKS):
        super().__init__()
        if not isinstance(model, SegOFA):
            raise TypeError(f"expected a SegOFA model, got {type(model).__name__}")
        if not model.has_prompt:
            raise ValueError("the model has no prompt: call set_categories() (or load a run directory) first")
        self.model = model.eval()
        self.normalize_features = normalize_features
        self.static_grid = static_grid
        self.query_blocks = int(query_blocks)
        self.G = model.config.seg_grid
        with torch.no_grad():
            const = model.seg_constants()
            for name in ("text", "enc_rel", "dec_rel", "text_rel", "dec_bos"):
                self.register_buffer(f"c_{name}", getattr(const, name).detach().clone(), persistent=False)
            if static_grid is not None:
                h, w = (int(v) for v in static_grid)
                model.encoder.check_grid(h, w)
                for i, t in enumerate(model.seg_tables(h, w, constants=const).positions()):
                    self.register_buffer(f"s_pos{i}", t.detach().clone(), persistent=False)

    def constants(self) -> SegConstants:
        return SegConstants(text=self.c_text, enc_rel=self.c_enc_rel, dec_rel=self.c_dec_rel,
                            text_rel=self.c_text_rel, dec_bos=self.c_dec_bos)

    def tables(self, h, w) -> Tuple[Tensor, ...]:
        """The grid's absolute positions per attention kind (:meth:`SegTables.positions`, each ``H x T x dh``):
        pixel-independent, O(S); callers may cache them per grid."""
        if self.static_grid is not None:
            return tuple(getattr(self, f"s_pos{i}") for i in range(6))
        return self.model.seg_tables(h, w, constants=self.constants()).positions()

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

    def transformer(self, f: Tensor, *positions: Tensor) -> Tuple[Tensor, Tensor]:
        """ResNet feature map ``f`` (BxCxhxw) + the grid's :meth:`tables` -> (logits, features)."""
        h, w = f.shape[2], f.shape[3]
        plan = make_plan(h, w, self.G, device=f.device)
        tables = SegTables((h, w), plan, *positions, constants=self.constants())
        features = f.flatten(2).transpose(1, 2)
        with query_blocks(self.query_blocks):
            logits = self.model.transformer(features, tables)
        if self.normalize_features:
            features = F.normalize(features.float(), dim=-1, eps=1e-12)
        return logits, features


class IFSegTablesGraph(nn.Module):
    """The split graph's first half: ``grid`` (an h x w tensor whose values are unused: only its shape is read)
    -> the grid's absolute positions (:data:`~ifseg_rt.runtime.model_dir.TABLE_NAMES`). Run once per grid and
    cached by the runtime (``tables.onnx``)."""

    def __init__(self, core: IFSegOnnxModel):
        super().__init__()
        self.core = core

    def forward(self, grid: Tensor) -> Tuple[Tensor, ...]:
        return self.core.tables(grid.shape[0], grid.shape[1])


class IFSegBodyGraph(nn.Module):
    """The split graph's second half: ``image`` + the grid's tables -> (``logits``, ``features``) (``body.onnx``)."""

    def __init__(self, core: IFSegOnnxModel):
        super().__init__()
        self.core = core

    def forward(self, image: Tensor, *positions: Tensor) -> Tuple[Tensor, Tensor]:
        return self.core.transformer(self.core.model.encoder.embed_images(image), *positions)
