"""Inference engines behind :class:`~ifseg_rt.runtime.Segmenter`: one class per engine, same small interface.

``backend.run(x)`` takes a ``Bx3xHxW`` float32 numpy batch and returns ``(logits BxNxM, features BxNxC)`` where the
engine put them: numpy arrays for CPU engines, torch CUDA tensors for GPU engines (kNN and the resize then run on
the GPU too). Every backend imports its engine library lazily, so this package imports without torch.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from ..model_dir import WEIGHTS_FILE

BACKENDS = ("auto", "onnxruntime", "openvino", "torch", "tensorrt")
DEVICES = ("cpu", "cuda")
BF16_BACKENDS = ("openvino", "torch")  # CPU engines that run any model directory in bfloat16 on request


class BackendUnavailable(RuntimeError):
    """The requested backend (or device) cannot run here; the message says what to install."""


def installed(mod: str) -> bool:
    """Whether the module can be imported here (without importing it)."""
    try:
        return importlib.util.find_spec(mod) is not None
    except (ImportError, ValueError):
        return False


def _ort_cuda() -> bool:
    if not installed("onnxruntime"):
        return False
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


# where Linux shows an NVIDIA GPU driver: the desktop/server driver, WSL 2's GPU paravirtualisation, Jetson's nvgpu
GPU_DRIVER_PATHS = ("/proc/driver/nvidia/version", "/dev/dxg", "/sys/module/nvgpu", "/dev/nvhost-ctrl-gpu")


def _no_nvidia_driver() -> bool:
    """True on Linux when no NVIDIA GPU driver is present (then no CUDA device can exist); False where unsure."""
    import os
    import sys

    return sys.platform.startswith("linux") and not any(os.path.exists(p) for p in GPU_DRIVER_PATHS)


def resolve_device(device: str) -> str:
    """``"auto"`` -> ``"cuda"`` when torch is installed and sees a GPU, else ``"cpu"``; other values are checked and
    returned as given (``"cpu"``, ``"cuda"``, ``"cuda:N"``).

    Raises ``ValueError`` for other values and :class:`BackendUnavailable` for a CUDA device on a Linux machine
    without an NVIDIA GPU driver (before any engine, or a server's worker processes, try it)."""
    device = str(device)
    if device == "auto":
        if _no_nvidia_driver():  # cheap: spares a CPU-only run the ~1 s import of torch
            return "cpu"
        if installed("torch"):
            import torch

            if torch.cuda.is_available():
                return "cuda"
        return "cpu"
    if device not in DEVICES and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if device != "cpu" and _no_nvidia_driver():
        raise BackendUnavailable(f"device {device!r}, but this machine has no NVIDIA GPU driver (none of "
                                 f"{', '.join(GPU_DRIVER_PATHS)} exists): use device 'cpu' or 'auto'")
    return device


def resolve_backend(name: str, device: str, spec) -> str:
    """``auto`` -> TensorRT (engine for this GPU), then onnxruntime (CUDA provider / CPU), then torch. (OpenVINO runs
    a directory's bf16 precision; ``Segmenter.load`` picks it from the precision's record.)"""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    device = resolve_device(device)
    if name != "auto":
        return name
    if str(device).startswith("cuda"):
        if spec.engines and installed("tensorrt"):
            return "tensorrt"
        if spec.onnx_file and _ort_cuda():
            return "onnxruntime"
        if spec.has_file(WEIGHTS_FILE) and installed("torch"):
            return "torch"
        raise BackendUnavailable("no CUDA backend available: install onnxruntime-gpu (instead of onnxruntime), "
                                 "TensorRT, or torch with CUDA")
    if spec.onnx_file and installed("onnxruntime"):
        return "onnxruntime"
    if spec.has_file(WEIGHTS_FILE) and installed("torch"):
        return "torch"
    raise BackendUnavailable("no CPU backend available: pip install onnxruntime (or torch for model.safetensors)")


def create_backend(name: str, spec, device: str = "cpu", **options: Any):
    """Instantiate backend ``name`` (already resolved) for the verified model directory ``spec``."""
    if name == "onnxruntime":
        from .onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(spec, device=device, **options)
    if name == "openvino":
        from .openvino import OpenVinoBackend

        return OpenVinoBackend(spec, device=device, **options)
    if name == "torch":
        from .torch_backend import TorchBackend

        return TorchBackend(spec, device=device, **options)
    if name == "tensorrt":
        from .tensorrt import TensorRTBackend

        return TensorRTBackend(spec, device=device, **options)
    raise ValueError(f"unknown backend {name!r}")
