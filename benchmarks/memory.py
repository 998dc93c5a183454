"""Memory (RSS) and first-call latency of one Segmenter over image shapes, a wide image and concurrent requests.

    python benchmarks/memory.py --base                         # a random OFA-base, exported first; every scenario
    python benchmarks/memory.py --model demo_out/model --scenario shapes concurrent --images 30
    python benchmarks/memory.py --base --backend torch --scenario latency
    python benchmarks/memory.py --base --backend onnxruntime openvino:bf16 --scenario shapes wide

Scenarios (each backend and scenario in a fresh process, so that its peak RSS is its own):

* ``shapes``: ``--images`` images one after another, random aspect ratios (short side 512, long side 512-2048, either
  orientation; seed 0): RSS after loading and after every 10th image, and the peak;
* ``wide``: one 512 x 2048 image (the paper policy's widest input, 4 096 cells): peak RSS and time;
* ``concurrent``: ``--concurrency`` threads each segmenting a 512 x 512 image ``--rounds`` times at once: peak RSS
  for 1 and for c threads, and the increase per extra concurrent request;
* ``latency``: a 512 x 512 image: the first call (a new shape) and the median of ``--repeat`` steady calls (engine
  time as the Segmenter reports it).

Prints a table and writes everything (with the CPU model) to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, threading, time
import numpy as np
from ifseg_rt.runtime import Segmenter

def status_mb(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024

def rss_mb():
    return status_mb("VmRSS")

def peak_mb():  # this process's own high-water mark (ru_maxrss would include the parent's at fork time)
    return status_mb("VmHWM")

def image(h, w, seed):
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(1, h // 32), max(1, w // 32), 3), dtype=np.uint8)
    return np.kron(small, np.ones((32, 32, 1), np.uint8))[:h, :w]  # blocky, like a photo's regions

model, backend, scenario, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
opts = json.loads(sys.argv[5])
backend, _, precision = backend.partition(":")  # e.g. openvino:bf16
seg = Segmenter.load(model, backend=backend, threads=threads, precision=precision or None)
out = {"backend": seg.backend.name, "precision": seg.precision, "loaded_mb": rss_mb()}
if scenario == "shapes":
    rng = np.random.default_rng(0)
    after = []
    for i in range(opts["images"]):
        long = int(rng.integers(512, 2049))
        h, w = (512, long) if rng.random() < 0.5 else (long, 512)
        seg.seg(image(h, w, i))
        if (i + 1) % 10 == 0 or i + 1 == opts["images"]:
            after.append([i + 1, rss_mb()])
            print(f"  {i + 1} images: {after[-1][1]:.0f} MB", file=sys.stderr, flush=True)
    out.update(rss_after=after, peak_mb=peak_mb())
elif scenario == "wide":
    t = time.perf_counter()
    seg.seg(image(512, 2048, 0))
    out.update(seconds=time.perf_counter() - t, peak_mb=peak_mb(), after_mb=rss_mb())
elif scenario == "concurrent":
    img = image(512, 512, 0)
    seg.seg(img)
    c = opts["concurrency"]
    def work():
        for _ in range(opts["rounds"]):
            seg.seg(img)
    ts = [threading.Thread(target=work) for _ in range(c)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    out.update(concurrency=c, peak_mb=peak_mb())
elif scenario == "latency":
    img = image(512, 512, 0)
    t = time.perf_counter()
    first = seg.seg(img).timings["engine"]
    steady = sorted(seg.seg(img).timings["engine"] for _ in range(opts["repeat"]))
    out.update(first_ms=first, steady_ms=steady[len(steady) // 2], steady_all_ms=steady, peak_mb=peak_mb())
print(json.dumps(out))
"""


def export_base(workdir: Path) -> Path:
    import torch

    from ifseg_rt.checkpoint import save_checkpoint
    from ifseg_rt.export import export
    from ifseg_rt.model import build_model

    torch.manual_seed(0)
    m = 15
    model = build_model("base", m)
    cat_ids = [[100 + 3 * i, 101 + 3 * i] for i in range(m)]
    model.set_categories([0] + list(range(500, 508)) + [t for c in cat_ids for t in c] + [600, 2], cat_ids)
    save_checkpoint(model, workdir / "run" / "model.safetensors", categories=[f"c{i}" for i in range(m)])
    export(workdir / "run", workdir / "model", check=False, force=True)
    return workdir / "model"


def child(model: str, backend: str, scenario: str, threads: int, **opts) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, model, backend, scenario, str(threads), json.dumps(opts)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["killed"])[-1], "returncode": proc.returncode}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model directory (exported)")
    p.add_argument("--base", action="store_true", help="export a random OFA-base (M = 15) and measure it")
    p.add_argument("--backend", nargs="+", default=["onnxruntime", "torch"],
                   help="engines, each optionally with a precision: onnxruntime:int8, openvino:bf16, torch:bf16")
    p.add_argument("--scenario", nargs="+", default=["latency", "shapes", "wide", "concurrent"],
                   choices=["latency", "shapes", "wide", "concurrent"])
    p.add_argument("--images", type=int, default=100, help="images of the shapes scenario")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2, help="images per thread (concurrent)")
    p.add_argument("--repeat", type=int, default=5, help="steady calls (latency)")
    p.add_argument("--threads", type=int, default=0, help="engine threads (default: the cores available)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--export-base", help=argparse.SUPPRESS)  # internal: export the random OFA-base into this folder
    args = p.parse_args(argv)
    if args.export_base:
        export_base(Path(args.export_base))
        return 0
    if not args.model and not args.base:
        p.error("pass --model DIR or --base")
    from ifseg_rt.system import available_cores, cpu_model

    threads = args.threads or available_cores()
    report = {"model": args.model or "random OFA-base (M = 15)", "cpu": cpu_model(), "threads": threads,
              "date": time.strftime("%Y-%m-%d"), "results": {}}
    with tempfile.TemporaryDirectory() as tmp:
        if args.base:  # in a child process: this one stays small (its memory is not what is measured)
            subprocess.run([sys.executable, __file__, "--export-base", tmp], check=True)
        model = args.model or str(Path(tmp) / "model")
        for backend in args.backend:
            res = report["results"][backend] = {}
            for sc in args.scenario:
                if sc == "concurrent":
                    one = child(model, backend, sc, threads, concurrency=1, rounds=args.rounds)
                    many = child(model, backend, sc, threads, concurrency=args.concurrency, rounds=args.rounds)
                    r = {"one": one, "many": many}
                    if "error" not in one and "error" not in many:
                        r["per_extra_request_mb"] = (many["peak_mb"] - one["peak_mb"]) / max(1, args.concurrency - 1)
                else:
                    r = child(model, backend, sc, threads, images=args.images, repeat=args.repeat)
                res[sc] = r
                print(f"{backend:12s} {sc:10s} {summary(sc, r)}", flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def summary(scenario: str, r: dict) -> str:
    if "error" in r:
        return f"FAILED ({r['error']})"
    if scenario == "shapes":
        after = dict((n, mb) for n, mb in r["rss_after"])
        ten = after.get(10, r["rss_after"][0][1])
        last = r["rss_after"][-1][1]
        return (f"loaded {r['loaded_mb']:.0f} MB, after 10 images {ten:.0f} MB, after {r['rss_after'][-1][0]} "
                f"{last:.0f} MB ({100 * (last / ten - 1):+.1f} %), peak {r['peak_mb']:.0f} MB")
    if scenario == "wide":
        return f"one 512x2048 image: peak {r['peak_mb']:.0f} MB, {r['seconds']:.1f} s"
    if scenario == "concurrent":
        if "error" in r["one"] or "error" in r["many"]:
            return f"FAILED ({r['one'].get('error') or r['many'].get('error')})"
        return (f"peak {r['one']['peak_mb']:.0f} MB at 1, {r['many']['peak_mb']:.0f} MB at {r['many']['concurrency']}"
                f" -> {r['per_extra_request_mb']:.0f} MB per extra concurrent request")
    return f"512x512: first call {r['first_ms']:.0f} ms, steady {r['steady_ms']:.0f} ms " \
           f"({r['first_ms'] / r['steady_ms']:.2f}x), peak {r['peak_mb']:.0f} MB"


if __name__ == "__main__":
    sys.exit(main())
