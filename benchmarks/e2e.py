"""End-to-end CPU latency: reference-style eager vs our backends and precisions, same random weights and image.

    python benchmarks/e2e.py --sizes tiny base --threads 2 --json benchmarks/results/e2e.json

Per size: a random SegOFA (M = 15, the COCO-Stuff unseen split) with a 40-token prompt is saved as a run directory,
exported (ONNX, the split graph, int8 and bf16 variants whose label agreement with fp32 is recorded, safetensors;
bf16 on OpenVINO when it is installed, torch bf16 then runs on request; OpenVINO also runs the fp32 graph),
then timed on one synthetic-world scene of 512x512 (paper policy -> 512x512, 32x32 cells) with kNN on. Prints a
per-stage table (median ms), the speed-up of each row over the reference-style eager run, and each row's label
agreement with it. ``benchmarks/reference_eager.py`` is a proxy of the original IFSeg code that runs 1.8-2x faster
than the real original (fairseq), so these speed-ups understate ours against the original. All rows run in one
process: OpenVINO's first compiled body may run 20-30 % slower than in a fresh process (RESULTS.md, sixth session).
On an Intel Xeon with AMX, ``python benchmarks/no_amx.py python benchmarks/e2e.py ...`` measures it as on a CPU
without AMX (AMD EPYC).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

STAGES = ("preprocess", "engine", "knn", "resize_argmax", "total")


def _median_timings(fn, warmup, repeats):
    for _ in range(warmup):
        fn()
    runs = [fn() for _ in range(repeats)]
    return {k: float(np.median([r[k] for r in runs])) for k in STAGES}


def bench_size(size: str, threads: int, warmup: int, repeats: int, image_hw, workdir: Path) -> dict:
    import torch

    from ifseg_rt.checkpoint import save_checkpoint
    from ifseg_rt.export import export
    from ifseg_rt.model import build_model
    from ifseg_rt.runtime import Segmenter

    sys.path.insert(0, str(Path(__file__).parent))
    import reference_eager

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    M = 15
    model = build_model(size, M)
    cat_ids = [[100 + 3 * i, 101 + 3 * i] for i in range(M)]
    model.set_categories([0] + list(range(500, 508)) + [t for c in cat_ids for t in c] + [600, 2], cat_ids)
    run = workdir / f"run-{size}"
    save_checkpoint(model, run / "model.safetensors", categories=[f"c{i}" for i in range(M)])
    t0 = time.perf_counter()
    from ifseg_rt.world import render_scene

    img = render_scene(0, tuple(image_hw)).image
    export(run, workdir / f"model-{size}", check=False, force=True, precision=["fp32", "int8", "bf16"],
           calibration=[img], min_agreement=0.0)  # random weights: record the agreement, gate nothing
    export_s = time.perf_counter() - t0

    from ifseg_rt.system import cpu_model

    res = {"size": size, "threads": threads, "image": list(image_hw), "export_s": export_s, "cpu": cpu_model(),
           "stages_ms": {}}
    ref_labels, _ = reference_eager.segment(model, img)
    res["stages_ms"]["reference_eager"] = _median_timings(lambda: reference_eager.segment(model, img)[1], warmup, repeats)
    agree = {}
    rows = [("torch", "fp32"), ("torch", "bf16"), ("onnxruntime", "fp32"), ("onnxruntime", "int8")]
    if importlib.util.find_spec("openvino") is not None:  # the export recorded bf16 on OpenVINO then
        rows += [("openvino", "fp32"), ("openvino", "bf16")]
    for name, precision in rows:
        seg = Segmenter.load(workdir / f"model-{size}", backend=name, precision=precision, threads=threads)
        key = f"{name} {precision}"
        res["stages_ms"][key] = _median_timings(lambda: seg.seg(img).timings, warmup, repeats)
        agree[key] = float((seg.seg(img).labels == ref_labels).mean())
        seg = None  # free the engine before loading the next
    res["label_agreement_with_reference"] = agree
    ref_total = res["stages_ms"]["reference_eager"]["total"]
    res["speedup_vs_reference"] = {k: ref_total / v["total"] for k, v in res["stages_ms"].items()}
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["tiny", "base"], help="MODEL_REGISTRY sizes to measure")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (torch and onnxruntime)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per backend")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per backend (median reported)")
    p.add_argument("--image", default="512x512", help="original image HxW")
    p.add_argument("--json", help="write all results here")
    p.add_argument("--workdir", help="keep run/model directories here (default: a temporary directory)")
    args = p.parse_args(argv)
    hw = tuple(int(v) for v in args.image.lower().split("x"))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        wd = Path(args.workdir or tmp)
        for size in args.sizes:
            r = bench_size(size, args.threads, args.warmup, args.repeats, hw, wd)
            results.append(r)
            print(f"\n== {size}, {hw[0]}x{hw[1]}, {args.threads} threads on {r['cpu']} (median ms; export "
                  f"{r['export_s']:.0f} s)")
            print(f"{'backend':<18}" + "".join(f"{s:>15}" for s in STAGES) + f"{'speed-up':>10}{'agree':>8}")
            for name, st in r["stages_ms"].items():
                agree = r["label_agreement_with_reference"].get(name, 1.0)
                print(f"{name:<18}" + "".join(f"{st[s]:>15.1f}" for s in STAGES)
                      + f"{r['speedup_vs_reference'][name]:>9.2f}x{100 * agree:>7.2f}%")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
