"""``python -m ifseg_rt.pretrain_nano``: the command of :mod:`ifseg_rt.cli.pretrain_nano`, kept at its documented
name (under the commands' one error handler)."""

import sys

from .cli import run
from .cli.pretrain_nano import main

if __name__ == "__main__":
    sys.exit(run(main, sys.argv[1:]))
