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

from ..metrics import CLASS_IDS, LABEL_PNG_KEY

ALPHA = 0.5  # overlay opacity of the label colours (region outlines are drawn at full colour)
_BASE = [  # Kelly's colours of maximum contrast without white, black, grey and the near-black olive; re-ordered so
    # that neighbours in the list differ in hue and lightness (sky-like blue, then orange, green, purple, ...)
    (0, 103, 165), (243, 132, 0), (0, 136, 86), (135, 86, 146), (243, 195, 0), (190, 0, 50), (161, 202, 241),
    (101, 69, 34), (141, 182, 0), (230, 143, 172), (96, 78, 151), (246, 166, 0), (179, 68, 108), (220, 211, 0),
    (136, 45, 23), (249, 147, 121), (194, 178, 128), (226, 88, 34),
]
LEGEND_ROW = 14  # px per legend line (at scale 1: images up to LEGEND_WIDTH px wide)
SWATCH = 10  # px, legend colour square (at scale 1)
LEGEND_WIDTH = 640  # px; wider images get a legend scaled by width // LEGEND_WIDTH


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


def label_png_info():
    """The PNG text chunk that marks a label map as ifseg_rt's (values = class ids; ``eval`` reads it back so)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(LABEL_PNG_KEY, CLASS_IDS)
    return info


def save_label_png(labels: np.ndarray, path: Union[str, Path], num_classes: int) -> Path:
    """Write ``HxW`` labels as an 8-bit palette PNG (values = category index); > 256 classes -> 16-bit grey."""
    path = Path(path)
    label_image(labels, num_classes).save(path, format="PNG", pnginfo=label_png_info())
    return path


def colorize(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """``HxW`` labels -> ``HxWx3`` uint8 colours."""
    return palette(max(num_classes, 1))[np.clip(labels, 0, max(num_classes, 1) - 1)]


def boundaries(labels: np.ndarray, width: int = 1) -> np.ndarray:
    """``HxW`` bool: pixels within ``width`` px of a pixel of another label (4-neighbourhood, grown ``width - 1``
    times), the outlines of every region."""
    labels = np.asarray(labels)
    edge = np.zeros(labels.shape, dtype=bool)
    dv = labels[1:, :] != labels[:-1, :]
    dh = labels[:, 1:] != labels[:, :-1]
    edge[1:, :] |= dv
    edge[:-1, :] |= dv
    edge[:, 1:] |= dh
    edge[:, :-1] |= dh
    for _ in range(width - 1):
        grown = edge.copy()
        grown[1:, :] |= edge[:-1, :]
        grown[:-1, :] |= edge[1:, :]
        grown[:, 1:] |= edge[:, :-1]
        grown[:, :-1] |= edge[:, 1:]
        edge = grown
    return edge


def outline_width(h: int, w: int) -> int:
    """Outline thickness in px for an ``h x w`` picture: 1 up to 512 px on the short side, then growing with it."""
    return max(1, min(h, w) // 512)


def overlay(image: np.ndarray, labels: np.ndarray, num_classes: int, alpha: float = ALPHA, *,
            outlines: bool = True) -> np.ndarray:
    """Blend the label colours over an ``HxWx3`` uint8 image; with ``outlines`` every region's border is drawn in
    its full label colour (the legend swatch's), so that a class reads the same over dark and light photo areas."""
    colours = colorize(labels, num_classes)
    out = (image.astype(np.float32) * (1 - alpha) + colours.astype(np.float32) * alpha).round().astype(np.uint8)
    if outlines:
        edge = boundaries(labels, outline_width(*labels.shape[:2]))
        out[edge] = colours[edge]
    return out


def legend_scale(width: int) -> int:
    """How much larger than at scale 1 the legend of a ``width`` px picture is drawn (legible on large images)."""
    return max(1, width // LEGEND_WIDTH)


def legend_layout(categories: Sequence[str], present: Sequence[int], width: int, *, column: int = 120
                  ) -> List[Tuple[int, str, Tuple[int, int, int, int], Tuple[int, int]]]:
    """Where :func:`legend` draws each entry: (label, name, swatch box x0, y0, x1, y1, text origin x, y)."""
    s = legend_scale(width)
    column, row, swatch = column * s, LEGEND_ROW * s, SWATCH * s
    per_row = max(1, width // column)
    out = []
    for j, c in enumerate(present):
        x, y = (j % per_row) * column + 2 * s, (j // per_row) * row + 2 * s
        out.append((int(c), str(categories[c])[:24], (x, y + s, x + swatch, y + s + swatch), (x + swatch + 4 * s, y)))
    return out


def _font(scale: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=11 * scale)  # Pillow >= 10.1: a scalable default font
    except TypeError:
        return ImageFont.load_default()


def legend(categories: Sequence[str], present: Sequence[int], width: int, *, column: int = 120) -> np.ndarray:
    """A white strip of ``width`` px listing ``present`` labels as colour swatch + name, row by row; swatches,
    text and rows grow with :func:`legend_scale`."""
    from PIL import Image, ImageDraw

    s = legend_scale(width)
    layout = legend_layout(categories, present, width, column=column)
    rows = max(1, -(-len(present) // max(1, width // (column * s))))
    canvas = Image.new("RGB", (width, (LEGEND_ROW * rows + 4) * s), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    pal = palette(len(categories))
    font = _font(s)
    for c, name, box, origin in layout:
        draw.rectangle(box, fill=tuple(int(v) for v in pal[c]), outline=(0, 0, 0), width=s)
        draw.text(origin, name, fill=(0, 0, 0), font=font)
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
