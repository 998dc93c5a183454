"""Training on images on the nano world (issue 25): self-training, self-training with seen labels, supervised.

    python benchmarks/selftrain.py --json benchmarks/results/selftrain.json      # ~30 min on 2 cores
    python benchmarks/selftrain.py --quick                                        # checks the script (~2 min)

Two vocabularies, each adapted image-free first (the demo's recipe: 600 steps x 16 word grids, seed 1), then
trained on ``--train`` scenes through the real command line (``adapt --out RUN --self-train ...``), each mode from a
copy of the same adapted run, and scored on ``--images`` held-out scenes (kNN on, torch in process):

* the demo's 14 categories: IFSeg, + self-training on unlabelled scenes, + supervised on labelled scenes;
* 7 categories, 4 "seen" (labels given) and 3 "unseen": IFSeg, + self-training, + self-training with the labels of
  the seen categories; reported on the unseen ones (the paper's Table 4 setting).

Training scenes (seeds from ``SELF_TRAIN_SEED``) are disjoint from the held-out ones (``DEMO_SEED``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np

from report import emit  # benchmarks/report.py (the script's folder is on sys.path)

SEEN = ("sky", "grass", "water", "sand")
UNSEEN = ("brick", "ball", "star")


def score(run: Path, pairs, names: Sequence[str], threads: int) -> Dict[str, object]:
    from ifseg_rt.evaluate import evaluate, load_segmenter
    from ifseg_rt.runtime import ImagePolicy

    seg = load_segmenter(run, device="cpu", threads=threads, policy=ImagePolicy(short_side=256, max_long_side=1024))
    res = evaluate(seg, pairs, knn=True, progress=False)
    out = {}
    for kind in ("raw", "knn"):
        m = res.metrics[kind]
        out[kind] = round(100 * m.miou, 2)
        out[f"{kind}_per_class"] = {n: None if np.isnan(v) else round(100 * float(v), 2) for n, v in zip(names, m.iou)}
    return out


def subset_miou(scores: Dict[str, object], kind: str, names: Sequence[str]) -> float:
    vals = [scores[f"{kind}_per_class"][n] for n in names]
    return round(float(np.mean([v for v in vals if v is not None])), 2)


def train(run: Path, mode_args: List[str], steps: int) -> float:
    from ifseg_rt.cli.adapt import main

    t0 = time.perf_counter()
    code = main(["--out", str(run), "--device", "cpu", "--no-progress", "--self-train-steps", str(steps)]
                + mode_args)
    if code != 0:
        raise SystemExit(f"adapt {mode_args} failed with code {code}")
    return round(time.perf_counter() - t0, 1)


def vocabulary(work: Path, names: Sequence[str], modes: Dict[str, List[str]], args) -> Dict[str, object]:
    import torch

    from ifseg_rt.nano.demo import SELF_TRAIN_SEED, DemoSettings, run_demo
    from ifseg_rt.world import write_dataset

    settings = DemoSettings(images=args.images, overlays=0, check_export=False,
                            **({"steps": 20, "batch_size": 4} if args.quick else {}))
    t0 = time.perf_counter()
    demo = run_demo(work, list(names), settings, threads=args.threads, progress=False, log=lambda *a: None)
    torch.set_num_threads(args.threads)
    pairs = [(p, q) for p, q in zip(sorted((work / "scenes" / "images").iterdir()),
                                    sorted((work / "scenes" / "labels").iterdir()))]
    out: Dict[str, object] = {"categories": list(names), "adapt_s": round(time.perf_counter() - t0, 1)}
    data = work / "train"
    write_dataset(data, [SELF_TRAIN_SEED + i for i in range(args.train)], names, size=256)
    out["IFSeg"] = score(work / "run", pairs, names, args.threads)
    for label, extra in modes.items():
        run = work / f"run_{label}"
        shutil.copytree(work / "run", run)
        argv = [a.replace("{images}", str(data / "images")).replace("{labels}", str(data / "labels")) for a in extra]
        seconds = train(run, argv, args.steps)
        out[label] = {**score(run, pairs, names, args.threads), "train_s": seconds}
        print(f"  {label}: kNN mIoU {out[label]['knn']} (IFSeg {out['IFSeg']['knn']}), {seconds} s", flush=True)
    out["demo_miou"] = demo["miou"]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", type=int, default=200, help="training scenes")
    p.add_argument("--images", type=int, default=100, help="held-out evaluation scenes")
    p.add_argument("--steps", type=int, default=300, help="updates of each training on images")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--part", choices=("all", "demo", "seen"), default="all")
    p.add_argument("--quick", action="store_true", help="a few scenes and steps: checks the script")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if args.quick:
        args.train, args.images, args.steps = 8, 4, 2
    from ifseg_rt.system import cpu_model
    from ifseg_rt.world import DEFAULT_DEMO_CATEGORIES

    result: Dict[str, object] = {"cpu": cpu_model(), "threads": args.threads, "train_scenes": args.train,
                                 "heldout_scenes": args.images, "steps": args.steps, "python": sys.version.split()[0]}
    with tempfile.TemporaryDirectory(prefix="ifseg_selftrain_") as tmp:
        work = Path(tmp)
        if args.part in ("all", "demo"):
            print(f"[1] the demo's {len(DEFAULT_DEMO_CATEGORIES)} categories", flush=True)
            result["demo"] = vocabulary(work / "demo", DEFAULT_DEMO_CATEGORIES, {
                "self-train": ["--self-train", "{images}"],
                "supervised": ["--train-images", "{images}", "--train-labels", "{labels}", "--word-grids", "0"]},
                args)
        if args.part in ("all", "seen"):
            print(f"[2] seen {SEEN}, unseen {UNSEEN}", flush=True)
            r = vocabulary(work / "seen", SEEN + UNSEEN, {
                "self-train": ["--self-train", "{images}"],
                "seen-labels": ["--self-train", "{images}", "--seen-labels", "{labels}", "--seen", ", ".join(SEEN)]},
                args)
            r["unseen_knn"] = {k: subset_miou(r[k], "knn", UNSEEN) for k in ("IFSeg", "self-train", "seen-labels")}
            r["seen_knn"] = {k: subset_miou(r[k], "knn", SEEN) for k in ("IFSeg", "self-train", "seen-labels")}
            print(f"  unseen kNN mIoU: {r['unseen_knn']}", flush=True)
            result["seen"] = r
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
