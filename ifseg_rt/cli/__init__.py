"""The command-line layer: ``python -m ifseg_rt COMMAND ...`` (and ``python -m ifseg_rt.export``,
``python -m ifseg_rt.adapt``, ``python -m ifseg_rt.pretrain_nano``).

The only package that parses arguments: one module per command (imported on demand, so that the torch-free commands
stay torch-free), shared flag groups and ``type=`` validators in :mod:`ifseg_rt.cli.args`. It sits above every library
package and nothing below imports it (the import contract in ``pyproject.toml``, checked by ``tests/test_layers.py``).
"""

from __future__ import annotations

import os
import sys
from importlib import import_module

# command -> (module with a ``main(argv)``, one-line help)
COMMANDS = {
    "segment": ("ifseg_rt.cli.segment", "main", "label maps (+ overlays) for images or folders with an exported model"),
    "bench": ("ifseg_rt.cli.bench", "main", "per-stage latency and throughput of an exported model"),
    "eval": ("ifseg_rt.cli.eval", "main", "mIoU of a model on a folder of images + PNG label maps"),
    "adapt": ("ifseg_rt.cli.adapt", "main", "image-free adaptation of an OFA checkpoint to a category list"),
    "export": ("ifseg_rt.cli.export", "main", "export a run directory or checkpoint to a model directory"),
    "demo": ("ifseg_rt.cli.demo", "main", "end-to-end demo on the embedded nano model and synthetic world"),
    "download": ("ifseg_rt.cli.download", "main", "fetch an official English OFA checkpoint + BPE files, checked"),
    "serve": ("ifseg_rt.cli.serve", "main", "Triton Inference Server (HTTP/gRPC) around an exported model"),
    "pretrain_nano": ("ifseg_rt.cli.pretrain_nano", "main", "pretrain the embedded nano model on the synthetic world"),
}


def usage() -> str:
    lines = ["usage: python -m ifseg_rt COMMAND [options]     (or: ifseg-rt COMMAND [options])", "", "commands:"]
    lines += [f"  {name:<13} {text}" for name, (_, _, text) in COMMANDS.items()]
    lines += ["", "options:", "  -h, --help     this message", "  -V, --version  the installed version", "",
              "Run `python -m ifseg_rt COMMAND --help` for a command's options and examples."]
    return "\n".join(lines)


# exit statuses, the same in every command
EXIT_FAILED = 1  # the command ran, and some of its work failed (an image, the precision gate, a write)
EXIT_USAGE = 2  # the command could not start: arguments, a model, inputs or outputs it cannot use
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, what a shell reports)
EXIT_PIPE = 141  # a closed output pipe (128 + SIGPIPE)


class UsageError(Exception):
    """A command cannot start (a model, input or output it cannot use): one ``error:`` line, :data:`EXIT_USAGE`."""


def cli(argv=None) -> int:
    """The ``python -m ifseg_rt`` / ``ifseg-rt`` entry point (and of ``python -m ifseg_rt.export`` /
    ``.adapt`` / ``.pretrain_nano``, through :func:`run`)."""
    return run(_dispatch, list(sys.argv[1:] if argv is None else argv))


def run(entry, argv) -> int:
    """Run a command's ``entry(argv)`` under the one top-level handler: Ctrl-C ends with one line (what the command
    put in its ``KeyboardInterrupt``, e.g. how far it got) and :data:`EXIT_INTERRUPTED`; an ``OSError`` that escaped
    the command with one ``error:`` line naming the path; output piped into a program that stops reading
    (``ifseg-rt --help | head``) quietly."""
    try:
        return int(entry(argv) or 0)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as e:
        print(f"\ninterrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # Python's documented recipe: point stdout at devnull so that the interpreter's final flush cannot fail too
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_PIPE
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        print(f"error: {e.strerror}{where}" if e.strerror else f"error: {e}", file=sys.stderr)
        return EXIT_FAILED


def _dispatch(argv) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from .. import __version__

        print(f"ifseg_rt {__version__}")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"unknown command {cmd!r}\n\n{usage()}", file=sys.stderr)
        return EXIT_USAGE
    module, func, _ = COMMANDS[cmd]
    try:
        entry = getattr(import_module(module), func)
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("ifseg_rt"):
            print(f"command {cmd!r} is not available in this build ({e.name} is missing)", file=sys.stderr)
            return EXIT_USAGE
        extra = {"torch": "train", "onnxruntime": "onnx", "tritonclient": "serve", "pytriton": "serve",
                 "ray": "ray"}.get((e.name or "").split(".")[0], "train,onnx")
        print(f"command {cmd!r} needs the optional dependency {e.name!r}: pip install 'ifseg_rt[{extra}]'",
              file=sys.stderr)
        return EXIT_USAGE
    return int(entry(rest) or 0)
