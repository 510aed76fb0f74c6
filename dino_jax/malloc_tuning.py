"""glibc malloc settings for steps that run on XLA:CPU, set by re-executing the command once (glibc reads its
tunables only at process start).

XLA:CPU allocates the temporaries of each run of a compiled step as one block on a worker thread, and glibc maps
big blocks with mmap and unmaps them when freed, so every step faults in fresh, zeroed pages. TUNABLES keep freed
memory in malloc's heaps (no separate mappings, no trimming) and back those heaps with transparent huge pages.

A block bigger than 64 MiB (a per-thread arena's largest heap) is still mapped on its own unless every thread
shares one arena (ONE_ARENA). One arena pays for big steps and costs small ones (benchmarks/README.md, "One malloc
arena"): the ViT-Ti/16 multi-crop step at batch 8 (a 1.5 GiB block) runs ~1.5x faster with it, while the CPU demo,
whose threads then queue on the one arena's lock, trains ~1.5x slower. So `python -m dino_jax.main` sets TUNABLES,
and the train-step harness (benchmarks/train_step.py), which times big steps, adds ONE_ARENA; for a big model
trained on a CPU, set GLIBC_TUNABLES=glibc.malloc.arena_max=1 yourself (tunables you set keep their values).

Only where the step runs on XLA:CPU: on a TPU or GPU host there is no such block. DINO_JAX_MALLOC_TUNING=0 turns
the settings off. A notebook kernel is already running when it imports dino_jax, so it trains with glibc's
defaults, which cost the demo about a fifth of its speed (benchmarks/README.md).
"""
import glob
import importlib.util
import os
import platform
import sys

TUNABLES = (
    "glibc.malloc.mmap_max=0",  # large blocks come from a heap, not from a mapping of their own
    "glibc.malloc.trim_threshold=1099511627776",  # freed memory stays in the heap (1 TiB: never trimmed)
    "glibc.malloc.hugetlb=1",  # transparent huge pages for the heaps
)
ONE_ARENA = "glibc.malloc.arena_max=1"  # every thread allocates from the main arena, whose heap can grow to any size
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
ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin")
GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips appear on the PCI bus under Google's vendor id


def _tpu_chips_attached() -> bool:
    """libtpu alone does not make a TPU host: CPU hosts install it to compile for TPU slices ahead of time, and JAX
    then runs on the CPU. A TPU host has /dev/accel* devices (v2-v4) or Google PCI devices (v5 and later)."""
    if glob.glob("/dev/accel*"):
        return True
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(vendor) as f:
                if f.read().strip() == GOOGLE_PCI_VENDOR:
                    return True
        except OSError:
            continue
    return False


def _step_runs_on_cpu() -> bool:
    """Whether JAX will run the step on XLA:CPU, decided before JAX starts: JAX_PLATFORMS, else installed plugins
    (libtpu only where TPU chips are attached)."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip().lower() == "cpu"
    if importlib.util.find_spec("libtpu") is not None and _tpu_chips_attached():
        return False
    return not any(importlib.util.find_spec(name) is not None for name in ACCELERATOR_PLUGINS)


def reexec_with_malloc_tuning(one_arena: bool = False):
    """Replace this process by the same command with GLIBC_TUNABLES extended by TUNABLES, and ONE_ARENA when
    `one_arena` (same pid, argv, env).

    Call first thing in an entry point, before threads or large allocations exist; a no-op where the tunables are
    already set, unsupported, the step will not run on the CPU, or DINO_JAX_MALLOC_TUNING=0. Tunables the user set
    keep their values.
    """
    tunables = [t for t in os.environ.get("GLIBC_TUNABLES", "").split(":") if t]
    names = {t.split("=")[0] for t in tunables}
    missing = [t for t in TUNABLES + ((ONE_ARENA,) if one_arena else ()) if t.split("=")[0] not in names]
    if (not missing or os.environ.get("DINO_JAX_MALLOC_TUNING", "1") == "0" or not _supported()
            or not _step_runs_on_cpu()):
        return
    env = dict(os.environ, GLIBC_TUNABLES=":".join(tunables + missing))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:], env)
