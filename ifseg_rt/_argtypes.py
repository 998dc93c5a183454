"""``argparse`` ``type=`` validators shared by the command-line tools (torch-free: the runtime CLI uses them)."""

from __future__ import annotations

import argparse


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def positive_int(text: str) -> int:
    """An integer >= 1."""
    v = _integer(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    v = _integer(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


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
