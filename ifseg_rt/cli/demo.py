"""``python -m ifseg_rt demo``: IFSeg end to end on the embedded nano model and its synthetic world
(:mod:`ifseg_rt.nano.demo`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from ..nano.demo import (NANO_DIR, QUICK, DemoSettings, format_results, parse_demo_categories, prepare_out,
                         run_demo)
from ..world import CATEGORY_NAMES, DEFAULT_DEMO_CATEGORIES
from ..adapt.options import MAX_LR
from ..checkpoint import CheckpointError
from .args import (HelpFormatter, check_output_dir, examples, non_negative_int, patch_multiple, positive_int,
                   positive_thread_count)



def build_parser() -> argparse.ArgumentParser:
    d, q = DemoSettings(), QUICK
    p = argparse.ArgumentParser(
        prog="python -m ifseg_rt demo", formatter_class=HelpFormatter,
        description="IFSeg end to end on the embedded nano model and its synthetic world: held-out scenes, the "
                    "un-adapted baseline, image-free adaptation, export, segmentation through the runtime, an mIoU "
                    "table and overlay panels (a few minutes on a laptop CPU).",
        epilog=examples("python -m ifseg_rt demo                          # 14 default categories",
                        'python -m ifseg_rt demo --categories "sky, grass, water, sand, brick, snow, ball, star"',
                        "python -m ifseg_rt demo --quick --out /tmp/demo  # seconds: checks the pipeline only",
                        "python -m ifseg_rt demo --out demo_out --overwrite"))
    p.add_argument("--categories", default=None,
                   help=f"comma-separated names from the synthetic world (default: {', '.join(DEFAULT_DEMO_CATEGORIES)}"
                        f"; all: {', '.join(CATEGORY_NAMES)})")
    p.add_argument("--out", default="demo_out", help="output folder (scenes, run, model, overlays, results.json)")
    p.add_argument("--model", default=None, help=f"nano model folder (default: the shipped {NANO_DIR})")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes that only exercise the pipeline (seconds; the numbers mean nothing)")
    p.add_argument("--steps", type=positive_int, default=None, help=f"adaptation updates (default: {d.steps}; {q.steps} with --quick)")
    p.add_argument("--batch-size", type=positive_int, default=None, help=f"word grids per update (default: {d.batch_size}; {q.batch_size} with --quick)")
    p.add_argument("--lr", type=float, default=None, help=f"peak adaptation learning rate (default: {d.lr}; {q.lr} with --quick)")
    p.add_argument("--images", type=positive_int, default=None, help=f"evaluation scenes (default: {d.images}; {q.images} with --quick)")
    p.add_argument("--size", type=patch_multiple, default=None, help=f"scene side in px, multiple of 16 (default: {d.size}; {q.size} with --quick)")
    p.add_argument("--overlays", type=int, default=None, help=f"overlay PNGs to write (default: {d.overlays}; {q.overlays} with --quick)")
    p.add_argument("--seed", type=non_negative_int, default=1,
                   help="seed of the adaptation (word grids, dropout, new modules)")
    p.add_argument("--threads", type=positive_thread_count, default=None,
                   help="CPU threads for every engine (default: the idle cores available to this process)")
    p.add_argument("--self-train", type=positive_int, default=None, metavar="N",
                   help="after the adaptation, self-train on N unlabelled scenes (pseudo-labels from the model itself, "
                        "kNN on) and add its rows to the table (a few minutes; README: 200)")
    p.add_argument("--overwrite", action="store_true", help="replace a previous demo run in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        names = parse_demo_categories(args.categories)
    except ValueError as e:
        parser.error(str(e))
    base = QUICK if args.quick else DemoSettings()
    changes = {k: getattr(args, k) for k in ("steps", "batch_size", "lr", "images", "size", "overlays", "self_train")
               if getattr(args, k) is not None}
    if changes.get("overlays", 0) < 0:
        parser.error("--overlays must be >= 0")
    if "lr" in changes and not 0 < changes["lr"] <= MAX_LR:  # NaN fails both comparisons
        parser.error(f"--lr must be in (0, {MAX_LR:g}], got {changes['lr']}")
    try:
        check_output_dir(args.out, "--out")
    except argparse.ArgumentTypeError as e:
        parser.error(str(e))
    settings = DemoSettings(**{**base.__dict__, **changes})
    try:
        prepare_out(Path(args.out), args.overwrite)
        results = run_demo(Path(args.out), names, settings, model_dir=args.model, seed=args.seed,
                           threads=args.threads, progress=not args.no_progress)
    except (FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ValueError, CheckpointError) as e:  # a --model that is not the nano model's checkpoint and vocabulary
        print(f"error: {e}", file=sys.stderr)
        return 1
    print()
    print(f"{len(names)} categories: {', '.join(names)}; {settings.images} held-out scenes of {settings.size} px")
    print(format_results(results))
    if args.quick:
        print(f"(--quick: {settings.steps} adaptation steps on {settings.images} scenes of {settings.size} px only "
              f"exercise the pipeline; these numbers mean nothing. Drop --quick for the real demo.)")
    print(f"\nresults: {Path(args.out) / 'results.json'}   overlays: {Path(args.out) / 'overlays'}   "
          f"({results['timings_s']['total_s']:.0f} s)")
    print(f"more scenes of this world: python -m ifseg_rt segment --model {results['model_dir']} --out OUT_DIR "
          f"--overlay IMAGES...")
    print("real photos: the nano model knows only its synthetic world (on a photo it splits bright from dark). "
          "Download a real OFA\ncheckpoint and adapt it to your categories: python -m ifseg_rt download ofa-base, "
          "then the adapt command it prints.")
    return 0
