"""onnxruntime backend: CPU provider (numpy in/out) or CUDA provider with I/O binding (outputs stay on the GPU as
torch tensors, so kNN and the resize run there).

On the CPU it runs the split graph when the directory has one (``tables.onnx`` + ``body.onnx``, or
``body.int8.onnx`` for ``precision="int8"``): a token grid's absolute positions (O(S), ~20 MB for OFA-Base at
512 x 512) are computed once and kept in an LRU bounded by ``geometry.TABLE_CACHE_BYTES`` and ``TABLE_CACHE_GRIDS``;
concurrent requests of one grid share one copy. Without the split graph it runs ``model.onnx``, which recomputes them
every call.

Memory stays flat across image shapes: the graphs hold no S x S position table, onnxruntime's per-shape memory
patterns are off (dynamic shapes), and after a run of a new shape the CPU arena is shrunk back and the C heap
trimmed, so a rare large image does not leave its peak allocated (runs repeating the last shape reuse the arena).
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from ...system import available_cores, release_free_memory
from ..model_dir import GRID_NAME, INPUT_NAME, OUTPUT_NAMES, TABLE_NAMES, ModelDirError
from ...geometry import PATCH, token_grid
from ...grid_cache import GridCache
from . import BackendUnavailable

ARENA_SHRINK = "cpu:0"  # onnxruntime run option: return the CPU arena's free chunks after each run


def _last_dim(node) -> Optional[int]:
    shape = getattr(node, "shape", None) or []
    return shape[-1] if shape and isinstance(shape[-1], int) else None


class OnnxRuntimeBackend:
    """
    Arguments:
      spec (ModelSpec): verified model directory
      device (str): "cpu", "cuda" or "cuda:N"
      threads (int or None): intra-op threads for the CPU provider (None: the cores available to the process)
      precision (str): "fp32" or "int8" (the int8 body the directory was exported with)
      spin (bool): let idle worker threads spin-wait for work. Off by default: spinning threads keep the cores busy
        after a run and slow the post-processing that follows it (kNN, resize) by up to ~1.7x on 2 cores
    """

    name = "onnxruntime"

    def __init__(self, spec, *, device: str = "cpu", threads: Optional[int] = None, precision: str = "fp32",
                 spin: bool = False):
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
        rec = spec.precisions.get(precision)
        if rec is None or rec.backend != "onnxruntime":
            offered = sorted(p for p, r in spec.precisions.items() if r.backend == "onnxruntime")
            raise BackendUnavailable(f"{spec.source} has no onnxruntime graph in precision {precision!r} (offers "
                                     f"{offered}); re-export with --precision {precision}")
        if self.on_gpu and precision != "fp32":
            raise BackendUnavailable(f"precision {precision!r} runs on the CPU provider only")
        self.precision = precision
        self.split = not self.on_gpu and rec.body is not None and spec.tables_file is not None
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        # the cores this process may use, not onnxruntime's count of the machine's (containers, taskset)
        self.threads = int(threads) if threads else available_cores()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.enable_mem_pattern = False  # memory patterns are planned (and kept) per input shape
        self.run_options = ort.RunOptions()  # a run of the same shape as the last reuses the arena as it is ...
        self.shrink_options = ort.RunOptions()  # ... a new shape returns what it needed beyond that afterwards
        if not self.on_gpu:
            self.shrink_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", ARENA_SHRINK)
        self._last_shape: Optional[Tuple[int, ...]] = None
        if not spin:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        if self.on_gpu:
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise BackendUnavailable("onnxruntime has no CUDAExecutionProvider here: install onnxruntime-gpu "
                                         "(it replaces onnxruntime) on a machine with CUDA")
            providers = [("CUDAExecutionProvider", {"device_id": self.device_id}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        self.file = rec.body if self.split else spec.onnx_file
        self.session = self._open(ort, self.file, so, providers)
        if self.on_gpu and "CUDAExecutionProvider" not in self.session.get_providers():
            # available is not loaded: a missing CUDA/cuDNN library makes the session fall back to the CPU silently
            raise BackendUnavailable(f"onnxruntime could not start its CUDA provider for {spec.path(self.file)} "
                                     f"(session providers: {self.session.get_providers()}); check the CUDA / cuDNN "
                                     f"libraries that onnxruntime-gpu needs, or use backend='torch'")
        self.tables_session = self._open(ort, spec.tables_file, so, providers) if self.split else None
        self.table_cache = GridCache(self._compute_tables)
        self._check_io()
        self.feature_dim = spec.feature_dim
        self.num_categories = spec.num_categories

    def _open(self, ort, name: str, so, providers):
        path = self.spec.path(name)
        try:
            return ort.InferenceSession(str(path), so, providers=providers)
        except Exception as e:  # onnxruntime raises its own pybind types (InvalidProtobuf, InvalidArgument, Fail...)
            raise ModelDirError(f"{path}: onnxruntime cannot load it ({type(e).__name__}: {str(e).strip()}); the file "
                                f"is corrupt or not an ifseg_rt ONNX model - re-export it") from None

    def _check_io(self) -> None:
        """The graphs' names and output widths must be the ones ``ifseg.json`` describes."""
        path = self.spec.path(self.file)
        want_in = [INPUT_NAME, *TABLE_NAMES] if self.split else [INPUT_NAME]
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = {o.name: o for o in self.session.get_outputs()}
        if inputs != want_in or set(OUTPUT_NAMES) - set(outputs):
            raise ModelDirError(f"{path}: inputs {inputs} and outputs {sorted(outputs)}, expected {want_in} and "
                                f"{list(OUTPUT_NAMES)}: not an ifseg_rt model graph")
        if self.split:
            t_in = [i.name for i in self.tables_session.get_inputs()]
            t_out = [o.name for o in self.tables_session.get_outputs()]
            if t_in != [GRID_NAME] or t_out != list(TABLE_NAMES):
                raise ModelDirError(f"{self.spec.path(self.spec.tables_file)}: inputs {t_in} and outputs {t_out}, "
                                    f"expected [{GRID_NAME!r}] and {list(TABLE_NAMES)}")
            dims = lambda shape: [d if isinstance(d, int) else None for d in (shape or [])]  # noqa: E731
            self.spec.check_split({o.name: dims(o.shape) for o in self.tables_session.get_outputs()},
                                  {i.name: dims(i.shape) for i in self.session.get_inputs()[1:]}, self.file)
        m, c = _last_dim(outputs[OUTPUT_NAMES[0]]), _last_dim(outputs[OUTPUT_NAMES[1]])
        if m is None:  # symbolic width: one forward of the smallest valid input tells
            size = self.spec.static_shape or (PATCH, PATCH)
            lo, fo = self._run_cpu(np.zeros((1, 3, *size), np.float32))
            m, c = lo.shape[-1], fo.shape[-1]
        self.spec.check_outputs(m, c, self.file)

    # --- running ---------------------------------------------------------------------------------------------
    def tables(self, h: int, w: int) -> Tuple[np.ndarray, ...]:
        """The split graph's per-grid positions for an h x w grid (computed once, then from the cache)."""
        return self.table_cache.get(h, w)

    def _compute_tables(self, h: int, w: int) -> Tuple[np.ndarray, ...]:
        grid = np.zeros((h, w), dtype=np.float32)  # only its shape is read
        return tuple(self.tables_session.run(list(TABLE_NAMES), {GRID_NAME: grid}, self.shrink_options))

    @property
    def cache_nbytes(self) -> int:
        """Bytes of the cached per-grid tables."""
        return self.table_cache.nbytes

    def run(self, x: np.ndarray):
        """``Bx3xHxW`` float32 -> (logits, features): numpy on CPU, torch CUDA tensors on CUDA."""
        if not self.on_gpu:
            return self._run_cpu(x)
        return self._run_cuda(x)

    def _run_cpu(self, x: np.ndarray):
        feeds = {INPUT_NAME: x}
        if self.split:
            feeds.update(zip(TABLE_NAMES, self.tables(*token_grid(x.shape[2], x.shape[3]))))
        same = x.shape == self._last_shape
        self._last_shape = x.shape
        logits, feats = self.session.run(list(OUTPUT_NAMES), feeds, self.run_options if same else self.shrink_options)
        if not same:
            release_free_memory()  # glibc keeps what onnxruntime and numpy freed mapped otherwise
        return logits, feats

    def _run_cuda(self, x: np.ndarray):  # unverified here: needs onnxruntime-gpu and a GPU
        import torch

        dev = torch.device("cuda", self.device_id)
        xt = torch.from_numpy(np.ascontiguousarray(x)).to(dev, non_blocking=True)
        B, _, H, W = xt.shape
        gh, gw = token_grid(H, W)
        n = gh * gw
        logits = torch.empty((B, n, self.num_categories), dtype=torch.float32, device=dev)
        feats = torch.empty((B, n, self.feature_dim), dtype=torch.float32, device=dev)
        binding = self.session.io_binding()
        binding.bind_input(INPUT_NAME, "cuda", self.device_id, np.float32, tuple(xt.shape), xt.data_ptr())
        for name, t in zip(OUTPUT_NAMES, (logits, feats)):
            binding.bind_output(name, "cuda", self.device_id, np.float32, tuple(t.shape), t.data_ptr())
        torch.cuda.current_stream(dev).synchronize()  # the H2D copy ran on torch's stream; ORT uses its own
        self.session.run_with_iobinding(binding)
        return logits, feats
