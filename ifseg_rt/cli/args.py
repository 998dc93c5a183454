"""What the commands share: ``type=`` validators, the help formatter, and flag groups whose choices come from the
constants' owners (engines: :data:`ifseg_rt.runtime.backends.BACKENDS`; precisions:
:data:`ifseg_rt.runtime.model_dir.PRECISIONS`; kNN backends: :data:`ifseg_rt.knn.BACKENDS`). Torch-free."""

from __future__ import annotations

import argparse
import re
import tempfile
from pathlib import Path
from typing import Optional

from ..geometry import PATCH
from ..knn import BACKENDS as KNN_BACKENDS
from ..metrics import LABEL_OFFSETS
from ..runtime.backends import BACKENDS
from ..runtime.model_dir import PRECISIONS
from ..runtime.outputs import TABLE_NAME
from ..runtime.preprocess import MAX_PIXELS
from ..serve.protocol import check_model_name
from ..system import MAX_THREADS


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def bounded_int(text: str, low: int, high: Optional[int] = None, hint: str = "") -> int:
    """An integer in ``[low, high]`` (no upper bound when ``high`` is None); ``hint`` follows the bound it breaks."""
    v = _integer(text)
    if v < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}{hint}, got {v}")
    if high is not None and v > high:
        raise argparse.ArgumentTypeError(f"must be <= {high}{hint}, got {v}")
    return v


def positive_int(text: str) -> int:
    """An integer >= 1."""
    return bounded_int(text, 1)


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    return bounded_int(text, 0)




def thread_count(text: str) -> int:
    """A thread count: 1 .. MAX_THREADS, or 0 (the cores available) where the option's help says so."""
    return bounded_int(text, 0, MAX_THREADS, " threads")


def positive_thread_count(text: str) -> int:
    """A thread count of 1 .. MAX_THREADS."""
    return bounded_int(text, 1, MAX_THREADS, " threads")


def positive_float(text: str) -> float:
    """A number > 0."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {v}")
    return v


def patch_multiple(text: str) -> int:
    """A size in px that is a whole number of 16 px cells."""
    v = positive_int(text)
    if v % PATCH:
        raise argparse.ArgumentTypeError(f"must be a multiple of {PATCH} (the cell size), got {v}")
    return v


def model_name(text: str) -> str:
    """A Triton model name (:func:`~ifseg_rt.serve.protocol.check_model_name`)."""
    try:
        return check_model_name(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def image_size(text: str):
    """``HxW`` (or ``H,W``) in pixels, both sides at least one 16 px patch -> (H, W)."""
    parts = [p for p in re.split(r"[x,\s]+", text.strip().lower()) if p]
    try:
        h, w = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW (e.g. 512x683), got {text!r}") from None
    if min(h, w) < PATCH:
        raise argparse.ArgumentTypeError(f"{text!r}: both sides must be >= {PATCH} px (one patch)")
    if h * w > MAX_PIXELS:
        raise argparse.ArgumentTypeError(f"{text!r}: {h * w / 1e6:.3g} Mpx, above the {MAX_PIXELS / 1e6:.3g} Mpx an "
                                         f"image may have")
    return h, w


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The formatter of every ifseg_rt command: defaults shown once (not for ``None``, flags and required options,
    nor when the help already states one), descriptions and ``examples:`` epilogs kept as written."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or action.default is argparse.SUPPRESS or action.required \
                or isinstance(action.default, bool) or "default" in text:
            return text
        return super()._get_help_string(action)


def examples(*lines: str) -> str:
    """An ``examples:`` epilog block."""
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def _check_writable(p: Path, start: Path, flag: str, path) -> None:
    """``p`` (a file, or a folder when ``start`` is ``p`` itself) can be written: the nearest existing folder from
    ``start`` up is a folder, and it (or the existing file ``p``) really accepts a write."""
    folder = start
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"{flag} {path}: {folder} is a file, not a folder")
    try:  # the only reliable test (root passes os.access; sysfs, read-only mounts refuse new files)
        if p.is_file():
            with open(p, "ab"):
                pass
        else:
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".ifseg_rt-probe-"):
                pass
    except OSError as e:
        raise argparse.ArgumentTypeError(f"{flag} {path}: cannot write there ({e.strerror})") from None


def check_output_file(path, flag: str) -> None:
    """Refuse, before any work, an output file path (``--json``) that is a folder or cannot be written."""
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise argparse.ArgumentTypeError(f"{flag} {path} is a folder; give a file name, e.g. {p / 'results.json'}")
    _check_writable(p, p.parent, flag, path)


def check_output_apart(path, flag: str, inputs) -> None:
    """Refuse an output file that is one of the command's ``inputs`` (files or folders) or lies in one of them: the
    model directory's manifest, a label map or the checkpoint being read would be replaced."""
    if path is None:
        return
    out = Path(path).resolve()
    for item in inputs:
        if item is None:
            continue
        src = Path(item).resolve()
        if out == src or src in out.parents:
            raise argparse.ArgumentTypeError(f"{flag} {path} is {'inside ' if out != src else ''}the input {item}: "
                                             f"it would be overwritten; write it elsewhere")


def check_output_dir(path, flag: str) -> None:
    """Refuse, before any work, an output folder that is a file, lies under a file, or cannot be written."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise argparse.ArgumentTypeError(f"{flag} {path} is a file, not a folder")
    _check_writable(p, p, flag, path)


def add_label_offset_argument(p) -> None:
    """``--label-offset auto|0|1`` (eval, adapt's validation): how stored label values map to classes."""
    p.add_argument("--label-offset", type=_label_offset, default=None, metavar="{auto,0,1}",
                   help="auto (default): 0 for label maps ifseg_rt wrote (segment's: values are class ids), else 1; "
                        "1: stored 0 and 255 are ignored and v is class v-1 (ADE-style); 0: values are class ids, "
                        "255 ignored")


def _label_offset(text: str):
    if text == "auto":
        return None
    if text in [str(v) for v in LABEL_OFFSETS]:
        return int(text)
    raise argparse.ArgumentTypeError(f"expected auto, {' or '.join(map(str, LABEL_OFFSETS))}, got {text!r}")


# --- flag groups ---------------------------------------------------------------------------------------------------
def add_engine_arguments(p: argparse.ArgumentParser, *, precision_help: str, threads_help: str) -> None:
    """``--backend``, ``--device``, ``--threads`` and ``--precision`` (segment, bench, eval)."""
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="inference engine (auto: TensorRT engine for this GPU, onnxruntime, then torch; a bf16 "
                        "precision runs on the engine its export recorded, OpenVINO or torch)")
    p.add_argument("--device", default="auto", help="auto (a GPU when torch sees one), cpu, cuda or cuda:N")
    p.add_argument("--threads", type=positive_thread_count, default=None, help=threads_help)
    p.add_argument("--precision", choices=PRECISIONS, default=None, help=precision_help)


def add_knn_backend_argument(p, *, help: str = "ifseg_rt.knn backend") -> None:
    """``--knn-backend`` with every backend :func:`ifseg_rt.knn.knn_average` accepts."""
    p.add_argument("--knn-backend", default="auto", choices=KNN_BACKENDS, help=help)


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of the commands that run an exported model directory (segment, bench)."""
    p.add_argument("--model", required=True, help="model directory written by python -m ifseg_rt.export")
    add_engine_arguments(
        p, threads_help="CPU threads of the engine and post-processing (default: the cores available to the process)",
        precision_help="on the CPU one of the model's precisions, by default the one it was exported for (bf16 also "
                       "runs the torch backend in bfloat16); on a GPU the torch / TensorRT compute precision, by "
                       "default bf16 / the engine's")
    p.add_argument("--no-knn", action="store_true", help="skip kNN post-processing (plain logits arg-max)")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the model files")


def segmenter_options(args: argparse.Namespace) -> dict:
    """``Segmenter.load`` keyword arguments from the flags of :func:`add_model_arguments` (``segment --ray`` loads
    each actor's Segmenter with them too, so both paths read the flags the same way)."""
    opts = {"backend": args.backend, "device": args.device, "verify": not args.no_verify,
            "knn": False if args.no_knn else None}
    if args.precision:
        opts["precision"] = args.precision
    if args.threads and args.backend in ("onnxruntime", "openvino", "torch", "auto"):
        opts["threads"] = args.threads
    return opts


_RAY_ADDRESS = re.compile(r"^(local|auto|ray://\S+|[\w.\-]+:\d+|\[[0-9a-fA-F:]+\]:\d+)$")


def ray_address(text: str) -> str:
    """``type=`` of ``--ray ADDRESS``: local, auto, ray://host:port or host:port."""
    if not _RAY_ADDRESS.match(text):
        raise argparse.ArgumentTypeError(
            f"expected local, auto, ray://HOST:PORT or HOST:PORT, got {text!r} (to give inputs after --ray, write "
            f"--ray=local or put --ray last)")
    return text


def add_ray_arguments(p: argparse.ArgumentParser, *, command: str) -> None:
    """``--ray [ADDRESS]`` and the pool flags (``command``: "segment" adds ``--table``)."""
    g = p.add_argument_group("Ray Data (pip install 'ifseg_rt[ray]')")
    g.add_argument("--ray", nargs="?", const="local", default=None, type=ray_address, metavar="ADDRESS",
                   help="run on Ray Data: alone, a private local Ray; auto, ray://HOST:PORT or HOST:PORT, an existing "
                        "cluster (every node must see --model and the data)")
    g.add_argument("--actors", type=positive_int, default=None,
                   help="Segmenter actors (default: one per cluster CPU, or per GPU with --device cuda); "
                        "--threads is then per actor, by default a node's cores / actors")
    g.add_argument("--gpus-per-actor", type=positive_float, default=None,
                   help="GPUs each actor reserves with --device cuda (default 1; 0.5: two actors per GPU)")
    if command == "segment":
        g.add_argument("--table", default=None,
                       help=f"the per-image Parquet table (default: OUT/{TABLE_NAME})")


def check_ray_arguments(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``parser.error`` for a Ray-only flag given without ``--ray``."""
    if args.ray is None:
        given = [f for f, v in (("--actors", args.actors), ("--gpus-per-actor", args.gpus_per_actor),
                                ("--table", getattr(args, "table", None))) if v]
        if given:
            p.error(f"{', '.join(given)} only apply with --ray")
