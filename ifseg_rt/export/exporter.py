"""Export an adapted IFSeg model to a self-describing model directory (ultralytics-style formats table).

=========  ==========================  =====================================  ==================================
Format     ``--format``                Artifact                               Extra options
=========  ==========================  =====================================  ==================================
ONNX       ``onnx``                    ``model.onnx`` (+ ``model.onnx.data``),  opset, static_shape,
                                       ``tables.onnx`` + ``body.onnx``          precision (fp32 / int8 / bf16),
                                       (+ ``body.int8.onnx``)                   calibration, min_agreement, ...
TensorRT   ``engine`` (``trt``,         ``engines/<gpu>-<precision>.engine``     + precision (fp32 / fp16 / bf16),
           ``tensorrt``)                                                        workspace, shapes, timing cache
Triton     ``triton``                  ``<name>/`` ensemble, ``<name>_pre/``,   model_name, max_batch_size,
repository                             ``<name>_onnx/``, ``<name>_post/``       instances, instance_kind, tensorrt,
                                       (:mod:`ifseg_rt.serve.repository`)       trt_precision, trt_cache, ...
=========  ==========================  =====================================  ==================================

``model.onnx`` is the portable graph (image -> logits, features; TensorRT and other consumers build from it). No
graph holds an S x S position table: attention runs in query blocks with the position terms computed per block
(:mod:`ifseg_rt.model.grid_attention`). The runtime's onnxruntime backend prefers the same network split in two:
``tables.onnx`` computes a token grid's absolute positions per attention (O(S)) once, ``body.onnx`` runs the network
on them, so that no request recomputes them. Low precisions (``--precision int8`` / ``bf16``) are added behind an
accuracy gate (:mod:`ifseg_rt.export.precision`).

Python::

    from ifseg_rt.export import export
    export("runs/coco15", "models/coco15")                       # ONNX + model.safetensors + ifseg.json

CLI::

    python -m ifseg_rt.export runs/coco15 --out models/coco15
    python -m ifseg_rt.export ofa_base.pt --categories "sky, road" --bpe-dir bpe/ --out models/zeroshot
    python -m ifseg_rt.export runs/coco15 --out models/coco15 --format trt --precision fp16   # on a GPU machine
    python -m ifseg_rt.export models/coco15 --out triton_repo --format triton     # a model directory -> Triton
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
from dataclasses import dataclass
import platform
import tempfile
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .. import __version__
from ..checkpoint import load_checkpoint, save_checkpoint
from ..files import RUN_FILE, file_record, file_sha256
from ..knn.settings import KnnSettings
from ..model import SegOFA
from ..runtime.model_dir import (BODY_FILE, ENGINES_DIR, GRID_NAME, INPUT_NAME, MANIFEST, ONNX_FILE, OUTPUT_NAMES, SCHEMA_VERSION,
                                 TABLE_NAMES, TABLES_FILE, WEIGHTS_FILE, CPU_PRECISIONS, ModelSpec, build_manifest, load_model_dir,
                                 write_manifest)
from ..geometry import PATCH, token_grid
from ..system import versions
from ..tokenizer import IFSEG_PROMPT_PREFIX, OFATokenizer, build_ifseg_prompt, parse_categories
from ..runtime.preprocess import ImagePolicy
from ..model.grid_attention import EXPORT_BLOCKS, export_query_blocks
from .onnx_model import IFSegBodyGraph, IFSegOnnxModel, IFSegTablesGraph
from .precision import MIN_AGREEMENT, PrecisionGateError, add_precisions, calibration_images

ONNX_INLINE_LIMIT = 2 * 1024 ** 3 - 64 * 1024 ** 2  # bytes; protobuf's 2 GB cap, with headroom for the graph
DEFAULT_OPSET = 18  # >= 17 for LayerNormalization
MIN_OPSET = 17  # LayerNormalization
# the highest opset torch 2.13 exports (its ONNX_MAX_OPSET, a private constant; above it the export fails after the
# model is loaded); 21-23 export and run here, beyond the TorchScript exporter's documented 20
MAX_OPSET = 23
PARITY_ATOL = 1e-3  # max |onnxruntime - torch| on logits/features accepted at export time (fp32)

_COMMON = ("categories", "bpe_dir", "prompt_prefix", "image_policy", "knn", "save_weights", "force", "precision")
_ONNX = ("opset", "static_shape", "normalize_features", "check", "calibration", "min_agreement", "split",
         "bf16_backend")
_TRT = ("workspace_gb", "min_shape", "opt_shape", "max_shape", "timing_cache")
# Triton repository (ifseg_rt.serve.repository.export_repository); from a model directory only these apply
_TRITON = ("model_name", "max_batch_size", "instances", "instance_kind", "tensorrt", "trt_precision", "trt_cache",
           "onnx_stand_in")


def export_formats() -> List[Dict[str, Any]]:
    """The single source of truth for formats: name, ``--format`` value, aliases, artifact, accepted options."""
    return [
        {"format": "ONNX", "arg": "onnx", "aliases": (), "artifact": ONNX_FILE, "gpu": False,
         "options": _COMMON + _ONNX},
        {"format": "TensorRT", "arg": "engine", "aliases": ("trt", "tensorrt"),
         "artifact": "engines/<gpu>-<precision>.engine", "gpu": True, "options": _COMMON + _ONNX + _TRT},
        {"format": "Triton model repository", "arg": "triton", "aliases": ("triton-repository",),
         "artifact": "<name>/ (ensemble), <name>_pre/, <name>_onnx/, <name>_post/", "gpu": False,
         "options": _COMMON + _ONNX + _TRITON},
    ]


def resolve_format(name: str) -> Dict[str, Any]:
    key = name.lower().strip()
    for f in export_formats():
        if key == f["arg"] or key in f["aliases"]:
            return f
    names = [f["arg"] for f in export_formats()] + [a for f in export_formats() for a in f["aliases"]]
    raise ValueError(f"unknown export format {name!r}; choose one of {names}")


def validate_args(fmt: Dict[str, Any], given: Dict[str, Any]) -> None:
    """Reject options the format does not accept, by name (only options set to a non-default value count)."""
    bad = sorted(k for k, v in given.items() if v is not None and k not in fmt["options"])
    if bad:
        raise ValueError(f"option(s) {', '.join('--' + b.replace('_', '-') for b in bad)} are not valid for "
                         f"--format {fmt['arg']} ({fmt['format']}); it accepts "
                         f"{', '.join('--' + o.replace('_', '-') for o in fmt['options'])}")


class ZeroShotWarning(UserWarning):
    """Exporting an OFA checkpoint that was never adapted: IFSeg's zero-shot baseline, not an adapted model."""


# --- sources --------------------------------------------------------------------------------------------------
@dataclass
class Source:
    """What an export starts from."""

    model: SegOFA  # fp32, eval mode, prompt set
    categories: List[str]
    provenance: Dict[str, Any]
    knn: Optional[KnnSettings] = None  # the kNN settings the checkpoint records, if any
    policy: Optional[ImagePolicy] = None  # the image policy a run directory records (what it was validated for)


def load_source(source: Union[str, Path], *, categories: Union[None, str, Sequence[str]] = None,
                bpe_dir: Union[None, str, Path] = None, prompt_prefix: Optional[str] = None) -> Source:
    """A run directory, an IFSeg checkpoint or an un-adapted OFA checkpoint -> :class:`Source`."""
    src = Path(source)
    if not src.exists():
        raise FileNotFoundError(f"export source not found: {src}")
    run: Dict[str, Any] = {}
    weights = src
    if src.is_dir():
        rj = src / RUN_FILE
        if rj.is_file():
            try:
                run = json.loads(rj.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise ValueError(f"{rj} is not valid JSON: {e}") from None
            if not isinstance(run, dict):
                raise ValueError(f"{rj} must hold a JSON object")
            if run.get("finished") is False:
                warnings.warn(f"{src} is an unfinished adaptation run (step {run.get('step')} of {run.get('steps')});"
                              f" exporting its latest save", UserWarning, stacklevel=3)
            weights = src / (run.get("files", {}).get("model") or WEIGHTS_FILE)
        else:
            weights = src / WEIGHTS_FILE
        if not weights.is_file():
            raise FileNotFoundError(f"{src} is not a run directory: {weights.name} is missing")
    want = None
    if categories is not None:
        want = parse_categories(categories)
    ck = load_checkpoint(weights, num_categories=None)
    provenance: Dict[str, Any] = {"source": str(src.resolve()), "weights": str(weights.resolve()),
                                  "weights_sha256": file_sha256(weights), "source_format": ck.source_format}
    if run:
        provenance["run"] = {k: run.get(k) for k in ("format", "version", "step", "steps", "finished", "final_loss",
                                                     "saved_at", "precision") if k in run}
        provenance["run_json_sha256"] = file_sha256(src / RUN_FILE)
    if ck.kind == "ofa":
        if want is None or bpe_dir is None:
            missing = " and ".join(f for f, v in (("--categories", want), ("--bpe-dir", bpe_dir)) if v is None)
            raise ValueError(f"{weights} is an un-adapted OFA checkpoint: pass {missing} to build IFSeg's zero-shot "
                             f"baseline (or export an adaptation run directory)")
        warnings.warn(f"{weights} was never adapted: exporting IFSeg's zero-shot baseline for {len(want)} categories "
                      f"(fresh seg position modules); adapt it first for the paper's image-free results",
                      ZeroShotWarning, stacklevel=3)
        ck = load_checkpoint(weights, num_categories=len(want))
        _set_prompt(ck.model, want, bpe_dir, prompt_prefix, update_table=True)
        provenance["zero_shot"] = True
        return Source(ck.model.float().eval(), want, provenance)
    model: SegOFA = ck.model
    names = ck.categories or run.get("categories")
    if want is not None and names is not None and list(names) != want:
        raise ValueError(f"--categories {want} differ from the {len(names)} categories the model was adapted to "
                         f"({list(names)[:5]}{' ...' if len(names) > 5 else ''}); they are baked into the weights - "
                         f"run the adaptation again for new categories")
    names = list(names) if names is not None else want
    if names is None:
        raise ValueError(f"{weights} does not record its category names; pass --categories")
    if len(names) != model.num_categories:
        raise ValueError(f"{len(names)} category names for a model with M = {model.num_categories}")
    if not model.has_prompt:
        if bpe_dir is None:
            raise ValueError(f"{weights} has no stored prompt token ids; pass --bpe-dir to tokenise the prompt")
        _set_prompt(model, names, bpe_dir, prompt_prefix or ck.prompt_prefix, update_table=False)
    policy = ImagePolicy.from_dict(run["image_policy"]) if run and run.get("image_policy") else None
    return Source(model.float().eval(), names, provenance, knn=ck.knn, policy=policy)


def _set_prompt(model: SegOFA, names: Sequence[str], bpe_dir, prefix: Optional[str], *, update_table: bool) -> None:
    tok = OFATokenizer.from_dir(bpe_dir)
    prompt = build_ifseg_prompt(tok, names, prefix=prefix or IFSEG_PROMPT_PREFIX,
                                max_length=model.config.max_positions)
    model.set_categories(prompt.src_ids, prompt.category_ids, update_table=update_table)


# --- ONNX -------------------------------------------------------------------------------------------------------
def _dummy_shape(static_shape: Optional[Tuple[int, int]]) -> Tuple[int, int]:
    if static_shape is not None:
        return static_shape
    return (320, 384)  # any size works (the graph is branch-free); a small non-square one keeps export fast


def export_onnx(model: SegOFA, path: Union[str, Path], *, opset: int = DEFAULT_OPSET,
                static_shape: Optional[Tuple[int, int]] = None, normalize_features: bool = False,
                metadata: Optional[Dict[str, str]] = None, query_blocks: int = EXPORT_BLOCKS) -> Dict[str, Any]:
    """Write ``path`` (+ ``path.data`` when the model is over 2 GB); returns export facts for ``ifseg.json``.

    Traced with torch.onnx's TorchScript-based exporter: the grid attention's one shape-dependent branch is a
    scripted function that becomes an ONNX ``If`` (``torch.export`` cannot express it without rewriting the model
    around ``torch.cond``).
    """
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"opset must be in [{MIN_OPSET}, {MAX_OPSET}] (LayerNormalization; the highest torch "
                         f"exports), got {opset}")
    path = Path(path)
    grid = None if static_shape is None else token_grid(*static_shape)
    wrapper = IFSegOnnxModel(model, normalize_features=normalize_features, static_grid=grid,
                             query_blocks=query_blocks).eval()
    H, W = _dummy_shape(static_shape)
    g = torch.Generator().manual_seed(0)
    image = torch.randn(2, 3, H, W, generator=g)  # batch 2: a size-1 dim would be specialised
    with torch.inference_mode():
        wrapper(image)  # one eager run first: shape errors surface here, not inside the exporter
    axes = {INPUT_NAME: {0: "batch"}, **{o: {0: "batch", 1: "cells"} for o in OUTPUT_NAMES}}
    if static_shape is None:
        axes[INPUT_NAME].update({2: "height", 3: "width"})
    proto = _trace(wrapper, (image,), [INPUT_NAME], list(OUTPUT_NAMES), axes, opset)
    _name_dims(proto, static_shape, _output_widths(model))
    data_file = save_onnx(proto, path, metadata)
    opset_used = max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    return {"file": path.name, "data_file": data_file, "opset": opset_used,
            "dynamic": static_shape is None, "static_shape": list(static_shape) if static_shape else None,
            "exporter": "torchscript", "query_blocks": int(query_blocks), "input": INPUT_NAME,
            "outputs": list(OUTPUT_NAMES),
            "torch_version": torch.__version__, "onnx_version": onnx_version()}


def onnx_version() -> str:
    import onnx

    return onnx.__version__


def _trace(module, args, inputs, outputs, axes, opset: int):
    """Trace ``module`` to an in-memory ONNX model (weights loaded, constants folded)."""
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.onnx"
        with warnings.catch_warnings():
            # the exporter reports its progress and deprecations through warnings; keep the user's filters clean
            warnings.simplefilter("ignore")
            _quiet(lambda: torch.onnx.export(module.eval(), args, str(raw), input_names=inputs, output_names=outputs,
                                             dynamic_axes=axes, opset_version=opset, dynamo=False,
                                             do_constant_folding=True))
        return onnx.load(str(raw), load_external_data=True)


def save_onnx(proto, path: Path, metadata: Optional[Dict[str, str]] = None) -> Optional[str]:
    """Stamp ``metadata`` and the producer into ``proto``, write it (weights to ``path.data`` when the graph is over
    protobuf's 2 GB) and run ``onnx.checker``; returns the data file's name, or None."""
    import onnx

    for k, v in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    proto.producer_name, proto.producer_version = "ifseg_rt", __version__
    external = proto.ByteSize() > ONNX_INLINE_LIMIT
    data_name = path.name + ".data"
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.parent / data_name).unlink(missing_ok=True)
    if external:
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
    else:
        onnx.save_model(proto, str(path))
    onnx.checker.check_model(str(path))  # by path: works for external data too
    return data_name if external else None


def export_split(model: SegOFA, out_dir: Union[str, Path], *, opset: int = DEFAULT_OPSET,
                 normalize_features: bool = False, metadata: Optional[Dict[str, str]] = None,
                 query_blocks: int = EXPORT_BLOCKS) -> Dict[str, Any]:
    """Write the runtime's split graph: ``tables.onnx`` (grid -> the grid's absolute positions per attention, O(S),
    run once per grid and cached by the runtime) and ``body.onnx`` (image + those -> logits, features). Returns the
    written file names.

    Traced as :func:`export_onnx`.
    """
    out_dir = Path(out_dir)
    core = IFSegOnnxModel(model, normalize_features=normalize_features, query_blocks=query_blocks).eval()
    g = torch.Generator().manual_seed(0)
    image = torch.randn(2, 3, *_dummy_shape(None), generator=g)
    grid = torch.zeros(*token_grid(image.shape[2], image.shape[3]))
    with torch.inference_mode():
        tables = IFSegTablesGraph(core)(grid)
    table_axes = {name: {1: ("S" if name in ("enc_pos_q", "enc_pos_k", "cross_pos_k") else "T")}
                  for name in TABLE_NAMES}
    graphs = {
        TABLES_FILE: (IFSegTablesGraph(core), (grid,), [GRID_NAME], list(TABLE_NAMES),
                      {GRID_NAME: {0: "grid_h", 1: "grid_w"}, **table_axes}),
        BODY_FILE: (IFSegBodyGraph(core), (image, *tables), [INPUT_NAME, *TABLE_NAMES], list(OUTPUT_NAMES),
                    {INPUT_NAME: {0: "batch", 2: "height", 3: "width"}, **table_axes,
                     **{o: {0: "batch", 1: "cells"} for o in OUTPUT_NAMES}}),
    }
    written = {}
    for name, (module, args, inputs, outputs, axes) in graphs.items():
        proto = _trace(module, args, inputs, outputs, axes, opset)
        _name_dims(proto, None, _output_widths(model))
        data_file = save_onnx(proto, out_dir / name, metadata)
        written[name] = [name] + ([data_file] if data_file else [])
    return {"tables": TABLES_FILE, "body": BODY_FILE, "files": [f for fs in written.values() for f in fs]}


def _quiet(fn):
    """Run an exporter call with its progress prints on stdout silenced."""
    import contextlib
    import io

    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            return fn()
    except Exception:
        out = buf.getvalue().strip()
        if out:
            print(out)
        raise


def _name_dims(proto, static_shape, widths: Dict[str, int]) -> None:
    """Readable dims: ``image [batch, 3, height, width]`` -> ``logits [batch, cells, M]``, ``features [batch, cells,
    C]`` (the tracer writes generated names, and leaves ``C`` symbolic, otherwise)."""
    for vi in proto.graph.output:
        if vi.name not in widths:
            continue
        dims = vi.type.tensor_type.shape.dim
        dims[0].dim_param = "batch"
        if static_shape is None:
            dims[1].dim_param = "cells"
        dims[2].dim_value = int(widths[vi.name])
    for vi in proto.graph.input:
        if vi.name != INPUT_NAME:
            continue
        dims = vi.type.tensor_type.shape.dim
        dims[0].dim_param = "batch"
        if static_shape is None:
            dims[2].dim_param, dims[3].dim_param = "height", "width"


def _output_widths(model: SegOFA) -> Dict[str, int]:
    return dict(zip(OUTPUT_NAMES, (model.num_categories, model.config.image_feature_dim)))


def check_onnx_parity(model: SegOFA, onnx_path: Union[str, Path], shapes: Sequence[Tuple[int, int, int]], *,
                      normalize_features: bool = False, seed: int = 0,
                      split: Optional[Tuple[Union[str, Path], Union[str, Path]]] = None) -> Dict[str, float]:
    """Run onnxruntime (CPU) and SegOFA on random images of ``shapes`` (B, H, W); max abs errors. With ``split`` =
    (tables.onnx, body.onnx), the split graph is checked too (its errors under ``split_<output>``)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3

    def session(path):
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    sess = session(onnx_path)
    tables, body = (session(split[0]), session(split[1])) if split else (None, None)
    g = torch.Generator().manual_seed(seed)
    err = {name: 0.0 for name in OUTPUT_NAMES}
    if split:
        err.update({f"split_{name}": 0.0 for name in OUTPUT_NAMES})
    for b, h, w in shapes:
        x = torch.randn(b, 3, h, w, generator=g)
        with torch.inference_mode():
            logits, feats = model(x)
        if normalize_features:
            feats = torch.nn.functional.normalize(feats, dim=-1)
        runs = {"": sess.run(list(OUTPUT_NAMES), {INPUT_NAME: x.numpy()})}
        if split:
            grid = np.zeros(token_grid(h, w), np.float32)
            feeds = dict(zip(TABLE_NAMES, tables.run(list(TABLE_NAMES), {GRID_NAME: grid})))
            runs["split_"] = body.run(list(OUTPUT_NAMES), {INPUT_NAME: x.numpy(), **feeds})
        for prefix, outputs in runs.items():
            for name, got, want in zip(OUTPUT_NAMES, outputs, (logits, feats)):
                diff, seen = float(np.abs(got - want.numpy()).max()), err[prefix + name]
                err[prefix + name] = float("nan") if math.isnan(diff) or math.isnan(seen) else max(seen, diff)
    return err


# --- the whole directory ----------------------------------------------------------------------------------------
def export(source: Union[str, Path, SegOFA], out: Union[str, Path], *, format: str = "onnx",
           categories: Union[None, str, Sequence[str]] = None, bpe_dir: Union[None, str, Path] = None,
           prompt_prefix: Optional[str] = None, image_policy: Optional[ImagePolicy] = None,
           knn: Union[None, KnnSettings, Dict[str, Any]] = None, save_weights: bool = True, force: bool = False, opset: int = DEFAULT_OPSET,
           static_shape: Optional[Tuple[int, int]] = None,
           normalize_features: bool = False, check: bool = True, precision: Union[None, str, Sequence[str]] = None,
           calibration=None, min_agreement: float = MIN_AGREEMENT, split: bool = True, bf16_backend: str = "auto",
           workspace_gb: Optional[float] = None, min_shape=None, opt_shape=None, max_shape=None,
           timing_cache: Union[None, str, Path] = None, log: Optional[Callable[[str], None]] = None) -> ModelSpec:
    """Export ``source`` to the model directory ``out`` (see the module docstring for formats).

    Parameters
    ----------
    source : a run directory (``model.safetensors`` + ``run.json``), a checkpoint file, or a :class:`SegOFA` with
        its prompt set (then ``categories`` names its categories)
    out : model directory to create (must be empty or absent unless ``force``)
    format : ``"onnx"`` or ``"engine"`` (aliases ``"trt"``, ``"tensorrt"``); the engine is built from the ONNX
    image_policy : how originals become network inputs; default the paper's short side 512 (long side <= 2048),
        or the fixed ``static_shape`` when given
    knn : kNN post-processing settings the runtime applies: a :class:`KnnSettings`, or a dict of fields overriding the
        source's own (those its checkpoint records, else the paper's K = 3, 25 iterations, temperature 1)
    save_weights : also write ``model.safetensors`` (the torch backend's weights)
    static_shape : (H, W) to export a graph with fixed spatial size (its absolute positions computed once, as constants)
    check : run ``onnx.checker`` and compare onnxruntime with PyTorch at two resolutions and two batch sizes
    precision : ONNX format: the CPU precision(s) to offer besides fp32, the first being the one the runtime loads
        by default (``"int8"``, ``"bf16"``, ``["int8", "bf16"]``; see :mod:`ifseg_rt.export.precision`); engine
        format: the TensorRT precision ("fp32", "fp16" (default), "bf16")
    calibration, min_agreement : the accuracy gate of low precisions: images (a folder; default synthetic scenes)
        and the fraction of pixels whose label must equal fp32's
    bf16_backend : the engine of the bf16 variant: ``"openvino"`` (the split graph in bfloat16), ``"torch"`` (the
        weights), ``"auto"`` (OpenVINO when installed)
    split : also write the runtime's split graph (``tables.onnx`` + ``body.onnx``; dynamic shapes only)
    log : called with a line per step (the CLI prints them)

    Returns
    -------
    ModelSpec of the written directory (re-read and verified)
    """
    fmt = resolve_format(format)
    if fmt["arg"] == "triton":  # a repository is made from a model directory: export one, then export_repository
        raise ValueError("export() writes model directories; for a Triton repository call "
                         "ifseg_rt.serve.export_repository(model_dir, repo) (the CLI's --format triton does both)")
    trt = {"workspace_gb": workspace_gb, "min_shape": min_shape, "opt_shape": opt_shape, "max_shape": max_shape,
           "timing_cache": timing_cache}
    validate_args(fmt, trt)
    cpu_precisions, engine_precision = _precisions(fmt, precision)
    if not 0.0 <= min_agreement <= 1.0:
        raise ValueError(f"min_agreement must be a fraction in [0, 1], got {min_agreement}")
    if calibration is not None:
        if cpu_precisions == ["fp32"]:
            raise ValueError("--calibration measures the label agreement of a low precision: add --precision int8 "
                             "(or bf16), or drop it")
        calibration_images(calibration)  # a missing, empty or unreadable folder: refused before minutes of work
    if workspace_gb is not None and not (math.isfinite(workspace_gb) and workspace_gb > 0):
        raise ValueError(f"workspace_gb (--workspace-gb) must be a number > 0, got {workspace_gb}")
    out = _check_out(Path(out), force)
    log = log or (lambda msg: None)
    say = log
    policy = _policy(image_policy, static_shape)
    static_shape = policy.size if static_shape is not None else None
    src = _source(source, categories=categories, bpe_dir=bpe_dir, prompt_prefix=prompt_prefix)
    if image_policy is None and static_shape is None and src.policy is not None:
        policy = src.policy  # the run's own: what it was adapted and validated for
        say(f"image policy {policy.describe()}: the run's (run.json); pass --short-side / --image-size to change it")
    else:
        say(f"image policy {policy.describe()}")
    model, names = src.model, src.categories
    if not isinstance(knn, KnnSettings):
        knn = (src.knn or KnnSettings()).replace(**(knn or {}))
    if not model.has_prompt:
        raise ValueError("the model has no prompt (set_categories) to bake into the graph")
    blocks = export_query_blocks(model.config.heads, policy.max_cells, model.prompt_tokens.numel())
    if fmt["arg"] == "engine":  # refuse an engine profile TensorRT cannot build before minutes of ONNX export
        _check_engine_profiles(model, blocks, static_shape, min_shape, opt_shape, max_shape)
    if "int8" in cpu_precisions and (not split or static_shape is not None):
        raise ValueError("--precision int8 needs the split graph: not with --static-shape or --no-split")

    work = out.parent / f".{out.name}.partial-{os.getpid()}"  # everything is written here, then renamed to out
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    if (out / ENGINES_DIR).is_dir():  # engines for other GPUs and the TensorRT timing cache survive a re-export
        shutil.copytree(out / ENGINES_DIR, work / ENGINES_DIR)
    try:
        split = split and static_shape is None  # a static graph has its tables folded in already
        steps = 2 + split + check + (cpu_precisions != ["fp32"]) + (fmt["arg"] == "engine")
        say = _numbered(log, steps)
        manifest = _write_model(work, model, names, knn, policy, src.provenance, say=say, opset=opset,
                                static_shape=static_shape, normalize_features=normalize_features, split=split,
                                check=check, save_weights=save_weights, blocks=blocks)
        gate_error = None
        if cpu_precisions != ["fp32"]:
            say(f"precisions {', '.join(p for p in cpu_precisions if p != 'fp32')}: build, measure the label "
                f"agreement with fp32, gate at {100 * min_agreement:.1f} %")
            try:
                add_precisions(work, manifest, cpu_precisions, calibration=calibration, min_agreement=min_agreement,
                               bf16_backend=bf16_backend)
                manifest["precision"] = cpu_precisions[0]
            except PrecisionGateError as e:  # the fp32 directory is still written, then the refusal raised
                gate_error = e
        if fmt["arg"] == "engine":
            from .tensorrt import build_engine

            say(f"TensorRT engine ({engine_precision})")
            rec = build_engine(work / ONNX_FILE, work, precision=engine_precision, workspace_gb=workspace_gb,
                               min_shape=min_shape, opt_shape=opt_shape, max_shape=max_shape,
                               timing_cache=timing_cache, static_shape=static_shape,
                               prompt_tokens=model.prompt_tokens.numel(), manifest=manifest)
            manifest["engines"].append(rec)
            manifest["files"][rec["file"]] = file_record(work / rec["file"])
        write_manifest(work, manifest)  # the one write of ifseg.json
        _replace_dir(work, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if gate_error is not None:
        raise gate_error
    spec = load_model_dir(out)
    spec.verify()
    return spec


def _numbered(log: Callable[[str], None], total: int) -> Callable[[str], None]:
    """``log`` with each call numbered ``[k/total]`` (the steps that run, so none is skipped in the count)."""
    count = [0]

    def say(msg: str) -> None:
        count[0] += 1
        log(f"[{count[0]}/{total}] {msg}")
    return say


# --- the steps of export() -----------------------------------------------------------------------------------------
def _precisions(fmt: Dict[str, Any], precision) -> Tuple[List[str], Optional[str]]:
    """(CPU precisions, TensorRT precision) of an export request."""
    if fmt["arg"] == "engine":
        if precision is not None and precision not in ("fp32", "fp16", "bf16"):
            raise ValueError(f"--format engine takes one precision of fp32, fp16, bf16, got {precision!r}")
        return ["fp32"], precision or "fp16"
    cpu = [precision] if isinstance(precision, str) else list(precision or ["fp32"])
    bad = [p for p in cpu if p not in CPU_PRECISIONS]
    if bad or not cpu:
        raise ValueError(f"--precision {','.join(cpu)}: the CPU engines offer {list(CPU_PRECISIONS)}")
    twice = sorted({p for p in cpu if cpu.count(p) > 1})
    if twice:
        raise ValueError(f"--precision {','.join(cpu)} lists {', '.join(twice)} more than once")
    return cpu, None


def _check_out(out: Path, force: bool) -> Path:
    """The output directory, refused before any work when it is a file or holds something else than a model."""
    out = out.resolve()
    cwd = Path.cwd().resolve()
    if out == cwd or out in cwd.parents:
        raise ValueError(f"--out {out} is (or holds) the current directory; the export replaces the directory as a "
                         f"whole: run it from elsewhere or give another --out")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file; the export writes a directory (e.g. --out {out.with_suffix('')})")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise FileExistsError(f"output directory {out} is not empty; pass force=True (--force) to overwrite")
        if not (out / MANIFEST).is_file():
            raise FileExistsError(f"refusing to overwrite {out}: it is not empty and holds no {MANIFEST}")
        try:
            listed = set(json.loads((out / MANIFEST).read_text(encoding="utf-8")).get("files", {}))
        except (ValueError, OSError, AttributeError):
            listed = set()
        ours = {MANIFEST, ENGINES_DIR} | {f.split("/")[0] for f in listed}
        foreign = sorted(p.name for p in out.iterdir() if p.name not in ours)
        if foreign:  # the directory is replaced as a whole: never take a user's files with it
            raise FileExistsError(f"refusing to overwrite {out}: it holds files that are not part of its model "
                                  f"({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}); move them or "
                                  f"choose another --out")
    return out


def _policy(image_policy: Optional[ImagePolicy], static_shape) -> ImagePolicy:
    if static_shape is None:
        return image_policy or ImagePolicy()
    static_shape = (int(static_shape[0]), int(static_shape[1]))
    if min(static_shape) < PATCH:
        raise ValueError(f"static shape {static_shape} must be at least {PATCH} px per side")
    if image_policy is not None and (image_policy.mode != "fixed" or image_policy.size != static_shape):
        raise ValueError(f"a static-shape export needs the fixed image policy {static_shape}, got {image_policy}")
    return ImagePolicy(mode="fixed", size=static_shape)


def _source(source, *, categories, bpe_dir, prompt_prefix) -> Source:
    if not isinstance(source, SegOFA):
        return load_source(source, categories=categories, bpe_dir=bpe_dir, prompt_prefix=prompt_prefix)
    model = source
    if source.training or any(t.dtype != torch.float32 for t in source.parameters()):
        model = copy.deepcopy(source).float().eval()  # never change the caller's model
    if categories is None:
        raise ValueError("pass categories= (names) when exporting a SegOFA object")
    names = parse_categories(categories)
    if len(names) != model.num_categories:
        raise ValueError(f"{len(names)} category names for a model with M = {model.num_categories}")
    return Source(model, names, {"source": "<in-memory SegOFA>"})


def _check_engine_profiles(model: SegOFA, blocks: int, static_shape, min_shape, opt_shape, max_shape) -> None:
    """Everything an engine build needs that can be checked before minutes of ONNX export: the profiles' sizes,
    TensorRT and a GPU here."""
    from .tensorrt import check_profile, gpu_name, import_tensorrt, profile_shapes

    import_tensorrt()
    gpu_name()
    for _, _, mx in profile_shapes(min_shape, opt_shape, max_shape, static_shape):
        check_profile(mx, heads=model.config.heads, prompt_tokens=model.prompt_tokens.numel(), blocks=blocks,
                      flag="--max-shape" if static_shape is None else "--static-shape (with the batch of --max-shape)")


def _write_model(out: Path, model: SegOFA, names: List[str], knn: KnnSettings, policy: ImagePolicy,
                 provenance: Dict[str, Any], *, say, opset: int, static_shape, normalize_features: bool, split: bool,
                 check: bool, save_weights: bool, blocks: int) -> Dict[str, Any]:
    """Steps 1-4 into ``out``: the portable graph, the split graph, the parity check, the weights; returns the fp32
    manifest (not written)."""
    cfg = model.config
    meta = {"ifseg_rt.schema_version": str(SCHEMA_VERSION), "ifseg_rt.categories": json.dumps(names),
            "ifseg_rt.config": json.dumps(cfg.to_dict()), "ifseg_rt.image_policy": json.dumps(policy.to_dict()),
            "ifseg_rt.knn": json.dumps(knn.to_dict()), "ifseg_rt.version": __version__}
    say(f"{ONNX_FILE}: the portable graph (opset {opset})")
    onnx_info = export_onnx(model, out / ONNX_FILE, opset=opset, static_shape=static_shape,
                            normalize_features=normalize_features, metadata=meta, query_blocks=blocks)
    files = [ONNX_FILE] + ([onnx_info["data_file"]] if onnx_info["data_file"] else [])
    split_pair = None
    if split:
        say(f"{TABLES_FILE} + {BODY_FILE}: the runtime's split graph")
        info = export_split(model, out, opset=opset, normalize_features=normalize_features, metadata=meta,
                            query_blocks=blocks)
        onnx_info.update(tables=info["tables"], body=info["body"])
        files += info["files"]
        split_pair = (out / info["tables"], out / info["body"])
    verification = None
    if check:
        say("onnxruntime vs PyTorch parity check")
        if static_shape is None:
            g = cfg.seg_grid
            # non-square, N < G^2 off the G x G grid (direct position lookup), and N > G^2 (resized positions)
            shapes = [(1, 128, 160), (2, 96, 80), (1, PATCH * (g + 1), PATCH * (g + 2))]
        else:
            shapes = [(1, *static_shape), (2, *static_shape)]
        err = check_onnx_parity(model, out / ONNX_FILE, shapes, normalize_features=normalize_features,
                                split=split_pair)
        verification = {"shapes": [list(s) for s in shapes], "max_abs_error": err, "atol": PARITY_ATOL}
        if not all(e <= PARITY_ATOL for e in err.values()):  # NaN fails too
            if not all(np.isfinite(list(err.values()))):
                raise RuntimeError(f"the model's outputs are not finite (NaN or Inf; parity errors {err}): its "
                                   f"weights are broken (a diverged training run?); nothing was exported")
            raise RuntimeError(f"onnxruntime disagrees with PyTorch beyond {PARITY_ATOL}: {err}; the export is wrong")
    say(f"{WEIGHTS_FILE} + {MANIFEST}" if save_weights else MANIFEST)
    if save_weights:
        save_checkpoint(model, out / WEIGHTS_FILE, categories=names, provenance=provenance, knn=knn)
        files.append(WEIGHTS_FILE)
    provenance = {**provenance, "versions": versions("torch", "onnx", "onnxruntime", "onnxscript"),
                  "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "host": platform.node(), "verification": verification}
    return build_manifest(categories=names, config=cfg.to_dict(), policy=policy, knn=knn,
                          feature_dim=cfg.image_feature_dim, normalize_features=normalize_features, precision="fp32",
                          onnx=onnx_info, files={f: file_record(out / f) for f in files}, provenance=provenance)


def _replace_dir(work: Path, out: Path) -> None:
    """Move the finished ``work`` directory to ``out`` (a previous model there is replaced as a whole), so that
    ``out`` never holds half an export."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    try:
        os.replace(work, out)
    except OSError:
        if old is not None:
            os.replace(old, out)  # the previous model stays where it was
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
