"""Throughput of ``segment --ray`` with 1 and 2 actors (1 engine thread each) on this machine.

    python benchmarks/ray_scale.py --model demo_out/model --images 96 --json benchmarks/results/ray_scale.json

Renders ``--images`` scenes of the synthetic world (``--size`` px), starts a private local Ray (loopback only) with
one CPU per core, runs a short untimed warm-up, then for each actor count runs
:func:`ifseg_rt.distributed.segment_dataset` on all the scenes (a fresh output folder, label maps only). The driver
notes when each block of results arrives; the steady throughput counts the images that arrive after the first block
of every actor, over the time from then to the last block, so the actor start-up (a process per actor, model load)
is left out; the end-to-end figure includes it. Also reported: the CPU model, and the median per-image time of the
pipeline stages inside an actor (from the run's Parquet table), whose inverse times the actor count is the ceiling
for the throughput. JSON on stdout (and in ``--json``).

Without ``--model`` the quick demo's nano model is built first (``python -m ifseg_rt demo --quick``, about 40 s)
and its image policy is set to the scene size, so every scene keeps its 16-px cells (256 px: 16 x 16 cells, as in
the demo).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report import emit  # benchmarks/report.py (the script's folder is on sys.path)


def quick_model(work: Path, size: int) -> Path:
    """The quick demo's exported nano model, its policy set to ``size`` px on the short side."""
    subprocess.run([sys.executable, "-m", "ifseg_rt", "demo", "--quick", "--out", str(work / "demo"), "--no-progress",
                    "--threads", "1"], check=True, stdout=subprocess.DEVNULL)
    model = work / "demo" / "model"
    manifest = json.loads((model / "ifseg.json").read_text())
    manifest["image"]["policy"].update(mode="short_side", short_side=size, max_long_side=4 * size, size=None)
    (model / "ifseg.json").write_text(json.dumps(manifest, indent=2))
    return model


def run_once(distributed, inputs, model, out: Path, actors: int, batch_size: int) -> dict:
    """One segment_dataset run: wall time, steady and end-to-end images/s, median per-image stage times."""
    import pyarrow.parquet as pq

    arrivals = []
    t0 = time.perf_counter()
    summary = distributed.segment_dataset(inputs, str(model), str(out), actors=actors, threads=1,
                                          batch_size=batch_size, progress=False,
                                          on_progress=lambda done: arrivals.append((time.perf_counter(), done)))
    wall = time.perf_counter() - t0
    if summary.failed:
        raise SystemExit(f"error: {summary.failed[0]}")
    df = pq.read_table(out / distributed.TABLE_NAME).to_pandas()
    shutil.rmtree(out)
    first = arrivals[min(actors, len(arrivals)) - 1]  # every actor has delivered its first block
    last = arrivals[-1]
    steady = (last[1] - first[1]) / (last[0] - first[0]) if last[0] > first[0] else float("nan")
    stages = {s: float(df[f"{s}_ms"].median()) for s in ("preprocess", "engine", "knn", "resize_argmax", "total")}
    return {"actors": actors, "threads_per_actor": 1, "wall_s": wall, "blocks": len(arrivals),
            "steady_img_s": steady, "end_to_end_img_s": len(inputs) / wall, "median_ms_per_image": stages}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", help="exported model directory (default: build the quick demo's nano model)")
    p.add_argument("--images", type=int, default=96, help="scenes per run")
    p.add_argument("--size", type=int, default=256, help="scene side in px")
    p.add_argument("--actors", type=int, nargs="+", default=[1, 2], help="actor counts to measure")
    p.add_argument("--batch-size", type=int, default=1, help="images per engine call")
    p.add_argument("--json", help="also write the report here")
    args = p.parse_args(argv)

    from ifseg_rt import distributed
    from ifseg_rt.world import DEFAULT_DEMO_CATEGORIES, write_dataset
    from ifseg_rt.system import available_cores, cpu_model

    work = Path(tempfile.mkdtemp(prefix="ray-scale-"))
    try:
        model = Path(args.model) if args.model else quick_model(work, args.size)
        pairs = write_dataset(work / "scenes", range(args.images), DEFAULT_DEMO_CATEGORIES, size=args.size)
        inputs = [str(i) for i, _ in pairs]
        cores = available_cores()
        report = {"cpu": cpu_model(), "cores": cores, "host": platform.node(), "model": str(model),
                  "images": args.images, "size": args.size, "batch_size": args.batch_size, "runs": []}
        print(f"CPU: {report['cpu']} ({cores} cores available)", file=sys.stderr)
        started = distributed.init_ray("local", num_cpus=cores, quiet=True)
        try:
            run_once(distributed, inputs[:4], model, work / "warmup", 1, args.batch_size)
            for n_actors in args.actors:
                run = run_once(distributed, inputs, model, work / f"out-{n_actors}", n_actors, args.batch_size)
                report["runs"].append(run)
                print(f"{n_actors} actor(s): steady {run['steady_img_s']:.1f} img/s, end to end "
                      f"{run['end_to_end_img_s']:.1f} img/s ({run['wall_s']:.1f} s); per image in an actor: "
                      f"{run['median_ms_per_image']['total']:.1f} ms", file=sys.stderr)
        finally:
            if started:
                distributed.shutdown_ray()
        base = report["runs"][0]["steady_img_s"]
        for run in report["runs"]:
            run["speedup_vs_first"] = run["steady_img_s"] / base
        emit(report, args.json)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
