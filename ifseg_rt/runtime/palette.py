"""Palette PNG label maps and colour overlays (Pillow + numpy)."""

from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np

ALPHA = 0.5  # overlay opacity of the label colours


def palette(n: int) -> np.ndarray:
    """``n x 3`` uint8 colours: the PASCAL VOC bit-interleaving palette (distinct for the first 256 labels)."""
    out = np.zeros((max(n, 1), 3), dtype=np.uint8)
    for i in range(len(out)):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out[i] = (r, g, b)
    return out[:n]


def save_label_png(labels: np.ndarray, path: Union[str, Path], num_classes: int) -> Path:
    """Write ``HxW`` labels as an 8-bit palette PNG (values = category index); > 256 classes -> 16-bit grey."""
    from PIL import Image

    path = Path(path)
    if num_classes <= 256:
        im = Image.fromarray(labels.astype(np.uint8), mode="P")
        pal = np.zeros((256, 3), dtype=np.uint8)
        pal[:num_classes] = palette(num_classes)
        im.putpalette(pal.ravel().tolist())
    else:
        im = Image.fromarray(labels.astype(np.uint16))
    im.save(path)
    return path


def overlay(image: np.ndarray, labels: np.ndarray, num_classes: int, alpha: float = ALPHA) -> np.ndarray:
    """Blend the label colours over an ``HxWx3`` uint8 image."""
    colours = palette(max(num_classes, 256) if num_classes <= 256 else num_classes)[labels]
    return (image.astype(np.float32) * (1 - alpha) + colours.astype(np.float32) * alpha).round().astype(np.uint8)
