"""An adaptation run: from (OFA checkpoint, BPE files, category list) to a run directory the export step reads.

Run directory layout::

    RUN/model.safetensors       the adapted SegOFA (save_checkpoint: config, categories, prompt prefix, prompt token
                                ids, category ids and provenance in its metadata); rewritten at every save
    RUN/run.json                config, categories, prompt, options, args, provenance, step, final loss, validation
    RUN/train_state.pt          weights + optimiser + loss scaler + sampler/RNG states for an exact --resume
                                (plain tensors and containers: loads with torch.load(weights_only=True))
    RUN/log.jsonl               one line per --log-every window (loss, lr, grad norm, steps/s) and per validation
    RUN/checkpoints/step_N.safetensors   the model at every save (with --keep-checkpoints)
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..system import versions
from ..checkpoint import load_checkpoint, save_checkpoint
from ..files import RUN_FILE, WEIGHTS_FILE, file_sha256, read_text
from ..knn.settings import KnnSettings
from ..model import OFAConfig, SegOFA, build_model
from ..runtime import ImagePolicy, Segmenter
from ..tokenizer import IFSEG_PROMPT_PREFIX, OFATokenizer, build_ifseg_prompt, parse_categories
from .options import AdaptOptions
from .trainer import WordGridTrainer, category_ids, training_model

RUN_FORMAT = "ifseg_rt.adapt.run"
RUN_VERSION = 1
MODEL_FILE = WEIGHTS_FILE
TRAIN_STATE_FILE = "train_state.pt"
LOG_FILE = "log.jsonl"
CHECKPOINT_DIR = "checkpoints"
SAVE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class RunSetup:
    """The starting point of a run: a SegOFA with its categories and where it came from."""

    model: SegOFA  # built with training dropout, prompt and categories set (Sg = mean subword embeddings)
    categories: List[str]
    prompt_prefix: str
    provenance: Dict[str, Any]


@dataclass
class Validation:
    """Optional mIoU monitoring on real images while adapting."""

    pairs: Sequence[Tuple[Path, Path]]
    every: int  # steps; 0 = only at the end
    label_offset: Optional[int] = None  # None: per file (metrics.load_label)
    knn: bool = True  # also score with the kNN post-processing
    knn_settings: KnnSettings = KnnSettings()
    knn_backend: str = "auto"
    short_side: int = 512  # preprocessing of the paper's evaluation (short side 512, long side <= 2048)
    max_long_side: int = 2048


def read_categories_file(path) -> List[str]:
    """Names from a text file: one per line and/or comma-separated; blank lines and ``#`` comments ignored."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"categories file not found: {path}")
    lines = [ln.split("#", 1)[0].strip() for ln in read_text(path, "; save the categories file as UTF-8").splitlines()]
    items = [item for ln in lines if ln for item in ln.split(",")]
    if not items:
        raise ValueError(f"no categories in {path}")
    return parse_categories(items)


def prepare(checkpoint, bpe_dir, categories, *, prompt_prefix: str = IFSEG_PROMPT_PREFIX,
            options: AdaptOptions = AdaptOptions()) -> RunSetup:
    """Tokenise the categories, load the checkpoint (OFA -> SegOFA surgery, ifseg.md §14.1) and set the categories.

    Raises ``ValueError`` / ``FileNotFoundError`` with the reason for bad categories, missing or mismatched BPE files
    and prompts longer than the encoder's positions.
    """
    names = parse_categories(categories)
    tok = OFATokenizer.from_dir(bpe_dir)
    prompt = build_ifseg_prompt(tok, names, prefix=prompt_prefix)
    loaded = load_checkpoint(checkpoint, num_categories=len(names), seed=options.seed)
    cfg = loaded.config
    if len(prompt) > cfg.max_positions:
        raise ValueError(f"the IFSeg prompt for {len(names)} categories is {len(prompt)} tokens long, more than the "
                         f"{cfg.max_positions} text positions of {loaded.path}; use fewer or shorter names or a "
                         f"shorter --prompt-prefix")
    top = max(prompt.src_ids)
    if top >= cfg.vocab_size:
        raise ValueError(f"the BPE files in {bpe_dir} do not match {loaded.path}: the prompt uses token id {top} but "
                         f"the checkpoint's dictionary has {cfg.vocab_size} symbols (the tokenizer has {len(tok)})")
    model = training_model(loaded.model, dropout=options.dropout, drop_path_rate=options.drop_path_rate)
    model.set_categories(prompt.src_ids, prompt.category_ids)
    provenance = {
        "source_checkpoint": str(Path(loaded.path).resolve()),
        "source_sha256": loaded.sha256 or file_sha256(loaded.path),
        "source_format": loaded.source_format, "source_categories": loaded.categories,
        "bpe_dir": str(Path(bpe_dir).resolve()),
    }
    return RunSetup(model=model, categories=names, prompt_prefix=prompt_prefix, provenance=provenance)


def read_run(out_dir) -> Dict[str, Any]:
    path = Path(out_dir) / RUN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {RUN_FILE} in {out_dir}: nothing to resume")
    try:
        run = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(run, dict) or run.get("format") != RUN_FORMAT:
        what = f"format {run.get('format')!r}" if isinstance(run, dict) else f"a JSON {type(run).__name__}"
        raise ValueError(f"{path} is not an adaptation run file ({what})")
    return run


def setup_from_run(run: Dict[str, Any]) -> Tuple[RunSetup, AdaptOptions]:
    """Rebuild the model skeleton of a saved run (weights come from its train state)."""
    missing = [k for k in ("options", "config", "num_categories", "categories", "prompt_tokens", "category_token_ids",
                           "prompt_prefix", "provenance") if k not in run]
    if missing:
        raise ValueError(f"{RUN_FILE} lacks {', '.join(repr(k) for k in missing)}: it was edited or is damaged")
    options = AdaptOptions.from_dict(run["options"])
    cfg = OFAConfig.from_dict(run["config"])
    names, m, ids = run["categories"], run["num_categories"], run["category_token_ids"]
    if not (isinstance(names, list) and isinstance(ids, list) and len(names) == len(ids) == m):
        raise ValueError(f"{RUN_FILE}: 'categories' ({len(names) if isinstance(names, list) else names!r}), "
                         f"'category_token_ids' and 'num_categories' ({m}) disagree: it was edited or is damaged")
    model = build_model(cfg, m, dropout=options.dropout, drop_path_rate=options.drop_path_rate, init=False)
    model.set_categories(run["prompt_tokens"], ids, update_table=False)
    return RunSetup(model=model, categories=list(names), prompt_prefix=run["prompt_prefix"],
                    provenance=dict(run["provenance"])), options


def load_train_state(out_dir) -> Dict[str, Any]:
    path = Path(out_dir) / TRAIN_STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {TRAIN_STATE_FILE} in {out_dir}: the run saved no state to resume from")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, KeyError, ValueError, IndexError, TypeError, AttributeError,
            pickle.UnpicklingError) as e:
        raise ValueError(f"{path} cannot be read ({type(e).__name__}: {str(e)[:120] or 'no detail'}): it is "
                         f"truncated or damaged; start over with --overwrite (or resume from a copy)") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} is not a train state (a {type(state).__name__}); start over with --overwrite")
    return state


class DivergedError(RuntimeError):
    """The weights became non-finite during training (they are not saved)."""


@dataclass
class RunWriter:
    """Writes the run directory."""

    out_dir: Path
    setup: RunSetup
    args: Dict[str, Any] = field(default_factory=dict)
    save_dtype: str = "float32"
    keep_checkpoints: bool = True
    validation_log: List[Dict[str, Any]] = field(default_factory=list)
    image_policy: Optional[ImagePolicy] = None  # recorded in run.json: what the run was validated for; export uses it
    self_training: List[Dict[str, Any]] = field(default_factory=list)  # rounds of self-training on images, if any

    def __post_init__(self):
        self.out_dir = Path(self.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def log(self, record: Dict[str, Any]) -> None:
        with open(self.out_dir / LOG_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def save(self, trainer: WordGridTrainer, *, final_loss: Optional[float], finished: bool) -> None:
        """Write the weights, the train state and ``run.json`` (refused for non-finite weights: the last good save
        stays on disk)."""
        model, step = trainer.model, trainer.step
        broken = [k for k, p in trainer.params.items() if not bool(torch.isfinite(p).all())]
        if broken:
            raise DivergedError(f"training diverged at step {step}: {len(broken)} trainable tensor(s) hold NaN or Inf "
                                f"(e.g. {broken[0]}); not saved, {self.out_dir} keeps its last save. Lower the "
                                f"learning rate (now {trainer.options.lr:g}) and resume or start over")
        provenance = {**self.setup.provenance, **versions("torch"), "step": step, "steps": trainer.options.steps,
                      "final_loss": final_loss, "tool": "ifseg_rt.adapt"}
        path = save_checkpoint(model, self.out_dir / MODEL_FILE, categories=self.setup.categories,
                               prompt_prefix=self.setup.prompt_prefix, provenance=provenance,
                               dtype=SAVE_DTYPES[self.save_dtype])
        if self.keep_checkpoints:
            ckpt = self.out_dir / CHECKPOINT_DIR / f"step_{step:06d}.safetensors"
            ckpt.parent.mkdir(exist_ok=True)
            ckpt.unlink(missing_ok=True)
            try:
                os.link(path, ckpt)  # files are only ever replaced, never rewritten in place: a hard link is safe
            except OSError:
                shutil.copyfile(path, ckpt)
        tmp = self.out_dir / (TRAIN_STATE_FILE + ".tmp")
        torch.save(trainer.state_dict(), tmp)
        os.replace(tmp, self.out_dir / TRAIN_STATE_FILE)
        run = {
            "format": RUN_FORMAT, "version": RUN_VERSION,
            "config": model.config.to_dict(), "num_categories": model.num_categories,
            "categories": self.setup.categories, "prompt_prefix": self.setup.prompt_prefix,
            "prompt_tokens": model.prompt_tokens.tolist(),
            "category_token_ids": category_ids(model),
            "options": trainer.options.to_dict(), "precision": trainer.precision, "device": str(trainer.device),
            "args": self.args, "provenance": provenance,
            "step": step, "steps": trainer.options.steps, "finished": finished, "final_loss": final_loss,
            "validation": self.validation_log,
            "image_policy": self.image_policy.to_dict() if self.image_policy is not None else None,
            "self_training": self.self_training,
            "files": {"model": MODEL_FILE, "train_state": TRAIN_STATE_FILE, "log": LOG_FILE},
            "saved_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        tmp = self.out_dir / (RUN_FILE + ".tmp")
        tmp.write_text(json.dumps(run, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, self.out_dir / RUN_FILE)


def validation_segmenter(trainer: WordGridTrainer, val: Validation, categories: Sequence[str]):
    """The :class:`~ifseg_rt.runtime.Segmenter` that scores the trainer's current weights (no export): the same
    post-processing as an exported model's ``Segmenter.seg``. Build a new one after further training."""
    policy = ImagePolicy(short_side=val.short_side, max_long_side=max(val.max_long_side, val.short_side))
    return Segmenter.from_model(trainer.model, categories, policy=policy, knn=val.knn_settings,
                                device=str(trainer.device), dtype=trainer.precision, knn_backend=val.knn_backend)


def validate(trainer: WordGridTrainer, val: Validation, categories: Sequence[str]) -> Dict[str, Any]:
    """mIoU of the current weights on the validation pairs, plain and with kNN (percent)."""
    from ..evaluate import evaluate

    seg = validation_segmenter(trainer, val, categories)
    result = evaluate(seg, val.pairs, label_offset=val.label_offset, knn=val.knn)
    out: Dict[str, Any] = {"step": trainer.step, "images": result.num_images, "seconds": round(result.seconds, 3)}
    for name, m in result.metrics.items():
        out[name] = {"mIoU": _pct(m.miou), "mAcc": _pct(m.macc), "aAcc": _pct(m.aacc)}
    return out


def _pct(x: float) -> Optional[float]:
    return None if x != x else round(100.0 * x, 4)


def train(trainer: WordGridTrainer, writer: RunWriter, *, stop_at: Optional[int] = None, save_every: int = 500,
          log_every: int = 10, validation: Optional[Validation] = None, progress: bool = True) -> Dict[str, Any]:
    """Run updates until ``stop_at`` (default: all steps), logging, validating and saving along the way.

    Returns a summary: steps done, final loss (mean of the last log window), steps/s, finished.
    """
    total = trainer.options.steps
    stop = total if stop_at is None else min(stop_at, total)
    from tqdm import tqdm

    # disable=None: tqdm turns itself off when stderr is not a terminal; plain log lines are printed instead
    bar = tqdm(total=total, initial=trainer.step, unit="step", desc="adapt", dynamic_ncols=True,
               disable=None if progress else True)
    window: List[float] = []
    final_loss: Optional[float] = None
    start_step, t0 = trainer.step, time.perf_counter()
    t_win = t0
    skipped = 0
    try:
        while trainer.step < stop:
            stats = trainer.train_step()
            skipped += stats.skipped
            window.append(stats.loss)
            rate = (trainer.step - start_step) / max(time.perf_counter() - t0, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{stats.loss:.4f}", lr=f"{stats.lr:.2e}", steps_s=f"{rate:.3g}", refresh=False)
            if trainer.step % log_every == 0 or trainer.step == stop:
                now = time.perf_counter()
                final_loss = sum(window) / len(window)
                rec = {"step": trainer.step, "loss": final_loss, "last_loss": stats.loss, "lr": stats.lr,
                       "grad_norm": stats.grad_norm, "skipped": skipped,
                       "steps_per_s": len(window) / max(now - t_win, 1e-9), "elapsed_s": round(now - t0, 3)}
                writer.log(rec)
                if bar.disable:
                    print(f"step {trainer.step}/{total}  loss {final_loss:.4f}  lr {stats.lr:.3e}  "
                          f"grad {stats.grad_norm:.3f}  {rec['steps_per_s']:.3g} steps/s", flush=True)
                window, t_win = [], now
            if validation is not None and validation.every and trainer.step % validation.every == 0 \
                    and trainer.step != total:
                _validate(trainer, writer, validation, bar)
            if trainer.step == stop:
                break
            if save_every and trainer.step % save_every == 0:
                writer.save(trainer, final_loss=final_loss, finished=False)
    finally:
        bar.close()
    finished = trainer.step >= total
    if validation is not None and finished:
        _validate(trainer, writer, validation, None)
    writer.save(trainer, final_loss=final_loss, finished=finished)
    elapsed = time.perf_counter() - t0
    done = trainer.step - start_step
    return {"step": trainer.step, "steps": total, "finished": finished, "final_loss": final_loss,
            "steps_per_s": done / elapsed if elapsed > 0 else float("nan"), "seconds": elapsed}


def _validate(trainer, writer: RunWriter, validation: Validation, bar) -> None:
    rec = validate(trainer, validation, writer.setup.categories)
    writer.validation_log.append(rec)
    writer.log({"validation": rec})
    msg = f"step {rec['step']}: " + "  ".join(f"{k} mIoU {rec[k]['mIoU']}" for k in ("raw", "knn") if k in rec)
    if bar is not None and not bar.disable:
        bar.write(msg)
    else:
        print(msg, flush=True)
