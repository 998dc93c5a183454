"""Build a TensorRT engine from the exported ``model.onnx`` (``--format engine``, aliases ``trt``/``tensorrt``).

Written against the official TensorRT Python API (8.6 / 10.x: ``trt.Builder``, ``OnnxParser``, ``BuilderConfig``,
optimisation profiles, ``OBEY_PRECISION_CONSTRAINTS``, timing caches). **Not executed in this project's CI**:
TensorRT cannot be installed on the development machines. What is tested without it: the import guard and its
message, shape parsing, the profile's size limit (:func:`check_profile`), the engine file name, and the layer-selection
rule (:func:`keeps_fp32`, :func:`pin_precision`) with a fake module that hands out base ``ILayer`` objects as the real
``network.get_layer`` does.

Profile size: TensorRT refuses tensors of more than 2^31 - 1 elements. The graph holds no S x S tensor for all
heads: each attention runs its image's queries in blocks (``onnx.query_blocks`` in ``ifseg.json``), so its largest
tensor is a block's scores, ``B x heads x block x S`` (``S = cells + prompt tokens``, see :func:`attention_elements`).
By default an engine has two profiles that together hold every input of the paper's policy (short side 512, long side
up to 2048: at most 4 096 cells) at batch 1-4: landscape and square (``H <= 512``, ``W <= 2048``) and portrait
(``H <= 2048``, ``W <= 512``); the runtime picks the profile holding each input. Any of ``--min/--opt/--max-shape``
makes it one profile of those shapes. :func:`check_profile` rejects a profile maximum above the limit before the
build, naming the largest batch that fits.

fp16 overflow spots kept in fp32: normalisation layers (LayerNormalization -> ``INormalizationLayer``, or the
Reduce/Pow/Sqrt/Div chain when a parser decomposes it), softmax (attention scores + biases reach large magnitudes),
the feature L2 norm (a sum of 1024 squares overflows fp16's 65504), exp/erf (GELU) and the network outputs.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

from ..runtime.model_dir import ENGINES_DIR, INPUT_NAME, engine_file
from ..geometry import token_grid

DEFAULT_MIN = (1, 3, 16, 16)  # one cell: the paper policy gives very elongated images a short side below 512 px
DEFAULT_OPT = (1, 3, 512, 688)  # a 4:3 image under the paper policy (short side 512)
DEFAULT_MAX = (4, 3, 512, 2048)  # the paper policy's widest landscape input (4 096 cells), batch 4
# two profiles hold every input of the paper's policy: landscape and square, then portrait
DEFAULT_PROFILES = ((DEFAULT_MIN, DEFAULT_OPT, DEFAULT_MAX),
                    (DEFAULT_MIN, (1, 3, 688, 512), (4, 3, 2048, 512)))
TRT_MAX_ELEMENTS = 2 ** 31 - 1  # elements per tensor TensorRT accepts (32-bit volumes)
DEFAULT_WORKSPACE_GB = 8.0
INSTALL_HINT = ("TensorRT is not installed: `pip install tensorrt` (NVIDIA wheels, Linux/Windows with a CUDA GPU) "
                "or use the NGC PyTorch/TensorRT containers; the ONNX model and the onnxruntime/torch backends work "
                "without it")

# layer-name fragments (ONNX node names survive parsing) that mark normalisation / softmax / L2-norm maths
_FP32_NAME = re.compile(r"(layer_?norm|layernormalization|softmax|normalize|reducel2|reducesumsquare|\bnorm\b|"
                        r"_ln\b|pos_ln|erf|gelu)", re.IGNORECASE)


def import_tensorrt():
    """``import tensorrt`` with a clear error when it is absent."""
    try:
        import tensorrt as trt  # noqa: F401
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    return trt


def parse_shape(value: Union[None, str, Sequence[int]], default: Tuple[int, ...]) -> Tuple[int, int, int, int]:
    """``"BxHxW"``, ``"B,3,H,W"`` or a sequence -> ``(B, 3, H, W)``."""
    if value is None:
        return tuple(default)
    if isinstance(value, str):
        parts = [p for p in re.split(r"[x,\s]+", value.strip()) if p]
        try:
            nums = [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"shape {value!r} must be BxHxW or B,3,H,W integers") from None
    else:
        nums = [int(v) for v in value]
    if len(nums) == 3:
        nums = [nums[0], 3, nums[1], nums[2]]
    if len(nums) != 4 or nums[1] != 3 or min(nums) < 1:
        raise ValueError(f"shape {value!r} must be BxHxW or B,3,H,W with positive sizes")
    return tuple(nums)


def profile_shapes(min_shape=None, opt_shape=None, max_shape=None, static_shape=None):
    """The engine's optimisation profiles, a list of (min, opt, max) input shapes, each checked to be ordered:
    :data:`DEFAULT_PROFILES` when no shape is given, else one profile (missing shapes from the first default); a
    static export fixes H and W."""
    if min_shape is None and opt_shape is None and max_shape is None and static_shape is None:
        return [tuple(p) for p in DEFAULT_PROFILES]
    mn, op, mx = (parse_shape(min_shape, DEFAULT_MIN), parse_shape(opt_shape, DEFAULT_OPT),
                  parse_shape(max_shape, DEFAULT_MAX))
    if static_shape is not None:
        H, W = static_shape
        mn, op, mx = ((s[0], 3, H, W) for s in (mn, op, mx))
    if not all(a <= b <= c for a, b, c in zip(mn, op, mx)):
        raise ValueError(f"optimisation profile must satisfy min <= opt <= max per dim, got {mn}, {op}, {mx}")
    return [(mn, op, mx)]


def attention_elements(shape: Sequence[int], *, heads: int, prompt_tokens: int, blocks: Optional[int] = None) -> int:
    """Elements of the largest attention tensor for inputs up to ``shape`` (B, 3, H, W): a query block's scores
    ``B x heads x queries x keys`` (:mod:`~ifseg_rt.model.grid_attention`). Image query blocks hold
    ``ceil(w_i / blocks)`` inner columns (at least ``EXPORT_MIN_QUERIES`` queries' worth) of ``h_o`` rows (the grid or its transpose; both are counted, so the
    bound holds for every shape of the profile) against the cells plus the prompt (encoder) or BOS (decoder) laid
    out in rows of ``w_i`` slots; the prompt's own block and the cross-attention blocks (``ceil((cells + 1) /
    blocks)`` queries against cells + prompt) are counted too. ``blocks``: the graph's query blocks (``ifseg.json``'s
    ``onnx.query_blocks``; default the most a graph has, :data:`~ifseg_rt.model.grid_attention.EXPORT_BLOCKS`)."""
    from ..model.grid_attention import EXPORT_BLOCKS, EXPORT_MIN_QUERIES as least

    nb = int(blocks or EXPORT_BLOCKS)
    b, _, h, w = (int(v) for v in shape)
    gh, gw = token_grid(h, w)
    n, L = gh * gw, int(prompt_tokens)
    largest = max(-(-(n + 1) // nb), least) * (n + L)  # cross-attention
    for ho, wi in ((gh, gw), (gw, gh)):
        keys = n + max(-(-L // wi), 1) * wi  # the prompt (encoder) or BOS (decoder) in rows of w_i slots
        block = min(wi, max(-(-wi // nb), -(-least // ho))) * ho
        largest = max(largest, block * keys, L * keys)
    return b * int(heads) * largest


def check_profile(max_shape: Sequence[int], *, heads: int, prompt_tokens: int, blocks: Optional[int] = None,
                  flag: str = "--max-shape") -> None:
    """Raise ``ValueError`` (naming ``flag``) when the profile maximum needs a tensor above TensorRT's element limit.

    ``prompt_tokens``: the prompt's length, or an upper bound of it (then the check errs on the safe side).
    """
    b, _, h, w = (int(v) for v in max_shape)
    n = attention_elements(max_shape, heads=heads, prompt_tokens=prompt_tokens, blocks=blocks)
    if n <= TRT_MAX_ELEMENTS:
        return
    gh, gw = token_grid(h, w)
    per_item = n // b
    fit_b = TRT_MAX_ELEMENTS // per_item
    hint = f"batch <= {fit_b} at this size, or " if fit_b >= 1 else ""
    raise ValueError(f"{flag} {b}x{h}x{w} ({gh * gw} cells) is too large for TensorRT: an attention block's scores "
                     f"would be a tensor of {n:,} elements ({heads} heads, {prompt_tokens} prompt tokens), above its "
                     f"limit of 2^31 - 1; use {hint}a smaller maximum (the default profiles reach "
                     f"{DEFAULT_MAX[0]}x{DEFAULT_MAX[2]}x{DEFAULT_MAX[3]} and its portrait twin)")


def _attention_dims(model_dir: Union[str, Path], prompt_tokens: Optional[int], manifest: Optional[Dict[str, Any]] = None
                    ) -> Tuple[int, int, Optional[int]]:
    """(heads, prompt length or its bound, the graph's query blocks) from the model directory's ``ifseg.json`` (or
    ``manifest``, its contents before they are written)."""
    from ..runtime.model_dir import load_model_dir, parse_manifest

    spec = load_model_dir(model_dir) if manifest is None else parse_manifest(manifest, model_dir)
    cfg = spec.config
    # without the exact prompt length, the text position table's size bounds it
    return (int(cfg["heads"]), int(prompt_tokens if prompt_tokens is not None else cfg["max_positions"]),
            spec.query_blocks)


def gpu_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    try:
        from cuda import cudart  # cuda-python, shipped next to TensorRT

        err, props = cudart.cudaGetDeviceProperties(0)
        if int(err) == 0:
            return props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    except Exception:
        pass
    raise RuntimeError("no CUDA GPU found: TensorRT engines are built on (and for) the GPU that will run them")


def keeps_fp32(layer, trt) -> bool:
    """Whether ``layer`` must run in fp32 in an fp16/bf16 engine (normalisation, softmax, L2 norm, exp/erf)."""
    lt = trt.LayerType
    kinds = {getattr(lt, n) for n in ("NORMALIZATION", "SOFTMAX", "REDUCE") if hasattr(lt, n)}
    if layer.type in kinds:
        return True
    if layer.type == getattr(lt, "UNARY", None):
        # network.get_layer() returns the base ILayer, which has no .op: downcast first, as TensorRT's own samples do
        layer.__class__ = trt.IUnaryLayer
        ops = trt.UnaryOperation
        if layer.op in {getattr(ops, n) for n in ("SQRT", "ERF", "EXP", "RECIP") if hasattr(ops, n)}:
            return True
    return bool(_FP32_NAME.search(layer.name or ""))


def pin_precision(network, trt) -> int:
    """Set fp32 precision + output types on the layers :func:`keeps_fp32` selects; returns how many."""
    n = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if not keeps_fp32(layer, trt):
            continue
        # shape/index layers (int tensors) cannot take a float precision
        if any(layer.get_output(j).dtype not in (trt.float32, trt.float16, getattr(trt, "bfloat16", trt.float16))
               for j in range(layer.num_outputs)):
            continue
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            layer.set_output_type(j, trt.float32)
        n += 1
    for i in range(network.num_outputs):
        network.get_output(i).dtype = trt.float32
    return n


def build_engine(onnx_path: Union[str, Path], model_dir: Union[str, Path], *, precision: str = "fp16",
                 workspace_gb: Optional[float] = None, min_shape=None, opt_shape=None, max_shape=None,
                 timing_cache: Union[None, str, Path] = None, static_shape=None,
                 prompt_tokens: Optional[int] = None, manifest: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Parse ``onnx_path``, build and serialise an engine into ``model_dir/engines/``; returns its ``ifseg.json``
    record (file, gpu, precision, tensorrt_version, profiles, fp32-pinned layer count).

    ``prompt_tokens``: the baked prompt's length, for the profile size check (default: bounded by the model's text
    positions, which can refuse a profile within about 1.5x of the limit that would fit). ``manifest``: the
    directory's ``ifseg.json`` contents when the file is not written yet (the export builds the engine first).
    """
    if precision not in ("fp32", "fp16", "bf16"):
        raise ValueError(f"precision must be fp32, fp16 or bf16, got {precision!r}")
    profiles = profile_shapes(min_shape, opt_shape, max_shape, static_shape)
    heads, text, blocks = _attention_dims(model_dir, prompt_tokens, manifest)
    for _, _, mx in profiles:
        check_profile(mx, heads=heads, prompt_tokens=text, blocks=blocks, flag="--max-shape" if static_shape is None else
                      "--static-shape (with the batch of --max-shape)")
    trt = import_tensorrt()
    if precision == "bf16" and not hasattr(trt.BuilderFlag, "BF16"):
        raise ValueError(f"precision 'bf16' needs TensorRT >= 9 (BuilderFlag.BF16); TensorRT {trt.__version__} is "
                         f"installed: use --precision fp16 or fp32, or a newer TensorRT")
    gpu = gpu_name()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if int(trt.__version__.split(".")[0]) < 10:  # explicit batch is the only mode (and the flag deprecated) in 10
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # resolves model.onnx.data next to the file
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int((workspace_gb or DEFAULT_WORKSPACE_GB) * (1 << 30)))
    pinned = 0
    if precision != "fp32":
        config.set_flag(trt.BuilderFlag.FP16 if precision == "fp16" else trt.BuilderFlag.BF16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        pinned = pin_precision(network, trt)
    for mn, op, mx in profiles:
        profile = builder.create_optimization_profile()
        profile.set_shape(INPUT_NAME, mn, op, mx)
        config.add_optimization_profile(profile)
    cache_path = Path(timing_cache) if timing_cache else Path(model_dir) / ENGINES_DIR / "timing.cache"
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT engine build failed (see the TensorRT log above)")
    rel = engine_file(gpu, precision)
    path = Path(model_dir) / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(serialized))
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    return {"file": rel, "gpu": gpu, "precision": precision, "tensorrt_version": trt.__version__,
            "profiles": [{"min": list(mn), "opt": list(op), "max": list(mx)} for mn, op, mx in profiles],
            "fp32_layers": pinned,
            "timing_cache": str(cache_path) if timing_cache else f"{ENGINES_DIR}/timing.cache"}
