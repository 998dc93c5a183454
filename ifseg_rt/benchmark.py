"""Measured per-stage latency and throughput of a :class:`Segmenter`, and the backend x precision table of
``python -m ifseg_rt bench --formats`` (in the style of ultralytics' benchmark). Torch-free unless a torch row runs.

Every number is measured here and now: medians over repeated runs, with the CPU model and thread count reported
beside them (numbers from different machines do not compare).
"""

from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from .evaluate import evaluate
from .runtime.backends.onnxruntime import OnnxRuntimeBackend
from .runtime.model_dir import WEIGHTS_FILE, PrecisionSpec, load_model_dir
from .runtime.segmenter import STAGES, Segmenter
from .system import available_cores, cpu_model  # noqa: F401  (re-exported for the CLI)


def stats(values: Sequence[float]) -> Dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {"median": float(np.median(a)), "p90": float(np.percentile(a, 90)), "mean": float(a.mean()),
            "min": float(a.min())}


def measure(seg: Segmenter, images: Sequence[np.ndarray], *, batch: int = 1, warmup: int = 2,
            repeats: int = 10) -> Dict[str, Any]:
    """Per-stage ms per image (median/p90 over ``repeats`` passes over ``images`` in batches of ``batch``) and
    images/s of the whole pass."""
    images = list(images)
    for _ in range(warmup):
        seg.seg(images[:batch], batch_size=batch)
    stage: Dict[str, List[float]] = {k: [] for k in STAGES}
    walls = []
    res = []
    for _ in range(repeats):
        for s in range(0, len(images), batch):
            chunk = images[s:s + batch]
            t0 = time.perf_counter()
            res = seg.seg(chunk, batch_size=batch)
            walls.append((time.perf_counter() - t0) / len(chunk))
            for k in stage:
                stage[k].append(float(np.mean([r.timings[k] for r in res])))
    return {"batch": batch, "input_size": list(res[0].input_size), "grid": list(res[0].grid),
            "stages_ms_per_image": {k: stats(v) for k, v in stage.items()},
            "wall_ms_per_image": stats([1e3 * w for w in walls]),
            "throughput_img_s": float(1.0 / np.median(walls))}


def variants(spec, *, torch_available: bool, openvino_available: bool = False) -> List[Dict[str, str]]:
    """The (backend, precision) rows a model directory can run on the CPU: onnxruntime in each of its precisions,
    the portable single graph when a split one exists, OpenVINO bf16 on the split graph (recorded or not), and torch
    fp32 (+ its gated low precisions)."""
    rows = []
    for name, rec in spec.precisions.items():
        if rec.backend == "onnxruntime" and spec.onnx_file:
            rows.append({"backend": "onnxruntime", "precision": name})
    if spec.tables_file:
        rows.append({"backend": "onnxruntime", "precision": "fp32", "graph": "portable"})
    if openvino_available and spec.tables_file and spec.body_file:
        rows += [{"backend": "openvino", "precision": n} for n, r in spec.precisions.items() if r.backend == "openvino"]
        if not any(r["backend"] == "openvino" for r in rows):
            rows.append({"backend": "openvino", "precision": "bf16"})  # on request: no recorded agreement
    if torch_available and spec.has_file(WEIGHTS_FILE):
        rows.append({"backend": "torch", "precision": "fp32"})
        rows += [{"backend": "torch", "precision": n} for n, r in spec.precisions.items() if r.backend == "torch"]
    return rows


def formats(model_dir, images: Sequence[np.ndarray], *, threads: Optional[int] = None, warmup: int = 1,
            repeats: int = 5, pairs=None, progress=None) -> List[Dict[str, Any]]:
    """One row per runnable (backend, precision): file size, label agreement with the first row (onnxruntime fp32)
    on ``images`` (and mIoU over ``pairs`` = [(image, label PNG)] when given), ms per stage, images/s."""
    import dataclasses
    import importlib.util

    spec = load_model_dir(model_dir)
    rows = []
    reference: Optional[List[np.ndarray]] = None
    for v in variants(spec, torch_available=importlib.util.find_spec("torch") is not None,
                      openvino_available=importlib.util.find_spec("openvino") is not None):
        row: Dict[str, Any] = dict(v)
        try:
            seg = Segmenter.load(model_dir, backend=v["backend"], precision=v["precision"],
                                 **({"threads": threads} if threads else {}))
            if v.get("graph") == "portable":  # the same weights without the split: tables recomputed per call
                portable = dataclasses.replace(spec, tables_file=None, precisions={
                    "fp32": PrecisionSpec("fp32", "onnxruntime")})
                seg.backend = OnnxRuntimeBackend(portable, **({"threads": threads} if threads else {}))
        except (ValueError, RuntimeError, ImportError) as e:
            row["error"] = str(e)
            rows.append(row)
            continue
        row["file"] = ", ".join(spec.files_for(v["backend"], v["precision"])) if v.get("graph") != "portable" \
            else spec.onnx_file
        names = spec.files_for(v["backend"], v["precision"]) if v.get("graph") != "portable" else [spec.onnx_file]
        row["size_mb"] = sum(spec.files[f]["bytes"] for f in names) / 1e6
        labels = [seg.seg(im).labels for im in images]
        if reference is None:
            reference = labels
        same = sum(int((a == b).sum()) for a, b in zip(labels, reference))
        row["agreement"] = same / sum(a.size for a in reference)
        row["recorded_agreement"] = (seg.agreement or {}).get("pixels")
        if pairs:
            m = evaluate(seg, pairs, knn=seg.knn.enabled).metrics
            row["miou"] = 100 * m["knn" if "knn" in m else "raw"].miou
        run = measure(seg, images, warmup=warmup, repeats=repeats)
        row["ms"] = {k: run["stages_ms_per_image"][k]["median"] for k in STAGES}
        row["img_s"] = run["throughput_img_s"]
        row["input_size"] = run["input_size"]
        rows.append(row)
        if progress:
            progress(row)
    return rows


def _width(stage: str) -> int:
    return max(10, len(stage) + 2)  # whole stage names in the header ("resize_argmax")


def format_table(rows: Sequence[Dict[str, Any]]) -> str:
    """The human-readable table of :func:`formats`."""
    miou = any("miou" in r for r in rows)
    head = (f"{'backend':<12}{'precision':<10}{'graph':<9}{'MB':>8}{'agree':>8}" + (f"{'mIoU':>7}" if miou else "")
            + "".join(f"{k:>{_width(k)}}" for k in STAGES) + f"{'img/s':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        graph = r.get("graph") or ("split" if r["backend"] == "onnxruntime" else "-")
        if "error" in r:
            lines.append(f"{r['backend']:<12}{r['precision']:<10}{graph:<9}  unavailable: {r['error']}")
            continue
        cells = f"{r['size_mb']:>8.1f}{100 * r['agreement']:>7.2f}%" + (f"{r.get('miou', float('nan')):>7.1f}"
                                                                        if miou else "")
        lines.append(f"{r['backend']:<12}{r['precision']:<10}{graph:<9}{cells}"
                     + "".join(f"{r['ms'][k]:>{_width(k)}.1f}" for k in STAGES) + f"{r['img_s']:>8.2f}")
    lines.append("-" * len(head))
    lines.append("agree: pixels whose label equals the first row's; ms: median per image and stage")
    return "\n".join(lines)
