"""``python -m ifseg_rt.export SOURCE --out DIR``."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
