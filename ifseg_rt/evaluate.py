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

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ._argtypes import HelpFormatter, examples, non_negative_int, positive_int
from .knn.settings import KnnSettings
from .metrics import LABEL_OFFSETS, ConfusionMatrix, SegMetrics, format_table, load_label
from .runtime.model_dir import MANIFEST
from .runtime.preprocess import IMAGE_EXTENSIONS, ImagePolicy, load_image

LABEL_EXTENSIONS = (".png",)


# --- the model ---------------------------------------------------------------------------------------------------
def load_segmenter(model_path, *, device: str = "auto", backend: str = "auto", precision: Optional[str] = None,
                   threads: Optional[int] = None, bpe_dir=None, policy: Optional[ImagePolicy] = None,
                   knn: Optional[Dict[str, Any]] = None):
    """A :class:`~ifseg_rt.runtime.Segmenter` for an exported model directory, a run directory or a checkpoint file.

    Parameters
    ----------
    policy : image policy for checkpoints (default: the paper's short side 512); an exported model keeps its own
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


PredictionHook = Callable[[Path, Dict[str, np.ndarray]], None]


def evaluate(segmenter, pairs: Sequence[Tuple[Path, Path]], *, label_offset: int = 1, knn: Optional[bool] = None,
             progress: bool = False, on_prediction: Optional[PredictionHook] = None) -> EvalResult:
    """Accumulate plain (``"raw"``) and kNN (``"knn"``) confusion matrices over ``pairs`` with ``segmenter``.

    Parameters
    ----------
    knn : also score with the segmenter's kNN settings (default: when they are enabled)
    on_prediction : called with (image path, {"raw": labels, "knn": labels}) for every image

    Raises ``ValueError`` naming the file when a label map's size differs from its image's.
    """
    if label_offset not in LABEL_OFFSETS:
        raise ValueError(f"label_offset must be one of {LABEL_OFFSETS}, got {label_offset}")
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
    for image_path, label_path in it:
        pred, gt = predict_pair(segmenter, image_path, label_path, label_offset=label_offset, knn=settings)
        for name, labels in pred.items():
            cms[name].update(labels, gt)
        if on_prediction is not None:
            on_prediction(Path(image_path), pred)
    return EvalResult(metrics={k: cm.metrics() for k, cm in cms.items()}, num_images=len(pairs),
                      seconds=time.perf_counter() - t0, knn=settings)


def scoring_knn(segmenter, knn: Optional[bool] = None) -> Optional[KnnSettings]:
    """The kNN settings the ``"knn"`` scores use (the segmenter's, switched on), or None when ``knn`` is False, or
    None and the segmenter's kNN is disabled."""
    if knn is None:
        knn = segmenter.knn.enabled
    return segmenter.knn.replace(enabled=True) if knn else None


def predict_pair(segmenter, image_path, label_path, *, label_offset: int = 1, knn: Optional[KnnSettings] = None
                 ) -> Tuple[Dict[str, np.ndarray], np.ndarray]:
    """One evaluation image: ({"raw": labels, "knn": labels (only with ``knn`` settings)}, decoded label map with
    ignore = M), from one forward pass. ``evaluate`` and ``eval --ray`` (:mod:`ifseg_rt.distributed`) score every
    image through this function.

    Raises ``ValueError`` naming the file for an unreadable image or label map and for differing sizes.
    """
    num_classes = len(segmenter.categories)
    image = load_image(image_path)
    gt = load_label(label_path, num_classes, label_offset=label_offset)
    if gt.shape != image.shape[:2]:
        raise ValueError(f"label map {label_path} is {gt.shape[0]}x{gt.shape[1]} px but image {image_path} is "
                         f"{image.shape[0]}x{image.shape[1]} px")
    out = segmenter.infer([image])[0]
    pred = {"raw": segmenter.finish(out, knn=False).labels}
    if knn is not None:
        pred["knn"] = segmenter.finish(out, knn=knn).labels
    return pred, gt


def result_dict(result: EvalResult, categories: Sequence[str], **extra: Any) -> Dict[str, Any]:
    """JSON-ready report: ``metrics`` = {"raw": ..., "knn": ...} in percent (see ``SegMetrics.to_dict``), the image
    count, the categories and the ``extra`` fields."""
    out: Dict[str, Any] = dict(extra)
    out.update({"images": result.num_images, "seconds": round(result.seconds, 3), "categories": list(categories),
                "metrics": {name: m.to_dict(categories) for name, m in result.metrics.items()}})
    return out


# --- CLI ---------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ifseg_rt eval", formatter_class=HelpFormatter,
        description="mIoU of a model (an exported directory, a run directory or a checkpoint) on a folder of images "
                    "+ PNG label maps, plain and with the kNN post-processing, through the same Segmenter users get.",
        epilog=examples("python -m ifseg_rt eval --model models/street --images val/images --labels val/labels",
                        "python -m ifseg_rt eval --model runs/street --images val/images --labels val/labels "
                        "--json miou.json",
                        "python -m ifseg_rt eval --model models/street --images val/images --labels val/labels "
                        "--precision int8 --ray"))
    p.add_argument("--model", required=True,
                   help="exported model directory, adaptation run directory, or ifseg_rt/IFSeg checkpoint file")
    p.add_argument("--images", required=True, help="folder of images (jpg/png/...)")
    p.add_argument("--labels", required=True, help="folder of PNG label maps, matched to the images by file stem")
    p.add_argument("--label-offset", type=int, choices=LABEL_OFFSETS, default=1,
                   help="1: stored 0 and 255 are ignored and v is class v-1 (ADE-style); 0: values are class ids, "
                        "255 ignored")
    p.add_argument("--knn", action=argparse.BooleanOptionalAction, default=None,
                   help="also score with the kNN post-processing (the paper's dagger numbers); default: when the "
                        "model's kNN settings enable it")
    p.add_argument("--knn-k", type=positive_int, default=None, help="override the model's kNN neighbours per cell")
    p.add_argument("--knn-iters", type=non_negative_int, default=None,
                   help="override the model's kNN averaging iterations")
    p.add_argument("--temperature", type=float, default=None, help="override the model's softmax temperature")
    p.add_argument("--knn-backend", default="auto", choices=("auto", "cuda", "cpu", "numpy"),
                   help="ifseg_rt.knn backend")
    p.add_argument("--json", dest="json_out", default=None, help="write the metrics (percent) to this JSON file")
    p.add_argument("--limit", type=positive_int, default=None, help="evaluate only the first N images (by stem)")
    p.add_argument("--backend", choices=("auto", "onnxruntime", "torch", "tensorrt"), default="auto",
                   help="engine for exported models (checkpoints always run on torch)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads of the engine")
    p.add_argument("--precision", default=None, choices=("fp32", "int8", "bf16", "fp16"),
                   help="an exported model's precision (default: the one it was exported for), or the compute "
                        "precision of checkpoints (default fp32; bf16/fp16 = autocast)")
    p.add_argument("--short-side", type=positive_int, default=512,
                   help="checkpoints: resize the short image side to this (the paper's evaluation: 512)")
    p.add_argument("--max-long-side", type=positive_int, default=2048,
                   help="checkpoints: cap the long image side at this (the paper: 2048)")
    p.add_argument("--bpe-dir", default=None,
                   help="OFA BPE files, only for checkpoints that name their categories but carry no token ids")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    from .distributed import add_ray_arguments

    add_ray_arguments(p, command="eval")
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    from .distributed import check_ray_arguments
    from .runtime import ModelDirError

    check_ray_arguments(p, args)
    failed: List[str] = []
    try:
        pairs = find_pairs(args.images, args.labels, limit=args.limit)
        policy = ImagePolicy(short_side=args.short_side, max_long_side=args.max_long_side)
        knn = {"k": args.knn_k, "iters": args.knn_iters, "temperature": args.temperature}
        if args.ray is not None:  # the same per-image scoring (predict_pair) on a Ray actor pool
            from .distributed import evaluate_dataset

            out = evaluate_dataset(pairs, args.model, address=args.ray, actors=args.actors, threads=args.threads,
                                   gpus_per_actor=args.gpus_per_actor, device=args.device,
                                   label_offset=args.label_offset, knn=args.knn, knn_backend=args.knn_backend,
                                   progress=not args.no_progress, backend=args.backend, precision=args.precision,
                                   bpe_dir=args.bpe_dir, policy=policy, knn_overrides=knn)
            result, categories, failed = out.result, out.categories, out.failed
        else:
            seg = load_segmenter(args.model, device=args.device, backend=args.backend, precision=args.precision,
                                 threads=args.threads, bpe_dir=args.bpe_dir, policy=policy, knn=knn)
            seg.knn_backend = args.knn_backend
            result = evaluate(seg, pairs, label_offset=args.label_offset, knn=args.knn, progress=not args.no_progress)
            categories = list(seg.categories)
    except (ValueError, FileNotFoundError, TypeError, ModelDirError, RuntimeError, ImportError) as e:
        raise SystemExit(f"error: {e}") from None
    for e in failed:
        print(f"error: {e}", file=sys.stderr)
    print(format_table(result.metrics, categories))
    summary = "  ".join(f"{k}: mIoU {100 * m.miou:.2f}" for k, m in result.metrics.items())
    print(f"\n{result.num_images} images in {result.seconds:.1f} s  {summary}")
    if args.json_out:
        report = result_dict(result, categories, model=str(args.model), images_dir=str(args.images),
                             labels_dir=str(args.labels), label_offset=args.label_offset,
                             knn=result.knn.to_dict() if result.knn else {"enabled": False})
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json_out}")
    if failed:
        print(f"error: {len(failed)} image(s) could not be scored; the metrics cover the other {result.num_images}",
              file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
