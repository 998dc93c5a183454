"""OpenVINO backend (CPU): the split graph (``tables.onnx`` + ``body.onnx``) compiled by OpenVINO's CPU plugin,
by default with bfloat16 inference precision.

On CPUs with AMX (Intel Xeon 4th gen and later) or AVX512-BF16 the plugin runs the matmuls and convolutions in
bfloat16 (accumulating in fp32) and keeps what it judges precision-critical (softmax inputs, normalisation
statistics) in fp32; on other CPUs a bf16 request runs in fp32 (a warning says so). Only AMX makes it fast: with
AVX512-BF16 alone (AMD EPYC Zen 4, or an AMX Xeon capped with ``ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16``) its matmuls
ran 6.6x slower here and the whole model slower than onnxruntime fp32 (a warning says so; ``Segmenter.load`` then
passes over a bf16 default). ``precision="fp32"`` runs the same graph in fp32 (OFA-Base at 512^2: 10-15 % faster than
onnxruntime fp32 here, with about twice its memory; onnxruntime stays the fp32 engine). The per-grid tables are
computed once per grid (:class:`~ifseg_rt.grid_cache.GridCache`) by the tables graph, in fp32.

**Grids with a side of G cells** (the paper's policy: short side 512 px = G = 32 cells, so every image up to 4:1)
take the relative bias's fast path, one gather per query block, which the graph wraps in an ONNX ``If`` on the grid
(:mod:`ifseg_rt.model.grid_attention`). OpenVINO runs each ``If`` as a separate subgraph that keeps its own output
buffer: at 512 x 2048 that held ~10 GB and cost 20 % of the time. So the backend compiles a copy of the body with
every such ``If`` replaced by its fast branch (the conditions set to true and folded away) for these grids, and
compiles the graph as it is only when a grid without a side of G arrives (once, on first use). The ``If`` nodes
are recognised by their structure (the fast branch ends in the gather, the other resizes with matmuls); a graph
where any ``If`` looks different is run as it is. In the folded graph the fast branch's gather reads single
elements of a flattened table (:func:`flat_bias_gathers`): OpenVINO's vectorised gather, instead of its reference
kernel for rows of 32 values; with the bias added in the scores' layout (graphs exported since) the plugin then
fuses each attention block (matmul, bias, softmax, matmul) into one kernel. -10 % at 512^2 on OFA-Base.

Torch-free; ``pip install openvino`` (the ``[openvino]`` extra).
"""

from __future__ import annotations

import os
import threading
import warnings
from typing import Any, Dict, Optional, Tuple

import numpy as np

from ...geometry import token_grid
from ...grid_cache import GridCache
from ...system import available_cores, bf16_without_amx, release_free_memory
from ..model_dir import GRID_NAME, INPUT_NAME, OUTPUT_NAMES, TABLE_NAMES, ModelDirError
from . import BackendUnavailable

HINTS = {"fp32": "f32", "bf16": "bf16"}  # our precision -> OpenVINO's INFERENCE_PRECISION_HINT
CACHE_ENV = "IFSEG_OPENVINO_CACHE_DIR"  # default cache_dir of OpenVinoBackend: compiled graphs reused across loads


def bf16_native() -> Optional[bool]:
    """Whether OpenVINO's CPU plugin computes bfloat16 natively here (AMX / AVX512-BF16); None without OpenVINO."""
    try:
        import openvino as ov
    except ImportError:
        return None
    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def fast_path_only(model) -> int:
    """Replace, in place, every grid ``If`` of ``model`` (an ``ov.Model`` of our body graph) by its fast branch: set
    its condition to true, so that OpenVINO folds it away when compiling. Only when every ``If`` has the structure
    :mod:`ifseg_rt.model.grid_attention` exports (the true branch ends in the fast path's gather, the false branch
    resizes with matmuls); otherwise nothing changes. Returns how many were replaced."""
    import openvino.opset13 as ops

    ifs = [op for op in model.get_ordered_ops() if op.get_type_name() == "If"]

    def grid_if(op) -> bool:
        then_out = op.get_then_body().get_results()[0].input(0).get_source_output().get_node()
        return then_out.get_type_name() == "Gather" and any(
            o.get_type_name() == "MatMul" for o in op.get_else_body().get_ordered_ops())

    if not ifs or not all(grid_if(op) for op in ifs):
        return 0
    for op in ifs:
        op.input(0).replace_source_output(ops.constant(True).output(0))
    model.validate_nodes_and_infer_types()
    return len(ifs)


def flat_bias_gathers(model):
    """Rewrite the fast branch of every grid ``If`` of ``model`` (an ``ov.Model`` of our body graph) to gather single
    elements instead of rows of ``w_i`` values; returns ``(new model, how many)``, or ``(model, 0)`` unchanged where
    the graph looks different (a graph exported before its biases were added in the scores' layout).

    The fast branch gathers ``Z``'s outer-offset axis (``H x c x (2G-1+r) x w_i``) at an ``h_o x (h_o + r)`` index:
    a copy of ``w_i`` values per index, which OpenVINO's CPU plugin runs with its (slow) reference gather.
    With ``Z``'s last two axes flattened, the same bias is a gather of single elements at ``index * w_i + k_i``,
    which its vectorised kernel runs, and it comes out in the scores' layout (``H x c x h_o x keys``), which the
    graph reshapes next anyway. The element index is computed once per grid in the main graph and passed into every
    ``If``; the other branch's result is reshaped alike."""
    import openvino as ov
    import openvino.opset13 as ops

    def i64(v):
        return ops.constant(np.array(v, np.int64))

    plans = []
    for op in model.get_ordered_ops():
        if op.get_type_name() != "If":
            continue
        then = op.get_then_body()
        gather = then.get_results()[0].input(0).get_source_output().get_node()
        index = gather.input_value(1).get_node()
        params = list(then.get_parameters())
        if (gather.get_type_name() != "Gather" or index not in params
                or any(c.get_node().get_type_name() != "Reshape" for c in op.output(0).get_target_inputs())):
            return model, 0
        outer = {d.body_parameter_index: d.input_index for d in op.get_input_descriptions(0)}
        tables = [op.input_value(outer[i]) for i, p in enumerate(params)
                  if p.get_output_element_type(0).is_real() and p.get_output_partial_shape(0).rank.is_static
                  and p.get_output_partial_shape(0).rank.get_length() == 4]  # Z's block (the rest: index, mask)
        rank = gather.input_value(1).get_partial_shape().rank
        if len(tables) != 1 or not rank.is_static or rank.get_length() != 2:
            return model, 0
        plans.append((op, gather, op.input_value(outer[params.index(index)]), tables[0]))
    flat = {}  # per grid index (one per key layout): its element index, shared by the layout's Ifs
    for op, gather, index, table in plans:
        key = (index.get_node().get_instance_id(), index.get_index())
        if key not in flat:
            wi = ops.gather(ops.shape_of(table, "i64"), i64([3]), i64(0))
            inner = ops.range(i64(0), ops.squeeze(wi, i64([0])), i64(1), "i64")
            elements = ops.add(ops.multiply(ops.unsqueeze(ops.convert(index, "i64"), i64(-1)), wi), inner)
            flat[key] = ops.convert(ops.reshape(elements, i64([0, -1]), True), "i32").output(0)
        then, other = op.get_then_body(), op.get_else_body()
        param = ops.parameter(ov.PartialShape([-1, -1]), ov.Type.i32)
        then.add_parameters([param])
        op.set_input(flat[key], param, None)
        rows = ops.gather(ops.reshape(gather.input_value(0), i64([0, 0, -1]), True), param, i64(2))
        then.get_results()[0].input(0).replace_source_output(rows.output(0))
        result = other.get_results()[0].input(0)
        result.replace_source_output(ops.reshape(result.get_source_output(), i64([0, 0, 0, -1]), True).output(0))
        then.validate_nodes_and_infer_types()
        other.validate_nodes_and_infer_types()
    # a new model: the old one's cached node order misses the nodes added to the main graph
    rewritten = ov.Model(model.get_results(), model.get_parameters(), model.get_friendly_name())
    rewritten.validate_nodes_and_infer_types()
    return rewritten, len(plans)


class OpenVinoBackend:
    """
    Arguments:
      spec (ModelSpec): verified model directory with the split graph
      device (str): "cpu" only
      threads (int or None): inference threads (None: the cores available to the process)
      precision (str): "bf16" (default) or "fp32"
      cache_dir (str or None): keep OpenVINO's compiled graphs here and reuse them on the next load (an OFA-Base body:
        compile 7.9 s -> 1.5 s, ~0.5 GB on disk per precision); default: $IFSEG_OPENVINO_CACHE_DIR, else no cache.
        OpenVINO keys each entry by the graph, its weights, the settings and its own version
    """

    name = "openvino"

    def __init__(self, spec, *, device: str = "cpu", threads: Optional[int] = None, precision: str = "bf16",
                 cache_dir: Optional[str] = None):
        try:
            import openvino as ov
        except ImportError as e:
            raise BackendUnavailable("the openvino backend needs `pip install openvino` (the [openvino] extra)") from e
        if str(device) != "cpu":
            raise BackendUnavailable(f"the openvino backend runs on the CPU only, not {device!r}")
        if precision not in HINTS:
            raise BackendUnavailable(f"the openvino backend runs precision 'bf16' or 'fp32', not {precision!r}")
        if spec.tables_file is None or spec.body_file is None:
            raise BackendUnavailable(f"{spec.source} has no split graph (tables.onnx + body.onnx), which the openvino "
                                     f"backend runs; re-export it without --static-shape")
        self.spec = spec
        self.device = "cpu"
        self.on_gpu = False
        self.precision = precision
        self.threads = int(threads) if threads else available_cores()
        core = ov.Core()
        self.bf16_native = bool(bf16_native())
        if precision == "bf16" and not self.bf16_native:
            warnings.warn("this CPU has neither AMX nor AVX512-BF16: OpenVINO runs the bf16 model in fp32 (prefer "
                          "precision 'int8' or 'fp32' here)", RuntimeWarning, stacklevel=3)
        elif precision == "bf16" and (slow := bf16_without_amx("OpenVINO")):
            warnings.warn(slow + "; prefer precision 'int8' or 'fp32' here", RuntimeWarning, stacklevel=3)
        config = {"INFERENCE_NUM_THREADS": self.threads, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
        self.cache_dir = cache_dir or os.environ.get(CACHE_ENV) or None
        if self.cache_dir:
            try:
                os.makedirs(self.cache_dir, exist_ok=True)
            except OSError as e:
                raise ValueError(f"OpenVINO cache_dir {str(self.cache_dir)!r} cannot be created: {e}") from None
            if not os.access(self.cache_dir, os.W_OK | os.X_OK):
                raise ValueError(f"OpenVINO cache_dir {str(self.cache_dir)!r} is not writable")
            config["CACHE_DIR"] = str(self.cache_dir)
        rec = spec.precisions.get(precision)
        self.file = rec.body if rec is not None and rec.backend == self.name and rec.body else spec.body_file
        self.grid_side = spec.seg_grid  # G: grids with a side of G cells run the fast-path graph
        self._core, self._config = core, {**config, "INFERENCE_PRECISION_HINT": HINTS[precision]}
        model = self._read(core, self.file)
        self.fast_path_ifs = fast_path_only(model)  # how many grid Ifs were folded (0: the graph runs as it is)
        self.flat_gathers = 0  # how many of their gathers read single elements (flat_bias_gathers)
        if self.fast_path_ifs:
            model, self.flat_gathers = flat_bias_gathers(model)
        self.body = self._compile(core, model, self.file, self._config)  # fast grids (or every grid, if 0)
        self._general = None  # the graph as it is, compiled when a grid without a side of G first arrives
        # one inference at a time: with one stream (the latency hint) OpenVINO runs requests one after another anyway,
        # and release_memory() must not run beside an inference
        self._lock = threading.Lock()
        self.tables_model = self._compile(core, self._read(core, spec.tables_file), spec.tables_file,
                                          {**config, "INFERENCE_PRECISION_HINT": "f32"})
        self._requests: Dict[int, Any] = {}  # one infer request per compiled body
        self.table_cache = GridCache(self._compute_tables)
        self._last_shape: Optional[Tuple[int, ...]] = None
        self._check_io()
        self.feature_dim = spec.feature_dim
        self.num_categories = spec.num_categories

    def _read(self, core, name: str):
        path = self.spec.path(name)
        try:
            return core.read_model(str(path))
        except Exception as e:  # OpenVINO raises RuntimeError subclasses with the frontend's message
            raise ModelDirError(f"{path}: OpenVINO cannot read it ({type(e).__name__}: {str(e).strip()[:500]}); "
                                f"the file is corrupt or not an ifseg_rt ONNX model - re-export it") from None

    def _compile(self, core, model, name: str, config):
        try:
            return core.compile_model(model, "CPU", config)
        except Exception as e:
            raise ModelDirError(f"{self.spec.path(name)}: OpenVINO cannot compile it ({type(e).__name__}: "
                                f"{str(e).strip()[:500]}); re-export it") from None

    @property
    def compiled_graphs(self) -> int:
        """Bodies compiled so far: 1, or 2 once a grid without a side of G needed the graph as it is."""
        return 1 + (self._general is not None)

    def _model_for(self, h: int, w: int):
        """The compiled body for an h x w token grid: the fast-path one when a side is G (or nothing was folded)."""
        if not self.fast_path_ifs or self.grid_side in (h, w):
            return self.body
        if self._general is None:
            self._general = self._compile(self._core, self._read(self._core, self.file), self.file, self._config)
        return self._general

    def _check_io(self) -> None:
        """The graphs' names and output widths must be the ones ``ifseg.json`` describes."""
        def names(ports, want):  # a port may carry several tensor names (OpenVINO keeps aliases): the wanted one
            return [next((n for n in want if n in p.get_names()), p.get_any_name()) for p in ports]

        want_in = [INPUT_NAME, *TABLE_NAMES]
        inputs, outputs = names(self.body.inputs, want_in), names(self.body.outputs, OUTPUT_NAMES)
        if inputs != want_in or set(OUTPUT_NAMES) - set(outputs):
            raise ModelDirError(f"{self.spec.path(self.file)}: inputs {inputs} and outputs {sorted(outputs)}, expected "
                                f"{want_in} and {list(OUTPUT_NAMES)}: not an ifseg_rt model graph")
        t_in = names(self.tables_model.inputs, [GRID_NAME])
        t_out = names(self.tables_model.outputs, TABLE_NAMES)
        if t_in != [GRID_NAME] or t_out != list(TABLE_NAMES):
            raise ModelDirError(f"{self.spec.path(self.spec.tables_file)}: inputs {t_in} and outputs {t_out}, "
                                f"expected [{GRID_NAME!r}] and {list(TABLE_NAMES)}")

        def dims(port):
            shape = port.get_partial_shape()
            return [d.get_length() if d.is_static else None for d in shape] if shape.rank.is_static else []

        self.spec.check_split({n: dims(p) for n, p in zip(t_out, self.tables_model.outputs)},
                              {n: dims(p) for n, p in zip(inputs[1:], self.body.inputs[1:])}, self.file)
        widths = []
        for name in OUTPUT_NAMES:
            last = self.body.output(name).get_partial_shape()[-1]
            widths.append(last.get_length() if last.is_static else None)
        if None in widths:  # symbolic width: one forward of the smallest valid input tells
            size = self.spec.static_shape or (16, 16)
            lo, fo = self.run(np.zeros((1, 3, *size), np.float32))
            widths = [lo.shape[-1], fo.shape[-1]]
        self.spec.check_outputs(widths[0], widths[1], self.file)

    # --- running ---------------------------------------------------------------------------------------------
    def tables(self, h: int, w: int) -> Tuple[np.ndarray, ...]:
        """The per-grid positions for an h x w grid (computed once, then from the cache)."""
        return self.table_cache.get(h, w)

    def _compute_tables(self, h: int, w: int) -> Tuple[np.ndarray, ...]:
        out = self.tables_model.create_infer_request().infer({GRID_NAME: np.zeros((h, w), np.float32)})
        return tuple(np.array(out[self.tables_model.output(n)]) for n in TABLE_NAMES)

    @property
    def cache_nbytes(self) -> int:
        """Bytes of the cached per-grid tables."""
        return self.table_cache.nbytes

    def run(self, x: np.ndarray):
        """``Bx3xHxW`` float32 -> (logits, features), numpy."""
        grid = token_grid(x.shape[2], x.shape[3])
        feeds = {INPUT_NAME: np.ascontiguousarray(x, dtype=np.float32), **dict(zip(TABLE_NAMES, self.tables(*grid)))}
        with self._lock:
            compiled = self._model_for(*grid)
            request = self._requests.get(id(compiled))
            if request is None:
                request = self._requests[id(compiled)] = compiled.create_infer_request()
            out = request.infer(feeds)  # outputs copied out of the request's buffers (share_outputs=False)
            result = tuple(np.asarray(out[compiled.output(n)]) for n in OUTPUT_NAMES)
            if x.shape != self._last_shape:
                self._last_shape = x.shape
                # a new shape's intermediate buffers, beyond what the next run reallocates; only in the fast-path
                # graph: the graph with its Ifs kept its memory anyway, and OpenVINO 2026.4 crashes there (bf16, fused
                # attention) when the next input has the same shape
                if compiled is self.body and self.fast_path_ifs:
                    compiled.release_memory()
                release_free_memory()  # glibc keeps what was freed mapped otherwise
        return result
