"""How long the training loop waits in next() for a batch's host-to-device copy, with and without device prefetch.

    python benchmarks/device_prefetch.py [--batch 32] [--n_local 10] [--step_ms 200] [--steps 20]

Feeds `sharding.GlobalBatches` (what the training iterator uses) with in-memory host batches of the reference's
multi-crop shapes (2x224 + 10x96 per image, float32), so decoding and augmentation cost nothing, and between batches
runs a stand-in train step: a jitted matmul loop on the devices lasting about --step_ms. Prints, per setting, the
median time the main thread spent inside next() and the wall time per step. No tensorflow, so it runs on the GPU
image. On a CPU, XLA_FLAGS=--xla_force_host_platform_device_count=8 splits each batch over 8 simulated devices.
"""
import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dino_jax import sharding  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--n_local", type=int, default=10)
    parser.add_argument("--step_ms", type=float, default=200.0)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    mesh = sharding.make_mesh()
    batch_sharding = sharding.batch_sharding(mesh)
    rng = np.random.default_rng(0)
    host = {"global": rng.standard_normal((args.batch, 2, 224, 224, 3), np.float32),
            "local": rng.standard_normal((args.batch, args.n_local, 96, 96, 3), np.float32)}

    def host_batches():
        while True:
            yield host
    megabytes = sum(v.nbytes for v in host.values()) / 2 ** 20

    @jax.jit
    def work(x, n):
        return jax.lax.fori_loop(0, n, lambda i, y: jnp.tanh(y @ y), x)

    x = jnp.ones((256, 256)) * 0.01
    work(x, 1).block_until_ready()
    t0 = time.perf_counter()
    work(x, 100).block_until_ready()
    reps = max(int(args.step_ms / ((time.perf_counter() - t0) * 1e3 / 100)), 1)

    print(f"{'devices':<18}{len(jax.devices())} x {jax.devices()[0].device_kind} ({jax.devices()[0].platform})")
    print(f"{'batch':<18}{args.batch} images, 2x224 + {args.n_local}x96, {megabytes:.0f} MiB float32 per batch")
    print("| device_prefetch | main thread in next() (median) | wall per step (median) |")
    print("|---|---|---|")
    for device_prefetch in (0, 2):
        it = sharding.GlobalBatches(host_batches(), batch_sharding, prefetch=device_prefetch)
        for _ in range(3):
            work(x, reps).block_until_ready()
            next(it)
        waits, walls = [], []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            batch = next(it)
            t1 = time.perf_counter()
            out = work(x, reps)  # the step, dispatched asynchronously as the real one
            jax.block_until_ready((out, batch))
            waits.append(t1 - t0)
            walls.append(time.perf_counter() - t0)
        it.close()
        print(f"| {device_prefetch} | {statistics.median(waits) * 1e3:.1f} ms | {statistics.median(walls) * 1e3:.1f} ms |")


if __name__ == "__main__":
    main()
