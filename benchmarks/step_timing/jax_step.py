"""The trainer's own step (dino.make_train_step + sharding.jit_train_step) on synthetic batches already on the
devices, so that input is not measured; the state is donated, as in training. Imports neither tensorflow nor
dino_jax.data."""
from __future__ import annotations

import glob
import gzip
import json
import os
import re
import resource
import time


class JaxStep:
    """Compiles the step once; `run(n)` times n single steps, each ended with block_until_ready."""

    def __init__(self, c, steps_per_epoch: int, compiler_options: dict):
        import jax
        import jax.numpy as jnp

        from dino_jax import dino, sharding

        self.jax = jax
        mesh = sharding.make_mesh()
        sharding.check_batch_divisible(c.batch_size, mesh)
        self.model = dino.build_model(c)
        state = dino.create_train_state(c, self.model, steps_per_epoch, jax.random.PRNGKey(c.seed))
        self.state = sharding.shard_state(state, mesh)
        step = sharding.jit_train_step(dino.make_train_step(c, steps_per_epoch), mesh)

        @jax.jit
        def make_batch(key):
            k1, k2 = jax.random.split(key)
            g, l_, b = c.global_crop_size, c.local_crop_size, c.batch_size
            return {"global": jax.random.normal(k1, (b, 2, g, g, 3), jnp.float32),
                    "local": jax.random.normal(k2, (b, c.local_crops_number, l_, l_, 3), jnp.float32)}

        self.batches = [jax.device_put(make_batch(jax.random.PRNGKey(i)), sharding.batch_sharding(mesh))
                        for i in range(2)]
        jax.block_until_ready(self.batches)
        t0 = time.perf_counter()
        self.lowered = step.lower(self.state, self.batches[0])
        self.compiled = self.lowered.compile(compiler_options=compiler_options or None)
        self.compile_s = time.perf_counter() - t0
        self.cpu_seconds, self.page_faults = [], []  # per step: process user+sys, minor faults
        self.metrics = None

    def run(self, n: int) -> list:
        times = []
        for i in range(n):
            t, cpu = time.perf_counter(), time.process_time()
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            self.state, self.metrics = self.compiled(self.state, self.batches[i % 2])
            self.jax.block_until_ready((self.state, self.metrics))
            times.append(time.perf_counter() - t)
            self.cpu_seconds.append(time.process_time() - cpu)
            self.page_faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
        return times

    def host_callbacks(self) -> int:
        """Host callbacks in the compiled step: each one is a host sync inside the step."""
        return len(re.findall(r"custom_call_target=\"[^\"]*(callback|Callback)", self.compiled.as_text() or ""))


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
