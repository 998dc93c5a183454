"""Shared helpers of the GPU check scripts (``benchmarks/gpu_*.py``, run one per step by ``benchmarks/gpu_check.sh``).

Every script takes ``--out DIR`` and ``--dry-run`` and records what it finds in a :class:`Report`: correctness
checks (a failed one fails the step), performance targets (met or missed: reported, never a failure), skipped parts
(with the reason), tables and notes. When the script ends, also through an exception, the report appends one JSON
line to ``DIR/steps.jsonl`` and a markdown section to ``DIR/report.md``; ``gpu_summary.py`` turns those into the
summary table. ``--dry-run`` walks the same code on the CPU at toy sizes and records the GPU parts as skipped, so
that the test suite (tests/test_gpu_check.py) keeps the scripts from rotting without a GPU.

Imports no torch: the scripts import it themselves (a dry run of some needs none).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

STEPS_FILE = "steps.jsonl"  # one JSON object per line: the scripts' reports and the shell's step records
REPORT_FILE = "report.md"  # the scripts' markdown sections, in step order
DEFAULT_OUT = "benchmarks/results/gpu_check"


def parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or DEFAULT_OUT,
                   help="folder for steps.jsonl and report.md (default: $OUT, else benchmarks/results/gpu_check)")
    p.add_argument("--dry-run", action="store_true",
                   help="walk the check on the CPU at toy sizes; the GPU parts are reported as skipped")
    return p


def fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        if v == 0 or 1e-3 <= abs(v) < 1e5:
            return f"{v:.4g}" if abs(v) < 100 else f"{v:.1f}"
        return f"{v:.2e}"
    return str(v)


class Report:
    """What one step found. Use as a context manager: an exception is recorded as a failed check, then re-raised."""

    def __init__(self, step: str, args: argparse.Namespace, title: str):
        self.step, self.title, self.dry = step, title, bool(args.dry_run)
        self.out = Path(args.out)
        self.items: List[Dict[str, Any]] = []  # {"kind": check|target|skip, "name", "ok", "detail"}
        self.tables: List[Dict[str, Any]] = []
        self.notes: List[str] = []
        self.facts: Dict[str, Any] = {}  # the numbers the summary line quotes
        self.summary = ""
        self.t0 = time.perf_counter()

    # --- recording ------------------------------------------------------------------------------------------
    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        """A correctness check: a failed one fails the step."""
        self.items.append({"kind": "check", "name": name, "ok": bool(ok), "detail": detail})
        print(f"[{self.step}] check {'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)
        return bool(ok)

    def target(self, name: str, met: bool, detail: str = "") -> bool:
        """A performance target (issue 18): reported as met or missed, never a failure."""
        self.items.append({"kind": "target", "name": name, "ok": bool(met), "detail": detail})
        print(f"[{self.step}] target {'met   ' if met else 'MISSED'} {name}: {detail}", flush=True)
        return bool(met)

    def skip(self, name: str, why: str) -> None:
        self.items.append({"kind": "skip", "name": name, "ok": None, "detail": why})
        print(f"[{self.step}] skipped {name}: {why}", flush=True)

    def table(self, title: str, rows: Sequence[Dict[str, Any]], columns: Optional[Sequence[str]] = None) -> None:
        rows = [dict(r) for r in rows]
        cols = list(columns or (rows[0].keys() if rows else []))
        self.tables.append({"title": title, "columns": cols, "rows": rows})

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"[{self.step}] {text}", flush=True)

    # --- result ---------------------------------------------------------------------------------------------
    @property
    def status(self) -> str:
        if any(i["kind"] == "check" and not i["ok"] for i in self.items):
            return "FAIL"
        if self.dry:
            return "skipped"  # a dry run verifies no GPU path: it only keeps the script walking
        if not any(i["kind"] == "check" for i in self.items):
            return "skipped"
        return "ok"

    def markdown(self) -> str:
        lines = [f"### {self.step}: {self.title}{' (dry run on the CPU)' if self.dry else ''}", ""]
        for i in self.items:
            mark = {"check": "ok" if i["ok"] else "**FAIL**", "target": "met" if i["ok"] else "**missed**",
                    "skip": "skipped"}[i["kind"]]
            lines.append(f"- {i['kind']} {mark}: {i['name']}" + (f" - {i['detail']}" if i["detail"] else ""))
        for t in self.tables:
            lines += ["", f"{t['title']}:", "", "| " + " | ".join(t["columns"]) + " |",
                      "|" + "---|" * len(t["columns"])]
            lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in t["columns"]) + " |" for r in t["rows"]]
        if self.notes:
            lines += [""] + [f"{n}" for n in self.notes]
        return "\n".join(lines) + "\n\n"

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        missed = sum(1 for i in self.items if i["kind"] == "target" and not i["ok"])
        rec = {"step": self.step, "kind": "report", "status": self.status, "dry_run": self.dry,
               "seconds": round(time.perf_counter() - self.t0, 1), "summary": self.summary,
               "targets_missed": missed, "facts": self.facts, "items": self.items, "tables": self.tables}
        with open(self.out / STEPS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec, default=str) + "\n")
        with open(self.out / REPORT_FILE, "a", encoding="utf-8") as f:
            f.write(self.markdown())

    def __enter__(self) -> "Report":
        return self

    def __exit__(self, typ, exc, tb) -> bool:
        if exc is not None:
            last = traceback.format_exception_only(typ, exc)[-1].strip()
            self.check("ran to the end", False, last[:400])
            self.summary = self.summary or f"crashed: {last[:160]}"
        self.write()
        return False

    def exit_code(self) -> int:
        return 1 if self.status == "FAIL" else 0


def run_main(main: Callable[[argparse.Namespace], Report], doc: str,
             extra: Optional[Callable[[argparse.ArgumentParser], None]] = None) -> None:
    """Parse the common arguments, run ``main`` and exit 1 when a check failed (or it raised)."""
    p = parser(doc)
    if extra is not None:
        extra(p)
    args = p.parse_args()
    try:
        rep = main(args)
    except Exception:  # already recorded by the Report's __exit__; the traceback goes to the log
        traceback.print_exc()
        sys.exit(1)
    sys.exit(rep.exit_code())


# --- measuring -------------------------------------------------------------------------------------------------
def timer(torch, on_gpu: bool):
    """``time(fn, repeats, warmup) -> median ms``: CUDA events on the GPU, perf_counter on the CPU."""
    def time_ms(fn, repeats: int = 20, warmup: int = 3) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            if on_gpu:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return float(np.median(times))

    return time_ms


def bf16_matmul_tflops(torch, n: int = 8192, repeats: int = 10) -> float:
    """The card's measured dense bf16 matrix rate (TFLOP/s): an n x n x n product on random data, median of CUDA
    events after warm-up (the ceiling the torch backend's throughput is compared with)."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = timer(torch, True)(lambda: a @ b, repeats=repeats, warmup=3)
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


def tie_free(rng, b: int, n: int, c: int, k: int, round_to: Callable[[np.ndarray], np.ndarray] = lambda f: f,
             gap: float = 2e-5) -> np.ndarray:
    """float32 features whose top-(k+1) cosine similarities (self excluded) differ by more than ``gap`` in every row
    after ``round_to`` (e.g. to bf16 and back): neighbour sets are then unambiguous for any summation order."""
    f = round_to(rng.standard_normal((b, n, c)).astype(np.float32))
    for _ in range(100):
        fn = f / np.maximum(np.linalg.norm(f, axis=-1, keepdims=True), 1e-12)
        sim = fn @ np.swapaxes(fn, -1, -2)
        sim[:, np.arange(n), np.arange(n)] = -np.inf
        top = -np.sort(-np.partition(sim, n - k, axis=-1)[..., n - k:], axis=-1) if k < n else -np.sort(-sim, -1)
        bad = (np.abs(np.diff(top, axis=-1)) <= gap).any(-1) if top.shape[-1] > 1 else np.zeros((b, n), bool)
        if not bad.any():
            return f
        f[bad] = round_to(rng.standard_normal((int(bad.sum()), c)).astype(np.float32))
    raise RuntimeError("could not draw tie-free features")


def model_flops(torch, forward: Callable[[], Any]) -> int:
    """FLOPs of one call (matmuls, convolutions, attention; torch's FlopCounterMode counts 2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        forward()
    return int(counter.get_total_flops())
