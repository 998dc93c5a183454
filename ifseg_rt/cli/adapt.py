"""``python -m ifseg_rt adapt`` / ``python -m ifseg_rt.adapt``: image-free adaptation of an OFA checkpoint.

Examples::

    python -m ifseg_rt.adapt --checkpoint ofa_base.pt --bpe-dir ofa-bpe \\
        --categories "frisbee, skateboard, cardboard, ..." --out runs/coco15
    python -m ifseg_rt.adapt --out runs/coco15 --resume          # continue a stopped run exactly
    python -m ifseg_rt eval --model runs/coco15 --images val/images --labels val/labels

The run directory is what ``python -m ifseg_rt export RUN --out MODEL_DIR`` reads (model.safetensors + run.json).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from ..adapt import run as R
from ..adapt.options import PRECISIONS, AdaptOptions
from ..adapt.selftrain import SelfTrainOptions, check_labels, self_train
from ..adapt.trainer import WordGridTrainer
from ..evaluate import check_pairs, find_pairs
from ..metrics import load_label
from ..runtime.inputs import list_images
from ..runtime.preprocess import ImagePolicy, load_image
from ..tokenizer import IFSEG_PROMPT_PREFIX, parse_categories
from . import UsageError
from .args import (HelpFormatter, add_knn_backend_argument, add_label_offset_argument, check_output_dir, examples,
                   non_negative_int, positive_int)

# CLI dest -> AdaptOptions field
_OPTION_FLAGS = {
    "steps": "steps", "batch_size": "batch_size", "lr": "lr", "weight_decay": "weight_decay",
    "grad_clip": "grad_clip", "dropout": "dropout", "drop_path": "drop_path_rate", "precision": "precision",
    "seed": "seed", "max_side": "max_side", "decay_unused": "decay_unused",
}


def build_parser() -> argparse.ArgumentParser:
    d = AdaptOptions()
    p = argparse.ArgumentParser(
        prog="python -m ifseg_rt adapt", formatter_class=HelpFormatter,
        description="Image-free adaptation of an OFA checkpoint to a list of category names: trains on synthetic "
                    "word grids (no images, no masks) and writes a run directory that `python -m ifseg_rt.export` "
                    "turns into a model directory.",
        epilog=examples('python -m ifseg_rt adapt --checkpoint ofa_base.pt --bpe-dir ofa-bpe \\',
                        '    --categories "sky, road, tree, person" --out runs/street',
                        "python -m ifseg_rt adapt --out runs/street --resume     # continue a stopped run exactly",
                        "python -m ifseg_rt.export runs/street --out models/street"))
    src = p.add_argument_group("source (not needed with --resume)")
    src.add_argument("--checkpoint", help="OFA checkpoint to adapt: fairseq .pt, HF-port .bin/dir, or ifseg_rt "
                                          ".safetensors (an IFSeg checkpoint with the same M continues training)")
    src.add_argument("--bpe-dir", help="OFA tokenizer files: encoder.json + vocab.bpe + dict.txt (or vocab.json + "
                                       "merges.txt), matching the checkpoint's dictionary")
    cats = src.add_mutually_exclusive_group()
    cats.add_argument("--categories", help='comma-separated category names in class-index order, e.g. "sky, road"')
    cats.add_argument("--categories-file", help="text file with the category names (one per line and/or "
                                                "comma-separated; # comments)")
    src.add_argument("--prompt-prefix", default=IFSEG_PROMPT_PREFIX, help="task text of the encoder prompt")

    run = p.add_argument_group("run")
    run.add_argument("--out", required=True, help="run directory (model.safetensors, run.json, train_state.pt, ...)")
    run.add_argument("--resume", action="store_true", help="continue the run in --out from its train_state.pt")
    run.add_argument("--overwrite", action="store_true", help="start over in an --out that already holds a run")
    run.add_argument("--stop-at", type=positive_int, default=None,
                     help="stop after this many updates (the schedule still spans --steps); continue with --resume")
    run.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    run.add_argument("--save-every", type=non_negative_int, default=500, help="save every N updates (0: at the end)")
    run.add_argument("--keep-checkpoints", action=argparse.BooleanOptionalAction, default=True,
                     help="keep checkpoints/step_N.safetensors at every save (hard links where possible)")
    run.add_argument("--save-dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                     help="float dtype of the saved model.safetensors (training always keeps fp32 weights)")
    run.add_argument("--log-every", type=positive_int, default=10, help="log the mean loss every N updates")
    run.add_argument("--no-progress", "--quiet", action="store_true",
                     help="plain log lines instead of a progress bar")

    opt = p.add_argument_group("training recipe (the paper's, for OFA-Base)")
    opt.add_argument("--steps", type=positive_int, default=d.steps, help="optimiser updates")
    opt.add_argument("--batch-size", type=positive_int, default=d.batch_size, help="word grids per update")
    opt.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (cosine to 0, no warm-up)")
    opt.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW decoupled weight decay")
    opt.add_argument("--grad-clip", type=float, default=d.grad_clip, help="global gradient-norm clip (0: off)")
    opt.add_argument("--dropout", type=float, default=d.dropout, help="dropout (embeddings, residual branches)")
    opt.add_argument("--drop-path", type=float, default=d.drop_path_rate,
                     help="largest drop-path rate (linear over depth from 0)")
    opt.add_argument("--precision", default=d.precision, choices=PRECISIONS,
                     help="auto: bf16 (else fp16 + loss scaling) on CUDA, fp32 on CPU")
    opt.add_argument("--seed", type=int, default=d.seed, help="seed of the grid sampler, dropout and new modules")
    opt.add_argument("--max-side", type=positive_int, default=d.max_side,
                     help="largest initial word-grid side S (default: the token grid side, 32)")
    opt.add_argument("--decay-unused", action=argparse.BooleanOptionalAction, default=d.decay_unused,
                     help="weight-decay trainable parameters that get no gradient, as the original optimiser does")

    val = p.add_argument_group("monitoring on real images (optional)")
    val.add_argument("--val-images", help="folder of validation images")
    val.add_argument("--val-labels", help="folder of PNG label maps matched to --val-images by file stem")
    val.add_argument("--val-every", type=non_negative_int, default=500,
                     help="validate every N updates (0: only at the end; training on images: also after each "
                          "round)")
    val.add_argument("--val-limit", type=positive_int, default=None, help="use only the first N validation images")
    add_label_offset_argument(val)
    val.add_argument("--val-knn", action=argparse.BooleanOptionalAction, default=True,
                     help="also report mIoU with the kNN post-processing")
    val.add_argument("--val-short-side", type=positive_int, default=512,
                     help="resize the short side of validation images to this (long side capped at 2048)")
    add_knn_backend_argument(val, help="ifseg_rt.knn backend for validation")

    st = p.add_argument_group("training on images (continues the finished run in --out; --resume finishes an "
                              "interrupted one)")
    src_img = st.add_mutually_exclusive_group()
    src_img.add_argument("--self-train", metavar="IMAGES_DIR",
                         help="pseudo-label these images with the run's model (kNN on), keep the confident cells and "
                              "train on them, mixed with word grids; the run in --out is updated")
    src_img.add_argument("--train-images", metavar="IMAGES_DIR",
                         help="supervised fine-tuning on these images and the label maps of --train-labels (every "
                              "category labelled)")
    st.add_argument("--train-labels", metavar="LABELS_DIR", help="PNG label maps of --train-images, matched by stem")
    st.add_argument("--seen-labels", metavar="LABELS_DIR",
                    help="with --self-train: PNG label maps of the images (matched by stem) whose --seen categories "
                         "are used as they are; the other pixels get pseudo-labels among the unseen categories")
    st.add_argument("--seen", help='with --seen-labels: the categories the label maps annotate, e.g. "sky, road"')
    st.add_argument("--self-train-rounds", type=positive_int, default=SelfTrainOptions.rounds,
                    help="rounds of pseudo-labelling + training (supervised: 1)")
    st.add_argument("--self-train-steps", "--train-steps", dest="self_train_steps", type=positive_int,
                    default=SelfTrainOptions.steps, help="updates per round")
    st.add_argument("--self-train-lr", "--train-lr", dest="self_train_lr", type=float, default=SelfTrainOptions.lr,
                    help="AdamW learning rate")
    st.add_argument("--self-train-batch-size", type=positive_int, default=SelfTrainOptions.batch_size,
                    help="images per update")
    st.add_argument("--self-train-threshold", type=float, default=SelfTrainOptions.threshold,
                    help="keep a cell's pseudo-label when its kNN-averaged probability is at least this")
    st.add_argument("--word-grids", type=non_negative_int, default=SelfTrainOptions.word_grids,
                    help="word grids per update mixed into the image loss (0: images only)")
    st.add_argument("--augment-scale", type=float, nargs=2, metavar=("LOW", "HIGH"),
                    default=list(SelfTrainOptions.scale), help="random resize range before the crop (1 1: none)")
    st.add_argument("--cat-max-ratio", type=float, default=SelfTrainOptions.cat_max_ratio,
                    help="a crop is drawn again while one category fills more than this of it (1: any crop)")
    st.add_argument("--self-train-limit", "--train-limit", dest="self_train_limit", type=positive_int, default=None,
                    help="use only the first N images")
    return p


def _explicit_dests(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set:
    """Destinations of the flags that appear on the command line (to tell them from defaults)."""
    given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    out = set()
    for action in parser._actions:  # argparse has no public API for this
        if any(s in given for s in action.option_strings):
            out.add(action.dest)
        if isinstance(action, argparse.BooleanOptionalAction) and any(
                "--no-" + s[2:] in given for s in action.option_strings):
            out.add(action.dest)
    return out


def options_from_args(args: argparse.Namespace) -> AdaptOptions:
    return AdaptOptions(**{field: getattr(args, dest) for dest, field in _OPTION_FLAGS.items()})


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.val_images is None) != (args.val_labels is None):
        parser.error("--val-images and --val-labels go together")
    if args.resume and args.overwrite:
        parser.error("--resume and --overwrite exclude each other")
    images_mode = bool(args.self_train or args.train_images)
    if (args.train_images is None) != (args.train_labels is None):
        parser.error("--train-images and --train-labels go together")
    if (args.seen_labels is None) != (args.seen is None):
        parser.error("--seen-labels and --seen go together")
    if args.seen_labels and not args.self_train:
        parser.error("--seen-labels needs --self-train IMAGES_DIR (the images the label maps belong to)")
    if args.train_images and args.self_train_rounds != 1:
        parser.error("supervised training (--train-images) has no re-labelling rounds: drop --self-train-rounds")
    if not args.resume and not images_mode:
        missing = [f for f, v in (("--checkpoint", args.checkpoint), ("--bpe-dir", args.bpe_dir)) if v is None]
        if args.categories is None and args.categories_file is None:
            missing.append("--categories or --categories-file")
        if missing:
            parser.error("the following arguments are required (unless --resume): " + ", ".join(missing))
    try:
        if images_mode:
            return _train_on_images(args)
        return _run(args, argv, parser)
    except R.DivergedError as e:  # work that failed (its last good save stays): exit 1
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, TypeError) as e:
        raise UsageError(str(e)) from None


def _validation(args: argparse.Namespace, every: int) -> R.Validation:
    """The --val-* pairs, every header read now (a bad pair fails here, not at the first validation)."""
    pairs = find_pairs(args.val_images, args.val_labels, limit=args.val_limit)
    check_pairs(pairs)
    return R.Validation(pairs=pairs, every=every, label_offset=args.label_offset, knn=args.val_knn,
                        knn_backend=args.knn_backend, short_side=args.val_short_side)


def _image_entry(args: argparse.Namespace, options: SelfTrainOptions, count: int) -> dict:
    """What run.json records about one training on images (and what --resume compares)."""
    mode = "supervised" if args.train_images else "seen-labels" if args.seen_labels else "self-train"
    return {"mode": mode, "images": str(Path(args.train_images or args.self_train).resolve()),
            "labels": str(Path(args.train_labels or args.seen_labels).resolve()) if mode != "self-train" else None,
            "seen": parse_categories(args.seen) if args.seen else None, "count": count,
            "options": options.to_dict(), "rounds": [], "finished": False}


def _train_on_images(args: argparse.Namespace) -> int:
    """``adapt --out RUN --self-train DIR [--seen-labels DIR --seen ...]`` or ``--train-images DIR --train-labels
    DIR``: train the finished run's model on images and save the run after every round (``--resume`` finishes an
    interrupted training from its last saved round)."""
    out = Path(args.out)
    saved = R.read_run(out)
    if not saved.get("finished"):
        raise ValueError(f"{out} is not a finished adaptation run; finish it first (--resume)")
    setup, adapt_options = R.setup_from_run(saved)
    categories = setup.categories
    images_dir = args.train_images or args.self_train
    labels_dir = args.train_labels or args.seen_labels
    if labels_dir:
        pairs = find_pairs(images_dir, labels_dir, limit=args.self_train_limit)
        paths, label_paths = [p for p, _ in pairs], [q for _, q in pairs]
    else:
        paths, label_paths = list_images([images_dir])[:args.self_train_limit], []
    seen = parse_categories(args.seen) if args.seen else None
    if seen:
        unknown = [n for n in seen if n not in categories]
        if unknown:
            raise ValueError(f"--seen: {', '.join(map(repr, unknown))} not among the run's categories "
                             f"({', '.join(categories)})")
    options = SelfTrainOptions(rounds=args.self_train_rounds, steps=args.self_train_steps, lr=args.self_train_lr,
                               batch_size=args.self_train_batch_size, threshold=args.self_train_threshold,
                               word_grids=args.word_grids, scale=tuple(args.augment_scale),
                               cat_max_ratio=args.cat_max_ratio)
    images = [load_image(p) for p in paths]  # a bad file fails here, named, before any training
    labels = [load_label(q, len(categories), label_offset=args.label_offset) for q in label_paths] or None
    if labels is not None:
        check_labels(images, labels, [str(q) for q in label_paths])
    history_all = list(saved.get("self_training") or [])
    entry = _image_entry(args, options, len(images))
    start_round = 1
    if args.resume:
        last = history_all[-1] if history_all else None
        same = last is not None and {k: last.get(k) for k in ("mode", "images", "labels", "seen", "count",
                                                              "options")} == \
            {k: entry[k] for k in ("mode", "images", "labels", "seen", "count", "options")}
        if last is None or last.get("finished", True) or not same:
            raise ValueError(f"nothing to resume: {out} has no unfinished training on these images with these "
                             f"options (run it without --resume to start one)")
        entry = history_all.pop()
        start_round = len(entry["rounds"]) + 1
    trainer = WordGridTrainer(setup.model, adapt_options, device=args.device)
    trainer.load_state_dict(R.load_train_state(out))
    policy = ImagePolicy.from_dict(saved["image_policy"]) if saved.get("image_policy") else \
        ImagePolicy(short_side=args.val_short_side, max_long_side=max(2048, args.val_short_side))
    writer = R.RunWriter(out, setup, args=dict(saved.get("args", {})), save_dtype=args.save_dtype,
                         keep_checkpoints=False, validation_log=list(saved.get("validation", [])),
                         image_policy=policy, self_training=history_all + [entry])
    validation = None
    if args.val_images:
        validation = _validation(args, every=0)

    def validate(where: str) -> dict:
        rec = R.validate(trainer, validation, categories)
        print(f"validation {where}: " + "  ".join(
            f"{n} mIoU {rec[n]['mIoU']}" for n in ("raw", "knn") if n in rec), flush=True)
        return rec

    def on_step(k: int, step: int) -> dict:
        return {"validation": validate(f"in round {k} at step {step}")} if validation is not None else {}

    def on_round(k: int, record: dict) -> dict:
        extra = {}
        if validation is not None:
            extra["validation"] = validate(f"after round {k}")
        entry["rounds"].append({**record, **extra})
        entry["finished"] = k == options.rounds
        writer.save(trainer, final_loss=saved.get("final_loss"), finished=True)  # resumable from here
        return extra

    what = {"self-train": "self-training", "seen-labels": f"self-training with labels of {', '.join(seen or [])}",
            "supervised": "supervised training"}[entry["mode"]]
    print(f"{what}: {out} on {len(images)} images, rounds {start_round}..{options.rounds} x {options.steps} steps",
          flush=True)
    self_train(trainer, categories, images, options, policy=policy, labels=labels, seen=seen,
               supervised=entry["mode"] == "supervised", start_round=start_round, on_round=on_round,
               on_step=on_step, every=args.val_every if validation is not None else 0,
               progress=not args.no_progress, log=lambda msg: print(msg, flush=True))
    hint = " --no-knn   # supervised models lose to kNN smoothing (nano world: 86.6 vs 83.2 mIoU)" \
        if entry["mode"] == "supervised" else ""
    print(f"wrote {out / R.MODEL_FILE} and {out / R.RUN_FILE}; next: python -m ifseg_rt export {out} --out "
          f"MODEL_DIR{hint}")
    return 0


def _run(args: argparse.Namespace, argv: Sequence[str], parser: argparse.ArgumentParser) -> int:
    out = Path(args.out)
    try:
        check_output_dir(out, "--out")
    except argparse.ArgumentTypeError as e:
        parser.error(str(e))
    if not args.resume:
        ck = Path(args.checkpoint).resolve() if args.checkpoint is not None else None
        if ck is not None and (out.resolve() == ck or out.resolve() in ck.parents):
            raise ValueError(f"--out {out} holds the input checkpoint {args.checkpoint}: the run's own "
                             f"{R.MODEL_FILE} would replace it; choose another --out")
        others = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
        if others and not (out / R.RUN_FILE).exists() and not args.overwrite:
            raise ValueError(f"--out {out} already holds files that are not an adaptation run ({', '.join(others[:3])}"
                             f"{', ...' if len(others) > 3 else ''}); choose a new or empty folder, or pass "
                             f"--overwrite to write the run into it")
    validation = None
    if args.val_images:  # checked before any checkpoint is loaded
        validation = _validation(args, every=args.val_every)
    if args.resume:
        explicit = _explicit_dests(parser, argv)
        saved = R.read_run(out)
        setup, options = R.setup_from_run(saved)
        wanted = options_from_args(args).to_dict()
        clash = {f"--{dest.replace('_', '-')}": (wanted[field], options.to_dict()[field])
                 for dest, field in _OPTION_FLAGS.items()
                 if dest in explicit and wanted[field] != options.to_dict()[field]}
        if clash:
            raise ValueError(f"a resumed run keeps its settings; these flags differ from the run's "
                             f"(given, run): {clash}")
        recorded = {"checkpoint": setup.provenance.get("source_checkpoint"), "bpe_dir": setup.provenance.get("bpe_dir"),
                    "prompt_prefix": setup.prompt_prefix}
        differ = {f"--{d.replace('_', '-')}": (getattr(args, d), v) for d, v in recorded.items()
                  if d in explicit and v is not None
                  and (getattr(args, d) != v if d == "prompt_prefix" else str(Path(getattr(args, d)).resolve()) != v)}
        if differ:
            raise ValueError(f"a resumed run keeps the checkpoint, BPE files and prompt it started from; these flags "
                             f"differ from the run's (given, run): {differ}")
        if args.categories is not None or args.categories_file is not None:
            names = parse_categories(args.categories) if args.categories is not None else R.read_categories_file(
                args.categories_file)
            if names != setup.categories:
                raise ValueError(f"--categories differ from the run's categories {setup.categories}")
        state = R.load_train_state(out)
        trainer = WordGridTrainer(setup.model, options, device=args.device)
        trainer.load_state_dict(state)
        del state
        if trainer.step >= options.steps:
            print(f"{out} is already finished ({trainer.step}/{options.steps} steps)")
            return 0
        run_args = dict(saved.get("args", {}))
        validation_log = list(saved.get("validation", []))
        print(f"resuming {out} at step {trainer.step}/{options.steps}")
    else:
        if (out / R.RUN_FILE).exists() and not args.overwrite:
            raise ValueError(f"{out} already holds a run ({R.RUN_FILE}); pass --resume to continue it or "
                             f"--overwrite to start over")
        options = options_from_args(args)
        names = parse_categories(args.categories) if args.categories is not None else \
            R.read_categories_file(args.categories_file)
        setup = R.prepare(args.checkpoint, args.bpe_dir, names, prompt_prefix=args.prompt_prefix, options=options)
        trainer = WordGridTrainer(setup.model, options, device=args.device)
        if args.overwrite:
            for name in (R.LOG_FILE, R.TRAIN_STATE_FILE):
                (out / name).unlink(missing_ok=True)
        run_args = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        validation_log = []
        n_train = sum(p.numel() for p in trainer.params.values())
        print(f"adapting {setup.provenance['source_checkpoint']} to M = {len(names)} categories: "
              f"{n_train:,} trainable parameters, {options.steps} steps x {options.batch_size} grids, "
              f"{trainer.precision} on {trainer.device}")

    # the image policy the run is validated for goes into run.json (export uses it); a resumed run keeps its own
    policy = ImagePolicy.from_dict(saved["image_policy"]) if args.resume and saved.get("image_policy") else \
        ImagePolicy(short_side=args.val_short_side, max_long_side=max(2048, args.val_short_side)) \
        if validation is not None else None
    writer = R.RunWriter(out, setup, args=run_args, save_dtype=args.save_dtype, keep_checkpoints=args.keep_checkpoints,
                         validation_log=validation_log, image_policy=policy)
    summary = R.train(trainer, writer, stop_at=args.stop_at, save_every=args.save_every, log_every=args.log_every,
                      validation=validation, progress=not args.no_progress)
    state = "finished" if summary["finished"] else f"stopped at step {summary['step']} (continue with --resume)"
    loss = summary["final_loss"]
    print(f"{state}: final loss {loss:.4f}, {summary['steps_per_s']:.3g} steps/s; wrote {out / R.MODEL_FILE} and "
          f"{out / R.RUN_FILE}" if loss is not None else f"{state}; wrote {out}")
    if summary["finished"]:
        print(f"next: python -m ifseg_rt eval --model {out} --images IMAGES --labels LABELS\n"
              f"      python -m ifseg_rt export {out} --out MODEL_DIR")
    return 0
