"""Low-precision variants of an exported model directory, each behind an accuracy gate.

=========  =====================  ==========================================================================
precision  engine                 what runs in low precision
=========  =====================  ==========================================================================
``fp32``   onnxruntime (split)    nothing: the reference
``int8``   onnxruntime (split)    the weights of every MatMul with a constant weight (all linear layers of the
                                  transformer) as int8, per output channel, activations quantised per call
                                  (``DynamicQuantizeMatMul``: VNNI/AMX int8 GEMMs); LayerNorm, softmax, GELU,
                                  attention scores, the ResNet and the position tables stay fp32
``bf16``   torch                  the weights and matmuls in bfloat16 (AMX / AVX512-BF16 where the CPU has them);
                                  LayerNorm, GELU and softmax in fp32 inside the model's modules
=========  =====================  ==========================================================================

The gate: the exporter segments calibration images with the fp32 graph and with the new variant through
:class:`~ifseg_rt.runtime.Segmenter` (the whole pipeline, kNN included) and records the fraction of pixels whose
label agrees; a variant below ``min_agreement`` is removed again and the export fails with the measured number.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from ..runtime.model_dir import BODY_FILE, WEIGHTS_FILE, ModelSpec, parse_manifest
from ..runtime.preprocess import IMAGE_EXTENSIONS, load_image

MIN_AGREEMENT = 0.99  # default gate: fraction of pixels whose label equals fp32's
CALIBRATION_IMAGES = 8  # synthetic scenes when no calibration folder is given
CALIBRATION_SIZE = (384, 512)  # px, H x W of the synthetic scenes (a 3:4 photo; the policy then resizes it)
INT8_BODY = "body.int8.onnx"
METHODS = {
    "int8": "onnxruntime dynamic int8: MatMul weights int8 per output channel, activations quantised per call; "
            "LayerNorm, softmax, GELU, attention scores, the ResNet and the position tables in fp32",
    "bf16": "torch bfloat16 weights and matmuls; LayerNorm, GELU and softmax in fp32",
}


class PrecisionGateError(ValueError):
    """A low-precision variant whose labels agree with fp32's on fewer pixels than the gate allows."""


def quantize_int8(body: Union[str, Path], out: Union[str, Path]) -> None:
    """Dynamic int8 quantisation of the split graph's body (see the module table)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # the quantiser logs a pre-processing hint at WARNING
    try:
        quantize_dynamic(str(body), str(out), op_types_to_quantize=["MatMul"], per_channel=True,
                         weight_type=QuantType.QInt8)
    finally:
        logging.getLogger().setLevel(level)


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


def label_agreement(model_dir: Union[str, Path, ModelSpec], precision: str, images: Sequence[np.ndarray], *,
                    threads: Optional[int] = None) -> Dict[str, Any]:
    """Fraction of pixels whose label under ``precision`` equals fp32's, over ``images`` (full pipeline; the model
    directory or its parsed spec)."""
    from ..runtime import Segmenter

    opts = {"threads": threads} if threads else {}
    ref = Segmenter.load(model_dir, precision="fp32", **opts)
    low = Segmenter.load(model_dir, precision=precision, **opts)
    same = total = 0
    worst = 1.0
    for im in images:
        a, b = ref.seg(im).labels, low.seg(im).labels
        eq = int((a == b).sum())
        same, total = same + eq, total + a.size
        worst = min(worst, eq / a.size)
    return {"pixels": same / total, "worst_image": worst, "images": len(images), "reference": "fp32",
            "backend": low.backend.name}


def add_precisions(out: Path, manifest: Dict[str, Any], precisions: Sequence[str], *, calibration=None,
                   min_agreement: float = MIN_AGREEMENT) -> Dict[str, Any]:
    """Build every requested low-precision variant in ``out``, measure its agreement with fp32 through the runtime
    (the directory as ``manifest`` describes it; nothing is written but the variants' files), record it in
    ``manifest`` and enforce the gate: a variant below it is removed again (files and record) and
    :class:`PrecisionGateError` raised, ``manifest`` still describing a valid directory. Returns the recorded
    ``precisions``; the caller writes ``ifseg.json``."""
    from ..files import file_record

    images = None
    recs: Dict[str, Any] = {}
    for p in precisions:
        if p == "fp32":
            continue
        if p == "int8":
            if manifest.get("onnx", {}).get("body") is None:
                raise ValueError("--precision int8 needs the split graph (not available with --static-shape)")
            quantize_int8(out / BODY_FILE, out / INT8_BODY)
            manifest["files"][INT8_BODY] = file_record(out / INT8_BODY)
            rec = {"backend": "onnxruntime", "body": INT8_BODY, "method": METHODS["int8"]}
        elif p == "bf16":
            if WEIGHTS_FILE not in manifest["files"]:
                raise ValueError("--precision bf16 runs on the torch backend and needs model.safetensors "
                                 "(do not pass --no-weights)")
            rec = {"backend": "torch", "method": METHODS["bf16"]}
        else:
            raise ValueError(f"unknown CPU precision {p!r}; choose from fp32, int8, bf16")
        manifest.setdefault("precisions", {})[p] = rec
        if images is None:
            images = calibration_images(calibration)
        rec["agreement"] = label_agreement(parse_manifest(manifest, out), p, images)
        rec["agreement"]["calibration"] = str(calibration) if isinstance(calibration, (str, Path)) else \
            ("synthetic scenes" if calibration is None else "given images")
        if rec["agreement"]["pixels"] < min_agreement:
            del manifest["precisions"][p]
            if rec.get("body"):
                manifest["files"].pop(rec["body"], None)
                (out / rec["body"]).unlink(missing_ok=True)
            raise PrecisionGateError(
                f"{p}: labels agree with fp32 on {100 * rec['agreement']['pixels']:.2f} % of the pixels of "
                f"{len(images)} calibration images, below the gate of {100 * min_agreement:.2f} %; the {p} variant "
                f"was not kept (lower --min-agreement to accept it, or calibrate with --calibration DIR)")
        recs[p] = rec
    return recs
