"""``python -m ifseg_rt demo``: IFSeg end to end on the embedded nano model and the synthetic world.

1. render held-out scenes of the chosen categories (images + exact label maps, ``--out/scenes``);
2. score the **un-adapted** model (fresh IFSeg decoder modules on the pretrained nano OFA: the baseline);
3. adapt it image-free on word grids (``ifseg_rt.adapt``; run directory ``--out/run``);
4. export it (``ifseg_rt.export``; model directory ``--out/model``) and segment the scenes with the runtime
   (``ifseg_rt.runtime.Segmenter``), with and without the kNN post-processing;
5. print the mIoU table, write ``--out/results.json`` and overlay PNGs (``--out/overlays``).

Examples::

    python -m ifseg_rt demo                                   # 14 default categories, a few minutes on a CPU
    python -m ifseg_rt demo --categories "sky, grass, water, sand, brick, snow, ball, star" --out demo_out
    python -m ifseg_rt demo --quick                           # seconds: tiny run, only checks the pipeline
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..files import WEIGHTS_FILE
from ..world import CATEGORY_NAMES, DEFAULT_DEMO_CATEGORIES, check_categories

_CHECKOUT_NANO = Path(__file__).resolve().parents[2] / "export" / "nano"  # the shipped model in a source checkout
_INSTALLED_NANO = Path(__file__).resolve().parents[1] / "_nano"  # the copy CMake installs into a wheel
NANO_DIR = _CHECKOUT_NANO if (_CHECKOUT_NANO / WEIGHTS_FILE).is_file() or not _INSTALLED_NANO.is_dir() \
    else _INSTALLED_NANO
TILE = 192  # px; overlay tiles are scaled up (nearest) to at least this height
DEMO_SEED = 2 ** 40  # evaluation scenes: seeds DEMO_SEED + i, disjoint from pretraining (< 10**12) and its eval
SELF_TRAIN_SEED = 2 ** 41  # unlabelled self-training scenes: disjoint from the evaluation scenes


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of one demo run (the defaults are the README's numbers)."""

    steps: int = 600  # adaptation updates
    batch_size: int = 16  # word grids per update
    lr: float = 1e-3  # peak adaptation learning rate (cosine to 0); the nano model wants far more than OFA-Base's 5e-5
    images: int = 100  # evaluation scenes
    size: int = 256  # px, square scenes: 16 x 16 cells, twice the 8 x 8 reference grid the word grids are trained on
    overlays: int = 8  # overlay PNGs written
    check_export: bool = True  # compare onnxruntime with PyTorch after export
    self_train: int = 0  # unlabelled scenes to self-train on after the adaptation (0: no self-training)
    self_train_steps: int = 300  # self-training updates (one round)


QUICK = DemoSettings(steps=4, batch_size=2, images=3, size=64, overlays=2, check_export=False, self_train_steps=4)


def parse_demo_categories(text: Optional[str]) -> List[str]:
    """``"sky, grass"`` -> names; ``None`` -> the default set. Unknown or empty names raise ``ValueError``."""
    if text is None:
        return list(DEFAULT_DEMO_CATEGORIES)
    items = [t.strip() for t in text.split(",")]
    if not any(items):
        raise ValueError("--categories is empty; give comma-separated names from: " + ", ".join(CATEGORY_NAMES))
    if not all(items):
        raise ValueError(f"--categories {text!r} has an empty name (a stray comma?)")
    return check_categories(items)


def find_nano(model_dir: Optional[str]) -> Path:
    d = Path(model_dir) if model_dir else NANO_DIR
    missing = [f for f in (WEIGHTS_FILE, "vocab.json", "merges.txt") if not (d / f).is_file()]
    if missing:
        raise FileNotFoundError(f"the nano model folder {d} lacks {', '.join(missing)}; pass --model DIR or rebuild it "
                                f"with `python -m ifseg_rt.pretrain_nano --out {d}`")
    return d


# --- pieces ----------------------------------------------------------------------------------------------------
def _overlay_panel(image: np.ndarray, maps: Sequence[Tuple[str, np.ndarray]], names: Sequence[str]) -> np.ndarray:
    """Side by side: the image, then every (title, label map) blended over it, each tile scaled up (nearest) to at
    least :data:`TILE` px; titles, then a colour legend of every category shown, below."""
    from PIL import Image, ImageDraw

    from ..runtime.palette import legend, overlay

    m = len(names)
    s = panel_scale(image.shape[0])
    big = lambda a: np.repeat(np.repeat(a, s, axis=0), s, axis=1)  # noqa: E731
    tiles = [big(image)] + [overlay(big(image), big(np.where(lab >= m, 0, lab)), m) for _, lab in maps]
    strip = np.concatenate(tiles, axis=1)
    h, w = tiles[0].shape[:2]
    titles = Image.new("RGB", (strip.shape[1], 14), (255, 255, 255))
    draw = ImageDraw.Draw(titles)
    for i, t in enumerate(["image"] + [t for t, _ in maps]):
        draw.text((i * w + 2, 1), t, fill=(0, 0, 0))
    present = sorted({int(v) for _, lab in maps for v in np.unique(lab) if v < m})
    return np.concatenate([strip, np.asarray(titles), legend(names, present, strip.shape[1])], axis=0)


def panel_scale(side: int) -> int:
    """Integer up-scaling of overlay tiles so that they are at least TILE px tall."""
    return max(1, -(-TILE // side))


def _gt(label_path: Path, m: int) -> np.ndarray:
    from ..metrics import load_label

    return load_label(label_path, m, label_offset=1)


OUTPUTS = ("scenes", "run", "model", "overlays", "results.json")  # what a run writes into --out


def prepare_out(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty ``out`` unless ``overwrite``; with it, remove a previous run's outputs first (so that no
    stale scene or overlay survives among the new ones). Folders holding anything else are never emptied."""
    import shutil

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"--out {out} is not empty; pass --overwrite to replace a previous demo run there, "
                                  f"or choose another folder")
        foreign = sorted(p.name for p in out.iterdir() if p.name not in OUTPUTS)
        if foreign:
            raise FileExistsError(f"--out {out} holds files the demo did not write ({', '.join(foreign[:5])}); "
                                  f"refusing to overwrite it")
        for name in OUTPUTS:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()


def run_demo(out: Path, names: Sequence[str], settings: DemoSettings, *, model_dir: Optional[str] = None,
             seed: int = 1, threads: Optional[int] = None, progress: bool = True, log=print) -> Dict[str, Any]:
    """The whole demo; returns the results dictionary also written to ``out/results.json`` (paths absolute).

    ``threads``: CPU threads for every engine (default: the idle cores available to the process, see
    :func:`ifseg_rt.system.idle_cores`)."""
    import torch

    from ..adapt import AdaptOptions, RunWriter, WordGridTrainer, prepare, train
    from ..evaluate import evaluate
    from ..export import export
    from ..runtime import ImagePolicy, Segmenter
    from ..runtime.preprocess import load_image
    from ..world import write_dataset

    from ..system import idle_cores

    t_start = time.perf_counter()
    nano = find_nano(model_dir)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    threads = threads or idle_cores()
    torch.set_num_threads(threads)
    log(f"using {threads} thread(s)")
    m = len(names)
    timings: Dict[str, float] = {}

    t0 = time.perf_counter()
    log(f"[1/5] rendering {settings.images} held-out scenes ({settings.size} px, {m} categories) -> {out / 'scenes'}")
    pairs = write_dataset(out / "scenes", [DEMO_SEED + i for i in range(settings.images)], names, size=settings.size)
    timings["scenes_s"] = time.perf_counter() - t0

    policy = ImagePolicy(short_side=settings.size, max_long_side=4 * settings.size)
    options = AdaptOptions(steps=settings.steps, batch_size=settings.batch_size, lr=settings.lr, seed=seed)
    setup = prepare(nano / WEIGHTS_FILE, nano, names, options=options)
    shown = {p for p, _ in pairs[:settings.overlays]}
    maps: Dict[Path, Dict[str, np.ndarray]] = {p: {} for p in shown}

    def keep(prefix: str):
        def hook(path: Path, pred: Dict[str, np.ndarray]) -> None:
            if path in shown:
                maps[path].update({prefix + k: v for k, v in pred.items()})
        return hook

    t0 = time.perf_counter()
    log("[2/5] un-adapted baseline (pretrained nano OFA + fresh IFSeg decoder modules), through the runtime")
    base_seg = Segmenter.from_model(setup.model, names, policy=policy, threads=threads)
    base = evaluate(base_seg, pairs, knn=True, progress=progress, on_prediction=keep("base_"))
    del base_seg  # the model is adapted in place below: its cached tables would be stale
    timings["baseline_eval_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    log(f"[3/5] image-free adaptation: {settings.steps} steps x {settings.batch_size} word grids")
    trainer = WordGridTrainer(setup.model, options, device="cpu")
    writer = RunWriter(out / "run", setup, args={"tool": "ifseg_rt.demo", "categories": list(names)},
                       keep_checkpoints=False, image_policy=policy)
    summary = train(trainer, writer, save_every=0, log_every=max(1, settings.steps // 10), progress=progress)
    timings["adapt_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    log(f"[4/5] exporting -> {out / 'model'}")
    export(out / "run", out / "model", image_policy=policy, force=True, check=settings.check_export,
           log=lambda msg: log(f"      {msg}"))
    timings["export_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    log("[5/5] segmenting the scenes with the runtime (onnxruntime), plain and with kNN")
    seg = Segmenter.load(out / "model", backend="onnxruntime", device="cpu", threads=threads)
    adapted = evaluate(seg, pairs, knn=True, progress=progress, on_prediction=keep(""))
    timings["eval_s"] = time.perf_counter() - t0

    over_dir = out / "overlays"
    over_dir.mkdir(exist_ok=True)
    from PIL import Image

    written = []
    for img_path, lab_path in pairs[:settings.overlays]:
        got = maps[img_path]
        panel = [("ground truth", _gt(lab_path, m)), ("un-adapted", got["base_raw"]), ("IFSeg", got["raw"]),
                 ("IFSeg + kNN", got["knn"])]
        path = over_dir / f"{img_path.stem}.png"
        Image.fromarray(_overlay_panel(load_image(img_path), panel, names)).save(path)
        written.append(str(path))

    rows = {"un-adapted": base.metrics["raw"], "un-adapted + kNN": base.metrics["knn"],
            "IFSeg": adapted.metrics["raw"], "IFSeg + kNN": adapted.metrics["knn"]}
    self_training = None
    if settings.self_train:
        from ..adapt.selftrain import SelfTrainOptions, self_train
        from ..world import render_scene

        t0 = time.perf_counter()
        log(f"[+] self-training on {settings.self_train} unlabelled scenes ({settings.self_train_steps} steps), "
            f"then the same evaluation (torch, in process)")
        unlabelled = [render_scene(SELF_TRAIN_SEED + i, settings.size, categories=names).image
                      for i in range(settings.self_train)]
        st = SelfTrainOptions(steps=settings.self_train_steps, seed=seed,
                              batch_size=min(SelfTrainOptions().batch_size, settings.self_train))
        self_training = self_train(trainer, names, unlabelled, st, policy=policy, log=lambda msg: log(f"      {msg}"))
        st_seg = Segmenter.from_model(trainer.model, names, policy=policy, threads=threads)
        selftrained = evaluate(st_seg, pairs, knn=True, progress=progress)
        rows.update({"+ self-training": selftrained.metrics["raw"],
                     "+ self-training + kNN": selftrained.metrics["knn"]})
        timings["self_train_s"] = time.perf_counter() - t0
    results = {
        "format": "ifseg_rt.demo", "categories": list(names), "settings": settings.__dict__, "seed": seed,
        "model": str(nano.resolve()), "scene_seeds": [DEMO_SEED, DEMO_SEED + settings.images - 1],
        "miou": {k: _pct(v.miou) for k, v in rows.items()},
        "metrics": {k: v.to_dict(names) for k, v in rows.items()},
        "adaptation": {k: summary[k] for k in ("steps", "final_loss", "steps_per_s", "seconds")},
        "self_training": self_training,
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
        "overlays": written, "model_dir": str(out / "model"),
    }
    results["timings_s"]["total_s"] = round(time.perf_counter() - t_start, 2)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return results


def _pct(x: float) -> Optional[float]:
    return None if x != x else round(100.0 * x, 2)


def format_results(results: Dict[str, Any]) -> str:
    """The README-style table: method, kNN, mIoU, mAcc, aAcc."""
    lines = [f"{'method':<22}{'mIoU':>8}{'mAcc':>8}{'aAcc':>8}", "-" * 46]
    for name, d in results["metrics"].items():
        cells = "".join(f"{(d[k] if d[k] is not None else float('nan')):>8.1f}" for k in ("mIoU", "mAcc", "aAcc"))
        lines.append(f"{name:<22}{cells}")
    gain = results["miou"]["IFSeg"] - results["miou"]["un-adapted"]
    knn = results["miou"]["IFSeg + kNN"] - results["miou"]["IFSeg"]
    lines.append("-" * 46)
    lines.append(f"IFSeg - un-adapted: {gain:+.1f} mIoU;  kNN: {knn:+.1f} mIoU")
    return "\n".join(lines)
