"""``python -m ifseg_rt segment ...`` and ``python -m ifseg_rt bench ...`` (torch-free unless --backend torch)."""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from .._argtypes import positive_int
from .preprocess import IMAGE_EXTENSIONS


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory written by python -m ifseg_rt.export")
    p.add_argument("--backend", choices=("auto", "onnxruntime", "torch", "tensorrt"), default="auto",
                   help="inference engine (auto: TensorRT engine for this GPU, onnxruntime, then torch)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, help="CPU threads for onnxruntime/torch (default: all cores)")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), help="torch backend compute dtype "
                                                                    "(default fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--no-knn", action="store_true", help="skip kNN post-processing (plain logits arg-max)")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the model files")


def _load(args):
    from .segmenter import Segmenter

    opts = {}
    if args.threads and args.backend in ("onnxruntime", "torch", "auto"):
        opts["threads"] = args.threads
    if args.dtype:
        if args.backend != "torch":
            raise SystemExit("error: --dtype applies to --backend torch only")
        opts["dtype"] = args.dtype
    return Segmenter.load(args.model, backend=args.backend, device=args.device, verify=not args.no_verify,
                          knn=False if args.no_knn else None, **opts)


def _collect(inputs: Sequence[str]) -> List[Path]:
    out: List[Path] = []
    for s in inputs:
        p = Path(s)
        if p.is_dir():
            out += sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_EXTENSIONS and q.is_file())
        elif p.is_file():
            out.append(p)
        else:
            raise SystemExit(f"error: input not found: {p}")
    if not out:
        raise SystemExit("error: no images found in the inputs")
    return out


def segment(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ifseg_rt segment", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Segment images (files or folders) with an exported model: palette PNG "
                                            "label maps (+ overlays) and one summary line per image.")
    p.add_argument("inputs", nargs="+", help="image files and/or folders of images")
    p.add_argument("--out", required=True, help="output folder for <name>.png label maps")
    p.add_argument("--overlay", action="store_true", help="also write <name>.overlay.jpg (labels over the image)")
    p.add_argument("--batch-size", type=positive_int, default=1, help="images of equal network size per forward")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _common(p)
    args = p.parse_args(argv)
    from .palette import overlay, save_label_png
    from .preprocess import load_image

    paths = _collect(args.inputs)
    try:
        seg = _load(args)
    except (ValueError, RuntimeError, ImportError) as e:  # ModelDirError and BackendUnavailable included
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    M = len(seg.categories)
    bar = None
    if not args.quiet and len(paths) > 1:
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(paths), unit="img", file=sys.stderr)
        except ImportError:
            pass
    say = bar.write if bar is not None else print
    used = set()
    failed: List[str] = []
    for start in range(0, len(paths), args.batch_size):
        chunk = paths[start:start + args.batch_size]
        results = seg.seg([str(q) for q in chunk], batch_size=args.batch_size, return_exceptions=True)
        for q, r in zip(chunk, results):
            if bar is not None:
                bar.update(1)
            if isinstance(r, Exception):
                reason = getattr(r, "reason", str(r))
                failed.append(reason if str(q) in reason else f"{q}: {reason}")  # the path once
                print(f"error: {failed[-1]}", file=sys.stderr)
                continue
            stem = q.stem
            k = 1
            while stem in used:
                stem, k = f"{q.stem}_{k}", k + 1
            used.add(stem)
            save_label_png(r.labels, out / f"{stem}.png", M)
            if args.overlay:
                from PIL import Image

                Image.fromarray(overlay(load_image(q), r.labels, M)).save(out / f"{stem}.overlay.jpg", quality=90)
            counts = r.pixel_counts() / r.labels.size
            top = ", ".join(f"{seg.categories[i]} {100 * counts[i]:.0f}%" for i in np.argsort(-counts)[:3] if counts[i] > 0)
            say(f"{q.name}: {r.original_size[0]}x{r.original_size[1]} -> {r.input_size[0]}x{r.input_size[1]} "
                f"({r.grid[0]}x{r.grid[1]} cells, HxW), {top}; {r.timings['total']:.0f} ms")
    if bar is not None:
        bar.close()
    print(f"wrote {len(paths) - len(failed)} label map(s) to {out}" + (f"; {len(failed)} failed" if failed else ""))
    return 1 if failed else 0


def _stats(values: List[float]) -> dict:
    a = np.asarray(values, dtype=np.float64)
    return {"median": float(np.median(a)), "p90": float(np.percentile(a, 90)), "mean": float(a.mean()),
            "min": float(a.min())}


def _hw(s: str):
    try:
        h, w = (int(v) for v in s.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW, got {s!r}") from None
    return h, w


def bench(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ifseg_rt bench", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Per-stage latency (median, p90) and throughput of an exported model on "
                                            "a random image; JSON out.")
    p.add_argument("--batch", type=int, nargs="+", default=[1], help="batch sizes to measure")
    p.add_argument("--size", type=_hw, default=(512, 683),
                   help="original image HxW (the model's image policy then applies)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs per batch size")
    p.add_argument("--repeats", type=int, default=10, help="timed runs per batch size")
    p.add_argument("--json", help="write the results here (default: print JSON to stdout)")
    _common(p)
    args = p.parse_args(argv)
    if min(args.batch) < 1 or args.repeats < 1 or args.warmup < 0:
        p.error("--batch and --repeats must be >= 1, --warmup >= 0")
    try:
        seg = _load(args)
    except (ValueError, RuntimeError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(*args.size, 3), dtype=np.uint8)
    report = {"model": str(args.model), "backend": seg.backend.name, "device": args.device,
              "threads": args.threads, "image": list(args.size), "knn": seg.knn.to_dict(), "host": platform.node(),
              "runs": []}
    for B in args.batch:
        batch = [img] * B
        for _ in range(args.warmup):
            seg.seg(batch, batch_size=B)
        stage = {k: [] for k in ("preprocess", "engine", "knn", "resize_argmax", "total")}
        walls = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            res = seg.seg(batch, batch_size=B)
            walls.append(time.perf_counter() - t0)
            for k in stage:
                stage[k].append(float(np.mean([r.timings[k] for r in res])))
        run = {"batch": B, "input_size": list(res[0].input_size), "grid": list(res[0].grid),
               "stages_ms_per_image": {k: _stats(v) for k, v in stage.items()},
               "batch_wall_ms": _stats([1e3 * w for w in walls]),
               "throughput_img_s": float(B / np.median(walls))}
        report["runs"].append(run)
        st = run["stages_ms_per_image"]
        print(f"batch {B} {run['input_size'][0]}x{run['input_size'][1]}: " + "  ".join(
            f"{k} {st[k]['median']:.1f}/{st[k]['p90']:.1f}" for k in stage) + f" ms (median/p90 per image); "
            f"{run['throughput_img_s']:.2f} img/s", file=sys.stderr)
    text = json.dumps(report, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n", encoding="utf-8")
    else:
        print(text)
    return 0
