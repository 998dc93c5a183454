"""Adapt on request: new vocabularies in a running service (``serve --base CHECKPOINT --bpe-dir DIR --adapt-dir
DIR``), hot-loaded into the running Triton without dropping a request.

A client sends category names to the Triton model ``ifseg_adapt`` (:data:`ENDPOINT`; ``Client.adapt``). The
request reaches :class:`AdaptService` in the ``serve`` process (through :class:`ControlServer`, a Unix socket in the
server's work directory: the python-backend endpoint is a thin proxy, the service holds the model-control token).
A job then runs, one at a time, in separate worker processes at low priority with bounded threads (``nice``, OMP
threads), so serving keeps its latency:

1. ``python -m ifseg_rt adapt --checkpoint BASE --bpe-dir DIR --categories-file ... --out <vid>/run`` (the same
   command an offline user runs: same seed, same result);
2. ``python -m ifseg_rt export <vid>/run --out <vid>/model`` (the served model's image policy);
3. a one-model repository entry ``ifseg_<vid>`` (:func:`~ifseg_rt.serve.repository.write_serving_repository`)
   loaded into the running Triton through its model-control API: other models keep serving throughout.

Vocabulary ids (:func:`vocabulary_id`) hash the normalised category list (:func:`normalise_categories`) and the
recipe (steps, seed, base checkpoint, learning rate, batch): the same list is adapted once; later requests get its
status, and a ready vocabulary that is not loaded is loaded again. At most ``max_loaded_mb`` of adapted models stay
loaded; the least recently used (Triton's ``last_inference``) is unloaded first (Triton unloads only after its
in-flight requests). States: queued, adapting (k/N steps), exporting, loading, ready, failed (with the reason; its
partial files are removed). A job interrupted by a stop of ``serve`` is failed at the next start and re-run on
request.

Protocol (JSON objects, one per request and response): ``{"op": "adapt", "categories": [...], "steps": N,
"seed": S}``, ``{"op": "status", "vocabulary": ID, "load": true}``, ``{"op": "list"}``; answers are a job's
:meth:`Job.public` or ``{"error": ..., "code": "invalid" | "unavailable" | "not_found"}``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Tuple

ENDPOINT = "ifseg_adapt"  # the Triton model of the adaptation endpoint
REQUEST = "request"  # BYTES [1]: a JSON object
RESPONSE = "response"  # BYTES [1]: a JSON object
PARAM_CONTROL_SOCKET = "control_socket"  # config parameter of the endpoint model
MODEL_PREFIX = "ifseg_"  # adapted models are served as ifseg_<vocabulary id>
STATES = ("queued", "adapting", "exporting", "loading", "ready", "failed")
DONE = ("ready", "failed")
MAX_CATEGORIES = 256
MAX_NAME_CHARS = 64
JOB_FILE = "job.json"
LOG_FILE = "worker.log"
CONTROL_TIMEOUT_S = 300.0  # a status request may load a model (Triton load: up to minutes for big ones)
_STEP = re.compile(r"^step (\d+)/(\d+)\b")


class AdaptRequestError(ValueError):
    """A request the service refuses; ``code``: invalid (HTTP 400), unavailable (queue full), not_found."""

    def __init__(self, message: str, code: str = "invalid"):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class AdaptServiceOptions:
    """How the service adapts (``python -m ifseg_rt serve --help``, group "adapt on request")."""

    base: str  # OFA / IFSeg checkpoint every vocabulary starts from
    bpe_dir: str  # its tokenizer files
    adapt_dir: str  # jobs, runs and exported models, one folder per vocabulary (kept across restarts)
    steps: int = 2000  # default adaptation steps of a request
    max_steps: int = 4000  # most steps a request may ask for
    batch_size: int = 16
    lr: float = 5e-5
    threads: int = 1  # CPU threads of the worker processes
    nice: int = 10  # niceness of the worker processes (0..19)
    queue: int = 4  # jobs waiting (beyond the running one); more are refused
    max_loaded_mb: int = 2048  # adapted models kept loaded (their ONNX bytes x instances), least recently used out
    short_side: Optional[int] = None  # image policy of the exported models (None: the served model's, else 512)
    max_long_side: Optional[int] = None  # (None: the served model's, else 2048)
    instances: int = 1  # Triton instances of each adapted model
    python: str = sys.executable

    def __post_init__(self):
        for name, lo in (("steps", 1), ("max_steps", 1), ("batch_size", 1), ("threads", 1), ("queue", 1),
                         ("max_loaded_mb", 1), ("short_side", 16), ("max_long_side", 16), ("instances", 1)):
            v = getattr(self, name)
            if v is None and name in ("short_side", "max_long_side"):
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"adaptation {name} must be an integer >= {lo}, got {v!r}")
        if self.steps > self.max_steps:
            raise ValueError(f"adaptation steps ({self.steps}) must be <= max_steps ({self.max_steps})")
        if not self.lr > 0:
            raise ValueError(f"adaptation lr must be > 0, got {self.lr}")
        if not 0 <= self.nice <= 19:
            raise ValueError(f"adaptation nice must be in 0..19, got {self.nice}")
        for name in ("base", "bpe_dir"):
            if not Path(getattr(self, name)).exists():
                raise FileNotFoundError(f"adaptation {name} not found: {getattr(self, name)}")


def normalise_categories(raw: Any) -> Tuple[str, ...]:
    """Category names from a list (or a comma-separated string): whitespace collapsed, checked.

    Raises :class:`AdaptRequestError` for an empty or over-long list, an empty, over-long or unprintable name, a
    comma in a name, duplicates (ignoring case) and the reserved ``unknown``.
    """
    if isinstance(raw, str):
        raw = raw.split(",")
    if not isinstance(raw, (list, tuple)):
        raise AdaptRequestError(f"'categories' must be a list of names, got {type(raw).__name__}")
    if not raw:
        raise AdaptRequestError("'categories' is empty: give the names to segment")
    if len(raw) > MAX_CATEGORIES:
        raise AdaptRequestError(f"{len(raw)} categories, more than the {MAX_CATEGORIES} this service adapts")
    names: List[str] = []
    seen: Dict[str, int] = {}
    for k, item in enumerate(raw):
        if not isinstance(item, str):
            raise AdaptRequestError(f"category {k} must be a string, got {type(item).__name__}")
        name = " ".join(item.split())
        if not name:
            raise AdaptRequestError(f"category {k} is empty")
        if len(name) > MAX_NAME_CHARS:
            raise AdaptRequestError(f"category {k} ({name[:20]!r}...) has {len(name)} characters, more than "
                                    f"{MAX_NAME_CHARS}")
        if not name.isprintable() or "," in name:
            raise AdaptRequestError(f"category {k} ({name!r}) holds a comma or an unprintable character")
        if name.lower() == "unknown":
            raise AdaptRequestError("'unknown' is the model's ignore class; remove it from the categories")
        if name.lower() in seen:
            raise AdaptRequestError(f"duplicate category {name!r} (positions {seen[name.lower()]} and {k})")
        seen[name.lower()] = k
        names.append(name)
    return tuple(names)


def vocabulary_id(categories: Sequence[str], recipe: Dict[str, Any]) -> str:
    """``v`` + 12 hex digits of the SHA-256 of the category list and the recipe (order matters: labels follow it)."""
    blob = json.dumps({"categories": list(categories), "recipe": recipe}, sort_keys=True).encode("utf-8")
    return "v" + hashlib.sha256(blob).hexdigest()[:12]


def model_name(vid: str) -> str:
    return MODEL_PREFIX + vid


@dataclass
class Job:
    """One vocabulary: its request, state and files (``<adapt_dir>/<vid>/``)."""

    vocabulary: str
    categories: List[str]
    recipe: Dict[str, Any]
    state: str = "queued"
    step: int = 0
    steps: int = 0
    reason: Optional[str] = None
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    seconds: Optional[float] = None  # request to ready

    def public(self, loaded: bool = False) -> Dict[str, Any]:
        return {"vocabulary": self.vocabulary, "status": self.state, "progress": [self.step, self.steps],
                "categories": list(self.categories), "model": model_name(self.vocabulary), "loaded": loaded,
                "reason": self.reason, "seconds": self.seconds}

    def save(self, folder: Path) -> None:
        self.updated = time.time()
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / (JOB_FILE + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")
        tmp.replace(folder / JOB_FILE)


class AdaptService:
    """The jobs, the worker, the loaded-model bookkeeping (see the module docstring). ``attach(server)`` once the
    :class:`~ifseg_rt.serve.tritonserver.TritonServer` runs, then ``start()``; ``stop()`` ends a running job."""

    def __init__(self, options: AdaptServiceOptions, repository: Path, *, log: Callable[[str], None] = print):
        from ..tokenizer import OFATokenizer

        self.options = options
        self.root = Path(options.adapt_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        self.repository = Path(repository)
        self.log = log
        self.tokenizer = OFATokenizer.from_dir(options.bpe_dir)  # names are checked before anything is queued
        self.server = None
        self.jobs: Dict[str, Job] = {}
        self.pending: Deque[str] = deque()
        self.loaded: Dict[str, int] = {}  # vid -> bytes
        self.lock = threading.RLock()
        self.load_lock = threading.Lock()
        self.wake = threading.Event()
        self.halt = threading.Event()
        self.worker: Optional[subprocess.Popen] = None
        self.thread: Optional[threading.Thread] = None
        self._load_existing()

    # --- state ---------------------------------------------------------------------------------------------------
    def _load_existing(self) -> None:
        for f in sorted(self.root.glob(f"*/{JOB_FILE}")):
            try:
                job = Job(**json.loads(f.read_text(encoding="utf-8")))
            except (OSError, ValueError, TypeError):
                continue
            if job.state not in DONE:
                job.state, job.reason = "failed", "interrupted: serve stopped while it ran (asked again, it re-runs)"
                self._clean(job.vocabulary)
                job.save(f.parent)
            if job.state == "ready" and not (f.parent / "model").is_dir():
                job.state, job.reason = "failed", "its exported model is gone"
                job.save(f.parent)
            self.jobs[job.vocabulary] = job

    def _folder(self, vid: str) -> Path:
        return self.root / vid

    def _clean(self, vid: str) -> None:
        """Remove a job's partial files (run, model, repository entry); keep job.json and the worker log."""
        for p in (self._folder(vid) / "run", self._folder(vid) / "model", self.repository / model_name(vid)):
            shutil.rmtree(p, ignore_errors=True)

    def recipe(self, msg: Dict[str, Any]) -> Dict[str, Any]:
        o = self.options
        short, long_ = o.short_side or 512, o.max_long_side or max(2048, o.short_side or 512)
        steps, seed = msg.get("steps", o.steps), msg.get("seed", 1)
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= o.max_steps:
            raise AdaptRequestError(f"'steps' must be an integer in 1..{o.max_steps}, got {steps!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise AdaptRequestError(f"'seed' must be an integer >= 0, got {seed!r}")
        return {"steps": steps, "seed": seed, "batch_size": o.batch_size, "lr": o.lr,
                "base": str(Path(o.base).resolve()), "short_side": short, "max_long_side": long_}

    def check_names(self, names: Sequence[str]) -> None:
        """The tokenizer must encode every name without <unk> and the prompt must fit."""
        from ..tokenizer import build_ifseg_prompt

        try:
            prompt = build_ifseg_prompt(self.tokenizer, list(names))
        except ValueError as e:
            raise AdaptRequestError(str(e)) from None
        unk = self.tokenizer.symbol_to_id("<unk>")
        for name, ids in zip(names, prompt.category_ids):
            if unk in ids:
                raise AdaptRequestError(f"the tokenizer cannot encode {name!r} (it maps part of it to <unk>)")

    # --- the protocol ----------------------------------------------------------------------------------------------
    def handle(self, msg: Any) -> Dict[str, Any]:
        """One request of the protocol -> its answer (errors as ``{"error", "code"}``)."""
        try:
            if not isinstance(msg, dict):
                raise AdaptRequestError("the request must be a JSON object")
            op = msg.get("op", "adapt")
            if op == "adapt":
                return self.submit(msg)
            if op == "status":
                return self.status(msg.get("vocabulary"), load=bool(msg.get("load", False)))
            if op == "list":
                with self.lock:
                    return {"vocabularies": [j.public(j.vocabulary in self.loaded) for j in self.jobs.values()]}
            raise AdaptRequestError(f"unknown op {op!r} (adapt, status, list)")
        except AdaptRequestError as e:
            return {"error": str(e), "code": e.code}
        except OSError as e:  # the adaptation folder cannot be written (a full disk, permissions)
            return {"error": f"the adaptation service cannot write {self.root}: {e}", "code": "unavailable"}

    def submit(self, msg: Dict[str, Any]) -> Dict[str, Any]:
        names = normalise_categories(msg.get("categories"))
        self.check_names(names)
        recipe = self.recipe(msg)
        vid = vocabulary_id(names, recipe)
        with self.lock:
            job = self.jobs.get(vid)
            if job is not None and job.state != "failed":
                if job.state == "ready" and vid not in self.loaded:
                    return self.status(vid, load=True)
                return job.public(vid in self.loaded)
            if len(self.pending) >= self.options.queue:
                raise AdaptRequestError(f"the adaptation queue is full ({len(self.pending)} waiting): try again "
                                        f"later", "unavailable")
            job = Job(vocabulary=vid, categories=list(names), recipe=recipe, steps=recipe["steps"])
            job.save(self._folder(vid))
            self.jobs[vid] = job
            self.pending.append(vid)
            self.log(f"adapt: queued {vid} ({len(names)} categories, {recipe['steps']} steps)")
        self.wake.set()
        return job.public()

    def status(self, vid: Any, load: bool = False) -> Dict[str, Any]:
        with self.lock:
            job = self.jobs.get(vid) if isinstance(vid, str) else None
            if job is None:
                raise AdaptRequestError(f"no vocabulary {vid!r} on this server", "not_found")
            if not (load and job.state == "ready" and vid not in self.loaded):
                return job.public(vid in self.loaded)
        try:
            self._load(job)
        except Exception as e:  # noqa: BLE001 - reported to the client, serving continues
            raise AdaptRequestError(f"vocabulary {vid} could not be loaded: {e}", "unavailable") from None
        return job.public(True)

    # --- the worker ----------------------------------------------------------------------------------------------
    def attach(self, server) -> None:
        self.server = server

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="ifseg-adapt", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.halt.set()
        self.wake.set()
        w = self.worker
        if w is not None and w.poll() is None:
            try:
                os.killpg(w.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self.thread is not None:
            self.thread.join(timeout=30)

    def _run(self) -> None:
        while not self.halt.is_set():
            self.wake.wait(1.0)
            self.wake.clear()
            while not self.halt.is_set():
                with self.lock:
                    if not self.pending:
                        break
                    job = self.jobs[self.pending.popleft()]
                self._do(job)

    def _set(self, job: Job, state: str, **kw: Any) -> None:
        with self.lock:
            job.state = state
            for k, v in kw.items():
                setattr(job, k, v)
            try:
                job.save(self._folder(job.vocabulary))
            except OSError as e:  # e.g. a full disk: the state in memory still answers status requests
                self.log(f"adapt: cannot write the state of {job.vocabulary}: {e}")

    def _do(self, job: Job) -> None:
        vid, o, folder = job.vocabulary, self.options, self._folder(job.vocabulary)
        t0 = time.monotonic()
        try:
            (folder / "categories.txt").write_text("\n".join(job.categories) + "\n", encoding="utf-8")
            self._set(job, "adapting", step=0, reason=None)
            r = job.recipe
            self._command(job, ["adapt", "--checkpoint", o.base, "--bpe-dir", o.bpe_dir, "--categories-file",
                                str(folder / "categories.txt"), "--out", str(folder / "run"), "--steps",
                                str(r["steps"]), "--seed", str(r["seed"]), "--batch-size", str(r["batch_size"]),
                                "--lr", str(r["lr"]), "--device", "cpu", "--no-progress", "--overwrite"])
            self._set(job, "exporting", step=job.steps)
            self._command(job, ["export", str(folder / "run"), "--out", str(folder / "model"), "--short-side",
                                str(r["short_side"]), "--max-long-side", str(r["max_long_side"]), "--threads",
                                str(o.threads), "--overwrite"])
            self._load(job)
            self._set(job, "ready", seconds=round(time.monotonic() - t0, 1))
            self.log(f"adapt: {vid} ready as model '{model_name(vid)}' in {job.seconds:.0f} s")
        except Exception as e:  # noqa: BLE001 - the job fails with its reason; serving continues
            reason = str(e) or type(e).__name__
            if self.halt.is_set():
                reason = "interrupted: serve stopped while it ran (asked again, it re-runs)"
            self._clean(vid)
            with self.lock:
                self.loaded.pop(vid, None)
            self._set(job, "failed", reason=reason[-2000:])
            self.log(f"adapt: {vid} failed: {reason.splitlines()[-1] if reason else ''}")

    def _command(self, job: Job, args: List[str]) -> None:
        """Run ``python -m ifseg_rt ARGS`` as the worker (niced, bounded threads), following its step lines."""
        if self.halt.is_set():
            raise RuntimeError("serve is stopping")
        o = self.options
        env = {**os.environ, "OMP_NUM_THREADS": str(o.threads), "MKL_NUM_THREADS": str(o.threads),
               "PYTHONUNBUFFERED": "1"}
        log_path = self._folder(job.vocabulary) / LOG_FILE
        with open(log_path, "a", encoding="utf-8") as log:
            log.write(f"$ ifseg_rt {' '.join(args)}\n")
            log.flush()
            tail: Deque[str] = deque(maxlen=20)
            with subprocess.Popen([o.python, "-m", "ifseg_rt", *args], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, text=True,
                                  start_new_session=True, preexec_fn=lambda: os.nice(o.nice)) as proc:
                self.worker = proc
                assert proc.stdout is not None
                for line in proc.stdout:
                    log.write(line)
                    tail.append(line.rstrip())
                    m = _STEP.match(line)
                    if m:
                        with self.lock:
                            job.step = int(m.group(1))
                code = proc.wait()
            self.worker = None
        if code != 0:
            errors = [ln for ln in tail if ln.startswith(("error", "Error", "usage")) or "Error" in ln] or list(tail)
            raise RuntimeError(f"`ifseg_rt {args[0]}` exited with code {code}: " + " | ".join(errors[-3:]))

    # --- Triton ----------------------------------------------------------------------------------------------------
    def _bytes(self, vid: str) -> int:
        model = self._folder(vid) / "model"
        size = sum(p.stat().st_size for p in model.glob("*.onnx*")) or \
            sum(p.stat().st_size for p in model.rglob("*") if p.is_file())
        return size * self.options.instances

    def _load(self, job: Job) -> None:
        """Write the repository entry of ``job`` and load it into the running Triton, unloading the least recently
        used adapted models first while the bytes would exceed ``max_loaded_mb``."""
        from ..runtime.model_dir import load_model_dir
        from .repository import write_serving_repository

        if self.server is None:
            raise RuntimeError("the server is not running yet")
        vid = job.vocabulary
        with self.load_lock:  # the worker and status requests may both want it
            if vid in self.loaded:
                return
            if job.state != "ready":
                self._set(job, "loading")
            size = self._bytes(vid)
            self._evict(self.options.max_loaded_mb * 2 ** 20 - size)
            spec = load_model_dir(self._folder(vid) / "model")
            write_serving_repository(self.repository, spec, name=model_name(vid), instances=self.options.instances,
                                     threads=self.options.threads)
            self.server.load_model(model_name(vid))
            with self.lock:
                self.loaded[vid] = size

    def _evict(self, budget: int) -> None:
        with self.lock:
            if sum(self.loaded.values()) <= budget:
                return
            candidates = list(self.loaded)
        used = {vid: self._last_inference(vid) for vid in candidates}  # outside the lock: HTTP calls
        for vid in sorted(used, key=used.get):
            with self.lock:
                if sum(self.loaded.values()) <= budget:
                    return
                self.loaded.pop(vid, None)
            self.log(f"adapt: unloading {vid} (least recently used; it stays on disk)")
            try:
                self.server.unload_model(model_name(vid))
            except Exception as e:  # noqa: BLE001 - a failed unload leaves it loaded; reported
                self.log(f"adapt: unloading {vid} failed: {e}")

    def _last_inference(self, vid: str) -> int:
        try:
            with urllib.request.urlopen(f"http://{self.server.triton_http_url}/v2/models/{model_name(vid)}/stats",
                                        timeout=5) as r:
                stats = json.loads(r.read())
            return int(stats["model_stats"][0].get("last_inference") or 0)
        except (OSError, ValueError, KeyError, IndexError, urllib.error.URLError):
            return 0


# --- the control socket (serve process) and its client (the endpoint model inside Triton) -----------------------
class _Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        line = self.rfile.readline()
        try:
            msg = json.loads(line)
        except ValueError:
            answer: Dict[str, Any] = {"error": "the request is not JSON", "code": "invalid"}
        else:
            answer = self.server.service.handle(msg)  # type: ignore[attr-defined]
        self.wfile.write((json.dumps(answer) + "\n").encode("utf-8"))


class ControlServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """JSON lines on a Unix socket (only this user can connect: mode 0600), answered by ``service.handle``."""

    daemon_threads = True

    def __init__(self, path: Path, service: AdaptService):
        self.service = service
        path = Path(path)
        path.unlink(missing_ok=True)
        super().__init__(str(path), _Handler)
        os.chmod(path, 0o600)
        self.path = path
        self.thread = threading.Thread(target=self.serve_forever, name="ifseg-adapt-control", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self.path.unlink(missing_ok=True)


def control_request(path: str, msg: Dict[str, Any], timeout_s: float = CONTROL_TIMEOUT_S) -> Dict[str, Any]:
    """Send one request to the :class:`ControlServer` at ``path``; its answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout_s)
        s.connect(path)
        s.sendall((json.dumps(msg) + "\n").encode("utf-8"))
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    return json.loads(buf)
