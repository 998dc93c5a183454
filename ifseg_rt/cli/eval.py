"""``python -m ifseg_rt eval``: mIoU of a model on a folder of images + PNG label maps (:mod:`ifseg_rt.evaluate`),
in one process or with ``--ray`` on Ray Data (:func:`ifseg_rt.distributed.evaluate_dataset`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List

from ..distributed import evaluate_dataset
from ..evaluate import evaluate, find_pairs, load_segmenter, result_dict
from ..metrics import format_table
from ..runtime import ModelDirError
from ..runtime.preprocess import ImagePolicy
from . import UsageError
from .args import (HelpFormatter, add_engine_arguments, add_knn_backend_argument, add_label_offset_argument,
                   add_ray_arguments, check_output_apart, check_output_file, check_ray_arguments, examples,
                   non_negative_int, positive_int)

IGNORED_WARNING = 0.5  # warn when more of the label pixels than this are ignore pixels


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
    add_label_offset_argument(p)
    p.add_argument("--knn", action=argparse.BooleanOptionalAction, default=None,
                   help="also score with the kNN post-processing (the paper's dagger numbers); default: when the "
                        "model's kNN settings enable it")
    p.add_argument("--knn-k", type=positive_int, default=None, help="override the model's kNN neighbours per cell")
    p.add_argument("--knn-iters", type=non_negative_int, default=None,
                   help="override the model's kNN averaging iterations")
    p.add_argument("--temperature", type=float, default=None, help="override the model's softmax temperature")
    add_knn_backend_argument(p)
    p.add_argument("--json", dest="json_out", default=None, help="write the metrics (percent) to this JSON file")
    p.add_argument("--limit", type=positive_int, default=None, help="evaluate only the first N images (by stem)")
    p.add_argument("--batch-size", type=positive_int, default=1,
                   help="images per engine call (equal network sizes are batched; the scores do not change)")
    add_engine_arguments(p, threads_help="CPU threads of the engine",
                         precision_help="an exported model's precision (default: the one it was exported for), or "
                                        "the compute precision of checkpoints (default fp32; bf16/fp16 = autocast)")
    p.add_argument("--short-side", type=positive_int, default=None,
                   help="checkpoints: resize the short image side to this (default: the size a run directory "
                        "recorded, else the paper's evaluation: 512)")
    p.add_argument("--max-long-side", type=positive_int, default=None,
                   help="checkpoints: cap the long image side at this (default: a run's, else the paper's 2048)")
    p.add_argument("--bpe-dir", default=None,
                   help="OFA BPE files, only for checkpoints that name their categories but carry no token ids")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_ray_arguments(p, command="eval")
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    check_ray_arguments(p, args)
    overrides = [flag for flag, v in (("--knn-k", args.knn_k), ("--knn-iters", args.knn_iters),
                                      ("--temperature", args.temperature)) if v is not None]
    if args.knn is False and overrides:
        p.error(f"{', '.join(overrides)} set(s) the kNN scores, which --no-knn switches off")
    if args.ray is not None and args.batch_size != 1:
        p.error("--batch-size applies to single-process eval; with --ray each actor scores one image at a time")
    try:
        check_output_file(args.json_out, "--json")
        check_output_apart(args.json_out, "--json", [args.model, args.images, args.labels])
    except argparse.ArgumentTypeError as e:
        p.error(str(e))
    failed: List[str] = []
    try:
        pairs = find_pairs(args.images, args.labels, limit=args.limit)
        policy = None  # a run directory's recorded policy, else the paper's
        if args.short_side is not None or args.max_long_side is not None:
            short = args.short_side or 512
            policy = ImagePolicy(short_side=short, max_long_side=args.max_long_side or max(2048, short))
        knn = {"k": args.knn_k, "iters": args.knn_iters, "temperature": args.temperature}
        if args.ray is not None:  # the same per-image scoring (predict_pair) on a Ray actor pool
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
            result = evaluate(seg, pairs, label_offset=args.label_offset, knn=args.knn, progress=not args.no_progress,
                              batch_size=args.batch_size, skip_errors=True)
            categories, failed = list(seg.categories), result.failed
    except (ValueError, FileNotFoundError, TypeError, ModelDirError, RuntimeError, ImportError) as e:
        raise UsageError(str(e)) from None
    for e in failed:
        print(f"error: {e}", file=sys.stderr)
    print(format_table(result.metrics, categories))
    summary = "  ".join(f"{k}: mIoU {100 * m.miou:.2f}" for k, m in result.metrics.items())
    print(f"\n{result.num_images} images in {result.seconds:.1f} s  {summary}")
    if result.ignored is not None and result.ignored > IGNORED_WARNING:
        how = {None: "auto: 1 unless the maps are ifseg_rt's", 0: "0", 1: "1"}[args.label_offset]
        print(f"warning: {100 * result.ignored:.0f} % of the label pixels were ignored (--label-offset {how}: "
              f"stored 255{' and 0' if args.label_offset != 0 else ''} mean ignore); if your label maps store class "
              f"ids from 0, pass --label-offset 0", file=sys.stderr)
    if args.json_out:
        report = result_dict(result, categories, model=str(args.model), images_dir=str(args.images),
                             labels_dir=str(args.labels),
                             label_offset="auto" if args.label_offset is None else args.label_offset,
                             knn=result.knn.to_dict() if result.knn else {"enabled": False})
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json_out}")
    if failed:
        print(f"error: {len(failed)} image(s) could not be scored; the metrics cover the other {result.num_images}",
              file=sys.stderr)
    return 1 if failed else 0
