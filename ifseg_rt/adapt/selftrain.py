"""Training on images once a user has some (the paper's Tables 4 and 5, spec ifseg.md §16): self-training on
unlabelled images, optionally with real labels for some "seen" categories, and supervised fine-tuning.

* **self-training** — the adapted model labels the images itself, through the one inference path
  (:class:`~ifseg_rt.runtime.Segmenter`, kNN on); a cell's pseudo-label is the arg-max of its kNN-averaged
  probabilities, kept when that probability is at least ``threshold`` (:data:`THRESHOLD`), else ignored. Rounds of
  re-labelling repeat it with the improved model.
* **with seen labels** — label maps give the pixels of the ``seen`` categories (values of other categories count as
  unlabelled, as the paper's COCO-Stuff setting removes the unseen annotations). Those pixels take their real label;
  every other pixel is known not to be a seen category, so its pseudo-label is the arg-max over the *unseen*
  categories, with the probability renormalised over them (kept at ``threshold`` as above).
* **supervised** — every category labelled (the original's ``unsupervised_segmentation=false`` branch): the label
  maps are the targets, no pseudo-labels, one round.

The loss is the per-cell cross-entropy of the segmentation head, mixed with word grids (``word_grids`` per update)
so that categories the images rarely show are not forgotten. Targets are pixel maps at the network-input size (cell
pseudo-labels cover their 16 x 16 pixels); augmentation follows the paper (spec §14 notes): random resize by
``scale`` (0.5-2.0), a crop of the network size retried (up to 10 times) while one category fills more than
``cat_max_ratio`` (0.75) of its labelled pixels, padding where the resized image is smaller (ignored), horizontal
flip, photometric jitter (brightness, contrast). A cell's target is the most frequent label of its pixels when
labelled pixels fill at least half of it, else it is ignored. A batch is drawn from images of one network size.

Each round starts from seeds derived from ``(seed, round)`` (torch, the word-grid sampler, the batch order), so a
run stopped after round k and resumed gives the weights of an uninterrupted run.

    from ifseg_rt.adapt import AdaptOptions, WordGridTrainer
    from ifseg_rt.adapt.selftrain import SelfTrainOptions, self_train

    trainer = WordGridTrainer(adapted_model, AdaptOptions(...))        # the image-free adaptation, done
    history = self_train(trainer, categories, images, SelfTrainOptions(rounds=1, steps=300), policy=policy)
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..geometry import PATCH
from ..runtime import ImagePolicy, Segmenter
from ..runtime.preprocess import normalize, resize_bilinear
from .grids import nearest_indices
from .options import MAX_LR
from .trainer import WordGridTrainer, word_grid_loss

MAX_SCALE = 8.0  # random resize factor of a training image (the paper's range: 0.5-2.0)

THRESHOLD = 0.5  # a cell's pseudo-label is kept when its kNN-averaged probability is at least this
IGNORE = -100  # the target of an ignored cell (torch's cross-entropy default ignore_index)
CROP_TRIES = 10  # crops drawn while one category fills more than cat_max_ratio of the crop (mmseg's RandomCrop)
MODES = ("self-train", "seen-labels", "supervised")


@dataclass(frozen=True)
class SelfTrainOptions:
    """How :func:`self_train` runs (the defaults: measured on the nano world in README/RESULTS)."""

    rounds: int = 1  # pseudo-label, then train; repeated (supervised: 1)
    steps: int = 300  # updates per round
    batch_size: int = 8  # images per update
    lr: float = 2e-4  # AdamW learning rate (constant within a round)
    weight_decay: float = 0.01
    threshold: float = THRESHOLD
    word_grids: int = 8  # word grids per update added to the image loss (0: images only)
    grad_clip: float = 1.0
    scale: Tuple[float, float] = (0.5, 2.0)  # random resize range before the crop ((1, 1): none)
    cat_max_ratio: float = 0.75  # crop retried while one category fills more of it (1.0: any crop)
    seed: int = 0

    def __post_init__(self):
        for name, lo in (("rounds", 1), ("steps", 1), ("batch_size", 1), ("word_grids", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"self-training {name} must be an integer >= {lo}, got {v!r}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"self-training threshold must be in [0, 1], got {self.threshold}")
        if not 0 < self.lr <= MAX_LR:
            raise ValueError(f"self-training lr must be in (0, {MAX_LR:g}], got {self.lr}")
        lo, hi = self.scale
        if not 0 < lo <= hi <= MAX_SCALE:
            raise ValueError(f"self-training scale must be a range 0 < low <= high <= {MAX_SCALE:g}, got {self.scale}")
        if not 0 < self.cat_max_ratio <= 1:
            raise ValueError(f"self-training cat_max_ratio must be in (0, 1], got {self.cat_max_ratio}")

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["scale"] = list(self.scale)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "SelfTrainOptions":
        d = dict(d)
        if "scale" in d:
            d["scale"] = tuple(d["scale"])
        return cls(**d)


# --- targets -----------------------------------------------------------------------------------------------------
def pseudo_labels(probabilities: np.ndarray, threshold: float = THRESHOLD,
                  allowed: Optional[np.ndarray] = None) -> np.ndarray:
    """``h x w x M`` cell probabilities -> ``h*w`` int64 targets: the arg-max where its probability is at least
    ``threshold``, else :data:`IGNORE`. ``allowed`` (``M`` bools): only those categories, their probabilities
    renormalised over them (the cell is known to be one of them)."""
    p = np.asarray(probabilities, dtype=np.float64).reshape(-1, probabilities.shape[-1])
    if allowed is not None:
        p = p * np.asarray(allowed, bool)
        p = p / np.maximum(p.sum(axis=1, keepdims=True), 1e-12)
    labels = p.argmax(axis=1).astype(np.int64)
    labels[p.max(axis=1) < threshold] = IGNORE
    return labels


def resize_labels(labels: np.ndarray, h: int, w: int) -> np.ndarray:
    """Nearest resize of an ``H0 x W0`` label map to ``h x w`` (legacy nearest: ``floor(dst * in / out)``)."""
    return labels[nearest_indices(labels.shape[0], h)][:, nearest_indices(labels.shape[1], w)]


def cell_targets(pixels: np.ndarray) -> np.ndarray:
    """``H x W`` pixel targets (:data:`IGNORE` = none; H, W multiples of 16) -> ``N`` cell targets: each cell's most
    frequent label when labelled pixels fill at least half of it, else :data:`IGNORE`."""
    h, w = pixels.shape
    gh, gw = h // PATCH, w // PATCH
    cells = pixels[:gh * PATCH, :gw * PATCH].reshape(gh, PATCH, gw, PATCH).transpose(0, 2, 1, 3).reshape(gh * gw, -1)
    valid = cells != IGNORE
    m = int(cells.max()) + 1 if valid.any() else 1
    counts = np.zeros((gh * gw, m), np.int64)
    rows = np.broadcast_to(np.arange(gh * gw)[:, None], cells.shape)
    np.add.at(counts, (rows[valid], cells[valid]), 1)
    out = counts.argmax(axis=1).astype(np.int64)
    out[valid.sum(axis=1) * 2 < PATCH * PATCH] = IGNORE
    return out


def pixel_targets(size: Tuple[int, int], *, probabilities: Optional[np.ndarray] = None,
                  labels: Optional[np.ndarray] = None, seen: Optional[np.ndarray] = None,
                  threshold: float = THRESHOLD) -> np.ndarray:
    """The ``H x W`` training targets of one image at its network size ``(H, W)``.

    ``labels``: the decoded label map (``M`` = ignore) at the original size or ``None``; ``seen``: ``M`` bools, the
    categories whose labels are used (all for supervised); ``probabilities``: the model's ``h x w x M`` cell
    probabilities (``None``: no pseudo-labels, supervised). A pixel labelled with a seen category takes that label;
    any other pixel takes its cell's pseudo-label (restricted to the unseen categories when labels were given).
    """
    h, w = size
    out = np.full((h, w), IGNORE, np.int64)
    real = None
    if labels is not None:
        if seen is None:
            raise ValueError("label maps need the seen categories (all of them for supervised training)")
        seen = np.asarray(seen, bool)
        real = resize_labels(np.asarray(labels, np.int64), h, w)
    if probabilities is not None:
        allowed = None if real is None else ~seen
        if allowed is None or allowed.any():
            cells = pseudo_labels(probabilities, threshold, allowed).reshape(probabilities.shape[:2])
            out = np.repeat(np.repeat(cells, PATCH, axis=0), PATCH, axis=1)[:h, :w].copy()
    if real is not None:
        trusted = np.isin(real, np.flatnonzero(seen))  # the ignore value M is never a seen index
        out[trusted] = real[trusted]
    return out


# --- augmentation ------------------------------------------------------------------------------------------------
def _crop(image: np.ndarray, target: np.ndarray, size: Tuple[int, int], rng: np.random.Generator,
          cat_max_ratio: float) -> Tuple[np.ndarray, np.ndarray]:
    """A ``size`` crop (padding with 0 / IGNORE where the image is smaller), retried while one category fills more
    than ``cat_max_ratio`` of its labelled pixels (mmseg's RandomCrop)."""
    h, w = size
    ph, pw = max(h - image.shape[0], 0), max(w - image.shape[1], 0)
    if ph or pw:
        image = np.pad(image, ((0, ph), (0, pw), (0, 0)))
        target = np.pad(target, ((0, ph), (0, pw)), constant_values=IGNORE)
    H, W = target.shape
    for _ in range(CROP_TRIES):
        y, x = int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1))
        t = target[y:y + h, x:x + w]
        if cat_max_ratio >= 1.0:
            break
        _, counts = np.unique(t[t != IGNORE], return_counts=True)
        if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
            break
    return image[y:y + h, x:x + w], target[y:y + h, x:x + w]


def augment(image: np.ndarray, target: np.ndarray, rng: np.random.Generator, options: SelfTrainOptions
            ) -> Tuple[np.ndarray, np.ndarray]:
    """One training sample: ``H x W x 3`` uint8 image at its network size + ``H x W`` pixel targets -> (``3 x H x W``
    normalised input, ``N`` cell targets): random resize, crop, flip, photometric jitter (see the module)."""
    h, w = target.shape
    s = float(rng.uniform(*options.scale))
    if s != 1.0:
        nh, nw = max(PATCH, round(h * s)), max(PATCH, round(w * s))
        image, target = resize_bilinear(image, nh, nw), resize_labels(target, nh, nw)
    image, target = _crop(image, target, (h, w), rng, options.cat_max_ratio)
    if rng.random() < 0.5:
        image, target = image[:, ::-1], target[:, ::-1]
    x = normalize(np.ascontiguousarray(image))
    b, c = rng.uniform(-0.15, 0.15), rng.uniform(0.8, 1.2)
    x = np.clip((x - x.mean()) * c + x.mean() + b, -1.0, 1.0).astype(np.float32)
    return x, cell_targets(np.ascontiguousarray(target))


# --- training ----------------------------------------------------------------------------------------------------
def round_seed(seed: int, rnd: int) -> int:
    """The seed of round ``rnd`` (1-based): every random state of a round starts from it (exact resume)."""
    return int(np.random.SeedSequence([seed, rnd]).generate_state(1)[0])


def image_probabilities(model, categories: Sequence[str], images: Sequence[np.ndarray], policy: ImagePolicy, *,
                        threads: Optional[int] = None) -> List[np.ndarray]:
    """The ``h x w x M`` kNN-averaged cell probabilities of ``images`` under ``model``, through the one inference
    path (:class:`Segmenter` with its kNN post-processing), on the model's own device."""
    was_training = model.training
    model.eval()
    device = str(next(model.parameters()).device)
    try:
        seg = Segmenter.from_model(model, categories, policy=policy, device=device,
                                   **({"threads": threads} if threads else {}))
        return [seg.seg(im, return_probabilities=True).probabilities for im in images]
    finally:
        model.train(was_training)


def _policy_image(image: np.ndarray, policy: ImagePolicy) -> np.ndarray:
    h, w = policy.target_size(*image.shape[:2])
    return resize_bilinear(image, h, w)


def check_labels(images: Sequence[np.ndarray], labels: Sequence[Optional[np.ndarray]], names: Sequence[str]
                 ) -> None:
    """Every label map must have its image's size (``names``: the label files, for the message)."""
    for im, lab, name in zip(images, labels, names):
        if lab is not None and lab.shape != im.shape[:2]:
            raise ValueError(f"label map {name} is {lab.shape[0]}x{lab.shape[1]} px but its image is "
                             f"{im.shape[0]}x{im.shape[1]} px: a label map must have its image's size")


def self_train(trainer: WordGridTrainer, categories: Sequence[str], images: Sequence[np.ndarray],
               options: SelfTrainOptions = SelfTrainOptions(), *, policy: ImagePolicy,
               labels: Optional[Sequence[Optional[np.ndarray]]] = None, seen: Optional[Sequence[str]] = None,
               supervised: bool = False, start_round: int = 1, log: Callable[[str], None] = print,
               on_round: Optional[Callable[[int, Dict[str, Any]], Dict[str, Any]]] = None,
               on_step: Optional[Callable[[int, int], Dict[str, Any]]] = None, every: int = 0,
               progress: bool = False) -> List[Dict[str, Any]]:
    """Train ``trainer.model`` (its trainable parameters, as in the adaptation) on ``images`` (see the module).

    ``labels``: decoded label maps (``M`` = ignore), one per image (``None`` entries: unlabelled); ``seen``: the
    categories whose labels count (self-training with seen labels); ``supervised``: the labels are the only targets.
    Rounds ``start_round`` .. ``options.rounds`` run (a resumed run starts later). ``on_round(k, record)`` is called
    after each round (e.g. to validate, to save the run; its dict goes into that round's record), ``on_step(k, step)``
    every ``every`` updates within a round (e.g. to validate; its dicts go into the record's ``steps``). Returns one
    record per round run: mode, kept fraction of cells, final losses, seconds, and what the callbacks returned.
    """
    from tqdm import tqdm

    m = len(categories)
    mode = "supervised" if supervised else "seen-labels" if seen is not None else "self-train"
    if len(images) < options.batch_size:
        raise ValueError(f"{mode} needs at least batch_size = {options.batch_size} images, got {len(images)}")
    if (supervised or seen is not None) and (labels is None or any(lab is None for lab in labels)):
        raise ValueError(f"{mode} needs a label map for every image")
    if labels is not None and seen is None and not supervised:
        raise ValueError("label maps need the seen categories (seen=...) or supervised=True")
    if supervised and options.rounds != 1:
        raise ValueError("supervised training has no re-labelling rounds: rounds must be 1")
    seen_mask = None
    if seen is not None:
        unknown = [s for s in seen if s not in categories]
        if unknown:
            raise ValueError(f"seen categor{'y' if len(unknown) == 1 else 'ies'} {unknown} not among the "
                             f"categories {list(categories)}")
        seen_mask = np.isin(np.arange(m), [list(categories).index(s) for s in seen])
    if supervised:
        seen_mask = np.ones(m, bool)
    model = trainer.model
    params = list(trainer.params.values())
    resized = [_policy_image(im, policy) for im in images]
    groups: Dict[tuple, List[int]] = {}
    for i, im in enumerate(resized):
        groups.setdefault(im.shape, []).append(i)
    members = list(groups.values())
    weights = np.array([len(g) for g in members], np.float64) / len(resized)
    history = []
    for rnd in range(start_round, options.rounds + 1):
        t0 = time.perf_counter()
        seed = round_seed(options.seed, rnd)
        rng = np.random.default_rng(seed)
        torch.manual_seed(seed)
        trainer.sampler.rng = np.random.default_rng(seed + 1)
        probs: List[Optional[np.ndarray]] = [None] * len(images) if supervised else \
            image_probabilities(model, categories, images, policy)
        targets = [pixel_targets(r.shape[:2], probabilities=p, labels=None if labels is None else labels[i],
                                 seen=seen_mask, threshold=options.threshold)
                   for i, (r, p) in enumerate(zip(resized, probs))]
        kept = float(np.mean(np.concatenate([t.ravel() for t in targets]) != IGNORE))
        log(f"{mode} round {rnd}/{options.rounds}: {len(images)} images, {100 * kept:.1f} % of the pixels have a "
            f"target" + ("" if supervised else f" (pseudo-labels kept at probability >= {options.threshold})"))
        optim = torch.optim.AdamW(params, lr=options.lr, weight_decay=options.weight_decay)
        model.train()
        loss = wl = None
        during: List[Dict[str, Any]] = []
        steps = tqdm(range(options.steps), desc=f"{mode} round {rnd}", unit="step", disable=not progress,
                     leave=False)
        for step in steps:
            group = members[rng.choice(len(members), p=weights)]
            idx = rng.choice(group, min(options.batch_size, len(group)), replace=False)
            xs, ys = zip(*(augment(resized[i], targets[i], rng, options) for i in idx))
            x, y = torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))
            logits, _ = model(x.to(trainer.device))
            y = y.reshape(-1).to(trainer.device)
            if (y != IGNORE).any():
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y, ignore_index=IGNORE)
            else:  # no target in this batch: no image loss (cross-entropy over nothing is NaN)
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
            if progress:
                steps.set_postfix(loss=f"{float(loss.detach()):.3f}", refresh=False)
            if on_step is not None and every and (step + 1) % every == 0 and step + 1 < options.steps:
                model.eval()
                during.append({"step": step + 1, **(on_step(rnd, step + 1) or {})})
                model.train()
        model.eval()
        record = {"round": rnd, "mode": mode, "kept_cells": kept, "image_loss": float(loss.detach()),
                  "word_grid_loss": None if wl is None else float(wl.detach()),
                  "seconds": round(time.perf_counter() - t0, 1), **({"steps": during} if during else {})}
        log(f"{mode} round {rnd}: image loss {record['image_loss']:.3f} ({record['seconds']:.0f} s)")
        if on_round is not None:
            record.update(on_round(rnd, record) or {})
        history.append(record)
    model.eval()
    return history


__all__ = ["IGNORE", "MODES", "THRESHOLD", "SelfTrainOptions", "augment", "cell_targets", "check_labels",
           "image_probabilities", "pixel_targets", "pseudo_labels", "resize_labels", "round_seed", "self_train"]
