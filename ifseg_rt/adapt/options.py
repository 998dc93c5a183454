"""Run-time choices of image-free adaptation (ifseg.md §10), apart from the model dimensions."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

MAX_GRID_SIDE = 256  # word grids: the paper's largest initial side is the token grid's 32
MAX_LR = 1.0  # an AdamW learning rate above this diverges at once (1e38 overflows inside torch)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class AdaptOptions:
    """Hyper-parameters of the word-grid training; the defaults are the paper's recipe (ifseg.md §10)."""

    steps: int = 2000  # optimiser updates (20 epochs x 100)
    batch_size: int = 16  # word grids per update (one fresh grid per sample)
    lr: float = 5e-5  # peak learning rate; cosine to 0 without warm-up
    weight_decay: float = 0.1  # decoupled (AdamW), on every trainable parameter, biases and LNs included
    betas: Tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0  # global L2 norm; 0 disables
    dropout: float = 0.1  # after the embedding LNs and on residual branches
    drop_path_rate: float = 0.1  # linear over depth 0 -> rate, encoder and decoder
    precision: str = "auto"  # auto (bf16 on CUDA when supported, else fp16; fp32 on CPU) | fp32 | bf16 | fp16
    seed: int = 1  # fairseq's default; seeds the grid sampler and torch (dropout)
    max_side: Optional[int] = None  # S, the largest initial grid side (None: the token grid side G = 32)
    decay_unused: bool = True  # like the original fp16 optimiser, also decay trainable params that get no gradient
    init_scale: float = 128.0  # fp16 only: initial loss scale (fairseq --fp16-init-scale)
    scale_window: int = 512  # fp16 only: updates without overflow before the loss scale doubles

    def __post_init__(self):
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        problems = []
        if self.steps < 1:
            problems.append(f"steps={self.steps} must be >= 1")
        if self.batch_size < 1:
            problems.append(f"batch_size={self.batch_size} must be >= 1")
        if not 0 < self.lr <= MAX_LR:
            problems.append(f"lr={self.lr} must be in (0, {MAX_LR:g}] (AdamW; the paper's is 1e-4)")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            problems.append(f"weight_decay={self.weight_decay} must be a finite number >= 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            problems.append(f"betas={self.betas} must be two numbers in [0, 1)")
        if not (self.grad_clip >= 0 and math.isfinite(self.grad_clip)):
            problems.append(f"grad_clip={self.grad_clip} must be a finite number >= 0 (0: no clipping)")
        if not (0 <= self.dropout < 1 and 0 <= self.drop_path_rate < 1):
            problems.append(f"dropout={self.dropout} and drop_path_rate={self.drop_path_rate} must be in [0, 1)")
        if self.precision not in PRECISIONS:
            problems.append(f"precision={self.precision!r} must be one of {PRECISIONS}")
        if self.max_side is not None and not 1 <= self.max_side <= MAX_GRID_SIDE:
            problems.append(f"max_side={self.max_side} must be in [1, {MAX_GRID_SIDE}] (the paper's S: 32)")
        if problems:
            raise ValueError("invalid AdaptOptions: " + "; ".join(problems))

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "AdaptOptions":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown AdaptOptions field(s) {unknown}")
        return cls(**d)

    def replace(self, **changes) -> "AdaptOptions":
        return dataclasses.replace(self, **changes)
