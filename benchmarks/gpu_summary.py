"""The summary of a GPU check run (the last act of benchmarks/gpu_check.sh, also on an early exit): one table row per
step from ``steps.jsonl`` (the shell's record of each step - exit status, time, time-out - and the step script's
report), the performance targets met and missed, what stays unverified, then the steps' details from ``report.md``.
Writes ``summary.md`` and prints it. Exit status 1 when a step failed, timed out, was interrupted or did not run
for lack of time.

    python3 benchmarks/gpu_summary.py --out benchmarks/results/gpu_check
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

from gpu_common import DEFAULT_OUT, REPORT_FILE, STEPS_FILE

SUMMARY_FILE = "summary.md"
BAD = ("FAIL", "TIMEOUT", "INTERRUPTED", "NOT RUN", "no record")  # statuses that make the check fail
UNVERIFIED = ("TensorRT (not installed on the GPU machine: export/tensorrt.py and runtime/backends/tensorrt.py are "
              "checked only with fakes) and onnxruntime's CUDA provider (only the CPU-only onnxruntime is there) "
              "stay unverified; so do Triton serving and Ray on CUDA (nvidia-pytriton and ray are not there either: "
              "both wrap a Segmenter, whose CUDA path the e2e step checks).")


def read_steps(path: Path):
    steps = {}  # step -> {"shell": record, "report": record}, in order of first appearance
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            steps.setdefault(rec.get("step", "?"), {})[rec.get("kind", "shell")] = rec
    return steps


def row(name, recs):
    shell, report = recs.get("shell"), recs.get("report")
    secs = (shell or report or {}).get("seconds")
    summary = (report or {}).get("summary", "")
    if shell is not None and (report is None or shell["status"] in ("TIMEOUT", "INTERRUPTED", "NOT RUN", "skipped")):
        status = shell["status"] if shell["status"] != "FAIL" else f"FAIL (exit {shell.get('rc')})"
        result = "; ".join(x for x in (shell.get("note", ""), summary) if x)
    elif report is not None:
        status, result = report["status"], summary
        if status != "FAIL" and shell is not None and shell.get("rc", 0) != 0:
            status = f"FAIL (exit {shell['rc']})"
        missed = report.get("targets_missed", 0)
        if missed:
            status += f", {missed} target{'s' if missed > 1 else ''} missed"
    else:
        status, result = "no record", ""
    return {"step": name, "status": status, "seconds": secs, "result": result}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or DEFAULT_OUT, help="the check's output folder")
    p.add_argument("--mode", default="", help="a line saying how the check was run")
    args = p.parse_args(argv)
    out = Path(args.out)
    steps = read_steps(out / STEPS_FILE)
    rows = [row(name, recs) for name, recs in steps.items()]
    bad = [r["step"] for r in rows if r["status"].startswith(BAD)]
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"## GPU check, {now}", ""]
    if args.mode:
        lines += [args.mode, ""]
    lines += ["| step | status | s | result |", "|---|---|---|---|"]
    for r in rows:
        secs = "" if r["seconds"] is None else f"{float(r['seconds']):.0f}"
        lines.append(f"| {r['step']} | {r['status']} | {secs} | {str(r['result']).replace('|', '/')} |")
    targets = [(name, i) for name, recs in steps.items() for i in (recs.get("report") or {}).get("items", [])
               if i.get("kind") == "target"]
    if targets:
        lines += ["", "Targets (issue 18):", ""]
        lines += [f"- {'met' if i['ok'] else '**missed**'}: {name}: {i['name']} ({i['detail']})" for name, i in targets]
    lines += ["", ("All steps passed." if not bad else f"**Failed: {', '.join(bad)}.**") + " " + UNVERIFIED, ""]
    details = out / REPORT_FILE
    if details.is_file():
        lines += ["### Details", "", details.read_text(encoding="utf-8")]
    text = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    (out / SUMMARY_FILE).write_text(text, encoding="utf-8")
    print("\n".join(lines[: lines.index("### Details")] if "### Details" in lines else lines))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
