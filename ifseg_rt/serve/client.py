"""``Client``: segment images on an ifseg_rt Triton server (``python -m ifseg_rt serve`` or an exported repository's
ensemble) and get the same :class:`~ifseg_rt.runtime.SegmentationResult` as ``Segmenter.seg``, over HTTP or gRPC.

::

    from ifseg_rt.serve import Client

    client = Client("localhost:8000")               # HTTP; Client("grpc://localhost:8001") for gRPC
    result = client.seg("street.jpg")                # a path, encoded bytes, an HxWx3 uint8 array or a PIL image
    result.labels, result.names()
    results = client.seg(paths, return_exceptions=True)   # a bad image becomes an ImageError in its place

Files and bytes are sent as they are (the server decodes them, EXIF orientation included, exactly as
``Segmenter.seg(path)``); arrays and PIL images go as lossless PNG of what ``load_image`` makes of them, so every
kind of input gives the labels ``Segmenter.seg`` gives for it. One ``Client`` may be used from many threads (each
thread gets its own HTTP connection; gRPC shares one channel).

Labels come as the int32 ``labels`` output (no encoding cost) or, for an image above :data:`PNG_LABELS_ABOVE`
pixels (or the server's ``max_output_pixels``) when the server offers it, as ``labels_png`` (a 40 MP map: a few
hundred KB instead of 160 MB); ``png_labels=True/False`` forces one way.
"""

from __future__ import annotations

import io
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..runtime.preprocess import ImageLike, image_file, load_image
from ..runtime.segmenter import ImageError, SegmentationResult, describe
from . import protocol as P

PROTOCOLS = ("http", "grpc")
PNG_LABELS_ABOVE = 4_194_304  # image pixels above which the client asks for labels_png (when the server has it)


class ServeError(RuntimeError):
    """The server could not answer (unreachable, busy, internal error, not an ifseg_rt model).

    Attributes: ``status`` (HTTP status or gRPC status code as a string, None when unreachable).
    """

    def __init__(self, message: str, status: Optional[str] = None):
        self.status = status
        super().__init__(message)


def encode_image(image: ImageLike) -> bytes:
    """What the client sends for ``image``: a file's bytes or the given bytes unchanged; a lossless PNG of
    ``load_image(image)`` for arrays and PIL images."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, (str, Path)):
        return image_file(image).read_bytes()
    from PIL import Image

    arr = load_image(image)  # the checks and conversions Segmenter applies (dtype, channels, EXIF of PIL images)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _pixels(data: bytes) -> Optional[int]:
    """Width x height from an encoded image's header (None when Pillow cannot tell: the server will say why)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size[0] * im.size[1]
    except Exception:  # not an image: the server refuses it with the reason
        return None


def _describe(image: ImageLike) -> str:
    if isinstance(image, (bytes, bytearray, memoryview)):
        return f"{len(image)} bytes"
    return describe(image)


def parse_url(url: str, protocol: Optional[str] = None) -> Tuple[str, str, bool]:
    """``"localhost:8000"``, ``"http://..."``, ``"https://..."`` or ``"grpc://..."`` -> (host:port, protocol, ssl)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    schemes = {"": (protocol or "http", False), "http": ("http", False), "https": ("http", True),
               "grpc": ("grpc", False), "grpcs": ("grpc", True)}
    if scheme.lower() not in schemes:
        raise ValueError(f"unsupported URL scheme {scheme!r} in {url!r}: use host:port, http://, https://, grpc:// "
                         f"or grpcs://")
    proto, ssl = schemes[scheme.lower()]
    if protocol is not None and protocol != proto:
        raise ValueError(f"protocol={protocol!r} contradicts the URL {url!r}")
    if proto not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {proto!r}")
    rest = rest.rstrip("/")
    host, colon, port = rest.rpartition(":")
    if not rest or "/" in rest or not colon or not host or not port.isdecimal() or not 1 <= int(port) <= 65535:
        raise ValueError(f"expected host:port with a port in 1..65535 in {url!r} (Triton's defaults: HTTP "
                         f"localhost:8000, gRPC grpc://localhost:8001)")
    return rest, proto, ssl


def _not_triton(client: "Client", e: Exception) -> str:
    other = "gRPC (grpc://)" if client.protocol == "http" else "HTTP (http://)"
    return (f"{client.url} did not answer as a Triton {client.protocol.upper()} endpoint ({type(e).__name__}: "
            f"{str(e)[:120]}): is it the server's {other} port, or another service?")


@dataclass(frozen=True)
class _ModelInfo:
    name: str
    categories: Tuple[str, ...]
    max_batch_size: int
    has_png: bool
    png_above: int  # image pixels above which labels come as PNG (png_labels=None)


class Client:
    """A client of one ifseg_rt model on a Triton server (and of its adaptation endpoint, when it has one).

    Arguments:
      url (str): ``host:port`` (HTTP, e.g. ``localhost:8000``), or with a scheme: ``http://``, ``https://``,
        ``grpc://`` (e.g. ``grpc://localhost:8001``), ``grpcs://``
      model (str or None): the model's name on the server (None: only adapted vocabularies, see :meth:`adapt`)
      protocol (str or None): "http" or "grpc" for a URL without scheme
      timeout_s (float): per request (and for connecting)
      png_labels (bool or None): receive labels as PNG (True), as int32 (False), or PNG for large images only
        (None, see the module docstring)

    Raises ``ServeError`` at construction when the server cannot be reached or the model is not an ifseg_rt model.
    """

    def __init__(self, url: str = "localhost:8000", *, model: Optional[str] = P.MODEL_NAME,
                 protocol: Optional[str] = None, timeout_s: float = 60.0, png_labels: Optional[bool] = None):
        self.address, self.protocol, self.ssl = parse_url(url, protocol)
        self.url = f"{'https' if self.ssl else 'http'}://{self.address}" if self.protocol == "http" else \
            f"{'grpcs' if self.ssl else 'grpc'}://{self.address}"
        self.model = model
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not 0 < timeout_s < float("inf"):
            raise ValueError(f"timeout_s must be a number of seconds > 0, got {timeout_s!r}")
        self.timeout_s = float(timeout_s)
        self.png_labels = png_labels
        try:
            if self.protocol == "http":
                import tritonclient.http as tc
            else:
                import tritonclient.grpc as tc
            from tritonclient.utils import InferenceServerException
        except ImportError as e:
            raise ImportError(f"the client needs tritonclient[{self.protocol}]: pip install 'ifseg_rt[serve]' "
                              f"({e})") from e
        self._tc, self._exc = tc, InferenceServerException
        self._local = threading.local()
        self._lock = threading.Lock()
        self._clients: List[Any] = []
        self._grpc = None
        self._models: Dict[str, _ModelInfo] = {}
        self._vocabularies: Dict[str, str] = {}  # vocabulary id -> model name
        self.categories: Tuple[str, ...] = ()
        self.max_batch_size = 1
        try:
            if model is not None:
                info = self._check_model(model)
                self.categories, self.max_batch_size = info.categories, info.max_batch_size
        except BaseException:
            self.close()  # no connection outlives a failed constructor
            raise

    def _check_model(self, model: str) -> "_ModelInfo":
        """The ifseg_rt contract of ``model`` from its config (cached)."""
        if model in self._models:
            return self._models[model]
        config = self._call(lambda c: c.get_model_config(model) if self.protocol == "http"
                            else c.get_model_config(model, as_json=True, **self._deadline())["config"],
                            what=f"reading the config of model '{model}'")
        where = f"model '{model}' at {self.url}"
        inputs = {t.get("name"): t.get("data_type") for t in config.get("input", [])}
        if inputs.get(P.INPUT) != "TYPE_STRING":
            raise ServeError(f"{where} is not an ifseg_rt model: it has no BYTES input '{P.INPUT}' (inputs: "
                             f"{inputs})")
        try:
            categories = P.categories_from_config(config, where)
        except ValueError as e:
            raise ServeError(str(e)) from None
        has_png = P.LABELS_PNG in {t.get("name") for t in config.get("output", [])}
        if self.png_labels and not has_png:
            raise ServeError(f"{where} has no '{P.LABELS_PNG}' output (an exported ensemble): use png_labels=None")
        try:
            limit = int(P.config_parameters(config).get(P.PARAM_MAX_OUTPUT_PIXELS) or P.MAX_OUTPUT_PIXELS)
        except ValueError:
            limit = P.MAX_OUTPUT_PIXELS
        info = _ModelInfo(model, categories, int(config.get("max_batch_size") or 1), has_png,
                          min(PNG_LABELS_ABOVE, limit))
        self._models[model] = info
        return info

    # --- connections ------------------------------------------------------------------------------------------
    def _client(self):
        if self.protocol == "grpc":  # one channel, safe to share between threads
            with self._lock:
                if self._grpc is None:
                    self._grpc = self._tc.InferenceServerClient(self.address, ssl=self.ssl)
                    self._clients.append(self._grpc)
                return self._grpc
        c = getattr(self._local, "client", None)  # the HTTP client is gevent-based: one per thread
        if c is None:
            c = self._tc.InferenceServerClient(self.address, ssl=self.ssl, connection_timeout=self.timeout_s,
                                               network_timeout=self.timeout_s)
            self._local.client = c
            with self._lock:
                self._clients.append(c)
        return c

    def _deadline(self) -> Dict[str, float]:
        """gRPC calls take their deadline per call (the HTTP client has its timeouts from its constructor)."""
        return {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}

    def _call(self, fn, what: str):
        try:
            return fn(self._client())
        except self._exc as e:
            status = e.status()
            reason = e.message() or e
            if "DEADLINE_EXCEEDED" in str(status):
                reason = f"no answer within timeout_s = {self.timeout_s:g} s"
            raise ServeError(f"{what} at {self.url} failed: {reason}" + (f" [status {status}]" if status else ""),
                             status) from None
        except (OSError, ConnectionError) as e:
            raise ServeError(f"cannot reach Triton at {self.url}: {e}") from None
        except Exception as e:  # noqa: BLE001 - the transport's own parse errors (geventhttpclient, rapidjson)
            raise ServeError(_not_triton(self, e)) from None

    def close(self) -> None:
        with self._lock:
            for c in self._clients:
                try:
                    c.close()
                except Exception:  # closing a gevent client from another thread may complain; it is going anyway
                    pass
            self._clients.clear()
            self._grpc = None
        self._local = threading.local()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def is_ready(self, model: Optional[str] = None) -> bool:
        """Whether the server has ``model`` (default: this client's) loaded and ready; False when unreachable."""
        try:
            return bool(self._client().is_model_ready(model or self.model, **self._deadline()))
        except Exception:  # unreachable or refused: not ready, whatever the transport's exception type
            return False

    # --- segmentation ---------------------------------------------------------------------------------------
    def seg(self, image: Union[ImageLike, Sequence[ImageLike]], *, return_probabilities: bool = False,
            return_exceptions: bool = False, vocabulary: Optional[str] = None
            ) -> Union[SegmentationResult, List[Union[SegmentationResult, ImageError]]]:
        """Segment one image (-> result) or a list/tuple of images (-> list of results, input order; one request
        each), as :meth:`Segmenter.seg <ifseg_rt.runtime.Segmenter.seg>`; ``vocabulary``: an id from
        :meth:`adapt` (its model is loaded again if the server unloaded it), else this client's model.

        An image the server refuses (or that cannot be read here) raises :class:`ImageError` (a ``ValueError``)
        naming the problem, or with ``return_exceptions=True`` takes its place in the list. ``timings`` of a result
        hold this client's milliseconds: ``encode``, ``request`` (the round trip), ``total``.

        Raises
        ------
        ImageError (ValueError), FileNotFoundError, TypeError for unusable inputs; ServeError when the server
        cannot answer (unreachable, queue full: status 503 / UNAVAILABLE, internal error)
        """
        info = self._target(vocabulary)
        if not isinstance(image, (list, tuple)):
            return self._seg_one(image, 0, return_probabilities, info, vocabulary)
        out: List[Union[SegmentationResult, ImageError]] = []
        for i, img in enumerate(image):
            try:
                out.append(self._seg_one(img, i, return_probabilities, info, vocabulary))
            except (ImageError, FileNotFoundError, TypeError, ValueError) as e:  # one naming the item, as seg() does
                err = e if isinstance(e, ImageError) else ImageError(i, _describe(img), str(e))
                if not return_exceptions:
                    raise err from None
                out.append(err)
        return out

    def _target(self, vocabulary: Optional[str]) -> _ModelInfo:
        if vocabulary is None:
            if self.model is None:
                raise ServeError("this Client has no model (model=None): pass vocabulary=ID from Client.adapt")
            return self._check_model(self.model)
        name = self._vocabularies.get(vocabulary)
        if name is None:
            status = self.adapt_status(vocabulary, load=True)
            if status["status"] != "ready":
                raise ServeError(f"vocabulary {vocabulary} is not ready: {status['status']}"
                                 + (f" ({status['reason']})" if status.get("reason") else ""))
            name = self._vocabularies[vocabulary] = status["model"]
        return self._check_model(name)

    def _seg_one(self, image: ImageLike, index: int, probabilities: bool, info: _ModelInfo,
                 vocabulary: Optional[str]) -> SegmentationResult:
        try:
            return self._one(image, index, probabilities, info)
        except ServeError as e:
            if vocabulary is None or "unknown model" not in str(e).lower():
                raise
            self.adapt_status(vocabulary, load=True)  # unloaded (least recently used): load it again, once
            return self._one(image, index, probabilities, info)

    # --- adaptation on request ----------------------------------------------------------------------------------
    def _adapt_call(self, msg: Dict[str, Any]) -> Dict[str, Any]:
        from .adaptation import ENDPOINT, REQUEST, RESPONSE

        tc = self._tc
        inp = tc.InferInput(REQUEST, [1], "BYTES")
        arr = np.array([json.dumps(msg).encode("utf-8")], dtype=np.object_)
        if self.protocol == "http":
            inp.set_data_from_numpy(arr, binary_data=True)
            outs = [tc.InferRequestedOutput(RESPONSE, binary_data=True)]
        else:
            inp.set_data_from_numpy(arr)
            outs = [tc.InferRequestedOutput(RESPONSE)]
        try:
            r = self._call(lambda c: c.infer(ENDPOINT, inputs=[inp], outputs=outs, **self._deadline()),
                           what=f"the adaptation request to model '{ENDPOINT}'")
        except ServeError as e:
            if "unknown model" not in str(e).lower():
                raise
            raise ServeError(f"the server at {self.url} does not adapt on request (it has no model '{ENDPOINT}'): "
                             f"start it with serve --base CHECKPOINT --bpe-dir DIR --adapt-dir DIR", e.status) from None
        return json.loads(bytes(r.as_numpy(RESPONSE).reshape(-1)[0]))

    def adapt(self, categories: Union[str, Sequence[str]], *, steps: Optional[int] = None, seed: Optional[int] = None,
              wait: bool = True, timeout_s: float = 3600.0, poll_s: float = 1.0,
              progress: Optional[Callable[[Dict[str, Any]], None]] = None) -> Dict[str, Any]:
        """Ask the server (``serve --base ...``) for a model of ``categories``: an image-free adaptation, export
        and load, run by the server (once per category list and recipe). Returns the status
        (``{"vocabulary", "status", "progress": [k, N], "model", "categories", "reason", ...}``); with ``wait``
        polls until it is ready (``progress`` gets every status) and raises :class:`ServeError` if it failed or
        took longer than ``timeout_s``. Then ``seg(image, vocabulary=status["vocabulary"])``.

        Raises
        ------
        ServeError: a refused request (its reason: empty or over-long list, duplicates, names the tokenizer cannot
        encode, a full queue [status 503 / UNAVAILABLE]), a failed adaptation, no adaptation endpoint
        """
        msg: Dict[str, Any] = {"op": "adapt",  # a string is split at commas by the server
                               "categories": categories if isinstance(categories, str) else list(categories)}
        if steps is not None:
            msg["steps"] = steps
        if seed is not None:
            msg["seed"] = seed
        status = self._adapt_call(msg)
        deadline = time.monotonic() + timeout_s
        while wait:
            if progress is not None:
                progress(status)
            if status["status"] == "ready":
                if not status.get("loaded"):
                    status = self.adapt_status(status["vocabulary"], load=True)
                break
            if status["status"] == "failed":
                raise ServeError(f"adapting vocabulary {status['vocabulary']} failed: {status.get('reason')}")
            if time.monotonic() > deadline:
                raise ServeError(f"vocabulary {status['vocabulary']} is still {status['status']} after "
                                 f"{timeout_s:.0f} s")
            time.sleep(poll_s)
            status = self.adapt_status(status["vocabulary"])
        if status["status"] == "ready":
            self._vocabularies[status["vocabulary"]] = status["model"]
        return status

    def adapt_status(self, vocabulary: str, *, load: bool = False) -> Dict[str, Any]:
        """The status of ``vocabulary`` (``load``: load its model if it is ready but was unloaded)."""
        return self._adapt_call({"op": "status", "vocabulary": vocabulary, "load": load})

    def _one(self, image: ImageLike, index: int, probabilities: bool, info: _ModelInfo) -> SegmentationResult:
        t0 = time.perf_counter()
        data = encode_image(image)
        t1 = time.perf_counter()
        png = self.png_labels
        if png is None:
            n = _pixels(data) if info.has_png else None
            png = n is not None and n > info.png_above
        names = [P.LABELS_PNG if png else P.LABELS, *P.SIZE_OUTPUTS] + ([P.PROBABILITIES] if probabilities else [])
        tc = self._tc
        arr = np.array([[data]], dtype=np.object_)
        inp = tc.InferInput(P.INPUT, [1, 1], "BYTES")
        if self.protocol == "http":
            inp.set_data_from_numpy(arr, binary_data=True)
            outs = [tc.InferRequestedOutput(n, binary_data=True) for n in names]
        else:
            inp.set_data_from_numpy(arr)
            outs = [tc.InferRequestedOutput(n) for n in names]
        try:
            r = self._client().infer(info.name, inputs=[inp], outputs=outs, **self._deadline())
        except self._exc as e:
            status = str(e.status() or "")
            if status in ("400", "StatusCode.INVALID_ARGUMENT") and "unknown model" not in str(e.message()).lower():
                raise ImageError(index, _describe(image), e.message() or str(e)) from None
            raise ServeError(f"request to {self.url} (model '{info.name}') failed: {e.message() or e} "
                             f"[status {status or 'none'}]", status or None) from None
        except (OSError, ConnectionError) as e:
            raise ServeError(f"cannot reach Triton at {self.url}: {e}") from None
        except Exception as e:  # noqa: BLE001 - the transport's own parse errors (geventhttpclient, rapidjson)
            raise ServeError(_not_triton(self, e)) from None
        t2 = time.perf_counter()
        result = P.unpack_results({n: r.as_numpy(n) for n in names}, info.categories)[0]
        result.timings = {"encode": (t1 - t0) * 1e3, "request": (t2 - t1) * 1e3,
                          "total": (time.perf_counter() - t0) * 1e3}
        return result
