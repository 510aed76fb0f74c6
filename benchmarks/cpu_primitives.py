"""The step's elementwise primitives on their own, JAX (jitted) against torch, at ViT-Ti/16 multi-crop shapes.

    python benchmarks/cpu_primitives.py [--calls 20]

Exact GELU forward on the MLP activations (5520 tokens x 768: 16 global + 64 local crops of a batch of 8), LayerNorm
forward + backward on (5520, 192), softmax forward + backward on the global crops' attention (48, 197, 197). Median
wall time of --calls calls after one warm-up; torch uses its default threads and autograd for the backward. Used to
tell a slow kernel from a slow arrangement inside the whole step (docs/benchmarks_history.md).
"""
import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as benchmarks.train_step --compare_torch
if __name__ == "__main__":  # the harness's malloc settings: otherwise every JAX output is fresh zeroed pages
    from dino_jax import malloc_tuning

    malloc_tuning.reexec_with_malloc_tuning(one_arena=True)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


def median_ms(fn, calls):
    jax.block_until_ready(fn())
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def layer_norm(x):
    mean = x.mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(((x - mean) ** 2).mean(-1, keepdims=True) + 1e-6)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = []

    x = rng.standard_normal((5520, 768), np.float32)
    gelu = jax.jit(lambda v: 0.5 * v * (1 + jax.lax.erf(v * np.float32(np.sqrt(0.5)))))
    xj, xt = jnp.asarray(x), torch.from_numpy(x)
    rows.append(("exact GELU forward, (5520, 768)", median_ms(lambda: gelu(xj), args.calls),
                 median_ms(lambda: torch.nn.functional.gelu(xt), args.calls)))

    h = rng.standard_normal((5520, 192), np.float32)
    ln_grad = jax.jit(jax.grad(lambda v: jnp.sum(layer_norm(v) * v)))
    hj, ht = jnp.asarray(h), torch.from_numpy(h).requires_grad_()

    def torch_ln():
        (torch.nn.functional.layer_norm(ht, (192,), eps=1e-6) * ht.detach()).sum().backward()

    rows.append(("LayerNorm forward + backward, (5520, 192)", median_ms(lambda: ln_grad(hj), args.calls),
                 median_ms(torch_ln, args.calls)))

    s = rng.standard_normal((48, 197, 197), np.float32)
    softmax_grad = jax.jit(jax.grad(lambda v: jnp.sum(jax.nn.softmax(v, -1) * v)))
    sj, st = jnp.asarray(s), torch.from_numpy(s).requires_grad_()

    def torch_softmax():
        (torch.softmax(st, -1) * st.detach()).sum().backward()

    rows.append(("softmax forward + backward, (48, 197, 197)", median_ms(lambda: softmax_grad(sj), args.calls),
                 median_ms(torch_softmax, args.calls)))

    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)")
    print("| op, shape | JAX | torch |")
    print("|---|---|---|")
    for name, a, b in rows:
        print(f"| {name} | {a:.1f} ms | {b:.1f} ms |")


if __name__ == "__main__":
    main()
