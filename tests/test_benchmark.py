"""`python -m benchmarks.train_step` runs the real step on a tiny config, prints its table and a sane FLOP count."""
import os
import re
import subprocess
import sys

from benchmarks.step_timing import flops

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = '''
from dino_jax.config import base_config


def get_config():
    c = base_config()
    c.arch, c.embed_dim, c.depth, c.num_heads, c.patch_size = "vit_custom", 64, 1, 2, 8
    c.global_crop_size, c.local_crop_size, c.local_crops_number = 32, 16, 2
    c.out_dim, c.head_hidden_dim, c.head_bottleneck_dim = 256, 64, 32
    c.batch_size = 4
    return c.lock()
'''


def harness(*args, timeout=120):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    return subprocess.run([sys.executable, "-m", "benchmarks.train_step", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_harness_prints_table_and_flops(tmp_path):
    cfg = tmp_path / "tiny.py"
    cfg.write_text(TINY)
    out = harness(f"--config={cfg}", "--config.head_nlayers=2", "--steps=2", "--repeats=1", "--warmup=1",
                  "--peak_tflops=0.1", "--profile_steps=1", f"--profile_dir={tmp_path / 'trace'}", "--compare_torch")
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    print(text)
    for row in ("compile", "step (median)", "images/s", "page faults per step", "peak memory", "FLOPs/step analytic",
                "FLOPs/step XLA", "MFU", "host callbacks in step"):
        assert f"| {row}" in text, row
    assert re.search(r"\| crops .*global batch 4, .*freeze_last_layer 0 \|", text), text  # the harness's default
    ratio = float(re.search(r"flops_ratio_analytic_over_xla=([\d.]+)", text).group(1))
    assert 0.7 <= ratio <= 1.3, ratio
    assert re.search(r"\| host callbacks in step\s*\| 0 \|", text)
    stolen = re.search(r"\| CPU stolen by the host\s*\| ([\d.]+) % of (\d+) cores", text)  # Linux reports it
    assert stolen and 0 <= float(stolen.group(1)) <= 100 and int(stolen.group(2)) == os.cpu_count(), text
    assert float(re.search(r"images_per_second=([\d.]+)", text).group(1)) > 0
    assert re.search(r"\| device .*; host \S", text), text  # CPU numbers depend on the chip: it is named
    assert float(re.search(r"ratio_jax_over_torch=([\d.]+)", text).group(1)) > 0
    probe = re.search(r"\| torch matmul probe\s*\| ([\d.]+) TFLOP/s \(2048\^3 float32", text)
    assert probe and float(probe.group(1)) > 0, text
    profiled = re.findall(r"^\| ([\d.]+) \| ([\d.]+) % \| (\S+) \|$", text, re.M)
    assert profiled and sum(float(share) for _, share, _ in profiled) <= 100.5, text  # kinds of XLA:CPU thunks
    assert not any(kind.startswith("$") or "ThunkExecutor" in kind for _, _, kind in profiled), profiled


def test_harness_does_not_import_tensorflow():
    code = ("import sys\n"
            "import benchmarks.train_step, benchmarks.step_timing.jax_step, benchmarks.step_timing.report\n"
            "import jax, dino_jax.dino, dino_jax.sharding\n"
            "assert 'tensorflow' not in sys.modules and 'dino_jax.data' not in sys.modules, 'imports tensorflow'\n")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), check=True,
                   timeout=60)


def test_device_prefetch_benchmark_runs_without_tensorflow():
    script = os.path.join(REPO, "benchmarks", "device_prefetch.py")
    code = ("import sys, runpy\n"
            f"sys.argv = [{script!r}, '--batch', '2', '--n_local', '1', '--step_ms', '5', '--steps', '3']\n"
            f"runpy.run_path({script!r}, run_name='__main__')\n"
            "assert 'tensorflow' not in sys.modules, 'imports tensorflow'\n")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = re.findall(r"^\| ([02]) \| ([\d.]+) ms \| ([\d.]+) ms \|$", out.stdout, re.M)
    assert [r[0] for r in rows] == ["0", "2"], out.stdout


def test_analytic_flops_match_hand_count():
    # ViT-S/16 at 224: 197 tokens; per block 24*N*D^2 + 4*N^2*D; patch embed 2*196*768*384.
    n, d = 197, 384
    want = 2 * 196 * 768 * d + 12 * (24 * n * d * d + 4 * n * n * d)
    assert flops.vit_forward_flops(224, 16, d, 12, 4 * d) == want
    assert abs(want / 1e9 - 9.2) < 0.1  # the usual "4.6 GMACs" of ViT-S/16
    assert flops.head_forward_flops(384, 65536, 3, 2048, 256) == 2 * (
        384 * 2048 + 2048 * 2048 + 2048 * 256 + 256 * 65536)


def test_negative_profile_steps_is_refused():
    out = harness("--config=configs/vitt16.py", "--profile_steps=-1", timeout=60)
    assert out.returncode != 0 and "--profile_steps=-1" in out.stderr, out.stderr[-2000:]


def test_stolen_time_is_read_from_proc_stat():
    from benchmarks import steal

    with open("/proc/stat") as f:
        want = int(f.readline().split()[8]) / os.sysconf("SC_CLK_TCK")
    got = steal.stolen_cpu_seconds()
    assert want <= got < want + 5  # steal only grows, a few ticks at most in between
    assert steal.stolen_share(got, 0.0) == "n/a" and steal.stolen_share(None, 1.0) == "n/a"
    share = steal.stolen_share(got - 0.5 * os.cpu_count(), 1.0)  # half a second per core "stolen" in one second
    assert float(share.split()[0]) >= 50.0, share
