"""Scale-out on Ray Data: ``segment`` and ``eval`` over a pool of Ray actors, each holding one
:class:`~ifseg_rt.runtime.Segmenter`.

Usage::

    python -m ifseg_rt segment photos/ --model models/street --out labels/ --ray       # a private local Ray
    python -m ifseg_rt segment s3://bucket/photos --model /shared/models/street --out s3://bucket/labels --ray auto
    python -m ifseg_rt eval --model models/street --images val/images --labels val/labels --ray

    from ifseg_rt.distributed import segment_dataset
    summary = segment_dataset(["photos/"], "models/street", "labels/", overlay=True)

How a run goes:

* The driver lists the inputs (:func:`~ifseg_rt.runtime.inputs.list_images`: folders, globs, list files, and URIs
  through ``pyarrow.fs``) and decides every output name from the whole list
  (:func:`~ifseg_rt.runtime.outputs.output_names`). Only paths travel; images are read and decoded on the workers.
* ``map_batches`` over ``ray.data.ActorPoolStrategy(size=actors)``: each actor loads its Segmenter once and runs
  :func:`~ifseg_rt.runtime.outputs.segment_files`, the loop of the single-process command, so the label maps and
  overlays are byte for byte the ones ``segment`` writes. Each actor reserves ``threads`` Ray CPUs and runs its
  engine on as many threads (default: the CPUs of a node divided among the actors), plus ``gpus_per_actor`` GPUs
  on GPU nodes, so the pool never oversubscribes a node.
* An image that cannot be used is an error row (and a named ``error:`` line), never a failed job. The driver streams
  the rows into one Parquet table (:func:`table_schema`: path, size, pixels per category, per-stage timings, error).
* Writes are atomic, so a re-run skips every image whose outputs exist (their rows read the label map back) and only
  segments the rest: a crashed run resumes where it stopped.
* ``eval``: each actor scores its images with :func:`ifseg_rt.evaluate.predict_pair`, the function single-process
  ``eval`` uses, and sums their confusion matrices; the driver sums those, so the mIoU is the single-process one. Unlike single-process ``eval``, which stops at
  the first unreadable image, a bad image is reported and left out (the exit status says so).

Ray is imported lazily (``pip install 'ifseg_rt[ray]'``); :mod:`ifseg_rt.runtime` never imports this module's
dependencies. ``address="local"`` starts a private Ray bound to the loopback interface (see :func:`init_ray`);
``"auto"``, ``"ray://host:10001"`` or ``"host:6379"`` connect to an existing cluster, whose nodes must all see the
model directory and the inputs/outputs (a shared filesystem, or URIs).
"""

from .cluster import (LOCAL_ENV, RAY_HINT, PoolPlan, RayUnavailable, cluster_plan, init_ray, is_loopback, plan_pool,
                      require_ray, shutdown_ray)
from .evaluate import RayEvalResult, evaluate_dataset
from .segment import SegmentSummary, segment_dataset
from ..runtime.outputs import TABLE_NAME
from .storage import ArrowOutputDir, output_dir, records_table, table_schema

__all__ = ["LOCAL_ENV", "RAY_HINT", "TABLE_NAME", "ArrowOutputDir", "PoolPlan", "RayEvalResult", "RayUnavailable",
           "SegmentSummary", "cluster_plan", "evaluate_dataset", "init_ray", "is_loopback", "output_dir", "plan_pool",
           "records_table", "require_ray", "segment_dataset", "shutdown_ray", "table_schema"]
