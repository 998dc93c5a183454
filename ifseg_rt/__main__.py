"""``python -m ifseg_rt COMMAND ...``: the dispatcher of :mod:`ifseg_rt.cli`."""

import sys

from .cli import cli

if __name__ == "__main__":
    sys.exit(cli())
