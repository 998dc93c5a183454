"""The HTTP front of ``serve``: a small aiohttp proxy on the public HTTP and metrics ports, in front of Triton's own
HTTP server and metrics endpoint (which then listen on loopback ports only the front uses).

Why a front: the bundled Triton 2.51's HTTP server answers a malformed KServe request (JSON that does not parse,
a missing or mistyped field: ``{``, ``{}``, a shape of ``[-1, 1]``, numbers as BYTES data) with HTTP 500, reads a whole
body of any size before anything can refuse it, counts none of the requests it rejects (its
``failure{reason="REJECTED"}`` stays 0), and serves kept-alive connections until its exit timeout. The front:

* checks the KServe v2 structure of every inference request (:func:`check_infer_request`) and answers what Triton
  would fail with 500 with **400** and a message naming the field; everything else goes to Triton unchanged (the
  model's own checks, 400 for a bad image, 503 for a full queue, stay Triton's);
* refuses a body larger than ``max_body_bytes`` from its ``Content-Length`` header, **before reading it** (413; a
  body without a length is cut at the same bound), and closes that connection;
* counts, on the public ``/metrics`` (Triton's metrics with these appended): ``ifseg_http_refused{reason}``
  (``malformed``, ``too_large``, ``draining``, ``unreachable``) and ``ifseg_http_responses{code}`` of inference
  requests (``code="503"``: rejected by a full queue or a queue timeout);
* logs one line per refused request, rate-limited (:class:`~ifseg_rt.serve.telemetry.RefusalLog`);
* drains in order (:meth:`HttpFront.begin_drain`, :meth:`HttpFront.stop`): readiness 503 first, then no new
  connections, kept-alive connections closed after their current response (a new request on one gets 503), in-flight
  requests finished within the exit timeout.

gRPC goes to Triton directly (its protocol buffers are typed: a malformed message is INVALID_ARGUMENT there). The
front runs an asyncio loop in a thread of the ``serve`` process; its sockets are bound in :meth:`HttpFront.start`
(a busy port fails there, before anything is reported).
"""

from __future__ import annotations

import asyncio
import collections
import json
import re
import socket
import threading
from typing import Any, Callable, Dict, List, Optional

from .telemetry import RefusalLog

HEADER_LENGTH = "Inference-Header-Content-Length"  # KServe binary extension: the JSON header's length in the body
INFER_PATH = re.compile(r"^/v2/models/[^/]+(?:/versions/[^/]+)?/infer$")
# Triton's generate extension maps JSON fields to tensors: no way to send an encoded image, and a malformed body is
# a 500 there; ifseg_rt models answer /infer only
GENERATE_PATH = re.compile(r"^/v2/models/[^/]+(?:/versions/[^/]+)?/generate(?:_stream)?$")
MAX_DIMENSION = 2 ** 31  # a tensor dimension at or beyond this is no image batch (and was truncated to 32 bits)
REFUSED = "ifseg_http_refused"
RESPONSES = "ifseg_http_responses"
REASONS = ("malformed", "too_large", "draining", "unreachable")
# hop-by-hop headers (RFC 9110 7.6.1) and those aiohttp sets itself: never forwarded
_HOP = frozenset(("connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te",
                  "trailer", "transfer-encoding", "upgrade", "content-length", "host", "content-encoding"))
_INTS = frozenset(("INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"))
_FLOATS = frozenset(("FP16", "FP32", "FP64", "BF16"))
# KServe / Triton parameters with a fixed JSON type (Triton answers 500 for another type)
_BOOL, _INT, _STR = "a boolean", "an integer", "a string"
_REQUEST_PARAMS = {"binary_data_output": _BOOL, "priority": _INT, "timeout": _INT, "sequence_start": _BOOL,
                   "sequence_end": _BOOL}
_SHM_PARAMS = {"shared_memory_region": _STR, "shared_memory_byte_size": _INT, "shared_memory_offset": _INT}
_INPUT_PARAMS = {"binary_data_size": _INT, **_SHM_PARAMS}
_OUTPUT_PARAMS = {"binary_data": _BOOL, **_SHM_PARAMS}
# Triton's classification extension: on a BYTES output (labels_png) it killed tritonserver (SIGFPE), on the others
# it gives indices that mean nothing for a label map; no ifseg_rt output is a classification
_REFUSED_OUTPUT_PARAMS = ("classification",)


class MalformedRequest(ValueError):
    """An inference request that is not a KServe v2 request; the message names the field."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _kind_ok(kind: str, v: Any) -> bool:
    if kind == _BOOL:
        return isinstance(v, bool)
    if kind == _INT:
        return _is_int(v)
    return isinstance(v, str)


def _check_params(params: Any, where: str, known: Dict[str, str]) -> None:
    if not isinstance(params, dict):
        raise MalformedRequest(f"{where}: 'parameters' must be a JSON object, not {type(params).__name__}")
    for key, v in params.items():
        kind = known.get(key)
        if kind is not None:
            if not _kind_ok(kind, v):
                raise MalformedRequest(f"{where}: parameter '{key}' must be {kind}, not {json.dumps(v)[:40]}")
            if kind == _INT and not 0 <= v < 2 ** 64:  # Triton reads these as 64-bit unsigned
                raise MalformedRequest(f"{where}: parameter '{key}' must be in [0, 2^64), not {v}")
        elif key == "sequence_id":
            if not ((_is_int(v) and 0 <= v < 2 ** 64) or isinstance(v, str)):
                raise MalformedRequest(f"{where}: parameter 'sequence_id' must be an integer in [0, 2^64) or a string")
        elif not isinstance(v, (str, int, float)):  # bool is an int
            raise MalformedRequest(f"{where}: parameter '{key}' must be a string, number or boolean")


def _elements(data: List[Any]):
    """The leaves of a (nested) JSON array, depth-first, without recursion."""
    stack = [iter(data)]
    while stack:
        for v in stack[-1]:
            if isinstance(v, list):
                stack.append(iter(v))
                break
            yield v
        else:
            stack.pop()


def _check_data(data: Any, datatype: str, where: str) -> None:
    if not isinstance(data, list):
        raise MalformedRequest(f"{where}: 'data' must be a JSON array")
    if datatype == "BYTES":  # Python's json accepts lone surrogates ("\ud800"), Triton's parser does not
        ok, what = (lambda v: isinstance(v, str) and _utf8(v)), "strings (valid Unicode)"
    elif datatype == "BOOL":
        ok, what = (lambda v: isinstance(v, bool)), "booleans"
    elif datatype in _INTS:
        ok, what = _is_int, "integers"
    elif datatype in _FLOATS:
        ok, what = (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)), "numbers"
    else:
        return  # an unknown datatype: Triton's own 400 names it
    for v in _elements(data):
        if not ok(v):
            raise MalformedRequest(f"{where}: {datatype} data must be {what}, found {json.dumps(v)[:40]}")


def _utf8(text: str) -> bool:
    if text.isascii():  # base64 image data: no copy
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _reject_constant(name: str):
    raise MalformedRequest(f"{name} is not JSON")


def check_infer_request(body: bytes, header_length: Optional[str] = None) -> None:
    """Check the KServe v2 structure of an inference request body (``header_length``: the
    ``Inference-Header-Content-Length`` header, when the tensors follow the JSON header as binary data).

    Checked: the JSON parses and is an object; ``id`` a string; ``parameters`` objects with the known keys' types;
    ``inputs`` a non-empty array of objects with a string ``name``, a ``shape`` of non-negative integers, a string
    ``datatype`` and ``data`` of the datatype's JSON kind; ``outputs`` an array of objects with a string ``name``.
    What the model checks itself (names, datatypes, shapes, the image bytes) is left to it.

    Raises
    ------
    MalformedRequest naming the field
    """
    if header_length is not None:
        text = header_length.strip()
        if not (text.isascii() and text.isdigit()):  # int() also takes "1_5" and other scripts' digits; Triton not
            raise MalformedRequest(f"header {HEADER_LENGTH} must be a decimal integer, not {header_length[:40]!r}")
        n = int(text)
        if not 0 < n <= len(body):
            raise MalformedRequest(f"header {HEADER_LENGTH} = {n} is outside the body's {len(body)} bytes")
        body = body[:n]
    try:
        request = json.loads(body, parse_constant=_reject_constant)
    except MalformedRequest:
        raise
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise MalformedRequest(f"the request is not valid JSON: {str(e)[:120]}") from None
    if not isinstance(request, dict):
        raise MalformedRequest(f"the request must be a JSON object, not {type(request).__name__}")
    if "id" in request and not isinstance(request["id"], str):
        raise MalformedRequest("'id' must be a string")
    if "parameters" in request:
        _check_params(request["parameters"], "request", _REQUEST_PARAMS)
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise MalformedRequest("'inputs' must be a non-empty JSON array of input tensors")
    for i, t in enumerate(inputs):
        where = f"inputs[{i}]"
        if not isinstance(t, dict):
            raise MalformedRequest(f"{where} must be a JSON object")
        name = t.get("name")
        if not isinstance(name, str):
            raise MalformedRequest(f"{where}: 'name' must be a string")
        where = f"input '{name[:64]}'"
        shape = t.get("shape")
        if not isinstance(shape, list) or not all(_is_int(d) and 0 <= d < MAX_DIMENSION for d in shape):
            raise MalformedRequest(f"{where}: 'shape' must be an array of integers in [0, 2^31), not "
                                   f"{json.dumps(shape)[:60]}")
        if not isinstance(t.get("datatype"), str):
            raise MalformedRequest(f"{where}: 'datatype' must be a string such as \"BYTES\" or \"FP32\"")
        if "parameters" in t:
            _check_params(t["parameters"], where, _INPUT_PARAMS)
        if "data" in t:
            _check_data(t["data"], t["datatype"], where)
    outputs = request.get("outputs", [])
    if not isinstance(outputs, list):
        raise MalformedRequest("'outputs' must be a JSON array")
    for i, t in enumerate(outputs):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise MalformedRequest(f"outputs[{i}] must be a JSON object with a string 'name'")
        if "parameters" in t:
            _check_params(t["parameters"], f"output '{t['name'][:64]}'", _OUTPUT_PARAMS)
            refused = [k for k in _REFUSED_OUTPUT_PARAMS if k in t["parameters"]]
            if refused:
                raise MalformedRequest(f"output '{t['name'][:64]}': parameter '{refused[0]}' (Triton's classification "
                                       f"extension) is not supported by ifseg_rt models")


def bind(address: str, port: int) -> socket.socket:
    """A listening TCP socket on ``address:port`` (0: a free port), ``OSError`` when the port is taken."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT of an earlier run, not a live server
        sock.bind((address, port))
        sock.listen(1024)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


class HttpFront:
    """The front (see the module docstring) on two bound sockets: ``http`` proxies to ``upstream_http``
    (``host:port``) and ``metrics`` serves ``upstream_metrics``'s ``/metrics`` with the front's counters appended.

    ``start()`` runs it in a thread; ``begin_drain()`` then ``stop()`` end it; ``refused`` and ``responses`` are
    the counters :meth:`metrics_text` reports."""

    def __init__(self, http: socket.socket, metrics: Optional[socket.socket], upstream_http: str,
                 upstream_metrics: Optional[str], *, max_body_bytes: int, exit_timeout_s: float,
                 log: Optional[Callable[[str], None]] = None):
        self.sockets = {"http": http, "metrics": metrics}
        self.upstream_http = f"http://{upstream_http}"
        self.upstream_metrics = f"http://{upstream_metrics}/metrics" if upstream_metrics else None
        self.max_body_bytes = int(max_body_bytes)
        self.exit_timeout_s = float(exit_timeout_s)
        self._log_refusal = RefusalLog(log or (lambda line: None), "http")
        self.refused: Dict[str, int] = {r: 0 for r in REASONS}
        self.responses: Dict[int, int] = collections.Counter()
        self.draining = False
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._runners: List[Any] = []
        self._session = None
        self._started = threading.Event()
        self._error: Optional[BaseException] = None

    # --- lifecycle (any thread) ---------------------------------------------------------------------------------
    def start(self) -> "HttpFront":
        """Run the front in its own thread; returns once both sockets serve (RuntimeError if the setup failed)."""
        self._thread = threading.Thread(target=self._run, name="ifseg-http-front", daemon=True)
        self._thread.start()
        self._started.wait(30)
        if self._error is not None:
            raise RuntimeError(f"HTTP front did not start: {self._error}") from self._error
        return self

    def begin_drain(self) -> None:
        """Readiness 503 and every new request refused (503, connection closed) from now on; stop listening."""
        self.draining = True
        if self._loop is not None and self._loop.is_running():
            asyncio.run_coroutine_threadsafe(self._stop_listening(), self._loop).result(10)

    def stop(self) -> None:
        """Drain (if not begun), finish the in-flight requests within the exit timeout, close everything."""
        self.draining = True
        loop = self._loop
        if loop is not None and loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(self._cleanup(), loop).result(self.exit_timeout_s + 10)
            except Exception:  # noqa: BLE001 - stopping goes on
                pass
            loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        for sock in self.sockets.values():
            if sock is not None:
                sock.close()

    # --- the event loop (the front's thread) ------------------------------------------------------------------
    def _run(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._setup())
        except BaseException as e:  # noqa: BLE001 - reported by start()
            self._error = e
            self._started.set()
            loop.close()
            return
        self._started.set()
        try:
            loop.run_forever()
        finally:  # connections still open past the exit timeout: their handlers are cancelled, not abandoned
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

    async def _setup(self) -> None:
        from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

        self._session = ClientSession(connector=TCPConnector(limit=0, force_close=False), auto_decompress=False,
                                      timeout=ClientTimeout(total=None, sock_connect=5))
        app = web.Application(client_max_size=self.max_body_bytes)
        app.router.add_route("*", "/{tail:.*}", self._proxy)
        apps = [("http", app)]
        if self.sockets["metrics"] is not None:
            mapp = web.Application()
            mapp.router.add_get("/metrics", self._metrics)
            apps.append(("metrics", mapp))
        for key, a in apps:
            runner = web.AppRunner(a, access_log=None, handle_signals=False, shutdown_timeout=self.exit_timeout_s)
            await runner.setup()
            await web.SockSite(runner, self.sockets[key]).start()
            self._runners.append(runner)

    async def _stop_listening(self) -> None:
        for runner in self._runners[:1]:  # the HTTP port; metrics stay readable during the drain
            for site in list(runner.sites):
                await site.stop()

    async def _cleanup(self) -> None:
        for runner in self._runners:
            await runner.cleanup()  # no new connections, idle ones closed, in-flight ones finished (exit timeout)
        self._runners.clear()
        if self._session is not None:
            await self._session.close()

    def _refuse(self, status: int, reason: str, message: str, request) -> Any:
        from aiohttp import web

        self.refused[reason] += 1
        self._log_refusal(f"{status} {request.method} {request.path[:80]} from {request.remote}: {message}")
        response = web.json_response({"error": message}, status=status)
        if status in (413, 503):
            response.force_close()  # an unread body, or a server that is going away
        return response

    async def _proxy(self, request) -> Any:
        from aiohttp import ClientError, web
        from aiohttp.http_exceptions import HttpProcessingError
        from aiohttp.web_protocol import RequestPayloadError

        if self.draining:
            return self._refuse(503, "draining", "the server is shutting down", request)
        if any(part in (".", "..") for part in request.path.split("/")):  # forwarded normalised: no check would see it
            return self._refuse(400, "malformed", f"the path {request.path[:200]!r} has '.' or '..' segments", request)
        if GENERATE_PATH.match(request.path):
            return self._refuse(404, "malformed", "ifseg_rt models answer /v2/models/<name>/infer (KServe v2), not "
                                "Triton's generate extension", request)
        if len(request.headers.getall(HEADER_LENGTH, [])) > 1:
            return self._refuse(400, "malformed", f"the header {HEADER_LENGTH} is given more than once", request)
        infer = request.method == "POST" and INFER_PATH.match(request.path) is not None
        length = request.content_length
        if length is not None and length > self.max_body_bytes:
            return self._refuse(413, "too_large", f"request body of {length} bytes is larger than the server's limit "
                                f"of {self.max_body_bytes} bytes (serve --max-body-bytes)", request)
        try:
            body = await request.read()  # decompressed (Content-Encoding), at most client_max_size bytes
        except web.HTTPRequestEntityTooLarge:
            return self._refuse(413, "too_large", f"request body larger than the server's limit of "
                                f"{self.max_body_bytes} bytes (serve --max-body-bytes)", request)
        except (HttpProcessingError, RequestPayloadError) as e:  # e.g. not what its Content-Encoding says
            if infer:
                self.responses[400] += 1
            reason = " ".join(str(e).split()) or type(e).__name__
            return self._refuse(400, "malformed", f"the request body cannot be read: {reason}", request)
        if infer:
            try:
                check_infer_request(body, request.headers.get(HEADER_LENGTH))
            except MalformedRequest as e:
                self.responses[400] += 1
                return self._refuse(400, "malformed", str(e), request)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP | {"content-type"}}
        if "Accept-Encoding" not in request.headers:  # else the client session asks Triton for gzip on its behalf
            headers["Accept-Encoding"] = "identity"
        if body:  # what Triton parses: JSON, or a JSON header + binary tensors (a form Content-Type on a body of a
            # few MB made tritonserver crash: the front never forwards the client's)
            binary = HEADER_LENGTH in request.headers  # case-insensitive
            headers["Content-Type"] = "application/octet-stream" if binary else "application/json"
        method = "GET" if request.method == "HEAD" else request.method  # Triton answers HEAD with an unreadable 405
        try:
            async with self._session.request(method, self.upstream_http + request.rel_url.raw_path_qs,
                                             headers=headers, data=body if body else None) as r:
                data = await r.read()
                response = web.Response(status=r.status, body=data,
                                        headers={k: v for k, v in r.headers.items()
                                                 if k.lower() not in _HOP or k.lower() == "content-encoding"})
        except (ClientError, asyncio.TimeoutError, OSError) as e:
            return self._refuse(503, "unreachable", f"the inference server is not reachable ({type(e).__name__})",
                                request)
        if infer:
            self.responses[r.status] += 1
        if self.draining:
            response.force_close()
        return response

    async def _metrics(self, request) -> Any:
        from aiohttp import ClientError, web

        text = ""
        if self.upstream_metrics:
            try:
                async with self._session.get(self.upstream_metrics) as r:
                    text = (await r.read()).decode("utf-8", "replace")
            except (ClientError, asyncio.TimeoutError, OSError):
                text = ""
        return web.Response(text=text + self.metrics_text(), content_type="text/plain", charset="utf-8")

    def metrics_text(self) -> str:
        """The front's counters in Prometheus' text format."""
        lines = [f"# HELP {REFUSED} HTTP requests the front refused before they reached Triton, by reason",
                 f"# TYPE {REFUSED} counter"]
        lines += [f'{REFUSED}{{reason="{r}"}} {n}' for r, n in self.refused.items()]
        lines += [f"# HELP {RESPONSES} HTTP inference requests answered, by status code (503: queue full or timed out)",
                  f"# TYPE {RESPONSES} counter"]
        lines += [f'{RESPONSES}{{code="{c}"}} {n}' for c, n in sorted(self.responses.items())]
        return "\n".join(lines) + "\n"
