"""``python -m ifseg_rt.pretrain_nano``: pretrain the embedded nano model on the synthetic world
(:mod:`ifseg_rt.nano.pretrain`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

from ..nano import pretrain as P
from .args import (HelpFormatter, check_output_dir, examples, non_negative_int, patch_multiple, positive_int,
                   positive_thread_count)


def build_parser() -> argparse.ArgumentParser:
    d = P.PretrainOptions()
    p = argparse.ArgumentParser(
        prog="python -m ifseg_rt pretrain_nano", formatter_class=HelpFormatter,
        description="Pretrain the embedded nano VL model on the synthetic world, OFA-style (captioning, VQA, region "
                    "classification, box grounding); ~19 min on 2 cores with the defaults.",
        epilog=examples("python -m ifseg_rt pretrain_nano --out my-nano",
                        "python -m ifseg_rt pretrain_nano --out my-nano --steps 300 --batch-size 16"))
    p.add_argument("--out", default="export/nano", help="output folder (checkpoint, tokenizer, report, card)")
    p.add_argument("--steps", type=positive_int, default=d.steps, help="optimiser updates")
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size, help="samples per update")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    p.add_argument("--warmup", type=non_negative_int, default=d.warmup, help="linear warm-up steps")
    p.add_argument("--size", type=patch_multiple, default=d.size, help="scene size in px (multiple of 16)")
    p.add_argument("--seed", type=non_negative_int, default=d.seed,
                   help="seed of the data stream and the initialisation")
    p.add_argument("--threads", type=positive_thread_count, default=d.threads, help="torch CPU threads")
    p.add_argument("--eval-samples", type=non_negative_int, default=96,
                   help="held-out samples per task/input (0: skip)")
    p.add_argument("--log-every", type=positive_int, default=50, help="loss window in steps")
    p.add_argument("--no-card", action="store_true", help="do not write CARD.md")
    p.add_argument("--no-progress", action="store_true", help="plain log lines instead of a progress bar")
    p.add_argument("--overwrite", action="store_true", help="write into an --out folder that already holds files")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        options = P.PretrainOptions(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                                    size=args.size, seed=args.seed, threads=args.threads)
        check_output_dir(args.out, "--out")
    except (ValueError, argparse.ArgumentTypeError) as e:
        parser.error(str(e))
    out = Path(args.out)
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        parser.error(f"--out {out} already holds files ({', '.join(sorted(p.name for p in out.iterdir())[:3])}); "
                     f"its model would be replaced: choose a new folder, or pass --overwrite")
    report = P.pretrain(args.out, options, progress=not args.no_progress, log_every=args.log_every,
                      eval_samples=args.eval_samples, write_card=not args.no_card)
    print(f"pretrained {report['steps_done']} steps in {report['seconds'] / 60:.1f} min: loss "
          f"{report['first_loss']} -> {report['final_loss']}; wrote {Path(args.out) / P.MODEL_FILE} "
          f"({report['checkpoint']['bytes'] / 1e6:.1f} MB, sha256 {report['checkpoint']['sha256'][:12]}...)")
    return 0
