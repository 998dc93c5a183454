"""PyTorch backend: the exported weights (``model.safetensors``) or an in-memory :class:`~ifseg_rt.model.SegOFA`
(:meth:`TorchBackend.from_model`: evaluation of checkpoints and validation during adaptation, no export), run
through the model's own forward with per-grid cached position tables (:class:`~ifseg_rt.model.SegTableCache`).

* a grid's token orders and projected absolute positions (O(S); the S x S position terms are computed per query
  block inside attention, :mod:`~ifseg_rt.model.grid_attention`) depend only on the weights and the token grid:
  computed once per grid and kept (an LRU bounded by ``geometry.TABLE_CACHE_BYTES`` and ``TABLE_CACHE_GRIDS``), in
  the compute dtype;
* fp16/bf16 on CUDA (LayerNorm, GELU and the attention softmax stay fp32 inside the model's modules),
  ``torch.inference_mode``;
* optional CUDA graphs: one capture per input shape (an LRU of :data:`MAX_GRAPHS`), replayed with a copy into a
  static input buffer. Each graph keeps its own reference to the tables it captured, so evicting them from the
  table cache never frees memory a graph still reads.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections import OrderedDict
from typing import Optional, Tuple

import numpy as np

from ..model_dir import WEIGHTS_FILE, ModelDirError
from ...geometry import TABLE_CACHE_BYTES, TABLE_CACHE_GRIDS, token_grid
from ...system import bf16_without_amx, release_free_memory
from . import BackendUnavailable

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
MAX_GRAPHS = 8  # captured CUDA graphs kept (each holds its activations' memory)


def _torch():
    try:
        import torch
    except ImportError as e:
        raise BackendUnavailable("the torch backend needs torch (pip install 'ifseg_rt[train]')") from e
    return torch


class TorchBackend:
    """
    Arguments:
      spec (ModelSpec): verified model directory with ``model.safetensors``
      device (str): "cpu", "cuda" or "cuda:N"
      dtype (str or None): "fp32", "fp16" or "bf16"; default fp32 on CPU, bf16 on CUDA
      cuda_graphs (bool): capture and replay CUDA graphs per input shape (CUDA only)
      threads (int or None): torch intra-op threads on CPU
    """

    name = "torch"

    def __init__(self, spec, *, device: str = "cpu", dtype: Optional[str] = None, cuda_graphs: bool = False,
                 threads: Optional[int] = None, model=None):
        torch = self.torch = _torch()
        self.device = torch.device(device)
        self.on_gpu = self.device.type == "cuda"
        if self.on_gpu and not torch.cuda.is_available():
            raise BackendUnavailable("device='cuda' but torch sees no CUDA GPU")
        if self.on_gpu and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        dtype = dtype or ("bf16" if self.on_gpu else "fp32")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
        if dtype == "fp16" and not self.on_gpu:
            raise ValueError("dtype fp16 needs a CUDA device; use fp32 or bf16 on the CPU")
        if dtype == "bf16" and not self.on_gpu and model is None and (slow := bf16_without_amx("torch")):
            warnings.warn(slow + "; prefer fp32 here", RuntimeWarning, stacklevel=3)
        self.dtype = getattr(torch, DTYPES[dtype])
        self.precision = dtype
        self.threads = int(threads) if threads and not self.on_gpu else None
        if self.threads:
            torch.set_num_threads(self.threads)
        self.spec = spec
        self.autocast = False
        if model is None:  # a model directory: load its weights in the compute dtype
            model = self._load(spec)
        else:  # an in-memory model is never moved or cast: it runs where it is, under autocast for fp16/bf16
            where = next(model.parameters()).device
            if where != self.device:
                raise ValueError(f"the model lives on {where}, not on {self.device}")
            self.autocast = any(p.dtype != self.dtype for p in model.parameters())
        self.model = model
        self.normalize_features = spec.features_normalized
        self.cuda_graphs = bool(cuda_graphs) and self.on_gpu
        self.tables = self._table_cache()
        self._graphs: "OrderedDict[tuple, tuple]" = OrderedDict()
        self._last_shape: Optional[Tuple[int, ...]] = None
        # one run at a time: CUDA graphs replay into one static input, and an in-memory model's train/eval mode is
        # switched around each run; concurrent callers of one Segmenter queue here
        self._lock = threading.Lock()

    @classmethod
    def from_model(cls, model, spec, *, device: str = "cpu", dtype: Optional[str] = None,
                   threads: Optional[int] = None) -> "TorchBackend":
        """Run an in-memory SegOFA (prompt set) as it is; ``spec`` from ``model_dir.spec_for_model``. The weights must
        not change while this backend is used (its tables are cached): build a new one after further training."""
        from ...model import SegOFA

        if not isinstance(model, SegOFA) or not model.has_prompt:
            raise TypeError("from_model needs a SegOFA with its prompt set (set_categories)")
        spec.check_outputs(model.num_categories, model.config.image_feature_dim, "<in-memory SegOFA>")
        return cls(spec, device=device, dtype=dtype or "fp32", threads=threads, model=model)

    def _load(self, spec):
        from ...checkpoint import CheckpointError, load_checkpoint

        if not spec.has_file(WEIGHTS_FILE):
            raise BackendUnavailable(f"{spec.source} has no {WEIGHTS_FILE} (exported with --no-weights); use the "
                                     f"onnxruntime backend")
        path = spec.path(WEIGHTS_FILE)
        try:
            ck = load_checkpoint(path, dtype=self.dtype, device=self.device)
        except (CheckpointError, OSError) as e:
            raise ModelDirError(f"{path}: cannot load it ({e})") from None
        model = ck.model
        if ck.kind != "segofa" or not model.has_prompt:
            raise ModelDirError(f"{path} holds no SegOFA with a prompt")
        spec.check_outputs(model.num_categories, model.config.image_feature_dim, WEIGHTS_FILE)
        if not self.on_gpu:  # oneDNN's own layout (not measured on a GPU: there the weights stay NCHW)
            model.encoder.embed_images.use_channels_last()
        return model.eval()

    def _table_cache(self):
        from ...model import SegTableCache

        return SegTableCache(self.model, max_bytes=TABLE_CACHE_BYTES, max_grids=TABLE_CACHE_GRIDS)

    # --- forward ---------------------------------------------------------------------------------------------
    def forward(self, x):
        """``Bx3xHxW`` tensor on the device -> (logits BxNxM fp32, features BxNxC fp32)."""
        torch = self.torch
        h, w = token_grid(x.shape[2], x.shape[3])
        tables = self.tables.get(h, w)
        with self._autocast():
            logits, feats = self.model(x, tables=tables)
        logits, feats = logits.float(), feats.float()
        if self.normalize_features:
            feats = torch.nn.functional.normalize(feats, dim=-1)
        return logits, feats

    def _autocast(self):
        if not self.autocast or self.dtype == self.torch.float32:
            return contextlib.nullcontext()
        return self.torch.autocast(self.device.type, dtype=self.dtype)

    def run(self, x: np.ndarray):
        """``Bx3xHxW`` float32 numpy -> numpy outputs on CPU, torch tensors on CUDA."""
        with self._lock:
            return self._run(x)

    def _run(self, x: np.ndarray):
        torch = self.torch
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                xt = torch.from_numpy(np.ascontiguousarray(x))
                xt = xt.to(self.device, non_blocking=True)
                if not self.autocast:
                    xt = xt.to(self.dtype)
                if self.cuda_graphs:
                    logits, feats = self._replay(xt)
                else:
                    logits, feats = self.forward(xt)
        finally:
            self.model.train(was_training)
        if self.on_gpu:
            return logits, feats
        if x.shape != self._last_shape:  # a new shape's activations would otherwise stay mapped (flat RSS)
            release_free_memory()
        self._last_shape = x.shape
        return logits.numpy(), feats.numpy()

    # --- CUDA graphs ------------------------------------------------------------------------------------------
    def _replay(self, xt):  # runs on a GPU only (benchmarks/gpu_check.sh); the bookkeeping is tested on the CPU
        torch = self.torch
        key = tuple(xt.shape)
        g = self._graphs.get(key)
        if g is None:
            with torch.cuda.device(self.device):  # side stream and capture stream on the model's device
                g = self._capture(xt)
            self._graphs[key] = g
            while len(self._graphs) > MAX_GRAPHS:
                self._graphs.popitem(last=False)
        else:
            self._graphs.move_to_end(key)
        graph, static_x, out, _tables = g
        static_x.copy_(xt)
        graph.replay()
        return out[0].clone(), out[1].clone()

    def _capture(self, xt) -> Tuple:
        """Warm up and capture one graph for ``xt``'s shape; returns (graph, static input, outputs, tables)."""
        torch = self.torch
        h, w = token_grid(xt.shape[2], xt.shape[3])
        tables = self.tables.get(h, w)  # computed before capture: no allocation of tables inside the graph
        static_x = xt.clone()
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up: kernels selected, workspaces allocated
                self.forward(static_x)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.forward(static_x)
        # the graph reads the tables' memory at replay: keep them alive as long as the graph, whatever the LRU does
        return graph, static_x, out, tables
