"""Benchmark the kNN post-processing (spec section 12) on the CPU: our C++ backend with the 16-bit screening
(``screen="auto"``: where the CPU has AMX-INT8) and with the exact fp32 search, the torch original (F.normalize, full
matmul, topk, 25-step gather-mean loop), and the similarity-GEMM floor (one fp32 torch matmul [N,C]@[C,N]), per thread
count. By default every repeat times each column once, round-robin, so a noisy neighbour slows them alike
(``--order blocks``: each column's repeats back to back, its warm best case); the table reports medians and the
ratios within this run. ``--agreement`` measures instead how often the screened neighbours (and the
labels after averaging) differ from the fp32 search on realistic features: the nano model on synthetic scenes.

    python benchmarks/knn.py --threads 1,2 --repeats 11 --json benchmarks/results/knn.json
    python benchmarks/knn.py --agreement [--model DIR] --scenes 10
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

C, K, ITERS = 1024, 3, 25
CASES = ((1024, 15), (1024, 171), (4096, 15), (4096, 171))  # N, M


def cpu_model():
    """The CPU's model name and the flags that pick our kernels (from /proc/cpuinfo where there is one)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_int8", "amx_bf16")
    from ifseg_rt.system import amx_permitted

    refused = "amx_tile" in flags and not amx_permitted()  # benchmarks/no_amx.py, a seccomp profile
    return model, [f + ("(refused)" if refused and f.startswith("amx") else "") for f in wanted if f in flags]


def torch_original(torch, f, p, k=K, iters=ITERS):
    fn = torch.nn.functional.normalize(f, dim=1)
    nb = (fn @ fn.T).topk(k, dim=1).indices
    for _ in range(iters):
        p = p[nb].mean(dim=1)
    return p


def blocks(fns, repeats, warmup=1):
    """Median milliseconds of each callable, timing its `repeats` runs back to back (the cores stay awake and no other
    column's threads are around: each column's best case)."""
    out = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
        out[name] = statistics.median(times)
    return out


def round_robin(fns, repeats, warmup=1, settle=0.0):
    """Median milliseconds of each callable, timing them in turn `repeats` times, `settle` seconds apart (untimed):
    torch's OpenMP workers keep spinning for a while after each call and would otherwise steal the next column's
    cores (on 2 cores our 2-thread runs took 1.5-2x longer right after a torch call)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            time.sleep(settle)
            t0 = time.perf_counter()
            fn()
            times[name].append(1e3 * (time.perf_counter() - t0))
    return {name: statistics.median(v) for name, v in times.items()}


def speed(args):
    import torch

    import ifseg_rt.knn as knn
    from ifseg_rt import _C

    model, flags = cpu_model()
    print(f"CPU: {model} ({os.cpu_count()} logical, {_C.num_threads()} available) flags: {' '.join(flags)}")
    print(f"kernels: fp32 {_C.cpu_isa()}, screening {_C.screen_isa() or 'none'} (screen='auto' uses "
          f"{'it' if _C.screen_isa() == 'amx' else 'fp32'}); margin {_C.knn_screen_margin}; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"kNN post-processing, C={C}, K={K}, {ITERS} iterations; median ms of {args.repeats} repeats, {args.order}")
    hdr = (f"{'thr':>3} {'N':>5} {'M':>4} {'torch':>8} {'screen':>8} {'fp32':>8} {'floor':>8} "
           f"{'torch/screen':>12} {'torch/fp32':>10} {'screen/floor':>12}")
    print(hdr)
    rng = np.random.default_rng(0)
    rows = []
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        for n, m in CASES:
            if n not in [int(s) for s in args.sizes.split(",")]:
                continue
            f = rng.standard_normal((n, C)).astype(np.float32)
            p = rng.random((n, m)).astype(np.float32)
            p /= p.sum(1, keepdims=True)
            ft, pt = torch.from_numpy(f), torch.from_numpy(p)
            fns = {
                "torch": lambda: torch_original(torch, ft, pt),
                "screen": lambda: knn.knn_average(f, p, backend="cpu", num_threads=threads, check_finite=False),
                "fp32": lambda: knn.knn_average(f, p, backend="cpu", num_threads=threads, screen="fp32",
                                                check_finite=False),
                "floor": lambda: ft @ ft.T,
            }
            with torch.inference_mode():
                ms = (blocks(fns, args.repeats) if args.order == "blocks" else
                      round_robin(fns, args.repeats, settle=args.settle))
            row = {"threads": threads, "N": n, "C": C, "M": m, "K": K, "iters": ITERS,
                   **{f"{k}_ms": v for k, v in ms.items()}}
            rows.append(row)
            print(f"{threads:>3} {n:>5} {m:>4} {ms['torch']:>8.2f} {ms['screen']:>8.2f} {ms['fp32']:>8.2f} "
                  f"{ms['floor']:>8.2f} {ms['torch'] / ms['screen']:>11.2f}x {ms['torch'] / ms['fp32']:>9.2f}x "
                  f"{ms['screen'] / ms['floor']:>11.2f}x")
    meta = {"date": datetime.date.today().isoformat(), "cpu": model, "flags": flags, "cpu_count": os.cpu_count(),
            "cores_available": _C.num_threads(), "repeats": args.repeats, "cpu_isa": _C.cpu_isa(),
            "screen_isa": _C.screen_isa(), "screen_margin": _C.knn_screen_margin, "load_average": os.getloadavg(),
            "order": args.order, "settle_s": args.settle,
            "torch": torch.__version__, "numpy": np.__version__}
    return {"meta": meta, "rows": rows}


def _segmenter(model_dir, size, threads):
    from ifseg_rt.runtime import ImagePolicy, Segmenter

    policy = ImagePolicy(short_side=size, max_long_side=4 * size)
    if model_dir:
        import dataclasses

        seg = Segmenter.load(model_dir, backend="onnxruntime", device="cpu", threads=threads)
        seg.spec = dataclasses.replace(seg.spec, policy=policy)  # the scenes at this size, whatever it was built for
        return seg
    from ifseg_rt.adapt import prepare
    from ifseg_rt.nano.demo import find_nano

    nano = find_nano(None)
    names = ["sky", "grass", "water", "sand", "brick", "wood", "snow", "rock", "road", "lava", "ball", "star",
             "heart", "ring"]
    setup = prepare(nano / "model.safetensors", nano, names)  # the pretrained nano OFA + fresh IFSeg decoder
    return Segmenter.from_model(setup.model, names, policy=policy, threads=threads)


def agreement(args):
    """Screened vs fp32 neighbours and labels on realistic features (and fp32 vs a float64 search, for scale)."""
    import ifseg_rt.knn as knn
    from ifseg_rt import _C
    from ifseg_rt.knn import reference
    from ifseg_rt.world import render_scene
    from ifseg_rt.runtime.postprocess import labels_from_scores, softmax

    model, flags = cpu_model()
    print(f"CPU: {model}; screening kernel {_C.screen_isa() or 'none (screen=int16 runs fp32)'}, margin "
          f"{_C.knn_screen_margin}; {args.scenes} scenes per size; model: {args.model or 'embedded nano (un-adapted)'}")

    def compare(f, probs=None, grid=None, size=None):
        i16 = knn.knn_indices(f, K, backend="cpu", screen="int16")
        i32 = knn.knn_indices(f, K, backend="cpu", screen="fp32")
        i64 = reference.knn_indices(f.astype(np.float64), K)
        fn = reference.normalize(f)
        sim = lambda idx: np.take_along_axis(fn @ fn.T, idx[:, 1:], axis=1).sum(1) / (K - 1)  # noqa: E731
        r = {"cells": len(f), "differ_int16_fp32": int((np.sort(i16, 1) != np.sort(i32, 1)).any(1).sum()),
             "differ_fp32_f64": int((np.sort(i32, 1) != np.sort(i64, 1)).any(1).sum()),
             "max_similarity_deficit": float(np.max(sim(i64) - sim(i16)))}
        if probs is not None:
            lab = lambda p: labels_from_scores(np.ascontiguousarray(p, np.float32), grid, size)  # noqa: E731
            l16 = lab(knn.knn_average(f, probs, K, ITERS, backend="cpu", screen="int16"))
            l32 = lab(knn.knn_average(f, probs, K, ITERS, backend="cpu", screen="fp32"))
            l64 = lab(reference.knn_average(f.astype(np.float64), probs.astype(np.float64), K, ITERS))
            r.update(pixels=int(l32.size), pixels_int16_fp32=int((l16 != l32).sum()),
                     pixels_fp32_f64=int((l32 != l64).sum()))
        return r

    results = {}
    for size in [int(s) for s in args.scene_sizes.split(",")]:
        seg = _segmenter(args.model, size, 2)
        images = [render_scene(5000 + i, size, seg.categories).image for i in range(args.scenes)]
        results[f"nano {size}px"] = [
            compare(np.ascontiguousarray(o.features, np.float32), softmax(o.logits, temperature=seg.knn.temperature),
                    o.grid, o.original_size) for o in seg.infer(images)]
    rng = np.random.default_rng(0)
    results["gaussian N=1024 C=1024"] = [compare(rng.standard_normal((1024, C)).astype(np.float32))
                                         for _ in range(args.scenes)]
    print(f"{'features':>24} {'cells':>7} {'int16!=fp32':>12} {'fp32!=f64':>10} {'max sim deficit':>15} "
          f"{'labels int16!=fp32':>18} {'labels fp32!=f64':>16}")
    for name, rs in results.items():
        cells = sum(r["cells"] for r in rs)
        pct = lambda key, tot: f"{100 * sum(r[key] for r in rs) / tot:.3f} %"  # noqa: E731
        pix = sum(r.get("pixels", 0) for r in rs)
        print(f"{name:>24} {cells:>7} {pct('differ_int16_fp32', cells):>12} {pct('differ_fp32_f64', cells):>10} "
              f"{max(r['max_similarity_deficit'] for r in rs):>15.2e} "
              f"{pct('pixels_int16_fp32', pix) if pix else '-':>18} {pct('pixels_fp32_f64', pix) if pix else '-':>16}")
    return {"meta": {"date": datetime.date.today().isoformat(), "cpu": model, "screen_isa": _C.screen_isa(),
                     "screen_margin": _C.knn_screen_margin, "model": args.model or "embedded nano"},
            "agreement": results}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts (torch and our backend)")
    parser.add_argument("--repeats", type=int, default=11, help="round-robin repeats per configuration")
    parser.add_argument("--sizes", default="1024,4096", help="comma-separated N (patches per image) to time")
    parser.add_argument("--order", choices=("round-robin", "blocks"), default="round-robin",
                        help="time the columns in turn per repeat, or each column's repeats back to back")
    parser.add_argument("--settle", type=float, default=0.02,
                        help="round-robin: untimed seconds before each timed call, for the previous column's threads "
                             "to go idle (on a 2-core VM an idle core then takes ~1 ms to wake: 2-thread runs of a "
                             "few ms lose most of their second thread either way; --order blocks shows the warm case)")
    parser.add_argument("--agreement", action="store_true",
                        help="measure screened-vs-fp32 neighbour and label differences instead of speed")
    parser.add_argument("--model", default=None,
                        help="--agreement: an exported model directory (default: the embedded nano model)")
    parser.add_argument("--scenes", type=int, default=10, help="--agreement: scenes per size")
    parser.add_argument("--scene-sizes", default="256,512", help="--agreement: scene sides in px (16 px per cell)")
    parser.add_argument("--json", default=None, help="where to write the results (JSON)")
    args = parser.parse_args()
    out = agreement(args) if args.agreement else speed(args)
    if args.json:
        path = pathlib.Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=2))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
