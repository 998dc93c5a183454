"""``python -m ifseg_rt.export SOURCE --out DIR``: the same command as ``python -m ifseg_rt export``."""

import sys

from ..cli import cli

if __name__ == "__main__":
    sys.exit(cli(["export", *sys.argv[1:]]))
