#!/usr/bin/env bash
# The one prepared GPU check (issues 17 and 18): builds the CUDA extension from this working tree, checks every CUDA
# path against its CPU reference and times it, in at most ~6 minutes, on a machine with no network.
#
#   bash benchmarks/gpu_check.sh              # on the GPU machine, from anywhere in the repository
#   bash benchmarks/gpu_check.sh --dry-run    # on any CPU machine: the same steps, GPU parts reported as skipped
#                                             # (run by tests/test_gpu_check.py, so the script cannot rot)
#
# Steps (each under its own `timeout`, all within GPU_CHECK_BUDGET_S; a step that fails does not stop the others):
#   env     card, driver, nvcc, package versions; which engines stay unverified     benchmarks/gpu_env.py
#   build   pip install --no-build-isolation --no-deps --no-index -e . with IFSEG_CUDA=ON for
#           $IFSEG_CUDA_ARCHITECTURES only (default 90: the H200), build dir build-gpu/; CMake directly if pip fails
#   knn     CUDA kNN, compiled + NVRTC, fp32/fp16/bf16, vs the CPU reference; speed vs torch  gpu_knn_check.py
#   resize  fused resize + arg-max, CUDA vs CPU kernel; speed                            gpu_resize_check.py
#   e2e     blocked attention (no S x S tables) = materialised biases on CUDA, peak memory at 512^2 and 512x2048;
#           torch backend fp32/bf16/fp16 +- CUDA graphs, labels vs fp32, throughput vs the bf16 matmul rate,
#           Segmenter's CUDA post-processing vs the CPU one, kNN share of the engine time  gpu_e2e_check.py
#   adapt   one word-grid adaptation step, OFA-base, batch 16, bf16; 2 self-training steps gpu_adapt_check.py
#   tests   the test suite's requires_cuda tests
#
# Output, written to $OUT as it goes (default benchmarks/results/gpu_check): gpu_check.log (everything printed),
# steps.jsonl (one record per step from the shell, one report per check script), report.md (the checks' details),
# summary.md (the table, written on any exit by the EXIT trap). Exit status 0 when no step failed or timed out.
# Needs python3 with torch (CUDA), CuPy, pybind11, scikit-build-core, cmake, nvcc; installs nothing.
set -u -o pipefail

DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  --build) MODE=build ;;
  "") ;;
  *) echo "usage: bash benchmarks/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
PY=${PYTHON:-python3}
ARCH=${IFSEG_CUDA_ARCHITECTURES:-90}
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

# --- the build step (run through this script again, under the step's timeout) ---------------------------------------
if [ "${MODE:-}" = build ]; then
  export IFSEG_CUDA=ON CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)"
  check_ext() {
    "$PY" -c "from ifseg_rt import _C; assert _C.with_cuda, 'built without CUDA'; print('built', _C.__file__)"
  }
  if "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . -Cbuild-dir=build-gpu \
       -Ccmake.define.IFSEG_CUDA_ARCHITECTURES="$ARCH" && check_ext; then
    exit 0
  fi
  echo "== pip could not build the extension; building it with CMake directly into build-gpu/cmake"
  version=$("$PY" -c "import tomllib; print(tomllib.load(open('pyproject.toml', 'rb'))['project']['version'])") &&
  cmake -S . -B build-gpu/cmake -DCMAKE_BUILD_TYPE=Release -DIFSEG_CUDA=ON -DIFSEG_CUDA_ARCHITECTURES="$ARCH" \
    -DSKBUILD_PROJECT_VERSION="$version" -DPython_EXECUTABLE="$(command -v "$PY")" \
    -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" &&
  cmake --build build-gpu/cmake -j "$(nproc)" &&
  cp build-gpu/cmake/_C*.so ifseg_rt/ &&   # ignored by git; found through PYTHONPATH=$ROOT
  check_ext
  exit $?
fi

# --- the check -------------------------------------------------------------------------------------------------------
OUT=${OUT:-$ROOT/benchmarks/results/gpu_check}
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
export OUT
rm -f "$OUT/gpu_check.log" "$OUT/steps.jsonl" "$OUT/report.md" "$OUT/summary.md"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-330}   # whole run <= 6 min: the summary and the transfers need the rest
DEADLINE=$((START + BUDGET))
CURRENT="" CHILD="" CURRENT_T0=0

record() {  # step status rc seconds note (the note holds no quotes)
  printf '{"step": "%s", "kind": "shell", "status": "%s", "rc": %s, "seconds": %s, "note": "%s"}\n' \
    "$1" "$2" "$3" "$4" "$5" >> "$OUT/steps.jsonl"
}

finish() {  # on any exit: record an interrupted step, copy what exists, write the summary
  local rc=$?
  trap - EXIT INT TERM
  if [ -n "$CURRENT" ]; then
    [ -n "$CHILD" ] && kill -TERM "$CHILD" 2>/dev/null
    record "$CURRENT" INTERRUPTED "$rc" $(( $(date +%s) - CURRENT_T0 )) "the check was stopped during this step"
  elif [ "$rc" -ne 0 ]; then
    record run INTERRUPTED "$rc" 0 "the check was stopped between steps (exit status $rc)"
  fi
  if grep -q '"build".*"\(FAIL\|TIMEOUT\)' "$OUT/steps.jsonl" 2>/dev/null; then  # CMake's own record of a failed build
    for f in build-gpu/CMakeFiles/CMakeConfigureLog.yaml build-gpu/cmake/CMakeFiles/CMakeConfigureLog.yaml; do
      [ -f "$f" ] && { echo "== $f"; tail -c 200000 "$f"; } >> "$OUT/cmake_configure.log"
    done
  fi
  local took=$(( $(date +%s) - START ))
  local mode="GPU run on ${HOSTNAME:-?}, $(date -u +%FT%TZ), budget ${BUDGET} s, took ${took} s"
  [ "$DRY" = 1 ] && mode="Dry run on the CPU (${HOSTNAME:-?}): every step walked, GPU parts skipped; took ${took} s"
  timeout 60 "$PY" benchmarks/gpu_summary.py --out "$OUT" --mode "$mode"
  local src=$?
  if [ ! -s "$OUT/summary.md" ]; then  # the summary script itself failed: keep the shell's records at least
    { echo "## GPU check (the summary script failed, exit $src)"; echo; cat "$OUT/steps.jsonl"; } > "$OUT/summary.md"
  fi
  [ "$rc" -ne 0 ] && exit "$rc"
  exit "$src"
}
trap finish EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

step() {  # name limit_s needs_gpu(0/1) command...: run one step under a timeout, record the outcome
  local name=$1 limit=$2 gpu=$3
  shift 3
  local now left t0 rc status note
  now=$(date +%s)
  left=$((DEADLINE - now))
  if [ "$DRY" = 1 ] && [ "$gpu" = 1 ]; then
    echo "== [$name] skipped: needs a GPU (dry run)"
    record "$name" skipped 0 0 "dry run: needs a GPU"
    return 0
  fi
  if [ "$left" -lt 15 ]; then
    echo "== [$name] NOT RUN: the time budget is spent"
    record "$name" "NOT RUN" 0 0 "time budget of ${BUDGET} s spent"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  CURRENT=$name CURRENT_T0=$now
  echo "== [$name] $(date -u +%T) (timeout ${limit} s): $*"
  timeout --kill-after=10 "$limit" "$@" &
  CHILD=$!
  wait "$CHILD"
  rc=$?
  CURRENT="" CHILD=""
  t0=$now
  now=$(date +%s)
  if [ "$rc" -eq 0 ]; then status=ok note=""
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status=TIMEOUT note="no result within ${limit} s"
  else status=FAIL note="exit status $rc"
  fi
  echo "== [$name] $status after $((now - t0)) s${note:+ ($note)}"
  record "$name" "$status" "$rc" $((now - t0)) "$note"
  return 0
}

D=()
[ "$DRY" = 1 ] && D=(--dry-run)
if [ "$DRY" = 1 ]; then how="dry run"; else how="CUDA architectures $ARCH"; fi
echo "== gpu_check $(date -u +%FT%TZ) in $ROOT, OUT=$OUT, $how"
step env     30  0 "$PY" benchmarks/gpu_env.py "${D[@]}"
step build   200 1 bash "$ROOT/benchmarks/gpu_check.sh" --build
step knn     75  0 "$PY" benchmarks/gpu_knn_check.py "${D[@]}"
step resize  30  0 "$PY" benchmarks/gpu_resize_check.py "${D[@]}"
step e2e     120 0 "$PY" benchmarks/gpu_e2e_check.py "${D[@]}"
step adapt   60  0 "$PY" benchmarks/gpu_adapt_check.py "${D[@]}"
step tests   90  1 "$PY" -m pytest -q -p no:cacheprovider -m requires_cuda tests/test_knn.py \
  tests/test_resize_argmax.py tests/test_gpu_paths.py
exit 0   # the EXIT trap writes the summary; its status is the script's
