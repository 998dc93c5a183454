"""``python -m ifseg_rt download ofa-base``: the official English OFA checkpoints (and their BPE files) by name.

The embedded nano model only knows its synthetic world; a real photograph needs a real OFA checkpoint, adapted to
your categories (``python -m ifseg_rt adapt``). This command fetches one:

* names map to URLs in one registry (:data:`REGISTRY`; ``--url-base`` or ``IFSEG_RT_DOWNLOAD_BASE`` points at a
  mirror), the English checkpoints only — the Chinese OFA-CN files are the most reported failure of the original
  project (mIoU ~ 0 without an error);
* downloads resume (HTTP ``Range``) from ``<file>.part`` after an interruption, with a progress bar; the server's
  version of the file (``ETag``, else ``Last-Modified``) is kept in ``<file>.part.json`` and sent as ``If-Range``, and a
  resumed answer must continue at the held byte: a changed file or a server that does not honour the range starts over;
* on completion the size is checked against the server's, and the structure: the file must load as the named OFA
  size with the English vocabulary (``ifseg_rt.checkpoint``; needs torch) — a corrupt or wrong file is refused and
  moved aside;
* the OFA BPE files (``encoder.json``, ``vocab.bpe``, ``dict.txt``) go to ``<to>/ofa-bpe`` with their md5s checked;
* finally it prints the ``adapt`` command to run next.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import warnings
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


class DownloadArgumentError(DownloadError):
    """An unusable argument (mirror, destination folder), found before anything is downloaded."""


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def source_url(base: str, name: str, what: str = "mirror") -> str:
    """``base``/``name`` as a URL: ``base`` is a URL (http, https, file) or a local folder (a mirror on disk).
    Raises :class:`DownloadArgumentError` naming ``what`` (the argument ``base`` came from) if it is unusable."""
    if "://" not in base:
        folder = Path(base).expanduser().resolve()
        if not folder.is_dir():
            raise DownloadArgumentError(f"mirror folder not found: {what} {base} (give a URL or an existing folder)")
        return (folder / name).as_uri()
    bad = f"{what} {base!r} is not a usable URL"
    if re.search(r"[\x00-\x20\x7f]", base):
        raise DownloadArgumentError(f"{bad}: it contains spaces or control characters")
    try:
        parts = urllib.parse.urlsplit(base)
        parts.port  # noqa: B018 (raises ValueError for a port that is not a number or out of range)
    except ValueError as e:
        raise DownloadArgumentError(f"{bad}: {e}") from None
    if parts.scheme.lower() not in ("http", "https", "file"):
        raise DownloadArgumentError(f"{bad}: the scheme must be http, https or file (or give a local folder)")
    if parts.scheme.lower() != "file" and not parts.hostname:
        raise DownloadArgumentError(f"{bad}: it names no host")
    if parts.scheme.lower() == "file" and not Path(urllib.request.url2pathname(parts.path)).is_dir():
        raise DownloadArgumentError(f"mirror folder not found: {what} {base} (give a URL or an existing folder)")
    return base.rstrip("/") + "/" + name


def _note(msg: str) -> None:
    print(msg, file=sys.stderr)


def _read_record(path: Path) -> Optional[dict]:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _content_length(resp, url: str) -> Optional[int]:
    value = resp.headers.get("Content-Length")
    if value is None:
        return None
    if not value.strip().isdigit():
        raise DownloadError(f"{url}: the server sent a malformed Content-Length header ({value!r})")
    return int(value)


def _content_range(resp, length: Optional[int]):
    """``(start, total or None)`` of a 206 answer's ``Content-Range``, or ``None`` if it is missing or malformed."""
    m = re.fullmatch(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", (resp.headers.get("Content-Range") or "").strip())
    if m is None:
        return None
    start, end = int(m.group(1)), int(m.group(2))
    total = None if m.group(3) == "*" else int(m.group(3))
    if end < start or (total is not None and end >= total) or (length is not None and length != end - start + 1):
        return None
    return start, total


def _resume_problem(resp, have: int, length: Optional[int], record: dict) -> Optional[str]:
    """Why a 206 answer to ``Range: bytes=have-`` cannot be appended to the ``.part`` file, or ``None``."""
    rng = _content_range(resp, length)
    if rng is None:
        got = resp.headers.get("Content-Range")
        return "it sent no Content-Range" if got is None else f"its Content-Range {got!r} is malformed"
    if rng[0] != have:
        return f"it sent bytes from {rng[0]}, not from byte {have} as asked"
    if record.get("total") is not None and rng[1] is not None and rng[1] != record["total"]:
        return f"the file is now {rng[1]} bytes, not {record['total']}: it changed on the server"
    for key, header in (("etag", "ETag"), ("last_modified", "Last-Modified")):
        if record.get(key) and resp.headers.get(header):
            if record[key] != resp.headers[header]:
                return f"its {header} changed ({record[key]} -> {resp.headers[header]}): the file changed on the server"
            break  # the strongest validator both sides have decides
    return None


def fetch(url: str, dest: Path, *, progress: bool = True, opener=urllib.request.urlopen,
          hint: str = " (no network? use --url-base for a mirror)", log: Callable[[str], None] = _note,
          keep_unsized: bool = False, _restarted: bool = False) -> Path:
    """Download ``url`` to ``dest`` through ``dest.part``, resuming a previous partial download when the server's
    version of the file (kept in ``dest.part.json``) is unchanged; the result's size must equal what the server
    announced. Raises :class:`DownloadError` (the ``.part`` file is kept to resume); ``hint`` ends the message of a
    failed connection. With ``keep_unsized``, a file whose size the server did not announce stays ``dest.part`` (a
    transfer cut short cannot be told from a complete one): that path is returned, for the caller to check."""
    part = dest.with_name(dest.name + ".part")
    record_path = part.with_name(part.name + ".json")
    dest.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.is_file() and not _restarted else 0
    record = _read_record(record_path) if have else None
    headers = {}
    if have and record is None:
        log(f"note: {part} has no readable record of the server's version ({record_path.name}): downloading {url} "
            f"from the start")
        have = 0
    elif have:
        headers["Range"] = f"bytes={have}-"
        etag = record.get("etag")
        validator = etag if etag and not etag.startswith("W/") else record.get("last_modified")
        if validator:  # a changed file comes back whole (200), not as a range of the new one
            headers["If-Range"] = validator
    req = urllib.request.Request(url, headers=headers)
    try:
        resp = opener(req, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the part is already complete (or bigger than the file): start over
            log(f"note: {url} refused to resume at byte {have}: downloading it from the start")
            return fetch(url, dest, progress=progress, opener=opener, hint=hint, log=log, keep_unsized=keep_unsized,
                         _restarted=True)
        raise DownloadError(f"{url}: HTTP {e.code} {' '.join(str(e.reason).split())}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        raise DownloadError(f"{url}: {getattr(e, 'reason', None) or e}{hint}") from None
    with resp:
        status = getattr(resp, "status", None) or 200  # file:// answers have no status
        length = _content_length(resp, url)
        if have and status == 206:
            why = _resume_problem(resp, have, length, record)
            if why is not None:  # the body is not the rest of the .part: ask for the whole file
                log(f"note: cannot resume {url} at byte {have}: {why}; downloading it from the start")
                resp.close()
                return fetch(url, dest, progress=progress, opener=opener, hint=hint, log=log,
                             keep_unsized=keep_unsized, _restarted=True)
            total = _content_range(resp, length)[1]
            total = record.get("total") if total is None else total
        else:
            if have:
                log(f"note: {url} sent the whole file, not the rest from byte {have} (it changed, or the server "
                    f"does not resume): downloading it from the start")
                have = 0
            total = length
            if status == 206:  # a range nobody asked for
                rng = _content_range(resp, length)
                if rng is None or rng[0] != 0:
                    raise DownloadError(f"{url}: the server answered a request for the whole file with a part of "
                                        f"it (Content-Range {resp.headers.get('Content-Range')!r})")
                total = rng[1]
            try:
                record_path.write_text(json.dumps({"url": url, "etag": resp.headers.get("ETag"), "last_modified":
                                                   resp.headers.get("Last-Modified"), "total": total}),
                                       encoding="utf-8")
            except OSError as e:
                raise DownloadError(f"cannot write {record_path}: {e.strerror or e}") from None
        bar = _bar(total, have, dest.name) if progress else None
        try:
            try:
                f = open(part, "ab" if have else "wb")
            except OSError as e:
                raise DownloadError(f"cannot write {part}: {e.strerror or e}") from None
            with f:
                while True:
                    try:
                        block = resp.read(CHUNK)
                    except (OSError, ValueError, http.client.HTTPException) as e:  # reset / incomplete read
                        if isinstance(e, http.client.IncompleteRead) and e.partial:  # whole chunks read before
                            f.write(e.partial)
                        raise DownloadError(f"{url}: the transfer was cut short after {f.tell()} bytes ("
                                            f"{type(e).__name__}: {e}); run the same command again to resume") from None
                    if not block:
                        break
                    try:
                        f.write(block)
                    except OSError as e:
                        raise DownloadError(f"cannot write {part}: {e.strerror or e}") from None
                    if bar is not None:
                        bar.update(len(block))
        finally:
            if bar is not None:
                bar.close()
    got = part.stat().st_size
    if total is not None and got < total:
        raise DownloadError(f"{url}: got {got} of {total} bytes (the transfer was cut short); run the same command "
                            f"again to resume")
    if total is not None and got > total:
        part.unlink()
        raise DownloadError(f"{url}: got {got} bytes, more than the {total} announced; removed {part}, run the same "
                            f"command again")
    if total is None and keep_unsized:
        return part
    os.replace(part, dest)
    record_path.unlink(missing_ok=True)
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
        with warnings.catch_warnings():  # torch's notes on old pickle protocols: the check below says what matters
            warnings.filterwarnings("ignore", message=r"(detected pickle protocol|.*weights_only)",
                                    category=UserWarning, module=r"torch(\.|$)")
            ck = load_checkpoint(path)
    except (CheckpointError, OSError, ValueError) as e:
        raise DownloadError(f"{path} is not a usable OFA checkpoint: {e}") from None
    if ck.config.name != size:
        raise DownloadError(f"{path} holds an OFA model of dimensions {ck.config.to_dict()}, not OFA-{size}")
    return f"OFA-{size}, {ck.config.vocab_size}-symbol English vocabulary ({ck.source_format} format)"


def _check_folder(to: Path, files) -> None:
    """``to`` must be (or become) a writable folder, and ``files`` (to be written) must not be folders."""
    if to.exists() and not to.is_dir():
        raise DownloadArgumentError(f"--to {to} is a file; give the folder to download into")
    try:
        to.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=to, prefix=".ifseg-rt-write-test-"):
            pass
    except OSError as e:
        raise DownloadArgumentError(f"--to {to} is not a writable folder ({e.strerror or e})") from None
    for path in files:
        if path.parent.exists() and not path.parent.is_dir():
            raise DownloadArgumentError(f"{path.parent} is a file, but the download needs a folder of that name: "
                                        f"move it away or choose another --to")
        if path.is_dir():
            raise DownloadArgumentError(f"{path} is a folder, but the download is saved under that name: move it "
                                        f"away or choose another --to")


def download(name: str, to: Path, *, url_base: Optional[str] = None, bpe_base: Optional[str] = None,
             bpe: bool = True, progress: bool = True, registry: Optional[Dict[str, Checkpoint]] = None,
             structure: Callable[[Path, str], str] = check_structure, log=print) -> Path:
    """Fetch checkpoint ``name`` (and the BPE files) into ``to``; returns the checkpoint's path."""
    registry = REGISTRY if registry is None else registry
    if name not in registry:
        raise DownloadArgumentError(f"unknown checkpoint {name!r}; choose one of {', '.join(registry)}")
    entry = registry[name]
    to = Path(to)
    # every argument is checked before anything is downloaded (DownloadArgumentError)
    env = os.environ.get("IFSEG_RT_DOWNLOAD_BASE")
    url = source_url(url_base or env or OFA_BASE_URL, entry.file,
                     "--url-base" if url_base else "IFSEG_RT_DOWNLOAD_BASE" if env else "the default mirror")
    bpe_dir = to / "ofa-bpe"
    bpe_urls: Dict[str, str] = {}
    if bpe:
        env = os.environ.get("IFSEG_RT_BPE_BASE")
        what = "--bpe-base" if bpe_base else "IFSEG_RT_BPE_BASE" if env else "the default BPE mirror"
        bpe_urls = {fname: source_url(bpe_base or env or BPE_BASE_URL, fname, what) for fname in BPE_FILES}
    dest = to / entry.file
    _check_folder(to, [dest, dest.with_name(dest.name + ".part")] + ([bpe_dir / f for f in BPE_FILES] if bpe else []))
    hint = "" if url_base else " (no network? use --url-base for a mirror: a URL or a folder)"
    fetched = dest
    if dest.is_file():
        log(f"{dest} exists: checking it")
    else:
        fetched = fetch(url, dest, progress=progress, hint=hint, keep_unsized=True)
    if fetched != dest:  # the server announced no size: a transfer cut short looks complete, so check before renaming
        try:
            what = structure(fetched, entry.size)
        except DownloadError as e:
            raise DownloadError(f"{url}: the server did not announce the file's size, and the "
                                f"{fetched.stat().st_size} bytes received are not a usable checkpoint ({e}): the "
                                f"transfer was probably cut short; {fetched} is kept, run the same command again to "
                                f"resume") from None
        os.replace(fetched, dest)
        fetched.with_name(fetched.name + ".json").unlink(missing_ok=True)
    else:
        try:
            what = structure(dest, entry.size)
        except DownloadError:
            bad = dest.with_name(dest.name + ".corrupt")
            os.replace(dest, bad)
            raise
    log(f"{dest}: {dest.stat().st_size / 1e6:.1f} MB, {what}")
    if bpe:
        for fname, md5 in BPE_FILES.items():
            path = bpe_dir / fname
            if not path.is_file():
                fetch(bpe_urls[fname], path, progress=progress,
                      hint="" if bpe_base else " (no network? use --bpe-base for a mirror)")
            got = _md5(path)
            if got != md5:
                os.replace(path, path.with_name(path.name + ".corrupt"))
                raise DownloadError(f"{path}: md5 {got}, expected {md5} (the OFA BPE file); moved aside, run again")
        log(f"{bpe_dir}: BPE files checked (md5)")
    return dest
