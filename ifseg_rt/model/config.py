"""Model dimensions: one frozen dataclass that travels with the weights, and the named OFA sizes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Tuple, Union

from ..geometry import PATCH  # the ResNet output stride: one token per PATCH x PATCH pixels


@dataclass(frozen=True)
class OFAConfig:
    """Every number that shapes an OFA / SegOFA model (``ofa.md`` §1, ``ifseg.md`` §1-§8).

    Nothing in the model code is hard-coded to OFA-Base: tests build tiny custom configs from this class, and
    the same object is stored next to the weights (safetensors metadata, ``ifseg.json``) to rebuild the model.
    """

    d_model: int = 768  # embedding width d
    ffn_dim: int = 3072  # FFN hidden width
    heads: int = 12  # attention heads H (head_dim = d_model // heads)
    encoder_layers: int = 6
    decoder_layers: int = 6
    resnet_layers: Tuple[int, int, int] = (3, 4, 23)  # bottleneck blocks in ResNet layer1/2/3
    resnet_width: int = 64  # stem/layer1 width; layer2/3 use 2x/4x; image features = 16 * resnet_width
    vocab_size: int = 59457  # OFA dictionary size V (IFSeg token table has V + 1 rows)
    padding_idx: int = 1  # <pad>
    max_positions: int = 1024  # max source/target positions; position tables have max_positions + 2 rows
    token_bucket_size: int = 256  # token relative buckets: 2 * size - 1 table rows
    image_bucket_size: int = 42  # image position grid side; abs table size^2 + 1 rows, rel table (2s-1)^2 + 3
    attn_scale_factor: float = 2.0  # logits scaled by (attn_scale_factor * head_dim) ** -0.5
    code_image_size: int = 128  # decoder image-code window = code_image_size / 8 per side
    patch_image_size: int = 512  # IFSeg reference image size; seg grid G = patch_image_size // PATCH
    type_vocab_size: int = 2  # type embedding rows (0 text, 1 image)
    layernorm_eps: float = 1e-5
    batchnorm_eps: float = 1e-5
    name: str = field(default="custom", compare=False)

    def __post_init__(self):
        object.__setattr__(self, "resnet_layers", tuple(int(n) for n in self.resnet_layers))
        problems = []
        if self.d_model % self.heads:
            problems.append(f"d_model={self.d_model} is not divisible by heads={self.heads}")
        if len(self.resnet_layers) != 3 or min(self.resnet_layers) < 1:
            problems.append(f"resnet_layers={self.resnet_layers} must be three block counts >= 1")
        for f in ("d_model", "ffn_dim", "heads", "encoder_layers", "decoder_layers", "vocab_size", "max_positions",
                  "token_bucket_size", "image_bucket_size", "resnet_width"):
            if int(getattr(self, f)) < 1:
                problems.append(f"{f}={getattr(self, f)} must be >= 1")
        if self.patch_image_size % PATCH:
            problems.append(f"patch_image_size={self.patch_image_size} must be a multiple of {PATCH}")
        if self.seg_grid > self.image_bucket_size:
            problems.append(f"seg grid {self.seg_grid} exceeds image_bucket_size={self.image_bucket_size}")
        if problems:
            raise ValueError("invalid OFAConfig: " + "; ".join(problems))

    # derived sizes -------------------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads

    @property
    def image_feature_dim(self) -> int:
        """Channels of ResNet layer3 (1024 for every OFA size)."""
        return 16 * self.resnet_width

    @property
    def position_rows(self) -> int:
        return self.max_positions + 2

    @property
    def image_position_rows(self) -> int:
        return self.image_bucket_size ** 2 + 1

    @property
    def token_rel_rows(self) -> int:
        return 2 * self.token_bucket_size - 1

    @property
    def image_rel_rows(self) -> int:
        return (2 * self.image_bucket_size - 1) ** 2 + 3

    @property
    def seg_grid(self) -> int:
        """IFSeg reference grid side G (32 for 512-px patches)."""
        return self.patch_image_size // PATCH

    @property
    def seg_rel_rows(self) -> int:
        return (2 * self.seg_grid - 1) ** 2 + 3

    @property
    def scaling(self) -> float:
        return float(self.head_dim * self.attn_scale_factor) ** -0.5

    # (de)serialisation -----------------------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["resnet_layers"] = list(self.resnet_layers)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "OFAConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown OFAConfig field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**d)

    def replace(self, **changes) -> "OFAConfig":
        return dataclasses.replace(self, **changes)


def _size(name, d, ffn, heads, enc, dec, blocks) -> OFAConfig:
    return OFAConfig(d_model=d, ffn_dim=ffn, heads=heads, encoder_layers=enc, decoder_layers=dec,
                     resnet_layers=blocks, name=name)


# ofa.md §1 size table (ResNet-50 / 101 / 152 truncated after layer3)
MODEL_REGISTRY: Dict[str, OFAConfig] = {
    "tiny": _size("tiny", 256, 1024, 4, 4, 4, (3, 4, 6)),
    "medium": _size("medium", 512, 2048, 8, 4, 4, (3, 4, 23)),
    "base": _size("base", 768, 3072, 12, 6, 6, (3, 4, 23)),
    "large": _size("large", 1024, 4096, 16, 12, 12, (3, 8, 36)),
    "huge": _size("huge", 1280, 5120, 16, 24, 12, (3, 8, 36)),
}


def get_config(config: Union[str, OFAConfig, Dict[str, Any]]) -> OFAConfig:
    """Resolve a registry name (``"base"`` or ``"ofa-base"``), a dict or an :class:`OFAConfig`."""
    if isinstance(config, OFAConfig):
        return config
    if isinstance(config, dict):
        return OFAConfig.from_dict(config)
    if isinstance(config, str):
        key = config.lower()
        for prefix in ("ofa-", "ofa_", "segofa-", "segofa_"):
            if key.startswith(prefix):
                key = key[len(prefix):]
        if key in MODEL_REGISTRY:
            return MODEL_REGISTRY[key]
        raise ValueError(f"unknown model size {config!r}; available: {sorted(MODEL_REGISTRY)}")
    raise TypeError(f"config must be a size name, a dict or an OFAConfig, not {type(config).__name__}")
