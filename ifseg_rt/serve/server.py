"""``serve``: a Triton Inference Server around one exported model (a :class:`~ifseg_rt.runtime.Segmenter` per
model instance), until SIGINT or SIGTERM.

The model directory is validated here first (clear errors before anything starts); then a one-model repository
(:func:`~ifseg_rt.serve.repository.write_serving_repository`) goes into a temporary directory and PyTriton's bundled
tritonserver runs it (:class:`~ifseg_rt.serve.tritonserver.TritonServer`). Every instance loads the model once;
requests are batched dynamically; the contract is :mod:`ifseg_rt.serve.protocol`. Torch is imported only when
the torch backend is chosen (inside the model instances).
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Union

from ..runtime.backends import resolve_backend, resolve_device
from ..runtime.model_dir import load_model_dir
from ..system import available_cores
from . import protocol as P
from .adaptation import ENDPOINT, AdaptService, AdaptServiceOptions, ControlServer
from .repository import (MAX_QUEUE_SIZE, QUEUE_TIMEOUT_MS, check_repository, write_adapt_endpoint,
                         write_serving_repository)
from .tritonserver import EXIT_TIMEOUT_S, READY_TIMEOUT_S, TritonServer, WorkerWatch, check_shm, shm_free


@dataclass(frozen=True)
class ServeOptions:
    """What ``python -m ifseg_rt serve`` runs; see ``python -m ifseg_rt serve --help`` for each field."""

    name: str = P.MODEL_NAME
    backend: str = "auto"
    device: str = "cpu"
    threads: int = 0  # engine CPU threads per instance; 0: cores // instances
    max_batch_size: int = 8
    instances: int = 1
    max_queue_size: int = MAX_QUEUE_SIZE
    max_queue_delay_us: int = 0
    queue_timeout_ms: int = QUEUE_TIMEOUT_MS
    max_request_bytes: int = P.MAX_REQUEST_BYTES
    max_pixels: int = P.MAX_PIXELS
    max_output_pixels: int = P.MAX_OUTPUT_PIXELS
    max_body_bytes: int = 0  # HTTP request body; 0: max_request_bytes + BODY_JSON_BYTES
    http_front: bool = True  # the HTTP front on the HTTP and metrics ports (serve.front)
    address: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    exit_timeout_s: int = EXIT_TIMEOUT_S


INSTANCES_PER_CORE = 4  # serving instances beyond this many per core only cost memory (and shared-memory regions)


def max_instances(device: str) -> int:
    """The most model instances ``serve`` starts on ``device``."""
    return 16 if device.startswith("cuda") else INSTANCES_PER_CORE * available_cores()


def _body_bytes(options: ServeOptions) -> int:
    v = options.max_body_bytes
    if isinstance(v, bool) or not isinstance(v, int) or not (v == 0 or v >= P.MIN_BYTES_LIMIT):
        raise ValueError(f"max_body_bytes must be 0 (max_request_bytes + {P.BODY_JSON_BYTES}) or an integer >= "
                         f"{P.MIN_BYTES_LIMIT}, got {v!r}")
    return v or options.max_request_bytes + P.BODY_JSON_BYTES


def _threads(options: ServeOptions) -> int:
    if options.threads:
        return options.threads
    return max(1, available_cores() // options.instances)


def start_server(model_dir: Union[None, str, Path], workdir: Union[str, Path], options: ServeOptions = ServeOptions(),
                 *, adapt: Optional[AdaptServiceOptions] = None, log: Optional[Callable[[str], None]] = None,
                 announce: Callable[[str], None] = print, timeout_s: float = READY_TIMEOUT_S) -> TritonServer:
    """Validate ``model_dir``, write the serving repository under ``workdir`` and start the server; returns the
    running :class:`TritonServer` (stop it with ``.stop()``) once the model is ready. With ``adapt``, the server
    also answers adaptation requests (:mod:`~ifseg_rt.serve.adaptation`; ``model_dir`` may then be None); its
    service is ``server.adaptation`` and stops with the server.

    Raises
    ------
    ModelDirError / BackendUnavailable / ValueError for a model or option that cannot serve; ServerError when
    tritonserver does not come up (its error lines are in the message)
    """
    if model_dir is None and adapt is None:
        raise ValueError("nothing to serve: give a model directory, or the base checkpoint to adapt on request")
    device = resolve_device(options.device)
    P.check_model_name(options.name)
    body_bytes = _body_bytes(options)
    limit = max_instances(device)
    if not 1 <= options.instances <= limit:
        raise ValueError(f"instances must be in [1, {limit}] here (each is a process holding the model; at most "
                         f"{INSTANCES_PER_CORE} per core{', 16 on a GPU' if device.startswith('cuda') else ''}), got "
                         f"{options.instances}")
    workers = (options.instances if model_dir is not None else 0) + (adapt.instances + 1 if adapt is not None else 0)
    shm = check_shm(workers, options.max_request_bytes + 4 * options.max_output_pixels, shm_free())
    if shm:
        announce(shm)
    repo = Path(workdir) / "models"
    repo.mkdir(parents=True, exist_ok=True)
    spec = None
    if model_dir is not None:
        spec = load_model_dir(model_dir)
        backend = resolve_backend(options.backend, device, spec)  # BackendUnavailable here, not inside Triton
        write_serving_repository(repo, spec, name=options.name, backend=backend, device=device,
                                 threads=_threads(options) if backend != "tensorrt" else 0,
                                 max_batch_size=options.max_batch_size, instances=options.instances,
                                 max_queue_size=options.max_queue_size, max_queue_delay_us=options.max_queue_delay_us,
                                 queue_timeout_ms=options.queue_timeout_ms,
                                 max_request_bytes=options.max_request_bytes, max_pixels=options.max_pixels,
                                 max_output_pixels=options.max_output_pixels)
    server = TritonServer(repo, http_port=options.http_port, grpc_port=options.grpc_port,
                          metrics_port=options.metrics_port, address=options.address, log=log,
                          exit_timeout_s=options.exit_timeout_s, gpu_metrics=device.startswith("cuda"),
                          http_front=options.http_front, max_body_bytes=body_bytes)
    service = None
    try:
        if adapt is not None:
            policy = spec.policy if spec is not None and spec.policy.mode == "short_side" else None
            adapt = replace(adapt, short_side=adapt.short_side or (policy.short_side if policy else None),
                            max_long_side=adapt.max_long_side or (policy.max_long_side if policy else None))
            service = server.adaptation = AdaptService(adapt, repo, log=announce)
            server.before_stop.append(service.stop)
            control = ControlServer(Path(workdir) / "adapt.sock", service)
            server.before_stop.append(control.close)  # stop() runs these last-in first
            write_adapt_endpoint(repo, control.path)
            check_repository(repo)
        server.start(timeout_s)
    except BaseException:
        server.stop()  # runs before_stop: the control socket goes too
        raise
    if service is not None:
        service.attach(server)
        service.start()
    return server


def start_repository(repository: Union[str, Path], options: ServeOptions = ServeOptions(), *,
                     log: Optional[Callable[[str], None]] = None, timeout_s: float = READY_TIMEOUT_S) -> TritonServer:
    """Start the server on an existing model repository (e.g. ``export --format triton --onnx-stand-in``; this
    tritonserver has the python backend only) after :func:`~ifseg_rt.serve.repository.check_repository`."""
    check_repository(repository)
    server = TritonServer(repository, http_port=options.http_port, grpc_port=options.grpc_port,
                          metrics_port=options.metrics_port, address=options.address, log=log,
                          exit_timeout_s=options.exit_timeout_s, http_front=options.http_front,
                          max_body_bytes=_body_bytes(options))
    return server.start(timeout_s)


def _write_ready_file(path: Union[str, Path], server: TritonServer, options: ServeOptions) -> None:
    info: Dict[str, Any] = {"pid": os.getpid(), "server_pid": server.pid, "model": options.name,
                            "address": server.host, **server.ports, "triton_http": server.triton_http_url,
                            "options": asdict(options)}
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    tmp.replace(p)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def serve(model_dir: Union[None, str, Path], options: ServeOptions = ServeOptions(), *,
          repository: Union[None, str, Path] = None, adapt: Optional[AdaptServiceOptions] = None,
          ready_file: Union[None, str, Path] = None,
          log: Optional[Callable[[str], None]] = print, announce: Callable[[str], None] = print) -> int:
    """Serve ``model_dir`` (or the model ``repository`` as it is) until SIGINT / SIGTERM (then in-flight requests
    finish and everything is removed).

    Returns 0 after a signal, else the server's exit code (it ended on its own) or 1.
    """
    # SIGTERM takes SIGINT's path; SIGINT is reset too, because a process started in the background by a
    # non-interactive shell inherits it ignored and would never stop on Ctrl-C / kill -INT
    previous = {s: signal.signal(s, h) for s, h in ((signal.SIGTERM, _interrupt),
                                                    (signal.SIGINT, signal.default_int_handler))}
    server = watch = None
    try:
        with tempfile.TemporaryDirectory(prefix="ifseg_serve_") as work:
            try:
                if repository is None:
                    server = start_server(model_dir, work, options, adapt=adapt, log=log, announce=announce)
                    what = " and ".join(
                        ([f"{model_dir} as model '{options.name}'"] if model_dir is not None else []) +
                        ([f"adaptation of {adapt.base} on request (model '{ENDPOINT}', {adapt.adapt_dir})"]
                         if adapt is not None else []))
                else:
                    server = start_repository(repository, options, log=log)
                    what = f"the models of {repository}"
                watch = WorkerWatch(server, log=announce)
                watch.start()
                if ready_file:
                    _write_ready_file(ready_file, server, options)
                announce(f"serving {what}: HTTP {server.http_url}, gRPC {server.grpc_url}, metrics "
                         f"{server.metrics_url} (Ctrl-C or SIGTERM stops)")
                announce(f"  client: python -c \"from ifseg_rt.serve import Client; "
                         f"print(Client('{server.http_url}').seg('image.jpg').names())\"")
                code = server.wait()
                announce(f"tritonserver exited on its own (code {code}):\n{server.errors()}")
                return code or 1
            except KeyboardInterrupt:
                announce("stopping: finishing in-flight requests")
                return 0
            finally:
                for s in previous:  # a second signal must not cut the shutdown short (drain <= exit timeout, then
                    # Triton's own exit timeout + 20 s)
                    signal.signal(s, signal.SIG_IGN)
                if watch is not None:
                    watch.stop()
                    if watch.deaths:
                        announce(f"workers: {watch.counts()}")
                if server is not None:
                    server.stop()
                if ready_file:
                    try:
                        Path(ready_file).unlink(missing_ok=True)
                    except OSError:  # never hide why serving stopped (the path is checked before the start)
                        pass
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
