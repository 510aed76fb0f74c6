"""Transparent huge pages for glibc malloc's large blocks, set by re-executing the command once.

XLA:CPU allocates the temporaries of each run of a compiled step as one block (1.5 GiB for the ViT-Ti/16 multi-crop
step at batch 8) on a worker thread, whose malloc arena serves it with mmap and returns it with munmap when the run
ends: every step faults in ~400k fresh 4-KiB pages (~0.8 CPU-s per step at batch 8; at batch 32 more than the
compute). glibc's `glibc.malloc.hugetlb=1` tunable maps such blocks with transparent huge pages (2 MiB), which
removes >99% of those faults; glibc reads tunables only at process start, hence the re-exec. Measured in
benchmarks/README.md ("Page faults"). Opt out with DINO_JAX_HUGEPAGES=0.
"""
import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def _supported() -> bool:
    """Linux, glibc >= 2.35 (the tunable's first release) and transparent huge pages not disabled."""
    if sys.platform != "linux":
        return False
    lib, version = platform.libc_ver()
    try:
        if lib != "glibc" or tuple(int(p) for p in version.split(".")[:2]) < (2, 35):
            return False
        with open(THP_SETTING) as f:
            return "[never]" not in f.read()
    except (OSError, ValueError):
        return False


def reexec_with_huge_pages():
    """Replace this process by the same command with GLIBC_TUNABLES extended by TUNABLE (same pid, argv, env).

    Call first thing in an entry point, before threads or large allocations exist; a no-op where the tunable is
    already set, unsupported, or DINO_JAX_HUGEPAGES=0.
    """
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if TUNABLE in tunables.split(":") or os.environ.get("DINO_JAX_HUGEPAGES", "1") == "0" or not _supported():
        return
    env = dict(os.environ, GLIBC_TUNABLES=f"{tunables}:{TUNABLE}" if tunables else TUNABLE)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:], env)
