"""glibc malloc settings that keep XLA:CPU's per-step block mapped, set by re-executing the command once.

XLA:CPU allocates the temporaries of each run of a compiled step as one block (1.5 GiB for the ViT-Ti/16 multi-crop
step at batch 8) on a worker thread. A worker thread's malloc arena can serve a block that size only with mmap, and
returns it with munmap when the run ends, so every step maps fresh memory that the kernel must zero: ~400k 4-KiB
page faults per step at batch 8 (0.8 CPU-s; at batch 32 more than the compute), and on a VM whose host has reclaimed
the guest's free memory (after other large allocations, e.g. a torch step in the same process) several CPU-s of
page clearing per step even with huge pages. With one arena that never maps large blocks separately and never
trims its heap, the block is allocated once and reused: no faults, no clearing. Huge pages (2 MiB) for that heap
cut the first-touch faults and TLB misses. glibc reads tunables only at process start, hence the re-exec.
Measured in benchmarks/README.md ("Page faults"). Opt out with DINO_JAX_MALLOC_TUNING=0.

Only where the step runs on XLA:CPU: on a TPU or GPU host there is no such block, and one arena would only make
every tf.data thread wait on the same malloc lock (on the 2-core VM that lock already cost the CPU demo, with its
small step, a third of its speed; benchmarks/README.md, 2026-12-02).
"""
import importlib.util
import os
import platform
import sys

TUNABLES = (
    "glibc.malloc.arena_max=1",  # every thread allocates from the main arena, whose heap can grow to any size
    "glibc.malloc.mmap_max=0",  # large blocks come from that heap, not from a mapping of their own
    "glibc.malloc.trim_threshold=1099511627776",  # freed memory stays in the heap (1 TiB: never trimmed)
    "glibc.malloc.hugetlb=1",  # transparent huge pages for the heap
)
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def _supported() -> bool:
    """Linux, glibc >= 2.35 (the hugetlb tunable's first release) and transparent huge pages not disabled."""
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


# PJRT plugins whose presence makes JAX pick an accelerator when JAX_PLATFORMS is unset.
ACCELERATOR_PLUGINS = ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin")


def _step_runs_on_cpu() -> bool:
    """Whether JAX will run the step on XLA:CPU, decided before JAX starts: JAX_PLATFORMS, else installed plugins."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip().lower() == "cpu"
    return not any(importlib.util.find_spec(name) is not None for name in ACCELERATOR_PLUGINS)


def reexec_with_malloc_tuning():
    """Replace this process by the same command with GLIBC_TUNABLES extended by TUNABLES (same pid, argv, env).

    Call first thing in an entry point, before threads or large allocations exist; a no-op where the tunables are
    already set, unsupported, the step will not run on the CPU, or DINO_JAX_MALLOC_TUNING=0. Tunables the user set
    keep their values.
    """
    tunables = [t for t in os.environ.get("GLIBC_TUNABLES", "").split(":") if t]
    names = {t.split("=")[0] for t in tunables}
    missing = [t for t in TUNABLES if t.split("=")[0] not in names]
    if (not missing or os.environ.get("DINO_JAX_MALLOC_TUNING", "1") == "0" or not _supported()
            or not _step_runs_on_cpu()):
        return
    env = dict(os.environ, GLIBC_TUNABLES=":".join(tunables + missing))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:], env)
