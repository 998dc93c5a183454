"""ifseg_rt._C: import smoke test, and the CUDA sources compile (nvcc, NVRTC) when the toolchain is present."""

import ctypes
import glob
import pathlib
import shutil
import site
import subprocess

import pytest

import ifseg_rt

ROOT = pathlib.Path(__file__).resolve().parents[1]
NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found")


def test_import_and_version():
    _C = pytest.importorskip("ifseg_rt._C")
    assert _C.__version__ == ifseg_rt.__version__
    assert isinstance(_C.with_cuda, bool)
    assert _C.num_threads() >= 1
    assert _C.cpu_isa() in ("avx512", "avx2", "generic")
    assert hasattr(_C, "knn_cuda") == _C.with_cuda


@needs_nvcc
def test_cuda_launchers_compile(tmp_path):
    subprocess.run(
        [NVCC, "-c", "-std=c++17", "-arch=sm_80", str(ROOT / "csrc/knn/knn_cuda.cu"), "-I", str(ROOT / "csrc"),
         "-o", str(tmp_path / "knn_cuda.o")],
        check=True, capture_output=True,
    )


@needs_nvcc
def test_kernel_header_compiles_alone(tmp_path):
    # what NVRTC sees: the .cuh by itself, no host code, no includes
    (tmp_path / "wrap.cu").write_text('#include "knn/knn_kernel.cuh"\n')
    subprocess.run(
        [NVCC, "--cubin", "-std=c++17", "-arch=sm_90", "-I", str(ROOT / "csrc"), str(tmp_path / "wrap.cu"),
         "-o", str(tmp_path / "wrap.cubin")],
        check=True, capture_output=True,
    )


def _libnvrtc():
    paths = [p for d in site.getsitepackages() for p in glob.glob(f"{d}/nvidia/**/libnvrtc.so*", recursive=True)]
    for name in [p for p in paths if "builtins" not in p] + ["libnvrtc.so"]:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


def test_kernel_source_compiles_with_nvrtc():
    lib = _libnvrtc()
    if lib is None:
        pytest.skip("libnvrtc not found (pip install nvidia-cuda-nvrtc)")
    from ifseg_rt.knn import kernel_source

    src = kernel_source().encode()
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), src, b"knn_kernel.cuh", 0, None, None) == 0
    opts = [b"--std=c++17", b"--gpu-architecture=compute_80"]
    rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    assert rc == 0, log.value.decode()
    assert "warning" not in log.value.decode()
