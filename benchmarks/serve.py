"""Served vs in-process throughput and latency: ``python -m ifseg_rt serve`` (Triton) against ``Segmenter.seg`` on
the same model, images and machine, for 1, 4 and 8 concurrent clients, plus the server's memory.

    python benchmarks/serve.py --json benchmarks/results/serve.json             # 200 requests per client
    python benchmarks/serve.py --model models/street --size 512 --protocols grpc http
    python benchmarks/serve.py --quick                                          # checks the script (20 requests)

Without ``--model`` the quick nano model is built (``demo --quick``, ~20 s) and its image policy set to
``--size`` (short side), so the network sees ``size/16`` cells per side. Every client sends JPEG bytes of
``--images`` generated scenes (``--size`` px, square); the in-process baseline decodes the same bytes
(``Segmenter.seg(bytes)``), with C threads sharing one ``Segmenter`` for C clients. Each client runs
``--requests`` requests back to back. Reported per level: requests/s (all clients), p50 / p99 latency, failed
requests, and the served/in-process throughput ratio; server RSS (the serve process with its HTTP front, tritonserver
and its python-backend stubs) after loading and at its peak under load. The clients run on the same machine and share
its cores with the server.

``--faults`` runs the fault cases instead (2 instances, 8 clients sending throughout): kill -9 of one python-backend
worker (failed requests, time to the model's restart, failures after it), a second server on the same ports
(refused before it reports anything), a 6300 x 6300 PNG (the int32 labels refused above ``--max-output-pixels``,
the Client's PNG labels: response bytes, time, the server's /dev/shm bytes), the issue's malformed KServe requests
through the HTTP front and to Triton directly, a 47 MB body (bytes sent before the 413), the ifseg_* metrics after
all that, and a SIGTERM-style drain under load (requests accepted after it began, duration, shared-memory regions
left).

    python benchmarks/serve.py --faults --json benchmarks/results/serve_faults.json

The server is ``python -m ifseg_rt serve`` in its own process (as deployed: its HTTP front shares no interpreter
with the clients). Protocol ``http`` goes through the HTTP front (the public port), ``http-direct`` to Triton's own
HTTP server behind it (a loopback port), ``grpc`` to Triton's gRPC: the front's cost is ``http`` vs ``http-direct``
in one run.

``--shapes N`` first sends N images of distinct shapes one after another (short side ``--size``, long side up to
4x, both orientations) and reports the server's RSS after every 10: memory must not grow with new shapes.

    python benchmarks/serve.py --size 512 --shapes 100 --clients 1 --requests 5     # the paper's policy
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np

from report import emit  # benchmarks/report.py (the script's folder is on sys.path)


def cpu_info() -> Dict[str, object]:
    from ifseg_rt.system import available_cores, cpu_model

    return {"cpu": cpu_model(), "cores": available_cores(), "loadavg": list(os.getloadavg())}


def tree_rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` and all its descendants (Linux /proc), in MiB."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return total / 1024


class RssSampler(threading.Thread):
    def __init__(self, pid: int, every_s: float = 0.2):
        super().__init__(daemon=True)
        self.pid, self.every_s, self.peak, self._done = pid, every_s, 0.0, threading.Event()

    def run(self):
        while not self._done.is_set():
            self.peak = max(self.peak, tree_rss_mb(self.pid))
            self._done.wait(self.every_s)

    def stop(self) -> float:
        self._done.set()
        self.join()
        return self.peak


def run_clients(clients: int, requests: int, call: Callable[[int, int], None]) -> Dict[str, object]:
    """``clients`` threads, each calling ``call(client, k)`` ``requests`` times back to back."""
    latencies: List[float] = []
    failures: List[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)

    def worker(c: int):
        mine = []
        barrier.wait()
        for k in range(requests):
            t0 = time.perf_counter()
            try:
                call(c, k)
                mine.append(time.perf_counter() - t0)
            except Exception as e:  # noqa: BLE001 - counted and reported
                with lock:
                    failures.append(f"{type(e).__name__}: {e}"[:300])
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=worker, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = np.asarray(latencies) * 1e3
    return {"clients": clients, "requests": clients * requests, "failed": len(failures),
            "first_failures": failures[:3], "wall_s": wall, "rps": len(latencies) / wall if wall else 0.0,
            "p50_ms": float(np.percentile(lat, 50)) if lat.size else None,
            "p99_ms": float(np.percentile(lat, 99)) if lat.size else None}


def quick_model(work: Path, short_side: int) -> Path:
    """The quick nano model (demo --quick) with its image policy's short side set to ``short_side``."""
    from ifseg_rt.nano.demo import QUICK, run_demo
    from ifseg_rt.world import DEFAULT_DEMO_CATEGORIES
    from ifseg_rt.runtime.model_dir import MANIFEST, load_model_dir

    with contextlib.redirect_stdout(io.StringIO()):  # the adaptation's step lines
        run_demo(work / "demo", DEFAULT_DEMO_CATEGORIES, QUICK, threads=1, progress=False, log=lambda *a, **k: None)
    model = work / "demo" / "model"
    manifest = json.loads((model / MANIFEST).read_text())
    manifest["image"]["policy"].update(short_side=short_side, max_long_side=4 * short_side)
    (model / MANIFEST).write_text(json.dumps(manifest, indent=2))
    load_model_dir(model)  # still valid
    return model


def shape_sweep(server, n: int, short: int) -> Dict[str, object]:
    """``n`` images of distinct shapes through the served model, one at a time: server RSS after every 10th."""
    from PIL import Image

    from ifseg_rt.serve import Client

    rng = np.random.default_rng(0)
    client = Client(server.http_url)
    longs = rng.permutation(np.arange(short, 4 * short + 1))[:n]
    after = []
    for i, long in enumerate(longs):
        h, w = (short, int(long)) if i % 2 else (int(long), short)
        small = rng.integers(0, 256, (max(1, h // 32), max(1, w // 32), 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(small).resize((w, h), Image.NEAREST).save(buf, format="PNG")
        client.seg(buf.getvalue())
        if (i + 1) % 10 == 0 or i + 1 == n:
            after.append([i + 1, tree_rss_mb(server.pid)])
            print(f"  {i + 1} shapes: server RSS {after[-1][1]:.0f} MiB", flush=True)
    client.close()
    first = after[0][1]
    return {"images": n, "rss_mb_after": after, "change_from_first_pct": 100 * (after[-1][1] / first - 1)}


class ServeProcess:
    """``python -m ifseg_rt serve`` on free loopback ports in a subprocess, until ``stop()``."""

    def __init__(self, model: Path, work: Path, *, instances: int, threads: int, max_batch_size: int):
        from ifseg_rt.serve.tritonserver import free_port

        self.threads = threads
        ready = work / "serve_ready.json"
        ports = {k: free_port() for k in ("http", "grpc", "metrics")}
        cmd = [sys.executable, "-m", "ifseg_rt", "serve", "--model", str(model), "--instances", str(instances),
               "--threads", str(threads), "--max-batch-size", str(max_batch_size), "--ready-file", str(ready),
               "--quiet"] + [a for k, v in ports.items() for a in (f"--{k}-port", str(v))]
        self.log = open(work / "serve.log", "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while not ready.is_file():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"serve did not come up:\n{(work / 'serve.log').read_text()[-3000:]}")
            time.sleep(0.2)
        info = json.loads(ready.read_text())
        self.pid = self.proc.pid  # serve (its HTTP front) + tritonserver + its workers
        self.http_url, self.grpc_url = f"127.0.0.1:{info['http']}", f"127.0.0.1:{info['grpc']}"
        self.triton_http_url = info["triton_http"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class Load(threading.Thread):
    """``clients`` threads sending ``scenes`` until stopped; every request's (start, end, ok) is recorded."""

    def __init__(self, url: str, scenes, clients: int = 8):
        super().__init__(daemon=True)
        self.url, self.scenes, self.clients = url, scenes, clients
        self.records: List[tuple] = []
        self.errors: Dict[str, int] = {}  # first line of each distinct error -> count
        self.halt = threading.Event()

    def run(self):
        from ifseg_rt.serve import Client

        def worker(c):
            client = Client(self.url, timeout_s=30)
            k = 0
            while not self.halt.is_set():
                t0 = time.monotonic()
                try:
                    client.seg(self.scenes[(c * 7 + k) % len(self.scenes)])
                    ok = True
                except Exception as e:  # noqa: BLE001 - every failure is counted, by message
                    ok = False
                    msg = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
                    self.errors[msg] = self.errors.get(msg, 0) + 1
                self.records.append((t0, time.monotonic(), ok))
                k += 1
                if not ok:
                    time.sleep(0.05)
            client.close()

        threads = [threading.Thread(target=worker, args=(c,), daemon=True) for c in range(self.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def failed(self, start: float = 0.0, end: float = float("inf")) -> List[int]:
        """[failed, total] of the requests that started in [start, end)."""
        sel = [ok for t0, _, ok in self.records if start <= t0 < end]
        return [sum(1 for ok in sel if not ok), len(sel)]


def protocol_cases(server) -> Dict[str, object]:
    """The issue's malformed KServe requests through the HTTP front and to Triton's own HTTP server behind it, and a
    47 MB body announced by its Content-Length: bytes sent before the refusal came, and how long it took."""
    import socket

    def post(url: str, body: bytes) -> int:
        req = urllib.request.Request(f"http://{url}/v2/models/ifseg/infer", data=body, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    image = {"name": "image", "datatype": "BYTES"}
    cases = {"{": b"{", "{}": b"{}",
             "shape [-1, 1]": json.dumps({"inputs": [{**image, "shape": [-1, 1], "data": ["x"]}]}).encode(),
             "numbers as BYTES": json.dumps({"inputs": [{**image, "shape": [1, 1], "data": [3]}]}).encode()}
    out: Dict[str, object] = {"malformed": {k: {"front": post(server.http_url, b),
                                                "triton": post(server.triton_http_url, b)}
                                            for k, b in cases.items()}}
    host, port = server.http_url.split(":")
    size, sent = 47 * 1024 * 1024, 0
    t0 = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"POST /v2/models/ifseg/infer HTTP/1.1\r\nHost: {host}\r\nContent-Length: {size}\r\n\r\n"
                     .encode())
        sock.setblocking(False)
        chunk, answer = b"\0" * 65536, b""
        while sent < size and not answer:
            try:
                answer = sock.recv(4096)
                break
            except BlockingIOError:
                pass
            try:
                sent += sock.send(chunk[:size - sent])
            except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                time.sleep(0.001)
        sock.settimeout(30)
        while b"\r\n" not in answer:
            more = sock.recv(4096)
            if not more:
                break
            answer += more
    out["oversized_body"] = {"body_bytes": size, "status_line": answer.split(b"\r\n", 1)[0].decode(errors="replace"),
                             "bytes_sent_before_answer": sent, "seconds": round(time.monotonic() - t0, 3)}
    return out


def large_image(server) -> Dict[str, object]:
    """A 6300 x 6300 PNG (about 100 KB, 39.7 MP): the int32 labels request, then the Client's (PNG labels)."""
    from PIL import Image

    from ifseg_rt.runtime.outputs import encode_label_png
    from ifseg_rt.runtime.segmenter import ImageError
    from ifseg_rt.serve import Client
    from ifseg_rt.serve.tritonserver import SHM_DIR
    from ifseg_rt.world import render_scene

    def shm_bytes() -> int:
        return sum((SHM_DIR / n).stat().st_size for n in os.listdir(SHM_DIR) if n.startswith(server.shm_prefix))

    buf = io.BytesIO()
    Image.fromarray(render_scene(5, (252, 252)).image).resize((6300, 6300), Image.NEAREST).save(buf, format="PNG")
    data = buf.getvalue()
    out: Dict[str, object] = {"png_bytes": len(data), "shm_bytes_before": shm_bytes()}
    t0 = time.monotonic()
    try:
        Client(server.http_url, png_labels=False, timeout_s=120).seg(data)
        out["int32_labels"] = "served"
    except ImageError as e:
        out["int32_labels"] = f"refused in {time.monotonic() - t0:.2f} s: {e.reason[:160]}"
    client = Client(server.http_url, timeout_s=120)
    t0 = time.monotonic()
    res = client.seg(data)
    out["png_labels_s"] = round(time.monotonic() - t0, 2)
    out["labels_shape"] = list(res.labels.shape)
    out["labels_png_bytes"] = len(encode_label_png(res.labels, len(res.categories)))  # what the server sent
    out["int32_labels_bytes"] = 4 * res.labels.size
    out["shm_bytes_after"] = shm_bytes()
    return out


def fault_run(model: Path, work: Path, scenes) -> Dict[str, object]:
    """The fault cases of ``--faults`` (see the module docstring)."""

    from ifseg_rt.serve.server import ServeOptions, start_server
    from ifseg_rt.serve.tritonserver import SHM_DIR, ServerError, TritonServer, WorkerWatch, workers

    out: Dict[str, object] = {}
    options = ServeOptions(http_port=0, grpc_port=0, metrics_port=0, instances=2, threads=1)
    server = start_server(model, work / "a", options)
    events: List[str] = []
    watch = WorkerWatch(server, log=lambda line: events.append(f"{time.monotonic():.2f} {line}"))
    watch.start()
    try:
        load = Load(server.http_url, scenes)
        load.start()
        time.sleep(3)
        victim = next(iter(workers(server.pid).values()))
        t_kill = time.monotonic()
        os.kill(victim.pid, signal.SIGKILL)
        while watch.restarts + watch.failures < 1 and time.monotonic() < t_kill + 120:
            time.sleep(0.05)
        t_back = time.monotonic()
        time.sleep(5)
        load.halt.set()
        load.join()
        out["worker_kill"] = {"errors": dict(load.errors), "before": load.failed(0, t_kill), "kill_to_restart": load.failed(t_kill, t_back),
                              "after_restart_5s": load.failed(t_back), "restart_s": round(t_back - t_kill, 2),
                              "counts": watch.counts(), "log": events}
        # a second server on the same ports
        t0 = time.monotonic()
        second = TritonServer(server.repository, http_port=server.ports["http"], grpc_port=server.ports["grpc"],
                              metrics_port=server.ports["metrics"])
        try:
            second.start(timeout_s=60)
            out["busy_ports"] = {"refused": False}
            second.stop()
        except ServerError as e:
            out["busy_ports"] = {"refused": True, "seconds": round(time.monotonic() - t0, 3), "error": str(e)}
        out["large_image"] = large_image(server)
        out["protocol"] = protocol_cases(server)
        with urllib.request.urlopen(server.metrics_url, timeout=10) as r:
            out["metrics"] = [ln for ln in r.read().decode().splitlines()
                              if ln.startswith(("ifseg_requests", "ifseg_images", "ifseg_worker", "ifseg_execute_seconds_"
                                                "count", "nv_inference_pending", "ifseg_http"))]
        # drain under load
        load = Load(server.http_url, scenes)
        load.start()
        time.sleep(2)
        watch.stop()
        t_stop = time.monotonic()
        code = server.stop()
        t_done = time.monotonic()
        load.halt.set()
        load.join()
        accepted_after = sum(1 for t0, _, ok in load.records if ok and t0 >= t_stop + 0.5)
        out["drain"] = {"errors": dict(load.errors), "exit_code": code, "stop_s": round(t_done - t_stop, 2), "before": load.failed(0, t_stop),
                        "accepted_after_drain_began": accepted_after,
                        "shm_left": [n for n in os.listdir(SHM_DIR) if n.startswith(server.shm_prefix)]}
    finally:
        watch.stop()
        server.stop()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", help="exported model directory (default: the quick nano model, built here)")
    p.add_argument("--size", type=int, default=256, help="scene size in px (and the quick model's short side)")
    p.add_argument("--images", type=int, default=16, help="distinct scenes the clients cycle through")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8], help="concurrency levels")
    p.add_argument("--requests", type=int, default=200, help="requests per client per level")
    p.add_argument("--protocols", nargs="+", choices=("grpc", "http", "http-direct"), default=["grpc"],
                   help="served protocols (http-direct: Triton's HTTP behind the front)")
    p.add_argument("--instances", type=int, default=1, help="server model instances")
    p.add_argument("--threads", type=int, default=0, help="engine threads (0: all cores; per instance: / instances)")
    p.add_argument("--max-batch-size", type=int, default=8, help="server max batch size")
    p.add_argument("--quick", action="store_true", help="20 requests per client: checks that the script works")
    p.add_argument("--shapes", type=int, default=0, help="first send this many images of distinct shapes (memory)")
    p.add_argument("--faults", action="store_true", help="run the fault cases instead (see the module docstring)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if args.quick:
        args.requests = min(args.requests, 20)

    from PIL import Image

    from ifseg_rt import Segmenter
    from ifseg_rt.world import render_scene
    from ifseg_rt.serve import Client

    info = cpu_info()
    cores = int(info["cores"])
    work = Path(tempfile.mkdtemp(prefix="ifseg_bench_serve_"))
    try:
        model = Path(args.model) if args.model else quick_model(work, args.size)
        scenes = []
        for i in range(args.images):
            buf = io.BytesIO()
            Image.fromarray(render_scene(100 + i, args.size).image).save(buf, format="JPEG", quality=90)
            scenes.append(buf.getvalue())
        if args.faults:
            result = {"machine": info, "model": str(model), "faults": fault_run(model, work, scenes)}
            emit(result, args.json)
            return 0
        threads = args.threads or cores
        result = {"machine": info, "model": str(model), "size": args.size, "requests_per_client": args.requests,
                  "instances": args.instances, "threads": threads, "max_batch_size": args.max_batch_size,
                  "python": platform.python_version(), "levels": []}

        seg = Segmenter.load(model, threads=threads)
        want = [seg.seg(s).labels for s in scenes]
        inproc = {c: run_clients(c, args.requests, lambda ci, k: seg.seg(scenes[(ci * 7 + k) % len(scenes)]))
                  for c in args.clients}
        seg = None  # free the in-process model before the server loads its own

        server = ServeProcess(model, work, instances=args.instances, threads=max(1, threads // args.instances),
                              max_batch_size=args.max_batch_size)
        try:
            rss_loaded = tree_rss_mb(server.pid)
            if args.shapes:
                result["shapes"] = shape_sweep(server, args.shapes, args.size)
            served = {}
            sampler = RssSampler(server.pid)
            sampler.start()
            for proto in args.protocols:
                client = Client({"http": server.http_url, "http-direct": server.triton_http_url,
                                 "grpc": "grpc://" + server.grpc_url}[proto])
                wrong = []

                def call(ci, k, client=client, wrong=wrong):
                    i = (ci * 7 + k) % len(scenes)
                    if not np.array_equal(client.seg(scenes[i]).labels, want[i]):
                        wrong.append(i)
                        raise AssertionError(f"labels differ from in-process for scene {i}")

                client.seg(scenes[0])  # connect + warm
                served[proto] = {c: run_clients(c, args.requests, call) for c in args.clients}
                client.close()
            rss_peak = sampler.stop()
            with urllib.request.urlopen(f"http://{server.http_url}/v2/models/ifseg/stats", timeout=10) as r:
                stats = json.loads(r.read())
        finally:
            server.stop()
        s = stats["model_stats"][0]
        result["server"] = {"rss_mb_loaded": rss_loaded, "rss_mb_peak": rss_peak,
                            "inference_count": int(s.get("inference_count", 0)),
                            "execution_count": int(s.get("execution_count", 0))}
        for c in args.clients:
            level = {"clients": c, "in_process": inproc[c]}
            for proto in args.protocols:
                level[proto] = served[proto][c]
                level[f"{proto}_vs_in_process"] = served[proto][c]["rps"] / inproc[c]["rps"]
            result["levels"].append(level)
        result["machine"]["loadavg_end"] = list(os.getloadavg())
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"CPU: {info['cpu']}, {cores} cores, load average {info['loadavg'][0]:.2f} at start, "
          f"{result['machine']['loadavg_end'][0]:.2f} at the end; model {result['model']}; {args.size} px JPEG scenes; "
          f"{args.requests} requests per client; server: {args.instances} instance(s) x {server.threads} thread(s), "
          f"max batch {args.max_batch_size}")
    head = f"{'clients':>7} | {'in-process req/s':>16} {'p50':>7} {'p99':>7}"
    for proto in args.protocols:
        head += f" | {proto + ' req/s':>10} {'p50':>7} {'p99':>7} {'failed':>6} {'ratio':>6}"
    print(head)
    for level in result["levels"]:
        ip = level["in_process"]
        row = f"{level['clients']:>7} | {ip['rps']:>16.1f} {ip['p50_ms']:>7.1f} {ip['p99_ms']:>7.1f}"
        for proto in args.protocols:
            sv = level[proto]
            row += (f" | {sv['rps']:>10.1f} {sv['p50_ms'] or float('nan'):>7.1f} {sv['p99_ms'] or float('nan'):>7.1f} "
                    f"{sv['failed']:>6d} {level[proto + '_vs_in_process']:>6.2f}")
        print(row)
    if "shapes" in result:
        sh = result["shapes"]
        print(f"{sh['images']} distinct shapes: server RSS {sh['rss_mb_after'][0][1]:.0f} MiB after 10, "
              f"{sh['rss_mb_after'][-1][1]:.0f} MiB after {sh['images']} ({sh['change_from_first_pct']:+.1f} %)")
    srv = result["server"]
    print(f"server RSS (serve + tritonserver + stubs): {srv['rss_mb_loaded']:.0f} MiB loaded, {srv['rss_mb_peak']:.0f} MiB "
          f"peak; {srv['inference_count']} images in {srv['execution_count']} executions "
          f"(mean batch {srv['inference_count'] / max(1, srv['execution_count']):.2f})")
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    failed = sum(level[proto]["failed"] for level in result["levels"] for proto in args.protocols)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
