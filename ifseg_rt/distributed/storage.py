"""Where :mod:`ifseg_rt.distributed` reads and writes: local folders or URIs (``pyarrow.fs``), the per-image Parquet
table and its schema."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Dict, Sequence

from ..runtime.inputs import is_uri, split_uri
from ..runtime.outputs import ImageRecord, OutputDir
from ..runtime.segmenter import STAGES



class ArrowOutputDir:
    """An output folder on a filesystem pyarrow supports (``s3://``, ``gs://``, ``hdfs://``, ``file://`` ...), with
    the interface of :class:`~ifseg_rt.runtime.outputs.OutputDir`; objects are written whole."""

    def __init__(self, uri: str):
        self.uri = uri.rstrip("/")
        self.fs, self.path, _, _ = split_uri(self.uri)

    def __str__(self) -> str:
        return self.uri

    def _p(self, name: str) -> str:
        return f"{self.path.rstrip('/')}/{name}"

    def exists(self, name: str) -> bool:
        from pyarrow import fs as pafs

        return self.fs.get_file_info(self._p(name)).type == pafs.FileType.File

    def read(self, name: str) -> bytes:
        with self.fs.open_input_stream(self._p(name)) as f:
            return f.read()

    def write(self, name: str, data: bytes) -> None:
        with self.fs.open_output_stream(self._p(name)) as f:
            f.write(data)


def output_dir(root: str):
    """:class:`ArrowOutputDir` for a URI, :class:`~ifseg_rt.runtime.outputs.OutputDir` for a local folder."""
    return ArrowOutputDir(root) if is_uri(root) else OutputDir(root)


def fetch(uri: str, folder: str, k: int) -> str:
    """Copy a remote image into ``folder`` (so that it is read exactly like a local file); -> the local path."""
    filesystem, path, _, _ = split_uri(uri)
    local = os.path.join(folder, f"{k}{Path(path).suffix}")
    with filesystem.open_input_stream(path) as f, open(local, "wb") as g:
        shutil.copyfileobj(f, g)
    return local


def table_schema(categories: Sequence[str]):
    """The Parquet table of a run, one row per input image:

    ``index`` (position in the input list), ``path`` (as given), ``name`` (outputs ``<name>.png`` ...), ``height``,
    ``width`` (original size), ``pixels_<category>`` (pixels per category, one column each), ``<stage>_ms`` for the
    stages of :data:`~ifseg_rt.runtime.segmenter.STAGES` (null when skipped), ``skipped`` (outputs existed; counts
    read back from the label map), ``error`` (why it failed, naming the file; null when it did not). The categories
    are also in the schema metadata (``ifseg_rt.categories``, JSON)."""
    import pyarrow as pa

    fields = [("index", pa.int64()), ("path", pa.string()), ("name", pa.string()), ("height", pa.int32()),
              ("width", pa.int32())]
    fields += [(f"pixels_{c}", pa.int64()) for c in categories]
    fields += [(f"{s}_ms", pa.float64()) for s in STAGES]
    fields += [("skipped", pa.bool_()), ("error", pa.string())]
    return pa.schema(fields, metadata={"ifseg_rt.categories": json.dumps(list(categories))})


def records_table(records: Sequence[ImageRecord], categories: Sequence[str]):
    """:class:`~ifseg_rt.runtime.outputs.ImageRecord` s -> rows of :func:`table_schema`."""
    import pyarrow as pa

    schema = table_schema(categories)
    cols: Dict[str, list] = {name: [] for name in schema.names}
    for r in records:
        cols["index"].append(r.index)
        cols["path"].append(r.source)
        cols["name"].append(r.name)
        size = r.original_size or (None, None)
        cols["height"].append(size[0])
        cols["width"].append(size[1])
        for c, name in enumerate(categories):
            cols[f"pixels_{name}"].append(None if r.pixel_counts is None else int(r.pixel_counts[c]))
        for s in STAGES:
            cols[f"{s}_ms"].append(None if r.timings is None else float(r.timings.get(s, 0.0)))
        cols["skipped"].append(r.skipped)
        cols["error"].append(r.error)
    return pa.table(cols, schema=schema)


def join_path(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}" if is_uri(root) else str(Path(root) / name)


def absolute_path(path) -> str:
    """Local paths made absolute on the driver (workers do not share its working directory); URIs as they are."""
    return str(path) if is_uri(str(path)) else str(Path(path).absolute())


class TableWriter:
    """One Parquet file, written block by block; a local file appears (renamed from a hidden temporary) only when
    complete."""

    def __init__(self, path: str, schema):
        self.path, self.schema = path, schema

    def __enter__(self):
        import pyarrow.parquet as pq

        if is_uri(self.path):
            filesystem, p, _, _ = split_uri(self.path)
            self.tmp = None
            self.writer = pq.ParquetWriter(p, self.schema, filesystem=filesystem)
        else:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self.tmp = str(Path(self.path).with_name(f".{Path(self.path).name}.{os.getpid()}.tmp"))
            self.writer = pq.ParquetWriter(self.tmp, self.schema)
        return self

    def write(self, table) -> None:
        self.writer.write_table(table)

    def __exit__(self, exc_type, *exc):
        self.writer.close()
        if self.tmp is not None:
            if exc_type is None:
                os.replace(self.tmp, self.path)
            else:
                os.unlink(self.tmp)
