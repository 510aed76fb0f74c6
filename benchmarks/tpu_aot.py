"""Compile the trainer's real train step for a TPU slice on this CPU host: memory, flops and collectives per chip.

    python benchmarks/tpu_aot.py --config=configs/vits16.py --topology=v5e:2x4 [--batch_size=N] [--config.KEY=VALUE]

Needs libtpu (the `test` extra installs it, as does `pip install "jax[tpu]"`), no TPU: XLA's TPU compiler runs here
on compile-only devices of the named slice. The step is `sharding.jit_train_step(dino.make_train_step(...), mesh)`,
the function and shardings train.py runs, on abstract inputs (state replicated, batch sharded on `data`).

Work split: the global work is XLA's flop count of the same step lowered for one CPU device at the global batch
(before optimisation; an HLO program's flops do not depend on the backend, and for ViT-S/16 this count, 7.296 TFLOP
per 64 images, is 0.3 % below the TPU executable's 7.317 per chip at 64 images), and work_split = global flops / (devices x the TPU
executable's flops per device): 1.0 when the data-parallel step divides the work, 1/devices when every device
computes the whole batch. Memory per device is arguments + temporaries + outputs - the outputs written in place of
donated arguments; a chip holds `devices_per_chip` devices (2 TensorCores per v4 chip in these compile-only
topologies, 1 elsewhere). The last line is `fits=0|1 hbm_fraction=X work_split=Y`.
"""
from __future__ import annotations

import collections
import os
import re
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host's own backend; TPU devices come from the topology
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compiling only: other processes may hold libtpu too
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

GIB = 2 ** 30
HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}  # per chip
TOPOLOGY_FORMS = {"v4": r"\d+x\d+x\d+", "v5e": r"\d+x\d+", "v5p": r"\d+x\d+x\d+", "v6e": r"\d+x\d+"}
ACCEPTED = "v4:AxBxC, v5e:AxB, v5p:AxBxC or v6e:AxB chips (e.g. v5e:2x4, v4:2x2x1, v5p:2x2x1, v6e:2x4, v5e:16x16)"
IMAGENET_TRAIN = 1281167  # examples per epoch, which sets the schedules' length (steps_per_epoch)
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
               "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}


def parse_topology(name: str) -> tuple[str, str]:
    """'v5e:2x4' -> ('v5e', '2x4'); any other form is a ValueError naming the accepted ones."""
    gen, _, dims = name.partition(":")
    if gen not in TOPOLOGY_FORMS or not re.fullmatch(TOPOLOGY_FORMS[gen], dims):
        raise ValueError(f"unknown TPU topology {name!r}: use {ACCEPTED}")
    return gen, dims


def libtpu_path() -> str:
    """libtpu.so, found as JAX finds it (TPU_LIBRARY_PATH or the libtpu package)."""
    from jax._src import cloud_tpu_init

    path = cloud_tpu_init.get_tpu_library_path()
    if path is None:
        raise RuntimeError("libtpu is not installed, so TPU programs cannot be compiled here: "
                           "pip install -e '.[test]' (or pip install \"jax[tpu]\")")
    return path


def topology_devices(name: str) -> list:
    """Compile-only devices of the TPU slice `name`."""
    from jax.experimental import topologies

    parse_topology(name)
    libtpu_path()
    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=name).devices)
    except Exception as e:
        if "INVALID_ARGUMENT" not in str(e):
            raise
        raise ValueError(f"TPU topology {name!r} rejected by libtpu ({str(e).splitlines()[0]}); use {ACCEPTED}")


def abstract_inputs(config, mesh, batch_size: int, steps_per_epoch: int):
    """ShapeDtypeStructs of the train state (replicated) and a batch of `batch_size` images (sharded on `data`)."""
    import jax
    import jax.numpy as jnp

    from dino_jax import dino, sharding

    model = dino.build_model(config)
    state = jax.eval_shape(lambda: dino.create_train_state(config, model, steps_per_epoch, jax.random.PRNGKey(0)))
    repl, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl), state)
    g, l, n_local = config.global_crop_size, config.local_crop_size, config.local_crops_number
    batch = {"global": jax.ShapeDtypeStruct((batch_size, 2, g, g, 3), jnp.float32, sharding=data),
             "local": jax.ShapeDtypeStruct((batch_size, n_local, l, l, 3), jnp.float32, sharding=data)}
    return state, batch


def collectives(hlo_text: str) -> dict:
    """{kind: (count, bytes of the results)} over the collective ops in an HLO module's text (an async start's
    result, which also holds its operands, counts whole)."""
    found = collections.defaultdict(lambda: [0, 0])
    pattern = re.compile(r"\s*(?:ROOT )?%\S+ = (.*?) (" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
    for line in hlo_text.splitlines():
        m = pattern.match(line)
        if m:
            shapes = re.findall(r"\b(" + "|".join(DTYPE_BYTES) + r")\[([\d,]*)\]", m.group(1))
            found[m.group(2)][0] += 1
            found[m.group(2)][1] += sum(DTYPE_BYTES[t] * _prod(d) for t, d in shapes)
    return {k: tuple(v) for k, v in sorted(found.items())}


def _prod(dims: str) -> int:
    n = 1
    for d in filter(None, dims.split(",")):
        n *= int(d)
    return n


def lower_step(config, devices, batch_size: int, steps_per_epoch: int):
    """The trainer's jitted step lowered for a mesh of `devices`, on abstract inputs."""
    from dino_jax import dino, sharding

    mesh = sharding.make_mesh(devices)
    sharding.check_batch_divisible(batch_size, mesh)
    state, batch = abstract_inputs(config, mesh, batch_size, steps_per_epoch)
    return sharding.jit_train_step(dino.make_train_step(config, steps_per_epoch), mesh).lower(state, batch)


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    return (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}


def analyse(config, topology: str, batch_size: int = 0, steps_per_epoch: int = 0) -> dict:
    """Compile the step for `topology` (and lower it for one CPU device for the work split); the table's fields.

    batch_size is the global batch (0: 64 images per chip); it replaces config.batch_size (the lr scaling reads it).
    """
    import jax

    gen, _ = parse_topology(topology)
    devices = topology_devices(topology)
    n = len(devices)
    chips = len({(d.process_index, tuple(d.coords)) for d in devices})
    per_chip = n // chips
    batch_size = batch_size or 64 * chips
    if batch_size % n:
        raise ValueError(f"batch_size={batch_size} must be divisible by the {n} devices of {topology}; "
                         f"pick a multiple of {n}")
    config = config.copy_and_resolve_references()
    config.batch_size = batch_size
    spe = steps_per_epoch or max(1, IMAGENET_TRAIN // batch_size)
    global_flops = float(_cost(lower_step(config, jax.devices("cpu")[:1], batch_size, spe)).get("flops", 0.0))
    print(f"compiling for {topology} ({n} devices), global batch {batch_size}...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        compiled = lower_step(config, devices, batch_size, spe).compile()
    except Exception as e:  # XLA:TPU refuses a program whose temporaries alone exceed HBM: report by how much
        used = re.search(r"\(([\d.]+)([KMGT])\) exceeds available HBM \(([\d.]+)([KMGT])\)", str(e))
        if used is None:
            raise
        need, have = (float(used.group(i)) * 2 ** (10 * " KMGT".index(used.group(i + 1))) for i in (1, 3))
        return {"topology": topology, "devices": n, "chips": chips, "devices_per_chip": per_chip,
                "hosts": len({d.process_index for d in devices}), "device_kind": devices[0].device_kind,
                "global_batch": batch_size, "batch_per_chip": batch_size / chips,
                "compile_s": time.perf_counter() - start, "fits": False, "hbm_fraction": need / have,
                "per_chip_bytes": need * per_chip, "hbm_bytes": have * per_chip, "work_split": float("nan"),
                "global_flops": global_flops, "xla_error": str(e).strip().splitlines()[0],
                "memory_label": "per chip: temporaries alone vs usable HBM"}
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    per_device = {"arguments": mem.argument_size_in_bytes, "temporaries": mem.temp_size_in_bytes,
                  "outputs": mem.output_size_in_bytes, "aliased": mem.alias_size_in_bytes}
    total = (per_device["arguments"] + per_device["temporaries"] + per_device["outputs"] - per_device["aliased"])
    hbm = HBM_GIB[gen] * GIB
    cost = _cost(compiled)
    flops = float(cost.get("flops", 0.0))
    return {
        "topology": topology, "devices": n, "chips": chips, "devices_per_chip": per_chip,
        "hosts": len({d.process_index for d in devices}), "device_kind": devices[0].device_kind,
        "global_batch": batch_size, "batch_per_chip": batch_size / chips, "compile_s": seconds,
        "per_device": per_device,
        "per_chip_bytes": total * per_chip, "hbm_bytes": hbm, "hbm_fraction": total * per_chip / hbm,
        "fits": total * per_chip <= hbm, "flops_per_device": flops, "global_flops": global_flops,
        "work_split": global_flops / (n * flops) if flops > 0 else float("nan"),
        "optimal_seconds": float(cost.get("optimal_seconds", -1.0)),
        "collectives": collectives(compiled.as_text()),
    }


def report(r: dict) -> str:
    """The table, ending with the `fits=0|1 hbm_fraction=X work_split=Y` line."""
    gib = lambda b: f"{b / GIB:.2f} GiB" if b >= GIB / 10 else f"{b / 2 ** 20:.1f} MiB"  # noqa: E731
    k = r["devices_per_chip"]
    rows = [
        ("topology", f"{r['topology']} ({r['device_kind']})"),
        ("chips / devices / hosts", f"{r['chips']} / {r['devices']} / {r['hosts']}"),
        ("global batch / per chip", f"{r['global_batch']} / {r['batch_per_chip']:g}"),
        ("compile time", f"{r['compile_s']:.0f} s"),
    ]
    if "per_device" in r:
        pd = r["per_device"]
        rows += [
            ("per chip: arguments", gib(pd["arguments"] * k)),
            ("per chip: temporaries", gib(pd["temporaries"] * k)),
            ("per chip: outputs", f"{gib(pd['outputs'] * k)} ({gib(pd['aliased'] * k)} of them in donated arguments)"),
        ]
    rows.append((r.get("memory_label", "per chip: total vs HBM"),
                 f"{gib(r['per_chip_bytes'])} of {gib(r['hbm_bytes'])} ({100 * r['hbm_fraction']:.1f} %)"))
    if "flops_per_device" in r:
        rows.append(("flops per chip", f"{r['flops_per_device'] * k / 1e12:.3f} TFLOP"))
    rows.append(("global flops / chips", f"{r['global_flops'] / r['chips'] / 1e12:.3f} TFLOP"))
    for kind, (count, size) in r.get("collectives", {}).items():
        rows.append((f"collective {kind} (per device)", f"{count} ops, {size / 2 ** 20:.1f} MiB"))
    if r.get("collectives") == {}:
        rows.append(("collectives", "none"))
    if r.get("optimal_seconds", -1.0) > 0:
        rows.append(("step time (XLA cost-model estimate)", f"{r['optimal_seconds'] * 1e3:.1f} ms"))
    if not r["fits"]:
        rows.append(("DOES NOT FIT", f"over the chip's HBM by {gib(r['per_chip_bytes'] - r['hbm_bytes'])}"
                                     + (f" (XLA: {r['xla_error']})" if "xla_error" in r else "")))
    width = max(len(a) for a, _ in rows)
    lines = [f"{a:<{width}}  {b}" for a, b in rows]
    lines.append(f"fits={int(r['fits'])} hbm_fraction={r['hbm_fraction']:.3f} work_split={r['work_split']:.3f}")
    return "\n".join(lines)


def main(argv):
    from absl import flags

    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments: {argv[1:]}")
    try:
        r = analyse(flags.FLAGS.config, flags.FLAGS.topology, flags.FLAGS.batch_size)
    except (ValueError, RuntimeError) as e:
        raise SystemExit(f"error: {e}")
    print(report(r))


def define_flags():
    """--config, --topology and --batch_size, the flags of this script and of tpu_choices.py."""
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Recipe file, e.g. configs/vits16.py.", lock_config=True)
    flags.DEFINE_string("topology", None, f"TPU slice: {ACCEPTED}.")
    flags.DEFINE_integer("batch_size", 0, "Global batch (default: 64 images per chip).")
    flags.mark_flags_as_required(["config", "topology"])


if __name__ == "__main__":
    from absl import app

    define_flags()
    app.run(main)
