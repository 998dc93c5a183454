"""The serving contract: tensor names, config parameters, limits, and the pure functions on both sides of the wire
(request items -> images on the server, outputs -> :class:`~ifseg_rt.runtime.SegmentationResult` on the client).

One model (``ifseg``, or ``--name``) answers every ifseg_rt Triton deployment, whether it is ``python -m ifseg_rt
serve`` (a python-backend model around one :class:`~ifseg_rt.runtime.Segmenter`) or an exported repository's
ensemble (pre -> ONNX -> post)::

    input   image          BYTES  [batch, 1]      one encoded image file (JPEG, PNG, ...) per item
    output  labels         INT32  [batch, H0, W0] label map at the original, EXIF-upright size (-1 pads an item
                                                  smaller than the largest of its request)
            labels_png     BYTES  [batch, 1]      the same label map per item as a PNG (``serve`` only; the
                                                  client asks for it for large images, see MAX_OUTPUT_PIXELS)
            probabilities  FP32   [batch, h, w, M] cell probabilities (computed only when requested)
            original_size  INT32  [batch, 2]      (H0, W0) of each item
            input_size     INT32  [batch, 2]      (H, W) network input after the image policy
            grid           INT32  [batch, 2]      (h, w) token grid

The category names are the config parameter ``categories`` (a JSON list), readable through the model-config
endpoint (KServe v2 model metadata has no free-form fields). numpy + Pillow only: no tritonclient, no torch.

Response size: ``labels`` costs 4 bytes per pixel of the original image (a 40 MP photo: 160 MB through the server's
shared memory and the wire); ``serve`` refuses a request whose ``labels`` would exceed ``max_output_pixels``
(config parameter, ``--max-output-pixels``) and offers ``labels_png`` (the palette PNG with the class-ids mark that
``segment`` writes: a few hundred KB for such a map). An exported ensemble keeps ``labels`` only: an ensemble step
computes every output it maps, so the PNG would be encoded for every request.
"""

from __future__ import annotations

import json
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..runtime.outputs import decode_label_png, encode_label_png
from ..runtime.preprocess import load_image

MODEL_NAME = "ifseg"  # default Triton model name
MODEL_NAME_RULE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # a folder of a model repository, a URL segment


def check_model_name(name: str) -> str:
    """``name`` when it can name a Triton model here (1-64 letters, digits, ``_ . -``; no path separators, not
    ``..``), else ``ValueError``."""
    if not isinstance(name, str) or not MODEL_NAME_RULE.fullmatch(name) or set(name) == {"."}:
        raise ValueError(f"model names are 1-64 letters, digits, '_', '.' or '-' (starting with a letter or digit), "
                         f"got {name!r}")
    return name
INPUT = "image"  # BYTES [batch, 1]
LABELS = "labels"  # INT32 [batch, H0, W0]
LABELS_PNG = "labels_png"  # BYTES [batch, 1]
PROBABILITIES = "probabilities"  # FP32 [batch, h, w, M]
ORIGINAL_SIZE = "original_size"  # INT32 [batch, 2]
INPUT_SIZE = "input_size"  # INT32 [batch, 2]
GRID = "grid"  # INT32 [batch, 2]
OUTPUTS = (LABELS, LABELS_PNG, PROBABILITIES, ORIGINAL_SIZE, INPUT_SIZE, GRID)
SIZE_OUTPUTS = (ORIGINAL_SIZE, INPUT_SIZE, GRID)
CATEGORIES_PARAMETER = "categories"  # config parameter: JSON list of names, index = label
PAD_LABEL = -1  # labels outside an item's own H0 x W0 when the items of one request differ in size

MAX_REQUEST_BYTES = 32 * 1024 * 1024  # bytes per encoded item, checked before decoding
MAX_PIXELS = 40_000_000  # px per decoded item (e.g. 8000 x 5000), read from the header before decoding
MAX_OUTPUT_PIXELS = 16_777_216  # label pixels of one request's int32 'labels' output (64 MB), checked before work
MIN_BYTES_LIMIT = 1024  # the smallest image or body limit: below it every request is refused (a typo, not a policy)
BODY_JSON_BYTES = 1024 * 1024  # room for a request's JSON beside its largest image
MAX_BODY_BYTES = MAX_REQUEST_BYTES + BODY_JSON_BYTES  # HTTP request body, checked by the front before reading it

# config parameters the python-backend models read (ifseg_rt.serve.repository writes them), all strings
PARAM_MODEL_DIR = "model_dir"  # serve: the exported model directory each instance loads
PARAM_BACKEND = "backend"  # serve: Segmenter backend
PARAM_DEVICE = "device"  # serve: Segmenter device
PARAM_THREADS = "threads"  # serve / ONNX stand-in: engine CPU threads per instance ("0": the engine's default)
PARAM_KNN_BACKEND = "knn_backend"  # serve / post: ifseg_rt.knn backend
PARAM_MAX_BYTES = "max_request_bytes"  # serve / pre
PARAM_MAX_PIXELS = "max_pixels"  # serve / pre
PARAM_MAX_OUTPUT_PIXELS = "max_output_pixels"  # serve
PARAM_MANIFEST = "manifest"  # pre / post: the model's ifseg.json, relative to the version directory


class RequestError(ValueError):
    """One request the server refuses (empty, too large, not an image, ...): answered with INVALID_ARG (HTTP 400,
    gRPC INVALID_ARGUMENT) while the other requests of its batch are served."""


def decode_items(data: Any, *, max_bytes: int = MAX_REQUEST_BYTES, max_pixels: int = MAX_PIXELS
                 ) -> List[np.ndarray]:
    """The ``image`` tensor of one request (``batch x 1`` objects) -> one ``HxWx3`` uint8 array per item.

    Every item is checked before it is decoded: not empty, at most ``max_bytes`` bytes, at most ``max_pixels``
    pixels according to its header (a decompression bomb is refused unread). Decoding is
    :func:`~ifseg_rt.runtime.preprocess.load_image` (EXIF orientation applied), as for a file given to ``Segmenter``.

    Raises
    ------
    RequestError naming the item and the problem
    """
    arr = np.asarray(data, dtype=object)
    if arr.ndim != 2 or arr.shape[1] != 1 or arr.shape[0] < 1:
        raise RequestError(f"input '{INPUT}' must have shape [batch, 1] (one encoded image per item), got "
                           f"{list(arr.shape)}")
    images = []
    for i, raw in enumerate(arr[:, 0]):
        where = f"item {i} of input '{INPUT}'" if arr.shape[0] > 1 else f"input '{INPUT}'"
        if not isinstance(raw, (bytes, bytearray, memoryview, np.bytes_)):
            raise RequestError(f"{where} must be the bytes of an encoded image file, got {type(raw).__name__}")
        n = len(raw)
        if n == 0:
            raise RequestError(f"{where} is empty (0 bytes): send the bytes of one encoded image file (JPEG, PNG, ...)")
        if n > max_bytes:
            raise RequestError(f"{where} is {n} bytes, above this server's limit of {max_bytes} bytes per image")
        try:
            images.append(load_image(bytes(raw), max_pixels=max_pixels))
        except (ValueError, TypeError) as e:
            raise RequestError(f"{where}: {e}") from None
    return images


def pack_labels(maps: Sequence[np.ndarray]) -> np.ndarray:
    """``H0xW0`` label maps -> ``B x maxH x maxW`` int32, :data:`PAD_LABEL` outside each map (no copy of padding
    when the sizes agree, the usual one-image request)."""
    if len(maps) == 1:
        return np.ascontiguousarray(maps[0], dtype=np.int32)[None]
    h = max(m.shape[0] for m in maps)
    w = max(m.shape[1] for m in maps)
    out = np.full((len(maps), h, w), PAD_LABEL, dtype=np.int32)
    for i, m in enumerate(maps):
        out[i, :m.shape[0], :m.shape[1]] = m
    return out


def pack_probabilities(probs: Sequence[np.ndarray]) -> np.ndarray:
    """``h x w x M`` cell probabilities -> ``B x maxh x maxw x M`` float32 (zeros outside each grid)."""
    if len(probs) == 1:
        return np.ascontiguousarray(probs[0], dtype=np.float32)[None]
    h = max(p.shape[0] for p in probs)
    w = max(p.shape[1] for p in probs)
    out = np.zeros((len(probs), h, w, probs[0].shape[2]), dtype=np.float32)
    for i, p in enumerate(probs):
        out[i, :p.shape[0], :p.shape[1]] = p
    return out


def pack_results(results: Sequence[Any], requested: Optional[Sequence[str]] = None) -> Dict[str, np.ndarray]:
    """:class:`~ifseg_rt.runtime.SegmentationResult` s of one request -> the output tensors (only ``requested``
    ones when given; ``probabilities`` needs results made with ``return_probabilities=True``)."""
    want = set(OUTPUTS if requested is None or len(requested) == 0 else requested)
    out: Dict[str, np.ndarray] = {}
    if LABELS in want:
        out[LABELS] = pack_labels([r.labels for r in results])
    if LABELS_PNG in want:
        out[LABELS_PNG] = np.array([[encode_label_png(r.labels, len(r.categories))] for r in results], dtype=object)
    if PROBABILITIES in want:
        out[PROBABILITIES] = pack_probabilities([r.probabilities for r in results])
    for name, attr in ((ORIGINAL_SIZE, "original_size"), (INPUT_SIZE, "input_size"), (GRID, "grid")):
        if name in want:
            out[name] = np.asarray([getattr(r, attr) for r in results], dtype=np.int32).reshape(len(results), 2)
    return out


def output_pixels(images: Sequence[np.ndarray]) -> int:
    """Pixels of the ``labels`` output of one request holding ``images`` (``batch x maxH x maxW``)."""
    return len(images) * max(im.shape[0] for im in images) * max(im.shape[1] for im in images) if images else 0


def _png_labels(data: Any) -> List[np.ndarray]:
    arr = np.asarray(data, dtype=object)
    if arr.ndim != 2 or arr.shape[1] != 1:
        raise ValueError(f"the server's '{LABELS_PNG}' output must have shape [batch, 1], got {list(arr.shape)}")
    out = []
    for raw in arr[:, 0]:
        try:
            out.append(decode_label_png(bytes(raw)).astype(np.int32))
        except Exception as e:  # Pillow raises several types for a broken PNG
            raise ValueError(f"the server's '{LABELS_PNG}' output is not a readable PNG: {e}") from None
    return out


def unpack_results(outputs: Mapping[str, Optional[np.ndarray]], categories: Sequence[str],
                   timings: Optional[Dict[str, float]] = None) -> List[Any]:
    """The output tensors of one response -> a :class:`~ifseg_rt.runtime.SegmentationResult` per item (labels
    cropped to each item's original size), from ``labels`` or else ``labels_png``."""
    from ..runtime.segmenter import SegmentationResult

    labels = outputs.get(LABELS)
    if labels is None and outputs.get(LABELS_PNG) is not None:
        labels = _png_labels(outputs[LABELS_PNG])
    elif labels is None or labels.ndim != 3:
        raise ValueError(f"the server's response has no [batch, H, W] '{LABELS}' output "
                         f"(got {None if labels is None else list(labels.shape)})")
    sizes = {name: outputs.get(name) for name in SIZE_OUTPUTS}
    for name, v in sizes.items():
        if v is None or v.shape != (len(labels), 2):
            raise ValueError(f"the server's response has no [batch, 2] '{name}' output "
                             f"(got {None if v is None else list(v.shape)})")
    probs = outputs.get(PROBABILITIES)
    m = len(categories)
    results = []
    for i in range(len(labels)):
        h0, w0 = (int(v) for v in sizes[ORIGINAL_SIZE][i])
        gh, gw = (int(v) for v in sizes[GRID][i])
        lab = np.ascontiguousarray(labels[i][:h0, :w0], dtype=np.int32)
        if lab.shape != (h0, w0) or lab.size and (lab.min() < 0 or lab.max() >= m):
            raise ValueError(f"the server returned labels of shape {lab.shape} with values outside 0..{m - 1} for an "
                             f"image of {h0}x{w0} px: the server's model does not match its category list")
        p = None if probs is None else np.ascontiguousarray(probs[i, :gh, :gw], dtype=np.float32)
        results.append(SegmentationResult(labels=lab, categories=tuple(categories), grid=(gh, gw),
                                          original_size=(h0, w0),
                                          input_size=tuple(int(v) for v in sizes[INPUT_SIZE][i]),
                                          probabilities=p, timings=dict(timings or {})))
    return results


def config_parameters(config: Mapping[str, Any]) -> Dict[str, str]:
    """``{key: string_value}`` of a model config as JSON (what a python-backend model receives)."""
    return {k: v.get("string_value", "") for k, v in (config.get("parameters") or {}).items()
            if isinstance(v, Mapping)}


def categories_from_config(config: Mapping[str, Any], where: str) -> Tuple[str, ...]:
    """The category names from a model config as JSON (``{"parameters": {"categories": {"string_value": ...}}}``)."""
    params = config.get("parameters") or {}
    raw = (params.get(CATEGORIES_PARAMETER) or {}).get("string_value")
    if raw is None:
        raise ValueError(f"{where} has no '{CATEGORIES_PARAMETER}' config parameter: it is not an ifseg_rt model "
                         f"(serve one with `python -m ifseg_rt serve --model DIR`)")
    try:
        names = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: config parameter '{CATEGORIES_PARAMETER}' is not JSON: {e}") from None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"{where}: config parameter '{CATEGORIES_PARAMETER}' must be a JSON list of names")
    return tuple(names)
