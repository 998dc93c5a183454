#!/usr/bin/env bash
# GPU checks for a fresh CUDA machine with this repository copied in (pip works, nothing else assumed).
#   bash benchmarks/gpu_check.sh            # from the repository root
# Builds the CUDA extension, runs the GPU checks, appends a markdown section to benchmarks/RESULTS.md and copies
# every output to $OUT when that is set. Further checks: append a step at the end, following the kNN one.
set -euo pipefail
cd "$(dirname "$0")/.."
RESULTS=benchmarks/results
mkdir -p "$RESULTS"
LOG="$RESULTS/gpu_check.log"
exec > >(tee -a "$LOG") 2>&1
echo "== gpu_check $(date -u +%FT%TZ) on $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"

python -m pip install -q "scikit-build-core>=0.10" "pybind11>=2.12" numpy pytest
python -c "import torch" 2>/dev/null || python -m pip install -q torch
# CuPy for the NVRTC path (optional; the compiled path is checked without it)
CUDA_MAJOR=$(nvidia-smi | sed -n 's/.*CUDA Version: \([0-9]*\).*/\1/p' | head -1)
python -m pip install -q "cupy-cuda${CUDA_MAJOR:-12}x" || echo "CuPy not installable: NVRTC path not checked"

IFSEG_CUDA=ON python -m pip install --no-build-isolation -e . -Cbuild-dir=build-gpu
python -c "from ifseg_rt import _C; assert _C.with_cuda, 'extension built without CUDA'; print('with_cuda', _C.with_cuda)"

status=0
# -- kNN: tests marked requires_cuda, then reference check + timings --
python -m pytest tests/test_knn.py tests/test_extension.py -q -m "not slow" || status=1
python benchmarks/gpu_knn_check.py --out "$RESULTS" || status=1
{ echo; cat "$RESULTS/gpu_knn.md"; } >> benchmarks/RESULTS.md

# -- image-free adaptation: word-grid training throughput, OFA-Base dims (random weights), batch 16, bf16 --
python -m pip install -q tokenizers safetensors tqdm
python benchmarks/adapt.py --size base --device cuda --precision bf16 --steps 20 | tee "$RESULTS/gpu_adapt.txt" || status=1
{ echo; echo "## Image-free adaptation, OFA-Base, batch 16, bf16 ($(date -u +%F))"; echo;
  echo "Command: \`python benchmarks/adapt.py --size base --device cuda --precision bf16 --steps 20\`"; echo;
  sed 's/^/    /' "$RESULTS/gpu_adapt.txt"; } >> benchmarks/RESULTS.md

# -- export + runtime: torch backend GPU throughput (batch sweep, bf16/fp16), ORT CUDA parity if onnxruntime-gpu --
python -m pip install -q onnx onnxscript "onnxruntime>=1.17" Pillow || status=1
python -m pytest tests/test_export.py tests/test_runtime.py -q || status=1
python benchmarks/gpu_e2e_check.py --size base --batches 1 2 4 8 --dtypes bf16 fp16 --cuda-graphs \
  --json "$RESULTS/gpu_e2e.json" | tee "$RESULTS/gpu_e2e.txt" || status=1
{ echo; echo "## Runtime, torch backend, OFA-Base dims (random weights), 512x512, kNN on ($(date -u +%F))"; echo;
  echo "Command: \`python benchmarks/gpu_e2e_check.py --size base --batches 1 2 4 8 --dtypes bf16 fp16 --cuda-graphs\`"; echo;
  sed 's/^/    /' "$RESULTS/gpu_e2e.txt"; } >> benchmarks/RESULTS.md

# -- (append further GPU checks here) --

if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  cp -r "$RESULTS"/. "$OUT"/
  cp benchmarks/RESULTS.md "$OUT"/
fi
exit $status
