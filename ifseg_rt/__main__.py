"""``python -m ifseg_rt COMMAND ...``: one entry point, one module per command (imported on demand, so that the
torch-free commands stay torch-free)."""

from __future__ import annotations

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
}


def usage() -> str:
    lines = ["usage: python -m ifseg_rt COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<8} {text}" for name, (_, _, text) in COMMANDS.items()]
    lines += ["", "Run `python -m ifseg_rt COMMAND --help` for a command's options."]
    return "\n".join(lines)


def cli(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
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
        print(f"command {cmd!r} needs the optional dependency {e.name!r}; install it, e.g. "
              f"pip install 'ifseg_rt[train,onnx]'", file=sys.stderr)
        return 2
    return int(entry(rest) or 0)


if __name__ == "__main__":
    sys.exit(cli())
