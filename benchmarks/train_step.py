"""Speed of the real DINO training step (dino.make_train_step + sharding.jit_train_step), optionally against the
independent PyTorch reference step (tests/torch_reference.py).

    python benchmarks/train_step.py --config=configs/vits16.py [--batch_size N] [--dtype bfloat16|float32]
        [--local_crops_number L] [--attention einsum|dot_product_attention] [--remat] [--out_dim K]
        [--backbone_chunks C]
        [--compare_torch] [--peak_tflops X] [--steps N] [--repeats R] [--set key=value ...] [--profile_steps N]

CPU example (ViT-Ti/16, 2x224 + 8x96 crops, float32):
    python benchmarks/train_step.py --config=configs/vitt16.py --batch_size 8 --out_dim 4096 --compare_torch

Batches are synthetic and already on the devices (sharded over the `data` axis), so input is not measured.
The step time is the median of single steps (each ended with block_until_ready) after a warm-up. With
--compare_torch, JAX and torch steps are timed in interleaved rounds (R rounds of N JAX steps then N torch steps)
so that load from other processes hits both alike; the last line is `ratio_jax_over_torch=X` (JAX images/s over
torch images/s). Model FLOPs are counted analytically (matmuls only: patch embed, qkv, attention scores and
weighted sum, proj, MLP, head incl. the K-wide prototypes; student 3x forward on all crops, teacher 1x forward on
the 2 global crops) and checked against XLA's cost analysis of the compiled step. MFU uses the analytic count.
--profile_steps traces a few more steps and prints the traced time by op kind (where the time goes).
Imports neither tensorflow nor dino_jax.data.
"""
from __future__ import annotations

import argparse
import ast
import importlib.util
import os
import platform
import resource
import re
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
from steal import stolen_cpu_seconds, stolen_share  # noqa: E402

# Peak dense matmul throughput per chip, TFLOP/s, keyed by a substring of jax's device_kind (lower case).
# bf16: NVIDIA H100 SXM datasheet 1,979 TFLOP/s "with sparsity", i.e. 989.4 dense; TF32 989 sparse = 494.7 dense
# (H100 PCIe: 756 bf16 dense, 378 TF32 dense). H200 has the H100 SXM's compute (989.4 / 494.7). f32 on a GPU: JAX's
# default matmul precision lets XLA use TF32 tensor cores for float32 dots, so the TF32 peak is the honest one.
# TPU: v4 275, v5e 197, v5p 459, v6e 918 bf16 (Google Cloud TPU docs); float32 dots at default precision run as
# bf16 passes on the MXU, so the same peak is used. CPU: measured with a matmul probe (no fixed number).
PEAKS = {  # kind substring: (bf16, float32)
    "h100 pcie": (756.0, 378.0),
    "h100": (989.4, 494.7),
    "h200": (989.4, 494.7),
    "a100": (312.0, 156.0),
    "tpu v4": (275.0, 275.0),
    "tpu v5 lite": (197.0, 197.0),
    "tpu v5e": (197.0, 197.0),
    "tpu v5p": (459.0, 459.0),
    "tpu v5": (459.0, 459.0),
    "tpu v6": (918.0, 918.0),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="config file, optionally path:variant (e.g. configs/vits16.py)")
    p.add_argument("--batch_size", type=int, help="GLOBAL batch (default: the config's, capped to 8 on CPU)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"])
    p.add_argument("--local_crops_number", type=int)
    p.add_argument("--attention", choices=["einsum", "dot_product_attention"])
    p.add_argument("--remat", action="store_true", default=None)
    p.add_argument("--out_dim", type=int, help="prototypes K (65536 is heavy on a CPU)")
    p.add_argument("--backbone_chunks", type=int,
                   help="independent backbone calls per crop size (config.backbone_chunks; see benchmarks/README.md)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key (python literal or string), repeatable")
    p.add_argument("--compiler_option", action="append", default=[], metavar="KEY=VALUE",
                   help="XLA option for this compile only, repeatable (e.g. xla_cpu_experimental_ynn_fusion_type= "
                        "turns XLA:CPU's YNNPACK fusions off, which fixes a 3x slow teacher prototype matmul at K=65536)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per round")
    p.add_argument("--repeats", type=int, default=3, help="rounds (JAX and torch interleaved)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--compare_torch", action="store_true")
    p.add_argument("--torch_threads", type=int, default=0, help="torch CPU threads (0: all cores, as XLA uses)")
    p.add_argument("--omp_wait_policy", default="PASSIVE", choices=["PASSIVE", "ACTIVE", "default"],
                   help="OMP_WAIT_POLICY for torch's OpenMP pool (set before torch loads unless already in the "
                        "environment). PASSIVE is torch's better setting on a shared CPU: spinning OpenMP threads "
                        "that wait at barriers for descheduled peers multiplied torch's step time by 3-7x under load")
    p.add_argument("--peak_tflops", type=float, help="device peak for MFU (default: table by device kind; CPU: probe)")
    p.add_argument("--steps_per_epoch", type=int, default=1000, help="only sizes the schedules")
    p.add_argument("--keep_freeze", action="store_true",
                   help="keep the config's freeze_last_layer (default 0: time the steady-state step, prototypes "
                        "updated, as in every epoch after the first)")
    p.add_argument("--no_batch_cap", action="store_true", help="on CPU, do not cap the batch to 8")
    p.add_argument("--dump_hlo", help="write the optimized HLO of the step to this file")
    p.add_argument("--profile_steps", type=int, default=0,
                   help="after timing, trace this many steps with jax.profiler and print the ops that take the most "
                        "time (device ops where the trace has a device; the trace is kept in --profile_dir)")
    p.add_argument("--profile_dir", help="where to keep the profiler trace (default: a temporary folder)")
    args = p.parse_args(argv)
    if args.profile_steps < 0:
        p.error(f"--profile_steps={args.profile_steps}: pass a number of steps to trace (0: no profile)")
    return args


def load_config(spec: str):
    path, _, variant = spec.partition(":")
    if not os.path.exists(path) and os.path.exists(os.path.join(REPO, path)):
        path = os.path.join(REPO, path)
    mod_spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module.get_config(variant) if variant else module.get_config()


def parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


# --------------------------------------------------------------------------------------------------------------
# Analytic model FLOPs (multiply-add = 2 FLOPs; matmuls and the patch convolution only).


def vit_forward_flops(img: int, patch: int, dim: int, depth: int, mlp_hidden: int) -> int:
    g = (img // patch) ** 2
    n = g + 1  # + CLS
    patch_embed = 2 * g * (3 * patch * patch) * dim
    qkv, proj = 2 * n * dim * 3 * dim, 2 * n * dim * dim
    scores, weighted = 2 * n * n * dim, 2 * n * n * dim
    mlp = 2 * 2 * n * dim * mlp_hidden
    return patch_embed + depth * (qkv + scores + weighted + proj + mlp)


def head_forward_flops(dim: int, out_dim: int, nlayers: int, hidden: int, bottleneck: int) -> int:
    nlayers = max(nlayers, 1)
    widths = [dim] + [hidden] * (nlayers - 1) + [bottleneck]
    return sum(2 * a * b for a, b in zip(widths[:-1], widths[1:])) + 2 * bottleneck * out_dim


def model_flops_per_image(c, backbone) -> dict:
    mlp_hidden = int(backbone.embed_dim * backbone.mlp_ratio)
    vit = lambda s: vit_forward_flops(s, backbone.patch_size, backbone.embed_dim, backbone.depth, mlp_hidden)  # noqa
    head = head_forward_flops(backbone.embed_dim, c.out_dim, c.head_nlayers, c.head_hidden_dim, c.head_bottleneck_dim)
    n_local = c.local_crops_number
    student_fwd = 2 * vit(c.global_crop_size) + n_local * vit(c.local_crop_size) + (2 + n_local) * head
    teacher_fwd = 2 * vit(c.global_crop_size) + 2 * head
    return dict(vit_global=vit(c.global_crop_size), vit_local=vit(c.local_crop_size), head=head,
                student_fwd=student_fwd, teacher_fwd=teacher_fwd, train=3 * student_fwd + teacher_fwd)


# --------------------------------------------------------------------------------------------------------------
# Helpers.


def peak_rss_bytes() -> int:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb * (1 if platform.system() == "Darwin" else 1024)


def device_peak_bytes(devices):
    peaks = []
    for d in devices:
        try:
            stats = d.memory_stats()
        except Exception:  # noqa: BLE001 - some backends raise instead of returning None
            stats = None
        if not stats:
            return None
        peaks.append(stats.get("peak_bytes_in_use", stats.get("bytes_in_use", 0)))
    return max(peaks)


def xla_flops(compiled):
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def best_matmul_tflops(run_matmul, n: int, reps: int) -> float:
    """Throughput of the fastest of `reps` calls of `run_matmul` (one n x n x n matmul, finished when it returns)."""
    run_matmul()  # compile / warm up
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        run_matmul()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e12


def matmul_probe_tflops(jax, jnp, dtype, n: int = 2048, reps: int = 8) -> float:
    """Best-of-`reps` throughput of one jitted n x n x n matmul on the default device (the CPU 'peak')."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32).astype(dtype)
    f = jax.jit(lambda x, y: x @ y)
    return best_matmul_tflops(lambda: f(a, b).block_until_ready(), n, reps)


def torch_matmul_probe_tflops(torch, dtype, device, n: int = 2048, reps: int = 8) -> float:
    """The same probe for torch's matmul (MKL on a CPU): how far the two frameworks' kernels differ on this chip."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    return best_matmul_tflops(lambda: (a @ b, sync()), n, reps)


def cpu_model() -> str:
    """The host CPU's model name: CPU results depend on it (MKL and XLA:CPU pick kernels by vendor and ISA)."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or "unknown CPU"
    if "cpu family" in fields:  # VMs often report a generic name ("AMD EPYC"); family/model tell the generation
        name += f" (family {fields['cpu family']}, model {fields.get('model', '?')})"
    return name


def dot_dtypes(stablehlo_text: str) -> dict:
    """Count dot_general/convolution ops of the lowered step by operand and result element types."""
    counts: dict = {}
    for line in stablehlo_text.splitlines():
        m = re.search(r"stablehlo\.(dot_general|convolution)", line)
        sig = re.search(r":\s*\((tensor<[^)]*)\)\s*->\s*tensor<([^>]*)>", line)
        if not m or not sig:
            continue
        ins = sorted({t.split("x")[-1] for t in re.findall(r"tensor<([^>]*)>", sig.group(1))})
        key = f"{'dot' if m.group(1) == 'dot_general' else 'conv'} {'/'.join(ins)}->{sig.group(2).split('x')[-1]}"
        counts[key] = counts.get(key, 0) + 1
    return counts


def profile_top_ops(run_steps, n_steps: int, trace_dir: str, top: int = 15) -> list:
    """Trace `run_steps(n_steps)` and sum the traced events' durations by kind (the name without its numeric suffix:
    loop_fusion.12 and loop_fusion.7 are one row): [(ms per step, share, kind)], the
    events of the device processes (GPU/TPU streams) where the trace has any; on XLA:CPU the thunks (fusions, dots),
    without Python frames ('$...') and the runtime's scopes that enclose them."""
    import glob
    import gzip
    import json

    import jax

    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        run_steps(n_steps)
    files = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True))
    if not files:
        return []
    with gzip.open(files[-1], "rt") as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    names = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    device_pids = {pid for pid, name in names.items() if re.search(r"/device:(GPU|TPU)|gpu|tpu", name, re.I)}
    totals: dict = {}
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        if device_pids and e.get("pid") not in device_pids:
            continue
        if not device_pids and re.match(r"\$|ThunkExecutor|PjitFunction|.*ThreadPool", e["name"]):
            continue
        kind = re.sub(r"([._]\d+)+$", "", e["name"])
        totals[kind] = totals.get(kind, 0.0) + e["dur"] / 1e3
    whole = sum(totals.values()) or 1.0
    ranked = sorted(totals.items(), key=lambda kv: -kv[1])[:top]
    return [(ms / n_steps, ms / whole, name) for name, ms in ranked]


def fmt_bytes(n):
    return "n/a" if n is None else f"{n / 2 ** 30:.2f} GiB"


def median(xs):
    return statistics.median(xs) if xs else float("nan")


# --------------------------------------------------------------------------------------------------------------
# The PyTorch reference step.


class TorchStep:
    """tests/torch_reference.py's student/teacher, DINOLoss, AdamW and train_step on the same shapes and config."""

    def __init__(self, c, batch_size, steps_per_epoch, dtype, device):
        import numpy as np
        import torch

        sys.path.insert(0, os.path.join(REPO, "tests"))
        import torch_reference as R
        from dino_jax import schedules

        self.torch, self.R, self.device = torch, R, device
        torch.manual_seed(0)
        bkw = dict(img_size=c.global_crop_size, pos_interp=c.get("pos_embed_interp", "offset"))
        arch = c.arch
        if arch == "vit_custom":
            bkw.update(embed_dim=c.embed_dim, depth=c.depth, num_heads=c.num_heads)
            arch = lambda patch_size, **kw: R.VisionTransformer(patch_size=patch_size, **kw)  # noqa: E731
        hkw = dict(nlayers=c.head_nlayers, hidden_dim=c.head_hidden_dim, bottleneck_dim=c.head_bottleneck_dim)
        student, teacher = R.build_student_teacher(arch, c.patch_size, c.out_dim, c.drop_path_rate,
                                                   use_bn_in_head=c.use_bn_in_head,
                                                   norm_last_layer=c.norm_last_layer,
                                                   backbone_kwargs=bkw, head_kwargs=hkw)
        self.student, self.teacher = student.to(device).train(), teacher.to(device).train()
        ncrops = 2 + c.local_crops_number
        self.loss = R.DINOLoss(c.out_dim, ncrops, c.warmup_teacher_temp, c.teacher_temp,
                               c.warmup_teacher_temp_epochs, c.epochs, c.student_temp, c.center_momentum).to(device)
        self.opt = R.build_optimizer(self.student, c.optimizer)
        self.sched = schedules.training_schedules(c, steps_per_epoch)
        self.c, self.spe = c, steps_per_epoch
        g = torch.randn(2, batch_size, 3, c.global_crop_size, c.global_crop_size, device=device)
        loc = torch.randn(max(c.local_crops_number, 1), batch_size, 3, c.local_crop_size, c.local_crop_size,
                          device=device)
        self.images = [g[0], g[1]] + [loc[i] for i in range(c.local_crops_number)]
        self.autocast = None
        if device.type == "cuda" and dtype == "bfloat16":
            self.autocast = torch.bfloat16  # the reference uses fp16 + GradScaler; bf16 needs no scaler
        if device.type == "cuda" and dtype == "float32":
            torch.backends.cuda.matmul.allow_tf32 = True  # what JAX's default precision does for f32 dots
            torch.backends.cudnn.allow_tf32 = True
        self.it = 0
        del np

    def step(self):
        torch, R, c = self.torch, self.R, self.c
        it = self.it
        epoch = it // self.spe
        if self.autocast is None:  # exactly the reference step (fp32)
            R.train_step(self.student, self.teacher, self.loss, self.opt, self.images, epoch, it, self.sched["lr"],
                         self.sched["wd"], self.sched["momentum"], c.clip_grad, c.freeze_last_layer)
        else:  # main_dino's mixed-precision step: autocast around the forwards and the loss only
            for i, group in enumerate(self.opt.param_groups):
                group["lr"] = self.sched["lr"][it]
                if i == 0:
                    group["weight_decay"] = self.sched["wd"][it]
            with torch.autocast(self.device.type, dtype=self.autocast):
                t_out = self.teacher(self.images[:2])
                s_out = self.student(self.images)
                loss = self.loss(s_out, t_out, epoch)
            loss.item()
            self.opt.zero_grad()
            loss.backward()
            if c.clip_grad:
                R.clip_gradients(self.student, c.clip_grad)
            R.cancel_gradients_last_layer(epoch, self.student, c.freeze_last_layer)
            self.opt.step()
            R.ema_update(self.student, self.teacher, self.sched["momentum"][it])
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.it += 1


# --------------------------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    if args.compare_torch and args.omp_wait_policy != "default":
        os.environ.setdefault("OMP_WAIT_POLICY", args.omp_wait_policy)
    import jax
    import jax.numpy as jnp

    sys.path.insert(0, REPO)
    from dino_jax import dino, sharding

    c = load_config(args.config)
    devices = jax.devices()
    platform_name = devices[0].platform
    overrides = {}
    for key in ("dtype", "local_crops_number", "attention", "remat", "out_dim", "batch_size", "backbone_chunks"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    if "batch_size" not in overrides and platform_name == "cpu" and not args.no_batch_cap:
        overrides["batch_size"] = min(c.batch_size, 8 * len(devices))
    if not args.keep_freeze:
        overrides["freeze_last_layer"] = 0
    for kv in args.set:
        k, _, v = kv.partition("=")
        overrides[k] = parse_value(v)
    with c.unlocked():
        for k, v in overrides.items():
            c[k] = v
    dtype = c.get("dtype", "float32")
    mesh = sharding.make_mesh()
    sharding.check_batch_divisible(c.batch_size, mesh)
    bsz = c.batch_size

    # --- build the real step
    model = dino.build_model(c)
    state = dino.create_train_state(c, model, args.steps_per_epoch, jax.random.PRNGKey(c.seed))
    state = sharding.shard_state(state, mesh)
    step = sharding.jit_train_step(dino.make_train_step(c, args.steps_per_epoch), mesh)

    @jax.jit
    def make_batch(key):
        k1, k2 = jax.random.split(key)
        g, l_ = c.global_crop_size, c.local_crop_size
        return {"global": jax.random.normal(k1, (bsz, 2, g, g, 3), jnp.float32),
                "local": jax.random.normal(k2, (bsz, c.local_crops_number, l_, l_, 3), jnp.float32)}

    batches = [jax.device_put(make_batch(jax.random.PRNGKey(i)), sharding.batch_sharding(mesh)) for i in range(2)]
    jax.block_until_ready(batches)

    t0 = time.perf_counter()
    lowered = step.lower(state, batches[0])
    compiler_options = {}
    for kv in args.compiler_option:
        k, _, v = kv.partition("=")
        compiler_options[k] = parse_value(v) if v else ""
    compiled = lowered.compile(compiler_options=compiler_options or None)
    compile_s = time.perf_counter() - t0
    hlo = compiled.as_text() or ""
    if args.dump_hlo:
        with open(args.dump_hlo, "w") as f:
            f.write(hlo)
    host_callbacks = len(re.findall(r"custom_call_target=\"[^\"]*(callback|Callback)", hlo))
    xla = xla_flops(compiled)

    jax_cpu, torch_cpu, jax_faults = [], [], []

    def run_jax(n):
        nonlocal state
        times = []
        for i in range(n):
            t, cpu = time.perf_counter(), time.process_time()
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            state, metrics = compiled(state, batches[i % 2])
            jax.block_until_ready((state, metrics))
            times.append(time.perf_counter() - t)
            jax_cpu.append(time.process_time() - cpu)
            jax_faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
        return times, metrics

    _, metrics = run_jax(args.warmup)
    del jax_cpu[:], jax_faults[:]
    if not bool(metrics["finite"]):
        print("warning: the step produced a non-finite loss on random data", file=sys.stderr)
    jax_rss = peak_rss_bytes()
    jax_dev_peak = device_peak_bytes(devices)

    torch_step = None
    if args.compare_torch:
        import torch

        if platform_name == "cpu":
            torch.set_num_threads(args.torch_threads or os.cpu_count())
            tdev = torch.device("cpu")
        else:
            tdev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        torch_step = TorchStep(c, bsz, args.steps_per_epoch, dtype, tdev)
        rss_before_torch = peak_rss_bytes()
        for _ in range(args.warmup):
            torch_step.step()

    jax_times, torch_times = [], []
    timed_from, stolen_from = time.perf_counter(), stolen_cpu_seconds()
    for _ in range(args.repeats):
        jax_times += run_jax(args.steps)[0]
        if torch_step is not None:
            for _ in range(args.steps):
                t, cpu = time.perf_counter(), time.process_time()
                torch_step.step()
                torch_times.append(time.perf_counter() - t)
                torch_cpu.append(time.process_time() - cpu)

    stolen = stolen_share(stolen_from, time.perf_counter() - timed_from)

    # --- numbers
    flops = model_flops_per_image(c, model.backbone)
    analytic_step = flops["train"] * bsz
    # cost_analysis() of the compiled SPMD step counts the whole (global) batch: with 2 simulated CPU devices it
    # equals the 1-device count. Not yet checked on a multi-GPU/TPU mesh: compare the ratio there.
    xla_total = xla
    jax_step = median(jax_times)
    ips = bsz / jax_step
    if args.peak_tflops:
        peak, peak_src = args.peak_tflops, "--peak_tflops"
    elif platform_name == "cpu":
        probe_dtype = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
        peak = matmul_probe_tflops(jax, jnp, probe_dtype)
        peak_src = f"measured: jitted 2048^3 {jnp.dtype(probe_dtype).name} matmul, best of 8"
    else:
        kind = devices[0].device_kind.lower()
        match = next((k for k in PEAKS if k in kind), None)
        if match is None:
            peak, peak_src = float("nan"), f"unknown device kind {kind!r}: pass --peak_tflops"
        else:
            peak = PEAKS[match][0 if dtype == "bfloat16" else 1]
            peak_src = f"datasheet dense {'bf16' if dtype == 'bfloat16' else 'tf32/f32-default'} for {match!r}"
    total_peak = peak * len(devices)
    achieved = analytic_step / jax_step / 1e12
    mfu = achieved / total_peak

    rows = [
        ("device", f"{len(devices)} x {devices[0].device_kind} ({platform_name}), jax {jax.__version__}"
                   + (f"; host {cpu_model()}" if platform_name == "cpu" else "")),
        ("config", f"{args.config} arch={c.arch} p{c.patch_size} out_dim={c.out_dim} dtype={dtype} "
                   f"attention={c.get('attention', 'einsum')} remat={c.get('remat', False)} "
                   f"backbone_chunks={c.get('backbone_chunks', 1)}"),
        ("crops", f"2x{c.global_crop_size} + {c.local_crops_number}x{c.local_crop_size}, global batch {bsz}, "
                  f"drop_path {c.drop_path_rate}, freeze_last_layer {c.freeze_last_layer}"),
        ("compile", f"{compile_s:.2f} s" + (f"  options {compiler_options}" if compiler_options else "")),
        ("step (median)", f"{jax_step * 1e3:.1f} ms  [min {min(jax_times) * 1e3:.1f}, max {max(jax_times) * 1e3:.1f}, "
                          f"n={len(jax_times)}]"),
        ("step CPU time (median)", f"{median(jax_cpu):.2f} CPU-s (process user+sys; robust to other load)"),
        ("page faults per step", f"{median(jax_faults):.0f} minor (median; GLIBC_TUNABLES="
                                 f"{os.environ.get('GLIBC_TUNABLES', '')!r}, see dino_jax/malloc_tuning.py)"),
        ("images/s", f"{ips:.2f}"),
        ("load average (1 min)", f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"),
        ("CPU stolen by the host", f"{stolen} (timed rounds; other guests of a shared VM host)"),
        ("peak memory", (f"{fmt_bytes(jax_dev_peak)} device" if jax_dev_peak is not None
                         else f"{fmt_bytes(jax_rss)} process peak RSS (CPU)")),
        ("FLOPs/image (analytic)", f"{flops['train'] / 1e9:.2f} GFLOP  [student fwd {flops['student_fwd'] / 1e9:.2f}"
                                   f" x3 + teacher fwd {flops['teacher_fwd'] / 1e9:.2f}; ViT@{c.global_crop_size} "
                                   f"{flops['vit_global'] / 1e9:.3f}, ViT@{c.local_crop_size} "
                                   f"{flops['vit_local'] / 1e9:.3f}, head {flops['head'] / 1e9:.4f}]"),
        ("FLOPs/step analytic", f"{analytic_step / 1e9:.1f} GFLOP"),
        ("FLOPs/step XLA", "n/a" if xla_total is None else f"{xla_total / 1e9:.1f} GFLOP (cost_analysis)"),
        ("FLOP ratio analytic/XLA", "n/a" if not xla_total else f"{analytic_step / xla_total:.3f}"),
        ("achieved", f"{achieved:.3f} TFLOP/s (analytic FLOPs)"),
        ("peak", f"{peak:.3f} TFLOP/s per device ({peak_src})"),
        ("MFU", f"{100 * mfu:.1f} %"),
        ("host callbacks in step", str(host_callbacks)),
        ("dots by dtype", ", ".join(f"{k} x{v}" for k, v in sorted(dot_dtypes(lowered.as_text()).items())) or "n/a"),
    ]
    if torch_step is not None:
        import torch

        t_step = median(torch_times)
        torch_probe_dtype = torch.bfloat16 if torch_step.autocast is not None else torch.float32
        torch_probe = torch_matmul_probe_tflops(torch, torch_probe_dtype, torch_step.device)
        t_mem = (fmt_bytes(torch.cuda.max_memory_allocated()) + " device" if torch_step.device.type == "cuda"
                 else f"+{fmt_bytes(max(peak_rss_bytes() - rss_before_torch, 0))} RSS over JAX's (same process)")
        mode = ("fp32" if torch_step.autocast is None else "autocast bf16")
        rows += [
            ("torch", f"{torch.__version__} on {torch_step.device.type}, {mode}, "
                      f"threads {torch.get_num_threads()}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, "
                      "tests/torch_reference.py train_step"),
            ("torch step (median)", f"{t_step * 1e3:.1f} ms  [min {min(torch_times) * 1e3:.1f}, "
                                    f"max {max(torch_times) * 1e3:.1f}, n={len(torch_times)}]"),
            ("torch step CPU time", f"{median(torch_cpu):.2f} CPU-s"),
            ("torch images/s", f"{bsz / t_step:.2f}"),
            ("torch memory", t_mem),
            ("torch matmul probe", f"{torch_probe:.3f} TFLOP/s (2048^3 {str(torch_probe_dtype).split('.')[-1]}, "
                                   "best of 8: the CPU peak probe's matmul)"),
        ]
    width = max(len(k) for k, _ in rows)
    print("| " + "metric".ljust(width) + " | value |")
    print("|" + "-" * (width + 2) + "|-------|")
    for k, v in rows:
        print(f"| {k.ljust(width)} | {v} |")
    print(f"images_per_second={ips:.3f}")
    print(f"mfu={mfu:.4f}")
    if xla_total:
        print(f"flops_ratio_analytic_over_xla={analytic_step / xla_total:.4f}")
    if args.profile_steps:
        import tempfile

        trace_dir = args.profile_dir or tempfile.mkdtemp(prefix="train_step_trace_")
        top = profile_top_ops(run_jax, args.profile_steps, trace_dir)
        print(f"\ntop traced ops over {args.profile_steps} steps (trace in {trace_dir}):")
        print("| ms per step | share of traced time | op kind |")
        print("|---|---|---|")
        for ms, share, name in top:
            print(f"| {ms:.2f} | {100 * share:.1f} % | {name[:100]} |")
    if torch_step is not None:
        print(f"ratio_cpu_time_torch_over_jax={median(torch_cpu) / median(jax_cpu):.3f}")
        print(f"ratio_jax_over_torch={median(torch_times) / jax_step:.3f}")


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    from dino_jax import malloc_tuning

    malloc_tuning.reexec_with_malloc_tuning(one_arena=True)  # big steps: XLA:CPU's per-step block kept mapped
    main()
