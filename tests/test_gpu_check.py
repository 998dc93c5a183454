"""benchmarks/gpu_check.sh: its dry run walks every step on the CPU (GPU parts reported as skipped) and leaves its
summary in $OUT, so that the one prepared GPU check cannot rot between GPU sessions; a spent time budget, a failed
or timed-out step and an interruption still leave a summary and fail the run."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
STEPS = ["env", "build", "knn", "resize", "e2e", "adapt", "tests"]
GPU_ONLY = {"build", "tests"}

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def _env(out: Path, **extra) -> dict:
    # the interpreter running the tests, and no GPU even where there is one: the dry run must not need it
    return {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": "", **extra}


def _records(out: Path):
    recs = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    return ({r["step"]: r for r in recs if r["kind"] == "shell"},
            {r["step"]: r for r in recs if r["kind"] == "report"})


def test_dry_run_walks_every_step(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=tmp_path, env=_env(out), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    shell, reports = _records(out)
    assert list(shell) == STEPS
    assert {s for s, r in shell.items() if r["status"] == "skipped" and r["rc"] == 0} == GPU_ONLY
    assert all(r["status"] == "ok" for s, r in shell.items() if s not in GPU_ONLY)
    assert set(reports) == set(STEPS) - GPU_ONLY
    for name, rep in reports.items():
        assert rep["dry_run"] and rep["status"] == "skipped", name
        assert any(i["kind"] == "skip" for i in rep["items"]), f"{name} reports no GPU part as skipped"
        assert all(i["ok"] for i in rep["items"] if i["kind"] == "check"), rep["items"]
    assert sum(1 for i in reports["knn"]["items"] if i["kind"] == "check") >= 2  # the CPU walk checked something
    summary = (out / "summary.md").read_text()
    for name in STEPS:
        assert f"| {name} | skipped |" in summary
    assert "All steps passed." in summary and "TensorRT" in summary and "onnxruntime" in summary
    assert "### knn" in summary and (out / "report.md").is_file()
    assert "== [e2e]" in (out / "gpu_check.log").read_text()


def test_spent_budget_and_bad_arguments(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=tmp_path, capture_output=True, text=True,
                          env=_env(out, GPU_CHECK_BUDGET_S="0"), timeout=120)
    assert proc.returncode == 1, proc.stdout[-3000:]
    shell, reports = _records(out)
    assert not reports and {s for s, r in shell.items() if r["status"] == "NOT RUN"} == set(STEPS) - GPU_ONLY
    summary = (out / "summary.md").read_text()
    assert "| knn | NOT RUN |" in summary and "**Failed: env, knn, resize, e2e, adapt.**" in summary
    proc = subprocess.run(["bash", str(SCRIPT), "--bogus"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "usage" in proc.stderr


def test_summary_of_failures(tmp_path):
    lines = [{"step": "knn", "kind": "report", "status": "ok", "summary": "fast", "targets_missed": 1,
              "items": [{"kind": "target", "name": ">= 3x", "ok": False, "detail": "2.1x"}], "seconds": 3},
             {"step": "knn", "kind": "shell", "status": "ok", "rc": 0, "seconds": 4, "note": ""},
             {"step": "e2e", "kind": "report", "status": "ok", "summary": "", "items": [], "seconds": 9},
             {"step": "e2e", "kind": "shell", "status": "FAIL", "rc": 3, "seconds": 9, "note": "exit status 3"},
             {"step": "adapt", "kind": "shell", "status": "TIMEOUT", "rc": 124, "seconds": 60, "note": "no result"}]
    (tmp_path / "steps.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_summary.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    summary = (tmp_path / "summary.md").read_text()
    assert "| knn | ok, 1 target missed | 4 | fast |" in summary
    assert "| e2e | FAIL (exit 3) |" in summary and "| adapt | TIMEOUT | 60 | no result |" in summary
    assert "- **missed**: knn: >= 3x (2.1x)" in summary and "**Failed: e2e, adapt.**" in summary


def test_interrupted_run_still_leaves_a_summary(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "out"
    proc = subprocess.Popen(["bash", str(SCRIPT), "--dry-run"], cwd=tmp_path, env=_env(out),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        log = out / "gpu_check.log"
        for _ in range(600):  # until the knn step runs
            if log.is_file() and "== [knn]" in log.read_text():
                break
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    shell, _ = _records(out)
    assert "INTERRUPTED" in {r["status"] for r in shell.values()}
    assert "INTERRUPTED" in (out / "summary.md").read_text()
