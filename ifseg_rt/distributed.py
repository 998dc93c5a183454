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

from __future__ import annotations

import ipaddress
import json
import logging
import math
import os
import re
import secrets
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .runtime.inputs import check_outputs_apart, is_uri, list_images, split_uri
from .runtime.outputs import ImageRecord, OutputDir, error_message, output_names, segment_files
from .runtime.segmenter import STAGES
from .system import available_cores

RAY_HINT = "pip install 'ifseg_rt[ray]'"
TABLE_NAME = "segments.parquet"  # the per-image table written into the output folder
MAX_BLOCK_ROWS = 256  # images per Ray Data block (one actor call); fewer for small inputs, to balance the actors
BLOCKS_PER_ACTOR = 8  # aim for at least this many blocks per actor
# Environment of a private local Ray, set before ray is first imported: without RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
# Ray resolves 127.0.0.1 to the machine's network address and its servers listen there; usage stats stay off (no
# network calls).
LOCAL_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}

_local: Dict[str, Any] = {}  # what init_ray set up for a local Ray, undone by shutdown_ray


class RayUnavailable(ImportError):
    """Ray Data is not installed; the message names the ``[ray]`` extra."""


def require_ray(*, local: bool = False):
    """``import ray`` (+ ``ray.data``) or :class:`RayUnavailable`.

    ``local`` (a local Ray will be started): when ray is not imported yet, first set :data:`LOCAL_ENV` and, unless
    the environment names a token or an auth mode, token authentication with a random token held in this process's
    environment (Ray would otherwise write one to ``~/.ray/auth_token``). Ray reads these once, at import, so they
    stay for the life of the process.
    """
    if local and "ray" not in sys.modules:
        for k, v in LOCAL_ENV.items():
            os.environ.setdefault(k, v)
        if not any(os.environ.get(k) for k in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE")):
            os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
            os.environ["RAY_AUTH_MODE"] = "token"
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise RayUnavailable(f"--ray needs Ray Data, which cannot be imported here ({e}); install it with "
                             f"{RAY_HINT}") from None
    return ray


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def init_ray(address: Optional[str] = "local", *, num_cpus: Optional[int] = None, quiet: bool = False) -> bool:
    """Connect this process to Ray, unless it already is. Returns True when this call connected (then call
    :func:`shutdown_ray` when done).

    Parameters
    ----------
    address : ``"local"`` (or None): start a private Ray on this machine: ``num_cpus`` CPUs (default: the cores this
        process may use), no dashboard, every server on the loopback interface, token authentication with a token
        held in the environment (:func:`require_ray`), its files in a temporary folder removed by
        :func:`shutdown_ray`.
        ``"auto"``, ``"ray://host:port"`` or ``"host:port"``: an existing cluster.
    quiet : Ray's own log lines at WARNING and above only

    Raises
    ------
    RayUnavailable without Ray; RuntimeError when a local Ray would not be bound to loopback (ray was imported
    before :data:`LOCAL_ENV` could be set)
    """
    local = address in (None, "local")
    ray = require_ray(local=local)
    if ray.is_initialized():
        return False
    level = logging.WARNING if quiet else logging.INFO
    if not local:
        ray.init(address=address, logging_level=level)
        return True
    if not any(os.environ.get(k) for k in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE")):
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)  # ray was imported before require_ray could set it
    _local["temp_dir"] = tempfile.mkdtemp(prefix="ifseg-ray-")  # short: Ray's socket paths must stay < 108 bytes
    try:
        ray.init(address="local", num_cpus=num_cpus or available_cores(), include_dashboard=False,
                 _temp_dir=_local["temp_dir"], logging_level=level)
    except BaseException:
        shutil.rmtree(_local.pop("temp_dir"), ignore_errors=True)
        raise
    ip = ray.util.get_node_ip_address()
    if not is_loopback(ip):
        shutdown_ray()
        raise RuntimeError(f"the local Ray came up on {ip}, not on the loopback interface: ray was imported before "
                           f"ifseg_rt could set {', '.join(f'{k}={v}' for k, v in LOCAL_ENV.items())}; set them "
                           f"before importing ray, or start Ray yourself (ray.init) and ifseg_rt uses it")
    return True


def shutdown_ray() -> None:
    """Disconnect from Ray; for a local Ray started by :func:`init_ray`, also stop it and remove its files."""
    import ray

    ray.shutdown()
    temp = _local.pop("temp_dir", None)
    if temp:
        shutil.rmtree(temp, ignore_errors=True)


# --- the actor pool ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PoolPlan:
    """How many actors, and what each reserves and runs."""

    actors: int
    threads: int  # engine threads per actor; also the Ray CPUs it reserves
    num_gpus: float  # Ray GPUs per actor (0 on CPU)
    device: str  # what each actor's Segmenter runs on: "cpu" or "cuda" (Ray gives each actor its own GPU(s))


def plan_pool(*, device: str, cluster_cpus: float, cluster_gpus: float, node_cpus: float,
              actors: Optional[int] = None, threads: Optional[int] = None,
              gpus_per_actor: Optional[float] = None) -> PoolPlan:
    """Size the actor pool so that it fits the cluster without oversubscribing a node.

    Defaults: on CPU one actor per cluster CPU (``threads`` each when given); on GPU one actor per GPU
    (``gpus_per_actor`` = 1). ``threads`` defaults to the CPUs of the smallest node (``node_cpus``; a local Ray has
    ``len(os.sched_getaffinity(0))``) divided among the actors, at least 1 and at most the cluster's CPUs per actor.

    Raises ``ValueError`` when the pool cannot be placed (more CPUs or GPUs than the cluster has).
    """
    cluster_cpus, node_cpus = int(cluster_cpus), max(1, int(node_cpus))
    if device.startswith("cuda:"):
        raise ValueError(f"--device {device}: Ray assigns GPUs to the actors; use --device cuda")
    if device == "auto":
        device = "cuda" if cluster_gpus > 0 else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu, cuda or auto with --ray, got {device!r}")
    for name, v in (("actors", actors), ("threads", threads)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    if device == "cuda":
        gpus = 1.0 if gpus_per_actor is None else float(gpus_per_actor)
        if not 0 < gpus <= 8:
            raise ValueError(f"--gpus-per-actor must be in (0, 8], got {gpus_per_actor}")
        if cluster_gpus <= 0:
            raise ValueError("--device cuda, but the Ray cluster has no GPUs")
        actors = actors or max(1, int(cluster_gpus / gpus + 1e-9))
        if actors * gpus > cluster_gpus + 1e-9:
            raise ValueError(f"{actors} actor(s) x {gpus:g} GPU(s) need {actors * gpus:g} GPUs; the Ray cluster "
                             f"has {cluster_gpus:g}")
    else:
        if gpus_per_actor:
            raise ValueError("--gpus-per-actor needs --device cuda")
        gpus = 0.0
        actors = actors or max(1, cluster_cpus // (threads or 1))
    threads = threads or max(1, min(node_cpus // actors, cluster_cpus // actors))
    if actors * threads > cluster_cpus:
        raise ValueError(f"{actors} actor(s) x {threads} thread(s) need {actors * threads} CPUs; the Ray cluster has "
                         f"{cluster_cpus} (fewer --actors or --threads)")
    return PoolPlan(actors=actors, threads=threads, num_gpus=gpus, device=device)


def cluster_plan(device: str, actors: Optional[int], threads: Optional[int],
                 gpus_per_actor: Optional[float]) -> PoolPlan:
    """:func:`plan_pool` for the Ray cluster this process is connected to."""
    import ray

    res = ray.cluster_resources()
    node_cpus = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU")]
    return plan_pool(device=device, cluster_cpus=res.get("CPU", 0), cluster_gpus=res.get("GPU", 0),
                     node_cpus=min(node_cpus) if node_cpus else res.get("CPU", 1), actors=actors, threads=threads,
                     gpus_per_actor=gpus_per_actor)


def _blocks(columns: Dict[str, list], actors: int, multiple: int) -> list:
    """The rows as a list of Arrow tables, one Ray Data block each: small enough that every actor gets several."""
    import pyarrow as pa

    n = len(next(iter(columns.values())))
    rows = max(1, min(MAX_BLOCK_ROWS, math.ceil(n / (actors * BLOCKS_PER_ACTOR))))
    rows = -(-rows // multiple) * multiple  # whole engine batches per block
    return [pa.table({k: v[i:i + rows] for k, v in columns.items()}) for i in range(0, n, rows)]


def _pool(ray, plan: PoolPlan) -> Dict[str, Any]:
    """``map_batches`` arguments of the actor pool."""
    return dict(compute=ray.data.ActorPoolStrategy(size=plan.actors), num_cpus=plan.threads,
                num_gpus=plan.num_gpus or None, batch_format="pyarrow", zero_copy_batch=True)


class _Run:
    """One Ray Data execution: its progress bars (and INFO log lines) on or off, the previous state restored after;
    a failure of the job itself (e.g. an actor that cannot load the model) becomes a RuntimeError carrying the
    underlying error's last line rather than Ray's nested traceback."""

    def __init__(self, ray, progress: bool):
        self.ray, self.ctx, self.on = ray, ray.data.DataContext.get_current(), progress
        self.logger = logging.getLogger("ray.data")

    def __enter__(self):
        self.saved = (self.ctx.enable_progress_bars, self.logger.level)
        self.ctx.enable_progress_bars = self.on
        if not self.on:
            self.logger.setLevel(logging.WARNING)

    def __exit__(self, exc_type, exc, tb):
        self.ctx.enable_progress_bars, level = self.saved
        self.logger.setLevel(level)
        if exc is not None and isinstance(exc, self.ray.exceptions.RayError):
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
            cause = next((ln for ln in reversed(lines) if re.match(r"^[\w.]+(Error|Exception): ", ln)), lines[0] if lines else "(no error text)")
            raise RuntimeError(f"the Ray job failed: {cause}") from None
        return False


# --- remote files (pyarrow.fs) -------------------------------------------------------------------------------
class ArrowOutputDir:
    """An output folder on a filesystem pyarrow supports (``s3://``, ``gs://``, ``hdfs://``, ``file://`` ...), with
    the interface of :class:`~ifseg_rt.runtime.outputs.OutputDir`; objects are written whole."""

    def __init__(self, uri: str):
        self.uri = uri.rstrip("/")
        self.fs, self.path, _, _ = split_uri(self.uri)

    def __str__(self) -> str:
        return self.uri

    def _p(self, name: str) -> str:
        return f"{self.path.rstrip('/')}/{name}"

    def exists(self, name: str) -> bool:
        from pyarrow import fs as pafs

        return self.fs.get_file_info(self._p(name)).type == pafs.FileType.File

    def read(self, name: str) -> bytes:
        with self.fs.open_input_stream(self._p(name)) as f:
            return f.read()

    def write(self, name: str, data: bytes) -> None:
        with self.fs.open_output_stream(self._p(name)) as f:
            f.write(data)


def output_dir(root: str):
    """:class:`ArrowOutputDir` for a URI, :class:`~ifseg_rt.runtime.outputs.OutputDir` for a local folder."""
    return ArrowOutputDir(root) if is_uri(root) else OutputDir(root)


def _fetch(uri: str, folder: str, k: int) -> str:
    """Copy a remote image into ``folder`` (so that it is read exactly like a local file); -> the local path."""
    filesystem, path, _, _ = split_uri(uri)
    local = os.path.join(folder, f"{k}{Path(path).suffix}")
    with filesystem.open_input_stream(path) as f, open(local, "wb") as g:
        shutil.copyfileobj(f, g)
    return local


# --- segment -------------------------------------------------------------------------------------------------
def table_schema(categories: Sequence[str]):
    """The Parquet table of a run, one row per input image:

    ``index`` (position in the input list), ``path`` (as given), ``name`` (outputs ``<name>.png`` ...), ``height``,
    ``width`` (original size), ``pixels_<category>`` (pixels per category, one column each), ``<stage>_ms`` for the
    stages of :data:`~ifseg_rt.runtime.segmenter.STAGES` (null when skipped), ``skipped`` (outputs existed; counts
    read back from the label map), ``error`` (why it failed, naming the file; null when it did not). The categories
    are also in the schema metadata (``ifseg_rt.categories``, JSON)."""
    import pyarrow as pa

    fields = [("index", pa.int64()), ("path", pa.string()), ("name", pa.string()), ("height", pa.int32()),
              ("width", pa.int32())]
    fields += [(f"pixels_{c}", pa.int64()) for c in categories]
    fields += [(f"{s}_ms", pa.float64()) for s in STAGES]
    fields += [("skipped", pa.bool_()), ("error", pa.string())]
    return pa.schema(fields, metadata={"ifseg_rt.categories": json.dumps(list(categories))})


def records_table(records: Sequence[ImageRecord], categories: Sequence[str]):
    """:class:`~ifseg_rt.runtime.outputs.ImageRecord` s -> rows of :func:`table_schema`."""
    import pyarrow as pa

    schema = table_schema(categories)
    cols: Dict[str, list] = {name: [] for name in schema.names}
    for r in records:
        cols["index"].append(r.index)
        cols["path"].append(r.source)
        cols["name"].append(r.name)
        size = r.original_size or (None, None)
        cols["height"].append(size[0])
        cols["width"].append(size[1])
        for c, name in enumerate(categories):
            cols[f"pixels_{name}"].append(None if r.pixel_counts is None else int(r.pixel_counts[c]))
        for s in STAGES:
            cols[f"{s}_ms"].append(None if r.timings is None else float(r.timings.get(s, 0.0)))
        cols["skipped"].append(r.skipped)
        cols["error"].append(r.error)
    return pa.table(cols, schema=schema)


class _SegmentActor:
    """Ray Data callable class: loads one Segmenter, then segments blocks of (index, path, name) rows."""

    def __init__(self, model_dir: str, out: str, *, overlay: bool, batch_size: int, skip_existing: bool,
                 load_options: Dict[str, Any]):
        from .runtime import Segmenter

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
                        local[len(keep)] = _fetch(src, tmp, j)
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


def _join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}" if is_uri(root) else str(Path(root) / name)


def _absolute(path) -> str:
    """Local paths made absolute on the driver (workers do not share its working directory); URIs as they are."""
    return str(path) if is_uri(str(path)) else str(Path(path).absolute())


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
    from .runtime.model_dir import load_model_dir

    spec = load_model_dir(model_dir)  # a bad model directory fails here, before Ray starts
    sources = list_images(inputs, allow_uris=True)
    check_outputs_apart(sources, out_dir)
    names = output_names(sources)
    out_root = _absolute(out_dir)
    table = _absolute(table) if table else _join(out_root, TABLE_NAME)
    device = load_options.pop("device", "cpu")
    load_options.pop("threads", None)
    t0 = time.perf_counter()
    started = init_ray(address, quiet=not progress)
    try:
        ray = require_ray()
        plan = cluster_plan(device, actors, threads, gpus_per_actor)
        out = output_dir(out_root)
        if isinstance(out, ArrowOutputDir):
            out.fs.create_dir(out.path, recursive=True)
        else:
            out.root.mkdir(parents=True, exist_ok=True)
        # "path" is what the table reports (as given); "local" is where workers read it (made absolute here: workers
        # do not share the driver's working directory)
        blocks = _blocks({"index": list(range(len(sources))), "path": sources, "name": names,
                          "local": [_absolute(s) for s in sources]}, plan.actors, batch_size)
        opts = dict(load_options, device=plan.device, threads=plan.threads)
        ds = ray.data.from_arrow(blocks).map_batches(
            _SegmentActor, fn_constructor_args=(_absolute(model_dir), out_root),
            fn_constructor_kwargs=dict(overlay=overlay, batch_size=batch_size, skip_existing=not overwrite,
                                       load_options=opts),
            batch_size=None, **_pool(ray, plan))
        schema = table_schema(spec.categories)
        written = skipped = 0
        failed: List[str] = []
        with _Run(ray, progress), _TableWriter(table, schema) as writer:
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


class _TableWriter:
    """One Parquet file, written block by block; a local file appears (renamed from a hidden temporary) only when
    complete."""

    def __init__(self, path: str, schema):
        self.path, self.schema = path, schema

    def __enter__(self):
        import pyarrow.parquet as pq

        if is_uri(self.path):
            filesystem, p, _, _ = split_uri(self.path)
            self.tmp = None
            self.writer = pq.ParquetWriter(p, self.schema, filesystem=filesystem)
        else:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self.tmp = str(Path(self.path).with_name(f".{Path(self.path).name}.{os.getpid()}.tmp"))
            self.writer = pq.ParquetWriter(self.tmp, self.schema)
        return self

    def write(self, table) -> None:
        self.writer.write_table(table)

    def __exit__(self, exc_type, *exc):
        self.writer.close()
        if self.tmp is not None:
            if exc_type is None:
                os.replace(self.tmp, self.path)
            else:
                os.unlink(self.tmp)


# --- eval ----------------------------------------------------------------------------------------------------
class _EvalActor:
    """Ray Data callable class: loads one segmenter (``evaluate.load_segmenter``), then turns blocks of (image,
    label) rows into one row of summed confusion matrices each."""

    def __init__(self, model: str, *, load_options: Dict[str, Any], knn_backend: str, label_offset: Optional[int],
                 knn: Optional[bool]):
        from .evaluate import load_segmenter, scoring_knn

        self.segmenter = load_segmenter(model, **load_options)
        self.segmenter.knn_backend = knn_backend
        self.settings = scoring_knn(self.segmenter, knn)
        self.label_offset = label_offset

    def __call__(self, batch):
        import pyarrow as pa

        from .evaluate import predict_pair
        from .metrics import ConfusionMatrix

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
    from .evaluate import EvalResult
    from .knn.settings import KnnSettings
    from .metrics import SegMetrics

    if "knn_overrides" in load_options:
        load_options["knn"] = load_options.pop("knn_overrides")
    model = _absolute(model)
    if not is_uri(model) and not Path(model).exists():
        raise FileNotFoundError(f"model not found: {model}")
    t0 = time.perf_counter()
    started = init_ray(address, quiet=not progress)
    try:
        ray = require_ray()
        plan = cluster_plan(device, actors, threads, gpus_per_actor)
        blocks = _blocks({"image": [_absolute(i) for i, _ in pairs], "label": [_absolute(lab) for _, lab in pairs]},
                         plan.actors, 1)
        ds = ray.data.from_arrow(blocks).map_batches(
            _EvalActor, fn_constructor_args=(model,),
            fn_constructor_kwargs=dict(load_options=dict(load_options, device=plan.device, threads=plan.threads),
                                       knn_backend=knn_backend, label_offset=label_offset, knn=knn),
            batch_size=None, **_pool(ray, plan))
        sums: Dict[str, Optional[np.ndarray]] = {"raw": None, "knn": None}
        n, failed, categories, settings = 0, [], None, None
        with _Run(ray, progress):
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
