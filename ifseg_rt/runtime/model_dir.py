"""The self-describing model directory written by ``python -m ifseg_rt.export`` and read by :class:`Segmenter`.

Layout::

    DIR/ifseg.json                     schema below; everything the runtime needs to configure itself
    DIR/model.onnx                     image -> (logits, features), prompt baked in (+ model.onnx.data when > 2 GB)
    DIR/model.safetensors              the same weights for the torch backend (optional)
    DIR/engines/<gpu>-<precision>.engine   TensorRT engines (optional, one per GPU model and precision)

Every field is validated on load and errors name the field; every file listed in ``files`` is checked (size, then
sha256) before it is used. Torch-free.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from .preprocess import MEAN, PATCH, STD, ImagePolicy

SCHEMA_VERSION = 1
FORMAT = "ifseg_rt.model_dir"
MANIFEST = "ifseg.json"
PRECISIONS = ("fp32", "fp16", "bf16")


class ModelDirError(ValueError):
    """A model directory that cannot be used: missing/malformed ``ifseg.json`` field, missing/tampered file."""


def file_sha256(path: Union[str, Path], chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def file_record(path: Union[str, Path]) -> Dict[str, Any]:
    p = Path(path)
    return {"sha256": file_sha256(p), "bytes": p.stat().st_size}


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
class KnnSpec:
    enabled: bool = True  # kNN post-processing of the probabilities (ifseg.md §12)
    k: int = 3  # neighbours, the cell itself included
    iters: int = 25  # averaging steps
    temperature: float = 1.0  # softmax temperature before averaging

    def to_dict(self) -> Dict[str, Any]:
        return {"enabled": self.enabled, "k": self.k, "iters": self.iters, "temperature": self.temperature}


@dataclass(frozen=True)
class EngineSpec:
    file: str  # relative path, engines/<gpu>-<precision>.engine
    gpu: str  # torch/CUDA device name it was built on (engines are not portable across GPU models)
    precision: str
    tensorrt_version: str
    profile: Dict[str, Any] = field(default_factory=dict)  # {"min": [B, 3, H, W], "opt": ..., "max": ...}


@dataclass(frozen=True)
class ModelSpec:
    """Parsed, validated ``ifseg.json``."""

    root: Path
    categories: Tuple[str, ...]
    policy: ImagePolicy
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    input_dtype: str
    patch_stride: int
    knn: KnnSpec
    feature_dim: int
    features_normalized: bool
    precision: str
    config: Dict[str, Any]
    onnx_file: Optional[str]
    opset: Optional[int]
    static_shape: Optional[Tuple[int, int]]
    seg_grid: int
    image_bucket_size: int
    files: Dict[str, Dict[str, Any]]
    engines: Tuple[EngineSpec, ...]
    provenance: Dict[str, Any]
    raw: Dict[str, Any]

    @property
    def num_categories(self) -> int:
        return len(self.categories)

    def path(self, name: str) -> Path:
        return self.root / name

    def has_file(self, name: str) -> bool:
        return name in self.files

    def verify(self, names: Optional[List[str]] = None) -> None:
        """Check size then sha256 of ``names`` (default: every listed file); raise :class:`ModelDirError`."""
        for name in (names if names is not None else list(self.files)):
            rec = self.files.get(name)
            if rec is None:
                raise ModelDirError(f"{self.root}: {name} is not listed in {MANIFEST} 'files'")
            p = self.root / name
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


def parse_manifest(d: Any, root: Union[str, Path] = ".") -> ModelSpec:
    """Validate a loaded ``ifseg.json`` dict; errors name the offending field."""
    if not isinstance(d, dict):
        raise ModelDirError(f"{MANIFEST} must hold a JSON object, got {type(d).__name__}")
    ver = _get(d, "schema_version", "", int)
    _check(ver == SCHEMA_VERSION, "schema_version", f"is {ver}; this runtime reads version {SCHEMA_VERSION}")
    cats = _get(d, "categories", "", list)
    _check(len(cats) >= 1 and all(isinstance(c, str) and c for c in cats), "categories",
           "must be a non-empty list of non-empty strings")
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
    knn = KnnSpec(enabled=_get(kd, "enabled", "knn", bool), k=_get(kd, "k", "knn", int),
                  iters=_get(kd, "iters", "knn", int), temperature=float(_get(kd, "temperature", "knn", (int, float))))
    _check(knn.k >= 1, "knn.k", f"must be >= 1, got {knn.k}")
    _check(knn.iters >= 0, "knn.iters", f"must be >= 0, got {knn.iters}")
    _check(knn.temperature > 0 and math.isfinite(knn.temperature), "knn.temperature", "must be a positive number")

    outs = _get(d, "outputs", "", dict)
    lo = _get(outs, "logits", "outputs", dict)
    fo = _get(outs, "features", "outputs", dict)
    lshape = _get(lo, "shape", "outputs.logits", list)
    fshape = _get(fo, "shape", "outputs.features", list)
    _check(len(lshape) == 3 and lshape[2] == m, "outputs.logits.shape", f"must be [batch, cells, {m}], got {lshape}")
    _check(len(fshape) == 3 and isinstance(fshape[2], int) and fshape[2] >= 1, "outputs.features.shape",
           f"must be [batch, cells, C], got {fshape}")
    normalized = bool(_get(fo, "normalized", "outputs.features", bool, optional=True, default=False))

    prec = _get(d, "precision", "", str)
    _check(prec in PRECISIONS, "precision", f"must be one of {PRECISIONS}, got {prec!r}")
    cfg = _get(d, "config", "", dict)
    for key in ("patch_image_size", "image_bucket_size", "d_model"):
        _check(isinstance(cfg.get(key), int), f"config.{key}", "must be an integer")

    files = _get(d, "files", "", dict)
    for name, rec in files.items():
        _check(isinstance(rec, dict) and isinstance(rec.get("sha256"), str) and len(rec["sha256"]) == 64
               and isinstance(rec.get("bytes"), int), f"files.{name}", "must be {sha256: 64 hex chars, bytes: int}")
        _check(not Path(name).is_absolute() and ".." not in Path(name).parts, f"files.{name}",
               "must be a path inside the model directory")

    od = _get(d, "onnx", "", dict, optional=True)
    onnx_file = opset = static = None
    if od is not None:
        onnx_file = _get(od, "file", "onnx", str)
        _check(onnx_file in files, "onnx.file", f"names {onnx_file!r}, which is not listed in 'files'")
        opset = _get(od, "opset", "onnx", int)
        _check(opset >= 17, "onnx.opset", f"must be >= 17, got {opset}")
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
        engines.append(EngineSpec(file=ef, gpu=_get(e, "gpu", where, str), precision=_get(e, "precision", where, str),
                                  tensorrt_version=_get(e, "tensorrt_version", where, str),
                                  profile=_get(e, "profile", where, dict, optional=True, default={})))
    prov = _get(d, "provenance", "", dict)
    return ModelSpec(root=Path(root), categories=tuple(cats), policy=policy, mean=tuple(mean), std=tuple(std),
                     input_dtype=dtype, patch_stride=stride, knn=knn, feature_dim=fshape[2],
                     features_normalized=normalized, precision=prec, config=cfg, onnx_file=onnx_file, opset=opset,
                     static_shape=static, seg_grid=cfg["patch_image_size"] // PATCH,
                     image_bucket_size=cfg["image_bucket_size"], files=dict(files), engines=tuple(engines),
                     provenance=prov, raw=d)


def load_model_dir(path: Union[str, Path]) -> ModelSpec:
    """Read and validate ``DIR/ifseg.json`` (files are verified separately, by :meth:`ModelSpec.verify`)."""
    root = Path(path)
    if not root.is_dir():
        raise ModelDirError(f"model directory not found: {root}")
    mf = root / MANIFEST
    if not mf.is_file():
        raise ModelDirError(f"{root} is not a model directory: {MANIFEST} is missing (export one with "
                            f"`python -m ifseg_rt.export RUN_DIR --out {root}`)")
    try:
        d = json.loads(mf.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelDirError(f"{mf} is not valid JSON: {e}") from None
    return parse_manifest(d, root)


def write_manifest(root: Union[str, Path], manifest: Dict[str, Any]) -> Path:
    """Validate and write ``ifseg.json`` (atomically)."""
    root = Path(root)
    parse_manifest(manifest, root)
    p = root / MANIFEST
    tmp = p.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    tmp.replace(p)
    return p
