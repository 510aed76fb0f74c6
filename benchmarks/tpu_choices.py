"""The model's backend choices, compared on the compiled TPU program: memory and flops per chip for each variant.

    python benchmarks/tpu_choices.py --config=configs/vits16.py --topology=v5e:2x4 [--batch_size=N]
        [--variants=f32,f32_dpa,f32_autodiff,bf16,bf16_dpa,bf16_autodiff] [--config.KEY=VALUE ...]

Each variant is the trainer's step (`tpu_aot.analyse`, 64 images per chip unless --batch_size) with one choice changed:

  f32 / bf16            the compute dtype (`config.dtype`), einsum attention, the custom backward passes of
                        `models/vit.py` (softmax, LayerNorm, GELU keep only what PyTorch's backward keeps) and of
                        the head's weight-normalised prototypes (`models/head.py`)
  *_dpa                 `config.attention=dot_product_attention` (XLA's fused attention where the backend has it)
  *_autodiff            plain autodiff of the same forwards instead of their custom backward passes

The custom backward passes were written for XLA:CPU (docs/benchmarks_history.md); this says what they cost or save
where the product runs. Prints one row per variant: memory per chip (arguments + temporaries + undonated outputs),
temporaries, TFLOP per chip, the work split and compile time.
"""
from __future__ import annotations

import contextlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tpu_aot  # noqa: E402  (sets JAX_PLATFORMS and the repository path before jax is imported)

VARIANTS = {  # name -> (config changes, plain autodiff?)
    "f32": ({"dtype": "float32", "attention": "einsum"}, False),
    "f32_dpa": ({"dtype": "float32", "attention": "dot_product_attention"}, False),
    "f32_autodiff": ({"dtype": "float32", "attention": "einsum"}, True),
    "bf16": ({"dtype": "bfloat16", "attention": "einsum"}, False),
    "bf16_dpa": ({"dtype": "bfloat16", "attention": "dot_product_attention"}, False),
    "bf16_autodiff": ({"dtype": "bfloat16", "attention": "einsum"}, True),
}


@contextlib.contextmanager
def plain_autodiff():
    """Every custom_vjp of the model (vit.py's softmax, layer_norm and gelu; head.py's gelu, inverse_column_norm and
    scale_columns) replaced by its own forward (`fun`), which JAX then differentiates by autodiff."""
    from dino_jax.models import head, vit

    replaced = [(vit, "softmax"), (vit, "layer_norm"), (vit, "gelu"), (head, "gelu"),
                (head, "inverse_column_norm"), (head, "scale_columns")]
    saved = [getattr(module, name) for module, name in replaced]
    for (module, name), fn in zip(replaced, saved):
        setattr(module, name, fn.fun)
    try:
        yield
    finally:
        for (module, name), fn in zip(replaced, saved):
            setattr(module, name, fn)


def run(config, topology: str, batch_size: int, names: list[str]) -> list[tuple[str, dict]]:
    rows = []
    for name in names:
        changes, autodiff = VARIANTS[name]
        c = config.copy_and_resolve_references()
        c.update(changes)
        with plain_autodiff() if autodiff else contextlib.nullcontext():
            rows.append((name, tpu_aot.analyse(c, topology, batch_size)))
        print(f"{name}: done in {rows[-1][1]['compile_s']:.0f} s", file=sys.stderr, flush=True)
    return rows


def table(rows) -> str:
    gib = lambda b: f"{b / tpu_aot.GIB:.2f}"  # noqa: E731
    lines = ["| variant | memory per chip (GiB) | temporaries (GiB) | TFLOP per chip | work split | fits | compile |",
             "|---|---|---|---|---|---|---|"]
    for name, r in rows:
        k = r["devices_per_chip"]
        temp = gib(r["per_device"]["temporaries"] * k) if "per_device" in r else "-"
        tflop = f"{r['flops_per_device'] * k / 1e12:.3f}" if "flops_per_device" in r else "-"
        lines.append(f"| {name} | {gib(r['per_chip_bytes'])} of {gib(r['hbm_bytes'])} | {temp} | {tflop} | "
                     f"{r['work_split']:.3f} | {int(r['fits'])} | {r['compile_s']:.0f} s |")
    r = rows[0][1]
    lines.append(f"{r['topology']}, global batch {r['global_batch']} ({r['batch_per_chip']:g} per chip)")
    return "\n".join(lines)


def main(argv):
    from absl import flags

    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments: {argv[1:]}")
    names = [v.strip() for v in flags.FLAGS.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        raise SystemExit(f"error: unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    try:
        rows = run(flags.FLAGS.config, flags.FLAGS.topology, flags.FLAGS.batch_size, names)
    except (ValueError, RuntimeError) as e:
        raise SystemExit(f"error: {e}")
    print(table(rows))


if __name__ == "__main__":
    from absl import app, flags

    tpu_aot.define_flags()
    flags.DEFINE_string("variants", ",".join(VARIANTS), "Comma-separated variants to compile.")
    app.run(main)
