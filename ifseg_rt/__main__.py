"""``python -m ifseg_rt COMMAND ...``: one entry point, one module per command (imported on demand, so that the
torch-free commands stay torch-free)."""

from __future__ import annotations

import os
import sys
from importlib import import_module

# command -> (module with a ``main(argv)``, one-line help)
COMMANDS = {
    "segment": ("ifseg_rt.runtime.cli", "segment", "label maps (+ overlays) for images or folders with an exported model"),
    "bench": ("ifseg_rt.runtime.cli", "bench", "per-stage latency and throughput of an exported model"),
    "eval": ("ifseg_rt.evaluate", "main", "mIoU of a model on a folder of images + PNG label maps"),
    "adapt": ("ifseg_rt.adapt.cli", "main", "image-free adaptation of an OFA checkpoint to a category list"),
    "export": ("ifseg_rt.export.cli", "main", "export a run directory or checkpoint to a model directory"),
    "demo": ("ifseg_rt.nano.demo", "main", "end-to-end demo on the embedded nano model and synthetic world"),
    "download": ("ifseg_rt.download", "main", "fetch an official English OFA checkpoint + BPE files, checked"),
    "serve": ("ifseg_rt.serve.cli", "main", "Triton Inference Server (HTTP/gRPC) around an exported model"),
}


def usage() -> str:
    lines = ["usage: python -m ifseg_rt COMMAND [options]     (or: ifseg-rt COMMAND [options])", "", "commands:"]
    lines += [f"  {name:<9} {text}" for name, (_, _, text) in COMMANDS.items()]
    lines += ["", "options:", "  -h, --help     this message", "  -V, --version  the installed version", "",
              "Run `python -m ifseg_rt COMMAND --help` for a command's options and examples."]
    return "\n".join(lines)


def cli(argv=None) -> int:
    """The ``python -m ifseg_rt`` / ``ifseg-rt`` entry point. Output piped into a program that stops reading
    (``ifseg-rt --help | head``) ends quietly instead of with a BrokenPipeError traceback."""
    try:
        return _dispatch(list(sys.argv[1:] if argv is None else argv))
    except BrokenPipeError:
        # Python's documented recipe: point stdout at devnull so that the interpreter's final flush cannot fail too
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a command killed by a closed pipe


def _dispatch(argv) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"ifseg_rt {__version__}")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"unknown command {cmd!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[cmd]
    try:
        entry = getattr(import_module(module), func)
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("ifseg_rt"):
            print(f"command {cmd!r} is not available in this build ({e.name} is missing)", file=sys.stderr)
            return 2
        extra = {"torch": "train", "onnxruntime": "onnx", "tritonclient": "serve", "pytriton": "serve",
                 "ray": "ray"}.get((e.name or "").split(".")[0], "train,onnx")
        print(f"command {cmd!r} needs the optional dependency {e.name!r}: pip install 'ifseg_rt[{extra}]'",
              file=sys.stderr)
        return 2
    return int(entry(rest) or 0)


if __name__ == "__main__":
    sys.exit(cli())
