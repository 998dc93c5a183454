"""GPU end-to-end checks for the runtime (run on a CUDA machine; prints JSON):

* torch backend throughput, batch sweep, bf16 (and fp16), on a random base-size model at 512x512;
* torch bf16 vs fp32 label agreement;
* onnxruntime CUDA (I/O binding) vs CPU parity when onnxruntime-gpu is installed.

    python benchmarks/gpu_e2e_check.py --size base --batches 1 2 4 8 --json benchmarks/results/gpu_e2e.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--size", default="base", help="MODEL_REGISTRY size")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8], help="batch sizes")
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp16"], help="torch backend dtypes")
    p.add_argument("--repeats", type=int, default=10, help="timed batches per point")
    p.add_argument("--cuda-graphs", action="store_true", help="also measure the torch backend with CUDA graphs")
    p.add_argument("--json", help="write results here")
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to check", file=sys.stderr)
        return 0
    from ifseg_rt.checkpoint import save_checkpoint
    from ifseg_rt.export import export
    from ifseg_rt.model import build_model
    from ifseg_rt.runtime import Segmenter

    out = {"gpu": torch.cuda.get_device_name(0), "size": args.size, "torch": torch.__version__, "throughput": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        M = 15
        model = build_model(args.size, M)
        ids = [[100 + 3 * i, 101 + 3 * i] for i in range(M)]
        model.set_categories([0] + list(range(500, 508)) + [t for c in ids for t in c] + [600, 2], ids)
        save_checkpoint(model, tmp / "run" / "model.safetensors", categories=[f"c{i}" for i in range(M)])
        export(tmp / "run", tmp / "model", check=False)
        img = np.random.default_rng(0).integers(0, 256, size=(512, 512, 3), dtype=np.uint8)
        ref = Segmenter.load(tmp / "model", backend="torch", device="cuda", dtype="fp32")
        ref_labels = ref.seg(img).labels
        for dtype in args.dtypes:
            for graphs in ([False, True] if args.cuda_graphs else [False]):
                seg = Segmenter.load(tmp / "model", backend="torch", device="cuda", dtype=dtype, cuda_graphs=graphs)
                agree = float((seg.seg(img).labels == ref_labels).mean())
                for B in args.batches:
                    batch = [img] * B
                    for _ in range(2):
                        seg.seg(batch, batch_size=B)
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    for _ in range(args.repeats):
                        res = seg.seg(batch, batch_size=B)
                    dt = (time.perf_counter() - t0) / args.repeats
                    row = {"dtype": dtype, "cuda_graphs": graphs, "batch": B, "img_s": B / dt,
                           "engine_ms_per_img": float(np.mean([r.timings["engine"] for r in res])),
                           "knn_ms_per_img": float(np.mean([r.timings["knn"] for r in res])),
                           "label_agreement_vs_fp32": agree}
                    out["throughput"].append(row)
                    print(json.dumps(row), flush=True)
        try:
            import onnxruntime as ort

            if "CUDAExecutionProvider" in ort.get_available_providers():
                cpu = Segmenter.load(tmp / "model", backend="onnxruntime", device="cpu")
                gpu = Segmenter.load(tmp / "model", backend="onnxruntime", device="cuda")
                x = cpu.preprocess(img)[0][None]
                lc, fc = cpu.backend.run(x)
                lg, fg = gpu.backend.run(x)
                out["ort_cuda_parity"] = {"logits": float(np.abs(lg.cpu().numpy() - lc).max()),
                                          "features": float(np.abs(fg.cpu().numpy() - fc).max()),
                                          "labels_equal": float((gpu.seg(img).labels == cpu.seg(img).labels).mean())}
            else:
                out["ort_cuda_parity"] = "skipped: onnxruntime-gpu not installed"
        except ImportError:
            out["ort_cuda_parity"] = "skipped: onnxruntime not installed"
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
