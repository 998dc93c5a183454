"""Low-precision variants of an exported model directory, each behind an accuracy gate.

=========  =====================  ==========================================================================
precision  engine                 what runs in low precision
=========  =====================  ==========================================================================
``fp32``   onnxruntime (split)    nothing: the reference
``int8``   onnxruntime (split)    the weights of every MatMul with a constant weight (all linear layers of the
                                  transformer) as int8, per output channel, activations quantised per call
                                  (``DynamicQuantizeMatMul``: VNNI/AMX int8 GEMMs); the ResNet's convolutions,
                                  residual adds and pooling statically (QDQ: per-channel int8 weights with the
                                  batch norms folded in, activation ranges from the calibration images);
                                  LayerNorm, softmax, GELU, attention scores and the position tables stay fp32
``bf16``   OpenVINO (split)       the fp32 body compiled with bfloat16 inference precision: matmuls and
                                  convolutions in bf16 (AMX / AVX512-BF16), accumulating in fp32; no extra file
``bf16``   torch                  (``--bf16-backend torch``, or without OpenVINO) the weights and matmuls in
                                  bfloat16; LayerNorm, GELU and softmax in fp32 inside the model's modules
=========  =====================  ==========================================================================

The gate: the exporter segments calibration images with the fp32 graph and with the new variant through
:class:`~ifseg_rt.runtime.Segmenter` (the whole pipeline, kNN included) and records the fraction of pixels whose
label agrees; a variant below ``min_agreement`` is removed again and the export fails with the measured number.

Accuracy-aware int8: the first candidate has the ResNet in int8 too; when it misses the gate the ResNet goes back to
fp32, and when quantising every MatMul still misses it, the MatMuls are ranked by their sensitivity —
the relative output error of that one MatMul under dynamic int8 (per-tensor uint8 activations, per-channel int8
weights, as onnxruntime computes it), measured on the calibration images' own activations in the fp32 graph — and
the most sensitive stay fp32 (1, 2, 4, ... of them) until the gate passes or too few are left in int8 to be worth
it. ``ifseg.json`` records the ResNet's precision, which MatMuls run in fp32 and the agreement of every step tried.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..geometry import token_grid
from ..runtime.backends import BF16_BACKENDS, installed
from ..runtime.model_dir import (BODY_FILE, GRID_NAME, INPUT_NAME, TABLE_NAMES, WEIGHTS_FILE, ModelSpec,
                                 parse_manifest)
from ..runtime.preprocess import IMAGE_EXTENSIONS, load_image, network_input

MIN_AGREEMENT = 0.99  # default gate: fraction of pixels whose label equals fp32's
CALIBRATION_IMAGES = 8  # synthetic scenes when no calibration folder is given
CALIBRATION_SIZE = (384, 512)  # px, H x W of the synthetic scenes (a 3:4 photo; the policy then resizes it)
INT8_BODY = "body.int8.onnx"
RESNET_SCOPE = "/embed_images/"  # ONNX node-name prefix of the ResNet (the model's ``embed_images`` module)
RESNET_OPS = ("Conv", "Add", "Relu", "MaxPool")  # what the static int8 ResNet quantises
EXTERNAL_BYTES = 1536 * 1024 * 1024  # intermediate graphs above this keep their weights in a .data file (2 GB limit)
METHODS = {  # (precision, engine) -> how the variant computes (recorded in ifseg.json)
    ("int8", "onnxruntime"): "onnxruntime int8: MatMul weights int8 per output channel with activations quantised "
                             "per call; the ResNet (if recorded as int8) static QDQ with per-channel weights and "
                             "calibrated activation ranges; LayerNorm, softmax, GELU, attention scores and the "
                             "position tables in fp32",
    ("bf16", "openvino"): "OpenVINO CPU plugin, inference precision bfloat16: the fp32 split graph (body.onnx) with "
                          "matmuls and convolutions in bfloat16 accumulating in fp32 (AMX / AVX512-BF16); the "
                          "position tables in fp32",
    ("bf16", "torch"): "torch bfloat16 weights and matmuls; LayerNorm, GELU and softmax in fp32",
}
BF16_ENGINES = ("auto", *BF16_BACKENDS)  # --bf16-backend: auto = OpenVINO when installed (and a split graph)


class PrecisionGateError(ValueError):
    """A low-precision variant whose labels agree with fp32's on fewer pixels than the gate allows."""


@contextlib.contextmanager
def _quiet_quantiser():
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # the quantiser logs a pre-processing hint at WARNING
    try:
        yield
    finally:
        logging.getLogger().setLevel(level)


def quantize_int8(body: Union[str, Path], out: Union[str, Path], exclude: Sequence[str] = ()) -> None:
    """Dynamic int8 quantisation of the split graph's body (see the module table); the MatMul nodes named in
    ``exclude`` stay fp32."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet_quantiser():
        quantize_dynamic(str(body), str(out), op_types_to_quantize=["MatMul"], per_channel=True,
                         weight_type=QuantType.QInt8, nodes_to_exclude=list(exclude))


def external_data(path: Path) -> List[Path]:
    """The files of an ONNX graph: ``path`` and, when it keeps its weights outside, their data files."""
    import onnx

    files = [Path(path)]
    for t in onnx.load(str(path), load_external_data=False).graph.initializer:
        for entry in t.external_data:
            if entry.key == "location" and Path(path).with_name(entry.value) not in files:
                files.append(Path(path).with_name(entry.value))
    return files


def quantize_resnet(body: Union[str, Path], out: Union[str, Path], feeds: Sequence[Dict[str, np.ndarray]], *,
                    external: Optional[bool] = None) -> int:
    """Static int8 ResNet: onnxruntime's basic graph optimisations first (the frozen batch norms, exported as Mul +
    Add, fold into the convolutions' weights), then QDQ quantisation of the ResNet's convolutions, residual adds,
    ReLUs and pooling (nodes under :data:`RESNET_SCOPE`): weights int8 per output channel, activations uint8 with
    MinMax ranges over ``feeds`` (inputs of the body graph, one per calibration image). The rest of the graph is
    unchanged (fp32). Returns the number of nodes quantised; ``out`` is written even when it is 0.

    ``external``: the intermediate graphs keep their weights in ``.data`` files beside them (default: when the body
    is larger than :data:`EXTERNAL_BYTES`, as OFA-Huge's is: a protobuf holds at most 2 GB); ``out`` then has one too
    (:func:`external_data` lists the files to remove)."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    out = Path(out)
    folded = out.with_name(out.name + ".folded")
    if external is None:
        external = sum(f.stat().st_size for f in external_data(Path(body))) > EXTERNAL_BYTES
    try:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # standard ONNX ops only
        so.optimized_model_filepath = str(folded)
        if external:
            so.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                        folded.name + ".data")
            so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        ort.InferenceSession(str(body), so, providers=["CPUExecutionProvider"])
        graph = onnx.load(str(folded), load_external_data=False).graph
        nodes = [n.name for n in graph.node if n.name.startswith(RESNET_SCOPE) and n.op_type in RESNET_OPS]

        class Reader(CalibrationDataReader):
            def __init__(self):
                self._feeds = iter(feeds)

            def get_next(self):
                return next(self._feeds, None)

        # The calibrator measures every tensor of RESNET_OPS' kinds (as ReduceMin / ReduceMax outputs: scalars),
        # also the transformer's Adds, whose attention masks reach -inf: numpy's warnings there concern tensors that
        # are not quantised.
        with _quiet_quantiser(), np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            quantize_static(str(folded), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            op_types_to_quantize=list(RESNET_OPS), nodes_to_quantize=nodes,
                            use_external_data_format=external, extra_options={"MinimumRealRange": 1e-4})
        return len(nodes)
    finally:
        for f in external_data(folded) if folded.exists() else []:
            f.unlink(missing_ok=True)


def _weight_matmuls(model) -> Dict[str, Any]:
    """``{node name: (activation input name, weight array)}`` of the MatMuls with a constant 2-D weight."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and len(node.input) == 2 and node.input[1] in inits:
            w = numpy_helper.to_array(inits[node.input[1]])
            if w.ndim == 2:
                out[node.name] = (node.input[0], w)
    return out


def int8_matmul_error(x: np.ndarray, w: np.ndarray) -> float:
    """Relative error ``||XW - Q(X)Q(W)|| / ||XW||`` of one MatMul under onnxruntime's dynamic int8 scheme:
    activations uint8 asymmetric per tensor, weights int8 symmetric per output channel (float64 arithmetic)."""
    x = np.asarray(x, np.float64).reshape(-1, w.shape[0])
    w = np.asarray(w, np.float64)
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    sx = (hi - lo) / 255.0 or 1.0
    zp = np.round(-lo / sx)
    xq = (np.clip(np.round(x / sx) + zp, 0, 255) - zp) * sx
    sw = np.abs(w).max(axis=0) / 127.0
    sw[sw == 0] = 1.0
    wq = np.clip(np.round(w / sw), -127, 127) * sw
    y = x @ w
    return float(np.linalg.norm(y - xq @ wq) / max(np.linalg.norm(y), 1e-30))


def matmul_sensitivity(body: Union[str, Path], inputs: Sequence[Dict[str, np.ndarray]]) -> List[Tuple[str, float]]:
    """The body graph's weight MatMuls ranked by :func:`int8_matmul_error` on the activations of ``inputs`` (feeds
    of the fp32 body, one per calibration image; errors averaged), most sensitive first."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(body))
    mats = _weight_matmuls(model)
    acts = sorted({a for a, _ in mats.values()})
    known = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.ValueInfoProto(name=a) for a in acts if a not in known)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    totals = {n: 0.0 for n in mats}
    for feed in inputs:
        values = dict(zip(names, sess.run(None, feed)))
        for n, (a, w) in mats.items():
            totals[n] += int8_matmul_error(values[a], w) / len(inputs)
    return sorted(totals.items(), key=lambda kv: -kv[1])


def calibration_images(source: Union[None, str, Path, Sequence[np.ndarray]] = None,
                       n: int = CALIBRATION_IMAGES) -> List[np.ndarray]:
    """Up to ``n`` HxWx3 uint8 images: from a folder (sorted by name), a list of arrays, or (default) scenes of the
    synthetic world, which any model can segment (real images of the target domain are better)."""
    if source is None:
        from ..world import render_scene

        return [render_scene(10 ** 6 + i, CALIBRATION_SIZE).image for i in range(n)]
    if isinstance(source, (str, Path)):
        folder = Path(source)
        if not folder.is_dir():
            raise FileNotFoundError(f"calibration folder not found: {folder}")
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)[:n]
        if not files:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in the calibration folder {folder}")
        return [load_image(p) for p in files]
    return [np.asarray(im) for im in list(source)[:n]]


def reference_labels(model_dir: Union[str, Path, ModelSpec], images: Sequence[np.ndarray], *,
                     threads: Optional[int] = None) -> List[np.ndarray]:
    """The fp32 pipeline's label maps of ``images`` (what every variant is compared with)."""
    from ..runtime import Segmenter

    ref = Segmenter.load(model_dir, precision="fp32", **({"threads": threads} if threads else {}))
    return [ref.seg(im).labels for im in images]


def label_agreement(model_dir: Union[str, Path, ModelSpec], precision: str, images: Sequence[np.ndarray], *,
                    threads: Optional[int] = None, reference: Optional[Sequence[np.ndarray]] = None
                    ) -> Dict[str, Any]:
    """Fraction of pixels whose label under ``precision`` equals fp32's, over ``images`` (full pipeline; the model
    directory or its parsed spec; ``reference``: the fp32 labels when already computed)."""
    from ..runtime import Segmenter

    opts = {"threads": threads} if threads else {}
    if reference is None:
        reference = reference_labels(model_dir, images, threads=threads)
    low = Segmenter.load(model_dir, precision=precision, **opts)
    same = total = 0
    worst = 1.0
    for im, a in zip(images, reference):
        b = low.seg(im).labels
        eq = int((a == b).sum())
        same, total = same + eq, total + a.size
        worst = min(worst, eq / a.size)
    return {"pixels": same / total, "worst_image": worst, "images": len(images), "reference": "fp32",
            "backend": low.backend.name}


MAX_FP32_FRACTION = 0.5  # the int8 search keeps at most this fraction of the MatMuls in fp32 (else: no speed left)


def body_feeds(out: Path, manifest: Dict[str, Any], images: Sequence[np.ndarray]) -> List[Dict[str, np.ndarray]]:
    """The fp32 body graph's inputs for ``images``: the network input under the model's policy and the position
    tables of its grid (from the directory's ``tables.onnx``)."""
    import onnxruntime as ort

    spec = parse_manifest(manifest, out)
    tables = ort.InferenceSession(str(out / spec.tables_file), providers=["CPUExecutionProvider"])
    feeds = []
    for im in images:
        x = network_input(im, spec.policy)
        grid = np.zeros(token_grid(x.shape[1], x.shape[2]), np.float32)
        feeds.append({INPUT_NAME: x[None], **dict(zip(TABLE_NAMES, tables.run(list(TABLE_NAMES), {GRID_NAME: grid})))})
    return feeds


def int8_search(out: Path, manifest: Dict[str, Any], images: Sequence[np.ndarray], reference: Sequence[np.ndarray],
                min_agreement: float) -> Dict[str, Any]:
    """Write ``body.int8.onnx``: every MatMul and the ResNet (:func:`quantize_resnet`) in int8 if that passes the
    gate; else the ResNet in fp32 with every MatMul in int8; else the most sensitive MatMuls
    (:func:`matmul_sensitivity`) kept fp32, 1, 2, 4, ... of them, until it passes (or :data:`MAX_FP32_FRACTION` is
    reached). Returns the record fields: ``agreement`` (of the kept variant), ``resnet`` (``int8`` / ``fp32``),
    ``fp32_matmuls`` (node names), ``int8_matmuls`` (how many), ``search`` (every step tried) and the ten most
    ``sensitive`` MatMuls."""
    import onnx

    from ..files import file_record

    trials: List[Dict[str, Any]] = []
    # the fp32 graph's inputs (the manifest without its precisions: the int8 record names a file not yet written)
    feeds = body_feeds(out, {k: v for k, v in manifest.items() if k != "precisions"}, images)
    static = out / (INT8_BODY + ".resnet")

    def trial(base: Path, exclude: List[str]) -> Dict[str, Any]:
        quantize_int8(base, out / INT8_BODY, exclude)
        manifest["files"][INT8_BODY] = file_record(out / INT8_BODY)
        a = label_agreement(parse_manifest(manifest, out), "int8", images, reference=reference)
        trials.append({"resnet": "int8" if base == static else "fp32", "fp32_matmuls": len(exclude),
                       "pixels": a["pixels"]})
        return a

    resnet, exclude, ranked = "fp32", [], []
    try:
        if quantize_resnet(out / BODY_FILE, static, feeds):
            resnet, agreement = "int8", trial(static, [])
    finally:
        for f in external_data(static) if static.exists() else []:
            f.unlink(missing_ok=True)
    if resnet == "fp32" or agreement["pixels"] < min_agreement:
        resnet, agreement = "fp32", trial(out / BODY_FILE, [])
    if agreement["pixels"] < min_agreement:
        ranked = matmul_sensitivity(out / BODY_FILE, feeds)
        cap = int(MAX_FP32_FRACTION * len(ranked))
        steps = sorted({min(2 ** i, cap) for i in range(cap.bit_length() + 1)} - {0})
        for k in steps:  # 1, 2, 4, ..., then the cap itself
            exclude = [name for name, _ in ranked[:k]]
            agreement = trial(out / BODY_FILE, exclude)
            if agreement["pixels"] >= min_agreement:
                break
    total = len(_weight_matmuls(onnx.load(str(out / BODY_FILE))))
    return {"agreement": agreement, "resnet": resnet, "fp32_matmuls": exclude, "int8_matmuls": total - len(exclude),
            "search": trials, "sensitive": [[name, round(err, 6)] for name, err in ranked[:10]]}


def bf16_engine(choice: str, split: bool) -> str:
    """The engine of the bf16 variant: ``openvino`` (the split graph compiled in bfloat16; faster) or ``torch`` (the
    weights); ``auto``: OpenVINO when it is installed and the directory has the split graph."""
    if choice not in BF16_ENGINES:
        raise ValueError(f"the bf16 backend must be one of {BF16_ENGINES}, got {choice!r}")
    if choice == "auto":
        return "openvino" if split and installed("openvino") else "torch"
    if choice == "openvino" and not split:
        raise ValueError("--bf16-backend openvino runs the split graph (not available with --static-shape or "
                         "--no-split)")
    return choice


def add_precisions(out: Path, manifest: Dict[str, Any], precisions: Sequence[str], *, calibration=None,
                   min_agreement: float = MIN_AGREEMENT, bf16_backend: str = "auto") -> Dict[str, Any]:
    """Build every requested low-precision variant in ``out``, measure its agreement with fp32 through the runtime
    (the directory as ``manifest`` describes it; nothing is written but the variants' files), record it in
    ``manifest`` and enforce the gate: a variant below it is removed again (files and record) and
    :class:`PrecisionGateError` raised, ``manifest`` still describing a valid directory. Returns the recorded
    ``precisions``; the caller writes ``ifseg.json``."""

    images = None
    recs: Dict[str, Any] = {}
    for p in precisions:
        if p == "fp32":
            continue
        if p == "int8":
            if manifest.get("onnx", {}).get("body") is None:
                raise ValueError("--precision int8 needs the split graph (not available with --static-shape)")
            rec = {"backend": "onnxruntime", "body": INT8_BODY, "method": METHODS["int8", "onnxruntime"]}
        elif p == "bf16":
            engine = bf16_engine(bf16_backend, manifest.get("onnx", {}).get("body") is not None)
            if engine == "torch" and WEIGHTS_FILE not in manifest["files"]:
                raise ValueError("--precision bf16 on the torch backend needs model.safetensors (do not pass "
                                 "--no-weights), or install openvino")
            rec = {"backend": engine, "method": METHODS["bf16", engine]}
            if engine == "openvino":
                rec["body"] = BODY_FILE
        else:
            raise ValueError(f"unknown CPU precision {p!r}; choose from fp32, int8, bf16")
        if images is None:  # the fp32 labels once, before the manifest names a variant file not yet written
            images = calibration_images(calibration)
            reference = reference_labels(parse_manifest(manifest, out), images)
            if calibration is None or len(images) < CALIBRATION_IMAGES:
                what = "synthetic scenes of the nano world" if calibration is None else f"only {len(images)} images"
                warnings.warn(f"the {'/'.join(q for q in precisions if q != 'fp32')} accuracy gate is measured on "
                              f"{what}; it says little about your photos: pass --calibration DIR with at least "
                              f"{CALIBRATION_IMAGES} images of your domain", UserWarning, stacklevel=2)
        manifest.setdefault("precisions", {})[p] = rec
        if p == "int8":
            rec.update(int8_search(out, manifest, images, reference, min_agreement))
        else:
            rec["agreement"] = label_agreement(parse_manifest(manifest, out), p, images, reference=reference)
        rec["agreement"]["calibration"] = str(calibration) if isinstance(calibration, (str, Path)) else \
            ("synthetic scenes" if calibration is None else "given images")
        if rec["agreement"]["pixels"] < min_agreement:
            del manifest["precisions"][p]
            if rec.get("body"):
                manifest["files"].pop(rec["body"], None)
                (out / rec["body"]).unlink(missing_ok=True)
            tried = "" if not rec.get("search") or len(rec["search"]) < 2 else " (tried: " + ", ".join(
                f"ResNet {t['resnet']}, {t['fp32_matmuls']} MatMuls in fp32: {100 * t['pixels']:.2f} %"
                for t in rec["search"]) + ")"
            raise PrecisionGateError(
                f"{p}: labels agree with fp32 on {100 * rec['agreement']['pixels']:.2f} % of the pixels of "
                f"{len(images)} calibration images, below the gate of {100 * min_agreement:.2f} %{tried}; the {p} "
                f"variant was not kept (lower --min-agreement to accept it, or calibrate with --calibration DIR)")
        recs[p] = rec
    return recs
