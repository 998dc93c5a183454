"""``eval --ray``: :func:`evaluate_dataset`, the single-process scoring (:func:`~ifseg_rt.evaluate.predict_pair`) on a
pool of Ray actors whose confusion matrices the driver sums."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..evaluate import EvalResult, load_segmenter, predict_pair, scoring_knn
from ..knn.settings import KnnSettings
from ..metrics import ConfusionMatrix, SegMetrics
from ..runtime.inputs import is_uri
from ..runtime.outputs import error_message
from .cluster import (PoolPlan, RayRun, arrow_blocks, check_model_options, cluster_plan, init_ray, pool_options,
                      require_ray, shutdown_ray)
from .storage import absolute_path


class _EvalActor:
    """Ray Data callable class: loads one segmenter (``evaluate.load_segmenter``), then turns blocks of (image,
    label) rows into one row of summed confusion matrices each."""

    def __init__(self, model: str, *, load_options: Dict[str, Any], knn_backend: str, label_offset: Optional[int],
                 knn: Optional[bool]):
        self.segmenter = load_segmenter(model, **load_options)
        self.segmenter.knn_backend = knn_backend
        self.settings = scoring_knn(self.segmenter, knn)
        self.label_offset = label_offset

    def __call__(self, batch):
        import pyarrow as pa

        m = len(self.segmenter.categories)
        cms = {"raw": ConfusionMatrix(m), "knn": ConfusionMatrix(m)}
        errors, n = [], 0
        for image, label in zip(batch.column("image").to_pylist(), batch.column("label").to_pylist()):
            try:
                pred, gt = predict_pair(self.segmenter, image, label, label_offset=self.label_offset,
                                        knn=self.settings)
            except (ValueError, FileNotFoundError, TypeError) as e:
                errors.append(error_message(image, str(e)))
                continue
            for name, labels in pred.items():
                cms[name].update(labels, gt)
            n += 1
        return pa.table({"images": [n], "raw": [cms["raw"].matrix.ravel().tolist()],
                         "knn": [cms["knn"].matrix.ravel().tolist()], "errors": [errors],
                         "categories": [json.dumps(list(self.segmenter.categories))],
                         "knn_settings": [None if self.settings is None else json.dumps(self.settings.to_dict())]})


@dataclass
class RayEvalResult:
    """The outcome of :func:`evaluate_dataset`."""

    result: Any  # ifseg_rt.evaluate.EvalResult over the images that could be scored
    categories: List[str]
    failed: List[str] = field(default_factory=list)  # one message per image that could not be scored, naming it
    plan: Optional[PoolPlan] = None


def evaluate_dataset(pairs: Sequence[Tuple[Any, Any]], model: str, *, address: Optional[str] = "local",
                     actors: Optional[int] = None, threads: Optional[int] = None,
                     gpus_per_actor: Optional[float] = None, device: str = "cpu", label_offset: Optional[int] = None,
                     knn: Optional[bool] = None, knn_backend: str = "auto", progress: bool = True,
                     **load_options) -> RayEvalResult:
    """``python -m ifseg_rt eval --ray`` as a function: the metrics of :func:`ifseg_rt.evaluate.evaluate` with the
    per-image work spread over a Ray actor pool; confusion matrices are summed exactly, so the numbers are equal.

    Parameters
    ----------
    pairs : (image, label map) paths (:func:`ifseg_rt.evaluate.find_pairs`)
    model : exported model directory, run directory or checkpoint (the same path on every node)
    knn, label_offset : as :func:`~ifseg_rt.evaluate.evaluate`
    load_options : :func:`~ifseg_rt.evaluate.load_segmenter` arguments (``backend``, ``precision``, ``bpe_dir``,
        ``policy``, ``knn`` overrides as ``knn_overrides``)

    An image that cannot be scored is reported in ``failed`` (the metrics cover the others).
    """
    if not pairs:
        raise ValueError("no image/label pairs to evaluate")
    if "knn_overrides" in load_options:
        load_options["knn"] = load_options.pop("knn_overrides")
    model = absolute_path(model)
    if not is_uri(model) and not Path(model).exists():
        raise FileNotFoundError(f"model not found: {model}")
    t0 = time.perf_counter()
    started = init_ray(address, quiet=not progress)
    try:
        ray = require_ray()
        plan = cluster_plan(device, actors, threads, gpus_per_actor)
        check_model_options(model, plan.device, load_options)
        blocks = arrow_blocks({"image": [absolute_path(i) for i, _ in pairs],
                               "label": [absolute_path(lab) for _, lab in pairs]},
                              plan.actors, 1)
        ds = ray.data.from_arrow(blocks).map_batches(
            _EvalActor, fn_constructor_args=(model,),
            fn_constructor_kwargs=dict(load_options=dict(load_options, device=plan.device, threads=plan.threads),
                                       knn_backend=knn_backend, label_offset=label_offset, knn=knn),
            batch_size=None, **pool_options(ray, plan))
        sums: Dict[str, Optional[np.ndarray]] = {"raw": None, "knn": None}
        n, failed, categories, settings = 0, [], None, None
        with RayRun(ray, progress):
            for block in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                for row in block.to_pylist():
                    n += row["images"]
                    failed += row["errors"]
                    categories = json.loads(row["categories"])
                    settings = row["knn_settings"]
                    for name in sums:
                        mat = np.asarray(row[name], dtype=np.int64)
                        sums[name] = mat if sums[name] is None else sums[name] + mat
    finally:
        if started:
            shutdown_ray()
    m = len(categories)
    metrics = {"raw": SegMetrics.from_confusion(sums["raw"].reshape(m, m))}
    if settings is not None:
        metrics["knn"] = SegMetrics.from_confusion(sums["knn"].reshape(m, m))
    result = EvalResult(metrics=metrics, num_images=n, seconds=time.perf_counter() - t0,
                        knn=None if settings is None else KnnSettings.from_dict(json.loads(settings)))
    return RayEvalResult(result=result, categories=categories, failed=failed, plan=plan)
