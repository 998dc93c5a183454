"""What ``python -m ifseg_rt segment`` writes, in one place: the single-process command and the Ray path
(:mod:`ifseg_rt.distributed`) both run :func:`segment_files`, so their outputs cannot diverge.

* :func:`output_names` decides every input's output name once, from the whole input list (the file stem; repeats get
  ``_1``, ``_2``, ... in input order), so names never depend on which images failed, were skipped or which worker
  segmented them;
* :func:`encode_label_png` / :func:`encode_overlay_jpeg` are the bytes of ``<name>.png`` (palette label map, value =
  category index) and ``<name>.overlay.jpg`` (labels blended over the image, a legend below);
* :class:`OutputDir` is a local output folder whose writes are atomic (a file that exists is complete), so a re-run
  can skip the images whose outputs exist (``skip_existing``, the Ray path's resume); every label map records which
  input and which model (:func:`model_identity`) it is of, and a re-run keeps it only when both still match;
* :func:`segment_files` segments a list of images ``batch_size`` at a time, writes their outputs and yields one
  :class:`ImageRecord` per input: a result, an error naming the input, or a skip.

Torch-free.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from .inputs import is_uri
from .palette import label_image, label_png_info, plot
from .preprocess import load_image, upright_size
from .segmenter import SegmentationResult

LABEL_SUFFIX = ".png"  # <name>.png: the label map
OVERLAY_SUFFIX = ".overlay.jpg"  # <name>.overlay.jpg: labels over the image (--overlay)
OVERLAY_QUALITY = 90  # JPEG quality of overlays
TABLE_NAME = "segments.parquet"  # the per-image table segment --ray writes into the output folder
SOURCE_KEY = "ifseg_rt:source"  # text chunks of segment's label maps: the input (absolute path or URI) ...
MODEL_KEY = "ifseg_rt:model"  # ... and the model (model_identity) they are of
TEMP_NAME_BYTES = 200  # longest temporary file name OutputDir uses (file systems allow 255 bytes a name)


def output_names(sources: Sequence[Union[str, Path]]) -> List[str]:
    """Output name (no suffix) of every input, in input order: the file stem, made unique by ``_1``, ``_2``, ..."""
    used = set()
    names = []
    for src in sources:
        base = Path(_without_query(src)).stem
        stem, k = base, 1
        while stem in used:
            stem, k = f"{base}_{k}", k + 1
        used.add(stem)
        names.append(stem)
    return names


def _without_query(source) -> str:
    """A URI without its query string (not part of its name); a local path as it is (``?`` is a legal character)."""
    return str(source).partition("?")[0] if is_uri(str(source)) else str(source)


def output_files(name: str, overlay: bool = False) -> List[str]:
    """The files one image produces: ``<name>.png`` (+ ``<name>.overlay.jpg``)."""
    return [name + LABEL_SUFFIX] + ([name + OVERLAY_SUFFIX] if overlay else [])


def encode_label_png(labels: np.ndarray, num_classes: int, *, source: Optional[str] = None,
                     model: Optional[str] = None) -> bytes:
    """``HxW`` labels -> the bytes of the palette PNG (:func:`~ifseg_rt.runtime.palette.label_image`); ``source`` and
    ``model`` are recorded in it (:data:`SOURCE_KEY`, :data:`MODEL_KEY`) when given."""
    info = label_png_info()
    for key, value in ((SOURCE_KEY, source), (MODEL_KEY, model)):
        if value is not None:
            info.add_text(key, value)  # UTF-8 (iTXt) where Latin-1 cannot hold it
    buf = io.BytesIO()
    label_image(labels, num_classes).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def model_identity(segmenter) -> str:
    """A short hash of what decides a segmenter's labels: its model directory's manifest (the weights' hashes, the
    categories, the image policy), the precision it runs and its kNN settings."""
    what = {"manifest": segmenter.spec.raw, "categories": list(segmenter.categories),
            "precision": segmenter.precision, "knn": segmenter.knn.to_dict()}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def source_identity(source: str, local: Optional[str] = None) -> str:
    """How a label map names its input: the URI, or the absolute path of the local file (``local``: where a relative
    ``source`` was resolved)."""
    return source if is_uri(source) else str(Path(local or source).resolve())


def encode_overlay_jpeg(image: np.ndarray, labels: np.ndarray, categories: Sequence[str]) -> bytes:
    """``HxWx3`` uint8 image + ``HxW`` labels -> the bytes of the overlay JPEG: the label colours over the image
    and, below it, a legend naming the categories present (:func:`~ifseg_rt.runtime.palette.plot`)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(plot(labels, categories, image)).save(buf, format="JPEG", quality=OVERLAY_QUALITY)
    return buf.getvalue()


def decode_label_png(data: bytes) -> np.ndarray:
    """The labels of a label map written by :func:`encode_label_png`, ``HxW`` int64."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im).astype(np.int64)


class OutputDir:
    """A local output folder (created on first use). Writes go to a hidden temporary file that is then renamed, so a
    crash never leaves a truncated output that a re-run would take for a finished one."""

    def __init__(self, root: Union[str, Path]):
        self.root = Path(root)

    def __str__(self) -> str:
        return str(self.root)

    def exists(self, name: str) -> bool:
        return (self.root / name).is_file()

    def read(self, name: str) -> bytes:
        return (self.root / name).read_bytes()

    def write(self, name: str, data: bytes) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / name
        stem = name if len(name.encode()) <= TEMP_NAME_BYTES else hashlib.sha256(name.encode()).hexdigest()
        tmp = path.with_name(f".{stem}.{os.getpid()}.tmp")  # a name near 255 bytes must not fail for its temporary
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise


@dataclass
class ImageRecord:
    """What happened to one input of :func:`segment_files`.

    Attributes:
      index (int): position in the input list
      source (str): the input as given (a path or URI)
      name (str): its output name (``<name>.png``, ``<name>.overlay.jpg``)
      result (SegmentationResult or None): the segmentation (None when skipped or failed)
      error (str or None): why it failed, naming the input
      skipped (bool): its outputs existed already (``skip_existing``) and were left as they are
      pixel_counts (np.ndarray or None): M int64 pixels per category (read back from the label map when skipped)
      original_size (tuple(int, int) or None): (H0, W0)
      timings (dict or None): the result's per-stage milliseconds (kept when ``result`` is dropped to free memory)
    """

    index: int
    source: str
    name: str
    result: Optional[SegmentationResult] = None
    error: Optional[str] = None
    skipped: bool = False
    pixel_counts: Optional[np.ndarray] = None
    original_size: Optional[Tuple[int, int]] = None
    timings: Optional[Dict[str, float]] = None


def error_message(source: str, reason: str) -> str:
    """The reason, prefixed with the input unless it already names it (every failure names its input once)."""
    return reason if source in reason else f"{source}: {reason}"


def summary_line(record: ImageRecord, categories: Sequence[str]) -> str:
    """``name.png: 480x640 -> 512x683 (32x43 cells, HxW), sky 40%, road 31%, car 9%; 85 ms`` for a result;
    ``name.png: done before (NAME.png kept)`` for a skipped one."""
    if record.skipped:
        return f"{Path(_without_query(record.source)).name}: done before ({record.name}{LABEL_SUFFIX} kept)"
    r = record.result
    counts = record.pixel_counts / r.labels.size
    top = ", ".join(f"{categories[i]} {100 * counts[i]:.0f}%" for i in np.argsort(-counts)[:3] if counts[i] > 0)
    return (f"{Path(_without_query(record.source)).name}: {r.original_size[0]}x{r.original_size[1]} -> "
            f"{r.input_size[0]}x{r.input_size[1]} ({r.grid[0]}x{r.grid[1]} cells, HxW), {top}; "
            f"{r.timings['total']:.0f} ms")


def segment_files(segmenter, sources: Sequence[str], names: Sequence[str], out, *, overlay: bool = False,
                  batch_size: int = 1, skip_existing: bool = False, indices: Optional[Sequence[int]] = None,
                  local_paths: Optional[Dict[int, str]] = None) -> Iterator[ImageRecord]:
    """Segment ``sources`` and write ``<name>.png`` (+ ``<name>.overlay.jpg``) for each into ``out``.

    Parameters
    ----------
    segmenter : a :class:`~ifseg_rt.runtime.Segmenter`
    sources : image paths (what error messages name)
    names : their output names (:func:`output_names` over the *whole* input list)
    out : an :class:`OutputDir` (or any object with ``exists(name)``, ``read(name)``, ``write(name, bytes)``)
    overlay : also write the overlays
    batch_size : images per engine call (equal network sizes are batched)
    skip_existing : leave an image whose outputs all exist as it is (its record reads the label map back), when its
        label map records this source and this model (:func:`model_identity`); one without those records (an older
        ifseg_rt's) is kept when its size is the image's. Any other is segmented again and replaced
    indices : each source's position in the whole input list (default 0, 1, ...)
    local_paths : ``{position in sources: local file}`` read instead of the source (a downloaded remote input);
        error messages still name the source

    Yields
    ------
    one :class:`ImageRecord` per source: skipped ones first, then the others in input order
    """
    if len(names) != len(sources):
        raise ValueError(f"{len(names)} output names for {len(sources)} sources")
    indices = list(range(len(sources))) if indices is None else list(indices)
    local_paths = local_paths or {}
    m = len(segmenter.categories)
    model = model_identity(segmenter)
    todo = []
    for i, (src, name) in enumerate(zip(sources, names)):
        if skip_existing and all(out.exists(f) for f in output_files(name, overlay)):
            labels = _kept_labels(out.read(name + LABEL_SUFFIX), source_identity(src, local_paths.get(i)), model,
                                  local_paths.get(i, src))
            if labels is None:  # another image's or another model's map, or not one we wrote: segment it again
                todo.append(i)
                continue
            counts = np.bincount(labels.ravel(), minlength=m)[:m]
            yield ImageRecord(indices[i], src, name, skipped=True, pixel_counts=counts,
                              original_size=(int(labels.shape[0]), int(labels.shape[1])))
        else:
            todo.append(i)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        paths = [local_paths.get(i, sources[i]) for i in chunk]
        results = segmenter.seg(paths, batch_size=batch_size, return_exceptions=True)
        for i, path, r in zip(chunk, paths, results):
            src, name = sources[i], names[i]
            if isinstance(r, Exception):
                reason = getattr(r, "reason", str(r)).replace(path, src)
                yield ImageRecord(indices[i], src, name, error=error_message(src, reason))
                continue
            source = source_identity(src, local_paths.get(i))
            out.write(name + LABEL_SUFFIX, encode_label_png(r.labels, m, source=source, model=model))
            if overlay:
                out.write(name + OVERLAY_SUFFIX, encode_overlay_jpeg(load_image(path), r.labels, r.categories))
            yield ImageRecord(indices[i], src, name, result=r, pixel_counts=r.pixel_counts(),
                              original_size=tuple(r.original_size), timings=dict(r.timings))


def _kept_labels(data: bytes, source: str, model: str, path: str) -> Optional[np.ndarray]:
    """The labels of an existing label map when a re-run may keep it (see :func:`segment_files`), else None."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            text = dict(getattr(im, "text", {}))
            labels = np.asarray(im).astype(np.int64)
    except (OSError, ValueError):
        return None
    if SOURCE_KEY in text or MODEL_KEY in text:
        return labels if text.get(SOURCE_KEY) == source and text.get(MODEL_KEY) == model else None
    if is_uri(path):  # an older map of a remote input: nothing local to compare with
        return labels
    try:
        return labels if upright_size(path) == labels.shape else None
    except (OSError, SyntaxError):
        return labels  # the input cannot be read now: keep the map, segmenting it would fail anyway
