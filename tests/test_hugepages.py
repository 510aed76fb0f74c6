"""dino_jax.hugepages: the re-exec keeps the command and adds the tunable, and the tunable removes the page faults
of a large block allocated on a worker thread (what XLA:CPU does for every run of a compiled step)."""
import os
import subprocess
import sys

import pytest

from dino_jax import hugepages

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REEXEC = ("import os, sys\n"
          "from dino_jax import hugepages\n"
          "hugepages.reexec_with_huge_pages()\n"
          "print(os.environ.get('GLIBC_TUNABLES'), sys.argv[1:])\n")
FAULTS = ("import ctypes, resource, threading\n"  # libc's malloc itself (numpy asks for huge pages on its own)
          "libc = ctypes.CDLL(None); libc.malloc.restype = ctypes.c_void_p; libc.free.argtypes = [ctypes.c_void_p]\n"
          "def work():\n"
          "    for _ in range(3):\n"
          "        p = libc.malloc(256 * 2 ** 20); ctypes.memset(p, 1, 256 * 2 ** 20); libc.free(p)\n"
          "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
          "t = threading.Thread(target=work); t.start(); t.join()\n"
          "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n")


def run(code, *args, **env):
    env = {k: v for k, v in dict(os.environ, PYTHONPATH=REPO, **env).items() if v is not None}
    out = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.skipif(not hugepages._supported(), reason="needs Linux, glibc >= 2.35 and transparent huge pages")
def test_reexec_adds_the_tunable_and_keeps_argv_and_environment():
    assert run(REEXEC, "--flag=1", "x", GLIBC_TUNABLES=None, DINO_JAX_HUGEPAGES=None) == \
        f"{hugepages.TUNABLE} ['--flag=1', 'x']"
    assert run(REEXEC, GLIBC_TUNABLES="glibc.malloc.arena_max=4", DINO_JAX_HUGEPAGES=None) == \
        f"glibc.malloc.arena_max=4:{hugepages.TUNABLE} []"
    assert run(REEXEC, GLIBC_TUNABLES=None, DINO_JAX_HUGEPAGES="0") == "None []"


@pytest.mark.skipif(not hugepages._supported(), reason="needs Linux, glibc >= 2.35 and transparent huge pages")
def test_tunable_removes_the_faults_of_a_large_block_on_a_worker_thread():
    plain = int(run(FAULTS, GLIBC_TUNABLES=None))
    huge = int(run(FAULTS, GLIBC_TUNABLES=hugepages.TUNABLE))
    assert plain > 3 * 256 * 2 ** 20 // 4096 * 0.9  # every 4-KiB page of each fresh block faults
    assert huge < plain / 20, (plain, huge)
