"""TensorRT backend: deserialises ``engines/<gpu>-<precision>.engine`` and runs it with ``execute_async_v3`` on
torch-allocated CUDA buffers. Written against the official TensorRT 10 Python API (``set_input_shape``,
``set_tensor_address``, ``execute_async_v3``); **unverified in this project** (TensorRT cannot be installed on the
development machines) - only its import guard is tested."""

from __future__ import annotations

import threading
from typing import Optional

import numpy as np

from ..model_dir import INPUT_NAME, OUTPUT_NAMES, ModelDirError, gpu_slug
from . import BackendUnavailable


class TensorRTBackend:
    """
    Arguments:
      spec (ModelSpec): verified model directory with at least one engine
      device (str): "cuda" or "cuda:N" (engines run on GPUs only)
      precision (str or None): pick the engine of this precision (default: the first one built for this GPU)
    """

    name = "tensorrt"

    def __init__(self, spec, *, device: str = "cuda", precision: Optional[str] = None):
        if not str(device).startswith("cuda"):
            raise BackendUnavailable("the tensorrt backend runs on device='cuda' only")
        try:
            import tensorrt as trt
        except ImportError as e:
            raise BackendUnavailable("the tensorrt backend needs TensorRT (`pip install tensorrt` on a CUDA machine); "
                                     "use backend='onnxruntime' or 'torch'") from e
        try:
            import torch
        except ImportError as e:
            raise BackendUnavailable("the tensorrt backend allocates its buffers with torch (CUDA build)") from e
        if not torch.cuda.is_available():
            raise BackendUnavailable("the tensorrt backend needs a CUDA GPU visible to torch")
        self.torch = torch
        self.device = torch.device(device)
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        gpu = torch.cuda.get_device_name(self.device)
        engines = [e for e in spec.engines
                   if gpu_slug(e.gpu) == gpu_slug(gpu) and (precision is None or e.precision == precision)]
        if not engines:
            built = ", ".join(f"{e.gpu} {e.precision}" for e in spec.engines) or "none"
            raise BackendUnavailable(f"no TensorRT engine for {gpu}{' ' + precision if precision else ''} in "
                                     f"{spec.source} (built: {built}); re-export with --format engine on this GPU")
        self.engine_spec = engines[0]
        self.precision = self.engine_spec.precision
        if self.engine_spec.tensorrt_version != trt.__version__:
            raise BackendUnavailable(f"engine built with TensorRT {self.engine_spec.tensorrt_version}, installed "
                                     f"{trt.__version__}: engines are version-specific; rebuild it")
        self.logger = trt.Logger(trt.Logger.WARNING)
        path = spec.path(self.engine_spec.file)
        with torch.cuda.device(self.device):  # engines, contexts and streams belong to the device they are made on
            runtime = trt.Runtime(self.logger)
            self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
            if self.engine is None:
                raise ModelDirError(f"{path}: TensorRT could not deserialise it (corrupt, or built by another TensorRT "
                                    f"version / for another GPU); rebuild it with --format engine")
            self.context = self.engine.create_execution_context()
            self.stream = torch.cuda.Stream(device=self.device)
        self.on_gpu = True
        self.profile = 0  # the context starts on profile 0
        self.spec = spec
        self._lock = threading.Lock()
        spec.check_outputs(int(self.engine.get_tensor_shape(OUTPUT_NAMES[0])[-1]),
                           int(self.engine.get_tensor_shape(OUTPUT_NAMES[1])[-1]), self.engine_spec.file)

    def run(self, x: np.ndarray):
        with self._lock:  # one execution context: concurrent callers of one Segmenter queue here
            return self._run(x)

    def _run(self, x: np.ndarray):
        torch = self.torch
        with torch.cuda.device(self.device):
            xt = torch.from_numpy(np.ascontiguousarray(x)).to(self.device)
            ctx = self.context
            index = self.engine_spec.profile_for(tuple(xt.shape))
            if index is not None and index != self.profile:  # the default engine has landscape + portrait profiles
                ctx.set_optimization_profile_async(index, self.stream.cuda_stream)
                self.profile = index
            if index is None or not ctx.set_input_shape(INPUT_NAME, tuple(xt.shape)):
                ranges = "; ".join(f"min {p.get('min')}, max {p.get('max')}" for p in self.engine_spec.profiles)
                raise ValueError(f"input shape {tuple(xt.shape)} is outside the optimisation profiles of "
                                 f"{self.engine_spec.file} ({ranges}); rebuild the engine with --min-shape/--max-shape "
                                 f"covering it, or use another backend")
            outs = {}
            for name in OUTPUT_NAMES:
                shape = tuple(ctx.get_tensor_shape(name))
                outs[name] = torch.empty(shape, dtype=torch.float32, device=self.device)  # outputs pinned fp32
                ctx.set_tensor_address(name, outs[name].data_ptr())
            ctx.set_tensor_address(INPUT_NAME, xt.data_ptr())
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            if not ctx.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError(f"TensorRT execution of {self.engine_spec.file} failed")
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
        return outs[OUTPUT_NAMES[0]], outs[OUTPUT_NAMES[1]]
