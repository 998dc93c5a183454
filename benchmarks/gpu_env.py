"""The machine the GPU check runs on (step "env" of benchmarks/gpu_check.sh): card and driver (nvidia-smi), nvcc,
Python and the versions of the packages the checks use, and which engines stay unverified (TensorRT,
onnxruntime-gpu). Imports no torch, so it answers in a second.

    python3 benchmarks/gpu_env.py --out benchmarks/results/gpu_check [--dry-run]
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
import shutil
import subprocess

from gpu_common import Report, run_main

PACKAGES = ("torch", "numpy", "cupy-cuda13x", "cupy-cuda12x", "nvidia-cuda-nvrtc", "nvidia-cuda-nvrtc-cu12",
            "onnxruntime", "onnxruntime-gpu", "tensorrt", "pybind11", "scikit-build-core", "cmake", "ninja",
            "safetensors", "tokenizers", "pillow", "nvidia-pytriton", "tritonclient", "ray")


def _run(cmd):
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, str(e)
    return out.returncode, (out.stdout or out.stderr).strip()


def main(args) -> Report:
    with Report("env", args, "machine, card and package versions") as rep:
        versions = {}
        for name in PACKAGES:
            try:
                versions[name] = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                pass
        rc, smi = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm",
                        "--format=csv,noheader"]) if shutil.which("nvidia-smi") else (None, "nvidia-smi not found")
        _, nvcc = _run(["nvcc", "--version"]) if shutil.which("nvcc") else (None, "nvcc not found")
        nvcc = next((line for line in nvcc.splitlines() if "release" in line), nvcc.splitlines()[-1] if nvcc else "")
        ort_providers = None
        if importlib.util.find_spec("onnxruntime") is not None:
            import onnxruntime

            ort_providers = onnxruntime.get_available_providers()
        rep.facts = {"python": platform.python_version(), "gpu": smi, "nvcc": nvcc, "versions": versions,
                     "onnxruntime_providers": ort_providers}
        rep.table("Environment", [{"what": "GPU (name, driver, memory, SM clock now / max)", "value": smi},
                                  {"what": "nvcc", "value": nvcc},
                                  {"what": "python3", "value": platform.python_version()},
                                  {"what": "packages", "value": ", ".join(f"{k} {v}" for k, v in versions.items())},
                                  {"what": "onnxruntime providers", "value": str(ort_providers)}])
        if args.dry_run:
            rep.skip("a CUDA GPU is visible", "dry run")
        else:
            rep.check("nvidia-smi lists a GPU", rc == 0 and bool(smi), smi)
        trt = importlib.util.find_spec("tensorrt") is not None
        ort_cuda = bool(ort_providers) and "CUDAExecutionProvider" in ort_providers
        rep.note(f"TensorRT {'installed' if trt else 'not installed'}; onnxruntime CUDA provider "
                 f"{'available' if ort_cuda else 'not available'}"
                 + ("" if trt and ort_cuda else ": those engines stay unverified by this check"))
        cupy = versions.get("cupy-cuda13x", versions.get("cupy-cuda12x", "-"))
        rep.summary = (f"{smi.splitlines()[0] if smi else '?'}; {nvcc}; python {platform.python_version()}; "
                       f"torch {versions.get('torch', '-')}, cupy {cupy}")
    return rep


if __name__ == "__main__":
    run_main(main, __doc__)
