"""``python -m ifseg_rt download ofa-base``: the official English OFA checkpoints (and their BPE files) by name.

The embedded nano model only knows its synthetic world; a real photograph needs a real OFA checkpoint, adapted to
your categories (``python -m ifseg_rt adapt``). This command fetches one:

* names map to URLs in one registry (:data:`REGISTRY`; ``--url-base`` or ``IFSEG_RT_DOWNLOAD_BASE`` points at a
  mirror), the English checkpoints only — the Chinese OFA-CN files are the most reported failure of the original
  project (mIoU ~ 0 without an error);
* downloads resume (HTTP ``Range``) from ``<file>.part`` after an interruption, with a progress bar;
* on completion the size is checked against the server's, and the structure: the file must load as the named OFA
  size with the English vocabulary (``ifseg_rt.checkpoint``; needs torch) — a corrupt or wrong file is refused and
  moved aside;
* the OFA BPE files (``encoder.json``, ``vocab.bpe``, ``dict.txt``) go to ``<to>/ofa-bpe`` with their md5s checked;
* finally it prints the ``adapt`` command to run next.
"""

from __future__ import annotations

import hashlib
import os
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional


OFA_BASE_URL = "https://ofa-beijing.oss-cn-beijing.aliyuncs.com/checkpoints/"
BPE_BASE_URL = "https://raw.githubusercontent.com/OFA-Sys/OFA/main/utils/BPE/"
CHUNK = 1 << 20
TIMEOUT_S = 60


@dataclass(frozen=True)
class Checkpoint:
    file: str  # name on the server and on disk
    size: str  # ifseg_rt.model.MODEL_REGISTRY name the file must load as
    params: str  # for the listing


REGISTRY: Dict[str, Checkpoint] = {
    "ofa-tiny": Checkpoint("ofa_tiny.pt", "tiny", "33 M parameters"),
    "ofa-medium": Checkpoint("ofa_medium.pt", "medium", "93 M parameters"),
    "ofa-base": Checkpoint("ofa_base.pt", "base", "182 M parameters, the paper's IFSeg backbone"),
    "ofa-large": Checkpoint("ofa_large.pt", "large", "473 M parameters"),
    "ofa-huge": Checkpoint("ofa_huge.pt", "huge", "930 M parameters"),
}
BPE_FILES = {  # name -> md5 (ofa.md §3)
    "encoder.json": "dffec25a898b1f5e569bec4dffd7e5c0",
    "vocab.bpe": "75a37753dd7a28a2c5df80c28bf06e4e",
    "dict.txt": "e2d854270a441bce86e16be185c28761",
}


class DownloadError(RuntimeError):
    """A download that failed or produced a file that is not what was asked for."""


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def source_url(base: str, name: str) -> str:
    """``base``/``name`` as a URL: ``base`` is a URL (http, https, file) or a local folder (a mirror on disk)."""
    if "://" not in base:
        folder = Path(base).expanduser().resolve()
        if not folder.is_dir():
            raise DownloadError(f"mirror folder not found: {base} (give a URL or an existing folder)")
        return (folder / name).as_uri()
    return base.rstrip("/") + "/" + name


def fetch(url: str, dest: Path, *, progress: bool = True, opener=urllib.request.urlopen,
          hint: str = " (no network? use --url-base for a mirror)") -> Path:
    """Download ``url`` to ``dest`` through ``dest.part``, resuming a previous partial download; the result's size
    must equal what the server announced. Raises :class:`DownloadError` (the ``.part`` file is kept to resume);
    ``hint`` ends the message of a failed connection."""
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.is_file() else 0
    req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        resp = opener(req, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the part is already complete (or bigger than the file): start over
            part.unlink()
            return fetch(url, dest, progress=progress, opener=opener, hint=hint)
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise DownloadError(f"{url}: {getattr(e, 'reason', e)}{hint}") from None
    with resp:
        status = getattr(resp, "status", 200)
        if have and status != 206:  # the server ignored the range: start again
            have = 0
        length = resp.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        bar = _bar(total, have, dest.name) if progress else None
        try:
            with open(part, "ab" if have else "wb") as f:
                while True:
                    try:
                        block = resp.read(CHUNK)
                    except (OSError, ValueError) as e:  # connection reset / incomplete read
                        raise DownloadError(f"{url}: transfer interrupted after {f.tell()} bytes ({e}); run the "
                                            f"same command again to resume") from None
                    if not block:
                        break
                    f.write(block)
                    if bar is not None:
                        bar.update(len(block))
        finally:
            if bar is not None:
                bar.close()
    got = part.stat().st_size
    if total is not None and got != total:
        raise DownloadError(f"{url}: got {got} of {total} bytes (the transfer stopped early); run the same command "
                            f"again to resume")
    os.replace(part, dest)
    return dest


def _bar(total: Optional[int], initial: int, name: str):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, desc=name,
                file=sys.stderr, dynamic_ncols=True)


def check_structure(path: Path, size: str) -> str:
    """The file must load as OFA-``size`` with the English vocabulary; returns a one-line description."""
    try:
        from .checkpoint import CheckpointError, load_checkpoint
    except ImportError:
        return "structure not checked (torch is not installed: pip install 'ifseg_rt[train]')"
    try:
        ck = load_checkpoint(path)
    except (CheckpointError, OSError, ValueError) as e:
        raise DownloadError(f"{path} is not a usable OFA checkpoint: {e}") from None
    if ck.config.name != size:
        raise DownloadError(f"{path} holds an OFA model of dimensions {ck.config.to_dict()}, not OFA-{size}")
    return f"OFA-{size}, {ck.config.vocab_size}-symbol English vocabulary ({ck.source_format} format)"


def download(name: str, to: Path, *, url_base: Optional[str] = None, bpe_base: Optional[str] = None,
             bpe: bool = True, progress: bool = True, registry: Optional[Dict[str, Checkpoint]] = None,
             structure: Callable[[Path, str], str] = check_structure, log=print) -> Path:
    """Fetch checkpoint ``name`` (and the BPE files) into ``to``; returns the checkpoint's path."""
    registry = REGISTRY if registry is None else registry
    if name not in registry:
        raise DownloadError(f"unknown checkpoint {name!r}; choose one of {', '.join(registry)}")
    entry = registry[name]
    to = Path(to)
    if to.exists() and not to.is_dir():
        raise DownloadError(f"--to {to} is a file; give the folder to download into")
    base = url_base or os.environ.get("IFSEG_RT_DOWNLOAD_BASE") or OFA_BASE_URL
    hint = "" if url_base else " (no network? use --url-base for a mirror: a URL or a folder)"
    dest = to / entry.file
    if dest.is_file():
        log(f"{dest} exists: checking it")
    else:
        fetch(source_url(base, entry.file), dest, progress=progress, hint=hint)
    try:
        what = structure(dest, entry.size)
    except DownloadError:
        bad = dest.with_name(dest.name + ".corrupt")
        os.replace(dest, bad)
        raise
    log(f"{dest}: {dest.stat().st_size / 1e6:.1f} MB, {what}")
    if bpe:
        bpe_dir = to / "ofa-bpe"
        for fname, md5 in BPE_FILES.items():
            path = bpe_dir / fname
            if not path.is_file():
                fetch(source_url(bpe_base or os.environ.get("IFSEG_RT_BPE_BASE") or BPE_BASE_URL, fname), path,
                      progress=progress, hint="" if bpe_base else " (no network? use --bpe-base for a mirror)")
            got = _md5(path)
            if got != md5:
                os.replace(path, path.with_name(path.name + ".corrupt"))
                raise DownloadError(f"{path}: md5 {got}, expected {md5} (the OFA BPE file); moved aside, run again")
        log(f"{bpe_dir}: BPE files checked (md5)")
    return dest
