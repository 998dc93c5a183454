"""The torch-free runtime: model directories, preprocessing, engines (onnxruntime / TensorRT / torch) and
:class:`Segmenter`. torch is imported only by the torch backend and the CUDA post-processing."""

from .model_dir import ModelDirError, ModelSpec, load_model_dir
from .preprocess import ImagePolicy, load_image
from .segmenter import ImageError, SegmentationResult, Segmenter

__all__ = ["Segmenter", "SegmentationResult", "ImageError", "ModelDirError", "ModelSpec", "load_model_dir",
           "ImagePolicy", "load_image"]
