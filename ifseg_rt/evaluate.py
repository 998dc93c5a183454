"""mIoU of a model on a folder of images + PNG label maps (ifseg.md §11-§13).

Usage::

    python -m ifseg_rt eval --model RUN_DIR --images val/images --labels val/labels --json metrics.json

``--model`` is an adaptation run directory (``model.safetensors``), an ifseg_rt / IFSeg checkpoint file, or an
exported model directory (``ifseg.json``, served by ``ifseg_rt.runtime.Segmenter``). Images and label maps are
matched by file stem. Every image goes through the paper's preprocessing (``ifseg_rt.runtime.preprocess``), one
forward pass, and ``ifseg_rt.runtime.postprocess`` twice: plain (logits resized to the original size) and with the
kNN post-processing (``--knn``, the † numbers). Scores are accumulated over the whole set (``ifseg_rt.metrics``).

The model is hidden behind a *predictor*: ``HxWx3 uint8 image -> RawPrediction(logits NxM, features NxC, grid,
size)``, so that torch models and exported models are evaluated by the same code.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ._argtypes import positive_int
from .metrics import LABEL_OFFSETS, ConfusionMatrix, SegMetrics, format_table, load_label
from .runtime.postprocess import labels_from_scores, postprocess
from .runtime.preprocess import PATCH, ImagePolicy, load_image, preprocess

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
LABEL_EXTENSIONS = (".png",)
EXPORTED_MARKER = "ifseg.json"  # an exported model directory (ifseg_rt.export)


@dataclass
class RawPrediction:
    """Per-cell model outputs for one image."""

    logits: np.ndarray  # NxM float32, row-major cells
    features: Optional[np.ndarray]  # NxC ResNet layer3 features for kNN, or None
    grid: Tuple[int, int]  # (h, w), N = h * w
    size: Tuple[int, int]  # (H0, W0) original image size, where labels are scored


Predictor = Callable[[np.ndarray], RawPrediction]


# --- predictors ------------------------------------------------------------------------------------------------
def torch_predictor(model, *, device="cpu", precision: str = "fp32", policy: ImagePolicy = ImagePolicy()
                    ) -> Predictor:
    """Wrap a SegOFA (torch) as a :data:`Predictor`. The model is run in eval mode (its mode is restored after).

    Parameters
    ----------
    precision : "fp32", or "bf16"/"fp16" autocast (fp16 on CUDA only)
    """
    import torch

    dt = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    dev = torch.device(device)

    def predict(image: np.ndarray) -> RawPrediction:
        x, size = preprocess(image, policy)
        was_training = model.training
        model.eval()
        try:
            autocast = torch.autocast(dev.type, dtype=dt) if dt is not None else contextlib.nullcontext()
            with torch.no_grad(), autocast:
                logits, features = model(torch.from_numpy(x).to(dev))
        finally:
            model.train(was_training)
        H, W = x.shape[-2:]
        grid = (math.ceil(H / PATCH), math.ceil(W / PATCH))
        return RawPrediction(logits=logits[0].float().cpu().numpy(), features=features[0].float().cpu().numpy(),
                             grid=grid, size=size)

    return predict


def segmenter_predictor(segmenter) -> Predictor:
    """Wrap an exported model's :class:`ifseg_rt.runtime.Segmenter` as a :data:`Predictor`.

    Uses the segmenter's own preprocessing (``segmenter.preprocess(image) -> (3xHxW, (H0, W0))``, with the policy
    stored in ``ifseg.json``) and its engine (``segmenter.backend.run(1x3xHxW) -> (1xNxM logits, 1xNxC features)``),
    i.e. everything before post-processing; evaluation then post-processes both ways itself.
    """
    if not (callable(getattr(segmenter, "preprocess", None)) and callable(getattr(getattr(segmenter, "backend", None),
                                                                                  "run", None))):
        raise TypeError(f"{type(segmenter).__name__} lacks preprocess(image) and backend.run(batch), which "
                        f"evaluation needs for the per-cell logits and features before post-processing")

    def predict(image: np.ndarray) -> RawPrediction:
        x, size = segmenter.preprocess(image)
        logits, features = segmenter.backend.run(np.ascontiguousarray(x[None], dtype=np.float32))
        logits = _to_numpy(logits)[0].astype(np.float32, copy=False)
        features = None if features is None else _to_numpy(features)[0]
        H, W = x.shape[-2:]
        return RawPrediction(logits=logits, features=features, grid=(math.ceil(H / PATCH), math.ceil(W / PATCH)),
                             size=(int(size[0]), int(size[1])))

    return predict


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor from the torch / TensorRT backends
        x = x.detach().float().cpu().numpy()
    return np.asarray(x)


def _runtime_device(device: str) -> str:
    if device != "auto":
        return device
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def load_predictor(model_path, *, device: str = "auto", precision: str = "fp32", bpe_dir=None,
                   policy: ImagePolicy = ImagePolicy()) -> Tuple[Predictor, List[str]]:
    """(predictor, category names) for a run directory, a checkpoint file or an exported model directory.

    ``policy`` applies to checkpoints; an exported model preprocesses with its own (stored) policy.
    """
    path = Path(model_path)
    if not path.exists():
        raise FileNotFoundError(f"model not found: {path}")
    if path.is_dir() and (path / EXPORTED_MARKER).exists():
        try:
            from ifseg_rt.runtime import Segmenter
        except ImportError as e:
            raise ValueError(f"{path} is an exported model directory ({EXPORTED_MARKER}); evaluating it needs "
                             f"ifseg_rt.runtime.Segmenter, which is not available in this build ({e})") from None
        seg = Segmenter.load(path, device=_runtime_device(device))
        return segmenter_predictor(seg), list(seg.categories)

    from .adapt.trainer import resolve_device
    from .checkpoint import load_checkpoint

    dev = resolve_device(device)
    if precision == "fp16" and dev.type != "cuda":
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
    if categories is None:
        categories = [f"class_{i}" for i in range(model.num_categories)]
    return torch_predictor(model, device=dev, precision=precision, policy=policy), list(categories)


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


def evaluate(predictor: Predictor, pairs: Sequence[Tuple[Path, Path]], num_classes: int, *, label_offset: int = 1,
             knn: bool = True, knn_k: int = 3, knn_iters: int = 25, knn_backend: str = "auto",
             progress: bool = False) -> EvalResult:
    """Accumulate plain (``"raw"``) and kNN (``"knn"``) confusion matrices over ``pairs``.

    Raises ``ValueError`` naming the file when a label map's size differs from its image's.
    """
    if label_offset not in LABEL_OFFSETS:
        raise ValueError(f"label_offset must be one of {LABEL_OFFSETS}, got {label_offset}")
    cms = {"raw": ConfusionMatrix(num_classes)}
    if knn:
        cms["knn"] = ConfusionMatrix(num_classes)
    t0 = time.perf_counter()
    it = pairs
    if progress:
        from tqdm import tqdm

        it = tqdm(pairs, desc="eval", unit="img", dynamic_ncols=True)
    for image_path, label_path in it:
        image = load_image(image_path)
        gt = load_label(label_path, num_classes, label_offset=label_offset)
        if gt.shape != image.shape[:2]:
            raise ValueError(f"label map {label_path} is {gt.shape[0]}x{gt.shape[1]} px but image {image_path} is "
                             f"{image.shape[0]}x{image.shape[1]} px")
        pred = predictor(image)
        if pred.logits.shape != (pred.grid[0] * pred.grid[1], num_classes):
            raise ValueError(f"model returned logits of shape {pred.logits.shape} for grid {pred.grid} and "
                             f"M = {num_classes} categories")
        cms["raw"].update(labels_from_scores(pred.logits, pred.grid, pred.size), gt)
        if knn:
            if pred.features is None:
                raise ValueError("kNN post-processing needs the model's features; this model returns none "
                                 "(use --no-knn)")
            labels, _ = postprocess(pred.logits, pred.grid, pred.size, features=pred.features, knn_k=knn_k,
                                    knn_iters=knn_iters, knn_backend=knn_backend)
            cms["knn"].update(labels, gt)
    return EvalResult(metrics={k: cm.metrics() for k, cm in cms.items()}, num_images=len(pairs),
                      seconds=time.perf_counter() - t0)


def result_dict(result: EvalResult, categories: Sequence[str], **extra: Any) -> Dict[str, Any]:
    """JSON-ready report: ``metrics`` = {"raw": ..., "knn": ...} in percent (see ``SegMetrics.to_dict``), the image
    count, the categories and the ``extra`` fields."""
    out: Dict[str, Any] = dict(extra)
    out.update({"images": result.num_images, "seconds": round(result.seconds, 3), "categories": list(categories),
                "metrics": {name: m.to_dict(categories) for name, m in result.metrics.items()}})
    return out


# --- CLI ---------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ifseg_rt eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True,
                   help="adaptation run directory, ifseg_rt/IFSeg checkpoint file, or exported model directory")
    p.add_argument("--images", required=True, help="folder of images (jpg/png/...)")
    p.add_argument("--labels", required=True, help="folder of PNG label maps, matched to the images by file stem")
    p.add_argument("--label-offset", type=int, choices=LABEL_OFFSETS, default=1,
                   help="1: stored 0 and 255 are ignored and v is class v-1 (ADE-style); 0: values are class ids, "
                        "255 ignored")
    p.add_argument("--knn", action=argparse.BooleanOptionalAction, default=True,
                   help="also score with the kNN post-processing (the paper's dagger numbers)")
    p.add_argument("--knn-k", type=int, default=3, help="neighbours per cell, the cell itself included")
    p.add_argument("--knn-iters", type=int, default=25, help="kNN averaging iterations")
    p.add_argument("--knn-backend", default="auto", choices=("auto", "cuda", "cpu", "numpy"),
                   help="ifseg_rt.knn backend")
    p.add_argument("--json", dest="json_out", default=None, help="write the metrics (percent) to this JSON file")
    p.add_argument("--limit", type=positive_int, default=None, help="evaluate only the first N images (by stem)")
    p.add_argument("--device", default="auto", help="torch device for checkpoints: auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"),
                   help="compute precision of checkpoint models (bf16/fp16 = autocast)")
    p.add_argument("--short-side", type=positive_int, default=512,
                   help="checkpoints: resize the short image side to this (the paper's evaluation: 512)")
    p.add_argument("--max-long-side", type=positive_int, default=2048,
                   help="checkpoints: cap the long image side at this (the paper: 2048)")
    p.add_argument("--bpe-dir", default=None,
                   help="OFA BPE files, only for checkpoints that name their categories but carry no token ids")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        pairs = find_pairs(args.images, args.labels, limit=args.limit)
        policy = ImagePolicy(short_side=args.short_side, max_long_side=args.max_long_side)
        predictor, categories = load_predictor(args.model, device=args.device, precision=args.precision,
                                               bpe_dir=args.bpe_dir, policy=policy)
        result = evaluate(predictor, pairs, len(categories), label_offset=args.label_offset, knn=args.knn,
                          knn_k=args.knn_k, knn_iters=args.knn_iters, knn_backend=args.knn_backend,
                          progress=not args.no_progress)
    except (ValueError, FileNotFoundError, TypeError) as e:
        raise SystemExit(f"error: {e}") from None
    print(format_table(result.metrics, categories))
    summary = "  ".join(f"{k}: mIoU {100 * m.miou:.2f}" for k, m in result.metrics.items())
    print(f"\n{result.num_images} images in {result.seconds:.1f} s  {summary}")
    if args.json_out:
        report = result_dict(result, categories, model=str(args.model), images_dir=str(args.images),
                             labels_dir=str(args.labels), label_offset=args.label_offset,
                             knn={"enabled": args.knn, "k": args.knn_k, "iters": args.knn_iters})
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
