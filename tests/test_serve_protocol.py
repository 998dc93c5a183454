"""The serving contract without a server: request decoding and its limits, output packing, the client's encoding
and URLs, category parameters, and the torch-free imports of ifseg_rt.serve."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ifseg_rt.runtime.preprocess import load_image
from ifseg_rt.runtime.segmenter import SegmentationResult
from ifseg_rt.serve import protocol as P
from ifseg_rt.serve.client import encode_image, parse_url

PHOTO = Path(__file__).parent / "data" / "photo_stm32f3discovery.jpg"


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def items(*datas) -> np.ndarray:
    return np.array([[d] for d in datas], dtype=np.object_)


def test_decode_items_matches_load_image_of_the_file(tmp_path):
    rot = tmp_path / "rotated.jpg"  # EXIF orientation 6: the decoded image must come out upright (transposed)
    im = Image.open(PHOTO)
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(rot, exif=exif.tobytes(), quality=95)
    for path in (PHOTO, rot):
        (got,) = P.decode_items(items(path.read_bytes()))
        np.testing.assert_array_equal(got, load_image(path))
    assert load_image(rot).shape[:2] == load_image(PHOTO).shape[1::-1]


@pytest.mark.parametrize("data, limit, match", [
    (b"", {}, r"input 'image' is empty \(0 bytes\)"),
    (b"GIF89a not really", {}, "not an image format Pillow recognises"),
    (None, {"max_bytes": 100}, "above this server's limit of 100 bytes"),
    ("bomb", {"max_pixels": 1_000_000}, r"3000x3000 px = 9 Mpx, above the 1 Mpx limit"),
    ("truncated", {}, "truncated"),
])
def test_decode_items_refuses_bad_items_before_decoding(data, limit, match):
    if data is None:
        data = PHOTO.read_bytes()
    elif data == "bomb":  # 9 Mpx of zeros in a few KB: refused from the header, never decoded
        buf = io.BytesIO()
        Image.new("L", (3000, 3000)).save(buf, format="PNG")
        data = buf.getvalue()
        assert len(data) < 100_000
    elif data == "truncated":
        data = PHOTO.read_bytes()[:2000]
    with pytest.raises(P.RequestError, match=match):
        P.decode_items(items(data), **limit)


def test_decode_items_names_the_item_and_checks_the_shape():
    good = png(np.zeros((20, 20, 3), np.uint8))
    with pytest.raises(P.RequestError, match=r"item 1 of input 'image' is empty"):
        P.decode_items(items(good, b""))
    with pytest.raises(P.RequestError, match=r"must have shape \[batch, 1\]"):
        P.decode_items(np.array([[good, good]], dtype=np.object_))
    with pytest.raises(P.RequestError, match="must be the bytes of an encoded image file, got int"):
        P.decode_items(items(3))


def _result(h0, w0, grid, m=3, seed=0):
    rng = np.random.default_rng(seed)
    return SegmentationResult(labels=rng.integers(0, m, (h0, w0)).astype(np.int32), categories=("a", "b", "c"),
                              grid=grid, original_size=(h0, w0), input_size=(grid[0] * 16, grid[1] * 16),
                              probabilities=rng.random((*grid, m)).astype(np.float32))


def test_pack_and_unpack_round_trip_with_padding():
    results = [_result(20, 30, (2, 2)), _result(33, 17, (3, 1), seed=1)]
    out = P.pack_results(results)
    assert out[P.LABELS].shape == (2, 33, 30) and out[P.LABELS].dtype == np.int32
    assert (out[P.LABELS][0, 20:] == P.PAD_LABEL).all() and (out[P.LABELS][1, :, 17:] == P.PAD_LABEL).all()
    assert out[P.PROBABILITIES].shape == (2, 3, 2, 3)
    back = P.unpack_results(out, ("a", "b", "c"))
    for r, b in zip(results, back):
        np.testing.assert_array_equal(b.labels, r.labels)
        np.testing.assert_array_equal(b.probabilities, r.probabilities)
        assert (b.grid, b.original_size, b.input_size) == (r.grid, r.original_size, r.input_size)
    only = P.pack_results(results[:1], [P.LABELS, P.GRID])
    assert set(only) == {P.LABELS, P.GRID}


def test_png_labels_round_trip_and_the_output_size():
    results = [_result(20, 30, (2, 2)), _result(33, 17, (3, 1), seed=1)]
    out = P.pack_results(results, [P.LABELS_PNG, *P.SIZE_OUTPUTS])
    assert P.LABELS not in out and out[P.LABELS_PNG].shape == (2, 1)
    back = P.unpack_results(out, ("a", "b", "c"))
    for r, b in zip(results, back):  # no padding: each item is its own PNG
        np.testing.assert_array_equal(b.labels, r.labels)
        assert b.labels.dtype == np.int32
    big = [_result(300, 1, (1, 1), m=300, seed=2)]  # > 256 categories: a 16-bit PNG
    big[0].labels[:] = np.arange(300, dtype=np.int32)[:, None]
    cats = tuple(f"c{i}" for i in range(300))
    big[0] = SegmentationResult(labels=big[0].labels, categories=cats, grid=(1, 1), original_size=(300, 1),
                                input_size=(16, 16))
    got = P.unpack_results(P.pack_results(big, [P.LABELS_PNG, *P.SIZE_OUTPUTS]), cats)[0]
    np.testing.assert_array_equal(got.labels, big[0].labels)
    broken = dict(out)
    broken[P.LABELS_PNG] = np.array([[b"not a png"], [b""]], dtype=object)
    with pytest.raises(ValueError, match="'labels_png' output is not a readable PNG"):
        P.unpack_results(broken, ("a", "b", "c"))
    # the padded int32 output of a request: items x max height x max width
    assert P.output_pixels([np.zeros((20, 30, 3)), np.zeros((33, 17, 3))]) == 2 * 33 * 30
    assert P.output_pixels([]) == 0


def test_worker_health_file(tmp_path, monkeypatch):
    from ifseg_rt.serve.telemetry import read_health, write_health

    f = tmp_path / "health.json"
    assert read_health(str(f), "m") == {"deaths": 0, "restarts": 0}  # none yet
    write_health(f, {"m": 2}, {"m": 1, "other": 5})
    assert read_health(str(f), "m") == {"deaths": 2, "restarts": 1}
    assert read_health(str(f), "x") == {"deaths": 0, "restarts": 0} and read_health(None, "m")["deaths"] == 0
    f.write_text("{broken")
    assert read_health(str(f), "m") == {"deaths": 0, "restarts": 0}


def test_unpack_rejects_labels_outside_the_category_list():
    out = P.pack_results([_result(20, 20, (2, 2))])
    out[P.LABELS][0, 0, 0] = 7
    with pytest.raises(ValueError, match="values outside 0..2"):
        P.unpack_results(out, ("a", "b", "c"))
    del out[P.GRID]
    with pytest.raises(ValueError, match="no \\[batch, 2\\] 'grid' output"):
        P.unpack_results(out, ("a", "b", "c"))


def test_categories_from_config():
    cfg = {"parameters": {P.CATEGORIES_PARAMETER: {"string_value": json.dumps(["sky", "road"])}}}
    assert P.categories_from_config(cfg, "m") == ("sky", "road")
    with pytest.raises(ValueError, match="not an ifseg_rt model"):
        P.categories_from_config({"parameters": {}}, "m")
    with pytest.raises(ValueError, match="must be a JSON list of names"):
        P.categories_from_config({"parameters": {P.CATEGORIES_PARAMETER: {"string_value": "{}"}}}, "m")


def test_encode_image_sends_files_as_they_are_and_arrays_losslessly(tmp_path):
    assert encode_image(PHOTO) == PHOTO.read_bytes()
    assert encode_image(str(PHOTO)) == PHOTO.read_bytes()
    arr = np.random.default_rng(0).integers(0, 256, (21, 34, 3), dtype=np.uint8)
    np.testing.assert_array_equal(load_image(encode_image(arr)), arr)
    gray16 = (np.arange(20 * 20, dtype=np.uint16) * 150).reshape(20, 20)  # converted as Segmenter does
    np.testing.assert_array_equal(load_image(encode_image(gray16)), load_image(gray16))
    np.testing.assert_array_equal(load_image(encode_image(Image.fromarray(arr))), arr)
    with pytest.raises(FileNotFoundError):
        encode_image(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="must be uint8"):
        encode_image(np.zeros((20, 20, 3), np.float32))
    with pytest.raises(TypeError, match="unsupported image type"):
        encode_image(3.5)


@pytest.mark.parametrize("url, want", [
    ("localhost:8000", ("localhost:8000", "http", False)),
    ("http://h:1/", ("h:1", "http", False)),
    ("https://h:1", ("h:1", "http", True)),
    ("grpc://h:8001", ("h:8001", "grpc", False)),
])
def test_parse_url(url, want):
    assert parse_url(url) == want


def test_parse_url_errors():
    assert parse_url("h:8001", "grpc") == ("h:8001", "grpc", False)
    with pytest.raises(ValueError, match="unsupported URL scheme"):
        parse_url("ftp://h:1")
    with pytest.raises(ValueError, match="contradicts"):
        parse_url("grpc://h:1", "http")
    with pytest.raises(ValueError, match="expected host:port"):
        parse_url("http://h:1/v2/models")
    for bad in ("127.0.0.1", "h:99999", "h:abc", ":8000", "h:0"):  # no silent port 80, no urllib errors
        with pytest.raises(ValueError, match=r"expected host:port with a port in 1\.\.65535"):
            parse_url(bad)
    assert parse_url("[::1]:8000") == ("[::1]:8000", "http", False)


def test_client_arguments_and_a_server_that_is_not_triton():
    """timeout_s is checked; a port that answers but not as Triton's HTTP (a gRPC port, another service) is a
    ServeError saying so, not geventhttpclient's parse error."""
    pytest.importorskip("tritonclient.http")
    import socket
    import threading

    from ifseg_rt.serve import Client, ServeError

    for bad in (0, -1, float("nan"), float("inf"), "5", True):
        with pytest.raises(ValueError, match="timeout_s must be a number of seconds > 0"):
            Client("localhost:8000", timeout_s=bad)
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    stop = threading.Event()

    def answer():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            with conn:
                conn.recv(65536)
                conn.sendall(b"\x00\x00\x06\x04\x00\x00\x00\x00\x00garbage, not HTTP\r\n\r\n")

    t = threading.Thread(target=answer, daemon=True)
    t.start()
    try:
        with pytest.raises(ServeError, match=r"did not answer as a Triton HTTP endpoint .*gRPC \(grpc://\) port"):
            Client(f"127.0.0.1:{srv.getsockname()[1]}", timeout_s=5)
    finally:
        stop.set()
        t.join(5)
        srv.close()


def test_grpc_client_keeps_its_timeout_against_a_silent_server():
    """A port that accepts connections and never answers: every gRPC call of the Client has timeout_s as its deadline
    (the config read in the constructor used to wait for gRPC's own 20 s connection timeout instead)."""
    pytest.importorskip("tritonclient.grpc")
    import socket
    import threading

    from ifseg_rt.serve import Client, ServeError

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    stop, held = threading.Event(), []

    def accept():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])  # kept open, never answered
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    url = f"grpc://127.0.0.1:{srv.getsockname()[1]}"
    try:
        with pytest.raises(ServeError, match=r"reading the config of model 'ifseg' .* failed: no answer within "
                                             r"timeout_s = 1 s \[status StatusCode.DEADLINE_EXCEEDED\]") as e:
            Client(url, timeout_s=1)
        assert "DEADLINE_EXCEEDED" in str(e.value.status)
        with Client(url, model=None, timeout_s=1) as client:
            assert client.is_ready() is False
            with pytest.raises(ServeError, match=r"no answer within timeout_s = 1 s"):
                client.adapt_status("v000000000000")
    finally:
        stop.set()
        t.join(5)
        for conn in held:
            conn.close()
        srv.close()


def test_serve_cli_errors(tmp_path, capsys):
    from ifseg_rt.cli import cli, usage
    from ifseg_rt.cli.serve import main

    assert "serve" in usage()
    assert cli(["serve", "--model", str(tmp_path / "missing")]) == 2
    assert "model directory not found" in capsys.readouterr().err
    for argv, match in ((["--model", "m", "--http-port", "9000", "--grpc-port", "9000"], "must differ"),
                        (["--repository", "r", "--instances", "2"], "--instances set(s) the served model"),
                        (["--model", "m", "--repository", "r"], "not allowed with argument"),
                        (["--model", "m", "--max-pixels", "100"], "must be >= 256"),
                        (["--model", "m", "--max-body-bytes", "10"], "must be >= 1024 (below that every request"),
                        (["--model", "m", "--max-request-bytes", "1023"], "must be >= 1024"),
                        (["--model", "m", "--name", "a b"], "model names are")):
        with pytest.raises(SystemExit):
            main(argv)
        assert match in capsys.readouterr().err, argv
    from ifseg_rt.serve.server import ServeOptions, start_server

    for bad in (10, -1, 2.5, True):  # the library refuses them too, before writing or starting anything
        with pytest.raises(ValueError, match=rf"max_body_bytes must be 0 .* or an integer >= 1024, got {bad!r}"):
            start_server(tmp_path / "missing", tmp_path / "work", ServeOptions(max_body_bytes=bad))
    assert not (tmp_path / "work").exists()


def test_shared_memory_is_checked_before_the_start(tmp_path, monkeypatch):
    """The workers' shared memory (/dev/shm, 64 MB in a default Docker container) is compared with what they need:
    too little to start them is an error before anything is written or started; too little for one request at the
    size limits per worker is a warning; plenty, or an unreadable /dev/shm, passes."""
    import ifseg_rt.serve.server as server_mod
    from ifseg_rt.serve.server import ServeOptions, start_server
    from ifseg_rt.serve.tritonserver import SHM_DEFAULT_BYTES, ServerError, check_shm, shm_free

    mib = 1 << 20
    assert SHM_DEFAULT_BYTES == 4 * mib
    with pytest.raises(ServerError, match=r"3 model worker\(s\) need 12 MiB of shared memory to start; /dev/shm "
                                          r"has 11 MiB free \(a Docker container gets 64 MB unless started with "
                                          r"--shm-size"):
        check_shm(3, 100 * mib, 11 * mib)
    warning = check_shm(2, 30 * mib, 64 * mib)  # 2 x (4 + 30) = 68 MiB
    assert warning.startswith("warning: 2 model worker(s) each serving one request at the size limits") and \
        "need 68 MiB of shared memory; /dev/shm has 64 MiB free" in warning
    assert check_shm(2, 30 * mib, 68 * mib) is None and check_shm(2, 30 * mib, None) is None
    assert shm_free(tmp_path / "missing") is None and shm_free(tmp_path) > 0
    lines = []
    monkeypatch.setattr(server_mod, "shm_free", lambda: 5 * mib)
    with pytest.raises(ServerError, match=r"2 model worker\(s\) need 8 MiB"):
        start_server(tmp_path / "missing", tmp_path / "work", ServeOptions(instances=2), announce=lines.append)
    assert not (tmp_path / "work").exists()
    monkeypatch.setattr(server_mod, "shm_free", lambda: 64 * mib)  # the defaults: 32 MiB images, 64 MiB labels
    with pytest.raises(Exception, match="model directory not found"):
        start_server(tmp_path / "missing", tmp_path / "work", ServeOptions(instances=1), announce=lines.append)
    assert len(lines) == 1 and "need 100 MiB of shared memory; /dev/shm has 64 MiB free" in lines[0]


def test_stop_after_a_crash_takes_the_orphaned_workers(tmp_path):
    """tritonserver killed by a signal leaves its python-backend stubs orphaned in its session, holding its log pipe:
    stop() must kill what is left of the session and not block on the pipe (`serve` used to hang there, ready file in
    place, until the stub was killed by hand)."""
    import subprocess
    import threading

    from ifseg_rt.serve.tritonserver import TritonServer

    server = TritonServer(tmp_path, http_port=0, grpc_port=0, metrics_port=0, http_front=False)
    pid_file = tmp_path / "stub.pid"
    # "tritonserver": starts a "stub" that ignores SIGTERM and keeps stdout, then dies of SIGFPE
    server.process = subprocess.Popen(
        ["sh", "-c", f"sh -c 'trap \"\" TERM; echo $$ > {pid_file}; exec sleep 300' & sleep 0.3; kill -FPE $$"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    server._reader = threading.Thread(target=server._read, daemon=True)
    server._reader.start()
    assert server.process.wait(30) == -8
    stub = int(pid_file.read_text())
    done = threading.Thread(target=server.stop, daemon=True)
    done.start()
    done.join(60)
    assert not done.is_alive(), "stop() blocked on the crashed server's log pipe"
    try:
        os.kill(stub, 0)
        alive = Path(f"/proc/{stub}/stat").read_text().split()[2] != "Z"  # a zombie nobody reaps is gone
    except (ProcessLookupError, FileNotFoundError):
        alive = False
    assert not alive, "the orphaned worker outlived stop()"
