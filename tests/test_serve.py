"""``python -m ifseg_rt serve`` end to end: a real tritonserver (bundled with nvidia-pytriton) in a subprocess on
free loopback ports, one for the whole module; HTTP and gRPC results against in-process ``Segmenter.seg``,
concurrent clients, bad requests, and a clean SIGTERM shutdown (the last test)."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("tritonclient.grpc")
pytest.importorskip("tritonclient.http")
pytest.importorskip("pytriton")

import tritonclient.grpc as grpcclient  # noqa: E402
import tritonclient.http as httpclient  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from ifseg_rt import Segmenter  # noqa: E402
from ifseg_rt.world import render_scene  # noqa: E402
from ifseg_rt.runtime.segmenter import ImageError  # noqa: E402
from ifseg_rt.serve import Client, ServeError  # noqa: E402
from ifseg_rt.serve import protocol as P  # noqa: E402
from ifseg_rt.serve.tritonserver import free_port  # noqa: E402

PHOTO = Path(__file__).parent / "data" / "photo_stm32f3discovery.jpg"
MAX_PIXELS = 1_000_000  # the fixture's limit: a 3000 x 3000 PNG is a decompression bomb to this server
MAX_BYTES = 2_000_000
MAX_OUTPUT_PIXELS = 60_000  # the photo (360 x 238) is above it: its labels come as PNG
MAX_BODY = 3 * MAX_BYTES  # HTTP request bodies (the front refuses larger ones before reading them)
START_TIMEOUT_S = 240


def encode(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class ServerProcess:
    """``python -m ifseg_rt serve`` in a subprocess; ``stop()`` is idempotent and always leaves nothing running."""

    def __init__(self, model_dir: Path, work: Path):
        self.work = work
        self.ready_file = work / "ready.json"
        self.log_path = work / "serve.log"
        self.ports = {"http": free_port(), "grpc": free_port(), "metrics": free_port()}
        cmd = [sys.executable, "-m", "ifseg_rt", "serve", "--model", str(model_dir), "--threads", "1",
               "--http-port", str(self.ports["http"]), "--grpc-port", str(self.ports["grpc"]),
               "--metrics-port", str(self.ports["metrics"]), "--max-pixels", str(MAX_PIXELS),
               "--max-request-bytes", str(MAX_BYTES), "--max-output-pixels", str(MAX_OUTPUT_PIXELS),
               "--max-body-bytes", str(MAX_BODY), "--ready-file", str(self.ready_file), "--exit-timeout", "5"]
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.info = None

    def wait_ready(self) -> dict:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.ready_file.is_file():
                self.info = json.loads(self.ready_file.read_text())
                return self.info
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError(f"the server did not come up (exit code {self.proc.poll()}):\n{self.output()[-4000:]}")

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, sig=signal.SIGTERM, timeout_s: float = 60.0):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        child = (self.info or {}).get("server_pid")
        if child and _alive(child):  # only if our process died without stopping its tritonserver
            os.kill(child, signal.SIGKILL)
        self.log.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def segmenter(quick_nano_model):
    return Segmenter.load(quick_nano_model, threads=1)


@pytest.fixture(scope="module")
def server(quick_nano_model, tmp_path_factory):
    srv = ServerProcess(quick_nano_model, tmp_path_factory.mktemp("serve"))
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def images():
    """Generated scenes of several sizes (PNG and JPEG bytes), the real photo as a path, and as an array."""
    out = {}
    for seed, size, fmt in ((1, (96, 128), "PNG"), (2, (200, 150), "JPEG"), (3, (64, 64), "PNG")):
        out[f"scene{seed}.{fmt.lower()}"] = encode(render_scene(seed, size).image, fmt)
    out["photo path"] = PHOTO
    out["photo array"] = np.asarray(Image.open(PHOTO).convert("RGB"))
    return out


def _urls(server):
    return {"http": f"127.0.0.1:{server.ports['http']}", "grpc": f"grpc://127.0.0.1:{server.ports['grpc']}"}


def _get(url: str):
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_health_metadata_and_categories_in_the_config(server, segmenter):
    base = f"http://127.0.0.1:{server.ports['http']}"
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/ifseg/ready"):
        assert _get(base + path)[0] == 200, path
    status, body = _get(base + "/v2/models/ifseg")
    meta = json.loads(body)
    assert status == 200 and meta["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1, 1]}]
    assert {o["name"] for o in meta["outputs"]} == set(P.OUTPUTS)
    config = json.loads(_get(base + "/v2/models/ifseg/config")[1])
    assert P.categories_from_config(config, "ifseg") == segmenter.categories
    from ifseg_rt.system import available_cores

    # the default: one instance per available core on the CPU (at most 4)
    assert config["instance_group"][0]["count"] == min(4, available_cores()) and config["max_batch_size"] == 8
    assert config["dynamic_batching"]["default_queue_policy"]["max_queue_size"] == 64
    # loading / unloading models and shared memory are closed to clients (a token only the server knows)
    req = urllib.request.Request(base + "/v2/repository/models/ifseg/unload", data=b"{}", method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 403 and b"This API is restricted" in e.value.read()
    assert _get(base + "/v2/systemsharedmemory/status")[0] == 403
    assert _get(base + "/v2/models/ifseg/ready")[0] == 200


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_results_equal_in_process_segmenter(server, segmenter, images, protocol):
    client = Client(_urls(server)[protocol])
    assert client.categories == segmenter.categories
    for name, image in images.items():
        got = client.seg(image, return_probabilities=True)
        want = segmenter.seg(image, return_probabilities=True)
        np.testing.assert_array_equal(got.labels, want.labels, err_msg=name)
        assert got.labels.dtype == np.int32
        assert (got.grid, got.original_size, got.input_size) == (want.grid, want.original_size, want.input_size)
        np.testing.assert_allclose(got.probabilities, want.probabilities, rtol=0, atol=1e-6, err_msg=name)
        assert got.categories == want.categories and got.names() == want.names()
    assert client.seg(images["photo path"]).probabilities is None  # only on request
    client.close()


def test_exif_orientation_is_applied_by_the_server(server, segmenter, tmp_path):
    im = Image.open(PHOTO)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    rotated = tmp_path / "rotated.jpg"
    im.save(rotated, exif=exif.tobytes(), quality=95)
    got = Client(_urls(server)["grpc"]).seg(rotated)
    assert got.original_size == (im.width, im.height)
    np.testing.assert_array_equal(got.labels, segmenter.seg(rotated).labels)


def test_one_request_with_several_items_is_padded(server, segmenter, images):
    a, b = images["scene1.png"], images["scene2.jpeg"]
    inp = httpclient.InferInput(P.INPUT, [2, 1], "BYTES")
    inp.set_data_from_numpy(np.array([[a], [b]], dtype=np.object_), binary_data=True)
    with httpclient.InferenceServerClient(_urls(server)["http"]) as c:
        r = c.infer("ifseg", [inp])
    labels, sizes = r.as_numpy(P.LABELS), r.as_numpy(P.ORIGINAL_SIZE)
    assert labels.shape == (2, 200, 150) and sizes.tolist() == [[96, 128], [200, 150]]
    assert (labels[0, 96:] == P.PAD_LABEL).all() and (labels[0, :, 128:] == P.PAD_LABEL).all()
    for i, data in enumerate((a, b)):
        h, w = sizes[i]
        np.testing.assert_array_equal(labels[i, :h, :w], segmenter.seg(data).labels)


def test_concurrent_clients_get_their_own_results(server, segmenter):
    scenes = [encode(render_scene(10 + i, (80 + 8 * (i % 3), 112)).image) for i in range(8)]
    want = [segmenter.seg(s).labels for s in scenes]
    urls = _urls(server)
    shared = {"http": Client(urls["http"]), "grpc": Client(urls["grpc"])}  # one Client, many threads
    failures, done = [], []

    def worker(t: int):
        client = shared["http" if t % 2 else "grpc"]
        for k in range(6):
            i = (t + 3 * k) % len(scenes)
            try:
                got = client.seg(scenes[i]).labels
                if not np.array_equal(got, want[i]):
                    failures.append(f"thread {t}, request {k}: wrong labels for scene {i}")
                done.append(1)
            except Exception as e:  # noqa: BLE001 - collected and reported below
                failures.append(f"thread {t}, request {k}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures
    assert len(done) == 48


def _bad_requests():
    bomb = io.BytesIO()
    Image.new("L", (3000, 3000)).save(bomb, format="PNG")  # 9 Mpx in a few KB; this server allows 1 Mpx
    photo = PHOTO.read_bytes()
    return {
        "corrupt bytes": (photo[:1500], "truncated"),
        "empty item": (b"", "is empty (0 bytes)"),
        "not an image": (b"<html>hello</html>", "not an image format Pillow recognises"),
        "decompression bomb": (bomb.getvalue(), "above the 1 Mpx limit"),
        "too many bytes": (photo + b"\0" * MAX_BYTES, f"limit of {MAX_BYTES} bytes"),
    }


def _infer(protocol: str, server, tensor: np.ndarray, datatype: str = "BYTES"):
    mod = httpclient if protocol == "http" else grpcclient
    inp = mod.InferInput(P.INPUT, list(tensor.shape), datatype)
    if protocol == "http":
        inp.set_data_from_numpy(tensor, binary_data=True)
        with httpclient.InferenceServerClient(_urls(server)["http"]) as c:
            return c.infer("ifseg", [inp], outputs=[httpclient.InferRequestedOutput(P.LABELS)])
    inp.set_data_from_numpy(tensor)
    with grpcclient.InferenceServerClient(f"127.0.0.1:{server.ports['grpc']}") as c:
        return c.infer("ifseg", [inp], outputs=[grpcclient.InferRequestedOutput(P.LABELS)])


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_each_bad_request_gets_its_own_clear_error(server, segmenter, images, protocol):
    invalid = "400" if protocol == "http" else "StatusCode.INVALID_ARGUMENT"
    cases = {name: (np.array([[data]], dtype=np.object_), "BYTES", match)
             for name, (data, match) in _bad_requests().items()}
    cases["wrong dtype"] = (np.zeros((1, 1), np.float32), "FP32", "expects 'BYTES'")
    cases["wrong shape"] = (np.array([[b"a", b"b"]], dtype=np.object_), "BYTES", "unexpected shape")
    for name, (tensor, dtype, match) in cases.items():
        with pytest.raises(InferenceServerException) as e:
            _infer(protocol, server, tensor, dtype)
        assert e.value.status() == invalid, (name, e.value.status(), e.value.message())
        assert match in e.value.message(), (name, e.value.message())
    # ... and the server keeps serving
    good = np.array([[images["scene1.png"]]], dtype=np.object_)
    np.testing.assert_array_equal(_infer(protocol, server, good).as_numpy(P.LABELS)[0],
                                  segmenter.seg(images["scene1.png"]).labels)


def test_bad_requests_in_one_dynamic_batch_fail_alone(server, segmenter, images):
    """Good and bad requests sent at once (so that the batcher joins them): only the bad ones fail."""
    bad = [data for data, _ in _bad_requests().values()][:4]
    goods = [images["scene1.png"], images["scene3.png"], PHOTO.read_bytes(), images["scene2.jpeg"]]
    sent = [x for pair in zip(goods, bad) for x in pair]
    client = Client(_urls(server)["grpc"])
    results = [None] * len(sent)
    barrier = threading.Barrier(len(sent))

    def one(i):
        barrier.wait()
        results[i] = client.seg([sent[i]], return_exceptions=True)[0]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(sent))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, r in enumerate(results):
        if i % 2:
            assert isinstance(r, ImageError) and isinstance(r, ValueError), r
        else:
            np.testing.assert_array_equal(r.labels, segmenter.seg(sent[i]).labels)


def test_client_errors(server, images, tmp_path):
    url = _urls(server)["http"]
    with pytest.raises(ServeError, match="failed"):
        Client(url, model="nope")
    with pytest.raises(ServeError, match="cannot reach|failed"):
        Client(f"127.0.0.1:{free_port()}")
    client = Client(url)
    with pytest.raises(ImageError, match="not an image format") as e:
        client.seg(b"junk")
    assert isinstance(e.value, ValueError) and e.value.index == 0
    with pytest.raises(FileNotFoundError):
        client.seg(tmp_path / "missing.jpg")
    out = client.seg([b"", images["scene3.png"], tmp_path / "missing.jpg"], return_exceptions=True)
    assert isinstance(out[0], ImageError) and "empty" in out[0].reason
    assert out[1].labels.shape == (64, 64)
    assert isinstance(out[2], ImageError) and out[2].index == 2
    with pytest.raises(ImageError, match="image 1") as e:  # an item unreadable here: named by its index too
        client.seg([images["scene3.png"], tmp_path / "missing.jpg"])
    assert e.value.index == 1
    with pytest.raises(ServeError, match=r"does not adapt on request \(it has no model 'ifseg_adapt'\): start it "
                                         r"with serve --base"):
        client.adapt(["sky", "grass"])
    assert client.is_ready()
    # a body above --max-body-bytes: 413 from its Content-Length alone (the body is never sent)
    with socket.create_connection(("127.0.0.1", server.ports["http"]), timeout=30) as s:
        s.sendall(f"POST /v2/models/ifseg/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {MAX_BODY + 1}\r\n\r\n"
                  .encode())
        answer = s.recv(65536)
    assert answer.startswith(b"HTTP/1.1 413") and f"limit of {MAX_BODY} bytes".encode() in answer, answer[:300]


def test_large_label_maps_come_as_png(server, segmenter):
    """A request whose int32 labels would exceed --max-output-pixels is refused before any work, naming the limit
    and the way out; the same labels as a PNG are equal to the in-process ones."""
    photo = PHOTO.read_bytes()
    want = segmenter.seg(photo).labels
    assert want.size > MAX_OUTPUT_PIXELS
    with pytest.raises(InferenceServerException) as e:
        _infer("http", server, np.array([[photo]], dtype=np.object_))
    assert e.value.status() == "400" and f"limit of {MAX_OUTPUT_PIXELS}" in e.value.message()
    assert "'labels_png'" in e.value.message()
    inp = httpclient.InferInput(P.INPUT, [1, 1], "BYTES")
    inp.set_data_from_numpy(np.array([[photo]], dtype=np.object_), binary_data=True)
    with httpclient.InferenceServerClient(_urls(server)["http"]) as c:
        r = c.infer("ifseg", [inp], outputs=[httpclient.InferRequestedOutput(P.LABELS_PNG, binary_data=True)])
    png = r.as_numpy(P.LABELS_PNG)
    assert png.shape == (1, 1) and len(png[0, 0]) < want.size  # smaller than even one byte per pixel
    with Image.open(io.BytesIO(png[0, 0])) as im:
        np.testing.assert_array_equal(np.asarray(im), want)
    with pytest.raises(ImageError, match="--max-output-pixels"):
        Client(_urls(server)["grpc"], png_labels=False).seg(photo)
    small = render_scene(4, (40, 56)).image
    got = Client(_urls(server)["grpc"], png_labels=True).seg(small)
    np.testing.assert_array_equal(got.labels, segmenter.seg(small).labels)


def _metrics(server) -> dict:
    status, body = _get(f"http://127.0.0.1:{server.ports['metrics']}/metrics")
    assert status == 200
    out = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def test_metrics_count_requests_by_outcome(server, images):
    before = _metrics(server)
    assert 'nv_inference_request_success{model="ifseg",version="1"}' in before
    assert 'nv_inference_pending_request_count{model="ifseg",version="1"}' in before  # the queue depth
    assert 'nv_inference_request_summary_us{model="ifseg",version="1",quantile="0.99"}' in before  # latency
    client = Client(_urls(server)["http"])
    client.seg(images["scene1.png"])
    client.seg(images["scene3.png"])
    assert isinstance(client.seg([b"junk"], return_exceptions=True)[0], ImageError)
    after = _metrics(server)

    def delta(key):
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta('ifseg_requests{model="ifseg",outcome="ok"}') == 2
    assert delta('ifseg_requests{model="ifseg",outcome="refused"}') == 1
    assert delta('ifseg_requests{model="ifseg",outcome="failed"}') == 0
    assert delta('ifseg_images{model="ifseg"}') == 2
    assert delta('ifseg_execute_seconds_count{model="ifseg"}') == 3
    assert delta('ifseg_execute_seconds_bucket{model="ifseg",le="+Inf"}') == 3
    assert after['ifseg_worker_restarts{model="ifseg"}'] == 0 and after['ifseg_worker_deaths{model="ifseg"}'] == 0


def test_sigterm_stops_everything(server):
    """Last: SIGTERM ends the serve process with code 0, tritonserver with it, and removes its files."""
    info = server.info
    assert _alive(info["server_pid"])
    code = server.stop(signal.SIGTERM)
    assert code == 0, server.output()[-3000:]
    assert not _alive(info["server_pid"])
    assert not server.ready_file.exists()
    assert "stopping: finishing in-flight requests" in server.output()
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"ifseg{info['pid']}_")]  # no region left
    assert "CudaDriverHelper" not in server.output()  # no CUDA "error" line on a CPU machine
    assert "ifseg: refused a request: " in server.output()  # the earlier bad requests, one line each
