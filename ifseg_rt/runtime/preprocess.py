"""Image loading and IFSeg's inference preprocessing (ifseg.md §11), numpy + Pillow only (no torch).

The paper's policy: scale so that the short side becomes 512 while the long side stays <= 2048
(``s = min(2048 / long, 512 / short)``, sizes rounded half up), OpenCV-style bilinear resize, then
``x = (pixel / 255 - 0.5) / 0.5`` in RGB order, one whole image per forward pass.

Two rules of ours on top: every side of the network input is at least one 16 px patch (an image more elongated than
``max_long_side / 16`` : 1 would otherwise get a short side below one cell), and a policy may not produce more than
:data:`MAX_CELLS` cells (the paper's policy reaches exactly that bound; attention memory grows with its square).
Images read from files or given as PIL images are turned upright by their EXIF orientation first, as OpenCV's
``imread`` (the original pipeline) and every image viewer do; label maps therefore follow the displayed orientation.
"""

from __future__ import annotations

import io
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np

from ..geometry import MEAN, PATCH, STD, token_grid  # noqa: F401  (re-exported)

MIN_SIDE = PATCH  # px; smaller originals cannot hold one patch
MAX_PIXELS = 1 << 28  # px; refuse absurdly large originals (268 Mpx) before allocating anything
MAX_CELLS = 4096  # token cells per network input: 32 x 128, the paper's policy at its 4:1 aspect cap
MAX_MULTIPLE = 256  # px; largest rounding multiple of a policy

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")  # what folders are searched for
ImageLike = Union[str, Path, bytes, np.ndarray, Any]  # bytes = an encoded image file; Any = PIL.Image.Image


@dataclass(frozen=True)
class ImagePolicy:
    """How an original H0 x W0 image becomes the network input H x W.

    ``mode="short_side"`` (the paper): short side -> ``short_side`` keeping the aspect ratio, long side capped at
    ``max_long_side``. ``mode="fixed"``: every image is resized to ``size`` = (H, W). ``multiple`` > 1 additionally
    rounds the computed size to a multiple (e.g. 16 for static-shape engines); 1 keeps the paper's exact sizes.
    """

    mode: str = "short_side"
    short_side: int = 512
    max_long_side: int = 2048
    size: Optional[Tuple[int, int]] = None
    multiple: int = 1

    def __post_init__(self):
        if self.mode not in ("short_side", "fixed"):
            raise ValueError(f"image policy mode must be 'short_side' or 'fixed', got {self.mode!r}")
        for name in ("short_side", "max_long_side", "multiple"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"image policy {name} must be an integer, got {v!r}")
        if self.mode == "fixed":
            if self.size is None or len(self.size) != 2 or not all(
                    isinstance(v, int) and not isinstance(v, bool) for v in self.size):
                raise ValueError(f"fixed image policy needs size=(H, W) as two integers, got {self.size!r}")
            object.__setattr__(self, "size", (int(self.size[0]), int(self.size[1])))
            if min(self.size) < PATCH:
                raise ValueError(f"fixed image policy size {self.size} must be at least {PATCH} px per side")
        if not PATCH <= self.short_side <= self.max_long_side:
            raise ValueError(f"image policy needs {PATCH} <= short_side <= max_long_side, got short_side "
                             f"{self.short_side}, max_long_side {self.max_long_side}")
        if not 1 <= self.multiple <= MAX_MULTIPLE:
            raise ValueError(f"image policy multiple must be in [1, {MAX_MULTIPLE}], got {self.multiple}")
        h, w = self.size if self.mode == "fixed" else (self.short_side, self.max_long_side)
        h, w = self._round(h, w)
        gh, gw = token_grid(h, w)
        cells = gh * gw
        if cells > MAX_CELLS:
            what = (f"fixed size {self.size[0]}x{self.size[1]}" if self.mode == "fixed" else
                    f"short_side {self.short_side} with max_long_side {self.max_long_side}")
            raise ValueError(f"image policy {what} allows network inputs of up to {h}x{w} px = {cells} cells of "
                             f"{PATCH} px; the limit is {MAX_CELLS} cells (the paper's short side 512 / long side 2048 "
                             f"reaches it): attention memory grows with the square of the cell count")

    @property
    def max_cells(self) -> int:
        """Cells of the largest network input this policy produces."""
        h, w = self.size if self.mode == "fixed" else (self.short_side, self.max_long_side)
        gh, gw = token_grid(*self._round(h, w))
        return gh * gw

    def _round(self, h: int, w: int) -> Tuple[int, int]:
        m = self.multiple
        if m > 1:
            h, w = max(m, int(round(h / m)) * m), max(m, int(round(w / m)) * m)
        return max(h, PATCH), max(w, PATCH)

    def target_size(self, h0: int, w0: int) -> Tuple[int, int]:
        """Network input size (H, W) for an original of h0 x w0 pixels; every side is at least one patch."""
        if self.mode == "fixed":
            h, w = self.size
        else:
            s = min(self.max_long_side / max(h0, w0), self.short_side / min(h0, w0))
            h, w = int(h0 * s + 0.5), int(w0 * s + 0.5)
        return self._round(h, w)

    def describe(self) -> str:
        """``short side 512, long side <= 2048`` / ``fixed 512x512`` (what commands print)."""
        if self.mode == "fixed":
            return f"fixed {self.size[0]}x{self.size[1]}"
        return f"short side {self.short_side}, long side <= {self.max_long_side}"

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["size"] = list(self.size) if self.size is not None else None
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "ImagePolicy":
        d = dict(d)
        if d.get("size") is not None:
            d["size"] = tuple(d["size"])
        return cls(**d)


def image_file(path: Union[str, Path]) -> Path:
    """``path`` as a :class:`Path` to an existing file; ``FileNotFoundError`` / ``ValueError`` naming it otherwise."""
    if isinstance(path, str) and not path.strip():
        raise ValueError(f"image path is empty ({path!r})")
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"image not found: {p}")
    if p.is_dir():
        raise ValueError(f"cannot read image {p}: it is a directory")
    return p


def load_image(image: ImageLike, *, max_pixels: Optional[int] = None) -> np.ndarray:
    """A path, encoded image bytes (a JPEG/PNG/... file's contents), a PIL image or an array -> ``HxWx3`` uint8 RGB
    (grayscale replicated, alpha dropped).

    ``max_pixels`` (default :data:`MAX_PIXELS`): refuse larger originals. Files and bytes are checked from their
    header, before any pixel is decoded, so a decompression bomb is never expanded.

    Raises
    ------
    ValueError for arrays of the wrong shape/dtype, undecodable bytes, and images too small for one 16 px patch or
    above ``max_pixels``
    """
    from PIL import Image

    if isinstance(image, os.PathLike) and not isinstance(image, Path):
        image = Path(os.fspath(image))
    if isinstance(image, np.matrix):  # always 2-D, and indexing keeps it so: a plain array of the same values
        image = np.asarray(image)
    if isinstance(image, (bytes, bytearray, memoryview)):
        what = f"encoded image ({len(image)} bytes)"
        if len(image) == 0:
            raise ValueError("cannot read encoded image: it is empty (0 bytes)")
        try:
            with Image.open(io.BytesIO(image)) as im:
                _check_size(im.height, im.width, what, max_pixels)
                arr = _pil_to_rgb(_upright(im), what)
        except Image.UnidentifiedImageError:
            raise ValueError(f"cannot read {what}: not an image format Pillow recognises (corrupt, truncated or not "
                             f"an image)") from None
        except (OSError, SyntaxError, Image.DecompressionBombError) as e:
            raise ValueError(f"cannot read {what}: {e}") from None
        return np.ascontiguousarray(arr)
    if isinstance(image, (str, Path)):
        p = image_file(image)
        try:
            with Image.open(p) as im:
                _check_size(im.height, im.width, str(p), max_pixels)
                arr = _pil_to_rgb(_upright(im), str(p))
        except Image.UnidentifiedImageError:
            raise ValueError(f"cannot read image {p}: not an image file Pillow recognises (corrupt, empty or another "
                             f"kind of file)") from None
        except (OSError, SyntaxError, Image.DecompressionBombError) as e:
            reason = str(e).replace(repr(str(p)), "the file").replace(str(p), "the file")
            raise ValueError(f"cannot read image {p}: {reason}") from None
        return np.ascontiguousarray(arr)
    if isinstance(image, Image.Image):
        _check_size(image.height, image.width, "PIL image", max_pixels)
        try:
            image.load()  # a lazily opened image whose file was closed (a `with Image.open(...)` block) fails here
        except (AssertionError, ValueError, AttributeError):
            raise ValueError("cannot read PIL image: it is closed (.close() was called, or a `with Image.open(...)` "
                             "block ended before its pixels were read); call .load() or .copy() inside the block, "
                             "or pass the path") from None
        except (OSError, SyntaxError) as e:
            raise ValueError(f"cannot read PIL image: {e}") from None
        try:
            return np.ascontiguousarray(_pil_to_rgb(_upright(image), "PIL image"))
        except (OSError, SyntaxError) as e:
            raise ValueError(f"cannot read PIL image: {e}") from None
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
            raise ValueError(f"image array must be HxW, HxWx1, HxWx3 or HxWx4, got shape {image.shape}")
        if arr.dtype == np.uint16:
            arr = (arr >> 8).astype(np.uint8)  # 16-bit -> 8-bit as OpenCV's IMREAD_COLOR (the original's reader)
        elif arr.dtype != np.uint8:
            raise ValueError(f"image array must be uint8 (0..255) or uint16, got {arr.dtype}; convert floats in "
                             f"[0, 1] with (x * 255).round().astype(np.uint8)")
        _check_size(arr.shape[0], arr.shape[1], f"array of shape {image.shape}", max_pixels)
        if arr.shape[2] == 1:
            arr = np.repeat(arr, 3, axis=2)
        elif arr.shape[2] == 4:
            arr = arr[:, :, :3]
        return np.ascontiguousarray(arr)
    raise TypeError(f"unsupported image type {type(image).__name__}: pass a path, encoded image bytes, a PIL image or "
                    f"an HxWx3 uint8 array")


def upright_size(path: Union[str, Path]) -> Tuple[int, int]:
    """(H, W) of an image file as :func:`load_image` returns it (EXIF orientations 5-8 swap the sides), read from its
    header without decoding pixels. Raises ``OSError`` (``PIL.UnidentifiedImageError`` included) for unreadable
    files."""
    from PIL import Image

    with Image.open(path) as im:
        try:
            swap = im.getexif().get(0x0112, 1) in (5, 6, 7, 8)
        except Exception:  # unreadable EXIF block: load_image ignores it too
            swap = False
        return (im.width, im.height) if swap else (im.height, im.width)


def _upright(im):
    """Apply the EXIF orientation tag (rotate/flip to the displayed orientation); images without one are unchanged."""
    from PIL import ImageOps

    try:
        orientation = im.getexif().get(0x0112, 1)
    except Exception:  # unreadable EXIF block: treat as no orientation, as viewers do
        return im
    if orientation in (None, 1):
        return im
    return ImageOps.exif_transpose(im)


def _pil_to_rgb(im, what: str) -> np.ndarray:
    """PIL image -> HxWx3 uint8; 16/32-bit integer images are scaled to 8 bits (high byte), never clipped."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a = np.asarray(im)
        if a.dtype != np.uint16 and a.size and (a.min() < 0 or a.max() > 65535):
            raise ValueError(f"{what}: 32-bit integer image with values outside 0..65535; convert it to 8-bit RGB")
        a = (a.astype(np.uint32) >> 8).astype(np.uint8)
        return np.repeat(a[:, :, None], 3, axis=2)
    if im.mode == "F":
        raise ValueError(f"{what}: floating-point (mode 'F') images have no defined 0..255 range; "
                         f"convert to 8-bit RGB first")
    return np.asarray(im.convert("RGB"))


def _check_size(h: int, w: int, what: str, max_pixels: Optional[int] = None) -> None:
    limit = MAX_PIXELS if max_pixels is None else max_pixels
    if h < MIN_SIDE or w < MIN_SIDE:
        raise ValueError(f"{what} is {h}x{w} px: too small for one {PATCH}x{PATCH} patch (need >= {MIN_SIDE} px per side)")
    if h * w > limit:
        raise ValueError(f"{what} is {h}x{w} px = {h * w / 1e6:.3g} Mpx, above the {limit / 1e6:.3g} Mpx limit")


def _linear_weights(n_in: int, n_out: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Half-pixel bilinear source indices/weights (OpenCV INTER_LINEAR / torch align_corners=False)."""
    scale = n_in / n_out
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5
    src = np.maximum(src, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = (src - i0).astype(np.float32)
    return i0, i1, lam


def resize_bilinear(img: np.ndarray, h: int, w: int) -> np.ndarray:
    """Resize ``HxWxC`` uint8 with bilinear interpolation, no antialias (OpenCV ``INTER_LINEAR`` semantics).

    Uses OpenCV when it is installed (bit-exact with the original pipeline); otherwise a numpy implementation of the
    same formula in float32, within one intensity level of OpenCV's fixed-point result.
    """
    if img.shape[:2] == (h, w):
        return img
    try:
        import cv2  # optional

        return cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)
    except ImportError:
        pass
    y0, y1, ly = _linear_weights(img.shape[0], h)
    x0, x1, lx = _linear_weights(img.shape[1], w)
    # gather the needed rows from the uint8 image before widening: a large original is never copied to float
    rows = img[y0].astype(np.float32) * (1 - ly)[:, None, None] + img[y1].astype(np.float32) * ly[:, None, None]
    out = rows[:, x0] * (1 - lx)[None, :, None] + rows[:, x1] * lx[None, :, None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def network_input(img: np.ndarray, policy: ImagePolicy, check_grid=None) -> np.ndarray:
    """A loaded ``HxWx3`` uint8 image -> its ``3xHxW`` float32 network input under ``policy`` (resize to the policy
    size, normalise); ``check_grid(h, w)`` may refuse the token grid first. Every caller preprocesses through this
    (``Segmenter``, the Triton pre-processing model)."""
    h, w = policy.target_size(*img.shape[:2])
    if check_grid is not None:
        check_grid(*token_grid(h, w))
    return normalize(resize_bilinear(img, h, w))


def normalize(img: np.ndarray) -> np.ndarray:
    """``HxWx3`` uint8 -> ``3xHxW`` float32 in [-1, 1] (mean = std = 0.5)."""
    x = img.astype(np.float32) * (1.0 / 255.0)
    x = (x - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def preprocess(image: ImageLike, policy: ImagePolicy = ImagePolicy()) -> Tuple[np.ndarray, Tuple[int, int]]:
    """Load, resize and normalise one image.

    Returns
    -------
    x : 1x3xHxW float32 network input
    original_size : (H0, W0) of the loaded image, where labels are produced
    """
    img = load_image(image)
    h0, w0 = img.shape[:2]
    h, w = policy.target_size(h0, w0)
    return normalize(resize_bilinear(img, h, w))[None], (h0, w0)
