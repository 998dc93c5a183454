"""What every benchmark script does with its result: print it as JSON and, with ``--json PATH``, write it there."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional


def emit(result: Any, json_path: Optional[str] = None) -> None:
    text = json.dumps(result, indent=2)
    print(text)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(text + "\n", encoding="utf-8")
