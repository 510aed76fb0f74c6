"""The reference DINO VisionTransformer (facebookresearch/dino `vision_transformer.py`) in Flax linen.

Parameter tree (what `dino_jax.convert` maps to and from the reference state dict):

    patch_embed/{kernel (P,P,3,D), bias}      cls_token (1,1,D)      pos_embed (1,N+1,D)
    blocks_{i}/norm1, attn/qkv, attn/proj, norm2, mlp/fc1, mlp/fc2     norm/{scale,bias}

Inputs are NHWC. Exactness notes: LayerNorm eps 1e-6, exact (erf) GELU, fused qkv with the reference's
[q|k|v] row order, Linear init normal(0.02) (the reference's trunc_normal bounds are +-2 absolute, i.e.
effectively untruncated), PyTorch-default init for the patch conv, and PyTorch's bicubic (A=-0.75,
align_corners=False, no antialias) for position-embedding interpolation.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

Dtype = Any

LN_EPS = 1e-6
dense_init = nn.initializers.normal(stddev=0.02)


def torch_default_uniform(fan_in: int) -> Callable:
    """PyTorch's default Conv/Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kaiming_uniform with a=sqrt(5))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


# ----------------------------------------------------------------------------------------------------------
# PyTorch-style bicubic resampling of the position embedding.


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    """Keys cubic convolution weights for the 4 taps at offsets -1, 0, 1, 2 (PyTorch's A=-0.75)."""
    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def bicubic_matrix(n_in: int, n_out: int, scale_factor: float | None = None) -> np.ndarray:
    """(n_out, n_in) matrix M with M @ x == torch.nn.functional.interpolate(x, mode='bicubic') along one axis.

    With `scale_factor` the source coordinates follow PyTorch's `scale_factor=` path (src = (dst+0.5)/s - 0.5);
    without it, the `size=` path (src = (dst+0.5)*n_in/n_out - 0.5). Border taps are clamped like PyTorch's.
    """
    inv = (1.0 / scale_factor) if scale_factor else n_in / n_out
    inv = np.float32(inv)  # PyTorch computes the coordinate map in float32 for float32 inputs
    dst = np.arange(n_out, dtype=np.float32)
    src = inv * (dst + np.float32(0.5)) - np.float32(0.5)
    base = np.floor(src)
    w = _cubic_weights((src - base).astype(np.float64))
    m = np.zeros((n_out, n_in), np.float64)
    for tap in range(4):
        idx = np.clip(base.astype(np.int64) - 1 + tap, 0, n_in - 1)
        np.add.at(m, (np.arange(n_out), idx), w[:, tap])
    return m.astype(np.float32)


def interpolate_pos_embed(pos_embed: jax.Array, grid_hw: tuple[int, int], mode: str = "offset") -> jax.Array:
    """Resample a (1, 1+n*n, D) position embedding to a (h, w) patch grid the way the reference does.

    mode 'offset': the reference's current code (scale_factor = (h+0.1)/n), which shifts the sampling grid a little.
    mode 'exact': the exact ratio h/n used when the released checkpoints were trained.
    The stored embedding is returned untouched when the grid is the stored square grid, as in the reference.
    """
    n_stored = pos_embed.shape[1] - 1
    n = int(round(math.sqrt(n_stored)))
    h, w = grid_hw
    if h * w == n_stored and h == w:
        return pos_embed
    if n * n != n_stored:
        raise ValueError(f"pos_embed holds {n_stored} patch positions, not a square grid; cannot interpolate")
    if mode == "offset":
        mh, mw = bicubic_matrix(n, h, (h + 0.1) / n), bicubic_matrix(n, w, (w + 0.1) / n)
    elif mode == "exact":
        mh, mw = bicubic_matrix(n, h), bicubic_matrix(n, w)
    else:
        raise ValueError(f"pos_embed_interp must be 'offset' or 'exact', got {mode!r}")
    grid = pos_embed[0, 1:].reshape(n, n, -1).astype(jnp.float32)
    grid = jnp.einsum("hi,ijd,wj->hwd", mh, grid, mw, precision=jax.lax.Precision.HIGHEST)
    return jnp.concatenate([pos_embed[:, :1], grid.reshape(1, h * w, -1).astype(pos_embed.dtype)], axis=1)


# ----------------------------------------------------------------------------------------------------------
# Modules.


def _normal_cdf(x, sqrt_half=None):
    """Phi(x) = (1 + erf(x * sqrt(1/2))) / 2; the GELU backward passes its own copy of the constant."""
    if sqrt_half is None:
        sqrt_half = np.sqrt(0.5).astype(x.dtype)
    return 0.5 + 0.5 * jax.lax.erf(x * sqrt_half)


@jax.custom_vjp
def gelu(x):
    """Exact GELU in PyTorch's erf form, x * Phi(x).

    jax.nn.gelu's erfc form is slower on XLA:CPU; the custom backward keeps only x and recomputes the Gaussian
    cdf and pdf from it, as PyTorch's GeluBackward does.
    """
    return x * _normal_cdf(x)


def _gelu_fwd(x):
    return gelu(x), x


def _gelu_bwd(x, g):
    # On XLA:CPU the erf constant sits behind a barrier, so the backward's erf is not merged with the forward's:
    # merged, the forward writes erf out as a second activation-sized array for the backward to read (~3 % of the
    # ViT-Ti/16 step); apart, the backward recomputes it from x as PyTorch's GeluBackward does. Same values either way.
    sqrt_half = jax.lax.platform_dependent(np.sqrt(0.5).astype(x.dtype), cpu=jax.lax.optimization_barrier,
                                           default=lambda c: c)
    pdf = jnp.exp(-0.5 * x * x) * np.sqrt(0.5 / np.pi).astype(x.dtype)
    return (g * (_normal_cdf(x, sqrt_half) + x * pdf),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


@jax.custom_vjp
def softmax(x):
    """Softmax over the last axis with PyTorch's backward, y * (g - sum(g * y)), which keeps only the output y.

    jax.nn.softmax is differentiated through exp / sum by default (`jax_softmax_custom_jvp` is off): XLA:CPU then
    keeps exp, 1/sum and a materialised broadcast of it per attention map and fuses a longer backward; this form
    cut the ViT-Ti/16 step's CPU time by ~14 % (benchmarks/README.md). The forward is jax.nn.softmax's.
    """
    return jax.nn.softmax(x, axis=-1)


def _softmax_fwd(x):
    y = softmax(x)
    return y, y


def _softmax_bwd(y, g):
    return (y * (g - jnp.sum(g * y, axis=-1, keepdims=True)),)


softmax.defvjp(_softmax_fwd, _softmax_bwd)


def _layer_norm_stats(x, epsilon):
    """Mean and 1/std over the last axis, as flax's LayerNorm (fast variance E[x^2] - E[x]^2, clamped at 0)."""
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.maximum(0.0, jnp.mean(x * x, axis=-1, keepdims=True) - mean * mean)
    return mean, jax.lax.rsqrt(var + epsilon)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x, scale, bias, epsilon: float = LN_EPS):
    """LayerNorm over the last axis: flax's forward (the same ops), PyTorch's backward.

    The backward, dx = (g*scale - mean(g*scale) - xhat * mean(g*scale * xhat)) / std, keeps only x - mean and 1/std;
    autodiff of the forward makes XLA:CPU materialise broadcasts of the statistics per call and cost ~7 % more
    CPU time per ViT-Ti/16 step (benchmarks/README.md).
    """
    return _layer_norm_fwd(x, scale, bias, epsilon)[0]


def _layer_norm_fwd(x, scale, bias, epsilon):
    mean, rstd = _layer_norm_stats(x, epsilon)
    centred = x - mean
    return centred * (rstd * scale) + bias, (centred, rstd, scale)


def _layer_norm_bwd(epsilon, residuals, g):
    centred, rstd, scale = residuals
    xhat = centred * rstd
    gs = g * scale
    dx = rstd * (gs - jnp.mean(gs, axis=-1, keepdims=True) - xhat * jnp.mean(gs * xhat, axis=-1, keepdims=True))
    batch_axes = tuple(range(g.ndim - 1))
    return dx, jnp.sum(g * xhat, axis=batch_axes), jnp.sum(g, axis=batch_axes)


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nn.Module):
    """LayerNorm computed in float32 whatever the compute dtype (eps 1e-6 as in every reference factory); the
    parameters are flax nn.LayerNorm's (`scale`, `bias`, float32), so checkpoints and conversions are unchanged."""
    epsilon: float = LN_EPS

    @nn.compact
    def __call__(self, x):
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        return layer_norm(x.astype(jnp.float32), scale, bias, self.epsilon)


def _attend_scores_scaled(q, k, v, kernel, bias, dtype):
    """The reference's order: scores (B, H, N, N) scaled after q.k; output (B, N, C) through the proj Linear."""
    b, n, heads, head_dim = q.shape
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * head_dim ** -0.5
    attn = softmax(logits)
    out = jnp.einsum("bhqk,bkhd->bqhd", attn.astype(dtype), v).reshape(b, n, heads * head_dim)
    return out @ kernel + bias, attn


def _attend_q_scaled(q, k, v, kernel, bias, dtype):
    """XLA:CPU's form. q is scaled before the dot (the same numbers when the scale is a power of two, head_dim 64:
    1/8), so that YNNPACK's attention fusion need not read a (B, H, N, N) array of the constant in every block; the
    proj Linear contracts (head, head_dim) straight from the heads-major output instead of transposing it back.
    ~4 % of the ViT-Ti/16 step on Zen 3. CPU-only, like the GELU backward's barrier: compiled for TPU, the two
    together held 1.7 GiB more per chip (vits16 on v5e-8: 13.50 against 11.78 GiB)."""
    heads, head_dim = q.shape[2], q.shape[3]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q * jnp.asarray(head_dim ** -0.5, q.dtype), k).astype(jnp.float32)
    attn = softmax(logits)
    out = jnp.einsum("bhqk,bkhd->bhqd", attn.astype(dtype), v)
    return jnp.einsum("bhqd,hdc->bqc", out, kernel.reshape(heads, head_dim, -1)) + bias, attn


class LinearParams(nn.Module):
    """nn.Dense's parameters (kernel (in, out), bias), returned rather than applied: the attention contracts its proj
    kernel in a backend-dependent form. Same names, shapes and init as nn.Dense, so checkpoints are unchanged."""
    features: int

    @nn.compact
    def __call__(self, in_features: int, dtype: Dtype):
        kernel = self.param("kernel", dense_init, (in_features, self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        return kernel.astype(dtype), bias.astype(dtype)


class Attention(nn.Module):
    dim: int
    num_heads: int
    dtype: Dtype = jnp.float32
    attention: str = "einsum"  # 'einsum' | 'dot_product_attention' (fused kernels where the backend has them)

    @nn.compact
    def __call__(self, x, return_attention: bool = False):
        b, n, c = x.shape
        head_dim = c // self.num_heads
        qkv = nn.Dense(3 * c, dtype=self.dtype, kernel_init=dense_init, name="qkv")(x)
        q, k, v = jnp.split(qkv.reshape(b, n, 3, self.num_heads, head_dim), 3, axis=2)
        q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]  # (B, N, H, hd)
        kernel, bias = LinearParams(c, name="proj")(c, self.dtype)
        if self.attention == "dot_product_attention" and not return_attention:
            out = jax.nn.dot_product_attention(q, k, v, scale=head_dim ** -0.5)
            return out.reshape(b, n, c) @ kernel + bias, None
        dtype = self.dtype
        return jax.lax.platform_dependent(q, k, v, kernel, bias,
                                          cpu=lambda *a: _attend_q_scaled(*a, dtype),
                                          default=lambda *a: _attend_scores_scaled(*a, dtype))


class Mlp(nn.Module):
    hidden: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        x = nn.Dense(self.hidden, dtype=self.dtype, kernel_init=dense_init, name="fc1")(x)
        x = gelu(x)
        return nn.Dense(d, dtype=self.dtype, kernel_init=dense_init, name="fc2")(x)


def drop_path(x, rate: float, rng):
    """Stochastic depth per sample: keep with prob 1-rate and rescale by 1/(1-rate) (the reference's DropPath)."""
    keep = 1.0 - rate
    mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return x * mask.astype(x.dtype) / keep


class Block(nn.Module):
    dim: int
    num_heads: int
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0
    dtype: Dtype = jnp.float32
    attention: str = "einsum"

    @nn.compact
    def __call__(self, x, train: bool = False, return_attention: bool = False):
        y, attn = Attention(self.dim, self.num_heads, self.dtype, self.attention, name="attn")(
            LayerNorm(name="norm1")(x), return_attention)
        if return_attention:
            return attn
        use_dp = train and self.drop_path_rate > 0
        if use_dp:
            y = drop_path(y, self.drop_path_rate, self.make_rng("drop_path"))
        x = x + y
        y = Mlp(int(self.dim * self.mlp_ratio), self.dtype, name="mlp")(LayerNorm(name="norm2")(x))
        if use_dp:
            y = drop_path(y, self.drop_path_rate, self.make_rng("drop_path"))
        return x + y


class VisionTransformer(nn.Module):
    """The reference ViT with num_classes=0: `__call__` returns the CLS token after the final norm, (B, D)."""
    patch_size: int = 16
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0
    img_size: int = 224  # only sizes pos_embed, like the reference's img_size=[224]
    pos_embed_interp: str = "offset"
    dtype: Dtype = jnp.float32  # compute dtype; params stay float32
    attention: str = "einsum"
    remat: bool = False

    def setup(self):
        p, d = self.patch_size, self.embed_dim
        fan_in = 3 * p * p
        self.patch_embed = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                                   kernel_init=torch_default_uniform(fan_in),
                                   bias_init=torch_default_uniform(fan_in))
        self.cls_token = self.param("cls_token", dense_init, (1, 1, d))
        self.pos_embed = self.param("pos_embed", dense_init, (1, (self.img_size // p) ** 2 + 1, d))
        rates = np.linspace(0, self.drop_path_rate, self.depth)
        block_cls = nn.remat(Block, static_argnums=(2, 3)) if self.remat else Block
        self.blocks = [block_cls(d, self.num_heads, self.mlp_ratio, float(rates[i]), self.dtype, self.attention)
                       for i in range(self.depth)]
        self.norm = LayerNorm()

    def _tokens(self, x):
        p, d = self.patch_size, self.embed_dim
        b, h, w, _ = x.shape
        if h < p or w < p:
            raise ValueError(f"image of {h}x{w} pixels is smaller than one {p}x{p} patch")
        x = self.patch_embed(x.astype(self.dtype)).astype(jnp.float32)
        gh, gw = x.shape[1], x.shape[2]
        x = x.reshape(b, gh * gw, d)
        cls = jnp.broadcast_to(self.cls_token, (b, 1, d))
        pos = interpolate_pos_embed(self.pos_embed, (gh, gw), self.pos_embed_interp)
        # The residual stream stays float32 whatever the compute dtype (the reference's autocast keeps its adds in
        # float32): the blocks' Dense layers cast their inputs to `dtype`, and float32 + bfloat16 is float32.
        return jnp.concatenate([cls, x], axis=1) + pos

    def __call__(self, x, train: bool = False):
        x = self._tokens(x)
        for blk in self.blocks:
            x = blk(x, train, False)
        return self.norm(x)[:, 0]

    def get_last_selfattention(self, x):
        """Attention probabilities of the last block, (B, heads, N+1, N+1), float32."""
        x = self._tokens(x)
        for blk in self.blocks[:-1]:
            x = blk(x, False, False)
        return self.blocks[-1](x, False, True)

    def get_intermediate_layers(self, x, n: int = 1):
        """Token sequences of the last `n` blocks, each through the shared final norm: list of (B, N+1, D)."""
        x = self._tokens(x)
        outputs = []
        for i, blk in enumerate(self.blocks):
            x = blk(x, False, False)
            if i >= self.depth - n:
                outputs.append(self.norm(x))
        return outputs


ARCHS = {
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12),
}


def build_vit(arch: str, patch_size: int = 16, **kwargs) -> VisionTransformer:
    """A ViT by reference name (`vit_tiny|vit_small|vit_base`), or a custom size via embed_dim/depth/num_heads."""
    if arch not in ARCHS and arch != "vit_custom":
        raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(ARCHS)} or 'vit_custom'")
    return VisionTransformer(patch_size=patch_size, **{**ARCHS.get(arch, {}), **kwargs})


vit_tiny = functools.partial(build_vit, "vit_tiny")
vit_small = functools.partial(build_vit, "vit_small")
vit_base = functools.partial(build_vit, "vit_base")
