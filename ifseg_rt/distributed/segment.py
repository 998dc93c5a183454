"""``segment --ray``: :func:`segment_dataset` over a pool of Ray actors, each running the single-process loop
(:func:`~ifseg_rt.runtime.outputs.segment_files`)."""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

from ..runtime import Segmenter
from ..runtime.inputs import check_outputs_apart, is_uri, list_images
from ..runtime.model_dir import load_model_dir
from ..runtime.outputs import TABLE_NAME, ImageRecord, error_message, output_names, segment_files
from .cluster import (PoolPlan, RayRun, arrow_blocks, check_model_options, cluster_plan, init_ray, pool_options,
                      require_ray, shutdown_ray)
from .storage import (ArrowOutputDir, TableWriter, absolute_path, fetch, join_path, output_dir, records_table,
                      table_schema)


class _SegmentActor:
    """Ray Data callable class: loads one Segmenter, then segments blocks of (index, path, name) rows."""

    def __init__(self, model_dir: str, out: str, *, overlay: bool, batch_size: int, skip_existing: bool,
                 load_options: Dict[str, Any]):
        self.segmenter = Segmenter.load(model_dir, **load_options)
        self.out = output_dir(out)
        self.overlay, self.batch_size, self.skip_existing = overlay, batch_size, skip_existing

    def __call__(self, batch):
        index = batch.column("index").to_pylist()
        sources = batch.column("path").to_pylist()
        absolute = batch.column("local").to_pylist()
        names = batch.column("name").to_pylist()
        records: List[ImageRecord] = []
        with tempfile.TemporaryDirectory(prefix="ifseg-in-") as tmp:
            local: Dict[int, str] = {}
            keep = []
            for j, src in enumerate(sources):
                try:
                    if is_uri(src):
                        local[len(keep)] = fetch(src, tmp, j)
                    elif absolute[j] != src:  # a relative path, made absolute on the driver
                        local[len(keep)] = absolute[j]
                except (OSError, ValueError) as e:  # pyarrow: FileNotFoundError, ArrowInvalid (a ValueError), ...
                    records.append(ImageRecord(index[j], src, names[j], error=error_message(src, f"cannot read it: "
                                                                                                  f"{e}")))
                    continue
                keep.append(j)
            for rec in segment_files(self.segmenter, [sources[j] for j in keep], [names[j] for j in keep],
                                     self.out, overlay=self.overlay, batch_size=self.batch_size,
                                     skip_existing=self.skip_existing, indices=[index[j] for j in keep],
                                     local_paths=local):
                rec.result = None  # the label map is written; a block of full-size maps would not fit in memory
                records.append(rec)
        return records_table(records, self.segmenter.categories)


@dataclass
class SegmentSummary:
    """The outcome of :func:`segment_dataset`."""

    images: int  # inputs
    written: int  # segmented in this run
    skipped: int  # outputs existed already
    failed: List[str]  # one message per failed input, naming it
    table: str  # the Parquet table
    out: str  # the output folder
    seconds: float
    plan: PoolPlan

    def line(self) -> str:
        return (f"wrote {self.written} label map(s) to {self.out}" +
                (f"; {self.skipped} already there" if self.skipped else "") +
                (f"; {len(self.failed)} failed" if self.failed else "") + f"; table {self.table}")


def segment_dataset(inputs: Sequence[str], model_dir: str, out_dir: str, *, overlay: bool = False,
                    batch_size: int = 1, address: Optional[str] = "local", actors: Optional[int] = None,
                    threads: Optional[int] = None, gpus_per_actor: Optional[float] = None,
                    table: Optional[str] = None, overwrite: bool = False, progress: bool = True,
                    on_error: Optional[Callable[[str], None]] = None,
                    on_progress: Optional[Callable[[int], None]] = None, **load_options) -> SegmentSummary:
    """``python -m ifseg_rt segment --ray`` as a function: label maps (+ overlays) for every input, written by a pool
    of Ray actors, plus the Parquet table (:func:`table_schema`).

    Parameters
    ----------
    inputs : folders, image files, globs, list files (``.txt``/``.lst``) and URIs pyarrow can read
    model_dir : exported model directory (the same path on every node)
    out_dir : output folder or URI (every node writes into it)
    overlay, batch_size : as ``segment --overlay/--batch-size``
    address : "local" (a private local Ray), "auto", "ray://host:port" or "host:port"; a process already connected
        to Ray uses that connection
    actors, threads, gpus_per_actor : the pool (:func:`plan_pool`)
    table : the Parquet file (default ``<out_dir>/segments.parquet``)
    overwrite : segment every image again, even when its outputs exist
    progress : Ray Data's progress bars
    on_error : called with each failure's message as it arrives
    on_progress : called with the number of images done so far whenever a block of them arrives
    load_options : :meth:`Segmenter.load` arguments (``backend``, ``device``, ``knn``, ``verify``, ``dtype`` ...;
        ``threads`` comes from the plan)

    Raises
    ------
    FileNotFoundError / ValueError for missing inputs, an invalid model directory or a pool that does not fit;
    RayUnavailable without Ray
    """
    spec = load_model_dir(model_dir)  # a bad model directory fails here, before Ray starts
    sources = list_images(inputs, allow_uris=True)
    check_outputs_apart(sources, out_dir, table)
    names = output_names(sources)
    out_root = absolute_path(out_dir)
    table = absolute_path(table) if table else join_path(out_root, TABLE_NAME)
    device = load_options.pop("device", "cpu")
    load_options.pop("threads", None)
    t0 = time.perf_counter()
    started = init_ray(address, quiet=not progress)
    try:
        ray = require_ray()
        plan = cluster_plan(device, actors, threads, gpus_per_actor)
        check_model_options(absolute_path(model_dir), plan.device, load_options)
        out = output_dir(out_root)
        if isinstance(out, ArrowOutputDir):
            out.fs.create_dir(out.path, recursive=True)
        else:
            out.root.mkdir(parents=True, exist_ok=True)
        # "path" is what the table reports (as given); "local" is where workers read it (made absolute here: workers
        # do not share the driver's working directory)
        blocks = arrow_blocks({"index": list(range(len(sources))), "path": sources, "name": names,
                               "local": [absolute_path(s) for s in sources]}, plan.actors, batch_size)
        opts = dict(load_options, device=plan.device, threads=plan.threads)
        ds = ray.data.from_arrow(blocks).map_batches(
            _SegmentActor, fn_constructor_args=(absolute_path(model_dir), out_root),
            fn_constructor_kwargs=dict(overlay=overlay, batch_size=batch_size, skip_existing=not overwrite,
                                       load_options=opts),
            batch_size=None, **pool_options(ray, plan))
        schema = table_schema(spec.categories)
        written = skipped = 0
        failed: List[str] = []
        with RayRun(ray, progress), TableWriter(table, schema) as writer:
            for block in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                block = block.select(schema.names).cast(schema)
                writer.write(block)
                errors = [e for e in block.column("error").to_pylist() if e is not None]
                n_skipped = sum(bool(s) for s in block.column("skipped").to_pylist())
                for e in errors:
                    failed.append(e)
                    if on_error is not None:
                        on_error(e)
                skipped += n_skipped
                written += block.num_rows - n_skipped - len(errors)
                if on_progress is not None:
                    on_progress(written + skipped + len(failed))
    finally:
        if started:
            shutdown_ray()
    return SegmentSummary(images=len(sources), written=written, skipped=skipped, failed=failed, table=table,
                          out=str(out_dir), seconds=time.perf_counter() - t0, plan=plan)
