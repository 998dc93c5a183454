"""``python -m ifseg_rt.adapt``: the same command as ``python -m ifseg_rt adapt``."""

import sys

from ..cli import cli

if __name__ == "__main__":
    sys.exit(cli(["adapt", *sys.argv[1:]]))
