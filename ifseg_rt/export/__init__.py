"""Export an adapted IFSeg model to a self-describing model directory (ONNX, optional TensorRT engines).

``python -m ifseg_rt.export SOURCE --out DIR`` or :func:`export`; see :mod:`ifseg_rt.export.exporter` for the
formats table. Needs torch (and onnx/onnxruntime/onnxscript); the runtime that reads the result does not.
"""

from .exporter import ZeroShotWarning, export, export_formats, export_onnx, load_source, resolve_format
from .onnx_model import IFSegOnnxModel

__all__ = ["export", "export_formats", "export_onnx", "load_source", "resolve_format", "IFSegOnnxModel",
           "ZeroShotWarning"]
