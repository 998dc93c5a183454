"""ifseg_rt: a deployment runtime for IFSeg (image-free semantic segmentation on OFA).

Importing the package is cheap and torch-free; the torch-backed parts (``ifseg_rt.model``,
``ifseg_rt.checkpoint``, ``ifseg_rt.adapt``, ``ifseg_rt.export``) are imported on first use.
"""

from importlib import import_module as _import_module

__version__ = "0.1.0"

# public name -> module that defines it (resolved lazily so that `import ifseg_rt` never pulls in torch)
_LAZY = {
    "Segmenter": "ifseg_rt.runtime",
    "knn_average": "ifseg_rt.knn",
    "build_model": "ifseg_rt.model",
    "OFAConfig": "ifseg_rt.model",
    "load_checkpoint": "ifseg_rt.checkpoint",
    "save_checkpoint": "ifseg_rt.checkpoint",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(_import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ifseg_rt' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
