"""The one loader of the compiled extension ``ifseg_rt._C`` (C++ kernels, and CUDA launchers when it was built with
CUDA; ``csrc/``). A leaf module: callers ask for the symbols they need and fall back when it returns None."""

from __future__ import annotations

from typing import Any, Optional


def _load() -> Optional[Any]:
    try:
        from . import _C
    except ImportError:  # not built (a source tree without the CMake step, or a pure-Python install)
        return None
    return _C


def extension(*symbols: str, cuda: bool = False) -> Optional[Any]:
    """``ifseg_rt._C`` when it is built and has every one of ``symbols`` (and was built with CUDA, when ``cuda``),
    else None."""
    ext = _load()
    if ext is None or not all(hasattr(ext, s) for s in symbols):
        return None
    if cuda and not getattr(ext, "with_cuda", False):
        return None
    return ext


__all__ = ["extension"]
