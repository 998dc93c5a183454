"""GPU check of the kNN CUDA backend (run by benchmarks/gpu_check.sh on a CUDA machine).

For the compiled launchers (ifseg_rt._C) and, when CuPy is installed, the NVRTC path: compare with the numpy float64
reference on fresh random inputs (N in {1024, 1600, 4096}, batched, fp32 and fp16 features), then time against the
torch-on-GPU original (F.normalize, matmul, topk, 25 gather-means) with CUDA events. Prints a markdown section and
writes it (and JSON) to --out.
"""

import argparse
import datetime
import json
import pathlib
import subprocess

import numpy as np
import torch

import ifseg_rt.knn as knn
from ifseg_rt.knn import _cuda, reference

C, K, ITERS = 1024, 3, 25


def cuda_ms(fn, repeats=20, warmup=3):
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return float(np.median(times))


def torch_original(f, p):
    fn = torch.nn.functional.normalize(f.float(), dim=-1)
    nb = (fn @ fn.transpose(-1, -2)).topk(K, dim=-1).indices
    for _ in range(ITERS):
        p = torch.stack([pb[ib].mean(1) for pb, ib in zip(p, nb)])
    return p


def check(path, sizes, batch):
    """Max |out - reference| and neighbour agreement per case for one CUDA path ('compiled' or 'nvrtc')."""
    rows = []
    rng = np.random.default_rng(0)
    for n in sizes:
        for dtype in ("float32", "float16"):
            f = rng.standard_normal((batch, n, C)).astype(dtype)
            p = rng.random((batch, n, 171)).astype(np.float32)
            p /= p.sum(-1, keepdims=True)
            ft, pt = torch.from_numpy(f).cuda(), torch.from_numpy(p).cuda()
            idx = knn.knn_indices(ft, K).cpu().numpy()
            out = knn.knn_average(ft, pt, K, ITERS).cpu().numpy()
            ref_idx = reference.knn_indices(f, K)
            agree = float((np.sort(idx, -1) == np.sort(ref_idx, -1)).all(-1).mean())
            # the averaging judged on the kernel's own neighbours (exact), and end to end
            q = p.astype(np.float64)
            for _ in range(ITERS):
                q = np.stack([qb[ib].mean(1) for qb, ib in zip(q, idx)])
            ref = reference.knn_average(f.astype(np.float64), p.astype(np.float64), K, ITERS)
            rows.append({"path": path, "N": n, "B": batch, "dtype": dtype, "rows_agree": agree,
                         "avg_err_own_nb": float(np.abs(out - q).max()), "avg_err_ref": float(np.abs(out - ref).max()),
                         "ok": agree > 0.999 and float(np.abs(out - q).max()) < 1e-5})
            print(rows[-1], flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--sizes", default="1024,1600,4096", help="comma-separated N")
    ap.add_argument("--batch", type=int, default=2, help="images per call in the correctness check")
    ap.add_argument("--out", default="benchmarks/results", help="folder for gpu_knn.md / gpu_knn.json")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    from ifseg_rt import _C

    paths = []
    if _C.with_cuda:
        paths.append("compiled")
    if _cuda._cupy() is not None:
        paths.append("nvrtc")
    results, timings = [], []
    for path in paths:
        saved = _cuda._compiled
        if path == "nvrtc":
            _cuda._compiled = lambda: None  # force the runtime-compiled kernels
        try:
            results += check(path, sizes, args.batch)
            for n in sizes:
                for m in (15, 171):
                    f = torch.randn(1, n, C, device="cuda")
                    p = torch.softmax(torch.randn(1, n, m, device="cuda"), -1)
                    t_ours = cuda_ms(lambda: knn.knn_average(f, p, K, ITERS, check_finite=False))
                    t_fp16 = cuda_ms(lambda: knn.knn_average(f.half(), p, K, ITERS, check_finite=False))
                    t_torch = cuda_ms(lambda: torch_original(f, p))
                    t_gemm = cuda_ms(lambda: f[0] @ f[0].T)
                    timings.append({"path": path, "N": n, "M": m, "ours_ms": t_ours, "ours_fp16_ms": t_fp16,
                                    "torch_ms": t_torch, "gemm_fp32_ms": t_gemm, "speedup": t_torch / t_ours})
                    print(timings[-1], flush=True)
        finally:
            _cuda._compiled = saved

    card = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                          capture_output=True, text=True).stdout.strip()
    lines = [f"## GPU: {card} ({datetime.date.today().isoformat()})", "",
             f"torch {torch.__version__}, CUDA {torch.version.cuda}; C={C}, K={K}, {ITERS} iterations; "
             "median of 20 runs, CUDA events.", "",
             "| path | N | M | ours fp32 (ms) | ours fp16 (ms) | torch original (ms) | fp32 GEMM (ms) | speed-up |",
             "|---|---|---|---|---|---|---|---|"]
    for t in timings:
        lines.append(f"| {t['path']} | {t['N']} | {t['M']} | {t['ours_ms']:.3f} | {t['ours_fp16_ms']:.3f} | "
                     f"{t['torch_ms']:.3f} | {t['gemm_fp32_ms']:.3f} | {t['speedup']:.1f}x |")
    lines += ["", "| path | N | B | dtype | rows with the reference's neighbour set | max err (own nb) | "
              "max err (reference) | ok |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['path']} | {r['N']} | {r['B']} | {r['dtype']} | {r['rows_agree']:.4f} | "
                     f"{r['avg_err_own_nb']:.2e} | {r['avg_err_ref']:.2e} | {'yes' if r['ok'] else 'NO'} |")
    if not paths:
        lines.append("No CUDA path available (extension built without nvcc and no CuPy).")
    md = "\n".join(lines) + "\n"
    print(md)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_knn.md").write_text(md)
    (out / "gpu_knn.json").write_text(json.dumps({"card": card, "checks": results, "timings": timings}, indent=2))
    if not results or not all(r["ok"] for r in results):
        raise SystemExit("kNN CUDA check FAILED")


if __name__ == "__main__":
    main()
