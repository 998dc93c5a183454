"""``python -m ifseg_rt download NAME``: an official English OFA checkpoint (+ its BPE files), checked
(:mod:`ifseg_rt.download`)."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Optional, Sequence

from ..download import BPE_BASE_URL, OFA_BASE_URL, REGISTRY, DownloadArgumentError, DownloadError, download
from .args import HelpFormatter


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m ifseg_rt download", formatter_class=HelpFormatter,
        description="Download an official English OFA checkpoint (+ its BPE files), check it, and print the "
                    "adaptation command that turns it into a segmenter for your categories.",
        epilog="checkpoints:\n" + "\n".join(f"  {k:<11} {v.file:<15} {v.params}" for k, v in REGISTRY.items())
               + "\n\nexamples:\n  python -m ifseg_rt download ofa-base --to checkpoints\n"
                 "  python -m ifseg_rt download ofa-tiny --url-base https://mirror.example.org/ofa/")
    p.add_argument("name", choices=list(REGISTRY), metavar="NAME", help="one of: " + ", ".join(REGISTRY))
    p.add_argument("--to", default="checkpoints", help="folder for the checkpoint and ofa-bpe/")
    p.add_argument("--url-base", help=f"checkpoint mirror (default {OFA_BASE_URL})")
    p.add_argument("--bpe-base", help=f"BPE file mirror (default {BPE_BASE_URL})")
    p.add_argument("--no-bpe", action="store_true", help="do not fetch the BPE files")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    try:
        path = download(args.name, Path(args.to), url_base=args.url_base, bpe_base=args.bpe_base,
                        bpe=not args.no_bpe, progress=not args.no_progress)
    except DownloadError as e:  # an unusable argument (found before any download): 2; a failed download: 1
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, DownloadArgumentError) else 1
    bpe_dir = Path(args.to) / "ofa-bpe"
    print("\nnext, adapt it to your categories (image-free; --device cuda on a GPU):\n  " + " ".join(
        ["python", "-m", "ifseg_rt", "adapt", "--checkpoint", shlex.quote(str(path)), "--bpe-dir",
         shlex.quote(str(bpe_dir)), "--categories", shlex.quote("sky, road, tree, person, car"), "--out",
         "runs/my-categories"]))
    return 0
