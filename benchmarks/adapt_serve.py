"""Adapt on request (issue 27), measured on the nano world: a running ``serve`` adapts a new vocabulary while it
serves another model.

    python benchmarks/adapt_serve.py --json benchmarks/results/adapt_serve.json     # ~8 min on 2 cores
    python benchmarks/adapt_serve.py --quick                                          # checks the script

1. ``serve`` starts on the quick nano model (policy short side ``--size``) with ``--base`` the shipped nano
   checkpoint, the demo's recipe (``--steps`` steps x 16 word grids, lr 1e-3, seed 1), one worker thread at nice 10.
2. ``--clients`` clients send scenes to the served model for ``--idle-s`` seconds: the idle p50 / p99.
3. A 7-category vocabulary is requested; the clients go on until it is ready: time from the request to the first
   answer of the new model, the served model's p50 / p99 meanwhile, failed requests.
4. The hot swap under 8 clients (4 on the served model, 4 on the new one): a second vocabulary (``--swap-steps``)
   is adapted and loaded while they send: failed requests (0 expected).
5. The new model's mIoU on ``--images`` held-out scenes against an offline ``adapt`` + ``export`` with the same
   seed, threads and recipe (labels compared pixel for pixel).
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import cpu_info, quick_model  # noqa: E402  (benchmarks/serve.py)
from report import emit  # noqa: E402  (benchmarks/report.py)

VOCABULARY = ["sky", "grass", "water", "sand", "ball", "star", "heart"]
SWAP_VOCABULARY = ["sky", "brick", "ring"]


class Clients(threading.Thread):
    """``n`` closed-loop clients; client ``c`` uses ``targets[c % len(targets)]`` (None: the served model, else a
    vocabulary id). Every request's (start, seconds, ok, target) is kept."""

    def __init__(self, url: str, scenes: List[bytes], n: int, targets=(None,)):
        super().__init__(daemon=True)
        self.url, self.scenes, self.n, self.targets = url, scenes, n, list(targets)
        self.records: List[tuple] = []
        self.errors: Dict[str, int] = {}
        self.halt = threading.Event()

    def run(self):
        from ifseg_rt.serve import Client

        def worker(c):
            client = Client(self.url, timeout_s=60)
            target, k = self.targets[c % len(self.targets)], 0
            while not self.halt.is_set():
                t0 = time.monotonic()
                try:
                    client.seg(self.scenes[(c * 5 + k) % len(self.scenes)], vocabulary=target)
                    ok = True
                except Exception as e:  # noqa: BLE001 - counted by message
                    ok = False
                    msg = (str(e).splitlines() or [type(e).__name__])[0][:160]
                    self.errors[msg] = self.errors.get(msg, 0) + 1
                    time.sleep(0.05)
                self.records.append((t0, time.monotonic() - t0, ok, target))
                k += 1
            client.close()

        threads = [threading.Thread(target=worker, args=(c,), daemon=True) for c in range(self.n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def stats(self, start: float = 0.0, end: float = float("inf"), target: Optional[str] = "any"):
        sel = [r for r in self.records if start <= r[0] < end and (target == "any" or r[3] == target)]
        lat = np.array([r[1] for r in sel if r[2]]) * 1e3
        return {"requests": len(sel), "failed": sum(1 for r in sel if not r[2]),
                "p50_ms": round(float(np.percentile(lat, 50)), 1) if lat.size else None,
                "p99_ms": round(float(np.percentile(lat, 99)), 1) if lat.size else None}


def miou(model: Path, pairs) -> float:
    from ifseg_rt import Segmenter
    from ifseg_rt.evaluate import evaluate

    return round(100 * evaluate(Segmenter.load(model, threads=1), pairs, knn=True, progress=False)
                 .metrics["knn"].miou, 2)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=256, help="scene size and the served model's short side")
    p.add_argument("--steps", type=int, default=600, help="adaptation steps of the new vocabulary")
    p.add_argument("--swap-steps", type=int, default=50, help="steps of the vocabulary adapted during the swap")
    p.add_argument("--clients", type=int, default=2, help="clients while idle and during the adaptation")
    p.add_argument("--idle-s", type=float, default=20.0)
    p.add_argument("--images", type=int, default=100, help="held-out scenes for the mIoU")
    p.add_argument("--quick", action="store_true", help="few steps and scenes: checks the script")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.swap_steps, args.idle_s, args.images, args.size = 4, 4, 3.0, 4, 64

    from PIL import Image

    from ifseg_rt.nano.demo import DEMO_SEED, NANO_DIR
    from ifseg_rt.serve import Client
    from ifseg_rt.serve.adaptation import AdaptServiceOptions
    from ifseg_rt.serve.server import ServeOptions, start_server
    from ifseg_rt.world import render_scene, write_dataset

    out: Dict[str, object] = {"machine": cpu_info(), "steps": args.steps, "clients": args.clients,
                              "vocabulary": VOCABULARY}
    with tempfile.TemporaryDirectory(prefix="ifseg_adapt_serve_") as tmp:
        work = Path(tmp)
        served = quick_model(work, args.size)
        scenes = []
        for i in range(16):
            buf = io.BytesIO()
            Image.fromarray(render_scene(5000 + i, args.size).image).save(buf, format="JPEG", quality=90)
            scenes.append(buf.getvalue())
        adapt = AdaptServiceOptions(base=str(NANO_DIR / "model.safetensors"), bpe_dir=str(NANO_DIR),
                                    adapt_dir=str(work / "vocabularies"), steps=args.steps, batch_size=16, lr=1e-3,
                                    threads=1, nice=10, queue=4, max_loaded_mb=4096)
        server = start_server(served, work / "serve", ServeOptions(http_port=0, grpc_port=0, metrics_port=0,
                                                                   instances=2, threads=1),
                              adapt=adapt, announce=lambda line: print(line, flush=True))
        try:
            client = Client(server.http_url)
            load = Clients(server.http_url, scenes, args.clients)
            load.start()
            time.sleep(args.idle_s)
            t_req = time.monotonic()
            out["idle"] = load.stats(0, t_req)
            status = client.adapt(VOCABULARY, seed=1, poll_s=0.5)
            vid = status["vocabulary"]
            t_ready = time.monotonic()
            client.seg(scenes[0], vocabulary=vid)
            t_first = time.monotonic()
            load.halt.set()
            load.join()
            out["during_adaptation"] = {**load.stats(t_req, t_ready), "errors": load.errors}
            out["request_to_first_answer_s"] = round(t_first - t_req, 1)
            out["job"] = status
            print(f"idle {out['idle']}, during {out['during_adaptation']}, first answer after "
                  f"{out['request_to_first_answer_s']} s", flush=True)

            swap = Clients(server.http_url, scenes, 8, targets=(None, vid))
            swap.start()
            time.sleep(2)
            t0 = time.monotonic()
            second = client.adapt(SWAP_VOCABULARY, steps=args.swap_steps, seed=1, poll_s=0.5)
            t1 = time.monotonic()
            time.sleep(3)  # after the load, too
            swap.halt.set()
            swap.join()
            out["hot_swap"] = {"vocabulary": second["vocabulary"], "adapt_and_load_s": round(t1 - t0, 1),
                               **swap.stats(), "served_model": swap.stats(target=None),
                               "new_model": swap.stats(target=vid), "errors": swap.errors}
            print(f"hot swap under 8 clients: {out['hot_swap']}", flush=True)
        finally:
            server.stop()

        # the new model against an offline adapt + export with the same seed, threads and recipe
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        cats = work / "cats.txt"
        cats.write_text("\n".join(VOCABULARY) + "\n")
        t0 = time.monotonic()
        for argv_ in (["adapt", "--checkpoint", adapt.base, "--bpe-dir", adapt.bpe_dir, "--categories-file",
                       str(cats), "--out", str(work / "offline_run"), "--steps", str(args.steps), "--seed", "1",
                       "--batch-size", "16", "--lr", "0.001", "--device", "cpu", "--no-progress"],
                      ["export", str(work / "offline_run"), "--out", str(work / "offline_model"), "--short-side",
                       str(args.size), "--max-long-side", str(4 * args.size), "--threads", "1"]):
            subprocess.run([sys.executable, "-m", "ifseg_rt", *argv_], check=True, env=env, capture_output=True)
        out["offline_adapt_export_s"] = round(time.monotonic() - t0, 1)
        pairs = write_dataset(work / "heldout", [DEMO_SEED + i for i in range(args.images)], VOCABULARY,
                              size=args.size)
        served_model = work / "vocabularies" / vid / "model"
        out["miou_knn"] = {"adapted on request": miou(served_model, pairs),
                           "offline adapt + export": miou(work / "offline_model", pairs)}
        from ifseg_rt import Segmenter

        a, b = Segmenter.load(served_model, threads=1), Segmenter.load(work / "offline_model", threads=1)
        out["labels_identical"] = all(np.array_equal(a.seg(img).labels, b.seg(img).labels) for img, _ in pairs)
    emit(out, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
