"""The reference DINOHead: MLP -> L2 normalise -> weight-normalised prototypes.

Parameter tree: mlp_{j}/{kernel,bias} for the Linears (and bn_{j}/{scale,bias} with use_bn), then
last_layer/weight_v (bottleneck, K) and, only when norm_last_layer=False, last_layer/weight_g (1, K).
With norm_last_layer=True the reference fixes g to 1 and never trains it, so it is not a parameter here.
g is stored 2-D like the reference's (K, 1) weight_g so that the weight-decay rule (decay everything that is
not a bias and not 1-D) decays it exactly as the reference does.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from dino_jax.models.vit import dense_init, gelu, torch_default_uniform


class BatchStatNorm(nn.Module):
    """BatchNorm1d in training mode (the reference's head is never put in eval mode): batch statistics, eps 1e-5.

    The batch mean inside `jit` over a sharded batch is the global mean, i.e. the reference's SyncBatchNorm.
    Running statistics are not kept because nothing in DINO ever reads them.
    """

    @nn.compact
    def __call__(self, x):
        x = x.astype(jnp.float32)
        mean = x.mean(0)
        var = ((x - mean) ** 2).mean(0)
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],))
        return (x - mean) * jax.lax.rsqrt(var + 1e-5) * scale + bias


class DINOHead(nn.Module):
    out_dim: int
    use_bn: bool = False
    norm_last_layer: bool = True
    nlayers: int = 3
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    dtype: jnp.dtype = jnp.float32  # compute dtype of the MLP; normalisation and prototypes run in float32

    @nn.compact
    def __call__(self, x):
        nlayers = max(self.nlayers, 1)
        widths = [self.hidden_dim] * (nlayers - 1) + [self.bottleneck_dim]
        for j, width in enumerate(widths):
            x = nn.Dense(width, dtype=self.dtype, kernel_init=dense_init, name=f"mlp_{j}")(x)
            if j < nlayers - 1:
                if self.use_bn:
                    x = BatchStatNorm(name=f"bn_{j}")(x)
                x = gelu(x)
        x = x.astype(jnp.float32)
        x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
        return WeightNormPrototypes(self.out_dim, self.norm_last_layer, name="last_layer")(x)


class WeightNormPrototypes(nn.Module):
    """Linear(bottleneck -> K, no bias) under weight norm: w_k = g_k * v_k / ||v_k||.

    Computed as (x @ v) * (g / ||v||), which is the same function: it scales the (n, K) output rather than the
    (bottleneck, K) weight, so XLA:CPU cannot fuse the normalisation into the matmul. Both sums over the rows of a
    K-wide array (the column norms of v; the scale's gradient) avoid XLA:CPU's reduction over a major axis, which
    ran at a few GB/s there: 120 ms for the (256, 65536) norm; the ViT-Ti/16 step at K = 65536 is 13.5 % faster
    without it (docs/benchmarks_history.md).
    """
    out_dim: int
    norm_last_layer: bool = True

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        v = self.param("weight_v", torch_default_uniform(d), (d, self.out_dim))
        scale = inverse_column_norm(v)
        if not self.norm_last_layer:
            scale = scale * self.param("weight_g", nn.initializers.ones, (1, self.out_dim))
        return scale_columns(x @ v, scale)


def _column_sum_of_squares(v):
    """sum(v**2, axis=0, keepdims=True); on a CPU a loop adding one row at a time (4 ms instead of 120 ms for the
    (256, 65536) prototypes). v is a parameter, never split over devices, so the loop's row slices stay local."""
    def row_loop(v):
        def add_row(i, acc):
            return acc + jnp.square(jax.lax.dynamic_index_in_dim(v, i, 0, keepdims=True))
        return jax.lax.fori_loop(0, v.shape[0], add_row, jnp.zeros((1, v.shape[1]), v.dtype))

    return jax.lax.platform_dependent(v, cpu=row_loop,
                                      default=lambda v: jnp.sum(jnp.square(v), axis=0, keepdims=True))


@jax.custom_vjp
def inverse_column_norm(v):
    """1 / ||v||_2 over axis 0, shape (1, K). The backward is elementwise: d(1/n)/dv = -v / n^3."""
    return jax.lax.rsqrt(_column_sum_of_squares(v))


def _inverse_column_norm_fwd(v):
    s = inverse_column_norm(v)
    return s, (v, s)


def _inverse_column_norm_bwd(residuals, g):
    v, s = residuals
    return (-v * (g * s * s * s),)


inverse_column_norm.defvjp(_inverse_column_norm_fwd, _inverse_column_norm_bwd)


@jax.custom_vjp
def scale_columns(y, s):
    """y * s for y (n, K) and s (1, K). The gradient of s, a sum over the n rows, is a product with a row of
    ones: a dot where autodiff's reduction was slow on XLA:CPU (3 ms instead of 50 ms at n = 80, K = 65536), and one
    that contracts the batch axis, so a batch split over devices gives partial sums and an all-reduce."""
    return y * s


def _scale_columns_fwd(y, s):
    return y * s, (y, s)


def _scale_columns_bwd(residuals, g):
    y, s = residuals
    ones = jnp.ones((1, y.shape[0]), y.dtype)
    return g * s, jnp.dot(ones, g * y, precision=jax.lax.Precision.HIGHEST)


scale_columns.defvjp(_scale_columns_fwd, _scale_columns_bwd)
