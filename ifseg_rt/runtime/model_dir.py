"""The self-describing model directory written by ``python -m ifseg_rt.export`` and read by :class:`Segmenter`: the
one owner of its schema (``ifseg.json``), file names, I/O names and engine naming.

Layout::

    DIR/ifseg.json                     schema below; everything the runtime needs to configure itself
    DIR/model.onnx                     image -> (logits, features), prompt baked in (+ model.onnx.data when > 2 GB)
    DIR/tables.onnx, DIR/body.onnx     the same graph split in two for the runtime: grid -> the grid's absolute
                                       positions per attention (O(S); run once per grid and cached), image +
                                       positions -> (logits, features)
    DIR/body.int8.onnx                 the body with int8 weights (``--precision int8``)
    DIR/model.safetensors              the same weights for the torch backend (optional)
    DIR/engines/<gpu>-<precision>.engine   TensorRT engines (optional, one per GPU model and precision)

:func:`build_manifest` writes the schema (the exporter calls it), :func:`parse_manifest` reads and validates it:
every field is checked on load and errors name the field; every file listed in ``files`` is checked (size, then
sha256) before it is used. Torch-free.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from ..files import RUN_FILE, WEIGHTS_FILE, file_record, file_sha256
from ..knn.settings import KnnSettings
from .preprocess import MEAN, PATCH, STD, ImagePolicy

SCHEMA_VERSION = 2  # 2: graphs without S x S position tables (version 1 split graphs passed them between graphs)
FORMAT = "ifseg_rt.model_dir"
MANIFEST_FIELDS = ("schema_version", "format", "categories", "num_categories", "image", "patch_stride", "knn",
                   "outputs", "precision", "precisions", "config", "engines", "files", "onnx", "provenance")
MANIFEST = "ifseg.json"
ONNX_FILE = "model.onnx"
ENGINES_DIR = "engines"
TABLES_FILE = "tables.onnx"
BODY_FILE = "body.onnx"
INPUT_NAME = "image"  # Bx3xHxW float32, normalised
OUTPUT_NAMES = ("logits", "features")  # BxNxM, BxNxC
GRID_NAME = "grid"  # tables.onnx input: an h x w float tensor, only its shape is read
# tables.onnx outputs = body.onnx inputs after the image: H x T x head_dim absolute positions per attention (the
# order of SegTables.positions)
TABLE_NAMES = ("enc_pos_q", "enc_pos_k", "dec_pos_q", "dec_pos_k", "cross_pos_q", "cross_pos_k")
PRECISIONS = ("fp32", "fp16", "bf16", "int8")  # of the whole directory's default and of engines
CPU_PRECISIONS = ("fp32", "int8", "bf16")  # what the CPU engines offer: onnxruntime fp32 / int8, bf16 ...
CPU_BACKENDS = ("onnxruntime", "openvino", "torch")  # ... on OpenVINO (the split graph) or torch (the weights)

__all__ = ["SCHEMA_VERSION", "FORMAT", "MANIFEST", "ONNX_FILE", "WEIGHTS_FILE", "ENGINES_DIR", "TABLES_FILE",
           "BODY_FILE", "INPUT_NAME", "OUTPUT_NAMES", "GRID_NAME", "TABLE_NAMES", "PRECISIONS", "CPU_PRECISIONS",
           "CPU_BACKENDS",
           "ModelDirError", "EngineSpec", "PrecisionSpec", "ModelSpec", "gpu_slug", "engine_file",
           "build_manifest", "parse_manifest", "spec_for_model", "load_model_dir", "write_manifest", "file_record", "file_sha256"]


class ModelDirError(ValueError):
    """A model directory that cannot be used: missing/malformed ``ifseg.json`` field, missing/tampered file, or an
    engine file that its engine cannot load or whose outputs disagree with ``ifseg.json``."""


def gpu_slug(name: str) -> str:
    """File-safe GPU name (``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``); engines are matched by it."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def engine_file(gpu: str, precision: str) -> str:
    """Relative path of the TensorRT engine built on ``gpu`` in ``precision``."""
    return f"{ENGINES_DIR}/{gpu_slug(gpu)}-{precision}.engine"


# --- field validation helpers -----------------------------------------------------------------------------------
def _get(d: Dict[str, Any], key: str, where: str, types, *, optional: bool = False, default=None):
    name = f"{where}.{key}" if where else key
    if not isinstance(d, dict):
        raise ModelDirError(f"{MANIFEST}: field '{where}' must be an object, got {type(d).__name__}")
    if key not in d:
        if optional:
            return default
        raise ModelDirError(f"{MANIFEST}: missing field '{name}'")
    v = d[key]
    if v is None and optional:
        return default
    if isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise ModelDirError(f"{MANIFEST}: field '{name}' must be {_tname(types)}, got {v!r}")
    if not isinstance(v, types):
        raise ModelDirError(f"{MANIFEST}: field '{name}' must be {_tname(types)}, got {type(v).__name__} {v!r}")
    return v


def _tname(types) -> str:
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join({int: "an integer", float: "a number", str: "a string", bool: "a boolean", list: "a list",
                        dict: "an object"}.get(t, t.__name__) for t in types)


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ModelDirError(f"{MANIFEST}: field '{name}' {msg}")


@dataclass(frozen=True)
class EngineSpec:
    file: str  # relative path, engines/<gpu>-<precision>.engine
    gpu: str  # torch/CUDA device name it was built on (engines are not portable across GPU models)
    precision: str
    tensorrt_version: str
    # optimisation profiles, in the engine's order: [{"min": [B, 3, H, W], "opt": ..., "max": ...}, ...]
    profiles: Tuple[Dict[str, Any], ...] = ()

    def profile_for(self, shape: Sequence[int]) -> Optional[int]:
        """Index of the first profile whose range holds the input ``shape`` (B, 3, H, W), or None."""
        for i, p in enumerate(self.profiles):
            lo, hi = p.get("min"), p.get("max")
            if lo and hi and all(a <= s <= b for a, s, b in zip(lo, shape, hi)):
                return i
        return None


@dataclass(frozen=True)
class PrecisionSpec:
    """One compute precision a model directory offers to the CPU engines, with its accuracy gate."""

    name: str  # "fp32", "int8" or "bf16"
    backend: str  # "onnxruntime" (fp32, int8), "openvino" or "torch" (bf16)
    body: Optional[str] = None  # the split graph's body for this precision (onnxruntime, openvino)
    method: str = ""  # how it was made (e.g. "onnxruntime dynamic int8, MatMul weights per channel")
    agreement: Optional[Dict[str, Any]] = None  # {"pixels": fraction of labels equal to fp32's, "images": n, ...}


@dataclass(frozen=True)
class ModelSpec:
    """Parsed, validated ``ifseg.json``."""

    root: Optional[Path]  # None for an in-memory model (Segmenter.from_model): no files
    categories: Tuple[str, ...]
    policy: ImagePolicy
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    input_dtype: str
    patch_stride: int
    knn: KnnSettings
    feature_dim: int
    features_normalized: bool
    precision: str
    config: Dict[str, Any]
    onnx_file: Optional[str]
    tables_file: Optional[str]  # the split graph, when exported (dynamic shapes only)
    body_file: Optional[str]
    precisions: Dict[str, PrecisionSpec]  # always holds "fp32"
    opset: Optional[int]
    static_shape: Optional[Tuple[int, int]]
    seg_grid: int
    image_bucket_size: int
    files: Dict[str, Dict[str, Any]]
    engines: Tuple[EngineSpec, ...]
    provenance: Dict[str, Any]
    raw: Dict[str, Any]
    query_blocks: Optional[int] = None  # the ONNX graphs' query blocks per attention (onnx.query_blocks)

    @property
    def num_categories(self) -> int:
        return len(self.categories)

    def path(self, name: str) -> Path:
        if self.root is None:
            raise ModelDirError(f"an in-memory model has no file {name}")
        return self.root / name

    @property
    def source(self) -> str:
        """How errors name this model: its directory, or ``<in-memory model>``."""
        return str(self.root) if self.root is not None else "<in-memory model>"

    def files_for(self, backend: str, precision: str = "fp32", *, gpu: bool = False) -> List[str]:
        """The listed files ``backend`` reads for ``precision`` (what loading verifies; what ``bench`` sizes). On a
        GPU onnxruntime runs the portable graph; a TensorRT engine is chosen by GPU model at load time, so every
        engine counts."""
        if backend in ("onnxruntime", "openvino"):
            rec = self.precisions.get(precision)
            if backend == "openvino":  # always the split graph: the precision's body, else the fp32 one
                names = [self.tables_file, rec.body if rec is not None and rec.backend == backend else self.body_file]
            else:
                split = not gpu and rec is not None and rec.body is not None and self.tables_file is not None
                names = [self.tables_file, rec.body] if split else [self.onnx_file]
            return [f for f in self.files if f in names or f in [n + ".data" for n in names]]
        if backend == "torch":
            return [WEIGHTS_FILE] if self.has_file(WEIGHTS_FILE) else []
        return [e.file for e in self.engines]

    def check_outputs(self, num_categories: int, feature_dim: Optional[int], file: str) -> None:
        """Raise :class:`ModelDirError` when an engine's output widths disagree with ``ifseg.json``."""
        if num_categories != self.num_categories:
            raise ModelDirError(f"{self.source}/{file} outputs {num_categories} category scores per cell (logits "
                                f"[batch, cells, {num_categories}]) but {MANIFEST} lists {self.num_categories} "
                                f"categories: the manifest does not belong to this model; re-export it")
        if feature_dim is not None and feature_dim != self.feature_dim:
            raise ModelDirError(f"{self.source}/{file} outputs {feature_dim} feature channels but {MANIFEST} "
                                f"declares outputs.features.shape [batch, cells, {self.feature_dim}]; re-export it")

    def check_split(self, produced: Dict[str, Sequence[Optional[int]]], consumed: Dict[str, Sequence[Optional[int]]],
                    body_file: str) -> None:
        """Raise :class:`ModelDirError` when the split graph's per-grid tables (``produced``: the tables graph's
        output shapes by name, ``None`` for symbolic dimensions) cannot feed the body (``consumed``: its inputs'):
        a ``tables.onnx`` of another model (other heads or head size)."""
        for name, want in consumed.items():
            got = produced.get(name)
            if got is None:
                continue  # names are checked by the backends
            bad = len(got) != len(want) or any(a is not None and b is not None and a != b for a, b in zip(got, want))
            if bad:
                fmt = lambda dims: "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"  # noqa: E731
                raise ModelDirError(f"{self.source}/{self.tables_file} gives {name} of shape {fmt(got)} but "
                                    f"{self.source}/{body_file} takes {fmt(want)}: the two graphs belong to different "
                                    f"models; re-export the directory")

    def has_file(self, name: str) -> bool:
        return name in self.files

    def verify(self, names: Optional[List[str]] = None) -> None:
        """Check size then sha256 of ``names`` (default: every listed file); raise :class:`ModelDirError`."""
        for name in (names if names is not None else list(self.files)):
            rec = self.files.get(name)
            if rec is None:
                raise ModelDirError(f"{self.source}: {name} is not listed in {MANIFEST} 'files'")
            p = self.path(name)
            if not p.is_file():
                raise ModelDirError(f"{self.root}: file {name} listed in {MANIFEST} is missing")
            size = p.stat().st_size
            if size != rec["bytes"]:
                raise ModelDirError(f"{p}: size {size} bytes, {MANIFEST} records {rec['bytes']} "
                                    f"({'truncated' if size < rec['bytes'] else 'modified'} file); re-export the model")
            sha = file_sha256(p)
            if sha != rec["sha256"]:
                raise ModelDirError(f"{p}: sha256 {sha[:16]}... does not match {MANIFEST} ({rec['sha256'][:16]}...): "
                                    f"the file was modified or corrupted; re-export the model")

    def check_grid(self, h: int, w: int) -> None:
        """The IFSeg position rule looks positions up directly when N <= G^2: the grid must fit the table."""
        s = self.image_bucket_size
        if h * w <= self.seg_grid ** 2 and (h > s or w > s):
            raise ValueError(f"image token grid {h}x{w} (N = {h * w} <= {self.seg_grid ** 2}) takes IFSeg's direct "
                             f"position lookup, which needs both sides <= {s} cells (the original silently aliases "
                             f"column ids past {s} into the next table row; we refuse instead). This happens for "
                             f"very elongated images (about 16:1 or more under the default policy): crop or pad the "
                             f"image to a less extreme aspect ratio, or use a fixed-size image policy")


def build_manifest(*, categories: Sequence[str], config: Mapping[str, Any], policy: ImagePolicy, knn: KnnSettings,
                   feature_dim: int, normalize_features: bool = False, precision: str = "fp32",
                   onnx: Optional[Mapping[str, Any]] = None, files: Optional[Mapping[str, Any]] = None,
                   engines: Sequence[Mapping[str, Any]] = (), provenance: Optional[Mapping[str, Any]] = None,
                   precisions: Optional[Mapping[str, Mapping[str, Any]]] = None) -> Dict[str, Any]:
    """The ``ifseg.json`` dictionary of a model (validated by :func:`parse_manifest` before it is returned).

    Parameters
    ----------
    categories : names, index = label
    config : the model's ``OFAConfig.to_dict()``
    policy, knn : image policy and kNN post-processing the runtime applies
    feature_dim : C of the ``features`` output; ``normalize_features``: whether the graph L2-normalises them
    onnx : facts of the ONNX file (``file``, ``opset``, ``static_shape``, ...); None when there is none
    files : ``{relative path: file_record(...)}`` of every file the directory holds
    engines : TensorRT engine records (``file``, ``gpu``, ``precision``, ``tensorrt_version``, ``profiles``)
    precision : the CPU precision the runtime loads by default; precisions: the low-precision variants on offer,
        ``{name: {"backend": ..., "body": file (onnxruntime), "method": ..., "agreement": {...}}}``
    """
    names = list(categories)
    manifest: Dict[str, Any] = {
        "schema_version": SCHEMA_VERSION, "format": FORMAT,
        "categories": names, "num_categories": len(names),
        "image": {"policy": policy.to_dict(),
                  "input": {"name": INPUT_NAME, "dtype": "float32", "layout": "NCHW", "color": "RGB",
                            "scale": 1.0 / 255.0, "mean": list(MEAN), "std": list(STD),
                            "resize": "bilinear (OpenCV INTER_LINEAR) from the original to the policy size",
                            "orientation": "EXIF orientation applied first"},
                  "min_side": PATCH},
        "patch_stride": PATCH,
        "knn": knn.to_dict(),
        "outputs": {OUTPUT_NAMES[0]: {"shape": ["batch", "cells", len(names)], "dtype": "float32",
                                      "meaning": "per-cell category logits, cells = ceil(H/16)*ceil(W/16) row-major"},
                    OUTPUT_NAMES[1]: {"shape": ["batch", "cells", int(feature_dim)], "dtype": "float32",
                                      "normalized": bool(normalize_features),
                                      "meaning": "ResNet layer3 features (kNN post-processing)"}},
        "precision": precision,
        "config": dict(config),
        "engines": [dict(e) for e in engines],
        "files": dict(files or {}),
        "provenance": dict(provenance or {}),
    }
    if onnx is not None:
        manifest["onnx"] = dict(onnx)
    if precisions:
        manifest["precisions"] = {k: dict(v) for k, v in precisions.items()}
    parse_manifest(manifest, None)
    return manifest


def parse_manifest(d: Any, root: Union[None, str, Path] = ".") -> ModelSpec:
    """Validate a loaded ``ifseg.json`` dict; errors name the offending field."""
    if not isinstance(d, dict):
        raise ModelDirError(f"{MANIFEST} must hold a JSON object, got {type(d).__name__}")
    ver = _get(d, "schema_version", "", int)
    _check(ver == SCHEMA_VERSION, "schema_version", f"is {ver}; this runtime reads version {SCHEMA_VERSION}"
           + (" (version 1 graphs hold per-grid S x S position tables: re-export the model with "
              "`python -m ifseg_rt.export`)" if ver == 1 else ""))
    unknown = sorted(set(d) - set(MANIFEST_FIELDS))
    _check(not unknown, unknown[0] if unknown else "", f"is not a field of schema version {SCHEMA_VERSION} "
           f"(unknown: {unknown}; the fields are {list(MANIFEST_FIELDS)})")
    cats = _get(d, "categories", "", list)
    _check(len(cats) >= 1 and all(isinstance(c, str) and c.strip() and c.isprintable() for c in cats), "categories",
           "must be a non-empty list of names (printable, not blank)")
    seen: Dict[str, int] = {}
    for i, c in enumerate(cats):
        _check(c not in seen, "categories", f"names {c!r} twice (entries {seen.get(c)} and {i}): labels would be "
                                            f"ambiguous")
        seen[c] = i
    m = _get(d, "num_categories", "", int)
    _check(m == len(cats), "num_categories", f"is {m} but 'categories' has {len(cats)} names")

    img = _get(d, "image", "", dict)
    pol = _get(img, "policy", "image", dict)
    try:
        policy = ImagePolicy.from_dict(pol)
    except (TypeError, ValueError) as e:
        raise ModelDirError(f"{MANIFEST}: field 'image.policy' is invalid: {e}") from None
    inp = _get(img, "input", "image", dict)
    dtype = _get(inp, "dtype", "image.input", str)
    _check(dtype == "float32", "image.input.dtype", f"is {dtype!r}; this runtime feeds 'float32'")
    layout = _get(inp, "layout", "image.input", str)
    _check(layout == "NCHW", "image.input.layout", f"is {layout!r}; expected 'NCHW'")
    mean = _get(inp, "mean", "image.input", list)
    std = _get(inp, "std", "image.input", list)
    for name, v in (("mean", mean), ("std", std)):
        _check(len(v) == 3 and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v),
               f"image.input.{name}", "must be three numbers")
    _check(all(s > 0 for s in std), "image.input.std", "must be positive")
    _check(tuple(mean) == MEAN and tuple(std) == STD, "image.input.mean",
           f"is {mean}/{std}; this runtime implements mean = std = 0.5 (OFA)")
    stride = _get(d, "patch_stride", "", int)
    _check(stride == PATCH, "patch_stride", f"is {stride}; the OFA ResNet has output stride {PATCH}")

    kd = _get(d, "knn", "", dict)
    try:
        knn = KnnSettings.from_dict(kd)
    except ValueError as e:
        raise ModelDirError(f"{MANIFEST}: {e}") from None

    outs = _get(d, "outputs", "", dict)
    ln, fn = OUTPUT_NAMES
    lo = _get(outs, ln, "outputs", dict)
    fo = _get(outs, fn, "outputs", dict)
    lshape = _get(lo, "shape", f"outputs.{ln}", list)
    fshape = _get(fo, "shape", f"outputs.{fn}", list)
    _check(len(lshape) == 3 and lshape[2] == m, f"outputs.{ln}.shape", f"must be [batch, cells, {m}], got {lshape}")
    _check(len(fshape) == 3 and isinstance(fshape[2], int) and fshape[2] >= 1, f"outputs.{fn}.shape",
           f"must be [batch, cells, C], got {fshape}")
    normalized = bool(_get(fo, "normalized", f"outputs.{fn}", bool, optional=True, default=False))

    prec = _get(d, "precision", "", str)
    _check(prec in PRECISIONS, "precision", f"must be one of {PRECISIONS}, got {prec!r}")
    cfg = _get(d, "config", "", dict)
    for key in ("patch_image_size", "image_bucket_size", "d_model"):
        v = cfg.get(key)
        _check(isinstance(v, int) and not isinstance(v, bool) and v >= 1, f"config.{key}",
               f"must be an integer >= 1, got {v!r}")
    _check(cfg["patch_image_size"] % PATCH == 0, "config.patch_image_size",
           f"must be a multiple of the {PATCH} px cell (the reference grid side is patch_image_size / {PATCH}), got "
           f"{cfg['patch_image_size']}")

    files = _get(d, "files", "", dict)
    for name, rec in files.items():
        _check(isinstance(rec, dict) and isinstance(rec.get("sha256"), str) and len(rec["sha256"]) == 64
               and isinstance(rec.get("bytes"), int), f"files.{name}", "must be {sha256: 64 hex chars, bytes: int}")
        _check(not Path(name).is_absolute() and ".." not in Path(name).parts, f"files.{name}",
               "must be a path inside the model directory")

    od = _get(d, "onnx", "", dict, optional=True)
    onnx_file = opset = static = tables = body = blocks = None
    if od is not None:
        onnx_file = _get(od, "file", "onnx", str)
        _check(onnx_file in files, "onnx.file", f"names {onnx_file!r}, which is not listed in 'files'")
        tables = _get(od, "tables", "onnx", str, optional=True)
        body = _get(od, "body", "onnx", str, optional=True)
        _check((tables is None) == (body is None), "onnx.tables", "and 'onnx.body' come together")
        for key, f in (("tables", tables), ("body", body)):
            _check(f is None or f in files, f"onnx.{key}", f"names {f!r}, which is not listed in 'files'")
        opset = _get(od, "opset", "onnx", int)
        _check(opset >= 17, "onnx.opset", f"must be >= 17, got {opset}")
        blocks = _get(od, "query_blocks", "onnx", int, optional=True)
        _check(blocks is None or blocks >= 1, "onnx.query_blocks", f"must be >= 1, got {blocks}")
        st = _get(od, "static_shape", "onnx", list, optional=True)
        if st is not None:
            _check(len(st) == 2 and all(isinstance(v, int) and v >= PATCH for v in st), "onnx.static_shape",
                   f"must be [H, W] with both >= {PATCH}, got {st}")
            static = (st[0], st[1])
            _check(policy.mode == "fixed" and policy.size == static, "image.policy",
                   f"must be the fixed size {list(static)} of the static-shape graph, got {pol}")
    engines = []
    for i, e in enumerate(_get(d, "engines", "", list, optional=True, default=[])):
        where = f"engines[{i}]"
        ef = _get(e, "file", where, str)
        _check(ef in files, f"{where}.file", f"names {ef!r}, which is not listed in 'files'")
        profiles = _get(e, "profiles", where, list, optional=True, default=[])
        for j, prof in enumerate(profiles):
            for key in ("min", "opt", "max"):
                dims = _get(prof, key, f"{where}.profiles[{j}]", list)
                _check(len(dims) == 4 and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in dims),
                       f"{where}.profiles[{j}].{key}", "must be four positive integers (B, 3, H, W)")
        engines.append(EngineSpec(file=ef, gpu=_get(e, "gpu", where, str), precision=_get(e, "precision", where, str),
                                  tensorrt_version=_get(e, "tensorrt_version", where, str),
                                  profiles=tuple(dict(p) for p in profiles)))
    precisions = {"fp32": PrecisionSpec("fp32", "onnxruntime" if onnx_file else "torch", body=body)}
    for name, rec in _get(d, "precisions", "", dict, optional=True, default={}).items():
        where = f"precisions.{name}"
        _check(name in CPU_PRECISIONS, where, f"is not one of {CPU_PRECISIONS}")
        backend = _get(rec, "backend", where, str)
        _check(backend in CPU_BACKENDS, f"{where}.backend", f"must be one of {CPU_BACKENDS}, got {backend!r}")
        pb = _get(rec, "body", where, str, optional=True)
        _check(pb is None or pb in files, f"{where}.body", f"names {pb!r}, which is not listed in 'files'")
        _check(backend == "torch" or (pb is not None and tables is not None), f"{where}.body",
               f"is required (with onnx.tables) for an {backend} precision")
        _check(backend != "torch" or WEIGHTS_FILE in files, where, f"needs {WEIGHTS_FILE} for the torch backend")
        precisions[name] = PrecisionSpec(name, backend, body=pb,
                                         method=_get(rec, "method", where, str, optional=True, default=""),
                                         agreement=_get(rec, "agreement", where, dict, optional=True))
    _check(prec in precisions or prec in ("fp16",), "precision",
           f"is {prec!r}, which the directory does not offer (precisions: {sorted(precisions)})")
    prov = _get(d, "provenance", "", dict)
    return ModelSpec(root=None if root is None else Path(root), categories=tuple(cats), policy=policy,
                     mean=tuple(mean), std=tuple(std), input_dtype=dtype, patch_stride=stride, knn=knn, feature_dim=fshape[2],
                     features_normalized=normalized, precision=prec, config=cfg, onnx_file=onnx_file,
                     tables_file=tables, body_file=body, precisions=precisions, opset=opset,
                     static_shape=static, seg_grid=cfg["patch_image_size"] // PATCH,
                     image_bucket_size=cfg["image_bucket_size"], files=dict(files), engines=tuple(engines),
                     provenance=prov, raw=d, query_blocks=blocks)


def spec_for_model(categories: Sequence[str], config: Mapping[str, Any], *, feature_dim: int,
                   policy: Optional[ImagePolicy] = None, knn: Optional[KnnSettings] = None,
                   normalize_features: bool = False) -> ModelSpec:
    """The :class:`ModelSpec` of an in-memory model (no directory, no files): what ``Segmenter.from_model`` runs."""
    d = build_manifest(categories=categories, config=config, policy=policy or ImagePolicy(), knn=knn or KnnSettings(),
                       feature_dim=feature_dim, normalize_features=normalize_features,
                       provenance={"source": "<in-memory model>"})
    return parse_manifest(d, None)


def load_model_dir(path: Union[str, Path]) -> ModelSpec:
    """Read and validate ``DIR/ifseg.json`` (files are verified separately, by :meth:`ModelSpec.verify`)."""
    root = Path(path)
    if root.is_file() and (root.parent / MANIFEST).is_file():
        raise ModelDirError(f"{root} is a file of the model directory {root.parent}; pass the directory: "
                            f"--model {root.parent}")
    if not root.is_dir():
        raise ModelDirError(f"model directory not found: {root}")
    mf = root / MANIFEST
    if mf.is_dir():
        raise ModelDirError(f"{mf} is a folder, not the JSON file a model directory holds")
    if not mf.is_file():
        raise ModelDirError(f"{root} is not a model directory: {MANIFEST} is missing; {_what_it_is(root)}")
    try:
        d = json.loads(mf.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelDirError(f"{mf} is not valid JSON: {e}") from None
    except RecursionError:
        raise ModelDirError(f"{mf} is not an ifseg_rt manifest: its JSON is nested too deeply to read") from None
    return parse_manifest(d, root)


def _what_it_is(root: Path) -> str:
    """Advice for a folder that is not a model directory, recognising the usual mix-ups."""
    inner = sorted(p.parent.name for p in root.glob(f"*/{MANIFEST}"))
    if inner:  # e.g. the demo's output folder, whose model is DEMO_OUT/model
        return f"it holds the model directory {root / inner[0]}: --model {root / inner[0]}"
    if (root / RUN_FILE).is_file():
        return (f"it is an adaptation run: export it first with `python -m ifseg_rt export {root} --out "
                f"{root.name}-model` (eval also scores a run directly: eval --model {root})")
    return "export one with `python -m ifseg_rt export RUN_DIR --out MODEL_DIR` and pass --model MODEL_DIR"


def write_manifest(root: Union[str, Path], manifest: Dict[str, Any]) -> Path:
    """Validate and write ``ifseg.json`` (atomically)."""
    root = Path(root)
    parse_manifest(manifest, root)
    p = root / MANIFEST
    tmp = p.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    tmp.replace(p)
    return p
