"""Load and save OFA / SegOFA weights: fairseq ``.pt`` (OFA and IFSeg), the HF-port ``pytorch_model.bin``, and our
own safetensors format (``ofa.md`` §10, ``ifseg.md`` §14).

Untrusted pickles never run arbitrary code: ``.pt``/``.bin`` files are read with torch's weights-only unpickler and a
short allow-list (``argparse.Namespace`` for fairseq's ``cfg``, numpy scalars); anything else is refused with
:class:`UnsafeCheckpointError`. Deterministic buffers (bucket tables, index buffers) are never read from files: they
are regenerated in code.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import re
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from .files import WEIGHTS_FILE, file_sha256
from .knn.settings import KnnSettings
from .model import MODEL_REGISTRY, OFA, OFAConfig, SegOFA, build_model, get_config
from .geometry import PATCH

FORMAT_NAME = "ifseg_rt"
FORMAT_VERSION = 1
# The English OFA dictionary (ofa.md §3): GPT-2 BPE 50265 + 1000 location bins + 8192 image codes. Official
# checkpoints of the OFA sizes with another vocabulary are other language versions (the Chinese OFA uses a BERT
# vocabulary); IFSeg with them gives mIoU ~ 0 without any error, so they are refused.
ENGLISH_OFA_VOCAB = 59457

# buffers recomputed in code (accepted in files, never read)
_REGENERATED = re.compile(
    r"(^|\.)(version|token_rp_bucket|image_rp_bucket|seg_rp_bucket|image_position_idx|bin_id_offset|seg_id_offset"
    r"|region_prefix|num_batches_tracked)$")
# aliases of a canonical tensor: alias -> canonical
_ALIASES = {
    "decoder.embed_tokens.weight": "encoder.embed_tokens.weight",
    "decoder.output_projection.weight": "encoder.embed_tokens.weight",
    "encoder.embed_tokens_bag.weight": "encoder.embed_tokens.weight",
    "decoder.seg_embed_tokens.weight": "encoder.seg_embed_tokens.weight",
    "decoder.seg_projection.weight": "encoder.seg_embed_tokens.weight",
}
# HF-port key fragments -> fairseq (ofa.md §10.2); order matters (longest first)
_HF_RENAMES = [
    (re.compile(r"^(encoder\.layers\.\d+\.)self_attn_mid_layer_norm\."), r"\1attn_ln."),
    (re.compile(r"^(decoder\.layers\.\d+\.)self_attn_mid_layer_norm\."), r"\1self_attn_ln."),
    (re.compile(r"^(decoder\.layers\.\d+\.)cross_attn_mid_layer_norm\."), r"\1cross_attn_ln."),
    (re.compile(r"^(decoder\.layers\.\d+\.)cross_attn_layer_norm\."), r"\1encoder_attn_layer_norm."),
    (re.compile(r"^(decoder\.layers\.\d+\.)cross_attn\."), r"\1encoder_attn."),
    (re.compile(r"^((?:en|de)coder\.layers\.\d+\.)ffn_layer_norm\."), r"\1ffn_layernorm."),
]
# the inverse, used to write HF-port files in tests and tools
_FAIRSEQ_TO_HF = [
    (re.compile(r"^(encoder\.layers\.\d+\.)attn_ln\."), r"\1self_attn_mid_layer_norm."),
    (re.compile(r"^(decoder\.layers\.\d+\.)self_attn_ln\."), r"\1self_attn_mid_layer_norm."),
    (re.compile(r"^(decoder\.layers\.\d+\.)cross_attn_ln\."), r"\1cross_attn_mid_layer_norm."),
    (re.compile(r"^(decoder\.layers\.\d+\.)encoder_attn_layer_norm\."), r"\1cross_attn_layer_norm."),
    (re.compile(r"^(decoder\.layers\.\d+\.)encoder_attn\."), r"\1cross_attn."),
    (re.compile(r"^((?:en|de)coder\.layers\.\d+\.)ffn_layernorm\."), r"\1ffn_layer_norm."),
]


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used (wrong format, keys, shapes, hash)."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle that references a global outside the allow-list; it was not executed."""


class CheckpointMismatchError(CheckpointError):
    """Missing, unexpected or shape-mismatched keys between a checkpoint and the model."""

    def __init__(self, source: str, missing: Sequence[str], unexpected: Sequence[str],
                 mismatched: Sequence[Tuple[str, tuple, tuple]], show: int = 5):
        self.missing, self.unexpected, self.mismatched = list(missing), list(unexpected), list(mismatched)
        parts = [f"checkpoint {source} does not match the model:"]
        if missing:
            parts.append(f"  {len(missing)} missing key(s): " + ", ".join(missing[:show])
                         + (" ..." if len(missing) > show else ""))
        if unexpected:
            parts.append(f"  {len(unexpected)} unexpected key(s): " + ", ".join(unexpected[:show])
                         + (" ..." if len(unexpected) > show else ""))
        if mismatched:
            parts.append(f"  {len(mismatched)} shape mismatch(es): " + ", ".join(
                f"{k} file {list(a)} vs model {list(b)}" for k, a, b in mismatched[:show])
                         + (" ..." if len(mismatched) > show else ""))
        super().__init__("\n".join(parts))


@dataclass
class LoadedCheckpoint:
    """What :func:`load_checkpoint` returns."""

    model: Union[OFA, SegOFA]
    config: OFAConfig
    kind: str  # "ofa" or "segofa"
    source_format: str  # "fairseq", "hf", or "ifseg_rt"
    path: str
    sha256: Optional[str] = None
    categories: Optional[List[str]] = None  # from the file's cfg / metadata, when it has them
    prompt_prefix: Optional[str] = None
    knn: Optional[KnnSettings] = None  # kNN post-processing settings recorded with the weights (ifseg_rt files)
    metadata: Dict[str, Any] = field(default_factory=dict)  # provenance and other stored fields


# --- reading files ---------------------------------------------------------------------------------------------
def _numpy_globals() -> list:
    import importlib

    out: list = [np.dtype]
    for name in ("numpy._core.multiarray", "numpy.core.multiarray"):  # numpy 2.x, numpy 1.x
        try:
            out.append(importlib.import_module(name).scalar)
            break
        except (ImportError, AttributeError):
            continue
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        out += [getattr(dtypes, n) for n in ("Float64DType", "Float32DType", "Float16DType", "Int64DType",
                                              "Int32DType", "BoolDType") if hasattr(dtypes, n)]
    return out


class PickledNamespace(types.SimpleNamespace):
    """What a pickled ``argparse.Namespace`` (fairseq's ``cfg.task`` / ``args``) is loaded as: attribute access and
    ``vars()`` as on the original, without the library layer importing the command-line module."""


SAFE_GLOBALS = [(PickledNamespace, "argparse.Namespace"), *_numpy_globals()]


def safe_torch_load(path: Union[str, Path]) -> Any:
    """``torch.load`` with the weights-only unpickler and :data:`SAFE_GLOBALS`; refuses anything else."""
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        m = re.search(r"GLOBAL ([\w.]+)", msg) or re.search(r"global[s]? (?:of )?'?([\w.]+)", msg)
        if m is None and not _looks_like_torch_file(path):
            raise CheckpointError(f"cannot read {path} as a torch checkpoint: {_not_torch(path)}") from None
        what = m.group(1) if m else "a non-allow-listed object"
        raise UnsafeCheckpointError(
            f"refusing to load {path}: its pickle references {what}, which is not on the allow-list "
            f"(tensors, containers, argparse.Namespace, numpy scalars). The file was not executed. Only convert "
            f"files you trust, e.g. re-save just the state_dict.") from None
    except (RuntimeError, EOFError, OSError, KeyError, ValueError, IndexError, TypeError, AttributeError) as e:
        reason = str(e) or type(e).__name__
        if not _looks_like_torch_file(path):
            reason = _not_torch(path)
        raise CheckpointError(f"cannot read {path} as a torch checkpoint: {reason}") from None


def _head(path, n: int = 16) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError:
        return b""


# torch.save's legacy (non-zip) format starts with its pickled magic number 0x1950a86a20f9469cfc6c
_LEGACY_TORCH_MAGIC = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)[:-1]


def _looks_like_torch_file(path) -> bool:
    """torch.save writes a zip archive (``PK``), or in the legacy format a pickle that starts with torch's magic."""
    head = _head(path)
    return head.startswith(b"PK\x03\x04") or head.startswith(_LEGACY_TORCH_MAGIC)


def _not_torch(path) -> str:
    head = _head(path)
    if not head:
        return "the file is empty"
    if len(head) >= 9 and head[8:9] == b"{":
        return "it is a safetensors file (rename it to .safetensors)"
    if head.startswith(b"\x93NUMPY"):
        return "it is a numpy .npy file"
    if head[:1] == b"\x80":
        return "it is a plain Python pickle, not a file written by torch.save (re-save its tensors with torch.save)"
    if head.lstrip()[:1] in (b"<", b"{", b"[") or all(32 <= c < 127 or c in (9, 10, 13) for c in head):
        return f"it is a text file (starts with {head[:12]!r}), e.g. an HTML error page saved by a failed download"
    return f"it is neither a zip archive nor a pickle (starts with {head[:8]!r})"


def _get(obj: Any, key: str, default=None):
    if obj is None:
        return default
    if isinstance(obj, Mapping):
        return obj.get(key, default)
    return getattr(obj, key, default)


# --- key normalisation and config inference --------------------------------------------------------------------
def normalize_keys(state: Mapping[str, torch.Tensor], source: str = "<state_dict>"
                   ) -> Tuple[Dict[str, torch.Tensor], str]:
    """Strip a ``model.`` prefix and map HF-port names to fairseq names. Returns (state, "hf" | "fairseq").

    A file holding both names of one tensor (an HF-port key and the fairseq key it maps to) is refused: one of the
    two would silently replace the other."""
    keys = list(state)
    if keys and all(k.startswith("model.") for k in keys):
        state = {k[len("model."):]: v for k, v in state.items()}
    is_hf = any("_mid_layer_norm." in k or ".cross_attn." in k or "ffn_layer_norm." in k for k in state)
    if not is_hf:
        return dict(state), "fairseq"
    out, origin = {}, {}
    for k, v in state.items():
        name = k
        for pat, rep in _HF_RENAMES:
            k2 = pat.sub(rep, k)
            if k2 != k:
                k = k2
                break
        if k in out:
            raise CheckpointError(f"{source}: keys {origin[k]!r} and {name!r} both name the tensor {k!r} (HF-port and "
                                  f"fairseq names mixed in one file); keep one of them")
        out[k], origin[k] = v, name
    return out, "hf"


def to_hf_keys(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """fairseq names -> HF-port names (drops the ``version`` buffers the port does not have)."""
    out = {}
    for k, v in state.items():
        if k.endswith(".version"):
            continue
        for pat, rep in _FAIRSEQ_TO_HF:
            k2 = pat.sub(rep, k)
            if k2 != k:
                k = k2
                break
        out[k] = v
    return out


def _count_layers(state, prefix: str) -> int:
    idx = {int(m.group(1)) for k in state for m in [re.match(re.escape(prefix) + r"(\d+)\.", k)] if m}
    return max(idx) + 1 if idx else 0


# where infer_config reads each dimension (for error messages)
_DIMENSION_KEYS = {
    "d_model": "encoder.embed_tokens.weight", "heads": "encoder.layers.0.self_attn.c_attn",
    "ffn_dim": "encoder.layers.0.fc1.weight", "encoder_layers": "encoder.layers.N.*",
    "decoder_layers": "decoder.layers.N.*", "resnet_layers": "encoder.embed_images.layer{1,2,3}.N.*",
    "resnet_width": "encoder.embed_images.conv1.weight", "vocab_size": "encoder.embed_tokens.weight",
    "max_positions": "encoder.embed_positions.weight", "token_bucket_size": "encoder.token_rel_pos_table_list.0.weight",
    "image_bucket_size": "encoder.embed_image_positions.weight",
}


def infer_config(state: Mapping[str, torch.Tensor], source: str = "<state_dict>") -> Tuple[OFAConfig, Optional[int]]:
    """Read the dimensions from tensor shapes. Returns (config, M or None for plain OFA)."""
    ndims = {"encoder.layers.0.self_attn.c_attn": 1}

    def shape(key):
        if key not in state:
            raise CheckpointError(f"{source}: cannot infer the model size: key {key!r} is missing")
        t, want = state[key], ndims.get(key, 2 if not key.endswith("conv1.weight") else 4)
        if not isinstance(t, torch.Tensor) or t.dim() != want:
            got = f"a {t.dim()}-D tensor {list(t.shape)}" if isinstance(t, torch.Tensor) else f"a {type(t).__name__}"
            raise CheckpointError(f"{source}: key {key!r} should be a {want}-D tensor, got {got}")
        return tuple(t.shape)

    rows, d = shape("encoder.embed_tokens.weight")
    seg_key = next((k for k in ("encoder.seg_embed_tokens.weight", "decoder.seg_projection.weight",
                                "decoder.seg_embed_tokens.weight") if k in state), None)
    m = shape(seg_key)[0] if seg_key else None
    heads = shape("encoder.layers.0.self_attn.c_attn")[0]
    blocks = tuple(_count_layers(state, f"encoder.embed_images.layer{k}.") for k in (1, 2, 3))
    img_rows = shape("encoder.embed_image_positions.weight")[0]
    bucket = int(round(math.sqrt(img_rows - 1)))
    kw = dict(
        d_model=d, heads=heads, ffn_dim=shape("encoder.layers.0.fc1.weight")[0],
        encoder_layers=_count_layers(state, "encoder.layers."), decoder_layers=_count_layers(state, "decoder.layers."),
        resnet_layers=blocks, resnet_width=shape("encoder.embed_images.conv1.weight")[0],
        vocab_size=rows - 1 if m is not None else rows, max_positions=shape("encoder.embed_positions.weight")[0] - 2,
        token_bucket_size=(shape("encoder.token_rel_pos_table_list.0.weight")[0] + 1) // 2,
        image_bucket_size=bucket,
    )
    if m is not None and "decoder.embed_seg_positions.weight" in state:
        g = int(round(math.sqrt(shape("decoder.embed_seg_positions.weight")[0] - 1)))
        kw["patch_image_size"] = PATCH * g
    try:
        cfg = OFAConfig(**kw)
    except ValueError as e:
        raise CheckpointError(f"{source}: the tensor shapes give no valid model ({e}); read from "
                              + ", ".join(f"{k}: {_DIMENSION_KEYS[k]}" for k in ("d_model", "heads", "ffn_dim"))
                              ) from None
    for name, ref in MODEL_REGISTRY.items():
        if ref.to_dict() | {"name": name} == cfg.to_dict() | {"name": name}:
            cfg = ref
            break
    return cfg, m


# --- loading into a model --------------------------------------------------------------------------------------
def _canonical_items(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The model's state entries that a file must provide: no regenerated buffers, no aliases."""
    return {k: v for k, v in model.state_dict(keep_vars=True).items()
            if not _REGENERATED.search(k) and k not in _ALIASES}


def load_state(model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str = "<state_dict>",
               allow_missing: Sequence[str] = ()) -> None:
    """Copy ``state`` (fairseq key names) into ``model`` with strict key and shape checks.

    Aliases in ``state`` are ignored when their canonical key is present (fairseq stores the shared embedding three
    times) and used in its place otherwise; regenerated buffers are accepted and ignored.
    """
    expected = _canonical_items(model)
    state = dict(state)
    for alias, canon in _ALIASES.items():
        if alias in state:
            t = state.pop(alias)
            state.setdefault(canon, t)
    state = {k: v for k, v in state.items() if not _REGENERATED.search(k)}
    for k, v in state.items():
        if k in expected and not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{source}: entry {k!r} is a {type(v).__name__}, not a tensor")
    missing = [k for k in expected if k not in state and k not in allow_missing]
    unexpected = [k for k in state if k not in expected]
    mismatched = [(k, tuple(state[k].shape), tuple(expected[k].shape)) for k in expected
                  if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(source, missing, unexpected, mismatched)
    with torch.no_grad():
        for k, target in expected.items():
            if k in state:
                src = state[k]
                if not isinstance(src, torch.Tensor):
                    raise CheckpointError(f"{source}: entry {k!r} is a {type(src).__name__}, not a tensor")
                target.copy_(src.to(dtype=target.dtype))


def ofa_state_to_segofa(state: Mapping[str, torch.Tensor], d_model: int, *, seed: int = 0) -> Dict[str, torch.Tensor]:
    """IFSeg's surgery on an OFA state (ifseg.md §14.1): drop the vocabulary head and BN counters, append one
    N(0, d^-1/2) row to the token table. The new seg modules keep their fresh values in the model."""
    out = {}
    g = torch.Generator().manual_seed(seed)
    for k, v in state.items():
        if k == "decoder.output_projection.weight" or k.endswith("num_batches_tracked"):
            continue
        if k in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
            extra = torch.randn(1, v.shape[1], generator=g) * d_model ** -0.5
            v = torch.cat([v.float(), extra], dim=0)
        out[k] = v
    return out


def _read_categories(cfg: Any) -> Tuple[Optional[List[str]], Optional[str]]:
    task = _get(cfg, "task")
    cats = _get(task, "category_list")
    prefix = _get(task, "prompt_prefix")
    if isinstance(cats, str):
        cats = [c.strip() for c in cats.split(",") if c.strip()]
    return (list(cats) if cats else None), prefix


def load_checkpoint(path: Union[str, os.PathLike], *, num_categories: Optional[int] = None,
                    config: Union[None, str, OFAConfig, dict] = None, dtype: torch.dtype = torch.float32,
                    device: Union[str, torch.device] = "cpu", expected_sha256: Optional[str] = None,
                    ema: bool = False, seed: int = 0) -> LoadedCheckpoint:
    """Load an OFA or IFSeg checkpoint.

    Parameters
    ----------
    path : a fairseq ``.pt`` (OFA or IFSeg), an HF-port ``pytorch_model.bin`` (or its directory), or an ifseg_rt
        ``.safetensors`` file (or a directory holding ``model.safetensors``)
    num_categories : when set and the file is a plain OFA checkpoint, build SegOFA with M categories and apply
        IFSeg's checkpoint surgery (the starting point of image-free adaptation)
    config : expected dimensions; by default they are inferred from the tensor shapes
    dtype, device : where the model lives (files store fp16; weights are cast)
    expected_sha256 : verify the file before reading it
    ema : read ``extra_state["ema"]`` of a fairseq file instead of ``model``

    Returns
    -------
    LoadedCheckpoint with the model in eval mode
    """
    try:  # before the file is read: a device or dtype the model cannot live on is the caller's typo
        target = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N' (or a torch.device), got {device!r}: {e}") from None
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}, but torch sees no CUDA GPU here (torch {torch.__version__}); use 'cpu'")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating-point torch dtype (torch.float32, torch.bfloat16, ...), got "
                         f"{dtype!r}")
    path = Path(path)
    if path.is_dir():
        for name in (WEIGHTS_FILE, "pytorch_model.bin", "checkpoint.pt"):
            if (path / name).exists():
                path = path / name
                break
        else:
            raise CheckpointError(f"{path} is a directory without model.safetensors, pytorch_model.bin or checkpoint.pt")
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    sha = None
    if expected_sha256 is not None:
        sha = file_sha256(path)
        if sha != expected_sha256.lower():
            raise CheckpointError(f"sha256 mismatch for {path}: expected {expected_sha256}, got {sha}")

    meta: Dict[str, Any] = {}
    categories = prefix = None
    prompt_tokens = category_ids = None
    if path.suffix == ".safetensors":
        state, meta = _read_safetensors(path)
        fmt = "ifseg_rt" if meta.get("format") == FORMAT_NAME else "hf"
        if fmt == "hf":
            state, _ = normalize_keys(state, str(path))
        categories = meta.get("categories")
        prefix = meta.get("prompt_prefix")
        prompt_tokens, category_ids = meta.get("prompt_tokens"), meta.get("category_token_ids")
    else:
        obj = safe_torch_load(path)
        if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
            state = obj["model"]
            if ema:
                ema_state = _get(_get(obj, "extra_state"), "ema")
                if ema_state is None:
                    raise CheckpointError(f"{path} has no extra_state['ema']")
                state = ema_state
            categories, prefix = _read_categories(obj.get("cfg"))
            if categories is None and obj.get("args") is not None:
                categories, prefix = _read_categories({"task": obj["args"]})
        elif isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            state = obj  # a bare state_dict (HF port)
        else:
            raise CheckpointError(f"{path}: expected a fairseq checkpoint (dict with 'model') or a state_dict, "
                                  f"got {type(obj).__name__} with keys {list(obj)[:8] if isinstance(obj, Mapping) else '-'}")
        state, fmt = normalize_keys(state, str(path))

    if fmt == "ifseg_rt":
        try:
            cfg = OFAConfig.from_dict(meta["config"])
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{path}: its metadata 'config' is not a valid model configuration: {e}") from None
        m = meta.get("num_categories")
    else:
        cfg, m = infer_config(state, str(path))
        check_english_vocabulary(cfg, path)
        check_official_size(cfg, path)
    if config is not None:
        want = get_config(config)
        if want.to_dict() | {"name": ""} != cfg.to_dict() | {"name": ""}:
            diffs = {k: (v, cfg.to_dict()[k]) for k, v in want.to_dict().items() if k != "name" and cfg.to_dict()[k] != v}
            raise CheckpointError(f"{path} does not have the requested dimensions; (requested, file): {diffs}")
        cfg = want

    kind = "segofa" if m is not None else "ofa"
    if kind == "ofa" and num_categories is not None:
        state = ofa_state_to_segofa(state, cfg.d_model, seed=seed)
        torch.manual_seed(seed)  # fresh seg modules (ifseg.md §8.2) reproducible per seed
        model = build_model(cfg, num_categories, init=True)
        kind = "segofa"
        with torch.device("meta"):
            plain = set(_canonical_items(build_model(cfg, init=False)))
        fresh = [k for k in _canonical_items(model) if k not in plain]  # IFSeg's new modules only (ifseg.md §14.1)
        load_state(model, state, source=str(path), allow_missing=fresh)
    else:
        if num_categories is not None and m is not None and num_categories != m:
            raise CheckpointError(f"{path} is an IFSeg checkpoint for M = {m} categories, not {num_categories}")
        model = build_model(cfg, m, init=False)
        load_state(model, state, source=str(path))
    if categories is not None and m is not None and len(categories) != m:
        raise CheckpointError(f"{path}: its cfg lists {len(categories)} categories but the weights have M = {m}")
    if isinstance(model, SegOFA) and prompt_tokens is not None and category_ids is not None:
        model.set_categories(prompt_tokens, category_ids, update_table=False)
    knn = None
    if meta.get("knn") is not None:
        try:
            knn = KnnSettings.from_dict(meta["knn"])
        except ValueError as e:
            raise CheckpointError(f"{path}: metadata {e}") from None
    model = model.to(device=device, dtype=dtype).eval()
    return LoadedCheckpoint(model=model, config=cfg, kind=kind, source_format=fmt, path=str(path), sha256=sha,
                            categories=categories, prompt_prefix=prefix, knn=knn, metadata=meta)


def check_english_vocabulary(cfg: OFAConfig, path) -> None:
    """Refuse an official-size OFA checkpoint whose dictionary is not the English one (:data:`ENGLISH_OFA_VOCAB`).

    Custom sizes (tests, the embedded nano model) carry their own vocabulary and pass.
    """
    if cfg.vocab_size == ENGLISH_OFA_VOCAB:
        return
    size = next((name for name, ref in MODEL_REGISTRY.items()
                 if dataclasses.replace(ref, vocab_size=cfg.vocab_size, name=cfg.name) == cfg), None)
    if size is None:
        return
    if abs(cfg.vocab_size - ENGLISH_OFA_VOCAB) == 1:  # a category table where none belongs, or one that went missing
        raise CheckpointError(
            f"{path} has the dimensions of OFA-{size} and a token table one row off the English OFA dictionary: its "
            f"rows (encoder.embed_tokens.weight) and whether it holds IFSeg's category table "
            f"(encoder.seg_embed_tokens.weight / decoder.seg_projection.weight) disagree. An OFA file has "
            f"{ENGLISH_OFA_VOCAB} rows and no category table; an IFSeg file {ENGLISH_OFA_VOCAB + 1} rows (the <seg_0> "
            f"slot, ifseg.md §3) and the table. Was a key added to or removed from the file?")
    raise CheckpointError(
        f"{path} has the dimensions of OFA-{size} but a {cfg.vocab_size}-symbol vocabulary, not the English OFA "
        f"dictionary ({ENGLISH_OFA_VOCAB} symbols: GPT-2 BPE + 1000 location bins + 8192 image codes). It is most "
        f"likely the Chinese OFA (BERT vocabulary), with which IFSeg segments nothing (mIoU ~ 0, no error). Use the "
        f"English checkpoint, e.g. ofa_{size}.pt from the OFA release (python -m ifseg_rt download ofa-{size})")


def check_official_size(cfg: OFAConfig, path) -> None:
    """Refuse a checkpoint with the English OFA vocabulary whose dimensions are none of the OFA sizes (ofa.md §1):
    a file missing its trailing layers or ResNet blocks (a truncated or hand-edited state_dict) would otherwise
    load as a smaller custom model. The IFSeg grid (``patch_image_size``) is a training choice and not compared."""
    if cfg.vocab_size != ENGLISH_OFA_VOCAB or cfg.name in MODEL_REGISTRY:
        return
    ignore = {"name", "patch_image_size"}
    have = cfg.to_dict()
    for name, ref in MODEL_REGISTRY.items():
        want = ref.to_dict()
        if all(want[k] == have[k] for k in want if k not in ignore):
            return
    name, ref = min(MODEL_REGISTRY.items(), key=lambda kv: abs(kv[1].d_model - cfg.d_model))
    want = ref.to_dict()
    diffs = "; ".join(f"{k} {have[k]} (from {_DIMENSION_KEYS.get(k, k)}) where OFA-{name} has {want[k]}"
                      for k in want if k not in ignore and want[k] != have[k])
    raise CheckpointError(f"{path} has the English OFA vocabulary but the dimensions of no OFA size: {diffs}. "
                          f"Is the file complete (missing or extra layers)?")


# --- our format ------------------------------------------------------------------------------------------------
def _read_safetensors(path: Path) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read {path} as safetensors: {e}") from None
    meta: Dict[str, Any] = {}
    for k, v in raw.items():
        try:
            meta[k] = json.loads(v)
        except json.JSONDecodeError:
            meta[k] = v
    if meta.get("format") == FORMAT_NAME and "config" not in meta:
        raise CheckpointError(f"{path}: ifseg_rt metadata without 'config'")
    return state, meta


def checkpoint_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The tensors our format stores: every parameter and learned buffer once, no aliases or regenerated buffers."""
    return {k: v.detach().contiguous() for k, v in _canonical_items(model).items()}


def save_checkpoint(model: Union[OFA, SegOFA], path: Union[str, os.PathLike], *,
                    categories: Optional[Sequence[str]] = None, prompt_prefix: Optional[str] = None,
                    provenance: Optional[Dict[str, Any]] = None, dtype: Optional[torch.dtype] = None,
                    knn: Optional[KnnSettings] = None) -> Path:
    """Write ``model`` as safetensors with the JSON config, categories, prompt and provenance in its metadata.

    Parameters
    ----------
    dtype : store floats in this dtype (e.g. ``torch.float16``); default: as in the model
    knn : the kNN post-processing settings that belong to these weights (read back as ``LoadedCheckpoint.knn``)
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"save_checkpoint writes .safetensors files, got {path.name}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating-point torch dtype (e.g. torch.float16), got {dtype!r}: weights "
                         f"cast to it would be lost")
    if isinstance(categories, str):
        raise TypeError(f"categories must be a list of names, not one string ({categories[:40]!r})")
    if path.is_dir():
        raise ValueError(f"{path} is a folder; give the .safetensors file to write")
    state = checkpoint_state(model)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    state = {k: v.cpu() for k, v in state.items()}
    meta: Dict[str, Any] = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "config": model.config.to_dict(),
                            "kind": "segofa" if isinstance(model, SegOFA) else "ofa"}
    if isinstance(model, SegOFA):
        meta["num_categories"] = model.num_categories
        if categories is not None and len(categories) != model.num_categories:
            raise ValueError(f"{len(categories)} category names for a model with M = {model.num_categories}")
        if model.has_prompt:
            meta["prompt_tokens"] = model.prompt_tokens.tolist()
            offs = model.category_offsets.tolist() + [model.category_token_ids.numel()]
            ids = model.category_token_ids.tolist()
            meta["category_token_ids"] = [ids[a:b] for a, b in zip(offs[:-1], offs[1:])]
    if categories is not None:
        meta["categories"] = list(categories)
    if prompt_prefix is not None:
        meta["prompt_prefix"] = prompt_prefix
    if provenance is not None:
        meta["provenance"] = provenance
    if knn is not None:
        meta["knn"] = knn.to_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".safetensors.tmp")
    save_file(state, str(tmp), metadata={k: json.dumps(v) for k, v in meta.items()})
    canonicalize_safetensors_header(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # safetensors creates the file 0600; give it the permissions of any other file
    os.replace(tmp, path)
    return path


def canonicalize_safetensors_header(path: Union[str, os.PathLike]) -> None:
    """Rewrite a safetensors header in place with sorted keys, so that equal tensors and metadata give equal bytes.

    safetensors serialises its header from Rust hash maps, whose order changes from one save to the next: the same
    weights would get a new sha256 every time (and the shipped nano checkpoint could not be reproduced bit for bit).
    The sorted, compact JSON has exactly the original length (same keys and values, padded with spaces as the
    format allows), so the data offsets stay valid.
    """
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n).decode("utf-8"))
        text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(text) > n:  # cannot happen for a header safetensors wrote itself (it is compact JSON)
            raise ValueError(f"{path}: canonical safetensors header is {len(text)} bytes, longer than the {n} written")
        f.seek(8)
        f.write(text + b" " * (n - len(text)))
