"""Run a real ``tritonserver`` on a model repository: the binary and python backend that ``nvidia-pytriton`` ships
(Triton 2.51 with the Python backend only), in a child process that we start, watch and stop.

Why not PyTriton's ``Triton.bind`` API: its proxy fails a whole dynamic batch when one request is bad, and has no
place for config ``parameters`` (our category names); a python-backend model of our own answers each request
on its own and is the same artefact a stock Triton loads. What we take from the wheel is located in one place,
:func:`bundled_tritonserver`.

Three facts the launch relies on (checked on this machine, see the README):

* The python-backend stub links ``libpython3.X.so``; a system copy of another patch release fails model loading
  (``'_thread.RLock' object has no attribute '_recursion_count'``). The running interpreter's ``LIBDIR`` goes first
  on ``LD_LIBRARY_PATH``, then the wheel's ``nvidia_pytriton.libs`` (the copied stub's RPATH no longer reaches it).
* The stub picks its interpreter and site-packages from the first ``python3`` on ``PATH`` (it ignores
  ``PYTHONPATH``): the running interpreter's directory goes first.
* Model control is ``explicit`` with every model loaded at start; the model-repository API (load / unload, hence
  running code) and the shared-memory, trace and logging APIs require a random header only this process knows. We
  use it to restart a model whose python-backend worker (stub) died: :class:`WorkerWatch`.

Start-up checks that every port is free before anything is reported (a second ``serve`` on busy ports must not
answer with the first one's readiness), and removes the shared-memory regions that killed earlier servers left.

By default the public HTTP and metrics ports belong to the HTTP front (:mod:`~ifseg_rt.serve.front`: 400 for
malformed KServe requests, early 413 for oversized bodies, counted refusals, an ordered drain); Triton's own HTTP and
metrics servers then listen on loopback ports that only the front and this class use. gRPC is Triton's own.
"""

from __future__ import annotations

import collections
import ctypes
import json
import ctypes.util
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Deque, Dict, List, Optional, Sequence, Set, Union

from . import protocol as P
from .front import HttpFront, bind
from .telemetry import HEALTH_ENV, write_health

READY_TIMEOUT_S = 300.0  # model loading can take minutes (engine builds, big checkpoints)
EXIT_TIMEOUT_S = 10  # tritonserver's own grace period for in-flight requests on shutdown
RESTRICTED_APIS = "model-repository,shared-memory,trace,logging"  # need ADMIN_HEADER on HTTP and gRPC
ADMIN_HEADER = "ifseg-admin-token"
LOG_LINES = 400  # last lines of the server log kept for error messages
# harmless log lines on a machine without a GPU, left out of error messages
NOISE = ("CudaDriverHelper", "CUDA driver version", "Failed to initialize NVML", "model_config_content_name_")
SHM_DIR = Path("/dev/shm")
SHM_DEFAULT_BYTES = 4 * 1024 * 1024  # each python-backend worker's shared-memory region at its start
SHM_GROWTH_BYTES = 1024 * 1024  # the step it grows by for larger requests
SHM_PREFIX = "ifseg"  # the python backend's regions: ifseg<serve pid>_<token>_<uuid> (see TritonServer.command)
_SHM_NAME = re.compile(rf"^{SHM_PREFIX}(\d+)_[0-9a-f]{{8}}_")
STUB = "triton_python_backend_stub"
WATCH_INTERVAL_S = 0.5  # how often WorkerWatch looks at the workers
RESTART_GRACE_S = 3.0  # a restarting model's old workers get this long to finish before they are killed
ADMIN_TIMEOUT_S = 10.0  # per model-control call (unload, index); a load may take up to READY_TIMEOUT_S
STUCK_EXIT_S = 2.0  # after a drain, how long a Triton holding a stuck model version gets to exit before SIGKILL


class ServerError(RuntimeError):
    """tritonserver could not be started (missing dependency, busy port, a model that failed to load, ...)."""


@dataclass(frozen=True)
class BundledTriton:
    """The parts of nvidia-pytriton's wheel that run a stand-alone Triton."""

    executable: Path  # tritonserver
    python_backend: Path  # libtriton_python.so + triton_python_backend_utils.py
    stub: Path  # triton_python_backend_stub built for this interpreter's major.minor
    libs: Path  # nvidia_pytriton.libs: the shared libraries tritonserver and the stub need


def bundled_tritonserver() -> BundledTriton:
    """Locate tritonserver, the python backend and the stub for this interpreter in the installed nvidia-pytriton.

    This is the only code that knows the wheel's layout (``pytriton/tritonserver/{bin,backends/python,
    python_backend_stubs/X.Y}``, found through ``pytriton.utils.distribution``, as PyTriton itself does); a test
    fails loudly when a release moves anything.

    Raises
    ------
    ServerError when nvidia-pytriton is missing or lacks a part (the message names it)
    """
    try:
        from pytriton.utils.distribution import get_libs_path, get_root_module_path, get_stub_path
    except ImportError as e:
        raise ServerError(f"serving needs nvidia-pytriton (it bundles tritonserver): pip install 'ifseg_rt[serve]' "
                          f"({e})") from None
    root = Path(get_root_module_path()) / "tritonserver"
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    found = BundledTriton(executable=root / "bin" / "tritonserver", python_backend=root / "backends" / "python",
                          stub=Path(get_stub_path(version)), libs=Path(get_libs_path()))
    parts = (("tritonserver", found.executable), ("python backend", found.python_backend / "libtriton_python.so"),
             (f"python {version} backend stub", found.stub), ("libraries", found.libs))
    for what, p in parts:
        if not p.exists():
            raise ServerError(f"nvidia-pytriton is installed but its {what} is not at {p}: this release is laid out "
                              f"differently from 0.7 (or lacks Python {version}); install nvidia-pytriton 0.7.x")
    return found


def free_port(address: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the usual race applies until the server binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def check_ports(address: str, ports: Dict[str, int]) -> None:
    """Raise :class:`ServerError` naming every port (of ``{kind: port}``; 0 = chosen later) that cannot be bound on
    ``address`` now: another server (or anything else) listens there."""
    busy = []
    for kind, port in ports.items():
        if not port:
            continue
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT is no conflict
            try:
                s.bind((address, port))
            except OSError as e:
                busy.append(f"{kind} port {port} ({e.strerror or e})")
    if busy:
        raise ServerError(f"cannot listen on {address}: {', '.join(busy)}; another server runs there? choose free "
                          f"ports (--http-port / --grpc-port / --metrics-port)")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_shm(shm_dir: Path = SHM_DIR) -> List[str]:
    """Remove the python-backend shared-memory regions of ifseg_rt servers whose process is gone (a ``kill -9`` of
    ``serve`` leaves them); returns their names."""
    removed = []
    try:
        names = os.listdir(shm_dir)
    except OSError:
        return removed
    for name in names:
        m = _SHM_NAME.match(name)
        try:
            mine = (shm_dir / name).stat().st_uid == os.getuid()
        except OSError:
            continue
        if m and mine and not _alive(int(m.group(1))):  # only this user's: another container's pids are not ours
            try:
                os.unlink(shm_dir / name)
                removed.append(name)
            except OSError:
                pass
    return removed


def shm_free(shm_dir: Path = SHM_DIR) -> Optional[int]:
    """Free bytes of the shared-memory filesystem (None where it cannot be read)."""
    try:
        return shutil.disk_usage(shm_dir).free
    except OSError:
        return None


def check_shm(workers: int, request_bytes: int, free: Optional[int]) -> Optional[str]:
    """The python backend moves every request and response through shared memory under /dev/shm, and a worker whose
    region cannot grow dies of SIGBUS mid-request. Raise :class:`ServerError` when ``free`` bytes cannot hold the
    ``workers``' starting regions; return a warning when they cannot hold one largest request per worker
    (``request_bytes``: its image and outputs); None when they can, or ``free`` is unknown."""
    if free is None:
        return None
    mib = 1024 * 1024
    start = workers * SHM_DEFAULT_BYTES
    advice = (f"/dev/shm has {free / mib:.0f} MiB free (a Docker container gets 64 MB unless started with "
              f"--shm-size, e.g. --shm-size=1g)")
    if free < start:
        raise ServerError(f"{workers} model worker(s) need {start / mib:.0f} MiB of shared memory to start; {advice}")
    peak = workers * (SHM_DEFAULT_BYTES + request_bytes)
    if free < peak:
        return (f"warning: {workers} model worker(s) each serving one request at the size limits (--max-request-bytes, "
                f"--max-output-pixels) need {peak / mib:.0f} MiB of shared memory; {advice}. A worker that runs "
                f"out dies mid-request: enlarge /dev/shm or lower the limits")
    return None


@dataclass(frozen=True)
class Worker:
    """One python-backend stub process of a running server."""

    pid: int
    model: str  # the Triton model it runs
    instance: str  # e.g. ifseg_0_1
    shm: str  # its shared-memory region (under /dev/shm)


def workers(server_pid: int) -> Dict[int, Worker]:
    """The python-backend stubs that run model instances of ``server_pid`` (its children), by pid (Linux /proc)."""
    out: Dict[int, Worker] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) != server_pid or not argv or not argv[0].endswith(STUB.encode()):
            continue
        args = [a.decode("utf-8", "replace") for a in argv]
        # stub argv: model.py path (models/<name>/<version>/model.py), shm region, sizes, parent pid, backend dir,
        # ipc size, instance name, ...
        model = Path(args[1]).parent.parent.name if len(args) > 1 else "?"
        instance = args[8] if len(args) > 8 else "?"
        if instance == model:  # the short-lived stub that completes the model's config while it loads
            continue
        out[int(entry)] = Worker(int(entry), model, instance, args[2] if len(args) > 2 else "")
    return out


def server_environment(bundle: BundledTriton, base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """Environment for tritonserver: this interpreter's libpython and the wheel's libraries first on
    ``LD_LIBRARY_PATH``, this interpreter's directory first on ``PATH`` (see the module docstring)."""
    env = dict(os.environ if base is None else base)
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    first = [p for p in (libdir, str(bundle.libs)) if p]
    rest = [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p and p not in first]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(first + rest)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bindir] + [p for p in env.get("PATH", "").split(os.pathsep) if p and p != bindir])
    return env


def _die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: tritonserver gets SIGTERM when its parent dies


class TritonServer:
    """A tritonserver child process on a model repository.

    ``start()`` returns once every model is ready (``GET /v2/health/ready``), or raises :class:`ServerError` with
    the server's own error lines; ``stop()`` (also on ``with`` exit) lets in-flight requests finish, then ends it.

    Arguments:
      repository: model repository directory
      http_port, grpc_port, metrics_port: ports (0: a free one, chosen at start)
      address: interface to listen on ("127.0.0.1": this machine only; "0.0.0.0": every interface)
      log: called with every line of the server's output (default: dropped; the last lines are kept for errors)
      log_verbose: tritonserver's verbosity (0: info, warnings, errors)
      exit_timeout_s: grace period for in-flight requests at shutdown
      http_front: put the HTTP front (:mod:`~ifseg_rt.serve.front`) on the HTTP and metrics ports (False: Triton's
        own servers listen there)
      max_body_bytes: largest HTTP request body the front reads (larger ones: 413 before the body is read)
    """

    def __init__(self, repository: Union[str, Path], *, http_port: int = 8000, grpc_port: int = 8001,
                 metrics_port: int = 8002, address: str = "127.0.0.1", log: Optional[Callable[[str], None]] = None,
                 log_verbose: int = 0, exit_timeout_s: int = EXIT_TIMEOUT_S, gpu_metrics: bool = False,
                 http_front: bool = True, max_body_bytes: int = P.MAX_BODY_BYTES):
        self.repository = Path(repository)
        self.address = address
        self.ports = {"http": http_port, "grpc": grpc_port, "metrics": metrics_port}
        self.log = log
        self.log_verbose = log_verbose
        self.exit_timeout_s = exit_timeout_s
        self.gpu_metrics = gpu_metrics
        self.http_front = http_front
        self.max_body_bytes = max_body_bytes
        self.front: Optional[HttpFront] = None
        self._triton_ports = dict(self.ports)  # where Triton itself listens (HTTP and metrics: loopback with a front)
        self.process: Optional[subprocess.Popen] = None
        self.lines: Deque[str] = collections.deque(maxlen=LOG_LINES)
        self._work: Optional[tempfile.TemporaryDirectory] = None
        self._reader: Optional[threading.Thread] = None
        self._token = secrets.token_hex(16)
        self.health_file: Optional[Path] = None  # worker deaths / restarts for the models' metrics (telemetry)
        self.before_stop: List[Callable[[], None]] = []  # run first by stop() (e.g. the adaptation service)
        self.stuck_models: Set[str] = set()  # models restarted past a version that never finishes unloading
        self.adaptation = None  # the AdaptService of a server started with one (serve.server.start_server)

    # --- properties -------------------------------------------------------------------------------------------
    @property
    def host(self) -> str:
        """Where clients on this machine reach the server."""
        return "127.0.0.1" if self.address in ("0.0.0.0", "") else self.address

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.ports['http']}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.ports['grpc']}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.ports['metrics']}/metrics"

    @property
    def triton_http_url(self) -> str:
        """Triton's own HTTP server (behind the front; the same as :attr:`http_url` without one): for this
        process' model control and statistics, which must work while the front drains."""
        return f"{'127.0.0.1' if self.http_front else self.host}:{self._triton_ports['http']}"

    @property
    def pid(self) -> Optional[int]:
        return None if self.process is None else self.process.pid

    def is_alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    # --- lifecycle --------------------------------------------------------------------------------------------
    def command(self, bundle: BundledTriton, backends: Path) -> List[str]:
        p = self._triton_ports
        behind = "127.0.0.1" if self.http_front else self.address  # HTTP and metrics behind the front: loopback
        restricted = f"{RESTRICTED_APIS}:{ADMIN_HEADER}={self._token}"
        return [str(bundle.executable), f"--model-repository={self.repository.resolve()}",
                f"--backend-directory={backends}", f"--cache-directory={backends.parent / 'caches'}",
                "--model-control-mode=explicit", "--load-model=*", "--strict-readiness=true", "--exit-on-error=true",
                f"--http-address={behind}", f"--http-port={p['http']}",
                f"--grpc-address={self.address}", f"--grpc-port={p['grpc']}",
                f"--metrics-address={behind}", f"--metrics-port={p['metrics']}",
                f"--allow-gpu-metrics={str(self.gpu_metrics).lower()}",
                "--metrics-config=summary_latencies=true",  # nv_inference_request_summary_us: latency quantiles
                f"--http-restricted-api={restricted}", f"--grpc-restricted-protocol={restricted}",
                f"--exit-timeout-secs={int(self.exit_timeout_s)}", f"--log-verbose={int(self.log_verbose)}",
                # one shared-memory namespace per server: two servers on one machine must not share regions
                f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
                f"--backend-config=python,shm-default-byte-size={SHM_DEFAULT_BYTES}",
                f"--backend-config=python,shm-growth-byte-size={SHM_GROWTH_BYTES}"]

    def _backends(self, bundle: BundledTriton) -> Path:
        """A backend directory with the python backend and the stub of this interpreter beside it (where the
        backend looks for it); the libraries are linked, the small stub is copied as PyTriton does."""
        self._work = tempfile.TemporaryDirectory(prefix="ifseg_triton_")
        backends = Path(self._work.name) / "backends"
        py = backends / "python"
        py.mkdir(parents=True)
        for f in bundle.python_backend.iterdir():
            if f.is_file():
                (py / f.name).symlink_to(f)
        shutil.copy2(bundle.stub, py / "triton_python_backend_stub")
        (Path(self._work.name) / "caches").mkdir()
        return backends

    def start(self, timeout_s: float = READY_TIMEOUT_S) -> "TritonServer":
        if self.is_alive():
            raise ServerError(f"tritonserver already running (pid {self.pid})")
        if not self.repository.is_dir():
            raise ServerError(f"model repository not found: {self.repository}")
        bundle = bundled_tritonserver()
        check_ports(self.address, self.ports)
        upstream = self._start_front() if self.http_front else {}
        try:  # from here on a failure also stops the front
            for k, v in self.ports.items():
                if v == 0:
                    self.ports[k] = free_port(self.host)
            self._triton_ports = {**self.ports, **upstream}
            clean_stale_shm()
            backends = self._backends(bundle)
            self.health_file = backends.parent / "health.json"
            write_health(self.health_file, {}, {})
            env = {**server_environment(bundle), HEALTH_ENV: str(self.health_file)}
            self.lines.clear()
            try:
                self.process = subprocess.Popen(
                    self.command(bundle, backends), env=env, stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent,
                    start_new_session=True)  # a terminal's Ctrl-C reaches us only; we stop the server in order
            except OSError as e:
                raise ServerError(f"cannot start {bundle.executable}: {e}") from None
        except BaseException:
            self._cleanup()
            raise
        self._reader = threading.Thread(target=self._read, name="tritonserver-log", daemon=True)
        self._reader.start()
        try:
            self._wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_front(self) -> Dict[str, int]:
        """Bind the public HTTP and metrics ports (0: free ones, recorded in ``ports``) and start the front there;
        returns its upstreams: the loopback ports Triton gets."""
        socks = []
        try:
            for key in ("http", "metrics"):
                socks.append(bind(self.address, self.ports[key]))
        except OSError as e:
            for sock in socks:
                sock.close()
            raise ServerError(f"cannot listen on {self.address}:{self.ports[key]} ({key}): {e}") from None
        for key, sock in zip(("http", "metrics"), socks):
            self.ports[key] = sock.getsockname()[1]
        upstream = {k: free_port("127.0.0.1") for k in ("http", "metrics")}
        self.front = HttpFront(socks[0], socks[1], f"127.0.0.1:{upstream['http']}",
                               f"127.0.0.1:{upstream['metrics']}", max_body_bytes=self.max_body_bytes,
                               exit_timeout_s=self.exit_timeout_s, log=self.log)
        self.front.start()
        return upstream

    def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for raw in self.process.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.lines.append(line)
            if self.log is not None and (self.gpu_metrics or not any(n in line for n in NOISE)):
                self.log(line)  # on a CPU machine without the GPU lines that are not errors

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        url = f"http://{self.triton_http_url}/v2/health/ready"
        while time.monotonic() < deadline:
            if not self.is_alive():
                if self._reader is not None:
                    self._reader.join(timeout=5)
                raise ServerError(f"tritonserver exited with code {self.process.returncode} before it was ready:\n"
                                  f"{self.errors()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise ServerError(f"tritonserver was not ready after {timeout_s:.0f} s:\n{self.errors()}")

    def _admin(self, path: str, timeout_s: float = ADMIN_TIMEOUT_S) -> bytes:
        req = urllib.request.Request(f"http://{self.triton_http_url}{path}", data=b"{}", method="POST",
                                     headers={ADMIN_HEADER: self._token, "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as r:
                return r.read()
        except urllib.error.HTTPError as e:
            raise ServerError(f"{path}: HTTP {e.code} {e.read().decode('utf-8', 'replace')[:300]}") from None
        except (urllib.error.URLError, OSError) as e:
            raise ServerError(f"{path}: {e}") from None

    def restart_model(self, name: str) -> None:
        """Unload model ``name`` (its readiness turns false), wait until its workers are gone, then load it again
        with fresh ones.

        Under load the unload of a model whose worker died never finishes (Triton 2.51's python backend never
        releases the request that was in flight on the dead worker: the version stays UNLOADING, its surviving
        workers stay alive, and Triton later exits with code 1 after its exit timeout). A new load works regardless,
        so after :data:`RESTART_GRACE_S` the old version's remaining workers (which serve nothing any more) are
        killed and the model is loaded anyway."""
        old = {pid: w for pid, w in workers(self.pid).items() if w.model == name}
        before = set(old)
        self._admin(f"/v2/repository/models/{name}/unload")  # asynchronous
        if not self.wait_unloaded(RESTART_GRACE_S, names=[name]):
            self.stuck_models.add(name)
            for pid in before & set(workers(self.pid)):
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    continue
                if old[pid].shm:
                    (SHM_DIR / old[pid].shm).unlink(missing_ok=True)
        deadline = time.monotonic() + 10
        while before & set(workers(self.pid)) and time.monotonic() < deadline:  # the old stubs exiting
            time.sleep(0.05)
        self.load_model(name)

    def load_model(self, name: str) -> None:
        """Load (or reload) model ``name`` from the repository; returns once it is ready (Triton's load is
        synchronous), :class:`ServerError` with Triton's reason otherwise."""
        self._admin(f"/v2/repository/models/{name}/load", timeout_s=READY_TIMEOUT_S)

    def unload_model(self, name: str) -> None:
        """Unload model ``name``: it refuses new requests at once and goes when its in-flight requests are done."""
        self._admin(f"/v2/repository/models/{name}/unload")

    def model_states(self) -> Dict[str, str]:
        """``{model: state}`` from the repository index (READY, UNLOADING, UNAVAILABLE, ...); {} if it cannot tell."""
        try:
            index = json.loads(self._admin("/v2/repository/index") or b"[]")
        except (ServerError, ValueError):
            return {}
        return {m.get("name", "?"): m.get("state", "") for m in index}

    def wait_unloaded(self, timeout_s: float, names: Optional[Sequence[str]] = None) -> bool:
        """Wait until no model (of ``names``; default all) is loaded or unloading (their in-flight requests done);
        False after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.is_alive():
            try:
                index = json.loads(self._admin("/v2/repository/index") or b"[]")
            except (ServerError, ValueError):
                return False
            if all(m.get("state") not in ("READY", "UNLOADING") for m in index
                   if names is None or m.get("name") in names):
                return True
            time.sleep(0.05)
        return False

    def errors(self) -> str:
        """The server's error lines (Triton's ``E...`` log lines and Python tracebacks), else its last lines."""
        lines = [ln for ln in self.lines if not any(n in ln for n in NOISE)]
        picked = [ln for ln in lines if re.match(r"^E\d{4} ", ln) or "Error" in ln or "error:" in ln]
        return "\n".join((picked or lines)[-40:])

    def wait(self, timeout_s: Optional[float] = None) -> Optional[int]:
        """Block until the server exits (or ``timeout_s`` passes); its exit code, or None while it runs."""
        if self.process is None:
            return None
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return None

    @property
    def shm_prefix(self) -> str:
        """The name prefix of this server's shared-memory regions under /dev/shm."""
        return f"{SHM_PREFIX}{os.getpid()}_{self._token[:8]}_"

    def drain(self) -> bool:
        """Readiness false and new requests refused at once (the front: 503 and no new connections; Triton: every
        model unloaded, which refuses requests on kept-alive connections too); returns when the in-flight requests
        have finished and the models are unloaded (True), or after ``exit_timeout_s`` (False)."""
        if self.front is not None:
            self.front.begin_drain()
        names = sorted(d.name for d in self.repository.iterdir() if (d / "config.pbtxt").is_file())
        for name in names:
            try:
                self._admin(f"/v2/repository/models/{name}/unload")  # asynchronous: returns at once
            except ServerError:
                pass
        return self.wait_unloaded(self.exit_timeout_s)

    def stop(self, timeout_s: Optional[float] = None) -> Optional[int]:
        """Drain (:meth:`drain`), then SIGTERM (Triton finishes what is left within ``exit_timeout_s``), then SIGKILL
        if it is still there ``timeout_s`` later; its shared-memory regions are removed. Returns the exit code.

        After a restart past a stuck version (``stuck_models``, see :meth:`restart_model`) Triton would wait its whole
        exit timeout for that version and exit with code 1; once the drain has finished every loaded model there is
        nothing left to wait for, so it gets :data:`STUCK_EXIT_S` before SIGKILL (exit code -9)."""
        code = None
        if self.front is not None:
            self.front.begin_drain()  # readiness false before anything else goes
        while self.before_stop:
            try:
                self.before_stop.pop()()
            except Exception:  # noqa: BLE001 - stopping goes on
                pass
        if self.process is not None:
            if self.process.poll() is None:
                drained = self.drain()
                self._stop_front()  # its kept-alive connections to Triton close: Triton need not wait for them
                self.process.send_signal(signal.SIGTERM)
                wait_s = timeout_s if timeout_s is not None else self.exit_timeout_s + 20
                if drained and self.stuck_models:
                    wait_s = min(wait_s, STUCK_EXIT_S)
                try:
                    self.process.wait(wait_s)
                except subprocess.TimeoutExpired:  # the whole session: the python-backend stubs too
                    try:
                        os.killpg(self.process.pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        self.process.kill()
                    self.process.wait()
            code = self.process.returncode
            try:  # what is left of its session: python-backend stubs orphaned by a crash of Triton hold its log pipe
                os.killpg(self.process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            if self._reader is not None:
                self._reader.join(timeout=5)
            if self.process.stdout is not None and (self._reader is None or not self._reader.is_alive()):
                self.process.stdout.close()  # (a reader still blocked in read() holds its lock: close would wait)
        self._cleanup()
        return code

    def _stop_front(self) -> None:
        if self.front is not None:
            self.front.stop()
            self.front = None

    def _cleanup(self) -> None:
        self._stop_front()
        try:
            for name in os.listdir(SHM_DIR):
                if name.startswith(self.shm_prefix):
                    (SHM_DIR / name).unlink(missing_ok=True)
        except OSError:
            pass
        if self._work is not None:
            self._work.cleanup()
            self._work = None

    def __enter__(self) -> "TritonServer":
        return self.start() if not self.is_alive() else self

    def __exit__(self, *exc) -> None:
        self.stop()



class WorkerWatch(threading.Thread):
    """Watches a running server's python-backend workers; when one dies (killed, crashed, out of memory) while the
    server runs, the model is restarted (:meth:`TritonServer.restart_model`: not ready until its workers are back),
    the dead worker's shared-memory region removed, and the event logged and counted (``deaths``, ``restarts``,
    ``failures``; per model in the server's health file, which the restarted model reports as the
    ``ifseg_worker_deaths`` / ``ifseg_worker_restarts`` metrics)."""

    def __init__(self, server: TritonServer, *, log: Callable[[str], None] = print,
                 interval_s: float = WATCH_INTERVAL_S):
        super().__init__(name="ifseg-worker-watch", daemon=True)
        self.server, self.log, self.interval_s = server, log, interval_s
        self.deaths = self.restarts = self.failures = 0
        self._deaths: Dict[str, int] = {}
        self._restarts: Dict[str, int] = {}
        self._stop_event = threading.Event()

    def stop(self) -> None:
        """Stop watching; waits for a restart in progress (bounded by its load time)."""
        self._stop_event.set()
        if self.is_alive():
            self.join(timeout=READY_TIMEOUT_S)

    def counts(self) -> Dict[str, int]:
        return {"worker_deaths": self.deaths, "model_restarts": self.restarts, "restart_failures": self.failures}

    def run(self) -> None:
        known = workers(self.server.pid) if self.server.pid else {}
        while not self._stop_event.wait(self.interval_s):
            if not self.server.is_alive():
                return
            now = workers(self.server.pid)
            dead = [w for pid, w in known.items() if pid not in now]
            if dead:  # workers of a model being unloaded on purpose (drain, adaptation LRU) are not deaths
                states = self.server.model_states()
                dead = [w for w in dead if states.get(w.model) == "READY"]
            if not dead:
                known = now
                continue
            for w in dead:
                self.deaths += 1
                self.log(f"worker died: {w.instance} of model '{w.model}' (pid {w.pid}); restarting the model")
                if w.shm:
                    (SHM_DIR / w.shm).unlink(missing_ok=True)
                self._deaths[w.model] = self._deaths.get(w.model, 0) + 1
            for model in sorted({w.model for w in dead}):
                if self._stop_event.is_set():  # shutting down: the drain unloads everything anyway
                    return
                t0 = time.monotonic()
                self._restarts[model] = self._restarts.get(model, 0) + 1
                if self.server.health_file is not None:  # before the load: the fresh workers read it
                    try:
                        write_health(self.server.health_file, self._deaths, self._restarts)
                    except OSError:
                        pass
                try:
                    self.server.restart_model(model)
                    self.restarts += 1
                    self.log(f"model '{model}' restarted in {time.monotonic() - t0:.1f} s")
                except ServerError as e:
                    self.failures += 1
                    self.log(f"model '{model}' could not be restarted: {e}")
            known = workers(self.server.pid)
