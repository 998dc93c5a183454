"""Facts about the machine that thread counts, provenance records and benchmark reports depend on (a leaf module:
stdlib only)."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Optional

MAX_THREADS = 1024  # a thread count beyond this is a typo (torch.set_num_threads(100000) crashes the process)


def versions(*modules: str) -> dict:
    """``{"ifseg_rt": ..., "python": ..., module: version}`` for each of ``modules`` that is installed (read from
    the installed distributions, so nothing is imported): the provenance runs and exports record."""
    from importlib import metadata

    from . import __version__

    out = {"ifseg_rt": __version__, "python": platform.python_version()}
    for name in modules:
        for dist in (name, name + "-gpu"):  # onnxruntime-gpu provides onnxruntime
            try:
                out[name] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                pass
    return out


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity: containers and ``taskset`` restrict it), not the machine's
    total. Thread counts default to this, so that a process never oversubscribes the cores it actually has."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _cpuinfo(field: str) -> Optional[str]:
    """The value of the first ``field`` line of ``/proc/cpuinfo`` ("" when no line has it); None where the file is
    absent (not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith(field)), "")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows; benchmark numbers carry it."""
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def amx_bf16() -> Optional[bool]:
    """Whether this process can compute bfloat16 on AMX tiles, as oneDNN-based engines (OpenVINO, torch) would: the
    CPU has ``amx_bf16`` (``/proc/cpuinfo``), ``ONEDNN_MAX_CPU_ISA`` does not cap oneDNN below AMX, and Linux grants the
    process the AMX tile state (:func:`amx_permitted`). None where ``/proc/cpuinfo`` is absent (not Linux)."""
    flags = _cpuinfo("flags")
    if flags is None:
        return None
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    return ("amx_bf16" in flags.split() and (not cap or cap in ("ALL", "DEFAULT") or "AMX" in cap)
            and amx_permitted())


# Linux's AMX permission request (asm/prctl.h; the x86-64 syscall number); benchmarks/no_amx.py refuses it.
ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA, SYS_ARCH_PRCTL = 0x1023, 18, 158


def amx_permitted() -> bool:
    """Whether Linux lets this process use AMX tiles: since Linux 5.16 a process asks for the tile state
    (``arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)``, what oneDNN, onnxruntime's MLAS and our kNN kernels do
    before using AMX, each falling back to AVX-512 when refused). Asking again is harmless. False where it is refused
    (a seccomp profile, ``benchmarks/no_amx.py``; a kernel without AMX support) and off x86-64 Linux."""
    libc = _libc()
    if not libc or platform.machine() not in ("x86_64", "AMD64"):
        return False
    return libc.syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0


def bf16_without_amx(engine: str) -> Optional[str]:
    """Why ``engine``'s bfloat16 is slow here, or None: on a CPU without AMX (:func:`amx_bf16` False: AVX512-BF16 at
    most, e.g. AMD EPYC Zen 4) the oneDNN-based CPU engines run bf16 slower than fp32. The one message the bf16 engines
    warn with and ``Segmenter.load`` gives when it passes over a bf16 default."""
    if amx_bf16() is not False:
        return None
    return (f"this CPU computes bfloat16 without AMX (AVX512-BF16 at most): {engine}'s bf16 runs slower than fp32 here "
            f"(OFA-Base at 512^2 on an AMX Xeon capped with ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16: OpenVINO bf16 3.8x "
            f"slower than with AMX and slower than onnxruntime fp32; torch bf16 3.3 s vs its fp32 2.35 s)")


def idle_cores(sample_s: float = 0.25) -> int:
    """How many of the cores available to this process are idle right now: their idle share of a short sample of
    ``/proc/stat``, rounded (at least 1; :func:`available_cores` where ``/proc/stat`` is absent). Compute-bound tools
    use it to avoid spreading over a core another process keeps busy (a 2-thread forward on two cores of which one
    is busy can be 5x slower than a 1-thread one)."""
    import time

    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None

    def snapshot():
        rows = {}
        for line in Path("/proc/stat").read_text().splitlines():
            name, *vals = line.split()
            if name.startswith("cpu") and name != "cpu":
                v = [int(x) for x in vals]
                rows[int(name[3:])] = (v[3] + (v[4] if len(v) > 4 else 0), sum(v))  # idle + iowait, total
        return rows

    try:
        a = snapshot()
        time.sleep(sample_s)
        b = snapshot()
    except (OSError, ValueError, IndexError):
        return available_cores()
    ids = [c for c in (cores or list(b)) if c in a and c in b]
    idle = sum((b[c][0] - a[c][0]) / max(1, b[c][1] - a[c][1]) for c in ids)
    return max(1, min(len(ids) or 1, int(idle + 0.5)))


_LIBC = None


def _libc():
    """The C library (ctypes), loaded once; False off Linux or where it cannot be loaded."""
    global _LIBC
    if _LIBC is None:
        _LIBC = False
        if platform.system() == "Linux":
            try:
                import ctypes

                libc = ctypes.CDLL("libc.so.6")
                libc.malloc_trim.argtypes = [ctypes.c_size_t]
                libc.syscall.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_long]
                _LIBC = libc
            except (OSError, AttributeError):
                pass
    return _LIBC


def release_free_memory() -> bool:
    """Return the C heap's free pages to the operating system (glibc ``malloc_trim``; a no-op elsewhere).

    A forward pass frees its activations, but glibc keeps freed memory mapped, and activations of ever new image
    shapes fragment it: a long-running process grows with every new shape although nothing is live. Trimming after
    each run keeps its resident size at what is actually in use (a few milliseconds). Returns whether it ran.
    """
    libc = _libc()
    if not libc:
        return False
    libc.malloc_trim(0)
    return True
