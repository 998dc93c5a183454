"""Colours for label maps: palette PNGs, overlays with a legend (Pillow + numpy).

The palette is built for legibility over photographs: no black, no greys, no pale tints; the first 9 colours are
Tableau 10's (distinct, colour-blind aware; its grey left out), then well-spread hues of alternating lightness.
Colour ``i`` is label ``i``'s in every output (label PNGs, overlays, legends, the demo's panels).
"""

from __future__ import annotations

import colorsys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

ALPHA = 0.5  # overlay opacity of the label colours
_BASE = [  # Tableau 10 without its grey
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75), (227, 119, 194),
    (188, 189, 34), (23, 190, 207),
]
LEGEND_ROW = 14  # px per legend line
SWATCH = 10  # px, legend colour square


def palette(n: int) -> np.ndarray:
    """``n x 3`` uint8 colours, distinct and saturated enough to read over an image (no black, no grey)."""
    out = [c for c in _BASE[:n]]
    golden = 0.6180339887498949
    for i in range(len(out), n):
        h = (0.13 + i * golden) % 1.0
        light = (0.45, 0.62, 0.35)[i % 3]
        r, g, b = colorsys.hls_to_rgb(h, light, 0.85)
        out.append((int(round(255 * r)), int(round(255 * g)), int(round(255 * b))))
    return np.asarray(out, dtype=np.uint8).reshape(-1, 3)


def label_image(labels: np.ndarray, num_classes: int):
    """``HxW`` labels -> PIL image: 8-bit palette (values = category index); > 256 classes -> 16-bit grey."""
    from PIL import Image

    if num_classes <= 256:
        im = Image.fromarray(labels.astype(np.uint8), mode="P")
        pal = np.zeros((256, 3), dtype=np.uint8)
        pal[:num_classes] = palette(num_classes)
        im.putpalette(pal.ravel().tolist())
        return im
    return Image.fromarray(labels.astype(np.uint16))


def save_label_png(labels: np.ndarray, path: Union[str, Path], num_classes: int) -> Path:
    """Write ``HxW`` labels as an 8-bit palette PNG (values = category index); > 256 classes -> 16-bit grey."""
    path = Path(path)
    label_image(labels, num_classes).save(path)
    return path


def colorize(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """``HxW`` labels -> ``HxWx3`` uint8 colours."""
    return palette(max(num_classes, 1))[np.clip(labels, 0, max(num_classes, 1) - 1)]


def overlay(image: np.ndarray, labels: np.ndarray, num_classes: int, alpha: float = ALPHA) -> np.ndarray:
    """Blend the label colours over an ``HxWx3`` uint8 image."""
    colours = colorize(labels, num_classes)
    return (image.astype(np.float32) * (1 - alpha) + colours.astype(np.float32) * alpha).round().astype(np.uint8)


def legend_layout(categories: Sequence[str], present: Sequence[int], width: int, *, column: int = 120
                  ) -> List[Tuple[int, str, Tuple[int, int, int, int], Tuple[int, int]]]:
    """Where :func:`legend` draws each entry: (label, name, swatch box x0, y0, x1, y1, text origin x, y)."""
    per_row = max(1, width // column)
    out = []
    for j, c in enumerate(present):
        x, y = (j % per_row) * column + 2, (j // per_row) * LEGEND_ROW + 2
        out.append((int(c), str(categories[c])[:24], (x, y + 1, x + SWATCH, y + 1 + SWATCH), (x + SWATCH + 4, y)))
    return out


def legend(categories: Sequence[str], present: Sequence[int], width: int, *, column: int = 120) -> np.ndarray:
    """A white strip of ``width`` px listing ``present`` labels as colour swatch + name, row by row."""
    from PIL import Image, ImageDraw

    layout = legend_layout(categories, present, width, column=column)
    rows = max(1, -(-len(present) // max(1, width // column)))
    canvas = Image.new("RGB", (width, LEGEND_ROW * rows + 4), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    pal = palette(len(categories))
    for c, name, box, origin in layout:
        draw.rectangle(box, fill=tuple(int(v) for v in pal[c]), outline=(0, 0, 0))
        draw.text(origin, name, fill=(0, 0, 0))
    return np.asarray(canvas)


def plot(labels: np.ndarray, categories: Sequence[str], image: Optional[np.ndarray] = None, *,
         alpha: float = ALPHA, show_legend: bool = True) -> np.ndarray:
    """The picture of a segmentation: label colours over ``image`` (or the colours alone), with a legend below
    naming the categories present, largest area first. Returns ``(H + legend) x W x 3`` uint8."""
    m = len(categories)
    pic = colorize(labels, m) if image is None else overlay(image, labels, m, alpha)
    if not show_legend:
        return pic
    counts = np.bincount(labels.ravel(), minlength=m)[:m]
    present = [int(i) for i in np.argsort(-counts, kind="stable") if counts[i] > 0]
    return np.concatenate([pic, legend(categories, present, pic.shape[1])], axis=0)
