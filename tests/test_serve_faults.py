"""A service that tells the truth under faults (issue 24), against the real bundled tritonserver on loopback: a dead
worker is restarted (readiness false meanwhile), busy ports refuse the start before anything is reported, stale
shared memory of killed servers is removed, queued requests time out instead of running after their client left."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

pytest.importorskip("tritonclient.http")
pytest.importorskip("pytriton")

from ifseg_rt.serve import Client, ServeError  # noqa: E402
from ifseg_rt.serve.repository import serving_config  # noqa: E402
from ifseg_rt.serve.server import ServeOptions, start_server  # noqa: E402
from ifseg_rt.serve.tritonserver import (SHM_DIR, ServerError, WorkerWatch, check_ports, clean_stale_shm,  # noqa: E402
                                         free_port, workers)

START_TIMEOUT_S = 240


def _ready(url: str, path: str = "/v2/health/ready"):
    try:
        with urllib.request.urlopen(f"http://{url}{path}", timeout=3) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):
        return None


def test_a_dead_worker_is_restarted(quick_nano_model, tmp_path):
    options = ServeOptions(instances=2, threads=1, http_port=0, grpc_port=0, metrics_port=0)
    server = start_server(quick_nano_model, tmp_path, options, timeout_s=START_TIMEOUT_S)
    lines = []
    watch = WorkerWatch(server, log=lines.append, interval_s=0.2)
    watch.start()
    try:
        before = workers(server.pid)
        assert len(before) == 2 and {w.model for w in before.values()} == {"ifseg"}
        victim = next(iter(before.values()))
        assert (SHM_DIR / victim.shm).exists()
        image = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
        client = Client(server.http_url)
        client.seg(image)
        os.kill(victim.pid, signal.SIGKILL)
        states, deadline = [], time.monotonic() + 60
        while watch.restarts < 1 and time.monotonic() < deadline:
            states.append(_ready(server.http_url))
            time.sleep(0.05)
        assert watch.counts() == {"worker_deaths": 1, "model_restarts": 1, "restart_failures": 0}, lines
        assert {400, 503} & set(states), states  # not ready while the model restarts
        assert any(f"worker died: {victim.instance} of model 'ifseg' (pid {victim.pid})" in ln for ln in lines)
        assert any("model 'ifseg' restarted" in ln for ln in lines)
        assert not (SHM_DIR / victim.shm).exists()
        after = workers(server.pid)
        assert len(after) == 2 and victim.pid not in after and not set(before) & set(after)  # all fresh
        assert _ready(server.http_url) == 200
        for _ in range(8):  # every request succeeds again: no instance is left dead
            assert client.seg(image).labels.shape == (48, 64)
        with urllib.request.urlopen(server.metrics_url, timeout=10) as r:  # the restart is in the metrics
            metrics = r.read().decode()
        assert 'ifseg_worker_deaths{model="ifseg"} 1' in metrics and 'ifseg_worker_restarts{model="ifseg"} 1' in metrics
        watch.stop()
        server.drain()  # what a SIGTERM starts with: not ready, new requests refused (kept-alive connection too)
        assert _ready(server.http_url) is None  # the HTTP front no longer listens
        assert _ready(server.triton_http_url, "/v2/models/ifseg/ready") in (400, 503)  # Triton's "not ready" is 400
        with pytest.raises(Exception, match="ifseg"):
            client.seg(image)
    finally:
        watch.stop()
        server.stop()
    assert not server.is_alive()
    assert not [n for n in os.listdir(SHM_DIR) if n.startswith(server.shm_prefix)]


def test_busy_ports_refuse_the_start(quick_nano_model, tmp_path, capsys):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ServerError, match=rf"http port {port} \(.*\); another server runs there"):
            check_ports("127.0.0.1", {"http": port, "grpc": 0})
        ready = tmp_path / "ready.json"
        proc = subprocess.run([sys.executable, "-m", "ifseg_rt", "serve", "--model", str(quick_nano_model),
                               "--http-port", str(port), "--grpc-port", str(free_port()), "--metrics-port",
                               str(free_port()), "--ready-file", str(ready)],
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and f"http port {port}" in proc.stderr, proc.stderr[-2000:]
    assert "serving" not in proc.stdout and not ready.exists()


def test_stale_shared_memory_is_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"ifseg{dead.pid}_0123abcd_region"
    ours = tmp_path / f"ifseg{os.getpid()}_0123abcd_region"
    other = tmp_path / "someone_else"
    for f in (stale, ours, other):
        f.write_bytes(b"x")
    assert clean_stale_shm(tmp_path) == [stale.name]
    assert not stale.exists() and ours.exists() and other.exists()


def test_queued_requests_time_out():
    class Spec:  # serving_config reads these fields only
        root = "/m"
        categories = ("a", "b")

    policy = serving_config(Spec(), queue_timeout_ms=1500).dynamic_batching.default_queue_policy
    assert policy.default_timeout_microseconds == 1_500_000 and policy.max_queue_size == 64
    assert serving_config(Spec(), queue_timeout_ms=0).dynamic_batching.default_queue_policy \
        .default_timeout_microseconds == 0
    with pytest.raises(ValueError, match="queue_timeout_ms must be an integer >= 0"):
        serving_config(Spec(), queue_timeout_ms=-1)


def test_a_worker_killed_mid_request_does_not_hold_the_shutdown(quick_nano_model, tmp_path):
    """A worker killed while it runs a request leaves Triton 2.51 a model version that never finishes unloading: the
    restart goes past it (``stuck_models``), the request fails, the next ones succeed, and the shutdown does not wait
    Triton's exit timeout for that version (it used to: exit code 1 after the timeout; now SIGKILL once drained)."""
    import threading

    from PIL import Image

    options = ServeOptions(instances=1, threads=1, http_port=0, grpc_port=0, metrics_port=0, exit_timeout_s=30)
    server = start_server(quick_nano_model, tmp_path, options, timeout_s=START_TIMEOUT_S, log=None)
    watch = WorkerWatch(server, log=lambda line: None, interval_s=0.2)
    watch.start()
    try:
        blocks = np.random.default_rng(1).integers(0, 255, (50, 50, 3), dtype=np.uint8)
        big = io.BytesIO()
        Image.fromarray(blocks).resize((5000, 5000), Image.NEAREST).save(big, format="PNG")  # slow to decode / encode
        client = Client(server.http_url, timeout_s=120)
        client.seg(np.zeros((32, 32, 3), np.uint8))
        victim = next(iter(workers(server.pid).values()))
        out = []

        def send():
            try:
                out.append(client.seg(big.getvalue()))
            except Exception as e:  # noqa: BLE001 - what the test expects
                out.append(e)

        request = threading.Thread(target=send)
        request.start()
        deadline, idle = time.monotonic() + 30, _cpu_ticks(victim.pid)
        while _cpu_ticks(victim.pid) < idle + 10 and time.monotonic() < deadline:  # the worker is busy with it
            time.sleep(0.01)
        os.kill(victim.pid, signal.SIGKILL)
        request.join(120)
        while watch.restarts < 1 and time.monotonic() < deadline + 60:
            time.sleep(0.05)
        assert watch.counts()["model_restarts"] == 1 and server.stuck_models == {"ifseg"}
        assert isinstance(out[0], ServeError) and "not healthy" in str(out[0])  # it was on the dead worker
        assert Client(server.http_url).seg(np.zeros((32, 32, 3), np.uint8)).labels.shape == (32, 32)
        watch.stop()
        prefix = server.shm_prefix
        code = server.stop()
        assert code == -signal.SIGKILL  # not Triton's own exit (code 1) after its 30 s exit timeout
        assert not [n for n in os.listdir(SHM_DIR) if n.startswith(prefix)]
    finally:
        watch.stop()
        server.stop()


def _cpu_ticks(pid: int) -> int:
    """User + system CPU time of a process, in clock ticks (/proc/PID/stat fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])
