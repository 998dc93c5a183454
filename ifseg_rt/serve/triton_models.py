"""Triton python-backend models (``TritonPythonModel`` classes) that run ifseg_rt code inside Triton.

A model repository's ``1/model.py`` is a one-line shim importing one of these (``from
ifseg_rt.serve.triton_models import SegmenterModel as TritonPythonModel``), so the Python environment of Triton's
python backend needs ``ifseg_rt`` installed (torch-free: numpy, Pillow, the compiled kernels, onnxruntime).

=====================  =============================================  ==========================================
class                  model                                          does
=====================  =============================================  ==========================================
:class:`SegmenterModel`   ``ifseg`` of ``python -m ifseg_rt serve``     image bytes -> labels: one ``Segmenter``
:class:`PreprocessModel`  ``<name>_pre`` of an exported repository      decode, policy resize, normalise
:class:`PostprocessModel` ``<name>_post``                               kNN + fused resize/arg-max
:class:`OnnxStandInModel` ``<name>_onnx`` with ``--onnx-stand-in``      onnxruntime in the python backend, for a
                                                                        Triton without the onnxruntime backend
:class:`AdaptEndpointModel` ``ifseg_adapt`` of ``serve --base ...``     JSON requests -> the adaptation service
                                                                        of the serve process (a proxy)
=====================  =============================================  ==========================================

Every request of a dynamic batch gets its own response: a bad item fails its own request with INVALID_ARG (HTTP
400, gRPC INVALID_ARGUMENT, the message naming the problem); the rest of the batch is served. Preprocessing and
post-processing call the runtime's functions (``load_image``, ``ImagePolicy.target_size``, ``resize_bilinear``,
``normalize``; ``postprocess.cell_scores`` / ``cell_probabilities`` / ``labels_from_scores``): the one inference path.
``triton_python_backend_utils`` exists only inside Triton's python-backend stub; it is imported in ``initialize``.
"""

from __future__ import annotations

import json
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import protocol as P
from .protocol import RequestError
from .telemetry import ModelTelemetry, RefusalLog

PIXELS = "pixels"  # pre -> ONNX: the normalised network input, FP32 [batch, 3, H, W] (the ONNX graph's input)


def _int_param(params: Dict[str, str], key: str, default: int) -> int:
    v = params.get(key, "")
    return int(v) if v.strip() else default


def _requested(request) -> Sequence[str]:
    """The outputs a request asked for (Triton lists every output when the client named none)."""
    return list(request.requested_output_names()) or list(P.OUTPUTS)


class _Model:
    """Shared plumbing: ``pb_utils``, parameters, responses, metrics (:mod:`~ifseg_rt.serve.telemetry`): every
    response goes through :meth:`_response` or :meth:`_error`, which note its outcome; :meth:`execute` records the
    batch after the subclass' ``_execute``."""

    _outcomes: List[str]
    _images = 0

    def _setup(self, args: Dict[str, Any]) -> Dict[str, str]:
        import triton_python_backend_utils as pb_utils  # only importable inside Triton's python-backend stub

        self.pb = pb_utils
        self.config = json.loads(args["model_config"])
        self.name = args.get("model_name", self.config.get("name", "?"))
        self.version_dir = Path(args["model_repository"]) / str(args["model_version"])
        self.params = P.config_parameters(self.config)
        self.max_batch_size = max(1, int(self.config.get("max_batch_size") or 1))
        self.telemetry = ModelTelemetry(pb_utils, self.name)
        self._outcomes = []
        return self.params

    def execute(self, requests) -> List[Any]:
        started = time.monotonic()
        self._outcomes, self._images = [], 0
        responses = self._execute(requests)
        self.telemetry.record(self._outcomes, self._images, started)
        return responses

    def _execute(self, requests) -> List[Any]:
        raise NotImplementedError

    def _error(self, message: str, internal: bool = False):
        pb = self.pb
        code = pb.TritonError.INTERNAL if internal else pb.TritonError.INVALID_ARG
        self._outcomes.append("failed" if internal else "refused")
        if not internal:
            self._log_refusal(message)
        return pb.InferenceResponse(error=pb.TritonError(message, code))

    def _log_refusal(self, message: str) -> None:
        """One log line per refused request, rate-limited (:class:`~ifseg_rt.serve.telemetry.RefusalLog`)."""
        log = getattr(self, "_refusals", None)
        if log is None:
            log = self._refusals = RefusalLog(self.pb.Logger.log_warn, self.name)
        log(message)

    def _response(self, tensors: Dict[str, np.ndarray]):
        pb = self.pb
        self._outcomes.append("ok")
        return pb.InferenceResponse(output_tensors=[pb.Tensor(k, v) for k, v in tensors.items()])

    def _internal(self, requests, what: str):
        """Every request of a batch fails with INTERNAL (an engine failure, not a bad request); logged in full."""
        self.pb.Logger.log_error(f"{self.name}: {what} failed:\n{traceback.format_exc()}")
        msg = f"{self.name}: internal error while {what}: {traceback.format_exc(limit=0).strip()}"
        return [self._error(msg, internal=True) for _ in requests]

    def _input(self, request, name: str) -> np.ndarray:
        t = self.pb.get_input_tensor_by_name(request, name)
        if t is None:
            raise RequestError(f"missing input '{name}'")
        return t.as_numpy()

    def _manifest(self):
        from ..runtime.model_dir import MANIFEST, parse_manifest

        path = self.version_dir / self.params.get(P.PARAM_MANIFEST, MANIFEST)
        return parse_manifest(json.loads(path.read_text(encoding="utf-8")), None)

    def finalize(self) -> None:
        pass


class SegmenterModel(_Model):
    """``python -m ifseg_rt serve``: one :class:`~ifseg_rt.runtime.Segmenter` per instance; the items of a dynamic
    batch are segmented together (``Segmenter.seg`` of a list batches images of equal network size)."""

    def initialize(self, args: Dict[str, Any]) -> None:
        from ..runtime.segmenter import Segmenter

        params = self._setup(args)
        opts = {}
        threads = _int_param(params, P.PARAM_THREADS, 0)
        if threads > 0:
            opts["threads"] = threads
        self.max_bytes = _int_param(params, P.PARAM_MAX_BYTES, P.MAX_REQUEST_BYTES)
        self.max_pixels = _int_param(params, P.PARAM_MAX_PIXELS, P.MAX_PIXELS)
        self.max_output_pixels = _int_param(params, P.PARAM_MAX_OUTPUT_PIXELS, P.MAX_OUTPUT_PIXELS)
        self.segmenter = Segmenter.load(params[P.PARAM_MODEL_DIR], backend=params.get(P.PARAM_BACKEND, "auto"),
                                        device=params.get(P.PARAM_DEVICE, "cpu"),
                                        knn_backend=params.get(P.PARAM_KNN_BACKEND) or "auto", **opts)
        if self.segmenter.categories != P.categories_from_config(self.config, f"model '{self.name}'"):
            raise ValueError(f"model '{self.name}': the config's categories differ from {params[P.PARAM_MODEL_DIR]}")
        # one forward now at the policy's usual input size (a 4:3 photo), so that the first client pays neither for
        # the engine's lazy initialisation nor for that shape's first run
        policy = self.segmenter.spec.policy
        h, w = policy.size if policy.mode == "fixed" else (policy.short_side, policy.short_side * 4 // 3)
        self.segmenter.seg(np.full((h, w, 3), 128, np.uint8))
        self.pb.Logger.log_info(f"{self.name}: {args.get('model_instance_name')} serves "
                                f"{params[P.PARAM_MODEL_DIR]} ({self.segmenter.backend.name}, "
                                f"{len(self.segmenter.categories)} categories)")

    def _execute(self, requests) -> List[Any]:
        from ..runtime.segmenter import ImageError

        images: List[np.ndarray] = []
        owners: List[Tuple[int, int, int]] = []  # (request, item, items in that request)
        errors: Dict[int, str] = {}
        for r, request in enumerate(requests):
            try:
                items = P.decode_items(self._input(request, P.INPUT), max_bytes=self.max_bytes,
                                       max_pixels=self.max_pixels)
            except RequestError as e:
                errors[r] = str(e)
                continue
            n = P.output_pixels(items)
            if n > self.max_output_pixels and P.LABELS in _requested(request):
                errors[r] = (f"the '{P.LABELS}' output of this request would hold {n} int32 label pixels, above this "
                             f"server's limit of {self.max_output_pixels} (--max-output-pixels): ask for "
                             f"'{P.LABELS_PNG}' instead (the ifseg_rt Client does so for large images) or send a "
                             f"smaller image")
                continue
            images += items
            owners += [(r, k, len(items)) for k in range(len(items))]
        want_probs = any(P.PROBABILITIES in _requested(q) for q in requests)
        try:
            results = self.segmenter.seg(images, batch_size=self.max_batch_size, return_exceptions=True,
                                         return_probabilities=want_probs) if images else []
        except Exception:
            return self._internal(requests, "segmenting a batch")
        per_request: List[List[Any]] = [[] for _ in requests]
        for res, (r, k, n) in zip(results, owners):
            if isinstance(res, ImageError):
                where = f"item {k} of input '{P.INPUT}'" if n > 1 else f"input '{P.INPUT}'"
                errors.setdefault(r, f"{where}: {res.reason}")
            else:
                per_request[r].append(res)
                self._images += 1
        return [self._error(errors[r]) if r in errors else
                self._response(P.pack_results(per_request[r], _requested(q))) for r, q in enumerate(requests)]


class PreprocessModel(_Model):
    """``<name>_pre``: encoded image -> normalised network input (+ original size, input size, grid). The items of
    one request must reach the same network size (they go through the ONNX model as one tensor)."""

    def initialize(self, args: Dict[str, Any]) -> None:
        params = self._setup(args)
        self.spec = self._manifest()
        self.max_bytes = _int_param(params, P.PARAM_MAX_BYTES, P.MAX_REQUEST_BYTES)
        self.max_pixels = _int_param(params, P.PARAM_MAX_PIXELS, P.MAX_PIXELS)

    def preprocess(self, img: np.ndarray) -> Tuple[np.ndarray, Tuple[int, int]]:
        """``HxWx3`` uint8 -> (``3xHxW`` float32 network input, (H, W)), as ``Segmenter.preprocess``."""
        from ..runtime.preprocess import network_input

        x = network_input(img, self.spec.policy, self.spec.check_grid)
        return x, (x.shape[1], x.shape[2])

    def _execute(self, requests) -> List[Any]:
        from ..geometry import token_grid

        out = []
        for request in requests:
            try:
                images = P.decode_items(self._input(request, P.INPUT), max_bytes=self.max_bytes,
                                        max_pixels=self.max_pixels)
                xs, sizes = [], []
                for k, img in enumerate(images):
                    try:
                        x, size = self.preprocess(img)
                    except ValueError as e:
                        raise RequestError(f"item {k} of input '{P.INPUT}': {e}") from None
                    xs.append(x)
                    sizes.append(size)
                if len(set(sizes)) > 1:
                    raise RequestError(f"the items of one request must reach the same network input size through the "
                                       f"image policy, got {sorted(set(sizes))}: send one image per request")
                h, w = sizes[0]
                n = len(images)
                self._images += n
                out.append(self._response({
                    PIXELS: np.stack(xs),
                    P.ORIGINAL_SIZE: np.asarray([img.shape[:2] for img in images], np.int32).reshape(n, 2),
                    P.INPUT_SIZE: np.asarray([[h, w]] * n, np.int32),
                    P.GRID: np.asarray([list(token_grid(h, w))] * n, np.int32)}))
            except RequestError as e:
                out.append(self._error(str(e)))
        return out


class PostprocessModel(_Model):
    """``<name>_post``: the ONNX outputs of one request -> label maps (+ cell probabilities), through
    :mod:`ifseg_rt.runtime.postprocess` with the model's kNN settings from its ``ifseg.json``."""

    def initialize(self, args: Dict[str, Any]) -> None:
        from ..runtime.model_dir import OUTPUT_NAMES

        params = self._setup(args)
        self.spec = self._manifest()
        self.knn_backend = params.get(P.PARAM_KNN_BACKEND) or "auto"
        self.logits_name, self.features_name = OUTPUT_NAMES

    def _execute(self, requests) -> List[Any]:
        from ..runtime.postprocess import cell_probabilities, cell_scores, labels_from_scores

        out = []
        for request in requests:
            try:
                logits = self._input(request, self.logits_name)
                feats = self._input(request, self.features_name)
                sizes = self._input(request, P.ORIGINAL_SIZE)
                grids = self._input(request, P.GRID)
            except RequestError as e:
                out.append(self._error(str(e)))
                continue
            want = _requested(request)
            try:
                labels, probs = [], []
                for i in range(logits.shape[0]):
                    grid = (int(grids[i, 0]), int(grids[i, 1]))
                    scores = cell_scores(logits[i], feats[i], self.spec.knn, knn_backend=self.knn_backend)
                    labels.append(labels_from_scores(scores, grid, (int(sizes[i, 0]), int(sizes[i, 1]))))
                    if P.PROBABILITIES in want:
                        probs.append(np.asarray(cell_probabilities(scores, self.spec.knn)).reshape(*grid, -1))
            except Exception:
                out.append(self._internal([request], "post-processing")[0])
                continue
            self._images += len(labels)
            tensors = {P.LABELS: P.pack_labels(labels)}
            if probs:
                tensors[P.PROBABILITIES] = P.pack_probabilities(probs)
            out.append(self._response(tensors))
        return out


class OnnxStandInModel(_Model):
    """A STAND-IN for Triton's onnxruntime backend: runs the repository's ``model.onnx`` with onnxruntime (CPU)
    inside the python backend, same inputs and outputs, for a Triton that has only the python backend (PyTriton's
    bundled server). A stock Triton uses the ``onnxruntime_onnx`` config instead."""

    def initialize(self, args: Dict[str, Any]) -> None:
        import onnxruntime as ort

        from ..runtime.model_dir import INPUT_NAME, ONNX_FILE, OUTPUT_NAMES

        params = self._setup(args)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        threads = _int_param(params, P.PARAM_THREADS, 0)
        if threads > 0:
            so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        self.session = ort.InferenceSession(str(self.version_dir / ONNX_FILE), so, providers=["CPUExecutionProvider"])
        self.input_name, self.output_names = INPUT_NAME, list(OUTPUT_NAMES)

    def _execute(self, requests) -> List[Any]:
        out: List[Optional[Any]] = [None] * len(requests)
        groups: Dict[Tuple[int, ...], List[Tuple[int, np.ndarray]]] = {}
        for r, request in enumerate(requests):
            try:
                x = self._input(request, self.input_name)
            except RequestError as e:
                out[r] = self._error(str(e))
                continue
            groups.setdefault(x.shape[1:], []).append((r, x))
        for members in groups.values():  # one run per input shape, as the stock backend's batches
            try:
                batch = np.concatenate([x for _, x in members])
                logits, feats = self.session.run(self.output_names, {self.input_name: batch})
            except Exception:
                for (r, _), err in zip(members, self._internal(members, "running the ONNX model")):
                    out[r] = err
                continue
            s = 0
            for r, x in members:
                n = x.shape[0]
                out[r] = self._response({self.output_names[0]: logits[s:s + n], self.output_names[1]: feats[s:s + n]})
                s += n
        return out


class AdaptEndpointModel(_Model):
    """``ifseg_adapt``: one JSON request (BYTES ``[1]``) -> the answer of :class:`~ifseg_rt.serve.adaptation.
    AdaptService` in the ``serve`` process, through its control socket (config parameter ``control_socket``).
    A refused request is INVALID_ARG (400), a full queue UNAVAILABLE (503), an unknown vocabulary NOT_FOUND."""

    def initialize(self, args: Dict[str, Any]) -> None:
        from .adaptation import PARAM_CONTROL_SOCKET

        params = self._setup(args)
        self.socket = params[PARAM_CONTROL_SOCKET]

    def _refusal(self, message: str, code: str):
        pb = self.pb
        kind = {"unavailable": "UNAVAILABLE", "not_found": "NOT_FOUND"}.get(code)
        err = getattr(pb.TritonError, kind, None) if kind else None
        if err is None:
            return self._error(message)
        self._outcomes.append("refused")
        self._log_refusal(message)
        return pb.InferenceResponse(error=pb.TritonError(message, err))

    def _execute(self, requests) -> List[Any]:
        from .adaptation import REQUEST, RESPONSE, control_request

        out = []
        for request in requests:
            try:
                raw = self._input(request, REQUEST).reshape(-1)
                if raw.size != 1 or not isinstance(raw[0], (bytes, np.bytes_)):
                    raise RequestError(f"input '{REQUEST}' must be one JSON object as BYTES, shape [1]")
                try:
                    msg = json.loads(bytes(raw[0]).decode("utf-8"))
                except (UnicodeDecodeError, ValueError) as e:
                    raise RequestError(f"input '{REQUEST}' is not JSON: {e}") from None
            except RequestError as e:
                out.append(self._error(str(e)))
                continue
            try:
                answer = control_request(self.socket, msg)
            except (OSError, ValueError) as e:
                out.append(self._error(f"the adaptation service does not answer: {e}", internal=True))
                continue
            if "error" in answer:
                out.append(self._refusal(str(answer["error"]), str(answer.get("code", "invalid"))))
            else:
                out.append(self._response({RESPONSE: np.array([json.dumps(answer).encode("utf-8")],
                                                              dtype=object)}))
        return out
