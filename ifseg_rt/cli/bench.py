"""``python -m ifseg_rt bench``: per-stage latency and throughput of an exported model, or with ``--formats`` every
backend x precision its directory offers (torch-free unless a row runs torch)."""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path
from typing import Optional, Sequence

from ..benchmark import available_cores, cpu_model, format_table, formats, measure
from ..evaluate import check_pairs, find_pairs
from ..runtime import Segmenter
from ..runtime.preprocess import MAX_PIXELS, load_image
from ..system import amx_bf16
from ..world import render_scene
from .args import (HelpFormatter, add_model_arguments, check_output_apart, check_output_file, examples, image_size,
                   non_negative_int, positive_int, segmenter_options)


def main(argv: Optional[Sequence[str]] = None) -> int:
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
    p.add_argument("--warmup", type=non_negative_int, default=2, help="untimed runs per measurement")
    p.add_argument("--repeats", type=positive_int, default=10, help="timed runs per measurement")
    p.add_argument("--json", help="also write the numbers (and the CPU model, threads, host) to this JSON file")
    p.add_argument("--no-progress", "--quiet", action="store_true", help="accepted for symmetry with the other "
                                                                         "commands (bench draws no progress bar)")
    add_model_arguments(p)
    args = p.parse_args(argv)
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if bool(args.images) != bool(args.labels):
        p.error("--images and --labels go together")
    if args.images and not args.formats:
        p.error("--images/--labels score each row of --formats; pass --formats too")
    if args.formats:  # it runs every backend x precision on the CPU, with and without kNN, one image at a time
        ignored = [flag for flag, given in (("--device", args.device not in ("auto", "cpu")),
                                            ("--backend", args.backend != p.get_default("backend")),
                                            ("--precision", args.precision is not None),
                                            ("--no-knn", args.no_knn), ("--no-verify", args.no_verify),
                                            ("--batch-size", args.batch_size != p.get_default("batch_size")))
                   if given]
        if ignored:
            p.error(f"{', '.join(ignored)} do(es) not apply with --formats, which times every backend x precision of "
                    f"the model on the CPU, with and without kNN, one image at a time")
    try:
        check_output_file(args.json, "--json")
        check_output_apart(args.json, "--json", [args.model, args.images, args.labels, *(args.image or [])])
    except argparse.ArgumentTypeError as e:
        p.error(str(e))
    try:
        if args.image:
            images = [load_image(f) for f in args.image]
        else:
            images = [render_scene(0, args.size).image]
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report = {"model": str(args.model), "device": args.device, "threads": args.threads, "cpu": cpu_model(),
              "cores": available_cores(), "amx_bf16": amx_bf16(), "host": platform.node(),
              "images": args.image or [f"synthetic scene {args.size[0]}x{args.size[1]}"]}
    amx = {True: ", AMX", False: ", no AMX", None: ""}[report["amx_bf16"]]  # why bf16 is fast or slow here
    machine = f"{report['cpu']} ({report['cores']} cores{amx}, threads {args.threads or report['cores']})"
    if args.formats:
        pairs = None
        try:
            if args.images:
                pairs = find_pairs(args.images, args.labels)
                check_pairs(pairs)  # every pair's headers, before the first row is timed
            rows = formats(args.model, images, threads=args.threads, warmup=args.warmup, repeats=args.repeats,
                           pairs=pairs)
        except (ValueError, RuntimeError, ImportError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        report["formats"] = rows
        print(f"{args.model} on {machine}")
        print(format_table(rows))
    else:
        try:
            seg = Segmenter.load(args.model, **segmenter_options(args))
        except (ValueError, RuntimeError, ImportError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        report.update(backend=seg.backend.name, precision=seg.precision, agreement=seg.agreement,
                      knn=seg.knn.to_dict(), runs=[])
        h, w = seg.spec.policy.target_size(*images[0].shape[:2])
        if max(args.batch_size) * h * w > MAX_PIXELS:
            print(f"error: --batch-size {max(args.batch_size)} of {h}x{w} px network inputs is "
                  f"{max(args.batch_size) * h * w / 1e6:.3g} Mpx in one engine call, above the "
                  f"{MAX_PIXELS / 1e6:.3g} Mpx limit of one image", file=sys.stderr)
            return 2
        print(f"{args.model}: {seg.backend.name} {seg.precision} on {machine}")
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
