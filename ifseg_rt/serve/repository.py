"""Triton model repositories: the one-model repository of ``python -m ifseg_rt serve`` and the exported repository
of ``python -m ifseg_rt.export ... --format triton`` (ensemble of pre -> ONNX -> post), with their ``config.pbtxt``
built as, and validated against, Triton's own protobuf schema (``model_config.proto``, shipped in tritonclient).

Exported repository (``NAME`` = ``ifseg`` by default)::

    REPO/NAME/config.pbtxt           ensemble: image (BYTES) -> labels, probabilities, original_size, input_size,
         NAME/1/, NAME/labels.txt    grid (the contract of ifseg_rt.serve.protocol), categories as a parameter
    REPO/NAME_pre/config.pbtxt       python backend: decode (EXIF, size limits), policy resize, normalise
         NAME_pre/1/model.py + ifseg.json, NAME_pre/warmup/image (an encoded image for the warm-up)
    REPO/NAME_onnx/config.pbtxt      onnxruntime backend (platform onnxruntime_onnx): dynamic batch / H / W,
         NAME_onnx/1/model.onnx      instance groups, optional TensorRT accelerator (fp16, engine cache), warm-up
    REPO/NAME_post/config.pbtxt      python backend: kNN (ifseg_rt's kernels) + fused resize / arg-max
         NAME_post/1/model.py + ifseg.json

The python-backend models import :mod:`ifseg_rt.serve.triton_models`, so Triton's Python environment needs
``pip install ifseg_rt`` (numpy + Pillow + the compiled kernels; no torch). ``onnx_stand_in=True`` writes the ONNX
step as a python-backend model running onnxruntime instead (same name, inputs and outputs), for a Triton without the
onnxruntime backend such as PyTriton's bundled server; its config says so in its first line.
"""

from __future__ import annotations

import io
import json
import shutil
import struct
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from .. import __version__
from ..runtime.model_dir import INPUT_NAME, MANIFEST, OUTPUT_NAMES, ModelSpec, load_model_dir
from ..runtime.preprocess import PATCH
from . import protocol as P
from .triton_models import PIXELS

CONFIG = "config.pbtxt"
VERSION = "1"  # the one version directory every model gets
LABELS_FILE = "labels.txt"  # category names, one a line (the ensemble's label_filename for 'labels')
WARMUP_IMAGE = "image"  # NAME_pre/warmup/<this>: a serialized BYTES tensor holding one encoded PNG
MAX_QUEUE_SIZE = 64  # requests waiting per model before Triton rejects new ones (HTTP 503 / UNAVAILABLE)
QUEUE_TIMEOUT_MS = 10_000  # a request still queued after this is rejected, not run (its client has likely gone)
TRT_WORKSPACE = 1 << 30  # bytes; TensorRT builder workspace of the onnxruntime TensorRT accelerator
INSTANCE_KINDS = ("gpu", "cpu")


class RepositoryError(ValueError):
    """A model repository whose configs do not parse against Triton's schema or do not fit together."""


def _schema():
    try:
        from google.protobuf import json_format, text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError as e:
        raise ImportError(f"Triton model configs need tritonclient[grpc] (Triton's model_config.proto): "
                          f"pip install 'ifseg_rt[serve]' ({e})") from e
    return model_config_pb2, json_format, text_format


def build_config(fields: Dict[str, Any]):
    """A ``ModelConfig`` message from a dict in the JSON form of ``model_config.proto`` (strict: an unknown field
    or enum value raises)."""
    mc, json_format, _ = _schema()
    return json_format.ParseDict(fields, mc.ModelConfig())


def config_text(config, header: Sequence[str] = ()) -> str:
    """``config.pbtxt`` text of a ``ModelConfig`` (``header`` lines become comments)."""
    _, _, text_format = _schema()
    lines = [f"# {h}" for h in header]
    return "\n".join(lines + [text_format.MessageToString(config, use_short_repeated_primitives=True)])


def parse_config(text: str, where: str = CONFIG):
    """Parse ``config.pbtxt`` text with Triton's schema; raises :class:`RepositoryError` naming line and field."""
    mc, _, text_format = _schema()
    cfg = mc.ModelConfig()
    try:
        text_format.Parse(text, cfg)
    except text_format.ParseError as e:
        raise RepositoryError(f"{where}: {e}") from None
    return cfg


def _params(values: Dict[str, Any]) -> Dict[str, Dict[str, str]]:
    return {k: {"string_value": str(v)} for k, v in values.items()}


def _categories_param(spec: ModelSpec) -> Dict[str, Dict[str, str]]:
    return _params({P.CATEGORIES_PARAMETER: json.dumps(list(spec.categories))})


def _batching(max_queue_size: int, max_queue_delay_us: int, queue_timeout_us: int = 0) -> Dict[str, Any]:
    """Dynamic batching with a bounded queue: more than ``max_queue_size`` waiting requests are rejected at once, and
    a request that waited ``queue_timeout_us`` (0: no limit) is rejected instead of run (its client gave up)."""
    policy = {"max_queue_size": int(max_queue_size), "timeout_action": "REJECT"}
    if queue_timeout_us:
        policy["default_timeout_microseconds"] = int(queue_timeout_us)
    return {"max_queue_delay_microseconds": int(max_queue_delay_us), "default_queue_policy": policy}


def _contract_outputs(label_file: Optional[str] = None, png: bool = False) -> List[Dict[str, Any]]:
    """The contract's outputs (:mod:`~ifseg_rt.serve.protocol`): labels, probabilities, the sizes; ``png``: with
    ``labels_png`` (``serve``'s model, not an ensemble)."""
    labels = {"name": P.LABELS, "data_type": "TYPE_INT32", "dims": [-1, -1]}
    if label_file:
        labels["label_filename"] = label_file
    return [labels, {"name": P.PROBABILITIES, "data_type": "TYPE_FP32", "dims": [-1, -1, -1]},
            *({"name": n, "data_type": "TYPE_INT32", "dims": [2]} for n in P.SIZE_OUTPUTS),
            *([{"name": P.LABELS_PNG, "data_type": "TYPE_STRING", "dims": [1]}] if png else [])]


def _image_input() -> Dict[str, Any]:
    return {"name": P.INPUT, "data_type": "TYPE_STRING", "dims": [1]}  # TYPE_STRING = the wire type BYTES


def _write(model_dir: Path, config, header: Sequence[str], files: Optional[Dict[str, Union[str, bytes]]] = None
           ) -> None:
    (model_dir / VERSION).mkdir(parents=True, exist_ok=True)
    (model_dir / CONFIG).write_text(config_text(config, header) + "\n", encoding="utf-8")
    for rel, content in (files or {}).items():
        p = model_dir / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content, encoding="utf-8")


def _shim(cls: str, what: str, python_path: Optional[str] = None) -> str:
    lines = [f"# Generated by ifseg_rt {__version__}: {what}.",
             "# Triton's python backend loads TritonPythonModel from here; the code is ifseg_rt.serve.triton_models,",
             "# so Triton's Python environment needs ifseg_rt installed (pip install ifseg_rt; no torch needed)."]
    if python_path:
        lines += ["import sys", "", "try:", "    import ifseg_rt  # noqa: F401",
                  "except ImportError:  # a source checkout: the stub ignores PYTHONPATH",
                  f"    sys.path.append({python_path!r})", ""]
    lines.append(f"from ifseg_rt.serve.triton_models import {cls} as TritonPythonModel  # noqa: E402,F401")
    return "\n".join(lines) + "\n"


# --- python -m ifseg_rt serve ------------------------------------------------------------------------------------
def serving_config(spec: ModelSpec, *, name: str = P.MODEL_NAME, backend: str = "auto", device: str = "cpu",
                   threads: int = 0, max_batch_size: int = 8, instances: int = 1, max_queue_size: int = MAX_QUEUE_SIZE,
                   max_queue_delay_us: int = 0, max_request_bytes: int = P.MAX_REQUEST_BYTES,
                   max_pixels: int = P.MAX_PIXELS, knn_backend: str = "auto", queue_timeout_ms: int = QUEUE_TIMEOUT_MS,
                   max_output_pixels: int = P.MAX_OUTPUT_PIXELS):
    """The ``ModelConfig`` of the one python-backend model that ``serve`` runs around a ``Segmenter``.

    Memory is bounded by ``instances`` (each holds one ``Segmenter`` and runs one batch of at most
    ``max_batch_size`` images at a time), ``max_queue_size`` waiting requests (more are rejected with HTTP 503 /
    gRPC UNAVAILABLE), ``max_request_bytes`` / ``max_pixels`` per image, checked before decoding, and
    ``max_output_pixels`` per request's int32 ``labels`` output (larger ones ask for ``labels_png``).
    """
    if spec.root is None:
        raise ValueError("serving needs an exported model directory, not an in-memory model")
    for key, v, lo in (("max_batch_size", max_batch_size, 1), ("instances", instances, 1),
                       ("max_queue_size", max_queue_size, 1),
                       ("max_request_bytes", max_request_bytes, P.MIN_BYTES_LIMIT),
                       ("max_pixels", max_pixels, PATCH * PATCH), ("max_queue_delay_us", max_queue_delay_us, 0),
                       ("queue_timeout_ms", queue_timeout_ms, 0), ("max_output_pixels", max_output_pixels, 1),
                       ("threads", threads, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{key} must be an integer >= {lo}, got {v!r}")
    return build_config({
        "name": name, "backend": "python", "max_batch_size": max_batch_size,
        "input": [_image_input()], "output": _contract_outputs(png=True),
        "instance_group": [{"count": instances, "kind": "KIND_CPU"}],
        "dynamic_batching": _batching(max_queue_size, max_queue_delay_us, 1000 * queue_timeout_ms),
        "parameters": {**_categories_param(spec), **_params({
            P.PARAM_MODEL_DIR: str(Path(spec.root).resolve()), P.PARAM_BACKEND: backend, P.PARAM_DEVICE: device,
            P.PARAM_THREADS: threads, P.PARAM_KNN_BACKEND: knn_backend, P.PARAM_MAX_BYTES: max_request_bytes,
            P.PARAM_MAX_PIXELS: max_pixels, P.PARAM_MAX_OUTPUT_PIXELS: max_output_pixels})}})


def write_serving_repository(repo: Union[str, Path], spec: ModelSpec, **options: Any) -> Path:
    """Write the one-model repository of ``serve`` into ``repo`` (options: :func:`serving_config`)."""
    import ifseg_rt

    cfg = serving_config(spec, **options)
    root = Path(repo)
    _write(root / cfg.name, cfg, [f"ifseg_rt serve: {spec.root} as Triton model '{cfg.name}' (python backend)"],
           {f"{VERSION}/model.py": _shim("SegmenterModel", "python -m ifseg_rt serve",
                                         python_path=str(Path(ifseg_rt.__file__).resolve().parents[1]))})
    check_repository(root)
    return root


def write_adapt_endpoint(repo: Union[str, Path], control_socket: Union[str, Path]) -> Path:
    """Add the adaptation endpoint (:data:`~ifseg_rt.serve.adaptation.ENDPOINT`, a python-backend proxy to the
    serve process' :class:`~ifseg_rt.serve.adaptation.ControlServer` at ``control_socket``) to ``repo``."""
    import ifseg_rt

    from .adaptation import ENDPOINT, PARAM_CONTROL_SOCKET, REQUEST, RESPONSE

    cfg = build_config({
        "name": ENDPOINT, "backend": "python", "max_batch_size": 0,
        "input": [{"name": REQUEST, "data_type": "TYPE_STRING", "dims": [1]}],
        "output": [{"name": RESPONSE, "data_type": "TYPE_STRING", "dims": [1]}],
        "instance_group": [{"count": 1, "kind": "KIND_CPU"}],
        "parameters": _params({PARAM_CONTROL_SOCKET: str(control_socket)})})
    root = Path(repo)
    _write(root / ENDPOINT, cfg, ["ifseg_rt serve: the adaptation endpoint (JSON in, JSON out)"],
           {f"{VERSION}/model.py": _shim("AdaptEndpointModel", "python -m ifseg_rt serve --base",
                                         python_path=str(Path(ifseg_rt.__file__).resolve().parents[1]))})
    return root


# --- python -m ifseg_rt.export --format triton -------------------------------------------------------------------
def _warmup_sizes(spec: ModelSpec) -> List[List[int]]:
    """Network input sizes the ONNX model is warmed up at: the fixed size, or a square and a 4:3 image."""
    if spec.static_shape is not None:
        return [list(spec.static_shape)]
    if spec.policy.mode == "fixed":
        return [list(spec.policy.size)]
    s = spec.policy.short_side
    sizes = {tuple(spec.policy.target_size(s, s)), tuple(spec.policy.target_size(3 * s, 4 * s))}
    return [list(v) for v in sorted(sizes)]


def _warmup_image() -> bytes:
    """A serialized one-element BYTES tensor (4-byte little-endian length, then the bytes) of a grey PNG."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((96, 128, 3), 128, np.uint8)).save(buf, format="PNG")
    png = buf.getvalue()
    return struct.pack("<I", len(png)) + png


def export_repository(model_dir: Union[str, Path], out: Union[str, Path], *, name: str = P.MODEL_NAME,
                      max_batch_size: int = 8, instances: int = 1, instance_kind: str = "gpu",
                      tensorrt: bool = False, precision: str = "fp16", trt_cache: Optional[str] = None,
                      onnx_stand_in: bool = False, max_queue_size: int = MAX_QUEUE_SIZE,
                      max_queue_delay_us: int = 1000, max_request_bytes: int = P.MAX_REQUEST_BYTES,
                      max_pixels: int = P.MAX_PIXELS, threads: int = 0, force: bool = False) -> Path:
    """Write a Triton model repository for an exported model directory (see the module docstring).

    Parameters
    ----------
    model_dir : directory written by ``python -m ifseg_rt.export`` (its ``model.onnx`` is copied)
    out : repository to create (empty or absent; ``force`` replaces the four model directories of ``name``)
    name : the ensemble's model name (the others are ``name_pre``, ``name_onnx``, ``name_post``)
    instances, instance_kind : instances of the ONNX model per GPU ("gpu") or in all ("cpu")
    tensorrt, precision, trt_cache : onnxruntime's TensorRT accelerator on GPU instances (``precision`` "fp16" or
        "fp32"; engines cached in ``trt_cache``)
    onnx_stand_in : write the ONNX step as a python-backend model running onnxruntime (see the module docstring)
    threads : onnxruntime CPU threads of the stand-in per instance (0: its default)

    Returns
    -------
    ``out``, after :func:`check_repository` passed on it
    """
    P.check_model_name(name)  # four folders of the repository are named after it
    spec = load_model_dir(model_dir)
    if not spec.onnx_file:
        raise ValueError(f"{spec.root} has no ONNX model: export it with --format onnx first")
    onnx_files = [f for f in (spec.onnx_file, spec.onnx_file + ".data") if spec.has_file(f)]
    spec.verify(onnx_files)
    if instance_kind not in INSTANCE_KINDS:
        raise ValueError(f"instance_kind must be one of {INSTANCE_KINDS}, got {instance_kind!r}")
    if precision not in ("fp16", "fp32"):
        raise ValueError(f"the TensorRT accelerator's precision must be fp16 or fp32, got {precision!r}")
    if tensorrt and (instance_kind != "gpu" or onnx_stand_in):
        raise ValueError("the TensorRT accelerator needs GPU instances of the stock onnxruntime model "
                         "(instance_kind='gpu', no stand-in)")
    for key, v in (("max_batch_size", max_batch_size), ("instances", instances), ("max_queue_size", max_queue_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{key} must be an integer >= 1, got {v!r}")
    names = {"ensemble": name, "pre": f"{name}_pre", "onnx": f"{name}_onnx", "post": f"{name}_post"}
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not force:
            raise FileExistsError(f"output repository {out} is not empty; pass force=True (--force) to replace "
                                  f"its models {sorted(names.values())}")
        for n in names.values():
            if (out / n).exists():
                if not (out / n / CONFIG).is_file():
                    raise FileExistsError(f"refusing to replace {out / n}: it holds no {CONFIG}")
                shutil.rmtree(out / n)
    out.mkdir(parents=True, exist_ok=True)
    m, c = spec.num_categories, spec.feature_dim
    batching = _batching(max_queue_size, max_queue_delay_us)
    manifest = json.dumps(spec.raw, indent=2) + "\n"
    prov = f"from {spec.root} by ifseg_rt {__version__}"

    # ONNX: image [B, 3, H, W] -> logits [B, N, M], features [B, N, C]
    hw = list(spec.static_shape) if spec.static_shape else [-1, -1]
    onnx_cfg: Dict[str, Any] = {
        "name": names["onnx"], "max_batch_size": max_batch_size,
        "input": [{"name": INPUT_NAME, "data_type": "TYPE_FP32", "dims": [3, *hw]}],
        "output": [{"name": OUTPUT_NAMES[0], "data_type": "TYPE_FP32", "dims": [-1, m]},
                   {"name": OUTPUT_NAMES[1], "data_type": "TYPE_FP32", "dims": [-1, c]}],
        "instance_group": [{"count": instances, "kind": "KIND_GPU" if instance_kind == "gpu" else "KIND_CPU"}],
        "dynamic_batching": batching,
        "model_warmup": [{"name": f"zeros_{h}x{w}", "batch_size": 1, "count": 2,
                          "inputs": {INPUT_NAME: {"data_type": "TYPE_FP32", "dims": [3, h, w], "zero_data": True}}}
                         for h, w in _warmup_sizes(spec)],
        "parameters": _categories_param(spec)}
    files: Dict[str, Union[str, bytes]] = {}
    if onnx_stand_in:
        onnx_cfg.update(backend="python", instance_group=[{"count": instances, "kind": "KIND_CPU"}])
        onnx_cfg["parameters"].update(_params({P.PARAM_THREADS: threads}))
        header = ["STAND-IN: the ONNX step as a python-backend model running onnxruntime (CPU), for a Triton",
                  "without the onnxruntime backend. A stock Triton should use the platform onnxruntime_onnx config.",
                  prov]
        files[f"{VERSION}/model.py"] = _shim("OnnxStandInModel", "stand-in for Triton's onnxruntime backend")
    else:
        onnx_cfg["platform"] = "onnxruntime_onnx"
        header = [f"ONNX model {prov}: dynamic batch" + ("" if spec.static_shape else " / height / width")]
        if tensorrt:
            cache = trt_cache or f"/tmp/ifseg_trt_cache/{name}"
            onnx_cfg["optimization"] = {"execution_accelerators": {"gpu_execution_accelerator": [{
                "name": "tensorrt", "parameters": {
                    "precision_mode": precision.upper(), "max_workspace_size_bytes": str(TRT_WORKSPACE),
                    "trt_engine_cache_enable": "1", "trt_engine_cache_path": cache}}]}}
            header.append(f"TensorRT accelerator ({precision}, engines cached in {cache}): UNVERIFIED, see README")
    _write(out / names["onnx"], build_config(onnx_cfg), header, files)
    for f in onnx_files:
        shutil.copyfile(spec.path(f), out / names["onnx"] / VERSION / Path(f).name)

    # pre: image (BYTES) -> pixels, original_size, input_size, grid
    pre_cfg = build_config({
        "name": names["pre"], "backend": "python", "max_batch_size": max_batch_size,
        "input": [_image_input()],
        "output": [{"name": PIXELS, "data_type": "TYPE_FP32", "dims": [3, *hw]},
                   *({"name": n, "data_type": "TYPE_INT32", "dims": [2]} for n in P.SIZE_OUTPUTS)],
        "instance_group": [{"count": instances, "kind": "KIND_CPU"}],
        "dynamic_batching": batching,
        "model_warmup": [{"name": "encoded_png", "batch_size": 1, "inputs": {P.INPUT: {
            "data_type": "TYPE_STRING", "dims": [1], "input_data_file": WARMUP_IMAGE}}}],
        "parameters": _params({P.PARAM_MANIFEST: MANIFEST, P.PARAM_MAX_BYTES: max_request_bytes,
                               P.PARAM_MAX_PIXELS: max_pixels})})
    _write(out / names["pre"], pre_cfg, [f"decode + image policy + normalise, {prov}"],
           {f"{VERSION}/model.py": _shim("PreprocessModel", "ifseg_rt preprocessing"),
            f"{VERSION}/{MANIFEST}": manifest, f"warmup/{WARMUP_IMAGE}": _warmup_image()})

    # post: logits, features, original_size, grid -> labels, probabilities
    post_cfg = build_config({
        "name": names["post"], "backend": "python", "max_batch_size": max_batch_size,
        "input": [{"name": OUTPUT_NAMES[0], "data_type": "TYPE_FP32", "dims": [-1, m]},
                  {"name": OUTPUT_NAMES[1], "data_type": "TYPE_FP32", "dims": [-1, c]},
                  {"name": P.ORIGINAL_SIZE, "data_type": "TYPE_INT32", "dims": [2]},
                  {"name": P.GRID, "data_type": "TYPE_INT32", "dims": [2]}],
        "output": _contract_outputs()[:2],  # labels, probabilities
        "instance_group": [{"count": instances, "kind": "KIND_CPU"}],
        "dynamic_batching": _batching(max_queue_size, 0),
        "parameters": _params({P.PARAM_MANIFEST: MANIFEST, P.PARAM_KNN_BACKEND: "auto"})})
    _write(out / names["post"], post_cfg, [f"kNN + resize/arg-max (ifseg_rt.runtime.postprocess), {prov}"],
           {f"{VERSION}/model.py": _shim("PostprocessModel", "ifseg_rt post-processing"),
            f"{VERSION}/{MANIFEST}": manifest})

    # the ensemble: the serving contract
    ens_cfg = build_config({
        "name": names["ensemble"], "platform": "ensemble", "max_batch_size": max_batch_size,
        "input": [_image_input()], "output": _contract_outputs(LABELS_FILE),
        "ensemble_scheduling": {"step": [
            {"model_name": names["pre"], "model_version": -1, "input_map": {P.INPUT: P.INPUT},
             "output_map": {PIXELS: "_pixels", **{n: n for n in P.SIZE_OUTPUTS}}},
            {"model_name": names["onnx"], "model_version": -1, "input_map": {INPUT_NAME: "_pixels"},
             "output_map": {OUTPUT_NAMES[0]: "_logits", OUTPUT_NAMES[1]: "_features"}},
            {"model_name": names["post"], "model_version": -1,
             "input_map": {OUTPUT_NAMES[0]: "_logits", OUTPUT_NAMES[1]: "_features",
                           P.ORIGINAL_SIZE: P.ORIGINAL_SIZE, P.GRID: P.GRID},
             "output_map": {P.LABELS: P.LABELS, P.PROBABILITIES: P.PROBABILITIES}}]},
        "parameters": _categories_param(spec)})
    _write(out / names["ensemble"], ens_cfg, [f"ifseg_rt serving contract (ensemble pre -> onnx -> post), {prov}"],
           {LABELS_FILE: "\n".join(spec.categories) + "\n"})
    check_repository(out)
    return out


# --- validation --------------------------------------------------------------------------------------------------
def validate_repository(repo: Union[str, Path]) -> List[str]:
    """Problems of a model repository, as messages naming the file (empty: valid). Every ``config.pbtxt`` is
    parsed with Triton's schema; then what the schema cannot say: the name matches the directory, a version
    directory exists, python models have ``model.py``, ONNX models their file, shapes and batch sizes agree,
    warm-up inputs exist, and every ensemble step's inputs are produced before it and map onto the step model."""
    root = Path(repo)
    if not root.is_dir():
        return [f"model repository not found: {root}"]
    errors: List[str] = []
    configs = {}
    for p in sorted(root.glob(f"*/{CONFIG}")):
        try:
            configs[p.parent.name] = parse_config(p.read_text(encoding="utf-8"), str(p))
        except RepositoryError as e:
            errors.append(str(e))
    if not configs and not errors:
        errors.append(f"{root}: no */{CONFIG} found")
    mc, _, _ = _schema()
    for dirname, cfg in configs.items():
        where = root / dirname / CONFIG
        kind = cfg.platform or cfg.backend
        if cfg.name and cfg.name != dirname:
            errors.append(f"{where}: name {cfg.name!r} differs from its directory {dirname!r}")
        if not kind:
            errors.append(f"{where}: sets neither platform nor backend")
        versions = [v for v in (root / dirname).iterdir() if v.is_dir() and v.name.isdigit()]
        if not versions:
            errors.append(f"{where.parent}: no numeric version directory (e.g. 1/)")
        for what, tensors in (("input", cfg.input), ("output", cfg.output)):
            names = [t.name for t in tensors]
            if len(set(names)) != len(names):
                errors.append(f"{where}: duplicate {what} names {names}")
            for t in tensors:
                if t.data_type == mc.TYPE_INVALID:
                    errors.append(f"{where}: {what} {t.name!r} has no data_type")
                if not t.dims or any(d < -1 or d == 0 for d in t.dims):
                    errors.append(f"{where}: {what} {t.name!r} has invalid dims {list(t.dims)}")
        if cfg.HasField("dynamic_batching") and cfg.max_batch_size < 1:
            errors.append(f"{where}: dynamic_batching needs max_batch_size >= 1")
        inputs = {t.name for t in cfg.input}
        for w in cfg.model_warmup:
            if cfg.max_batch_size and w.batch_size > cfg.max_batch_size:
                errors.append(f"{where}: warm-up {w.name!r} batch_size {w.batch_size} > max_batch_size")
            for key, inp in w.inputs.items():
                if key not in inputs:
                    errors.append(f"{where}: warm-up {w.name!r} feeds unknown input {key!r}")
                if inp.input_data_file and not (root / dirname / "warmup" / inp.input_data_file).is_file():
                    errors.append(f"{where}: warm-up file warmup/{inp.input_data_file} is missing")
        for v in versions:
            if kind == "python" and not (v / (cfg.default_model_filename or "model.py")).is_file():
                errors.append(f"{where.parent}: {v.name}/model.py is missing")
            if kind in ("onnxruntime_onnx", "onnxruntime") and not (v / (cfg.default_model_filename or
                                                                         "model.onnx")).is_file():
                errors.append(f"{where.parent}: {v.name}/model.onnx is missing")
        for t in cfg.output:
            if t.label_filename and not (root / dirname / t.label_filename).is_file():
                errors.append(f"{where}: label file {t.label_filename} of output {t.name!r} is missing")
        if kind == "ensemble":
            errors += _check_ensemble(where, cfg, configs)
    return errors


def _check_ensemble(where: Path, cfg, configs) -> List[str]:
    errors = []
    available = {t.name for t in cfg.input}
    shapes = {t.name: (t.data_type, list(t.dims)) for t in cfg.input}
    for i, step in enumerate(cfg.ensemble_scheduling.step):
        sub = configs.get(step.model_name)
        at = f"{where}: step {i} ({step.model_name})"
        if sub is None:
            errors.append(f"{at}: no such model in the repository")
            continue
        sub_in = {t.name: t for t in sub.input}
        sub_out = {t.name: t for t in sub.output}
        for key, tensor in step.input_map.items():
            if key not in sub_in:
                errors.append(f"{at}: {key!r} is not an input of the model")
            elif tensor not in available:
                errors.append(f"{at}: tensor {tensor!r} is not produced before this step")
            elif shapes[tensor][0] != sub_in[key].data_type:
                errors.append(f"{at}: tensor {tensor!r} has another data type than input {key!r}")
        missing = sorted(k for k, t in sub_in.items() if not t.optional and k not in step.input_map)
        if missing:
            errors.append(f"{at}: inputs {missing} are not mapped")
        for key, tensor in step.output_map.items():
            if key not in sub_out:
                errors.append(f"{at}: {key!r} is not an output of the model")
                continue
            available.add(tensor)
            shapes[tensor] = (sub_out[key].data_type, list(sub_out[key].dims))
        if sub.max_batch_size < cfg.max_batch_size:
            errors.append(f"{at}: max_batch_size {sub.max_batch_size} < the ensemble's {cfg.max_batch_size}")
    for t in cfg.output:
        if t.name not in available:
            errors.append(f"{where}: ensemble output {t.name!r} is never produced")
        elif shapes[t.name][0] != t.data_type:
            errors.append(f"{where}: ensemble output {t.name!r} has another data type than the step producing it")
    return errors


def check_repository(repo: Union[str, Path]) -> None:
    """Raise :class:`RepositoryError` listing every problem :func:`validate_repository` finds."""
    problems = validate_repository(repo)
    if problems:
        raise RepositoryError(f"model repository {repo} is invalid:\n  " + "\n  ".join(problems))
