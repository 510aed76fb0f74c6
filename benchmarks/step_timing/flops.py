"""Model FLOPs counted by hand (multiply-add = 2; matmuls and the patch convolution only), XLA's own count, and the
peak a device could reach, so that MFU has a stated numerator and denominator."""
from __future__ import annotations

import time

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
    """Student: 3x forward (forward + backward) over all crops; teacher: 1x forward over the 2 global crops."""
    mlp_hidden = int(backbone.embed_dim * backbone.mlp_ratio)
    vit = lambda s: vit_forward_flops(s, backbone.patch_size, backbone.embed_dim, backbone.depth, mlp_hidden)  # noqa
    head = head_forward_flops(backbone.embed_dim, c.out_dim, c.head_nlayers, c.head_hidden_dim, c.head_bottleneck_dim)
    n_local = c.local_crops_number
    student_fwd = 2 * vit(c.global_crop_size) + n_local * vit(c.local_crop_size) + (2 + n_local) * head
    teacher_fwd = 2 * vit(c.global_crop_size) + 2 * head
    return dict(vit_global=vit(c.global_crop_size), vit_local=vit(c.local_crop_size), head=head,
                student_fwd=student_fwd, teacher_fwd=teacher_fwd, train=3 * student_fwd + teacher_fwd)


def xla_flops(compiled):
    """XLA's count for the compiled step (elementwise work, loss and optimiser included), None where not reported."""
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


def matmul_probe_tflops(dtype, n: int = 2048, reps: int = 8) -> float:
    """Best-of-`reps` throughput of one jitted n x n x n matmul on the default device (the CPU 'peak')."""
    import jax

    a = jax.random.normal(jax.random.PRNGKey(0), (n, n)).astype(dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n)).astype(dtype)
    f = jax.jit(lambda x, y: x @ y)
    return best_matmul_tflops(lambda: f(a, b).block_until_ready(), n, reps)


def device_peak(device, dtype: str) -> tuple[float, str]:
    """(peak TFLOP/s per device, where it comes from): a probe on a CPU, the datasheet table elsewhere."""
    import jax.numpy as jnp

    if device.platform == "cpu":
        probe_dtype = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
        return (matmul_probe_tflops(probe_dtype),
                f"measured: jitted 2048^3 {jnp.dtype(probe_dtype).name} matmul, best of 8")
    kind = device.device_kind.lower()
    match = next((k for k in PEAKS if k in kind), None)
    if match is None:
        return float("nan"), f"unknown device kind {kind!r}: pass --peak_tflops"
    bf16 = dtype == "bfloat16"
    return PEAKS[match][0 if bf16 else 1], f"datasheet dense {'bf16' if bf16 else 'tf32/f32-default'} for {match!r}"
