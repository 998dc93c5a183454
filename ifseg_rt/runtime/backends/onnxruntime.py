"""onnxruntime backend: CPU provider (numpy in/out) or CUDA provider with I/O binding (outputs stay on the GPU as
torch tensors, so kNN and the resize run there)."""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..model_dir import INPUT_NAME, OUTPUT_NAMES, ModelDirError
from ..preprocess import PATCH
from . import BackendUnavailable


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _last_dim(node) -> Optional[int]:
    shape = getattr(node, "shape", None) or []
    return shape[-1] if shape and isinstance(shape[-1], int) else None


class OnnxRuntimeBackend:
    """
    Arguments:
      spec (ModelSpec): verified model directory
      device (str): "cpu", "cuda" or "cuda:N"
      threads (int or None): intra-op threads for the CPU provider (None: onnxruntime's default, all cores)
    """

    name = "onnxruntime"

    def __init__(self, spec, *, device: str = "cpu", threads: Optional[int] = None):
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise BackendUnavailable("the onnxruntime backend needs `pip install onnxruntime` "
                                     "(or onnxruntime-gpu for CUDA; never both)") from e
        if not spec.onnx_file:
            raise BackendUnavailable(f"{spec.source} has no ONNX model")
        self.spec = spec
        self.device = device
        self.on_gpu = str(device).startswith("cuda")
        self.device_id = int(str(device).split(":")[1]) if ":" in str(device) else 0
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = int(threads)
            so.inter_op_num_threads = 1
        if self.on_gpu:
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise BackendUnavailable("onnxruntime has no CUDAExecutionProvider here: install onnxruntime-gpu "
                                         "(it replaces onnxruntime) on a machine with CUDA")
            providers = [("CUDAExecutionProvider", {"device_id": self.device_id}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        path = spec.path(spec.onnx_file)
        try:
            self.session = ort.InferenceSession(str(path), so, providers=providers)
        except Exception as e:  # onnxruntime raises its own pybind types (InvalidProtobuf, InvalidArgument, Fail...)
            raise ModelDirError(f"{path}: onnxruntime cannot load it ({type(e).__name__}: {str(e).strip()}); the file "
                                f"is corrupt or not an ifseg_rt ONNX model - re-export it") from None
        if self.on_gpu and "CUDAExecutionProvider" not in self.session.get_providers():
            # available is not loaded: a missing CUDA/cuDNN library makes the session fall back to the CPU silently
            raise BackendUnavailable(f"onnxruntime could not start its CUDA provider for {path} (session providers: "
                                     f"{self.session.get_providers()}); check the CUDA / cuDNN libraries that "
                                     f"onnxruntime-gpu needs, or use backend='torch'")
        self._check_io(path)
        self.feature_dim = spec.feature_dim
        self.num_categories = spec.num_categories

    def _check_io(self, path) -> None:
        """The graph's names and output widths must be the ones ``ifseg.json`` describes."""
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = {o.name: o for o in self.session.get_outputs()}
        if inputs != [INPUT_NAME] or set(OUTPUT_NAMES) - set(outputs):
            raise ModelDirError(f"{path}: inputs {inputs} and outputs {sorted(outputs)}, expected [{INPUT_NAME!r}] "
                                f"and {list(OUTPUT_NAMES)}: not an ifseg_rt model graph")
        m, c = _last_dim(outputs[OUTPUT_NAMES[0]]), _last_dim(outputs[OUTPUT_NAMES[1]])
        if m is None:  # symbolic width: one forward of the smallest valid input tells
            size = self.spec.static_shape or (PATCH, PATCH)
            lo, fo = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: np.zeros((1, 3, *size), np.float32)})
            m, c = lo.shape[-1], fo.shape[-1]
        self.spec.check_outputs(m, c, self.spec.onnx_file)

    def run(self, x: np.ndarray):
        """``Bx3xHxW`` float32 -> (logits, features): numpy on CPU, torch CUDA tensors on CUDA."""
        if not self.on_gpu:
            logits, feats = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: x})
            return logits, feats
        return self._run_cuda(x)

    def _run_cuda(self, x: np.ndarray):  # unverified here: needs onnxruntime-gpu and a GPU
        import torch

        dev = torch.device("cuda", self.device_id)
        xt = torch.from_numpy(np.ascontiguousarray(x)).to(dev, non_blocking=True)
        B, _, H, W = xt.shape
        n = _cdiv(H, PATCH) * _cdiv(W, PATCH)
        logits = torch.empty((B, n, self.num_categories), dtype=torch.float32, device=dev)
        feats = torch.empty((B, n, self.feature_dim), dtype=torch.float32, device=dev)
        binding = self.session.io_binding()
        binding.bind_input(INPUT_NAME, "cuda", self.device_id, np.float32, tuple(xt.shape), xt.data_ptr())
        for name, t in zip(OUTPUT_NAMES, (logits, feats)):
            binding.bind_output(name, "cuda", self.device_id, np.float32, tuple(t.shape), t.data_ptr())
        torch.cuda.current_stream(dev).synchronize()  # the H2D copy ran on torch's stream; ORT uses its own
        self.session.run_with_iobinding(binding)
        return logits, feats
