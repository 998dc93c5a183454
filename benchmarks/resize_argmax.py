"""Benchmark the fused bilinear resize + arg-max (ifseg_rt.runtime.resize_argmax) on the CPU against the numpy path
(the numpy path) and torch ``F.interpolate(bilinear, align_corners=False).argmax`` (and the CUDA kernel
when a GPU is present).

    python benchmarks/resize_argmax.py --threads 1,2 --repeats 11 --json benchmarks/results/resize_argmax.json

Cases: 512x512 output from a 32x32 grid with M = 171 and M = 15, and the nano case: a 375x500 original under the
nano policy (short side 256 -> 256x341 network input -> 16x22 grid) with M = 14. Targets: >= 5x faster than
F.interpolate + argmax at 512x512; the nano case a few ms at most.
"""

import argparse
import datetime
import json
import os
import pathlib
import statistics
import time

import numpy as np

from ifseg_rt.system import cpu_model

NANO_ORIGINAL, NANO_SIDE, NANO_M = (375, 500), 256, 14


def load_average() -> str:
    try:
        return pathlib.Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"


def median_ms(fn, repeats, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def cases():
    from ifseg_rt.runtime.preprocess import PATCH, ImagePolicy

    h, w = ImagePolicy(short_side=NANO_SIDE, max_long_side=4 * NANO_SIDE).target_size(*NANO_ORIGINAL)
    nano_grid = (-(-h // PATCH), -(-w // PATCH))
    return [
        ("512x512 M=171", (32, 32), (512, 512), 171),
        ("512x512 M=15", (32, 32), (512, 512), 15),
        (f"nano {h}x{w} in", nano_grid, NANO_ORIGINAL, NANO_M),
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts for the C++ kernel")
    parser.add_argument("--repeats", type=int, default=11, help="timed runs per measurement (median reported)")
    parser.add_argument("--json", default="benchmarks/results/resize_argmax.json", help="where to write the results")
    args = parser.parse_args()
    thread_counts = [int(t) for t in args.threads.split(",")]

    from ifseg_rt import _C
    from ifseg_rt.runtime.resize_argmax import resize_argmax

    try:
        import torch

        torch.set_num_threads(max(thread_counts))
    except ImportError:
        torch = None
    have_cuda = torch is not None and torch.cuda.is_available() and hasattr(_C, "resize_argmax_cuda")

    rng = np.random.default_rng(0)
    slow = max(3, args.repeats // 2)
    rows = []
    for name, grid, size, m in cases():
        s = rng.standard_normal((grid[0] * grid[1], m)).astype(np.float32)
        row = {"case": name, "grid": list(grid), "size": list(size), "M": m}
        for t in thread_counts:
            row[f"cpu_{t}t_ms"] = median_ms(lambda: resize_argmax(s, grid, size, backend="cpu", threads=t),
                                            args.repeats)
            row[f"cpu_{t}t_used"] = _C.resize_argmax_threads(1, *size, m, t)
        row["numpy_ms"] = median_ms(lambda: resize_argmax(s, grid, size, backend="numpy"), slow)
        if torch is not None:
            x = torch.from_numpy(s.reshape(*grid, m)).permute(2, 0, 1)[None].contiguous()

            def torch_run():
                with torch.inference_mode():
                    torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False).argmax(1)

            row["torch_ms"] = median_ms(torch_run, slow)
        if have_cuda:
            sc = torch.from_numpy(s).cuda()

            def cuda_run():
                resize_argmax(sc, grid, size, check_finite=False)
                torch.cuda.synchronize()

            row["cuda_ms"] = median_ms(cuda_run, args.repeats, warmup=3)
        rows.append(row)

    print(f"fused resize + arg-max, median ms of {args.repeats} runs ({slow} for numpy/torch)")
    print(f"CPU: {cpu_model()}, {_C.resize_available_cores()} cores available, kernel ISA "
          f"{_C.resize_argmax_cpu_isa()}, torch threads {max(thread_counts)}, load average {load_average()} "
          f"(other processes skew the multi-thread columns)")
    cols = [f"cpu {t}t" for t in thread_counts] + ["numpy", "torch"] + (["cuda"] if have_cuda else [])
    print(f"{'case':<20} {'grid':>6} {'size':>8} {'M':>4} " + " ".join(f"{c:>8}" for c in cols) + "  torch/cpu")
    fmt = lambda v: f"{v:>8.2f}" if v is not None else f"{'-':>8}"
    for r in rows:
        vals = [r[f"cpu_{t}t_ms"] for t in thread_counts] + [r["numpy_ms"], r.get("torch_ms")]
        vals += [r.get("cuda_ms")] if have_cuda else []
        best = min(r[f"cpu_{t}t_ms"] for t in thread_counts)
        speed = f"{r['torch_ms'] / best:>8.1f}x" if "torch_ms" in r else f"{'-':>9}"
        print(f"{r['case']:<20} {'x'.join(map(str, r['grid'])):>6} {'x'.join(map(str, r['size'])):>8} {r['M']:>4} "
              + " ".join(fmt(v) for v in vals) + f"  {speed}")
    print("(cpu Nt: the kernel asked for N threads; it uses fewer when the output is small: "
          + ", ".join(f"{r['case']}: {[r[f'cpu_{t}t_used'] for t in thread_counts]}" for r in rows) + ")")

    meta = {"date": datetime.date.today().isoformat(), "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
            "load_average": load_average(),
            "cores_available": _C.resize_available_cores(), "cpu_isa": _C.resize_argmax_cpu_isa(),
            "repeats": args.repeats, "torch": getattr(torch, "__version__", None), "numpy": np.__version__}
    out = pathlib.Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
