"""``python -m ifseg_rt segment ...`` and ``python -m ifseg_rt bench ...`` (torch-free unless --backend torch)."""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path
from typing import List, Optional, Sequence


from .._argtypes import HelpFormatter, examples, image_size, positive_int


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory written by python -m ifseg_rt.export")
    p.add_argument("--backend", choices=("auto", "onnxruntime", "torch", "tensorrt"), default="auto",
                   help="inference engine (auto: TensorRT engine for this GPU, onnxruntime, then torch)")
    p.add_argument("--device", default="auto", help="auto (a GPU when torch sees one), cpu, cuda or cuda:N")
    p.add_argument("--threads", type=positive_int,
                   help="CPU threads of the engine and post-processing (default: the cores available to the process)")
    p.add_argument("--precision", choices=("fp32", "int8", "bf16", "fp16"),
                   help="on the CPU one of the model's precisions, by default the one it was exported for (bf16 "
                        "also runs the torch backend in bfloat16); on a GPU the torch / TensorRT compute precision, "
                        "by default bf16 / the engine's")
    p.add_argument("--no-knn", action="store_true", help="skip kNN post-processing (plain logits arg-max)")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the model files")


def segmenter_options(args) -> dict:
    """``Segmenter.load`` keyword arguments from the flags of :func:`_common` (``segment --ray`` loads each actor's
    Segmenter with them too, so both paths read the flags the same way)."""
    opts = {"backend": args.backend, "device": args.device, "verify": not args.no_verify,
            "knn": False if args.no_knn else None}
    if getattr(args, "precision", None):
        opts["precision"] = args.precision
    if args.threads and args.backend in ("onnxruntime", "torch", "auto"):
        opts["threads"] = args.threads
    return opts


def _load(args):
    from .segmenter import Segmenter

    return Segmenter.load(args.model, **segmenter_options(args))


def segment(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m ifseg_rt segment", formatter_class=HelpFormatter,
        description="Segment images (files or folders) with an exported model: palette PNG label maps (+ overlays "
                    "with a legend) and one summary line per image; --ray runs it on Ray Data (local or a cluster) "
                    "with a Parquet table of every image.",
        epilog=examples("python -m ifseg_rt segment --model models/street photos/ --out labels/ --overlay",
                        "python -m ifseg_rt segment --model models/street 'photos/*.jpg' --out labels/ "
                        "--batch-size 4 --precision int8",
                        "python -m ifseg_rt segment --model models/street images.txt --out labels/ --ray"))
    p.add_argument("inputs", nargs="+", help="image files, folders, globs, list files (.txt/.lst: one image per "
                                             "line) and, with --ray, URIs (s3://..., gs://...)")
    p.add_argument("--out", required=True, help="output folder for <name>.png label maps")
    p.add_argument("--overlay", action="store_true", help="also write <name>.overlay.jpg (labels over the image)")
    p.add_argument("--batch-size", type=positive_int, default=1, help="images of equal network size per forward")
    p.add_argument("--no-progress", "--quiet", action="store_true", help="no progress bar")
    _common(p)
    from ..distributed import add_ray_arguments, check_ray_arguments, segment_command

    add_ray_arguments(p, command="segment")
    args = p.parse_args(argv)
    check_ray_arguments(p, args)
    if args.ray is not None:
        return segment_command(args)
    from .inputs import list_images
    from .outputs import OutputDir, output_names, segment_files, summary_line

    try:
        paths = list_images(args.inputs)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    try:
        seg = _load(args)
    except (ValueError, RuntimeError, ImportError) as e:  # ModelDirError and BackendUnavailable included
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = OutputDir(args.out)
    try:
        out.root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"error: cannot use --out {args.out}: {e}", file=sys.stderr)
        return 2
    bar = None
    if not args.no_progress and len(paths) > 1:
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(paths), unit="img", file=sys.stderr)
        except ImportError:
            pass
    say = bar.write if bar is not None else print
    failed: List[str] = []
    # names come from the whole input list (runtime.outputs), exactly as on Ray
    try:
        for rec in segment_files(seg, paths, output_names(paths), out, overlay=args.overlay,
                                 batch_size=args.batch_size):
            if bar is not None:
                bar.update(1)
            if rec.error is not None:
                failed.append(rec.error)  # names the input once
                print(f"error: {rec.error}", file=sys.stderr)
                continue
            say(summary_line(rec, seg.categories))
    except OSError as e:  # the output folder: full disk, permissions, ...
        if bar is not None:
            bar.close()
        print(f"error: cannot write to {args.out}: {e}", file=sys.stderr)
        return 1
    if bar is not None:
        bar.close()
    print(f"wrote {len(paths) - len(failed)} label map(s) to {out}" + (f"; {len(failed)} failed" if failed else ""))
    return 1 if failed else 0


def bench(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m ifseg_rt bench", formatter_class=HelpFormatter,
        description="Per-stage latency (median, p90) and throughput of an exported model; with --formats a table of "
                    "every backend x precision the model directory offers (file size, label agreement with fp32 or "
                    "mIoU, ms per stage, images/s). A human-readable table; --json writes the numbers.",
        epilog=examples("python -m ifseg_rt bench --model models/street --image street.jpg --batch-size 1 4",
                        "python -m ifseg_rt bench --model models/street --formats --images val/images "
                        "--labels val/labels --json bench.json"))
    p.add_argument("--batch-size", "--batch", type=positive_int, nargs="+", default=[1],
                   help="batch sizes to measure")
    p.add_argument("--image", action="append", help="time this image (repeatable; default: a synthetic scene)")
    p.add_argument("--size", type=image_size, default=(512, 683),
                   help="original HxW of the default synthetic scene (the model's image policy then applies)")
    p.add_argument("--formats", action="store_true", help="compare every backend x precision of the model directory")
    p.add_argument("--images", help="--formats: with --labels, report each row's mIoU on this labelled folder")
    p.add_argument("--labels", help="--formats: the folder of PNG label maps for --images")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs per measurement")
    p.add_argument("--repeats", type=positive_int, default=10, help="timed runs per measurement")
    p.add_argument("--json", help="also write the numbers (and the CPU model, threads, host) to this JSON file")
    _common(p)
    args = p.parse_args(argv)
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if bool(args.images) != bool(args.labels):
        p.error("--images and --labels go together")
    if args.images and not args.formats:
        p.error("--images/--labels score each row of --formats; pass --formats too")
    from .benchmark import available_cores, cpu_model, format_table, formats, measure
    from .preprocess import load_image

    try:
        if args.image:
            images = [load_image(f) for f in args.image]
        else:
            from ..nano.world import render_scene

            images = [render_scene(0, args.size).image]
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report = {"model": str(args.model), "device": args.device, "threads": args.threads, "cpu": cpu_model(),
              "cores": available_cores(), "host": platform.node(),
              "images": args.image or [f"synthetic scene {args.size[0]}x{args.size[1]}"]}
    if args.formats:
        pairs = None
        try:
            if args.images:
                from ..evaluate import find_pairs

                pairs = find_pairs(args.images, args.labels)
            rows = formats(args.model, images, threads=args.threads, warmup=args.warmup, repeats=args.repeats,
                           pairs=pairs)
        except (ValueError, RuntimeError, ImportError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        report["formats"] = rows
        print(f"{args.model} on {report['cpu']} ({report['cores']} cores, threads {args.threads or 'default'})")
        print(format_table(rows))
    else:
        try:
            seg = _load(args)
        except (ValueError, RuntimeError, ImportError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        report.update(backend=seg.backend.name, precision=seg.precision, agreement=seg.agreement,
                      knn=seg.knn.to_dict(), runs=[])
        print(f"{args.model}: {seg.backend.name} {seg.precision} on {report['cpu']} ({report['cores']} cores, "
              f"threads {args.threads or 'default'})")
        for B in args.batch_size:
            run = measure(seg, images * B, batch=B, warmup=args.warmup, repeats=args.repeats)
            report["runs"].append(run)
            st = run["stages_ms_per_image"]
            print(f"batch {B} {run['input_size'][0]}x{run['input_size'][1]}: " + "  ".join(
                f"{k} {st[k]['median']:.1f}/{st[k]['p90']:.1f}" for k in st) + " ms (median/p90 per image); "
                f"{run['throughput_img_s']:.2f} img/s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0
