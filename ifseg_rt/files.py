"""File fingerprints shared by checkpoints, exports and model directories (a leaf module: stdlib only)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Dict, Union

WEIGHTS_FILE = "model.safetensors"  # the weights file of checkpoints written here, run directories, model directories
RUN_FILE = "run.json"  # an adaptation run directory's record (ifseg_rt.adapt.run writes it; export and eval read it)


def read_text(path: Union[str, Path], hint: str = "") -> str:
    """A UTF-8 text file's contents, without the byte-order mark some editors (Notepad) put first; ``ValueError``
    naming the file and line of the first byte that is not UTF-8 (``hint`` ends the message, e.g. what the file should
    hold)."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte {data[e.start]:#04x}){hint}") from None


def file_sha256(path: Union[str, Path], chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def file_record(path: Union[str, Path]) -> Dict[str, Any]:
    """``{"sha256": ..., "bytes": ...}`` of a file, as model directories list their files."""
    p = Path(path)
    return {"sha256": file_sha256(p), "bytes": p.stat().st_size}
