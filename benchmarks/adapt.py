"""Image-free adaptation throughput: word-grid training updates per second (ifseg.md §10 recipe).

Builds a randomly initialised SegOFA of a registry size (no weights are loaded), sets M categories with arbitrary
token ids, runs a few warm-up updates and then times ``--steps`` full updates (grid sampling, forward, float32 loss
at 16G x 16G pixels, backward, clipping, AdamW) with the paper's batch of 16 word grids.

    python benchmarks/adapt.py                                  # OFA-tiny dims on CPU, batch 16
    python benchmarks/adapt.py --size base --device cuda --precision bf16 --steps 20

The CPU number is for the tiny size; the OFA-Base GPU number (the paper's setting) comes from
``benchmarks/gpu_check.sh`` (its ``gpu_adapt_check.py`` builds the model with :func:`build` below).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch

from ifseg_rt.adapt import AdaptOptions, WordGridTrainer
from ifseg_rt.adapt.options import PRECISIONS
from ifseg_rt.model import MODEL_REGISTRY, build_model


def build(size: str, num_categories: int, *, dropout: float, drop_path: float, seed: int):
    torch.manual_seed(seed)
    model = build_model(size, num_categories, dropout=dropout, drop_path_rate=drop_path)
    # arbitrary categories: 1-3 subword ids each, a prompt of realistic length (ifseg.md §4)
    cat_ids = [[100 + 3 * k + j for j in range(1 + k % 3)] for k in range(num_categories)]
    prompt = [0] + list(range(10, 22)) + [t for ids in cat_ids for t in ids] + [4727 % model.config.vocab_size, 2]
    model.set_categories(prompt, cat_ids)
    return model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--size", default="tiny", choices=sorted(MODEL_REGISTRY), help="OFA size (random weights)")
    p.add_argument("--num-categories", type=int, default=15, help="M (COCO-15 unseen: 15, ADE: 150)")
    p.add_argument("--batch-size", type=int, default=16, help="word grids per update")
    p.add_argument("--steps", type=int, default=5, help="timed updates")
    p.add_argument("--warmup", type=int, default=2, help="untimed updates first")
    p.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    p.add_argument("--precision", default="auto", choices=PRECISIONS, help="auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of text")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    opts = AdaptOptions(steps=args.warmup + args.steps, batch_size=args.batch_size, precision=args.precision)
    model = build(args.size, args.num_categories, dropout=opts.dropout, drop_path=opts.drop_path_rate, seed=0)
    trainer = WordGridTrainer(model, opts, device=args.device)
    n_train = sum(p.numel() for p in trainer.params.values())
    sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)

    for _ in range(args.warmup):
        trainer.train_step()
    sync()
    if trainer.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    losses = [trainer.train_step().loss for _ in range(args.steps)]
    sync()
    dt = time.perf_counter() - t0
    res = {
        "size": args.size, "M": args.num_categories, "batch": args.batch_size, "grid": model.config.seg_grid,
        "device": str(trainer.device), "precision": trainer.precision, "threads": torch.get_num_threads(),
        "trainable_params": n_train, "steps": args.steps, "seconds": round(dt, 3),
        "steps_per_s": args.steps / dt, "s_per_step": dt / args.steps,
        "grids_per_s": args.steps * args.batch_size / dt, "last_loss": losses[-1],
        "peak_mem_gib": (round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if trainer.device.type == "cuda"
                         else None),
        "torch": torch.__version__, "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(trainer.device) if trainer.device.type == "cuda" else None,
    }
    if args.json:
        print(json.dumps(res))
    else:
        print(f"adapt {args.size} M={args.num_categories} batch {args.batch_size} ({res['grid']}x{res['grid']} grids) "
              f"{res['precision']} on {res['gpu'] or res['device']} ({res['threads']} threads): "
              f"{res['steps_per_s']:.3f} steps/s = {res['s_per_step']:.3f} s/step, {res['grids_per_s']:.1f} grids/s"
              + (f", peak {res['peak_mem_gib']} GiB" if res["peak_mem_gib"] is not None else "")
              + f"; {n_train:,} trainable parameters, loss {losses[-1]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
