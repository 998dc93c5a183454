"""Run a command as on a CPU without AMX (the AMD EPYC case: AVX-512 VNNI/BF16, no AMX), on an Intel Xeon with AMX.

    python benchmarks/no_amx.py python benchmarks/e2e.py --sizes base
    python benchmarks/no_amx.py python -m pytest

Linux hands a process the AMX tile state only when it asks (``arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)``,
Linux 5.16+). This installs a seccomp filter that refuses that request, then runs the command: the filter holds for
the command and everything it starts. Every library we run asks before using AMX and falls back to AVX-512 when
refused: onnxruntime's MLAS (int8 GEMMs on VNNI), oneDNN (OpenVINO's and torch's kernels: bf16 on AVX512-BF16, int8
on VNNI), our kNN kernels (no screening) and ``ifseg_rt.system.amx_bf16()``. Unlike ``ONEDNN_MAX_CPU_ISA``, which
caps oneDNN alone, it thus also covers onnxruntime. Other instruction sets stay as they are (this Xeon's AVX512-FP16
too, which AMD EPYC lacks; nothing of ours uses it).

Needs x86-64 Linux and libseccomp (``libseccomp.so.2``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys

from ifseg_rt.system import ARCH_REQ_XCOMP_PERM, SYS_ARCH_PRCTL

SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_ACT_ERRNO_EPERM = 0x00050000 | 1  # SCMP_ACT_ERRNO(EPERM)
SCMP_CMP_EQ = 4


class _ArgCmp(ctypes.Structure):  # struct scmp_arg_cmp
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]


def refuse_amx() -> None:
    """Install the filter in this process (inherited by every thread and child started after)."""
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        raise SystemExit(f"no_amx: needs x86-64 Linux, this is {platform.system()} {platform.machine()}")
    name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
    try:
        lib = ctypes.CDLL(name)
    except OSError as e:
        raise SystemExit(f"no_amx: cannot load libseccomp ({e}); install libseccomp2, or cap oneDNN alone with "
                         f"ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 (onnxruntime then still uses AMX)") from None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                           ctypes.POINTER(_ArgCmp)]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
    if not ctx:
        raise SystemExit("no_amx: seccomp_init failed")
    try:
        arg = (_ArgCmp * 1)(_ArgCmp(0, SCMP_CMP_EQ, ARCH_REQ_XCOMP_PERM, 0))
        rc = lib.seccomp_rule_add_array(ctx, SCMP_ACT_ERRNO_EPERM, SYS_ARCH_PRCTL, 1, arg)
        if rc == 0:
            rc = lib.seccomp_load(ctx)  # sets no_new_privs itself (libseccomp's default)
        if rc != 0:
            raise SystemExit(f"no_amx: could not install the seccomp filter ({os.strerror(-rc)})")
    finally:
        lib.seccomp_release(ctx)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    refuse_amx()
    try:
        os.execvp(argv[0], argv)
    except OSError as e:
        raise SystemExit(f"no_amx: cannot run {argv[0]!r}: {e}") from None


if __name__ == "__main__":
    sys.exit(main())
