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


def positive_float(text: str) -> float:
    """A number > 0."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {v}")
    return v


def image_size(text: str):
    """``HxW`` (or ``H,W``) in pixels, both sides at least one 16 px patch -> (H, W)."""
    import re

    from .geometry import PATCH

    parts = [p for p in re.split(r"[x,\s]+", text.strip().lower()) if p]
    try:
        h, w = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW (e.g. 512x683), got {text!r}") from None
    if min(h, w) < PATCH:
        raise argparse.ArgumentTypeError(f"{text!r}: both sides must be >= {PATCH} px (one patch)")
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
