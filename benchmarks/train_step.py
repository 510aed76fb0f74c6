"""Speed of the real DINO training step, optionally against the independent PyTorch reference step.

    python -m benchmarks.train_step --config=configs/vits16.py [--config.KEY=VALUE ...] [--compare_torch]
        [--steps N] [--repeats R] [--warmup W] [--peak_tflops X] [--compiler_option XLA_KEY=VALUE ...]
        [--dump_hlo FILE] [--profile_steps N [--profile_dir DIR]]

Run from the repository root. `--config.KEY=VALUE` sets any config key (dtype, batch_size, out_dim, attention,
remat, local_crops_number, backbone_chunks, ...). Two defaults differ from the recipe unless set that way:
freeze_last_layer is 0 (the steady-state step, prototypes updated, as in every epoch after the first), and on a
CPU the batch is 8 per device. With --compare_torch, R rounds of N JAX steps then N torch steps interleave, so that
load from other processes hits both alike; the last line is `ratio_jax_over_torch=X` (JAX images/s over torch
images/s). benchmarks/README.md says how FLOPs, peaks and memory are counted.
"""
from __future__ import annotations

import ast
import os
import sys
import tempfile
import time

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Recipe file, path[:variant]; --config.KEY=VALUE overrides a key.")
flags.DEFINE_integer("steps", 5, "Timed steps per round.")
flags.DEFINE_integer("repeats", 3, "Rounds (JAX and torch interleaved).")
flags.DEFINE_integer("warmup", 2, "Untimed steps first, per framework.")
flags.DEFINE_bool("compare_torch", False, "Also time tests/torch_reference.py's train_step on the same shapes.")
flags.DEFINE_integer("torch_threads", 0, "torch CPU threads (0: all cores, as XLA uses).")
flags.DEFINE_enum("omp_wait_policy", "PASSIVE", ["PASSIVE", "ACTIVE", "default"],
                  "OMP_WAIT_POLICY for torch's OpenMP pool, unless already in the environment. PASSIVE: spinning "
                  "threads waiting at barriers for descheduled peers make torch 3-7x slower on a loaded CPU.")
flags.DEFINE_float("peak_tflops", None, "Device peak for MFU (default: table by device kind; CPU: a matmul probe).")
flags.DEFINE_integer("steps_per_epoch", 1000, "Only sizes the schedules.")
flags.DEFINE_multi_string("compiler_option", [], "XLA option KEY=VALUE for this compile only, repeatable (e.g. "
                          "xla_cpu_experimental_ynn_fusion_type= turns XLA:CPU's YNNPACK fusions off).")
flags.DEFINE_string("dump_hlo", None, "Write the optimized HLO of the step to this file.")
flags.DEFINE_integer("profile_steps", 0, "After timing, trace this many steps with jax.profiler and print the op "
                     "kinds that take the most time.", lower_bound=0)
flags.DEFINE_string("profile_dir", None, "Where to keep the profiler trace (default: a temporary folder).")
FLAGS = flags.FLAGS


def harness_config(c, overridden, on_cpu: bool, n_devices: int):
    """The recipe with the harness's two defaults, where the command line did not set those keys."""
    with c.unlocked():
        if "freeze_last_layer" not in overridden:
            c.freeze_last_layer = 0
        if on_cpu and "batch_size" not in overridden:
            c.batch_size = min(c.batch_size, 8 * n_devices)
    return c


def compiler_options(pairs) -> dict:
    options = {}
    for kv in pairs:
        k, _, v = kv.partition("=")
        try:
            options[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            options[k] = v
    return options


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.compare_torch and FLAGS.omp_wait_policy != "default":
        os.environ.setdefault("OMP_WAIT_POLICY", FLAGS.omp_wait_policy)  # before torch loads
    import jax

    from benchmarks.step_timing import flops, jax_step, report
    from benchmarks.steal import stolen_cpu_seconds, stolen_share

    devices = jax.devices()
    on_cpu = devices[0].platform == "cpu"
    c = harness_config(FLAGS.config, config_flags.get_override_values(FLAGS["config"]), on_cpu, len(devices))
    options = compiler_options(FLAGS.compiler_option)
    step = jax_step.JaxStep(c, FLAGS.steps_per_epoch, options)
    if FLAGS.dump_hlo:
        with open(FLAGS.dump_hlo, "w") as f:
            f.write(step.compiled.as_text() or "")
    step.run(FLAGS.warmup)
    del step.cpu_seconds[:], step.page_faults[:]
    if not bool(step.metrics["finite"]):
        print("warning: the step produced a non-finite loss on random data", file=sys.stderr)
    jax_rss, jax_dev_peak = report.peak_rss_bytes(), report.device_peak_bytes(devices)

    torch_step = None
    if FLAGS.compare_torch:
        import torch

        from benchmarks.step_timing.torch_step import TorchStep

        if on_cpu:
            torch.set_num_threads(FLAGS.torch_threads or os.cpu_count())
        tdev = torch.device("cuda" if not on_cpu and torch.cuda.is_available() else "cpu")
        torch_step = TorchStep(c, c.batch_size, FLAGS.steps_per_epoch, c.dtype, tdev)
        rss_before_torch = report.peak_rss_bytes()
        for _ in range(FLAGS.warmup):
            torch_step.step()

    jax_times, torch_times, torch_cpu = [], [], []
    timed_from, stolen_from = time.perf_counter(), stolen_cpu_seconds()
    for _ in range(FLAGS.repeats):
        jax_times += step.run(FLAGS.steps)
        for _ in range(FLAGS.steps if torch_step else 0):
            t, cpu = time.perf_counter(), time.process_time()
            torch_step.step()
            torch_times.append(time.perf_counter() - t)
            torch_cpu.append(time.process_time() - cpu)
    stolen = stolen_share(stolen_from, time.perf_counter() - timed_from)

    per_image = flops.model_flops_per_image(c, step.model.backbone)
    analytic = per_image["train"] * c.batch_size
    xla = flops.xla_flops(step.compiled)
    jax_s, jax_cpu = report.median(jax_times), report.median(step.cpu_seconds)
    ips = c.batch_size / jax_s
    peak, peak_src = ((FLAGS.peak_tflops, "--peak_tflops") if FLAGS.peak_tflops
                      else flops.device_peak(devices[0], c.dtype))
    achieved = analytic / jax_s / 1e12
    mfu = achieved / (peak * len(devices))
    g = lambda n: f"{n / 1e9:.2f}"  # noqa: E731
    rows = [
        ("device", f"{len(devices)} x {devices[0].device_kind} ({devices[0].platform}), jax {jax.__version__}"
                   + (f"; host {report.cpu_model()}" if on_cpu else "")),
        ("config", f"{config_flags.get_config_filename(FLAGS['config'])} arch={c.arch} p{c.patch_size} "
                   f"out_dim={c.out_dim} dtype={c.dtype} attention={c.attention} remat={c.remat} "
                   f"backbone_chunks={c.backbone_chunks}"),
        ("crops", f"2x{c.global_crop_size} + {c.local_crops_number}x{c.local_crop_size}, global batch "
                  f"{c.batch_size}, drop_path {c.drop_path_rate}, freeze_last_layer {c.freeze_last_layer}"),
        ("compile", f"{step.compile_s:.2f} s" + (f"  options {options}" if options else "")),
        ("step (median)", report.timing(jax_times)),
        ("step CPU time (median)", f"{jax_cpu:.2f} CPU-s (process user+sys; robust to "
                                   "other load)"),
        ("page faults per step", f"{report.median(step.page_faults):.0f} minor (median; GLIBC_TUNABLES="
                                 f"{os.environ.get('GLIBC_TUNABLES', '')!r}, see dino_jax/malloc_tuning.py)"),
        ("images/s", f"{ips:.2f}"),
        ("load average (1 min)", f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"),
        ("CPU stolen by the host", f"{stolen} (timed rounds; other guests of a shared VM host)"),
        ("peak memory", (f"{report.fmt_bytes(jax_dev_peak)} device" if jax_dev_peak is not None
                         else f"{report.fmt_bytes(jax_rss)} process peak RSS (CPU)")),
        ("FLOPs/image (analytic)", f"{g(per_image['train'])} GFLOP  [student fwd {g(per_image['student_fwd'])} x3 + "
                                   f"teacher fwd {g(per_image['teacher_fwd'])}; ViT@{c.global_crop_size} "
                                   f"{per_image['vit_global'] / 1e9:.3f}, ViT@{c.local_crop_size} "
                                   f"{per_image['vit_local'] / 1e9:.3f}, head {per_image['head'] / 1e9:.4f}]"),
        ("FLOPs/step analytic", f"{analytic / 1e9:.1f} GFLOP"),
        ("FLOPs/step XLA", "n/a" if xla is None else f"{xla / 1e9:.1f} GFLOP (cost_analysis)"),
        ("FLOP ratio analytic/XLA", "n/a" if not xla else f"{analytic / xla:.3f}"),
        ("achieved", f"{achieved:.3f} TFLOP/s (analytic FLOPs)"),
        ("peak", f"{peak:.3f} TFLOP/s per device ({peak_src})"),
        ("MFU", f"{100 * mfu:.1f} %"),
        ("host callbacks in step", str(step.host_callbacks())),
        ("dots by dtype", ", ".join(f"{k} x{v}" for k, v in sorted(jax_step.dot_dtypes(step.lowered.as_text()).items()))
                          or "n/a"),
    ]
    if torch_step is not None:
        t_mem = (f"{report.fmt_bytes(torch.cuda.max_memory_allocated())} device" if tdev.type == "cuda" else
                 f"+{report.fmt_bytes(max(report.peak_rss_bytes() - rss_before_torch, 0))} RSS over JAX's "
                 "(same process)")
        probe_dtype = str(torch_step.autocast or torch.float32).split(".")[-1]
        rows += [
            ("torch", f"{torch.__version__} on {tdev.type}, {'autocast bf16' if torch_step.autocast else 'fp32'}, "
                      f"threads {torch.get_num_threads()}, "
                      f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, tests/torch_reference.py train_step"),
            ("torch step (median)", report.timing(torch_times)),
            ("torch step CPU time", f"{report.median(torch_cpu):.2f} CPU-s"),
            ("torch images/s", f"{c.batch_size / report.median(torch_times):.2f}"),
            ("torch memory", t_mem),
            ("torch matmul probe", f"{torch_step.matmul_probe_tflops():.3f} TFLOP/s (2048^3 {probe_dtype}, best of "
                                   "8: the CPU peak probe's matmul)"),
        ]
    report.print_table(rows)
    print(f"images_per_second={ips:.3f}")
    print(f"mfu={mfu:.4f}")
    if xla:
        print(f"flops_ratio_analytic_over_xla={analytic / xla:.4f}")
    if FLAGS.profile_steps:
        trace_dir = FLAGS.profile_dir or tempfile.mkdtemp(prefix="train_step_trace_")
        report.print_profile(jax_step.profile_top_ops(step.run, FLAGS.profile_steps, trace_dir),
                             FLAGS.profile_steps, trace_dir)
    if torch_step is not None:
        print(f"ratio_cpu_time_torch_over_jax={report.median(torch_cpu) / jax_cpu:.3f}")
        print(f"ratio_jax_over_torch={report.median(torch_times) / jax_s:.3f}")


if __name__ == "__main__":
    from dino_jax import malloc_tuning

    malloc_tuning.reexec_with_malloc_tuning(one_arena=True)  # big steps: XLA:CPU's per-step block kept mapped
    flags.mark_flag_as_required("config")
    app.run(main)
