"""dino_jax.malloc_tuning: the re-exec keeps the command and adds the tunables (one arena only when asked), and
with one arena a large block that a worker thread allocates and frees again and again (what XLA:CPU does for every
run of a compiled step) stays mapped instead of faulting in fresh pages each time."""
import os
import subprocess
import sys

import pytest

from dino_jax import malloc_tuning

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL = ":".join(malloc_tuning.TUNABLES)
ONE = ALL + ":" + malloc_tuning.ONE_ARENA
REEXEC = ("import os, sys\n"
          "from dino_jax import malloc_tuning\n"
          "malloc_tuning.reexec_with_malloc_tuning(one_arena=os.environ.get('ONE_ARENA') == '1')\n"
          "print(os.environ.get('GLIBC_TUNABLES'), sys.argv[1:])\n")
FAULTS = ("import ctypes, resource, threading\n"  # libc's malloc itself (numpy asks for huge pages on its own)
          "libc = ctypes.CDLL(None); libc.malloc.restype = ctypes.c_void_p; libc.free.argtypes = [ctypes.c_void_p]\n"
          "def work():\n"
          "    for _ in range(3):\n"
          "        p = libc.malloc(256 * 2 ** 20); ctypes.memset(p, 1, 256 * 2 ** 20); libc.free(p)\n"
          "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
          "t = threading.Thread(target=work); t.start(); t.join()\n"
          "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n")
needs_glibc = pytest.mark.skipif(not malloc_tuning._supported(),
                                 reason="needs Linux, glibc >= 2.35 and transparent huge pages")


def run(code, *args, **env):
    env = {k: v for k, v in {**os.environ, "PYTHONPATH": REPO, **env}.items() if v is not None}
    out = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@needs_glibc
def test_reexec_adds_the_tunables_and_keeps_argv_environment_and_the_users_values():
    assert run(REEXEC, "--flag=1", "x", GLIBC_TUNABLES=None, DINO_JAX_MALLOC_TUNING=None) == f"{ALL} ['--flag=1', 'x']"
    assert run(REEXEC, GLIBC_TUNABLES=None, DINO_JAX_MALLOC_TUNING=None, ONE_ARENA="1") == f"{ONE} []"
    kept = run(REEXEC, GLIBC_TUNABLES="glibc.malloc.mmap_max=4:glibc.foo=1", DINO_JAX_MALLOC_TUNING=None)
    assert kept == "glibc.malloc.mmap_max=4:glibc.foo=1:" + ":".join(malloc_tuning.TUNABLES[1:]) + " []"
    assert run(REEXEC, GLIBC_TUNABLES=ALL, DINO_JAX_MALLOC_TUNING=None) == f"{ALL} []"  # set already: no re-exec
    assert run(REEXEC, GLIBC_TUNABLES=None, DINO_JAX_MALLOC_TUNING="0") == "None []"


@needs_glibc
def test_no_reexec_when_the_step_runs_on_an_accelerator(tmp_path):
    # A TPU/GPU host has no XLA:CPU step block to keep, and one arena would serialise tf.data's mallocs.
    assert run(REEXEC, GLIBC_TUNABLES=None, DINO_JAX_MALLOC_TUNING=None, JAX_PLATFORMS="tpu") == "None []"
    assert run(REEXEC, GLIBC_TUNABLES=None, DINO_JAX_MALLOC_TUNING=None, JAX_PLATFORMS="cuda,cpu") == "None []"
    assert run(REEXEC, GLIBC_TUNABLES=None, DINO_JAX_MALLOC_TUNING=None, JAX_PLATFORMS="cpu") == f"{ALL} []"
    plugin = tmp_path / "jax_cuda12_plugin"  # an installed CUDA plugin makes JAX pick the GPU when unset
    plugin.mkdir()
    (plugin / "__init__.py").write_text("")
    env = dict(GLIBC_TUNABLES=None, DINO_JAX_MALLOC_TUNING=None, JAX_PLATFORMS=None,
               PYTHONPATH=REPO + os.pathsep + str(tmp_path))
    assert run(REEXEC, **env) == "None []"
    assert run(REEXEC, **dict(env, JAX_PLATFORMS="cpu")) == f"{ALL} []"  # unless the user asks for the CPU


@needs_glibc
def test_libtpu_without_tpu_chips_still_runs_on_the_cpu(tmp_path):
    # CPU hosts install libtpu to compile for TPU slices (benchmarks/tpu_aot.py); JAX then runs the step on the CPU.
    assert not malloc_tuning._tpu_chips_attached()  # this test machine has no TPU
    plugin = tmp_path / "libtpu"
    plugin.mkdir()
    (plugin / "__init__.py").write_text("")
    env = dict(GLIBC_TUNABLES=None, DINO_JAX_MALLOC_TUNING=None, JAX_PLATFORMS=None,
               PYTHONPATH=REPO + os.pathsep + str(tmp_path))
    assert run(REEXEC, **env) == f"{ALL} []"


@needs_glibc
def test_one_arena_keeps_a_large_block_of_a_worker_thread_mapped():
    plain = int(run(FAULTS, GLIBC_TUNABLES=None))
    one_arena = int(run(FAULTS, GLIBC_TUNABLES=ONE))
    assert plain > 3 * 256 * 2 ** 20 // 4096 * 0.9  # every 4-KiB page of each fresh block faults
    assert one_arena < plain / 20, (plain, one_arena)  # mapped once (with huge pages), then reused
    small_pages = ":".join(t for t in ONE.split(":") if "hugetlb" not in t)
    once = int(run(FAULTS, GLIBC_TUNABLES=small_pages))
    assert once < 1.2 * 256 * 2 ** 20 // 4096, (plain, once)  # the first block's pages only
    # Without one arena the thread's arena cannot hold a block this size: mapped afresh each time, in huge pages.
    per_thread = int(run(FAULTS, GLIBC_TUNABLES=":".join(t for t in ALL.split(":") if "hugetlb" not in t)))
    assert per_thread > 3 * 256 * 2 ** 20 // 4096 * 0.9, per_thread
