"""mIoU of a model on a folder of images + PNG label maps (ifseg.md §11-§13).

Usage::

    python -m ifseg_rt eval --model RUN_DIR --images val/images --labels val/labels --json metrics.json

``--model`` is an exported model directory (``ifseg.json``), an adaptation run directory (``model.safetensors``) or
an ifseg_rt / IFSeg checkpoint file. Either way the predictions come from a :class:`~ifseg_rt.runtime.Segmenter`
(an exported model through its engine, a checkpoint through the torch backend on the in-memory model), i.e. exactly
the labels ``Segmenter.seg`` returns: one forward pass per image, then the runtime's post-processing twice, plain
(``"raw"``: logits resized to the original size) and with the model's kNN settings (``"knn"``, the paper's †
numbers). Images and label maps are matched by file stem; scores are accumulated over the whole set
(``ifseg_rt.metrics``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .files import RUN_FILE, read_text
from .knn.settings import KnnSettings
from .metrics import LABEL_OFFSETS, ConfusionMatrix, SegMetrics, check_label_mode, load_label
from .runtime.model_dir import MANIFEST
from .runtime.outputs import error_message
from .runtime.preprocess import IMAGE_EXTENSIONS, ImagePolicy, load_image, upright_size

LABEL_EXTENSIONS = (".png",)


# --- the model ---------------------------------------------------------------------------------------------------
def load_segmenter(model_path, *, device: str = "auto", backend: str = "auto", precision: Optional[str] = None,
                   threads: Optional[int] = None, bpe_dir=None, policy: Optional[ImagePolicy] = None,
                   knn: Optional[Dict[str, Any]] = None):
    """A :class:`~ifseg_rt.runtime.Segmenter` for an exported model directory, a run directory or a checkpoint file.

    Parameters
    ----------
    policy : image policy for checkpoints (default: the one a run directory's run.json records, else the paper's
        short side 512); an exported model keeps its own
    knn : fields overriding the model's kNN settings (``ifseg.json``, or those the checkpoint records, else the
        paper's K = 3, 25 iterations, temperature 1), e.g. ``{"k": 5}``
    precision : an exported model's precision ("fp32", "int8", "bf16"; default: its own), or the torch compute
        precision of checkpoints ("fp32" (default), or "bf16"/"fp16" autocast)
    """
    from .runtime import Segmenter

    path = Path(model_path)
    if not path.exists():
        raise FileNotFoundError(f"model not found: {path}")
    overrides = {k: v for k, v in (knn or {}).items() if v is not None}
    if path.is_dir() and (path / MANIFEST).exists():
        opts = {"threads": threads} if threads else {}
        seg = Segmenter.load(path, backend=backend, device=device, precision=precision, **opts)
        seg.knn = seg.knn.replace(**overrides)
        return seg
    if backend not in ("auto", "torch"):
        raise ValueError(f"{path} is a checkpoint, which only the torch backend runs (got --backend {backend}); "
                         f"export it for other backends")
    from .checkpoint import load_checkpoint
    from .runtime.backends import resolve_device

    dev = resolve_device(device)
    precision = precision or "fp32"
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"a checkpoint runs in fp32, bf16 or fp16 (torch), not {precision!r}; export it for int8")
    if precision == "fp16" and not dev.startswith("cuda"):
        raise ValueError("--precision fp16 needs a CUDA device")
    loaded = load_checkpoint(path, device=dev)
    model = loaded.model
    if loaded.kind != "segofa":
        raise ValueError(f"{loaded.path} is a plain OFA checkpoint without a category head; adapt it first "
                         f"(python -m ifseg_rt adapt --checkpoint {path} ...)")
    categories = loaded.categories
    if not model.has_prompt:
        if categories is None or bpe_dir is None:
            raise ValueError(f"{loaded.path} carries no prompt token ids; pass --bpe-dir to tokenize its "
                             f"categories{'' if categories else ' (and it names no categories either)'}")
        from .tokenizer import OFATokenizer, build_ifseg_prompt

        prompt = build_ifseg_prompt(OFATokenizer.from_dir(bpe_dir), categories,
                                    **({"prefix": loaded.prompt_prefix} if loaded.prompt_prefix else {}),
                                    max_length=model.config.max_positions)
        model.set_categories(prompt.src_ids, prompt.category_ids, update_table=False)
    settings = (loaded.knn or KnnSettings()).replace(**overrides)
    if policy is None and path.is_dir() and (path / RUN_FILE).is_file():  # the size the run adapted / validated for
        try:
            recorded = json.loads(read_text(path / RUN_FILE)).get("image_policy")
            policy = ImagePolicy.from_dict(recorded) if recorded else None
        except (ValueError, TypeError, AttributeError) as e:
            raise ValueError(f"{path / RUN_FILE}: its image_policy cannot be read ({e}); pass --short-side") from None
    return Segmenter.from_model(model, categories, policy=policy, knn=settings, device=dev, dtype=precision,
                                threads=threads)


# --- data --------------------------------------------------------------------------------------------------------
def find_pairs(images_dir, labels_dir, *, limit: Optional[int] = None) -> List[Tuple[Path, Path]]:
    """(image, label) pairs matched by file stem, sorted by stem; every image must have a label map."""
    images_dir, labels_dir = Path(images_dir), Path(labels_dir)
    for d, what in ((images_dir, "images"), (labels_dir, "labels")):
        if not d.is_dir():
            raise FileNotFoundError(f"{what} directory not found: {d}")
    images = _by_stem(images_dir, IMAGE_EXTENSIONS, "image")
    labels = _by_stem(labels_dir, LABEL_EXTENSIONS, "label map")
    if not images:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {images_dir}")
    missing = sorted(set(images) - set(labels))
    if missing:
        shown = ", ".join(images[s].name for s in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ValueError(f"{len(missing)} image(s) in {images_dir} have no label map (<stem>.png) in {labels_dir}: "
                         f"{shown}")
    stems = sorted(images)
    if limit is not None:
        stems = stems[:limit]
    return [(images[s], labels[s]) for s in stems]


def check_pairs(pairs: Sequence[Tuple[Any, Any]]) -> None:
    """Read the header of every image and label map of ``pairs`` (no pixels are decoded): each must be readable,
    each label map single-channel, and equal in size to its image (as :func:`load_image` turns it upright). Meant for
    a long job (adapting with validation) that would otherwise meet a bad pair only when it first validates.

    Raises ``ValueError`` naming the bad files (the first five) and how many pairs are bad.
    """
    from PIL import Image

    def label_size(path) -> Tuple[int, int]:  # label maps are read as stored (no EXIF orientation)
        with Image.open(path) as im:
            check_label_mode(im, path)
            return im.height, im.width

    bad: List[str] = []
    for image_path, label_path in pairs:
        try:
            try:
                hw = upright_size(image_path)
            except (OSError, SyntaxError) as e:
                raise ValueError(f"cannot read image {image_path}: {e}") from None
            try:
                lhw = label_size(label_path)
            except (OSError, SyntaxError) as e:
                raise ValueError(f"cannot read label map {label_path}: {e}") from None
            if hw != lhw:
                raise ValueError(f"label map {label_path} is {lhw[0]}x{lhw[1]} px but image {image_path} is "
                                 f"{hw[0]}x{hw[1]} px")
        except ValueError as e:
            bad.append(str(e))
    if bad:
        raise ValueError(f"{len(bad)} of {len(pairs)} image/label pair(s) cannot be used: " + "; ".join(bad[:5]) +
                         (" ..." if len(bad) > 5 else ""))


def _by_stem(folder: Path, extensions: Sequence[str], what: str) -> Dict[str, Path]:
    out: Dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in extensions:
            if p.stem in out:
                raise ValueError(f"two {what} files with the stem {p.stem!r} in {folder}: {out[p.stem].name}, {p.name}")
            out[p.stem] = p
    return out


# --- evaluation --------------------------------------------------------------------------------------------------
@dataclass
class EvalResult:
    metrics: Dict[str, SegMetrics]  # "raw" and (with kNN) "knn"
    num_images: int
    seconds: float
    knn: Optional[KnnSettings] = None  # the settings of the "knn" scores
    ignored: Optional[float] = None  # fraction of the label pixels that were ignore pixels (0 / 255 with offset 1)
    failed: List[str] = field(default_factory=list)  # with skip_errors: one message per image not scored, naming it


PredictionHook = Callable[[Path, Dict[str, np.ndarray]], None]


def evaluate(segmenter, pairs: Sequence[Tuple[Path, Path]], *, label_offset: Optional[int] = None,
             knn: Optional[bool] = None, progress: bool = False, on_prediction: Optional[PredictionHook] = None,
             batch_size: int = 1, skip_errors: bool = False) -> EvalResult:
    """Accumulate plain (``"raw"``) and kNN (``"knn"``) confusion matrices over ``pairs`` with ``segmenter``.

    Parameters
    ----------
    label_offset : how label values map to classes (:func:`~ifseg_rt.metrics.decode_labels`); None: per file, 0 for
        the label maps ifseg_rt writes (``segment``'s), else 1 (ADE-style)
    knn : also score with the segmenter's kNN settings (default: when they are enabled)
    batch_size : images per engine call (images of equal network size are batched; the scores do not change)
    on_prediction : called with (image path, {"raw": labels, "knn": labels}) for every image
    skip_errors : an image or label map that cannot be used (unreadable, sizes differ) is reported in
        ``EvalResult.failed`` and the others are scored (as ``eval --ray`` does); default: raise

    Raises ``ValueError`` naming the file when an image or label map cannot be used (unless ``skip_errors``).
    """
    if label_offset is not None and label_offset not in LABEL_OFFSETS:
        raise ValueError(f"label_offset must be one of {LABEL_OFFSETS} or None, got {label_offset}")
    settings = scoring_knn(segmenter, knn)
    num_classes = len(segmenter.categories)
    cms = {"raw": ConfusionMatrix(num_classes)}
    if settings is not None:
        cms["knn"] = ConfusionMatrix(num_classes)
    t0 = time.perf_counter()
    it = pairs
    if progress:
        try:
            from tqdm import tqdm
        except ImportError:  # the runtime alone has no tqdm: no progress bar then
            tqdm = None
        if tqdm is not None:
            it = tqdm(pairs, desc="eval", unit="img", dynamic_ncols=True)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    ignored = total = scored = 0
    failed: List[str] = []

    def predictions(chunk):
        try:
            return list(zip(chunk, predict_pairs(segmenter, chunk, label_offset=label_offset, knn=settings,
                                                 batch_size=batch_size)))
        except (ValueError, FileNotFoundError, TypeError):
            if not skip_errors:
                raise
        out = []  # one image at a time, to tell the bad ones from the others
        for pair in chunk:
            try:
                out.append((pair, predict_pair(segmenter, *pair, label_offset=label_offset, knn=settings)))
            except (ValueError, FileNotFoundError, TypeError) as e:
                failed.append(error_message(str(pair[0]), str(e)))
        return out

    chunk: List[Tuple[Path, Path]] = []
    for k, pair in enumerate(it):
        chunk.append(pair)
        if len(chunk) < batch_size and k + 1 < len(pairs):
            continue
        for (image_path, _), (pred, gt) in predictions(chunk):
            ignored, total, scored = ignored + int((gt == num_classes).sum()), total + gt.size, scored + 1
            for name, labels in pred.items():
                cms[name].update(labels, gt)
            if on_prediction is not None:
                on_prediction(Path(image_path), pred)
        chunk = []
    return EvalResult(metrics={k: cm.metrics() for k, cm in cms.items()}, num_images=scored,
                      seconds=time.perf_counter() - t0, knn=settings, ignored=ignored / max(total, 1), failed=failed)


def scoring_knn(segmenter, knn: Optional[bool] = None) -> Optional[KnnSettings]:
    """The kNN settings the ``"knn"`` scores use (the segmenter's, switched on), or None when ``knn`` is False, or
    None and the segmenter's kNN is disabled."""
    if knn is None:
        knn = segmenter.knn.enabled
    return segmenter.knn.replace(enabled=True) if knn else None


def predict_pair(segmenter, image_path, label_path, *, label_offset: Optional[int] = None,
                 knn: Optional[KnnSettings] = None
                 ) -> Tuple[Dict[str, np.ndarray], np.ndarray]:
    """One evaluation image: ({"raw": labels, "knn": labels (only with ``knn`` settings)}, decoded label map with
    ignore = M), from one forward pass. ``evaluate`` and ``eval --ray`` (:mod:`ifseg_rt.distributed`) score every
    image through this function.

    Raises ``ValueError`` naming the file for an unreadable image or label map and for differing sizes.
    """
    return predict_pairs(segmenter, [(image_path, label_path)], label_offset=label_offset, knn=knn)[0]


def predict_pairs(segmenter, pairs: Sequence[Tuple[Any, Any]], *, label_offset: Optional[int] = None,
                  knn: Optional[KnnSettings] = None, batch_size: int = 8
                  ) -> List[Tuple[Dict[str, np.ndarray], np.ndarray]]:
    """:func:`predict_pair` for several images, their engine calls batched (equal network sizes share one)."""
    num_classes = len(segmenter.categories)
    images, gts = [], []
    for image_path, label_path in pairs:
        image = load_image(image_path)
        gt = load_label(label_path, num_classes, label_offset=label_offset)
        if gt.shape != image.shape[:2]:
            raise ValueError(f"label map {label_path} is {gt.shape[0]}x{gt.shape[1]} px but image {image_path} is "
                             f"{image.shape[0]}x{image.shape[1]} px")
        images.append(image)
        gts.append(gt)
    results = []
    for out, gt in zip(segmenter.infer(images, batch_size=batch_size), gts):
        pred = {"raw": segmenter.finish(out, knn=False).labels}
        if knn is not None:
            pred["knn"] = segmenter.finish(out, knn=knn).labels
        results.append((pred, gt))
    return results


def result_dict(result: EvalResult, categories: Sequence[str], **extra: Any) -> Dict[str, Any]:
    """JSON-ready report: ``metrics`` = {"raw": ..., "knn": ...} in percent (see ``SegMetrics.to_dict``), the image
    count, the categories and the ``extra`` fields."""
    out: Dict[str, Any] = dict(extra)
    out.update({"images": result.num_images, "seconds": round(result.seconds, 3), "categories": list(categories),
                "metrics": {name: m.to_dict(categories) for name, m in result.metrics.items()}})
    return out
