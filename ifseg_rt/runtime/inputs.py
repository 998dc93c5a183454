"""The image list of ``python -m ifseg_rt segment``: folders, files, globs and list files, in a fixed order.

Both the single-process command and the Ray path (:mod:`ifseg_rt.distributed`) list their inputs here, so the same
arguments always give the same list, hence the same output names (:func:`~ifseg_rt.runtime.outputs.output_names`).

* a folder: its image files (:data:`~ifseg_rt.runtime.preprocess.IMAGE_EXTENSIONS`), sorted by name, not recursive;
* an image file: itself;
* a glob (``photos/*/img_*.jpg``, ``**`` recursive): its matching image files, sorted;
* a list file (``.txt`` / ``.lst``): one image path or URI per line, relative paths taken from the list file's
  folder, blank lines and ``#`` comments skipped; entries are not checked here (a missing one fails on its own);
* a URI (``s3://bucket/photos``, ``gs://...``, ``file:///...``; only where remote inputs are allowed, i.e. on Ray):
  a folder, an object, or a glob in the last path component, listed through :mod:`pyarrow.fs`.

Torch-free; pyarrow is imported for URIs only.
"""

from __future__ import annotations

import fnmatch
import glob
import re
from pathlib import Path
from typing import List, Optional, Sequence, Tuple
from urllib.parse import unquote, urlparse

from ..files import read_text
from .preprocess import IMAGE_EXTENSIONS

LIST_SUFFIXES = (".txt", ".lst")  # files holding one image path or URI per line
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
_MAGIC = re.compile(r"[*?[]")


def is_uri(text: str) -> bool:
    """``scheme://...`` (s3, gs, hdfs, file, ...)."""
    return bool(_URI.match(str(text)))


def list_images(inputs: Sequence[str], *, allow_uris: bool = False) -> List[str]:
    """The images named by ``inputs``, in order (see the module docstring).

    Raises
    ------
    FileNotFoundError naming an input that does not exist (or a glob that matches no image); ValueError for a URI
    where ``allow_uris`` is False and for an empty result
    """
    out: List[str] = []
    for item in inputs:
        item = str(item)
        if is_uri(item):
            if not allow_uris:
                raise ValueError(f"{item}: remote inputs are read on Ray workers; add --ray (pyarrow reads them)")
            out += _list_uri(item)
        elif _MAGIC.search(item) and not Path(item).exists():
            found = sorted(p for p in glob.glob(item, recursive=True)
                           if Path(p).suffix.lower() in IMAGE_EXTENSIONS and Path(p).is_file())
            if not found:
                raise FileNotFoundError(f"no images match {item}")
            out += found
        else:
            p = Path(item)
            if p.is_dir():
                found = [str(q) for q in sorted(q for q in p.iterdir()
                                                if q.suffix.lower() in IMAGE_EXTENSIONS and q.is_file())]
                subdirs = sorted(q.name for q in p.iterdir() if q.is_dir())
                if not found and subdirs:  # folders are not searched recursively: say how to include them
                    raise ValueError(f"{p} holds no images, only folders ({', '.join(subdirs[:3])}"
                                     f"{', ...' if len(subdirs) > 3 else ''}); give those folders, or a recursive glob "
                                     f"such as '{p / '**' / '*.jpg'}'")
                out += found
            elif p.is_file() and p.suffix.lower() in LIST_SUFFIXES:
                out += read_list_file(p, allow_uris=allow_uris)
            elif p.is_file():
                out.append(str(p))
            else:
                raise FileNotFoundError(f"input not found: {p}")
    if not out:
        raise ValueError("no images found in the inputs")
    return out


def local_path(item) -> Optional[Path]:
    """The absolute local path of a path or ``file://`` URI; None for other URIs (remote storage)."""
    text = str(item)
    if is_uri(text):
        parsed = urlparse(text)
        if parsed.scheme.lower() != "file" or parsed.netloc not in ("", "localhost"):
            return None
        text = unquote(parsed.path)
    return Path(text).resolve()


def check_outputs_apart(inputs: Sequence[str], out_dir, table=None) -> None:
    """Refuse an output folder that holds (or is) one of the local ``inputs`` (paths or ``file://`` URIs): its outputs
    could overwrite an input (``photo.png`` -> ``photo.png``), and a re-run would take its own outputs for inputs; and
    a ``table`` (segment --ray's Parquet file) that is an input or does not end in ``.parquet``. Raises ``ValueError``
    naming the first such input."""
    root = local_path(out_dir)
    sheet = local_path(table) if table is not None else None
    if table is not None and not str(table).partition("?")[0].lower().endswith(".parquet"):
        raise ValueError(f"--table {table}: the table is a Parquet file; give a name ending in .parquet (any other "
                         f"file of that name would be replaced)")
    for item in inputs:
        p = local_path(item)
        if p is None:
            continue
        if root is not None and (p == root or root in p.parents):
            raise ValueError(f"--out {out_dir} holds the input {item}: its outputs would overwrite inputs and a "
                             f"re-run would segment its own outputs; choose an output folder outside the inputs, "
                             f"e.g. --out {Path(str(out_dir)).name or 'out'}-labels next to it")
        if sheet is not None and p == sheet:
            raise ValueError(f"--table {table} is the input {item}: the table would replace it")


def read_list_file(path: Path, *, allow_uris: bool = False) -> List[str]:
    """One image path or URI per line; relative paths are relative to the list file's folder."""
    out = []
    text = read_text(path, "; a list file holds one image path per line, saved as UTF-8")
    for n, line in enumerate(text.splitlines(), 1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        if is_uri(entry):
            if not allow_uris:
                raise ValueError(f"{path}:{n}: {entry} is a remote input; add --ray to read it on Ray workers")
            out.append(entry)
        else:
            p = Path(entry)
            out.append(str(p if p.is_absolute() else Path(path).parent / p))
    return out


# --- URIs (pyarrow.fs) -------------------------------------------------------------------------------------------
def split_uri(uri: str) -> Tuple[object, str, str, str]:
    """-> (pyarrow filesystem, path inside it, URI prefix, query): ``prefix + path + query`` rebuilds the URI."""
    from pyarrow import fs as pafs

    base, sep, query = uri.partition("?")
    filesystem, path = pafs.FileSystem.from_uri(uri)
    stripped = base.rstrip("/")
    if not stripped.endswith(path.rstrip("/")):
        raise ValueError(f"{uri}: cannot tell the path inside the filesystem ({path}) from the URI")
    prefix = stripped[:len(stripped) - len(path.rstrip("/"))]
    return filesystem, path.rstrip("/") or path, prefix, sep + query


def _list_uri(uri: str) -> List[str]:
    from pyarrow import fs as pafs

    base, sep, query = uri.partition("?")
    head, _, last = base.rstrip("/").rpartition("/")
    pattern = None
    if _MAGIC.search(last):  # a glob in the last component: list its folder, match the names
        pattern, base = last, head
    filesystem, path, prefix, query = split_uri(base + sep + query)
    info = filesystem.get_file_info(path)
    if info.type == pafs.FileType.File and pattern is None:
        return [uri]
    if info.type != pafs.FileType.Directory:
        raise FileNotFoundError(f"input not found: {uri}")
    entries = filesystem.get_file_info(pafs.FileSelector(path, recursive=False))
    found = sorted(e.path for e in entries if e.type == pafs.FileType.File
                   and Path(e.base_name).suffix.lower() in IMAGE_EXTENSIONS
                   and (pattern is None or fnmatch.fnmatchcase(e.base_name, pattern)))
    if not found and pattern is not None:
        raise FileNotFoundError(f"no images match {uri}")
    return [prefix + p + query for p in found]
