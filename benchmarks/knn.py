"""Benchmark the kNN post-processing (spec section 12) on the CPU: numpy reference, the torch original (F.normalize,
full matmul, topk, 25-step gather-mean loop), our C++ backend (and CUDA when a GPU is present), against the
similarity-GEMM floor (one fp32 BLAS matmul [N,C]@[C,N] on this machine).

    python benchmarks/knn.py --threads 2 --repeats 7 --sizes 1024,1600,4096 --json benchmarks/results/knn.json
"""

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import time

import numpy as np

C, K, ITERS, MS = 1024, 3, 25, (15, 171)


def median_ms(fn, repeats, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def torch_original(torch, f, p, k=K, iters=ITERS):
    fn = torch.nn.functional.normalize(f, dim=1)
    nb = (fn @ fn.T).topk(k, dim=1).indices
    for _ in range(iters):
        p = p[nb].mean(dim=1)
    return p


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch, BLAS and our C++ backend")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per measurement (median reported)")
    parser.add_argument("--sizes", default="1024,1600,4096", help="comma-separated N (patches per image)")
    parser.add_argument("--json", default="benchmarks/results/knn.json", help="where to write the results")
    parser.add_argument("--no-numpy", action="store_true", help="skip the (slow) numpy reference column")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    import ifseg_rt.knn as knn

    try:
        import torch

        torch.set_num_threads(args.threads)
    except ImportError:
        torch = None
    have_cpu = "cpu" in knn.available_backends()
    have_cuda = torch is not None and torch.cuda.is_available()

    rng = np.random.default_rng(0)
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        f = rng.standard_normal((n, C)).astype(np.float32)
        gemm_np = median_ms(lambda: f @ f.T, args.repeats)
        gemm_torch = None
        if torch is not None:
            ft = torch.from_numpy(f)
            gemm_torch = median_ms(lambda: ft @ ft.T, args.repeats)
        floor = min(x for x in (gemm_np, gemm_torch) if x is not None)
        for m in MS:
            p = rng.random((n, m)).astype(np.float32)
            p /= p.sum(1, keepdims=True)
            row = {"N": n, "C": C, "M": m, "K": K, "iters": ITERS, "gemm_numpy_ms": gemm_np,
                   "gemm_torch_ms": gemm_torch, "gemm_floor_ms": floor}
            if torch is not None:
                pt = torch.from_numpy(p)
                with torch.inference_mode():
                    row["torch_ms"] = median_ms(lambda: torch_original(torch, ft, pt), args.repeats)
            if not args.no_numpy:
                row["numpy_ms"] = median_ms(lambda: knn.knn_average(f, p, backend="numpy"), max(3, args.repeats // 2))
            if have_cpu:
                row["cpu_ms"] = median_ms(lambda: knn.knn_average(f, p, backend="cpu", num_threads=args.threads),
                                          args.repeats)
            if have_cuda:
                fc, pc = torch.from_numpy(f).cuda(), torch.from_numpy(p).cuda()
                def cuda_run():
                    knn.knn_average(fc, pc, check_finite=False)
                    torch.cuda.synchronize()
                row["cuda_ms"] = median_ms(cuda_run, args.repeats, warmup=3)
            rows.append(row)

    hdr = f"{'N':>5} {'M':>4} {'numpy':>9} {'torch':>9} {'cpu':>8} {'cuda':>7} {'x torch':>8} {'GEMM floor':>10} {'cpu/floor':>9}"
    print(f"kNN post-processing, C={C}, K={K}, {ITERS} iterations, {args.threads} threads, median ms")
    print(hdr)
    fmt = lambda v, w, d=1: f"{v:>{w}.{d}f}" if v is not None else f"{'-':>{w}}"
    for r in rows:
        speed = r["torch_ms"] / r["cpu_ms"] if "torch_ms" in r and "cpu_ms" in r else None
        ratio = r["cpu_ms"] / r["gemm_floor_ms"] if "cpu_ms" in r else None
        print(f"{r['N']:>5} {r['M']:>4} {fmt(r.get('numpy_ms'), 9)} {fmt(r.get('torch_ms'), 9)} "
              f"{fmt(r.get('cpu_ms'), 8)} {fmt(r.get('cuda_ms'), 7, 2)} {fmt(speed, 7)}x "
              f"{fmt(r['gemm_floor_ms'], 10)} {fmt(ratio, 8, 2)}x")

    from ifseg_rt import _C

    meta = {"date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "threads": args.threads, "repeats": args.repeats,
            "cpu_isa": _C.cpu_isa() if have_cpu else None, "torch": getattr(torch, "__version__", None),
            "numpy": np.__version__}
    out = pathlib.Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
