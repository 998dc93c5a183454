"""Self-training on unlabelled images (the paper's Table 4, spec ifseg.md §16): the adapted model labels the images
itself, through the one inference path (:class:`~ifseg_rt.runtime.Segmenter`, kNN on), the confident cells become
targets, and the model trains on the real images with the per-cell loss — mixed with word grids, so that categories
the images rarely show are not forgotten. Rounds of re-labelling repeat it with the improved model.

    from ifseg_rt.adapt import AdaptOptions, WordGridTrainer
    from ifseg_rt.adapt.selftrain import SelfTrainOptions, self_train

    trainer = WordGridTrainer(adapted_model, AdaptOptions(...))        # the image-free adaptation, done
    history = self_train(trainer, categories, images, SelfTrainOptions(rounds=1, steps=300), policy=policy)

Targets are per cell, as the model predicts them: a cell's pseudo-label is the arg-max of its kNN-averaged
probabilities, kept when that probability is at least ``threshold`` (:data:`THRESHOLD`), else ignored. A batch is
drawn from images of one network size (photos of several sizes form several groups). Augmentation: horizontal flips
and a photometric jitter (brightness and contrast); the paper's random resize (0.5-2x) and crop are not applied.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..runtime import ImagePolicy, Segmenter
from ..runtime.preprocess import network_input
from .trainer import WordGridTrainer, word_grid_loss

THRESHOLD = 0.5  # a cell's pseudo-label is kept when its kNN-averaged probability is at least this
IGNORE = -100  # the target of an ignored cell (torch's cross-entropy default ignore_index)


@dataclass(frozen=True)
class SelfTrainOptions:
    """How :func:`self_train` runs (the defaults: one round, measured on the nano world in README/RESULTS)."""

    rounds: int = 1  # pseudo-label, then train; repeated
    steps: int = 300  # updates per round
    batch_size: int = 8  # images per update
    lr: float = 2e-4  # AdamW learning rate (constant within a round)
    weight_decay: float = 0.01
    threshold: float = THRESHOLD
    word_grids: int = 8  # word grids per update added to the image loss (0: images only)
    grad_clip: float = 1.0
    seed: int = 0

    def __post_init__(self):
        for name, lo in (("rounds", 1), ("steps", 1), ("batch_size", 1), ("word_grids", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"self-training {name} must be an integer >= {lo}, got {v!r}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"self-training threshold must be in [0, 1], got {self.threshold}")
        if not self.lr > 0:
            raise ValueError(f"self-training lr must be > 0, got {self.lr}")

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def pseudo_labels(probabilities: np.ndarray, threshold: float = THRESHOLD) -> np.ndarray:
    """``h x w x M`` cell probabilities -> ``h*w`` int64 targets: the arg-max where its probability is at least
    ``threshold``, else :data:`IGNORE`."""
    p = np.asarray(probabilities).reshape(-1, probabilities.shape[-1])
    labels = p.argmax(axis=1).astype(np.int64)
    labels[p.max(axis=1) < threshold] = IGNORE
    return labels


def label_images(model, categories: Sequence[str], images: Sequence[np.ndarray], policy: ImagePolicy, *,
                 threshold: float = THRESHOLD, threads: Optional[int] = None
                 ) -> Tuple[List[np.ndarray], List[np.ndarray]]:
    """Network inputs (``3 x H x W`` each) and per-cell pseudo-labels (``N`` each) of ``images`` from ``model``,
    through :class:`Segmenter` with its kNN post-processing."""
    was_training = model.training
    model.eval()
    seg = Segmenter.from_model(model, categories, policy=policy, **({"threads": threads} if threads else {}))
    inputs, targets = [], []
    for im in images:
        inputs.append(network_input(im, policy))
        targets.append(pseudo_labels(seg.seg(im, return_probabilities=True).probabilities, threshold))
    model.train(was_training)
    return inputs, targets


def _augment(x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """A random horizontal flip (image and cell grid) and brightness / contrast jitter of normalised images."""
    gh, gw = x.shape[2] // 16, x.shape[3] // 16
    if rng.random() < 0.5:
        x = x.flip(3)
        y = y.view(-1, gh, gw).flip(2).reshape(y.shape)
    b = torch.from_numpy(rng.uniform(-0.15, 0.15, (x.shape[0], 1, 1, 1)).astype(np.float32))
    c = torch.from_numpy(rng.uniform(0.8, 1.2, (x.shape[0], 1, 1, 1)).astype(np.float32))
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * c + mean + b).clamp(-1.0, 1.0), y


def self_train(trainer: WordGridTrainer, categories: Sequence[str], images: Sequence[np.ndarray],
               options: SelfTrainOptions = SelfTrainOptions(), *, policy: ImagePolicy,
               log: Callable[[str], None] = print,
               on_round: Optional[Callable[[int], Dict[str, Any]]] = None) -> List[Dict[str, Any]]:
    """Self-train ``trainer.model`` (its trainable parameters, as in the adaptation) on unlabelled ``images``.

    ``on_round(k)`` is called after each round (e.g. to validate; its dict goes into that round's record). Returns
    one record per round: kept fraction of cells, final losses, seconds, and what ``on_round`` returned.
    """
    import time

    if len(images) < options.batch_size:
        raise ValueError(f"self-training needs at least batch_size = {options.batch_size} images, got {len(images)}")
    model = trainer.model
    params = list(trainer.params.values())
    rng = np.random.default_rng(options.seed)
    history = []
    for rnd in range(options.rounds):
        t0 = time.perf_counter()
        x_all, y_all = label_images(model, categories, images, policy, threshold=options.threshold)
        kept = float(np.mean(np.concatenate(y_all) != IGNORE))
        groups: Dict[tuple, List[int]] = {}
        for i, x in enumerate(x_all):
            groups.setdefault(x.shape, []).append(i)
        members = list(groups.values())
        weights = np.array([len(g) for g in members], np.float64) / len(x_all)
        log(f"self-training round {rnd + 1}/{options.rounds}: {len(images)} images pseudo-labelled, "
            f"{100 * kept:.1f} % of the cells kept (probability >= {options.threshold})")
        optim = torch.optim.AdamW(params, lr=options.lr, weight_decay=options.weight_decay)
        model.train()
        loss = wl = None
        for _ in range(options.steps):
            group = members[rng.choice(len(members), p=weights)]
            idx = rng.choice(group, min(options.batch_size, len(group)), replace=False)
            x, y = _augment(torch.from_numpy(np.stack([x_all[i] for i in idx])),
                            torch.from_numpy(np.stack([y_all[i] for i in idx])), rng)
            logits, _ = model(x.to(trainer.device))
            y = y.reshape(-1).to(trainer.device)
            if (y != IGNORE).any():
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y, ignore_index=IGNORE)
            else:  # no confident cell in this batch: no image loss (cross-entropy over nothing is NaN)
                loss = logits.float().sum() * 0.0
            total = loss
            if options.word_grids:
                batch = trainer.sampler.sample(options.word_grids)
                wl = word_grid_loss(model.forward_word_grid(torch.from_numpy(batch.cells).to(trainer.device)),
                                    torch.from_numpy(batch.targets).to(trainer.device), trainer.grid)
                total = loss + wl
            optim.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], options.grad_clip)
            optim.step()
        record = {"round": rnd + 1, "kept_cells": kept, "image_loss": float(loss.detach()),
                  "word_grid_loss": None if wl is None else float(wl.detach()),
                  "seconds": round(time.perf_counter() - t0, 1)}
        if on_round is not None:
            record.update(on_round(rnd + 1))
        log(f"self-training round {rnd + 1}: image loss {record['image_loss']:.3f} ({record['seconds']:.0f} s)")
        history.append(record)
    model.eval()
    return history


__all__ = ["IGNORE", "THRESHOLD", "SelfTrainOptions", "label_images", "pseudo_labels", "self_train"]
