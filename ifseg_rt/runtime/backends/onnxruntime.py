"""onnxruntime backend: CPU provider (numpy in/out) or CUDA provider with I/O binding (outputs stay on the GPU as
torch tensors, so kNN and the resize run there)."""

from __future__ import annotations

from typing import Optional

import numpy as np

from . import BackendUnavailable


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


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
            raise BackendUnavailable(f"{spec.root} has no ONNX model")
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
        self.session = ort.InferenceSession(str(spec.path(spec.onnx_file)), so, providers=providers)
        self.feature_dim = spec.feature_dim
        self.num_categories = spec.num_categories

    def run(self, x: np.ndarray):
        """``Bx3xHxW`` float32 -> (logits, features): numpy on CPU, torch CUDA tensors on CUDA."""
        if not self.on_gpu:
            logits, feats = self.session.run(["logits", "features"], {"image": x})
            return logits, feats
        return self._run_cuda(x)

    def _run_cuda(self, x: np.ndarray):  # unverified here: needs onnxruntime-gpu and a GPU
        import torch

        dev = torch.device("cuda", self.device_id)
        xt = torch.from_numpy(np.ascontiguousarray(x)).to(dev, non_blocking=True)
        B, _, H, W = xt.shape
        n = _cdiv(H, 16) * _cdiv(W, 16)
        logits = torch.empty((B, n, self.num_categories), dtype=torch.float32, device=dev)
        feats = torch.empty((B, n, self.feature_dim), dtype=torch.float32, device=dev)
        binding = self.session.io_binding()
        binding.bind_input("image", "cuda", self.device_id, np.float32, tuple(xt.shape), xt.data_ptr())
        binding.bind_output("logits", "cuda", self.device_id, np.float32, tuple(logits.shape), logits.data_ptr())
        binding.bind_output("features", "cuda", self.device_id, np.float32, tuple(feats.shape), feats.data_ptr())
        torch.cuda.current_stream(dev).synchronize()  # the H2D copy ran on torch's stream; ORT uses its own
        self.session.run_with_iobinding(binding)
        return logits, feats
