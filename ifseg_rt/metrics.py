"""Semantic-segmentation metrics exactly as IFSeg reports them (ifseg.md §13), numpy only (no torch).

Label maps are PNGs. With the default ``label_offset=1`` ("ADE-style") a stored value 0 (and 255) means *ignore*
and ``v >= 1`` is class ``v - 1``; with ``label_offset=0`` values are class ids already and only 255 is ignored.
Internally ignore pixels carry the index M (the "unknown" slot) and are removed before counting.

Accumulated over the whole evaluation set, per class c over valid pixels::

    I_c = #(pred = c and gt = c),  P_c = #(pred = c),  G_c = #(gt = c),  U_c = P_c + G_c - I_c
    IoU_c = I_c / U_c,  mIoU = mean of IoU_c over the classes with U_c > 0 (NaN-skipping), x 100
    aAcc = sum I_c / sum P_c,  mAcc = NaN-skipping mean of I_c / G_c
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

RAW_IGNORE = 255  # stored label value that is always ignored
LABEL_OFFSETS = (0, 1)
# PNG text chunk of the label maps ifseg_rt writes (segment, Ray, save_label_png): their values are class ids, so
# reading them back needs label_offset 0; load_label(label_offset=None) reads it
LABEL_PNG_KEY, CLASS_IDS = "ifseg_rt.labels", "class ids"


def label_offset_of(path: Union[str, Path], default: int = 1) -> int:
    """0 for a label map ifseg_rt wrote (its PNG says its values are class ids), else ``default``."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return _offset_of(im, default)
    except OSError:
        return default


def _offset_of(im, default: int = 1) -> int:
    text = getattr(im, "text", {}) or {}
    return 0 if text.get(LABEL_PNG_KEY) == CLASS_IDS else default


def decode_labels(label: np.ndarray, num_classes: int, *, label_offset: int = 1, source: str = "label map"
                  ) -> np.ndarray:
    """Stored label values -> class ids in ``0..M-1`` with ignore = M, ``HxW`` int64.

    Parameters
    ----------
    label : HxW integer array as stored in the PNG
    num_classes : M
    label_offset : 1: 0 and 255 -> ignore, v -> v - 1 (ADE-style, ifseg.md §13); 0: 255 -> ignore, v -> v
    source : name used in error messages (e.g. the file)

    Raises
    ------
    ValueError for a non-2-D or non-integer map, and for values that decode to a class >= M (a wrong
    ``label_offset`` or category list)
    """
    if label_offset not in LABEL_OFFSETS:
        raise ValueError(f"label_offset must be one of {LABEL_OFFSETS}, got {label_offset}")
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"{source}: label maps must be single-channel HxW, got shape {label.shape}")
    if not np.issubdtype(label.dtype, np.integer):
        raise ValueError(f"{source}: label maps must hold integers, got {label.dtype}")
    raw = label.astype(np.int64)
    ignore = (raw == RAW_IGNORE) | (raw < label_offset)
    out = raw - label_offset
    bad = ~ignore & (out >= num_classes)
    if bad.any():
        v = int(raw[bad].max())
        raise ValueError(f"{source}: stored value {v} decodes to class {v - label_offset}, but there are only "
                         f"M = {num_classes} categories (label_offset={label_offset}; check --label-offset and the "
                         f"category list)")
    out[ignore] = num_classes
    return out


LABEL_MODES = ("L", "P", "I", "I;16", "I;16B", "I;16L")  # single-channel PIL modes a label map may have


def check_label_mode(im, path) -> None:
    """``ValueError`` naming ``path`` unless the opened PIL image ``im`` is single-channel (:data:`LABEL_MODES`)."""
    if im.mode not in LABEL_MODES:
        raise ValueError(f"{path}: label maps must be single-channel (mode L, P or I), got mode {im.mode}")


def load_label(path: Union[str, Path], num_classes: int, *, label_offset: Optional[int] = 1) -> np.ndarray:
    """Read a PNG label map (palette or grayscale, 8 or 16 bit) and :func:`decode_labels` it (``label_offset=None``:
    :func:`label_offset_of` the file: 0 for the maps ifseg_rt writes, else 1)."""
    from PIL import Image

    path = Path(path)
    try:
        with Image.open(path) as im:  # opened once: the offset mark and the pixels
            if label_offset is None:
                label_offset = _offset_of(im)
            check_label_mode(im, path)
            arr = np.asarray(im)
    except OSError as e:
        raise ValueError(f"cannot read label map {path}: {e}") from None
    return decode_labels(arr, num_classes, label_offset=label_offset, source=str(path))


class ConfusionMatrix:
    """Dataset-level ``MxM`` confusion matrix ``[gt, pred]`` (int64) with the IFSeg metrics."""

    def __init__(self, num_classes: int):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
        """Add one image: ``pred`` class ids in ``0..M-1``, ``gt`` decoded labels (M = ignore), same shape."""
        pred, gt = np.asarray(pred), np.asarray(gt)
        if pred.shape != gt.shape:
            raise ValueError(f"prediction {pred.shape} and label {gt.shape} differ in size")
        m = self.num_classes
        valid = gt != m
        p, g = pred[valid].astype(np.int64), gt[valid].astype(np.int64)
        if p.size and (p.min() < 0 or p.max() >= m):
            raise ValueError(f"predictions must be class ids in 0..{m - 1}, got {p.min()}..{p.max()}")
        if g.size and (g.min() < 0 or g.max() > m):
            raise ValueError(f"labels must be class ids in 0..{m - 1} or {m} (ignore), got {g.min()}..{g.max()}")
        self.matrix += np.bincount(g * m + p, minlength=m * m).reshape(m, m)

    def merge(self, other: "ConfusionMatrix") -> None:
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge confusion matrices of {other.num_classes} and {self.num_classes} classes")
        self.matrix += other.matrix

    def metrics(self) -> "SegMetrics":
        return SegMetrics.from_confusion(self.matrix)


@dataclass
class SegMetrics:
    """Per-class counts and the summary numbers (fractions in [0, 1]; NaN where undefined)."""

    intersection: np.ndarray  # I_c
    union: np.ndarray  # U_c
    pred_pixels: np.ndarray  # P_c
    gt_pixels: np.ndarray  # G_c
    iou: np.ndarray  # I_c / U_c, NaN when U_c = 0
    acc: np.ndarray  # I_c / G_c, NaN when G_c = 0
    miou: float
    macc: float
    aacc: float

    @classmethod
    def from_confusion(cls, matrix: np.ndarray) -> "SegMetrics":
        matrix = np.asarray(matrix, dtype=np.int64)
        inter = np.diag(matrix).copy()
        pred = matrix.sum(axis=0)
        gt = matrix.sum(axis=1)
        union = pred + gt - inter
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.where(union > 0, inter / np.maximum(union, 1), np.nan)
            acc = np.where(gt > 0, inter / np.maximum(gt, 1), np.nan)
        total = pred.sum()
        return cls(intersection=inter, union=union, pred_pixels=pred, gt_pixels=gt, iou=iou, acc=acc,
                   miou=_nanmean(iou), macc=_nanmean(acc), aacc=float(inter.sum() / total) if total else float("nan"))

    def to_dict(self, class_names: Optional[Sequence[str]] = None) -> Dict[str, Any]:
        """JSON-ready summary; ``mIoU``, ``mAcc``, ``aAcc`` and per-class values in percent (x 100, NaN -> None)."""
        names = list(class_names) if class_names is not None else [str(i) for i in range(len(self.iou))]
        if len(names) != len(self.iou):
            raise ValueError(f"{len(names)} class names for {len(self.iou)} classes")
        return {
            "mIoU": _pct(self.miou), "mAcc": _pct(self.macc), "aAcc": _pct(self.aacc),
            "valid_pixels": int(self.pred_pixels.sum()),
            "per_class": [
                {"class": i, "name": n, "IoU": _pct(self.iou[i]), "Acc": _pct(self.acc[i]),
                 "intersection": int(self.intersection[i]), "union": int(self.union[i]),
                 "gt_pixels": int(self.gt_pixels[i]), "pred_pixels": int(self.pred_pixels[i])}
                for i, n in enumerate(names)],
        }


def _nanmean(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    ok = ~np.isnan(x)
    return float(x[ok].mean()) if ok.any() else float("nan")


def _pct(x: float) -> Optional[float]:
    x = float(x)
    return None if np.isnan(x) else 100.0 * x


def format_table(results: Dict[str, SegMetrics], class_names: Sequence[str]) -> str:
    """Per-class IoU table, one column per result (e.g. ``{"raw": ..., "knn": ...}``), then the summary rows."""
    cols = list(results)
    width = max([len("class")] + [len(n) for n in class_names])
    head = f"{'class':<{width}}  " + "  ".join(f"{'IoU ' + c:>10}" for c in cols)
    lines: List[str] = [head, "-" * len(head)]

    def cell(v: float) -> str:
        return f"{'-':>10}" if np.isnan(v) else f"{100 * v:>10.2f}"

    for i, name in enumerate(class_names):
        lines.append(f"{name:<{width}}  " + "  ".join(cell(results[c].iou[i]) for c in cols))
    lines.append("-" * len(head))
    for label, attr in (("mIoU", "miou"), ("mAcc", "macc"), ("aAcc", "aacc")):
        lines.append(f"{label:<{width}}  " + "  ".join(cell(getattr(results[c], attr)) for c in cols))
    return "\n".join(lines)
