"""The HTTP front of ``serve`` (issue 24): malformed KServe requests get 400 (Triton's own HTTP server answers many of
them with 500), oversized bodies 413 before they are read, refusals and rejections are counted on /metrics, and a
drain closes readiness, then the port, then kept-alive connections. Triton's own HTTP server behind the front is the
reference: whatever it accepts, the front passes on unchanged."""

from __future__ import annotations

import http.client
import io
import json
import re
import socket
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

from ifseg_rt.serve.front import HEADER_LENGTH, MalformedRequest, check_infer_request
from ifseg_rt.serve.telemetry import RefusalLog

START_TIMEOUT_S = 240
BODY_LIMIT = 256 * 1024


def _input(**kw):
    return {"name": "image", "shape": [1, 1], "datatype": "BYTES", "data": ["x"], **kw}


# requests Triton 2.51's HTTP server answers with 500 (measured), each with the field the front's 400 must name
MALFORMED = {
    "truncated JSON": (b"{", "not valid JSON"),
    "empty object": (b"{}", "'inputs'"),
    "a JSON array": (b"[]", "JSON object"),
    "inputs not an array": (b'{"inputs": 3}', "'inputs'"),
    "input without name": (json.dumps({"inputs": [{"shape": [1, 1], "datatype": "BYTES", "data": ["x"]}]}), "'name'"),
    "negative shape": (json.dumps({"inputs": [_input(shape=[-1, 1])]}), "'shape'"),
    "shape not an array": (json.dumps({"inputs": [_input(shape="1")]}), "'shape'"),
    "fractional shape": (json.dumps({"inputs": [_input(shape=[1.5, 1])]}), "'shape'"),
    "numbers as BYTES": (json.dumps({"inputs": [_input(data=[3])]}), "BYTES data must be strings"),
    "strings as FP32": (json.dumps({"inputs": [_input(datatype="FP32", data=["a"])]}), "FP32 data must be numbers"),
    "outputs not an array": (json.dumps({"inputs": [_input()], "outputs": 3}), "'outputs'"),
    "output without name": (json.dumps({"inputs": [_input()], "outputs": [{}]}), "outputs[0]"),
    "parameters not an object": (json.dumps({"inputs": [_input()], "parameters": 3}), "'parameters'"),
    "numeric id": (json.dumps({"id": 3, "inputs": [_input()]}), "'id'"),
    "binary_data as a string": (json.dumps({"inputs": [_input()], "outputs": [
        {"name": "grid", "parameters": {"binary_data": "true"}}]}), "'binary_data' must be a boolean"),
    "negative priority": (json.dumps({"inputs": [_input()], "parameters": {"priority": -1}}), "'priority'"),
    "timeout as a string": (json.dumps({"inputs": [_input()], "parameters": {"timeout": "1"}}), "'timeout'"),
    "negative binary size": (json.dumps({"inputs": [{"name": "image", "shape": [1, 1], "datatype": "BYTES",
                                                     "parameters": {"binary_data_size": -4}}]}), "binary_data_size"),
    "NaN": (b'{"inputs": [{"name": "image", "shape": [1, 1], "datatype": "FP32", "data": [NaN]}]}', "NaN is not JSON"),
    "a 33-bit batch": (json.dumps({"inputs": [_input(shape=[2 ** 32 + 1, 1])]}), "'shape'"),  # Triton truncated it
    "priority beyond 64 bits": (json.dumps({"inputs": [_input()], "parameters": {"priority": 2 ** 70}}), "'priority'"),
    "a lone surrogate": (b'{"inputs": [{"name": "image", "shape": [1, 1], "datatype": "BYTES", "data": ["\\ud800"]}]}',
                         "valid Unicode"),
    # Triton's classification extension on the BYTES output killed tritonserver (SIGFPE); on the others it is noise
    "classification": (json.dumps({"inputs": [_input()], "outputs": [{"name": "labels_png", "parameters": {
        "classification": 2}}]}), "parameter 'classification' (Triton's classification extension) is not supported"),
    "negative sequence_id": (json.dumps({"inputs": [_input()], "parameters": {"sequence_id": -5}}), "'sequence_id'"),
    "sequence_id beyond 64 bits": (json.dumps({"inputs": [_input()], "parameters": {"sequence_id": 2 ** 70}}),
                                   "'sequence_id'"),
}
# well-formed requests (valid KServe; the model may still refuse them): the front must not refuse any
WELL_FORMED = {
    "plain": {"inputs": [_input()]},
    "id and an extra field": {"id": "r1", "inputs": [_input()], "extra": 3},
    "output parameters": {"inputs": [_input()], "outputs": [{"name": "grid", "parameters": {"binary_data": False}}],
                          "parameters": {"binary_data_output": False}},
    "custom parameters": {"inputs": [_input(parameters={"note": "a"})], "parameters": {"x": 1.5, "sequence_id": "s"}},
    "nested data": {"inputs": [_input(data=[["x"]])]},
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_requests_are_named(case):
    body, field = MALFORMED[case]
    with pytest.raises(MalformedRequest, match=re.escape(field)):
        check_infer_request(body.encode() if isinstance(body, str) else body)


def test_well_formed_requests_pass_the_check():
    for case, request in WELL_FORMED.items():
        check_infer_request(json.dumps(request).encode())  # nothing raised
    header = json.dumps({"inputs": [{"name": "image", "shape": [1, 1], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": 8}}]}).encode()
    body = header + b"\x04\x00\x00\x00abcd"
    check_infer_request(body, str(len(header)))  # the binary extension: only the header is JSON
    for bad in ("x", "0", str(len(body) + 1), "-3", "1_5", "\u0661\u0665"):  # int() reads the last two; Triton not
        with pytest.raises(MalformedRequest, match=HEADER_LENGTH):
            check_infer_request(body, bad)


def test_refusal_log_is_rate_limited():
    now, lines = [0.0], []
    log = RefusalLog(lines.append, "http", per_s=2, clock=lambda: now[0])
    for i in range(5):
        log(f"r{i}")
    assert lines == ["http: refused a request: r0", "http: refused a request: r1"]
    now[0] = 1.5
    log("r5")
    assert lines[2:] == ["http: 3 more request(s) refused in that second", "http: refused a request: r5"]


def test_the_front_normalises_what_it_forwards():
    """Against a recording upstream: the client's Content-Type never reaches Triton (a form Content-Type on a body
    of a few MB crashed tritonserver), HEAD is asked as GET (Triton answers HEAD with an unreadable 405), and a body
    that is not what its Content-Encoding says is a 400, not a 500 with a traceback."""
    pytest.importorskip("aiohttp")
    import gzip
    import http.server

    from ifseg_rt.serve.front import HttpFront, bind

    seen = []

    class Upstream(http.server.BaseHTTPRequestHandler):
        def _answer(self):
            n = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(n) if n else b""
            seen.append((self.command, self.path, self.headers.get("Content-Type"), len(body),
                         self.headers.get("Accept-Encoding")))
            reply = b'{"ok": true}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        do_GET = do_POST = _answer

        def log_message(self, *a):
            pass

    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    front = HttpFront(bind("127.0.0.1", 0), None, f"127.0.0.1:{upstream.server_address[1]}", None,
                      max_body_bytes=1 << 20, exit_timeout_s=2).start()
    url = f"127.0.0.1:{front.sockets['http'].getsockname()[1]}"
    try:
        body = json.dumps({"inputs": [_input()]}).encode()
        assert _post(url, body, {"Content-Type": "application/x-www-form-urlencoded"})[0] == 200
        assert seen[-1][:4] == ("POST", "/v2/models/ifseg/infer", "application/json", len(body))
        header = json.dumps({"inputs": [{"name": "image", "shape": [1, 1], "datatype": "BYTES",
                                         "parameters": {"binary_data_size": 8}}]}).encode()
        binary = header + b"\x04\x00\x00\x00abcd"
        assert _post(url, binary, {"Content-Type": "text/plain", HEADER_LENGTH: str(len(header))})[0] == 200
        assert seen[-1][2:4] == ("application/octet-stream", len(binary))
        conn = http.client.HTTPConnection(url, timeout=10)
        conn.request("HEAD", "/v2/health/ready")
        r = conn.getresponse()
        assert r.status == 200 and r.read() == b"" and seen[-1][:2] == ("GET", "/v2/health/ready")
        conn.close()
        status, answer = _post(url, body, {"Content-Encoding": "gzip"})  # plain JSON that claims to be gzip
        assert status == 400 and "cannot be read" in answer["error"]
        assert _post(url, gzip.compress(body), {"Content-Encoding": "gzip"})[0] == 200  # real gzip: decompressed
        assert seen[-1][3] == len(body)
        # Triton is asked for what the client accepts, identity when it says nothing (it gzipped answers for curl)
        conn = http.client.HTTPConnection(url, timeout=10)
        conn.putrequest("POST", "/v2/models/ifseg/infer", skip_accept_encoding=True)
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        assert conn.getresponse().status == 200 and seen[-1][4] == "identity"
        conn.close()
        _post(url, body, {"Accept-Encoding": "gzip"})
        assert seen[-1][4] == "gzip"
        n = len(seen)
        for path, code in (("/v2/models/ifseg/./infer", 400), ("/v2/./models/ifseg/infer", 400),
                           ("/v2/models/x/../ifseg/infer", 400), ("/v2/models/ifseg/generate", 404),
                           ("/v2/models/ifseg/versions/1/generate_stream", 404)):
            conn = http.client.HTTPConnection(url, timeout=10)  # sent as written (urllib would normalise the path)
            conn.request("POST", path, body=b"{", headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            assert r.status == code and ("'.' or '..' segments" if code == 400 else "generate extension") in \
                json.loads(r.read())["error"], path
            conn.close()
        conn = http.client.HTTPConnection(url, timeout=10)
        conn.putrequest("POST", "/v2/models/ifseg/infer")
        for v in (str(len(header)), "5"):  # the front checked the first and forwarded the last
            conn.putheader(HEADER_LENGTH, v)
        conn.putheader("Content-Length", str(len(binary)))
        conn.endheaders(binary)
        r = conn.getresponse()
        assert r.status == 400 and "given more than once" in json.loads(r.read())["error"]
        conn.close()
        assert len(seen) == n  # none of them reached the upstream
    finally:
        front.stop()
        upstream.shutdown()
        upstream.server_close()


# --- against the real server --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(quick_nano_model, tmp_path_factory):
    for module in ("aiohttp", "tritonclient.http", "pytriton"):
        pytest.importorskip(module)
    from ifseg_rt.serve.server import ServeOptions, start_server

    options = ServeOptions(http_port=0, grpc_port=0, metrics_port=0, instances=1, threads=1, max_batch_size=1,
                           max_queue_size=1, max_body_bytes=BODY_LIMIT)
    srv = start_server(quick_nano_model, tmp_path_factory.mktemp("front"), options, timeout_s=START_TIMEOUT_S,
                       log=None)
    try:
        yield srv
    finally:
        srv.stop()


def _post(url: str, body: bytes, headers=None):
    req = urllib.request.Request(f"http://{url}/v2/models/ifseg/infer", data=body, method="POST",
                                 headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _metrics(server) -> dict:
    with urllib.request.urlopen(server.metrics_url, timeout=10) as r:
        text = r.read().decode()
    return {k: float(v) for k, v in (ln.rsplit(" ", 1) for ln in text.splitlines() if ln and ln[0] != "#")}


def _png(h: int, w: int) -> bytes:
    """A blocky random image: small as PNG (under the body limit), ``h x w`` pixels to decode."""
    blocks = np.random.default_rng(h).integers(0, 255, (max(1, h // 8), max(1, w // 8), 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(blocks).resize((w, h), Image.NEAREST).save(buf, format="PNG")
    return buf.getvalue()


def test_every_malformed_request_gets_400_and_the_next_one_works(server):
    from ifseg_rt.serve import Client

    before = _metrics(server)
    for case, (body, field) in MALFORMED.items():
        body = body.encode() if isinstance(body, str) else body
        status, answer = _post(server.http_url, body)
        assert status == 400 and field in answer["error"], (case, status, answer)
        assert _post(server.triton_http_url, body)[0] in (400, 500), case  # Triton, too, cannot serve it
    for case, request in WELL_FORMED.items():  # passed on unchanged: the same answer as Triton's own
        body = json.dumps(request).encode()
        front, direct = _post(server.http_url, body), _post(server.triton_http_url, body)
        assert front == direct, case
    after = _metrics(server)
    assert after['ifseg_http_refused{reason="malformed"}'] - before.get('ifseg_http_refused{reason="malformed"}', 0) \
        == len(MALFORMED)
    assert 'nv_inference_request_success{model="ifseg",version="1"}' in after  # Triton's metrics are there too
    labels = Client(server.http_url).seg(_png(40, 56)).labels
    assert labels.shape == (40, 56)


def test_an_oversized_body_is_refused_before_it_is_read(server):
    host, port = server.http_url.split(":")
    before = _metrics(server).get('ifseg_http_refused{reason="too_large"}', 0)
    with socket.create_connection((host, int(port)), timeout=30) as s:  # headers only: the body is never sent
        s.sendall(f"POST /v2/models/ifseg/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {50 * 1024 * 1024}\r\n\r\n".encode())
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = s.recv(65536)
            if not chunk:
                break
            answer += chunk
    head = answer.split(b"\r\n", 1)[0]
    assert head.startswith(b"HTTP/1.1 413"), answer[:300]
    assert b"--max-body-bytes" in answer or b"Connection: close" in answer
    # without a Content-Length (chunked), the body is cut at the same bound
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/v2/models/ifseg/infer", body=iter([b"x" * 65536] * 8), encode_chunked=True,
                 headers={"Transfer-Encoding": "chunked"})
    assert conn.getresponse().status == 413
    conn.close()
    assert _metrics(server)['ifseg_http_refused{reason="too_large"}'] - before == 2
    status, _ = _post(server.http_url, b"{}")  # the server still answers
    assert status == 400


def test_overload_rejections_are_counted(server):
    """One instance, batch 1, queue 1: simultaneous requests beyond two are rejected with 503 by Triton; the front
    counts exactly what the clients received."""
    body_image = _png(900, 1200)
    header = json.dumps({"inputs": [{"name": "image", "shape": [1, 1], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": 4 + len(body_image)}}],
                         "outputs": [{"name": "grid"}]}).encode()
    body = header + len(body_image).to_bytes(4, "little") + body_image
    before = _metrics(server)
    statuses, barrier = [], threading.Barrier(12)

    def one():
        barrier.wait()
        statuses.append(_post(server.http_url, body, {HEADER_LENGTH: str(len(header))})[0])

    threads = [threading.Thread(target=one) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = _metrics(server)
    assert set(statuses) <= {200, 503} and statuses.count(200) >= 1 and statuses.count(503) >= 1, statuses
    for code in (200, 503):
        key = f'ifseg_http_responses{{code="{code}"}}'
        assert after[key] - before.get(key, 0) == statuses.count(code)


def test_without_the_front_triton_takes_the_public_ports(quick_nano_model, tmp_path):
    """``serve --no-http-front``: Triton's own HTTP server on the public port (and its 500 for a malformed request,
    which is why the front is the default)."""
    from ifseg_rt.serve import Client
    from ifseg_rt.serve.server import ServeOptions, start_server

    options = ServeOptions(http_port=0, grpc_port=0, metrics_port=0, instances=1, threads=1, http_front=False)
    srv = start_server(quick_nano_model, tmp_path, options, timeout_s=START_TIMEOUT_S, log=None)
    try:
        assert srv.front is None and srv.triton_http_url == srv.http_url
        assert _post(srv.http_url, b"{")[0] == 500
        assert Client(srv.http_url).seg(_png(40, 56)).labels.shape == (40, 56)
        with urllib.request.urlopen(srv.metrics_url, timeout=10) as r:
            assert "ifseg_http_refused" not in r.read().decode()
    finally:
        srv.stop()


def test_drain_closes_readiness_then_the_port_then_kept_alive_connections(server):
    """Last (it drains the module's server)."""
    host, port = server.http_url.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("GET", "/v2/health/ready")
    first = conn.getresponse()
    first.read()
    assert first.status == 200 and not first.will_close  # a kept-alive connection
    server.drain()
    conn.request("GET", "/v2/health/ready")  # the same connection: refused and closed
    again = conn.getresponse()
    again.read()
    assert again.status == 503 and again.will_close
    conn.close()
    with pytest.raises(OSError):  # no new connections
        socket.create_connection((host, int(port)), timeout=5).close()
    assert _metrics(server)['ifseg_http_refused{reason="draining"}'] >= 1  # metrics stay readable meanwhile
