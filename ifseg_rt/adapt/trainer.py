"""Word-grid training of SegOFA (ifseg.md §9-§10): frozen/trainable split, loss, AdamW + cosine, mixed precision.

The trainer owns the model, the optimiser, the grid sampler and every random state, so that
``WordGridTrainer.state_dict()`` -> ``load_state_dict()`` continues a run exactly (bit-identical on CPU in fp32).
Everything it saves is plain tensors, numbers, strings, lists and dicts: it loads with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoint import checkpoint_state, load_state
from ..model import SegOFA, build_model
from .grids import WordGridSampler
from .options import AdaptOptions

TRAIN_STATE_FORMAT = "ifseg_rt.adapt.train_state"
TRAIN_STATE_VERSION = 1

# ifseg.md §10: frozen = E (also the decoder's BOS embedding and embed_tokens_bag: same tensor), Sg (also
# seg_projection: same tensor), the ResNet convolutions (its frozen BN are buffers) and image_proj.
FROZEN_PREFIXES = (
    "encoder.embed_tokens.", "encoder.embed_tokens_bag.", "decoder.embed_tokens.",
    "encoder.seg_embed_tokens.", "decoder.seg_embed_tokens.", "decoder.seg_projection.",
    "encoder.embed_images.", "encoder.image_proj.",
)


def is_frozen(name: str) -> bool:
    """Whether the parameter ``name`` stays fixed during image-free adaptation."""
    return name.startswith(FROZEN_PREFIXES)


def split_parameters(model: nn.Module) -> Tuple[Dict[str, nn.Parameter], Dict[str, nn.Parameter]]:
    """(trainable, frozen) parameters by name; tied tensors appear once, under their first name."""
    trainable, frozen = {}, {}
    for name, p in model.named_parameters():
        (frozen if is_frozen(name) else trainable)[name] = p
    return trainable, frozen


def freeze(model: nn.Module) -> Dict[str, nn.Parameter]:
    """Set ``requires_grad`` per the IFSeg split; returns the trainable parameters."""
    trainable, frozen = split_parameters(model)
    for p in frozen.values():
        p.requires_grad_(False)
    for p in trainable.values():
        p.requires_grad_(True)
    return trainable


def cosine_lr(step: int, total: int, peak: float) -> float:
    """Learning rate of update ``step`` (0-based): ``peak / 2 * (1 + cos(pi * step / total))``, no warm-up."""
    return 0.5 * peak * (1.0 + math.cos(math.pi * step / total))


def word_grid_loss(logits: Tensor, targets: Tensor, grid: Tuple[int, int], *, ignore_index: Optional[int] = None
                   ) -> Tensor:
    """The image-free loss (ifseg.md §9).

    Parameters
    ----------
    logits : BxNxM per-cell logits, N = h*w row-major
    targets : BxTxT int64 pixel labels (``ignore_index``, default M, is excluded)
    grid : (h, w) of the cells

    Returns
    -------
    scalar float32: mean cross-entropy over all labelled pixels of the logits bilinearly upsampled (align_corners
    False) to the target resolution, computed in float32 whatever the autocast state.
    """
    B, N, M = logits.shape
    h, w = grid
    if N != h * w:
        raise ValueError(f"logits have {N} cells, grid {h}x{w} has {h * w}")
    dev_type = logits.device.type
    with torch.autocast(dev_type, enabled=False) if dev_type in ("cuda", "cpu") else contextlib.nullcontext():
        z = logits.float().transpose(1, 2).reshape(B, M, h, w)
        z = F.interpolate(z, size=tuple(targets.shape[-2:]), mode="bilinear", align_corners=False)
        return F.cross_entropy(z, targets, ignore_index=M if ignore_index is None else ignore_index)


def resolve_device(device: Union[str, torch.device, None]) -> torch.device:
    """``"auto"``/None -> cuda when available, else cpu; anything else as given (checked)."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available (use --device cpu)")
    return dev


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> bf16 on CUDA when supported (else fp16), fp32 on CPU. fp16 needs CUDA."""
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("fp16 mixed precision (with loss scaling) needs a CUDA device; use fp32 or bf16 on CPU")
    return precision


_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def training_model(model: SegOFA, *, dropout: float = 0.1, drop_path_rate: float = 0.1) -> SegOFA:
    """A copy of ``model`` built with training dropout / drop-path (``build_model`` sets them at construction),
    holding the same weights, prompt and categories. The input model is not modified."""
    if not isinstance(model, SegOFA):
        raise TypeError(f"image-free adaptation needs a SegOFA model, got {type(model).__name__}")
    p = next(model.parameters())
    with torch.device(p.device):
        out = build_model(model.config, model.num_categories, dropout=dropout, drop_path_rate=drop_path_rate,
                          init=False)
    out.load_state_dict(model.state_dict())
    out = out.to(dtype=torch.float32)
    if model.has_prompt:
        out.set_categories(model.prompt_tokens.tolist(), category_ids(model), update_table=False)
    return out


@dataclass
class StepStats:
    """What one update reports."""

    step: int  # updates done after this one
    loss: float
    lr: float
    grad_norm: float  # before clipping (unscaled); inf/nan when the update was skipped
    skipped: bool = False  # non-finite gradients: no update applied


class WordGridTrainer:
    """Trains a SegOFA on word grids.

    Parameters
    ----------
    model : SegOFA with its prompt and categories set (``set_categories``); build it with training dropout, e.g.
        via :func:`training_model`. It is moved to ``device`` and kept in float32 (master weights).
    options : hyper-parameters (the paper's recipe by default)
    device : "auto", "cpu", "cuda", ...

    Seeds ``torch`` (global RNG: dropout, drop-path) and the grid sampler from ``options.seed``.
    """

    def __init__(self, model: SegOFA, options: AdaptOptions = AdaptOptions(), *, device="auto"):
        if not isinstance(model, SegOFA):
            raise TypeError(f"WordGridTrainer needs a SegOFA model, got {type(model).__name__}")
        if not model.has_prompt:
            raise ValueError("the model has no prompt: call model.set_categories(prompt_tokens, category_ids) first")
        self.options = options
        self.device = resolve_device(device)
        self.precision = resolve_precision(options.precision, self.device)
        self.model = model.to(device=self.device, dtype=torch.float32)
        self.model.train()
        self.params = freeze(self.model)
        self.num_categories = model.num_categories
        G = model.config.seg_grid
        self.grid = (G, G)
        torch.manual_seed(options.seed)
        self.sampler = WordGridSampler(self.num_categories, grid=G, max_side=options.max_side, seed=options.seed)
        self.optimizer = torch.optim.AdamW(list(self.params.values()), lr=options.lr, betas=options.betas,
                                           eps=options.eps, weight_decay=options.weight_decay)
        self.scaler = None
        if self.precision == "fp16":
            self.scaler = torch.amp.GradScaler("cuda", init_scale=options.init_scale,
                                               growth_interval=options.scale_window)
        self.step = 0

    # --- schedule ---------------------------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        return cosine_lr(step, self.options.steps, self.options.lr)

    @property
    def done(self) -> bool:
        return self.step >= self.options.steps

    def _autocast(self):
        dt = _AUTOCAST_DTYPES.get(self.precision)
        if dt is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dt)

    # --- one update -------------------------------------------------------------------------------------------
    def train_step(self) -> StepStats:
        """Draw a batch of fresh grids, run forward/backward and apply one AdamW update."""
        if self.done:
            raise RuntimeError(f"all {self.options.steps} steps are done")
        opt = self.options
        lr = self.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batch = self.sampler.sample(opt.batch_size)
        cells = torch.from_numpy(batch.cells).to(self.device, non_blocking=True)
        targets = torch.from_numpy(batch.targets).to(self.device, non_blocking=True)

        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            logits = self.model.forward_word_grid(cells)
        loss = word_grid_loss(logits, targets, self.grid)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        params = list(self.params.values())
        if opt.decay_unused:
            # the original fp16 optimiser keeps one flat gradient buffer: parameters the loss never reaches (unused
            # decoder tables) get zero gradients and so still receive the decoupled weight decay (ifseg.md §10)
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        max_norm = opt.grad_clip if opt.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], max_norm))
        skipped = not math.isfinite(grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skips the update itself on overflow
            self.scaler.update()
        elif not skipped:
            self.optimizer.step()
        if not (skipped and self.scaler is not None):
            # as fairseq: an fp16 overflow (the scaler lowers its scale and retries) is not an update and does not
            # advance the schedule; in fp32/bf16 a non-finite gradient is skipped but counted, so it cannot loop
            self.step += 1
        return StepStats(step=self.step, loss=float(loss.detach()), lr=lr, grad_norm=grad_norm, skipped=skipped)

    # --- exact resume -----------------------------------------------------------------------------------------
    def state_dict(self) -> Dict:
        """Everything needed to continue exactly: weights, optimiser, loss scaler, sampler and RNG states."""
        state = {
            "format": TRAIN_STATE_FORMAT, "version": TRAIN_STATE_VERSION, "step": self.step,
            "options": self.options.to_dict(), "precision": self.precision,
            # every parameter and learned buffer once (no aliases, no bucket tables: those are rebuilt in code)
            "model": {k: v.detach().cpu().clone() for k, v in checkpoint_state(self.model).items()},
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "sampler": self.sampler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            "prompt_tokens": self.model.prompt_tokens.tolist(),
            "category_token_ids": category_ids(self.model),
        }
        return state

    def load_state_dict(self, state: Dict) -> None:
        """Restore a :meth:`state_dict`; the options, prompt and categories must be the ones it was saved with."""
        if state.get("format") != TRAIN_STATE_FORMAT:
            raise ValueError(f"not an adaptation train state (format {state.get('format')!r})")
        saved = AdaptOptions.from_dict(state["options"])
        if saved != self.options:
            diff = {k: (v, getattr(self.options, k)) for k, v in saved.to_dict().items()
                    if v != self.options.to_dict()[k]}
            raise ValueError(f"train state was saved with different options; (saved, current): {diff}")
        if list(state["prompt_tokens"]) != self.model.prompt_tokens.tolist() or \
                [list(x) for x in state["category_token_ids"]] != category_ids(self.model):
            raise ValueError("train state was saved for a different prompt / category list")
        load_state(self.model, state["model"], source="train state")
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["torch_rng"])
        if self.device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        self.step = int(state["step"])


def category_ids(model: SegOFA) -> List[List[int]]:
    """The per-category subword ids stored by ``model.set_categories``."""
    offs = model.category_offsets.tolist() + [model.category_token_ids.numel()]
    ids = model.category_token_ids.tolist()
    return [ids[a:b] for a, b in zip(offs[:-1], offs[1:])]
