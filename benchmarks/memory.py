"""Peak memory (RSS) of concurrent requests on one Segmenter: how much each extra in-flight request costs.

    python benchmarks/memory.py --model demo_out/model --size 375x500 --concurrency 1 2 4 8
    python benchmarks/memory.py --base --size 512x512 --concurrency 1 2 4     # a random OFA-base, exported first

Each concurrency level runs in a fresh process (so that peak RSS is its own): the Segmenter is loaded, warmed up
once, then ``c`` threads each segment the image ``--rounds`` times at once. Reports the process's peak RSS
(``ru_maxrss``) after loading and after the concurrent rounds, and the increase per extra concurrent request.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, threading
import numpy as np
from ifseg_rt.runtime import Segmenter
from ifseg_rt.nano.world import render_scene
model, backend, precision, c, rounds, h, w, threads = sys.argv[1:9]
c, rounds, h, w, threads = int(c), int(rounds), int(h), int(w), int(threads)
seg = Segmenter.load(model, backend=backend, precision=precision or None, threads=threads)
img = render_scene(0, (h, w)).image
seg.seg(img)
loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
def work():
    for _ in range(rounds):
        seg.seg(img)
ts = [threading.Thread(target=work) for _ in range(c)]
[t.start() for t in ts]
[t.join() for t in ts]
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"concurrency": c, "loaded_mb": loaded, "peak_mb": peak, "backend": seg.backend.name,
                  "precision": seg.precision}))
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model directory (exported)")
    p.add_argument("--base", action="store_true", help="export a random OFA-base (M = 15) and measure it")
    p.add_argument("--backend", default="auto")
    p.add_argument("--precision", default="")
    p.add_argument("--size", default="375x500", help="original image HxW")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--rounds", type=int, default=2, help="images per thread")
    p.add_argument("--threads", type=int, default=1, help="engine threads")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if not args.model and not args.base:
        p.error("pass --model DIR or --base")
    from ifseg_rt.runtime.benchmark import cpu_model

    h, w = (int(v) for v in args.size.lower().split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(export_base(Path(tmp)))
        rows = []
        for c in args.concurrency:
            out = subprocess.run([sys.executable, "-c", CHILD, model, args.backend, args.precision, str(c),
                                  str(args.rounds), str(h), str(w), str(args.threads)],
                                 check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"concurrency {c}: loaded {r['loaded_mb']:.0f} MB, peak {r['peak_mb']:.0f} MB "
                  f"({r['backend']} {r['precision']})", flush=True)
    base = rows[0]["peak_mb"]
    for r in rows[1:]:
        r["per_extra_request_mb"] = (r["peak_mb"] - base) / (r["concurrency"] - rows[0]["concurrency"])
        print(f"concurrency {r['concurrency']}: +{r['per_extra_request_mb']:.0f} MB per extra concurrent request")
    report = {"model": args.model or "random OFA-base", "size": [h, w], "cpu": cpu_model(), "threads": args.threads,
              "rows": rows}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
