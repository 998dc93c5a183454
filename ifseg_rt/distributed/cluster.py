"""The Ray side of :mod:`ifseg_rt.distributed`: importing Ray (lazily), a private loopback-only local Ray or an
existing cluster, and the actor pool's plan (actors x threads x GPUs) and blocks."""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import re
import secrets
import shutil
import socket
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

from ..system import available_cores

RAY_HINT = "pip install 'ifseg_rt[ray]'"
CONNECT_TIMEOUT_S = 10.0  # an existing cluster's address must accept a connection within this
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
        if address != "auto":
            check_reachable(address)
        try:
            ray.init(address=address, logging_level=level)
        except ConnectionError as e:  # "auto" without a cluster on this machine; Ray's text names its own flags
            raise RuntimeError(f"cannot connect to a Ray cluster at --ray {address}: {str(e).splitlines()[0]} "
                               f"(start one with `ray start --head`, or use --ray local)") from None
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


def check_reachable(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """A cluster address (``host:port`` or ``ray://host:port``) must accept a TCP connection within ``timeout_s``:
    Ray itself keeps retrying an unreachable one for minutes. Raises ``RuntimeError`` naming it."""
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    host = host.strip("[]")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as e:
        raise RuntimeError(f"cannot reach the Ray cluster at --ray {address} ({e}); is its head node running and "
                           f"the port open from here?") from None


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


def arrow_blocks(columns: Dict[str, list], actors: int, multiple: int) -> list:
    """The rows as a list of Arrow tables, one Ray Data block each: small enough that every actor gets several."""
    import pyarrow as pa

    n = len(next(iter(columns.values())))
    rows = max(1, min(MAX_BLOCK_ROWS, math.ceil(n / (actors * BLOCKS_PER_ACTOR))))
    rows = -(-rows // multiple) * multiple  # whole engine batches per block
    return [pa.table({k: v[i:i + rows] for k, v in columns.items()}) for i in range(0, n, rows)]


def pool_options(ray, plan: PoolPlan) -> Dict[str, Any]:
    """``map_batches`` arguments of the actor pool."""
    return dict(compute=ray.data.ActorPoolStrategy(size=plan.actors), num_cpus=plan.threads,
                num_gpus=plan.num_gpus or None, batch_format="pyarrow", zero_copy_batch=True)


def check_model_options(model: str, device: str, load_options: Dict[str, Any]) -> None:
    """On the driver, before any actor starts: what ``Segmenter.load`` would refuse in every actor (precision,
    backend, model directory) is raised here, once, instead of as each actor's failure. Only for an exported model
    directory the actors run on the CPU (a GPU plan's device may not exist on the driver)."""
    from ..runtime import Segmenter
    from ..runtime.inputs import is_uri
    from ..runtime.model_dir import MANIFEST

    if device != "cpu" or is_uri(model) or not (Path(model) / MANIFEST).is_file():
        return
    keys = ("backend", "precision", "knn_backend")
    Segmenter.check_load(model, device="cpu", **{k: load_options[k] for k in keys if k in load_options})


class RayRun:
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
            root = _root_cause(exc, self.ray.exceptions.RayError)
            if root is not None:  # e.g. an OSError of a write in an actor: its own words (file and reason)
                raise RuntimeError(f"the Ray job failed: {type(root).__name__}: {root}") from None
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
            cause = next((ln for ln in reversed(lines) if re.match(r"^[\w.]+(Error|Exception): ", ln)),
                         lines[0] if lines else "(no error text)")
            raise RuntimeError(f"the Ray job failed: {cause}") from None
        return False


def _root_cause(exc: BaseException, ray_error: type) -> Optional[BaseException]:
    """The innermost exception under Ray's wrappers (``__cause__`` / ``__context__`` / a task error's ``cause``) that
    is not itself one of Ray's, or None."""
    seen = set()
    found = None
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if not isinstance(exc, ray_error) and type(exc).__module__.split(".")[0] != "ray":
            found = exc
        inner = getattr(exc, "cause", None)
        exc = inner if isinstance(inner, BaseException) else (exc.__cause__ or exc.__context__)
    return found
