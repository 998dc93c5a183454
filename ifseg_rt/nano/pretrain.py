"""``python -m ifseg_rt.pretrain_nano``: pretrain the embedded nano VL model on the synthetic world, OFA-style.

One unified seq2seq model (``ifseg_rt.model.OFA`` with the nano config of ``ifseg_rt.nano.tasks``) trained from scratch on
captioning, VQA, region classification and box grounding over rendered scenes and word layouts (see
``ifseg_rt.nano.tasks`` for the task table). No per-pixel label map is ever used: segmentation comes later, from IFSeg's
image-free adaptation alone (``python -m ifseg_rt demo``).

Writes to ``--out`` (default ``export/nano``)::

    model.safetensors     the OFA checkpoint (save_checkpoint: config + provenance in its metadata)
    vocab.json, merges.txt  the nano tokenizer (HF-style OFA files; 16 <bin_i> location tokens follow <mask>)
    pretrain.json         options, loss curve, held-out accuracy per task, timing, machine
    CARD.md               how the checkpoint was made, with its sha256

Reproduce the shipped checkpoint (2 CPU threads, under 30 minutes)::

    python -m ifseg_rt.pretrain_nano --out export/nano
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Iterator, List

import numpy as np

from .. import __version__
from ..files import WEIGHTS_FILE
from ..geometry import PATCH
from .tasks import IMAGE_SIZE, INPUTS, TASKS, Batch, TaskBuilder, collate, forward, load_tokenizer, nano_config, \
    write_vocab

MODEL_FILE = WEIGHTS_FILE
REPORT_FILE = "pretrain.json"
CARD_FILE = "CARD.md"
EVAL_SEED = 10 ** 12  # held-out scenes/layouts start here; training seeds are seed * 10**9 + sample index
TASK_WEIGHTS = (0.2, 0.2, 0.35, 0.25)  # caption, vqa, region, grounding
INPUT_WEIGHTS = (0.45, 0.25, 0.3)  # image, words, mixed


@dataclass(frozen=True)
class PretrainOptions:
    """Hyper-parameters of the nano pretraining."""

    steps: int = 2600  # optimiser updates (~19 min on 2 cores)
    batch_size: int = 48
    lr: float = 1e-3  # peak; linear warm-up then cosine to lr * final_lr_ratio
    warmup: int = 300
    final_lr_ratio: float = 0.05
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    size: int = IMAGE_SIZE  # px of the training scenes (a multiple of 16; 128 = the nano reference grid)
    seed: int = 0
    threads: int = 2  # torch intra-op threads

    def __post_init__(self):
        from ..adapt.options import MAX_LR

        for name, lo in (("steps", 1), ("batch_size", 1), ("warmup", 0), ("size", 16), ("seed", 0), ("threads", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"pretraining {name} must be an integer >= {lo}, got {v!r}")
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr <= MAX_LR):  # NaN fails both comparisons
            raise ValueError(f"pretraining lr must be in (0, {MAX_LR:g}], got {self.lr}")

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        t = (step - self.warmup) / max(1, self.steps - self.warmup)
        lo = self.lr * self.final_lr_ratio
        return lo + 0.5 * (self.lr - lo) * (1.0 + math.cos(math.pi * min(t, 1.0)))


def choose(seed: int) -> tuple:
    """(task, input source) of training sample ``seed``."""
    rng = np.random.default_rng([seed, 3])
    return TASKS[rng.choice(len(TASKS), p=TASK_WEIGHTS)], INPUTS[rng.choice(len(INPUTS), p=INPUT_WEIGHTS)]


def batches(builder: TaskBuilder, options: PretrainOptions, start: int = 0) -> Iterator[Batch]:
    """Training batches from step ``start`` on. Rendered in line: a renderer thread next to torch's OpenMP threads
    on a 2-core machine makes both crawl (spin-waiting barriers), and rendering is ~1/3 of a step."""
    for step in range(start, options.steps):
        base = options.seed * 10 ** 9 + step * options.batch_size
        yield collate([builder.sample(base + i, *choose(base + i)) for i in range(options.batch_size)], builder.grid)


def calibrate_batchnorm(model, images) -> None:
    """Set every ResNet BN's running statistics from one batch (layer by layer, each on already-normalised inputs).

    OFA's BNs always use running statistics (``EvalBatchNorm2d``), so a from-scratch ResNet needs them set once;
    the affine terms then train as usual.
    """
    import torch
    from torch import nn

    hooks = []

    def pre(m, inputs):
        x = inputs[0]
        m.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        m.running_var.copy_(x.var(dim=(0, 2, 3)))

    for m in model.encoder.embed_images.modules():
        if isinstance(m, nn.BatchNorm2d):
            hooks.append(m.register_forward_pre_hook(pre))
    try:
        with torch.no_grad():
            model.encoder.embed_images(images)
    finally:
        for h in hooks:
            h.remove()


def batch_loss(model, batch: Batch):
    import torch.nn.functional as F
    import torch

    logits = forward(model, batch)
    target = torch.from_numpy(batch.target)
    return F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=1), logits


def evaluate_tasks(model, builder: TaskBuilder, n: int = 96, batch_size: int = 48) -> Dict[str, Dict[str, float]]:
    """Teacher-forced accuracy on held-out samples, per (task, input): token accuracy and whole-answer accuracy."""
    import torch

    was = model.training
    model.eval()
    out: Dict[str, Dict[str, float]] = {}
    try:
        for task in TASKS:
            for source in INPUTS:
                tok_ok = tok_n = seq_ok = 0
                for s in range(0, n, batch_size):
                    samples = [builder.sample(EVAL_SEED + i, task, source) for i in range(s, min(n, s + batch_size))]
                    batch = collate(samples, builder.grid)
                    with torch.no_grad():
                        pred = forward(model, batch).argmax(-1).numpy()
                    valid = batch.target != 1
                    ok = (pred == batch.target) | ~valid
                    tok_ok += int(((pred == batch.target) & valid).sum())
                    tok_n += int(valid.sum())
                    seq_ok += int(ok.all(axis=1).sum())
                out[f"{task}/{source}"] = {"token_acc": round(tok_ok / tok_n, 4), "answer_acc": round(seq_ok / n, 4)}
    finally:
        model.train(was)
    return out


def pretrain(out_dir, options: PretrainOptions = PretrainOptions(), *, progress: bool = True, log_every: int = 50,
             eval_samples: int = 96, write_card: bool = True) -> Dict[str, Any]:
    """Pretrain the nano model and write it, its tokenizer, a report and a card to ``out_dir``.

    Returns the report (also written to ``pretrain.json``): loss curve, held-out accuracy, timing.
    """
    import torch

    from ..checkpoint import save_checkpoint
    from ..files import file_sha256
    from ..model import build_model

    if options.size % PATCH or options.size < PATCH:
        raise ValueError(f"--size must be a positive multiple of 16, got {options.size}")
    out_dir = Path(out_dir)
    torch.set_num_threads(options.threads)
    write_vocab(out_dir)
    tok = load_tokenizer(out_dir)
    cfg = nano_config(len(tok))
    torch.manual_seed(options.seed)
    model = build_model(cfg).train()
    builder = TaskBuilder(tok, size=options.size)
    calib = collate([builder.sample(EVAL_SEED * 2 + i, "caption", "image") for i in range(64)], builder.grid)
    calibrate_batchnorm(model, torch.from_numpy(calib.images))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=options.lr, betas=(0.9, 0.98), eps=1e-8, weight_decay=options.weight_decay)

    from tqdm import tqdm

    bar = tqdm(total=options.steps, unit="step", desc="pretrain", dynamic_ncols=True,
               disable=None if progress else True)
    curve: List[Dict[str, float]] = []
    window: List[float] = []
    t0 = time.perf_counter()
    step = 0
    try:
        for batch in batches(builder, options):
            lr = options.lr_at(step)
            for g in opt.param_groups:
                g["lr"] = lr
            loss, _ = batch_loss(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, options.grad_clip)
            opt.step()
            step += 1
            window.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{window[-1]:.3f}", lr=f"{lr:.2e}", refresh=False)
            if step % log_every == 0 or step == options.steps:
                rec = {"step": step, "loss": round(sum(window) / len(window), 5), "lr": lr,
                       "elapsed_s": round(time.perf_counter() - t0, 1)}
                curve.append(rec)
                if bar.disable:
                    print(f"step {step}/{options.steps}  loss {rec['loss']:.4f}  lr {lr:.2e}  "
                          f"{rec['elapsed_s']:.0f} s", flush=True)
                window = []
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    accuracy = evaluate_tasks(model, builder, n=eval_samples) if eval_samples else {}
    model.eval()
    provenance = {"tool": "ifseg_rt.pretrain_nano", "ifseg_rt": __version__, "torch": torch.__version__,
                  "options": asdict(options), "steps_done": step, "final_loss": curve[-1]["loss"] if curve else None}
    path = save_checkpoint(model, out_dir / MODEL_FILE, provenance=provenance)
    report = {
        "format": "ifseg_rt.pretrain_nano", "options": asdict(options), "config": cfg.to_dict(),
        "parameters": sum(p.numel() for p in model.parameters()), "steps_done": step,
        "seconds": round(seconds, 1), "steps_per_s": round(step / max(seconds, 1e-9), 3),
        "first_loss": curve[0]["loss"] if curve else None, "final_loss": curve[-1]["loss"] if curve else None,
        "curve": curve, "heldout_accuracy": accuracy,
        "checkpoint": {"file": MODEL_FILE, "bytes": path.stat().st_size, "sha256": file_sha256(path)},
        "machine": machine(), "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    (out_dir / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if write_card:
        (out_dir / CARD_FILE).write_text(card(report), encoding="utf-8")
    return report


def machine() -> Dict[str, Any]:
    import torch

    from ..system import cpu_model

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "system": platform.system()}


def card(report: Dict[str, Any]) -> str:
    """The model card (Markdown) for a pretraining report."""
    o, c, ck = report["options"], report["config"], report["checkpoint"]
    acc = report.get("heldout_accuracy") or {}
    rows = "\n".join(f"| {k} | {v['token_acc'] * 100:.1f} | {v['answer_acc'] * 100:.1f} |" for k, v in acc.items())
    m = report["machine"]
    return f"""# nano-OFA (synthetic world) — model card

An OFA-architecture vision-language model small enough to ship inside the repository, pretrained from scratch on
the procedurally generated world of `ifseg_rt.world`. It is the embedded default of `python -m ifseg_rt demo`.

- **file**: `{ck['file']}` ({ck['bytes']:,} bytes, float32 safetensors, ifseg_rt format; loads with
  `ifseg_rt.load_checkpoint` and `ifseg_rt.adapt.prepare`)
- **sha256**: `{ck['sha256']}`
- **tokenizer**: `vocab.json` + `merges.txt` in this folder (HF-style OFA files: `<s> <pad> </s> <unk>`, byte-level
  BPE pieces, `<mask>`), then no image codes and 16 `<bin_i>` location tokens: load with
  `ifseg_rt.nano.tasks.load_tokenizer(dir)`; `OFATokenizer.from_dir(dir)` gives the same ids for text
- **parameters**: {report['parameters']:,}

## Architecture (`OFAConfig`, stored in the checkpoint)

d_model {c['d_model']}, heads {c['heads']}, FFN {c['ffn_dim']}, encoder/decoder layers {c['encoder_layers']}/{c['decoder_layers']},
ResNet blocks {tuple(c['resnet_layers'])} of width {c['resnet_width']} ({16 * c['resnet_width']} feature channels), vocabulary
{c['vocab_size']}, {c['max_positions']} text positions, image position grid {c['image_bucket_size']}, IFSeg reference grid
{c['patch_image_size'] // 16} x {c['patch_image_size'] // 16} cells ({c['patch_image_size']} px).

## Data and tasks

Every sample is generated on the fly from its seed (`seed * 10^9 + index`; held-out evaluation seeds start at
10^12): {o['size']} x {o['size']} px scenes of 24 categories (17 textured stuff, 7 coloured shapes), random layouts,
lighting and noise. Tasks (one unified seq2seq model, tied output embedding): captioning (names by area), VQA
("is there a X in the image?" -> yes/no), region classification (4 `<bin>` tokens -> name), grounding (name -> 4
`<bin>` tokens), with weights {TASK_WEIGHTS}. Inputs: rendered scenes ({INPUT_WEIGHTS[0]:.0%}), word layouts
({INPUT_WEIGHTS[1]:.0%}: a blocky random grid of category words in the image slots, no image), and scenes with the
cells inside one annotated box replaced by that box's word ({INPUT_WEIGHTS[2]:.0%}). Texts use only image-level
facts and bounding boxes; **no per-pixel label map is used** (the maps exist for evaluation only).

## Training

AdamW (betas 0.9/0.98, weight decay {o['weight_decay']}), peak lr {o['lr']}, {o['warmup']} warm-up steps, cosine to
{o['final_lr_ratio']} x peak, batch {o['batch_size']}, {report['steps_done']} steps, gradient clip {o['grad_clip']}, dropout 0,
fp32, seed {o['seed']}. ResNet BN statistics set once from 64 scenes, then fixed (OFA's BN semantics).

- loss (token cross-entropy): {report['first_loss']} (first {50} steps) -> {report['final_loss']} (last window)
- time: {report['seconds'] / 60:.1f} min ({report['steps_per_s']} steps/s) on {m['cpu']} with {m['torch_threads']} torch
  threads, torch {m['torch']}, Python {m['python']}; finished {report['finished_at']}

## Held-out accuracy (teacher-forced, %)

| task/input | token | whole answer |
|---|---:|---:|
{rows}

## Reproduce

    python -m ifseg_rt.pretrain_nano --out export/nano --steps {o['steps']} --batch-size {o['batch_size']} --seed {o['seed']}

Bit-identical weights need the same torch build and thread count; the card and `pretrain.json` are rewritten.
"""
