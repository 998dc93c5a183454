"""``python -m ifseg_rt serve --model DIR [options]``: a Triton Inference Server around an exported model."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from ..runtime.backends import BACKENDS, BackendUnavailable, resolve_device
from ..serve import protocol as P
from ..serve.adaptation import AdaptServiceOptions
from ..serve.repository import MAX_QUEUE_SIZE, QUEUE_TIMEOUT_MS
from ..serve.server import ServeOptions, serve
from ..serve.tritonserver import ServerError
from ..system import available_cores
from .args import (HelpFormatter, bounded_int, check_output_file, examples, model_name, non_negative_int,
                   positive_int, positive_thread_count, thread_count)


def _port(text: str) -> int:
    return bounded_int(text, 1, 65535, " (a TCP port)")


def _min_pixels(text: str) -> int:
    return bounded_int(text, 256, hint=" (one 16x16 patch)")


def _byte_limit(text: str) -> int:
    return bounded_int(text, P.MIN_BYTES_LIMIT, hint=" (below that every request is refused)")


def _body_limit(text: str) -> int:
    return 0 if text.strip() == "0" else _byte_limit(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ifseg_rt serve", formatter_class=HelpFormatter,
        epilog=examples("python -m ifseg_rt serve --model models/street --http-port 8000 --grpc-port 8001",
                        "python -m ifseg_rt serve --model models/street --instances 2 --max-batch-size 8",
                        "python -m ifseg_rt serve --model models/street --base ofa_base.pt --bpe-dir ofa-bpe "
                        "--adapt-dir vocabularies/",
                        'python -c "from ifseg_rt.serve import Client; '
                        "print(Client('localhost:8000').seg('street.jpg').names())\""),
        description="Serve an exported model with NVIDIA Triton Inference Server (the tritonserver that "
                    "nvidia-pytriton bundles): model NAME, input 'image' (BYTES, one encoded image file per item), "
                    "outputs 'labels' (INT32, original size), 'labels_png' (the same as PNG, on request), "
                    "'probabilities' (on request), 'original_size', 'input_size', 'grid'; category names in the "
                    "model config's 'categories' parameter. Health: /v2/health/ready; metrics (Triton's and "
                    "ifseg_*: requests by outcome, execute-time histogram, worker deaths/restarts): the metrics "
                    "port. A dead worker restarts its model. Stops cleanly on SIGINT / SIGTERM. Client: "
                    "ifseg_rt.serve.Client.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="model directory written by python -m ifseg_rt.export")
    src.add_argument("--repository", help="serve this Triton model repository as it is instead (e.g. python -m "
                                          "ifseg_rt.export DIR --format triton --onnx-stand-in --out REPO: this "
                                          "tritonserver has the python backend only); the model options are its own")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="inference engine of each instance (torch is imported only for --backend torch)")
    p.add_argument("--device", default="auto", help="auto (a GPU when torch sees one), cpu, cuda or cuda:N")
    p.add_argument("--name", type=model_name, default=P.MODEL_NAME, help="Triton model name")
    p.add_argument("--address", default="127.0.0.1",
                   help="interface to listen on; 0.0.0.0 accepts connections from other machines")
    p.add_argument("--http-port", type=_port, default=8000, help="HTTP/REST port (KServe v2 protocol)")
    p.add_argument("--grpc-port", type=_port, default=8001, help="gRPC port")
    p.add_argument("--metrics-port", type=_port, default=8002, help="Prometheus metrics port (/metrics)")
    g = p.add_argument_group("capacity and memory bounds")
    g.add_argument("--max-batch-size", type=positive_int, default=8,
                   help="most images one instance runs at once (Triton's dynamic batcher joins requests)")
    g.add_argument("--instances", type=positive_int, default=None,
                   help="model instances (processes), each holding one Segmenter and running one batch at a time "
                        "(default: on the CPU one per available core, at most 4, so that one instance's decoding "
                        "and post-processing overlap another's network; on a GPU 1)")
    g.add_argument("--threads", type=thread_count, default=0,
                   help="engine CPU threads per instance (0: the available cores divided by --instances)")
    g.add_argument("--max-queue-size", type=positive_int, default=MAX_QUEUE_SIZE,
                   help="requests waiting for an instance; more are rejected at once (HTTP 503 / gRPC UNAVAILABLE)")
    g.add_argument("--queue-timeout-ms", type=non_negative_int, default=QUEUE_TIMEOUT_MS,
                   help="a request still waiting for an instance after this is rejected instead of run (0: no limit)")
    g.add_argument("--max-queue-delay-us", type=non_negative_int, default=0,
                   help="how long the batcher may hold a request to fill a batch (0: batch what is waiting)")
    g.add_argument("--max-request-bytes", type=_byte_limit, default=P.MAX_REQUEST_BYTES,
                   help="largest encoded image accepted, checked before decoding")
    g.add_argument("--max-pixels", type=_min_pixels, default=P.MAX_PIXELS,
                   help="largest image accepted (width x height), read from the file header before decoding")
    g.add_argument("--max-output-pixels", type=_min_pixels, default=P.MAX_OUTPUT_PIXELS,
                   help="largest int32 'labels' output of one request (4 bytes a pixel); larger requests must ask for "
                        "'labels_png' (ifseg_rt's Client does so for large images)")
    g.add_argument("--max-body-bytes", type=_body_limit, default=0,
                   help="largest HTTP request body, refused (413) from its Content-Length before it is read "
                        "(0: --max-request-bytes + 1 MiB, one image per request)")
    g.add_argument("--no-http-front", dest="http_front", action="store_false",
                   help="let Triton's own HTTP server take the HTTP and metrics ports (no 400 for malformed KServe "
                        "JSON, which Triton answers with 500; no early 413; no ifseg_http_* metrics)")
    a = p.add_argument_group("adapt on request (new vocabularies while serving: model 'ifseg_adapt', "
                             "ifseg_rt.serve.Client.adapt)")
    a.add_argument("--base", metavar="CHECKPOINT", help="OFA / IFSeg checkpoint each requested vocabulary is adapted "
                                                        "from (enables the adaptation endpoint)")
    a.add_argument("--bpe-dir", help="the checkpoint's tokenizer files (with --base)")
    a.add_argument("--adapt-dir", help="where vocabularies are adapted, exported and kept (with --base; kept across "
                                       "restarts: a vocabulary asked for again is served from here)")
    d = AdaptServiceOptions
    a.add_argument("--adapt-steps", type=positive_int, default=d.steps,
                   help="adaptation steps of a request that names none")
    a.add_argument("--adapt-max-steps", type=positive_int, default=d.max_steps,
                   help="most steps a request may ask for")
    a.add_argument("--adapt-batch-size", type=positive_int, default=d.batch_size, help="word grids per step")
    a.add_argument("--adapt-lr", type=float, default=d.lr, help="peak learning rate")
    a.add_argument("--adapt-threads", type=positive_thread_count, default=d.threads,
                   help="CPU threads of the adaptation worker")
    a.add_argument("--adapt-nice", type=int, choices=range(0, 20), metavar="0..19", default=d.nice,
                   help="niceness of the adaptation worker (serving keeps its priority)")
    a.add_argument("--adapt-queue", type=positive_int, default=d.queue,
                   help="adaptations waiting behind the running one; more are refused (503)")
    a.add_argument("--adapt-max-loaded-mb", type=positive_int, default=d.max_loaded_mb,
                   help="adapted models kept loaded (ONNX bytes x instances); least recently used are unloaded")
    a.add_argument("--adapt-instances", type=positive_int, default=d.instances,
                   help="Triton instances of each adapted model")
    a.add_argument("--adapt-short-side", type=positive_int, default=None,
                   help="image policy of adapted models (default: the --model's, else 512)")
    a.add_argument("--adapt-max-long-side", type=positive_int, default=None,
                   help="image policy of adapted models (default: the --model's, else 2048)")
    g = p.add_argument_group("process")
    g.add_argument("--exit-timeout", type=non_negative_int, default=10,
                   help="seconds in-flight requests get to finish after SIGINT / SIGTERM")
    g.add_argument("--ready-file", help="write the ports and process ids here (JSON) once the model is ready")
    g.add_argument("--quiet", action="store_true", help="do not echo tritonserver's log")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    ports = (args.http_port, args.grpc_port, args.metrics_port)
    if len(set(ports)) != 3:
        parser.error(f"--http-port, --grpc-port and --metrics-port must differ, got {ports}")
    if not (args.model or args.repository or args.base):
        parser.error("give --model DIR (serve an exported model), --repository DIR, or --base CHECKPOINT with "
                     "--bpe-dir and --adapt-dir (adapt on request)")
    adapt = None
    if args.base or args.bpe_dir or args.adapt_dir:
        missing = [f for f, v in (("--base", args.base), ("--bpe-dir", args.bpe_dir), ("--adapt-dir", args.adapt_dir))
                   if not v]
        if missing:
            parser.error(f"adapting on request needs --base, --bpe-dir and --adapt-dir (missing: {', '.join(missing)})")
        if args.repository:
            parser.error("--base (adapt on request) works with --model, not with --repository")
        try:
            adapt = AdaptServiceOptions(
                base=args.base, bpe_dir=args.bpe_dir, adapt_dir=args.adapt_dir, steps=args.adapt_steps,
                max_steps=args.adapt_max_steps, batch_size=args.adapt_batch_size, lr=args.adapt_lr,
                threads=args.adapt_threads, nice=args.adapt_nice, queue=args.adapt_queue,
                max_loaded_mb=args.adapt_max_loaded_mb, instances=args.adapt_instances,
                short_side=args.adapt_short_side, max_long_side=args.adapt_max_long_side)
        except (ValueError, FileNotFoundError) as e:
            parser.error(str(e))
    if args.repository:
        model_opts = ("backend", "device", "name", "max_batch_size", "instances", "threads", "max_queue_size",
                      "max_queue_delay_us", "max_request_bytes", "max_pixels", "queue_timeout_ms",
                      "max_output_pixels")
        given = [k for k in model_opts if getattr(args, k) != parser.get_default(k)]
        if given:
            parser.error(f"{', '.join('--' + k.replace('_', '-') for k in given)} set(s) the served model; with "
                         f"--repository the repository's own config.pbtxt files decide")
    try:
        check_output_file(args.ready_file, "--ready-file")
    except argparse.ArgumentTypeError as e:
        parser.error(str(e))
    instances = args.instances
    if instances is None:
        try:
            on_gpu = resolve_device(args.device).startswith("cuda")
        except (ValueError, BackendUnavailable) as e:
            parser.error(str(e))
        instances = 1 if on_gpu else min(4, available_cores())
    options = ServeOptions(name=args.name, backend=args.backend, device=args.device, threads=args.threads,
                           max_batch_size=args.max_batch_size, instances=instances,
                           max_queue_size=args.max_queue_size, max_queue_delay_us=args.max_queue_delay_us,
                           queue_timeout_ms=args.queue_timeout_ms,
                           max_request_bytes=args.max_request_bytes, max_pixels=args.max_pixels,
                           max_output_pixels=args.max_output_pixels, max_body_bytes=args.max_body_bytes,
                           http_front=args.http_front, address=args.address, http_port=args.http_port,
                           grpc_port=args.grpc_port, metrics_port=args.metrics_port, exit_timeout_s=args.exit_timeout)
    try:
        return serve(args.model, options, repository=args.repository, adapt=adapt, ready_file=args.ready_file,
                     log=None if args.quiet else (lambda line: print(line, flush=True)),
                     announce=lambda line: print(line, flush=True))
    except (ValueError, RuntimeError, ImportError) as e:  # ModelDirError, BackendUnavailable, ServerError
        kind = "server error" if isinstance(e, ServerError) else "error"
        print(f"{kind}: {e}", file=sys.stderr)
        return 2
