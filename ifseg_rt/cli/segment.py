"""``python -m ifseg_rt segment``: label maps (+ overlays) for images, folders, globs, list files (torch-free unless
``--backend torch``); ``--ray`` runs the same per-image loop on Ray Data (:mod:`ifseg_rt.distributed`)."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional, Sequence

from ..runtime import Segmenter
from ..runtime.inputs import check_outputs_apart, list_images, local_path
from ..runtime.outputs import OutputDir, output_names, segment_files, summary_line
from .args import (HelpFormatter, add_model_arguments, add_ray_arguments, check_output_dir, check_output_file,
                   check_ray_arguments, examples, positive_int, segmenter_options)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m ifseg_rt segment", formatter_class=HelpFormatter,
        description="Segment images (files or folders) with an exported model: palette PNG label maps (+ overlays "
                    "with a legend) and one summary line per image; --ray runs it on Ray Data (local or a cluster) "
                    "with a Parquet table of every image.",
        epilog=examples("python -m ifseg_rt segment --model models/street photos/ --out labels/ --overlay",
                        "python -m ifseg_rt segment --model models/street 'photos/*.jpg' --out labels/ "
                        "--batch-size 4 --precision int8",
                        "python -m ifseg_rt segment --model models/street images.txt --out labels/ --ray"))
    p.add_argument("inputs", nargs="+", help="image files, folders (not recursive), globs ('photos/**/*.jpg'), list "
                                             "files (.txt/.lst: one image per line; relative paths are read from the "
                                             "list file's folder) and, with --ray, URIs (s3://..., gs://...)")
    p.add_argument("--out", required=True, help="output folder for <name>.png label maps")
    p.add_argument("--overlay", action="store_true", help="also write <name>.overlay.jpg (labels over the image)")
    p.add_argument("--batch-size", type=positive_int, default=1, help="images of equal network size per forward")
    p.add_argument("--no-progress", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("--overwrite", "--force", action="store_true",
                   help="segment every image again; by default a re-run skips images whose outputs exist")
    add_model_arguments(p)
    add_ray_arguments(p, command="segment")
    args = p.parse_args(argv)
    check_ray_arguments(p, args)
    try:  # local outputs (a folder, the --ray table) must be writable before any work
        if local_path(args.out) is not None:
            check_output_dir(local_path(args.out), "--out")
        if args.table is not None and local_path(args.table) is not None:
            check_output_file(local_path(args.table), "--table")
    except argparse.ArgumentTypeError as e:
        p.error(str(e))
    if args.ray is not None:
        return _segment_on_ray(args)
    try:
        paths = list_images(args.inputs)
        check_outputs_apart(paths, args.out)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        seg = Segmenter.load(args.model, **segmenter_options(args))
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
    done = skipped = 0
    # names come from the whole input list (runtime.outputs), exactly as on Ray
    try:
        for rec in segment_files(seg, paths, output_names(paths), out, overlay=args.overlay,
                                 batch_size=args.batch_size, skip_existing=not args.overwrite):
            if bar is not None:
                bar.update(1)
            if rec.error is not None:
                failed.append(rec.error)  # names the input once
                print(f"error: {rec.error}", file=sys.stderr)
                continue
            done += 1
            skipped += rec.skipped
            say(summary_line(rec, seg.categories))
    except OSError as e:  # the output folder: full disk, permissions, ...
        print(f"error: cannot write to {args.out}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"{done}/{len(paths)} images done in {out}; run the same command again to continue "
                                f"(images whose outputs exist are skipped)") from None
    finally:
        if bar is not None:
            bar.close()
    print(f"wrote {done - skipped} label map(s) to {out}" + (f", kept {skipped} from before" if skipped else "")
          + (f"; {len(failed)} failed" if failed else ""))
    return 1 if failed else 0

def _segment_on_ray(args: argparse.Namespace) -> int:
    """``segment ... --ray``: the same flags, each actor's Segmenter loaded with :func:`segmenter_options`."""
    from ..distributed import segment_dataset

    opts = segmenter_options(args)
    opts.pop("threads", None)  # per actor: from the pool plan
    done = [0]
    try:
        summary = segment_dataset(args.inputs, args.model, args.out, overlay=args.overlay,
                                  batch_size=args.batch_size, address=args.ray, actors=args.actors,
                                  threads=args.threads, gpus_per_actor=args.gpus_per_actor, table=args.table,
                                  overwrite=args.overwrite, progress=not args.no_progress,
                                  on_error=lambda e: print(f"error: {e}", file=sys.stderr),
                                  on_progress=lambda n: done.__setitem__(0, n), **opts)
    except (OSError, ValueError, RuntimeError, ImportError) as e:  # RayUnavailable, ModelDirError included
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"{done[0]} images done in {args.out} (their label maps are written; the table "
                                f"is not); run the same command again to continue (images whose outputs exist are "
                                f"skipped)") from None
    p = summary.plan
    print(f"{summary.images} image(s) on {p.actors} actor(s) x {p.threads} thread(s)"
          + (f" x {p.num_gpus:g} GPU" if p.num_gpus else "") + f" in {summary.seconds:.1f} s")
    print(summary.line())
    return 1 if summary.failed else 0
